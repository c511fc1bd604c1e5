"""A :class:`~weaved.podnet.PodNetwork` read from a bridge that already exists (set up by someone else).

The daemon's data path builds the node network itself; this provider serves setups where the bridge is
made outside weaved — the CNI tests, and a node whose operator manages the bridge. It reads the bridge's
first IPv4 address and MTU from the kernel; ``None`` while the bridge is missing or has no address. Once
found, the answer is kept (the bridge's address does not change under a running node). pyroute2's
synchronous API runs an event loop of its own, which cannot run inside the daemon's, so the one netlink
query is made in a short-lived thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from ipaddress import IPv4Interface

from pyroute2 import IPRoute

from weaved.podnet import PodNetwork


def existing_bridge(name: str, mtu: int | None = None) -> Callable[[], PodNetwork | None]:
    found_net: list[PodNetwork] = []

    def provider() -> PodNetwork | None:
        if not found_net:
            box: list[PodNetwork | None] = [None]
            thread = threading.Thread(target=lambda: box.__setitem__(0, read()), name="weaved-bridge")
            thread.start()
            thread.join(5.0)
            if box[0] is not None:
                found_net.append(box[0])
        return found_net[0] if found_net else None

    def read() -> PodNetwork | None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return None
            addrs = ipr.get_addr(index=found[0], family=2)
            if not addrs:
                return None
            gateway = IPv4Interface(f"{addrs[0].get('IFA_ADDRESS')}/{addrs[0]['prefixlen']}")
            link_mtu = int(ipr.get_links(found[0])[0].get("IFLA_MTU"))
        return PodNetwork(bridge=name, gateway=gateway, mtu=mtu or link_mtu)

    return provider
