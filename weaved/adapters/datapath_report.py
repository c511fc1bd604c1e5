"""The data path part of ``/report``: plain data the API serves, the CLI rebuilds, and status renders.

Kept apart from :mod:`weaved.adapters.datapath` (which needs pyroute2 and the kernel) so that the client
commands can read it without those imports. Counters use stable names: ``tx_packets``/``tx_bytes`` (TUN →
sleeve), ``rx_packets``/``rx_bytes`` (sleeve → TUN), ``relayed_packets``/``relayed_bytes``, and
``drop_tun_<reason>`` / ``drop_udp_<reason>`` with the reasons of :data:`weaved.core.sleeve.DROP_REASONS`.
The offload loop adds ``tx_superpackets``/``tx_chunks`` and ``rx_superpackets``/``rx_chunks`` (TSO
super-packets and the chunks they travelled in), ``rx_partial_runs`` (parts of frames that arrived
incomplete, delivered with fixed-up headers) and ``tx_segmented`` (super-packets cut up in userspace for
a peer without offloads). With a password: ``tx_sealed``/``rx_sealed`` (datagrams sealed and opened) and the
drop reasons ``auth``, ``replay``, ``unsealed`` (:mod:`weaved.core.sleeveseal`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DROP_TUN_PREFIX = "drop_tun_"
DROP_UDP_PREFIX = "drop_udp_"


@dataclass(frozen=True)
class DatapathReport:
    """The data path section of ``/report`` and ``weaved status``."""

    state: str
    """``starting`` (no gateway on the bridge yet), ``ready`` or ``error: ...`` (the last check failed)."""
    bridge: str
    tun: str
    gateway: str | None
    mtu: int | None
    underlay_mtu: int | None
    sleeve_port: int
    peers: int
    """Remote peers the forwarding table has a route to."""
    routes: int
    """Kernel routes into the TUN."""
    counters: dict[str, int]
    mode: str = "plain"
    """``offload`` (virtio headers, TSO, UDP GSO/GRO) or ``plain`` (one packet per datagram)."""
    offload_peers: int = 0
    """Neighbours that negotiated version-2 frames (``sleeve-gso``); the others get plain frames."""
    hot_loop: str = "python"
    """``C`` when the offload sleeve's C pump carries the common cases, else ``python``."""
    encrypted: bool = False
    """A password is set: frames to neighbours we share sleeve keys with are sealed."""
    sealed_peers: int = 0
    """Neighbours whose frames are sealed (the others are on trusted subnets, or have not finished a
    handshake yet)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatapathReport:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def drops(self) -> dict[str, int]:
        """Dropped packets by ``direction/reason`` (``tun/unowned``, ``udp/bad-magic`` …)."""
        out: dict[str, int] = {}
        for key, value in self.counters.items():
            for prefix, direction in ((DROP_TUN_PREFIX, "tun"), (DROP_UDP_PREFIX, "udp")):
                if key.startswith(prefix):
                    out[f"{direction}/{key[len(prefix):]}"] = value
        return dict(sorted(out.items()))
