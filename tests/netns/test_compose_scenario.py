"""The docker-compose lab's topology as a `weaved lab` scenario: three nodes, users/auth/tasks on different nodes.

No Docker engine runs here, so the compose file is validated offline (tests/unit/test_compose.py) and its
topology runs on the lab instead. Unlike compose, where the services share their node's namespace, here each
service is a pod made by the CNI plugin, so every call crosses the overlay: tasks (n3) → auth (n2) → users (n1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.netns.conftest import HostSnapshot, Lab, daemon_missing, session_base, teardown_and_check
from weaved.demo.services import TASKS, token_for

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

PLACEMENT = {"users": ("n1", 8081), "auth": ("n2", 8082), "tasks": ("n3", 8083)}

FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
    print(resp.read().decode())
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    why = daemon_missing()
    if why:
        pytest.skip(why)
    before = HostSnapshot.take()
    lab = Lab(session_base() + "c")
    try:
        lab.run("up", "--nodes", "3", "--pods-per-node", "0", timeout=300)
        yield lab
    finally:
        teardown_and_check(lab, before)


def wait_healthy(netns: str, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the service exited with {proc.returncode}"
        check = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", FETCH, url],
                               capture_output=True, check=False)
        if check.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} not healthy within 20 s")


def test_tasks_auth_users_call_each_other_across_the_overlay(lab: Lab) -> None:
    address: dict[str, str] = {}
    netns: dict[str, str] = {}
    for service, (node, _) in PLACEMENT.items():
        lab.run("pod", "add", node, service)
        pod = next(p for p in lab.status()["pods"] if p["name"] == service)
        address[service], netns[service] = pod["address"].split("/")[0], pod["netns"]
    url = {s: f"http://{address[s]}:{port}" for s, (_, port) in PLACEMENT.items()}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for service, (_, port) in PLACEMENT.items():
            argv = ["ip", "netns", "exec", netns[service], sys.executable, "-m", "weaved.demo", service,
                    "--port", str(port), "--users", url["users"], "--auth", url["auth"]]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_healthy(netns[service], f"{url[service]}/healthz", procs[-1])
        # From node n1's own namespace (host → pod on n3), the chain n3 → n2 → n1 answers.
        answer = lab.exec("n1", sys.executable, "-c", FETCH, f"{url['tasks']}/tasks?token={token_for('grace')}",
                          check=True).stdout
        body = json.loads(answer)
        assert body["service"] == "tasks" and body["user"] == "grace" and body["tasks"] == TASKS["grace"]
        # A bad token is refused by auth, across the overlay too.
        refused = lab.exec("n1", sys.executable, "-c", FETCH, f"{url['tasks']}/tasks?token=nope")
        assert refused.returncode != 0 and "401" in refused.stderr
        # The calls went through the sleeve: every node sent and received encapsulated packets.
        for node in ("n1", "n2", "n3"):
            report = lab.report(node)
            assert report is not None
            counters = report["datapath"]["counters"]
            assert counters.get("tx_packets", 0) > 0 and counters.get("rx_packets", 0) > 0, (node, counters)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

