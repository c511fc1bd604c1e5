"""Data path settings, the nft ruleset, the status/metrics views of the data path, and sleeve addresses from
the mesh (the overlays a neighbour advertised reach :meth:`MeshPeer.neighbours`)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.sim.simnet import SimNet
from weaved.adapters.datapath_report import DatapathReport
from weaved.adapters.metrics import metrics_registry
from weaved.adapters.nodenet import Desired, masquerade_ruleset
from weaved.config import ConfigError, Settings, parse_settings
from weaved.core.forwarding import sleeve_address, sleeve_overlay
from weaved.core.mesh import MeshConfig
from weaved.core.status import MeshStatus
from weaved.render import render_status


def settings(env: dict[str, str] | None = None, **flags: Any) -> Settings:
    return parse_settings(flags, env or {}, "node-0")


def test_defaults() -> None:
    s = settings()
    assert (s.datapath, s.sleeve_port, s.mtu, s.no_masq_local) == (True, 6785, None, True)
    assert settings(port="7000").sleeve_port == 7002  # follows the control port


def test_environment_and_flags() -> None:
    s = settings({"WEAVE_MTU": "8916", "NO_MASQ_LOCAL": "0", "WEAVE_SLEEVE_PORT": "7777",
                  "WEAVE_NO_DATAPATH": "1"})
    assert (s.datapath, s.sleeve_port, s.mtu, s.no_masq_local) == (False, 7777, 8916, False)
    assert settings({"WEAVE_MTU": "8916"}, mtu="1400").mtu == 1400
    assert not settings(no_datapath=True).datapath
    assert settings({"WEAVE_NO_DATAPATH": "false"}).datapath


@pytest.mark.parametrize(("env", "fragment"), [
    ({"WEAVE_MTU": "100"}, "--mtu/WEAVE_MTU: 100 out of range 576-65000"),
    ({"WEAVE_MTU": "big"}, "--mtu/WEAVE_MTU: expected a whole number"),
    ({"NO_MASQ_LOCAL": "maybe"}, "NO_MASQ_LOCAL: expected 1 or 0"),
    ({"WEAVE_NO_DATAPATH": "2"}, "WEAVE_NO_DATAPATH: expected 1 or 0"),
    ({"WEAVE_SLEEVE_PORT": "6783"}, "is the control port"),
    ({"WEAVE_SLEEVE_PORT": "70000"}, "out of range"),
])
def test_bad_values_are_one_line_errors(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(env)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def desired(no_masq_local: bool = True, local: tuple[str, ...] = ("10.40.0.0/14",)) -> Desired:
    return Desired(range=ipaddress.IPv4Network("10.32.0.0/12"), gateway=ipaddress.IPv4Interface("10.40.0.0/12"),
                   mtu=1464, remote=(ipaddress.IPv4Network("10.32.0.0/13"),),
                   local=tuple(ipaddress.IPv4Network(n) for n in local), no_masq_local=no_masq_local)


def test_ruleset_follows_weave_nets_nat_chain() -> None:
    rules = masquerade_ruleset(desired())
    lines = [line.strip() for line in rules.splitlines()]
    assert lines[:2] == ["table ip weaved {}", "delete table ip weaved"]  # replaced as a whole, atomically
    assert "elements = { 10.40.0.0/14 }" in lines
    chain = lines[lines.index("type nat hook postrouting priority srcnat; policy accept;") + 1:]
    assert chain[:4] == [
        "ip saddr != 10.32.0.0/12 ip daddr @no_masq_local return",
        "ip saddr 10.32.0.0/12 ip daddr 224.0.0.0/4 return",
        "ip saddr != 10.32.0.0/12 ip daddr 10.32.0.0/12 snat to 10.40.0.0",
        "ip saddr 10.32.0.0/12 ip daddr != 10.32.0.0/12 masquerade",
    ]
    off = masquerade_ruleset(desired(no_masq_local=False, local=()))
    assert "@no_masq_local return" not in off and "elements" not in off


def report(**counters: int) -> DatapathReport:
    return DatapathReport(state="ready", bridge="weave", tun="weave-tun", gateway="10.40.0.0/12", mtu=1464,
                          underlay_mtu=1500, sleeve_port=6785, peers=2, routes=3, counters=dict(counters))


def empty_status() -> MeshStatus:
    return MeshStatus(name="02:00:00:00:00:01", nickname="n1", uid=1, short_id=1, protocol="weaved 1..1",
                      port=6783, conn_limit=200, peers=[], connections=[], targets=[], counters={})


def test_report_round_trips_and_renders_drops_by_reason() -> None:
    r = report(tx_packets=5, **{"drop_udp_bad-magic": 2, "drop_tun_unowned": 1})
    assert DatapathReport.from_json(r.to_json()) == r
    assert r.drops() == {"tun/unowned": 1, "udp/bad-magic": 2}
    text = render_status(empty_status(), "0.1.0", None, r)
    assert "Service: datapath" in text
    assert "MTU: 1464 (underlay 1500)" in text
    assert "Dropped: tun/unowned 1, udp/bad-magic 2" in text
    assert "Service: datapath" not in render_status(empty_status(), "0.1.0")


def test_the_datapath_block_says_how_many_neighbours_are_sealed() -> None:
    import dataclasses
    plain = render_status(empty_status(), "0.1.0", None, report())
    assert "     Encryption: none" in plain
    sealed = dataclasses.replace(report(tx_sealed=10, rx_sealed=7), encrypted=True, sealed_peers=2)
    assert "2 of 2 neighbours sealed (AES-256-GCM), 10 datagrams sealed, 7 opened" in \
        render_status(empty_status(), "0.1.0", None, sealed)


def test_metrics_export_packets_bytes_and_drops() -> None:
    r = report(tx_packets=5, tx_bytes=500, rx_packets=4, relayed_packets=1, **{"drop_udp_bad-magic": 2})
    text = generate_latest(metrics_registry(empty_status, None, lambda: r)).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("weave_sleeve_packets_total", (("direction", "tx"),))] == 5
    assert samples[("weave_sleeve_packets_total", (("direction", "relayed"),))] == 1
    assert samples[("weave_sleeve_bytes_total", (("direction", "tx"),))] == 500
    assert samples[("weave_sleeve_dropped_packets_total", (("reason", "bad-magic"), ("source", "udp")))] == 2
    assert samples[("weave_pod_mtu", ())] == 1464
    assert samples[("weave_datapath_ready", ())] == 1


def test_neighbours_carry_the_sleeve_port_they_advertised() -> None:
    net = SimNet(7, config=MeshConfig(overlays=(sleeve_overlay(7001),)))
    a = net.add_peer("a")
    b = net.add_peer("b", [net.address_of(0)])
    net.run_until(net.converged, 30.0)
    for me, other in ((a, b), (b, a)):
        neighbours = me.mesh.neighbours()
        control, overlays = neighbours[other.mesh.identity.name]
        assert control == other.address
        assert sleeve_address(control, overlays) == control.__class__(control.host, 7001)
