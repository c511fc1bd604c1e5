"""The local HTTP API on ``WEAVE_HTTP_ADDR`` (127.0.0.1:6784), with Weave Net's routes.

Theory of operation
-------------------
Handlers translate HTTP to calls on a :class:`MeshControl` (the daemon) and back; they hold no state and
never touch the mesh directly, so this module knows nothing about sockets, clocks or the core's internals.
Everything runs on the daemon's single asyncio thread, so a handler needs no lock: between two awaits it
has the mesh to itself.

Routes (all answers ``text/plain`` except ``/report`` and ``/metrics``):

* ``GET /status`` and ``/status/{peers,connections,targets}``: the text of ``weave status``,
* ``GET /report``: the status snapshot as JSON with the daemon's ``version``,
* ``GET /ready``: 200 once the daemon serves, 503 before (a Kubernetes readiness probe),
* ``POST /connect?peer=HOST[:PORT]`` and ``POST /forget?peer=...``: add or drop dial targets
  (``peer`` may repeat, and may also come form-encoded in the body as Weave's CLI sends it),
* ``GET /metrics`` when a registry is given (Weave serves it here as well as on the metrics port).
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

import weaved
from weaved.adapters.metrics import metrics_handler
from weaved.adapters.resolve import ResolveError
from weaved.config import ConfigError, HostPort, parse_peer
from weaved.core.status import MeshStatus
from weaved.core.types import Endpoint
from weaved.render import VIEWS, render_status


class MeshControl(Protocol):
    """What the API needs from the daemon."""

    def is_ready(self) -> bool: ...

    def snapshot(self) -> MeshStatus: ...

    async def connect(self, peer: HostPort) -> list[Endpoint]:
        """Resolve ``peer`` and dial it; raises :class:`ResolveError`."""
        ...

    async def forget(self, peer: HostPort) -> list[Endpoint]:
        """Resolve ``peer`` and stop dialling it; raises :class:`ResolveError`."""
        ...


CONTROL_KEY = web.AppKey("control", MeshControl)


def _text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status)


async def _peer_args(request: web.Request) -> list[HostPort]:
    """Every ``peer`` value from the query and a form body, parsed; 400 when there is none or one is bad."""
    values = list(request.query.getall("peer", []))
    if request.can_read_body:
        form = await request.post()
        values += [v for v in form.getall("peer", []) if isinstance(v, str)]
    if not values:
        raise web.HTTPBadRequest(text="missing parameter: peer=HOST[:PORT]\n")
    default_port = request.app[CONTROL_KEY].snapshot().port
    try:
        return [parse_peer(v, default_port, "peer") for v in values]
    except ConfigError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None


async def status(request: web.Request) -> web.Response:
    return _text(render_status(request.app[CONTROL_KEY].snapshot(), weaved.__version__))


async def status_view(request: web.Request) -> web.Response:
    view = VIEWS.get(request.match_info["view"])
    if view is None:
        raise web.HTTPNotFound(text=f"unknown status view; try one of: {', '.join(VIEWS)}\n")
    return _text(view(request.app[CONTROL_KEY].snapshot()))


async def report(request: web.Request) -> web.Response:
    snapshot = request.app[CONTROL_KEY].snapshot()
    return web.json_response({"version": weaved.__version__, **snapshot.to_json()})


async def ready(request: web.Request) -> web.Response:
    if request.app[CONTROL_KEY].is_ready():
        return _text("ready\n")
    return _text("not ready\n", status=503)


async def _for_each_peer(request: web.Request, action: str) -> web.Response:
    """Apply ``connect`` or ``forget`` to every ``peer`` argument; one line per resolved endpoint."""
    control = request.app[CONTROL_KEY]
    method, verb = (control.connect, "connecting to") if action == "connect" else (control.forget, "forgot")
    lines = []
    for peer in await _peer_args(request):
        try:
            endpoints = await method(peer)
        except ResolveError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        lines += [f"{verb} {ep}" for ep in endpoints]
    return _text("".join(line + "\n" for line in lines))


async def connect(request: web.Request) -> web.Response:
    return await _for_each_peer(request, "connect")


async def forget(request: web.Request) -> web.Response:
    return await _for_each_peer(request, "forget")


def api_app(control: MeshControl, registry: CollectorRegistry | None = None) -> web.Application:
    """The API application for ``control``; with ``registry``, ``/metrics`` too."""
    app = web.Application()
    app[CONTROL_KEY] = control
    app.router.add_get("/status", status)
    app.router.add_get("/status/{view}", status_view)
    app.router.add_get("/report", report)
    app.router.add_get("/ready", ready)
    app.router.add_post("/connect", connect)
    app.router.add_post("/forget", forget)
    if registry is not None:
        app.router.add_get("/metrics", metrics_handler(registry))
    return app
