"""Daemon settings from command-line flags and the environment, with Weave Net's variable names.

Theory of operation
-------------------
The DaemonSet manifest of Weave Net configures the router through environment variables (``KUBE_PEERS``,
``CONN_LIMIT``, ``WEAVE_HTTP_ADDR`` …) while operators on a shell use flags. :func:`parse_settings` merges
both (a flag wins over its variable, which wins over the default) into one frozen :class:`Settings`.

It is a pure function of its inputs: the flags as a mapping, the environment as a mapping and the machine's
host name as a string. Nothing here reads ``os.environ`` or the network, which keeps every rule testable.
A bad value raises :class:`ConfigError` carrying one line meant for the operator; the CLI prints it and
exits with status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from weaved.core.ipam.ring import AddressRange
from weaved.core.ipam.seeding import ConsensusInit, InitMode, ObserverInit, SeedInit, parse_init
from weaved.core.wire import MAX_NICKNAME
from weaved.k8s.settings import KubeSettingError, KubeSettings, parse_kube_settings

DEFAULT_PORT = 6783
DEFAULT_CONN_LIMIT = 200
DEFAULT_HTTP_ADDR = "127.0.0.1:6784"
DEFAULT_METRICS_ADDR = "0.0.0.0:6782"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_STATE_DIR = "/var/lib/weave"
DEFAULT_CNI_SOCKET = "/run/weave/cni.sock"
"""Where the CNI forwarder finds the daemon (its own default too) when the state directory is the default;
with another ``--state-dir`` (a lab node, a test) the socket is ``STATE_DIR/cni.sock``, so daemons sharing
a mount namespace never share a socket."""
DEFAULT_API_SOCKET = "/run/weave/weaved.sock"
"""The local API's control socket (every call that changes the daemon; mode 0600, so root's alone) when the
state directory is the default; with another ``--state-dir`` it is ``STATE_DIR/weaved.sock``, like the CNI
socket, so lab nodes sharing one filesystem each get their own."""
MAX_UNIX_PATH = 107
DEFAULT_IPALLOC_RANGE = "10.32.0.0/12"
DEFAULT_IPALLOC_INIT = "consensus"
SLEEVE_PORT_OFFSET = 2
"""The sleeve's UDP port defaults to the control port + 2 (6785), which is also what peers assume for a
peer that advertises a bare ``sleeve`` overlay (see :func:`weaved.core.forwarding.sleeve_address`)."""
MTU_MIN = 576
MTU_MAX = 65_000
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

LogFormat = Literal["console", "json"]

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62})?)*\.?$")


class ConfigError(ValueError):
    """A setting the operator got wrong; ``str()`` is the one line to show them."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """An unresolved ``host:port``: the host is an IP literal or a DNS name (resolved by the daemon)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``weaved run`` needs to start, already validated."""

    peers: tuple[HostPort, ...]
    port: int
    host: str
    """IP the control socket binds (``0.0.0.0``: every interface, like Weave's router)."""
    conn_limit: int
    http_addr: HostPort
    metrics_addr: HostPort
    nickname: str
    state_dir: Path
    log_format: LogFormat
    log_level: str
    ipalloc_range: AddressRange
    """The pod network every peer allocates from (``IPALLOC_RANGE``)."""
    ipalloc_init: InitMode
    """How the peers agree on the first split of the range (``IPALLOC_INIT``)."""
    kube: KubeSettings | None = None
    """Node discovery and reclaim through the Kubernetes API (in a cluster, or ``--kube``)."""
    cni_socket: Path | None = None
    """The unix socket the CNI forwarder talks to (``--cni-socket``/``WEAVE_CNI_SOCKET``; ``off``: none)."""
    cni_spool: Path = Path(DEFAULT_STATE_DIR) / "cni-pending"
    """Where the forwarder records releases while the daemon is down (``--cni-spool``/``WEAVE_CNI_SPOOL``)."""
    datapath: bool = True
    """Set up the node network and run the sleeve (``--no-datapath``/``WEAVE_NO_DATAPATH=1`` turn it off:
    a daemon in the host's own namespace under test must never touch its network)."""
    sleeve_port: int = DEFAULT_PORT + SLEEVE_PORT_OFFSET
    """UDP port of the sleeve data socket (``WEAVE_SLEEVE_PORT``, default control port + 2)."""
    mtu: int | None = None
    """``WEAVE_MTU``: the pod MTU, overriding the one computed from the underlay."""
    offload: bool = True
    """The fast sleeve: virtio headers, TSO super-packets, UDP GSO/GRO (``--no-offload``/``WEAVE_NO_OFFLOAD=1``
    turn it off: one packet per datagram, for kernels without them; peers negotiate, so both kinds mix)."""
    native: bool = True
    """The offload sleeve's C hot loop, when it was built (``--no-native``/``WEAVE_NO_NATIVE=1``: the Python
    loop alone, same behaviour, more CPU per byte; for comparison and as a way out of a fault in the C)."""
    no_masq_local: bool = True
    """``NO_MASQ_LOCAL`` (Weave's default since 2.7): traffic from outside the pod range to this node's own
    pods keeps its source address (what ``externalTrafficPolicy: Local`` needs); off, it is masqueraded."""
    password: bytes | None = field(default=None, repr=False)
    """``WEAVE_PASSWORD`` (Weave's variable): the mesh password itself. Never taken from argv (``ps`` shows
    argv to every user) and never printed: ``repr`` leaves it out."""
    password_file: Path | None = None
    """``--password-file``/``WEAVE_PASSWORD_FILE``: a file holding the password (one trailing newline is not
    part of it). Read at start by :mod:`weaved.adapters.password`."""
    password_file_optional: bool = False
    """``WEAVE_PASSWORD_FILE_OPTIONAL=1``: a missing password file means no password (the DaemonSet mounts
    the ``weave-passwd`` Secret only when it exists, as Weave Net reads it); otherwise a missing file is an
    error, so a typo cannot silently start a mesh in clear."""
    trusted_subnets: tuple[ipaddress.IPv4Network, ...] = ()
    """``--trusted-subnets``/``WEAVE_TRUSTED_SUBNETS`` (Weave's ``--trusted-subnets``): with a password, data
    between peers that both count each other's address in these subnets goes unsealed; control stays sealed."""
    api_socket: Path = Path(DEFAULT_API_SOCKET)
    """The unix socket of the API's mutating calls (``--api-socket``/``WEAVE_API_SOCKET``): connect, forget,
    IPAM alloc/claim/release, rmpeer, reset. ``http_addr`` serves only what reads."""


def parse_host_port(text: str, default_port: int, what: str) -> HostPort:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a bare IPv6 literal; ``:PORT`` means every interface.

    ``what`` names the setting in the error message, so the operator knows which value to fix.
    """
    raw = text.strip()
    if not raw:
        raise ConfigError(f"{what}: empty address")
    host, port_text = raw, ""
    if raw.startswith("["):
        inner, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{what}: malformed address {text!r} (expected [IPv6]:PORT)")
        host, port_text = inner, rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        host = host or DEFAULT_HOST
    port = _port(port_text, what, text) if port_text else default_port
    _check_host(host, what, text)
    return HostPort(host, port)


def _port(text: str, what: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{what}: port must be a number in {whole!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port {port} out of range 1-65535")
    return port


def _check_host(host: str, what: str, whole: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host) or len(host) > 253:
            raise ConfigError(f"{what}: {whole!r} is neither an IP address nor a host name") from None


def parse_peer(text: str, default_port: int, what: str) -> HostPort:
    """A peer address: like :func:`parse_host_port`, minus IPv6 (the control socket is IPv4 for now)."""
    peer = parse_host_port(text, default_port, what)
    if ":" in peer.host:
        raise ConfigError(f"{what}: {text.strip()!r}: IPv6 peers are not supported yet (the control socket is IPv4)")
    return peer


def parse_peer_list(text: str, default_port: int, what: str) -> list[HostPort]:
    """A ``KUBE_PEERS``-style list: addresses separated by spaces and/or commas."""
    return [parse_peer(item, default_port, what) for item in re.split(r"[\s,]+", text) if item]


def _int_setting(flag: Any, env: Mapping[str, str], var: str, default: int, what: str) -> int:
    raw = flag if flag is not None else env.get(var, "").strip() or None
    if raw is None:
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a whole number, got {raw!r}") from None


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    lowered = value.strip().lower()
    if lowered not in choices:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return lowered


def _nickname(flag: str | None, env: Mapping[str, str], hostname: str) -> str:
    """``--nickname``, else ``HOSTNAME`` (the node name in Weave's DaemonSet), else the host name.

    An explicit nickname longer than the wire allows is an error; a derived one is cut to fit instead,
    because refusing to start on a long FQDN would be a poor reason for a node to stay off the mesh.
    """
    if flag is not None:
        nickname = flag.strip()
        if not nickname:
            raise ConfigError("--nickname: must not be empty")
        if len(nickname) > MAX_NICKNAME:
            raise ConfigError(f"--nickname: at most {MAX_NICKNAME} characters, got {len(nickname)}")
        return nickname
    derived = env.get("HOSTNAME", "").strip() or hostname.strip() or "weaved"
    return derived[:MAX_NICKNAME]


def parse_ipalloc_range(text: str) -> AddressRange:
    """``IPALLOC_RANGE``: an IPv4 CIDR with its host bits zero (``10.32.0.0/12``). The prefix length is
    required: a bare address would silently mean a pod network of one address."""
    try:
        if "/" not in text:
            raise ValueError("no prefix length")
        return AddressRange.from_cidr(text)
    except ValueError as exc:
        raise ConfigError(f"--ipalloc-range/IPALLOC_RANGE: {text.strip()!r} is not an IPv4 network in CIDR form "
                          f"like {DEFAULT_IPALLOC_RANGE} ({exc})") from None


def parse_ipalloc_init(text: str, initial_peers: int) -> InitMode:
    """``IPALLOC_INIT``: ``consensus[=N]``, ``seed=NAME,...`` or ``observer``.

    Bare ``consensus`` counts the peers we were given plus ourselves, as Weave's Kubernetes launch script
    does with ``KUBE_PEERS``: consensus is only safe when N is the real number of initial peers, so every
    node must be started with the same peer list (or with an explicit ``consensus=N``).
    """
    try:
        return parse_init(text, initial_peers)
    except ValueError as exc:
        raise ConfigError(f"--ipalloc-init/IPALLOC_INIT: {exc}") from None


def describe_init(mode: InitMode) -> str:
    """The ``IPALLOC_INIT`` text of a parsed mode (for logs and status)."""
    match mode:
        case ConsensusInit(peers=peers):
            return f"consensus={peers}"
        case SeedInit(names=names):
            return "seed=" + ",".join(names)
        case ObserverInit():
            return "observer"
    raise TypeError(f"not an init mode: {mode!r}")  # pragma: no cover - exhaustive match


def _bool_setting(flag: Any, env: Mapping[str, str], var: str, default: bool) -> bool:
    if flag is not None:
        return bool(flag)
    raw = env.get(var)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{var}: expected 1 or 0 (true/false), got {raw!r}")


def parse_settings(flags: Mapping[str, Any], env: Mapping[str, str], hostname: str) -> Settings:
    """Merge flags (argparse's namespace as a dict, ``None`` = not given) over the environment.

    Raises :class:`ConfigError` with a one-line message on the first bad value.
    """
    password = env.get("WEAVE_PASSWORD", "")
    password_file_text = flags.get("password_file") or env.get("WEAVE_PASSWORD_FILE", "").strip()
    if password and password_file_text:
        raise ConfigError("WEAVE_PASSWORD and --password-file/WEAVE_PASSWORD_FILE are both set: give the password once")
    if password and not password.strip():
        raise ConfigError("WEAVE_PASSWORD is set but blank: unset it, or give a real password")
    port = _int_setting(flags.get("port"), env, "WEAVE_PORT", DEFAULT_PORT, "--port/WEAVE_PORT")
    if not 0 < port < 65536:
        raise ConfigError(f"--port/WEAVE_PORT: {port} out of range 1-65535")
    conn_limit = _int_setting(flags.get("conn_limit"), env, "CONN_LIMIT", DEFAULT_CONN_LIMIT,
                              "--conn-limit/CONN_LIMIT")
    if conn_limit < 1:
        raise ConfigError(f"--conn-limit/CONN_LIMIT: must be at least 1, got {conn_limit}")

    host = flags.get("host") or DEFAULT_HOST
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"--host: {host!r} is not an IPv4 address") from None

    peers: list[HostPort] = []
    for item in flags.get("peer") or []:
        peers.extend(parse_peer_list(item, port, "--peer"))
    for var in ("WEAVE_PEERS", "KUBE_PEERS"):
        peers.extend(parse_peer_list(env.get(var, ""), port, var))

    http_addr = parse_host_port(flags.get("http_addr") or env.get("WEAVE_HTTP_ADDR") or DEFAULT_HTTP_ADDR,
                                6784, "--http-addr/WEAVE_HTTP_ADDR")
    metrics_addr = parse_host_port(
        flags.get("metrics_addr") or env.get("WEAVE_METRICS_ADDR") or DEFAULT_METRICS_ADDR,
        6782, "--metrics-addr/WEAVE_METRICS_ADDR")
    if http_addr == metrics_addr:
        raise ConfigError(f"--http-addr and --metrics-addr must differ, both are {http_addr}")

    state_dir_text = flags.get("state_dir") or env.get("WEAVE_STATE_DIR") or DEFAULT_STATE_DIR
    log_format = _choice(flags.get("log_format") or env.get("WEAVE_LOG_FORMAT") or "console", LOG_FORMATS,
                         "--log-format/WEAVE_LOG_FORMAT")
    log_level = _choice(flags.get("log_level") or env.get("WEAVE_LOG_LEVEL") or "info", LOG_LEVELS,
                        "--log-level/WEAVE_LOG_LEVEL")
    unique_peers = tuple(dict.fromkeys(peers))  # a peer named twice (flag and KUBE_PEERS) is dialled once
    ipalloc_range = parse_ipalloc_range(flags.get("ipalloc_range") or env.get("IPALLOC_RANGE", "").strip()
                                        or DEFAULT_IPALLOC_RANGE)
    ipalloc_init = parse_ipalloc_init(flags.get("ipalloc_init") or env.get("IPALLOC_INIT", "").strip()
                                      or DEFAULT_IPALLOC_INIT, len(unique_peers) + 1)
    try:
        kube = parse_kube_settings(flags.get("kube"), env, hostname)
    except KubeSettingError as exc:
        raise ConfigError(str(exc)) from None
    sleeve_port = _int_setting(flags.get("sleeve_port"), env, "WEAVE_SLEEVE_PORT", port + SLEEVE_PORT_OFFSET,
                               "--sleeve-port/WEAVE_SLEEVE_PORT")
    if not 0 < sleeve_port < 65536:
        raise ConfigError(f"--sleeve-port/WEAVE_SLEEVE_PORT: {sleeve_port} out of range 1-65535")
    if sleeve_port == port:
        raise ConfigError(f"--sleeve-port/WEAVE_SLEEVE_PORT: {sleeve_port} is the control port; pick another")
    mtu: int | None = None
    if flags.get("mtu") is not None or env.get("WEAVE_MTU", "").strip():
        mtu = _int_setting(flags.get("mtu"), env, "WEAVE_MTU", 0, "--mtu/WEAVE_MTU")
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise ConfigError(f"--mtu/WEAVE_MTU: {mtu} out of range {MTU_MIN}-{MTU_MAX}")
    no_datapath = _bool_setting(True if flags.get("no_datapath") else None, env, "WEAVE_NO_DATAPATH", False)
    no_offload = _bool_setting(True if flags.get("no_offload") else None, env, "WEAVE_NO_OFFLOAD", False)
    no_native = _bool_setting(True if flags.get("no_native") else None, env, "WEAVE_NO_NATIVE", False)
    return Settings(
        peers=unique_peers,
        port=port,
        host=host,
        conn_limit=conn_limit,
        http_addr=http_addr,
        metrics_addr=metrics_addr,
        nickname=_nickname(flags.get("nickname"), env, hostname),
        state_dir=Path(state_dir_text),
        log_format="json" if log_format == "json" else "console",
        log_level=log_level,
        ipalloc_range=ipalloc_range,
        ipalloc_init=ipalloc_init,
        kube=kube,
        cni_socket=_cni_socket(flags.get("cni_socket") or env.get("WEAVE_CNI_SOCKET", "").strip(), state_dir_text),
        cni_spool=Path(flags.get("cni_spool") or env.get("WEAVE_CNI_SPOOL", "").strip()
                       or Path(state_dir_text) / "cni-pending"),
        datapath=not no_datapath,
        sleeve_port=sleeve_port,
        mtu=mtu,
        offload=not no_offload,
        native=not no_native,
        no_masq_local=_bool_setting(None, env, "NO_MASQ_LOCAL", True),
        password=password.encode() if password else None,
        password_file=Path(password_file_text) if password_file_text else None,
        password_file_optional=_bool_setting(None, env, "WEAVE_PASSWORD_FILE_OPTIONAL", False),
        trusted_subnets=parse_trusted_subnets(flags.get("trusted_subnets") or env.get("WEAVE_TRUSTED_SUBNETS", "")),
        api_socket=api_socket_path(flags.get("api_socket") or env.get("WEAVE_API_SOCKET", "").strip(),
                                   state_dir_text),
    )


def parse_trusted_subnets(text: str) -> tuple[ipaddress.IPv4Network, ...]:
    """``CIDR,CIDR,…`` (commas or spaces), as Weave's ``--trusted-subnets``; empty means none."""
    subnets = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        try:
            subnets.append(ipaddress.IPv4Network(item, strict=False))
        except ValueError:
            raise ConfigError(f"--trusted-subnets/WEAVE_TRUSTED_SUBNETS: {item!r} is not an IPv4 CIDR") from None
    return tuple(subnets)


def _cni_socket(text: str, state_dir: str) -> Path | None:
    if text.lower() in ("off", "none"):
        return None
    if not text:
        text = DEFAULT_CNI_SOCKET if state_dir == DEFAULT_STATE_DIR else str(Path(state_dir) / "cni.sock")
    if len(str(Path(text).absolute()).encode()) > MAX_UNIX_PATH:
        raise ConfigError(f"--cni-socket/WEAVE_CNI_SOCKET: {text!r} is longer than a unix socket path may be "
                          f"({MAX_UNIX_PATH} bytes)")
    return Path(text).absolute()


def api_socket_path(text: str, state_dir: str) -> Path:
    """The control socket: ``text`` when given, else derived from ``state_dir`` (see
    :data:`DEFAULT_API_SOCKET`). The CLI calls this too, with ``WEAVE_STATE_DIR``, to find the daemon's."""
    if not text:
        text = DEFAULT_API_SOCKET if state_dir == DEFAULT_STATE_DIR else str(Path(state_dir) / "weaved.sock")
    if len(str(Path(text).absolute()).encode()) > MAX_UNIX_PATH:
        raise ConfigError(f"--api-socket/WEAVE_API_SOCKET: {text!r} is longer than a unix socket path may be "
                          f"({MAX_UNIX_PATH} bytes)")
    return Path(text).absolute()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``weaved run``. Defaults stay ``None`` so :func:`parse_settings` can fall back to env."""
    parser.add_argument("--peer", action="append", metavar="HOST[:PORT]",
                        help="peer to connect to (repeatable); also WEAVE_PEERS / KUBE_PEERS")
    parser.add_argument("--port", metavar="PORT", help=f"UDP control port (WEAVE_PORT, default {DEFAULT_PORT})")
    parser.add_argument("--host", metavar="IP", help=f"IPv4 address the control socket binds (default {DEFAULT_HOST})")
    parser.add_argument("--conn-limit", metavar="N",
                        help=f"most connections held (CONN_LIMIT, default {DEFAULT_CONN_LIMIT})")
    parser.add_argument("--http-addr", metavar="ADDR",
                        help=f"read-only local HTTP API (WEAVE_HTTP_ADDR, default {DEFAULT_HTTP_ADDR})")
    parser.add_argument("--metrics-addr", metavar="ADDR",
                        help=f"Prometheus metrics address (WEAVE_METRICS_ADDR, default {DEFAULT_METRICS_ADDR})")
    parser.add_argument("--api-socket", metavar="PATH",
                        help=f"unix socket (mode 0600) for the API calls that change the daemon (WEAVE_API_SOCKET, "
                             f"default {DEFAULT_API_SOCKET}, or STATE_DIR/weaved.sock with another --state-dir)")
    parser.add_argument("--nickname", help="human-readable peer name (default: HOSTNAME, else the host name)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help=f"where the peer name is kept (WEAVE_STATE_DIR, default {DEFAULT_STATE_DIR})")
    parser.add_argument("--log-format", metavar="FORMAT", help="console or json (WEAVE_LOG_FORMAT, default console)")
    parser.add_argument("--log-level", metavar="LEVEL",
                        help="debug, info, warning or error (WEAVE_LOG_LEVEL, default info)")
    parser.add_argument("--cni-socket", metavar="PATH",
                        help=f"unix socket for the CNI plugin (WEAVE_CNI_SOCKET, default {DEFAULT_CNI_SOCKET}, "
                             "or STATE_DIR/cni.sock with another --state-dir; off: no CNI)")
    parser.add_argument("--cni-spool", metavar="DIR",
                        help="pending CNI releases recorded while weaved was down (WEAVE_CNI_SPOOL, "
                             "default STATE_DIR/cni-pending)")
    parser.add_argument("--ipalloc-range", metavar="CIDR",
                        help=f"pod network to allocate from (IPALLOC_RANGE, default {DEFAULT_IPALLOC_RANGE})")
    parser.add_argument("--ipalloc-init", metavar="MODE",
                        help="consensus[=N], seed=NAME,... or observer (IPALLOC_INIT, default consensus=N "
                             "with N = the peers given plus this one)")
    parser.add_argument("--kube", action=argparse.BooleanOptionalAction, default=None,
                        help="find peers among the cluster's Nodes and reclaim deleted Nodes' addresses "
                             "(default: on when KUBERNETES_SERVICE_HOST is set)")
    parser.add_argument("--no-datapath", action="store_true", default=None,
                        help="control plane only: no bridge, TUN, routes or sleeve (WEAVE_NO_DATAPATH=1)")
    parser.add_argument("--sleeve-port", metavar="PORT",
                        help="UDP port of the sleeve data path (WEAVE_SLEEVE_PORT, default control port + 2)")
    parser.add_argument("--mtu", metavar="BYTES",
                        help="pod MTU (WEAVE_MTU, default: the underlay's MTU minus the sleeve's 54 bytes, "
                             "with or without --no-offload)")
    parser.add_argument("--no-offload", action="store_true", default=None,
                        help="sleeve without virtio headers, TSO and UDP GSO/GRO: one packet per datagram "
                             "(WEAVE_NO_OFFLOAD=1)")
    parser.add_argument("--no-native", action="store_true", default=None,
                        help="offload sleeve in Python alone, without its C hot loop (WEAVE_NO_NATIVE=1)")
    parser.add_argument("--password-file", metavar="PATH",
                        help="file holding the mesh password: every connection authenticated and encrypted "
                             "(WEAVE_PASSWORD_FILE; or the password itself in WEAVE_PASSWORD, never on argv)")
    parser.add_argument("--trusted-subnets", metavar="CIDR,...",
                        help="peers in these subnets exchange data unencrypted when both trust each other "
                             "(WEAVE_TRUSTED_SUBNETS; control traffic stays encrypted)")
