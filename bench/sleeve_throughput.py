"""Benchmark: pod-to-pod throughput and latency over the sleeve, side by side with the underlay and kernel VXLAN.

The same as ``weaved lab bench`` (see :mod:`weaved.lab.bench` for what is measured and how):

    sudo .venv/bin/python -m bench.sleeve_throughput                # no loss, veth underlay
    sudo .venv/bin/python -m bench.sleeve_throughput --loss 1       # 1 % of wire packets dropped
"""

from __future__ import annotations

import argparse
import os

from weaved.lab import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    parser.add_argument("--name", default=f"b{os.getpid() % 100000}", help="lab name (default b<pid>)")
    return bench.run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
