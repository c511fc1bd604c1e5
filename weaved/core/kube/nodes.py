"""Which peers a cluster's Nodes stand for, and what changed between two views of them.

Theory of operation
-------------------
Every Node runs one weaved (the DaemonSet), reachable on the Node's address: its first IPv4
``InternalIP``, else its first IPv4 ``ExternalIP`` (Weave Net's kube-peers rule). A Node without either
(just registered, its addresses not yet reported) is known by name but has no peer address yet; a later
MODIFIED event gives it one.

:class:`NodeView` is the daemon's picture of the cluster, fed by a full list (:meth:`NodeView.replace`,
at start and after a watch expired with 410 Gone) or by one watch event (:meth:`NodeView.apply`). Both
return a :class:`NodeChanges`: addresses to start dialling, addresses to stop dialling, and names of Nodes
that are gone (the reclaim candidates). The view never includes the daemon's own Node among the peers: we
do not dial ourselves. Input is the API server's JSON as parsed by ``json``; anything malformed in one Node
is skipped (counted by the caller through :attr:`NodeChanges.malformed`), never fatal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ADDRESS_PREFERENCE = ("InternalIP", "ExternalIP")
"""Address types in the order we use them, as Weave Net's kube-utils does."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One Node as far as the mesh cares: its name and the IPv4 address its weaved listens on (if known)."""

    name: str
    address: str | None


@dataclass(slots=True)
class NodeChanges:
    """What one list or event changed. ``added``/``removed`` are peer addresses; ``deleted`` Node names."""

    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    malformed: int = 0

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.deleted)


def node_address(node: Mapping[str, Any]) -> str | None:
    """The Node's first IPv4 InternalIP, else its first IPv4 ExternalIP, else None."""
    status = node.get("status")
    addresses = status.get("addresses") if isinstance(status, Mapping) else None
    if not isinstance(addresses, list):
        return None
    for kind in ADDRESS_PREFERENCE:
        for entry in addresses:
            if isinstance(entry, Mapping) and entry.get("type") == kind:
                text = entry.get("address")
                try:
                    if isinstance(text, str) and ipaddress.ip_address(text).version == 4:
                        return text
                except ValueError:
                    continue
    return None


def node_info(node: Any) -> NodeInfo | None:
    """A Node object's name and address; None when it has no usable ``metadata.name``."""
    if not isinstance(node, Mapping):
        return None
    metadata = node.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        return None
    return NodeInfo(name, node_address(node))


class NodeView:
    """The cluster's Nodes as last seen; ``own`` is this daemon's Node name (never a peer)."""

    def __init__(self, own: str) -> None:
        self.own = own
        self.nodes: dict[str, NodeInfo] = {}

    def names(self) -> frozenset[str]:
        """Every Node we know of, ours included (the living set for reclaim decisions)."""
        return frozenset(self.nodes)

    def peers(self) -> set[str]:
        """The addresses to dial: every other Node's address, once each."""
        return {n.address for n in self.nodes.values() if n.name != self.own and n.address is not None}

    def replace(self, items: Iterable[Any]) -> NodeChanges:
        """A full list (start, relist after 410 Gone): Nodes missing from it were deleted meanwhile."""
        before_peers, before_names = self.peers(), set(self.nodes)
        fresh: dict[str, NodeInfo] = {}
        malformed = 0
        for item in items:
            info = node_info(item)
            if info is None:
                malformed += 1
            else:
                fresh[info.name] = info
        self.nodes = fresh
        after = self.peers()
        return NodeChanges(after - before_peers, before_peers - after, before_names - set(fresh) - {self.own},
                           malformed)

    def apply(self, kind: str, obj: Any) -> NodeChanges:
        """One watch event (``ADDED``, ``MODIFIED``, ``DELETED``); other kinds change nothing."""
        info = node_info(obj)
        if info is None:
            return NodeChanges(malformed=1)
        before = self.peers()
        deleted: set[str] = set()
        if kind in ("ADDED", "MODIFIED"):
            self.nodes[info.name] = info
        elif kind == "DELETED":
            self.nodes.pop(info.name, None)
            deleted = {info.name} - {self.own}
        else:
            return NodeChanges()
        after = self.peers()
        return NodeChanges(after - before, before - after, deleted)
