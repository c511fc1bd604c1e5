"""A refused send costs one datagram and a counter; a full buffer waits instead of dropping."""

from __future__ import annotations

import errno
from collections import Counter
from typing import Any

import pytest

from weaved.adapters.udp import DatagramSender, errno_name
from weaved.core.types import Endpoint

DEST = Endpoint("127.0.0.1", 6783)


class FakeSocket:
    def __init__(self, *errors: OSError | None) -> None:
        self.errors = list(errors)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, address: tuple[str, int], /) -> int:
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        self.sent.append((data, address))
        return len(data)


class FakeLog:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, message: str, **fields: Any) -> None:
        self.warnings.append((message, fields))


class Fallback:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str, int]] = []

    async def __call__(self, data: bytes, host: str, port: int) -> None:
        self.calls.append((data, host, port))


@pytest.mark.anyio
async def test_send_errors_are_counted_by_errno_and_logged_once() -> None:
    sock = FakeSocket(PermissionError(errno.EPERM, "Operation not permitted"),
                      PermissionError(errno.EPERM, "Operation not permitted"),
                      OSError(errno.ENETUNREACH, "Network is unreachable"), None)
    counters: Counter[str] = Counter()
    log = FakeLog()
    sender = DatagramSender(sock, Fallback(), counters, log)
    results = [await sender.send(bytes([i]), DEST) for i in range(4)]
    assert results == [False, False, False, True]
    assert counters == Counter({"send_error_EPERM": 2, "send_error_ENETUNREACH": 1})
    assert [fields["errno"] for _, fields in log.warnings] == ["EPERM", "ENETUNREACH"]
    assert sock.sent == [(b"\x03", ("127.0.0.1", 6783))], "the sender goes on after errors"


@pytest.mark.anyio
async def test_a_full_send_buffer_falls_back_to_the_waiting_path() -> None:
    fallback = Fallback()
    counters: Counter[str] = Counter()
    sender = DatagramSender(FakeSocket(BlockingIOError(errno.EAGAIN, "busy")), fallback, counters, FakeLog())
    assert await sender.send(b"x", DEST)
    assert fallback.calls == [(b"x", "127.0.0.1", 6783)]
    assert not counters


def test_errno_names() -> None:
    assert errno_name(OSError(errno.EPERM, "x")) == "EPERM"
    assert errno_name(OSError(-9, "resolver")) == "-9"
    assert errno_name(OSError("no errno")) == "OSError"
