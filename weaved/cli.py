"""The ``weaved`` command line: the daemon (``run``) and the clients of its local API.

Commands that only read (``status``, ``report``, ``ipam leases``) use the read-only TCP port (``--api``),
so that any user on the node, and scripts, can read the status as with Weave Net's ``weave status``;
commands that change the daemon (``connect``, ``forget``, ``ipam alloc|claim|release|gateway``, ``rmpeer``,
``reset``) use the control socket (``--api-socket``), which only root may open.

Every subcommand sets ``func(args) -> int`` (the exit status). Operator mistakes and an absent daemon end
in one line on stderr and a non-zero status, never a traceback: 2 for a bad setting (like argparse's own
usage errors), 1 when the daemon cannot be reached or refuses the request.

The daemon's modules (aiohttp, prometheus-client, the core) are imported only by ``weaved run``, so
client commands start quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Sequence

import weaved
from weaved.adapters.client import (
    ALLOCATE_TIMEOUT,
    LEAVE_TIMEOUT,
    TIMEOUT,
    ApiError,
    Client,
    DaemonUnreachable,
    api_address,
    control_socket,
)
from weaved.adapters.datapath_report import DatapathReport
from weaved.adapters.ipam_report import IpamReport
from weaved.config import DEFAULT_API_SOCKET, ConfigError, add_run_arguments, parse_settings
from weaved.core.status import MeshStatus
from weaved.k8s import install as cni_install
from weaved.lab import cli as lab_cli
from weaved.render import IPAM_VIEW, VIEWS, render_ipam, render_status


def _fail(message: str, status: int) -> int:
    print(f"weaved: {message}", file=sys.stderr)
    return status


def cmd_run(args: argparse.Namespace) -> int:
    hostname = socket.gethostname()
    try:
        settings = parse_settings(vars(args), os.environ, hostname)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from weaved.adapters.daemon import run  # heavy imports, only for the daemon

    if settings.kube is not None:
        from weaved.adapters.logs import configure_logging
        from weaved.k8s.agent import with_kube_peers

        configure_logging(settings.log_format, settings.log_level)
        settings = with_kube_peers(settings, lambda env: parse_settings(vars(args), env, hostname), os.environ)

    return run(settings)


def _client_command(action: Callable[[Client, argparse.Namespace], str], timeout: float = TIMEOUT, *,
                    control: bool = False) -> Callable[[argparse.Namespace], int]:
    """Wrap a client action: build the client (from ``--api-socket`` for a ``control`` action, one that changes
    the daemon; else from ``--api``), print its output, map failures to one line."""

    def command(args: argparse.Namespace) -> int:
        try:
            if control:
                client = Client.unix(control_socket(args.api_socket, os.environ), timeout)
            else:
                client = Client(api_address(args.api, os.environ), timeout)
            output = action(client, args)
        except ConfigError as exc:
            return _fail(str(exc), 2)
        except (DaemonUnreachable, ApiError) as exc:
            return _fail(str(exc), 1)
        sys.stdout.write(output)
        return 0

    return command


def _status(client: Client, args: argparse.Namespace) -> str:
    report = client.report()
    version = str(report.pop("version", "unknown"))
    ipam_json = report.pop("ipam", None)
    datapath_json = report.pop("datapath", None)
    try:
        status = MeshStatus.from_json(report)
        ipam = IpamReport.from_json(ipam_json) if ipam_json is not None else None
        datapath = DatapathReport.from_json(datapath_json) if datapath_json is not None else None
    except (KeyError, TypeError) as exc:
        raise ApiError(f"{client.address} sent a report this client does not understand ({exc})") from None
    if args.view is None:
        return render_status(status, version, ipam, datapath)
    if args.view == IPAM_VIEW:
        if ipam is None:
            raise ApiError(f"the daemon at {client.address} runs no IPAM")
        return render_ipam(ipam)
    return VIEWS[args.view](status)


def _report(client: Client, _: argparse.Namespace) -> str:
    return json.dumps(client.report(), indent=2) + "\n"


def _connect(client: Client, args: argparse.Namespace) -> str:
    return client.connect(args.peer)


def _forget(client: Client, args: argparse.Namespace) -> str:
    return client.forget(args.peer)


def _ipam_alloc(client: Client, args: argparse.Namespace) -> str:
    return client.allocate(args.container_id, args.ifname) + "\n"


def _ipam_claim(client: Client, args: argparse.Namespace) -> str:
    return client.claim(args.container_id, args.ifname, args.address) + "\n"


def _ipam_release(client: Client, args: argparse.Namespace) -> str:
    client.release(args.container_id)
    return ""


def _ipam_leases(client: Client, args: argparse.Namespace) -> str:
    leases = client.leases()
    if args.json:
        return json.dumps(leases, indent=2) + "\n"
    return "".join(f"{lease.get('address', '?'):<18} {lease.get('ifname', '?'):<8} {lease.get('container_id', '?')}\n"
                   for lease in leases)


def _ipam_gateway(client: Client, _: argparse.Namespace) -> str:
    return client.gateway() + "\n"


def _rmpeer(client: Client, args: argparse.Namespace) -> str:
    return client.rmpeer(args.peer)


def _reset(client: Client, args: argparse.Namespace) -> str:
    return client.leave(force=args.force)


def _add_ipam_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ipam = commands.add_parser("ipam", help="container addresses: alloc, claim, release, leases, gateway",
                               description="Ask the local daemon for pod addresses, as the CNI plugin does.")
    actions = ipam.add_subparsers(title="actions", metavar="ACTION", required=True)

    alloc = actions.add_parser("alloc", help="allocate an address for a container (the same one when asked again)")
    alloc.add_argument("container_id", metavar="ID")
    alloc.add_argument("--ifname", default="eth0", help="the container's interface (default eth0)")
    _add_socket_argument(alloc)
    alloc.set_defaults(func=_client_command(_ipam_alloc, ALLOCATE_TIMEOUT, control=True))

    claim = actions.add_parser("claim", help="lease a given address to a container")
    claim.add_argument("container_id", metavar="ID")
    claim.add_argument("address", metavar="IP")
    claim.add_argument("--ifname", default="eth0", help="the container's interface (default eth0)")
    _add_socket_argument(claim)
    claim.set_defaults(func=_client_command(_ipam_claim, control=True))

    release = actions.add_parser("release", help="release every address of a container")
    release.add_argument("container_id", metavar="ID")
    _add_socket_argument(release)
    release.set_defaults(func=_client_command(_ipam_release, control=True))

    leases = actions.add_parser("leases", help="list this peer's leases")
    leases.add_argument("--json", action="store_true", help="as JSON")
    _add_api_argument(leases)
    leases.set_defaults(func=_client_command(_ipam_leases))

    gateway = actions.add_parser("gateway", help="this node's own address on the pod network")
    _add_socket_argument(gateway)
    gateway.set_defaults(func=_client_command(_ipam_gateway, ALLOCATE_TIMEOUT, control=True))

    rmpeer = commands.add_parser("rmpeer", help="give a dead peer's addresses to the living peers",
                                 description="Remove a dead peer from IPAM; safe to run on several peers at once.")
    rmpeer.add_argument("peer", metavar="NAME", help="the peer's name or nickname")
    _add_socket_argument(rmpeer)
    rmpeer.set_defaults(func=_client_command(_rmpeer, control=True))

    reset = commands.add_parser(
        "reset", help="leave the IPAM ring for good, handing this peer's addresses to a live peer",
        description="Like 'weave reset' for IPAM: hand every address range this peer owns to a live peer, so "
                    "none is stranded and no rmpeer is needed. Refused while containers here hold addresses. "
                    "Then stop the daemon (and delete its state directory to forget the peer name). A plain "
                    "stop or restart hands nothing over.")
    reset.add_argument("--force", action="store_true",
                       help="leave even though containers hold addresses here; their leases are forgotten and the "
                            "addresses will be handed out again elsewhere (only for containers that are gone)")
    _add_socket_argument(reset)
    reset.set_defaults(func=_client_command(_reset, LEAVE_TIMEOUT, control=True))


def _add_api_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", metavar="ADDR",
                        help="address of the daemon's read-only HTTP API (default: WEAVE_HTTP_ADDR, else "
                             "127.0.0.1:6784)")


def _add_socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-socket", metavar="PATH",
                        help="the daemon's control socket, root's only (default: WEAVE_API_SOCKET, else "
                             f"WEAVE_STATE_DIR/weaved.sock for a state directory other than the default, else "
                             f"{DEFAULT_API_SOCKET})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weaved", description="A Weave-Net-like overlay network for Kubernetes.")
    parser.add_argument("--version", action="version", version=f"weaved {weaved.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon", description="Join the mesh and serve the local API.")
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="show the mesh status, like 'weave status'")
    status.add_argument("view", nargs="?", choices=sorted([*VIEWS, IPAM_VIEW]),
                        help="a detailed view instead of the summary")
    _add_api_argument(status)
    status.set_defaults(func=_client_command(_status))

    report = commands.add_parser("report", help="print the full status as JSON")
    _add_api_argument(report)
    report.set_defaults(func=_client_command(_report))

    connect = commands.add_parser("connect", help="add a peer to dial and keep connected")
    connect.add_argument("peer", metavar="HOST[:PORT]")
    _add_socket_argument(connect)
    connect.set_defaults(func=_client_command(_connect, control=True))

    forget = commands.add_parser("forget", help="stop dialling a peer (an open connection stays until it fails)")
    forget.add_argument("peer", metavar="HOST[:PORT]")
    _add_socket_argument(forget)
    forget.set_defaults(func=_client_command(_forget, control=True))

    _add_ipam_commands(commands)
    lab_cli.register(commands)
    cni_install.register(commands)
    return parser


EXTRA_ARGS_ENV = "EXTRA_ARGS"
"""Extra ``weaved run`` flags in one variable (Weave Net's DaemonSet setting), split like a shell would."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    extra = os.environ.get(EXTRA_ARGS_ENV, "").strip()
    if extra and getattr(args, "func", None) is cmd_run:
        try:
            args = parser.parse_args([*given, *shlex.split(extra)])
        except ValueError as exc:
            return _fail(f"{EXTRA_ARGS_ENV}: {exc}", 2)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)
