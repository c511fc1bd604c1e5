"""What a pod's interface needs from its node: the contract between the node network and the CNI handler.

The node network (bridge, gateway address, routes into the overlay) is set up by the daemon's data path;
the CNI handler only plugs veths into it. Keeping the contract in one small value type lets either side be
built, tested and replaced on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface


@dataclass(frozen=True)
class PodNetwork:
    """The node's pod network, once it is up (the daemon answers ``None`` before that)."""

    bridge: str
    """Host-side veth ends are attached to this bridge (``weave``)."""
    gateway: IPv4Interface
    """The bridge's address on the pod network (``10.32.0.1/12``): pods take this prefix length, and their
    default route goes via ``gateway.ip``."""
    mtu: int
    """MTU for pod interfaces: the underlay's minus the overlay's overhead, or ``WEAVE_MTU``."""
