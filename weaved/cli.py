"""The ``weaved`` command line: the daemon (``run``) and the clients of its local API.

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
import socket
import sys
from collections.abc import Callable, Sequence

import weaved
from weaved.adapters.client import ApiError, Client, DaemonUnreachable, api_address
from weaved.config import ConfigError, add_run_arguments, parse_settings
from weaved.core.status import MeshStatus
from weaved.lab import cli as lab_cli
from weaved.render import VIEWS, render_status


def _fail(message: str, status: int) -> int:
    print(f"weaved: {message}", file=sys.stderr)
    return status


def cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = parse_settings(vars(args), os.environ, socket.gethostname())
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from weaved.adapters.daemon import run  # heavy imports, only for the daemon

    return run(settings)


def _client_command(action: Callable[[Client, argparse.Namespace], str]) -> Callable[[argparse.Namespace], int]:
    """Wrap a client action: build the client from ``--api``, print its output, map failures to one line."""

    def command(args: argparse.Namespace) -> int:
        try:
            client = Client(api_address(args.api, os.environ))
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
    try:
        status = MeshStatus.from_json(report)
    except (KeyError, TypeError) as exc:
        raise ApiError(f"{client.address} sent a report this client does not understand ({exc})") from None
    if args.view is None:
        return render_status(status, version)
    return VIEWS[args.view](status)


def _report(client: Client, _: argparse.Namespace) -> str:
    return json.dumps(client.report(), indent=2) + "\n"


def _connect(client: Client, args: argparse.Namespace) -> str:
    return client.connect(args.peer)


def _forget(client: Client, args: argparse.Namespace) -> str:
    return client.forget(args.peer)


def _add_api_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", metavar="ADDR",
                        help="address of the daemon's HTTP API (default: WEAVE_HTTP_ADDR, else 127.0.0.1:6784)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weaved", description="A Weave-Net-like overlay network for Kubernetes.")
    parser.add_argument("--version", action="version", version=f"weaved {weaved.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon", description="Join the mesh and serve the local API.")
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="show the mesh status, like 'weave status'")
    status.add_argument("view", nargs="?", choices=sorted(VIEWS), help="a detailed view instead of the summary")
    _add_api_argument(status)
    status.set_defaults(func=_client_command(_status))

    report = commands.add_parser("report", help="print the full status as JSON")
    _add_api_argument(report)
    report.set_defaults(func=_client_command(_report))

    connect = commands.add_parser("connect", help="add a peer to dial and keep connected")
    connect.add_argument("peer", metavar="HOST[:PORT]")
    _add_api_argument(connect)
    connect.set_defaults(func=_client_command(_connect))

    forget = commands.add_parser("forget", help="stop dialling a peer (an open connection stays until it fails)")
    forget.add_argument("peer", metavar="HOST[:PORT]")
    _add_api_argument(forget)
    forget.set_defaults(func=_client_command(_forget))

    lab_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)
