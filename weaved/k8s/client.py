"""A small Kubernetes API client on aiohttp: list and watch Nodes, read and replace one ConfigMap.

Theory of operation
-------------------
weaved needs four calls, so it speaks the API's HTTP directly rather than pulling in a client library:

* ``GET /api/v1/nodes`` → the items and the list's ``resourceVersion``;
* ``GET /api/v1/nodes?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=N`` → a stream of
  newline-delimited JSON events ``{"type": ..., "object": ...}``. An ``ERROR`` event carrying a Status with
  code 410, or an HTTP 410, means RV is too old: :class:`Gone`, the caller lists again;
* ``GET`` and ``PUT /api/v1/namespaces/NS/configmaps/NAME``; the PUT carries the ``resourceVersion`` read,
  and the API server answers 409 (:class:`Conflict`) if someone wrote in between: optimistic concurrency.

Credentials are the pod's service account (:meth:`KubeConfig.in_cluster`). The token file is read again
for every request, because the kubelet rotates bound tokens in place. Every failure is a
:class:`KubeError` with one readable line (the Status ``message`` when the server sent one); the callers
decide to retry.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT = 30.0
"""Seconds a plain request (list, get, put) may take."""
WATCH_TIMEOUT = 300
"""``timeoutSeconds`` asked of a watch: the server ends it cleanly after this long and we watch again."""
MAX_EVENT_BYTES = 32 << 20
"""Largest watch event line accepted (a Node with many images runs to hundreds of KiB, not MiBs)."""


class KubeError(Exception):
    """The API server refused or could not be reached; ``str()`` is one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Conflict(KubeError):
    """409: the object changed since we read it (or already exists)."""


class Gone(KubeError):
    """410: the resourceVersion we watch from is too old; list again."""


class NotFound(KubeError):
    """404: no such object."""


@dataclass(frozen=True, slots=True)
class KubeConfig:
    """Where the API server is and how to prove who we are."""

    server: str
    """``https://host:port`` (or ``http://`` for a test double)."""
    token_path: Path | None = None
    ca_path: Path | None = None

    @classmethod
    def in_cluster(cls, env: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
        """The pod's view: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the mounted service account."""
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if not host:
            raise KubeError("not in a cluster: KUBERNETES_SERVICE_HOST is not set")
        if ":" in host:
            host = f"[{host}]"
        ca = account_dir / "ca.crt"
        return cls(f"https://{host}:{port}", account_dir / "token", ca if ca.exists() else None)


def _status_message(body: bytes, status: int) -> str:
    """The ``message`` of a Kubernetes Status body, else the start of whatever came."""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
            return str(parsed["message"])
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"


def _error(status: int, message: str) -> KubeError:
    kind = {409: Conflict, 410: Gone, 404: NotFound}.get(status, KubeError)
    return kind(f"HTTP {status}: {message}", status)


class KubeClient:
    """Use as ``async with KubeClient(config) as client``; one HTTP session for the daemon's life."""

    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        ssl_context: ssl.SSLContext | bool = True
        if self.config.ca_path is not None:
            ssl_context = ssl.create_default_context(cafile=str(self.config.ca_path))
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.config.token_path is not None:
            try:
                token = self.config.token_path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise KubeError(f"cannot read the service account token {self.config.token_path}: "
                                f"{exc.strerror or exc}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeClient used outside 'async with'")
        return self._session

    async def _call(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                    body: Any = None) -> Any:
        url = self.config.server + path
        try:
            async with self.session.request(method, url, params=params, json=body, headers=self._headers(),
                                            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _error(resp.status, _status_message(raw, resp.status))
                return json.loads(raw)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # a body that is not JSON
            raise KubeError(f"{method} {path}: not JSON ({exc})") from None

    # --- Nodes ------------------------------------------------------------------------------------

    async def list_nodes(self) -> tuple[list[Any], str]:
        """Every Node, and the resourceVersion to watch from."""
        reply = await self._call("GET", "/api/v1/nodes")
        items = reply.get("items") if isinstance(reply, dict) else None
        version = reply.get("metadata", {}).get("resourceVersion") if isinstance(reply, dict) else None
        if not isinstance(items, list) or not isinstance(version, str):
            raise KubeError("GET /api/v1/nodes: not a NodeList")
        return items, version

    async def watch_nodes(self, resource_version: str,
                          timeout_seconds: int = WATCH_TIMEOUT) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Node events after ``resource_version`` as ``(type, object)``, BOOKMARKs included; ends when
        the server closes the watch. Raises :class:`Gone` when the version expired."""
        params = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT, sock_read=timeout_seconds + 30)
        try:
            async with self.session.get(self.config.server + "/api/v1/nodes", params=params,
                                        headers=self._headers(), timeout=timeout) as resp:
                if resp.status >= 400:
                    raise _error(resp.status, _status_message(await resp.read(), resp.status))
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            yield _watch_event(line)
                    if len(buffer) > MAX_EVENT_BYTES:
                        raise KubeError(f"watch event larger than {MAX_EVENT_BYTES} bytes")
                if buffer.strip():
                    yield _watch_event(buffer)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(f"watch /api/v1/nodes: {type(exc).__name__}: {exc}") from None

    # --- ConfigMaps -------------------------------------------------------------------------------

    @staticmethod
    def _configmap_path(namespace: str, name: str) -> str:
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/configmaps/{quote(name, safe='')}"

    async def get_configmap(self, namespace: str, name: str) -> tuple[dict[str, str], str]:
        """The ConfigMap's ``data`` (empty if it has none) and its resourceVersion."""
        reply = await self._call("GET", self._configmap_path(namespace, name))
        metadata = reply.get("metadata") if isinstance(reply, dict) else None
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        data = reply.get("data") or {}
        if not isinstance(version, str) or not isinstance(data, dict):
            raise KubeError(f"configmap {namespace}/{name}: not a ConfigMap")
        return {str(k): str(v) for k, v in data.items()}, version

    async def replace_configmap(self, namespace: str, name: str, data: Mapping[str, str],
                                resource_version: str) -> str:
        """Write ``data`` if the ConfigMap is still at ``resource_version`` (else :class:`Conflict`);
        returns the new resourceVersion."""
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": resource_version},
                "data": dict(data)}
        reply = await self._call("PUT", self._configmap_path(namespace, name), body=body)
        version = reply.get("metadata", {}).get("resourceVersion") if isinstance(reply, dict) else None
        if not isinstance(version, str):
            raise KubeError(f"configmap {namespace}/{name}: PUT answered without a resourceVersion")
        return version


def _watch_event(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise KubeError(f"watch sent a line that is not JSON ({exc})") from None
    kind, obj = (event.get("type"), event.get("object")) if isinstance(event, dict) else (None, None)
    if not isinstance(kind, str) or not isinstance(obj, dict):
        raise KubeError("watch sent an event without type or object")
    if kind == "ERROR":
        code = obj.get("code")
        message = str(obj.get("message") or obj.get("reason") or "watch error")
        raise _error(code if isinstance(code, int) else 500, message)
    return kind, obj
