"""The DaemonSet manifest: valid for Kubernetes (offline schemas), and consistent with what the daemon reads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from weaved.adapters.api import status_app
from weaved.config import DEFAULT_HTTP_ADDR, DEFAULT_METRICS_ADDR, DEFAULT_PORT, DEFAULT_STATE_DIR, parse_settings
from weaved.core.ipam.ring import AddressRange
from weaved.k8s.install import DAEMON_SOCKET, DEFAULT_BIN_DIR, DEFAULT_CONF_DIR
from weaved.k8s.settings import IN_CLUSTER_ENV, NAMESPACE, NODE_NAME_ENV, RECLAIM_CONFIGMAP

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "daemonset" / "weaved.yaml"
VALIDATOR = Path(sys.executable).parent / "kubernetes-validate"
WEAVED_SOURCES = "\n".join(p.read_text() for p in (ROOT / "weaved").rglob("*.py"))

PENDING_ENV: dict[str, str] = {}
"""Settings the manifest documents whose reader is not on this branch; strict xfail, so the day they are
read this test says to take them off the list."""


def docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def daemonset() -> dict[str, Any]:
    return docs()["DaemonSet"]


def container(name: str) -> dict[str, Any]:
    spec = daemonset()["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec["initContainers"] if c["name"] == name)


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    if not VALIDATOR.exists():
        pytest.fail(f"{VALIDATOR} missing: install the test extra (pip install -e '.[test]')")
    return subprocess.run([str(VALIDATOR), "--strict", "-k", "1.28.0", str(path)], capture_output=True, text=True,
                          check=False, timeout=120)


def test_manifest_passes_strict_schema_validation() -> None:
    result = validate(MANIFEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 7


def test_the_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """So that the test above cannot pass by validating nothing."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("matchLabels:", "matchLabel:", 1))
    result = validate(broken)
    assert result.returncode != 0
    assert "matchLabel" in result.stdout + result.stderr


def test_probe_ports_and_paths_match_the_daemon() -> None:
    weaved = container("weaved")
    probe = weaved["readinessProbe"]["httpGet"]
    assert f"{probe['host']}:{probe['port']}" == DEFAULT_HTTP_ADDR
    routes = {r.resource.canonical for r in status_app(None).router.routes() if r.resource}  # type: ignore[arg-type]
    assert probe["path"] in routes
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in weaved["ports"]}
    assert ports["control"] == (DEFAULT_PORT, "UDP")
    assert ports["metrics"] == (int(DEFAULT_METRICS_ADDR.rsplit(":", 1)[1]), "TCP")


def test_mounts_match_the_daemon_and_the_install_step() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m["name"] for m in container("weaved")["volumeMounts"]}
    assert host_paths[mounts[DEFAULT_STATE_DIR]] == "/var/lib/weave"
    socket_dir = str(Path(DAEMON_SOCKET).parent)
    assert host_paths[mounts[socket_dir]] == socket_dir, "the plugin on the host finds the daemon's socket"
    assert host_paths[mounts["/dev/net/tun"]] == "/dev/net/tun"
    install = container("install-cni")
    assert install["image"] == container("weaved")["image"]
    assert install["command"] == ["weaved", "cni-install", "--bin-dir", str(DEFAULT_BIN_DIR),
                                  "--conf-dir", str(DEFAULT_CONF_DIR)]
    install_mounts = {m["mountPath"]: host_paths[m["name"]] for m in install["volumeMounts"]}
    assert install_mounts == {str(DEFAULT_BIN_DIR): "/opt/cni/bin", str(DEFAULT_CONF_DIR): "/etc/cni/net.d"}


def manifest_env() -> dict[str, Any]:
    return {e["name"]: e for e in container("weaved")["env"]}


@pytest.mark.parametrize("name", sorted(manifest_env()), ids=str)
def test_every_env_setting_is_read_by_the_daemon(name: str) -> None:
    read = re.search(rf"[\"']{name}[\"']", WEAVED_SOURCES) is not None
    if name in PENDING_ENV:
        assert not read, f"weaved reads {name} now: take it off PENDING_ENV"
        pytest.xfail(PENDING_ENV[name])
    assert read, f"{name} is set in the manifest but weaved never reads it"


def test_the_manifest_env_parses_into_the_intended_settings() -> None:
    env = {name: e.get("value", "") for name, e in manifest_env().items()}
    assert manifest_env()[NODE_NAME_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    env[NODE_NAME_ENV] = "worker-1"
    env[IN_CLUSTER_ENV] = "10.96.0.1"  # the kubelet sets it in every pod
    settings = parse_settings({}, env, "ignored")
    assert settings.ipalloc_range == AddressRange.from_cidr("10.32.0.0/12")
    assert settings.conn_limit == 200
    assert settings.nickname == "worker-1"
    assert settings.kube is not None and settings.kube.node_name == "worker-1"
    assert settings.password_file_optional and settings.password is None


def test_weaves_password_secret_is_mounted_when_it_exists_and_read_as_the_password(tmp_path: Path) -> None:
    """A Weave Net user's ``weave-passwd`` Secret (key ``weave-passwd``) starts an encrypted mesh; without the
    Secret the mount is empty and the daemon starts without a password instead of failing on every node."""
    volumes = {v["name"]: v for v in daemonset()["spec"]["template"]["spec"]["volumes"]}
    secret = volumes["weave-passwd"]["secret"]
    assert secret["secretName"] == "weave-passwd" and secret["optional"] is True
    mount = {m["name"]: m for m in container("weaved")["volumeMounts"]}["weave-passwd"]
    env = {name: e.get("value", "") for name, e in manifest_env().items()}
    assert env["WEAVE_PASSWORD_FILE"] == f"{mount['mountPath']}/weave-passwd" and mount["readOnly"] is True
    assert "WEAVE_PASSWORD" not in env  # never in the environment, where child processes inherit it
    from weaved.adapters.password import read_password
    env["WEAVE_PASSWORD_FILE"] = str(tmp_path / "weave-passwd")
    settings = parse_settings({}, env, "node-0")
    assert read_password(settings) == (None, f"none (no file at {tmp_path / 'weave-passwd'})")
    (tmp_path / "weave-passwd").write_bytes(b"s3cret\n")  # kubectl create secret --from-file keeps the newline
    assert read_password(settings) == (b"s3cret", f"file {tmp_path / 'weave-passwd'}")


def test_rbac_is_least_privilege_and_names_what_the_daemon_uses() -> None:
    all_docs = docs()
    assert all_docs["ClusterRole"]["rules"] == [{"apiGroups": [""], "resources": ["nodes"],
                                                 "verbs": ["get", "list", "watch"]}]
    role = all_docs["Role"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [RECLAIM_CONFIGMAP],
                              "verbs": ["get", "update"]}]
    configmap = all_docs["ConfigMap"]
    assert (configmap["metadata"]["namespace"], configmap["metadata"]["name"]) == (NAMESPACE, RECLAIM_CONFIGMAP)
    assert "data" not in configmap, "re-applying the manifest must not wipe the registry"
    ds = daemonset()
    assert ds["metadata"]["namespace"] == NAMESPACE
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == all_docs["ServiceAccount"]["metadata"]["name"]
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}], "tolerates every taint"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
