"""``weaved run``: the daemon around one :class:`~weaved.core.mesh.MeshPeer`.

Theory of operation
-------------------
One anyio task group on the asyncio backend holds everything:

* the **pump** (:meth:`Node.pump`, run by the host task): wait until the control socket is readable or
  the earliest ``next_deadline()`` of the mesh core and the IPAM allocator passed; feed the core what the
  kernel holds (``receive_datagram``, at most :data:`RECEIVE_BATCH` datagrams per wake-up so timers and the
  API get their turn) or, once a deadline passed, ``handle_timer``; then log the core's events and hand them
  to IPAM (its relay messages, peers joining and leaving), let IPAM commit (its state is written and
  fsync'd *before* its messages go to the mesh and its waiting API requests are answered: see
  :mod:`weaved.adapters.ipam`), and send whatever the core queued. The control socket is a plain
  non-blocking socket (see :mod:`weaved.adapters.udp` for why) that only the pump reads and writes; only
  this module reads the clock (``time.monotonic``), and passes ``now`` to the core and the allocator.
* the HTTP API (read-only on TCP, whole on the control socket: :mod:`weaved.adapters.api`) and the metrics
  server (aiohttp, each a task from :mod:`weaved.adapters.webserver`),
* a resolver for ``--peer`` host names, retrying those DNS cannot answer yet,
* the periodic ``mesh summary`` log line,
* the data path (:class:`~weaved.adapters.datapath.Datapath`, unless ``--no-datapath``): its packet
  threads, and a task that keeps the node network in place; the pump refreshes its forwarding snapshot
  after every step. On exit only its sockets close: bridge, TUN and routes stay for the next start;
* the signal watcher: SIGTERM/SIGINT make the core say goodbye to its neighbours; the pump sends the
  goodbyes and returns, and the group is cancelled, so the process exits 0 within milliseconds.

API handlers run on the same thread and call the core directly. When one adds a target, the next deadline
moves earlier, so it **wakes** the pump by cancelling the scope the pump waits in; the pump then re-reads
``next_deadline()`` and dials at once. An IPAM request wakes it the same way, to be committed at once. The
pump only waits for readability, so a cancelled wait loses nothing: the datagrams stay in the kernel's
receive buffer.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskStatus

import weaved
from weaved.adapters.api import control_app, status_app
from weaved.adapters.datapath import Datapath, DatapathError, advertised_chunk
from weaved.adapters.identity import IdentityError, load_identity
from weaved.adapters.ipam import IpamService, open_allocator
from weaved.adapters.logs import configure_logging, describe_event, describe_summary, emit
from weaved.adapters.metrics import metrics_app, metrics_registry
from weaved.adapters.password import PasswordError, secure_config
from weaved.adapters.resolve import ResolveError, resolve
from weaved.adapters.store import SnapshotStore, StoreError
from weaved.adapters.udp import MAX_DATAGRAM, RECEIVE_ERROR_PREFIX, DatagramSender, errno_name, open_control_socket
from weaved.adapters.webserver import ListenError, serve_app, serve_unix_app
from weaved.cni.service import CniSocketError, start_cni
from weaved.config import HostPort, Settings, describe_init
from weaved.core import superframe
from weaved.core.forwarding import sleeve_overlay
from weaved.core.ipam.allocator import Allocator
from weaved.core.mesh import MeshConfig, MeshPeer
from weaved.core.status import MeshStatus
from weaved.core.types import Endpoint, PeerIdentity, PeerName
from weaved.podnet import PodNetwork

SUMMARY_INTERVAL = 30.0
"""Seconds between ``mesh summary`` log lines."""

RESOLVE_RETRY_MIN = 1.0
RESOLVE_RETRY_MAX = 60.0

RECEIVE_BATCH = 256
"""Datagrams the pump reads per wake-up at most; the rest wait in the kernel's buffer for the next turn."""


class StartupError(Exception):
    """The daemon cannot start (port taken, unusable state directory); ``str()`` is one line."""


class Node:
    """Owns the core, the allocator and the control socket; implements
    :class:`~weaved.adapters.api.MeshControl` (and its :attr:`ipam` the API's ``IpamControl``)."""

    def __init__(self, peer: MeshPeer, sock: socket.socket, allocator: Allocator, store: SnapshotStore, *,
                 nicknames: dict[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``sock`` is the bound, non-blocking control socket (:func:`~weaved.adapters.udp.open_control_socket`);
        the caller closes it after :meth:`pump` returned. ``allocator`` and ``nicknames`` come from
        :func:`~weaved.adapters.ipam.open_allocator` over ``store``."""
        self.peer = peer
        self._sock = sock
        self._clock = clock
        self._log = structlog.get_logger("weaved")
        self.counters: Counter[str] = Counter()
        """The daemon's own counts (send/receive errors, internal errors), merged into the status snapshot."""
        self._sender = DatagramSender(sock, self.counters, self._log)
        self._wake_scope: anyio.CancelScope | None = None
        self._ready = False
        self._stopping = False
        self.ipam = IpamService(allocator, store, peer.identity.nickname, nicknames=nicknames, clock=clock,
                                wake=self.wake)
        self.datapath: Datapath | None = None
        """The node network and sleeve (:mod:`weaved.adapters.datapath`); None with ``--no-datapath``. Its
        forwarding snapshot is refreshed after every pump step."""

    def pod_network(self) -> PodNetwork | None:
        """Bridge, gateway and MTU for pod interfaces (the CNI handler's input); None until the bridge holds
        the gateway address, and always None without the data path."""
        return self.datapath.pod_network() if self.datapath is not None else None

    # --- MeshControl (the API's view) -------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._ready

    def snapshot(self) -> MeshStatus:
        status = self.peer.status(self._clock())
        return dataclasses.replace(status, counters={**status.counters, **self.counters}, ready=self._ready)

    async def connect(self, peer: HostPort) -> list[Endpoint]:
        endpoints = await resolve(peer)
        for endpoint in endpoints:
            self.peer.add_target(endpoint, self._clock())
        self.wake()
        return endpoints

    async def forget(self, peer: HostPort) -> list[Endpoint]:
        endpoints = await resolve(peer)
        for endpoint in endpoints:
            self.peer.forget_target(endpoint)
        return endpoints

    # --- lifecycle --------------------------------------------------------------------------------

    def set_ready(self) -> None:
        self._ready = True

    def wake(self) -> None:
        """Make the pump re-read the core's deadline (after something moved it earlier)."""
        if self._wake_scope is not None:
            self._wake_scope.cancel()

    def stop(self) -> None:
        """Leave the mesh: the core queues goodbyes, the pump sends them and returns."""
        if self._stopping:
            return
        self._stopping = True
        self.peer.leave(self._clock())
        self.wake()

    # --- the pump ---------------------------------------------------------------------------------

    async def pump(self) -> None:
        """Drive the core until :meth:`stop`; the one place that feeds it datagrams and timers."""
        while not self._stopping:
            now = self._clock()
            deadline = min((d for d in (self.peer.next_deadline(), self.ipam.next_deadline()) if d is not None),
                           default=None)
            if self.ipam.needs_commit:
                await anyio.lowlevel.checkpoint()  # an API call changed IPAM: commit it before sleeping
            elif deadline is not None and deadline <= now:
                self._handle_timers(now)
                await anyio.lowlevel.checkpoint()  # a run of overdue timers must not starve the API
            elif await self._readable_within(math.inf if deadline is None else deadline - now):
                self._drain()
            await self._flush()
        await self._flush()  # the goodbyes queued by leave()

    def _handle_timers(self, now: float) -> None:
        deadline = self.peer.next_deadline()
        if deadline is not None and deadline <= now:
            self.peer.handle_timer(now)
        self.ipam.handle_timer(now)

    async def _readable_within(self, timeout: float) -> bool:
        """Wait for a datagram to arrive, for ``timeout`` seconds at most or until :meth:`wake`."""
        with anyio.move_on_after(timeout) as scope:
            self._wake_scope = scope
            try:
                await anyio.wait_readable(self._sock)
                return True
            finally:
                self._wake_scope = None
        return False

    def _drain(self) -> None:
        """Feed the core the datagrams the kernel holds, :data:`RECEIVE_BATCH` at most."""
        for _ in range(RECEIVE_BATCH):
            try:
                data, address = self._sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # not expected on an unconnected socket; counted rather than fatal
                self.counters[RECEIVE_ERROR_PREFIX + errno_name(exc)] += 1
                return
            self._deliver(data, (str(address[0]), int(address[1])))

    def _deliver(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            source = Endpoint(*address)
        except ValueError:
            self.counters["dropped_bad-source"] += 1
            return
        try:
            self.peer.receive_datagram(data, source, self._clock())
        except Exception:
            # A datagram from the network must never take the daemon down, even through a core bug.
            self.counters["internal_errors"] += 1
            self._log.exception("core failed on a datagram", address=str(source), size=len(data))

    async def _flush(self) -> None:
        for event in self.peer.events():
            emit(self._log, describe_event(event))
            self.ipam.on_event(event, self._reachable)
        await self.ipam.commit(self.peer.send_relay)
        for data, destination in self.peer.datagrams_to_send():
            await self._sender.send(data, destination)
        if self.datapath is not None:
            self.datapath.refresh()

    def _reachable(self) -> set[PeerName]:
        """The peers the mesh has a route to now (we are never among them)."""
        return set(self.peer.topology.next_hops()) - {self.peer.identity.name}

    # --- helper tasks -----------------------------------------------------------------------------

    async def resolve_peers(self, peers: tuple[HostPort, ...]) -> None:
        """Add ``--peer`` targets; names DNS cannot answer yet are retried with backoff."""
        pending, delay = list(peers), RESOLVE_RETRY_MIN
        while pending:
            unresolved = []
            for peer in pending:
                try:
                    endpoints = await resolve(peer)
                except ResolveError as exc:
                    self._log.warning("cannot resolve peer", peer=str(peer), error=str(exc), retry_in=delay)
                    unresolved.append(peer)
                    continue
                for endpoint in endpoints:
                    self.peer.add_target(endpoint, self._clock())
                self.wake()
            pending = unresolved
            if pending:
                await anyio.sleep(delay)
                delay = min(delay * 2, RESOLVE_RETRY_MAX)

    async def log_summaries(self, interval: float = SUMMARY_INTERVAL) -> None:
        while True:
            await anyio.sleep(interval)
            emit(self._log, describe_summary(self.snapshot()))

    async def watch_signals(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                self._log.info("leaving the mesh", signal=signal.Signals(signum).name)
                self.stop()
                return


async def serve(settings: Settings, identity: PeerIdentity, clock: Callable[[], float] = time.monotonic, *,
                pod_network: Callable[[], PodNetwork | None] | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT; raises :class:`StartupError` or :class:`ListenError` early on.

    ``pod_network`` replaces :meth:`Node.pod_network` for the CNI handler (tests bring their own bridge)."""
    log = structlog.get_logger("weaved")
    try:
        secure, password_source = secure_config(settings)
    except PasswordError as exc:
        raise StartupError(str(exc)) from None
    store = SnapshotStore(settings.state_dir)
    try:
        allocator, nicknames = open_allocator(identity.name, settings.ipalloc_range, settings.ipalloc_init, store,
                                              random.Random())
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    try:
        sock = open_control_socket(settings.host, settings.port)
    except OSError as exc:
        raise StartupError(f"cannot bind UDP {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    with sock:
        # Without the data path we carry no packets, so we advertise no overlay: peers route around us.
        overlays: tuple[str, ...] = (sleeve_overlay(settings.sleeve_port),) if settings.datapath else ()
        if settings.datapath and settings.offload:
            # We take version-2 frames (virtio headers, super-packets) in chunks as big as our underlay carries.
            overlays += (superframe.overlay(advertised_chunk()),)
        # SystemRandom: the mesh draws its connection tokens from it, which must not be predictable.
        peer = MeshPeer(identity, MeshConfig(port=settings.port, conn_limit=settings.conn_limit, overlays=overlays),
                        random.SystemRandom(), now=clock(), initial_version=int(time.time() * 1000),
                        secure=secure)
        node = Node(peer, sock, allocator, store, nicknames=nicknames, clock=clock)
        if settings.datapath:
            node.datapath = Datapath(settings, peer, node.ipam)
        datapath_report = node.datapath.report if node.datapath is not None else None
        registry = metrics_registry(node.snapshot, node.ipam.report, datapath_report)
        log.info("weaved starting", version=weaved.__version__, name=identity.name, nickname=identity.nickname,
                 short_id=identity.short_id, port=settings.port, peers=",".join(map(str, settings.peers)) or "-",
                 ipalloc_range=str(settings.ipalloc_range), ipalloc_init=describe_init(settings.ipalloc_init),
                 ipam=node.ipam.report().state, encryption="enabled" if secure else "disabled",
                 password=password_source,
                 trusted_subnets=",".join(map(str, settings.trusted_subnets)) or "none")
        async with anyio.create_task_group() as tg:
            await tg.start(node.watch_signals)
            await tg.start(serve_app, status_app(node, registry, node.ipam, datapath_report,
                                                 socket_path=str(settings.api_socket)),
                           settings.http_addr, "the HTTP API")
            await tg.start(serve_unix_app, control_app(node, registry, node.ipam, datapath_report),
                           settings.api_socket, "the control API")
            await tg.start(serve_app, metrics_app(registry), settings.metrics_addr, "metrics")
            if node.datapath is not None:  # after the ports: a daemon that cannot start changes no device
                await tg.start(node.datapath.run)
            await start_cni(tg, settings, node.ipam, pod_network or node.pod_network)
            node.set_ready()
            log.info("weaved ready", http=str(settings.http_addr), api_socket=str(settings.api_socket),
                     metrics=str(settings.metrics_addr))
            tg.start_soon(node.resolve_peers, settings.peers)
            tg.start_soon(node.log_summaries)
            if settings.kube is not None:  # Node discovery and reclaim (weaved.k8s)
                tg.start_soon(_run_kube, settings, node)
            await node.pump()
            tg.cancel_scope.cancel()
    log.info("weaved stopped")


async def _run_kube(settings: Settings, node: Node) -> None:
    """The Kubernetes task (:mod:`weaved.k8s.agent`); imported here only when it runs."""
    import os

    from weaved.k8s.agent import api_config, run_kube
    from weaved.k8s.client import KubeError

    assert settings.kube is not None
    try:
        config = api_config(settings.kube, os.environ)
    except KubeError as exc:
        structlog.get_logger("weaved").error("kubernetes mode off", error=str(exc))
        return
    await run_kube(settings.kube, config, node, node.ipam, node.peer.identity.name, settings.port)


def _startup_errors(group: BaseExceptionGroup[Any]) -> list[str]:
    messages: list[str] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            messages += _startup_errors(exc)
        else:
            messages.append(str(exc))
    return messages


def run(settings: Settings) -> int:
    """The ``weaved run`` command: exit status 0 after a clean leave, 1 when it cannot start."""
    configure_logging(settings.log_format, settings.log_level)
    log = structlog.get_logger("weaved")
    try:
        identity = load_identity(settings.state_dir, settings.nickname)
    except IdentityError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    failures: list[str] = []
    interrupted = False
    try:
        anyio.run(serve, settings, identity, backend="asyncio")
    except* (StartupError, ListenError, CniSocketError, DatapathError) as group:  # a bare one comes wrapped too
        failures += _startup_errors(group)
    except* KeyboardInterrupt:  # Ctrl-C before the signal watcher was installed
        interrupted = True
    for message in failures:
        log.error("cannot start", error=message)
    if failures:
        return 1
    return 130 if interrupted else 0
