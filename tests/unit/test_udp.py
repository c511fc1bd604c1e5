"""A refused send costs one datagram and a counter; a full buffer is waited out, for a bounded time."""

from __future__ import annotations

import errno
import socket
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from weaved.adapters.udp import DatagramSender, errno_name, open_control_socket
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

    def fileno(self) -> int:
        return -1


class FakeLog:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, message: str, **fields: Any) -> None:
        self.warnings.append((message, fields))


class Waits:
    """Stands in for ``anyio.wait_writable``: records the waits; ``forever`` never sees the socket drain."""

    def __init__(self, *, forever: bool = False) -> None:
        self.count = 0
        self.forever = forever

    async def __call__(self, sock: object) -> None:
        self.count += 1
        if self.forever:
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()


def busy() -> BlockingIOError:
    return BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


@pytest.mark.anyio
async def test_send_errors_are_counted_by_errno_and_logged_once() -> None:
    sock = FakeSocket(PermissionError(errno.EPERM, "Operation not permitted"),
                      PermissionError(errno.EPERM, "Operation not permitted"),
                      OSError(errno.ENETUNREACH, "Network is unreachable"), None)
    counters: Counter[str] = Counter()
    log = FakeLog()
    sender = DatagramSender(sock, counters, log, wait_writable=Waits())
    results = [await sender.send(bytes([i]), DEST) for i in range(4)]
    assert results == [False, False, False, True]
    assert counters == Counter({"send_error_EPERM": 2, "send_error_ENETUNREACH": 1})
    assert [fields["errno"] for _, fields in log.warnings] == ["EPERM", "ENETUNREACH"]
    assert sock.sent == [(b"\x03", ("127.0.0.1", 6783))], "the sender goes on after errors"


@pytest.mark.anyio
async def test_a_full_send_buffer_is_waited_out_and_the_send_retried() -> None:
    sock, waits, counters = FakeSocket(busy(), busy()), Waits(), Counter[str]()
    sender = DatagramSender(sock, counters, FakeLog(), wait_writable=waits)
    assert await sender.send(b"x", DEST)
    assert sock.sent == [(b"x", ("127.0.0.1", 6783))]
    assert waits.count == 2
    assert not counters


@pytest.mark.anyio
async def test_a_send_buffer_that_stays_full_costs_the_datagram_after_a_bounded_wait() -> None:
    sock, counters, log = FakeSocket(busy(), None), Counter[str](), FakeLog()
    sender = DatagramSender(sock, counters, log, full_wait=0.05, wait_writable=Waits(forever=True))
    with anyio.fail_after(2):
        assert not await sender.send(b"x", DEST)
    assert counters == Counter({"send_error_EAGAIN": 1})
    assert [fields["errno"] for _, fields in log.warnings] == ["EAGAIN"]
    assert await sender.send(b"y", DEST), "the next datagram goes out once there is room"
    assert sock.sent == [(b"y", ("127.0.0.1", 6783))]


@pytest.mark.anyio
async def test_a_real_socket_sends_without_waiting() -> None:
    with open_control_socket("127.0.0.1", 0) as sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as far:
        far.bind(("127.0.0.1", 0))
        far.settimeout(2)
        counters: Counter[str] = Counter()
        sender = DatagramSender(sock, counters, FakeLog())
        assert await sender.send(b"hello", Endpoint(*far.getsockname()))
        assert far.recvfrom(100) == (b"hello", sock.getsockname())
        assert not counters


def test_the_control_socket_is_bound_non_blocking_with_big_buffers() -> None:
    with open_control_socket("127.0.0.1", 0) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert not sock.getblocking()
        with pytest.raises(BlockingIOError):
            sock.recvfrom(100)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
            default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # best effort: the kernel caps the request at net.core.rmem_max (then doubles it for its bookkeeping)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > default


def test_a_port_in_use_is_an_os_error() -> None:
    with open_control_socket("127.0.0.1", 0) as sock, pytest.raises(OSError) as caught:
        open_control_socket("127.0.0.1", sock.getsockname()[1]).close()
    assert caught.value.errno == errno.EADDRINUSE


def test_errno_names() -> None:
    assert errno_name(OSError(errno.EPERM, "x")) == "EPERM"
    assert errno_name(OSError(-9, "resolver")) == "-9"
    assert errno_name(OSError("no errno")) == "OSError"
