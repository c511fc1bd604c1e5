"""`weaved lab up` with pods: every pod wired by the CNI plugin reaches every pod and node; pod add/del; down.

The pods are made the way a runtime makes them (the node's conflist: weave-net then portmap, run inside the
node's namespace), so this exercises the forwarder, the daemon's CNI handler, IPAM and the sleeve together.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.netns.conftest import HostSnapshot, Lab, daemon_missing, eventually, session_base, teardown_and_check

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    why = daemon_missing()
    if why:
        pytest.skip(why)
    before = HostSnapshot.take()
    lab = Lab(session_base() + "p")
    try:
        lab.up_output = lab.run("up", "--nodes", "3", "--pods-per-node", "2", timeout=300).stdout
        yield lab
    finally:
        teardown_and_check(lab, before)


def via(lab: Lab, node: str, peer: str) -> str | None:
    """The next hop ``node``'s report shows for ``peer`` (a peer name), None without a route or report."""
    report = lab.report(node)
    hops = {p["nickname"]: p["next_hop"] for p in report["peers"]} if report else {}
    return hops.get(peer)


def test_up_prints_every_pod_and_a_full_matrix(lab: Lab) -> None:
    pods = lab.status()["pods"]
    assert sorted((p["node"], p["name"]) for p in pods) == [(n, p) for n in ("n1", "n2", "n3") for p in ("p1", "p2")]
    addresses = [p["address"] for p in pods]
    assert len(set(addresses)) == 6 and all(a.endswith("/12") for a in addresses)
    for pod in pods:
        assert f"pod {pod['node']}/{pod['name']}: {pod['address']} (netns {pod['netns']})" in lab.up_output
    assert "48/48 reachable" in lab.up_output  # 6 pods × (5 other pods + 3 nodes)
    assert "NOT reachable" not in lab.up_output


def test_pod_add_and_del_through_the_plugin(lab: Lab) -> None:
    out = lab.run("pod", "add", "n2", "web").stdout
    pod = next(p for p in lab.status()["pods"] if p["name"] == "web")
    assert out.strip() == f"pod n2/web: {pod['address']} (netns {pod['netns']})"
    ip = pod["address"].split("/")[0]
    assert lab.pings("n1", ip, attempts=3), "node n1 reaches the new pod on n2 over the overlay"
    leases = json.loads(lab.exec("n2", "weaved", "ipam", "leases", "--json", check=True).stdout)
    assert pod["netns"] in {lease["container_id"] for lease in leases}
    lab.run("pod", "del", "n2", "web")
    assert "web" not in {p["name"] for p in lab.status()["pods"]}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert pod["netns"] not in netns
    leases = json.loads(lab.exec("n2", "weaved", "ipam", "leases", "--json", check=True).stdout)
    assert pod["netns"] not in {lease["container_id"] for lease in leases}, "DEL released the address"
    bad = lab.run("pod", "add", "n2", "sw", check=False)
    assert bad.returncode == 1 and "invalid pod name" in bad.stderr


def test_matrix_goes_through_a_relay_when_two_nodes_are_cut_apart(lab: Lab) -> None:
    lab.run("partition", "n1", "n3")  # n2 still reaches both: n1 ⇄ n3 goes through n2
    try:
        def relayed() -> bool:
            return via(lab, "n1", "n3") == via(lab, "n1", "n2") and via(lab, "n3", "n1") == via(lab, "n3", "n2")

        eventually(relayed, 30, "n1 and n3 route to each other through n2")
        matrix = lab.run("matrix", check=False)
        assert matrix.returncode == 0, matrix.stdout
        assert "48/48 reachable" in matrix.stdout
    finally:
        lab.run("heal")
