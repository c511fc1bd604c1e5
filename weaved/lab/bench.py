"""``weaved lab bench``: the sleeve side by side with the underlay and kernel VXLAN, in one run.

Builds its own 2-node lab (``weaved lab up --pods-per-node 1``: one pod per node, made through the CNI
plugin as a runtime makes it), adds a kernel VXLAN between the two node
namespaces over the same underlay, and measures on each path, one after the other:

* **underlay**: node n1 → node n2 on their 198.51.100.0/24 addresses;
* **kernel VXLAN**: VNI 42, 203.0.113.0/24, MTU 1450 (the reference for "fast");
* **weaved sleeve**: pod on n1 → pod on n2 through bridge, TUN, weaved and back, with the C hot loop;
* **weaved sleeve, Python loop**: the same after both daemons were restarted with ``WEAVE_NO_NATIVE=1``
  (the pods and the TUN stay), so the C pump's gain is measured in the same run (``--no-python-loop``
  skips it);
* **encrypted sleeve** (``--encrypted``, or ``--password-file PATH``): the C loop again after both daemons
  were restarted with a mesh password (``lab start --password-file``: the real handshake, session keys,
  rekeying), every chunk sealed (AES-256-GCM, ``weaved.core.sleeveseal``) and the pods' MTU lowered by the
  seal's 28 bytes as the daemons now give it. ``--encrypted`` makes a random password in the lab's own
  directory.

Per path: iperf3 TCP ``-P 1`` and ``-P 4`` for ``--seconds`` (Gbit/s received, retransmits), ``ping`` at
10 ms intervals (RTT with the CPUs idle between packets) and flood ping (back to back), a sockperf TCP
ping-pong of 64-byte messages (round trips per second) when sockperf is installed, and the CPU the whole
machine spent per GB moved during the ``-P 4`` run (``/proc/stat``: the two iperf3 processes, the kernel,
and for the sleeve the two daemons).

``--loss PCT`` first turns the underlay into a wire that carries single packets (GUIDE.md section 4: node
ends segment in software and receive with GRO, as a NIC does; switch ends neither segment nor coalesce:
a veth only lets its peer coalesce what a sender without TSO gave it) and drops PCT % of the packets that
enter the switch from either node (nftables ``numgen``, since netem is not in this kernel); the drop
counters are printed. Everything lives in the lab's namespaces and is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from weaved.core import superframe
from weaved.core.sleeveseal import OVERHEAD as SEAL_OVERHEAD
from weaved.lab.plan import lab_dir, node_address, node_netns, switch_netns

VXLAN_NET = "203.0.113"
IPERF_PORT = "5301"
SOCKPERF_PORT = "11111"
LOSS_TABLE = "weaved_bench_loss"


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def lab_cmd(name: str, *args: str) -> str:
    return sh(sys.executable, "-m", "weaved", "lab", args[0], "--name", name, *args[1:], timeout=300).stdout


def in_node(name: str, node: str, *argv: str) -> str:
    return sh(sys.executable, "-m", "weaved", "lab", "exec", "--name", name, node, "--", *argv).stdout


@dataclass(frozen=True)
class Path:
    label: str
    server_ns: str
    client_ns: str
    address: str


@dataclass
class Row:
    path: Path
    p1: float = 0.0
    r1: int = 0
    p4: float = 0.0
    r4: int = 0
    cpu_per_gb: float = 0.0
    ping_idle: float = 0.0
    ping_flood: float = 0.0
    rr: float | None = None


@contextmanager
def two_nodes(name: str) -> Iterator[dict[str, str]]:
    """A 2-node lab with one pod per node, made by the CNI plugin as a runtime would, and a VXLAN between the
    nodes; yields the pod MTU and each node's pod namespace and address."""
    try:
        lab_cmd(name, "up", "--nodes", "2", "--pods-per-node", "1")
        status = json.loads(lab_cmd(name, "status", "--json"))
        pods = {p["node"]: p for p in status["pods"]}
        report = json.loads(in_node(name, "n1", "weaved", "report"))
        for k, (node, other) in enumerate((("n1", "n2"), ("n2", "n1")), start=1):
            ns = node_netns(name, node)
            sh("ip", "-n", ns, "link", "add", "vxb", "type", "vxlan", "id", "42", "remote",
               str(node_address(other).ip), "dstport", "4789", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{VXLAN_NET}.{k}/24", "dev", "vxb")
            sh("ip", "-n", ns, "link", "set", "vxb", "mtu", "1450", "up")
        yield {"mtu": str(report["datapath"]["mtu"]),
               **{f"{node}_ns": pods[node]["netns"] for node in ("n1", "n2")},
               **{f"{node}_ip": pods[node]["address"].split("/")[0] for node in ("n1", "n2")}}
    finally:
        sh(sys.executable, "-m", "weaved", "lab", "down", "--name", name, check=False, timeout=300)


def lossy_wire(name: str, percent: float) -> None:
    """Single packets on the wire and ``percent`` % of them dropped where they enter the switch."""
    sw = switch_netns(name)
    no_segmentation = ("tso", "off", "gso", "off", "tx-udp-segmentation", "off", "tx-udp_tnl-segmentation", "off")
    for node in ("n1", "n2"):
        sh("ip", "netns", "exec", node_netns(name, node), "ethtool", "-K", "eth0", *no_segmentation, "gro", "on")
        # The switch end too: a veth hands its peer's GRO only packets from a sender without TSO.
        sh("ip", "netns", "exec", sw, "ethtool", "-K", node, *no_segmentation, "gro", "off")
    threshold = round(percent * 1000)  # of 100000
    chains = "".join(
        f'  chain {node} {{ type filter hook ingress device "{node}" priority 0; '
        f"numgen random mod 100000 < {threshold} counter drop; }}\n" for node in ("n1", "n2"))
    proc = subprocess.run(["ip", "netns", "exec", sw, "nft", "-f", "-"], input=f"table netdev {LOSS_TABLE} {{\n"
                          + chains + "}\n", text=True, capture_output=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"nft loss rule: {proc.stderr.strip()}")


def restart_without_native(name: str) -> None:
    """Both daemons again, with the offload sleeve in Python alone; returns once both route to each other."""
    restart(name, {**os.environ, "WEAVE_NO_NATIVE": "1"}, "python", sealed=False)


def restart_sealed(name: str, ips: dict[str, str], password_file: str | None) -> int:
    """Both daemons again (C loop) with a mesh password; the pods get the sealed MTU. Returns it."""
    env = {k: v for k, v in os.environ.items() if k != "WEAVE_NO_NATIVE"}
    if password_file is None:
        path = lab_dir(name) / "bench-password"
        path.write_text(os.urandom(16).hex() + "\n")
        path.chmod(0o600)
        password_file = str(path)
    restart(name, env, "C", sealed=True, password_file=password_file)
    mtu = int(json.loads(in_node(name, "n1", "weaved", "report"))["datapath"]["mtu"])
    if mtu != int(ips["mtu"]) - SEAL_OVERHEAD:
        raise SystemExit(f"the sealed sleeve's pod MTU is {mtu}, not the plain {ips['mtu']} - {SEAL_OVERHEAD}")
    for node in ("n1", "n2"):
        sh("ip", "-n", ips[f"{node}_ns"], "link", "set", "eth0", "mtu", str(mtu))
        sh("ip", "-n", ips[f"{node}_ns"], "link", "set", "eth0", "gso_max_size",
           str(superframe.tun_gso_max_size(mtu)), check=False)
    return mtu


def restart(name: str, env: dict[str, str], hot_loop: str, *, sealed: bool, password_file: str | None = None) -> None:
    """Both daemons again with ``env``; returns once both route to each other with that loop (and, when
    ``sealed``, seal to each other)."""
    for node in ("n1", "n2"):
        lab_cmd(name, "kill", node)
        # The VXLAN row is measured: its device goes, or the restarted daemon would take its MTU (1450) for
        # the underlay's and make its chunks too small for full-size packets.
        sh("ip", "-n", node_netns(name, node), "link", "del", "vxb", check=False)
    for node in ("n1", "n2"):
        password = ["--password-file", password_file] if password_file else []
        proc = subprocess.run([sys.executable, "-m", "weaved", "lab", "start", "--name", name, node, *password],
                              env=env, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"lab start {node}: {proc.stderr.strip()}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        reports = [json.loads(in_node(name, node, "weaved", "report"))["datapath"] for node in ("n1", "n2")]
        if all(r["state"] == "ready" and r["peers"] == 1 and r.get("hot_loop") == hot_loop
               and r.get("sealed_peers", 0) == (1 if sealed else 0) for r in reports):
            return
        time.sleep(1)
    raise SystemExit(f"the restarted daemons ({hot_loop} loop, sealed: {sealed}) did not route to each other "
                     "within 90 s")


def dropped(name: str) -> int:
    out = sh("ip", "netns", "exec", switch_netns(name), "nft", "list", "table", "netdev", LOSS_TABLE,
             check=False).stdout
    return sum(int(n) for n in re.findall(r"packets (\d+)", out))


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent working so far (all cores): user, nice, system, irq and softirq;
    idle, iowait and the time the hypervisor stole are not ours."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def iperf(path: Path, seconds: int, streams: int) -> tuple[float, int, float]:
    """Gbit/s received, TCP retransmits and machine CPU seconds per GB of one bounded iperf3 run."""
    server = subprocess.Popen(["ip", "netns", "exec", path.server_ns, "iperf3", "-s", "-1", "-p", IPERF_PORT],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        before = busy_cpu_seconds()
        out = sh("ip", "netns", "exec", path.client_ns, "iperf3", "-c", path.address, "-p", IPERF_PORT,
                 "-t", str(seconds), "-P", str(streams), "-J", timeout=seconds + 30).stdout
        cpu = busy_cpu_seconds() - before
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
    end = json.loads(out)["end"]
    received = end["sum_received"]
    gbytes = received["bytes"] / 1e9
    return (received["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0)),
            cpu / gbytes if gbytes else float("inf"))


def ping_ms(path: Path, count: int, *, flood: bool) -> float:
    argv = ["ip", "netns", "exec", path.client_ns, "ping", "-n", "-q", "-c", str(count)]
    argv += ["-f"] if flood else ["-i", "0.01"]
    out = sh(*argv, path.address, timeout=count * 0.02 + 30).stdout
    return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])


def round_trips(path: Path, seconds: int) -> float | None:
    """sockperf TCP ping-pong, 64-byte messages: round trips per second (None without sockperf)."""
    if shutil.which("sockperf") is None:
        return None
    server = subprocess.Popen(["ip", "netns", "exec", path.server_ns, "sockperf", "sr", "--tcp", "-i", path.address,
                               "-p", SOCKPERF_PORT], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = sh("ip", "netns", "exec", path.client_ns, "sockperf", "pp", "--tcp", "-i", path.address,
                 "-p", SOCKPERF_PORT, "-m", "64", "-t", str(seconds), timeout=seconds + 30).stdout
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
    match = re.search(r"RunTime=([\d.]+) sec; SentMessages=\d+; ReceivedMessages=(\d+)", out)
    return int(match.group(2)) / float(match.group(1)) if match else None


def measure(path: Path, args: argparse.Namespace) -> Row:
    row = Row(path)
    row.p1, row.r1, _ = iperf(path, args.seconds, 1)
    row.p4, row.r4, row.cpu_per_gb = iperf(path, args.seconds, 4)
    row.ping_idle = ping_ms(path, args.pings, flood=False)
    row.ping_flood = ping_ms(path, args.pings * 10, flood=True)
    row.rr = round_trips(path, 3)
    return row


def table(rows: list[Row]) -> str:
    vxlan = next(r for r in rows if r.path.label == "kernel VXLAN")
    lines = ["| path | -P1 Gbit/s | retr | -P4 Gbit/s | retr | -P4 ÷ VXLAN | ping ms (10 ms apart) | "
             "ping ms (flood) | flood ÷ VXLAN | TCP RR/s (64 B) | CPU s/GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rr = f"{r.rr:,.0f}" if r.rr is not None else "-"
        lines.append(f"| {r.path.label} | {r.p1:.2f} | {r.r1} | {r.p4:.2f} | {r.r4} | {r.p4 / vxlan.p4:.2f} | "
                     f"{r.ping_idle:.3f} | {r.ping_flood:.3f} | {r.ping_flood / vxlan.ping_flood:.1f} | {rr} | "
                     f"{r.cpu_per_gb:.1f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("weaved lab bench: needs root (network namespaces)")
    for tool, package in (("iperf3", "iperf3"), ("ethtool", "ethtool")):
        if shutil.which(tool) is None:
            raise SystemExit(f"weaved lab bench: {tool} not found: apt-get install -y {package}")
    name = args.name
    with two_nodes(name) as ips:
        if args.loss:
            lossy_wire(name, args.loss)
        n1, n2 = node_netns(name, "n1"), node_netns(name, "n2")
        paths = [
            Path("underlay veth", n2, n1, str(node_address("n2").ip)),
            Path("kernel VXLAN", n2, n1, f"{VXLAN_NET}.2"),
            Path(f"**weaved sleeve**, C hot loop (pod MTU {ips['mtu']})", ips["n2_ns"], ips["n1_ns"], ips["n2_ip"]),
        ]
        rows = [measure(path, args) for path in paths]
        counters = json.loads(in_node(name, "n2", "weaved", "report"))["datapath"]["counters"]
        sealed: dict[str, int] = {}
        if args.python_loop:
            restart_without_native(name)
            rows.append(measure(Path("weaved sleeve, Python loop", ips["n2_ns"], ips["n1_ns"], ips["n2_ip"]), args))
        if args.encrypted or args.password_file:
            mtu = restart_sealed(name, ips, args.password_file)
            rows.append(measure(Path(f"**encrypted sleeve**, C hot loop (pod MTU {mtu})", ips["n2_ns"], ips["n1_ns"],
                                     ips["n2_ip"]), args))
            sealed = json.loads(in_node(name, "n2", "weaved", "report"))["datapath"]["counters"]
        lost = dropped(name) if args.loss else 0
    wire = (f"single-packet wire, {args.loss:g} % of packets dropped entering the switch ({lost:,} dropped in all)"
            if args.loss else "veth underlay as created (offloads on)")
    print(f"iperf3 TCP {args.seconds} s; ping {args.pings} at 10 ms and {args.pings * 10} flood; "
          f"sockperf 3 s; 2-node lab; {wire}; one run (figures move ±20%)\n")
    print(table(rows))
    keys = ("rx_superpackets", "rx_chunks", "rx_partial_runs", "rx_packets", "native_rx_packets", "native_tx_packets")
    print("\nC-loop sleeve receiver (n2): " + ", ".join(f"{k}={counters.get(k, 0):,}" for k in keys))
    if args.encrypted or args.password_file:
        more = (*keys, "rx_sealed", "tx_sealed", "drop_udp_auth", "drop_udp_replay")
        print("Encrypted sleeve receiver (n2): " + ", ".join(f"{k}={sealed.get(k, 0):,}" for k in more))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run (default 5)")
    parser.add_argument("--pings", type=int, default=200, help="pings at 10 ms (ten times as many flood pings)")
    parser.add_argument("--no-python-loop", dest="python_loop", action="store_false",
                        help="skip the row of the sleeve restarted without its C hot loop")
    parser.add_argument("--encrypted", action="store_true",
                        help="add the encrypted sleeve row (C loop, a random mesh password)")
    parser.add_argument("--password-file", metavar="PATH",
                        help="add the encrypted sleeve row with this mesh password")
    parser.add_argument("--loss", type=float, default=0.0, metavar="PCT",
                        help="drop PCT %% of underlay packets on a single-packet wire (e.g. 1)")
