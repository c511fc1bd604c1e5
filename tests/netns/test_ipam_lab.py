"""IPAM on a real 3-node lab: 300 allocations across a partition and a crash, rmpeer of a dead node, reset.

Each daemon runs in its own network namespace behind the lab's switch, gossiping over the TEST-NET underlay.
Allocations go through the local HTTP API (as the CNI plugin will call it), in bulk from one small Python
process per batch inside the node's namespace; single ones through the ``weaved ipam`` CLI. The checks are
the issue's: no address handed out twice, every lease survives a ``kill -9`` and restart, and a node removed
for good gives its space back when ``rmpeer`` runs on two peers at once, and a node that is decommissioned
hands its ranges to a live one with ``weaved reset``.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.netns.conftest import (
    LAB_CMD,
    HostSnapshot,
    Lab,
    daemon_missing,
    eventually,
    session_base,
    teardown_and_check,
)
from weaved.adapters.ipam import GATEWAY_ID

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

RANGE_SIZE = 1 << 20  # 10.32.0.0/12, the default IPALLOC_RANGE

BULK_ALLOCATE = """
import json, os, sys
from weaved.adapters.client import Client
client = Client.unix(os.environ["WEAVE_API_SOCKET"], timeout=40)  # lab exec sets the node's control socket
print(json.dumps({cid: client.allocate(cid, "eth0") for cid in sys.argv[1:]}))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = daemon_missing()
    if reason:
        pytest.skip(reason)
    lab = Lab(session_base() + "i")
    before = HostSnapshot.take()
    try:
        lab.up_output = lab.run("up", "--nodes", "3", "--pods-per-node", "0", timeout=180).stdout
        yield lab
    finally:
        teardown_and_check(lab, before)


def ipam_state(lab: Lab, node: str) -> dict[str, object] | None:
    report = lab.report(node)
    return None if report is None else report.get("ipam")


def allocate(lab: Lab, node: str, ids: list[str]) -> dict[str, str]:
    """Allocate for every id on ``node`` through its API; returns id → CIDR."""
    proc = lab.exec(node, sys.executable, "-c", BULK_ALLOCATE, *ids, timeout=300)
    assert proc.returncode == 0, f"allocation on {node} failed: {proc.stderr}"
    result: dict[str, str] = json.loads(proc.stdout)
    return result


def leases(lab: Lab, node: str) -> dict[str, str]:
    """Container id → CIDR of the container leases ``weaved ipam leases --json`` shows on ``node`` (not the gateway)."""
    proc = lab.exec(node, "weaved", "ipam", "leases", "--json", check=True)
    return {entry["container_id"]: entry["address"] for entry in json.loads(proc.stdout)
            if entry["container_id"] != GATEWAY_ID}


def owners(lab: Lab, node: str) -> dict[str, int]:
    state = ipam_state(lab, node)
    assert state is not None
    return {str(o["nickname"]): int(o["addresses"]) for o in state["owners"]}  # type: ignore[attr-defined]


def assert_unique(handed_out: dict[str, str]) -> None:
    addresses = [cidr.split("/")[0] for cidr in handed_out.values()]
    duplicates = {a for a in addresses if addresses.count(a) > 1}
    holders = {a: sorted(cid for cid, cidr in handed_out.items() if cidr.split("/")[0] == a) for a in duplicates}
    assert not duplicates, f"addresses handed out twice: {holders}"
    for address in addresses:
        assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network("10.32.0.0/12")


def test_300_allocations_partition_crash_rmpeer_and_reset(lab: Lab) -> None:
    # Seeding is lazy, as in Weave Net: the ring is agreed when the first allocation asks for it; here that is
    # each node's data path asking for its gateway address as it starts.
    handed_out: dict[str, str] = {}  # container id → CIDR, as the API answered
    where: dict[str, str] = {}  # container id → node

    def batch(node: str, prefix: str, count: int) -> None:
        ids = [f"{prefix}-{node}-{i}" for i in range(count)]
        got = allocate(lab, node, ids)
        assert set(got) == set(ids)
        handed_out.update(got)
        where.update(dict.fromkeys(ids, node))

    for node in ("n1", "n2", "n3"):  # 1. a healthy mesh: 120
        batch(node, "a", 40)
    eventually(lambda: all((s := ipam_state(lab, n)) is not None and s["state"] == "ready"
                           for n in ("n1", "n2", "n3")), 30, "IPAM ready on all three nodes")
    split = owners(lab, "n1")
    assert set(split) == {"n1", "n2", "n3"} and sum(split.values()) == RANGE_SIZE, split
    text = lab.exec("n1", "weaved", "status", "ipam", check=True).stdout
    for node in ("n1", "n2", "n3"):
        assert f"({node})" in text, text

    # 2. n3 cut off from the others: both sides keep allocating from the space they own: 90
    lab.run("partition", "n3")
    eventually(lambda: lab.reachable("n1") == {"n2"}, 30, "n1 sees n3 gone")
    for node in ("n1", "n2", "n3"):
        batch(node, "p", 30)
    lab.run("heal")
    eventually(lambda: all(lab.reachable(n) == {"n1", "n2", "n3"} - {n} for n in ("n1", "n2", "n3")), 60,
               "the mesh heals")
    assert_unique(handed_out)

    # 3. n2 crashes (SIGKILL) and starts again: every lease it handed out is still there
    before_crash = leases(lab, "n2")
    lab.run("kill", "n2")
    batch("n1", "k", 15)  # allocations while n2 is down
    lab.run("start", "n2")
    eventually(lambda: ipam_state(lab, "n2") is not None, 30, "n2 answers again")
    assert leases(lab, "n2") == before_crash
    for node in ("n1", "n2", "n3"):  # 75 more, n2 included
        batch(node, "r", 25)

    assert len(handed_out) == 300
    assert_unique(handed_out)
    # Asking again returns the same address (idempotent), through the CLI this time.
    again = lab.exec("n2", "weaved", "ipam", "alloc", "a-n2-0", check=True).stdout.strip()
    assert again == handed_out["a-n2-0"]
    # Every address the API answered is a lease on the node that answered it, and nothing else is leased.
    all_leases: dict[str, str] = {}
    for node in ("n1", "n2", "n3"):
        on_node = leases(lab, node)
        assert set(on_node) == {cid for cid, n in where.items() if n == node}
        all_leases.update(on_node)
    assert handed_out == all_leases

    # 4. n3 is removed for good; rmpeer runs on n1 and n2 at the same moment. One owner per address after.
    lab.run("kill", "n3")
    eventually(lambda: lab.reachable("n1") == {"n2"} and lab.reachable("n2") == {"n1"}, 30, "n3 is gone")
    rmpeers = [subprocess.Popen([*LAB_CMD, "exec", "--name", lab.name, node, "--", "weaved", "rmpeer", "n3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in ("n1", "n2")]
    for proc in rmpeers:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    def n3_space_returned() -> bool:
        views = [owners(lab, n) for n in ("n1", "n2")]
        return all(set(v) == {"n1", "n2"} and sum(v.values()) == RANGE_SIZE for v in views) and views[0] == views[1]

    eventually(n3_space_returned, 30, "n3's space owned by n1 and n2, the same on both")
    # n3's containers went with it: its addresses may be given again (that is what rmpeer is for), so only
    # the living nodes' leases must stay unique. Whichever of n1 and n2 inherited them, both keep allocating.
    for cid in [cid for cid, node in where.items() if node == "n3"]:
        del handed_out[cid], where[cid]
    time.sleep(0.5)
    batch("n1", "z", 5)
    batch("n2", "z", 5)
    assert_unique(handed_out)
    for node in ("n1", "n2"):
        assert set(leases(lab, node)) == {cid for cid, n in where.items() if n == node}

    # 5. n2 is decommissioned: its containers are gone (a forced reset forgets their leases) and it hands
    # every range to n1, which confirms; no rmpeer needed, and n1 owns the whole range.
    done = lab.exec("n2", "weaved", "reset", "--force", check=True).stdout
    assert done.startswith("handed ") and "(n1), which confirmed; forgot " in done, done
    assert owners(lab, "n1") == {"n1": RANGE_SIZE}
    refused = lab.exec("n2", "weaved", "ipam", "alloc", "after-reset")
    assert refused.returncode == 1 and "this peer left the IPAM ring" in refused.stderr
