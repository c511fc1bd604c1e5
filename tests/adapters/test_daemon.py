"""Real daemons as subprocesses on loopback: mesh formation, status, metrics, clean leave, start-up errors.

Every daemon binds 127.0.0.1 only (UDP control port, HTTP API, metrics), on ports the kernel just handed
out, with its own state directory. Waits are bounded polls; every process started here is killed by PID in
a finalizer, whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
pytestmark = pytest.mark.slow

MESH_TIMEOUT = 20.0
"""Generous bound for three peers to find each other (it takes about a second here)."""


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    nickname: str
    port: int
    http: str
    metrics: str
    log: Path
    proc: subprocess.Popen[bytes]
    api_socket: Path
    """The control socket (the default for its state directory unless the test gave ``--api-socket``)."""

    def get(self, path: str, *, metrics: bool = False) -> tuple[int, str]:
        url = f"http://{self.metrics if metrics else self.http}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def report(self) -> dict[str, Any]:
        status, body = self.get("/report")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def weaved(*args: str, env: dict[str, str] | None = None, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """``weaved ARGS``; a daemon (``run``) always without the data path: these tests run in the host's own
    network namespace, which must never get a bridge, TUN or route."""
    argv = [*args, "--no-datapath"] if args[:1] == ("run",) else list(args)
    return subprocess.run([sys.executable, "-m", "weaved", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(nickname: str, *extra: str, port: int | None = None, wait_ready: bool = True,
              env: dict[str, str] | None = None) -> Daemon:
        port = port or free_port(socket.SOCK_DGRAM)
        http = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        metrics = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        log = tmp_path / f"{nickname}.log"
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "weaved", "run", "--host", "127.0.0.1", "--port", str(port),
                 "--http-addr", http, "--metrics-addr", metrics, "--nickname", nickname,
                 "--state-dir", str(tmp_path / nickname), "--no-datapath", *extra],
                stdout=sink, stderr=subprocess.STDOUT, env={**{k: v for k, v in os.environ.items()
                                                               if not k.startswith(("WEAVE_", "KUBE_", "CONN_"))},
                                                            **(env or {})},
            )
        given = [extra[i + 1] for i, arg in enumerate(extra[:-1]) if arg == "--api-socket"]
        given += [(env or {})["WEAVE_API_SOCKET"]] if "WEAVE_API_SOCKET" in (env or {}) else []
        api_socket = Path(given[0]) if given else tmp_path / nickname / "weaved.sock"
        daemon = Daemon(nickname, port, http, metrics, log, proc, api_socket)
        started.append(daemon)
        if wait_ready:
            wait_for(lambda: _ready(daemon), f"{nickname} to be ready", started)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(timeout=10)


def _ready(daemon: Daemon) -> bool:
    assert daemon.proc.poll() is None, f"{daemon.nickname} exited early:\n{daemon.log_text()}"
    try:
        return daemon.get("/ready") == (200, "ready\n")
    except OSError:
        return False


def wait_for(check: Callable[[], T], what: str, daemons: list[Daemon], timeout: float = MESH_TIMEOUT) -> T:
    """Poll ``check`` until it returns something truthy; on timeout fail with every daemon's log."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {d.nickname}\n{d.log_text()}" for d in daemons)
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(0.1)


def routes_to_all(daemon: Daemon, names: set[str]) -> bool:
    peers = {p["name"]: p for p in daemon.report()["peers"]}
    own = daemon.report()["name"]
    return set(peers) == names and all(peers[n]["next_hop"] for n in names - {own})


def established_states(daemon: Daemon, expected: list[str]) -> bool:
    return [c["state"] for c in daemon.report()["connections"]] == expected


def test_three_daemons_mesh_report_status_metrics_and_leave(launch: Callable[..., Daemon]) -> None:
    n3 = launch("n3")
    n2 = launch("n2", "--peer", f"127.0.0.1:{n3.port}", "--log-format", "json")
    n1 = launch("n1", "--peer", f"127.0.0.1:{n2.port}")
    daemons = [n1, n2, n3]
    names = {d.report()["name"] for d in daemons}
    assert len(names) == 3, "distinct nicknames on one machine give distinct peer names"

    for d in daemons:
        wait_for(partial(routes_to_all, d, names), f"{d.nickname} to route to every peer", daemons)
    # n1 and n3 only meet through discovery (n2 publishes both addresses): a full mesh of direct links
    for d in daemons:
        wait_for(partial(established_states, d, ["established", "established"]),
                 f"{d.nickname} to hold two established connections", daemons)

    result = weaved("status", "--api", n1.http)
    assert result.returncode == 0, result.stderr
    assert f"           Name: {n1.report()['name']}(n1)\n" in result.stdout
    assert "    Connections: 2 (2 established)\n" in result.stdout
    assert "          Peers: 3 (with 6 established connections)\n" in result.stdout
    peers = weaved("status", "peers", "--api", n1.http).stdout
    assert all(f"{d.report()['name']}({d.nickname})" in peers for d in daemons)
    targets = weaved("status", "targets", "--api", n1.http).stdout.splitlines()
    assert f"127.0.0.1:{n2.port}" in targets, "the --peer target"
    assert set(targets) <= {f"127.0.0.1:{n2.port}", f"127.0.0.1:{n3.port}"}, "plus n3 if n1 learnt and dialled it"

    status, metrics = n1.get("/metrics", metrics=True)
    assert status == 200
    assert "weave_peers 3.0" in metrics
    assert 'weave_connections{state="established"} 2.0' in metrics
    rx = next(line for line in metrics.splitlines() if line.startswith('weaved_datagrams_total{direction="rx"}'))
    assert float(rx.split()[-1]) > 0

    n3_name = n3.report()["name"]
    started = time.monotonic()
    n3.proc.send_signal(signal.SIGTERM)
    assert n3.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 3, "a clean leave is quick"
    assert "leaving the mesh" in n3.log_text()

    def left_in_json(log: str) -> bool:
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        return any(r["event"] == "peer left" and r["name"] == n3_name and r["nickname"] == "n3" for r in records)

    # the goodbye makes the others drop n3 at once, well before the 6 s heartbeat timeout
    wait_for(lambda: left_in_json(n2.log_text()), "n2 to log that n3 left", daemons, timeout=4)
    wait_for(lambda: f"peer left                name={n3_name} nickname=n3" in n1.log_text(),
             "n1 to log that n3 left", daemons, timeout=4)
    wait_for(lambda: {p["name"] for p in n1.report()["peers"]} == names - {n3_name}, "n1 to forget n3", daemons)


def test_connect_and_forget_through_the_cli(launch: Callable[..., Daemon]) -> None:
    a, b = launch("a"), launch("b")
    result = weaved("connect", f"127.0.0.1:{b.port}", "--api-socket", str(a.api_socket))
    assert (result.returncode, result.stdout) == (0, f"connecting to 127.0.0.1:{b.port}\n")
    wait_for(lambda: len(b.report()["peers"]) == 2, "b to see a", [a, b], timeout=5)
    assert weaved("status", "targets", "--api", a.http).stdout == f"127.0.0.1:{b.port}\n"
    result = weaved("forget", f"127.0.0.1:{b.port}", "--api-socket", str(a.api_socket))
    assert (result.returncode, result.stdout) == (0, f"forgot 127.0.0.1:{b.port}\n")
    assert weaved("status", "targets", "--api", a.http).stdout == ""
    report = json.loads(weaved("report", "--api", a.http).stdout)
    assert report["version"]
    assert report["targets"] == []


def test_client_commands_say_clearly_when_no_daemon_runs(tmp_path: Path) -> None:
    api = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    sock = str(tmp_path / "weaved.sock")
    for command, where, why in (
        (["status"], ["--api", api], f"{api} (connection refused)"),
        (["status", "peers"], ["--api", api], f"{api} (connection refused)"),
        (["report"], ["--api", api], f"{api} (connection refused)"),
        (["connect", "127.0.0.1"], ["--api-socket", sock], f"{sock} (no such file or directory)"),
        (["forget", "127.0.0.1"], ["--api-socket", sock], f"{sock} (no such file or directory)"),
        (["rmpeer", "x"], ["--api-socket", sock], f"{sock} (no such file or directory)"),
    ):
        result = weaved(*command, *where)
        assert result.returncode == 1, command
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"weaved: cannot reach the weaved daemon at {why}")
        assert "weaved run" in lines[0]
    via_env = weaved("status", env={"WEAVE_HTTP_ADDR": api})
    assert f"daemon at {api}" in via_env.stderr
    via_env = weaved("connect", "127.0.0.1", env={"WEAVE_API_SOCKET": sock})
    assert f"daemon at {sock}" in via_env.stderr
    via_state_dir = weaved("reset", env={"WEAVE_STATE_DIR": str(tmp_path / "state")})
    assert f"daemon at {tmp_path / 'state' / 'weaved.sock'}" in via_state_dir.stderr


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

AS_NOBODY = """
import http.client, json, socket, sys
http_addr, sock_path = sys.argv[1], sys.argv[2]
host, port = http_addr.rsplit(":", 1)
out = {}
for method, path in json.loads(sys.argv[3]):
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
    response = conn.getresponse()
    out[f"{method} {path}"] = [response.status, response.read().decode()]
    conn.close()
try:
    socket.socket(socket.AF_UNIX).connect(sock_path)
    out["socket"] = "connected"
except OSError as exc:
    out["socket"] = exc.strerror
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_only_root_can_change_the_daemon(launch: Callable[..., Daemon], tmp_path: Path) -> None:
    """Any process on the node (any user, any hostNetwork pod) could ``POST /ipam/leave?force=true``,
    ``DELETE /ip/ID``, ``DELETE /peer/X``, connect or forget on the TCP API. Now the port refuses every such
    call, and the control socket (0600, root's) refuses every other user, while root's CLI works."""
    run_dir = Path(tempfile.mkdtemp(prefix="weaved-api-", dir="/tmp"))
    try:
        run_dir.chmod(0o755)  # anyone may reach the socket file: only its own mode may keep them out
        sock = run_dir / "weaved.sock"
        a = launch("a", "--ipalloc-range", "10.44.0.0/24", env={"WEAVE_API_SOCKET": str(sock)})

        attempts = [["POST", "/ipam/leave?force=true"], ["DELETE", "/ip/c1"], ["DELETE", "/peer/x"],
                    ["POST", "/connect?peer=127.0.0.1:1"], ["POST", "/forget?peer=127.0.0.1:1"],
                    ["POST", "/ip/c2"], ["PUT", "/ip/c3/10.44.0.50"], ["GET", "/ipam/gateway"]]
        proc = subprocess.run([*NOBODY, sys.executable, "-c", AS_NOBODY, a.http, str(sock), json.dumps(attempts)],
                              capture_output=True, text=True, timeout=60, check=True)
        answers = json.loads(proc.stdout)
        socket_answer = answers.pop("socket")
        for attempt, (status, text) in answers.items():
            assert status == 405, (attempt, status, text)
            assert "weaved CLI as root" in text and str(sock) in text, text
        assert socket_answer == "Permission denied"
        assert (sock.stat().st_uid, stat.S_IMODE(sock.stat().st_mode)) == (0, 0o600)
        cni = tmp_path / "a" / "cni.sock"  # the CNI socket: its own file, as before
        assert cni.is_socket() and cni != sock and stat.S_IMODE(cni.stat().st_mode) == 0o600

        for command in (["connect", "127.0.0.1:1"], ["forget", "127.0.0.1:1"], ["ipam", "alloc", "c2"],
                        ["ipam", "claim", "c3", "10.44.0.50"], ["ipam", "release", "c1"], ["ipam", "gateway"],
                        ["rmpeer", "x"], ["reset", "--force"]):
            proc = subprocess.run([*NOBODY, sys.executable, "-m", "weaved", *command, "--api-socket", str(sock)],
                                  capture_output=True, text=True, timeout=20, check=False)
            assert proc.returncode == 1, (command, proc.stderr)
            assert proc.stderr.startswith(f"weaved: permission denied on the weaved control socket {sock}"), \
                proc.stderr
        report = a.report()  # nothing changed: no target, no lease, IPAM neither seeded nor left
        assert report["targets"] == [] and report["ipam"]["leases"] == 0 and report["ipam"]["state"] == "idle"
        reads = subprocess.run([*NOBODY, sys.executable, "-m", "weaved", "status", "targets", "--api", a.http],
                               capture_output=True, text=True, timeout=20, check=False)
        assert (reads.returncode, reads.stdout) == (0, ""), "reading the status needs no privilege"

        root = weaved("ipam", "alloc", "c1", "--api-socket", str(sock), timeout=40)
        assert (root.returncode, root.stdout) == (0, "10.44.0.1/24\n"), root.stderr
        root = weaved("connect", "127.0.0.1:1", env={"WEAVE_API_SOCKET": str(sock)})
        assert (root.returncode, root.stdout) == (0, "connecting to 127.0.0.1:1\n"), root.stderr
        report = a.report()
        assert report["targets"] == ["127.0.0.1:1"] and report["ipam"]["leases"] == 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_startup_errors_are_one_line_and_exit_1(launch: Callable[..., Daemon], tmp_path: Path) -> None:
    first = launch("first")
    taken_udp = launch("second", port=first.port, wait_ready=False)
    assert taken_udp.proc.wait(timeout=10) == 1
    assert f"cannot bind UDP 127.0.0.1:{first.port}: Address already in use" in taken_udp.log_text()
    assert "Traceback" not in taken_udp.log_text()

    http_port = first.http.rsplit(":", 1)[1]
    result = weaved("run", "--host", "127.0.0.1", "--port", str(free_port(socket.SOCK_DGRAM)),
                    "--http-addr", first.http, "--metrics-addr", f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
                    "--state-dir", str(tmp_path / "third"), "--nickname", "third")
    assert result.returncode == 1
    assert f"cannot listen for the HTTP API on 127.0.0.1:{http_port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = weaved("run", "--host", "127.0.0.1", "--state-dir", str(not_a_dir / "x"))
    assert result.returncode == 1
    assert "cannot use state directory" in result.stderr
    assert "Traceback" not in result.stderr

    result = weaved("run", "--port", "nope")
    assert (result.returncode, result.stderr) == (2, "weaved: --port/WEAVE_PORT: expected a whole number, got 'nope'\n")
