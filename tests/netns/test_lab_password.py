"""A real lab with a password: three members, an intruder with a wrong password and one with none.

n1..n3 share the password; n4 starts with another one and n5 with none. The intruders must not join, get
address space or put a single packet into a pod, whatever they send (clear control datagrams and sleeve
frames from a member's spoofed address, on both ports); both sides say why in their logs. Then n4 restarts
with the right password and joins. The tests share one lab and run in file order.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.conftest import HostSnapshot, Lab, addr, daemon_missing, eventually, session_base, teardown_and_check

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MEMBERS = ["n1", "n2", "n3"]
CONVERGE_TIMEOUT = 60.0
CONTROL_PORT = 6783
SLEEVE_PORT = 6785
LISTEN_PORT = 9999


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = daemon_missing()
    if why:
        pytest.skip(why)
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "right").write_text("members only\n")
    (secrets / "wrong").write_text("guess\n")
    before = HostSnapshot.take()
    lab = Lab(session_base() + "s")
    lab.secrets = secrets  # type: ignore[attr-defined]
    try:
        lab.run("up", "--nodes", "5", "--no-daemons", "--pods-per-node", "0", "--password-file",
                str(secrets / "right"))
        for node in MEMBERS:
            lab.run("start", node, "--no-wait")
        lab.run("start", "n4", "--no-wait", "--password-file", str(secrets / "wrong"))
        lab.run("start", "n5", "--no-wait", "--no-password")
        lab.run("wait", "--timeout", str(CONVERGE_TIMEOUT), timeout=CONVERGE_TIMEOUT + 30)
        lab.run("pod", "add", "n1", "web")
        lab.run("pod", "add", "n2", "api")
        yield lab
    finally:
        teardown_and_check(lab, before)


def pod(lab: Lab, label: str) -> dict[str, str]:
    pods: list[dict[str, str]] = lab.status()["pods"]
    return next(p for p in pods if f"{p['node']}/{p['name']}" == label)


def test_members_form_an_encrypted_mesh_and_intruders_stay_alone(secured: Lab) -> None:
    for node in MEMBERS:
        assert secured.reachable(node) == set(MEMBERS) - {node}
    for intruder in ("n4", "n5"):
        assert secured.reachable(intruder) == set()
    status = secured.exec("n1", "weaved", "status", check=True).stdout
    assert re.search(r"Encryption: enabled", status)
    connections = secured.exec("n1", "weaved", "status", "connections", check=True).stdout
    assert connections.count("established") == 2 and connections.count("encrypted sleeve") == 2
    assert "Encryption: disabled" in secured.exec("n5", "weaved", "status", check=True).stdout


def test_both_sides_log_one_clear_line_why(secured: Lab) -> None:
    n1 = secured.log("n1")
    assert re.search(rf"peer at {addr('n4')}:{CONTROL_PORT}: wrong or missing password", n1)
    assert re.search(rf"peer at {addr('n5')}:{CONTROL_PORT}: wrong or missing password", n1)
    assert re.search(r"wrong or missing password", secured.log("n4"))
    assert re.search(r"wrong or missing password \(the peer has one, we none\)", secured.log("n5"))
    # Rate-limited: one line per address and reason per minute, not one per attempt.
    assert len(re.findall(rf"peer at {addr('n4')}:{CONTROL_PORT}: wrong", n1)) <= 3


def test_intruders_get_no_address_space(secured: Lab) -> None:
    for intruder in ("n4", "n5"):
        report = secured.report(intruder)
        assert report is not None
        ipam = report["ipam"]
        assert ipam["owned"] == 0 and ipam["leases"] == 0, ipam
        proc = secured.exec(intruder, "weaved", "ipam", "alloc", "c-intruder", timeout=60)
        assert proc.returncode != 0, proc.stdout


SEND = """
import sys
from scapy.all import IP, UDP, Raw, send
src, dst, sport, dport, frames = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
for frame in frames:
    send(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(bytes.fromhex(frame)), verbose=False)
"""

LISTEN = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {LISTEN_PORT}))
s.settimeout(8)
try:
    data, peer = s.recvfrom(2048)
    print("GOT", peer[0], data)
except socket.timeout:
    print("NOTHING")
"""


def spoof(lab: Lab, from_node: str, as_node: str, to_node: str, sport: int, dport: int, frames: list[bytes]) -> None:
    netns = f"wl-{lab.name}-{from_node}"
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SEND, addr(as_node), addr(to_node),
                    str(sport), str(dport), *(f.hex() for f in frames)], check=True, timeout=60)


def test_no_forged_datagram_puts_a_packet_into_a_pod(secured: Lab) -> None:
    from scapy.all import IP, UDP, Raw

    from weaved.core import sleeve
    from weaved.core.wire import Goodbye, Heartbeat, Hello, Message, encode

    report = secured.report("n1")
    assert report is not None
    short = {p["nickname"]: p["short_id"] for p in report["peers"]}
    web, api = pod(secured, "n1/web"), pod(secured, "n2/api")
    web_ip, api_ip = web["address"].split("/")[0], api["address"].split("/")[0]
    before = report["counters"]
    listener = subprocess.Popen(["ip", "netns", "exec", web["netns"], sys.executable, "-c", LISTEN],
                                stdout=subprocess.PIPE, text=True)
    try:
        # Sleeve frames from n2's address and port (a member), with a plausible inner source (n2's pod):
        # plain frames must not pass where every neighbour's data is sealed.
        packet = bytes(IP(src=api_ip, dst=web_ip) / UDP(sport=1234, dport=LISTEN_PORT) / Raw(b"injected"))
        frames = [sleeve.encode(packet, short["n2"], short["n1"])]
        spoof(secured, "n4", "n2", "n1", SLEEVE_PORT, SLEEVE_PORT, frames)
        spoof(secured, "n5", "n2", "n1", SLEEVE_PORT, SLEEVE_PORT, frames)
        # Clear control datagrams from n2's address: a goodbye, a heartbeat in n1's own name, a HELLO.
        n1_name, n2_name = report["name"], next(p["name"] for p in report["peers"] if p["nickname"] == "n2")
        n1_uid = report["uid"]
        n2_uid = next(p["uid"] for p in report["peers"] if p["nickname"] == "n2")
        control = [encode(Message(1, n2_name, n2_uid, Goodbye())), encode(Message(1, n1_name, n1_uid, Heartbeat())),
                   encode(Message(1, n2_name, n2_uid, Hello(1, 1, "n2", short["n2"], ("sleeve",), 0)))]
        spoof(secured, "n4", "n2", "n1", CONTROL_PORT, CONTROL_PORT, control)
        out, _ = listener.communicate(timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert out.strip() == "NOTHING", out
    after = secured.report("n1")
    assert after is not None
    assert after["counters"].get("dropped_unsealed", 0) >= before.get("dropped_unsealed", 0) + 3
    dp = after["datapath"]["counters"]
    assert sum(v for k, v in dp.items() if k.startswith("drop_udp_")) >= 2, dp
    # Nothing changed: n1 still has both members as neighbours, n2 is not "self".
    assert secured.reachable("n1") == {"n2", "n3"}
    assert "that is our own address" not in secured.log("n1")


def test_an_intruder_restarted_with_the_right_password_joins(secured: Lab) -> None:
    secrets: Path = secured.secrets  # type: ignore[attr-defined]
    secured.run("kill", "n4")
    secured.run("start", "n4", "--password-file", str(secrets / "right"), "--timeout", str(CONVERGE_TIMEOUT),
                timeout=CONVERGE_TIMEOUT + 30)
    eventually(lambda: secured.reachable("n4") == {"n1", "n2", "n3"}, 30, "n4 to reach every member")
    assert secured.reachable("n5") == set()
