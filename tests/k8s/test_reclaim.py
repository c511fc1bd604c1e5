"""Reclaim through the ConfigMap: exactly one rmpeer per dead peer, with real IpamService instances."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tests.k8s.apiserver import ApiServer
from weaved.adapters.ipam import IpamService
from weaved.adapters.store import SnapshotStore
from weaved.core.ipam.allocator import Allocator
from weaved.core.ipam.ring import AddressRange
from weaved.core.ipam.seeding import SeedInit
from weaved.core.kube.registry import GONE_PREFIX, gone_key
from weaved.core.types import PeerName, derive_peer_name
from weaved.k8s.client import KubeClient, KubeError
from weaved.k8s.reclaimer import Reclaimer

pytestmark = pytest.mark.anyio

NS, CM = "kube-system", "weaved"
RANGE = AddressRange.from_cidr("10.44.0.0/22")
NODES = ["node-a", "node-b", "node-c", "node-d", "node-e"]
PEERS = {n: derive_peer_name(f"test/{n}") for n in NODES}


class CountingIpam:
    """A real IpamService whose rmpeer calls are counted (the remover the daemon passes is the service)."""

    def __init__(self, service: IpamService, calls: Counter[str]) -> None:
        self.service = service
        self.calls = calls

    async def rmpeer(self, peer: str) -> tuple[PeerName, int]:
        self.calls[peer] += 1
        return await self.service.rmpeer(peer)


@asynccontextmanager
async def ipam_service(tmp_path: Path, node: str) -> AsyncIterator[IpamService]:
    """A real IpamService seeded with every test peer, with a minimal pump that commits when poked."""
    poked = anyio.Event()

    def wake() -> None:
        poked.set()

    allocator = Allocator(PEERS[node], RANGE, SeedInit(tuple(PEERS.values())), random.Random(NODES.index(node)))
    (tmp_path / node).mkdir()
    service = IpamService(allocator, SnapshotStore(tmp_path / node), node, wake=wake)

    async def pump() -> None:
        nonlocal poked
        while True:
            await service.commit(lambda *_: True)
            await poked.wait()
            poked = anyio.Event()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        yield service
        tg.cancel_scope.cancel()


async def setup_cluster(api: ApiServer, client: KubeClient, tmp_path: Path, live: list[str], calls: Counter[str],
                        stack: list[IpamService]) -> dict[str, Reclaimer]:
    api.create_configmap(NS, CM)
    reclaimers = {}
    for node in NODES:
        api.add_node(node, f"198.51.100.{NODES.index(node) + 1}")
    for node in NODES:  # every daemon registers at start (before it has listed the Nodes)
        service = stack[NODES.index(node)]
        reclaimer = Reclaimer(client, NS, CM, node, PEERS[node], CountingIpam(service, calls))
        await reclaimer.reconcile(None)
        if node in live:
            reclaimers[node] = reclaimer
    assert api.configmap_data(NS, CM) == {n: PEERS[n] for n in NODES}
    return reclaimers


@asynccontextmanager
async def services(tmp_path: Path) -> AsyncIterator[list[IpamService]]:
    async with ipam_service(tmp_path, NODES[0]) as a, ipam_service(tmp_path, NODES[1]) as b, \
            ipam_service(tmp_path, NODES[2]) as c, ipam_service(tmp_path, NODES[3]) as d, \
            ipam_service(tmp_path, NODES[4]) as e:
        yield [a, b, c, d, e]


async def test_racing_peers_reclaim_a_deleted_node_exactly_once(api: ApiServer, client: KubeClient,
                                                                 tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    live = ["node-a", "node-b", "node-c"]
    async with services(tmp_path) as stack:
        reclaimers = await setup_cluster(api, client, tmp_path, live, calls, stack)
        api.delete_node("node-d")
        api.delete_node("node-e")
        api.get_delay = 0.05  # every racer reads the same version before anyone writes
        results = {}

        async def round_(node: str) -> None:
            results[node] = await reclaimers[node].reconcile(frozenset(live))

        async with anyio.create_task_group() as tg:
            for node in live:
                tg.start_soon(round_, node)
        api.get_delay = 0.0
        assert calls == Counter({PEERS["node-d"]: 1, PEERS["node-e"]: 1}), "exactly one rmpeer per dead peer"
        assert api.conflicts >= 2, "the race really happened: the API server refused stale writes"
        assert sum(r.conflicts for r in results.values()) == api.conflicts
        assert api.configmap_data(NS, CM) == {n: PEERS[n] for n in live}, "registrations of the dead and claims gone"
        removed = set().union(*(s.allocator.ring.state.removed for s in stack[:3]))
        assert removed == {PEERS["node-d"], PEERS["node-e"]}
        # Later rounds (the periodic sweep) change nothing and call rmpeer no more.
        for node in live:
            again = await reclaimers[node].reconcile(frozenset(live))
            assert again.claimed == [] and again.reclaimed == []
        assert sum(calls.values()) == 2


async def test_a_refused_rmpeer_keeps_the_claim_until_it_succeeds(api: ApiServer, client: KubeClient,
                                                                  tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    live = ["node-a", "node-b", "node-c", "node-e"]
    async with services(tmp_path) as stack:
        reclaimers = await setup_cluster(api, client, tmp_path, live, calls, stack)
        dead = PEERS["node-d"]
        stack[0]._set_reachable({dead}, 0.0)  # node-a's mesh still reaches the peer of the deleted Node
        api.delete_node("node-d")
        first = await reclaimers["node-a"].reconcile(frozenset(live))
        assert [e.peer for e in first.claimed] == [dead]
        assert "reachable" in first.postponed[dead]
        assert gone_key(dead) in api.configmap_data(NS, CM), "claim kept for the next round"
        other = await reclaimers["node-b"].reconcile(frozenset(live))
        assert other.claimed == [] and calls[dead] == 1, "the claim is node-a's; node-b leaves it alone"
        stack[0]._set_reachable(set(), 0.0)
        second = await reclaimers["node-a"].reconcile(frozenset(live))
        assert second.reclaimed == [dead]
        assert not any(k.startswith(GONE_PREFIX) for k in api.configmap_data(NS, CM))
        assert dead in stack[0].allocator.ring.state.removed


async def test_a_claim_whose_claimant_died_is_taken_over(api: ApiServer, client: KubeClient,
                                                         tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    live = ["node-a", "node-b", "node-c"]
    async with services(tmp_path) as stack:
        reclaimers = await setup_cluster(api, client, tmp_path, [*live, "node-e"], calls, stack)
        stack[4]._set_reachable({PEERS["node-d"]}, 0.0)  # node-e claims but cannot finish...
        api.delete_node("node-d")
        claimed = await reclaimers["node-e"].reconcile(frozenset([*live, "node-e"]))
        assert claimed.postponed
        api.delete_node("node-e")  # ...and then its own Node goes
        result = await reclaimers["node-b"].reconcile(frozenset(live))
        assert sorted(result.reclaimed) == sorted([PEERS["node-d"], PEERS["node-e"]])
        assert api.configmap_data(NS, CM) == {n: PEERS[n] for n in live}


async def test_a_node_recreated_with_a_new_peer_reclaims_the_old_one(api: ApiServer, client: KubeClient,
                                                                     tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    live = ["node-a", "node-b", "node-c", "node-d", "node-e"]
    async with services(tmp_path) as stack:
        await setup_cluster(api, client, tmp_path, live, calls, stack)
        # node-d was wiped and rejoined under the same Node name: its new peer name differs (salted state dir)
        new_peer = derive_peer_name("test/node-d/new-state")
        allocator = Allocator(new_peer, RANGE, SeedInit(tuple(PEERS.values())), random.Random(9))
        fresh = IpamService(allocator, SnapshotStore(tmp_path / "node-d"), "node-d", wake=lambda: None)
        remover = CountingIpam(fresh, calls)

        async def commit_soon() -> None:
            while True:
                await fresh.commit(lambda *_: True)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(commit_soon)
            result = await Reclaimer(client, NS, CM, "node-d", new_peer, remover).reconcile(frozenset(live))
            tg.cancel_scope.cancel()
        assert result.reclaimed == [PEERS["node-d"]]
        assert calls == Counter({PEERS["node-d"]: 1})
        assert api.configmap_data(NS, CM)["node-d"] == new_peer


async def test_nothing_is_claimed_when_our_own_node_is_not_listed(api: ApiServer, client: KubeClient,
                                                                  tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    async with services(tmp_path) as stack:
        reclaimers = await setup_cluster(api, client, tmp_path, ["node-a"], calls, stack)
        result = await reclaimers["node-a"].reconcile(frozenset(["node-b"]))  # a list that lacks us: distrust it
        assert result.claimed == [] and not calls


async def test_api_failures_end_the_round_with_a_kube_error(api: ApiServer, client: KubeClient,
                                                            tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    async with services(tmp_path) as stack:
        reclaimers = await setup_cluster(api, client, tmp_path, ["node-a"], calls, stack)
        api.delete_node("node-d")
        api.fail_next("put-cm", 500)
        with pytest.raises(KubeError, match="HTTP 500"):
            await reclaimers["node-a"].reconcile(frozenset(["node-a", "node-b", "node-c", "node-e"]))
        assert not calls, "no rmpeer without a claim written"
        result = await reclaimers["node-a"].reconcile(frozenset(["node-a", "node-b", "node-c", "node-e"]))
        assert result.reclaimed == [PEERS["node-d"]]


async def test_missing_configmap_is_a_clear_error(api: ApiServer, client: KubeClient) -> None:
    reclaimer = Reclaimer(client, NS, CM, "node-a", PEERS["node-a"], CountingIpam(None, Counter()))  # type: ignore[arg-type]
    with pytest.raises(KubeError, match='HTTP 404: configmaps "weaved" not found'):
        await reclaimer.reconcile(None)

