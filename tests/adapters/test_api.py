"""The HTTP API against a fake daemon, over real loopback HTTP, read with the CLI's own client."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import pytest

import weaved
from weaved import cli
from weaved.adapters.api import api_app
from weaved.adapters.client import ApiError, Client
from weaved.adapters.metrics import metrics_registry
from weaved.adapters.resolve import ResolveError
from weaved.adapters.webserver import ListenError, serve_app
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


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    control = FakeControl()
    address = HostPort("127.0.0.1", free_tcp_port())
    async with anyio.create_task_group() as tg:
        await tg.start(serve_app, api_app(control, metrics_registry(control.snapshot)), address, "the HTTP API")
        yield Served(control, Client(str(address)))
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
    assert await call(served.client.connect, "127.0.0.1") == "connecting to 127.0.0.1:7000\n"
    assert await call(served.client.connect, "localhost:7005") == "connecting to 127.0.0.1:7005\n"
    assert served.control.connected == [HostPort("127.0.0.1", 7000), HostPort("localhost", 7005)]
    assert await call(served.client.forget, "127.0.0.1:7001") == "forgot 127.0.0.1:7001\n"
    assert served.control.forgotten == [HostPort("127.0.0.1", 7001)]


async def test_connect_accepts_form_encoded_peers_like_weaves_cli(served: Served) -> None:
    import urllib.request

    def post() -> str:
        request = urllib.request.Request(f"http://{served.client.address}/connect", data=b"peer=10.9.9.9&peer=x:1",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(response.read().decode())

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
        await call(served.client.request, "POST", "/connect", params)
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
    assert await call(cli.main, ["connect", "--api", address, "bad.invalid"]) == 1
    assert capsys.readouterr().err.startswith("weaved: the daemon at")


async def test_a_taken_port_fails_the_start_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = HostPort("127.0.0.1", taken.getsockname()[1])
        message = rf"^cannot listen for the HTTP API on {address}: Address already in use$"
        with pytest.RaisesGroup(pytest.RaisesExc(ListenError, match=message)):
            async with anyio.create_task_group() as tg:
                await tg.start(serve_app, api_app(FakeControl()), address, "the HTTP API")
