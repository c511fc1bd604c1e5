"""Bad input and bad moments: each gets the right CNI error code, and nothing is left behind."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import pytest

from tests.cni.conftest import ROOT, Node, run

pytestmark = pytest.mark.netns


def _env(node: Node, pod: str, command: str = "ADD", container: str = "bad1", **extra: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": f"/run/netns/{pod}",
            "CNI_IFNAME": "eth0", "CNI_PATH": str(node.bin), **extra}


def _conf(node: Node, **extra: Any) -> dict[str, Any]:
    return {**node.conf()["plugins"][0], "cniVersion": "1.0.0", "name": "weave", **extra}


def _error(proc: Any) -> dict[str, Any]:
    assert proc.returncode != 0, proc.stdout
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _clean(node: Node) -> None:
    assert node.veths() == [], node.veths()
    assert node.leases() == []


def test_bad_requests(node: Node) -> None:
    pod = node.pod("1")
    env = _env(node, pod)
    for missing in ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"):
        err = _error(node.plugin({k: v for k, v in env.items() if k != missing}, _conf(node)))
        assert err["code"] == 4, (missing, err)
    assert _error(node.plugin({**env, "CNI_COMMAND": "FROB"}, _conf(node)))["code"] == 4
    assert _error(node.plugin({**env, "CNI_CONTAINERID": "../../etc"}, _conf(node)))["code"] == 4
    assert _error(node.plugin({**env, "CNI_IFNAME": "a-name-far-too-long"}, _conf(node)))["code"] == 4
    assert _error(node.plugin({**env, "CNI_ARGS": "novalue"}, _conf(node)))["code"] == 4
    assert _error(node.plugin(env, b"{not json"))["code"] == 6
    assert _error(node.plugin(env, b"[1, 2]"))["code"] == 6
    unknown = _error(node.plugin(env, _conf(node, cniVersion="0.2.0")))
    assert unknown["code"] == 1 and "0.2.0" in unknown["msg"]
    assert _error(node.plugin(env, _conf(node, cniVersion="2.0.0")))["code"] == 1
    assert _error(node.plugin(env, {k: v for k, v in _conf(node).items() if k != "cniVersion"}))["code"] == 7
    assert _error(node.plugin(env, _conf(node, mtu=10)))["code"] == 7
    assert _error(node.plugin({**env, "CNI_COMMAND": "CHECK"}, _conf(node)))["code"] == 7  # no prevResult
    assert _error(node.plugin({**env, "CNI_COMMAND": "CHECK"}, _conf(node, cniVersion="0.3.1")))["code"] == 1
    missing_ns = _error(node.plugin({**env, "CNI_NETNS": "/run/netns/does-not-exist"}, _conf(node)))
    assert missing_ns["code"] == 3
    not_a_netns = _error(node.plugin({**env, "CNI_NETNS": "/etc/hostname"}, _conf(node)))
    assert not_a_netns["code"] == 3
    version = node.plugin({"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_PATH": "dummy"},
                          b'{"cniVersion": "1.0.0"}')
    assert version.returncode == 0 and "1.0.0" in json.loads(version.stdout)["supportedVersions"]
    _clean(node)


def test_del_is_idempotent_and_tolerates_missing_netns(node: Node) -> None:
    pod = node.pod("1")
    env = _env(node, pod, container="twice")
    add = node.plugin(env, _conf(node))
    assert add.returncode == 0, add.stdout
    for dele in (env, env, {**env, "CNI_NETNS": ""}, {**env, "CNI_NETNS": "/run/netns/gone"}):
        proc = node.plugin({**dele, "CNI_COMMAND": "DEL"}, _conf(node))
        assert (proc.returncode, proc.stdout) == (0, ""), proc.stdout
    _clean(node)
    # the netns vanished before DEL (the runtime deleted it first): the host end goes, the lease too
    add = node.plugin(env, _conf(node))
    assert add.returncode == 0
    node.pods.remove(pod)
    run(["ip", "netns", "del", pod])
    proc = node.plugin({**env, "CNI_COMMAND": "DEL"}, _conf(node))
    assert (proc.returncode, proc.stdout) == (0, "")
    _clean(node)


def test_failed_add_leaves_nothing(node: Node) -> None:
    """eth0 already taken in the pod: ADD fails with 100 and gives its address back."""
    pod = node.pod("1")
    node.pod_ns(pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other", check=True)
    err = _error(node.plugin(_env(node, pod, container="taken"), _conf(node)))
    assert err["code"] == 100 and "already exists" in err["details"]
    _clean(node)


def test_exhausted_ipam(make_node: Any) -> None:
    """A /29 range: the gateway and the pods fill it; the next ADD waits ipamTimeoutSeconds and fails 11."""
    node: Node = make_node("x", prefix=29, ipalloc_range="10.32.0.0/29", extra_conf={"ipamTimeoutSeconds": 2})
    made = []
    for i in range(16):
        pod = node.pod(str(i))
        proc = node.plugin(_env(node, pod, container=f"full{i}"), _conf(node))
        if proc.returncode != 0:
            err = json.loads(proc.stdout)
            assert err["code"] == 11 and "no address" in err["msg"], err
            break
        made.append(pod)
    else:
        pytest.fail("a /29 never ran out")
    assert 3 <= len(made) <= 7
    assert len(node.leases()) == len(made)  # the withdrawn request holds nothing
    assert len(node.veths()) == len(made)
    for i, pod in enumerate(made):
        assert node.plugin(_env(node, pod, "DEL", container=f"full{i}"), _conf(node)).returncode == 0
    _clean(node)


def test_no_pod_network_yet(make_node: Any) -> None:
    node: Node = make_node("b", bridge=False)
    pod = node.pod("1")
    err = _error(node.plugin(_env(node, pod), _conf(node)))
    assert err["code"] == 11 and err["msg"].startswith("weaved has no pod network yet: IPAM ")
    status = _error(node.plugin({"CNI_COMMAND": "STATUS"}, _conf(node, cniVersion="1.1.0")))
    assert status["code"] == 50
    assert node.veths() == []


def test_daemon_down(node: Node) -> None:
    """ADD/CHECK fail with 11 and STATUS with 50; DEL is spooled, exits 0, and is carried out at the next start."""
    pod = node.pod("1")
    env = _env(node, pod, container="offline")
    add = node.plugin(env, _conf(node))
    assert add.returncode == 0
    assert len(node.leases()) == 1 and len(node.veths()) == 1
    node.stop()
    assert _error(node.plugin(env, _conf(node)))["code"] == 11
    assert _error(node.plugin({"CNI_COMMAND": "STATUS"}, _conf(node, cniVersion="1.1.0")))["code"] == 50
    dele = node.plugin({**env, "CNI_COMMAND": "DEL"}, _conf(node))
    assert (dele.returncode, dele.stdout) == (0, "")
    assert "recorded" in dele.stderr
    assert (node.spool / "offline").read_text().startswith("container=offline\n")
    node.start()
    deadline = time.monotonic() + 10
    while (node.spool / "offline").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (node.spool / "offline").exists()
    _clean(node)


def test_second_daemon_does_not_steal_the_socket(node: Node) -> None:
    proc = node.ns(sys.executable, "-m", "tests.cni.cnid", "--pod-bridge", "weave", "--state-dir",
                   str(node.work / "state2"), "--port", "6790", "--http-addr", "127.0.0.1:6794", "--metrics-addr",
                   "127.0.0.1:6795", "--cni-socket", str(node.socket), check=False, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == 1
    assert f"another process serves CNI on {node.socket}" in proc.stdout + proc.stderr
    pod = node.pod("1")  # the first daemon still serves
    assert node.plugin(_env(node, pod, container="still"), _conf(node)).returncode == 0
    assert node.plugin(_env(node, pod, "DEL", container="still"), _conf(node)).returncode == 0
