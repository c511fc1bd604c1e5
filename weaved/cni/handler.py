"""What each CNI command does in the daemon: ADD, DEL, CHECK, STATUS, GC, and the spool of pending releases.

Theory of operation
-------------------
:meth:`CniHandler.handle` takes one forwarded invocation (environment, stdin bytes, the pod's netns fd or
None) and returns (exit status, stdout bytes) for the forwarder to copy out. Parsing and rendering are pure
(:mod:`weaved.cni.spec`); here is the I/O around them:

* addresses come from the daemon's :class:`~weaved.adapters.ipam.IpamService` (or from a delegated IPAM
  plugin when the configuration names one, :mod:`weaved.cni.delegate`);
* the node's pod network (bridge, gateway, MTU) comes from a provider callable, ``None`` until the node
  network is up: ADD then fails with error 11 and IPAM's state, STATUS with 50;
* interfaces are made by :mod:`weaved.cni.links` in worker threads.

Commands for one container id run one at a time (a lock per id), so a DEL cannot overtake the ADD it
undoes. An ADD that fails half-way gives its address back. DEL is idempotent: no veth, no netns or no lease
is not an error. IPAM waits are bounded by the configuration's ``ipamTimeoutSeconds``; a request that
times out is withdrawn (released) so the address is not handed out to nobody later.

The spool (:meth:`CniHandler.process_spool`) holds releases the forwarder recorded while the daemon was
down: one file per container id. Each is processed once the daemon runs (at start and every
:data:`SPOOL_INTERVAL` seconds): its host veths (found by their alias) are removed and its lease released,
then the file is deleted. A file that cannot be understood is renamed ``.bad-<name>`` and logged, not lost.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import anyio
import structlog

from weaved.adapters.ipam import IpamService
from weaved.cni import links
from weaved.cni.delegate import run_ipam
from weaved.cni.nsenter import is_netns
from weaved.cni.spec import (
    CONTAINER_ID_RE,
    E_CHECK,
    E_INTERFACE,
    E_INTERNAL,
    E_IPAM,
    E_NOT_AVAILABLE,
    E_TRY_AGAIN,
    E_UNKNOWN_CONTAINER,
    LATEST,
    SUPPORTED_VERSIONS,
    Attachment,
    CniError,
    Request,
    Route,
    error_version,
    host_veth_name,
    parse_request,
    parse_result,
    render_result,
    veth_alias,
)
from weaved.core.ipam.allocator import AllocError
from weaved.podnet import PodNetwork

SPOOL_INTERVAL = 30.0
"""Seconds between scans of the spool directory (it is also scanned at start)."""
DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")

PodNetworkProvider = Callable[[], PodNetwork | None]


def _need_netns(request: Request, netns_fd: int | None) -> int:
    if netns_fd is None:
        raise CniError(E_UNKNOWN_CONTAINER, "the pod's network namespace does not exist",
                       f"cannot open CNI_NETNS={request.netns}")
    if not is_netns(netns_fd):
        raise CniError(E_UNKNOWN_CONTAINER, "CNI_NETNS is not a network namespace", request.netns)
    return netns_fd


class CniHandler:
    """Serves forwarded CNI invocations against one IPAM service and one node network."""

    def __init__(self, ipam: IpamService, pod_network: PodNetworkProvider, spool_dir: Path) -> None:
        self._ipam = ipam
        self._pod_network = pod_network
        self.spool_dir = spool_dir
        self._locks: dict[str, anyio.Lock] = {}
        self._log = structlog.get_logger("weaved")
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # --- entry point ----------------------------------------------------------------------------------

    async def handle(self, env: dict[str, str], stdin: bytes, netns_fd: int | None) -> tuple[int, bytes]:
        version = LATEST
        try:
            with contextlib.suppress(ValueError, AttributeError, UnicodeDecodeError):
                version = error_version(json.loads(stdin).get("cniVersion"))
            request = parse_request(env, stdin)
            version = request.conf.cni_version
            lock = self._locks.setdefault(request.container_id, anyio.Lock())
            try:
                async with lock:
                    out = await self._dispatch(request, stdin, netns_fd)
            finally:
                if not lock.locked() and not lock.statistics().tasks_waiting:
                    self._locks.pop(request.container_id, None)
            self._count(f"{request.command.lower()}_ok")
            return 0, out
        except CniError as exc:
            self._count(f"{env.get('CNI_COMMAND', '?').lower()}_error")
            self._log.warning("cni request failed", command=env.get("CNI_COMMAND"),
                              container=env.get("CNI_CONTAINERID"), code=exc.code, error=str(exc))
            return 1, (json.dumps(exc.to_json(version)) + "\n").encode()
        except Exception as exc:
            self._count("internal_errors")
            self._log.exception("cni request crashed", command=env.get("CNI_COMMAND"))
            error = CniError(E_INTERNAL, "weaved internal error", f"{type(exc).__name__}: {exc}"[:400])
            return 1, (json.dumps(error.to_json(version)) + "\n").encode()

    async def _dispatch(self, request: Request, stdin: bytes, netns_fd: int | None) -> bytes:
        match request.command:
            case "ADD":
                return await self.add(request, stdin, netns_fd)
            case "DEL":
                await self.delete(request, stdin, netns_fd)
            case "CHECK":
                await self.check(request, stdin, netns_fd)
            case "STATUS":
                await self.status(request, stdin)
            case "GC":
                await self.gc(request, stdin)
            case "VERSION":  # the forwarder answers it; a direct client may still ask
                answer = {"cniVersion": LATEST, "supportedVersions": list(SUPPORTED_VERSIONS)}
                return (json.dumps(answer) + "\n").encode()
        return b""

    def _network(self) -> PodNetwork:
        net = self._pod_network()
        if net is None:
            raise CniError(E_TRY_AGAIN, f"weaved has no pod network yet: IPAM {self._ipam.report().state}",
                           "the node network comes up once IPAM is ready; the runtime will retry")
        return net

    # --- ADD ------------------------------------------------------------------------------------------

    async def add(self, request: Request, stdin: bytes, netns_fd: int | None) -> bytes:
        net = self._network()
        netns_fd = _need_netns(request, netns_fd)
        gateway: IPv4Address | None = net.gateway.ip
        dns: dict[str, object] = dict(request.conf.raw.get("dns") or {})
        if request.conf.ipam is not None:
            parsed = parse_result(json.loads(await run_ipam(request, "ADD", stdin)))
            if not parsed.addresses:
                await self._undo_ipam(request, stdin)
                raise CniError(E_IPAM, "the IPAM plugin returned no IPv4 address")
            address, ipam_gw, _ = parsed.addresses[0]
            gateway = ipam_gw or gateway
            dns = dict(parsed.dns) or dns
        else:
            address = IPv4Interface(f"{await self._allocate(request)}/{net.gateway.network.prefixlen}")
        host_ifname = host_veth_name(request.container_id, request.ifname)
        mtu = request.conf.mtu or net.mtu
        try:
            host_mac, pod_mac = await anyio.to_thread.run_sync(
                links.attach, netns_fd, host_ifname, veth_alias(request.container_id, request.ifname),
                request.ifname, net.bridge, mtu, address, gateway, request.conf.hairpin)
        except links.LinkError as exc:
            await self._undo_ipam(request, stdin)
            raise CniError(E_INTERFACE, "cannot set up the pod interface", str(exc)) from None
        except OSError as exc:
            await self._undo_ipam(request, stdin)
            raise CniError(E_UNKNOWN_CONTAINER, "cannot enter the pod's network namespace", str(exc)) from None
        self._log.info("cni add", container=request.container_id, ifname=request.ifname, address=str(address),
                       veth=host_ifname)
        routes = (Route(DEFAULT_ROUTE, gateway),) if gateway is not None else ()
        att = Attachment(host_ifname, host_mac, request.ifname, pod_mac, request.netns, address, gateway, mtu,
                         routes, dns)
        return (json.dumps(render_result(request.conf.cni_version, att)) + "\n").encode()

    async def _allocate(self, request: Request) -> IPv4Address:
        lease = None
        try:
            with anyio.move_on_after(request.conf.ipam_timeout):
                lease = await self._ipam.allocate(request.container_id, request.ifname)
        except AllocError as exc:
            code = E_TRY_AGAIN if exc.code in ("timeout", "store") else E_IPAM
            raise CniError(code, f"no address from weaved IPAM ({exc.code})", str(exc)) from None
        if lease is None:
            # Withdraw the waiting request, so the address is not leased to a container that gave up.
            await self._release(request.container_id)
            raise CniError(E_TRY_AGAIN, "no address from weaved IPAM in time: try again later",
                           f"IPAM {self._ipam.report().state}; waited {request.conf.ipam_timeout:g}s")
        return IPv4Address(lease.ip())

    async def _release(self, container_id: str) -> None:
        try:
            await self._ipam.release(container_id)
        except AllocError as exc:
            raise CniError(E_TRY_AGAIN, "cannot release the address now", str(exc)) from None

    async def _undo_ipam(self, request: Request, stdin: bytes) -> None:
        try:
            if request.conf.ipam is not None:
                await run_ipam(request, "DEL", stdin)
            else:
                await self._release(request.container_id)
        except CniError as exc:
            self._log.warning("cannot undo the address of a failed add", container=request.container_id,
                              error=str(exc))

    # --- DEL ------------------------------------------------------------------------------------------

    async def delete(self, request: Request, stdin: bytes, netns_fd: int | None) -> None:
        host_ifname = host_veth_name(request.container_id, request.ifname)
        if netns_fd is not None and not is_netns(netns_fd):
            netns_fd = None
        try:
            await anyio.to_thread.run_sync(links.detach, netns_fd, host_ifname, request.ifname)
        except links.LinkError as exc:
            raise CniError(E_INTERFACE, "cannot remove the pod interface", str(exc)) from None
        except OSError:
            # The fd is not a usable netns any more: remove the host end, which takes the peer with it.
            await anyio.to_thread.run_sync(links.detach, None, host_ifname, request.ifname)
        if request.conf.ipam is not None:
            await run_ipam(request, "DEL", stdin)
        else:
            await self._release(request.container_id)
        (self.spool_dir / request.container_id).unlink(missing_ok=True)
        self._log.info("cni del", container=request.container_id, ifname=request.ifname)

    # --- CHECK ----------------------------------------------------------------------------------------

    async def check(self, request: Request, stdin: bytes, netns_fd: int | None) -> None:
        net = self._network()
        netns_fd = _need_netns(request, netns_fd)
        assert request.conf.prev_result is not None
        prev = parse_result(request.conf.prev_result)
        mine = [a for a in prev.addresses if a[2] in (request.ifname, None)]
        if not mine:
            raise CniError(E_CHECK, f"prevResult has no IPv4 address for {request.ifname}")
        address, gateway, _ = mine[0]
        try:
            pod = await anyio.to_thread.run_sync(links.pod_side, netns_fd, request.ifname)
        except OSError as exc:
            raise CniError(E_UNKNOWN_CONTAINER, "cannot enter the pod's network namespace", str(exc)) from None
        host_ifname = host_veth_name(request.container_id, request.ifname)
        host = await anyio.to_thread.run_sync(links.host_side, host_ifname)
        mtu = request.conf.mtu or net.mtu
        problems = []
        if pod is None:
            problems.append(f"{request.ifname} is missing in the pod")
        else:
            if address not in pod.addresses:
                problems.append(f"{request.ifname} lacks {address} (has {', '.join(map(str, pod.addresses)) or '-'})")
            if gateway is not None and pod.default_gw != gateway:
                problems.append(f"default route via {pod.default_gw}, want {gateway}")
            if pod.mtu != mtu:
                problems.append(f"{request.ifname} mtu {pod.mtu}, want {mtu}")
            if not pod.up:
                problems.append(f"{request.ifname} is down")
        if host is None:
            problems.append(f"host veth {host_ifname} is missing")
        else:
            if host.master != net.bridge:
                problems.append(f"{host_ifname} is attached to {host.master or 'nothing'}, want {net.bridge}")
            if request.conf.hairpin and not host.hairpin:
                problems.append(f"hairpin mode is off on {host_ifname}")
            if not host.up:
                problems.append(f"{host_ifname} is down")
        if request.conf.ipam is not None:
            await run_ipam(request, "CHECK", stdin)
        elif not any(lease.container_id == request.container_id and lease.ifname == request.ifname
                     and IPv4Address(lease.ip()) == address.ip for lease in self._ipam.leases()):
            problems.append(f"weaved IPAM holds no lease of {address.ip} for {request.container_id}")
        if problems:
            raise CniError(E_CHECK, "the pod's network differs from what ADD set up", "; ".join(problems))

    # --- STATUS and GC --------------------------------------------------------------------------------

    async def status(self, request: Request, stdin: bytes) -> None:
        if self._ipam.removed or self._pod_network() is None:
            raise CniError(E_NOT_AVAILABLE, f"weaved cannot add pods now: IPAM {self._ipam.report().state}",
                           "no pod network yet" if not self._ipam.removed else "")
        if request.conf.ipam is not None:
            await run_ipam(request, "STATUS", stdin)

    async def gc(self, request: Request, stdin: bytes) -> None:
        assert request.conf.valid_attachments is not None
        valid = set(request.conf.valid_attachments)
        valid_ids = {cid for cid, _ in valid}
        stale = [v for v in await anyio.to_thread.run_sync(links.our_veths) if (v[1], v[2]) not in valid]
        for host_ifname, container_id, ifname in stale:
            await anyio.to_thread.run_sync(links.delete_host, host_ifname)
            if container_id not in valid_ids and request.conf.ipam is None:
                await self._release(container_id)
            self._log.info("cni gc", container=container_id, ifname=ifname, veth=host_ifname)
        if request.conf.ipam is not None:
            await run_ipam(request, "GC", stdin)

    # --- spool ----------------------------------------------------------------------------------------

    async def process_spool(self) -> int:
        """Carry out the releases recorded while the daemon was down; returns how many were done."""
        try:
            names = sorted(os.listdir(self.spool_dir))
        except FileNotFoundError:
            return 0
        done = 0
        for name in names:
            if name.startswith("."):
                continue
            path = self.spool_dir / name
            if not CONTAINER_ID_RE.match(name):
                path.rename(self.spool_dir / f".bad-{name}")
                self._log.error("unreadable cni spool entry set aside", path=str(path))
                continue
            lock = self._locks.setdefault(name, anyio.Lock())
            async with lock:
                for host_ifname, container_id, _ in await anyio.to_thread.run_sync(links.our_veths):
                    if container_id == name:
                        await anyio.to_thread.run_sync(links.delete_host, host_ifname)
                try:
                    await self._release(name)
                except CniError as exc:
                    self._log.warning("cni spool release postponed", container=name, error=str(exc))
                    continue
                path.unlink(missing_ok=True)
            done += 1
            self._log.info("cni pending release done", container=name)
        return done
