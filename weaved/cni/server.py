"""The daemon's end of the forwarder's unix socket: read a framed request and the netns fd, answer.

Theory of operation
-------------------
:func:`serve_cni` listens on a unix stream socket (mode 0600: only root may add pods) and serves each
connection in its own task, at most :data:`MAX_CONCURRENT` at a time. A connection carries one request
(:mod:`weaved.cni.wire`); the header comes with the pod's netns fd (SCM_RIGHTS) when the forwarder could
open ``CNI_NETNS``. Reading the request must finish within :data:`READ_TIMEOUT` seconds; a malformed one
gets a CNI error 6 answer (if the socket still works) and is counted. Every received fd is closed when the
request is done, whatever happened.

A socket path another live daemon answers on is not taken over (:class:`CniSocketError`): a stale file of a
dead daemon is replaced. :func:`run_spool` scans the spool of pending releases at start and periodically.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import anyio
import structlog
from anyio.abc import SocketStream, TaskStatus, UNIXSocketStream

from weaved.cni.handler import SPOOL_INTERVAL, CniHandler
from weaved.cni.spec import E_DECODE, LATEST, CniError
from weaved.cni.wire import HEADER_SIZE, FrameError, encode_answer, parse_env, parse_header

READ_TIMEOUT = 10.0
"""Seconds a client has to send its whole request (the forwarder sends it at once)."""
WRITE_TIMEOUT = 10.0
MAX_CONCURRENT = 32
"""Requests served at once; more wait in the listen backlog (kubelet serializes per pod anyway)."""


class CniSocketError(Exception):
    """The CNI socket cannot be served (another live daemon answers on it, or no permission); one line."""


def _live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


async def _receive_exactly(stream: SocketStream, size: int) -> bytes:
    chunks, have = [], 0
    while have < size:
        chunk = await stream.receive(min(65536, size - have))
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


class CniServer:
    def __init__(self, handler: CniHandler) -> None:
        self.handler = handler
        self.counters: dict[str, int] = {}
        self._limit = anyio.CapacityLimiter(MAX_CONCURRENT)
        self._log = structlog.get_logger("weaved")

    async def serve(self, path: Path, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if path.exists() and _live(path):
            raise CniSocketError(f"another process serves CNI on {path}; stop it or give another --cni-socket")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            listener = await anyio.create_unix_listener(path, mode=0o600)
        except OSError as exc:
            raise CniSocketError(f"cannot listen on {path}: {exc.strerror or exc}; "
                                 "give another --cni-socket, or off") from None
        self._log.info("cni socket listening", path=str(path), spool=str(self.handler.spool_dir))
        try:
            async with listener:
                task_status.started()
                await listener.serve(self._connection)
        finally:
            # Only our own socket file: a restarted daemon may have bound a new one meanwhile.
            try:
                if path.is_socket() and not _live(path):
                    path.unlink()
            except OSError:
                pass

    async def _connection(self, stream: SocketStream) -> None:
        fds: list[int] = []
        async with stream, self._limit:
            try:
                with anyio.fail_after(READ_TIMEOUT):
                    assert isinstance(stream, UNIXSocketStream), "a unix socket listener yields unix streams"
                    head, fds = await _receive_with_fds(stream)
                    if len(head) < HEADER_SIZE:
                        head += await _receive_exactly(stream, HEADER_SIZE - len(head))
                    header = parse_header(head)
                    env = parse_env(await _receive_exactly(stream, header.env_len))
                    conf = await _receive_exactly(stream, header.conf_len)
                if header.has_fd != bool(fds) or len(fds) > 1:
                    raise FrameError(f"has_fd={header.has_fd} but {len(fds)} descriptors came")
            except (FrameError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, RuntimeError) as exc:
                self._count(f"bad_request_{type(exc).__name__}")
                self._log.warning("cni request refused", error=str(exc) or type(exc).__name__)
                error = CniError(E_DECODE, "malformed request from the weave-net forwarder", str(exc)[:200])
                await self._answer(stream, 1, (json.dumps(error.to_json(LATEST)) + "\n").encode())
                return
            finally:
                for extra in fds[1:]:
                    os.close(extra)
                del fds[1:]
            try:
                status, out = await self.handler.handle(env, conf, fds[0] if fds else None)
            finally:
                for fd in fds:
                    os.close(fd)
            await self._answer(stream, status, out)

    async def _answer(self, stream: SocketStream, status: int, out: bytes) -> None:
        try:
            with anyio.fail_after(WRITE_TIMEOUT):
                await stream.send(encode_answer(status, out))
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, ValueError) as exc:
            self._count("answer_lost")
            self._log.warning("cni answer not delivered", error=str(exc) or type(exc).__name__)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1


async def _receive_with_fds(stream: UNIXSocketStream) -> tuple[bytes, list[int]]:
    """The first bytes of the header and any descriptors sent with them."""
    message, fds = await stream.receive_fds(HEADER_SIZE, 1)
    if not message:
        for fd in fds:
            os.close(fd)
        raise anyio.EndOfStream
    return bytes(message), list(fds)


async def run_spool(handler: CniHandler, interval: float = SPOOL_INTERVAL) -> None:
    """Process the spool at start and then every ``interval`` seconds."""
    log = structlog.get_logger("weaved")
    while True:
        try:
            await handler.process_spool()
        except Exception:
            log.exception("cni spool scan failed")
        await anyio.sleep(interval)
