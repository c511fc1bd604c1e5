"""Real daemons as subprocesses on loopback: mesh formation, status, metrics, clean leave, start-up errors.

Every daemon binds 127.0.0.1 only (UDP control port, HTTP API, metrics), on ports the kernel just handed
out, with its own state directory. Waits are bounded polls; every process started here is killed by PID in
a finalizer, whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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

    def start(nickname: str, *extra: str, port: int | None = None, wait_ready: bool = True) -> Daemon:
        port = port or free_port(socket.SOCK_DGRAM)
        http = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        metrics = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        log = tmp_path / f"{nickname}.log"
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "weaved", "run", "--host", "127.0.0.1", "--port", str(port),
                 "--http-addr", http, "--metrics-addr", metrics, "--nickname", nickname,
                 "--state-dir", str(tmp_path / nickname), "--no-datapath", *extra],
                stdout=sink, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items()
                                                            if not k.startswith(("WEAVE_", "KUBE_", "CONN_"))},
            )
        daemon = Daemon(nickname, port, http, metrics, log, proc)
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
    result = weaved("connect", f"127.0.0.1:{b.port}", "--api", a.http)
    assert (result.returncode, result.stdout) == (0, f"connecting to 127.0.0.1:{b.port}\n")
    wait_for(lambda: len(b.report()["peers"]) == 2, "b to see a", [a, b], timeout=5)
    assert weaved("status", "targets", "--api", a.http).stdout == f"127.0.0.1:{b.port}\n"
    result = weaved("forget", f"127.0.0.1:{b.port}", "--api", a.http)
    assert (result.returncode, result.stdout) == (0, f"forgot 127.0.0.1:{b.port}\n")
    assert weaved("status", "targets", "--api", a.http).stdout == ""
    report = json.loads(weaved("report", "--api", a.http).stdout)
    assert report["version"]
    assert report["targets"] == []


def test_client_commands_say_clearly_when_no_daemon_runs() -> None:
    api = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    for command in (["status"], ["status", "peers"], ["report"], ["connect", "127.0.0.1"], ["forget", "127.0.0.1"]):
        result = weaved(*command, "--api", api)
        assert result.returncode == 1, command
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"weaved: cannot reach the weaved daemon at {api} (connection refused)")
        assert "weaved run" in lines[0]
    via_env = weaved("status", env={"WEAVE_HTTP_ADDR": api})
    assert f"daemon at {api}" in via_env.stderr


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
