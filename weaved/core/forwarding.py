"""The sleeve's forwarding table: one immutable lookup structure built from the IPAM ring and the mesh.

Theory of operation
-------------------
The data path answers three questions per packet, and this module precomputes the answers whenever the
control plane changes, so that the hot loop only does a binary search and a dictionary lookup:

* *a packet from our TUN for address A*: which peer owns A (the ring's segments), what is its short id,
  and to which UDP address do we send it (the sleeve address of our mesh next hop towards the owner)?
  Each ring segment carries its answer (:data:`Route`) or the reason it has none (``own-range``,
  ``no-route``, ``unknown-destination``); addresses outside every segment are ``unowned``;
* *a frame from UDP address S*: is S the sleeve address of an established neighbour (``senders``)?
* *a frame for short id D that is not ours*: where do we relay it (``relay``)?
* *a frame from short id S for short id D*: does S own the inner packet's source address and D its
  destination (:meth:`ForwardingTable.owner`)? Nothing else stops a datagram that passes the sender check
  from putting a packet with any source into any pod (``spoofed-source``, ``spoofed-destination``). A
  peer's gateway address comes from its own range, so the node's own traffic passes.

Short ids are 12 bits and unique once the topology settled; while two peers share one (a collision the
mesh is still resolving) neither is routable, so a packet is dropped rather than delivered to the wrong
peer.

:func:`build` is a pure function of its inputs and :class:`ForwardingTable` is frozen: the adapter swaps
the whole table in one reference assignment, so the packet threads never see half an update.
:func:`remote_networks` gives the kernel routes that send other peers' addresses into the TUN.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weaved.core.seal import PeerSleeveKeys
from weaved.core.sleeve import FrameError
from weaved.core.types import Endpoint, PeerName

Address = tuple[str, int]
"""A UDP address as the socket layer gives and takes it: ``(ip, port)``."""
Route = tuple[int, Address]
"""``(destination short id, next hop's sleeve address)``."""


@dataclass(frozen=True)
class ForwardingTable:
    """Everything the packet threads look up; see the module docstring. Built by :func:`build`."""

    own_short_id: int
    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    routes: tuple[Route | str, ...] = ()
    """Per segment: where packets for it go, or the drop reason."""
    relay: Mapping[int, Address] = field(default_factory=dict)
    """Next hop's sleeve address for every routable remote short id."""
    known: frozenset[int] = frozenset()
    """Short ids of peers we know unambiguously (ours included): a frame's ``src`` must be one."""
    senders: frozenset[Address] = frozenset()
    """Sleeve addresses of established neighbours: the only UDP sources we accept frames from."""
    peers: int = 0
    """Remote peers with a route (for status)."""
    chunk_limits: Mapping[Address, int] = field(default_factory=dict)
    """Neighbours' sleeve addresses → the version-2 chunk size they take (``sleeve-gso:SIZE``); a neighbour
    missing here speaks version 1 only (one whole packet per datagram)."""

    keys: Mapping[Address, PeerSleeveKeys] = field(default_factory=dict)
    """Neighbours' sleeve addresses → the keys every frame to and from them is sealed with
    (:mod:`weaved.core.sleeveseal`); a neighbour missing here exchanges plain frames."""
    owner_starts: tuple[int, ...] = ()
    owner_ends: tuple[int, ...] = ()
    owner_ids: tuple[int, ...] = ()
    """The ring by owner: ``[owner_starts[i], owner_ends[i])`` belongs to short id ``owner_ids[i]`` (only
    owners whose short id is unambiguous; adjacent pieces of one owner merged)."""

    def lookup(self, address: int) -> Route | str:
        """Where to send a packet for ``address`` from our TUN, or why it is dropped."""
        i = bisect_right(self.starts, address) - 1
        if i < 0 or address >= self.ends[i]:
            return "unowned"
        return self.routes[i]

    def owner(self, address: int) -> int:
        """The short id of the peer that owns ``address`` in the ring, -1 when none (or an ambiguous one)."""
        i = bisect_right(self.owner_starts, address) - 1
        if i < 0 or address >= self.owner_ends[i]:
            return -1
        return self.owner_ids[i]

    def check_inner(self, buf: bytes | bytearray | memoryview, ip: int, src: int, dst: int) -> None:
        """Raise :class:`~weaved.core.sleeve.FrameError` unless the IPv4 packet at ``ip`` (its 20-byte header
        already checked to be there) comes from an address short id ``src`` owns and goes to one ``dst`` owns."""
        if self.owner(int.from_bytes(buf[ip + 12:ip + 16], "big")) != src:
            raise FrameError("spoofed-source")
        # An unknown dst is dropped as such by the relay step; ours is checked even while ambiguous.
        if (dst in self.known or dst == self.own_short_id) and self.owner(
                int.from_bytes(buf[ip + 16:ip + 20], "big")) != dst:
            raise FrameError("spoofed-destination")


EMPTY = ForwardingTable(own_short_id=0)
"""The table before the control plane told us anything: every packet is dropped as ``unowned``."""


def build(own: PeerName, short_ids: Mapping[PeerName, int], segments: Iterable[tuple[int, int, PeerName]],
          next_hops: Mapping[PeerName, PeerName], sleeve_addresses: Mapping[PeerName, Endpoint],
          chunk_limits: Mapping[PeerName, int] | None = None,
          sleeve_keys: Mapping[PeerName, PeerSleeveKeys] | None = None) -> ForwardingTable:
    """The table for one view of the world.

    ``short_ids``: every peer in the topology (ours included) → its short id. ``segments``: the ring's
    ordered ``(start, end, owner)`` pieces. ``next_hops``: the mesh's unicast next hop per reachable peer.
    ``sleeve_addresses``: established neighbours → the UDP address of their sleeve socket.
    ``chunk_limits``: neighbours that take version-2 frames → their chunk size. ``sleeve_keys``: neighbours
    whose frames are sealed → their keys (the mesh's :meth:`~weaved.core.mesh.MeshPeer.sleeve_keys`).
    """
    counts = Counter(short_ids.values())
    unique = {name: sid for name, sid in short_ids.items() if counts[sid] == 1}
    own_short = short_ids.get(own, 0)

    def hop_address(peer: PeerName) -> Address | None:
        hop = next_hops.get(peer)
        endpoint = sleeve_addresses.get(hop) if hop is not None else None
        return (endpoint.host, endpoint.port) if endpoint is not None else None

    relay: dict[int, Address] = {}
    for name, sid in unique.items():
        if name != own and (address := hop_address(name)) is not None:
            relay[sid] = address

    starts: list[int] = []
    ends: list[int] = []
    routes: list[Route | str] = []
    owned: list[list[int]] = []  # [start, end, short id]
    for start, end, owner in segments:
        if (owner_id := unique.get(owner)) is not None:
            if owned and owned[-1][1] == start and owned[-1][2] == owner_id:
                owned[-1][1] = end
            else:
                owned.append([start, end, owner_id])
        route: Route | str
        if owner == own:
            route = "own-range"
        elif owner not in unique:
            route = "unknown-destination"
        elif (address := relay.get(unique[owner])) is None:
            route = "no-route"
        else:
            route = (unique[owner], address)
        if starts and ends[-1] == start and routes[-1] == route:
            ends[-1] = end  # adjacent pieces with one answer: one entry, a shorter search
            continue
        starts.append(start)
        ends.append(end)
        routes.append(route)
    return ForwardingTable(
        own_short_id=own_short, starts=tuple(starts), ends=tuple(ends), routes=tuple(routes), relay=relay,
        known=frozenset(unique.values()),
        senders=frozenset((e.host, e.port) for e in sleeve_addresses.values()),
        peers=len(relay),
        keys={(e.host, e.port): keys for name, e in sleeve_addresses.items()
              if (keys := (sleeve_keys or {}).get(name)) is not None},
        owner_starts=tuple(o[0] for o in owned), owner_ends=tuple(o[1] for o in owned),
        owner_ids=tuple(o[2] for o in owned),
        chunk_limits={(e.host, e.port): limit for name, e in sleeve_addresses.items()
                      if (limit := (chunk_limits or {}).get(name, 0)) > 0},
    )


def remote_networks(segments: Iterable[tuple[int, int, PeerName]], own: PeerName) -> list[ipaddress.IPv4Network]:
    """The CIDRs covering every address another peer owns: the kernel routes them into the TUN.

    Adjacent pieces are merged before they are cut into CIDRs, so a ring of a few tokens gives a few
    routes. Our own addresses get none: they are on the bridge (its connected route covers the range).
    """
    merged: list[tuple[int, int]] = []
    for start, end, owner in segments:
        if owner == own:
            continue
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    networks: list[ipaddress.IPv4Network] = []
    for start, end in merged:
        networks += ipaddress.summarize_address_range(ipaddress.IPv4Address(start), ipaddress.IPv4Address(end - 1))
    return networks


SLEEVE_OVERLAY = "sleeve"
SLEEVE_PORT_OFFSET = 2
"""A peer that advertises a bare ``sleeve`` overlay listens for frames on its control port + 2 (6785)."""


def sleeve_overlay(port: int) -> str:
    """What we advertise in HELLO's overlays: ``sleeve:PORT``."""
    return f"{SLEEVE_OVERLAY}:{port}"


def sleeve_address(control: Endpoint, overlays: Iterable[str]) -> Endpoint | None:
    """A neighbour's sleeve address from its control address and advertised overlays.

    ``sleeve:PORT`` names the port; a bare ``sleeve`` (an older peer) means control port +
    :data:`SLEEVE_PORT_OFFSET`; no sleeve overlay at all means the peer carries no data (None). A
    malformed port is treated as absent rather than guessed.
    """
    for overlay in overlays:
        name, sep, port_text = overlay.partition(":")
        if name != SLEEVE_OVERLAY:
            continue
        if not sep:
            port = control.port + SLEEVE_PORT_OFFSET
            return Endpoint(control.host, port) if port < 65536 else None
        if port_text.isdigit() and 0 < int(port_text) < 65536:
            return Endpoint(control.host, int(port_text))
        return None
    return None
