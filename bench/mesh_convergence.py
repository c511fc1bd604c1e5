"""Benchmark: mesh convergence time and gossip traffic for N simulated peers.

Runs the real pure core (weaved.core.mesh) on the seeded simulated network from tests/sim, so the
figures are virtual-time seconds and exact byte counts, independent of this machine's speed (the wall
time column only says how long the simulation took). Each peer starts knowing ``--fan-in`` random
others; the connection limit keeps the mesh sparse, as CONN_LIMIT does in a large cluster.

    .venv/bin/python -m bench.mesh_convergence                 # 50, 300 and 1000 peers
    .venv/bin/python -m bench.mesh_convergence --peers 50 300 --loss 0.1

Columns: time until every peer holds the same topology naming every peer with a route; gossip
(topology) bytes sent per peer per second while converging; then over a steady window: gossip bytes
and all control bytes (heartbeats included) per peer per second.
"""

from __future__ import annotations

import argparse
import random
import time

from tests.sim.simnet import LinkProfile, SimNet
from weaved.core.mesh import MeshConfig


def gossip_bytes(net: SimNet) -> int:
    return sum(p.mesh.counters["tx_gossip_bytes"] for p in net.alive())


def all_bytes(net: SimNet) -> int:
    return sum(p.mesh.counters["tx_bytes"] for p in net.alive())


def run(peers: int, *, loss: float, conn_limit: int, fan_in: int, steady: float, seed: int) -> dict[str, float]:
    net = SimNet(seed, LinkProfile(loss=loss, jitter=0.01), MeshConfig(conn_limit=conn_limit))
    rng = random.Random(seed)
    for i in range(peers):
        others = rng.sample([j for j in range(peers) if j != i], fan_in)
        net.add_peer(f"p{i}", [net.address_of(j) for j in others], index=i)
    wall = time.perf_counter()
    took = net.run_until(net.converged, timeout=600.0, check_every=0.5)
    converge_gossip = gossip_bytes(net)
    g0, b0 = gossip_bytes(net), all_bytes(net)
    net.run_for(steady)
    connections = sum(p.mesh.status(net.now).established for p in net.alive()) / peers
    return {
        "peers": peers,
        "converged_s": took,
        "conv_gossip_Bps": converge_gossip / peers / max(took, 1e-9),
        "steady_gossip_Bps": (gossip_bytes(net) - g0) / peers / steady,
        "steady_total_Bps": (all_bytes(net) - b0) / peers / steady,
        "conns_per_peer": connections,
        "wall_s": time.perf_counter() - wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[50, 300, 1000])
    parser.add_argument("--loss", type=float, default=0.0, help="datagram loss rate on every link (0.1 = 10%%)")
    parser.add_argument("--conn-limit", type=int, default=8)
    parser.add_argument("--fan-in", type=int, default=2, help="initial peers each peer is told about")
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady state to measure")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    header = (f"{'peers':>6} {'converge s':>11} {'gossip B/s/peer':>16} {'steady gossip':>14} "
              f"{'steady total':>13} {'conns/peer':>11} {'wall s':>7}")
    print(f"loss={args.loss:.0%} conn_limit={args.conn_limit} fan_in={args.fan_in} seed={args.seed}")
    print(header)
    print("-" * len(header))
    for n in args.peers:
        r = run(n, loss=args.loss, conn_limit=args.conn_limit, fan_in=args.fan_in, steady=args.steady,
                seed=args.seed)
        print(f"{n:>6} {r['converged_s']:>11.2f} {r['conv_gossip_Bps']:>16.0f} {r['steady_gossip_Bps']:>14.1f} "
              f"{r['steady_total_Bps']:>13.1f} {r['conns_per_peer']:>11.1f} {r['wall_s']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
