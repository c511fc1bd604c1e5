"""Pure planning for the local lab: names, addresses, saved state, partition rules, convergence.

Everything here is a function of its arguments (no subprocess, no files, no clock), so the parts of the
lab that decide *what* to do are unit-tested without root (``tests/unit/test_lab_plan.py``), and the I/O
modules (:mod:`weaved.lab.host`, :mod:`weaved.lab.ops`) stay thin enough to read in one sitting.

Layout of a lab called ``LAB`` with ``N`` nodes::

    netns wl-LAB-sw:  bridge br0 ── ports n1 … nN          (the "switch", where partitions are enforced)
    netns wl-LAB-nK:  eth0 198.51.100.(10+K)/24 ── veth ── port nK in wl-LAB-sw

TEST-NET-2 (198.51.100.0/24) keeps lab traffic from ever being mistaken for the host's network; labs are
isolated from each other by their namespaces, so they may all reuse the same addresses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

LAB_ROOT = Path("/run/weaved-lab")
"""Per-lab state lives in ``LAB_ROOT/LAB`` (tmpfs: a reboot, which also drops the namespaces, clears it)."""

NETNS_PREFIX = "wl-"
UNDERLAY = ipaddress.IPv4Network("198.51.100.0/24")
ADDRESS_OFFSET = 10
"""Node ``nK`` gets ``198.51.100.(10+K)``: low addresses stay free for anything a test wants to add."""
BRIDGE = "br0"
NODE_IFNAME = "eth0"
MESH_PORT = 6783
MAX_NODES = 64
"""Every node runs a Python daemon; far beyond this a 2-core machine spends its time importing modules."""
MAX_LAB_NAME = 8
"""``wl-`` + name + ``-n64`` must fit IFNAMSIZ-1 = 15 characters, the limit we keep all lab names under."""
NFT_TABLE = "weaved_lab"
STATE_VERSION = 1

_LAB_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_NODE_RE = re.compile(r"^n([1-9][0-9]*)$")
_POD_NETNS_RE = re.compile(r"^n[1-9][0-9]*-(?!sw$)(?!n[0-9]+$)[a-z0-9]{1,8}$")
"""A pod's namespace is ``wl-LAB-NODE-POD`` (see :mod:`weaved.lab.pods`). Pods are never called ``sw`` or
like a node, so lab ``a``'s pods cannot be mistaken for lab ``a-n1``'s switch or nodes."""


class LabError(Exception):
    """A lab operation cannot proceed; the message is one line that says what to do about it."""


# --- names and addresses -------------------------------------------------------------------------------


def validate_lab_name(name: str) -> str:
    """Return ``name`` if it is usable as a lab name, else raise :class:`LabError`.

    Lab names end up in namespace names and paths, so they are restricted to a short ``[a-z0-9-]``.
    """
    if not name or len(name) > MAX_LAB_NAME or not _LAB_NAME_RE.match(name):
        raise LabError(
            f"invalid lab name {name!r}: use 1-{MAX_LAB_NAME} characters of a-z, 0-9 and '-' "
            "(not starting or ending with '-')"
        )
    return name


def validate_node_count(count: int) -> int:
    if not 1 <= count <= MAX_NODES:
        raise LabError(f"invalid node count {count}: use 1 to {MAX_NODES} nodes")
    return count


def node_names(count: int) -> list[str]:
    return [f"n{k}" for k in range(1, count + 1)]


def node_index(node: str) -> int:
    """``n3`` → 3; raise :class:`LabError` for anything that is not a node name."""
    m = _NODE_RE.match(node)
    if not m:
        raise LabError(f"invalid node name {node!r}: nodes are called n1, n2, …")
    return int(m.group(1))


def switch_netns(lab: str) -> str:
    return f"{NETNS_PREFIX}{lab}-sw"


def node_netns(lab: str, node: str) -> str:
    return f"{NETNS_PREFIX}{lab}-{node}"


def is_lab_netns(lab: str, netns: str) -> bool:
    """Whether ``netns`` is one this lab creates: ``down`` deletes exactly these, nothing else."""
    prefix = f"{NETNS_PREFIX}{lab}-"
    if not netns.startswith(prefix):
        return False
    rest = netns[len(prefix) :]
    return rest == "sw" or _NODE_RE.match(rest) is not None or _POD_NETNS_RE.match(rest) is not None


def node_address(node: str) -> ipaddress.IPv4Interface:
    host = ADDRESS_OFFSET + node_index(node)
    return ipaddress.IPv4Interface(f"{UNDERLAY.network_address + host}/{UNDERLAY.prefixlen}")


def lab_dir(lab: str, root: Path = LAB_ROOT) -> Path:
    return root / lab


# --- state ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRecord:
    """One node as ``state.json`` keeps it."""

    name: str
    netns: str
    address: str
    """Underlay address with prefix, e.g. ``198.51.100.11/24``."""
    state_dir: str
    log_path: str
    pid: int | None = None
    """The daemon's PID while the lab believes it runs; None once ``kill`` stopped it (or before start)."""
    starttime: int | None = None
    """``/proc/PID/stat`` start time, so that a recycled PID is never mistaken for our daemon."""
    password_file: str | None = None
    """The mesh password file the daemon starts with (``up``/``start --password-file``); None: no password."""

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]

    @property
    def api_socket(self) -> str:
        """The node daemon's control socket: the nodes share one filesystem, so each has its own path."""
        return str(Path(self.state_dir) / "weaved.sock")


@dataclass(frozen=True)
class PodRecord:
    """One pod as ``state.json`` keeps it."""

    name: str
    node: str
    netns: str
    container_id: str
    address: str | None = None
    """``10.32.0.5/12`` as the plugin's result gave it; None until ADD succeeded."""
    result: dict[str, Any] | None = None
    """The chain's final ADD result, cached for DEL as libcni caches it."""

    @property
    def label(self) -> str:
        return f"{self.node}/{self.name}"

    @property
    def ip(self) -> str | None:
        return None if self.address is None else self.address.split("/", 1)[0]


@dataclass(frozen=True)
class LabState:
    name: str
    switch_netns: str
    python: str
    """The interpreter daemons run under (the one the lab was created with, i.e. the venv's)."""
    port: int
    nodes: list[NodeRecord]
    partition: list[list[str]] | None = None
    daemons: bool = True
    """False for ``up --no-daemons``: a bare underlay."""
    pods: list[PodRecord] = field(default_factory=list)
    version: int = STATE_VERSION

    def node(self, name: str) -> NodeRecord:
        for n in self.nodes:
            if n.name == name:
                return n
        node_index(name)  # a malformed name gets the more useful message
        raise LabError(f"lab {self.name!r} has no node {name!r} (nodes: {', '.join(self.node_names)})")

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def with_node(self, record: NodeRecord) -> LabState:
        return replace(self, nodes=[record if n.name == record.name else n for n in self.nodes])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabState:
        if data.get("version") != STATE_VERSION:
            raise LabError(f"lab state has version {data.get('version')!r}, this weaved knows {STATE_VERSION}")
        nodes = [NodeRecord(**n) for n in data["nodes"]]
        pods = [PodRecord(**p) for p in data.get("pods", [])]
        return cls(**{**data, "nodes": nodes, "pods": pods})


def plan_lab(lab: str, count: int, python: str, root: Path = LAB_ROOT, *, daemons: bool = True,
             password_file: str | None = None) -> LabState:
    """The lab ``up`` is about to build (no PIDs yet)."""
    validate_lab_name(lab)
    validate_node_count(count)
    base = lab_dir(lab, root)
    nodes = [
        NodeRecord(
            name=n,
            netns=node_netns(lab, n),
            address=str(node_address(n)),
            state_dir=str(base / n / "state"),
            log_path=str(base / n / "weaved.log"),
            password_file=password_file,
        )
        for n in node_names(count)
    ]
    return LabState(
        name=lab, switch_netns=switch_netns(lab), python=python, port=MESH_PORT, nodes=nodes, daemons=daemons
    )


def daemon_argv(state: LabState, node: str) -> list[str]:
    """The daemon command for ``node`` (to run under ``ip netns exec``).

    Every other node is a ``--peer``, as Kubernetes' KUBE_PEERS would list them.
    """
    me = state.node(node)
    argv = [
        state.python,
        "-m",
        "weaved",
        "run",
        "--nickname",
        me.name,
        "--state-dir",
        me.state_dir,
        "--port",
        str(state.port),
        "--log-format",
        "console",
        "--api-socket",
        me.api_socket,
    ]
    for other in state.nodes:
        if other.name != node:
            argv += ["--peer", other.ip]
    if me.password_file is not None:
        argv += ["--password-file", me.password_file]
    return argv


def process_state(pid: int | None, alive: bool) -> str:
    """``running`` / ``stopped`` (no daemon by intent) / ``dead`` (should run, but the process is gone)."""
    if pid is None:
        return "stopped"
    return "running" if alive else "dead"


# --- partitions ----------------------------------------------------------------------------------------


def parse_groups(args: Sequence[str], nodes: Sequence[str]) -> list[list[str]]:
    """Turn ``["n1", "n2,n3"]`` into validated groups.

    A single group means "cut these off from everyone else", so its complement becomes the second group;
    with two or more groups, nodes named in none keep reaching everyone.
    """
    if not args:
        raise LabError("partition needs at least one group, e.g. `partition n1 n2,n3`")
    known = set(nodes)
    seen: set[str] = set()
    groups: list[list[str]] = []
    for arg in args:
        group = [m.strip() for m in arg.split(",") if m.strip()]
        if not group:
            raise LabError(f"empty partition group {arg!r}")
        for member in group:
            node_index(member)
            if member not in known:
                raise LabError(f"partition names unknown node {member!r} (nodes: {', '.join(nodes)})")
            if member in seen:
                raise LabError(f"node {member!r} is in more than one partition group")
            seen.add(member)
        groups.append(sorted(group, key=node_index))
    if len(groups) == 1:
        rest = [n for n in nodes if n not in seen]
        if not rest:
            raise LabError("a single partition group must leave some nodes out (it is cut off from the rest)")
        groups.append(rest)
    return groups


def blocked_pairs(groups: Sequence[Sequence[str]]) -> set[frozenset[str]]:
    """Unordered node pairs that cannot reach each other over the underlay."""
    blocked: set[frozenset[str]] = set()
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            blocked.update(frozenset((x, y)) for x in a for y in b)
    return blocked


def _nft_set(names: Iterable[str]) -> str:
    return "{ " + ", ".join(f'"{n}"' for n in names) + " }"


def heal_ruleset() -> str:
    """nft script that removes the lab's partition table; idempotent (declaring the table first)."""
    return f"table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n"


def partition_ruleset(groups: Sequence[Sequence[str]]) -> str:
    """nft script for the switch namespace: drop bridged frames between ports of different groups.

    Applied as one transaction that replaces any previous partition. The bridge family's forward hook
    sees every frame the bridge forwards (flooded ARP included, once per output port), so matching input
    and output port names cuts exactly the pairs of :func:`blocked_pairs`. The switch ports are named after
    the nodes. Counters make ``nft list ruleset`` show what was dropped.
    """
    lines = [
        heal_ruleset().rstrip("\n"),
        f"table bridge {NFT_TABLE} {{",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
    ]
    for i, src in enumerate(groups):
        others = [n for j, g in enumerate(groups) if j != i for n in g]
        if src and others:
            lines.append(f'    iifname {_nft_set(src)} oifname {_nft_set(others)} counter drop comment "partition"')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def describe_partition(groups: Sequence[Sequence[str]] | None) -> str:
    if not groups:
        return "none"
    return " | ".join(",".join(g) for g in groups)


def expected_views(running: Iterable[str], groups: Sequence[Sequence[str]] | None,
                   passwords: Mapping[str, str | None] | None = None) -> dict[str, set[str]]:
    """For each running node, the other running nodes a settled mesh lets it reach.

    The overlay relays, so that is the node's connected component in the underlay graph among *running*
    nodes (with groups {n1},{n2} and an ungrouped n3, n1 still reaches n2 through n3). Nodes whose
    passwords differ (``passwords``: node → a digest of its password, None for none) never connect.
    """
    nodes = sorted(set(running), key=node_index)
    blocked = blocked_pairs(groups or [])
    if passwords:
        blocked |= {frozenset((a, b)) for a in nodes for b in nodes
                    if a != b and passwords.get(a) != passwords.get(b)}
    component: dict[str, set[str]] = {}
    for start in nodes:
        if start in component:
            continue
        seen = {start}
        stack = [start]
        while stack:
            cur = stack.pop()
            for other in nodes:
                if other not in seen and frozenset((cur, other)) not in blocked:
                    seen.add(other)
                    stack.append(other)
        for member in seen:
            component[member] = seen
    return {n: component[n] - {n} for n in nodes}


# --- convergence ---------------------------------------------------------------------------------------


def reachable_nicknames(report: Mapping[str, Any]) -> set[str]:
    """Nicknames of the peers a ``weaved report`` shows as reachable (a next hop), itself excluded."""
    own = report.get("nickname")
    return {
        str(p.get("nickname"))
        for p in report.get("peers", [])
        if p.get("next_hop") is not None and p.get("nickname") != own
    }


def convergence_gaps(
    reports: Mapping[str, Mapping[str, Any] | None], expected: Mapping[str, set[str]]
) -> dict[str, str]:
    """What keeps the mesh from matching ``expected`` (node → why); empty means converged.

    ``reports`` maps each node to its parsed ``weaved report`` (None when it could not be read). A node
    must reach exactly its expected peers: missing ones are not joined yet, extra ones (a killed node, the
    other side of a partition) are not yet detected as gone.
    """
    gaps: dict[str, str] = {}
    for node in sorted(expected, key=node_index):
        report = reports.get(node)
        if report is None:
            gaps[node] = "no report (daemon not answering)"
            continue
        if report.get("nickname") != node:
            gaps[node] = f"report is from nickname {report.get('nickname')!r}"
            continue
        seen = reachable_nicknames(report)
        missing = sorted(expected[node] - seen, key=_sort_key)
        extra = sorted(seen - expected[node], key=_sort_key)
        parts = []
        if missing:
            parts.append("does not reach " + ",".join(missing))
        if extra:
            parts.append("still reaches " + ",".join(extra))
        if parts:
            gaps[node] = "; ".join(parts)
    return gaps


def _sort_key(name: str) -> tuple[int, str]:
    m = _NODE_RE.match(name)
    return (int(m.group(1)) if m else 1_000_000, name)
