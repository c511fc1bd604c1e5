"""The reclaim registry: which peer runs on which Node, and which dead peers still hold IPAM space.

Theory of operation
-------------------
When a Node is deleted, the IPAM space of the peer that ran there must go back to the living peers
(``rmpeer``), or it stays "unreachable" for ever (Weave Net #2797, #3372). Every living peer notices the
deletion at about the same moment, yet exactly one of them should act. The arbiter is the API server:
a ConfigMap updated with optimistic concurrency (a PUT carrying the ``resourceVersion`` it read; a stale
one is refused with 409 Conflict). This module decides *what* to write; :mod:`weaved.k8s.reclaimer` reads,
writes and retries.

The ConfigMap's ``data`` holds two kinds of keys:

* ``<node name>`` → the peer name running there (each daemon registers itself, and re-asserts it on
  every sweep);
* ``_gone.<peer name without colons>`` → JSON ``{"peer", "node", "by"}``: a peer that must be removed, and
  the Node (``by``) that claimed the job. Node names never contain ``_``, so the two cannot collide.

Transitions, each applied to the registry as read and written back in one conditional PUT:

1. :func:`register` (``me`` runs ``peer``): ``<me>`` → ``peer``. A *different* peer registered for our
   Node before (the Node was recreated with the same name, or its state directory wiped: a new peer name,
   see :mod:`weaved.adapters.identity`) is dead for sure, so it moves to ``_gone`` claimed by us. A
   ``_gone`` entry for our own peer is dropped: we are alive (our Node was deleted and came back).
2. :func:`sweep` (the living Nodes are ``living``): a registration whose Node is not living moves to
   ``_gone`` claimed by us, in the same write that removes it; a ``_gone`` entry claimed by nobody or by a
   Node that is itself gone is claimed by us. If our own Node is not among the living, the view is not to
   be trusted (a partial list, a lagging cache) and nothing is claimed.
3. The claimant runs ``rmpeer`` for each entry it holds (:func:`claimed_by`) and then :func:`finish`
   drops it. A failed rmpeer (peer still reachable, IPAM not seeded yet) keeps the claim; the next sweep
   retries.

Why exactly once: the claim is made in the same PUT that removes the registration, so of N peers that
all read the registration, only the first PUT succeeds; the others get 409, read again and find the
registration gone and the entry claimed by a living Node, and do nothing. Only a claimant that dies
between its claim and its rmpeer is taken over, and then rmpeer may run twice, which the IPAM design
allows (a tombstone plus a deterministic heir: docs/ipam.md §2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

GONE_PREFIX = "_gone."


@dataclass(frozen=True, slots=True)
class Reclaim:
    """A dead peer whose space is to be returned; ``by`` is the claimant Node ("" = nobody yet)."""

    peer: str
    node: str
    by: str


@dataclass(frozen=True, slots=True)
class Registry:
    """The ConfigMap's data, parsed. ``other`` keeps keys we do not understand, written back unchanged."""

    peers: Mapping[str, str]
    gone: Mapping[str, Reclaim]
    other: Mapping[str, str]


EMPTY = Registry({}, {}, {})


def gone_key(peer: str) -> str:
    return GONE_PREFIX + peer.replace(":", "")


def parse(data: Mapping[str, str] | None) -> Registry:
    """The registry in a ConfigMap's ``data`` (None or absent: empty). Unreadable entries land in ``other``."""
    peers: dict[str, str] = {}
    gone: dict[str, Reclaim] = {}
    other: dict[str, str] = {}
    for key, value in (data or {}).items():
        if key.startswith(GONE_PREFIX):
            entry = _parse_reclaim(value)
            if entry is not None and gone_key(entry.peer) == key:
                gone[entry.peer] = entry
                continue
        elif "_" not in key and isinstance(value, str) and value.strip():
            peers[key] = value.strip()
            continue
        other[key] = value
    return Registry(peers, gone, other)


def _parse_reclaim(text: str) -> Reclaim | None:
    try:
        raw = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    peer, node, by = raw.get("peer"), raw.get("node", ""), raw.get("by", "")
    if not (isinstance(peer, str) and isinstance(node, str) and isinstance(by, str)) or not peer:
        return None
    return Reclaim(peer, node, by)


def render(registry: Registry) -> dict[str, str]:
    """The ConfigMap ``data`` for a registry (keys sorted, so an unchanged registry renders the same)."""
    data = dict(registry.other)
    data.update(registry.peers)
    for entry in registry.gone.values():
        data[gone_key(entry.peer)] = json.dumps({"peer": entry.peer, "node": entry.node, "by": entry.by},
                                                sort_keys=True, separators=(",", ":"))
    return dict(sorted(data.items()))


def register(registry: Registry, me: str, peer: str) -> Registry:
    """Transition 1: ``me`` runs ``peer`` (see the module docstring)."""
    peers = dict(registry.peers)
    gone = dict(registry.gone)
    previous = peers.get(me)
    peers[me] = peer
    gone.pop(peer, None)
    if previous is not None and previous != peer and previous not in gone:
        gone[previous] = Reclaim(previous, me, me)
    return Registry(peers, gone, registry.other)


def sweep(registry: Registry, living: frozenset[str], me: str) -> Registry:
    """Transition 2: claim the registrations of Nodes that are gone and orphaned claims."""
    if me not in living:
        return registry
    peers = dict(registry.peers)
    gone = dict(registry.gone)
    for node, peer in registry.peers.items():
        if node not in living:
            del peers[node]
            if peer not in gone:
                gone[peer] = Reclaim(peer, node, me)
    for peer, entry in registry.gone.items():
        if entry.by != me and (not entry.by or entry.by not in living):
            gone[peer] = replace(entry, by=me)
    return Registry(peers, gone, registry.other)


def claimed_by(registry: Registry, me: str) -> list[Reclaim]:
    """The rmpeer jobs ``me`` holds, in a stable order."""
    return sorted((e for e in registry.gone.values() if e.by == me), key=lambda e: e.peer)


def finish(registry: Registry, peer: str, me: str) -> Registry:
    """Transition 3: drop the entry for ``peer`` after our rmpeer succeeded (only if still ours)."""
    entry = registry.gone.get(peer)
    if entry is None or entry.by != me:
        return registry
    gone = {p: e for p, e in registry.gone.items() if p != peer}
    return Registry(registry.peers, gone, registry.other)
