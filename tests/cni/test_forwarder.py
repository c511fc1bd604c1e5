"""The C forwarder on its own: VERSION, limits, the framing and fd passing against a socket the test serves,
and the daemon-down paths (error 11/50, DEL spooled atomically)."""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.cni.conftest import build_forwarder
from weaved.cni import wire
from weaved.cni.nsenter import is_netns


@pytest.fixture(scope="module")
def binary() -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (scripts/setup.sh installs it)")
    return build_forwarder()


def call(binary: Path, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(binary)], input=stdin, capture_output=True, env=env, timeout=30, check=False)


def test_version_is_answered_locally(binary: Path) -> None:
    proc = call(binary, {"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_PATH": "dummy"},
                b'{"cniVersion":"1.0.0"}')
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"cniVersion": "1.1.0",
                                       "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_limits_and_bad_input(binary: Path, tmp_path: Path) -> None:
    big = call(binary, {"CNI_COMMAND": "ADD"}, b" " * (1024 * 1024 + 1))
    assert big.returncode == 1 and json.loads(big.stdout)["code"] == 6
    assert json.loads(call(binary, {}, b"{}").stdout)["code"] == 4
    assert json.loads(call(binary, {"CNI_COMMAND": "ADD"}, b'{"a": [1,').stdout)["code"] == 6
    conf = json.dumps({"cniVersion": "0.4.0", "daemonSocket": str(tmp_path / "none.sock"),
                       "spoolDir": str(tmp_path / "spool"), "nested": {"daemonSocket": "/wrong"}}).encode()
    add = call(binary, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"}, conf)
    err = json.loads(add.stdout)
    assert add.returncode == 1 and err["code"] == 11 and err["cniVersion"] == "0.4.0"
    assert str(tmp_path / "none.sock") in err["details"]
    status = call(binary, {"CNI_COMMAND": "STATUS"}, conf)
    assert json.loads(status.stdout)["code"] == 50
    bad_id = call(binary, {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": ".hidden", "CNI_IFNAME": "eth0"}, conf)
    assert json.loads(bad_id.stdout)["code"] == 4
    dele = call(binary, {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": ""}, conf)
    assert (dele.returncode, dele.stdout) == (0, b"")
    assert sorted(os.listdir(tmp_path / "spool")) == ["c1"]  # no temporary left behind
    assert (tmp_path / "spool" / "c1").read_text() == "container=c1\nifname=eth0\nnetns=\n"


def _serve_once(path: Path, answer: bytes, seen: dict[str, Any]) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        with conn, server:
            fds = array.array("i")
            head, anc, _, _ = conn.recvmsg(wire.HEADER_SIZE, socket.CMSG_LEN(fds.itemsize))
            for _level, _type, data in anc:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            while len(head) < wire.HEADER_SIZE:
                head += conn.recv(wire.HEADER_SIZE - len(head))
            header = wire.parse_header(head)
            body = b""
            while len(body) < header.env_len + header.conf_len:
                body += conn.recv(65536)
            seen["env"] = wire.parse_env(body[:header.env_len])
            seen["conf"] = body[header.env_len:]
            seen["fd_is_netns"] = [is_netns(fd) for fd in fds]
            for fd in fds:
                os.close(fd)
            conn.sendall(answer)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_framing_and_fd_passing(binary: Path, tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    result = b'{"cniVersion":"1.0.0","ips":[]}\n'
    seen: dict[str, Any] = {}
    thread = _serve_once(sock, wire.encode_answer(0, result), seen)
    conf = json.dumps({"cniVersion": "1.0.0", "name": "weave", "daemonSocket": str(sock), "pad": "x" * 200000})
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c9", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_ARGS": "K8S_POD_NAME=web", "CNI_PATH": "/opt/cni/bin", "UNRELATED": "not forwarded"}
    proc = call(binary, env, conf.encode())
    thread.join(10)
    assert (proc.returncode, proc.stdout) == (0, result)
    assert seen["env"] == {k: v for k, v in env.items() if k != "UNRELATED"}
    assert seen["conf"] == conf.encode() and seen["fd_is_netns"] == [True]
    # an error answer: the daemon's exit status and stdout come out unchanged
    seen.clear()
    thread = _serve_once(tmp_path / "e.sock", wire.encode_answer(1, b'{"code":3}'), seen)
    conf2 = json.dumps({"cniVersion": "1.0.0", "daemonSocket": str(tmp_path / "e.sock")}).encode()
    proc = call(binary, {**env, "CNI_NETNS": "/does/not/exist"}, conf2)
    thread.join(10)
    assert (proc.returncode, proc.stdout) == (1, b'{"code":3}') and seen["fd_is_netns"] == []


def test_a_fifo_as_netns_does_not_hang(binary: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    conf = json.dumps({"cniVersion": "1.0.0", "daemonSocket": str(tmp_path / "none.sock")}).encode()
    proc = call(binary, {"CNI_COMMAND": "ADD", "CNI_NETNS": str(fifo)}, conf)  # call() times out after 30 s
    assert json.loads(proc.stdout)["code"] == 11
