from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.k8s.apiserver import TOKEN, ApiServer, running
from weaved.k8s.client import KubeClient, KubeConfig


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with running(ApiServer()) as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
async def client(api: ApiServer, token_file: Path) -> AsyncIterator[KubeClient]:
    async with KubeClient(KubeConfig(api.url, token_file)) as kube:
        yield kube
