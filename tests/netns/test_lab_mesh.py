"""A real 3-node mesh in the lab: convergence, crash and restart, partition and heal, exec, teardown.

The tests share one lab and run in file order; each leaves the mesh converged for the next.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import pytest

from tests.netns.conftest import HostSnapshot, Lab, daemon_missing, eventually, session_base, teardown_and_check

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NODES = ["n1", "n2", "n3"]
DETECT_TIMEOUT = 15.0
"""How long a crash or partition may take to show in the other nodes' reports."""
CONVERGE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def mesh() -> Iterator[Lab]:
    why = daemon_missing()
    if why:
        pytest.skip(why)
    before = HostSnapshot.take()
    lab = Lab(session_base() + "m")
    try:
        proc = lab.run("up", "--nodes", "3", "--pods-per-node", "0", "--timeout", str(CONVERGE_TIMEOUT),
                       timeout=CONVERGE_TIMEOUT + 60)
        lab.up_output = proc.stdout
        yield lab
    finally:
        teardown_and_check(lab, before)


def logged_peer_left(lab: Lab, node: str, gone: str) -> bool:
    """The daemon's console line: ``... [info     ] peer left   name=… nickname=n3 reason='no longer reachable'``."""
    return re.search(rf"\bpeer left\b.*\bnickname={gone}\b", lab.log(node)) is not None


def sees(lab: Lab, node: str, expected: set[str]) -> bool:
    return lab.reachable(node) == expected


def all_converged(lab: Lab, nodes: list[str]) -> bool:
    return all(sees(lab, n, set(nodes) - {n}) for n in nodes)


def test_three_nodes_converge(mesh: Lab) -> None:
    assert mesh.node_states() == dict.fromkeys(NODES, "running")
    for node in NODES:
        assert mesh.reachable(node) == set(NODES) - {node}, f"{node}'s report"
    assert "converged" in mesh.up_output
    for node in NODES:
        assert f"=== {node} (" in mesh.up_output  # every node's `weaved status` was printed


def test_exec_weaved_status_peers_lists_every_node(mesh: Lab) -> None:
    def lists_all() -> bool:
        out = mesh.exec("n1", "weaved", "status", "peers", check=True).stdout
        return all(f"({node})" in out for node in NODES)

    # One retry window: a loaded machine can catch a view between two gossip rounds.
    eventually(lists_all, 10, "`weaved status peers` on n1 lists n1, n2 and n3")


POST_ON_TCP = """
import http.client
conn = http.client.HTTPConnection("127.0.0.1", 6784, timeout=5)
conn.request("POST", "/connect?peer=198.51.100.98", body=b"")
response = conn.getresponse()
print(response.status, response.read().decode().strip())
"""


def test_exec_weaved_connect_reaches_that_nodes_own_control_socket(mesh: Lab) -> None:
    """The nodes share one filesystem: `lab exec NODE -- weaved connect` must change NODE's daemon alone, through
    its own control socket, while the node's TCP port refuses the same call."""
    extra = "198.51.100.99"  # TEST-NET, no node there: only ever a target that is dialled in vain
    done = mesh.exec("n1", "weaved", "connect", extra, check=True).stdout
    assert done == f"connecting to {extra}:6783\n"
    try:
        assert f"{extra}:6783" in mesh.exec("n1", "weaved", "status", "targets", check=True).stdout.split()
        for other in ("n2", "n3"):
            assert f"{extra}:6783" not in mesh.exec(other, "weaved", "status", "targets", check=True).stdout.split()
        refused = mesh.exec("n2", sys.executable, "-c", POST_ON_TCP, check=True).stdout
        assert refused.startswith("405 POST /connect changes the daemon"), refused
        assert "198.51.100.98:6783" not in mesh.exec("n2", "weaved", "status", "targets", check=True).stdout
    finally:
        assert mesh.exec("n1", "weaved", "forget", extra, check=True).stdout == f"forgot {extra}:6783\n"
    assert f"{extra}:6783" not in mesh.exec("n1", "weaved", "status", "targets", check=True).stdout.split()


def test_a_killed_node_is_noticed_and_logged_then_rejoins(mesh: Lab) -> None:
    mesh.run("kill", "n3")
    assert mesh.node_states()["n3"] == "stopped"
    eventually(
        lambda: sees(mesh, "n1", {"n2"}) and sees(mesh, "n2", {"n1"}),
        DETECT_TIMEOUT,
        "n1 and n2 report n3 gone (absent or without next hop)",
    )
    # the daemon logs `peer left` with the nickname as a field (weaved.adapters.logs, console format)
    eventually(lambda: logged_peer_left(mesh, "n1", "n3"), 5, "n1's log says n3 left")
    eventually(lambda: logged_peer_left(mesh, "n2", "n3"), 5, "n2's log says n3 left")

    proc = mesh.run("start", "n3", "--timeout", str(CONVERGE_TIMEOUT), timeout=CONVERGE_TIMEOUT + 30)
    assert "n3 joined the mesh" in proc.stdout
    assert mesh.node_states()["n3"] == "running"
    assert all_converged(mesh, NODES)
    assert "already running" in mesh.run("start", "n3").stdout


def test_partition_isolates_n1_and_heal_reconverges(mesh: Lab) -> None:
    mesh.run("partition", "n1", "n2,n3")
    try:
        eventually(
            lambda: sees(mesh, "n1", set()) and sees(mesh, "n2", {"n3"}) and sees(mesh, "n3", {"n2"}),
            DETECT_TIMEOUT * 2,
            "n1 loses n2 and n3; n2 and n3 keep each other",
        )
    finally:
        mesh.run("heal")
    eventually(lambda: all_converged(mesh, NODES), CONVERGE_TIMEOUT, "the mesh reconverges after heal")
    assert mesh.run("wait", "--timeout", "10").returncode == 0


def test_status_and_logs_commands(mesh: Lab) -> None:
    status = mesh.status()
    assert all(isinstance(n["pid"], int) for n in status["nodes"])
    log = mesh.run("logs", "n2", "--lines", "5").stdout
    assert 0 < len(log.splitlines()) <= 5
