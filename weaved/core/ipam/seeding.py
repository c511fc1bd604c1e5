"""Agreement on the initial ring, before anyone allocates (``IPALLOC_INIT``).

Theory of operation
-------------------
Two peers that each split the range on their own, from different knowledge, would own the same
addresses. So the first split is agreed before anyone allocates, in one of three ways:

``seed=NAME,...``
    Every peer computes the same split (:func:`~weaved.core.ipam.ring.split_range`) from the same
    list, so there is nothing to agree on: the ring is ready at once. Peers given different lists
    produce rings that refuse to join (``seeded-differently``), which is loud rather than silent.

``consensus=N``
    Single-decree Paxos carried by gossip, in the spirit of Weave Net's ``ipam/paxos``. The value
    agreed is the sorted list of peer names to split among. Each consensus peer gossips one
    :class:`Vote` that only it edits (version+1 per change), so the map of votes is a CRDT like the
    ring, joined per peer by version. A proposer takes a :class:`Ballot` higher than any seen and
    promises it to itself; an acceptor that sees a ballot higher than its promise promises that
    instead (phase 1). Once a quorum of votes promise the proposer's ballot, it proposes the value of
    the highest ballot any of them had accepted, or, if none had, the names it knows (phase 2). An
    acceptor accepts a ballot's value when that ballot is the one it promised. A value is chosen once a
    quorum of votes accept the same ballot; anyone who sees that builds the ring from it.

    Safety is Paxos's: any two quorums of ``N // 2 + 1`` out of ``N`` share a peer, so two partitions
    cannot both decide, and once a value is chosen every higher ballot proposes it again. That holds
    only if ``N`` is the total number of initial consensus peers: configure fewer and two disjoint
    "quorums" exist. Liveness needs a quorum to hear each other: the lowest-named peer proposes
    first, the others only after a randomised timeout that doubles with every ballot they start, so
    duelling proposers are rare and resolve even when the timeout is shorter than a round trip.

``observer``
    Never votes and never claims: it waits for a seeded ring to arrive by ring gossip.

States and status strings: ``idle`` (nobody has asked for an address yet), ``awaiting consensus
(quorum Q, known K)`` / ``awaiting ring (observer)``, ``ready``. Allocation waits in the middle state;
nothing guesses.

Sans-IO: time arrives as ``now``; the only randomness is the injected generator, used for retry
jitter. :meth:`Seeder.next_deadline` tells the adapter when to call :meth:`Seeder.tick`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import msgpack

from weaved.core.codec import BAD_FIELD, StrictReader
from weaved.core.ipam.ring import (
    ADDRESS_SPACE,
    MAX_NAMES,
    MAX_VERSION,
    AddressRange,
    RingState,
    seeded_state,
    valid_peer_name,
)
from weaved.core.types import PeerName, peer_name_to_bytes

if TYPE_CHECKING:
    from random import Random

FORMAT_VERSION = 1
MAX_ENCODED = 2 << 20
MAX_BACKOFF_DOUBLINGS = 6
"""Retry intervals double per ballot up to 64 times the configured one."""


class SeedingError(Exception):
    """Refused consensus state or configuration; ``reason`` is a short stable label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SeedingDecodeError(SeedingError):
    """The only error :func:`decode_paxos` and :func:`paxos_from_bytes` raise."""


def _need(condition: bool, reason: str, detail: str = "") -> None:
    if not condition:
        raise SeedingError(reason, detail)


# -- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsensusInit:
    """``consensus=N``: ``peers`` is N, the total number of initial consensus peers."""

    peers: int

    @property
    def quorum(self) -> int:
        return self.peers // 2 + 1


@dataclass(frozen=True, slots=True)
class SeedInit:
    """``seed=NAME,...``: split among exactly these peers."""

    names: tuple[PeerName, ...]


@dataclass(frozen=True, slots=True)
class ObserverInit:
    """``observer``: never claims space at start; waits for a ring."""


InitMode = ConsensusInit | SeedInit | ObserverInit


def parse_init(text: str, initial_peers: int | None = None) -> InitMode:
    """Parse ``IPALLOC_INIT``. Bare ``consensus`` takes N from ``initial_peers`` (the number of peers
    the daemon was started with, as Weave's Kubernetes default does). Raises ValueError."""
    kind, sep, arg = text.strip().partition("=")
    if kind == "consensus":
        if sep:
            if not (arg.isascii() and arg.isdigit()):
                raise ValueError(f"consensus=N needs a number, got {arg!r}")
            count: int | None = int(arg)
        else:
            count = initial_peers
        if count is None or count < 1:
            raise ValueError("consensus needs the number of initial peers (consensus=N)")
        return ConsensusInit(count)
    if kind == "seed" and sep:
        names = [PeerName(n.strip().lower()) for n in arg.split(",") if n.strip()]
        bad = [n for n in names if not valid_peer_name(n)]
        if not names or bad:
            raise ValueError(f"seed= needs peer names like aa:bb:cc:dd:ee:ff, bad: {bad}")
        return SeedInit(tuple(sorted(set(names))))
    if kind == "observer" and not sep:
        return ObserverInit()
    raise ValueError(f"IPALLOC_INIT must be consensus[=N], seed=NAME,... or observer, got {text!r}")


# -- Paxos state ------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class Ballot:
    """Proposal number; the proposer's name breaks ties so no two proposers share a ballot."""

    round: int
    proposer: PeerName


@dataclass(frozen=True, slots=True)
class Vote:
    """One consensus peer's acceptor state, edited only by that peer.

    ``promised``: no ballot below it will be accepted. ``accepted``/``value``: the last proposal
    accepted. Version 0 is a bare "I exist" that lets others count us.
    """

    version: int = 0
    promised: Ballot | None = None
    accepted: Ballot | None = None
    value: tuple[PeerName, ...] = ()

    def problems(self) -> list[str]:
        found: list[str] = []
        if not 0 <= self.version <= MAX_VERSION:
            found.append("bad-version")
        for ballot in (self.promised, self.accepted):
            if ballot is not None and (not 1 <= ballot.round <= MAX_VERSION or not valid_peer_name(ballot.proposer)):
                found.append("bad-ballot")
        if self.version == 0 and self.promised is not None:
            found.append("bad-version: a vote with a promise has a version")
        if self.accepted is not None and (self.promised is None or self.accepted > self.promised):
            found.append("bad-ballot: accepted above promise")
        if (self.accepted is None) != (not self.value):
            found.append("bad-value: a value exactly when accepted")
        if len(self.value) > MAX_NAMES or any(not valid_peer_name(n) for n in self.value):
            found.append("bad-value: names")
        if list(self.value) != sorted(set(self.value)):
            found.append("bad-value: names must be sorted and distinct")
        return found


@dataclass(frozen=True)
class PaxosState:
    """Everyone's votes, as gossiped: sorted ``(name, vote)`` pairs plus the range being split."""

    range: AddressRange
    votes: tuple[tuple[PeerName, Vote], ...] = ()
    _by_name: dict[PeerName, Vote] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", dict(self.votes))

    @classmethod
    def of(cls, address_range: AddressRange, votes: dict[PeerName, Vote]) -> PaxosState:
        return cls(address_range, tuple(sorted(votes.items())))

    def vote(self, name: PeerName) -> Vote | None:
        return self._by_name.get(name)

    def by_name(self) -> dict[PeerName, Vote]:
        return dict(self._by_name)

    def validate(self) -> None:
        names = [n for n, _ in self.votes]
        _need(len(names) <= MAX_NAMES, "too-large", "votes")
        _need(all(valid_peer_name(n) for n in names), "bad-name", "voter")
        _need(names == sorted(set(names)), "bad-field", "votes must be sorted by distinct name")
        values: dict[Ballot, tuple[PeerName, ...]] = {}
        for name, vote in self.votes:
            problems = vote.problems()
            if problems:
                reason, _, detail = problems[0].partition(": ")
                raise SeedingError(reason, f"{name}: {detail}" if detail else name)
            if vote.accepted is not None:
                # One proposer, one value per ballot: two values under one ballot is forged or corrupt.
                seen = values.setdefault(vote.accepted, vote.value)
                _need(seen == vote.value, "inconsistent-ballot", f"two values for round {vote.accepted.round}")

    def join(self, other: PaxosState) -> PaxosState:
        """Per voter the higher version; two different votes at one version are refused."""
        _need(self.range == other.range, "range-mismatch", f"{self.range} vs {other.range}")
        merged = dict(self._by_name)
        for name, theirs in other.votes:
            mine = merged.get(name)
            if mine is None or theirs.version > mine.version:
                merged[name] = theirs
            elif theirs.version == mine.version and theirs != mine:
                raise SeedingError("inconsistent-vote", f"{name} v{mine.version}")
        result = PaxosState.of(self.range, merged)
        result.validate()
        return result

    def chosen(self, quorum: int) -> tuple[PeerName, ...] | None:
        """The value a quorum accepted under one ballot, if any (Paxos: at most one such value)."""
        counts: dict[Ballot, int] = {}
        for _, vote in self.votes:
            if vote.accepted is not None:
                counts[vote.accepted] = counts.get(vote.accepted, 0) + 1
        decided = [b for b, c in counts.items() if c >= quorum]
        if not decided:
            return None
        ballot = max(decided)
        return next(v.value for _, v in self.votes if v.accepted == ballot)


# -- the state machine ------------------------------------------------------------------------------


class SeedState(Enum):
    IDLE = "idle"
    AWAITING = "awaiting"
    READY = "ready"


class Seeder:
    """One peer's side of the agreement. Feed it :meth:`receive`, :meth:`tick` and :meth:`start`;
    read :attr:`state`, :attr:`status` and, once ready, :attr:`ring` (the agreed initial ring)."""

    def __init__(
        self,
        own: PeerName,
        mode: InitMode,
        address_range: AddressRange,
        rng: Random,
        *,
        retry_interval: float = 5.0,
    ) -> None:
        if not valid_peer_name(own):
            raise ValueError(f"malformed peer name {own!r}")
        if retry_interval <= 0:
            raise ValueError("retry_interval must be positive")
        self.own = own
        self.mode = mode
        self.range = address_range
        self._rng = rng
        self._retry = retry_interval
        self._state = SeedState.IDLE
        self._ring: RingState | None = None
        self._votes: dict[PeerName, Vote] = {}
        self._ballot: Ballot | None = None
        self._deadline: float | None = None
        self._attempts = 0
        self.rejected: dict[str, int] = {}
        self.deferred: dict[str, int] = {}
        """Votes not taken because they were relayed by another peer than their voter (see :meth:`receive`)."""
        if isinstance(mode, SeedInit):
            self._ready(mode.names)
        elif isinstance(mode, ConsensusInit):
            self._votes[own] = Vote()

    # -- read side ----------------------------------------------------------------------------------

    @property
    def state(self) -> SeedState:
        return self._state

    @property
    def ring(self) -> RingState | None:
        """The agreed initial ring (version-1 tokens), once ready."""
        return self._ring

    @property
    def quorum(self) -> int | None:
        return self.mode.quorum if isinstance(self.mode, ConsensusInit) else None

    @property
    def known(self) -> int:
        """Consensus peers we have heard from, ourselves included."""
        return len(self._votes)

    @property
    def status(self) -> str:
        if self._state is SeedState.AWAITING:
            if isinstance(self.mode, ConsensusInit):
                return f"awaiting consensus (quorum {self.mode.quorum}, known {self.known})"
            return "awaiting ring (observer)"
        return str(self._state.value)

    def gossip(self) -> PaxosState | None:
        """What to gossip: every vote we know (``None`` unless we take part in consensus)."""
        if not isinstance(self.mode, ConsensusInit):
            return None
        return PaxosState.of(self.range, self._votes)

    def next_deadline(self) -> float | None:
        return self._deadline if self._state is SeedState.AWAITING else None

    # -- inputs -------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Someone wants an address: begin agreeing (Weave starts consensus lazily, the same way)."""
        if self._state is SeedState.IDLE:
            self._await(now)
            self._step(now)

    def receive(self, remote: PaxosState, now: float, src: PeerName | None = None) -> bool:
        """Join gossiped votes; returns whether our votes changed. Raises :class:`SeedingError` (counted,
        state untouched) for invalid or conflicting state. Ignored unless we take part in consensus.

        With ``src`` (the authenticated sender) only ``src``'s own vote is taken: a vote names its voter,
        and a member that could speak for others could invent a quorum, or outvote an acceptor's promise,
        and make two parts of the cluster decide on different initial rings. Every voter broadcasts its
        vote when it changes, and proposers retry, so first-hand votes suffice; the others are counted in
        :attr:`deferred`. Without ``src`` (tests of the protocol, a restored snapshot) every vote is joined.

        A remote copy of *our own* vote at a higher version is adopted: it is what we said before a
        restart, and honouring it is the best we can do (persisting votes makes that case moot).
        """
        if not isinstance(self.mode, ConsensusInit):
            return False
        if src is not None:
            others = len(remote.votes) - (1 if remote.vote(src) is not None else 0)
            if others:
                self.deferred["not-from-voter"] = self.deferred.get("not-from-voter", 0) + others
            own_vote = remote.vote(src)
            remote = PaxosState.of(remote.range, {src: own_vote} if own_vote is not None and src != self.own else {})
        try:
            remote.validate()
            joined = PaxosState.of(self.range, self._votes).join(remote)
        except SeedingError as err:
            self.rejected[err.reason] = self.rejected.get(err.reason, 0) + 1
            raise
        before = dict(self._votes)
        self._votes = joined.by_name()
        if self._state is SeedState.IDLE and any(v.promised for v in self._votes.values()):
            self._await(now)  # someone is proposing: join the effort instead of idling
        self._step(now)
        return self._votes != before

    def adopt(self, ring: RingState) -> None:
        """A seeded ring arrived by ring gossip: the agreement happened (or was configured) elsewhere."""
        _need(ring.range == self.range, "range-mismatch", f"{ring.range} vs {self.range}")
        _need(ring.seeded, "not-seeded")
        if self._ring is not None:
            _need(self._ring.seeded_by == ring.seeded_by, "seeded-differently")
            return
        self._ready(ring.seeded_by)

    def tick(self, now: float) -> None:
        """Retry timer: propose (again) with a higher ballot if nothing was chosen in time."""
        if self._state is not SeedState.AWAITING or self._deadline is None or now < self._deadline:
            return
        if isinstance(self.mode, ConsensusInit) and self.known >= self.mode.quorum:
            self._propose(now)
        else:
            self._schedule(now)
        self._step(now)

    # -- internals ----------------------------------------------------------------------------------

    def _await(self, now: float) -> None:
        self._state = SeedState.AWAITING
        if isinstance(self.mode, ConsensusInit):
            self._schedule(now)

    def _schedule(self, now: float) -> None:
        """Next retry: doubling with every ballot we start (capped), randomised so that proposers
        spread out. The doubling is what guarantees progress when the retry interval is shorter than
        a round trip: a ballot needs two, and a proposer that re-proposes faster than that would
        pre-empt itself forever."""
        backoff = self._retry * (1 << min(self._attempts, MAX_BACKOFF_DOUBLINGS))
        self._deadline = now + backoff * (1.0 + self._rng.random())

    def _ready(self, names: tuple[PeerName, ...]) -> None:
        self._state = SeedState.READY
        self._ring = seeded_state(self.range, names)
        self._deadline = None

    def _propose(self, now: float) -> None:
        rounds = [b.round for v in self._votes.values() for b in (v.promised, v.accepted) if b is not None]
        ballot = Ballot(max(rounds, default=0) + 1, self.own)
        own = self._votes[self.own]
        self._votes[self.own] = Vote(own.version + 1, ballot, own.accepted, own.value)
        self._ballot = ballot
        self._attempts += 1
        self._schedule(now)

    def _step(self, now: float) -> None:
        """Run the acceptor, proposer and learner rules to a fixpoint."""
        if not isinstance(self.mode, ConsensusInit):
            return
        quorum = self.mode.quorum
        if (
            self._state is SeedState.AWAITING
            and self._ballot is None
            and self.known >= quorum
            and self.own == min(self._votes)
            and all(v.promised is None for v in self._votes.values())
        ):
            self._propose(now)  # the lowest-named peer goes first; the others wait for their timers
        while True:
            own = self._votes[self.own]
            updated = self._acceptor(own, now)
            updated = self._proposer(updated, quorum)
            if updated == own:
                break
            self._votes[self.own] = updated
        if self._state is not SeedState.READY:
            value = PaxosState.of(self.range, self._votes).chosen(quorum)
            if value is not None:
                self._ready(value)

    def _acceptor(self, own: Vote, now: float) -> Vote:
        top = max((v.promised for v in self._votes.values() if v.promised is not None), default=None)
        if top is not None and (own.promised is None or top > own.promised):
            own = Vote(own.version + 1, top, own.accepted, own.value)
            if top.proposer != self.own and self._state is SeedState.AWAITING:
                self._schedule(now)  # someone else is trying: give them a full period before competing
        if own.promised is not None and own.accepted != own.promised:
            source = next((v for v in self._votes.values() if v.accepted == own.promised), None)
            if source is not None:
                own = Vote(own.version + 1, own.promised, own.promised, source.value)
        return own

    def _proposer(self, own: Vote, quorum: int) -> Vote:
        ballot = self._ballot
        if ballot is None or own.promised != ballot or own.accepted == ballot:
            return own
        votes = {**self._votes, self.own: own}
        promisers = [v for v in votes.values() if v.promised == ballot]
        if len(promisers) < quorum:
            return own
        prior = [v for v in promisers if v.accepted is not None]
        # Paxos's rule: re-propose the value of the highest ballot any promiser accepted.
        value = max(prior, key=lambda v: v.accepted or ballot).value if prior else tuple(sorted(votes))
        return Vote(own.version + 1, ballot, ballot, value)


# -- encoding ---------------------------------------------------------------------------------------


def _encode_ballot(ballot: Ballot | None) -> list[Any] | None:
    return None if ballot is None else [ballot.round, peer_name_to_bytes(ballot.proposer)]


def encode_paxos(state: PaxosState) -> list[Any]:
    """``[format, range_start, range_size, [[name, version, promised, accepted, value], ...]]`` with
    ballots as ``[round, proposer]`` or nil and names as six raw bytes."""
    return [
        FORMAT_VERSION,
        state.range.start,
        state.range.size,
        [
            [
                peer_name_to_bytes(name),
                vote.version,
                _encode_ballot(vote.promised),
                _encode_ballot(vote.accepted),
                [peer_name_to_bytes(n) for n in vote.value],
            ]
            for name, vote in state.votes
        ],
    ]


_READ = StrictReader(SeedingDecodeError, long_list=BAD_FIELD)
"""The shared strict checks and bounded unpack (:mod:`weaved.core.codec`), raising
:class:`SeedingDecodeError`. An over-long list has always been ``bad-field`` here (the ring says
``too-large``); the label is kept so that existing counters keep their meaning."""
_dneed = _READ.need
_dint = _READ.integer
_dlist = _READ.array
_dname = _READ.name


def _dballot(value: Any, what: str) -> Ballot | None:
    if value is None:
        return None
    raw = _dlist(value, what, 2, 2)
    return Ballot(_dint(raw[0], 1, MAX_VERSION, what), _dname(raw[1], what))


def decode_paxos(data: Any) -> PaxosState:
    """Parse :func:`encode_paxos` output strictly. Raises :class:`SeedingDecodeError` and nothing else."""
    try:
        fields = _dlist(data, "paxos", 4, 4)
        _dneed(type(fields[0]) is int and fields[0] == FORMAT_VERSION, "unsupported-version")
        start = _dint(fields[1], 0, ADDRESS_SPACE - 1, "range start")
        size = _dint(fields[2], 1, ADDRESS_SPACE - start, "range size")
        votes: list[tuple[PeerName, Vote]] = []
        for raw in _dlist(fields[3], "votes", MAX_NAMES):
            v = _dlist(raw, "vote", 5, 5)
            value = tuple(_dname(n, "value name") for n in _dlist(v[4], "value", MAX_NAMES))
            vote = Vote(_dint(v[1], 0, MAX_VERSION, "version"), _dballot(v[2], "promised"),
                        _dballot(v[3], "accepted"), value)
            votes.append((_dname(v[0], "voter"), vote))
        state = PaxosState(AddressRange(start, size), tuple(votes))
        state.validate()
        return state
    except SeedingDecodeError:
        raise
    except SeedingError as err:
        raise SeedingDecodeError(err.reason, err.detail) from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise SeedingDecodeError("bad-field", type(exc).__name__) from None


def paxos_to_bytes(state: PaxosState) -> bytes:
    packed: bytes = msgpack.packb(encode_paxos(state), use_bin_type=True)
    return packed


def paxos_from_bytes(data: bytes) -> PaxosState:
    """Unpack with msgpack's size limits and :func:`decode_paxos`. Raises only :class:`SeedingDecodeError`."""
    _dneed(isinstance(data, bytes | bytearray), "bad-field", "bytes expected")
    raw = _READ.unpack(data, max_size=MAX_ENCODED, max_str=64, max_array=MAX_NAMES)
    return decode_paxos(raw)
