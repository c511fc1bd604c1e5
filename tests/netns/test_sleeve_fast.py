"""The offload sleeve on a real 3-node lab: TSO super-packets through the virtio-header TUN, chunks over
UDP GSO/GRO, lost chunks, UDP and ICMP beside TCP, and a node that runs without offloads (``n3``,
``WEAVE_NO_OFFLOAD=1``), which its peers reach with finished, segmented plain frames.

Correctness only; speed is measured by ``weaved lab bench``. Every transfer is checked end to end by a
SHA-256 of the bytes, and where a checksum could go wrong unnoticed (a pod trusts packets whose checksum
was left to offload) the receiving pod's veth has checksum offload off, so the kernel finishes each
checksum in software from what the sleeve delivered, and the pod verifies it (``TcpInCsumErrors``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.netns.conftest import HostSnapshot, Lab, daemon_missing, eventually, session_base, teardown_and_check
from tests.netns.test_datapath import Pod, make_pod, pings, sh
from weaved.lab.plan import node_netns, switch_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NODES = ["n1", "n2", "n3"]
CONVERGE_TIMEOUT = 60.0
PORT = 5901
LOSS_TABLE = "weaved_test_loss"
NO_SEGMENTATION = ["tso", "off", "gso", "off", "tx-udp-segmentation", "off", "tx-udp_tnl-segmentation", "off"]

TCP_SERVER = textwrap.dedent("""
    import hashlib, socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
    c, _ = s.accept(); c.settimeout(60); h = hashlib.sha256(); n = 0
    while chunk := c.recv(1 << 16):
        h.update(chunk); n += len(chunk)
    print(n, h.hexdigest())
""")
TCP_CLIENT = textwrap.dedent("""
    import hashlib, random, socket, sys, time
    data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4]))
    for _ in range(50):
        try:
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60); break
        except OSError:
            time.sleep(0.1)
    s.sendall(data); s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
    print(len(data), hashlib.sha256(data).hexdigest())
""")
UDP_ECHO = textwrap.dedent("""
    import hashlib, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(20)
    for _ in range(int(sys.argv[3])):
        d, a = s.recvfrom(65535); s.sendto(hashlib.sha256(d).digest(), a)
""")
UDP_CLIENT = textwrap.dedent("""
    import hashlib, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    ok = 0
    for size in map(int, sys.argv[3:]):
        d = bytes(i % 253 for i in range(size))
        for _ in range(5):
            s.sendto(d, (sys.argv[1], int(sys.argv[2])))
            try:
                if s.recv(64) == hashlib.sha256(d).digest():
                    ok += 1; break
            except TimeoutError:
                pass
    print(ok)
""")


@dataclass
class World:
    lab: Lab
    pods: dict[str, Pod]

    def node_ns(self, node: str) -> str:
        return node_netns(self.lab.name, node)

    def counters(self, node: str) -> dict[str, int]:
        report = self.lab.report(node)
        assert report is not None
        counters: dict[str, int] = report["datapath"]["counters"]
        return counters


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    why = daemon_missing()
    if why:
        pytest.skip(why)
    for tool in ("ethtool",):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.skip(f"{tool} not found: apt-get install -y {tool}")
    before = HostSnapshot.take()
    lab = Lab(session_base() + "f")
    made: list[str] = []
    try:
        lab.run("up", "--nodes", "3", "--pods-per-node", "0", "--timeout", str(CONVERGE_TIMEOUT),
                timeout=CONVERGE_TIMEOUT + 60)
        # n3 comes back without offloads: same state dir, same persistent TUN, opened without virtio headers.
        lab.run("kill", "n3")
        env = {**os.environ, "WEAVE_NO_OFFLOAD": "1"}
        subprocess.run([sys.executable, "-m", "weaved", "lab", "start", "--name", lab.name, "n3"], env=env,
                       check=True, capture_output=True, timeout=120)

        def ready() -> bool:
            reports = [lab.report(n) for n in NODES]
            return all(r is not None and r["datapath"]["state"] == "ready" and r["datapath"]["peers"] == 2
                       for r in reports)

        eventually(ready, CONVERGE_TIMEOUT, "every node's data path ready with routes to both others")
        pods = {name: make_pod(lab, node, name, made, cni_like=True)
                for name, node in (("pa", "n1"), ("pc", "n2"), ("pd", "n3"))}
        yield World(lab, pods)
    finally:
        for netns in made:
            sh("ip", "netns", "del", netns, check=False)
        teardown_and_check(lab, before)


def transfer(src: Pod, dst: Pod, size: int, seed: int = 1) -> tuple[str, str]:
    """Send ``size`` pseudo-random bytes over TCP from ``src`` to ``dst``; (sent, received) as 'len sha'."""
    server = subprocess.Popen(["ip", "netns", "exec", dst.netns, sys.executable, "-c", TCP_SERVER, dst.ip,
                               str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent = sh("ip", "netns", "exec", src.netns, sys.executable, "-c", TCP_CLIENT, dst.ip, str(PORT), str(seed),
                  str(size), timeout=120).stdout.strip()
        received, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
    return sent, received.strip()


def csum_errors(pod: Pod) -> int:
    snmp = sh("ip", "netns", "exec", pod.netns, "cat", "/proc/net/snmp").stdout.splitlines()
    names, values = [line.split() for line in snmp if line.startswith("Tcp:")][:2]
    return int(values[names.index("InCsumErrors")])


def host_end(pod: Pod) -> str:
    return "vp" + pod.netns.rsplit("-", 1)[1]


def test_offload_is_negotiated_per_peer(world: World) -> None:
    for node, mode, offload_peers in (("n1", "offload", 1), ("n2", "offload", 1), ("n3", "plain", 0)):
        report = world.lab.report(node)
        assert report is not None
        assert (report["datapath"]["mode"], report["datapath"]["offload_peers"]) == (mode, offload_peers), node
    tun = sh("ip", "-n", world.node_ns("n1"), "-d", "link", "show", "weave-tun").stdout
    assert "vnet_hdr on" in tun
    assert "vnet_hdr off" in sh("ip", "-n", world.node_ns("n3"), "-d", "link", "show", "weave-tun").stdout
    status = world.lab.exec("n1", "weaved", "status", check=True).stdout
    assert "Mode: offload, C hot loop, 1 of 2 neighbours negotiated offload" in status


def test_tcp_bulk_crosses_as_super_packets_and_arrives_intact(world: World) -> None:
    a, c = world.pods["pa"], world.pods["pc"]
    before = world.counters("n2")
    sent, received = transfer(a, c, 30 << 20)
    assert sent == received
    after = world.counters("n2")
    supers = after.get("rx_superpackets", 0) - before.get("rx_superpackets", 0)
    chunks = after.get("rx_chunks", 0) - before.get("rx_chunks", 0)
    assert supers > 100 and chunks > 10 * supers, (supers, chunks)
    sent, received = transfer(c, a, 5 << 20, seed=2)  # and the other way
    assert sent == received


def test_lost_chunks_cost_only_their_segments_and_checksums_hold(world: World) -> None:
    a, c = world.pods["pa"], world.pods["pc"]
    sw, n1, n2 = switch_netns(world.lab.name), world.node_ns("n1"), world.node_ns("n2")
    rules = (f'table netdev {LOSS_TABLE} {{\n  chain n1 {{ type filter hook ingress device "n1" priority 0; '
             "numgen random mod 1000 < 20 counter drop; }\n}\n")
    try:
        # Single packets on the wire (GUIDE.md section 4), 2 % of n1's lost entering the switch.
        sh("ip", "netns", "exec", n1, "ethtool", "-K", "eth0", *NO_SEGMENTATION)
        sh("ip", "netns", "exec", n2, "ethtool", "-K", "eth0", "gro", "on")
        sh("ip", "netns", "exec", sw, "ethtool", "-K", "n2", *NO_SEGMENTATION, "gro", "off")
        sh("ip", "netns", "exec", sw, "ethtool", "-K", "n1", "gro", "off")
        subprocess.run(["ip", "netns", "exec", sw, "nft", "-f", "-"], input=rules, text=True, check=True)
        # The receiving pod's host end finishes checksums in software: a wrong one would be counted there.
        sh("ip", "netns", "exec", n2, "ethtool", "-K", host_end(c), "tx", "off")
        errors, before = csum_errors(c), world.counters("n2")
        sent, received = transfer(a, c, 10 << 20, seed=3)
        assert sent == received
        after = world.counters("n2")
        assert after.get("rx_partial_runs", 0) > before.get("rx_partial_runs", 0), "no chunk was lost"
        assert after.get("rx_superpackets", 0) > before.get("rx_superpackets", 0), "no frame arrived whole"
        assert csum_errors(c) == errors
        dropped = sh("ip", "netns", "exec", sw, "nft", "list", "table", "netdev", LOSS_TABLE).stdout
        assert "packets 0 " not in dropped
    finally:
        sh("ip", "netns", "exec", sw, "nft", "delete", "table", "netdev", LOSS_TABLE, check=False)
        sh("ip", "netns", "exec", n1, "ethtool", "-K", "eth0", "tso", "on", "gso", "on", "tx-udp-segmentation",
           "on", check=False)
        sh("ip", "netns", "exec", sw, "ethtool", "-K", "n2", "tso", "on", "gso", "on", check=False)
        sh("ip", "netns", "exec", n2, "ethtool", "-K", host_end(c), "tx", "on", check=False)


def test_udp_and_icmp_beside_tcp(world: World) -> None:
    a, c = world.pods["pa"], world.pods["pc"]
    sizes = ["1", "100", "1400", "1418", "3000", "9000"]  # 1418 = pod MTU - 28: the largest unfragmented
    server = subprocess.Popen(["ip", "netns", "exec", c.netns, sys.executable, "-c", UDP_ECHO, c.ip, str(PORT),
                               str(len(sizes) * 5)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: pings(a.netns, c.ip, attempts=1), 10, "ping across")
        ok = sh("ip", "netns", "exec", a.netns, sys.executable, "-c", UDP_CLIENT, c.ip, str(PORT), *sizes,
                timeout=60).stdout.strip()
        assert ok == str(len(sizes))
    finally:
        server.kill()
        server.wait(timeout=10)
    for size in ("56", "1418", "5000"):
        done = sh("ip", "netns", "exec", a.netns, "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-s", size, c.ip,
                  check=False)
        assert done.returncode == 0, done.stdout


def test_a_node_without_offloads_gets_finished_segments(world: World) -> None:
    a, c, d = world.pods["pa"], world.pods["pc"], world.pods["pd"]
    errors, before = csum_errors(d), world.counters("n1")
    sent, received = transfer(a, d, 8 << 20, seed=4)  # super-packets from n1, cut up for n3 in userspace
    assert sent == received
    assert world.counters("n1").get("tx_segmented", 0) > before.get("tx_segmented", 0)
    assert csum_errors(d) == errors  # n3's TUN has no offloads: the kernel checked every checksum
    for src, dst, seed in ((d, a, 5), (d, c, 6)):  # and from the plain node to offload nodes
        sent, received = transfer(src, dst, 4 << 20, seed=seed)
        assert sent == received


def test_lab_bench_measures_every_path_and_leaves_nothing() -> None:
    """``weaved lab bench`` end to end, short: the table has its four rows (the sleeve with and without its
    C hot loop), the C loop carried the traffic in its row, and the lab is gone after."""
    if daemon_missing():
        pytest.skip(daemon_missing() or "")
    for tool in ("iperf3", "ethtool"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.skip(f"{tool} not found: apt-get install -y {tool}")
    before = HostSnapshot.take()
    name = session_base() + "b"
    try:
        out = subprocess.run([sys.executable, "-m", "weaved", "lab", "bench", "--name", name, "--seconds", "1",
                              "--pings", "5", "--loss", "1"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "Gbit/s" not in line]
        assert [r.split("|")[1].strip().split(" (")[0] for r in rows] == [
            "underlay veth", "kernel VXLAN", "**weaved sleeve**, C hot loop", "weaved sleeve, Python loop"]
        assert "dropped in all" in out.stdout and "rx_superpackets=" in out.stdout
        native = re.search(r"native_rx_packets=([\d,]+)", out.stdout)
        assert native is not None and int(native.group(1).replace(",", "")) > 0, out.stdout
    finally:
        teardown_and_check(Lab(name), before)
