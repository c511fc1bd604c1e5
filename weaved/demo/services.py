"""Demo services for the local lab: ``users``, ``auth`` and ``tasks``, each a tiny aiohttp app.

Theory of operation
-------------------
They exist to put realistic east-west traffic on the overlay, one service per node, each call crossing
nodes: ``tasks`` asks ``auth`` to verify a token, ``auth`` asks ``users`` whether the user exists. Every
reply says which service and host answered and how long the downstream calls took, so a ``curl`` shows at a
glance which hop is slow or down. State is in memory and deterministic (no randomness: tokens are derived
from the user name), because the point is the network, not the services.

Run one with ``python -m weaved.demo SERVICE --port N [--users URL] [--auth URL]``; docker-compose.yml
places them on the lab's nodes.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

USERS = {"ada": "Ada Lovelace", "grace": "Grace Hopper", "linus": "Linus Torvalds"}
TASKS = {"ada": ["write the first program"], "grace": ["find the moth", "ship COBOL"], "linus": ["merge"]}
CALL_TIMEOUT = ClientTimeout(total=5)
SESSION_KEY = web.AppKey("session", ClientSession)
SERVICES = ("users", "auth", "tasks")


def token_for(user: str) -> str:
    return hashlib.sha256(f"weaved-demo/{user}".encode()).hexdigest()[:16]


def _reply(service: str, body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response({"service": service, "host": socket.gethostname(), **body}, status=status)


async def _call(request: web.Request, method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, Any], float]:
    """One downstream call: (status, JSON body, milliseconds); 502 with the reason when it fails."""
    started = time.monotonic()
    try:
        async with request.app[SESSION_KEY].request(method, url, timeout=CALL_TIMEOUT, **kwargs) as resp:
            body = await resp.json()
            return resp.status, body, round((time.monotonic() - started) * 1000, 1)
    except (ClientError, TimeoutError, ValueError) as exc:
        raise web.HTTPBadGateway(text=f"{url}: {type(exc).__name__}: {exc}\n") from None


async def _session(app: web.Application) -> Any:
    app[SESSION_KEY] = ClientSession()
    yield
    await app[SESSION_KEY].close()


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def users_app() -> web.Application:
    async def get_user(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in USERS:
            return _reply("users", {"error": f"no user {name!r}"}, 404)
        return _reply("users", {"user": name, "full_name": USERS[name]})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/users/{name}", get_user)
    return app


def auth_app(users_url: str) -> web.Application:
    async def login(request: web.Request) -> web.Response:
        user = request.query.get("user", "")
        status, body, ms = await _call(request, "GET", f"{users_url}/users/{user}")
        if status != 200:
            return _reply("auth", {"error": body.get("error", "unknown user"), "users_ms": ms}, 403)
        return _reply("auth", {"user": user, "token": token_for(user), "users_ms": ms})

    async def verify(request: web.Request) -> web.Response:
        token = request.query.get("token", "")
        user = next((u for u in USERS if token_for(u) == token), None)
        if user is None:
            return _reply("auth", {"error": "bad token"}, 401)
        status, _, ms = await _call(request, "GET", f"{users_url}/users/{user}")
        if status != 200:
            return _reply("auth", {"error": "user gone", "users_ms": ms}, 401)
        return _reply("auth", {"user": user, "users_ms": ms})

    app = web.Application()
    app.cleanup_ctx.append(_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/login", login)
    app.router.add_get("/verify", verify)
    return app


def tasks_app(auth_url: str) -> web.Application:
    async def list_tasks(request: web.Request) -> web.Response:
        status, body, ms = await _call(request, "GET", f"{auth_url}/verify",
                                       params={"token": request.query.get("token", "")})
        if status != 200:
            return _reply("tasks", {"error": body.get("error", "not verified"), "auth_ms": ms}, 401)
        user = body["user"]
        return _reply("tasks", {"user": user, "tasks": TASKS.get(user, []), "auth_ms": ms,
                                "via": [body.get("host"), body.get("users_ms")]})

    app = web.Application()
    app.cleanup_ctx.append(_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/tasks", list_tasks)
    return app


def build_app(service: str, users_url: str, auth_url: str) -> web.Application:
    if service == "users":
        return users_app()
    if service == "auth":
        return auth_app(users_url.rstrip("/"))
    if service == "tasks":
        return tasks_app(auth_url.rstrip("/"))
    raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weaved.demo", description="Run one demo service.")
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--users", default="http://127.0.0.1:8081", help="base URL of the users service")
    parser.add_argument("--auth", default="http://127.0.0.1:8082", help="base URL of the auth service")
    args = parser.parse_args(argv)
    web.run_app(build_app(args.service, args.users, args.auth), host=args.host, port=args.port, print=None)
    return 0
