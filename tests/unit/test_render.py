"""Text views of a hand-built status snapshot, compared with the exact expected text."""

from __future__ import annotations

import dataclasses

from weaved.adapters.ipam_report import IpamOwner, IpamReport
from weaved.core.status import ConnectionStatus, MeshStatus, PeerConnectionStatus, PeerStatus
from weaved.render import (
    VIEWS,
    connection_counts,
    label,
    render_connections,
    render_ipam,
    render_peers,
    render_status,
    render_targets,
)

N0, N1, N2 = "42:8e:e8:c4:52:1b", "7e:21:4a:70:2f:45", "7e:ae:cd:d5:23:8d"


def snapshot() -> MeshStatus:
    peers = [
        PeerStatus(N0, "node-0", 11, 5, 1, [
            PeerConnectionStatus(N1, "node-1", "10.0.0.12:6783", False, True),
            PeerConnectionStatus(N2, "node-2", "10.0.0.13:6783", True, True),
        ], None),
        PeerStatus(N1, "node-1", 12, 3, 2, [
            PeerConnectionStatus(N0, "node-0", "10.0.0.11:6783", True, True),
            PeerConnectionStatus(N2, None, "10.0.0.13:6783", True, False),
        ], N1),
        PeerStatus(N2, "node-2", 13, 4, 3, [
            PeerConnectionStatus(N0, "node-0", "10.0.0.11:6783", False, True),
        ], N0),
    ]
    connections = [
        ConnectionStatus("10.0.0.12:6783", False, "established", N1, "node-1", "protocol 1"),
        ConnectionStatus("10.0.0.13:6783", True, "established", N2, "node-2", "protocol 1"),
        ConnectionStatus("10.0.0.14:6783", True, "failed", None, None, "no answer to handshake, retry in 4.1s"),
        ConnectionStatus("10.0.0.15:6783", True, "connecting", None, None, ""),
    ]
    return MeshStatus(N0, "node-0", 11, 1, "weaved 1..1", 6783, 200, peers, connections,
                      ["10.0.0.13:6783", "10.0.0.14:6783", "10.0.0.15:6783"], {"rx_datagrams": 3})


def test_status_summary_matches_weave_layout() -> None:
    assert render_status(snapshot(), "0.1.0") == (
        "        Version: 0.1.0\n"
        "\n"
        "        Service: router\n"
        "       Protocol: weaved 1..1\n"
        "           Name: 42:8e:e8:c4:52:1b(node-0)\n"
        "     Encryption: disabled\n"
        "  PeerDiscovery: enabled\n"
        "        Targets: 3\n"
        "    Connections: 4 (2 established, 1 connecting, 1 failed)\n"
        "          Peers: 3 (with 4 established connections)\n"
        " TrustedSubnets: none\n"
    )


def test_status_of_a_lone_peer_has_no_empty_parentheses() -> None:
    alone = dataclasses.replace(snapshot(), peers=[dataclasses.replace(snapshot().peers[0], connections=[])],
                                connections=[], targets=[])
    text = render_status(alone, "0.1.0")
    assert "    Connections: 0\n" in text
    assert "          Peers: 1\n" in text
    assert "        Targets: 0\n" in text


def test_connections_view() -> None:
    assert render_connections(snapshot()) == (
        "<- 10.0.0.12:6783        established 7e:21:4a:70:2f:45(node-1) protocol 1\n"
        "-> 10.0.0.13:6783        established 7e:ae:cd:d5:23:8d(node-2) protocol 1\n"
        "-> 10.0.0.14:6783        failed      no answer to handshake, retry in 4.1s\n"
        "-> 10.0.0.15:6783        connecting\n"
    )


def test_peers_view_lists_each_peer_with_its_published_connections() -> None:
    assert render_peers(snapshot()) == (
        "42:8e:e8:c4:52:1b(node-0)\n"
        "   <- 10.0.0.12:6783        7e:21:4a:70:2f:45(node-1)            established\n"
        "   -> 10.0.0.13:6783        7e:ae:cd:d5:23:8d(node-2)            established\n"
        "7e:21:4a:70:2f:45(node-1)\n"
        "   -> 10.0.0.11:6783        42:8e:e8:c4:52:1b(node-0)            established\n"
        "   -> 10.0.0.13:6783        7e:ae:cd:d5:23:8d                    pending\n"
        "7e:ae:cd:d5:23:8d(node-2)\n"
        "   <- 10.0.0.11:6783        42:8e:e8:c4:52:1b(node-0)            established\n"
    )


def test_targets_view_is_one_address_per_line() -> None:
    assert render_targets(snapshot()) == "10.0.0.13:6783\n10.0.0.14:6783\n10.0.0.15:6783\n"
    assert render_targets(dataclasses.replace(snapshot(), targets=[])) == ""


def test_connection_counts_put_unknown_states_last() -> None:
    conns = [ConnectionStatus("10.0.0.1:1", True, s, None, None, "") for s in ("zombie", "failed", "pending", "failed")]
    assert connection_counts(conns) == "1 pending, 2 failed, 1 zombie"
    assert connection_counts([]) == ""


def test_labels() -> None:
    assert label(N0, "node-0") == f"{N0}(node-0)"
    assert label(N0, None) == N0
    assert label(None, None) == "?"


def test_views_survive_a_json_round_trip() -> None:
    """The CLI renders what it rebuilt from /report: the text must not change on the way."""
    original = snapshot()
    rebuilt = MeshStatus.from_json(original.to_json())
    for view in VIEWS.values():
        assert view(rebuilt) == view(original)
    assert render_status(rebuilt, "x") == render_status(original, "x")


def ipam_report(**changes: object) -> IpamReport:
    report = IpamReport(
        state="ready", range="10.32.0.0/12", default_subnet="10.32.0.0/12", size=1 << 20, owned=524288,
        free=524275, leases=12, pending=0,
        owners=[
            IpamOwner(N0, "node-0", 524288, 50.0, True, 12),
            IpamOwner(N1, "node-1", 393216, 37.5, True, None),
            IpamOwner(N2, None, 131072, 12.5, False, None),
        ],
        rejected={"ring-entry-in-my-range": 1}, counters={"dropped_too-large": 2},
    )
    return dataclasses.replace(report, **changes)  # type: ignore[arg-type]


def test_status_summary_adds_the_ipam_service_like_weave() -> None:
    text = render_status(snapshot(), "0.1.0", ipam_report(state="awaiting consensus (quorum 2, known 1)"))
    assert text == render_status(snapshot(), "0.1.0") + (
        "\n"
        "        Service: ipam\n"
        "         Status: awaiting consensus (quorum 2, known 1)\n"
        "          Range: 10.32.0.0/12\n"
        "  DefaultSubnet: 10.32.0.0/12\n"
    )


def test_ipam_view_lists_owners_with_our_leases_and_unreachable_marks() -> None:
    assert render_ipam(ipam_report()) == (
        "42:8e:e8:c4:52:1b(node-0)             524288 IPs (50.0% of total) (12 active)\n"
        "7e:21:4a:70:2f:45(node-1)             393216 IPs (37.5% of total)\n"
        "7e:ae:cd:d5:23:8d                     131072 IPs (12.5% of total) - unreachable!\n"
    )


def test_ipam_view_before_the_ring_exists_says_why_allocations_wait() -> None:
    waiting = ipam_report(state="awaiting consensus (quorum 2, known 1)", owners=[], owned=0, free=0, leases=0)
    assert render_ipam(waiting) == "awaiting consensus (quorum 2, known 1)\n"


def test_ipam_report_survives_a_json_round_trip() -> None:
    original = ipam_report()
    rebuilt = IpamReport.from_json(original.to_json())
    assert rebuilt == original
    assert render_ipam(rebuilt) == render_ipam(original)
    assert original.unreachable_percent == 12.5
