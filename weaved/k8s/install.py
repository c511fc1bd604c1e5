"""``weaved cni-install``: put the CNI plugin and its network configuration on the host.

Theory of operation
-------------------
The DaemonSet's init container runs this with the host's ``/opt/cni/bin`` and ``/etc/cni/net.d`` mounted
(``--bin-dir``, ``--conf-dir``). It copies the plugin executable shipped in the image
(:data:`PLUGIN_SOURCE`, built from ``cni/weave-net.c``) and writes :data:`CONFLIST_NAME`.

The kubelet and the container runtime read these directories at any moment, so every file is replaced
atomically: written to a hidden temporary file in the same directory, fsync'd, then renamed over the old
one. A runtime therefore sees the old plugin or the new one, never half a binary, and a conflist that does
not parse never appears (a runtime that finds one marks the node NotReady). A file whose content is
already right is left untouched, so running the step on every pod start is idempotent and does not
disturb a runtime that watches the directory for changes.

The conflist chains ``portmap`` (``hostPort`` support) after our plugin, as Weave Net did; ``portmap`` is
the runtime's (kubeadm's ``kubernetes-cni`` package ships it), so its absence is only warned about.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from weaved.cni.conflist import CONFLIST_NAME, conflist
from weaved.config import DEFAULT_CNI_SOCKET

PLUGIN_SOURCE = Path("/usr/local/lib/weaved/weave-net")
"""Where the image carries the CNI plugin executable (see the Dockerfile)."""
PLUGIN_NAME = "weave-net"
"""The executable's name in the bin directory: the conflist's ``type``."""
DAEMON_SOCKET = DEFAULT_CNI_SOCKET
"""Where the daemon's CNI server listens (a hostPath in the DaemonSet, so the plugin on the host finds it)."""
DEFAULT_BIN_DIR = Path("/host/opt/cni/bin")
DEFAULT_CONF_DIR = Path("/host/etc/cni/net.d")


class InstallError(RuntimeError):
    """The step cannot complete; ``str()`` is one line for the operator."""


def conflist_text() -> str:
    """The node's conflist with the daemon's default socket and spool paths (those the DaemonSet mounts)."""
    return json.dumps(conflist(socket=DAEMON_SOCKET), indent=2) + "\n"


def replace_file(path: Path, content: bytes, mode: int) -> bool:
    """Atomically make ``path`` hold ``content`` with ``mode``; False when it already did."""
    try:
        if path.read_bytes() == content and (path.stat().st_mode & 0o7777) == mode:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.weaved-tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)  # not the umask's idea of it
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return True


def install(bin_dir: Path, conf_dir: Path, plugin: Path = PLUGIN_SOURCE) -> list[str]:
    """Copy the plugin and write the conflist; returns one line per file saying what happened."""
    try:
        binary = plugin.read_bytes()
    except OSError as exc:
        raise InstallError(f"cannot read the CNI plugin {plugin}: {exc.strerror or exc}") from None
    if not binary.startswith(b"\x7fELF"):
        raise InstallError(f"{plugin} is not an executable (no ELF header)")
    report = []
    for directory, name, content, mode in ((bin_dir, PLUGIN_NAME, binary, 0o755),
                                           (conf_dir, CONFLIST_NAME, conflist_text().encode(), 0o644)):
        target = directory / name
        try:
            directory.mkdir(parents=True, exist_ok=True)
            changed = replace_file(target, content, mode)
        except OSError as exc:
            raise InstallError(f"cannot write {target}: {exc.strerror or exc}") from None
        report.append(f"{'installed' if changed else 'unchanged'} {target}")
    if not (bin_dir / "portmap").exists():
        report.append(f"warning: no portmap plugin in {bin_dir}: hostPort will not work "
                      "(install the runtime's CNI plugins, e.g. kubernetes-cni)")
    return report


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``weaved cni-install`` to the CLI."""
    parser = commands.add_parser("cni-install", help="install the CNI plugin and its conflist on the host",
                                 description="Copy the weave-net CNI plugin and write 10-weave.conflist, "
                                             "atomically and idempotently (the DaemonSet's init container).")
    parser.add_argument("--bin-dir", type=Path, default=DEFAULT_BIN_DIR,
                        help=f"the host's CNI bin directory as mounted (default {DEFAULT_BIN_DIR})")
    parser.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR,
                        help=f"the host's CNI config directory as mounted (default {DEFAULT_CONF_DIR})")
    parser.add_argument("--plugin", type=Path, default=PLUGIN_SOURCE,
                        help=f"the plugin executable to copy (default {PLUGIN_SOURCE})")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    try:
        lines = install(args.bin_dir, args.conf_dir, args.plugin)
    except InstallError as exc:
        print(f"weaved: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
