"""The lab's pod operations: add and delete pods through the node's CNI chain, and the reachability matrix.

A pod is added the way a container runtime adds one: make a network namespace, then run every plugin of the
node's conflist (``weave-net``, then ``portmap``) inside the node's namespace with the CNI environment and
the plugin's configuration on stdin, feeding each the previous result (:mod:`weaved.lab.pods` holds the
rules). The final result is kept in ``state.json`` as libcni caches it, for DEL. Nothing in the lab talks to
the daemon for a pod: the plugin does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from weaved.cni.conflist import conflist
from weaved.lab import host
from weaved.lab.ops import Say, _quiet, load_state, save_state, weaved_in_node
from weaved.lab.plan import LAB_ROOT, LabError, LabState, PodRecord, lab_dir
from weaved.lab.pods import (
    Target,
    chain_configs,
    cni_env,
    matrix_targets,
    plan_pod,
    render_matrix,
    result_address,
    with_prev_result,
)

PLUGIN_TIMEOUT = 60.0
"""A plugin that has not answered by then is treated as failed (the daemon's own allocation deadline is shorter)."""
REFERENCE_PLUGINS = Path("/usr/lib/cni")
"""Debian's containernetworking-plugins: ``portmap`` for the chain."""
PING_WORKERS = 8
RETRY_FOR = 60.0
"""How long ``add_pod`` keeps retrying an ADD answered with CNI error 11 ("try again later"), as kubelet does
while a node's network is still coming up (IPAM waiting for space, the bridge not up yet)."""
TRY_AGAIN_LATER = 11
SOURCE_TREE = Path(__file__).resolve().parents[2]
"""The checkout weaved runs from: ``scripts/build-cni.sh`` builds the forwarder into its ``build/``."""


def node_conflist(state: LabState, node: str) -> dict[str, Any]:
    """The node's conflist, pointing at the socket and spool its daemon uses for a ``--state-dir`` of its own."""
    state_dir = Path(state.node(node).state_dir)
    return conflist(socket=str(state_dir / "cni.sock"), spool=str(state_dir / "cni-pending"))


def plugin_binary() -> Path:
    """The built forwarder, building it first when the source is newer (``scripts/build-cni.sh``)."""
    script = SOURCE_TREE / "scripts" / "build-cni.sh"
    if not script.exists():
        raise LabError(f"{script} not found: the lab's pods need weaved's source checkout to build the CNI plugin")
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise LabError(f"building the CNI plugin failed ({proc.stderr.strip()[-200:]}): run scripts/setup.sh")
    return Path(proc.stdout.strip().splitlines()[-1])


def cni_bin_dir(state: LabState, root: Path = LAB_ROOT) -> Path:
    """A ``CNI_PATH`` directory for the lab: our plugin plus the reference plugins, as links."""
    path = lab_dir(state.name, root) / "cni-bin"
    if not path.is_dir():
        path.mkdir(parents=True)
        for plugin in sorted(REFERENCE_PLUGINS.glob("*")) if REFERENCE_PLUGINS.is_dir() else []:
            (path / plugin.name).symlink_to(plugin)
        (path / "weave-net").unlink(missing_ok=True)
        (path / "weave-net").symlink_to(plugin_binary())
    return path


class TryAgainLater(LabError):
    """The plugin answered CNI error 11: a transient condition, worth another ADD shortly."""


def _run_plugin(state: LabState, node: str, config: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    plugin = Path(env["CNI_PATH"]) / str(config["type"])
    if not plugin.exists():
        raise LabError(f"CNI plugin {config['type']!r} not found in {env['CNI_PATH']}: run scripts/setup.sh "
                       "(it installs containernetworking-plugins for portmap)")
    argv = [host.find_tool("ip"), "netns", "exec", state.node(node).netns, str(plugin)]
    try:
        proc = subprocess.run(argv, input=json.dumps(config), capture_output=True, text=True,
                              env={**host.tool_env(), **env}, timeout=PLUGIN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"{config['type']} {env['CNI_COMMAND']} did not answer within {PLUGIN_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        code = None
        try:
            error = json.loads(proc.stdout)
            code = error.get("code")
            why = f"CNI error {code}: {error.get('msg')}" + (f" ({error['details']})" if error.get("details") else "")
        except ValueError:
            why = (proc.stdout + proc.stderr).strip() or f"exit status {proc.returncode}"
        failure = TryAgainLater if code == TRY_AGAIN_LATER else LabError
        raise failure(f"{config['type']} {env['CNI_COMMAND']} failed: {why}")
    if not proc.stdout.strip():
        return {}
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise LabError(f"{config['type']} {env['CNI_COMMAND']} printed no JSON: {proc.stdout[:200]!r}") from None
    return result


def add_pod(state: LabState, node: str, name: str, root: Path = LAB_ROOT, *,
            retry_for: float = RETRY_FOR) -> LabState:
    """Create the pod and run the chain's ADD, again after "try again later" answers for ``retry_for`` seconds."""
    deadline = time.monotonic() + retry_for
    pause = 0.25
    while True:
        try:
            return _add_pod_once(state, node, name, root)
        except TryAgainLater:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
            state = load_state(state.name, root)


def _add_pod_once(state: LabState, node: str, name: str, root: Path) -> LabState:
    """Create the pod's namespace and run the chain's ADD; on failure, DEL what ran and remove the namespace."""
    state.node(node)
    pod = plan_pod(state.name, node, name)
    if any(p.node == node and p.name == name for p in state.pods):
        raise LabError(f"pod {pod.label} already exists in lab {state.name!r}")
    host.ip("netns", "add", pod.netns)
    state = replace(state, pods=[*state.pods, pod])
    save_state(state, root)  # recorded before anything else, so `down` finds it whatever happens
    host.ip("link", "set", "lo", "up", netns=pod.netns)
    chain = chain_configs(node_conflist(state, node))
    env = cni_env("ADD", pod, f"/run/netns/{pod.netns}", str(cni_bin_dir(state, root)))
    prev: dict[str, Any] | None = None
    try:
        for config in chain:
            prev = _run_plugin(state, node, with_prev_result(config, prev), env) or prev
    except LabError:
        with contextlib.suppress(LabError):
            state = del_pod(state, node, name, root)
        raise
    assert prev is not None
    pod = replace(pod, address=result_address(prev), result=prev)
    state = replace(state, pods=[pod if (p.node, p.name) == (node, name) else p for p in state.pods])
    save_state(state, root)
    return state


def del_pod(state: LabState, node: str, name: str, root: Path = LAB_ROOT) -> LabState:
    """Run the chain's DEL backwards with the cached result, then remove the namespace (idempotent)."""
    pod = next((p for p in state.pods if p.node == node and p.name == name), None)
    if pod is None:
        raise LabError(f"lab {state.name!r} has no pod {node}/{name}")
    chain = chain_configs(node_conflist(state, node))
    netns_path = f"/run/netns/{pod.netns}"
    env = cni_env("DEL", pod, netns_path if os.path.exists(netns_path) else "", str(cni_bin_dir(state, root)))
    errors = []
    for config in reversed(chain):
        try:
            _run_plugin(state, node, with_prev_result(config, pod.result), env)
        except LabError as e:
            errors.append(str(e))
    if pod.netns in host.netns_list():
        host.ip("netns", "delete", pod.netns)
    state = replace(state, pods=[p for p in state.pods if p is not pod])
    save_state(state, root)
    if errors:
        raise LabError("; ".join(errors))
    return state


def gateways(state: LabState) -> dict[str, str]:
    """Each running node's address on the pod network (its ``weave`` bridge)."""
    out = {}
    for node in state.nodes:
        proc = weaved_in_node(state, node, "ipam", "gateway", timeout=30)
        if proc.returncode == 0 and proc.stdout.strip():
            out[node.name] = proc.stdout.strip().split("/", 1)[0]
    return out


def _pings(pod: PodRecord, target: Target) -> bool:
    argv = [host.find_tool("ip"), "netns", "exec", pod.netns, "ping", "-n", "-q", "-c", "1", "-W", "1", target.ip]
    # a second try lets a first ARP exchange complete
    return any(subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0 for _ in range(2))


def reachability(state: LabState) -> tuple[str, bool]:
    """The matrix text and whether every pair answered: every pod pings every pod and every node."""
    pods = sorted((p for p in state.pods if p.ip), key=lambda p: (p.node, p.name))
    targets = matrix_targets(pods, gateways(state))
    pairs = [(p, t) for p in pods for t in targets if t.label != p.label]
    with ThreadPoolExecutor(max_workers=PING_WORKERS) as pool:
        answers = list(pool.map(lambda pair: _pings(*pair), pairs))
    reached = {(p.label, t.label): ok for (p, t), ok in zip(pairs, answers, strict=True)}
    return render_matrix(pods, targets, reached), all(answers)


def add_default_pods(state: LabState, per_node: int, *, say: Say = _quiet, root: Path = LAB_ROOT) -> LabState:
    for node in state.nodes:
        for k in range(1, per_node + 1):
            state = add_pod(state, node.name, f"p{k}", root)
            pod = state.pods[-1]
            say(f"pod {pod.label}: {pod.address} (netns {pod.netns})")
    return state
