"""Fixtures for the CNI tests: a "node" namespace with a bridge and the real daemon, pods, real CNI clients.

Each node is a network namespace named with this session's prefix (``session_base()``), holding a bridge
``weave`` with the gateway address and the daemon (:mod:`tests.cni.cnid`: ``weaved run``'s ``serve`` with
the pod network read from that bridge). Its plugin directory holds the built forwarder ``weave-net`` and
links to Debian's reference plugins; its config directory the conflist :func:`write_conflist` writes.
Everything — daemons (stopped by PID), namespaces, directories — is removed in finalizers, pass or fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.netns.conftest import session_base
from weaved.cni.conflist import write_conflist

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_PLUGINS = Path("/usr/lib/cni")
GOPATH_LIB = Path("/usr/share/gocode")
CACHE = Path("/tmp/weaved-cni-cache")
GATEWAY = "10.32.0.1"


def _sbin_path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def why_missing(*tools: str) -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in tools:
        if shutil.which(tool, path=_sbin_path()) is None:
            return f"{tool} not installed (scripts/setup.sh installs it)"
    return None


def run(argv: list[str], *, check: bool = True, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


def build_forwarder() -> Path:
    """scripts/build-cni.sh: the static forwarder (rebuilt when its source changed)."""
    out = run([str(ROOT / "scripts" / "build-cni.sh")]).stdout.strip().splitlines()[-1]
    return Path(out)


def cnitool_missing() -> str | None:
    if why_missing("go"):
        return why_missing("go")
    if not (GOPATH_LIB / "src/github.com/containernetworking/cni/libcni").is_dir():
        return "golang-github-appc-cni-dev not installed (scripts/setup.sh installs it)"
    return None


def build_cnitool() -> Path:
    """The cnitool clone built offline from Debian's libcni (cached by source hash)."""
    source = (Path(__file__).parent / "rc_cnitool.go").read_bytes()
    out = CACHE / f"rc-cnitool-{hashlib.sha256(source).hexdigest()[:12]}"
    if not out.exists():
        src = CACHE / "gopath" / "src" / "rc-cnitool"
        src.mkdir(parents=True, exist_ok=True)
        (src / "main.go").write_bytes(source)
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{CACHE / 'gopath'}:{GOPATH_LIB}", "GOPROXY": "off",
               "GOFLAGS": "", "CGO_ENABLED": "0", "GOCACHE": str(CACHE / "gocache")}
        run(["go", "build", "-o", f"{out}.tmp", "."], cwd=src, env=env, timeout=300)
        os.replace(f"{out}.tmp", out)
    return out


@pytest.fixture(scope="session")
def forwarder() -> Path:
    reason = why_missing("ip", "gcc")
    if reason:
        pytest.skip(reason)
    return build_forwarder()


@pytest.fixture(scope="session")
def cnitool() -> Path:
    reason = cnitool_missing()
    if reason:
        pytest.skip(reason)
    return build_cnitool()


@dataclass
class Node:
    """One node namespace with its bridge, directories and (when started) daemon."""

    name: str
    work: Path
    forwarder: Path
    prefix: int = 12
    ipalloc_range: str = "10.32.0.0/12"
    bridge: bool = True
    proc: subprocess.Popen[bytes] | None = None
    pods: list[str] = field(default_factory=list)
    extra_conf: dict[str, Any] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return self.name

    @property
    def socket(self) -> Path:
        return self.work / "cni.sock"

    @property
    def spool(self) -> Path:
        return self.work / "spool"

    @property
    def bin(self) -> Path:
        return self.work / "bin"

    @property
    def netd(self) -> Path:
        return self.work / "net.d"

    @property
    def api(self) -> str:
        return "127.0.0.1:6784"

    def setup(self) -> None:
        run(["ip", "netns", "add", self.netns])
        self.ns("ip", "link", "set", "lo", "up")
        if self.bridge:
            self.ns("ip", "link", "add", "weave", "type", "bridge")
            self.ns("ip", "addr", "add", f"{GATEWAY}/{self.prefix}", "dev", "weave")
            self.ns("ip", "link", "set", "weave", "up")
        for sub in ("bin", "net.d", "state", "cache"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(self.forwarder, self.bin / "weave-net")
        if REFERENCE_PLUGINS.is_dir():
            for plugin in REFERENCE_PLUGINS.iterdir():
                (self.bin / plugin.name).symlink_to(plugin)
        self.write_conf()

    def write_conf(self, portmap: bool = True, **extra: Any) -> Path:
        return write_conflist(self.netd, socket=str(self.socket), spool=str(self.spool), portmap=portmap,
                              extra={"ipamTimeoutSeconds": 5, **self.extra_conf, **extra})

    def conf(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.netd / "10-weave.conflist").read_text())
        return data

    def ns(self, *argv: str, check: bool = True, timeout: float = 60,
           **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.netns, *argv], check=check, timeout=timeout, **kwargs)

    # --- the daemon ---------------------------------------------------------------------------------------

    def start(self) -> None:
        assert self.proc is None
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", sys.executable, "-m", "tests.cni.cnid",
                "--pod-bridge", "weave", "--nickname", self.name, "--state-dir", str(self.work / "state"),
                "--cni-socket", str(self.socket), "--cni-spool", str(self.spool), "--ipalloc-range",
                self.ipalloc_range, "--log-format", "json"]
        log = open(self.work / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        log.close()
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready in 30 s:\n{self.log()}")
            time.sleep(0.1)
        if self.bridge:
            # A single peer's IPAM seeds itself on its first request; then the bridge's address is claimed as
            # the gateway lease, so no pod is ever given it.
            self.weaved("ipam", "alloc", "weave:warmup")
            self.weaved("ipam", "release", "weave:warmup")
            self.weaved("ipam", "claim", "weave:gateway", GATEWAY, "--ifname", "weave")

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        return self.weaved("status", check=False).returncode == 0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        path = self.work / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def weaved(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # Read-only commands take the TCP API, the others the daemon's control socket in its state directory.
        return self.ns(sys.executable, "-m", "weaved", *args, check=check,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "WEAVE_HTTP_ADDR": self.api,
                            "WEAVE_API_SOCKET": str(self.work / "state" / "weaved.sock")})

    def leases(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(self.weaved("ipam", "leases", "--json").stdout)
        return [lease for lease in data if not lease["container_id"].startswith("weave:")]

    def veths(self) -> list[str]:
        out = self.ns("ip", "-o", "link", "show", "type", "veth").stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())

    # --- pods and clients ---------------------------------------------------------------------------------

    def pod(self, suffix: str) -> str:
        name = f"{self.name}p{suffix}"
        run(["ip", "netns", "add", name])
        self.pods.append(name)
        return name

    def pod_ns(self, pod: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", pod, *argv], check=check)

    def plugin(self, env: dict[str, str], conf: dict[str, Any] | bytes | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Execute the forwarder as a runtime would (in the node's netns), with exactly ``env``."""
        if conf is None:
            conf = {**self.conf()["plugins"][0], "cniVersion": "1.0.0", "name": "weave"}
        data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", str(self.bin / "weave-net")],
                              input=data.decode(), capture_output=True, text=True, timeout=timeout,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}, check=False)

    def cnitool(self, tool: Path, command: str, netns: str, *, container: str | None = None,
                check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        full = {**os.environ, "NETCONFPATH": str(self.netd), "CNI_PATH": str(self.bin),
                "CNI_CACHE_DIR": str(self.work / "cache"), **env}
        if container:
            full["CNI_CONTAINERID"] = container
        return run(["nsenter", f"--net=/run/netns/{self.netns}", str(tool), command, "weave", netns], check=check,
                   env=full)

    def cleanup(self) -> None:
        self.stop()
        for pod in self.pods:
            run(["ip", "netns", "del", pod], check=False)
        run(["ip", "netns", "del", self.netns], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture
def make_node(forwarder: Path) -> Iterator[Any]:
    reason = why_missing("ip", "nsenter")
    if reason:
        pytest.skip(reason)
    made: list[Node] = []

    def make(suffix: str = "a", *, start: bool = True, **kwargs: Any) -> Node:
        name = f"{session_base()}c{suffix}"
        node = Node(name, Path(f"/tmp/wcni-{name}"), forwarder, **kwargs)
        made.append(node)
        shutil.rmtree(node.work, ignore_errors=True)
        node.setup()
        if start:
            node.start()
        return node

    yield make
    for node in made:
        node.cleanup()
    left = run(["ip", "netns", "list"]).stdout
    assert not [line for line in left.splitlines() if line.startswith(f"{session_base()}c")], left


@pytest.fixture
def node(make_node: Any) -> Node:
    result: Node = make_node("a")
    return result
