"""Metrics come from a cached status snapshot (rebuilt at most once per interval, however many scrapes),
with stable series, Prometheus names, and every family once on the page."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from weaved.adapters.datapath_report import DatapathReport
from weaved.adapters.ipam_report import IpamOwner, IpamReport
from weaved.adapters.metrics import metrics_registry
from weaved.core.status import ConnectionStatus, MeshStatus, PeerStatus

T = TypeVar("T")


def status(counters: dict[str, int], states: list[str]) -> MeshStatus:
    return MeshStatus(
        "aa:bb:cc:dd:ee:01", "n1", 1, 1, "weaved 1..1", 6783, 200,
        peers=[PeerStatus("aa:bb:cc:dd:ee:01", "n1", 1, 1, 1, [], None),
               PeerStatus("aa:bb:cc:dd:ee:02", "n2", 2, 1, 2, [], "aa:bb:cc:dd:ee:02"),
               PeerStatus("aa:bb:cc:dd:ee:03", "n3", 3, 1, 3, [], None)],
        connections=[ConnectionStatus(f"10.0.0.{i}:6783", True, s, None, None, "") for i, s in enumerate(states)],
        targets=["10.0.0.9:6783"],
        counters=counters,
    )


def scrape(snapshot: MeshStatus) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics_registry(lambda: snapshot)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_connections_by_state_always_export_every_known_state() -> None:
    samples = scrape(status({}, ["established", "established", "failed"]))
    assert samples[("weave_connections", (("state", "established"),))] == 2
    assert samples[("weave_connections", (("state", "failed"),))] == 1
    assert samples[("weave_connections", (("state", "pending"),))] == 0
    assert samples[("weave_connections", (("state", "connecting"),))] == 0


def test_peers_reachability_and_targets() -> None:
    samples = scrape(status({}, []))
    assert samples[("weave_peers", ())] == 3
    assert samples[("weaved_reachable_peers", ())] == 1
    assert samples[("weaved_targets", ())] == 1


def test_counters_from_the_core_and_the_daemon() -> None:
    samples = scrape(status({
        "rx_datagrams": 7, "tx_datagrams": 9, "rx_bytes": 700, "tx_bytes": 900, "tx_gossip_bytes": 300,
        "dropped_bad-field": 2, "dropped_unknown-sender": 1, "send_error_EPERM": 4,
    }, []))
    assert samples[("weaved_datagrams_total", (("direction", "rx"),))] == 7
    assert samples[("weaved_datagrams_total", (("direction", "tx"),))] == 9
    assert samples[("weaved_datagram_bytes_total", (("direction", "tx"),))] == 900
    assert samples[("weaved_gossip_sent_bytes_total", ())] == 300
    assert samples[("weaved_dropped_datagrams_total", (("reason", "bad-field"),))] == 2
    assert samples[("weaved_dropped_datagrams_total", (("reason", "unknown-sender"),))] == 1
    assert samples[("weaved_send_errors_total", (("errno", "EPERM"),))] == 4


def test_a_scrape_after_the_interval_reads_a_fresh_snapshot() -> None:
    snapshots = iter([status({"rx_datagrams": 1}, []), status({"rx_datagrams": 5}, [])])
    clock = FakeClock()
    registry = metrics_registry(lambda: next(snapshots), max_age=2.0, clock=clock)
    assert b'weaved_datagrams_total{direction="rx"} 1.0' in generate_latest(registry)
    clock.now += 2.0
    assert b'weaved_datagrams_total{direction="rx"} 5.0' in generate_latest(registry)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def datapath_report() -> DatapathReport:
    return DatapathReport(state="ready", bridge="weave", tun="weave-tun", gateway="10.40.0.0/12", mtu=1464,
                          underlay_mtu=1500, sleeve_port=6785, peers=2, routes=3,
                          counters={"tx_packets": 5, "drop_udp_bad-magic": 2})


def ipam_report() -> IpamReport:
    return IpamReport(state="ready", range="10.32.0.0/24", default_subnet="10.32.0.0/24", size=256, owned=256,
                      free=250, leases=6, pending=0, owners=[], rejected={}, counters={})


@given(scrapes=st.lists(st.integers(0, 120).map(lambda i: i * 0.25), min_size=1, max_size=60),  # exact floats
       max_age=st.sampled_from([1.0, 2.0, 5.0]))
def test_scrapes_build_each_report_at_most_once_per_interval(scrapes: list[float], max_age: float) -> None:
    """A scrape must not cost the daemon's one thread a status build (which walks every peer and connection,
    between two heartbeats): however many scrapers ask, each source is built at most once per ``max_age``."""
    builds: Counter[str] = Counter()

    def counted(name: str, value: T) -> Callable[[], T]:
        def build() -> T:
            builds[name] += 1
            return value
        return build

    clock = FakeClock()
    start = clock.now
    registry = metrics_registry(counted("status", status({}, [])), counted("ipam", ipam_report()),
                                counted("datapath", datapath_report()), max_age=max_age, clock=clock)
    for offset in sorted(scrapes):
        clock.now = start + offset
        generate_latest(registry)
    span = max(scrapes) - min(scrapes)
    most = 1 + int(span // max_age)
    assert set(builds) == {"status", "ipam", "datapath"}
    assert all(1 <= count <= most for count in builds.values()), (builds, most)


def test_many_scrapes_at_once_build_the_status_once() -> None:
    builds = 0

    def build() -> MeshStatus:
        nonlocal builds
        builds += 1
        return status({}, [])

    clock = FakeClock()
    registry = metrics_registry(build, max_age=2.0, clock=clock)
    for _ in range(100):
        generate_latest(registry)
    assert builds == 1
    clock.now += 2.0
    generate_latest(registry)
    assert builds == 2


def test_the_whole_page_parses_and_no_family_repeats() -> None:
    """Issue 17: the data path collector was registered twice, so every ``weave_sleeve_*`` family appeared
    twice and Prometheus refused the page ("second HELP line for metric name ...")."""
    text = generate_latest(metrics_registry(lambda: status({"rx_datagrams": 1, "dropped_bad-field": 2}, ["failed"]),
                                            ipam_report, datapath_report)).decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert {"weave_sleeve_packets", "weave_ips", "weave_connections", "process_cpu_seconds"} <= set(names)
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))


def test_ipam_metrics_use_weaves_names() -> None:
    report = IpamReport(
        state="ready", range="10.32.0.0/24", default_subnet="10.32.0.0/24", size=256, owned=128, free=120,
        leases=7, pending=2,
        owners=[IpamOwner("aa:bb:cc:dd:ee:01", "n1", 128, 50.0, True, 7),
                IpamOwner("aa:bb:cc:dd:ee:02", "n2", 64, 25.0, False, None),
                IpamOwner("aa:bb:cc:dd:ee:03", "n3", 64, 25.0, True, None)],
        rejected={"ring-entry-in-my-range": 3}, counters={"dropped_too-large": 1, "store_errors": 4},
    )
    text = generate_latest(metrics_registry(lambda: status({}, []), lambda: report)).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("weave_ips", (("state", "local-used"),))] == 7
    assert samples[("weave_ips", (("state", "local-owned"),))] == 128
    assert samples[("weave_ips", (("state", "local-free"),))] == 120
    assert samples[("weave_max_ips", ())] == 256
    assert samples[("weave_ipam_unreachable_count", ())] == 1
    assert samples[("weave_ipam_unreachable_percentage", ())] == 25.0
    assert samples[("weave_ipam_pending_allocates", ())] == 2
    assert samples[("weaved_ipam_rejected_total", (("reason", "ring-entry-in-my-range"),))] == 3
    assert samples[("weaved_ipam_dropped_messages_total", (("reason", "too-large"),))] == 1
    assert samples[("weaved_ipam_store_errors_total", ())] == 4
    assert samples[("weave_peers", ())] == 3, "the mesh collector is still there"


def test_without_ipam_there_are_no_ipam_series() -> None:
    assert all(not name.startswith(("weave_ips", "weave_ipam", "weaved_ipam")) for name, _ in scrape(status({}, [])))


def test_encryption_handshakes_and_rekeys() -> None:
    import dataclasses
    snapshot = dataclasses.replace(status({"handshake_ok": 3, "handshake_auth": 5, "rekeys": 2, "dropped_replay": 1},
                                          []), encryption="enabled")
    samples = scrape(snapshot)
    assert samples[("weaved_encryption_enabled", ())] == 1
    assert samples[("weaved_handshakes_total", (("result", "ok"),))] == 3
    assert samples[("weaved_handshakes_total", (("result", "auth"),))] == 5
    assert samples[("weaved_rekeys_total", ())] == 2
    assert samples[("weaved_dropped_datagrams_total", (("reason", "replay"),))] == 1
    assert scrape(status({}, []))[("weaved_encryption_enabled", ())] == 0
