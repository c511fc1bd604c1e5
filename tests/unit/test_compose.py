"""docker-compose.yml: valid for docker-compose (offline), and its demo services wired to each other."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(DOCKER_COMPOSE is None,
                                   reason="docker-compose not installed (scripts/setup.sh installs it)")


def config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    return subprocess.run([DOCKER_COMPOSE, "-f", str(path), "config", *extra], capture_output=True, text=True,
                          check=False, timeout=60, cwd=path.parent)


@needs_compose
def test_compose_file_is_valid() -> None:
    result = config(COMPOSE, "-q")
    assert result.returncode == 0, result.stderr


@needs_compose
def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    """So that the validation above cannot pass by checking nothing."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    network_mode:", "    network_mod:", 1))
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    result = config(broken, "-q")
    assert result.returncode != 0
    assert "network_mod" in result.stderr


def services() -> dict[str, Any]:
    if DOCKER_COMPOSE is not None:  # the resolved form: anchors merged, as docker compose will run it
        result = config(COMPOSE)
        assert result.returncode == 0, result.stderr
        return dict(yaml.safe_load(result.stdout)["services"])
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def test_nodes_are_privileged_with_tun_and_their_own_state() -> None:
    nodes = {name: s for name, s in services().items() if name.startswith("node")}
    assert len(nodes) == 3
    volumes = set()
    for name, node in nodes.items():
        assert node["privileged"] is True
        assert "/dev/net/tun:/dev/net/tun" in node["devices"]
        assert node["environment"]["HOSTNAME"] == name
        assert node["command"][:2] == ["weaved", "run"]
        peers = {node["command"][i + 1] for i, arg in enumerate(node["command"]) if arg == "--peer"}
        assert peers == set(nodes) - {name}
        volumes |= {str(v if isinstance(v, str) else v["source"]).split(":")[0] for v in node["volumes"]}
    assert len(volumes) == 3, "every node keeps its own state"


def test_demo_services_sit_on_different_nodes_and_call_each_other_there() -> None:
    all_services = services()
    placement = {name: all_services[name]["network_mode"].removeprefix("service:")
                 for name in ("users", "auth", "tasks")}
    assert len(set(placement.values())) == 3, "one service per node"

    def port(name: str) -> str:
        command = all_services[name]["command"]
        return str(command[command.index("--port") + 1])

    auth = all_services["auth"]["command"]
    tasks = all_services["tasks"]["command"]
    assert auth[auth.index("--users") + 1] == f"http://{placement['users']}:{port('users')}"
    assert tasks[tasks.index("--auth") + 1] == f"http://{placement['auth']}:{port('auth')}"
