"""Run an aiohttp application as one task of the daemon's anyio task group, on TCP or on a unix socket.

aiohttp's server lives on the asyncio loop that anyio runs on; wrapping its ``AppRunner`` in a task ties the
server's lifetime to the task group: it starts listening before ``task_status.started()`` (so a port that is
taken fails the start, with a message, instead of a half-started daemon) and is shut down when the group is
cancelled.

The unix socket (:func:`serve_unix_app`) is how the API keeps its mutating calls to root: the file is
created mode 0600 (bound under a umask that leaves no window with a wider mode), so only its owner, the
daemon's user, can connect; a directory we create for it is 0700. A socket file left by a daemon that died is
removed at start; one that a live process still answers on fails the start instead, as a taken port does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

import anyio
from aiohttp import web
from anyio.abc import TaskStatus

from weaved.config import HostPort

SHUTDOWN_TIMEOUT = 1.0
"""Seconds in-flight requests get at shutdown; a status call is quick, and SIGTERM should be too."""
SOCKET_MODE = 0o600
DIRECTORY_MODE = 0o700


class ListenError(Exception):
    """A server could not bind its address; ``str()`` says which server, where and why."""


async def serve_app(
    app: web.Application,
    addr: HostPort,
    what: str,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``addr`` until cancelled; ``what`` names the server in errors."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, addr.host, addr.port).start()
        except OSError as exc:
            raise ListenError(f"cannot listen for {what} on {addr}: {_reason(exc)}") from None
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


async def serve_unix_app(
    app: web.Application,
    path: Path,
    what: str,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the unix socket ``path`` (mode 0600) until cancelled; the file is removed at the end."""
    sock = bind_private_socket(path, what)
    bound = os.stat(path).st_ino
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
        sock.close()
        # Only our own file: a daemon started after us may have bound a new one at the same path.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == bound:
                path.unlink()


def bind_private_socket(path: Path, what: str) -> socket.socket:
    """A listening unix stream socket at ``path`` that only this process's user may connect to."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=DIRECTORY_MODE, parents=True)
        _remove_stale(path, what)
    except OSError as exc:
        raise ListenError(f"cannot listen for {what} on {path}: {_reason(exc)}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # the file is born 0600: no moment in which another user could connect
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)  # whatever the umask was, say it explicitly
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen for {what} on {path}: {_reason(exc)}") from None
    finally:
        os.umask(previous)
    return sock


def _remove_stale(path: Path, what: str) -> None:
    """Remove a socket file nobody answers on; refuse a live one, and anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen for {what} on {path}: a file that is not a socket is in the way")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that did not exit cleanly
            return
    raise ListenError(f"cannot listen for {what} on {path}: another process serves it (another weaved?); "
                      "stop it or give another --api-socket")


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's own text repeats the address
