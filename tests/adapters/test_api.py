"""The HTTP API against a fake daemon, over real loopback HTTP and a real unix socket, read with the CLI's own
client: the read-only port refuses every call that changes the daemon; the control socket serves them."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

import weaved
from weaved import cli
from weaved.adapters.api import control_app, status_app
from weaved.adapters.client import ApiError, Client
from weaved.adapters.metrics import metrics_registry
from weaved.adapters.resolve import ResolveError
from weaved.adapters.webserver import ListenError, serve_app, serve_unix_app
from weaved.config import HostPort
from weaved.core.status import ConnectionStatus, MeshStatus, PeerStatus
from weaved.core.types import Endpoint
from weaved.render import render_connections, render_peers, render_status, render_targets

pytestmark = pytest.mark.anyio
T = TypeVar("T")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def snapshot() -> MeshStatus:
    return MeshStatus(
        "aa:bb:cc:dd:ee:01", "n1", 1, 1, "weaved 1..1", 7000, 200,
        peers=[PeerStatus("aa:bb:cc:dd:ee:01", "n1", 1, 1, 1, [], None)],
        connections=[ConnectionStatus("127.0.0.1:7001", True, "failed", None, None, "no answer to handshake")],
        targets=["127.0.0.1:7001"],
        counters={"rx_datagrams": 4},
    )


@dataclass
class FakeControl:
    ready: bool = False
    connected: list[HostPort] = field(default_factory=list)
    forgotten: list[HostPort] = field(default_factory=list)

    def is_ready(self) -> bool:
        return self.ready

    def snapshot(self) -> MeshStatus:
        return snapshot()

    async def connect(self, peer: HostPort) -> list[Endpoint]:
        if peer.host.endswith(".invalid"):
            raise ResolveError(f"cannot resolve {peer.host}: Name or service not known")
        self.connected.append(peer)
        return [Endpoint("127.0.0.1", peer.port)]

    async def forget(self, peer: HostPort) -> list[Endpoint]:
        self.forgotten.append(peer)
        return [Endpoint("127.0.0.1", peer.port)]


@dataclass
class Served:
    control: FakeControl
    client: Client
    """The read-only TCP port."""
    socket: Client
    """The control socket."""


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    control = FakeControl()
    address = HostPort("127.0.0.1", free_tcp_port())
    path = tmp_path / "run" / "weaved.sock"
    registry = metrics_registry(control.snapshot)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_app, status_app(control, registry, socket_path=str(path)), address, "the HTTP API")
        await tg.start(serve_unix_app, control_app(control, registry), path, "the control API")
        yield Served(control, Client(str(address)), Client.unix(path))
        tg.cancel_scope.cancel()


async def call(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking client call off the event loop that serves it."""
    return await anyio.to_thread.run_sync(fn, *args)


async def test_ready_is_503_until_the_daemon_says_so(served: Served) -> None:
    with pytest.raises(ApiError, match="not ready"):
        await call(served.client.request, "GET", "/ready")
    served.control.ready = True
    assert await call(served.client.request, "GET", "/ready") == "ready\n"


async def test_status_views_are_the_rendered_snapshot(served: Served) -> None:
    get = served.client.request
    assert await call(get, "GET", "/status") == render_status(snapshot(), weaved.__version__)
    assert await call(get, "GET", "/status/peers") == render_peers(snapshot())
    assert await call(get, "GET", "/status/connections") == render_connections(snapshot())
    assert await call(get, "GET", "/status/targets") == render_targets(snapshot())
    with pytest.raises(ApiError, match="unknown status view"):
        await call(get, "GET", "/status/ipam")


async def test_report_is_the_snapshot_as_json_with_the_version(served: Served) -> None:
    report = await call(served.client.report)
    assert report.pop("version") == weaved.__version__
    assert MeshStatus.from_json(report) == snapshot()


async def test_connect_and_forget_parse_peers_with_the_daemons_port(served: Served) -> None:
    assert await call(served.socket.connect, "127.0.0.1") == "connecting to 127.0.0.1:7000\n"
    assert await call(served.socket.connect, "localhost:7005") == "connecting to 127.0.0.1:7005\n"
    assert served.control.connected == [HostPort("127.0.0.1", 7000), HostPort("localhost", 7005)]
    assert await call(served.socket.forget, "127.0.0.1:7001") == "forgot 127.0.0.1:7001\n"
    assert served.control.forgotten == [HostPort("127.0.0.1", 7001)]


async def test_connect_accepts_form_encoded_peers_like_weaves_cli(served: Served) -> None:
    def post() -> str:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(served.socket.address)
        conn = http.client.HTTPConnection("localhost")
        conn.sock = sock
        conn.request("POST", "/connect", body=b"peer=10.9.9.9&peer=x:1",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with conn.getresponse() as response:
                return str(response.read().decode())
        finally:
            conn.close()

    assert await call(post) == "connecting to 127.0.0.1:7000\nconnecting to 127.0.0.1:1\n"
    assert served.control.connected == [HostPort("10.9.9.9", 7000), HostPort("x", 1)]


@pytest.mark.parametrize(("peer", "fragment"), [
    ("", "missing parameter: peer"),
    ("10.0.0.1:nope", "peer: port must be a number"),
    ("no-such-host.invalid", "cannot resolve no-such-host.invalid"),
])
async def test_bad_peers_are_400_with_the_reason(served: Served, peer: str, fragment: str) -> None:
    params = {"peer": peer} if peer else None
    with pytest.raises(ApiError, match=fragment):
        await call(served.socket.request, "POST", "/connect", params)
    assert served.control.connected == []


async def test_metrics_are_also_served_on_the_api(served: Served) -> None:
    text = await call(served.client.request, "GET", "/metrics")
    assert 'weaved_datagrams_total{direction="rx"} 4.0' in text


async def test_cli_status_and_report_read_the_api(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    address = served.client.address
    assert await call(cli.main, ["status", "--api", address]) == 0
    assert capsys.readouterr().out == render_status(snapshot(), weaved.__version__)
    assert await call(cli.main, ["status", "connections", "--api", address]) == 0
    assert capsys.readouterr().out == render_connections(snapshot())
    assert await call(cli.main, ["report", "--api", address]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "aa:bb:cc:dd:ee:01"
    assert await call(cli.main, ["connect", "--api-socket", served.socket.address, "bad.invalid"]) == 1
    assert capsys.readouterr().err.startswith(f"weaved: the daemon at {served.socket.address} refused POST /connect")
    assert await call(cli.main, ["connect", "--api-socket", served.socket.address, "127.0.0.1:7009"]) == 0
    assert capsys.readouterr().out == "connecting to 127.0.0.1:7009\n"


async def test_a_taken_port_fails_the_start_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = HostPort("127.0.0.1", taken.getsockname()[1])
        message = rf"^cannot listen for the HTTP API on {address}: Address already in use$"
        with pytest.RaisesGroup(pytest.RaisesExc(ListenError, match=message)):
            async with anyio.create_task_group() as tg:
                await tg.start(serve_app, status_app(FakeControl()), address, "the HTTP API")


def _concrete(canonical: str) -> str:
    """A path that matches a route: every ``{name}`` replaced by a plausible value."""
    return "/".join("x" if part.startswith("{") else part for part in canonical.split("/"))


def _raw(address: str, method: str, path: str) -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT", "PATCH") else None)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


async def test_the_tcp_port_refuses_every_route_that_changes_the_daemon(tmp_path: Path) -> None:
    """Any local process reaches 127.0.0.1:6784: every route of the control app that is not a plain read
    (connect, forget, IPAM alloc/claim/release/gateway, rmpeer, leave), and any mutating method on any path,
    is a 405 there naming the control socket, and reaches neither the mesh nor IPAM."""
    control = FakeControl()
    ipam: Any = object()  # never called: every request below must be refused before a handler runs
    path = tmp_path / "weaved.sock"
    reads = {(r.method, r.resource.canonical) for r in status_app(control, ipam=ipam).router.routes()
             if r.resource is not None and r.handler.__name__ != "refuse"}
    changes = sorted({(r.method, r.resource.canonical) for r in control_app(control, ipam=ipam).router.routes()
                      if r.resource is not None and r.method != "HEAD"} - reads)
    assert {("POST", "/connect"), ("POST", "/forget"), ("POST", "/ip/{id}"), ("DELETE", "/ip/{id}"),
            ("PUT", "/ip/{id}/{ip}"), ("GET", "/ipam/gateway"), ("DELETE", "/peer/{peer}"),
            ("POST", "/ipam/leave")} <= set(changes)
    address = HostPort("127.0.0.1", free_tcp_port())
    async with anyio.create_task_group() as tg:
        await tg.start(serve_app, status_app(control, ipam=ipam, socket_path=str(path)), address, "the HTTP API")
        asked = [*((m, _concrete(c)) for m, c in changes),
                 ("POST", "/status"), ("DELETE", "/report"), ("PUT", "/ready"), ("PATCH", "/anything/at/all"),
                 ("POST", "/ipam/leave?force=true"), ("DELETE", "/ip/x?ifname=eth0")]
        for method, target in asked:
            status, text = await call(_raw, str(address), method, target)
            assert status == 405, (method, target, status, text)
            assert str(path) in text and "weaved CLI as root" in text, text
        tg.cancel_scope.cancel()
    assert control.connected == [] and control.forgotten == []


async def test_reads_are_served_on_both_the_port_and_the_socket(served: Served) -> None:
    for client in (served.client, served.socket):
        assert await call(client.request, "GET", "/status/targets") == render_targets(snapshot())
        assert 'weaved_datagrams_total{direction="rx"} 4.0' in await call(client.request, "GET", "/metrics")


async def test_the_control_socket_is_0600_replaces_a_stale_one_and_refuses_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "weaved.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:  # what a killed daemon leaves behind
        dead.bind(str(path))
    previous = os.umask(0)  # the socket must not depend on the daemon's umask
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_unix_app, control_app(FakeControl()), path, "the control API")
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert await call(Client.unix(path).request, "GET", "/status/targets") == render_targets(snapshot())
            with pytest.RaisesGroup(pytest.RaisesExc(ListenError, match="another process serves it")):
                async with anyio.create_task_group() as second:
                    await second.start(serve_unix_app, control_app(FakeControl()), path, "the control API")
            tg.cancel_scope.cancel()
    finally:
        os.umask(previous)
    assert not path.exists()  # removed at the end, so the next start finds nothing stale


async def test_a_directory_made_for_the_socket_is_0700(tmp_path: Path) -> None:
    path = tmp_path / "run" / "weave" / "weaved.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(serve_unix_app, control_app(FakeControl()), path, "the control API")
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        tg.cancel_scope.cancel()


async def test_a_file_in_the_sockets_way_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "weaved.sock"
    path.write_text("not a socket")
    with pytest.RaisesGroup(pytest.RaisesExc(ListenError, match="not a socket is in the way")):
        async with anyio.create_task_group() as tg:
            await tg.start(serve_unix_app, control_app(FakeControl()), path, "the control API")
    assert path.read_text() == "not a socket"
