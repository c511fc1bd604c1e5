"""The lab's operations: build and tear down the underlay, manage node daemons, partition, wait.

Each operation loads ``state.json``, does its I/O through :mod:`weaved.lab.host` and decides through
:mod:`weaved.lab.plan`. The state file is rewritten after every step that creates something (a namespace,
a daemon), so ``down`` can always undo a half-built lab, even one whose ``up`` was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from weaved.adapters.password import password_in_file
from weaved.lab import host
from weaved.lab.plan import (
    BRIDGE,
    LAB_ROOT,
    NODE_IFNAME,
    LabError,
    LabState,
    NodeRecord,
    convergence_gaps,
    daemon_argv,
    describe_partition,
    expected_views,
    heal_ruleset,
    is_lab_netns,
    lab_dir,
    partition_ruleset,
    plan_lab,
    process_state,
    validate_lab_name,
)

Say = Callable[[str], None]
REPORT_TIMEOUT = 10.0
POLL_INTERVAL = 1.0


def _quiet(_: str) -> None:
    pass


# --- state file ----------------------------------------------------------------------------------------


def state_path(lab: str, root: Path = LAB_ROOT) -> Path:
    return lab_dir(lab, root) / "state.json"


def existing_labs(root: Path = LAB_ROOT) -> list[str]:
    try:
        return sorted(p.parent.name for p in root.glob("*/state.json"))
    except OSError:
        return []


def load_state(lab: str, root: Path = LAB_ROOT) -> LabState:
    validate_lab_name(lab)
    path = state_path(lab, root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        others = [name for name in existing_labs(root) if name != lab]
        hint = f" (existing labs: {', '.join(others)})" if others else ""
        raise LabError(f"no lab named {lab!r}: create it with `weaved lab up --name {lab} --nodes N`{hint}") from None
    except (OSError, ValueError) as e:
        raise LabError(f"cannot read {path}: {e}; `weaved lab down --name {lab}` removes the lab anyway") from None
    return LabState.from_json(data)


def save_state(state: LabState, root: Path = LAB_ROOT) -> None:
    """Write atomically (rename), so a concurrent reader or a crash never sees half a file."""
    path = state_path(state.name, root)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


# --- node processes ------------------------------------------------------------------------------------


def node_alive(node: NodeRecord) -> bool:
    return node.pid is not None and host.is_our_process(node.pid, node.state_dir, node.starttime)


def node_state(node: NodeRecord) -> str:
    return process_state(node.pid, node_alive(node))


def start_daemon(state: LabState, name: str, root: Path = LAB_ROOT) -> LabState:
    """Spawn the node's daemon and record its PID at once (so ``down`` finds it whatever happens next)."""
    node = state.node(name)
    Path(node.state_dir).mkdir(parents=True, exist_ok=True)
    pid, starttime = host.spawn_in_netns(
        node.netns, daemon_argv(state, name), Path(node.log_path), f"starting {name} daemon at {time.ctime()}"
    )
    state = state.with_node(replace(node, pid=pid, starttime=starttime))
    save_state(state, root)
    return state


def kill_daemon(state: LabState, name: str, root: Path = LAB_ROOT) -> tuple[LabState, str]:
    """SIGKILL the node's daemon, as a crash would: no goodbye to its peers."""
    node = state.node(name)
    if node.pid is None:
        return state, f"{name} is not running"
    pid = node.pid
    was_alive = node_alive(node)
    if was_alive and not host.signal_and_wait(pid, node.state_dir, node.starttime, signal.SIGKILL, 5.0):
        raise LabError(f"{name}'s daemon (pid {pid}) survived SIGKILL for 5s")
    with contextlib.suppress(OSError), open(node.log_path, "a") as log:
        log.write(f"# weaved lab: killed {name} daemon pid {pid} with SIGKILL at {time.ctime()}\n")
    state = state.with_node(replace(node, pid=None, starttime=None))
    save_state(state, root)
    return state, f"killed {name} (pid {pid})" if was_alive else f"{name}'s daemon (pid {pid}) was already dead"


# --- reports and convergence ---------------------------------------------------------------------------


def weaved_in_node(
    state: LabState, node: NodeRecord, *args: str, timeout: float = REPORT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``weaved ARGS`` (the lab's interpreter) inside the node's namespace, with its control socket."""
    argv = [host.find_tool("ip"), "netns", "exec", node.netns, state.python, "-m", "weaved", *args]
    return host.run(argv, timeout=timeout, check=False, env={**host.tool_env(), "WEAVE_API_SOCKET": node.api_socket})


def read_report(state: LabState, node: NodeRecord) -> dict[str, Any] | None:
    try:
        proc = weaved_in_node(state, node, "report")
    except LabError:
        return None
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read_reports(state: LabState, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """Every node's report, fetched in parallel (each one is a Python start-up inside a namespace)."""
    nodes = [state.node(n) for n in names]
    if not nodes:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as pool:
        results = list(pool.map(lambda n: read_report(state, n), nodes))
    return {n.name: r for n, r in zip(nodes, results, strict=True)}


def wait_converged(state: LabState, timeout: float, *, say: Say = _quiet, fail_on_dead: bool = True) -> dict[str, str]:
    """Poll reports until every running node reaches exactly what the underlay allows (see
    :func:`~weaved.lab.plan.expected_views`). Returns the remaining gaps (empty = converged).

    A daemon that dies while we wait ends the wait at once with that as the gap, when ``fail_on_dead``.
    """
    deadline = time.monotonic() + timeout
    gaps: dict[str, str] = {}
    last = ""
    while True:
        running = [n.name for n in state.nodes if node_alive(n)]
        dead = [n.name for n in state.nodes if n.pid is not None and n.name not in running]
        if dead and fail_on_dead:
            return {n: "daemon exited" for n in dead}
        expected = expected_views(running, state.partition, password_digests(state))
        gaps = convergence_gaps(read_reports(state, running), expected)
        if not gaps:
            return {}
        summary = "; ".join(f"{n}: {why}" for n, why in gaps.items())
        if summary != last:
            say(f"waiting: {summary}")
            last = summary
        if time.monotonic() + POLL_INTERVAL > deadline:
            return gaps
        time.sleep(POLL_INTERVAL)


def password_digests(state: LabState) -> dict[str, str | None]:
    """Per node, a digest of the password it starts with (None: none), so that convergence expects nodes
    whose passwords differ to stay apart. Read from the files now, as the daemons did when they started."""
    digests: dict[str, str | None] = {}
    for node in state.nodes:
        if node.password_file is None:
            digests[node.name] = None
            continue
        try:
            raw = Path(node.password_file).read_bytes()
        except OSError:
            digests[node.name] = f"unreadable:{node.password_file}"
            continue
        digests[node.name] = hashlib.sha256(password_in_file(raw)).hexdigest()
    return digests


def check_password_file(path: str) -> str:
    """The absolute path of a readable password file (daemons start elsewhere), or a LabError."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise LabError(f"--password-file {path}: no such file")
    return str(resolved)


def node_status_text(state: LabState, node: NodeRecord) -> str:
    proc = weaved_in_node(state, node, "status")
    text = proc.stdout.rstrip()
    if proc.returncode != 0:
        text += ("\n" if text else "") + f"(weaved status failed: {proc.stderr.strip() or proc.returncode})"
    return text


# --- up / down -----------------------------------------------------------------------------------------


def _build_underlay(state: LabState, say: Say) -> None:
    sw = state.switch_netns
    host.ip("netns", "add", sw)
    host.ip("link", "set", "lo", "up", netns=sw)
    host.ip("link", "add", BRIDGE, "type", "bridge", netns=sw)
    host.ip("link", "set", BRIDGE, "up", netns=sw)
    for node in state.nodes:
        host.ip("netns", "add", node.netns)
        host.ip("link", "set", "lo", "up", netns=node.netns)
        # created inside the switch namespace with its peer moved straight into the node's: no device
        # ever exists in the host's namespace, not even for a moment
        host.ip("link", "add", node.name, "type", "veth", "peer", "name", NODE_IFNAME, "netns", node.netns, netns=sw)
        host.ip("link", "set", node.name, "master", BRIDGE, netns=sw)
        host.ip("link", "set", node.name, "up", netns=sw)
        host.ip("addr", "add", node.address, "dev", NODE_IFNAME, netns=node.netns)
        host.ip("link", "set", NODE_IFNAME, "up", netns=node.netns)
    say(f"underlay: {len(state.nodes)} nodes on bridge {BRIDGE} in netns {sw}")


def up(
    lab: str,
    count: int,
    python: str,
    *,
    timeout: float,
    daemons: bool = True,
    keep_on_failure: bool = False,
    password_file: str | None = None,
    say: Say = _quiet,
    warn: Say = _quiet,
    root: Path = LAB_ROOT,
) -> LabState:
    """Build the lab and start its daemons; on any failure, tear down what was built (unless kept)."""
    validate_lab_name(lab)
    host.require_root()
    host.find_tool("ip")
    if password_file is not None:
        password_file = check_password_file(password_file)
    state = plan_lab(lab, count, python, root, daemons=daemons, password_file=password_file)
    root.mkdir(parents=True, exist_ok=True)
    try:
        lab_dir(lab, root).mkdir()  # atomically claims the name: a concurrent `up` gets FileExistsError
    except FileExistsError:
        raise LabError(f"lab {lab!r} already exists: use it, or run `weaved lab down --name {lab}` first") from None
    leftovers = [ns for ns in host.netns_list() if is_lab_netns(lab, ns)]
    if leftovers:
        lab_dir(lab, root).rmdir()
        raise LabError(
            f"namespaces of an earlier lab {lab!r} still exist ({', '.join(leftovers)}): "
            f"run `weaved lab down --name {lab}` first"
        )
    save_state(state, root)
    try:
        _build_underlay(state, say)
        if daemons:
            for node in state.nodes:
                state = start_daemon(state, node.name, root)
                say(f"started {node.name} ({node.ip}) pid {state.node(node.name).pid}")
            say(f"waiting up to {timeout:.0f}s for the mesh to converge")
            gaps = wait_converged(state, timeout, say=say)
            if gaps:
                for name in gaps:
                    node = state.node(name)
                    warn(f"--- {name}: last lines of {node.log_path}")
                    for line in host.tail(Path(node.log_path), 15):
                        warn(f"    {line}")
                summary = "; ".join(f"{n}: {why}" for n, why in gaps.items())
                raise LabError(f"mesh did not converge within {timeout:.0f}s ({summary})")
    except BaseException as e:
        if keep_on_failure:
            warn(f"keeping the half-built lab {lab!r} for inspection (`weaved lab down --name {lab}` removes it)")
        else:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            warn(f"`up` {why}: removing the half-built lab {lab!r}")
            with contextlib.suppress(LabError):
                down(lab, warn=warn, root=root)
        raise
    return state


def down(lab: str, *, say: Say = _quiet, warn: Say = _quiet, root: Path = LAB_ROOT) -> bool:
    """Stop the lab's daemons, delete its namespaces (taking veths and bridge with them), remove its dir.

    Works from whatever exists: the state file (recorded PIDs), and namespaces matching the lab's naming
    scheme. Returns False when there was nothing to remove. Only processes the lab started are signalled:
    recorded PIDs that still are the same process, and processes in the lab's namespaces whose command
    line names the lab directory.
    """
    validate_lab_name(lab)
    host.require_root()
    host.find_tool("ip")
    base = lab_dir(lab, root)
    state: LabState | None = None
    if state_path(lab, root).exists():
        try:
            state = load_state(lab, root)
        except LabError as e:
            warn(f"ignoring unreadable state: {e}")
    found = base.exists()
    for node in state.nodes if state else []:
        if node.pid is not None and node_alive(node):
            if host.stop_process(node.pid, node.state_dir, node.starttime):
                say(f"stopped {node.name} (pid {node.pid})")
            else:
                warn(f"{node.name}'s daemon (pid {node.pid}) did not stop")
    namespaces = [ns for ns in host.netns_list() if is_lab_netns(lab, ns)]
    for ns in namespaces:
        for pid in host.netns_pids(ns):
            if host.is_our_process(pid, str(base), None):
                if not host.stop_process(pid, str(base), None):
                    warn(f"process {pid} in {ns} did not stop")
            elif host.proc_stat(pid) is not None:
                cmd = " ".join(host.proc_cmdline(pid) or ["?"])
                warn(f"process {pid} ({cmd[:60]}) still runs in {ns}, which lingers until it exits: kill {pid}")
    # nodes first: deleting a node's namespace removes its veth pair, then the switch holds only the bridge
    for ns in sorted(namespaces, key=lambda n: n.endswith("-sw")):
        host.ip("netns", "delete", ns)
    if namespaces:
        say(f"deleted {len(namespaces)} namespaces")
    if found:
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when no other lab is left
    return found or bool(namespaces)


# --- partition -----------------------------------------------------------------------------------------


def partition(state: LabState, groups: list[list[str]], root: Path = LAB_ROOT) -> LabState:
    host.require_root()
    host.find_tool("nft")
    host.nft_apply(state.switch_netns, partition_ruleset(groups))
    state = replace(state, partition=groups)
    save_state(state, root)
    return state


def heal(state: LabState, root: Path = LAB_ROOT) -> LabState:
    host.require_root()
    host.find_tool("nft")
    host.nft_apply(state.switch_netns, heal_ruleset())
    state = replace(state, partition=None)
    save_state(state, root)
    return state


def status_rows(state: LabState) -> list[dict[str, Any]]:
    return [
        {
            "node": n.name,
            "netns": n.netns,
            "address": n.address,
            "pid": n.pid,
            "state": node_state(n),
            "log": n.log_path,
        }
        for n in state.nodes
    ]


def status_json(state: LabState) -> dict[str, Any]:
    return {
        "lab": state.name,
        "switch_netns": state.switch_netns,
        "partition": state.partition,
        "nodes": status_rows(state),
        "pods": [{"name": p.name, "node": p.node, "netns": p.netns, "address": p.address} for p in state.pods],
    }


def status_text(state: LabState) -> str:
    rows = status_rows(state)
    headers = ["NODE", "NETNS", "ADDRESS", "PID", "STATE"]
    table = [[r["node"], r["netns"], r["address"], str(r["pid"] or "-"), r["state"]] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    lines = [f"lab {state.name}: switch netns {state.switch_netns}, partition: {describe_partition(state.partition)}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    if state.pods:
        lines.append("pods: " + ", ".join(f"{p.label} {p.address or '(no address)'}" for p in state.pods))
    return "\n".join(lines)


def exec_env(state: LabState, node: NodeRecord) -> Mapping[str, str]:
    env = host.tool_env()
    env["WEAVED_LAB"] = state.name
    env["WEAVED_LAB_NODE"] = node.name
    env["WEAVE_API_SOCKET"] = node.api_socket  # so that `weaved connect|ipam|rmpeer|reset` reach this node's daemon
    return env
