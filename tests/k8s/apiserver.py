"""A Kubernetes API server double on aiohttp that speaks the real wire format (no real one can run here).

It implements exactly what weaved calls, the way kube-apiserver answers:

* ``GET /api/v1/nodes``: a ``NodeList`` with ``metadata.resourceVersion``;
* ``GET /api/v1/nodes?watch=1&resourceVersion=RV[&allowWatchBookmarks=true][&timeoutSeconds=N]``: a chunked
  stream of newline-delimited ``{"type", "object"}`` events after RV; an RV older than the compaction
  floor gets one ``ERROR`` event carrying a 410 ``Status`` (reason ``Expired``), as the real server does;
* ``GET``/``PUT /api/v1/namespaces/NS/configmaps/NAME``: a PUT whose ``metadata.resourceVersion`` is
  stale gets 409 with a ``Status`` body (reason ``Conflict``); a missing object 404;
* every request needs ``Authorization: Bearer <token>`` (401 ``Status`` otherwise).

One resourceVersion counter serves all objects, as etcd's revision does. Faults are injected by tests:
:meth:`ApiServer.fail_next` (HTTP errors), :meth:`ApiServer.compact` (expire old versions),
:meth:`ApiServer.drop_watches` (cut the streams), :meth:`ApiServer.bookmark`.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = "test-token-7f3a"


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def node_object(name: str, internal: str | None = None, external: str | None = None) -> dict[str, Any]:
    addresses = [{"type": "Hostname", "address": name}]
    if internal:
        addresses.append({"type": "InternalIP", "address": internal})
    if external:
        addresses.append({"type": "ExternalIP", "address": external})
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name, "uid": f"uid-{name}"},
            "status": {"addresses": addresses}}


@dataclass
class _Watcher:
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


class ApiServer:
    def __init__(self, token: str | None = TOKEN) -> None:
        self.token = token
        """The bearer token every request must carry; None: none (``kubectl proxy`` style)."""
        self.version = 100
        self.nodes: dict[str, dict[str, Any]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        """Node events: (resourceVersion, type, object)."""
        self.compacted = 0
        """Watches from a version below this get 410."""
        self.watchers: list[_Watcher] = []
        self.failures: dict[str, list[int]] = {}
        """Per request kind ("list", "watch", "get-cm", "put-cm"): HTTP statuses to answer next."""
        self.requests: Counter[str] = Counter()
        self.conflicts = 0
        self.get_delay = 0.0
        """Seconds each ConfigMap GET waits before answering: lets racing clients all read one version."""
        self.url = ""

    # --- state changes by tests -------------------------------------------------------------------

    def _bump(self, obj: dict[str, Any]) -> int:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        return self.version

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((int(obj["metadata"]["resourceVersion"]), kind, copy.deepcopy(obj)))
        for watcher in self.watchers:
            watcher.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})

    def add_node(self, name: str, internal: str | None = None, external: str | None = None) -> None:
        obj = node_object(name, internal, external)
        kind = "MODIFIED" if name in self.nodes else "ADDED"
        self._bump(obj)
        self.nodes[name] = obj
        self._event(kind, obj)

    def delete_node(self, name: str) -> None:
        obj = self.nodes.pop(name)
        self._bump(obj)
        self._event("DELETED", obj)

    def delete_node_silently(self, name: str) -> None:
        """Delete without telling current watchers (a gap the client must find by relisting)."""
        obj = self.nodes.pop(name)
        self._bump(obj)
        self.history.append((self.version, "DELETED", copy.deepcopy(obj)))

    def compact(self) -> None:
        self.compacted = self.version

    def bookmark(self) -> None:
        self.version += 1
        for watcher in self.watchers:
            watcher.queue.put_nowait({"type": "BOOKMARK", "object": {
                "kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.version)}}})

    def drop_watches(self) -> None:
        for watcher in self.watchers:
            watcher.queue.put_nowait(None)

    def fail_next(self, kind: str, *statuses: int) -> None:
        self.failures.setdefault(kind, []).extend(statuses)

    def create_configmap(self, namespace: str, name: str, data: dict[str, str] | None = None) -> None:
        obj: dict[str, Any] = {"kind": "ConfigMap", "apiVersion": "v1",
                               "metadata": {"name": name, "namespace": namespace}}
        if data is not None:
            obj["data"] = dict(data)
        self._bump(obj)
        self.configmaps[(namespace, name)] = obj

    def configmap_data(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.configmaps[(namespace, name)].get("data") or {})

    # --- HTTP -------------------------------------------------------------------------------------

    def _failure(self, kind: str) -> web.Response | None:
        self.requests[kind] += 1
        queued = self.failures.get(kind)
        if queued:
            code = queued.pop(0)
            return web.json_response(status_body(code, "InternalError", f"injected failure {code}"), status=code)
        return None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status_body(401, "Unauthorized", "Unauthorized"), status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request)
        failure = self._failure("list")
        if failure is not None:
            return failure
        return web.json_response({"kind": "NodeList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self.version)},
                                  "items": [copy.deepcopy(n) for n in self.nodes.values()]})

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        failure = self._failure("watch")
        if failure is not None:
            return failure
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        await response.prepare(request)
        if since < self.compacted:
            gone = status_body(410, "Expired", f"too old resource version: {since} ({self.compacted})")
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return response
        watcher = _Watcher()
        for version, kind, obj in self.history:
            if version > since:
                watcher.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})
        self.watchers.append(watcher)
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while True:
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), max(0.0, end - loop.time()))
                except TimeoutError:
                    break  # timeoutSeconds: the server ends the watch cleanly
                if event is None:  # drop_watches(): cut the connection without a clean end
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(json.dumps(event).encode() + b"\n")
        finally:
            self.watchers.remove(watcher)
        await response.write_eof()
        return response

    async def _get_cm(self, request: web.Request) -> web.Response:
        failure = self._failure("get-cm")
        if failure is not None:
            return failure
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.configmaps:
            return web.json_response(status_body(404, "NotFound", f'configmaps "{key[1]}" not found'), status=404)
        current = copy.deepcopy(self.configmaps[key])
        if self.get_delay:  # answer with what was current when the request arrived
            await asyncio.sleep(self.get_delay)
        return web.json_response(current)

    async def _put_cm(self, request: web.Request) -> web.Response:
        failure = self._failure("put-cm")
        if failure is not None:
            return failure
        key = (request.match_info["ns"], request.match_info["name"])
        body = await request.json()
        if key not in self.configmaps:
            return web.json_response(status_body(404, "NotFound", f'configmaps "{key[1]}" not found'), status=404)
        if body.get("kind") != "ConfigMap" or body.get("metadata", {}).get("name") != key[1]:
            return web.json_response(status_body(400, "BadRequest", "name or kind mismatch"), status=400)
        current = self.configmaps[key]
        wanted = body["metadata"].get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            self.conflicts += 1
            message = (f'Operation cannot be fulfilled on configmaps "{key[1]}": the object has been modified; '
                       "please apply your changes to the latest version and try again")
            return web.json_response(status_body(409, "Conflict", message), status=409)
        obj = {"kind": "ConfigMap", "apiVersion": "v1",
               "metadata": {"name": key[1], "namespace": key[0]}, "data": dict(body.get("data") or {})}
        self._bump(obj)
        self.configmaps[key] = obj
        return web.json_response(obj)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/api/v1/nodes", self._nodes)
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", self._get_cm)
        app.router.add_put("/api/v1/namespaces/{ns}/configmaps/{name}", self._put_cm)
        return app


@asynccontextmanager
async def running(server: ApiServer) -> AsyncIterator[ApiServer]:
    runner = web.AppRunner(server.app(), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        server.drop_watches()
        await runner.cleanup()
