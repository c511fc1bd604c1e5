"""The sealed sleeve on a real 2-node lab with a mesh password: both daemons get sleeve keys from their
authenticated handshake, and TCP bulk crosses pod to pod as sealed chunks, intact (SHA-256 end to end; the
receiving pod's veth finishes checksums in software, so a wrong one would be counted in ``TcpInCsumErrors``).
The pod MTU leaves room for the seal. Captured frames replayed at the receiver are dropped (``replay``),
never delivered.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.netns.conftest import HostSnapshot, Lab, daemon_missing, eventually, session_base, teardown_and_check
from tests.netns.test_datapath import make_pod, sh
from tests.netns.test_sleeve_fast import World, csum_errors, host_end, transfer
from weaved.core import superframe
from weaved.core.sleeveseal import OVERHEAD, SEALED_V2
from weaved.lab.plan import node_address

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CONVERGE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    why = daemon_missing()
    if why:
        pytest.skip(why)
    before = HostSnapshot.take()
    lab = Lab(session_base() + "s")
    made: list[str] = []
    try:
        password = tmp_path_factory.mktemp("secret") / "weave-passwd"
        password.write_text("sealed sleeve test\n")
        subprocess.run([sys.executable, "-m", "weaved", "lab", "up", "--name", lab.name, "--nodes", "2",
                        "--pods-per-node", "0", "--timeout", str(CONVERGE_TIMEOUT), "--password-file",
                        str(password)], check=True, capture_output=True, timeout=CONVERGE_TIMEOUT + 60)

        def ready() -> bool:
            reports = [lab.report(n) for n in ("n1", "n2")]
            return all(r is not None and r["datapath"]["state"] == "ready" and r["datapath"]["peers"] == 1
                       and r["datapath"].get("sealed_peers") == 1 for r in reports)

        eventually(ready, CONVERGE_TIMEOUT, "both data paths ready, each sealing to the other")
        pods = {name: make_pod(lab, node, name, made, cni_like=True) for name, node in (("pa", "n1"), ("pc", "n2"))}
        yield World(lab, pods)
    finally:
        for netns in made:
            sh("ip", "netns", "del", netns, check=False)
        teardown_and_check(lab, before)


def test_the_pod_mtu_leaves_room_for_the_seal(world: World) -> None:
    report = world.lab.report("n1")
    assert report is not None
    datapath = report["datapath"]
    assert datapath["encrypted"] is True
    assert datapath["mtu"] == superframe.pod_mtu(datapath["underlay_mtu"], sealed=True)
    assert datapath["mtu"] == superframe.pod_mtu(datapath["underlay_mtu"]) - OVERHEAD


def test_tcp_bulk_crosses_sealed_and_intact(world: World) -> None:
    a, c = world.pods["pa"], world.pods["pc"]
    sh("ip", "netns", "exec", world.node_ns("n2"), "ethtool", "-K", host_end(c), "tx", "off", check=False)
    errors, before = csum_errors(c), world.counters("n2")
    try:
        sent, received = transfer(a, c, 30 << 20)
        assert sent == received
        sent, received = transfer(c, a, 5 << 20, seed=2)
        assert sent == received
    finally:
        sh("ip", "netns", "exec", world.node_ns("n2"), "ethtool", "-K", host_end(c), "tx", "on", check=False)
    after = world.counters("n2")
    opened = after.get("rx_sealed", 0) - before.get("rx_sealed", 0)
    supers = after.get("rx_superpackets", 0) - before.get("rx_superpackets", 0)
    assert opened > 20_000 and supers > 100, (opened, supers)
    assert after.get("native_rx_packets", 0) > before.get("native_rx_packets", 0)  # the C pump opened them
    assert csum_errors(c) == errors
    assert not any(after.get(f"drop_udp_{r}", 0) for r in ("auth", "unsealed", "spoofed-source")), after


def test_captured_frames_replayed_are_dropped(world: World) -> None:
    """A copy of n1's sealed datagrams, captured on n2's underlay and sent again from n1's address: each is
    dropped as a replay, none reaches the pod (its UDP payload would say so)."""
    a, c = world.pods["pa"], world.pods["pc"]
    n1, n2 = world.node_ns("n1"), world.node_ns("n2")
    captured: list[bytes] = []
    listening = threading.Event()

    def capture() -> None:
        # A raw socket in n2's namespace sees the sealed datagrams arriving for the sleeve port.
        script = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_UDP)\n"
                  "s.settimeout(10)\nprint('ready',flush=True)\nfor _ in range(400):\n"
                  " d=s.recv(65535)\n if d[28:30]==b'WS' and d[30] in (3,4): print(d[28:].hex(),flush=True)\n")
        with subprocess.Popen(["ip", "netns", "exec", n2, sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True) as proc:
            assert proc.stdout is not None
            proc.stdout.readline()
            listening.set()
            for line in proc.stdout:
                captured.append(bytes.fromhex(line.strip()))
                if len(captured) >= 20:
                    break
            proc.kill()

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    assert listening.wait(15)
    for _ in range(10):
        sh("ip", "netns", "exec", a.netns, "ping", "-n", "-q", "-c", "5", "-i", "0.05", c.ip, check=False)
        if len(captured) >= 20:
            break
    thread.join(timeout=20)
    assert captured, "no sealed datagram seen on n2's underlay"
    assert all(d[2] in (3, SEALED_V2) for d in captured)
    before = world.counters("n2")
    replay = "\n".join(d.hex() for d in captured)
    sender = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
              f"s.bind(('{node_address('n1').ip}', 6785))\n"
              f"for h in sys.stdin.read().split(): s.sendto(bytes.fromhex(h), ('{node_address('n2').ip}', 6785))\n")
    subprocess.run(["ip", "netns", "exec", n1, sys.executable, "-c", sender], input=replay, text=True, check=True,
                   timeout=30)
    eventually(lambda: world.counters("n2").get("drop_udp_replay", 0) - before.get("drop_udp_replay", 0)
               >= len(captured), 10, "every replayed datagram dropped as a replay")
    assert world.counters("n2").get("rx_packets", 0) == before.get("rx_packets", 0)
