"""Leaving the IPAM ring for good (``weaved reset``) with two real daemons on loopback.

The pair agrees on the range by consensus, one of them restarts (and keeps its range and leases: a plain
restart hands nothing over), then resets: refused while a container holds an address, then accepted once it
is released, confirmed by the other daemon, which then owns the whole range. The peer that left refuses to
allocate and says why; restarted, it owns nothing and gets space again on demand like a new peer.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from tests.adapters.test_daemon import Daemon, launch, routes_to_all, wait_for, weaved

__all__ = ["launch"]  # the fixture, imported for pytest
pytestmark = pytest.mark.slow

RANGE = "10.47.0.0/24"


def ipam(daemon: Daemon) -> dict[str, Any]:
    report: dict[str, Any] = daemon.report()["ipam"]
    return report


def owners(daemon: Daemon) -> dict[str, int]:
    return {o["nickname"] or o["name"]: o["addresses"] for o in ipam(daemon)["owners"]}


def cli(daemon: Daemon, *args: str) -> tuple[int, str]:
    where = ["--api", daemon.http] if args[:1] == ("status",) or args[:2] == ("ipam", "leases") else \
        ["--api-socket", str(daemon.api_socket)]
    result = weaved(*args, *where, timeout=40)
    return result.returncode, result.stdout + result.stderr


def test_reset_hands_every_range_to_the_other_daemon(launch: Callable[..., Daemon]) -> None:
    ipam_args = ("--ipalloc-range", RANGE, "--ipalloc-init", "consensus=2")
    n2 = launch("n2", *ipam_args)
    n1 = launch("n1", "--peer", f"127.0.0.1:{n2.port}", *ipam_args)
    daemons = [n1, n2]
    names = {d.report()["name"] for d in daemons}
    for d in daemons:
        wait_for(partial(routes_to_all, d, names), f"{d.nickname} to route to {names}", daemons)

    code, out = cli(n1, "ipam", "alloc", "c1")
    assert code == 0, out
    address = out.strip()
    wait_for(lambda: owners(n2) == {"n1": 128, "n2": 128}, "n2 to see the agreed ring", daemons)

    # A plain restart hands nothing over: same range, same lease.
    n1.proc.send_signal(signal.SIGTERM)
    assert n1.proc.wait(timeout=10) == 0
    n1 = launch("n1", "--peer", f"127.0.0.1:{n2.port}", *ipam_args, port=n1.port)
    daemons = [n1, n2]
    assert ipam(n1)["owned"] == 128
    code, out = cli(n1, "ipam", "leases", "--json")
    assert code == 0 and [lease["address"] for lease in json.loads(out)] == [address], out
    wait_for(partial(routes_to_all, n1, names), "n1 to route to n2 again", daemons)

    code, out = cli(n1, "reset")
    assert code == 1
    assert "1 addresses are still leased here" in out and "(c1)" in out, out
    assert ipam(n1)["owned"] == 128, "a refused reset changes nothing"

    assert cli(n1, "ipam", "release", "c1")[0] == 0
    code, out = cli(n1, "reset")
    assert code == 0, out
    n2_name = n2.report()["name"]
    assert out == f"handed 128 IPs to {n2_name}(n2), which confirmed\n"
    assert owners(n2) == {"n2": 256}
    assert ipam(n1)["state"] == f"left: handed 128 addresses to {n2_name} (confirmed)"
    code, out = cli(n1, "ipam", "alloc", "c2")
    assert code == 1 and "this peer left the IPAM ring" in out, out
    code, out = cli(n2, "ipam", "alloc", "c3")
    assert code == 0, out
    assert "ipam leave  " in n1.log_text() and "ipam leave confirmed" in n1.log_text()

    # Restarted, the peer that left owns nothing and asks for space like a new one.
    n1.proc.send_signal(signal.SIGTERM)
    assert n1.proc.wait(timeout=10) == 0
    n1 = launch("n1", "--peer", f"127.0.0.1:{n2.port}", *ipam_args, port=n1.port)
    daemons = [n1, n2]
    assert ipam(n1)["owned"] == 0
    wait_for(partial(routes_to_all, n1, names), "n1 to route to n2 again", daemons)
    code, out = cli(n1, "ipam", "alloc", "c4")
    assert code == 0, out
    assert ipam(n1)["owned"] > 0


def test_reset_without_a_reachable_peer_is_refused(launch: Callable[..., Daemon]) -> None:
    n1 = launch("n1", "--ipalloc-range", RANGE, "--ipalloc-init", "consensus=1")
    code, out = cli(n1, "ipam", "alloc", "c1")
    assert code == 0, out
    assert cli(n1, "ipam", "release", "c1")[0] == 0
    code, out = cli(n1, "reset")
    assert code == 1 and "no other peer is reachable to take over this peer's 256 addresses" in out, out
    code, out = cli(n1, "ipam", "alloc", "c2")
    assert code == 0, out
