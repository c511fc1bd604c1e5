"""Text views of a :class:`~weaved.core.status.MeshStatus` and an
:class:`~weaved.adapters.ipam_report.IpamReport`, shaped like ``weave status``.

Pure functions from a snapshot to text: the HTTP API serves them and the CLI prints them after fetching
``/report``, so both show the same thing. Operators who know Weave Net's output (and scripts that grep it)
find the same labels, the same right-aligned columns, the same ``<-``/``->`` arrows and the same
``- unreachable!`` marks.
"""

from __future__ import annotations

from collections import Counter

from weaved.adapters.datapath_report import DatapathReport
from weaved.adapters.ipam_report import IpamReport
from weaved.core.status import ConnectionStatus, MeshStatus, PeerConnectionStatus

CONNECTION_STATE_ORDER = ("established", "pending", "connecting", "retrying", "failed")
"""Order of the per-state counts in the ``Connections:`` line: healthy first, like Weave."""

_LABEL_WIDTH = 15
_ADDRESS_WIDTH = 21
_STATE_WIDTH = 11
_PEER_WIDTH = 36
_OWNER_WIDTH = 35
"""``name(nickname)`` column of ``weaved status ipam``: a peer name and a short nickname fit."""


def label(name: str | None, nickname: str | None) -> str:
    """Weave's ``name(nickname)``; the bare name when the nickname is unknown, ``?`` when both are."""
    if name is None:
        return "?"
    return f"{name}({nickname})" if nickname else name


def _arrow(outbound: bool) -> str:
    return "->" if outbound else "<-"


def connection_counts(connections: list[ConnectionStatus]) -> str:
    """``2 established, 1 failed``: non-zero states only, in :data:`CONNECTION_STATE_ORDER`."""
    counts = Counter(c.state for c in connections)
    known = [s for s in CONNECTION_STATE_ORDER if counts[s]]
    other = sorted(s for s in counts if s not in CONNECTION_STATE_ORDER)
    return ", ".join(f"{counts[s]} {s}" for s in known + other)


def established_peer_connections(status: MeshStatus) -> int:
    """Established connections over every peer's published list (each link counts once per end)."""
    return sum(1 for p in status.peers for c in p.connections if c.established)


def render_status(status: MeshStatus, version: str, ipam: IpamReport | None = None,
                  datapath: DatapathReport | None = None) -> str:
    """The ``weave status`` summary: the router service, then the ipam service when there is one."""
    rows: list[tuple[str, str]] = [("Version", version), ("", "")]
    conns = f"{len(status.connections)}"
    if counts := connection_counts(status.connections):
        conns += f" ({counts})"
    peers = f"{len(status.peers)}"
    if established := established_peer_connections(status):
        peers += f" (with {established} established connections)"
    rows += [
        ("Service", "router"),
        ("Protocol", status.protocol),
        ("Name", label(status.name, status.nickname)),
        ("Encryption", status.encryption),
        ("PeerDiscovery", "enabled"),
        ("Targets", str(len(status.targets))),
        ("Connections", conns),
        ("Peers", peers),
        ("TrustedSubnets", ",".join(status.trusted_subnets) or "none"),
    ]
    if ipam is not None:
        rows += [
            ("", ""),
            ("Service", "ipam"),
            ("Status", ipam.state),
            ("Range", ipam.range),
            ("DefaultSubnet", ipam.default_subnet),
        ]
    if datapath is not None:
        rows += [("", ""), *datapath_rows(datapath)]
    return "".join(f"{key:>{_LABEL_WIDTH}}: {value}\n" if key else "\n" for key, value in rows)


def datapath_rows(report: DatapathReport) -> list[tuple[str, str]]:
    """The ``Service: datapath`` block: state, devices, MTU, traffic and drops by reason."""
    c = report.counters
    drops = report.drops()
    mtu = f"{report.mtu} (underlay {report.underlay_mtu})" if report.mtu is not None else "-"
    return [
        ("Service", "datapath"),
        ("Status", report.state),
        ("Sleeve", f"UDP {report.sleeve_port}, {report.tun}, {report.peers} peers routed, {report.routes} routes"),
        ("Bridge", f"{report.bridge} {report.gateway or '-'}"),
        ("MTU", mtu),
        ("Sent", f"{c.get('tx_packets', 0)} packets, {c.get('tx_bytes', 0)} bytes"),
        ("Received", f"{c.get('rx_packets', 0)} packets, {c.get('rx_bytes', 0)} bytes"),
        ("Relayed", f"{c.get('relayed_packets', 0)} packets, {c.get('relayed_bytes', 0)} bytes"),
        ("Mode", f"{report.mode}" + (f", {report.hot_loop} hot loop, {report.offload_peers} of {report.peers} "
                                      "neighbours negotiated offload" if report.mode == "offload" else "")),
        ("Super-packets", f"sent {c.get('tx_superpackets', 0)} in {c.get('tx_chunks', 0)} chunks, received "
                          f"{c.get('rx_superpackets', 0)} in {c.get('rx_chunks', 0)} chunks, "
                          f"{c.get('rx_partial_runs', 0)} incomplete-frame runs, "
                          f"{c.get('tx_segmented', 0)} segmented for plain peers"),
        ("Encryption", (f"{report.sealed_peers} of {report.peers} neighbours sealed (AES-256-GCM), "
                        f"{c.get('tx_sealed', 0)} datagrams sealed, {c.get('rx_sealed', 0)} opened")
         if report.encrypted else "none"),
        ("Dropped", ", ".join(f"{k} {v}" for k, v in drops.items()) or "0"),
    ]


def render_connections(status: MeshStatus) -> str:
    """One line per connection or failed attempt: direction, address, state, who, why."""
    lines = []
    for c in status.connections:
        who = label(c.peer_name, c.peer_nickname) if c.peer_name else ""
        detail = " ".join(part for part in (who, c.info) if part)
        lines.append(f"{_arrow(c.outbound)} {c.address:<{_ADDRESS_WIDTH}} {c.state:<{_STATE_WIDTH}} {detail}".rstrip())
    return "".join(line + "\n" for line in lines)


def _peer_connection_line(c: PeerConnectionStatus) -> str:
    state = "established" if c.established else "pending"
    who = label(c.remote_name, c.remote_nickname)
    return f"   {_arrow(c.outbound)} {c.address:<{_ADDRESS_WIDTH}} {who:<{_PEER_WIDTH}} {state}"


def render_peers(status: MeshStatus) -> str:
    """Every peer of the topology with the connections it publishes."""
    lines = []
    for p in status.peers:
        lines.append(label(p.name, p.nickname))
        lines.extend(_peer_connection_line(c) for c in p.connections)
    return "".join(line + "\n" for line in lines)


def render_targets(status: MeshStatus) -> str:
    """One address per line, as ``weave status targets`` prints them."""
    return "".join(t + "\n" for t in status.targets)


def render_ipam(report: IpamReport) -> str:
    """``weave status ipam``: one line per owner, largest first, with our leases and the owners the mesh
    does not reach marked; before the ring exists, the reason allocations wait."""
    if not report.owners:
        return report.state + "\n"
    lines = []
    for owner in report.owners:
        line = f"{label(owner.name, owner.nickname):<{_OWNER_WIDTH}} {owner.addresses:>8} IPs " \
               f"({owner.percent:.1f}% of total)"
        if owner.active is not None:
            line += f" ({owner.active} active)"
        if not owner.reachable:
            line += " - unreachable!"
        lines.append(line)
    return "".join(line + "\n" for line in lines)


IPAM_VIEW = "ipam"
"""``weaved status ipam``: rendered from the report's IPAM part, not from the mesh snapshot."""

VIEWS = {
    "peers": render_peers,
    "connections": render_connections,
    "targets": render_targets,
}
"""The ``weaved status <view>`` sub-views, by name."""
