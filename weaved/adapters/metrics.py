"""Prometheus metrics, read from a cached copy of the mesh's status snapshot.

Theory of operation
-------------------
The core already counts everything it does (``MeshStatus.counters``) and knows its connections and peers,
so there is no second set of counters to keep in step: :class:`MeshCollector` turns a status snapshot into
metric families. Building a snapshot walks every peer and connection on the daemon's one thread, the one
that also sends heartbeats, so scrapes must not decide how often that happens: every source the collectors
read is wrapped in a :class:`Cached` that rebuilds it at most once per :data:`MAX_AGE` seconds, however
many scrapers ask (both ``/metrics`` endpoints share one registry, so one cache). A scrape sees values up to
that old, which is well below any scrape interval. Names follow Weave Net where it has one
(``weave_connections{state}``, ``weave_peers``) and Prometheus conventions for ours (``weaved_*``,
counters ending in ``_total``). Every known connection state is always exported, at 0 when empty, so that
alerts like ``weave_connections{state="failed"} > 0`` do not depend on a series appearing.

IPAM has a collector of its own over the daemon's :class:`~weaved.adapters.ipam_report.IpamReport`, with
Weave's names (``weave_ips{state="local-used"}``, ``weave_max_ips``, ``weave_ipam_unreachable_count``,
``weave_ipam_unreachable_percentage``, ``weave_ipam_pending_allocates``) so Weave's dashboards and alerts
(``WeaveNetIPAMUnreachable``, ``WeaveNetIPAMSplitBrain``) keep working, plus ``local-owned`` and
``local-free`` states and ``weaved_ipam_*`` counters for what Weave does not export.

The collectors sit in a registry of their own (plus the process collector), not the global default one,
so tests and several daemons in one process never share series.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from weaved.adapters.datapath_report import DROP_TUN_PREFIX, DROP_UDP_PREFIX, DatapathReport
from weaved.adapters.ipam_report import IpamReport
from weaved.adapters.udp import SEND_ERROR_PREFIX
from weaved.core.status import MeshStatus
from weaved.render import CONNECTION_STATE_ORDER

DROPPED_PREFIX = "dropped_"
HANDSHAKE_PREFIX = "handshake_"
MAX_AGE = 2.0
"""Seconds a cached snapshot serves scrapes before it is rebuilt (on the next scrape after that)."""

T = TypeVar("T")


class Cached(Generic[T]):
    """``build()``'s value, rebuilt only when it is ``max_age`` seconds old by ``clock`` (or never built)."""

    def __init__(self, build: Callable[[], T], max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self._max_age = max_age
        self._clock = clock
        self._value: T | None = None
        self._built_at = 0.0

    def __call__(self) -> T:
        now = self._clock()
        if self._value is None or now - self._built_at >= self._max_age:
            self._value = self._build()
            self._built_at = now
        return self._value


def _labelled(counters: dict[str, int], prefix: str) -> list[tuple[str, int]]:
    return sorted((key[len(prefix):], value) for key, value in counters.items() if key.startswith(prefix))


class MeshCollector(Collector):
    """Metric families for one peer, computed from ``snapshot()`` at each collection."""

    def __init__(self, snapshot: Callable[[], MeshStatus]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        status = self._snapshot()
        counters = status.counters

        by_state = Counter(c.state for c in status.connections)
        connections = GaugeMetricFamily("weave_connections", "Connections and attempts by state.", labels=["state"])
        for state in [*CONNECTION_STATE_ORDER, *sorted(set(by_state) - set(CONNECTION_STATE_ORDER))]:
            connections.add_metric([state], by_state[state])
        yield connections

        yield GaugeMetricFamily("weave_peers", "Peers in the topology, this one included.", value=len(status.peers))
        reachable = sum(1 for p in status.peers if p.next_hop is not None)
        yield GaugeMetricFamily("weaved_reachable_peers", "Other peers we have a route to.", value=reachable)
        yield GaugeMetricFamily("weaved_targets", "Addresses we keep dialling.", value=len(status.targets))

        datagrams = CounterMetricFamily("weaved_datagrams", "Control datagrams.", labels=["direction"])
        datagrams.add_metric(["rx"], counters.get("rx_datagrams", 0))
        datagrams.add_metric(["tx"], counters.get("tx_datagrams", 0))
        yield datagrams

        payload = CounterMetricFamily("weaved_datagram_bytes", "Control datagram payload bytes.", labels=["direction"])
        payload.add_metric(["rx"], counters.get("rx_bytes", 0))
        payload.add_metric(["tx"], counters.get("tx_bytes", 0))
        yield payload

        yield CounterMetricFamily("weaved_gossip_sent_bytes", "Bytes of gossip sent (updates, summaries, digests).",
                                  value=counters.get("tx_gossip_bytes", 0))

        dropped = CounterMetricFamily("weaved_dropped_datagrams", "Received datagrams dropped, by reason.",
                                      labels=["reason"])
        for reason, value in _labelled(counters, DROPPED_PREFIX):
            dropped.add_metric([reason], value)
        yield dropped

        send_errors = CounterMetricFamily("weaved_send_errors", "Datagrams the kernel refused to send, by errno.",
                                          labels=["errno"])
        for errno_name, value in _labelled(counters, SEND_ERROR_PREFIX):
            send_errors.add_metric([errno_name], value)
        yield send_errors

        yield GaugeMetricFamily("weaved_encryption_enabled", "1 with a password: connections authenticated and "
                                "encrypted (docs/security.md).", value=1 if status.encryption == "enabled" else 0)
        handshakes = CounterMetricFamily("weaved_handshakes", "Authenticated handshakes by result (ok: ours "
                                         "answered; answered: theirs; auth: wrong or missing password; …).",
                                         labels=["result"])
        for result, value in _labelled(counters, HANDSHAKE_PREFIX):
            handshakes.add_metric([result], value)
        yield handshakes
        yield CounterMetricFamily("weaved_rekeys", "Sessions replaced because they were old.",
                                  value=counters.get("rekeys", 0))


class IpamCollector(Collector):
    """Metric families for this peer's IPAM, computed from ``report()`` at each collection."""

    def __init__(self, report: Callable[[], IpamReport]) -> None:
        self._report = report

    def collect(self) -> Iterable[Metric]:
        report = self._report()
        ips = GaugeMetricFamily("weave_ips", "Number of IP addresses of this peer, by state.", labels=["state"])
        ips.add_metric(["local-used"], report.leases)
        ips.add_metric(["local-owned"], report.owned)
        ips.add_metric(["local-free"], report.free)
        yield ips
        yield GaugeMetricFamily("weave_max_ips", "Size of IP address space used by allocator.", value=report.size)
        unreachable = [o for o in report.owners if not o.reachable]
        yield GaugeMetricFamily("weave_ipam_unreachable_count", "Number of unreachable peers that own addresses.",
                                value=len(unreachable))
        yield GaugeMetricFamily("weave_ipam_unreachable_percentage",
                                "Percentage of IP addresses owned by unreachable peers.",
                                value=report.unreachable_percent)
        yield GaugeMetricFamily("weave_ipam_pending_allocates", "Number of pending allocates.", value=report.pending)

        rejected = CounterMetricFamily("weaved_ipam_rejected", "IPAM messages and remote states refused, by reason.",
                                       labels=["reason"])
        for reason, value in sorted(report.rejected.items()):
            rejected.add_metric([reason], value)
        yield rejected
        dropped = CounterMetricFamily("weaved_ipam_dropped_messages", "IPAM messages not sent, by reason.",
                                      labels=["reason"])
        for reason, value in _labelled(report.counters, DROPPED_PREFIX):
            dropped.add_metric([reason], value)
        yield dropped
        yield CounterMetricFamily("weaved_ipam_store_errors", "Failed writes of the IPAM state file.",
                                  value=report.counters.get("store_errors", 0))


class DatapathCollector(Collector):
    """The sleeve's traffic and drops, from ``report()`` at each collection (``weave_*`` names, as Weave's
    router exports no per-packet series of its own)."""

    def __init__(self, report: Callable[[], DatapathReport]) -> None:
        self._report = report

    def collect(self) -> Iterable[Metric]:
        report = self._report()
        c = report.counters
        packets = CounterMetricFamily("weave_sleeve_packets", "Packets through the sleeve, by direction.",
                                      labels=["direction"])
        octets = CounterMetricFamily("weave_sleeve_bytes", "Inner IP bytes through the sleeve, by direction.",
                                     labels=["direction"])
        for direction in ("tx", "rx", "relayed"):
            packets.add_metric([direction], c.get(f"{direction}_packets", 0))
            octets.add_metric([direction], c.get(f"{direction}_bytes", 0))
        yield packets
        yield octets
        dropped = CounterMetricFamily("weave_sleeve_dropped_packets", "Packets the sleeve dropped, by where they "
                                      "came from (tun or udp) and reason.", labels=["source", "reason"])
        for prefix, source in ((DROP_TUN_PREFIX, "tun"), (DROP_UDP_PREFIX, "udp")):
            for reason, value in _labelled(c, prefix):
                dropped.add_metric([source, reason], value)
        yield dropped
        supers = CounterMetricFamily("weave_sleeve_superpackets", "TSO super-packets through the sleeve (offload "
                                     "mode), by direction.", labels=["direction"])
        chunks = CounterMetricFamily("weave_sleeve_chunks", "Chunks (wire datagrams) the super-packets travelled in, "
                                     "by direction.", labels=["direction"])
        for direction in ("tx", "rx"):
            supers.add_metric([direction], c.get(f"{direction}_superpackets", 0))
            chunks.add_metric([direction], c.get(f"{direction}_chunks", 0))
        yield supers
        yield chunks
        yield CounterMetricFamily("weave_sleeve_incomplete_frames", "Runs of chunks written for frames that "
                                  "arrived incomplete (a chunk lost or split off).", value=c.get("rx_partial_runs", 0))
        yield CounterMetricFamily("weave_sleeve_segmented", "Super-packets cut into segments in userspace for a "
                                  "peer without offloads.", value=c.get("tx_segmented", 0))
        yield GaugeMetricFamily("weave_sleeve_offload_peers", "Neighbours that negotiated offload (version-2) "
                                "frames.", value=report.offload_peers)
        yield GaugeMetricFamily("weave_sleeve_native", "1 when the C hot loop carries the sleeve's common cases, "
                                "0 when Python does it all.", value=1 if report.hot_loop == "C" else 0)
        native = CounterMetricFamily("weave_sleeve_native_packets", "Packets the C hot loop handled without "
                                     "Python, by direction.", labels=["direction"])
        for direction in ("tx", "rx"):
            native.add_metric([direction], c.get(f"native_{direction}_packets", 0))
        yield native
        sealed = CounterMetricFamily("weave_sleeve_sealed", "Sleeve datagrams sealed (tx) and opened (rx) with a "
                                     "neighbour's keys (a password).", labels=["direction"])
        for direction in ("tx", "rx"):
            sealed.add_metric([direction], c.get(f"{direction}_sealed", 0))
        yield sealed
        yield GaugeMetricFamily("weave_sleeve_routed_peers", "Remote peers the sleeve has a route to.",
                                value=report.peers)
        yield GaugeMetricFamily("weave_pod_mtu", "MTU given to pod interfaces (0 until known).",
                                value=report.mtu or 0)
        yield GaugeMetricFamily("weave_datapath_ready", "1 once the bridge holds the gateway address.",
                                value=1 if report.state == "ready" else 0)
        yield CounterMetricFamily("weave_datapath_network_changes", "Changes made to the node network after "
                                  "its first setup (repairs, route updates).", value=c.get("network_changes", 0))


def metrics_registry(snapshot: Callable[[], MeshStatus], ipam: Callable[[], IpamReport] | None = None,
                     datapath: Callable[[], DatapathReport] | None = None, *, max_age: float = MAX_AGE,
                     clock: Callable[[], float] = time.monotonic) -> CollectorRegistry:
    """A registry with the mesh collector, the IPAM and data path collectors when given (each registered
    once, each reading its source through a :class:`Cached` of ``max_age``), and process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(Cached(snapshot, max_age, clock)))
    if ipam is not None:
        registry.register(IpamCollector(Cached(ipam, max_age, clock)))
    if datapath is not None:
        registry.register(DatapathCollector(Cached(datapath, max_age, clock)))
    ProcessCollector(registry=registry)
    return registry


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler answering with ``registry`` in the Prometheus text format."""

    async def handle(_: web.Request) -> web.StreamResponse:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return handle


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """The application behind ``WEAVE_METRICS_ADDR``: ``GET /metrics`` only."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    return app
