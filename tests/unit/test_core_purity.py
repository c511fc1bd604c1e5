"""The protocol core is sans-IO: no sockets, no clocks, no event loop, no global randomness.

That rule is what lets the simulated network drive hundreds of peers deterministically; this test
keeps it from eroding one convenient import at a time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "weaved" / "core"
FORBIDDEN_MODULES = {
    "anyio", "asyncio", "trio", "socket", "select", "selectors", "time", "datetime", "os", "subprocess",
    "threading", "multiprocessing", "pyroute2", "aiohttp", "urllib", "http", "structlog", "logging",
    "prometheus_client", "secrets", "uuid", "pathlib", "shutil", "signal",
}
CORE_FILES = sorted(CORE.rglob("*.py"))


def offences(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(node.module)
            if node.module == "random":
                found += [f"random.{a.name}" for a in node.names if a.name != "Random"]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "random"
              and node.attr != "Random"):
            found.append(f"random.{node.attr} (global randomness: inject a random.Random)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append("open()")
    return found


def test_core_has_modules() -> None:
    assert len(CORE_FILES) >= 8


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_is_pure(path: Path) -> None:
    assert offences(path.read_text()) == []


def test_the_checker_catches_io() -> None:
    bad = "import time\nfrom anyio import sleep\nimport random\nx = random.random()\nopen('f')\n"
    assert sorted(offences(bad)) == sorted(
        ["time", "anyio", "random.random (global randomness: inject a random.Random)", "open()"])
