"""The pod's interface, with pyroute2: create, check and remove the veth pair of one attachment.

Theory of operation
-------------------
Everything here is blocking netlink work; the handler calls it through ``anyio.to_thread.run_sync``.
The daemon runs in the node's network namespace (the "host" side); the pod's namespace is reached only
through the file descriptor the forwarder passed, with a netlink socket created there by
:func:`~weaved.cni.nsenter.netns_socket` (no thread ever stays in the pod's namespace).

ADD (:func:`attach`): the veth pair is created in the host namespace with its peer born directly in the pod's
namespace under its final name (``CNI_IFNAME``), so there is no window in which a half-made interface sits
on the host under a temporary name. The host end gets a deterministic name and an ``ifalias`` naming the
(container, ifname) it serves (:mod:`weaved.cni.spec`), is enslaved to the bridge with hairpin mode on (a
pod can reach itself through a Service IP), and comes up; the pod end gets the MTU, the address, comes up,
and gets the default route via the gateway. A leftover host veth of an earlier, failed ADD for the same
attachment is removed first; a failure half-way removes what was made (deleting the host end removes both).

DEL (:func:`detach`) removes the host end (its peer goes with it) and, if the pod's namespace is still
there, an interface of that name in it — both idempotent.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weaved.cni.nsenter import in_netns, netns_socket
from weaved.cni.spec import ALIAS_PREFIX, parse_alias
from weaved.core import superframe

IFF_UP = 1


class LinkError(Exception):
    """A netlink step failed; ``str()`` names the step and the kernel's reason."""


@dataclass(frozen=True)
class PodSide:
    ifname: str
    mac: str
    mtu: int
    addresses: tuple[IPv4Interface, ...]
    default_gw: IPv4Address | None
    up: bool


@dataclass(frozen=True)
class HostSide:
    ifname: str
    mac: str
    mtu: int
    master: str | None
    hairpin: bool
    up: bool
    alias: str | None


def _step(what: str, exc: BaseException) -> LinkError:
    reason = os.strerror(exc.code) if isinstance(exc, NetlinkError) and exc.code > 0 else str(exc)
    return LinkError(f"{what}: {reason}")


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _link_info(ipr: Any, index: int) -> Any:
    return ipr.get_links(index)[0]


def attach(netns_fd: int, host_ifname: str, alias: str, ifname: str, bridge: str, mtu: int,
           address: IPv4Interface, gateway: IPv4Address | None, hairpin: bool) -> tuple[str, str]:
    """Create and configure the pair (see the module docstring); returns (host mac, pod mac)."""
    with IPRoute() as host:
        bridge_index = _index(host, bridge)
        if bridge_index is None:
            raise LinkError(f"bridge {bridge} does not exist in weaved's network namespace")
        stale = _index(host, host_ifname)
        if stale is not None:
            host.link("del", index=stale)
        try:
            # The pod's TCP sizes its super-packets by its own interface: keep them to what the TUN passes
            # whole (larger ones would be cut up by the kernel in front of the sleeve).
            gso = superframe.tun_gso_max_size(mtu)
            host.link("add", ifname=host_ifname, kind="veth", mtu=mtu, gso_max_size=gso,
                      peer={"ifname": ifname, "net_ns_fd": netns_fd, "mtu": mtu, "gso_max_size": gso})
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise LinkError(f"create veth: {ifname} already exists in the pod's network namespace "
                                f"(or {host_ifname} on the host)") from None
            raise _step("create veth", exc) from None
        try:
            index = _index(host, host_ifname)
            if index is None:
                raise LinkError(f"{host_ifname} vanished right after it was created")
            host.link("set", index=index, IFLA_IFALIAS=alias)
            host.link("set", index=index, master=bridge_index)
            if hairpin:
                host.brport("set", index=index, mode=1)  # IFLA_BRPORT_MODE: hairpin
            host.link("set", index=index, state="up")
            host_mac = str(_link_info(host, index).get("IFLA_ADDRESS"))
            pod_mac = _configure_pod(netns_fd, ifname, address, gateway)
        except BaseException as exc:
            with contextlib.suppress(NetlinkError):
                host.link("del", ifname=host_ifname)
            if isinstance(exc, LinkError):
                raise
            if isinstance(exc, NetlinkError | OSError):
                raise _step("configure veth", exc) from None
            raise
    return host_mac, pod_mac


def _configure_pod(netns_fd: int, ifname: str, address: IPv4Interface, gateway: IPv4Address | None) -> str:
    with IPRoute(use_socket=netns_socket(netns_fd)) as pod:
        index = _index(pod, ifname)
        if index is None:
            raise LinkError(f"{ifname} is missing from the pod's network namespace")
        lo = _index(pod, "lo")
        try:
            pod.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
            pod.link("set", index=index, state="up")
            if lo is not None:
                pod.link("set", index=lo, state="up")
        except NetlinkError as exc:
            raise _step(f"address {address} on {ifname}", exc) from None
        if gateway is not None:
            try:
                if gateway not in address.network:
                    pod.route("add", dst=f"{gateway}/32", oif=index, scope=253)  # link scope
                pod.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=index)
            except NetlinkError as exc:
                raise _step(f"default route via {gateway}", exc) from None
        mac = str(_link_info(pod, index).get("IFLA_ADDRESS"))
    # An IPv4-only pod network: router advertisements must not give the pod a second, unplanned path.
    with contextlib.suppress(OSError):  # IPv6 disabled in the pod: nothing to turn off
        in_netns(netns_fd, lambda: _write(f"/proc/sys/net/ipv6/conf/{ifname}/accept_ra", "0"))
    return mac


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def detach(netns_fd: int | None, host_ifname: str, ifname: str) -> bool:
    """Remove the pair; True when something was removed. Missing pieces are not an error."""
    removed = False
    with IPRoute() as host:
        index = _index(host, host_ifname)
        if index is not None:
            try:
                host.link("del", index=index)
                removed = True
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise _step(f"delete {host_ifname}", exc) from None
    if netns_fd is not None:
        with IPRoute(use_socket=netns_socket(netns_fd)) as pod:
            index = _index(pod, ifname)
            if index is not None and _link_info(pod, index).get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth":
                try:
                    pod.link("del", index=index)
                    removed = True
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise _step(f"delete {ifname} in the pod", exc) from None
    return removed


def host_side(host_ifname: str) -> HostSide | None:
    with IPRoute() as host:
        index = _index(host, host_ifname)
        if index is None:
            return None
        link = _link_info(host, index)
        master_index = link.get("IFLA_MASTER")
        master = str(_link_info(host, master_index).get("IFLA_IFNAME")) if master_index else None
        hairpin = bool(link.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_MODE"))
        return HostSide(host_ifname, str(link.get("IFLA_ADDRESS")), int(link.get("IFLA_MTU")), master, hairpin,
                        bool(link["flags"] & IFF_UP), link.get("IFLA_IFALIAS"))


def pod_side(netns_fd: int, ifname: str) -> PodSide | None:
    with IPRoute(use_socket=netns_socket(netns_fd)) as pod:
        index = _index(pod, ifname)
        if index is None:
            return None
        link = _link_info(pod, index)
        addresses = tuple(
            IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}") for a in pod.get_addr(index=index, family=2)
        )
        gw = None
        for route in pod.get_routes(family=2, table=254):
            if route["dst_len"] == 0 and route.get("RTA_OIF") == index and route.get("RTA_GATEWAY"):
                gw = IPv4Address(route.get("RTA_GATEWAY"))
        return PodSide(ifname, str(link.get("IFLA_ADDRESS")), int(link.get("IFLA_MTU")), addresses, gw,
                       bool(link["flags"] & IFF_UP))


def our_veths() -> list[tuple[str, str, str]]:
    """(host ifname, container id, ifname) of every host veth ADD made (found by its alias)."""
    found = []
    with IPRoute() as host:
        for link in host.get_links():
            alias = link.get("IFLA_IFALIAS")
            if alias and alias.startswith(ALIAS_PREFIX):
                parsed = parse_alias(alias)
                if parsed is not None:
                    found.append((str(link.get("IFLA_IFNAME")), *parsed))
    return found


def delete_host(host_ifname: str) -> bool:
    with IPRoute() as host:
        index = _index(host, host_ifname)
        if index is None:
            return False
        try:
            host.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise _step(f"delete {host_ifname}", exc) from None
        return True
