"""The IPAM part of ``/report``: plain data the API serves, the CLI rebuilds, and the views render.

Like :class:`~weaved.core.status.MeshStatus`, it is strings, numbers, bools, lists and dicts only, so
``/report`` is :func:`dataclasses.asdict` of it and ``weaved status ipam`` renders the very same value after
a JSON round trip. It adds to the allocator's own status what only the daemon knows: the nicknames of the
owners and which of them the mesh reaches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class IpamOwner:
    """One peer that owns part of the range, as ``weaved status ipam`` lists it."""

    name: str
    nickname: str | None
    addresses: int
    percent: float
    """Share of the whole range, in percent."""
    reachable: bool
    """We are this peer, or the mesh has a route to it."""
    active: int | None
    """Leases in use: known for ourselves only (None for other peers)."""


@dataclass(frozen=True)
class IpamReport:
    state: str
    """``idle``, ``awaiting consensus (quorum 2, known 1)``, ``ready``, or why allocations are waiting."""
    range: str
    default_subnet: str
    size: int
    """Addresses in the range (``weave_max_ips``)."""
    owned: int
    free: int
    leases: int
    pending: int
    owners: list[IpamOwner]
    rejected: dict[str, int] = field(default_factory=dict)
    """Refused IPAM messages and remote states, by reason."""
    counters: dict[str, int] = field(default_factory=dict)
    """The daemon's own IPAM counts (messages too large or without a route, store errors)."""
    deferred: dict[str, int] = field(default_factory=dict)
    """Input not acted on that honest peers send too, by reason: ring edits relayed by another peer than
    their owner (taken when the owner's own ring comes), votes relayed by another voter, space requests
    throttled."""

    @property
    def unreachable_percent(self) -> float:
        """Share of the range owned by peers the mesh does not reach (Weave's alerting metric)."""
        return sum(o.percent for o in self.owners if not o.reachable)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IpamReport:
        return cls(**{**data, "owners": [IpamOwner(**o) for o in data["owners"]]})
