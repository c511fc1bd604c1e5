"""weave-net under real container runtimes: containerd's ``ctr run --cni`` and podman (CNI backend), each
running inside the node namespace with the plugin and conflist bind-mounted over the fixed host paths in a
private mount namespace (the host's /etc/cni/net.d and /opt/cni/bin are never written)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cni.conftest import CACHE, GATEWAY, Node, run, why_missing
from tests.netns.conftest import session_base

pytestmark = pytest.mark.netns

MKIMAGE = Path(__file__).with_name("mkimage.sh")
IMAGE = "localhost/wcni-busybox:latest"
PAUSE = "localhost/wcni-pause:latest"
PROBE = f"ip -4 -o addr show eth0; ip route; ping -c 1 -W 2 {GATEWAY} >/dev/null && echo GW-OK"


@pytest.fixture(scope="session")
def image() -> Path:
    reason = why_missing("busybox")
    if reason or not Path("/bin/busybox").exists():
        pytest.skip(reason or "busybox-static not installed")
    out = CACHE / "busybox.tar"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        run(["bash", str(MKIMAGE), str(out), IMAGE, '["/bin/sh"]'])
    return out


def _private_mounts(node: Node) -> str:
    """Shell prefix: a private mount namespace where the runtime's fixed CNI paths show the node's dirs."""
    return (f"mount -t tmpfs wcni /etc/cni && mkdir -p /etc/cni/net.d && mount --bind {node.netd} /etc/cni/net.d && "
            f"mount -t tmpfs wcni /opt && mkdir -p /opt/cni/bin && mount --bind {node.bin} /opt/cni/bin && ")


def _unmount_under(path: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(path))), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


@pytest.fixture
def containerd(node: Node, image: Path) -> Iterator[dict[str, str]]:
    reason = why_missing("containerd", "ctr", "runc", "unshare")
    if reason:
        pytest.skip(reason)
    if not Path("/etc/cni").is_dir() or not Path("/opt").is_dir():
        pytest.skip("/etc/cni or /opt missing: nothing to mount the private view over")
    ctd = node.work / "ctd"
    ctd.mkdir()
    (ctd / "config.toml").write_text(
        f'version = 2\nroot = "{ctd}/root"\nstate = "{ctd}/state"\n'
        f'[grpc]\n  address = "{ctd}/containerd.sock"\n[ttrpc]\n  address = "{ctd}/containerd.sock.ttrpc"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'
        f'  sandbox_image = "{PAUSE}"\n  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
        '  netns_mounts_under_state_dir = true\n'
        f'  [plugins."io.containerd.grpc.v1.cri".cni]\n    bin_dir = "{node.bin}"\n    conf_dir = "{node.netd}"\n'
        '    max_conf_num = 1\n')
    log = open(ctd / "containerd.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.netns}", "containerd", "--config",
                             str(ctd / "config.toml")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    env = {**os.environ, "CONTAINERD_ADDRESS": str(ctd / "containerd.sock")}
    try:
        deadline = time.monotonic() + 20
        while run(["ctr", "version"], check=False, env=env).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (ctd / "containerd.log").read_text()
            time.sleep(0.1)
        run(["ctr", "-n", session_base(), "image", "import", str(image)], env=env)
        pause = CACHE / "pause.tar"
        if not pause.exists():
            run(["bash", str(MKIMAGE), str(pause), PAUSE, '["/bin/sleep","2147483647"]'])
        run(["ctr", "-n", "k8s.io", "image", "import", str(pause)], env=env)
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        _unmount_under(ctd)


def test_ctr_run_cni(node: Node, containerd: dict[str, str]) -> None:
    name = f"{session_base()}-ctr1"
    script = _private_mounts(node) + f"exec ctr -n {session_base()} run --rm --cni {IMAGE} ctr1 sh -c '{PROBE}'"
    proc = run(["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "-m", "--propagation", "private",
                "sh", "-c", script], env=containerd, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr + node.log()[-3000:]
    assert re.search(r"inet 10\.32\.\d+\.\d+/12", proc.stdout), proc.stdout
    assert f"default via {GATEWAY} dev eth0" in proc.stdout and "GW-OK" in proc.stdout
    # --rm sent DEL (with CNI_NETNS="" — the task's netns is gone): nothing left
    assert node.veths() == [] and node.leases() == [], name


@pytest.fixture
def podman(node: Node, image: Path) -> Iterator[dict[str, str]]:
    reason = why_missing("podman", "runc")
    if reason:
        pytest.skip(reason)
    pod = node.work / "podman"
    (pod / "tmp").mkdir(parents=True)
    (pod / "containers.conf").write_text(
        '[containers]\nnetns = "private"\nlog_driver = "k8s-file"\n'
        'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
        f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{node.bin}"]\nnetwork_config_dir = "{node.netd}"\n'
        f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nevents_logfile_path = "{pod}/events.log"\n'
        f'runtime = "runc"\ntmp_dir = "{pod}/tmp"\n')
    (pod / "storage.conf").write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{pod}/root"\n'
                                      f'runroot = "{pod}/run"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(pod / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(pod / "storage.conf")}
    try:
        run(["podman", "load", "-q", "-i", str(image)], env=env, timeout=120)
        yield env
    finally:
        run(["podman", "rm", "-a", "-f", "-t", "0"], env=env, check=False)
        _unmount_under(pod)


def _podman(node: Node, env: dict[str, str], *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run(["nsenter", f"--net=/run/netns/{node.netns}", "podman", *args], env=env, check=check, timeout=120)


def test_podman_run_and_port_mapping(node: Node, podman: dict[str, str]) -> None:
    out = _podman(node, podman, "run", "--rm", "--network", "weave", IMAGE, "sh", "-c", PROBE)
    assert out.returncode == 0, out.stdout + out.stderr + node.log()[-3000:]
    assert re.search(r"inet 10\.32\.\d+\.\d+/12", out.stdout) and "GW-OK" in out.stdout, out.stdout
    assert node.veths() == [] and node.leases() == []

    if why_missing("iptables", "curl"):
        return
    web = _podman(node, podman, "run", "-d", "--name", "web", "--network", "weave", "-p", "8080:80", IMAGE,
                  "httpd", "-f", "-p", "80", "-h", "/etc")
    assert web.returncode == 0, web.stderr
    try:
        ip = node.leases()[0]["address"].split("/")[0]
        assert f"--dport 8080 -j DNAT --to-destination {ip}:80" in node.ns("iptables", "-t", "nat", "-S").stdout
        got: Any = None
        for _ in range(20):
            got = node.ns("curl", "-sf", "-m", "2", f"http://{GATEWAY}:8080/passwd", check=False)
            if got.returncode == 0:
                break
            time.sleep(0.2)
        assert got is not None and got.stdout.startswith("root:"), got
    finally:
        _podman(node, podman, "rm", "-f", "-t", "0", "web")
    assert "8080" not in node.ns("iptables", "-t", "nat", "-S").stdout
    assert node.veths() == [] and node.leases() == []


CRI_PROTO = """
// subset of k8s.io/cri-api runtime/v1 (field numbers as upstream)
syntax = "proto3";
package runtime.v1;
service RuntimeService {
  rpc RunPodSandbox(RunPodSandboxRequest) returns (RunPodSandboxResponse) {}
  rpc StopPodSandbox(StopPodSandboxRequest) returns (StopPodSandboxResponse) {}
  rpc RemovePodSandbox(RemovePodSandboxRequest) returns (RemovePodSandboxResponse) {}
  rpc PodSandboxStatus(PodSandboxStatusRequest) returns (PodSandboxStatusResponse) {}
}
enum Protocol { TCP = 0; UDP = 1; SCTP = 2; }
message PortMapping { Protocol protocol = 1; int32 container_port = 2; int32 host_port = 3; string host_ip = 4; }
message PodSandboxMetadata { string name = 1; string uid = 2; string namespace = 3; uint32 attempt = 4; }
message PodSandboxConfig { PodSandboxMetadata metadata = 1; string hostname = 2; string log_directory = 3;
  repeated PortMapping port_mappings = 5; map<string, string> labels = 6; map<string, string> annotations = 7; }
message RunPodSandboxRequest { PodSandboxConfig config = 1; string runtime_handler = 2; }
message RunPodSandboxResponse { string pod_sandbox_id = 1; }
message StopPodSandboxRequest { string pod_sandbox_id = 1; }
message StopPodSandboxResponse {}
message RemovePodSandboxRequest { string pod_sandbox_id = 1; }
message RemovePodSandboxResponse {}
message PodSandboxStatusRequest { string pod_sandbox_id = 1; bool verbose = 2; }
message PodIP { string ip = 1; }
message PodSandboxNetworkStatus { string ip = 1; repeated PodIP additional_ips = 2; }
enum PodSandboxState { SANDBOX_READY = 0; SANDBOX_NOTREADY = 1; }
message PodSandboxStatus { string id = 1; PodSandboxMetadata metadata = 2; PodSandboxState state = 3;
  int64 created_at = 4; PodSandboxNetworkStatus network = 5; }
message PodSandboxStatusResponse { PodSandboxStatus status = 1; map<string, string> info = 2; }
"""


def test_containerd_cri_sandbox(node: Node, containerd: dict[str, str]) -> None:
    """What the kubelet does: RunPodSandbox over gRPC; the CRI plugin runs our conflist (loopback + weave-net
    + portmap with the sandbox's port mapping), then Stop and Remove (two DELs, the second without netns)."""
    grpc = pytest.importorskip("grpc")
    protoc = pytest.importorskip("grpc_tools.protoc")
    gen = CACHE / "cri"
    if not (gen / "cri_min_pb2_grpc.py").exists():
        gen.mkdir(parents=True, exist_ok=True)
        (gen / "cri_min.proto").write_text(CRI_PROTO)
        assert protoc.main(["protoc", f"-I{gen}", f"--python_out={gen}", f"--grpc_python_out={gen}",
                            str(gen / "cri_min.proto")]) == 0
    import importlib
    import sys

    sys.path.insert(0, str(gen))
    try:
        pb = importlib.import_module("cri_min_pb2")
        rpc = importlib.import_module("cri_min_pb2_grpc")
    finally:
        sys.path.remove(str(gen))
    (node.work / "cri-logs").mkdir()
    with grpc.insecure_channel("unix://" + containerd["CONTAINERD_ADDRESS"]) as channel:
        rt = rpc.RuntimeServiceStub(channel)
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name="web", namespace="default", uid=f"{session_base()}-uid"),
            hostname="web", log_directory=str(node.work / "cri-logs"),
            port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=8082)])
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
        try:
            status = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10).status
            ip = status.network.ip
            assert status.state == pb.SANDBOX_READY and ip.startswith("10.32."), status
            assert [lease["address"].split("/")[0] for lease in node.leases()] == [ip]
            nat = node.ns("iptables", "-t", "nat", "-S", check=False).stdout
            if not why_missing("iptables"):
                assert f"--dport 8082 -j DNAT --to-destination {ip}:80" in nat, nat
        finally:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    assert node.veths() == [] and node.leases() == []
