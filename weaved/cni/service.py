"""How the daemon runs the CNI side: the socket server and the spool scanner, in the daemon's task group.

Kept apart from :mod:`weaved.adapters.daemon` so the daemon needs one call (:func:`start_cni`) and the CNI
package can change without touching it.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from anyio.abc import TaskGroup

from weaved.adapters.ipam import IpamService
from weaved.cni.handler import CniHandler
from weaved.cni.server import CniServer, CniSocketError, run_spool
from weaved.config import Settings
from weaved.podnet import PodNetwork

__all__ = ["CniSocketError", "start_cni"]


async def start_cni(tg: TaskGroup, settings: Settings, ipam: IpamService,
                    pod_network: Callable[[], PodNetwork | None]) -> CniServer | None:
    """Listen on ``settings.cni_socket`` (raises :class:`CniSocketError` when another daemon does) and scan
    the spool; nothing when the socket is ``off``."""
    if settings.cni_socket is None:
        structlog.get_logger("weaved").info("cni disabled", reason="--cni-socket off")
        return None
    server = CniServer(CniHandler(ipam, pod_network, settings.cni_spool))
    await tg.start(server.serve, settings.cni_socket)
    tg.start_soon(run_spool, server.handler)
    return server
