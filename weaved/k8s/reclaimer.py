"""Reclaim the IPAM space of deleted Nodes, exactly once across the cluster, through one ConfigMap.

Theory of operation
-------------------
:meth:`Reclaimer.reconcile` is one round of the protocol of :mod:`weaved.core.kube.registry`: read the
ConfigMap, apply :func:`~weaved.core.kube.registry.register` and (when the living Nodes are known)
:func:`~weaved.core.kube.registry.sweep`, and write the result back with the ``resourceVersion`` read. A
409 Conflict means another peer wrote first: read again and decide again (its claim is then visible, so
we do not claim the same peer). Then, for every entry this Node holds, call ``rmpeer`` on the local IPAM
and drop the entry with another conditional write. A refused rmpeer (the peer is still reachable, IPAM
is not seeded yet, the state cannot be saved) keeps the entry: the next round tries again.

The daemon runs a round at start (registration), after every Node deletion and full list, and
periodically (:data:`SWEEP_INTERVAL`), which also catches deletions that happened while it was down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import structlog

from weaved.core.ipam.allocator import AllocError
from weaved.core.kube.registry import Reclaim, Registry, claimed_by, finish, parse, register, render, sweep
from weaved.core.types import PeerName
from weaved.k8s.client import Conflict, KubeClient, KubeError

SWEEP_INTERVAL = 60.0
"""Seconds between periodic rounds."""
MAX_ATTEMPTS = 20
"""Conflicting writes tolerated in one round; each conflict means another peer made progress."""


class Remover(Protocol):
    """What reclaim needs of IPAM: :meth:`weaved.adapters.ipam.IpamService.rmpeer`."""

    async def rmpeer(self, peer: str) -> tuple[PeerName, int]: ...


@dataclass
class RoundResult:
    """What one round did, for logs and tests."""

    claimed: list[Reclaim] = field(default_factory=list)
    reclaimed: list[str] = field(default_factory=list)
    postponed: dict[str, str] = field(default_factory=dict)
    conflicts: int = 0


class Reclaimer:
    """One per daemon: ``me`` is this Node's name, ``peer`` this daemon's peer name."""

    def __init__(self, client: KubeClient, namespace: str, name: str, me: str, peer: str,
                 remover: Remover) -> None:
        self._client = client
        self._namespace = namespace
        self._name = name
        self.me = me
        self.peer = peer
        self._remover = remover
        self._log = structlog.get_logger("weaved.k8s")
        self.registered = False

    async def _update(self, edit: Callable[[Registry], Registry], result: RoundResult,
                      doing: str) -> tuple[Registry, Registry]:
        """Read, edit, write conditionally, until a write lands (or nothing needs writing).
        Returns the registry as read and as written."""
        for _ in range(MAX_ATTEMPTS):
            data, version = await self._client.get_configmap(self._namespace, self._name)
            before = parse(data)
            after = edit(before)
            if render(after) != render(before):
                try:
                    await self._client.replace_configmap(self._namespace, self._name, render(after), version)
                except Conflict:
                    result.conflicts += 1
                    continue
            return before, after
        raise KubeError(f"configmap {self._namespace}/{self._name}: {MAX_ATTEMPTS} conflicting writes in a row "
                        f"while trying to {doing}")

    async def reconcile(self, living: frozenset[str] | None) -> RoundResult:
        """One round (see the module docstring); ``living`` is None until the Nodes were listed."""
        result = RoundResult()

        def edit(registry: Registry) -> Registry:
            registered = register(registry, self.me, self.peer)
            return sweep(registered, living, self.me) if living is not None else registered

        before, after = await self._update(edit, result, "register and sweep")
        if not self.registered:
            self.registered = True
            self._log.info("registered for reclaim", node=self.me, peer=self.peer,
                           configmap=f"{self._namespace}/{self._name}")
        held_before = claimed_by(before, self.me)
        held = claimed_by(after, self.me)
        result.claimed = [e for e in held if e not in held_before]
        for entry in result.claimed:
            self._log.info("reclaim claimed", dead_node=entry.node, dead_peer=entry.peer, conflicts=result.conflicts)
        for entry in held:
            try:
                _, taken = await self._remover.rmpeer(entry.peer)
            except AllocError as exc:
                result.postponed[entry.peer] = str(exc)
                self._log.warning("reclaim postponed", dead_node=entry.node, dead_peer=entry.peer, reason=str(exc))
                continue
            await self._update(partial(finish, peer=entry.peer, me=self.me), result, f"finish {entry.peer}")
            result.reclaimed.append(entry.peer)
            self._log.info("reclaimed", dead_node=entry.node, dead_peer=entry.peer, addresses_taken=taken)
        return result
