"""Pure planning for the lab's pods: names, records, the CNI chain a runtime would run, the reachability matrix.

A lab pod is a network namespace ``wl-LAB-NODE-POD`` wired by the node's CNI plugin chain, called the way a
container runtime calls it (libcni's rules: each plugin of the conflist gets the list's ``name`` and
``cniVersion`` and the previous plugin's result as ``prevResult``; DEL runs the chain backwards with the
cached ADD result). Nothing here runs a process: :mod:`weaved.lab.podops` does, so these rules are
unit-tested without root.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weaved.lab.plan import NETNS_PREFIX, LabError, PodRecord

POD_IFNAME = "eth0"
MAX_POD_NAME = 8
MAX_PODS_PER_NODE = 16
_POD_NAME_RE = re.compile(r"^(?!sw$)(?!n[0-9]+$)[a-z0-9]{1,8}$")
"""Not ``sw`` nor a node's name: see :data:`weaved.lab.plan._POD_NETNS_RE`."""


def validate_pod_name(name: str) -> str:
    if not _POD_NAME_RE.match(name):
        raise LabError(f"invalid pod name {name!r}: use 1-{MAX_POD_NAME} characters of a-z and 0-9, "
                       "not 'sw' nor a node name like n1")
    return name


def validate_pods_per_node(count: int) -> int:
    if not 0 <= count <= MAX_PODS_PER_NODE:
        raise LabError(f"invalid --pods-per-node {count}: use 0 to {MAX_PODS_PER_NODE}")
    return count


def default_pod_names(count: int) -> list[str]:
    return [f"p{k}" for k in range(1, count + 1)]


def pod_netns(lab: str, node: str, pod: str) -> str:
    return f"{NETNS_PREFIX}{lab}-{node}-{pod}"


def plan_pod(lab: str, node: str, pod: str) -> PodRecord:
    validate_pod_name(pod)
    netns = pod_netns(lab, node, pod)
    return PodRecord(name=pod, node=node, netns=netns, container_id=netns)


# --- the CNI chain, as libcni runs it ------------------------------------------------------------------


def chain_configs(conflist: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each plugin's network configuration, without ``prevResult`` (see :func:`with_prev_result`)."""
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise LabError("the CNI conflist has no plugins")
    configs = []
    for plugin in plugins:
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise LabError(f"the CNI conflist has a plugin without a type: {plugin!r}")
        configs.append({**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]})
    return configs


def with_prev_result(config: Mapping[str, Any], prev: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(config) if prev is None else {**config, "prevResult": dict(prev)}


def cni_env(command: str, pod: PodRecord, netns_path: str, cni_path: str) -> dict[str, str]:
    """The CNI_* variables a runtime sets (``CNI_NETNS`` is empty for a DEL after the netns went)."""
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": pod.container_id, "CNI_NETNS": netns_path,
            "CNI_IFNAME": POD_IFNAME, "CNI_PATH": cni_path}


def result_address(result: Mapping[str, Any]) -> str:
    """The pod's IPv4 address with prefix from a CNI result (any version from 0.3.0 on)."""
    for ip in result.get("ips", []):
        text = ip.get("address") if isinstance(ip, dict) else None
        if isinstance(text, str):
            try:
                if ipaddress.ip_interface(text).version == 4:
                    return text
            except ValueError:
                continue
    raise LabError(f"the CNI result holds no IPv4 address: {dict(result)!r}")


# --- reachability ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Something pods ping: another pod, or a node's address on the pod network."""

    label: str
    ip: str


def matrix_targets(pods: Sequence[PodRecord], gateways: Mapping[str, str]) -> list[Target]:
    """Every pod with an address, then every node's gateway (bridge) address, in a stable order."""
    targets = [Target(p.label, p.ip) for p in sorted(pods, key=lambda p: (p.node, p.name)) if p.ip]
    targets += [Target(node, ip) for node, ip in sorted(gateways.items())]
    return targets


def render_matrix(rows: Sequence[PodRecord], targets: Sequence[Target], reached: Mapping[tuple[str, str], bool]) -> str:
    """A table of ``ok`` / ``--`` (no answer); a pod's cell for itself reads ``·``. Ends with a summary line."""
    row_labels = [p.label for p in rows]
    width = max([len(t.label) for t in targets] + [2])
    first = max([len(label) for label in row_labels] + [len("from \\ to")])
    lines = ["from \\ to".ljust(first) + "  " + "  ".join(t.label.rjust(width) for t in targets)]
    failed = 0
    for label in row_labels:
        cells = []
        for t in targets:
            if t.label == label:
                cells.append("·".rjust(width))
            elif reached.get((label, t.label), False):
                cells.append("ok".rjust(width))
            else:
                failed += 1
                cells.append("--".rjust(width))
        lines.append(label.ljust(first) + "  " + "  ".join(cells))
    pairs = sum(1 for r in row_labels for t in targets if t.label != r)
    lines.append(f"{pairs - failed}/{pairs} reachable" + ("" if not failed else f", {failed} NOT reachable"))
    return "\n".join(lines)
