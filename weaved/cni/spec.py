"""The CNI protocol, pure: a request's environment and configuration in, a typed request or a CniError out;
a pod's attachment in, the result JSON of the runtime's CNI version out.

Theory of operation
-------------------
The runtime executes ``/opt/cni/bin/weave-net`` with ``CNI_*`` variables and the network configuration on
stdin; the C forwarder hands both to the daemon unchanged. Everything the spec says about *what* a request
means lives here, without I/O, so that every rule can be tested exhaustively:

* :func:`parse_request` validates the variables each command needs (error 4), decodes the configuration
  (error 6), checks its fields (error 7) and negotiates the version (error 1): the configuration's
  ``cniVersion`` must be one of :data:`SUPPORTED_VERSIONS`, and the result is rendered in exactly that
  version, as the spec demands. CHECK needs 0.4.0 or newer, STATUS and GC 1.1.0 or newer.
* :func:`render_result` renders an :class:`Attachment` per version: before 1.0.0 every IP carries
  ``"version": "4"``; from 1.1.0 interfaces carry their ``mtu``.
* :func:`parse_result` reads a result back (a delegated IPAM plugin's output, or the ``prevResult`` a
  runtime sends with CHECK and DEL), in any supported version.
* :func:`valid_attachments` reads GC's ``cni.dev/valid-attachments``.
* :func:`host_veth_name` and :func:`veth_alias` name what ADD creates on the host deterministically from
  (container id, interface), so DEL, CHECK, GC and the spool find it again without any state of their own.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
"""Versions this plugin speaks (the forwarder's VERSION answer lists the same)."""
LATEST = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# Well-known error codes (CNI spec, "Error codes"); 100+ are this plugin's own.
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50
"""STATUS: the plugin cannot serve ADD now."""
E_INTERFACE = 100
"""Setting up or checking the pod's interface failed (the details say which step)."""
E_CHECK = 101
"""CHECK found the attachment different from what ADD made."""
E_IPAM = 102
"""The delegated IPAM plugin or the daemon's IPAM refused for a reason other than waiting."""
E_INTERNAL = 199

MAX_CONTAINER_ID = 200
"""Longer ids are refused: the id names a spool file and goes into the host veth's alias (≤ 256 bytes)."""
VETH_PREFIX = "vethwe"
ALIAS_PREFIX = "weave-cni"
DEFAULT_MTU = 1376
"""Used only when neither the configuration nor the node network gives an MTU (Weave's sleeve default)."""
DEFAULT_IPAM_TIMEOUT = 30.0
MAX_IPAM_TIMEOUT = 180.0
DEFAULT_IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CniError(Exception):
    """A CNI error result: ``code`` per the spec, ``msg`` short, ``details`` longer."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str = LATEST) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_tuple(text: str) -> tuple[int, int, int]:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() and len(p) <= 4 for p in parts):
        raise ValueError(text)
    return int(parts[0]), int(parts[1]), int(parts[2])


def negotiate(version: object) -> str:
    """The version to answer in: the configuration's own, when we speak it (error 1 otherwise)."""
    if not isinstance(version, str) or not version:
        raise CniError(E_INVALID_CONFIG, "cniVersion missing from the network configuration")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E_INCOMPATIBLE_VERSION, f"incompatible CNI version {version[:32]!r}",
                       f"weave-net supports {', '.join(SUPPORTED_VERSIONS)}")
    return version


@dataclass(frozen=True)
class NetConf:
    """The fields of the network configuration weave-net uses."""

    cni_version: str
    name: str
    mtu: int | None = None
    """Pod interface MTU; ``None``: the node network's."""
    hairpin: bool = True
    ipam: Mapping[str, Any] | None = None
    """A delegated IPAM plugin's configuration (``ipam.type`` set), or None for the daemon's IPAM."""
    ipam_timeout: float = DEFAULT_IPAM_TIMEOUT
    prev_result: Mapping[str, Any] | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    """The configuration as sent (passed on unchanged to a delegated IPAM plugin)."""


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: tuple[tuple[str, str], ...]
    path: tuple[str, ...]
    conf: NetConf
    env: Mapping[str, str] = field(default_factory=dict)
    """The CNI_* variables as received (a delegated IPAM plugin gets the same)."""


def parse_cni_args(text: str) -> tuple[tuple[str, str], ...]:
    """``K=V;K2=V2`` (error 4 for a pair without ``=``)."""
    pairs = []
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(E_INVALID_ENV, "malformed CNI_ARGS", f"{item[:64]!r} is not KEY=VALUE")
        pairs.append((key, value))
    return tuple(pairs)


def _need(env: Mapping[str, str], key: str) -> str:
    value = env.get(key, "")
    if not value:
        raise CniError(E_INVALID_ENV, f"{key} is not set")
    return value


def valid_ifname(name: str) -> bool:
    return bool(DEFAULT_IFNAME_RE.match(name)) and name not in (".", "..")


def _decode(stdin: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(E_DECODE, "cannot decode the network configuration", str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise CniError(E_DECODE, "cannot decode the network configuration", "not a JSON object")
    return doc


def _mtu(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 68 <= value <= 65535:
        raise CniError(E_INVALID_CONFIG, "invalid mtu", f"{value!r}: want an integer 68-65535")
    return value


def valid_attachments(doc: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """GC's ``cni.dev/valid-attachments``: (container id, ifname) pairs still in use (error 7 if malformed)."""
    items = doc.get("cni.dev/valid-attachments", [])
    if not isinstance(items, list):
        raise CniError(E_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    pairs = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("containerID"), str)
                and isinstance(item.get("ifname"), str)):
            raise CniError(E_INVALID_CONFIG, "malformed entry in cni.dev/valid-attachments", repr(item)[:120])
        pairs.append((item["containerID"], item["ifname"]))
    return tuple(pairs)


def parse_conf(doc: Mapping[str, Any], command: str) -> NetConf:
    version = negotiate(doc.get("cniVersion"))
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CniError(E_INVALID_CONFIG, "network name missing or invalid", repr(name)[:64])
    minimum = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(command)
    if minimum and version_tuple(version) < version_tuple(minimum):
        raise CniError(E_INCOMPATIBLE_VERSION, f"config version {version} does not allow {command}",
                       f"{command} needs cniVersion {minimum} or newer")
    hairpin = doc.get("hairpinMode", True)
    if not isinstance(hairpin, bool):
        raise CniError(E_INVALID_CONFIG, "hairpinMode must be true or false")
    ipam = doc.get("ipam")
    if ipam is not None and not isinstance(ipam, dict):
        raise CniError(E_INVALID_CONFIG, "ipam must be an object")
    if ipam is not None and ipam.get("type") in (None, ""):
        ipam = None  # {"ipam": {}}: the daemon's own IPAM
    if ipam is not None and (not isinstance(ipam["type"], str) or "/" in ipam["type"]):
        raise CniError(E_INVALID_CONFIG, "ipam.type must be a plugin file name")
    timeout = doc.get("ipamTimeoutSeconds", DEFAULT_IPAM_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_IPAM_TIMEOUT:
        raise CniError(E_INVALID_CONFIG, "ipamTimeoutSeconds out of range", f"want 0 < t <= {MAX_IPAM_TIMEOUT:g}")
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(E_INVALID_CONFIG, "prevResult must be an object")
    if command == "CHECK" and prev is None:
        raise CniError(E_INVALID_CONFIG, "CHECK needs prevResult", "the runtime sent no result of the ADD")
    return NetConf(
        cni_version=version, name=name, mtu=_mtu(doc.get("mtu")), hairpin=hairpin, ipam=ipam,
        ipam_timeout=float(timeout), prev_result=prev,
        valid_attachments=valid_attachments(doc) if command == "GC" else None, raw=doc,
    )


def parse_request(env: Mapping[str, str], stdin: bytes) -> Request:
    """Validate one invocation (see the module docstring for which error code each mistake gets)."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(E_INVALID_ENV, "CNI_COMMAND missing or unknown", repr(command)[:40])
    doc = _decode(stdin)
    container_id = netns = ifname = ""
    if command in ("ADD", "DEL", "CHECK"):
        container_id = _need(env, "CNI_CONTAINERID")
        if len(container_id) > MAX_CONTAINER_ID or not CONTAINER_ID_RE.match(container_id):
            raise CniError(E_INVALID_ENV, "invalid CNI_CONTAINERID",
                           f"want up to {MAX_CONTAINER_ID} of [A-Za-z0-9_.-], starting alphanumeric")
        ifname = _need(env, "CNI_IFNAME")
        if not valid_ifname(ifname):
            raise CniError(E_INVALID_ENV, "invalid CNI_IFNAME", f"{ifname[:40]!r} is not an interface name")
        netns = env.get("CNI_NETNS", "")
        if command != "DEL" and not netns:
            raise CniError(E_INVALID_ENV, "CNI_NETNS is not set")
    conf = parse_conf(doc, command)
    path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
    return Request(command, container_id, netns, ifname, parse_cni_args(env.get("CNI_ARGS", "")), path, conf,
                   {k: v for k, v in env.items() if k.startswith("CNI_")})


def error_version(env_version: object) -> str:
    """The cniVersion to write into an error: the request's own when we speak it."""
    return env_version if isinstance(env_version, str) and env_version in SUPPORTED_VERSIONS else LATEST


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    gw: IPv4Address | None = None


@dataclass(frozen=True)
class Attachment:
    """What ADD made: rendered by :func:`render_result`, compared by CHECK."""

    host_ifname: str
    host_mac: str
    ifname: str
    mac: str
    sandbox: str
    address: IPv4Interface
    gateway: IPv4Address | None
    mtu: int
    routes: tuple[Route, ...]
    dns: Mapping[str, Any] = field(default_factory=dict)


def render_result(version: str, att: Attachment) -> dict[str, Any]:
    new = version_tuple(version) >= (1, 0, 0)
    host: dict[str, Any] = {"name": att.host_ifname, "mac": att.host_mac}
    pod: dict[str, Any] = {"name": att.ifname, "mac": att.mac, "sandbox": att.sandbox}
    if version_tuple(version) >= (1, 1, 0):
        host["mtu"] = pod["mtu"] = att.mtu
    ip: dict[str, Any] = {"address": str(att.address), "interface": 1}
    if att.gateway is not None:
        ip["gateway"] = str(att.gateway)
    if not new:
        ip = {"version": "4", **ip}
    routes = [{"dst": str(r.dst), **({"gw": str(r.gw)} if r.gw is not None else {})} for r in att.routes]
    out: dict[str, Any] = {"cniVersion": version, "interfaces": [host, pod], "ips": [ip], "routes": routes,
                           "dns": dict(att.dns)}
    return out


@dataclass(frozen=True)
class ParsedResult:
    """The IPv4 part of a result, whichever version wrote it."""

    addresses: tuple[tuple[IPv4Interface, IPv4Address | None, str | None], ...]
    """(address, gateway, interface name) per IPv4 entry."""
    routes: tuple[Route, ...]
    dns: Mapping[str, Any]


def parse_result(doc: object) -> ParsedResult:
    """Read a result (error 6 when it is not one); IPv6 entries are skipped: weaved's pod network is IPv4."""
    if not isinstance(doc, dict):
        raise CniError(E_DECODE, "result is not a JSON object")
    if "code" in doc and "ips" not in doc:
        raise CniError(int(doc["code"]) if isinstance(doc["code"], int) else E_INTERNAL,
                       str(doc.get("msg", "error"))[:200], str(doc.get("details", ""))[:400])
    interfaces = doc.get("interfaces") or []
    names = [i.get("name") if isinstance(i, dict) else None for i in interfaces] if isinstance(interfaces, list) \
        else []
    addresses = []
    try:
        for entry in doc.get("ips") or []:
            address = entry["address"]
            if ":" in address:
                continue
            gateway = IPv4Address(entry["gateway"]) if entry.get("gateway") else None
            index = entry.get("interface")
            name = names[index] if isinstance(index, int) and 0 <= index < len(names) else None
            addresses.append((IPv4Interface(address), gateway, name))
        routes = tuple(
            Route(IPv4Network(r["dst"]), IPv4Address(r["gw"]) if r.get("gw") else None)
            for r in doc.get("routes") or [] if ":" not in r["dst"]
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CniError(E_DECODE, "malformed result", f"{type(exc).__name__}: {exc}"[:200]) from None
    dns = doc.get("dns") if isinstance(doc.get("dns"), dict) else {}
    return ParsedResult(tuple(addresses), routes, dns or {})


# --- names -------------------------------------------------------------------------------------------


def host_veth_name(container_id: str, ifname: str) -> str:
    """``vethwe`` + 9 hex digits of sha256(id NUL ifname): 15 characters, the kernel's limit."""
    digest = hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()
    return VETH_PREFIX + digest[:9]


def veth_alias(container_id: str, ifname: str) -> str:
    """The host veth's ``ifalias``: how GC and the spool find a container's veths."""
    return f"{ALIAS_PREFIX} {container_id} {ifname}"


def parse_alias(alias: str | None) -> tuple[str, str] | None:
    """(container id, ifname) from an alias :func:`veth_alias` wrote; None for anything else."""
    if not alias:
        return None
    parts = alias.split(" ")
    if len(parts) != 3 or parts[0] != ALIAS_PREFIX:
        return None
    return parts[1], parts[2]
