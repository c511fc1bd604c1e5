"""Turn an operator's ``HOST[:PORT]`` into the UDP endpoints the core dials.

The core only knows IP literals (:class:`~weaved.core.types.Endpoint`); names are resolved here, with
anyio's non-blocking ``getaddrinfo``. The control socket is IPv4 (it binds ``0.0.0.0``), so only IPv4
addresses are useful: asking for them alone keeps a dual-stack name from producing a target we could never
reach.
"""

from __future__ import annotations

import socket

import anyio

from weaved.config import HostPort
from weaved.core.types import Endpoint


class ResolveError(Exception):
    """``HOST`` has no usable address; ``str()`` is one line for the operator."""


async def resolve(peer: HostPort) -> list[Endpoint]:
    """The IPv4 endpoints of ``peer``, deduplicated, in resolver order."""
    try:
        infos = await anyio.getaddrinfo(peer.host, peer.port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ResolveError(f"cannot resolve {peer.host}: {exc.strerror or exc}") from None
    endpoints = [Endpoint(str(info[4][0]), peer.port) for info in infos]
    if not endpoints:
        raise ResolveError(f"cannot resolve {peer.host}: no IPv4 address")
    return list(dict.fromkeys(endpoints))
