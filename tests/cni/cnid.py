"""The real daemon (``weaved run``'s :func:`~weaved.adapters.daemon.serve`) with the pod network read from a
bridge the test made: ``python -m tests.cni.cnid --pod-bridge weave [weaved run flags...]``.

Only the pod-network provider differs from ``weaved run`` (the data path that builds the node network is
another module's job); IPAM, the CNI socket server and the spool are the daemon's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys

import anyio

from weaved.adapters.daemon import StartupError, serve
from weaved.adapters.identity import load_identity
from weaved.adapters.logs import configure_logging
from weaved.adapters.webserver import ListenError
from weaved.cni.bridge import existing_bridge
from weaved.cni.server import CniSocketError
from weaved.config import add_run_arguments, parse_settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pod-bridge", required=True)
    parser.add_argument("--pod-mtu", type=int, default=None)
    add_run_arguments(parser)
    args = vars(parser.parse_args())
    bridge, mtu = args.pop("pod_bridge"), args.pop("pod_mtu")
    # The test made the node's bridge itself: the data path must not build its own network here.
    settings = dataclasses.replace(parse_settings(args, os.environ, socket.gethostname()), datapath=False)
    configure_logging(settings.log_format, settings.log_level)
    identity = load_identity(settings.state_dir, settings.nickname)
    failures: list[str] = []
    try:
        anyio.run(lambda: serve(settings, identity, pod_network=existing_bridge(bridge, mtu)), backend="asyncio")
    except* (StartupError, ListenError, CniSocketError) as group:  # as `weaved run` reports them
        failures += [str(exc) for exc in group.exceptions]
    for failure in failures:
        print(f"cannot start: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
