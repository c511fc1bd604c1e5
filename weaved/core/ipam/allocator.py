"""The allocator: leases for containers, built on the ring, the free space and the seeding.

Theory of operation
-------------------
One :class:`Allocator` per peer. The daemon feeds it API requests (:meth:`Allocator.allocate`,
:meth:`~Allocator.release`, :meth:`~Allocator.claim`, :meth:`~Allocator.rmpeer`), IPAM messages
from other peers (:meth:`~Allocator.receive`, carried by the mesh on the ``ipam`` relay channel) and
time (:meth:`~Allocator.handle_timer`); it returns messages to send (:meth:`~Allocator.messages`) and
finished requests (:meth:`~Allocator.completions`). Nothing blocks: an allocation that cannot be
served at once stays pending until space arrives or its deadline passes, and then fails with a reason
the CNI plugin can show.

**Durability rule (the daemon's half of "never a duplicate").** Whenever :attr:`Allocator.dirty` is
set after a call, the daemon writes :meth:`Allocator.snapshot` to disk (fsync'd) *before* it sends the
messages or answers the requests that call produced. So a lease is on disk before its address is
handed out, and a donor has recorded giving a block away before the recipient can hear of it: a crash
at any point restarts from a state that never contradicts what others were told.

Space flows like Weave's: the first allocation triggers seeding (``IPALLOC_INIT``); once the ring is
seeded, each peer allocates the lowest free address of its ranges; a peer that runs out asks one peer
with free space (weighted by free count) for a block, and the donor grants the largest free block, at
most half its free addresses, and sends the new ring back.

**Leaving for good** (:meth:`Allocator.leave`, Weave's ``weave reset``): the peer hands every range it
owns to one live peer it reaches (the heir), as one owner edit, and sends it its ring. The heir answers
any ring that gave it addresses with its own ring, and that answer is the leaving peer's confirmation
(:attr:`Departure.confirmed`); until it comes, the ring goes to the heir again every
:data:`SPACE_REQUEST_TIMEOUT`. Leaving is refused while containers still hold addresses (a range hands
over no leases: the heir would give those addresses out again) unless forced. Afterwards allocation,
claims and rmpeer are refused with ``left``. The peer's name is not tombstoned: restarted, it owns nothing
and asks for space like a new peer. A plain stop or restart hands nothing over.

Messages (msgpack ``[kind, body, incarnation]``; kinds are append-only; the incarnation is random per
run of the sender): ``RING`` (the whole ring state, to one peer or to all), ``PAXOS`` (seeding votes),
``SPACE_REQUEST`` (no body), ``SPACE_DENIED`` (our ring), ``LEFT_RING`` (a ring from a run that left:
never pick it as heir).

**Whom we trust.** The sender of a message is the mesh's authenticated relay source (``src`` of
:meth:`Allocator.receive`), never a name in the body: votes are taken only from their voter, and space
goes only to ``src`` when the mesh reaches it, once per :data:`GRANT_INTERVAL`. Rings are joined whole,
whoever relayed them (gossip relies on second-hand news; nothing is signed), refused only when they break
an invariant, jump a version too far or are too large (:meth:`Ring.merge`). What a member can still do
is in docs/ipam.md §9.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import msgpack

from weaved.core.ipam.ring import AddressRange, Ring, RingError, RingState, decode_ring, encode_ring
from weaved.core.ipam.seeding import (
    InitMode,
    PaxosState,
    Seeder,
    SeedingError,
    SeedState,
    decode_paxos,
    encode_paxos,
)
from weaved.core.ipam.space import Space, SpaceError
from weaved.core.types import PeerName

if TYPE_CHECKING:
    from random import Random

CHANNEL = "ipam"
SNAPSHOT_VERSION = 1
RING_GOSSIP_INTERVAL = 30.0
"""Anti-entropy: our ring goes to every peer this often even when nothing changed."""
SPACE_REQUEST_TIMEOUT = 2.0
"""How long to wait for a donor's answer before asking another; also how long a donor that said no (or
did not answer) is left alone before we ask it again. Without that pause a peer that ran out would ask
the peers that have nothing to give in turn, as fast as the network carries the answers: the stateful
test (tests/sim/test_ipam_stateful.py) found that message storm."""
MAX_CONTAINER_ID = 256
MAX_IFNAME = 16
INCARNATION_BITS = 62
"""Random per run: two runs of one peer share one with odds of 2**-62."""
GRANT_INTERVAL = 10.0
"""A donor grants space to one requester at most once per this many seconds. Each grant is up to half the
donor's free space: without a bound, a member asking again and again would drain it in a few dozen round
trips. An honest peer rarely asks the same donor twice so soon (a first grant is large), and when it
does, the no sends it to another donor for :data:`SPACE_REQUEST_TIMEOUT`."""
MAX_REMOTE_PEERS = 4_096
"""Bound on the tables keyed by peer names that come from the network (runs heard, grants made): above
it, entries of peers the mesh does not reach are forgotten (they matter only for reachable peers)."""
MAX_RUNS_PER_PEER = 4
"""Incarnations per peer remembered as having left (the latest ones): enough to tell a restarted
leaver from a late message of an older run."""


class MsgKind(IntEnum):
    """WARNING: append only. The numbers are part of the protocol."""

    RING = 1
    PAXOS = 2
    SPACE_REQUEST = 3
    SPACE_DENIED = 4
    LEFT_RING = 5
    """A RING from a peer that has left the ring: the receiver never hands it space again."""


class AllocError(Exception):
    """A refused request; ``code`` is stable (``bad-request``, ``not-ready``, ``owned-elsewhere``,
    ``in-use``, ``reserved``, ``ring``, ``left``, ``no-heir``, ``removed``) and ``str()`` says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Lease:
    container_id: str
    ifname: str
    address: int

    def ip(self) -> str:
        return str(ipaddress.IPv4Address(self.address))


@dataclass(frozen=True, slots=True)
class Allocated:
    request: int
    lease: Lease


@dataclass(frozen=True, slots=True)
class AllocationFailed:
    request: int
    code: str
    """``timeout`` (with the state that kept us waiting in ``message``) or ``removed``."""
    message: str


Completion = Allocated | AllocationFailed


@dataclass
class Departure:
    """What :meth:`Allocator.leave` did: ``addresses`` handed to ``heir`` (``None`` when we owned nothing),
    the leases ``dropped`` by a forced leave, and whether a ring from someone else has shown the hand-over
    (``confirmed``: our ranges are in live hands, not only in a message)."""

    heir: PeerName | None
    addresses: int
    dropped: tuple[Lease, ...]
    handed: dict[int, int]
    """token start → the version we wrote when handing it over: what a confirming ring must show."""
    confirmed: bool
    retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class OwnerStatus:
    name: str
    addresses: int
    percent: float
    reachable: bool


@dataclass(frozen=True, slots=True)
class IpamStatus:
    state: str
    range: str
    owned: int
    free: int
    leases: int
    pending: int
    owners: tuple[OwnerStatus, ...]
    rejected: dict[str, int]
    deferred: dict[str, int] = field(default_factory=dict)
    """Input not acted on that honest peers may send too (throttled requests, votes relayed second-hand)."""


@dataclass
class _Pending:
    request: int
    container_id: str
    ifname: str
    deadline: float


def _check_ids(container_id: str, ifname: str) -> None:
    if not container_id or len(container_id) > MAX_CONTAINER_ID or not container_id.isprintable():
        raise AllocError("bad-request", f"container id must be 1..{MAX_CONTAINER_ID} printable characters")
    if not ifname or len(ifname) > MAX_IFNAME or not ifname.isprintable():
        raise AllocError("bad-request", f"interface name must be 1..{MAX_IFNAME} printable characters")


class Allocator:
    """One peer's IPAM. See the module docstring for the contract with the daemon."""

    def __init__(self, own: PeerName, address_range: AddressRange, mode: InitMode, rng: Random, *,
                 timeout: float = 30.0, snapshot: bytes | None = None) -> None:
        self.own = own
        self.range = address_range
        self.timeout = timeout
        self._rng = rng
        self.ring = Ring(own, address_range)
        self.seeder = Seeder(own, mode, address_range, rng)
        self.space = Space(address_range.reserved())
        self._leases: dict[tuple[str, str], Lease] = {}
        self._pending: list[_Pending] = []
        self._next_request = 1
        self._out: list[tuple[PeerName | None, bytes]] = []
        self._done: list[Completion] = []
        self._reachable: set[PeerName] = set()
        self._asked: tuple[PeerName, float] | None = None
        self._denied: dict[PeerName, float] = {}
        """Donors that said no or did not answer, and until when we do not ask them again."""
        self.departure: Departure | None = None
        """Set once we left the ring for good (:meth:`leave`); kept in memory only (see the module doc)."""
        self.incarnation = rng.getrandbits(INCARNATION_BITS)
        """This run of the peer: a restarted peer is a new incarnation, one that may have left or not.
        Every message carries it, so that a peer that left and came back is no leaver any more."""
        self._left_incarnations: dict[PeerName, list[int]] = {}
        """Per peer, the incarnations that sent ``LEFT_RING`` (the last :data:`MAX_RUNS_PER_PEER`): those
        runs left for good. Memory only."""
        self._latest_incarnation: dict[PeerName, int] = {}
        """Per peer, the incarnation of the last message it sent us."""
        self._granted: dict[PeerName, float] = {}
        """Requesters we granted space to, and when (:data:`GRANT_INTERVAL`)."""
        self._next_gossip: float | None = None
        self.dirty = False
        self.rejected: Counter[str] = Counter()
        """Messages (or parts) refused, by reason: what an honest peer does not send."""
        self.deferred: Counter[str] = Counter()
        """What we did not act on although an honest peer may send it (a request throttled by
        :data:`GRANT_INTERVAL`, a request from a peer the mesh does not reach); the seeder's are in
        ``seeder.deferred``."""
        if snapshot is not None:
            self._restore(snapshot)

    # --- requests ---------------------------------------------------------------------------------

    def allocate(self, container_id: str, ifname: str, now: float) -> int:
        """Ask for an address for (container, interface); the answer comes through :meth:`completions`
        (at once when possible). Asking again for the same pair returns the same lease."""
        _check_ids(container_id, ifname)
        self._refuse_if_left()
        request = self._next_request
        self._next_request += 1
        existing = self._leases.get((container_id, ifname))
        if existing is not None:
            self._done.append(Allocated(request, existing))
            return request
        self._pending.append(_Pending(request, container_id, ifname, now + self.timeout))
        self._serve(now)
        return request

    def claim(self, container_id: str, ifname: str, address: str, now: float) -> Lease:
        """Lease a given address (a container that already has it, e.g. after a restart)."""
        _check_ids(container_id, ifname)
        self._refuse_if_left()
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            raise AllocError("bad-request", f"not an IPv4 address: {address!r}") from None
        existing = self._leases.get((container_id, ifname))
        if existing is not None and existing.address == value:
            return existing
        if not self.ring.seeded:
            raise AllocError("not-ready", f"IPAM is not ready: {self.seeder.status}")
        if not self.range.start <= value < self.range.end:
            raise AllocError("bad-request", f"{address} is outside {self._range_text()}")
        if not self.space.owns(value):
            owner = self.ring.owner_of(value)
            raise AllocError("owned-elsewhere", f"{address} belongs to peer {owner}; claim it there")
        try:
            self.space.claim(value)
        except SpaceError as err:
            raise AllocError(err.reason, f"{address}: {err}") from None
        lease = Lease(container_id, ifname, value)
        self._leases[(container_id, ifname)] = lease
        self.dirty = True
        return lease

    def release(self, container_id: str, now: float) -> list[Lease]:
        """Free every address of a container (idempotent: an unknown id frees nothing)."""
        released = [lease for key, lease in self._leases.items() if key[0] == container_id]
        for lease in released:
            del self._leases[(lease.container_id, lease.ifname)]
            self.space.release(lease.address)
        self._pending = [p for p in self._pending if p.container_id != container_id]
        if released:
            self.dirty = True
            self._serve(now)  # someone may be waiting for exactly this space
        return released

    def leases(self) -> list[Lease]:
        return sorted(self._leases.values(), key=lambda lease: lease.address)

    def rmpeer(self, name: PeerName, now: float) -> int:
        """Remove a dead peer; returns how many addresses we inherited (often 0: the heir takes over
        when the tombstone reaches it). Safe to run on several peers at once (see docs/ipam.md)."""
        self._refuse_if_left()
        try:
            before = self.space.free_count()
            self.ring.rmpeer(name)
        except RingError as err:
            raise AllocError("ring", f"rmpeer {name}: {err}") from None
        self._ring_changed(now, broadcast=True)
        return max(0, self.space.free_count() - before)

    def leave(self, now: float, *, force: bool = False) -> Departure:
        """Leave the ring for good: hand every range we own to one live peer we reach, and tell it.

        Refused with ``in-use`` while containers hold addresses here (their addresses would be handed out
        again by the heir) unless ``force``, which forgets those leases; with ``no-heir`` when we own
        addresses and reach no peer that could take them (stopping instead strands them until rmpeer).
        Waiting requests fail with ``left``. Asking again returns the same departure (and re-sends).

        Addresses that reach us *after* we left (the ring agreed by a consensus we voted in, a grant we
        asked for before) are handed on the same way as soon as we see them (:meth:`_hand_on`).
        """
        if self.departure is not None:
            if not self.departure.confirmed and self.departure.heir is not None:
                self._send_ring(self.departure.heir)
            return self.departure
        if self.ring.removed:
            raise AllocError("removed", "this peer was removed by rmpeer: it owns nothing to hand over")
        leases = self.leases()
        if leases and not force:
            shown = ", ".join(f"{lease.ip()} ({lease.container_id})" for lease in leases[:3])
            more = f" and {len(leases) - 3} more" if len(leases) > 3 else ""
            raise AllocError("in-use", f"{len(leases)} addresses are still leased here: {shown}{more}; stop those "
                             "containers (or release their addresses) first, or force the leave")
        owned = self.ring.state.owned_count(self.own) if self.ring.seeded else 0
        if owned and self._pick_heir() is None:
            raise AllocError("no-heir", f"no other peer is reachable to take over this peer's {owned} addresses "
                             "(peers that left do not count); connect one first (or stop this peer and rmpeer "
                             "it from another)")
        for lease in leases:
            self.space.release(lease.address)
        self._leases.clear()
        for pending in self._pending:
            self._done.append(AllocationFailed(pending.request, "left", "this peer left the IPAM ring"))
        self._pending.clear()
        self._asked = None
        self.dirty = True
        self.departure = Departure(None, 0, tuple(leases), {}, confirmed=True)
        self._hand_on(now)
        return self.departure

    def _owned_now(self) -> int:
        return self.ring.state.owned_count(self.own) if self.ring.seeded and not self.ring.removed else 0

    def _hand_on(self, now: float) -> None:
        """After :meth:`leave`: give whatever we own to the heir (the same one while it is reachable),
        broadcast, and expect its confirmation; with nobody reachable, try again later."""
        departure = self.departure
        assert departure is not None
        owned = self._owned_now()
        if not owned:
            return
        heir = self._pick_heir()
        if heir is None:
            departure.retry_at = now + SPACE_REQUEST_TIMEOUT
            return
        starts = self.ring.leave(heir)  # preconditions hold: seeded, not removed, a valid live recipient
        departure.heir = heir
        departure.addresses += owned
        departure.handed.update(
            {start: t.version for start in starts if (t := self.ring.state.token_at(start)) is not None})
        departure.confirmed = False
        departure.retry_at = now + SPACE_REQUEST_TIMEOUT
        self._ring_changed(now, broadcast=True)
        self._send_ring(heir)

    def _pick_heir(self) -> PeerName | None:
        """The reachable peer to hand our ranges to: never a removed peer or one seen to leave
        (:attr:`leavers`); an owner of space first (it is staying), then anyone; the lowest name among
        equals. ``None`` when nobody qualifies: the ranges wait here and the hand-over is retried.

        Why passing among leavers ends: every hand-over from a leaver comes as a ``LEFT_RING``, so the
        taker learns it left before it takes anything and never hands anything back; the leavers each
        peer knows only grow while their runs last, and there are finitely many peers."""
        skip = {self.own, *self.ring.state.removed, *self.leavers}
        reachable = sorted(p for p in self._reachable if p not in skip)
        owners = self.ring.state.owners()
        return next((p for p in reachable if p in owners), reachable[0] if reachable else None)

    def _refuse_if_left(self) -> None:
        if self.departure is not None:
            raise AllocError("left", f"this peer left the IPAM ring ({self._departure_text()}); restart it to "
                             "rejoin as an empty peer, or remove its state to start afresh")

    def _departure_text(self) -> str:
        d = self.departure
        assert d is not None
        if d.heir is None:
            return "left: owned no addresses"
        state = "confirmed" if d.confirmed else "waiting for confirmation"
        return f"left: handed {d.addresses} addresses to {d.heir} ({state})"

    # --- mesh input -------------------------------------------------------------------------------

    def set_reachable(self, peers: set[PeerName], now: float) -> None:
        """The peers the mesh reaches now: new ones get our ring (and votes) at once, and a request that
        is waiting for space asks one of them now rather than at the next anti-entropy round (a peer
        restarted with nothing of its own found no reachable donor at first, and waited up to 45 s)."""
        self._schedule_gossip(now)
        joined = peers - self._reachable
        self._reachable = set(peers)
        for peer in sorted(joined):
            self._send_ring(peer)
            self._send_paxos(peer)
        if joined and self._pending and self._asked is None and self.ring.seeded and self.departure is None:
            self._serve(now)

    @property
    def leavers(self) -> set[PeerName]:
        """Peers whose latest incarnation we heard from left the ring: never picked as heir, or two peers
        that left would pass ranges back and forth for ever (the stateful test found that).

        Learnt only from the ``LEFT_RING`` marker, never inferred from a ring's content: an old ring from
        a peer that owned nothing then looks just like a leaver's. Keyed by incarnation because a peer
        that left and was restarted is a normal peer again; if a leaver kept it marked, a later leaver
        that reaches only that peer would find no heir and keep its space for good (the slow stateful
        test found that too). A late message from an older incarnation can flip the answer until the
        current one's next message (periodic gossip) flips it back: it only changes whom we pick."""
        return {peer for peer, incarnation in self._latest_incarnation.items()
                if incarnation in self._left_incarnations.get(peer, ())}

    def receive(self, src: PeerName, payload: bytes, now: float) -> None:
        """An IPAM message from ``src``. Malformed or refused input is counted and dropped."""
        self._schedule_gossip(now)
        try:
            kind, body, incarnation = self._decode(payload)
            if kind in (MsgKind.RING, MsgKind.LEFT_RING, MsgKind.SPACE_DENIED):
                remote = decode_ring(body)  # a malformed ring teaches nothing, not even that its sender left
                self._note_run(src, kind, incarnation)  # before the merge: what a leaver hands us stays here
                self._merge_ring(remote, now, None if kind is MsgKind.SPACE_DENIED else src)
                if kind is MsgKind.SPACE_DENIED and self._asked is not None and self._asked[0] == src:
                    self._asked = None
                    self._denied[src] = now + SPACE_REQUEST_TIMEOUT
                    self._serve(now)
            elif kind is MsgKind.PAXOS:
                self._receive_paxos(decode_paxos(body), now, src)
                self._note_run(src, kind, incarnation)
            elif kind is MsgKind.SPACE_REQUEST:
                self._note_run(src, kind, incarnation)
                self._donate(src, now)
        except (RingError, SeedingError, AllocError) as err:
            self.rejected[getattr(err, "reason", getattr(err, "code", "error"))] += 1

    def _note_run(self, src: PeerName, kind: MsgKind, incarnation: int | None) -> None:
        """Which run of ``src`` spoke last, and whether that run left (see :attr:`leavers`)."""
        if incarnation is None:
            return
        self._latest_incarnation[src] = incarnation
        if kind is MsgKind.LEFT_RING:
            runs = self._left_incarnations.setdefault(src, [])
            if incarnation not in runs:
                runs.append(incarnation)
                del runs[:-MAX_RUNS_PER_PEER]
        if len(self._latest_incarnation) > MAX_REMOTE_PEERS or len(self._left_incarnations) > MAX_REMOTE_PEERS:
            keep = self._reachable | {src}
            self._latest_incarnation = {p: i for p, i in self._latest_incarnation.items() if p in keep}
            self._left_incarnations = {p: i for p, i in self._left_incarnations.items() if p in keep}

    def handle_timer(self, now: float) -> None:
        self._schedule_gossip(now)
        votes = self.seeder.gossip()
        self.seeder.tick(now)
        if self.seeder.gossip() != votes:
            self.dirty = True  # a new ballot: on disk before anyone hears it
            self._send_paxos(None)
        self._after_seeding(now)
        if self._asked is not None and now >= self._asked[1]:
            self._denied[self._asked[0]] = now + SPACE_REQUEST_TIMEOUT
            self._asked = None
            self._serve(now)
        elif self._pending and self._asked is None and self.ring.seeded:
            self._serve(now)  # a donor we left alone may be asked again
        departure = self.departure
        if departure is not None and departure.retry_at is not None and now >= departure.retry_at:
            departure.retry_at = None
            if self._owned_now():
                self._hand_on(now)
            elif not departure.confirmed and departure.heir is not None:
                self._send_ring(departure.heir)
                departure.retry_at = now + SPACE_REQUEST_TIMEOUT
        if self._next_gossip is not None and now >= self._next_gossip:
            self._report_free()
            self._send_ring(None)
            self._next_gossip = now + RING_GOSSIP_INTERVAL
        self._expire(now)

    def next_deadline(self) -> float | None:
        deadlines = [p.deadline for p in self._pending]
        for value in (self.seeder.next_deadline(), self._next_gossip, self._asked[1] if self._asked else None):
            if value is not None:
                deadlines.append(value)
        if self._pending and self._asked is None and self._denied:
            deadlines.append(min(self._denied.values()))
        if self.departure is not None and self.departure.retry_at is not None:
            deadlines.append(self.departure.retry_at)
        return min(deadlines, default=None)

    # --- output -----------------------------------------------------------------------------------

    def messages(self) -> list[tuple[PeerName | None, bytes]]:
        """(destination or None for every peer, payload) to send on the ``ipam`` channel."""
        out, self._out = self._out, []
        return out

    def completions(self) -> list[Completion]:
        done, self._done = self._done, []
        return done

    def snapshot(self) -> bytes:
        """Everything that must survive a crash: ring, seeding votes, leases. Clears :attr:`dirty`."""
        self.dirty = False
        paxos = self.seeder.gossip()
        data: bytes = msgpack.packb([
            SNAPSHOT_VERSION,
            encode_ring(self.ring.state),
            encode_paxos(paxos) if paxos is not None else None,
            [[lease.container_id, lease.ifname, lease.address] for lease in self.leases()],
        ], use_bin_type=True)
        return data

    def status(self) -> IpamStatus:
        total = self.range.size
        owned = {name: 0 for name in self.ring.state.owners()}
        for start, end, owner in self.ring.state.segments():
            owned[owner] = owned.get(owner, 0) + (end - start)
        owners = tuple(
            OwnerStatus(name, count, 100.0 * count / total, name == self.own or name in self._reachable)
            for name, count in sorted(owned.items(), key=lambda item: (-item[1], item[0]))
        )
        return IpamStatus(
            state=self._state_text(), range=self._range_text(), owned=owned.get(self.own, 0),
            free=self.space.free_count(), leases=len(self._leases), pending=len(self._pending), owners=owners,
            rejected={**self.rejected, **{f"ring-{k}": v for k, v in self.ring.rejected.items()}},
            deferred={**self.deferred, **{f"paxos-{k}": v for k, v in self.seeder.deferred.items()}},
        )

    # --- internals --------------------------------------------------------------------------------

    def _range_text(self) -> str:
        prefix = 32 - (self.range.size - 1).bit_length()
        return f"{ipaddress.IPv4Address(self.range.start)}/{prefix}"

    def _state_text(self) -> str:
        if self.departure is not None:
            return self._departure_text()
        if not self.ring.seeded:
            return self.seeder.status
        if self._pending:
            others = self.ring.state.owners() - {self.own}
            if not self.space.free_count() and others and not others & self._reachable:
                return "all IP ranges owned by unreachable peers - use 'rmpeer' if they are dead"
            return "waiting for IP(s) to become available"
        return "ready"

    def _unreachable(self) -> set[PeerName]:
        return {o for o in self.ring.state.owners() if o != self.own and o not in self._reachable}

    def _decode(self, payload: bytes) -> tuple[MsgKind, Any, int | None]:
        """``[kind, body, incarnation]``; ``[kind, body]`` (no incarnation: nothing learnt about leaving)
        is still taken, as the first version sent it."""
        if len(payload) > 4 << 20:
            raise AllocError("too-large", f"{len(payload)} bytes")
        try:
            raw = msgpack.unpackb(payload, raw=False, max_bin_len=64, max_str_len=64, max_map_len=0,
                                  max_ext_len=0, max_array_len=1 << 16)
        except Exception:
            raise AllocError("not-msgpack", "undecodable IPAM message") from None
        if not (isinstance(raw, list) and len(raw) in (2, 3) and type(raw[0]) is int):
            raise AllocError("bad-field", "IPAM envelope")
        incarnation = raw[2] if len(raw) == 3 else None
        if incarnation is not None and not (type(incarnation) is int and 0 <= incarnation < 1 << INCARNATION_BITS):
            raise AllocError("bad-field", "IPAM incarnation")
        try:
            return MsgKind(raw[0]), raw[1], incarnation
        except ValueError:
            raise AllocError("unknown-kind", str(raw[0])) from None

    def _send(self, dst: PeerName | None, kind: MsgKind, body: Any) -> None:
        self._out.append((dst, msgpack.packb([int(kind), body, self.incarnation], use_bin_type=True)))

    def _send_ring(self, dst: PeerName | None) -> None:
        """Our ring; once we left, every copy says so (``LEFT_RING``), so that nobody picks us as heir.

        Why a marker and not an inference from the ring ("it owns nothing now"): rings arrive late and
        out of order, and an old ring from a peer that owned nothing then looks just like a leaver's.
        The slow stateful test found a peer that left mark its only live heir that way, and keep its
        ranges for ever."""
        if self.ring.seeded or self.ring.state.removed:
            kind = MsgKind.RING if self.departure is None else MsgKind.LEFT_RING
            self._send(dst, kind, encode_ring(self.ring.state))

    def _send_paxos(self, dst: PeerName | None) -> None:
        paxos = self.seeder.gossip()
        if paxos is not None and self.seeder.state is not SeedState.READY:
            self._send(dst, MsgKind.PAXOS, encode_paxos(paxos))

    def _merge_ring(self, remote: RingState, now: float, src: PeerName | None = None) -> None:
        """Merge a remote ring (refusals are counted by :meth:`Ring.merge`). ``src`` is the peer whose
        ring may answer our space request (None for a no, or our own agreed seed ring)."""
        owned_before = self.ring.state.owned_count(self.own)
        result = self.ring.merge(remote)
        gained = src is not None and result.ours_changed and self.ring.state.owned_count(self.own) > owned_before
        if remote.seeded and self.seeder.state is not SeedState.READY:
            self.seeder.adopt(self.ring.state)
        if result.changed:
            self._ring_changed(now, broadcast=bool(result.inherited))
        if gained:
            # The ring gave us addresses (a grant or a leave): answer with ours, so the giver learns that
            # its ranges are in live hands (a leaving peer waits for exactly this).
            assert src is not None
            self._send_ring(src)
        departure = self.departure
        if departure is not None and not departure.confirmed:
            departure.confirmed = all(
                (token := remote.token_at(start)) is not None and token.version >= version
                for start, version in departure.handed.items()
            )

    def _receive_paxos(self, paxos: PaxosState, now: float, src: PeerName) -> None:
        if self.seeder.receive(paxos, now, src):
            self.dirty = True  # votes must be on disk before anyone hears them
            self._send_paxos(None)
        self._after_seeding(now)

    def _after_seeding(self, now: float) -> None:
        agreed = self.seeder.ring
        if agreed is not None and not self.ring.seeded:
            self._merge_ring(agreed, now)
            self._ring_changed(now, broadcast=True)

    def _ring_changed(self, now: float, *, broadcast: bool) -> None:
        """Refresh our free space from the ring; serve waiting requests; tell others if asked to."""
        stranded = self.space.set_ranges(self.ring.owned_ranges())
        # Our own hand-overs only give free space away, so a lease outside our ranges means a remote
        # override (an rmpeer of us while we were away): keep the lease and surface it in the counts.
        if stranded:  # (a bare += 0 would put a zero count into the status)
            self.rejected["lease-outside-ranges"] += len(stranded)
        self.dirty = True
        self._schedule_gossip(now)
        if self.departure is not None and self._owned_now():
            self._hand_on(now)  # we left: whatever reached us since goes on to the heir
            return
        if broadcast:
            self._report_free()
            self._send_ring(None)
        self._serve(now)

    def _schedule_gossip(self, now: float) -> None:
        """Start anti-entropy once we hold a seeded ring. Called on every input, not only when the ring
        changes: a peer restarted from its snapshot has a ring that may never change again, and it must
        still gossip it (the stateful test found restarted peers silent for good)."""
        if self._next_gossip is None and self.ring.seeded:
            self._next_gossip = now + RING_GOSSIP_INTERVAL * (0.5 + self._rng.random())

    def _report_free(self) -> None:
        if not self.ring.seeded or self.ring.removed:
            return
        free = {
            start: sum(self.space.count_free(s, e) for s, e in segments)
            for start, segments in self.ring.own_tokens().items()
        }
        if self.ring.report_free(free):
            self.dirty = True

    def _serve(self, now: float) -> None:
        """Hand out addresses to waiting requests; ask for space when ours ran out."""
        if not self._pending:
            return
        if not self.ring.seeded:
            self.seeder.start(now)
            self.dirty = True
            self._send_paxos(None)
            self._after_seeding(now)
            if not self.ring.seeded:
                return
        while self._pending:
            address = self.space.allocate()
            if address is None:
                break
            pending = self._pending.pop(0)
            lease = Lease(pending.container_id, pending.ifname, address)
            self._leases[(lease.container_id, lease.ifname)] = lease
            self.dirty = True
            self._done.append(Allocated(pending.request, lease))
        if self._pending and self._asked is None:
            self._denied = {peer: until for peer, until in self._denied.items() if until > now}
            donor = self.ring.pick_donor(self._rng, exclude=self._unreachable() | set(self._denied))
            if donor is not None:
                self._asked = (donor, now + SPACE_REQUEST_TIMEOUT)
                self._send(donor, MsgKind.SPACE_REQUEST, None)

    def _donate(self, to: PeerName, now: float) -> None:
        """A space request from ``to``: the authenticated sender of the message, never a name it carries.

        Granted only to a peer the mesh reaches (a name nobody routes to is invented, or gone), at most once
        per :data:`GRANT_INTERVAL` per requester, and at most half our free space (``Space.donation``)."""
        if not self.ring.seeded or self.ring.removed:
            return
        if to in self.ring.state.removed:
            # A request from a peer we removed: late in the network, or that peer is running again under
            # its removed name. Never grant to it (the ring would refuse anyway); count it for the status.
            self.rejected["request-from-removed-peer"] += 1
            return
        if to not in self._reachable:
            # Invented, or a peer that went down with its request in flight: either way, nobody to grant to.
            self.deferred["request-from-unreachable-peer"] += 1
            return
        if len(self._granted) > MAX_REMOTE_PEERS:
            self._granted = {p: t for p, t in self._granted.items() if p in self._reachable}
        last = self._granted.get(to)
        throttled = last is not None and now < last + GRANT_INTERVAL
        if throttled:
            self.deferred["request-throttled"] += 1
        block = self.space.donation()
        if block is None or self._pending or throttled:
            self._deny(to)
            return
        try:
            self.ring.grant(block[0], block[1], to)
        except RingError as err:  # the ring would grow past its bound: keep our space
            self.rejected[f"grant-{err.reason}"] += 1
            self._deny(to)
            return
        self._granted[to] = now
        self._ring_changed(now, broadcast=False)
        self._report_free()
        self._send(to, MsgKind.RING, encode_ring(self.ring.state))
        self._send_ring(None)

    def _deny(self, to: PeerName) -> None:
        self._report_free()  # our true free count travels with the no, so we are not asked at once again
        self._send(to, MsgKind.SPACE_DENIED, encode_ring(self.ring.state))

    def _expire(self, now: float) -> None:
        expired = [p for p in self._pending if now >= p.deadline]
        if not expired:
            return
        reason = self._state_text()
        for pending in expired:
            self._pending.remove(pending)
            self._done.append(AllocationFailed(
                pending.request, "timeout",
                f"no address for {pending.container_id} within {self.timeout:.0f}s: {reason}"))

    def _restore(self, snapshot: bytes) -> None:
        try:
            raw = msgpack.unpackb(snapshot, raw=False, max_map_len=0, max_ext_len=0)
            version, ring_raw, paxos_raw, leases = raw
            if version != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {version}")
            state = decode_ring(ring_raw)
            if paxos_raw is not None:
                self.seeder.receive(decode_paxos(paxos_raw), 0.0)
            self.ring = Ring(self.own, self.range, state)
            if state.seeded:
                self.seeder.adopt(state)
            self.space.set_ranges(self.ring.owned_ranges())
            for container_id, ifname, address in leases:
                self.space.claim(address)
                self._leases[(container_id, ifname)] = Lease(container_id, ifname, address)
        except (ValueError, TypeError, RingError, SeedingError, SpaceError) as err:
            raise AllocError("bad-snapshot", f"cannot restore IPAM state: {err}") from None
