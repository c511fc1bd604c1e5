"""The network configuration list runtimes read: ``10-weave.conflist``, weave-net chained with portmap.

Written by whoever installs the plugin on a node (the Kubernetes installer, the lab), with the same socket
and spool paths the daemon was given, so the forwarder finds it. The file is written to a temporary name and
renamed: a runtime scanning the directory never reads half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from weaved.config import DEFAULT_CNI_SOCKET, DEFAULT_STATE_DIR

CONFLIST_NAME = "10-weave.conflist"
NETWORK_NAME = "weave"
DEFAULT_CNI_VERSION = "1.0.0"
"""What the runtimes here (containerd 1.6, podman 4.3, libcni 1.1) understand; weave-net speaks up to 1.1.0."""


def conflist(*, socket: str = DEFAULT_CNI_SOCKET, spool: str = f"{DEFAULT_STATE_DIR}/cni-pending",
             cni_version: str = DEFAULT_CNI_VERSION, name: str = NETWORK_NAME, mtu: int | None = None,
             portmap: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The conflist as a dict; ``extra`` adds keys to weave-net's entry (``ipam``, ``ipamTimeoutSeconds``)."""
    plugin: dict[str, Any] = {"type": "weave-net", "hairpinMode": True, "daemonSocket": socket, "spoolDir": spool}
    if mtu is not None:
        plugin["mtu"] = mtu
    plugin.update(extra or {})
    plugins: list[dict[str, Any]] = [plugin]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
    return {"cniVersion": cni_version, "name": name, "plugins": plugins}


def write_conflist(directory: Path, **kwargs: Any) -> Path:
    """Write :data:`CONFLIST_NAME` into ``directory`` atomically; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFLIST_NAME
    tmp = directory / f".{CONFLIST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(conflist(**kwargs), indent=2) + "\n")
    os.replace(tmp, path)
    return path
