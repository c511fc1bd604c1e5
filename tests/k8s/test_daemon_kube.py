"""Two real daemons in Kubernetes mode against the API server double: they find each other through the Node
list alone, and when one Node is deleted the survivor reclaims its peer's IPAM space."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.k8s.apiserver import ApiServer, running
from weaved.adapters.client import ApiError, Client, DaemonUnreachable

pytestmark = pytest.mark.anyio

NS, CM = "kube-system", "weaved"


def free_port(kind: int, host: str) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def report(http: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{http}/report", timeout=2) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def allocate(state_dir: Path, container: str) -> bool:
    """An address through the daemon's control socket (its default one, in its state directory)."""
    try:
        return bool(Client.unix(state_dir / "weaved.sock", timeout=20).allocate(container, "eth0"))
    except (ApiError, DaemonUnreachable):  # not yet: IPAM still agreeing on the split
        return False


async def until(check: Any, what: str, logs: list[Path], timeout: float = 30.0) -> None:
    with anyio.move_on_after(timeout):
        while True:
            try:
                if await anyio.to_thread.run_sync(check):
                    return
            except OSError:
                pass
            await anyio.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n" + "\n".join(f"--- {p}\n{p.read_text()}" for p in logs))


async def test_discovery_forms_the_mesh_and_a_deleted_node_is_reclaimed(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM, "127.0.0.1")
    async with running(ApiServer(token=None)) as api:
        api.create_configmap(NS, CM)
        api.add_node("node-a", "127.0.0.1")
        api.add_node("node-b", "127.0.0.2")
        procs: dict[str, subprocess.Popen[bytes]] = {}
        https: dict[str, str] = {}
        logs: list[Path] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEAVE_", "KUBE_", "CONN_", "IPALLOC_"))}
        try:
            for node, ip in (("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")):
                https[node] = f"127.0.0.1:{free_port(socket.SOCK_STREAM, '127.0.0.1')}"
                log = tmp_path / f"{node}.log"
                logs.append(log)
                with open(log, "wb") as sink:
                    procs[node] = subprocess.Popen(
                        [sys.executable, "-m", "weaved", "run", "--kube", "--host", ip, "--port", str(port),
                         "--http-addr", https[node], "--metrics-addr",
                         f"127.0.0.1:{free_port(socket.SOCK_STREAM, '127.0.0.1')}",
                         "--state-dir", str(tmp_path / node), "--ipalloc-range", "10.44.0.0/24",
                         "--no-datapath"],  # the host's own namespace: no bridge, TUN or routes
                        stdout=sink, stderr=subprocess.STDOUT,
                        env={**env, "HOSTNAME": node, "WEAVED_KUBE_API": api.url})
            # no --peer anywhere: the peers come from the Node list
            await until(lambda: all(len(report(h)["peers"]) == 2 for h in https.values()), "the mesh", logs)
            names = {node: report(h)["name"] for node, h in https.items()}
            await until(lambda: api.configmap_data(NS, CM) == names, "both registrations", logs)
            # IPAM splits the range on first use (consensus of the two Nodes listed at start)
            await until(lambda: allocate(tmp_path / "node-a", "pod-1"), "an address on node-a", logs)
            await until(lambda: {o["name"] for o in report(https["node-a"])["ipam"]["owners"]} == set(names.values()),
                        "the range split between both peers", logs)

            os.kill(procs["node-b"].pid, signal.SIGKILL)  # the node's machine dies...
            procs["node-b"].wait(timeout=10)
            api.delete_node("node-b")  # ...and the cluster autoscaler deletes its Node
            await until(lambda: api.configmap_data(NS, CM) == {"node-a": names["node-a"]}, "reclaim", logs)
            text = logs[0].read_text()
            # node-a's mesh still reached node-b's peer for a heartbeat timeout: rmpeer was refused, then retried
            assert "node deleted" in text and "reclaim claimed" in text and "reclaimed" in text, text
            await until(lambda: [o["name"] for o in report(https["node-a"])["ipam"]["owners"]] == [names["node-a"]],
                        "node-a to own the whole range", logs)
            assert report(https["node-a"])["ipam"]["size"] == 256
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
