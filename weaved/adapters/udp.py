"""Sending control datagrams so that a refused send costs one datagram, never the daemon.

Why not just ``await udp.sendto()``: asyncio's datagram transport swallows send errors (it hands them to
``error_received``, which anyio only stores), so EPERM from a firewall rule or ENETUNREACH from a missing
route would vanish without a trace. Weave Net had the opposite problem and tore connections down on EPERM
(reference notes, section 11). Here the datagram goes straight to the (non-blocking) socket; an error is
counted by errno name and logged once per errno, and only a full send buffer falls back to the transport,
which queues the datagram and waits for the socket to drain.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from weaved.core.types import Endpoint

SEND_ERROR_PREFIX = "send_error_"


class RawSocket(Protocol):
    def sendto(self, data: bytes, address: tuple[str, int], /) -> int: ...


def errno_name(exc: OSError) -> str:
    """``EPERM`` for errno 1; the number itself for codes without a name (resolver errors are negative)."""
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else type(exc).__name__


class DatagramSender:
    """Sends datagrams on ``sock``; ``when_full`` is the awaitable fallback for a full send buffer."""

    def __init__(
        self,
        sock: RawSocket,
        when_full: Callable[[bytes, str, int], Awaitable[None]],
        counters: Counter[str],
        log: Any,
    ) -> None:
        self._sock = sock
        self._when_full = when_full
        self._counters = counters
        self._log = log

    async def send(self, data: bytes, destination: Endpoint) -> bool:
        """True when the kernel took the datagram; False when it refused it (counted, logged once per errno)."""
        try:
            self._sock.sendto(data, (destination.host, destination.port))
        except BlockingIOError:
            await self._when_full(data, destination.host, destination.port)
        except OSError as exc:
            name = errno_name(exc)
            key = SEND_ERROR_PREFIX + name
            if not self._counters[key]:
                self._log.warning("send failed", address=str(destination), error=exc.strerror or str(exc), errno=name,
                                  note="counted in weaved_send_errors_total; further ones are not logged")
            self._counters[key] += 1
            return False
        return True
