"""Run an aiohttp application as one task of the daemon's anyio task group.

aiohttp's server lives on the asyncio loop that anyio runs on; wrapping its ``AppRunner`` in a task ties the
server's lifetime to the task group: it starts listening before ``task_status.started()`` (so a port that is
taken fails the start, with a message, instead of a half-started daemon) and is shut down when the group is
cancelled.
"""

from __future__ import annotations

import os

import anyio
from aiohttp import web
from anyio.abc import TaskStatus

from weaved.config import HostPort

SHUTDOWN_TIMEOUT = 1.0
"""Seconds in-flight requests get at shutdown; a status call is quick, and SIGTERM should be too."""


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
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's own text repeats the address
            raise ListenError(f"cannot listen for {what} on {addr}: {reason}") from None
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
