"""A small client for the daemon's local HTTP API, on the standard library only.

The CLI's client commands (``weaved status``, ``report``, ``connect``, ``forget``, ``ipam``, ``rmpeer``,
``reset``) are short-lived: stdlib ``http.client`` keeps them quick to start and free of the daemon's
dependencies. A :class:`Client` talks either to the read-only TCP port (:func:`api_address`) or to the
control socket (:func:`control_socket`, :meth:`Client.unix`), the only place the daemon accepts calls that
change it. Failures become one of two exceptions whose text is a single line for the operator:
:class:`DaemonUnreachable` (nothing answers, the usual case being that the daemon is not running, or the
socket is root's and we are not) and :class:`ApiError` (it answered, with an error).
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from weaved.config import DEFAULT_HTTP_ADDR, DEFAULT_STATE_DIR, api_socket_path, parse_host_port

TIMEOUT = 5.0
"""Seconds to wait for the daemon; it answers from memory, so anything longer means trouble."""
LEAVE_TIMEOUT = 30.0
"""Seconds to wait for ``reset``: the daemon writes its state and waits up to 10 s for the heir's answer."""
ALLOCATE_TIMEOUT = 60.0
"""Seconds to wait for an address: the first one waits for the peers to agree on the range, and the daemon
itself gives up after 30 s with the reason, which is better to show than a client-side timeout."""


class DaemonUnreachable(Exception):
    """Nothing usable answers at the API address."""


class ApiError(Exception):
    """The daemon answered with an error status; ``str()`` is its explanation."""


def api_address(flag: str | None, env: Mapping[str, str]) -> str:
    """``--api``, else ``WEAVE_HTTP_ADDR``, else the default; a wildcard bind address means this host.

    Returns ``host:port`` suitable for a URL. Raises :class:`~weaved.config.ConfigError` on a malformed address.
    """
    addr = parse_host_port(flag or env.get("WEAVE_HTTP_ADDR") or DEFAULT_HTTP_ADDR, 6784, "--api/WEAVE_HTTP_ADDR")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr.host, addr.host)
    return f"[{host}]:{addr.port}" if ":" in host else f"{host}:{addr.port}"


def control_socket(flag: str | None, env: Mapping[str, str]) -> Path:
    """``--api-socket``, else ``WEAVE_API_SOCKET``, else the daemon's default for ``WEAVE_STATE_DIR`` (the same
    rule as ``weaved run``'s). Raises :class:`~weaved.config.ConfigError` on a path too long for a socket."""
    return api_socket_path(flag or env.get("WEAVE_API_SOCKET", "").strip(),
                           env.get("WEAVE_STATE_DIR", "").strip() or DEFAULT_STATE_DIR)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix stream socket (the ``Host`` header says ``localhost``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Requests to the daemon at ``address``: ``host:port``, or a socket path with :meth:`unix`."""

    def __init__(self, address: str, timeout: float = TIMEOUT) -> None:
        self.address = address
        self._timeout = timeout
        self._socket: str | None = None

    @classmethod
    def unix(cls, path: str | Path, timeout: float = TIMEOUT) -> Client:
        """A client of the control socket at ``path``."""
        client = cls(str(path), timeout)
        client._socket = str(path)
        return client

    def _connection(self) -> http.client.HTTPConnection:
        if self._socket is not None:
            return _UnixConnection(self._socket, self._timeout)
        host, _, port = self.address.rpartition(":")
        return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self._timeout)

    def request(self, method: str, path: str, params: Mapping[str, str] | None = None) -> str:
        """The body of ``method path?params``; raises :class:`DaemonUnreachable` or :class:`ApiError`."""
        target = path + ("?" + urllib.parse.urlencode(params) if params else "")
        conn = self._connection()
        try:
            conn.request(method, target, body=b"" if method in ("POST", "PUT") else None)
            response = conn.getresponse()
            status, reason, body = response.status, response.reason, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnreachable(self._unreachable(exc)) from None
        finally:
            conn.close()
        text = body.decode("utf-8", errors="replace")
        if not 200 <= status < 300:
            raise ApiError(f"the daemon at {self.address} refused {method} {path}: {text.strip() or reason}")
        return text

    def _unreachable(self, exc: Exception) -> str:
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EACCES:
            return (f"permission denied on the weaved control socket {self.address}: calls that change the daemon "
                    "are root's; run this command as root (e.g. with sudo)")
        if isinstance(exc, TimeoutError):
            why = "timed out"
        elif isinstance(exc, OSError) and exc.strerror:
            why = exc.strerror
        else:
            why = str(exc) or type(exc).__name__
        where = "--api-socket / WEAVE_API_SOCKET" if self._socket is not None else "--api / WEAVE_HTTP_ADDR"
        return (f"cannot reach the weaved daemon at {self.address} ({why.lower()}): is it running? "
                f"Start it with 'weaved run', or point {where} at it")

    def report(self) -> dict[str, Any]:
        text = self.request("GET", "/report")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ApiError(f"{self.address} answered /report with something that is not JSON; "
                           "is it a weaved daemon?") from None
        if not isinstance(data, dict):
            raise ApiError(f"{self.address} answered /report with unexpected JSON")
        return data

    def connect(self, peer: str) -> str:
        return self.request("POST", "/connect", {"peer": peer})

    def forget(self, peer: str) -> str:
        return self.request("POST", "/forget", {"peer": peer})

    def allocate(self, container_id: str, ifname: str) -> str:
        """The container interface's address as a CIDR (the same one when asked again)."""
        return self.request("POST", f"/ip/{_segment(container_id)}", {"ifname": ifname}).strip()

    def claim(self, container_id: str, ifname: str, address: str) -> str:
        return self.request("PUT", f"/ip/{_segment(container_id)}/{_segment(address)}", {"ifname": ifname}).strip()

    def release(self, container_id: str) -> None:
        self.request("DELETE", f"/ip/{_segment(container_id)}")

    def leases(self) -> list[dict[str, str]]:
        text = self.request("GET", "/ip")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ApiError(f"{self.address} answered /ip with something that is not JSON") from None
        if not (isinstance(data, list) and all(isinstance(item, dict) for item in data)):
            raise ApiError(f"{self.address} answered /ip with unexpected JSON")
        return data

    def gateway(self) -> str:
        return self.request("GET", "/ipam/gateway").strip()

    def rmpeer(self, peer: str) -> str:
        return self.request("DELETE", f"/peer/{_segment(peer)}")

    def leave(self, force: bool = False) -> str:
        """Leave the IPAM ring for good (``weaved reset``); the daemon's one-line account of the hand-over."""
        return self.request("POST", "/ipam/leave", {"force": "true"} if force else None)


def _segment(text: str) -> str:
    """One path segment: container ids and nicknames may hold characters a URL path cannot."""
    return urllib.parse.quote(text, safe="")

