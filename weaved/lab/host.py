"""Thin I/O for the lab: running ``ip``/``nft``, and finding, starting and signalling processes.

Nothing here decides anything; it turns commands into subprocesses and failures into one-line
:class:`~weaved.lab.plan.LabError` messages. Every command that touches networking runs *inside* a lab
namespace (``ip -n NS`` / ``ip netns exec NS``): the lab never adds anything to the host's own namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from weaved.lab.plan import LabError

COMMAND_TIMEOUT = 30.0
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PACKAGES = {"ip": "iproute2", "nft": "nftables"}
_ENV_DROP = (
    "KUBE_PEERS",
    "WEAVE_PEERS",
    "WEAVE_PORT",
    "WEAVE_HTTP_ADDR",
    "WEAVE_API_SOCKET",
    "WEAVE_METRICS_ADDR",
    "WEAVE_STATE_DIR",
    "WEAVE_LOG_FORMAT",
)
"""Settings the lab fixes itself: inherited from the caller's shell they would silently add peers or move
the API away from 127.0.0.1:6784 and each node's control socket (``WEAVE_LOG_LEVEL`` and ``CONN_LIMIT``
still pass, on purpose)."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("weaved lab needs root (it creates network namespaces): run it with sudo")


def find_tool(name: str) -> str:
    """Path of ``name``, also looking in the sbin directories a non-login root PATH may lack."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_SBIN)
    found = shutil.which(name, path=path)
    if found is None:
        package = _PACKAGES.get(name, name)
        raise LabError(f"{name} not found: install {package} (apt-get install -y {package})")
    return found


def tool_env() -> dict[str, str]:
    """Environment for commands run in a node: the venv first on PATH, so ``weaved`` resolves to it.

    PYTHONUNBUFFERED makes daemon log lines reach the log file as they happen.
    """
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    parts = [os.path.dirname(sys.executable), *env.get("PATH", os.defpath).split(os.pathsep)]
    parts += [d for d in _SBIN if d not in parts]
    env["PATH"] = os.pathsep.join(dict.fromkeys(p for p in parts if p))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing text output; failures become one-line LabErrors."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError as e:
        raise LabError(f"{argv[0]} not found: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        why = _one_line(proc.stderr) or _one_line(proc.stdout) or f"exit code {proc.returncode}"
        raise LabError(f"`{' '.join(argv)}` failed: {why}")
    return proc


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [find_tool("ip")]
    if netns is not None:
        argv += ["-n", netns]
    return run([*argv, *args], check=check)


def netns_list() -> list[str]:
    """Names of all network namespaces (``ip netns list`` prints ``name (id: N)``)."""
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    proc = ip("netns", "pids", netns, check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def nft_apply(netns: str, script: str) -> None:
    """Load an nft script atomically inside ``netns``."""
    run([find_tool("ip"), "netns", "exec", netns, find_tool("nft"), "-f", "-"], input=script)


# --- processes -----------------------------------------------------------------------------------------


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from ``/proc/PID/stat``; None if there is no such PID."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    # after "pid (comm) ": field 3 (state) is fields[0], field 22 (starttime) is fields[19]
    return fields[0], int(fields[19])


def is_our_process(pid: int, marker: str, starttime: int | None) -> bool:
    """Whether ``pid`` is still the live process we started: its command line mentions ``marker`` (the
    node's state dir) and, when known, its start time matches. A zombie counts as gone."""
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    if starttime is not None:
        # PID plus start time names one process for ever. The command line is no help here: right
        # after spawning it may still be ours (between fork and exec), which read as "daemon exited".
        return stat[1] == starttime
    cmdline = proc_cmdline(pid)
    return cmdline is not None and any(marker in arg for arg in cmdline)


def spawn_in_netns(netns: str, argv: Sequence[str], log_path: Path, note: str) -> tuple[int, int | None]:
    """Start ``argv`` inside ``netns`` in its own session (so it outlives this CLI), output appended to
    ``log_path``. Returns (pid, start time). ``ip netns exec`` execs the command, so the PID is the
    daemon's own."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# weaved lab: {note}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [find_tool("ip"), "netns", "exec", netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=tool_env(),
            close_fds=True,
        )
    # The Popen object is dropped on purpose: the daemon outlives us. Python would warn about a child
    # still running when the object is collected, so mark it as handled.
    proc.returncode = 0
    stat = proc_stat(proc.pid)
    return proc.pid, stat[1] if stat else None


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (only when the lab runs in a long-lived process, e.g. tests)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_and_wait(pid: int, marker: str, starttime: int | None, sig: signal.Signals, timeout: float) -> bool:
    """Send ``sig`` to our process ``pid`` (checked first) and wait up to ``timeout`` for it to go.

    Returns True when it is gone (or was already gone), False when it still runs."""
    if not is_our_process(pid, marker, starttime):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_our_process(pid, marker, starttime):
            return True
        time.sleep(0.05)
    return False


def stop_process(pid: int, marker: str, starttime: int | None, *, grace: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds: how ``down`` stops a daemon."""
    if signal_and_wait(pid, marker, starttime, signal.SIGTERM, grace):
        return True
    return signal_and_wait(pid, marker, starttime, signal.SIGKILL, 5.0)


def tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]
