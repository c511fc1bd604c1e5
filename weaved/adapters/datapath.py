"""The data path's life in the daemon: node network, sleeve socket and TUN, the forwarding snapshot.

Theory of operation
-------------------
:class:`Datapath` ties the pieces together and is driven from two places:

* the **pump** calls :meth:`Datapath.refresh` after every step. When the topology, the neighbours or the
  ring changed, it builds a new :class:`~weaved.core.forwarding.ForwardingTable` (pure, in
  :mod:`weaved.core.forwarding`) and hands it to the packet threads in one assignment; when the ring
  changed it also wakes the keeper below, so routes follow the ring at once;
* its own task, :meth:`Datapath.run`: opens the TUN and the sleeve socket (a failure there stops the
  daemon with one line), starts the packet loop (:mod:`weaved.adapters.sleeve`), gets the node's gateway
  address from IPAM (waiting, with retries, until IPAM is ready), then keeps the node network
  (:mod:`weaved.adapters.nodenet`) in place: every :data:`CHECK_INTERVAL` seconds, or at once after a ring
  change, it compares the kernel with what it should be and repairs what differs (logged). The kernel
  calls are blocking and run in a worker thread.

On exit only the daemon's own descriptors are closed: the bridge, the (persistent) TUN, routes, sysctls and
the nft table stay, so pods keep their addresses and routes while the daemon restarts. The pod MTU is the
underlay's minus :data:`weaved.core.superframe.OVERHEAD` (and with a password minus the seal,
:data:`weaved.core.sleeveseal.OVERHEAD`) unless ``WEAVE_MTU`` sets it. With a password every frame to a
neighbour in :meth:`~weaved.core.mesh.MeshPeer.sleeve_keys` is sealed (:mod:`weaved.core.sleeveseal`);
:meth:`Datapath.refresh` rebuilds the table when those keys change (every rekey).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from pyroute2 import IPRoute

from weaved.adapters.datapath_report import DatapathReport
from weaved.adapters.ipam import IpamService
from weaved.adapters.nodenet import BRIDGE, TUN, Desired, NodeNetError, NodeNetwork, underlay_mtu
from weaved.adapters.sleeve import PacketLoop, ThreadedLoop, open_sleeve_socket
from weaved.adapters.sleeve_offload import OffloadLoop
from weaved.adapters.tun import TunError, open_tun
from weaved.config import Settings
from weaved.core import forwarding, sleeve, superframe
from weaved.core.ipam.allocator import AllocError
from weaved.core.mesh import MeshPeer
from weaved.core.types import Endpoint, PeerName
from weaved.podnet import PodNetwork

CHECK_INTERVAL = 5.0
"""Seconds between checks that the node network is still in place (and repairs when it is not)."""
GATEWAY_RETRY = 2.0
"""Seconds between attempts to get the gateway address while IPAM is not ready."""


def own_chunk_size(underlay_mtu: int | None) -> int:
    """The biggest chunk (UDP payload) our underlay carries in one packet: what we advertise and send."""
    return (underlay_mtu or 1500) - sleeve.IPV4_HEADER - sleeve.UDP_HEADER


def advertised_chunk() -> int:
    """:func:`own_chunk_size` of this namespace's underlay, read before the daemon starts (for its HELLO)."""
    try:
        with IPRoute() as ipr:
            return own_chunk_size(underlay_mtu(ipr))
    except Exception:  # netlink unavailable: the data path start will say so in one line
        return own_chunk_size(None)


class DatapathError(Exception):
    """The data path cannot start (TUN, socket); ``str()`` is one line."""


class Datapath:
    """See the module docstring. One per daemon; only built when ``settings.datapath`` is on."""

    def __init__(self, settings: Settings, peer: MeshPeer, ipam: IpamService, *,
                 network: NodeNetwork | None = None,
                 loop_factory: Callable[[int, socket.socket], PacketLoop] | None = None) -> None:
        self._settings = settings
        self._peer = peer
        self._ipam = ipam
        self._network = network if network is not None else NodeNetwork()
        self._loop_factory = loop_factory
        self._log = structlog.get_logger("weaved")
        self._loop: PacketLoop | None = None
        self._key: tuple[Any, ...] | None = None
        self._sleeve_keys: object = None
        self._ring_state: object = None
        self._changed = anyio.Event()
        self._gateway: ipaddress.IPv4Interface | None = None
        self._pod_network: PodNetwork | None = None
        self._mtu: int | None = None
        self._underlay_mtu: int | None = None
        self._routes = 0
        self._error: str | None = None
        self.counters: dict[str, int] = {}
        """Changes made to the node network after it was first set up (``network_changes``: repairs and route
        updates) and failed rounds (``network_errors``)."""

    # --- read side --------------------------------------------------------------------------------

    def pod_network(self) -> PodNetwork | None:
        """The bridge, gateway and MTU for pod interfaces; None until the bridge holds the gateway."""
        return self._pod_network

    def report(self) -> DatapathReport:
        loop = self._loop
        counters = {**(loop.counters() if loop is not None else {}), **self.counters}
        state = f"error: {self._error}" if self._error else ("ready" if self._pod_network else "starting")
        return DatapathReport(
            state=state, bridge=BRIDGE, tun=TUN, gateway=str(self._gateway) if self._gateway else None,
            mtu=self._mtu, underlay_mtu=self._underlay_mtu, sleeve_port=self._settings.sleeve_port,
            peers=loop.table.peers if loop is not None else 0, routes=self._routes, counters=counters,
            mode="offload" if self._settings.offload else "plain",
            offload_peers=len(loop.table.chunk_limits) if loop is not None and self._settings.offload else 0,
            hot_loop="C" if isinstance(loop, OffloadLoop) and loop.native else "python",
            encrypted=self._encrypted, sealed_peers=len(loop.table.keys) if loop is not None else 0,
        )

    # --- pump side --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rebuild the forwarding snapshot when its inputs changed (cheap when they did not)."""
        loop = self._loop
        if loop is None:
            return
        topology = self._peer.topology
        ring_state = self._ipam.allocator.ring.state
        neighbours = self._peer.neighbours()
        sleeve_keys = self._peer.sleeve_keys()  # new at every rekey: the table (and the pump's keys) follow
        key = (topology.generation, id(ring_state), neighbours)
        if key == self._key and ring_state is self._ring_state and sleeve_keys == self._sleeve_keys:
            return
        sleeve_addresses: dict[PeerName, Endpoint] = {}
        chunk_limits: dict[PeerName, int] = {}
        for name, (control, overlays) in neighbours.items():
            address = forwarding.sleeve_address(control, overlays)
            if address is not None:
                sleeve_addresses[name] = address
                chunk_limits[name] = superframe.chunk_limit(overlays)
        loop.table = forwarding.build(self._peer.identity.name, topology.short_ids(), ring_state.segments(),
                                      topology.next_hops(), sleeve_addresses, chunk_limits, sleeve_keys)
        if ring_state is not self._ring_state:
            self._changed.set()
        self._key, self._ring_state, self._sleeve_keys = key, ring_state, sleeve_keys

    @property
    def _encrypted(self) -> bool:
        return self._peer.encrypted

    # --- the task ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the devices, start the packet loop, then keep the node network in place until cancelled."""
        offload = self._settings.offload
        try:
            self._underlay_mtu = await anyio.to_thread.run_sync(self._network.underlay_mtu)
            tun_fd = open_tun(TUN, offload=offload)
        except TunError as exc:
            raise DatapathError(f"{exc}; --no-datapath runs the control plane alone") from None
        try:
            sock = open_sleeve_socket(self._settings.host, self._settings.sleeve_port)
        except OSError as exc:
            os.close(tun_fd)
            raise DatapathError(f"cannot bind sleeve UDP {self._settings.host}:{self._settings.sleeve_port}: "
                                f"{exc.strerror or exc}") from None
        own_chunk = own_chunk_size(self._underlay_mtu)
        if self._loop_factory is not None:
            loop = self._loop = self._loop_factory(tun_fd, sock)
        elif offload:
            loop = self._loop = OffloadLoop(tun_fd, sock, own_chunk=own_chunk, native=self._settings.native)
        else:
            loop = self._loop = ThreadedLoop(tun_fd, sock)
        try:
            loop.start()
            self.refresh()
            task_status.started()
            hot_loop = "C" if isinstance(loop, OffloadLoop) and loop.native else "Python"
            self._log.info("sleeve started", tun=TUN, port=self._settings.sleeve_port,
                           mode=f"offload (vnet, TSO, UDP GSO/GRO, chunks of {own_chunk} B, {hot_loop} hot loop)"
                           if offload else "plain (one packet per datagram)")
            self._gateway = await self._await_gateway()
            while True:
                await self._keep()
                with anyio.move_on_after(CHECK_INTERVAL):
                    await self._changed.wait()
                self._changed = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(loop.stop)
            sock.close()
            loop.close()

    async def _await_gateway(self) -> ipaddress.IPv4Interface:
        logged = False
        while True:
            try:
                lease = await self._ipam.gateway()
            except AllocError as exc:
                if not logged:
                    self._log.info("waiting for the gateway address", reason=str(exc), retry_every=GATEWAY_RETRY)
                    logged = True
                await anyio.sleep(GATEWAY_RETRY)
                continue
            gateway = ipaddress.IPv4Interface(self._ipam.cidr(lease))
            self._log.info("gateway address", address=str(gateway))
            return gateway

    def _desired(self, gateway: ipaddress.IPv4Interface, mtu: int) -> Desired:
        ring = self._ipam.allocator.ring
        own = self._peer.identity.name
        segments = ring.state.segments()
        local = [n for start, end in ring.owned_ranges()
                 for n in ipaddress.summarize_address_range(ipaddress.IPv4Address(start),
                                                            ipaddress.IPv4Address(end - 1))]
        return Desired(range=gateway.network, gateway=gateway, mtu=mtu,
                       remote=tuple(forwarding.remote_networks(segments, own)), local=tuple(local),
                       no_masq_local=self._settings.no_masq_local,
                       # The formula the CNI plugin gives pod veths (it knows nothing of the seal): a TUN
                       # limit below the pods' would make the kernel segment their super-packets in software.
                       # A sealed frame of the last chunk too many leaves in two sends instead.
                       tun_gso_max_size=superframe.tun_gso_max_size(mtu) if self._settings.offload else None)

    def _reattach_if_gone(self) -> list[str]:
        """Someone deleted ``weave-tun``: create it again and hand the packet loop the new descriptor."""
        if self._loop is None or self._network.tun_present():
            return []
        self._loop.reattach(open_tun(TUN, offload=self._settings.offload))
        return [f"re-created {TUN}"]

    async def _keep(self) -> None:
        """One check-and-repair round of the node network (in a worker thread)."""
        assert self._gateway is not None
        try:
            if self._mtu is None:
                if self._underlay_mtu is None:
                    self._underlay_mtu = await anyio.to_thread.run_sync(self._network.underlay_mtu)
                sealed = self._encrypted
                self._mtu = self._settings.mtu or superframe.pod_mtu(self._underlay_mtu, sealed=sealed)
                self._log.info("pod mtu", mtu=self._mtu, underlay_mtu=self._underlay_mtu,
                               source="WEAVE_MTU" if self._settings.mtu else
                               "underlay - sleeve overhead" + (" - seal" if sealed else ""))
            desired = self._desired(self._gateway, self._mtu)
            reattached = await anyio.to_thread.run_sync(self._reattach_if_gone)
            changes = await anyio.to_thread.run_sync(self._network.ensure, desired)
            changes = [*reattached, *changes]
            present = await anyio.to_thread.run_sync(self._network.gateway_present, self._gateway)
        except (NodeNetError, TunError, OSError) as exc:
            self.counters["network_errors"] = self.counters.get("network_errors", 0) + 1
            message = str(exc)
            if message != self._error:
                self._log.error("node network", error=message, retry_in=CHECK_INTERVAL)
            self._error = message
            return
        if self._error is not None:
            self._log.info("node network repaired")
        self._error = None
        self._routes = len(desired.remote)
        if changes:
            first = self._pod_network is None
            if not first:
                self.counters["network_changes"] = self.counters.get("network_changes", 0) + 1
            self._log.info("node network " + ("set up" if first else "changed"), changes="; ".join(changes))
        self._pod_network = PodNetwork(BRIDGE, self._gateway, self._mtu) if present else None
