"""Follow the cluster's Nodes: list, then watch, for ever, whatever the API server does.

Theory of operation
-------------------
:func:`follow_nodes` keeps a :class:`~weaved.core.kube.nodes.NodeView` in step with the API server and
hands every change to a callback. It lists once, then watches from the list's ``resourceVersion``:

* a watch that ends normally (the server's ``timeoutSeconds``) is resumed from the last version seen,
  which BOOKMARK events keep fresh even when no Node changes;
* ``410 Gone`` (the version was compacted away) means events were lost: list again at once, and the view's
  :meth:`~weaved.core.kube.nodes.NodeView.replace` reports what changed meanwhile, deletions included;
* any other failure (connection refused, 5xx, 403 while RBAC is being applied, a malformed event) is
  logged and retried after a jittered exponential backoff (:class:`Backoff`), resuming the watch if a
  version is known. Weave Net's reclaim watcher stopped at the first error (#3910); this loop ends only
  when cancelled.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from weaved.core.kube.nodes import NodeChanges, NodeView
from weaved.k8s.client import Gone, KubeClient, KubeError

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
BACKOFF_JITTER = 0.25
"""± fraction of each delay, so that a whole cluster's daemons do not retry in lock-step."""

OnChanges = Callable[[NodeChanges, bool], Awaitable[None]]
"""Called with each change and whether it came from a full list (True) or one watch event."""


class Backoff:
    """Exponential delays with jitter, reset after a success."""

    def __init__(self, rng: random.Random, low: float = BACKOFF_MIN, high: float = BACKOFF_MAX) -> None:
        self._rng = rng
        self._low = low
        self._high = high
        self._next = low

    def reset(self) -> None:
        self._next = self._low

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._high)
        return delay * (1 + self._rng.uniform(-BACKOFF_JITTER, BACKOFF_JITTER))


def _resource_version(obj: dict[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    return version if isinstance(version, str) and version else None


async def follow_nodes(client: KubeClient, view: NodeView, on_changes: OnChanges, *, rng: random.Random,
                       backoff: Backoff | None = None, sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
                       watch_timeout: int | None = None) -> None:
    """Run until cancelled (see the module docstring)."""
    log = structlog.get_logger("weaved.k8s")
    backoff = backoff or Backoff(rng)
    version: str | None = None
    while True:
        try:
            if version is None:
                items, version = await client.list_nodes()
                changes = view.replace(items)
                log.info("nodes listed", nodes=len(view.nodes), peers=len(view.peers()),
                         malformed=changes.malformed or None)
                await on_changes(changes, True)
                backoff.reset()
            events = (client.watch_nodes(version) if watch_timeout is None
                      else client.watch_nodes(version, watch_timeout))
            async for kind, obj in events:
                version = _resource_version(obj) or version
                if kind == "BOOKMARK":
                    continue
                changes = view.apply(kind, obj)
                if changes.malformed:
                    log.warning("malformed node event ignored", type=kind)
                await on_changes(changes, False)
                backoff.reset()
        except Gone as exc:
            log.info("node watch expired, listing again", reason=str(exc))
            version = None
        except KubeError as exc:
            delay = backoff.next()
            log.warning("node watch failed, retrying", error=str(exc), retry_in=round(delay, 1))
            await sleep(delay)
