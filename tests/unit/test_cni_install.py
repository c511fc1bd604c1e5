"""``weaved cni-install``: atomic, idempotent, with the conflist the CNI plugin and the runtime expect."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from weaved.k8s.install import CONFLIST_NAME, PLUGIN_NAME, InstallError, install

TRUE = Path(shutil.which("true") or "/bin/true")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weaved", "cni-install", *args], capture_output=True, text=True,
                          check=False, env={**os.environ})


def test_installs_plugin_and_conflist_then_changes_nothing(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    first = run_cli("--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--plugin", str(TRUE))
    assert first.returncode == 0, first.stderr
    assert f"installed {bin_dir / PLUGIN_NAME}" in first.stdout
    assert "warning: no portmap plugin" in first.stdout
    plugin = bin_dir / PLUGIN_NAME
    assert plugin.read_bytes() == TRUE.read_bytes()
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o755
    assert subprocess.run([str(plugin)], check=False).returncode == 0, "the copy runs"
    conf = json.loads((conf_dir / CONFLIST_NAME).read_text())
    assert conf == {"cniVersion": "1.0.0", "name": "weave", "plugins": [
        {"type": "weave-net", "daemonSocket": "/run/weave/cni.sock", "hairpinMode": True,
         "spoolDir": "/var/lib/weave/cni-pending"},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}
    inode = plugin.stat().st_ino
    (bin_dir / "portmap").write_bytes(b"")
    second = run_cli("--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--plugin", str(TRUE))
    assert second.returncode == 0
    assert second.stdout.splitlines() == [f"unchanged {plugin}", f"unchanged {conf_dir / CONFLIST_NAME}"]
    assert plugin.stat().st_ino == inode, "an unchanged file is not rewritten"
    assert sorted(os.listdir(bin_dir)) == ["portmap", PLUGIN_NAME], "no temporary file left behind"


def test_a_changed_file_is_replaced_by_rename(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / CONFLIST_NAME).write_text("{old")
    install(bin_dir, conf_dir, TRUE)
    assert json.loads((conf_dir / CONFLIST_NAME).read_text())["name"] == "weave"
    assert os.listdir(conf_dir) == [CONFLIST_NAME]


def test_a_missing_or_bogus_plugin_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c"),
                     "--plugin", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.startswith("weaved: cannot read the CNI plugin ") and result.stderr.count("\n") == 1
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(InstallError, match="not an executable"):
        install(tmp_path / "b", tmp_path / "c", script)
    assert not (tmp_path / "b").exists() or not os.listdir(tmp_path / "b"), "nothing half-installed"


def test_an_unwritable_target_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InstallError, match=r"^cannot write .*file/sub/weave-net: "):
        install(blocker / "sub", tmp_path / "c", TRUE)
