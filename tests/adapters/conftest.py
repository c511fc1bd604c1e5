"""Fixtures shared by the adapter tests: the daemons they run log into a buffer a test can read."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from weaved.adapters.logs import configure_logging, reset_logging


@pytest.fixture(autouse=True)
def logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("console", "info", out)
    yield out
    reset_logging()
