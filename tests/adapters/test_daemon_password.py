"""Real daemons on loopback with a password: an encrypted mesh, the password nowhere to be read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.adapters.test_daemon import Daemon, launch, routes_to_all, wait_for

pytestmark = pytest.mark.slow
__all__ = ["launch"]  # the fixture, used by name

PASSWORD = "daemon-test-secret-7f3a"


def test_daemons_with_a_password_mesh_encrypted_and_never_show_it(launch: Callable[..., Daemon],
                                                                    tmp_path: Path) -> None:
    secret = tmp_path / "weave-passwd"
    secret.write_text(PASSWORD + "\n")
    a = launch("a", "--password-file", str(secret))
    b = launch("b", "--password-file", str(secret), "--peer", f"127.0.0.1:{a.port}")
    names = {a.report()["name"], b.report()["name"]}
    wait_for(lambda: routes_to_all(a, names) and routes_to_all(b, names), "an encrypted mesh of two", [a, b])
    report = a.report()
    assert report["encryption"] == "enabled"
    assert [c["info"].split(",")[0] for c in report["connections"]] == ["encrypted sleeve"]
    counters = report["counters"]
    assert counters.get("handshake_ok", 0) + counters.get("handshake_answered", 0) >= 1
    _, status = a.get("/status")
    assert "Encryption: enabled" in status
    for daemon in (a, b):
        assert PASSWORD not in daemon.log_text()
        assert PASSWORD not in Path(f"/proc/{daemon.proc.pid}/cmdline").read_text()
        assert PASSWORD not in Path(f"/proc/{daemon.proc.pid}/environ").read_bytes().decode(errors="replace")
        assert PASSWORD not in daemon.get("/report")[1]
    assert f"password='file {secret}'" in a.log_text() or f"password=file {secret}" in a.log_text()


def test_a_daemon_with_another_password_stays_out(launch: Callable[..., Daemon], tmp_path: Path) -> None:
    (tmp_path / "right").write_text("right\n")
    (tmp_path / "wrong").write_text("wrong\n")
    a = launch("a", "--password-file", str(tmp_path / "right"))
    c = launch("c", "--password-file", str(tmp_path / "wrong"), "--peer", f"127.0.0.1:{a.port}")
    wait_for(lambda: "wrong or missing password" in a.log_text() and "wrong or missing password" in c.log_text(),
             "both sides to log the mismatch", [a, c])
    assert len(a.report()["peers"]) == 1 and len(c.report()["peers"]) == 1


def test_a_missing_password_file_stops_the_start_with_one_line(launch: Callable[..., Daemon],
                                                               tmp_path: Path) -> None:
    a = launch("a", "--password-file", str(tmp_path / "nope"), wait_ready=False)
    assert a.proc.wait(timeout=30) == 1
    assert "does not exist" in a.log_text() and "Traceback" not in a.log_text()
