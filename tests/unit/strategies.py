"""Hypothesis strategies for the core's value types, shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from weaved.core.entries import ConnectionEntry, PeerEntry
from weaved.core.types import Endpoint, PeerName, PeerUID, ShortID, peer_name_from_bytes

names = st.binary(min_size=6, max_size=6).map(peer_name_from_bytes)
small_names = st.integers(0, 7).map(lambda i: peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])))
endpoints = st.builds(
    Endpoint,
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(1, 65535),
)
connections = st.builds(ConnectionEntry, names, endpoints, st.booleans(), st.booleans())


def entries(name_strategy: st.SearchStrategy[PeerName] = names) -> st.SearchStrategy[PeerEntry]:
    return st.builds(
        PeerEntry,
        name=name_strategy,
        nickname=st.text(max_size=20),
        uid=st.integers(0, 3).map(PeerUID),
        version=st.integers(0, 5),
        short_id=st.integers(0, 4095).map(ShortID),
        connections=st.lists(connections, max_size=4).map(tuple),
    )
