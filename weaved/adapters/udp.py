"""The daemon's control socket: one plain non-blocking UDP socket, read and written only by the pump.

Why not anyio's UDP socket (``anyio.create_udp_socket``): its asyncio protocol reads every datagram as soon
as the kernel has one and keeps at most 100 of them for the reader, silently discarding the oldest beyond
that, with nothing counted. A gossip burst in a large mesh would lose datagrams without a trace. Here the
datagrams stay in the kernel's receive buffer until the pump reads them; the buffers are asked to be large
(:data:`SOCKET_BUFFER_BYTES`, capped by the kernel at ``net.core.rmem_max``/``wmem_max``, so raise those for
a very large mesh), and should the receive buffer still overflow, the kernel counts each lost datagram
(``RcvbufErrors`` in the ``Udp:`` lines of ``/proc/net/snmp``).

Why sends go straight to the socket: asyncio's datagram transport swallows send errors (it hands them to
``error_received``, which anyio only stores), so EPERM from a firewall rule or ENETUNREACH from a missing
route would vanish. Weave Net had the opposite problem and tore connections down on EPERM (reference notes,
section 11). Here a refused send costs that one datagram: it is counted by errno name and logged once per
errno. Only a full send buffer is waited out, for at most :data:`SEND_FULL_WAIT` seconds per datagram.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio

from weaved.core.types import Endpoint

SEND_ERROR_PREFIX = "send_error_"
RECEIVE_ERROR_PREFIX = "receive_error_"

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
"""Asked for both SO_RCVBUF and SO_SNDBUF (best effort: the kernel caps it, and may double what it grants)."""

MAX_DATAGRAM = 65535
"""``recvfrom`` size: the largest UDP payload, so no datagram is ever truncated."""

SEND_FULL_WAIT = 0.5
"""Seconds a datagram may wait for room in a full send buffer before it is dropped (as ``send_error_EAGAIN``)."""


class ControlSocket(Protocol):
    """What :class:`DatagramSender` needs of a socket (a fake in the tests)."""

    def sendto(self, data: bytes, address: tuple[str, int], /) -> int: ...

    def fileno(self) -> int: ...


def open_control_socket(host: str, port: int) -> socket.socket:
    """A non-blocking IPv4 UDP socket bound to ``host:port``; raises :class:`OSError` when it cannot bind."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def errno_name(exc: OSError) -> str:
    """``EPERM`` for errno 1; the number itself for codes without a name (resolver errors are negative)."""
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else type(exc).__name__


class DatagramSender:
    """Sends datagrams on the non-blocking ``sock``, waiting (bounded) for room when its buffer is full."""

    def __init__(
        self,
        sock: ControlSocket,
        counters: Counter[str],
        log: Any,
        *,
        full_wait: float = SEND_FULL_WAIT,
        wait_writable: Callable[[ControlSocket], Awaitable[None]] = anyio.wait_writable,
    ) -> None:
        self._sock = sock
        self._counters = counters
        self._log = log
        self._full_wait = full_wait
        self._wait_writable = wait_writable

    async def send(self, data: bytes, destination: Endpoint) -> bool:
        """True when the kernel took the datagram; False when it refused it (counted, logged once per errno)."""
        address = (destination.host, destination.port)
        with anyio.move_on_after(self._full_wait):
            while True:
                try:
                    self._sock.sendto(data, address)
                except BlockingIOError:
                    await self._wait_writable(self._sock)
                except OSError as exc:
                    self._count(exc, destination)
                    return False
                else:
                    return True
        self._count(BlockingIOError(errno.EAGAIN, f"send buffer still full after {self._full_wait}s"), destination)
        return False

    def _count(self, exc: OSError, destination: Endpoint) -> None:
        name = errno_name(exc)
        key = SEND_ERROR_PREFIX + name
        if not self._counters[key]:
            self._log.warning("send failed", address=str(destination), error=exc.strerror or str(exc), errno=name,
                              note="counted in weaved_send_errors_total; further ones are not logged")
        self._counters[key] += 1
