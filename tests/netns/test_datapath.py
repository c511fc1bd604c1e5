"""The sleeve data path on a real 3-node lab: pods in namespaces of their own, plugged into each node's bridge.

The "pods" are built here by hand (veth into bridge ``weave`` in the node's namespace, an address from the
node's IPAM, default route via the gateway), the way the CNI plugin will. The tests share one lab and run
in file order; each leaves the lab healed and every daemon running for the next.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.netns.conftest import HostSnapshot, Lab, addr, daemon_missing, eventually, session_base, teardown_and_check
from weaved.adapters.datapath import CHECK_INTERVAL
from weaved.core import superframe
from weaved.lab.plan import node_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NODES = ["n1", "n2", "n3"]
CONVERGE_TIMEOUT = 60.0
ROUTE_TIMEOUT = 20.0
"""How long a partition takes to show as a relayed route (heartbeat timeout + gossip), with margin."""
SLEEVE_PORT = 6785


@dataclass(frozen=True)
class Pod:
    netns: str
    node: str
    ip: str
    gateway: str


@dataclass
class World:
    lab: Lab
    pods: dict[str, Pod]
    mtu: int

    def node_ns(self, node: str) -> str:
        return node_netns(self.lab.name, node)

    def datapath(self, node: str) -> dict[str, Any]:
        report = self.lab.report(node)
        assert report is not None, f"no report from {node}"
        data: dict[str, Any] = report["datapath"]
        return data

    def counters(self, node: str) -> dict[str, int]:
        counters: dict[str, int] = self.datapath(node)["counters"]
        return counters


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ping(netns: str, ip: str, *extra: str, count: int = 1) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", netns, "ping", "-n", "-c", str(count), "-W", "1", *extra, ip,
              check=False)


def pings(netns: str, ip: str, attempts: int = 5) -> bool:
    """One ping per attempt (the first may wait for ARP or a route)."""
    return any(ping(netns, ip).returncode == 0 for _ in range(attempts))


def make_pod(lab: Lab, node: str, name: str, made: list[str], *, cni_like: bool = False) -> Pod:
    """A pod plugged into ``node``'s bridge; ``cni_like`` also gives its veth the ``gso_max_size`` the CNI
    plugin sets (so the pod's TCP super-packets reach the sleeve whole)."""
    netns = f"{lab.name}-{name}"
    cidr = lab.exec(node, "weaved", "ipam", "alloc", f"pod-{name}", check=True).stdout.strip()
    gateway = lab.exec(node, "weaved", "ipam", "gateway", check=True).stdout.strip().split("/")[0]
    node_ns = node_netns(lab.name, node)
    sh("ip", "netns", "add", netns)
    made.append(netns)
    report = lab.report(node)
    assert report is not None
    mtu = str(report["datapath"]["mtu"])
    host_end = f"vp{name}"
    # Created inside the node's namespace: the host's own namespace never holds the pair, not even briefly.
    gso = ["gso_max_size", str(superframe.tun_gso_max_size(int(mtu)))] if cni_like else []
    sh("ip", "-n", node_ns, "link", "add", host_end, "mtu", mtu, *gso, "type", "veth", "peer", "name", "eth0",
       "netns", netns, *gso)
    sh("ip", "-n", node_ns, "link", "set", host_end, "master", "weave", "up")
    sh("ip", "-n", netns, "link", "set", "lo", "up")
    sh("ip", "-n", netns, "link", "set", "eth0", "mtu", mtu, "up")
    sh("ip", "-n", netns, "addr", "add", cidr, "dev", "eth0")
    sh("ip", "-n", netns, "route", "add", "default", "via", gateway)
    return Pod(netns, node, cidr.split("/")[0], gateway)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    why = daemon_missing()
    if why:
        pytest.skip(why)
    before = HostSnapshot.take()
    lab = Lab(session_base() + "d")
    made: list[str] = []
    try:
        lab.run("up", "--nodes", "3", "--timeout", str(CONVERGE_TIMEOUT), timeout=CONVERGE_TIMEOUT + 60)

        def ready() -> bool:
            reports = [lab.report(n) for n in NODES]
            return all(r is not None and r["datapath"]["state"] == "ready" and r["datapath"]["peers"] == 2
                       for r in reports)

        eventually(ready, CONVERGE_TIMEOUT, "every node's data path ready with routes to both others")
        pods = {name: make_pod(lab, node, name, made)
                for name, node in (("pa", "n1"), ("pb", "n1"), ("pc", "n2"), ("pd", "n3"))}
        report = lab.report("n1")
        assert report is not None
        yield World(lab, pods, int(report["datapath"]["mtu"]))
    finally:
        for netns in made:
            sh("ip", "netns", "del", netns, check=False)
        teardown_and_check(lab, before)


def test_node_network_is_in_place(world: World) -> None:
    dp = world.datapath("n1")
    assert dp["state"] == "ready"
    assert dp["mtu"] == dp["underlay_mtu"] - 54 == 1446
    ns = world.node_ns("n1")
    assert dp["gateway"] in sh("ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "weave").stdout
    routes = sh("ip", "-n", ns, "route", "show", "dev", "weave-tun").stdout
    assert routes.count("proto 77") == dp["routes"] >= 1
    assert f"src {dp['gateway'].split('/')[0]}" in routes
    for key, want in (("net/ipv4/ip_forward", "1"), ("net/ipv4/conf/weave/proxy_arp", "1")):
        assert sh("ip", "netns", "exec", ns, "cat", f"/proc/sys/{key}").stdout.strip() == want
    rules = sh("ip", "netns", "exec", ns, "nft", "list", "table", "ip", "weaved").stdout
    assert "masquerade" in rules and "@no_masq_local" in rules


def test_pods_on_one_node_talk_over_the_bridge(world: World) -> None:
    a, b = world.pods["pa"], world.pods["pb"]
    before = world.counters("n1").get("tx_packets", 0)
    assert pings(a.netns, b.ip)
    assert ping(a.netns, b.ip, count=3).returncode == 0
    assert world.counters("n1").get("tx_packets", 0) == before, "same-node traffic went into the sleeve"


def test_pods_on_different_nodes_talk_through_the_sleeve(world: World) -> None:
    a, c, d = world.pods["pa"], world.pods["pc"], world.pods["pd"]
    sent = world.counters("n1").get("tx_packets", 0)
    received = world.counters("n2").get("rx_packets", 0)
    for src, dst in ((a, c), (c, d), (d, a)):
        assert pings(src.netns, dst.ip), f"{src.netns} -> {dst.ip}"
    assert world.counters("n1")["tx_packets"] > sent
    assert world.counters("n2")["rx_packets"] > received


def test_proxy_arp_answers_for_remote_pods_with_the_bridge_address(world: World) -> None:
    a, c = world.pods["pa"], world.pods["pc"]
    assert pings(a.netns, c.ip)
    neigh = sh("ip", "-n", a.netns, "neigh", "show", c.ip).stdout
    bridge_mac = sh("ip", "-n", world.node_ns("n1"), "-j", "link", "show", "weave").stdout
    mac = json.loads(bridge_mac)[0]["address"]
    assert mac in neigh, f"{c.ip} should resolve to the bridge's {mac}: {neigh!r}"


def test_node_reaches_remote_pods_and_the_answer_returns_through_the_overlay(world: World) -> None:
    c = world.pods["pc"]
    rx = world.counters("n1").get("rx_packets", 0)
    assert pings(world.node_ns("n1"), c.ip)
    assert world.counters("n1")["rx_packets"] > rx
    route = sh("ip", "-n", world.node_ns("n1"), "route", "get", c.ip).stdout
    assert "dev weave-tun" in route and f"src {world.datapath('n1')['gateway'].split('/')[0]}" in route


def reassemblies(world: World, node: str) -> int:
    snmp = sh("ip", "netns", "exec", world.node_ns(node), "cat", "/proc/net/snmp").stdout.splitlines()
    names, values = [line.split() for line in snmp if line.startswith("Ip:")][:2]
    return int(values[names.index("ReasmReqds")])


def test_full_size_packets_fit_the_underlay_and_bigger_ones_fragment(world: World) -> None:
    a, c = world.pods["pa"], world.pods["pc"]
    payload = world.mtu - 28  # ICMP + IP headers
    before = reassemblies(world, "n2")
    assert pings(a.netns, c.ip)
    full = ping(a.netns, c.ip, "-M", "do", "-s", str(payload), count=3)
    assert full.returncode == 0, full.stdout + full.stderr
    assert reassemblies(world, "n2") == before, "an MTU-sized packet needed IP fragmentation on the underlay"
    too_big = ping(a.netns, c.ip, "-M", "do", "-s", str(payload + 1))
    assert too_big.returncode != 0 and "message too long" in too_big.stdout + too_big.stderr
    assert ping(a.netns, c.ip, "-s", "4000", count=2).returncode == 0  # the pod fragments, the sleeve carries
    # From the node itself: the TUN's MTU makes the kernel fragment, or refuse with DF set.
    node = world.node_ns("n1")
    assert ping(node, c.ip, "-s", "4000", count=2).returncode == 0
    refused = ping(node, c.ip, "-M", "do", "-s", str(payload + 100))
    assert refused.returncode != 0 and f"mtu={world.mtu}" in refused.stdout + refused.stderr


def test_pod_traffic_leaving_the_range_is_masqueraded(world: World) -> None:
    a = world.pods["pa"]
    listener = subprocess.Popen(
        ["ip", "netns", "exec", world.node_ns("n2"), sys.executable, "-c", textwrap.dedent("""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 9123)); s.settimeout(10)
            print("ready", flush=True)
            data, peer = s.recvfrom(100)
            print(peer[0], flush=True)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        sh("ip", "netns", "exec", a.netns, sys.executable, "-c",
           f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('{addr('n2')}', 9123))")
        out, _ = listener.communicate(timeout=15)
    finally:
        listener.kill()
    assert out.strip() == addr("n1"), f"seen from {out.strip()!r}, expected the node's own address"


def source_seen_by(world: World, pod: Pod, sender_ns: str, bind: str) -> str:
    """The source address a UDP listener in ``pod`` sees for a datagram sent from ``sender_ns`` bound to
    ``bind`` (a node's underlay address: traffic from outside the pod range)."""
    listener = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, sys.executable, "-c", textwrap.dedent("""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 9124)); s.settimeout(10)
            print("ready", flush=True)
            data, peer = s.recvfrom(100)
            print(peer[0], flush=True)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        sh("ip", "netns", "exec", sender_ns, sys.executable, "-c",
           "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           f"s.bind(('{bind}', 0)); s.sendto(b'hi', ('{pod.ip}', 9124))")
        out, _ = listener.communicate(timeout=15)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    return out.strip()


def test_traffic_from_outside_the_range_is_natted_like_weave_net(world: World) -> None:
    """NO_MASQ_LOCAL=1 (the default), seen by an outside client that routes the pod range via n1: to n1's
    own pod the client's address is kept (``externalTrafficPolicy: Local``); to a pod on another node it
    becomes n1's gateway, so that the answer comes back through n1 and its conntrack entry."""
    a, c = world.pods["pa"], world.pods["pc"]
    client, client_ip = f"{world.lab.name}-ext", "198.51.100.99"
    switch = f"wl-{world.lab.name}-sw"
    sh("ip", "netns", "add", client)
    try:
        sh("ip", "-n", switch, "link", "add", "xclient", "type", "veth", "peer", "name", "eth0", "netns", client)
        sh("ip", "-n", switch, "link", "set", "xclient", "master", "br0", "up")
        sh("ip", "-n", client, "link", "set", "eth0", "up")
        sh("ip", "-n", client, "addr", "add", f"{client_ip}/24", "dev", "eth0")
        sh("ip", "-n", client, "route", "add", "10.32.0.0/12", "via", addr("n1"))
        assert source_seen_by(world, a, client, client_ip) == client_ip
        gateway_n1 = world.datapath("n1")["gateway"].split("/")[0]
        assert source_seen_by(world, c, client, client_ip) == gateway_n1
    finally:
        sh("ip", "netns", "del", client, check=False)
        sh("ip", "-n", switch, "link", "del", "xclient", check=False)


def next_hop(lab: Lab, node: str, target: str) -> str | None:
    report = lab.report(node)
    if report is None:
        return None
    names = {p["name"]: p["nickname"] for p in report["peers"]}
    for peer in report["peers"]:
        if peer["nickname"] == target:
            hop = peer["next_hop"]
            return names.get(hop) if hop else None
    return None


def test_packets_are_relayed_when_the_direct_link_is_cut(world: World) -> None:
    lab, a, d = world.lab, world.pods["pa"], world.pods["pd"]
    lab.run("partition", "n1", "n3")
    try:
        eventually(lambda: next_hop(lab, "n1", "n3") == "n2" and next_hop(lab, "n3", "n1") == "n2", ROUTE_TIMEOUT,
                   "n1 and n3 routing to each other through n2")
        eventually(lambda: world.datapath("n1")["peers"] == 2, ROUTE_TIMEOUT, "n1's table routing n3 via n2")
        relayed = world.counters("n2").get("relayed_packets", 0)
        assert pings(a.netns, d.ip)
        assert ping(a.netns, d.ip, count=3).returncode == 0
        assert world.counters("n2")["relayed_packets"] >= relayed + 6  # 3+ requests and 3+ replies
    finally:
        lab.run("heal")
    eventually(lambda: next_hop(lab, "n1", "n3") == "n3", ROUTE_TIMEOUT, "the direct route back after heal")


def test_pods_keep_working_across_a_daemon_restart(world: World) -> None:
    lab, a, c = world.lab, world.pods["pa"], world.pods["pc"]
    ns = world.node_ns("n2")
    lab.run("kill", "n2")
    try:
        # Nothing is torn down on exit: the bridge, the gateway, the TUN and its routes stay.
        assert c.gateway in sh("ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "weave").stdout
        assert "proto 77" in sh("ip", "-n", ns, "route", "show", "dev", "weave-tun").stdout
        assert pings(c.netns, c.gateway)  # the pod still reaches its node
    finally:
        lab.run("start", "n2")
    eventually(lambda: pings(a.netns, c.ip, attempts=1) and pings(c.netns, world.pods["pd"].ip, attempts=1), 30,
               "pods on n2 reachable again after the restart")
    log = lab.log("n2")
    restarted = log[log.rindex("sleeve started"):]
    assert "created bridge" not in restarted and "route 10." not in restarted, restarted


def test_the_network_is_repaired_when_removed(world: World) -> None:
    ns = world.node_ns("n1")
    c = world.pods["pc"]
    routes = sh("ip", "-n", ns, "route", "show", "dev", "weave-tun").stdout.split("\n")
    sh("ip", "-n", ns, "route", "del", routes[0].split()[0], "dev", "weave-tun")
    sh("ip", "netns", "exec", ns, "nft", "delete", "table", "ip", "weaved")
    sh("ip", "netns", "exec", ns, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/conf/weave/proxy_arp")

    def repaired() -> bool:
        have = sh("ip", "-n", ns, "route", "show", "dev", "weave-tun").stdout.split("\n")
        table = sh("ip", "netns", "exec", ns, "nft", "list", "table", "ip", "weaved", check=False).returncode == 0
        arp = sh("ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/conf/weave/proxy_arp").stdout.strip()
        return sorted(have) == sorted(routes) and table and arp == "1"

    eventually(repaired, 15, "routes, nft table and proxy_arp restored")
    assert pings(world.pods["pa"].netns, c.ip)
    assert world.counters("n1").get("network_changes", 0) >= 1


SCAPY_SEND = """
import sys
from scapy.all import IP, UDP, Raw, send
src, dst, sport, frames = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
for frame in frames:
    send(IP(src=src, dst=dst) / UDP(sport=sport, dport={port}) / Raw(bytes.fromhex(frame)), verbose=False)
"""


def inner(src: str, dst: str, size: int = 40) -> bytes:
    """A well-formed IPv4/ICMP echo packet (scapy computes lengths and checksums)."""
    from scapy.all import ICMP, IP, Raw

    return bytes(IP(src=src, dst=dst) / ICMP() / Raw(b"x" * (size - 28)))


def test_malformed_frames_are_dropped_and_counted(world: World) -> None:
    from weaved.core import sleeve

    lab, a, c = world.lab, world.pods["pa"], world.pods["pc"]
    report = lab.report("n1")
    assert report is not None
    short = {p["nickname"]: p["short_id"] for p in report["peers"]}
    unused = next(i for i in range(1, 4096) if i not in short.values())
    good = inner(c.ip, a.ip)
    hdr = sleeve.HEADER.pack
    frames = {
        "bad-magic": hdr(0x1234, 1, 8, short["n2"], short["n1"]) + good,
        "bad-version": hdr(sleeve.MAGIC, 9, 8, short["n2"], short["n1"]) + good,
        "short": hdr(sleeve.MAGIC, 1, 8, short["n2"], short["n1"]) + good[:10],
        "bad-length": hdr(sleeve.MAGIC, 1, 8, short["n2"], short["n1"]) + good + b"extra",
        "not-ipv4": hdr(sleeve.MAGIC, 1, 8, short["n2"], short["n1"]) + b"\x60" + good[1:],
        "unknown-source": hdr(sleeve.MAGIC, 1, 8, unused, short["n1"]) + good,
        "unknown-destination": hdr(sleeve.MAGIC, 1, 8, short["n2"], unused) + good,
        "ttl-expired": hdr(sleeve.MAGIC, 1, 1, short["n2"], short["n3"]) + inner(c.ip, world.pods["pd"].ip),
    }
    before = world.counters("n1")
    script = SCAPY_SEND.format(port=SLEEVE_PORT)
    # From n2's underlay address and sleeve port: n2 is an established neighbour, so only the frames' own
    # faults can get them dropped.
    sh("ip", "netns", "exec", world.node_ns("n2"), sys.executable, "-c", script, addr("n2"), addr("n1"),
       str(SLEEVE_PORT), *(f.hex() for f in frames.values()), timeout=60)
    # From a port that is no peer's sleeve: dropped before it is even parsed.
    sh("ip", "netns", "exec", world.node_ns("n2"), sys.executable, "-c", script, addr("n2"), addr("n1"), "40000",
       (hdr(sleeve.MAGIC, 1, 8, short["n2"], short["n1"]) + good).hex(), timeout=60)

    def counted() -> bool:
        after = world.counters("n1")
        return all(after.get(f"drop_udp_{r}", 0) > before.get(f"drop_udp_{r}", 0)
                   for r in [*frames, "unknown-sender"])

    eventually(counted, 10, "every malformed frame counted under its reason")
    after = world.counters("n1")
    assert after.get("rx_packets", 0) == before.get("rx_packets", 0), "a malformed frame reached the TUN"
    metrics = lab.exec("n1", sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                       "'http://127.0.0.1:6782/metrics').read().decode())", check=True).stdout
    assert re.search(r'weave_sleeve_dropped_packets_total\{reason="bad-magic",source="udp"\} [1-9]', metrics), \
        [line for line in metrics.splitlines() if "sleeve" in line]
    status = lab.exec("n1", "weaved", "status", check=True).stdout
    assert "Service: datapath" in status and "udp/bad-magic" in status
    # The data path still works after the garbage.
    assert pings(a.netns, c.ip)


def test_no_datapath_daemon_touches_no_device(world: World) -> None:
    """A daemon with --no-datapath (as the adapter tests run on the host) creates nothing."""
    ns = f"{world.lab.name}-nd"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "weaved", "run", "--no-datapath", "--host", "127.0.0.1",
             "--state-dir", f"/tmp/{ns}-state", "--nickname", "nd"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            eventually(lambda: sh("ip", "netns", "exec", ns, sys.executable, "-m", "weaved", "status",
                                  check=False).returncode == 0, 20, "the control-only daemon to answer")
            time.sleep(1)
            links = sh("ip", "-n", ns, "-o", "link").stdout
            assert "weave" not in links, links
            assert sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout.strip() == ""
            assert "Service: datapath" not in sh("ip", "netns", "exec", ns, sys.executable, "-m", "weaved",
                                                 "status").stdout
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    finally:
        sh("ip", "netns", "del", ns, check=False)
        sh("rm", "-rf", f"/tmp/{ns}-state", check=False)


def test_a_deleted_bridge_is_created_again_with_its_pods_plugged_back_in(world: World) -> None:
    ns = world.node_ns("n1")
    a, b, c = world.pods["pa"], world.pods["pb"], world.pods["pc"]
    sh("ip", "netns", "exec", ns, "sh", "-c", "echo 1 > /sys/class/net/vppa/brport/hairpin_mode")
    time.sleep(CHECK_INTERVAL + 1)  # the CNI handler sets hairpin at ADD: long before; let one check see it
    sh("ip", "-n", ns, "link", "del", "weave")
    eventually(lambda: pings(a.netns, b.ip, attempts=1) and pings(a.netns, c.ip, attempts=1), 20,
               "pods on n1 reach each other and n2's pod through a re-created bridge")
    assert sh("ip", "netns", "exec", ns, "cat", "/sys/class/net/vppa/brport/hairpin_mode").stdout.strip() == "1"
    log = world.lab.log("n1")
    assert "re-attached vppa" in log and "re-attached vppb" in log


def test_a_deleted_tun_is_created_again(world: World) -> None:
    ns = world.node_ns("n1")
    a, c = world.pods["pa"], world.pods["pc"]
    sh("ip", "-n", ns, "link", "del", "weave-tun")
    eventually(lambda: pings(a.netns, c.ip, attempts=1), 20, "pod traffic through a re-created weave-tun")
    assert "re-created weave-tun" in world.lab.log("n1")


def test_a_taken_sleeve_port_stops_the_daemon_with_one_line(world: World) -> None:
    ns = f"{world.lab.name}-sp"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                   "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                                   f"s.bind(('0.0.0.0', {SLEEVE_PORT})); print('bound', flush=True); time.sleep(60)"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
            proc = sh("ip", "netns", "exec", ns, sys.executable, "-m", "weaved", "run", "--state-dir",
                      f"/tmp/{ns}-state", "--nickname", "sp", check=False, timeout=30)
        finally:
            holder.kill()
            holder.communicate()
        assert proc.returncode == 1
        assert f"cannot bind sleeve UDP 0.0.0.0:{SLEEVE_PORT}: Address already in use" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        sh("ip", "netns", "del", ns, check=False)
        sh("rm", "-rf", f"/tmp/{ns}-state", check=False)
