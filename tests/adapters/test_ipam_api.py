"""IPAM in the daemon, in-process: the HTTP API over loopback (read with the CLI's own client and the CLI
itself), and the service's durability rule checked directly with a store that can be held mid-write."""

from __future__ import annotations

import http.client
import io
import json
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgpack
import pytest

import weaved
from weaved import cli
from weaved.adapters import ipam as ipam_module
from weaved.adapters.api import control_app, status_app
from weaved.adapters.client import ApiError, Client
from weaved.adapters.daemon import Node
from weaved.adapters.ipam import GATEWAY_ID, REMOVED_STATE, IpamService
from weaved.adapters.metrics import metrics_registry
from weaved.adapters.store import SnapshotStore, Stored
from weaved.adapters.udp import open_control_socket
from weaved.adapters.webserver import serve_app, serve_unix_app
from weaved.config import HostPort
from weaved.core.events import PeerJoined, PeerRestarted, RelayDelivered
from weaved.core.ipam.allocator import Allocator, AllocError
from weaved.core.ipam.ring import AddressRange
from weaved.core.ipam.seeding import ConsensusInit, InitMode, SeedInit
from weaved.core.mesh import MeshConfig, MeshPeer
from weaved.core.types import PeerIdentity, PeerName, PeerUID, default_short_id, derive_peer_name
from weaved.render import render_ipam, render_status

pytestmark = pytest.mark.anyio
T = TypeVar("T")

RANGE = AddressRange.from_cidr("10.44.0.0/24")
OTHER = derive_peer_name("test/other")


def identity(nickname: str) -> PeerIdentity:
    name = derive_peer_name("test/" + nickname)
    return PeerIdentity(name, nickname, PeerUID(random.getrandbits(63) + 1), default_short_id(name))


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking client call off the event loop that serves it."""
    return await anyio.to_thread.run_sync(fn, *args)


def http_status(address: str, method: str, path: str) -> int:
    """The status of ``method path`` on the control socket at ``address``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(address)
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        response = conn.getresponse()
        response.read()
        return int(response.status)
    finally:
        conn.close()


class GatedStore(SnapshotStore):
    """A real store whose writes wait for :attr:`gate`; :attr:`entered` counts writes begun."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.gate = threading.Event()
        self.entered = 0
        self.writes: list[Stored] = []

    def write(self, stored: Stored) -> None:
        self.entered += 1
        assert self.gate.wait(10), "test never opened the gate"
        super().write(stored)
        self.writes.append(stored)


@dataclass
class Served:
    node: Node
    client: Client
    store: SnapshotStore
    http: str
    """The read-only TCP API (``client`` talks to the control socket)."""

    @property
    def address(self) -> str:
        return self.client.address


@asynccontextmanager
async def served_node(state_dir: Path, *, mode: InitMode | None = None, timeout: float = 30.0,
                      store: SnapshotStore | None = None) -> AsyncIterator[Served]:
    """A daemon node in-process (pump, the control API with IPAM on a unix socket, metrics on the API); it owns
    RANGE alone by default."""
    me = identity("a")
    store = store or SnapshotStore(state_dir)
    allocator = Allocator(me.name, RANGE, mode or SeedInit((me.name,)), random.Random(3), timeout=timeout)
    with open_control_socket("127.0.0.1", 0) as sock:
        peer = MeshPeer(me, MeshConfig(port=sock.getsockname()[1]), random.Random(3), now=time.monotonic())
        node = Node(peer, sock, allocator, store)
        path = state_dir.parent / f"{state_dir.name}-api.sock"  # beside it: a test may want no state dir yet
        http = HostPort("127.0.0.1", free_tcp_port())
        registry = metrics_registry(node.snapshot, node.ipam.report)
        async with anyio.create_task_group() as tg:
            await tg.start(serve_unix_app, control_app(node, registry, node.ipam), path, "the control API")
            await tg.start(serve_app, status_app(node, registry, node.ipam, socket_path=str(path)), http,
                           "the HTTP API")
            tg.start_soon(node.pump)
            yield Served(node, Client.unix(path, timeout=20), store, str(http))
            node.stop()
            tg.cancel_scope.cancel()


def restored(store: SnapshotStore, name: PeerName) -> Allocator:
    stored = store.load(name, str(RANGE))
    assert stored is not None
    return Allocator(name, RANGE, SeedInit((name,)), random.Random(1), snapshot=stored.snapshot)


async def test_allocate_is_idempotent_and_each_answer_is_on_disk_first(tmp_path: Path) -> None:
    async with served_node(tmp_path) as s:
        first = await call(s.client.allocate, "c1", "eth0")
        assert first == "10.44.0.1/24"
        assert [lease.ip() for lease in restored(s.store, s.node.peer.identity.name).leases()] == ["10.44.0.1"]
        assert await call(s.client.allocate, "c1", "eth0") == first
        assert await call(s.client.allocate, "c1", "eth1") == "10.44.0.2/24"
        assert await call(s.client.request, "GET", "/ip/c1", {"ifname": "eth1"}) == "10.44.0.2/24"
        with pytest.raises(ApiError, match="no address for c1 on eth9"):
            await call(s.client.request, "GET", "/ip/c1", {"ifname": "eth9"})
        assert await call(s.client.leases) == [
            {"container_id": "c1", "ifname": "eth0", "address": "10.44.0.1/24"},
            {"container_id": "c1", "ifname": "eth1", "address": "10.44.0.2/24"},
        ]
        with pytest.raises(ApiError, match=r"container id must be 1\.\.256 printable characters"):
            await call(s.client.request, "POST", "/ip/" + "x" * 300)
        assert await call(http_status, s.address, "POST", "/ip/" + "x" * 300) == 400
        with pytest.raises(ApiError, match="interface name must be"):
            await call(s.client.allocate, "c2", "an-interface-name-too-long")


async def test_release_frees_every_interface_and_is_idempotent(tmp_path: Path) -> None:
    async with served_node(tmp_path) as s:
        await call(s.client.allocate, "c1", "eth0")
        await call(s.client.allocate, "c1", "eth1")
        await call(s.client.allocate, "c2", "eth0")
        await call(s.client.release, "c1")
        assert [lease["container_id"] for lease in await call(s.client.leases)] == ["c2"]
        assert [lease.container_id for lease in restored(s.store, s.node.peer.identity.name).leases()] == ["c2"]
        await call(s.client.release, "c1")  # again: still fine
        await call(s.client.release, "never-seen")
        assert await call(s.client.allocate, "c3", "eth0") == "10.44.0.1/24", "the lowest free address again"


async def test_claim_takes_a_given_address_and_refuses_conflicts(tmp_path: Path) -> None:
    async with served_node(tmp_path) as s:
        assert await call(s.client.claim, "c1", "eth0", "10.44.0.77") == "10.44.0.77/24"
        assert await call(s.client.claim, "c1", "eth0", "10.44.0.77") == "10.44.0.77/24", "idempotent"
        assert await call(s.client.request, "PUT", "/ip/c1/10.44.0.77/24") == "10.44.0.77/24", "Weave's CIDR form"
        cases = [
            (("c2", "eth0", "10.44.0.77"), "10.44.0.77 is in use by c1 on eth0"),
            (("c1", "eth0", "10.44.0.78"), "c1 already has 10.44.0.77/24 on eth0; release it first"),
            (("c3", "eth0", "10.44.0.0"), "reserved"),
            (("c3", "eth0", "10.45.0.9"), "10.45.0.9 is outside 10.44.0.0/24"),
            (("c3", "eth0", "banana"), "not an IPv4 address"),
        ]
        for args, fragment in cases:
            with pytest.raises(ApiError, match=fragment):
                await call(s.client.claim, *args)
        with pytest.raises(ApiError, match="prefix length /16 is not the pod network's /24"):
            await call(s.client.request, "PUT", "/ip/c3/10.44.0.9/16")
        assert await call(s.client.allocate, "c4", "eth0") == "10.44.0.1/24"
        assert [lease.ip() for lease in restored(s.store, s.node.peer.identity.name).leases()] == [
            "10.44.0.1", "10.44.0.77"]


async def test_http_statuses(tmp_path: Path) -> None:
    async with served_node(tmp_path) as s:
        await call(s.client.claim, "c1", "eth0", "10.44.0.77")
        for method, path, expected in [
            ("PUT", "/ip/c2/10.44.0.77", 409),  # in use by another container
            ("PUT", "/ip/c2/10.44.0.255", 400),  # the broadcast address
            ("PUT", "/ip/c2/nope", 400),
            ("PUT", "/ip/c2/10.44.0.78", 200),
            ("DELETE", "/ip/c2", 204),
            ("DELETE", "/ip/c2", 204),
            ("GET", "/ip/c2", 404),
            ("DELETE", "/peer/ghost", 404),
            ("DELETE", "/peer/a", 409),
            ("GET", "/status/ipam", 200),
            ("GET", "/status/nonsense", 404),
        ]:
            assert await call(http_status, s.address, method, path) == expected, (method, path)


async def test_the_gateway_is_a_stable_lease_of_its_own(tmp_path: Path) -> None:
    async with served_node(tmp_path) as s:
        await call(s.client.allocate, "c1", "eth0")
        gateway = await call(s.client.gateway)
        assert gateway == "10.44.0.2/24"
        assert await call(s.client.gateway) == gateway
        assert {"container_id": GATEWAY_ID, "ifname": "weave", "address": gateway} in await call(s.client.leases)


async def test_rmpeer_refuses_unknown_and_ourselves(tmp_path: Path) -> None:
    async with served_node(tmp_path) as s:
        await call(s.client.allocate, "c1", "eth0")
        with pytest.raises(ApiError, match="no peer named or nicknamed 'ghost' is known here"):
            await call(s.client.rmpeer, "ghost")
        with pytest.raises(ApiError, match="a peer cannot remove itself"):
            await call(s.client.rmpeer, "a")
        with pytest.raises(ApiError, match="a peer cannot remove itself"):
            await call(s.client.rmpeer, s.node.peer.identity.name.upper())


async def test_status_report_and_metrics_show_ipam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with served_node(tmp_path) as s:
        name = s.node.peer.identity.name
        await call(s.client.allocate, "c1", "eth0")
        await call(s.client.allocate, "c2", "eth0")
        text = await call(s.client.request, "GET", "/status/ipam")
        assert text == f"{name}(a)".ljust(35) + "      256 IPs (100.0% of total) (2 active)\n"
        summary = await call(s.client.request, "GET", "/status")
        assert summary.endswith("        Service: ipam\n         Status: ready\n          Range: 10.44.0.0/24\n"
                                "  DefaultSubnet: 10.44.0.0/24\n")
        report = await call(s.client.report)
        assert report["ipam"]["leases"] == 2
        assert report["ipam"]["owners"] == [
            {"name": name, "nickname": "a", "addresses": 256, "percent": 100.0, "reachable": True, "active": 2}]

        assert await call(cli.main, ["status", "ipam", "--api", s.http]) == 0
        assert capsys.readouterr().out == text
        assert await call(cli.main, ["status", "--api", s.http]) == 0
        assert capsys.readouterr().out == summary
        assert summary == render_status(s.node.snapshot(), weaved.__version__, s.node.ipam.report())
        assert text == render_ipam(s.node.ipam.report())

        metrics = await call(s.client.request, "GET", "/metrics")
        assert 'weave_ips{state="local-used"} 2.0' in metrics
        assert "weave_max_ips 256.0" in metrics
        assert "weave_ipam_unreachable_percentage 0.0" in metrics


async def test_waiting_for_consensus_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with served_node(tmp_path, mode=ConsensusInit(2), timeout=1.0) as s:
        assert await call(s.client.request, "GET", "/status/ipam") == "idle\n", "nothing asked for yet"
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, cli.main, ["ipam", "alloc", "c1", "--api-socket", s.address])
            with anyio.fail_after(1):
                while s.node.ipam.report().pending == 0:
                    await anyio.sleep(0.01)
            assert await call(s.client.request, "GET", "/status/ipam") == "awaiting consensus (quorum 2, known 1)\n"
            metrics = await call(s.client.request, "GET", "/metrics")
            assert "weave_ipam_pending_allocates 1.0" in metrics
        err = capsys.readouterr().err
        assert err == (f"weaved: the daemon at {s.address} refused POST /ip/c1: no address for c1 within 1s: "
                       "awaiting consensus (quorum 2, known 1)\n")
        assert await call(http_status, s.address, "POST", "/ip/c2") == 503
        assert "Status: awaiting consensus (quorum 2, known 1)" in await call(s.client.request, "GET", "/status")


async def test_cli_ipam_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with served_node(tmp_path) as s:
        api = ["--api-socket", s.address]
        assert await call(cli.main, ["ipam", "alloc", "c1", *api]) == 0
        assert capsys.readouterr().out == "10.44.0.1/24\n"
        assert await call(cli.main, ["ipam", "alloc", "c1", "--ifname", "net1", *api]) == 0
        assert capsys.readouterr().out == "10.44.0.2/24\n"
        assert await call(cli.main, ["ipam", "gateway", *api]) == 0
        assert capsys.readouterr().out == "10.44.0.3/24\n"
        assert await call(cli.main, ["ipam", "claim", "c2", "10.44.0.9", *api]) == 0
        assert capsys.readouterr().out == "10.44.0.9/24\n"
        assert await call(cli.main, ["ipam", "leases", "--api", s.http]) == 0
        assert capsys.readouterr().out == (
            "10.44.0.1/24       eth0     c1\n"
            "10.44.0.2/24       net1     c1\n"
            "10.44.0.3/24       weave    weave:gateway\n"
            "10.44.0.9/24       eth0     c2\n"
        )
        assert await call(cli.main, ["ipam", "release", "c1", *api]) == 0
        assert capsys.readouterr().out == ""
        assert await call(cli.main, ["ipam", "leases", "--json", "--api", s.http]) == 0
        assert [lease["container_id"] for lease in json.loads(capsys.readouterr().out)] == [GATEWAY_ID, "c2"]

        assert await call(cli.main, ["ipam", "claim", "c3", "10.44.0.9", *api]) == 1
        err = capsys.readouterr().err
        refused = "refused PUT /ip/c3/10.44.0.9: 10.44.0.9 is in use by c2 on eth0"
        assert err == f"weaved: the daemon at {s.address} {refused}\n"
        assert await call(cli.main, ["rmpeer", "nobody", *api]) == 1
        assert "no peer named or nicknamed 'nobody'" in capsys.readouterr().err


async def test_an_unwritable_state_dir_holds_answers_back_then_recovers(tmp_path: Path, logs: io.StringIO,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipam_module, "ANSWER_GRACE", 0.3)
    state_dir = tmp_path / "state"
    async with served_node(state_dir, timeout=0.5) as s:
        with pytest.raises(ApiError, match=r"refused POST /ip/c1: IPAM state cannot be saved: cannot write .*"
                                           r"state/ipam.msgpack: No such file or directory"):
            await call(s.client.allocate, "c1", "eth0")
        assert s.node.ipam.report().counters["store_errors"] >= 1
        state_dir.mkdir()
        # the lease made in memory is written at the next retry, and asking again returns it
        assert await call(s.client.allocate, "c1", "eth0") == "10.44.0.1/24"
        assert [lease.container_id for lease in restored(s.store, s.node.peer.identity.name).leases()] == ["c1"]
    text = logs.getvalue()
    assert text.count("cannot save ipam state") == 1, "logged once, not at every retry"
    assert "ipam state saved again" in text


# --- the service's commit, driven directly -----------------------------------------------------------------


def service(tmp_path: Path, store: SnapshotStore | None = None,
            seed: tuple[PeerName, ...] | None = None) -> IpamService:
    me = identity("a").name
    allocator = Allocator(me, RANGE, SeedInit(seed or (me, OTHER)), random.Random(5))
    return IpamService(allocator, store or SnapshotStore(tmp_path), "a", wake=lambda: None)


async def test_nothing_is_sent_or_answered_before_the_write_that_covers_it(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    ipam = service(tmp_path, store)
    log: list[str] = []
    answers: dict[str, str] = {}

    def send(dst: PeerName | None, channel: str, payload: bytes) -> bool:
        log.append(f"send to {dst} after {len(store.writes)} writes")
        return True

    async def allocate(container: str) -> None:
        lease = await ipam.allocate(container, "eth0")
        answers[container] = lease.ip()
        log.append(f"answer {container} after {len(store.writes)} writes")

    ipam.on_event(PeerJoined(OTHER, "other", ()), lambda: {OTHER})  # queues our ring for the new peer
    async with anyio.create_task_group() as tg:
        tg.start_soon(allocate, "c1")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(ipam.commit, send)
        with anyio.fail_after(5):
            while store.entered < 1:
                await anyio.sleep(0.01)
        tg.start_soon(allocate, "c2")  # changes the allocator while the first write is in flight
        await anyio.sleep(0.1)
        assert log == [] and answers == {}
        store.gate.set()
    assert len(store.writes) == 2, "the change made during the first write was written before anything left"
    sends = [line for line in log if line.startswith("send")]
    assert f"send to {OTHER} after 2 writes" in sends
    assert all(line.endswith("after 2 writes") for line in sends), log
    assert log[len(sends):] in (["answer c1 after 2 writes", "answer c2 after 2 writes"],
                                ["answer c2 after 2 writes", "answer c1 after 2 writes"]), "sent, then answered"
    latest = Allocator(ipam.allocator.own, RANGE, SeedInit((ipam.allocator.own, OTHER)), random.Random(1),
                       snapshot=store.writes[-1].snapshot)
    assert sorted(lease.container_id for lease in latest.leases()) == ["c1", "c2"]


async def test_a_restarted_peer_gets_our_ring_again_and_oversized_messages_are_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ipam = service(tmp_path)
    sent: list[PeerName | None] = []

    def send(dst: PeerName | None, channel: str, payload: bytes) -> bool:
        assert channel == "ipam"
        sent.append(dst)
        return True

    await ipam.commit(send)  # the ring adopted at start goes to every peer
    assert sent == [None]
    sent.clear()
    ipam.on_event(PeerJoined(OTHER, "other", ()), lambda: {OTHER})
    await ipam.commit(send)
    assert sent == [OTHER]
    ipam.on_event(PeerRestarted(OTHER, "other"), lambda: {OTHER})
    await ipam.commit(send)
    assert sent == [OTHER, OTHER], "the new incarnation is told our ring, as a new peer would be"
    assert ipam.label(OTHER) == f"{OTHER}(other)"

    monkeypatch.setattr(ipam_module, "MAX_MESSAGE", 16)
    ipam.on_event(PeerRestarted(OTHER, "other"), lambda: {OTHER})
    await ipam.commit(send)
    assert sent == [OTHER, OTHER]
    assert ipam.report().counters["dropped_too-large"] == 1


async def test_a_peer_removed_by_others_stops_allocating_and_says_why(tmp_path: Path) -> None:
    ipam = service(tmp_path)
    me = ipam.allocator.own
    other = Allocator(OTHER, RANGE, SeedInit((me, OTHER)), random.Random(6))
    other.handle_timer(0.0)  # adopts the seeded ring
    other.rmpeer(me, 0.0)
    ring = [payload for _, payload in other.messages()]
    assert ring
    for payload in ring:
        ipam.on_event(RelayDelivered(OTHER, "ipam", payload), lambda: {OTHER})
    assert ipam.removed
    assert ipam.report().state == REMOVED_STATE
    with pytest.raises(AllocError, match="IPAM is stopped on this peer: removed by rmpeer"):
        await ipam.allocate("c1", "eth0")
    with pytest.raises(AllocError, match="IPAM is stopped"):
        await ipam.claim("c1", "eth0", "10.44.0.5")


async def test_rmpeer_by_nickname_needs_the_peer_unreachable(tmp_path: Path) -> None:
    ipam = service(tmp_path)
    await ipam.commit(lambda *_: True)
    ipam.on_event(PeerJoined(OTHER, "other", ()), lambda: {OTHER})
    with pytest.raises(AllocError, match=r"\(other\) is reachable: stop it before removing its addresses"):
        await ipam.rmpeer("other")
    assert ipam.resolve_peer("other") == OTHER
    assert ipam.resolve_peer(OTHER.upper()) == OTHER


async def test_leave_is_on_disk_before_the_hand_over_is_sent_and_waits_for_the_heir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipam_module, "LEAVE_CONFIRM_TIMEOUT", 0.3)
    store = GatedStore(tmp_path)
    store.gate.set()
    ipam = service(tmp_path, store)
    me = ipam.allocator.own
    heir = Allocator(OTHER, RANGE, SeedInit((me, OTHER)), random.Random(6))
    heir.handle_timer(0.0)
    heir.set_reachable({me}, 0.0)
    heir.messages()
    sent: list[tuple[PeerName | None, bytes, int]] = []

    def send(dst: PeerName | None, channel: str, payload: bytes) -> bool:
        sent.append((dst, payload, len(store.writes)))
        return True

    ipam.on_event(PeerJoined(OTHER, "other", ()), lambda: {OTHER})
    await ipam.commit(send)
    sent.clear()
    store.gate.clear()
    result: list[tuple[bool, int]] = []

    async def leave() -> None:
        departure, confirmed = await ipam.leave()
        result.append((confirmed, departure.addresses))

    async with anyio.create_task_group() as tg:
        tg.start_soon(leave)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(ipam.commit, send)
        with anyio.fail_after(5):
            while store.entered < 2:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        assert sent == [], "nothing leaves before the hand-over is on disk"
        writes = len(store.writes)
        store.gate.set()
    assert result == [(False, 128)], "no answer from the heir within the wait: not confirmed"
    assert sent and all(count > writes for _, _, count in sent)
    on_disk = Allocator(me, RANGE, SeedInit((me, OTHER)), random.Random(1), snapshot=store.writes[-1].snapshot)
    assert on_disk.ring.owned_ranges() == [], "a crash now restarts owning nothing"
    for dst, payload, _ in sent:
        if dst in (None, OTHER):
            heir.receive(me, payload, 1.0)
    assert heir.status().owned == 256
    for _, payload in heir.messages():
        ipam.on_event(RelayDelivered(OTHER, "ipam", payload), lambda: {OTHER})
    await ipam.commit(send)
    assert ipam.allocator.departure is not None and ipam.allocator.departure.confirmed
    assert ipam.report().state == f"left: handed 128 addresses to {OTHER} (confirmed)"
    with pytest.raises(AllocError, match="this peer left the IPAM ring"):
        await ipam.allocate("c1", "eth0")


async def test_tables_keyed_by_peers_from_the_network_stay_bounded(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals are logged per (peer, reason) at most once a minute, and nicknames kept per joining peer: both
    keyed by names from the network, both bounded (the first grew with every name, for ever)."""
    monkeypatch.setattr(ipam_module, "MAX_LOGGED", 8, raising=False)
    monkeypatch.setattr(ipam_module, "MAX_NICKNAME_ENTRIES", 8, raising=False)
    ipam = service(tmp_path)
    for i in range(50):
        name = PeerName(f"02:00:00:00:01:{i:02x}")
        ipam.on_event(PeerJoined(name, "x" * 500, ()), lambda: {OTHER})
        ipam.on_event(RelayDelivered(name, "ipam", b"\xc1 not msgpack"), lambda: {OTHER})
    assert len(ipam._logged) <= 8
    assert len(ipam._nicknames) <= 9
    assert all(len(nickname) <= ipam_module.MAX_NICKNAME for nickname in ipam._nicknames.values())
    assert ipam.report().rejected["not-msgpack"] == 50


async def test_a_space_request_from_a_peer_that_just_joined_is_served(tmp_path: Path) -> None:
    """Space goes only to peers the mesh reaches; the set is refreshed when a message comes from a peer
    that is not in it yet, so a new peer's first request is not refused for a stale set."""
    ipam = service(tmp_path)
    newcomer = PeerName("02:00:00:00:02:01")
    before = ipam.allocator.ring.state.owned_count(ipam.allocator.own)
    request = msgpack.packb([3, None, 1], use_bin_type=True)
    ipam.on_event(RelayDelivered(newcomer, "ipam", request), lambda: {OTHER, newcomer})
    assert ipam.allocator.ring.state.owned_count(newcomer) > 0
    assert ipam.allocator.ring.state.owned_count(ipam.allocator.own) < before
