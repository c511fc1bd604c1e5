"""The reclaim registry's transitions, and exactly-once claims under every interleaving of CAS writers."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from weaved.core.kube.registry import (
    EMPTY,
    Reclaim,
    Registry,
    claimed_by,
    finish,
    gone_key,
    parse,
    register,
    render,
    sweep,
)

P1, P2, P3, OLD = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03", "02:00:00:00:00:0f"


def test_render_and_parse_round_trip_and_keep_unknown_keys() -> None:
    reg = Registry({"n1": P1}, {P2: Reclaim(P2, "n2", "n1")}, {"_note": "hi"})
    data = render(reg)
    assert data == {"n1": P1, gone_key(P2): '{"by":"n1","node":"n2","peer":"02:00:00:00:00:02"}', "_note": "hi"}
    assert gone_key(P2) == "_gone.020000000002"
    assert parse(data) == reg


def test_malformed_entries_are_kept_aside_not_fatal() -> None:
    reg = parse({"_gone.x": "not json", "_gone.y": '{"peer": 5}', "n1": "  ", "n2": P2})
    assert reg.peers == {"n2": P2} and reg.gone == {}
    assert set(reg.other) == {"_gone.x", "_gone.y", "n1"}


def test_register_is_idempotent_and_claims_a_replaced_peer() -> None:
    reg = register(EMPTY, "n1", P1)
    assert reg.peers == {"n1": P1} and render(register(reg, "n1", P1)) == render(reg)
    replaced = register(reg, "n1", P3)  # the Node came back with a new state dir
    assert replaced.peers == {"n1": P3}
    assert replaced.gone == {P1: Reclaim(P1, "n1", "n1")}


def test_register_cancels_a_reclaim_of_ourselves() -> None:
    reg = Registry({}, {P1: Reclaim(P1, "n1", "n2")}, {})
    assert register(reg, "n1", P1) == Registry({"n1": P1}, {}, {})


def test_sweep_claims_deleted_nodes_and_orphaned_claims() -> None:
    reg = Registry({"n1": P1, "n2": P2, "n3": P3}, {OLD: Reclaim(OLD, "n9", "n8")}, {})
    swept = sweep(reg, frozenset({"n1", "n3"}), "n1")
    assert swept.peers == {"n1": P1, "n3": P3}
    assert swept.gone == {P2: Reclaim(P2, "n2", "n1"), OLD: Reclaim(OLD, "n9", "n1")}
    assert [e.peer for e in claimed_by(swept, "n1")] == [P2, OLD]
    assert sweep(swept, frozenset({"n1", "n3"}), "n3") == swept, "a living claimant's claims are left alone"


def test_sweep_trusts_no_view_that_lacks_our_own_node() -> None:
    reg = Registry({"n1": P1, "n2": P2}, {}, {})
    assert sweep(reg, frozenset({"n2"}), "n1") == reg


def test_finish_drops_only_our_own_claim() -> None:
    reg = Registry({}, {P2: Reclaim(P2, "n2", "n1")}, {})
    assert finish(reg, P2, "n3") == reg
    assert finish(reg, P2, "n1").gone == {}


@dataclass
class Store:
    """A compare-and-set store: what the ConfigMap and its resourceVersion give us."""

    data: dict[str, str]
    version: int = 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2), min_size=1, max_size=40), st.integers(1, 3))
def test_every_interleaving_claims_each_dead_peer_exactly_once(schedule: list[int], dead_count: int) -> None:
    """Three live peers run read-decide-write rounds in any interleaving; the dead ones are claimed
    once each, by exactly one peer, whatever the order of reads and conditional writes."""
    live = ["a", "b", "c"]
    dead = [f"d{i}" for i in range(dead_count)]
    peer = {n: f"02:00:00:00:00:{i:02x}" for i, n in enumerate(live + dead)}
    store = Store(render(Registry({n: peer[n] for n in live + dead}, {}, {})))
    living = frozenset(live)
    reads: dict[str, tuple[int, Registry] | None] = dict.fromkeys(live)
    claims: dict[str, list[str]] = {n: [] for n in live}
    for step in schedule + [0, 1, 2] * 3:  # then let everyone finish
        me = live[step]
        pending = reads[me]
        if pending is None:  # read
            reads[me] = (store.version, parse(store.data))
            continue
        version, before = pending
        reads[me] = None
        after = sweep(register(before, me, peer[me]), living, me)
        if render(after) != render(before):
            if version != store.version:
                continue  # 409: read again next time
            store.data, store.version = render(after), store.version + 1
        claims[me] += [e.peer for e in claimed_by(after, me) if e not in claimed_by(before, me)]
    all_claims = sorted(p for c in claims.values() for p in c)
    assert all_claims == sorted(peer[d] for d in dead)
    final = parse(store.data)
    assert final.peers == {n: peer[n] for n in live}
