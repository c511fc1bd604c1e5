"""The local HTTP API, with Weave Net's routes: read-only on ``WEAVE_HTTP_ADDR`` (127.0.0.1:6784), whole on
the control socket ``WEAVE_API_SOCKET`` (/run/weave/weaved.sock, mode 0600).

Theory of operation
-------------------
Who may call what: any process on the node can open 127.0.0.1:6784 (any user, any hostNetwork pod), so
:func:`status_app` serves there only what reads (status, report, ready, metrics, lease lookups) and answers
every mutating method, on any path, with 405 and a line naming the control socket. :func:`control_app` adds
the calls that change the daemon (connect, forget, IPAM alloc/claim/release/gateway, rmpeer, leave) and is
served on a unix socket only its owner (root) may connect to; the CLI's mutating commands use it. Both
apps are built from the same handlers. The CNI plugin has its own socket (:mod:`weaved.cni.server`).

Handlers translate HTTP to calls on a :class:`MeshControl` (the daemon) and back; they hold no state and
never touch the mesh directly, so this module knows nothing about sockets, clocks or the core's internals.
Everything runs on the daemon's single asyncio thread, so a handler needs no lock: between two awaits it
has the mesh to itself.

Routes (all answers ``text/plain`` except ``/report`` and ``/metrics``):

* ``GET /status`` and ``/status/{peers,connections,targets}``: the text of ``weave status``,
* ``GET /report``: the status snapshot as JSON with the daemon's ``version``,
* ``GET /ready``: 200 once the daemon serves, 503 before (a Kubernetes readiness probe),
* ``POST /connect?peer=HOST[:PORT]`` and ``POST /forget?peer=...`` (socket only): add or drop dial targets
  (``peer`` may repeat, and may also come form-encoded in the body as Weave's CLI sends it),
* ``GET /metrics`` when a registry is given (Weave serves it here as well as on the metrics port).

IPAM, for the CLI, when an :class:`IpamControl` is given (Weave's paths where it has them; the GET lookups on
both, the rest on the socket only):

* ``POST /ip/{id}?ifname=eth0``: an address for the container's interface, as ``10.32.0.5/12``; asking
  again returns the same one. It waits for seeding or space as long as the allocator allows, then fails
  with 503 and the reason (``awaiting consensus (quorum 2, known 1)`` …),
* ``GET /ip/{id}?ifname=eth0``: the address a container's interface holds (404 if none),
* ``PUT /ip/{id}/{ip}[/{prefix}]?ifname=eth0``: claim a given address (409 if another peer owns it or
  another container holds it),
* ``DELETE /ip/{id}``: release every address of a container (idempotent, 204),
* ``GET /ip``: every lease as JSON ``[{container_id, ifname, address}]``,
* ``GET /ipam/gateway``: this node's own address on the pod network (socket only: the first ask allocates it),
* ``DELETE /peer/{name-or-nickname}``: ``rmpeer``, give a dead peer's addresses to the living,
* ``POST /ipam/leave[?force=true]``: leave the ring for good (``weaved reset``): hand every range this peer
  owns to a live peer. 200 once the heir confirmed, 202 when the hand-over is on disk and sent but not yet
  confirmed (the daemon keeps re-sending it while it runs); 409 while containers still hold addresses here
  (``force`` forgets their leases: only for containers that are gone), 503 when no peer can take over.
  Afterwards this peer refuses allocations (503, ``left``); a plain stop or restart never hands anything
  over. A POST rather than ``DELETE /ipam``, so that nothing that merely cleans up resources can fire it.
* ``GET /status/ipam``: the text of ``weave status ipam``; ``/status`` and ``/report`` include IPAM too.

Every IPAM answer that follows a change is sent only once the change is on disk (see
:mod:`weaved.adapters.ipam`). Errors are one line of text: 400 for a bad request, 404 for an unknown peer,
409 for a conflict, 503 when IPAM cannot serve (not seeded in time, out of space, state not saved).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

import weaved
from weaved.adapters.datapath_report import DatapathReport
from weaved.adapters.ipam import DEFAULT_IFNAME
from weaved.adapters.ipam_report import IpamReport
from weaved.adapters.metrics import metrics_handler
from weaved.adapters.resolve import ResolveError
from weaved.config import DEFAULT_API_SOCKET, ConfigError, HostPort, parse_peer
from weaved.core.ipam.allocator import AllocError, Departure, Lease
from weaved.core.status import MeshStatus
from weaved.core.types import Endpoint, PeerName
from weaved.render import IPAM_VIEW, VIEWS, render_ipam, render_status


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


class IpamControl(Protocol):
    """What the API needs from the daemon's IPAM (:class:`~weaved.adapters.ipam.IpamService`). Every method
    that can fail raises :class:`AllocError`; its ``code`` picks the HTTP status."""

    @property
    def prefix_length(self) -> int: ...

    def leases(self) -> list[Lease]: ...

    def report(self) -> IpamReport: ...

    def label(self, name: str) -> str: ...

    async def allocate(self, container_id: str, ifname: str) -> Lease: ...

    async def gateway(self) -> Lease: ...

    async def claim(self, container_id: str, ifname: str, address: str) -> Lease: ...

    async def release(self, container_id: str) -> list[Lease]: ...

    async def rmpeer(self, peer: str) -> tuple[PeerName, int]: ...

    async def leave(self, force: bool = False) -> tuple[Departure, bool]: ...


CONTROL_KEY = web.AppKey("control", MeshControl)
IPAM_KEY = web.AppKey("ipam", IpamControl)
DatapathSource = Callable[[], DatapathReport]
DATAPATH_KEY: web.AppKey[DatapathSource] = web.AppKey("datapath")

HTTP_STATUS = {
    "bad-request": 400,
    "reserved": 400,
    "unknown-peer": 404,
    "owned-elsewhere": 409,
    "in-use": 409,
    "released": 409,
    "ring": 409,
    "self": 409,
    "reachable": 409,
    "ambiguous": 409,
    "left": 503,
    "no-heir": 503,
}
"""HTTP status by :class:`AllocError` code; anything else (``not-ready``, ``timeout``, ``removed``, ``store``)
is 503: IPAM cannot serve now, and the CNI plugin may retry."""


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


def _ipam_report(request: web.Request) -> IpamReport | None:
    ipam = request.app.get(IPAM_KEY)
    return ipam.report() if ipam is not None else None


def _datapath_report(request: web.Request) -> DatapathReport | None:
    datapath = request.app.get(DATAPATH_KEY)
    return datapath() if datapath is not None else None


async def status(request: web.Request) -> web.Response:
    return _text(render_status(request.app[CONTROL_KEY].snapshot(), weaved.__version__, _ipam_report(request),
                               _datapath_report(request)))


async def status_view(request: web.Request) -> web.Response:
    name = request.match_info["view"]
    ipam = _ipam_report(request)
    if name == IPAM_VIEW and ipam is not None:
        return _text(render_ipam(ipam))
    view = VIEWS.get(name)
    if view is None:
        names = [*VIEWS, IPAM_VIEW] if ipam is not None else list(VIEWS)
        raise web.HTTPNotFound(text=f"unknown status view; try one of: {', '.join(names)}\n")
    return _text(view(request.app[CONTROL_KEY].snapshot()))


async def report(request: web.Request) -> web.Response:
    snapshot = request.app[CONTROL_KEY].snapshot()
    body = {"version": weaved.__version__, **snapshot.to_json()}
    if (ipam := _ipam_report(request)) is not None:
        body["ipam"] = ipam.to_json()
    if (datapath := _datapath_report(request)) is not None:
        body["datapath"] = datapath.to_json()
    return web.json_response(body)


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


# --- IPAM ---------------------------------------------------------------------------------------------


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 404: web.HTTPNotFound, 409: web.HTTPConflict, 503: web.HTTPServiceUnavailable,
}


def _refused(exc: AllocError) -> web.HTTPException:
    return _ERRORS[HTTP_STATUS.get(exc.code, 503)](text=f"{exc}\n")


def _ifname(request: web.Request) -> str:
    return request.query.get("ifname", DEFAULT_IFNAME)


def _cidr(ipam: IpamControl, lease: Lease) -> str:
    return f"{lease.ip()}/{ipam.prefix_length}"


async def ip_allocate(request: web.Request) -> web.Response:
    ipam = request.app[IPAM_KEY]
    try:
        lease = await ipam.allocate(request.match_info["id"], _ifname(request))
    except AllocError as exc:
        raise _refused(exc) from None
    return _text(_cidr(ipam, lease))


async def ip_lookup(request: web.Request) -> web.Response:
    ipam = request.app[IPAM_KEY]
    key = (request.match_info["id"], _ifname(request))
    lease = next((lease for lease in ipam.leases() if (lease.container_id, lease.ifname) == key), None)
    if lease is None:
        raise web.HTTPNotFound(text=f"no address for {key[0]} on {key[1]}\n")
    return _text(_cidr(ipam, lease))


async def ip_claim(request: web.Request) -> web.Response:
    ipam = request.app[IPAM_KEY]
    prefix = request.match_info.get("prefix")
    if prefix is not None and prefix != str(ipam.prefix_length):
        raise web.HTTPBadRequest(text=f"prefix length /{prefix} is not the pod network's /{ipam.prefix_length}\n")
    try:
        lease = await ipam.claim(request.match_info["id"], _ifname(request), request.match_info["ip"])
    except AllocError as exc:
        raise _refused(exc) from None
    return _text(_cidr(ipam, lease))


async def ip_release(request: web.Request) -> web.Response:
    try:
        await request.app[IPAM_KEY].release(request.match_info["id"])
    except AllocError as exc:
        raise _refused(exc) from None
    return web.Response(status=204)


async def ip_leases(request: web.Request) -> web.Response:
    ipam = request.app[IPAM_KEY]
    return web.json_response([
        {"container_id": lease.container_id, "ifname": lease.ifname, "address": _cidr(ipam, lease)}
        for lease in ipam.leases()
    ])


async def ipam_gateway(request: web.Request) -> web.Response:
    ipam = request.app[IPAM_KEY]
    try:
        lease = await ipam.gateway()
    except AllocError as exc:
        raise _refused(exc) from None
    return _text(_cidr(ipam, lease))


async def rmpeer(request: web.Request) -> web.Response:
    ipam = request.app[IPAM_KEY]
    try:
        name, taken = await ipam.rmpeer(request.match_info["peer"])
    except AllocError as exc:
        raise _refused(exc) from None
    return _text(f"{taken} IPs taken over from {ipam.label(name)}\n")


async def ipam_leave(request: web.Request) -> web.Response:
    ipam = request.app[IPAM_KEY]
    force = request.query.get("force", "").lower()
    if force not in ("", "true", "false", "1", "0", "yes", "no"):
        raise web.HTTPBadRequest(text=f"force must be true or false, got {force!r}\n")
    try:
        departure, confirmed = await ipam.leave(force=force in ("true", "1", "yes"))
    except AllocError as exc:
        raise _refused(exc) from None
    dropped = f"; forgot {len(departure.dropped)} leases" if departure.dropped else ""
    if departure.heir is None:
        return _text(f"left the IPAM ring: this peer owned no addresses{dropped}\n")
    heir = ipam.label(departure.heir)
    if confirmed:
        return _text(f"handed {departure.addresses} IPs to {heir}, which confirmed{dropped}\n")
    return _text(f"handed {departure.addresses} IPs to {heir}, not confirmed yet{dropped}: this peer re-sends the "
                 "hand-over while it runs; keep it running until 'weaved status ipam' says confirmed\n", 202)


MUTATING_METHODS = ("POST", "PUT", "DELETE", "PATCH")

REFUSED_READS = ("/ipam/gateway",)
"""GET routes that may change state (the gateway address is allocated on first ask): socket only."""


def _refuse_on_tcp(socket_path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The read-only port's answer to anything that would change the daemon: 405 and where to go instead."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=405, headers={"Allow": "GET, HEAD"},
            text=f"{request.method} {request.path} changes the daemon: this port serves only the read-only status. "
                 f"Use the weaved CLI as root (weaved connect|forget|ipam|rmpeer|reset), which talks to the unix "
                 f"socket {socket_path}\n")

    return refuse


def _add_read_routes(app: web.Application, registry: CollectorRegistry | None, ipam: IpamControl | None) -> None:
    app.router.add_get("/status", status)
    app.router.add_get("/status/{view}", status_view)
    app.router.add_get("/report", report)
    app.router.add_get("/ready", ready)
    if registry is not None:
        app.router.add_get("/metrics", metrics_handler(registry))
    if ipam is not None:
        app.router.add_get("/ip/{id}", ip_lookup)
        app.router.add_get("/ip", ip_leases)


def _add_mutating_routes(app: web.Application, ipam: IpamControl | None) -> None:
    app.router.add_post("/connect", connect)
    app.router.add_post("/forget", forget)
    if ipam is not None:
        app.router.add_post("/ip/{id}", ip_allocate)
        app.router.add_delete("/ip/{id}", ip_release)
        app.router.add_put("/ip/{id}/{ip}", ip_claim)
        app.router.add_put("/ip/{id}/{ip}/{prefix}", ip_claim)
        app.router.add_get("/ipam/gateway", ipam_gateway)
        app.router.add_delete("/peer/{peer}", rmpeer)
        app.router.add_post("/ipam/leave", ipam_leave)


def _base_app(control: MeshControl, ipam: IpamControl | None, datapath: DatapathSource | None) -> web.Application:
    app = web.Application()
    app[CONTROL_KEY] = control
    if datapath is not None:
        app[DATAPATH_KEY] = datapath
    if ipam is not None:
        app[IPAM_KEY] = ipam
    return app


def status_app(control: MeshControl, registry: CollectorRegistry | None = None, ipam: IpamControl | None = None,
               datapath: DatapathSource | None = None, *,
               socket_path: str = DEFAULT_API_SOCKET) -> web.Application:
    """The read-only API for ``WEAVE_HTTP_ADDR``: status, report, ready, metrics (with ``registry``) and the IPAM
    lookups (with ``ipam``); every mutating method on any path, and ``/ipam/gateway``, answer 405 naming the
    control socket ``socket_path``. Any local process can reach a TCP port, so nothing here may change state."""
    app = _base_app(control, ipam, datapath)
    _add_read_routes(app, registry, ipam)
    refuse = _refuse_on_tcp(socket_path)
    for path in REFUSED_READS:
        app.router.add_get(path, refuse)
    for method in MUTATING_METHODS:
        app.router.add_route(method, "/{tail:.*}", refuse)
    return app


def control_app(control: MeshControl, registry: CollectorRegistry | None = None, ipam: IpamControl | None = None,
                datapath: DatapathSource | None = None) -> web.Application:
    """The whole API, for the control socket (mode 0600, see :func:`~weaved.adapters.webserver.serve_unix_app`):
    the read-only routes of :func:`status_app` and every call that changes the daemon."""
    app = _base_app(control, ipam, datapath)
    _add_read_routes(app, registry, ipam)
    _add_mutating_routes(app, ipam)
    return app
