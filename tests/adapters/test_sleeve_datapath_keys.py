"""Datapath.refresh and the sleeve keys: a rekey (new keys, nothing else changed) reaches the packet loop's
table, and the pod MTU leaves room for the seal with a password. Fakes for the mesh, IPAM and the loop."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from weaved.adapters.datapath import Datapath
from weaved.core import superframe
from weaved.core.forwarding import EMPTY, ForwardingTable
from weaved.core.ipam.ring import AddressRange, seeded_state
from weaved.core.seal import PeerSleeveKeys, SleeveKeys
from weaved.core.sleeveseal import OVERHEAD
from weaved.core.types import Endpoint, peer_name_from_bytes

OWN, NEAR = (peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in (1, 2))


class FakeLoop:
    """Counts the tables it was given."""

    def __init__(self) -> None:
        self._table: ForwardingTable = EMPTY
        self.tables = 0

    @property
    def table(self) -> ForwardingTable:
        return self._table

    @table.setter
    def table(self, table: ForwardingTable) -> None:
        self._table = table
        self.tables += 1


class FakePeer:
    def __init__(self) -> None:
        entries = {OWN: SimpleNamespace(short_id=1), NEAR: SimpleNamespace(short_id=2)}
        self.topology = SimpleNamespace(generation=1, entries=entries, next_hops=lambda: {NEAR: NEAR},
                                        short_ids=lambda: {OWN: 1, NEAR: 2})
        self.identity = SimpleNamespace(name=OWN)
        self.encrypted = True
        self.keys: dict[Any, PeerSleeveKeys] = {}

    def neighbours(self) -> dict[Any, Any]:
        return {NEAR: (Endpoint("198.51.100.2", 6783), ("sleeve:6785", superframe.overlay(1472)))}

    def sleeve_keys(self) -> dict[Any, PeerSleeveKeys]:
        return dict(self.keys)


def keys(seed: int) -> PeerSleeveKeys:
    return PeerSleeveKeys(SleeveKeys(seed, seed + 1, bytes([seed]) * 32, bytes([seed + 1]) * 32))


def test_new_keys_alone_rebuild_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression for the rekey: refresh() compared only topology, ring and neighbours."""
    peer = FakePeer()
    state = seeded_state(AddressRange.from_cidr("10.32.0.0/12"), [OWN, NEAR])
    ipam = SimpleNamespace(allocator=SimpleNamespace(ring=SimpleNamespace(state=state)))
    dp = Datapath(SimpleNamespace(), peer, ipam, network=SimpleNamespace())  # type: ignore[arg-type]
    loop = FakeLoop()
    dp._loop = loop  # type: ignore[assignment]
    dp.refresh()
    assert loop.table.keys == {} and loop.tables == 1
    dp.refresh()
    assert loop.tables == 1  # nothing changed: nothing rebuilt
    peer.keys = {NEAR: keys(1)}
    dp.refresh()
    assert loop.table.keys == {("198.51.100.2", 6785): keys(1)}
    peer.keys = {NEAR: PeerSleeveKeys(keys(5).current, keys(1).current)}  # a rekey
    dp.refresh()
    assert loop.table.keys[("198.51.100.2", 6785)].current.recv_id == 5
    assert loop.tables == 3


def test_the_sealed_pod_mtu_leaves_room_for_the_seal() -> None:
    assert superframe.pod_mtu(1500, sealed=True) == 1500 - superframe.OVERHEAD - OVERHEAD
