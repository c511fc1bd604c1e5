"""Benchmark: pod-to-pod throughput and latency over the sleeve, side by side with the underlay and kernel VXLAN.

Builds a 2-node lab (``weaved lab up``), plugs one pod namespace into each node's bridge (as the tests do),
and measures in the same run, over the same underlay (node ↔ switch bridge ↔ node veths):

* **underlay**: node n1 → node n2 on their 198.51.100.0/24 addresses;
* **kernel VXLAN**: a VXLAN device in each node namespace (VNI 42, 203.0.113.0/24, MTU 1450): the
  reference for "fast" (``reference/datapath-performance.md``);
* **sleeve**: pod on n1 → pod on n2 through bridge, TUN, weaved's sleeve and back.

iperf3 TCP for ``--seconds`` (bounded) with 1 and 4 streams, and ``ping`` (``--pings`` at 10 ms) for the RTT.
Everything lives in the lab's namespaces and is removed at the end, even on failure.

    .venv/bin/python -m bench.sleeve_throughput                # needs root and iperf3 (apt-get install iperf3)
    .venv/bin/python -m bench.sleeve_throughput --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from weaved.core import superframe
from weaved.lab.plan import node_netns

LAB_CMD = [sys.executable, "-m", "weaved", "lab"]
VXLAN_NET = "203.0.113"


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def lab(name: str, *args: str) -> str:
    return sh(*LAB_CMD, args[0], "--name", name, *args[1:]).stdout


def in_node(name: str, node: str, *argv: str) -> str:
    return sh(*LAB_CMD, "exec", "--name", name, node, "--", *argv).stdout


@contextmanager
def two_nodes(name: str) -> Iterator[dict[str, str]]:
    """A 2-node lab with one pod per node; yields the addresses to measure between."""
    pods: list[str] = []
    try:
        lab(name, "up", "--nodes", "2")
        deadline = time.monotonic() + 60
        while True:
            report = json.loads(in_node(name, "n1", "weaved", "report"))
            if report["datapath"]["state"] == "ready" and report["datapath"]["peers"] == 1:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the data path did not become ready within 60 s")
            time.sleep(0.5)
        mtu = str(report["datapath"]["mtu"])
        ips = {}
        for node, pod in (("n1", "pa"), ("n2", "pb")):
            netns = f"{name}-{pod}"
            cidr = in_node(name, node, "weaved", "ipam", "alloc", f"bench-{pod}").strip()
            gateway = in_node(name, node, "weaved", "ipam", "gateway").strip().split("/")[0]
            sh("ip", "netns", "add", netns)
            pods.append(netns)
            node_ns = node_netns(name, node)
            gso = str(superframe.tun_gso_max_size(int(mtu)))  # as the CNI plugin makes pod interfaces
            sh("ip", "-n", node_ns, "link", "add", f"v{pod}", "mtu", mtu, "gso_max_size", gso, "type", "veth",
               "peer", "name", "eth0", "netns", netns, "gso_max_size", gso)
            sh("ip", "-n", node_ns, "link", "set", f"v{pod}", "master", "weave", "up")
            sh("ip", "-n", netns, "link", "set", "lo", "up")
            sh("ip", "-n", netns, "link", "set", "eth0", "mtu", mtu, "up")
            sh("ip", "-n", netns, "addr", "add", cidr, "dev", "eth0")
            sh("ip", "-n", netns, "route", "add", "default", "via", gateway)
            ips[pod] = cidr.split("/")[0]
        for k, node in enumerate(("n1", "n2"), start=1):
            ns = node_netns(name, node)
            other = f"198.51.100.{12 if k == 1 else 11}"
            sh("ip", "-n", ns, "link", "add", "vxb", "type", "vxlan", "id", "42", "remote", other, "dstport", "4789",
               "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{VXLAN_NET}.{k}/24", "dev", "vxb")
            sh("ip", "-n", ns, "link", "set", "vxb", "mtu", "1450", "up")
        yield {"mtu": mtu, **ips}
    finally:
        for netns in pods:
            sh("ip", "netns", "del", netns, check=False)
        sh(*LAB_CMD, "down", "--name", name, check=False)


def iperf(server_ns: str, client_ns: str, address: str, seconds: int, streams: int) -> tuple[float, int]:
    """Gbit/s received and TCP retransmits of one bounded iperf3 run."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5301"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = sh("ip", "netns", "exec", client_ns, "iperf3", "-c", address, "-p", "5301", "-t", str(seconds),
                 "-P", str(streams), "-J", timeout=seconds + 30).stdout
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
    end = json.loads(out)["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0))


def rtt_ms(netns: str, address: str, count: int) -> float:
    out = sh("ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", str(count), "-i", "0.01", address,
             timeout=count + 30).stdout
    return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--name", default=f"b{os.getpid() % 100000}", help="lab name (default b<pid>)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    if shutil.which("iperf3") is None:
        raise SystemExit("iperf3 not found: apt-get install -y iperf3")
    with two_nodes(args.name) as ips:
        n1, n2 = node_netns(args.name, "n1"), node_netns(args.name, "n2")
        paths = [
            ("underlay veth", n2, n1, "198.51.100.12", n1),
            ("kernel VXLAN", n2, n1, f"{VXLAN_NET}.2", n1),
            (f"weaved sleeve (pod MTU {ips['mtu']})", f"{args.name}-pb", f"{args.name}-pa", ips["pb"],
             f"{args.name}-pa"),
        ]
        rows = []
        for label, server, client, address, pinger in paths:
            p1, r1 = iperf(server, client, address, args.seconds, 1)
            p4, r4 = iperf(server, client, address, args.seconds, 4)
            rows.append((label, p1, r1, p4, r4, rtt_ms(pinger, address, args.pings)))
    vxlan = rows[1]
    print(f"iperf3 TCP {args.seconds} s, ping {args.pings} × 10 ms; 2-node lab, one run (figures move ±20%)\n")
    print("| path | -P1 Gbit/s | retr | -P4 Gbit/s | retr | ÷ VXLAN (P1) | ping RTT ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, p1, r1, p4, r4, rtt in rows:
        print(f"| {label} | {p1:.2f} | {r1} | {p4:.2f} | {r4} | {p1 / vxlan[1]:.3f} | {rtt:.3f} |")


if __name__ == "__main__":
    main()
