"""The Dockerfile cannot be built here (no engine): check what can be checked by reading it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from weaved.k8s.install import PLUGIN_SOURCE

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_plugin_lands_where_cni_install_copies_it_from() -> None:
    assert f"COPY --from=cni /src/weave-net {PLUGIN_SOURCE}" in DOCKERFILE
    assert "gcc -static -Os" in DOCKERFILE and "cni/weave-net.c" in DOCKERFILE


def test_every_runtime_dependency_is_pinned_for_the_image() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name.lower()] = version
    missing = {_name(r) for r in project["dependencies"]} - set(pins)
    assert not missing, f"docker/requirements.txt lacks {sorted(missing)}"


def test_base_images_are_pinned_by_tag() -> None:
    for ref in re.findall(r"^ARG \w+_IMAGE=(\S+)$", DOCKERFILE, re.M):
        assert re.search(r":\S*\d", ref) and "latest" not in ref, ref
