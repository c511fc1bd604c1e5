"""IPAM: the pure (sans-IO) address-management core.

* :mod:`~weaved.core.ipam.ring`: the ring CRDT saying which peer owns which addresses, including the
  concurrency-safe ``rmpeer`` (tombstone plus deterministic heir).
* :mod:`~weaved.core.ipam.space`: free and used addresses inside the ranges one peer owns.
* :mod:`~weaved.core.ipam.seeding`: agreement on the initial ring (``IPALLOC_INIT``).

``docs/ipam.md`` states the invariants and why they hold.
"""

from weaved.core.ipam.ring import (
    AddressRange,
    MergeResult,
    Ring,
    RingDecodeError,
    RingError,
    RingState,
    Token,
    decode_ring,
    encode_ring,
    ring_from_bytes,
    ring_to_bytes,
    seeded_state,
    split_range,
)
from weaved.core.ipam.seeding import (
    ConsensusInit,
    InitMode,
    ObserverInit,
    PaxosState,
    Seeder,
    SeedingDecodeError,
    SeedingError,
    SeedInit,
    SeedState,
    parse_init,
)
from weaved.core.ipam.space import Space, SpaceError

__all__ = [
    "AddressRange",
    "ConsensusInit",
    "InitMode",
    "MergeResult",
    "ObserverInit",
    "PaxosState",
    "Ring",
    "RingDecodeError",
    "RingError",
    "RingState",
    "SeedInit",
    "SeedState",
    "Seeder",
    "SeedingDecodeError",
    "SeedingError",
    "Space",
    "SpaceError",
    "Token",
    "decode_ring",
    "encode_ring",
    "parse_init",
    "ring_from_bytes",
    "ring_to_bytes",
    "seeded_state",
    "split_range",
]
