"""The demo services chain calls tasks → auth → users over real HTTP on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from weaved.demo.services import build_app, token_for

pytestmark = pytest.mark.anyio


async def _start(app: web.Application, runners: list[web.AppRunner]) -> str:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    runners.append(runner)
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def urls() -> AsyncIterator[dict[str, str]]:
    runners: list[web.AppRunner] = []
    users = await _start(build_app("users", "", ""), runners)
    auth = await _start(build_app("auth", users, ""), runners)
    tasks = await _start(build_app("tasks", "", auth), runners)
    yield {"users": users, "auth": auth, "tasks": tasks}
    for runner in runners:
        await runner.cleanup()


async def test_a_login_then_tasks_crosses_all_three(urls: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{urls['auth']}/login", params={"user": "grace"}) as resp:
            login = await resp.json()
        assert resp.status == 200 and login["token"] == token_for("grace")
        async with session.get(f"{urls['tasks']}/tasks", params={"token": login["token"]}) as resp:
            tasks = await resp.json()
        assert resp.status == 200
        assert tasks["service"] == "tasks" and tasks["tasks"] == ["find the moth", "ship COBOL"]
        async with session.get(f"{urls['tasks']}/tasks", params={"token": "forged"}) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "bad token"
        async with session.get(f"{urls['auth']}/login", params={"user": "mallory"}) as resp:
            assert resp.status == 403


async def test_a_dead_downstream_is_a_502_naming_it() -> None:
    runners: list[web.AppRunner] = []
    tasks = await _start(build_app("tasks", "", "http://127.0.0.1:9"), runners)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{tasks}/tasks?token=x") as resp:
            assert resp.status == 502
            assert "http://127.0.0.1:9/verify" in await resp.text()
    finally:
        await runners[0].cleanup()
