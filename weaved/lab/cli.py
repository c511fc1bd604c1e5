"""`weaved lab ...`: a multi-node weaved mesh built from network namespaces on this one machine.

The top-level CLI calls :func:`register`; every subcommand sets ``func(args) -> exit code``. Errors the
user can act on (not root, a missing tool, a taken name, a bad node) are one line on stderr and exit 1,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from weaved.lab import bench, host, ops, podops
from weaved.lab.plan import LabError, LabState, describe_partition, parse_groups
from weaved.lab.pods import validate_pods_per_node

Handler = Callable[[argparse.Namespace], int]
DEFAULT_TIMEOUT = 60.0
DEFAULT_PODS_PER_NODE = 2


def _say(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _guarded(fn: Handler) -> Handler:
    """Turn :class:`LabError` into one line on stderr and exit 1 (and Ctrl-C into 130)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LabError as e:
            _warn(f"weaved lab: error: {e}")
            return 1
        except KeyboardInterrupt:
            _warn("weaved lab: interrupted")
            return 130
        except OSError as e:  # e.g. /run not writable: still one line, with the path and errno text
            _warn(f"weaved lab: error: {e}")
            return 1

    run.__doc__ = fn.__doc__
    return run


# --- handlers ------------------------------------------------------------------------------------------


def _print_node_statuses(state: LabState) -> None:
    for node in state.nodes:
        _say(f"=== {node.name} ({node.ip}, netns {node.netns}) ===")
        _say(ops.node_status_text(state, node))


def cmd_up(args: argparse.Namespace) -> int:
    state = ops.up(
        args.name,
        args.nodes,
        args.python or sys.executable,
        timeout=args.timeout,
        daemons=not args.no_daemons,
        keep_on_failure=args.keep_on_failure,
        password_file=args.password_file,
        say=_say,
        warn=_warn,
    )
    if not state.daemons:
        _say(ops.status_text(state))
        return 0
    _say(f"lab {state.name}: mesh of {len(state.nodes)} nodes converged")
    _print_node_statuses(state)
    if args.pods_per_node:
        state = podops.add_default_pods(state, validate_pods_per_node(args.pods_per_node), say=_say)
        return _print_matrix(state)
    return 0


def _print_matrix(state: LabState) -> int:
    """Every pod pings every pod and every node; 0 when all answered."""
    text, complete = podops.reachability(state)
    _say("=== reachability (ping from row to column) ===")
    _say(text)
    return 0 if complete else 1


def cmd_matrix(args: argparse.Namespace) -> int:
    host.require_root()
    return _print_matrix(ops.load_state(args.name))


def cmd_pod(args: argparse.Namespace) -> int:
    host.require_root()
    state = ops.load_state(args.name)
    if args.action == "add":
        state = podops.add_pod(state, args.node, args.pod)
        pod = state.pods[-1]
        _say(f"pod {pod.label}: {pod.address} (netns {pod.netns})")
    else:
        podops.del_pod(state, args.node, args.pod)
        _say(f"pod {args.node}/{args.pod} deleted")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if ops.down(args.name, say=_say, warn=_warn):
        _say(f"lab {args.name} removed")
    else:
        _say(f"no lab {args.name}: nothing to remove")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = ops.load_state(args.name)
    if args.json:
        print(json.dumps(ops.status_json(state), indent=2))
    else:
        _say(ops.status_text(state))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    host.require_root()
    state = ops.load_state(args.name)
    node = state.node(args.node)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise LabError("nothing to run: `weaved lab exec NODE -- COMMAND [ARGS...]`")
    argv = [host.find_tool("ip"), "netns", "exec", node.netns, *cmd]
    # like a shell: Ctrl-C goes to the command (same process group); we just wait for its exit code
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = subprocess.call(argv, env=dict(ops.exec_env(state, node)))
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - rc if rc < 0 else rc


def cmd_logs(args: argparse.Namespace) -> int:
    state = ops.load_state(args.name)
    path = Path(state.node(args.node).log_path)
    try:
        with open(path, "rb") as f:
            if args.lines is not None:
                for line in host.tail(path, args.lines):
                    sys.stdout.write(line + "\n")
                f.seek(0, os.SEEK_END)
            else:
                sys.stdout.buffer.write(f.read())
            sys.stdout.flush()
            # follow until interrupted, or until the lab is taken down under us
            while args.follow and path.exists():
                chunk = f.read()
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
    except FileNotFoundError:
        raise LabError(f"{args.node} has no log yet ({path})") from None
    except KeyboardInterrupt:
        pass
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    host.require_root()
    state = ops.load_state(args.name)
    _, msg = ops.kill_daemon(state, args.node)
    _say(msg)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    host.require_root()
    state = ops.load_state(args.name)
    node = state.node(args.node)
    if ops.node_alive(node):
        _say(f"{node.name} is already running (pid {node.pid})")
        return 0
    if args.password_file is not None or args.no_password:
        password_file = None if args.no_password else ops.check_password_file(args.password_file)
        state = state.with_node(replace(node, password_file=password_file))
    state = ops.start_daemon(state, node.name)
    _say(f"started {node.name} ({node.ip}) pid {state.node(node.name).pid}")
    if args.no_wait:
        return 0
    return _wait(state, args.timeout, f"{node.name} joined the mesh")


def _wait(state: LabState, timeout: float, done: str) -> int:
    gaps = ops.wait_converged(state, timeout, say=_say)
    if gaps:
        summary = "; ".join(f"{n}: {why}" for n, why in gaps.items())
        raise LabError(f"mesh did not settle within {timeout:.0f}s ({summary}); see `weaved lab logs NODE`")
    _say(done)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    state = ops.load_state(args.name)
    return _wait(
        state, args.timeout, f"lab {state.name}: mesh settled (partition: {describe_partition(state.partition)})"
    )


def cmd_partition(args: argparse.Namespace) -> int:
    state = ops.load_state(args.name)
    groups = parse_groups(args.groups, state.node_names)
    state = ops.partition(state, groups)
    _say(f"partition: {describe_partition(groups)}")
    return _wait(state, args.timeout, "mesh settled") if args.wait else 0


def cmd_heal(args: argparse.Namespace) -> int:
    state = ops.load_state(args.name)
    state = ops.heal(state)
    _say("partition removed")
    return _wait(state, args.timeout, "mesh settled") if args.wait else 0


def cmd_bench(args: argparse.Namespace) -> int:
    return bench.run(args)


# --- parser --------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `lab` command and its subcommands to the top-level parser."""
    lab: argparse.ArgumentParser = subparsers.add_parser(
        "lab",
        help="a local multi-node mesh in network namespaces (root)",
        description="Build and drive a multi-node weaved mesh out of network namespaces on this machine.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default="lab", metavar="LAB", help="lab name, a-z 0-9 - (default: lab)")
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S", help="how long to wait")

    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")

    def add(name: str, fn: Handler, help: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common, *parents])
        p.set_defaults(func=_guarded(fn))
        return p

    p = add("up", cmd_up, "create the namespaces, start a daemon per node, wait until the mesh converged", timeout)
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="number of nodes (n1..nN)")
    p.add_argument("--no-daemons", action="store_true", help="build only the underlay (start daemons later)")
    p.add_argument("--keep-on-failure", action="store_true", help="leave a failed lab in place to inspect it")
    p.add_argument(
        "--python", metavar="PATH", help="interpreter the daemons run under (default: this one, i.e. the venv's)"
    )
    p.add_argument("--pods-per-node", type=int, default=DEFAULT_PODS_PER_NODE, metavar="K",
                   help=f"pods to start on every node through the CNI plugin (default {DEFAULT_PODS_PER_NODE}); "
                   "then print the reachability matrix")
    p.add_argument("--password-file", metavar="PATH",
                   help="every node starts with this mesh password: connections authenticated and encrypted")

    add("down", cmd_down, "stop the daemons and delete the lab's namespaces and files (safe to repeat)")

    p = add("status", cmd_status, "the lab's nodes: netns, address, pid, running/stopped/dead")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("exec", cmd_exec, "run a command inside a node's namespace (venv first on PATH)")
    p.add_argument("node", metavar="NODE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    p = add("logs", cmd_logs, "print a node's daemon log")
    p.add_argument("node", metavar="NODE")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N lines")

    p = add("kill", cmd_kill, "SIGKILL a node's daemon, as a crash would")
    p.add_argument("node", metavar="NODE")

    p = add("start", cmd_start, "start a stopped node's daemon again (same state dir) and wait for it to join", timeout)
    p.add_argument("node", metavar="NODE")
    p.add_argument("--no-wait", action="store_true", help="return once started")
    password = p.add_mutually_exclusive_group()
    password.add_argument("--password-file", metavar="PATH",
                          help="start it with this password from now on (another one shows a mismatch)")
    password.add_argument("--no-password", action="store_true", help="start it without a password from now on")

    p = add(
        "partition",
        cmd_partition,
        "cut the underlay between groups (e.g. `n1 n2,n3`); one group is cut off from all others",
        timeout,
    )
    p.add_argument("groups", nargs="+", metavar="GROUP", help="comma-separated nodes")
    p.add_argument("--wait", action="store_true", help="wait until every node sees the partition")

    p = add("heal", cmd_heal, "remove the partition", timeout)
    p.add_argument("--wait", action="store_true", help="wait until the mesh reconverged")

    add("wait", cmd_wait, "wait until every running node reaches exactly what the underlay allows", timeout)

    add("matrix", cmd_matrix, "every pod pings every pod and every node; prints the table")

    bench_help = ("build a 2-node lab of its own and measure the sleeve beside the underlay and kernel VXLAN "
                  "(iperf3, ping, sockperf, CPU per GB); removed afterwards")
    # Not from `common`: its own lab name by default, so it never meets the user's lab.
    p = sub.add_parser("bench", help=bench_help, description=bench_help)
    p.add_argument("--name", default="bench", metavar="LAB", help="name of the lab it builds (default: bench)")
    bench.add_arguments(p)
    p.set_defaults(func=_guarded(cmd_bench))

    p = add("pod", cmd_pod, "add or delete a pod: a netns wired by the node's CNI plugin, as a runtime does")
    p.add_argument("action", choices=["add", "del"], help="add: CNI ADD in a new netns; del: CNI DEL, then the netns")
    p.add_argument("node", metavar="NODE")
    p.add_argument("pod", metavar="NAME", help="1-8 characters of a-z 0-9")

    def no_command(_: argparse.Namespace) -> int:
        lab.print_help(sys.stderr)
        return 2

    lab.set_defaults(func=no_command)
