"""Fixtures shared by the adapter tests: the daemons they run log into a buffer a test can read."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator

import pytest

from weaved.adapters.logs import configure_logging, reset_logging


@pytest.fixture(autouse=True)
def logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("console", "info", out)
    yield out
    reset_logging()


def until(check: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Wait for ``check`` (a packet thread counts just after it acted); fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)
