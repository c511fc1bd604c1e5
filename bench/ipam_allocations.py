"""Benchmark: IPAM allocations per second through the local API, and how long a new node waits for space.

Builds a 3-node ``weaved lab`` (network namespaces on this machine; root needed), stops n3 at once, and lets
n1 and n2 agree on the ring between them. Then, in one run:

* **weaved API**: allocations through ``POST /ip/{id}`` on n1, one client with keep-alive (each answer waits
  for the lease to be fsync'd), then 8 clients at once (their changes share a write);
* **host-local**: the reference CNI IPAM plugin from containernetworking-plugins, exec'd once per allocation as
  a runtime does, over the same range with its own data dir (it writes one file per lease, without fsync);
* **new node**: n3 starts with no space of its own; the time from ``lab start`` until its first allocation is
  answered (mesh join, ring gossip, a donation from a peer, the write), and that first allocation alone.

    .venv/bin/python -m bench.ipam_allocations            # 300 allocations per row
    .venv/bin/python -m bench.ipam_allocations --count 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAB = [sys.executable, "-m", "weaved", "lab"]
HOST_LOCAL = Path("/usr/lib/cni/host-local")

CLIENT = r"""
import http.client, json, os, socket, sys, threading, time
prefix, count, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
latencies = []
lock = threading.Lock()
class Unix(http.client.HTTPConnection):  # the node's control socket (lab exec sets WEAVE_API_SOCKET)
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(os.environ["WEAVE_API_SOCKET"])
def work(w):
    conn = Unix("localhost", timeout=60)
    mine = []
    for i in range(w, count, workers):
        t = time.perf_counter()
        conn.request("POST", f"/ip/{prefix}-{i}?ifname=eth0")
        resp = conn.getresponse(); body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"allocation failed: {resp.status} {body!r}")
        mine.append(time.perf_counter() - t)
    with lock:
        latencies.extend(mine)
start = time.perf_counter()
threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"seconds": time.perf_counter() - start, "latencies": latencies}))
"""


def lab(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([*LAB, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"weaved lab {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def in_node(name: str, node: str, *cmd: str, timeout: float = 300) -> str:
    return lab("exec", "--name", name, node, "--", *cmd, timeout=timeout)


def row(label: str, count: int, seconds: float, latencies: list[float]) -> dict[str, object]:
    ordered = sorted(latencies)
    return {"path": label, "n": count, "per_s": count / seconds, "median_ms": statistics.median(ordered) * 1e3,
            "p90_ms": ordered[int(len(ordered) * 0.9) - 1] * 1e3}


def weaved_api(name: str, prefix: str, count: int, workers: int) -> dict[str, object]:
    result = json.loads(in_node(name, "n1", sys.executable, "-c", CLIENT, prefix, str(count), str(workers)))
    label = f"weaved API, {workers} client{'s' if workers > 1 else ''}"
    return row(label, count, result["seconds"], result["latencies"])


def host_local(count: int) -> dict[str, object]:
    """The reference: one exec of host-local per allocation, as a runtime would call it."""
    with tempfile.TemporaryDirectory(prefix="bench-hl-") as data_dir:
        config = json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "ipam": {
            "type": "host-local", "ranges": [[{"subnet": "10.32.0.0/12"}]], "dataDir": data_dir}})
        latencies = []
        start = time.perf_counter()
        for i in range(count):
            env = {**os.environ, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"hl-{i}", "CNI_NETNS": "/nonexistent",
                   "CNI_IFNAME": "eth0", "CNI_PATH": str(HOST_LOCAL.parent)}
            t = time.perf_counter()
            subprocess.run([str(HOST_LOCAL)], input=config, env=env, capture_output=True, text=True, check=True)
            latencies.append(time.perf_counter() - t)
        return row("host-local plugin, exec per allocation", count, time.perf_counter() - start, latencies)


def new_node_gets_space(name: str) -> tuple[float, float]:
    """Seconds from ``lab start n3`` to its first address, and the first allocation's own latency."""
    start = time.perf_counter()
    lab("start", "--name", name, "n3")
    while time.perf_counter() - start < 60:
        proc = subprocess.run([*LAB, "exec", "--name", name, "n3", "--", "weaved", "status", "peers"],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0 and "(n1)" in proc.stdout and "(n2)" in proc.stdout:
            break
        time.sleep(0.05)
    before = time.perf_counter()
    in_node(name, "n3", "weaved", "ipam", "alloc", "first-on-n3", timeout=60)
    done = time.perf_counter()
    return done - start, done - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="allocations per row")
    args = parser.parse_args()
    name = f"bi{os.getpid() % 10000}"
    lab("up", "--name", name, "--nodes", "3", "--pods-per-node", "0", timeout=180)
    try:
        lab("kill", "--name", name, "n3")
        in_node(name, "n1", "weaved", "ipam", "alloc", "warm-up", timeout=60)  # n1 and n2 agree on the ring
        rows = [weaved_api(name, "seq", args.count, 1), weaved_api(name, "par", args.count, 8)]
        if HOST_LOCAL.exists():
            rows.append(host_local(args.count))
        total, first = new_node_gets_space(name)
    finally:
        lab("down", "--name", name)
    print(f"{'path':<40} {'n':>5} {'alloc/s':>8} {'median ms':>10} {'p90 ms':>8}")
    for r in rows:
        print(f"{r['path']:<40} {r['n']:>5} {r['per_s']:>8.0f} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f}")
    if not HOST_LOCAL.exists():
        print(f"(no reference row: {HOST_LOCAL} missing; apt-get install containernetworking-plugins)")
    print(f"\nnew node n3: {total:.2f} s from `lab start` to its first address; that allocation took {first:.2f} s")


if __name__ == "__main__":
    main()
