"""The allocator's I/O half: persistence before anything leaves, API requests that wait, mesh input.

Theory of operation
-------------------
One :class:`~weaved.core.ipam.allocator.Allocator` per daemon, driven from two sides on the daemon's one
thread:

* the **pump** (:class:`~weaved.adapters.daemon.Node`) feeds it mesh events (:meth:`IpamService.on_event`:
  IPAM relay messages, peers joining, leaving and restarting) and timers (:meth:`IpamService.handle_timer`),
  then calls :meth:`IpamService.commit` after every step;
* the **HTTP API** calls :meth:`IpamService.allocate`, :meth:`~IpamService.release`,
  :meth:`~IpamService.claim` and :meth:`~IpamService.rmpeer`, which change the allocator at once and then
  wait for the pump to commit.

:meth:`IpamService.commit` is where the allocator's durability rule is kept: while the allocator is dirty,
its snapshot is written to ``STATE_DIR/ipam.msgpack`` and fsync'd (in a worker thread, so the event loop
keeps serving); only once a write finished with nothing changed in the meantime are its messages handed to
the mesh and its finished requests answered. Between that check and the hand-over there is no ``await``,
so a change made by an API handler during the write is never sent or answered before it is on disk. A
write that fails holds everything back (nothing is sent, nobody is answered) and is retried every
:data:`STORE_RETRY` seconds; waiting requests fail with the store's error once their time is up.

Handlers that change state without a completion (claim, release, rmpeer, leave) wait for a write that
*started* after their change (:meth:`IpamService._until_durable`), so their answer, too, never precedes the disk.

**Leaving for good** (:meth:`IpamService.leave`, ``weaved reset``): the allocator hands every range to a live
heir; the hand-over is on disk before the ring carrying it is sent (the rule above), so a crash right after
restarts owning nothing, never owning what the heir may already give out. The call then waits up to
:data:`LEAVE_CONFIRM_TIMEOUT` for the heir's answer. Only this call hands anything over: stopping or
restarting the daemon keeps every range and lease, as it must for containers that outlive a restart.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from random import Random

import anyio
import structlog

from weaved.adapters.ipam_report import IpamOwner, IpamReport
from weaved.adapters.store import MAX_NICKNAMES, SnapshotStore, Stored, StoreError
from weaved.core.events import MeshEvent, PeerJoined, PeerLeft, PeerRestarted, RelayDelivered
from weaved.core.ipam.allocator import (
    CHANNEL,
    Allocated,
    AllocationFailed,
    Allocator,
    AllocError,
    Completion,
    Departure,
    Lease,
)
from weaved.core.ipam.ring import AddressRange, valid_peer_name
from weaved.core.ipam.seeding import InitMode
from weaved.core.types import PeerName
from weaved.core.wire import MAX_DATAGRAM

RELAY_OVERHEAD = 128
"""Bytes a RELAY datagram adds around its payload, rounded up: envelope, sender, uid, src, dst, a channel
name of up to 32 characters, ttl and the payload's length header come to under 90."""
MAX_MESSAGE = MAX_DATAGRAM - RELAY_OVERHEAD
"""Largest IPAM message that still fits one control datagram; a larger one is counted, logged, not sent."""
STORE_RETRY = 1.0
"""Seconds between attempts to write the state file after a failure."""
ANSWER_GRACE = 5.0
"""How much longer than the allocator's own deadline a request waits (for a store that cannot write)."""
LEAVE_CONFIRM_TIMEOUT = 10.0
"""How long ``leave`` waits for the heir's confirmation before answering that it is still pending (the
allocator keeps re-sending the hand-over while the daemon runs)."""
LOG_REPEAT = 60.0
"""A refusal of the same kind from the same peer is logged at most once per this many seconds."""
MAX_LOGGED = 1_024
"""Bound on the (peer, reason) pairs remembered for :data:`LOG_REPEAT` (keyed by remote input)."""
MAX_NICKNAME_ENTRIES = 4_096
MAX_NICKNAME = 64
GATEWAY_ID = "weave:gateway"
GATEWAY_IFNAME = "weave"
DEFAULT_IFNAME = "eth0"
REMOVED_STATE = "removed by rmpeer on another peer - stop this peer, delete ipam.msgpack and peer-name " \
                "from its state directory, and start it again to rejoin under a new name"

Send = Callable[[PeerName | None, str, bytes], bool]
"""``MeshPeer.send_relay``: (destination or None for all, channel, payload) → whether a route existed."""


def open_allocator(name: PeerName, address_range: AddressRange, mode: InitMode, store: SnapshotStore,
                   rng: Random) -> tuple[Allocator, dict[str, str]]:
    """The allocator as the last run left it (or fresh), and the owners' nicknames it stored.

    Raises :class:`StoreError` (one line, naming the file) when the file cannot be used.
    """
    stored = store.load(name, str(address_range))
    try:
        allocator = Allocator(name, address_range, mode, rng, snapshot=stored.snapshot if stored else None)
    except AllocError as exc:
        raise StoreError(f"{store.path}: {exc}; remove the file to start IPAM afresh "
                         "(this peer's leases are then forgotten)") from None
    return allocator, dict(stored.nicknames) if stored else {}


@dataclass
class _Waiter:
    container_id: str
    event: anyio.Event = field(default_factory=anyio.Event)
    result: Completion | None = None

    def finish(self, result: Completion) -> None:
        if self.result is None:
            self.result = result
            self.event.set()


class IpamService:
    """The daemon's IPAM: see the module docstring for who calls what."""

    def __init__(self, allocator: Allocator, store: SnapshotStore, own_nickname: str, *,
                 nicknames: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
                 wake: Callable[[], None]) -> None:
        """``wake`` makes the pump run :meth:`commit` soon (it is sleeping until its next timer)."""
        self.allocator = allocator
        self._store = store
        self._clock = clock
        self._wake = wake
        self._log = structlog.get_logger("weaved")
        self._nicknames: dict[str, str] = {**(nicknames or {}), allocator.own: own_nickname}
        self._reachable: set[PeerName] = set()
        self._waiting: dict[int, _Waiter] = {}
        self._started = 0
        """Writes begun so far."""
        self._durable = 0
        """The last write that finished successfully (numbered like :attr:`_started`)."""
        self._durable_event = anyio.Event()
        self._committed = anyio.Event()
        """Set (and replaced) after every commit: what a waiter for news from the network waits on."""
        self._retry_at: float | None = None
        self._store_error: str | None = None
        self._seeded = allocator.ring.seeded
        self._removed_logged = False
        self._logged: dict[tuple[str, str], float] = {}
        self.counters: Counter[str] = Counter()
        """``dropped_too-large``, ``dropped_no-route``, ``store_errors``, ``internal_errors``."""
        self.needs_commit = False
        """An API call changed the allocator: the pump should commit without waiting for its next timer."""
        # With ``seed=`` the initial ring is known from the start, but the allocator adopts it only on its
        # next timer or request; a claim or a status read before that would find no ring. One timer call now
        # adopts it (and does nothing in the other modes); the first commit writes it.
        allocator.handle_timer(clock())

    # --- read side --------------------------------------------------------------------------------

    @property
    def prefix_length(self) -> int:
        """The range's prefix length: leases are shown as CIDRs on the pod network (``10.32.0.5/12``)."""
        return 32 - (self.allocator.range.size - 1).bit_length()

    def cidr(self, lease: Lease) -> str:
        return f"{lease.ip()}/{self.prefix_length}"

    def leases(self) -> list[Lease]:
        return self.allocator.leases()

    @property
    def removed(self) -> bool:
        """Another peer's ring lists us as removed (rmpeer ran while we were away): we must not allocate."""
        return self.allocator.ring.rejected.get("removed", 0) > 0

    def report(self) -> IpamReport:
        status = self.allocator.status()
        owners = [
            IpamOwner(o.name, self._nicknames.get(o.name), o.addresses, o.percent, o.reachable,
                      status.leases if o.name == self.allocator.own else None)
            for o in status.owners
        ]
        return IpamReport(
            state=REMOVED_STATE if self.removed else status.state, range=status.range,
            default_subnet=status.range, size=self.allocator.range.size, owned=status.owned, free=status.free,
            leases=status.leases, pending=status.pending, owners=owners, rejected=dict(status.rejected),
            counters=dict(self.counters), deferred=dict(status.deferred),
        )

    def label(self, name: str) -> str:
        nickname = self._nicknames.get(name)
        return f"{name}({nickname})" if nickname else name

    # --- pump side --------------------------------------------------------------------------------

    def on_event(self, event: MeshEvent, reachable: Callable[[], set[PeerName]]) -> None:
        """Feed one mesh event; ``reachable`` gives the peers the mesh routes to now (without us)."""
        now = self._clock()
        try:
            match event:
                case RelayDelivered(src=src, channel=channel, payload=payload) if channel == CHANNEL:
                    if src not in self._reachable:
                        # The allocator grants space only to peers the mesh reaches: a message from a peer
                        # that joined an instant ago must not find a stale set.
                        self._set_reachable(reachable(), now)
                    self._receive(PeerName(src), payload, now)
                case PeerJoined(name=name, nickname=nickname) | PeerRestarted(name=name, nickname=nickname):
                    peers = reachable()
                    self._remember_nickname(name, nickname, peers)
                    if isinstance(event, PeerRestarted):
                        # A new incarnation may have lost what it heard before: it gets our ring and votes
                        # again, as a peer that just joined would.
                        self.allocator.set_reachable(peers - {PeerName(name)}, now)
                    self._set_reachable(peers, now)
                case PeerLeft():
                    self._set_reachable(reachable(), now)
        except Exception:
            # Input from the network must never take the daemon down, even through a core bug.
            self.counters["internal_errors"] += 1
            self._log.exception("ipam failed on a mesh event", event=type(event).__name__)

    def _remember_nickname(self, name: str, nickname: str, peers: set[PeerName]) -> None:
        """Nicknames come from the network: keep those of owners and reachable peers when there are many."""
        self._nicknames[name] = nickname[:MAX_NICKNAME]
        if len(self._nicknames) > MAX_NICKNAME_ENTRIES:
            keep = self.allocator.ring.state.owners() | peers | {self.allocator.own, name}
            self._nicknames = {n: k for n, k in self._nicknames.items() if n in keep}

    def _set_reachable(self, peers: set[PeerName], now: float) -> None:
        self._reachable = set(peers)
        self.allocator.set_reachable(self._reachable, now)

    def _receive(self, src: PeerName, payload: bytes, now: float) -> None:
        before = self._refusals()
        self.allocator.receive(src, payload, now)
        after = self._refusals()
        for reason in after - before:
            key = (src, reason)
            if now - self._logged.get(key, -LOG_REPEAT) >= LOG_REPEAT:
                if len(self._logged) >= MAX_LOGGED:  # keyed by remote input: keep only the recent entries
                    self._logged = {k: t for k, t in self._logged.items() if now - t < LOG_REPEAT}
                    if len(self._logged) >= MAX_LOGGED:
                        continue  # that many refusing peers within a minute: the counters still count
                self._logged[key] = now
                self._log.warning("ipam message refused", src=self.label(src), reason=reason)
        if self.removed and not self._removed_logged:
            self._removed_logged = True
            self._log.error("ipam stopped", reason=REMOVED_STATE)

    def _refusals(self) -> Counter[str]:
        return self.allocator.rejected + Counter({f"ring-{k}": v for k, v in self.allocator.ring.rejected.items()})

    def next_deadline(self) -> float | None:
        deadline = self.allocator.next_deadline()
        if self._retry_at is not None and self.allocator.dirty:
            deadline = self._retry_at if deadline is None else min(deadline, self._retry_at)
        return deadline

    def handle_timer(self, now: float) -> None:
        deadline = self.allocator.next_deadline()
        if deadline is not None and deadline <= now:
            try:
                self.allocator.handle_timer(now)
            except Exception:
                self.counters["internal_errors"] += 1
                self._log.exception("ipam failed on a timer")
        if self._retry_at is not None and now >= self._retry_at:
            self.needs_commit = True

    async def commit(self, send: Send) -> None:
        """Persist, then send and answer (see the module docstring): call after every pump step."""
        self.needs_commit = False
        while self.allocator.dirty:
            if self._retry_at is not None and self._clock() < self._retry_at:
                return  # hold everything back until the store works again
            await self._write()
        # Nothing was awaited since the allocator was last found clean: what follows is on disk.
        for dst, payload in self.allocator.messages():
            if len(payload) > MAX_MESSAGE:
                self.counters["dropped_too-large"] += 1
                self._log.warning("ipam message too large", dst=self.label(dst) if dst else "all",
                                  bytes=len(payload), limit=MAX_MESSAGE)
            elif not send(dst, CHANNEL, payload):
                self.counters["dropped_no-route"] += 1
        for completion in self.allocator.completions():
            waiter = self._waiting.get(completion.request)
            if waiter is not None:
                waiter.finish(completion)
        if self.allocator.ring.seeded and not self._seeded:
            self._seeded = True
            status = self.allocator.status()
            self._log.info("ipam ready", range=status.range, owners=len(status.owners), owned=status.owned)
        self._committed.set()
        self._committed = anyio.Event()

    async def _write(self) -> None:
        owners = self.allocator.ring.state.owners() | {self.allocator.own}
        nicknames = dict(sorted((n, k) for n, k in self._nicknames.items() if n in owners)[:MAX_NICKNAMES])
        stored = Stored(self.allocator.own, str(self.allocator.range), self.allocator.snapshot(), nicknames)
        self._started += 1
        number = self._started
        try:
            await anyio.to_thread.run_sync(self._store.write, stored)
        except StoreError as exc:
            self.allocator.dirty = True  # not on disk: hold its consequences back and try again
            self.counters["store_errors"] += 1
            self._retry_at = self._clock() + STORE_RETRY
            if str(exc) != self._store_error:
                self._log.error("cannot save ipam state", error=str(exc), retry_every=STORE_RETRY)
            self._store_error = str(exc)
            return
        if self._store_error is not None:
            self._log.info("ipam state saved again", path=str(self._store.path))
        self._retry_at = self._store_error = None
        self._durable = number
        self._durable_event.set()
        self._durable_event = anyio.Event()

    # --- API side ---------------------------------------------------------------------------------

    def _poke(self) -> None:
        self.needs_commit = True
        self._wake()

    def _refuse_if_removed(self) -> None:
        if self.removed:
            raise AllocError("removed", f"IPAM is stopped on this peer: {REMOVED_STATE}")

    def _unsaved(self) -> AllocError:
        return AllocError("store", f"IPAM state cannot be saved: {self._store_error or 'no answer in time'}")

    async def _until_durable(self) -> None:
        """Wait until a write that started after the caller's change (or one in flight) has finished."""
        target = self._started + (1 if self.allocator.dirty else 0)
        with anyio.move_on_after(self.allocator.timeout + ANSWER_GRACE):
            while self._durable < target:
                await self._durable_event.wait()
        if self._durable < target:
            raise self._unsaved()

    async def allocate(self, container_id: str, ifname: str) -> Lease:
        """An address for (container, interface), the same one when asked again. Waits for seeding or
        space as long as the allocator's deadline allows; raises :class:`AllocError` with the reason."""
        self._refuse_if_removed()
        request = self.allocator.allocate(container_id, ifname, self._clock())
        waiter = self._waiting[request] = _Waiter(container_id)
        try:
            self._poke()
            with anyio.move_on_after(self.allocator.timeout + ANSWER_GRACE):
                await waiter.event.wait()
        finally:
            del self._waiting[request]
        result = waiter.result
        if result is None:
            raise self._unsaved()
        if isinstance(result, AllocationFailed):
            raise AllocError(result.code, result.message)
        assert isinstance(result, Allocated)
        return result.lease

    async def gateway(self) -> Lease:
        """This node's own address on the pod network (a lease for a reserved container id)."""
        return await self.allocate(GATEWAY_ID, GATEWAY_IFNAME)

    async def claim(self, container_id: str, ifname: str, address: str) -> Lease:
        """Lease a given address (a container that had it before); refused when owned elsewhere or in use."""
        self._refuse_if_removed()
        try:
            wanted = int(ipaddress.IPv4Address(address))
        except ValueError:
            raise AllocError("bad-request", f"not an IPv4 address: {address!r}") from None
        leases = self.allocator.leases()
        current = next((lease for lease in leases if (lease.container_id, lease.ifname) == (container_id, ifname)),
                       None)
        if current is not None and current.address != wanted:
            raise AllocError("in-use", f"{container_id} already has {self.cidr(current)} on {ifname}; "
                             "release it first")
        holder = next((lease for lease in leases if lease.address == wanted), None)
        if holder is not None and holder != current:
            raise AllocError("in-use", f"{holder.ip()} is in use by {holder.container_id} on {holder.ifname}")
        lease = self.allocator.claim(container_id, ifname, address, self._clock())
        self._poke()
        await self._until_durable()
        return lease

    async def release(self, container_id: str) -> list[Lease]:
        """Free every address of a container (nothing for an unknown one). A request still waiting for an
        address for that container fails: the container is gone."""
        released = self.allocator.release(container_id, self._clock())
        for request, waiter in list(self._waiting.items()):
            if waiter.container_id == container_id:
                waiter.finish(AllocationFailed(request, "released",
                                               f"{container_id} was released while waiting for an address"))
        self._poke()
        await self._until_durable()
        return released

    def resolve_peer(self, text: str) -> PeerName:
        """A peer name, or the nickname of exactly one peer we know that the mesh does not reach."""
        lowered = text.strip().lower()
        if valid_peer_name(lowered):
            return PeerName(lowered)
        named = sorted(n for n, nick in self._nicknames.items() if nick == text.strip())
        if not named:
            raise AllocError("unknown-peer", f"no peer named or nicknamed {text!r} is known here")
        if len(named) > 1:
            named = [n for n in named if n not in self._reachable and n != self.allocator.own]
            if len(named) != 1:
                raise AllocError("ambiguous", f"{text!r} is the nickname of several peers; give the peer name")
        return PeerName(named[0])

    async def rmpeer(self, peer: str) -> tuple[PeerName, int]:
        """Remove a dead peer's ownership; returns its name and the addresses we took over (often 0: its
        heir, the owner of the range before it, takes over). Refused for a peer the mesh reaches."""
        name = self.resolve_peer(peer)
        if name == self.allocator.own:
            raise AllocError("self", "a peer cannot remove itself")
        if name in self._reachable:
            raise AllocError("reachable", f"{self.label(name)} is reachable: stop it before removing its addresses")
        taken = self.allocator.rmpeer(name, self._clock())
        self._log.info("ipam rmpeer", peer=self.label(name), taken=taken)
        self._poke()
        await self._until_durable()
        return name, taken

    async def leave(self, force: bool = False) -> tuple[Departure, bool]:
        """Leave the ring for good (``weaved reset``): hand every range to a live peer, on disk before it is
        sent; then wait up to :data:`LEAVE_CONFIRM_TIMEOUT` for the heir to confirm. Returns the departure and
        whether it was confirmed in time. Refused (``in-use``) while containers hold addresses, unless
        ``force``; (``no-heir``) when no peer is reachable to take the ranges."""
        self._refuse_if_removed()
        departure = self.allocator.leave(self._clock(), force=force)
        for lease in departure.dropped:
            self._log.warning("ipam lease dropped by a forced leave", container=lease.container_id,
                              ifname=lease.ifname, address=lease.ip())
        self._log.info("ipam leave", heir=self.label(departure.heir) if departure.heir else None,
                       addresses=departure.addresses, dropped=len(departure.dropped))
        self._poke()
        await self._until_durable()
        with anyio.move_on_after(LEAVE_CONFIRM_TIMEOUT):
            while not departure.confirmed:
                await self._committed.wait()
        if departure.confirmed and departure.heir is not None:
            self._log.info("ipam leave confirmed", heir=self.label(departure.heir))
        return departure, departure.confirmed
