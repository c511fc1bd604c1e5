"""Benchmark: CNI ADD and DEL latency of weave-net against the reference bridge + host-local plugins.

Both run in the same node namespace in the same run, driven by the same client (the cnitool clone on
Debian's libcni, what containerd and CRI-O link), alternating pod by pod so both see the same machine
load. weave-net is the static C forwarder plus the real daemon (IPAM with its fsync'd state file, the
CNI socket server, pyroute2); the reference is Debian's containernetworking-plugins 1.1.1 (``bridge``
with ``host-local``, each a Go binary doing everything in-process, host-local writing a file per lease).
The pod namespace is created before and deleted after the timed calls. Needs root.

    .venv/bin/python -m bench.cni_latency            # 50 pods each
    .venv/bin/python -m bench.cni_latency --pods 200

Columns: pods, median and 90th percentile of the wall time of one ``cnitool add`` / ``cnitool del``
(process start to exit, i.e. what a runtime waits for), in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from tests.cni.conftest import GATEWAY, Node, build_cnitool, build_forwarder, cnitool_missing, run, why_missing
from tests.netns.conftest import session_base

REF_SUBNET = "10.99.0.0/16"


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=120)
    took = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
    return took


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=50)
    args = parser.parse_args()
    reason = why_missing("ip", "gcc", "nsenter") or cnitool_missing()
    if reason or not Path("/usr/lib/cni/bridge").exists():
        raise SystemExit(f"cannot run: {reason or 'containernetworking-plugins missing'}")
    tool = build_cnitool()
    node = Node(f"{session_base()}bench", Path(f"/tmp/wcni-{session_base()}bench"), build_forwarder())
    try:
        node.setup()
        node.write_conf(portmap=False)
        node.start()
        ref_netd = node.work / "ref.d"
        ref_netd.mkdir()
        (ref_netd / "10-ref.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "weave", "plugins": [{
                "type": "bridge", "bridge": "refbr0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": REF_SUBNET}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(node.work / "host-local")}}]}))
        samples: dict[tuple[str, str], list[float]] = {}
        for i in range(args.pods):
            for label, netd in (("weave-net", node.netd), ("bridge+host-local", ref_netd)):
                pod = f"{node.name}q{i % 2}"
                run(["ip", "netns", "add", pod])
                env = {"NETCONFPATH": str(netd), "CNI_PATH": str(node.bin), "CNI_CACHE_DIR": str(node.work / "cache"),
                       "CNI_CONTAINERID": f"bench{i}", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
                argv = ["nsenter", f"--net=/run/netns/{node.netns}", str(tool)]
                try:
                    add = _time([*argv, "add", "weave", f"/run/netns/{pod}"], env)
                    dele = _time([*argv, "del", "weave", f"/run/netns/{pod}"], env)
                finally:
                    run(["ip", "netns", "del", pod])
                samples.setdefault((label, "ADD"), []).append(add)
                samples.setdefault((label, "DEL"), []).append(dele)
                samples.setdefault((label, "ADD+DEL"), []).append(add + dele)
        assert node.veths() == [] and node.leases() == [], "the benchmark leaked attachments"
        print(f"CNI latency, cnitool clone (libcni 1.1.2), gateway {GATEWAY}, {args.pods} pods per plugin")
        print(f"{'plugin':<20} {'op':<8} {'N':>5} {'median ms':>10} {'p90 ms':>8}")
        for (label, op), values in samples.items():
            median, p90 = _quantiles(values)
            print(f"{label:<20} {op:<8} {len(values):>5} {median:>10.1f} {p90:>8.1f}")
    finally:
        node.cleanup()


if __name__ == "__main__":
    main()
