"""Running a delegated IPAM plugin (``ipam.type`` in the configuration) the way the spec says.

The plugin is looked up in ``CNI_PATH`` (the runtime's list, forwarded unchanged), executed with the same
``CNI_*`` environment and the same configuration on stdin, under a deadline; its stdout is its result, or,
with a non-zero exit, a CNI error that is passed on with its own code.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio

from weaved.cni.spec import E_INVALID_CONFIG, E_IPAM, E_TRY_AGAIN, CniError, Request

MAX_OUTPUT = 1024 * 1024


def find_plugin(name: str, path: tuple[str, ...]) -> Path:
    for directory in path:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(E_INVALID_CONFIG, f"IPAM plugin {name!r} not found",
                   f"searched CNI_PATH={':'.join(path) or '(empty)'}")


async def run_ipam(request: Request, command: str, stdin: bytes) -> bytes:
    """Execute the IPAM plugin for ``command``; its stdout on success, CniError otherwise."""
    assert request.conf.ipam is not None
    plugin = find_plugin(str(request.conf.ipam["type"]), request.path)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **request.env, "CNI_COMMAND": command}
    try:
        with anyio.fail_after(request.conf.ipam_timeout):
            proc = await anyio.run_process([str(plugin)], input=stdin, env=env, check=False,
                                           stderr=subprocess.PIPE)
    except TimeoutError:
        raise CniError(E_TRY_AGAIN, f"IPAM plugin {plugin.name} did not answer in time",
                       f"{request.conf.ipam_timeout:g}s") from None
    except OSError as exc:
        raise CniError(E_IPAM, f"cannot run IPAM plugin {plugin}", str(exc)) from None
    out = proc.stdout[:MAX_OUTPUT]
    if proc.returncode != 0:
        try:
            doc = json.loads(out)
            code, msg, details = int(doc["code"]), str(doc.get("msg", "")), str(doc.get("details", ""))
        except (ValueError, KeyError, TypeError):
            code, msg = E_IPAM, f"IPAM plugin {plugin.name} failed with status {proc.returncode}"
            details = (proc.stderr or out).decode(errors="replace")[:400]
        raise CniError(code, f"{plugin.name}: {msg}", details)
    return out
