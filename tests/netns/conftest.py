"""Fixtures for the root-only lab tests: a session-unique lab name, a CLI runner, host snapshots.

Every test here builds real namespaces, so each lab fixture tears its lab down in a finalizer that runs
even when the test failed, and checks that the host's namespaces and links are exactly as before.
Traffic stays inside the lab's namespaces, to its 198.51.100.0/24 addresses only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LAB_CMD = [sys.executable, "-m", "weaved", "lab"]
"""``weaved lab``, through the top-level CLI with this interpreter (the venv's)."""


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces): run as root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping")):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} not found: apt-get install -y {package}"
    return None


@pytest.fixture(scope="session", autouse=True)
def _root_and_tools() -> None:
    """Session-scoped so that it runs before the module-scoped lab fixtures (which would fail, not skip)."""
    reason = _why_skip()
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class HostSnapshot:
    netns: list[str]
    links: list[str]

    @classmethod
    def take(cls) -> HostSnapshot:
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        return cls(sorted(netns.splitlines()), sorted(links.splitlines()))


def session_base() -> str:
    """``t`` + pid: unique per test session, short enough for any suffix letter (lab names ≤ 8 chars)."""
    return f"t{os.getpid() % 100000}"


@dataclass
class Lab:
    """A lab under test, driven through the CLI exactly as a user would."""

    name: str
    up_output: str = ""

    def run(self, cmd: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*LAB_CMD, cmd, "--name", self.name, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"weaved lab {cmd} {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def exec(self, node: str, *cmd: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*LAB_CMD, "exec", "--name", self.name, node, "--", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in {node} exited {proc.returncode}: {proc.stderr}")
        return proc

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("status", "--json").stdout)
        return data

    def node_states(self) -> dict[str, str]:
        return {n["node"]: n["state"] for n in self.status()["nodes"]}

    def pings(self, src: str, dst_ip: str, attempts: int = 1) -> bool:
        """One ``ping -c 1 -W 1`` per attempt (attempts let a just-healed ARP entry resolve)."""
        for _ in range(attempts):
            if self.exec(src, "ping", "-n", "-q", "-c", "1", "-W", "1", dst_ip).returncode == 0:
                return True
        return False

    def report(self, node: str) -> dict[str, Any] | None:
        proc = self.exec(node, "weaved", "report", timeout=20)
        if proc.returncode != 0:
            return None
        try:
            data: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            return None
        return data

    def reachable(self, node: str) -> set[str] | None:
        """Nicknames ``node``'s report shows with a next hop (itself excluded); None without a report."""
        report = self.report(node)
        if report is None:
            return None
        own = report["nickname"]
        return {p["nickname"] for p in report["peers"] if p["next_hop"] is not None and p["nickname"] != own}

    def log(self, node: str) -> str:
        return self.run("logs", node).stdout


def addr(node: str) -> str:
    return f"198.51.100.{10 + int(node[1:])}"


def eventually(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``check`` until true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(interval)


def teardown_and_check(lab: Lab, before: HostSnapshot) -> None:
    """``down`` the lab and insist the host looks exactly as before it was built."""
    proc = lab.run("down", check=False)
    after = HostSnapshot.take()
    assert proc.returncode == 0, f"lab down failed: {proc.stderr}"
    # Other test sessions may build and remove their own namespaces meanwhile: judge only this lab's.
    left = [line for line in after.netns if line.split()[0].startswith(f"wl-{lab.name}-")]
    assert not left, f"namespaces left behind: {left}"
    assert after.links == before.links, f"host links changed: {set(after.links) ^ set(before.links)}"
    assert not Path(f"/run/weaved-lab/{lab.name}").exists()


@pytest.fixture
def make_lab() -> Iterator[Callable[[str], tuple[Lab, HostSnapshot]]]:
    """Factory for labs a single test builds itself; every one is taken down afterwards, pass or fail."""
    made: list[tuple[Lab, HostSnapshot]] = []

    def make(suffix: str) -> tuple[Lab, HostSnapshot]:
        lab = Lab(session_base() + suffix)
        made.append((lab, HostSnapshot.take()))
        return made[-1]

    yield make
    for lab, before in made:
        teardown_and_check(lab, before)


def daemon_missing() -> str | None:
    """Why the mesh tests cannot run yet (the daemon is written in parallel), or None."""
    proc = subprocess.run(
        [sys.executable, "-m", "weaved", "run", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"`python -m weaved run` is not available yet: {last}"
    return None
