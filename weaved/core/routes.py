"""Route computation: a pure function of the topology.

Theory of operation
-------------------
A connection is usable for routing only when it is *established and symmetric*: both ends list it as
established in their gossiped entries. That filters out half-open links (A hears B, B does not hear A)
and stale entries. Every peer then runs the same deterministic breadth-first search (neighbours
visited in name order), so peers with the same topology view compute the same trees:

* unicast: BFS from ourselves; the next hop to X is the first hop on the BFS path to X. When A and C
  cannot talk directly but both talk to B, A's next hop to C is B.
* broadcast from origin O: BFS tree rooted at O; we forward to our children in that tree. Because
  every peer computes the same tree, a broadcast reaches every reachable peer exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from weaved.core.entries import PeerEntry
from weaved.core.types import PeerName


def symmetric_neighbours(entries: Mapping[PeerName, PeerEntry]) -> dict[PeerName, list[PeerName]]:
    """For each peer, its neighbours over established connections that both ends report, sorted."""
    established: dict[PeerName, set[PeerName]] = {
        name: {c.remote for c in entry.connections if c.established} for name, entry in entries.items()
    }
    return {
        name: sorted(r for r in remotes if name in established.get(r, ()))
        for name, remotes in established.items()
    }


def _bfs_parents(root: PeerName, graph: Mapping[PeerName, list[PeerName]]) -> dict[PeerName, PeerName | None]:
    parents: dict[PeerName, PeerName | None] = {root: None}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for nxt in graph.get(node, ()):
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    return parents


def unicast_next_hops(own: PeerName, graph: Mapping[PeerName, list[PeerName]]) -> dict[PeerName, PeerName]:
    """Map every peer reachable from ``own`` (excluding ``own``) to the neighbour to send through."""
    hops: dict[PeerName, PeerName] = {}
    queue: deque[PeerName] = deque()
    for neighbour in graph.get(own, ()):
        hops[neighbour] = neighbour
        queue.append(neighbour)
    while queue:
        node = queue.popleft()
        for nxt in graph.get(node, ()):
            if nxt != own and nxt not in hops:
                hops[nxt] = hops[node]
                queue.append(nxt)
    return hops


def broadcast_children(origin: PeerName, own: PeerName, graph: Mapping[PeerName, list[PeerName]]) -> list[PeerName]:
    """Neighbours to forward a broadcast from ``origin`` to: our children in origin's BFS tree."""
    parents = _bfs_parents(origin, graph)
    if own not in parents:
        return []
    return [node for node, parent in parents.items() if parent == own]
