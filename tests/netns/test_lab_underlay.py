"""The lab's underlay without daemons: namespaces, bridge, exec, partitions, errors and clean teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns.conftest import LAB_CMD, HostSnapshot, Lab, addr, session_base, teardown_and_check

pytestmark = pytest.mark.netns

NODES = ["n1", "n2", "n3"]


@pytest.fixture(scope="module")
def underlay() -> Iterator[Lab]:
    before = HostSnapshot.take()
    lab = Lab(session_base() + "u")
    try:
        lab.run("up", "--nodes", "3", "--no-daemons")
        yield lab
    finally:
        teardown_and_check(lab, before)


def ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def lab_processes(lab: str) -> list[int]:
    """PIDs whose command line mentions the lab's directory (what the lab's daemons always do)."""
    marker = f"/run/weaved-lab/{lab}/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


# --- layout --------------------------------------------------------------------------------------------


def test_status_lists_nodes_with_netns_address_and_state(underlay: Lab) -> None:
    status = underlay.status()
    assert status["lab"] == underlay.name
    assert status["switch_netns"] == f"wl-{underlay.name}-sw"
    assert status["partition"] is None
    assert [(n["node"], n["netns"], n["address"], n["pid"], n["state"]) for n in status["nodes"]] == [
        (n, f"wl-{underlay.name}-{n}", f"{addr(n)}/24", None, "stopped") for n in NODES
    ]
    text = underlay.run("status").stdout
    assert "NODE" in text
    assert f"wl-{underlay.name}-n2" in text


def test_namespaces_bridge_and_veths(underlay: Lab) -> None:
    netns = ip_out("netns", "list")
    sw = f"wl-{underlay.name}-sw"
    for ns in [sw, *(f"wl-{underlay.name}-{n}" for n in NODES)]:
        assert ns in netns
    ports = ip_out("-n", sw, "-o", "link", "show", "master", "br0")
    for n in NODES:
        assert f" {n}@" in ports
        node_if = ip_out("-n", f"wl-{underlay.name}-{n}", "-o", "addr", "show", "dev", "eth0")
        assert f"inet {addr(n)}/24" in node_if
        assert "UP" in ip_out("-n", f"wl-{underlay.name}-{n}", "-o", "link", "show", "lo")


def test_every_node_reaches_every_other(underlay: Lab) -> None:
    for src in NODES:
        for dst in NODES:
            if src != dst:
                assert underlay.pings(src, addr(dst), attempts=3), f"{src} cannot ping {dst}"


def test_exec_runs_in_the_node_with_the_venv_on_path(underlay: Lab) -> None:
    proc = underlay.exec("n2", "ip", "-o", "-4", "addr", "show", "dev", "eth0", check=True)
    assert addr("n2") in proc.stdout
    proc = underlay.exec("n1", "sh", "-c", "command -v python; echo $WEAVED_LAB_NODE", check=True)
    assert proc.stdout.split() == [os.path.join(os.path.dirname(sys.executable), "python"), "n1"]


def test_exec_passes_the_exit_code_through(underlay: Lab) -> None:
    assert underlay.exec("n3", "sh", "-c", "exit 7").returncode == 7
    assert underlay.exec("n3", "true").returncode == 0


# --- partitions, checked with ping ---------------------------------------------------------------------


def test_partition_one_against_two_then_heal(underlay: Lab) -> None:
    underlay.run("partition", "n1", "n2,n3")
    assert underlay.status()["partition"] == [["n1"], ["n2", "n3"]]
    assert not underlay.pings("n1", addr("n2"))
    assert not underlay.pings("n3", addr("n1"))
    assert underlay.pings("n2", addr("n3"), attempts=3)
    underlay.run("heal")
    assert underlay.status()["partition"] is None
    assert underlay.pings("n1", addr("n2"), attempts=3)
    assert underlay.pings("n3", addr("n1"), attempts=3)


def test_a_single_group_is_cut_off_from_everyone(underlay: Lab) -> None:
    underlay.run("partition", "n2")
    try:
        assert underlay.status()["partition"] == [["n2"], ["n1", "n3"]]
        assert not underlay.pings("n2", addr("n1"))
        assert not underlay.pings("n2", addr("n3"))
        assert underlay.pings("n1", addr("n3"), attempts=3)
    finally:
        underlay.run("heal")


def test_ungrouped_nodes_reach_everyone(underlay: Lab) -> None:
    underlay.run("partition", "n1", "n2")
    try:
        assert not underlay.pings("n1", addr("n2"))
        assert underlay.pings("n3", addr("n1"), attempts=3)
        assert underlay.pings("n3", addr("n2"), attempts=3)
    finally:
        underlay.run("heal")


def test_a_new_partition_replaces_the_previous_one(underlay: Lab) -> None:
    underlay.run("partition", "n1", "n2,n3")
    underlay.run("partition", "n3")
    try:
        assert underlay.pings("n1", addr("n2"), attempts=3)
        assert not underlay.pings("n1", addr("n3"))
    finally:
        underlay.run("heal")
    assert underlay.run("heal").returncode == 0  # healing a healed lab is fine


def test_rules_live_only_in_the_switch_namespace(underlay: Lab) -> None:
    underlay.run("partition", "n1", "n2,n3")
    try:
        sw = subprocess.run(
            ["ip", "netns", "exec", f"wl-{underlay.name}-sw", "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "table bridge weaved_lab" in sw
        node = subprocess.run(
            ["ip", "netns", "exec", f"wl-{underlay.name}-n1", "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "weaved_lab" not in node
        hostrules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
        assert "weaved_lab" not in hostrules
    finally:
        underlay.run("heal")


def test_two_labs_live_side_by_side_with_the_same_addresses(
    underlay: Lab, make_lab: Callable[[str], tuple[Lab, HostSnapshot]]
) -> None:
    other, _ = make_lab("b")
    other.run("up", "--nodes", "2", "--no-daemons")
    other.run("partition", "n1")
    assert not other.pings("n2", addr("n1"))
    assert underlay.pings("n2", addr("n1"), attempts=3)  # the other lab's partition is its own
    assert underlay.status()["partition"] is None


# --- errors: one line, non-zero, no traceback ----------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("weaved lab: error: ")
    return lines[0]


def test_a_taken_name_is_refused(underlay: Lab) -> None:
    err = one_line_error(underlay.run("up", "--nodes", "2", "--no-daemons", check=False))
    assert "already exists" in err
    assert f"weaved lab down --name {underlay.name}" in err
    assert underlay.pings("n1", addr("n3"), attempts=3)  # the existing lab is untouched


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--name", "Bad_Name", "--nodes", "2"], "invalid lab name"),
        (["up", "--name", "toolongname", "--nodes", "2"], "invalid lab name"),
        (["up", "--name", "x", "--nodes", "0"], "invalid node count"),
        (["status", "--name", "nosuch"], "no lab named 'nosuch'"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], message: str) -> None:
    proc = subprocess.run([*LAB_CMD, *argv], capture_output=True, text=True, timeout=60, check=False)
    assert message in one_line_error(proc)


def test_unknown_node_and_bad_groups_are_one_line(underlay: Lab) -> None:
    assert "no node 'n9'" in one_line_error(underlay.exec("n9", "true"))
    assert "unknown node 'n9'" in one_line_error(underlay.run("partition", "n1", "n9", check=False))
    assert "more than one" in one_line_error(underlay.run("partition", "n1", "n1,n2", check=False))
    assert underlay.status()["partition"] is None


def test_not_root_is_one_line(underlay: Lab) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run(
        [*nobody, *LAB_CMD, "kill", "--name", underlay.name, "n1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "needs root" in one_line_error(proc)


# --- teardown ------------------------------------------------------------------------------------------


def test_down_twice_leaves_the_host_exactly_as_before() -> None:
    before = HostSnapshot.take()
    lab = Lab(session_base() + "d")
    try:
        lab.run("up", "--nodes", "2", "--no-daemons")
        assert HostSnapshot.take().links == before.links  # nothing was added to the host namespace
    finally:
        teardown_and_check(lab, before)
    proc = lab.run("down")
    assert "nothing to remove" in proc.stdout
    after = HostSnapshot.take()
    assert after.links == before.links
    assert not [ns for ns in after.netns if ns.startswith(f"wl-{lab.name}-")]


def test_down_removes_a_lab_whose_state_file_was_lost() -> None:
    """As after an `up` killed before it saved anything: the namespaces are found by the naming scheme."""
    before = HostSnapshot.take()
    lab = Lab(session_base() + "s")
    try:
        lab.run("up", "--nodes", "2", "--no-daemons")
        Path(f"/run/weaved-lab/{lab.name}/state.json").unlink()
        subprocess.run(["ip", "netns", "delete", f"wl-{lab.name}-n2"], check=True)  # and half of it is gone
    finally:
        teardown_and_check(lab, before)


def test_up_refuses_leftover_namespaces_without_touching_them() -> None:
    before = HostSnapshot.take()
    lab = Lab(session_base() + "l")
    try:
        subprocess.run(["ip", "netns", "add", f"wl-{lab.name}-n1"], check=True)
        err = one_line_error(lab.run("up", "--nodes", "2", "--no-daemons", check=False))
        assert "still exist" in err
        assert f"wl-{lab.name}-n1" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        teardown_and_check(lab, before)


def test_up_cleans_up_when_daemons_exit() -> None:
    before = HostSnapshot.take()
    lab = Lab(session_base() + "f")
    try:
        proc = lab.run("up", "--nodes", "2", "--python", "/bin/false", "--timeout", "20", check=False)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("weaved lab: error: mesh did not converge")
        assert "daemon exited" in last
        assert "removing the half-built lab" in proc.stderr
        assert HostSnapshot.take() == before
        assert not Path(f"/run/weaved-lab/{lab.name}").exists()
    finally:
        teardown_and_check(lab, before)


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Path:
    """A "python" whose daemons live but never answer: for the never-converges and interrupt paths."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    script.chmod(0o755)
    return script


def test_up_cleans_up_when_the_mesh_never_converges(fake_daemon: Path) -> None:
    before = HostSnapshot.take()
    lab = Lab(session_base() + "n")
    try:
        proc = lab.run("up", "--nodes", "2", "--python", str(fake_daemon), "--timeout", "3", check=False)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert "mesh did not converge within 3s" in last
        assert "no report" in last
        assert lab_processes(lab.name) == []  # the daemons it started are stopped
        assert HostSnapshot.take() == before
    finally:
        teardown_and_check(lab, before)


def test_interrupted_up_cleans_up(fake_daemon: Path) -> None:
    before = HostSnapshot.take()
    lab = Lab(session_base() + "i")
    try:
        proc = subprocess.Popen(
            [*LAB_CMD, "up", "--name", lab.name, "--nodes", "2", "--python", str(fake_daemon), "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:  # bounded: up prints a handful of lines, then waits
            if line.startswith("waiting up to") or time.monotonic() > deadline:
                break
        assert lab_processes(lab.name), "the fake daemons should be running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "removing the half-built lab" in err
        assert lab_processes(lab.name) == []
        assert HostSnapshot.take() == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        teardown_and_check(lab, before)
