"""The daemon's Kubernetes task: Nodes become dial targets, deleted Nodes are reclaimed.

Theory of operation
-------------------
:func:`run_kube` runs beside the pump for the daemon's whole life and never ends it: every API failure
is logged and retried (:mod:`weaved.k8s.discovery`, :mod:`weaved.k8s.reclaimer`). It joins three things:

* :func:`~weaved.k8s.discovery.follow_nodes`: a Node with an address becomes a target
  (``connect``), a Node that lost its address or was deleted stops being one (``forget``);
* reclaim rounds (:class:`~weaved.k8s.reclaimer.Reclaimer`), one at a time: at start (registration,
  before the Nodes are known nothing is claimed), after every deletion or full list, every
  :data:`~weaved.k8s.reclaimer.SWEEP_INTERVAL` seconds, and soon again (:data:`POSTPONED_RETRY`, backing
  off) after a round whose rmpeer was refused;
* readable log lines for each Node change and reclaim outcome.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

import anyio
import structlog

from weaved.config import HostPort, Settings
from weaved.core.kube.nodes import NodeChanges, NodeView
from weaved.core.types import Endpoint
from weaved.k8s.client import KubeClient, KubeConfig, KubeError
from weaved.k8s.discovery import Backoff, follow_nodes
from weaved.k8s.reclaimer import SWEEP_INTERVAL, Reclaimer, Remover
from weaved.k8s.settings import KubeSettings

POSTPONED_RETRY = 2.0
"""Seconds before a refused rmpeer is tried again (doubling up to the sweep interval): a deleted Node's
peer usually stays reachable for the mesh's heartbeat timeout after its machine died."""
INITIAL_LIST_DEADLINE = 60.0
"""Seconds ``weaved run`` keeps trying to list the Nodes before it starts without them."""


class Targets(Protocol):
    """What discovery needs of the daemon: :class:`weaved.adapters.daemon.Node`'s connect and forget."""

    async def connect(self, peer: HostPort) -> list[Endpoint]: ...

    async def forget(self, peer: HostPort) -> list[Endpoint]: ...


async def run_kube(kube: KubeSettings, config: KubeConfig, targets: Targets, remover: Remover, peer_name: str,
                   port: int, *, sweep_interval: float = SWEEP_INTERVAL, rng: random.Random | None = None) -> None:
    """Run until cancelled (see the module docstring)."""
    log = structlog.get_logger("weaved.k8s")
    rng = rng or random.Random()
    log.info("kubernetes mode", node=kube.node_name, api=config.server,
             configmap=f"{kube.namespace}/{kube.configmap}")
    async with KubeClient(config) as client, anyio.create_task_group() as tg:
        view = NodeView(kube.node_name)
        reclaimer = Reclaimer(client, kube.namespace, kube.configmap, kube.node_name, peer_name, remover)
        lock = anyio.Lock()
        listed = False

        retry = Backoff(rng, low=POSTPONED_RETRY, high=sweep_interval)
        retry_pending = False

        async def reclaim_round() -> None:
            nonlocal retry_pending
            async with lock:
                try:
                    result = await reclaimer.reconcile(view.names() if listed else None)
                except KubeError as exc:
                    log.warning("reclaim round failed, will retry", error=str(exc))
                    return
            if not result.postponed:
                retry.reset()
            elif not retry_pending:  # e.g. the dead peer is still reachable for a few seconds: retry soon
                retry_pending = True
                tg.start_soon(retry_later, retry.next())

        async def retry_later(delay: float) -> None:
            nonlocal retry_pending
            await anyio.sleep(delay)
            retry_pending = False
            await reclaim_round()

        async def on_changes(changes: NodeChanges, relisted: bool) -> None:
            nonlocal listed
            for address in sorted(changes.added):
                log.info("node peer added", address=address)
                await _dial(targets.connect, HostPort(address, port), log)
            for address in sorted(changes.removed):
                log.info("node peer removed", address=address)
                await _dial(targets.forget, HostPort(address, port), log)
            for name in sorted(changes.deleted):
                log.info("node deleted", node=name)
            if relisted:
                listed = True
            if changes.deleted or relisted:
                tg.start_soon(reclaim_round)

        async def sweeper() -> None:
            backoff = Backoff(rng)
            while not reclaimer.registered:  # register soon, even before the Nodes are listed
                await reclaim_round()
                if not reclaimer.registered:
                    await anyio.sleep(backoff.next())
            while True:
                await anyio.sleep(sweep_interval)
                await reclaim_round()

        tg.start_soon(partial(follow_nodes, client, view, on_changes, rng=rng))
        tg.start_soon(sweeper)


async def _dial(action: Callable[[HostPort], Awaitable[object]], peer: HostPort, log: Any) -> None:
    try:
        await action(peer)
    except Exception as exc:  # a bad address from the API must not stop discovery
        log.warning("cannot use node address", peer=str(peer), error=str(exc))


async def initial_peers(kube: KubeSettings, config: KubeConfig, deadline: float = INITIAL_LIST_DEADLINE) -> list[str]:
    """The other Nodes' addresses, listed once before the daemon starts (Weave's ``KUBE_PEERS``): IPAM's
    bare ``consensus`` needs the number of initial peers. Retries until ``deadline`` seconds passed, then
    raises :class:`KubeError`."""
    backoff = Backoff(random.Random(), high=5.0)
    with anyio.fail_after(deadline):
        async with KubeClient(config) as client:
            while True:
                try:
                    items, _ = await client.list_nodes()
                    break
                except KubeError as exc:
                    structlog.get_logger("weaved.k8s").warning("cannot list nodes yet", error=str(exc))
                    await anyio.sleep(backoff.next())
    view = NodeView(kube.node_name)
    view.replace(items)
    return sorted(view.peers())


def api_config(kube: KubeSettings, env: Mapping[str, str]) -> KubeConfig:
    """``WEAVED_KUBE_API`` if given, else the pod's service account; :class:`KubeError` outside a cluster."""
    if kube.api_server is not None:
        return KubeConfig(kube.api_server)
    return KubeConfig.in_cluster(env)


def with_kube_peers(settings: Settings, rebuild: Callable[[Mapping[str, str]], Settings],
                    env: Mapping[str, str]) -> Settings:
    """Before ``weaved run`` starts in a cluster without ``KUBE_PEERS``: list the Nodes once and parse the
    settings again with their addresses as ``KUBE_PEERS``, as Weave Net's launch script does, so that bare
    ``IPALLOC_INIT=consensus`` counts the cluster's Nodes. A failure is logged and the daemon starts
    without (discovery adds the peers later; consensus then needs an explicit ``consensus=N``)."""
    if settings.kube is None or env.get("KUBE_PEERS", "").strip():
        return settings
    log = structlog.get_logger("weaved.k8s")
    try:
        config = api_config(settings.kube, env)
        peers = anyio.run(initial_peers, settings.kube, config, backend="asyncio")
    except (KubeError, TimeoutError) as exc:
        log.warning("starting without the node list", error=str(exc) or "timed out")
        return settings
    log.info("initial peers from the node list", peers=" ".join(peers) or "-")
    return rebuild({**env, "KUBE_PEERS": " ".join(peers)})
