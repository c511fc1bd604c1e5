"""The node network: bridge, gateway address, TUN routes, sysctls and masquerading, kept in place.

Theory of operation
-------------------
Pods of this node hang off one Linux bridge, ``weave``, which holds the node's gateway address from IPAM
with the whole range's prefix (``10.32.0.1/12``). Its connected route covers the range, so the node
reaches its own pods directly. Every address *another* peer owns gets a more specific route into the TUN
device ``weave-tun`` (:func:`weaved.core.forwarding.remote_networks`), with ``src`` = the gateway so that
the node's own traffic to remote pods is answered through the overlay, not via the underlay.

A pod sees the whole range as on-link (its address is ``/12``), so it ARPs for a remote pod's address on
the bridge. ``proxy_arp`` on the bridge makes the node answer for exactly the addresses it routes
elsewhere (the kernel answers a request when its route to the target leaves by another interface);
``proxy_delay = 0`` makes it answer at once instead of after up to 0.8 s. ``ip_forward`` is on.

Masquerading lives in an nftables table of our own, ``ip weaved`` (replaced as a whole, atomically), with
Weave Net's rules (see :func:`masquerade_ruleset`).

:meth:`NodeNetwork.ensure` compares the kernel's state with the desired one and changes only what
differs, so it is cheap to call every few seconds: that is how the network comes back when someone
deletes the bridge, a route or the table. Nothing is ever torn down on exit: pods keep their network while
the daemon restarts, and the new daemon finds everything in place. Removing the network is an operator's
act (``ip link del weave; ip link del weave-tun; nft delete table ip weaved``).

All calls are blocking (pyroute2's synchronous API and the ``nft`` tool): the daemon runs them in a worker
thread. The process must run in the network namespace to configure: the daemon never changes namespace.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

BRIDGE = "weave"
TUN = "weave-tun"
NFT_TABLE = "weaved"
ROUTE_PROTO = 77
"""``proto`` of the routes we install (shown by ``ip route`` as ``proto 77``): ours to replace."""
MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    f"net/ipv4/conf/{BRIDGE}/proxy_arp": "1",
    f"net/ipv4/neigh/{BRIDGE}/proxy_delay": "0",
}
"""Sysctls (under /proc/sys) the data path needs; set after the bridge exists (two are per device)."""
OPTIONAL_SYSCTLS = {f"net/ipv6/conf/{TUN}/disable_ipv6": "1"}
"""Set when present (not on a kernel without IPv6): the sleeve carries IPv4 only, so the TUN needs no
link-local address, and sends no router solicitations for the sleeve to drop."""
DEFAULT_UNDERLAY_MTU = 1500


class NodeNetError(Exception):
    """The node network cannot be set up; ``str()`` is one line."""


@dataclass(frozen=True)
class Desired:
    """The node network as it should be."""

    range: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Interface
    mtu: int
    remote: tuple[ipaddress.IPv4Network, ...]
    """Other peers' addresses: routed into the TUN."""
    local: tuple[ipaddress.IPv4Network, ...]
    """Our own ring ranges (the no-masq-local set)."""
    no_masq_local: bool
    tun_gso_max_size: int | None = None
    """Largest super-packet the TUN hands over (offload mode): one that fits a single UDP GSO send."""


def masquerade_ruleset(desired: Desired) -> str:
    """The ``ip weaved`` table, as Weave Net's ``WEAVE`` nat chain does it.

    * traffic to our own pods from outside the range keeps its source when ``NO_MASQ_LOCAL`` is on (so a
      service with ``externalTrafficPolicy: Local`` sees the client);
    * pod multicast is left alone;
    * traffic from outside the range into the range (a NodePort forwarded to a remote pod) is
      source-NATed to our gateway, so the answer comes back through this node over the overlay;
    * pod traffic leaving the range is masqueraded to the outgoing interface's address.

    The script first declares the table and deletes it, then builds it: one ``nft -f`` transaction that
    replaces whatever was there.
    """
    rng = str(desired.range)
    local = ", ".join(str(n) for n in desired.local)
    lines = [
        f"table ip {NFT_TABLE} {{}}",
        f"delete table ip {NFT_TABLE}",
        f"table ip {NFT_TABLE} {{",
        "  set no_masq_local {",
        "    type ipv4_addr; flags interval;",
        *([f"    elements = {{ {local} }}"] if local else []),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *(["    ip saddr != " + rng + " ip daddr @no_masq_local return"] if desired.no_masq_local else []),
        f"    ip saddr {rng} ip daddr {MULTICAST} return",
        f"    ip saddr != {rng} ip daddr {rng} snat to {desired.gateway.ip}",
        f"    ip saddr {rng} ip daddr != {rng} masquerade",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def underlay_mtu(ipr: IPRoute, exclude: Sequence[str] = (BRIDGE, TUN)) -> int:
    """The MTU of the interface the sleeve's datagrams leave by: the default route's device, else the
    smallest MTU of the up interfaces with a global IPv4 address (ours and loopback excluded), else 1500."""
    names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
    mtus = {link["index"]: link.get("IFLA_MTU") for link in ipr.get_links()}
    for route in ipr.get_routes(family=2, table=254):
        if route["dst_len"] == 0 and route.get("RTA_OIF") in mtus and names.get(route.get("RTA_OIF")) not in exclude:
            return int(mtus[route.get("RTA_OIF")])
    candidates = []
    for address in ipr.get_addr(family=2):
        index = address["index"]
        if names.get(index) in exclude or address["scope"] != 0:
            continue
        link = ipr.get_links(index)[0]
        if link["flags"] & 1:  # IFF_UP
            candidates.append(int(mtus[index]))
    return min(candidates, default=DEFAULT_UNDERLAY_MTU)


class NodeNetwork:
    """Applies :class:`Desired` to the kernel of the namespace we run in; see the module docstring."""

    def __init__(self, proc_sys: Path = Path("/proc/sys"), sys_class_net: Path = Path("/sys/class/net")) -> None:
        self._proc_sys = proc_sys
        self._sys_class_net = sys_class_net
        self._applied_rules: str | None = None
        self._ports: dict[str, str] = {}
        """The bridge's ports at the last check, with their hairpin mode: re-attached if the bridge is
        deleted and created again (a deleted bridge releases its ports; the pods would be cut off)."""
        nft = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
        if nft is None:
            raise NodeNetError("nft not found: apt-get install -y nftables")
        self._nft = nft

    def ensure(self, desired: Desired) -> list[str]:
        """Make the kernel match ``desired``; returns what had to be changed (empty when all was in place)."""
        changes: list[str] = []
        with IPRoute() as ipr:
            self._ensure_bridge(ipr, desired, changes)
            self._ensure_sysctls(changes)  # before the TUN goes up: it should never get an IPv6 address
            tun = self._ensure_tun(ipr, desired, changes)
            self._ensure_routes(ipr, tun, desired, changes)
        self._ensure_rules(desired, changes)
        return changes

    def gateway_present(self, gateway: ipaddress.IPv4Interface) -> bool:
        """The bridge exists, is up and holds ``gateway``: pods can be plugged in."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=BRIDGE)
            if not found:
                return False
            link = ipr.get_links(found[0])[0]
            if not link["flags"] & 1:
                return False
            return any(a.get("IFA_ADDRESS") == str(gateway.ip) and a["prefixlen"] == gateway.network.prefixlen
                       for a in ipr.get_addr(family=2, index=found[0]))

    def tun_present(self) -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=TUN))

    def underlay_mtu(self) -> int:
        with IPRoute() as ipr:
            return underlay_mtu(ipr)

    # --- pieces -----------------------------------------------------------------------------------

    def _ensure_bridge(self, ipr: IPRoute, desired: Desired, changes: list[str]) -> int:
        found = ipr.link_lookup(ifname=BRIDGE)
        created = not found
        if created:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            changes.append(f"created bridge {BRIDGE}")
            found = ipr.link_lookup(ifname=BRIDGE)
        index = int(found[0])
        link = ipr.get_links(index)[0]
        kind = (link.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_KIND") if link.get("IFLA_LINKINFO") else None
        if kind != "bridge":
            raise NodeNetError(f"{BRIDGE} exists but is a {kind or 'device'} link, not a bridge: remove it")
        if link.get("IFLA_MTU") != desired.mtu:
            ipr.link("set", index=index, mtu=desired.mtu)
            changes.append(f"bridge mtu {link.get('IFLA_MTU')} -> {desired.mtu}")
        if not link["flags"] & 1:
            ipr.link("set", index=index, state="up")
            changes.append("bridge up")
        have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=2, index=index)}
        want = (str(desired.gateway.ip), desired.gateway.network.prefixlen)
        for address, prefixlen in have - {want}:
            # An old gateway (IPAM state reset) or a hand-made address: only one gateway may answer pods.
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            changes.append(f"removed {address}/{prefixlen} from {BRIDGE}")
        if want not in have:
            ipr.addr("add", index=index, address=want[0], prefixlen=want[1])
            changes.append(f"address {desired.gateway} on {BRIDGE}")
        if created:
            self._reattach_ports(ipr, index, changes)
        self._ports = {name: self._hairpin(name) for name in self._port_names(ipr, index)}
        return index

    @staticmethod
    def _port_names(ipr: IPRoute, bridge: int) -> list[str]:
        return [str(link.get("IFLA_IFNAME")) for link in ipr.get_links() if link.get("IFLA_MASTER") == bridge]

    def _hairpin_path(self, port: str) -> Path:
        return self._sys_class_net / port / "brport" / "hairpin_mode"

    def _hairpin(self, port: str) -> str:
        try:
            return self._hairpin_path(port).read_text().strip()
        except OSError:
            return "0"

    def _reattach_ports(self, ipr: IPRoute, bridge: int, changes: list[str]) -> None:
        """Plug the ports the deleted bridge had back in, with their hairpin mode (set by the CNI handler)."""
        for name, hairpin in sorted(self._ports.items()):
            found = ipr.link_lookup(ifname=name)
            if not found:
                continue  # the pod went away meanwhile
            ipr.link("set", index=found[0], master=bridge)
            if hairpin != "0":
                try:
                    self._hairpin_path(name).write_text(hairpin + "\n")
                except OSError as exc:
                    changes.append(f"hairpin on {name} not restored: {exc.strerror}")
            changes.append(f"re-attached {name}")

    def _ensure_tun(self, ipr: IPRoute, desired: Desired, changes: list[str]) -> int:
        found = ipr.link_lookup(ifname=TUN)
        if not found:
            raise NodeNetError(f"TUN device {TUN} is gone")  # the sleeve re-opens it (see Datapath)
        index = int(found[0])
        link = ipr.get_links(index)[0]
        if link.get("IFLA_MTU") != desired.mtu:
            ipr.link("set", index=index, mtu=desired.mtu)
            changes.append(f"{TUN} mtu {link.get('IFLA_MTU')} -> {desired.mtu}")
        gso = desired.tun_gso_max_size
        if gso is not None and link.get("IFLA_GSO_MAX_SIZE") != gso:
            ipr.link("set", index=index, gso_max_size=gso)
            changes.append(f"{TUN} gso_max_size {link.get('IFLA_GSO_MAX_SIZE')} -> {gso}")
        if not link["flags"] & 1:
            ipr.link("set", index=index, state="up")
            changes.append(f"{TUN} up")
        return index

    def _ensure_sysctls(self, changes: list[str]) -> None:
        wanted = {**SYSCTLS, **{k: v for k, v in OPTIONAL_SYSCTLS.items() if (self._proc_sys / k).exists()}}
        for key, value in wanted.items():
            path = self._proc_sys / key
            try:
                if path.read_text().strip() != value:
                    path.write_text(value + "\n")
                    changes.append(f"sysctl {key.replace('/', '.')}={value}")
            except OSError as exc:
                raise NodeNetError(f"cannot set {path}: {exc.strerror}") from None

    def _ensure_routes(self, ipr: IPRoute, tun: int, desired: Desired, changes: list[str]) -> None:
        want = {(str(n.network_address), n.prefixlen) for n in desired.remote}
        have: dict[tuple[str, int], bool] = {}
        for route in ipr.get_routes(family=2, table=254, oif=tun):
            key = (route.get("RTA_DST") or "0.0.0.0", route["dst_len"])
            have[key] = route.get("RTA_PREFSRC") == str(desired.gateway.ip) and route["proto"] == ROUTE_PROTO
        for key, good in have.items():
            if key not in want or not good:
                ipr.route("del", dst=key[0], dst_len=key[1], oif=tun, table=254)
                if key not in want:
                    changes.append(f"route {key[0]}/{key[1]} removed")
        for dst, dst_len in sorted(want):
            if not have.get((dst, dst_len)):
                ipr.route("replace", dst=dst, dst_len=dst_len, oif=tun, prefsrc=str(desired.gateway.ip),
                          proto=ROUTE_PROTO, table=254)
                changes.append(f"route {dst}/{dst_len} via {TUN}")

    def _ensure_rules(self, desired: Desired, changes: list[str]) -> None:
        rules = masquerade_ruleset(desired)
        present = subprocess.run([self._nft, "list", "table", "ip", NFT_TABLE], capture_output=True,
                                 check=False).returncode == 0
        if present and rules == self._applied_rules:
            return
        proc = subprocess.run([self._nft, "-f", "-"], input=rules, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NodeNetError(f"nft refused the {NFT_TABLE} table: {proc.stderr.strip().splitlines()[-1:]}")
        self._applied_rules = rules
        changes.append(f"nft table ip {NFT_TABLE} " + ("updated" if present else "installed"))
