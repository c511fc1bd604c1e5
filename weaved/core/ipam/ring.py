"""The IPAM ring: a CRDT that says which peer owns which addresses of ``IPALLOC_RANGE``.

Theory of operation
-------------------
The range (default 10.32.0.0/12) is cut by *tokens*: sorted start addresses, each carrying an owner,
a version and an advisory free count. A token's range runs to the next token and the last one wraps
round to the first, so once a ring is seeded every address has exactly one recorded owner. Tokens are
never deleted; the set only grows (by splits), which is what makes the join below a plain union.

Only the owner edits a token, bumping its version. The whole ring is gossiped and
:meth:`RingState.join` keeps, per token, the higher version; two different entries at one version
mean someone broke the rules, and the join refuses (:class:`RingError`). Because a peer's whole
state travels together, any state that shows token ``t`` at version ``v`` also shows every token its
editor knew when it wrote ``v`` ("causal inclusion"); the invariant checks below rely on it.

Dead peers (``rmpeer``)
~~~~~~~~~~~~~~~~~~~~~~~
Weave Net's ``rmpeer`` lets the *caller* rewrite the dead peer's tokens at version+100, so two callers
produce two owners. Here ``rmpeer D`` only adds ``D`` to a grow-only ``removed`` set (a tombstone),
which two callers can do at once without conflict: the union of equal sets is the same set. Who
inherits ``D``'s tokens is not the caller's choice but a function of the ring: each token of a
removed peer goes to its *heir*, the owner of the nearest preceding token whose owner is not removed
(the dead range is absorbed by its left neighbour). Only the heir writes the change, as an ordinary
owner edit (with a version jump, see :data:`INHERIT_VERSION_JUMP`), as soon as it sees the tombstone:
in :meth:`Ring.rmpeer` when it is the caller, in :meth:`Ring.merge` otherwise. Everyone else keeps
the dead peer as recorded owner until the heir's edit arrives, and nobody allocates from a removed
peer's range meanwhile. ``docs/ipam.md`` argues why at most one live peer can consider itself heir of
an address at any time, and states rmpeer's one precondition (the dead peer's last hand-overs have
reached the living).

Local versus remote
~~~~~~~~~~~~~~~~~~~
Local mutators check their preconditions (raising :class:`RingError`, the caller asked for something
illegal) and then *assert* the invariants: a violation there is our bug. Remote state is never
trusted: :meth:`Ring.merge` validates it and raises :class:`RingError` with a stable ``reason``,
counts the rejection, and leaves our state untouched. It takes every token at its higher version, whoever
relayed it (nothing is signed, so a relayed edit cannot be told from a forged one, and refusing relayed
edits breaks the no-duplicate guarantee after crashes: docs/ipam.md §9). What it does refuse of a member:
version jumps beyond :data:`MAX_VERSION_STEP` and rings over the size bounds (:func:`check_size`).

Nothing here does I/O, reads a clock or draws global randomness; :meth:`Ring.pick_donor` takes an
injected generator.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgpack

from weaved.core.codec import StrictReader
from weaved.core.types import PeerName, peer_name_to_bytes

if TYPE_CHECKING:
    from random import Random

FORMAT_VERSION = 1
"""Version of the encoded ring; bump on any incompatible change to :func:`encode_ring`."""

ADDRESS_SPACE = 1 << 32
MAX_TOKENS = 1 << 16
"""More tokens than any real ring has (Weave rings hold a few per peer); bounds decoding."""
MAX_NAMES = 4_096
"""Bound on the seed list and the removed set."""
MAX_VERSION = (1 << 63) - 1
MAX_ENCODED = 4 << 20
"""Bound on an encoded ring in bytes (65,536 tokens fit in well under 2 MiB)."""
MAX_RING_BYTES = 60_000
"""Bound on an encoded ring that we hold, accept or produce: it must fit one IPAM message (the mesh carries
at most 65,000 bytes in one control datagram). A ring of honest peers stays far below it: about 28 bytes
per token, a few tokens per peer (``tests/unit/test_ipam_ring.py`` measures 64 peers after donations).
Without it a member could split its own range into thousands of tokens and make every ring too large
to send."""
MAX_TOKENS_PER_OWNER = 512
"""Bound on the tokens one owner holds in a ring we accept: one member cannot spend the whole
:data:`MAX_RING_BYTES` alone."""
MAX_VERSION_STEP = 1 << 32
"""How far a remote token's version may run ahead of ours (or, for a token new to us, above 1) in one
merge. Honest peers bump by one per edit (heirs by :data:`INHERIT_VERSION_JUMP`); a jump of 2**32 is a
forgery meant to outvote the owner's next edits for ever, or to push the version to its ceiling so that
the next owner cannot edit the token any more."""
INHERIT_VERSION_JUMP = 1 << 20
"""How far an heir bumps a dead peer's token when taking it over. The dead peer may have bumped its
free counts a few more times in messages still in flight; jumping past them makes those stale reports
lose the join instead of colliding with the heir's entry at the same version. Only the heir writes
this version, so the jump is as deterministic as a +1 (Weave's +100 is written by every caller)."""


class RingError(Exception):
    """A refused operation or remote state; ``reason`` is a short stable label for metrics and status."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RingDecodeError(RingError):
    """The only error :func:`decode_ring` and :func:`ring_from_bytes` raise."""


def _need(condition: bool, reason: str, detail: str = "") -> None:
    if not condition:
        raise RingError(reason, detail)


_CANONICAL_NAME = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def valid_peer_name(name: object) -> bool:
    """A canonical (lower-case, six-byte) peer name: the only form that may appear in ring state, so
    that equal names are equal strings. (Checked on every token of every merge: kept cheap.)"""
    return isinstance(name, str) and _CANONICAL_NAME.fullmatch(name) is not None


def _ip(address: int) -> str:
    return str(ipaddress.IPv4Address(address))


@dataclass(frozen=True, slots=True)
class AddressRange:
    """A contiguous block of IPv4 addresses ``[start, start + size)``, held as integers."""

    start: int
    size: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.size < 1 or self.start + self.size > ADDRESS_SPACE:
            raise ValueError(f"bad address range start={self.start} size={self.size}")

    @classmethod
    def from_cidr(cls, text: str) -> AddressRange:
        """Parse ``IPALLOC_RANGE`` (``10.32.0.0/12``); host bits must be zero, IPv4 only."""
        network = ipaddress.ip_network(text.strip(), strict=True)
        if not isinstance(network, ipaddress.IPv4Network):
            raise ValueError(f"IPv4 range required, got {text!r}")
        return cls(int(network.network_address), network.num_addresses)

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.start + self.size

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.start <= address < self.end

    def reserved(self) -> frozenset[int]:
        """Addresses never handed to a container: network and broadcast, when the range is a subnet of
        four or more addresses (as Weave does for the default subnet)."""
        if self.size < 4:
            return frozenset()
        return frozenset({self.start, self.end - 1})

    def __str__(self) -> str:
        if self.size & (self.size - 1) == 0 and self.start % self.size == 0:
            return f"{_ip(self.start)}/{32 - self.size.bit_length() + 1}"
        return f"{_ip(self.start)}-{_ip(self.end - 1)}"


@dataclass(frozen=True, slots=True)
class Token:
    """One ring entry: the range from ``start`` to the next token belongs to ``owner``.

    ``free`` is the owner's last report of free addresses in that range: advisory, used to choose whom
    to ask for space, never to decide ownership.
    """

    start: int
    owner: PeerName
    version: int
    free: int


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What :meth:`Ring.merge` did."""

    changed: bool
    """Our state differs from before (it has news worth gossiping on)."""
    ours_changed: bool = False
    """The set of addresses we own changed (the allocator must refresh its free space)."""
    inherited: tuple[int, ...] = ()
    """Tokens of removed peers that we took over as their heir during this merge."""


@dataclass(frozen=True)
class RingState:
    """An immutable ring: the value that is gossiped, joined, persisted and compared.

    ``seeded_by`` names the peers of the initial split (empty until seeded): two rings seeded from
    different lists can never be joined. ``removed`` is the grow-only set of peers removed by
    ``rmpeer``.
    """

    range: AddressRange
    seeded_by: tuple[PeerName, ...] = ()
    tokens: tuple[Token, ...] = ()
    removed: frozenset[PeerName] = frozenset()
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(t.start for t in self.tokens))

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def seeded(self) -> bool:
        return bool(self.tokens)

    def token_at(self, start: int) -> Token | None:
        """The token starting exactly at ``start``, if any."""
        i = bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start:
            return self.tokens[i]
        return None

    def index_owning(self, address: int) -> int:
        """Index of the token whose range holds ``address`` (the last one for addresses before the
        first token: the ring wraps). The ring must be seeded."""
        assert self.tokens, "unseeded ring has no owners"
        return (bisect_right(self._starts, address) - 1) % len(self.tokens)

    def owner_of(self, address: int) -> PeerName | None:
        """Recorded owner of ``address`` (``None`` before seeding)."""
        if not self.tokens:
            return None
        return self.tokens[self.index_owning(address)].owner

    def token_segments(self, index: int) -> list[tuple[int, int]]:
        """The token's range as one or two non-wrapping ``[start, end)`` intervals."""
        start = self._starts[index]
        if index + 1 < len(self._starts):
            return [(start, self._starts[index + 1])]
        first = self._starts[0]
        segments = [(start, self.range.end)]
        if first > self.range.start:
            segments.append((self.range.start, first))
        return segments

    def token_size(self, index: int) -> int:
        return sum(end - start for start, end in self.token_segments(index))

    def segments(self) -> list[tuple[int, int, PeerName]]:
        """Every address once, as ordered non-wrapping ``(start, end, owner)`` pieces."""
        if not self.tokens:
            return []
        pieces: list[tuple[int, int, PeerName]] = []
        last = self.tokens[-1]
        if self._starts[0] > self.range.start:
            pieces.append((self.range.start, self._starts[0], last.owner))
        for i, token in enumerate(self.tokens):
            end = self._starts[i + 1] if i + 1 < len(self.tokens) else self.range.end
            pieces.append((token.start, end, token.owner))
        return pieces

    def owned_ranges(self, peer: PeerName) -> list[tuple[int, int]]:
        """Addresses recorded as ``peer``'s, as sorted, merged, non-wrapping ``[start, end)`` ranges."""
        merged: list[tuple[int, int]] = []
        for start, end, owner in self.segments():
            if owner != peer:
                continue
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        return merged

    def owned_count(self, peer: PeerName) -> int:
        return sum(end - start for start, end in self.owned_ranges(peer))

    def owners(self) -> set[PeerName]:
        return {t.owner for t in self.tokens}

    def live_owners(self) -> set[PeerName]:
        """Owners that have not been removed."""
        return {t.owner for t in self.tokens if t.owner not in self.removed}

    @property
    def orphaned(self) -> bool:
        """Seeded, but every token belongs to a removed peer: nobody may allocate until an operator
        adopts the ring (see :meth:`Ring.rmpeer`)."""
        return self.seeded and not self.live_owners()

    def free_by_peer(self) -> dict[PeerName, int]:
        """Reported free addresses per live owner."""
        totals: Counter[PeerName] = Counter()
        for token in self.tokens:
            if token.owner not in self.removed:
                totals[token.owner] += token.free
        return dict(totals)

    def heirs(self) -> dict[int, PeerName]:
        """For each token of a removed peer, its heir: the owner of the nearest preceding token whose
        owner is not removed. Empty when the ring is orphaned.

        The heir depends on the ring alone, never on who runs ``rmpeer``; that is what lets several
        peers remove the same dead peer at once.
        """
        n = len(self.tokens)
        anchor = next((i for i, t in enumerate(self.tokens) if t.owner not in self.removed), None)
        if anchor is None:
            return {}
        heirs: dict[int, PeerName] = {}
        current = self.tokens[anchor].owner
        for step in range(1, n):
            token = self.tokens[(anchor + step) % n]
            if token.owner in self.removed:
                heirs[token.start] = current
            else:
                current = token.owner
        return heirs

    # -- validation and join ------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every broken invariant, as ``reason: detail`` strings (empty when the state is valid)."""
        found: list[str] = []
        names = self.seeded_by
        if any(not valid_peer_name(n) for n in names) or list(names) != sorted(set(names)):
            found.append("bad-seed: seed names must be valid, sorted and distinct")
        if len(names) > MAX_NAMES or len(self.removed) > MAX_NAMES or len(self.tokens) > MAX_TOKENS:
            found.append("too-large")
        if any(not valid_peer_name(n) for n in self.removed):
            found.append("bad-name: removed")
        if bool(self.tokens) != bool(names):
            found.append("bad-seed: tokens exist iff the ring is seeded")
        if self.removed and not self.tokens:
            found.append("bad-seed: removals before seeding")
        for i, token in enumerate(self.tokens):
            if token.start not in self.range:
                found.append(f"out-of-range: token {_ip(token.start)} outside {self.range}")
            if i and token.start <= self.tokens[i - 1].start:
                found.append(f"unsorted: token {_ip(token.start)} not after {_ip(self.tokens[i - 1].start)}")
            if not valid_peer_name(token.owner):
                found.append(f"bad-name: owner of {_ip(token.start)}")
            if not 1 <= token.version <= MAX_VERSION:
                found.append(f"bad-version: token {_ip(token.start)}")
        if found:
            return found  # sizes below assume sorted tokens inside the range
        for i, token in enumerate(self.tokens):
            if not 0 <= token.free <= self.token_size(i):
                found.append(f"bad-free: token {_ip(token.start)} reports {token.free} free")
        return found

    def validate(self) -> None:
        """Raise :class:`RingError` naming the first broken invariant."""
        problems = self.problems()
        if problems:
            reason, _, detail = problems[0].partition(": ")
            raise RingError(reason, detail)

    def join(self, other: RingState) -> RingState:
        """The CRDT join: per token the higher version, union of tombstones.

        Commutative, associative and idempotent on states that legal operations produce; raises
        :class:`RingError` where two states cannot both be true (different ranges or seeds, two
        contents at one version, or a result that breaks an invariant).
        """
        _need(self.range == other.range, "range-mismatch", f"{self.range} vs {other.range}")
        _need(
            not (self.seeded_by and other.seeded_by and self.seeded_by != other.seeded_by),
            "seeded-differently",
            f"{len(self.seeded_by)} vs {len(other.seeded_by)} seed peers",
        )
        merged = {t.start: t for t in self.tokens}
        for theirs in other.tokens:
            mine = merged.get(theirs.start)
            if mine is None or theirs.version > mine.version:
                merged[theirs.start] = theirs
            elif theirs.version == mine.version and theirs != mine:
                raise RingError(
                    "inconsistent-entry",
                    f"token {_ip(theirs.start)} v{mine.version}: {mine.owner}/{mine.free} vs "
                    f"{theirs.owner}/{theirs.free}",
                )
        result = RingState(
            self.range,
            self.seeded_by or other.seeded_by,
            tuple(merged[s] for s in sorted(merged)),
            self.removed | other.removed,
        )
        result.validate()
        return result


def split_range(address_range: AddressRange, names: Sequence[PeerName]) -> list[tuple[int, PeerName]]:
    """Equal initial split by recursive halving among the sorted, distinct ``names``.

    Each half of a block goes to half of the names (the first ``k // 2`` take the lower half), so on a
    power-of-two range every share is a CIDR block. A block of one address goes to the first of its
    names; with more names than addresses the later names get nothing. Every peer computing this from
    the same list gets the same tokens, which is what makes ``seed=`` and consensus agree.
    """
    ordered = sorted(set(names))
    if not ordered:
        raise ValueError("cannot split a range among no peers")
    result: list[tuple[int, PeerName]] = []

    def subdivide(start: int, end: int, peers: list[PeerName]) -> None:
        size = end - start
        if len(peers) == 1 or size == 1:
            result.append((start, peers[0]))
            return
        mid = start + size // 2
        half = len(peers) // 2
        subdivide(start, mid, peers[:half])
        subdivide(mid, end, peers[half:])

    subdivide(address_range.start, address_range.end, ordered)
    return result


def seeded_state(address_range: AddressRange, names: Sequence[PeerName]) -> RingState:
    """The version-1 ring that :func:`split_range` describes, seeded by ``names``."""
    ordered = tuple(sorted(set(names)))
    pieces = split_range(address_range, ordered)
    ends = [start for start, _ in pieces[1:]] + [address_range.end]
    tokens = tuple(
        Token(start, owner, 1, end - start) for (start, owner), end in zip(pieces, ends, strict=True)
    )
    state = RingState(address_range, ordered, tokens)
    state.validate()
    return state


def check_size(state: RingState) -> None:
    """Raise :class:`RingError` (``too-large``) when ``state`` breaks :data:`MAX_TOKENS_PER_OWNER` or
    :data:`MAX_RING_BYTES`: such a ring is refused whole, and a local change that would make one is
    refused (a donation is then denied)."""
    per_owner = Counter(t.owner for t in state.tokens)
    if per_owner:
        owner, count = per_owner.most_common(1)[0]
        _need(count <= MAX_TOKENS_PER_OWNER, "too-large", f"{owner} holds {count} tokens")
    size = len(ring_to_bytes(state))
    _need(size <= MAX_RING_BYTES, "too-large", f"{size} bytes")


def _resized(token: Token, size: int) -> Token:
    """The token after its range shrank to ``size``: free clipped, version bumped if that changed it."""
    if token.free <= size:
        return token
    return replace(token, free=size, version=token.version + 1)


def _materialize(state: RingState, own: PeerName) -> tuple[RingState, tuple[int, ...]]:
    """Write down the tokens of removed peers whose heir is ``own`` (an owner edit, version jumped).

    Inherited addresses are all free: their old owner is gone along with its containers.
    """
    if own in state.removed:
        return state, ()
    heirs = state.heirs()
    taken: list[int] = []
    tokens = list(state.tokens)
    for i, token in enumerate(tokens):
        if heirs.get(token.start) == own:
            version = min(token.version + INHERIT_VERSION_JUMP, MAX_VERSION)
            tokens[i] = Token(token.start, own, version, state.token_size(i))
            taken.append(token.start)
    if not taken:
        return state, ()
    return RingState(state.range, state.seeded_by, tuple(tokens), state.removed), tuple(taken)


class Ring:
    """One peer's ring: the current :class:`RingState` plus the rules for changing it.

    Only this peer's own tokens are edited locally; everything else arrives through :meth:`merge`.
    """

    def __init__(self, own: PeerName, address_range: AddressRange, state: RingState | None = None) -> None:
        if not valid_peer_name(own):
            raise ValueError(f"malformed peer name {own!r}")
        self.own = own
        self.state = state if state is not None else RingState(address_range)
        if self.state.range != address_range:
            raise ValueError("state belongs to another range")
        self.state.validate()
        self.rejected: Counter[str] = Counter()
        """Remote states refused by :meth:`merge`, by reason (exported as a metric)."""

    # -- queries ------------------------------------------------------------------------------------

    @property
    def range(self) -> AddressRange:
        return self.state.range

    @property
    def seeded(self) -> bool:
        return self.state.seeded

    @property
    def removed(self) -> bool:
        """We were removed by someone's ``rmpeer``. :meth:`merge` refuses states that say so, so this can
        only be true of a state we were constructed with (a stale snapshot): IPAM must then be reset."""
        return self.own in self.state.removed

    def owned_ranges(self) -> list[tuple[int, int]]:
        """The addresses we may allocate from."""
        return self.state.owned_ranges(self.own)

    def owner_of(self, address: int) -> PeerName | None:
        return self.state.owner_of(address)

    def own_tokens(self) -> dict[int, list[tuple[int, int]]]:
        """Our tokens, each with its range as non-wrapping segments (for free-count reports)."""
        return {
            token.start: self.state.token_segments(i)
            for i, token in enumerate(self.state.tokens)
            if token.owner == self.own
        }

    def pick_donor(self, rng: Random, exclude: Iterable[PeerName] = ()) -> PeerName | None:
        """A live peer to ask for space, chosen at random weighted by its reported free addresses
        (as Weave does), so requests spread out instead of all hitting the biggest owner."""
        skip = {self.own, *exclude}
        candidates = sorted((p, f) for p, f in self.state.free_by_peer().items() if p not in skip and f > 0)
        if not candidates:
            return None
        return rng.choices([p for p, _ in candidates], weights=[f for _, f in candidates])[0]

    # -- local mutators -----------------------------------------------------------------------------

    def _assert_invariants(self, state: RingState) -> None:
        problems = state.problems()
        assert not problems, f"ring invariant broken by a local change: {problems}"

    def _commit(self, state: RingState) -> bool:
        self._assert_invariants(state)
        changed = state != self.state
        self.state = state
        return changed

    def _require_live(self) -> None:
        _need(self.state.seeded, "not-seeded")
        _need(not self.removed, "removed", "this peer was removed by rmpeer")

    def _require_recipient(self, peer: PeerName) -> None:
        _need(valid_peer_name(peer), "bad-name", repr(peer))
        _need(peer != self.own, "self", "cannot hand addresses to ourselves")
        _need(peer not in self.state.removed, "removed-peer", f"{peer} was removed")

    def seed(self, names: Sequence[PeerName]) -> None:
        """Claim the initial split among ``names`` (see :func:`split_range`). Only on an unseeded ring."""
        _need(not self.state.seeded, "already-seeded")
        _need(bool(names) and all(valid_peer_name(n) for n in names), "bad-seed", "need valid peer names")
        _need(len(set(names)) <= MAX_NAMES, "too-large", "seed list")
        self._commit(seeded_state(self.range, names))

    def grant(self, start: int, end: int, to: PeerName) -> None:
        """Hand ``[start, end)`` to ``to``. Every address of it must be ours and, by the caller's
        contract, free: the recipient learns only of the range, not of any lease in it.

        Tokens are inserted at both ends when missing, so the rest of our space stays ours.
        """
        self._require_live()
        self._require_recipient(to)
        rng = self.range
        _need(rng.start <= start < end <= rng.end, "bad-range", f"[{start}, {end}) outside {rng}")
        for seg_start, seg_end, owner in self.state.segments():
            if seg_start < end and start < seg_end:
                _need(owner == self.own, "not-owner", f"{_ip(max(start, seg_start))} belongs to {owner}")

        tokens = list(self.state.tokens)
        # Where our piece ends, the next owner begins: a token at ``end`` (at the range start when
        # ``end`` is the range end, since the last token wraps) keeps the rest of our space ours.
        boundary = end if end < rng.end else rng.start
        for point in (boundary, start):
            tokens = self._split(tokens, point)
        granted = [
            Token(t.start, to, t.version + 1, 0) if start <= t.start < end else t for t in tokens
        ]
        state = RingState(rng, self.state.seeded_by, tuple(granted), self.state.removed)
        sized = tuple(
            replace(t, free=state.token_size(i)) if t.owner == to and start <= t.start < end else t
            for i, t in enumerate(state.tokens)
        )
        result = RingState(rng, self.state.seeded_by, sized, self.state.removed)
        check_size(result)  # others would refuse the ring whole
        self._commit(result)

    def _split(self, tokens: list[Token], point: int) -> list[Token]:
        """Ensure a token at ``point``, cutting the (our) token whose range holds it."""
        state = RingState(self.range, self.state.seeded_by, tuple(tokens), self.state.removed)
        if state.token_at(point) is not None:
            return tokens
        i = state.index_owning(point)
        holder = tokens[i]
        assert holder.owner == self.own, "only our own tokens are split"
        new_index = bisect_left([t.start for t in tokens], point)
        tokens = [*tokens[:new_index], Token(point, self.own, 1, holder.free), *tokens[new_index:]]
        resized = RingState(self.range, self.state.seeded_by, tuple(tokens), self.state.removed)
        holder_index = resized.tokens.index(holder)
        tokens[holder_index] = _resized(holder, resized.token_size(holder_index))
        tokens[new_index] = _resized(tokens[new_index], resized.token_size(new_index))
        return tokens

    def report_free(self, free: Mapping[int, int]) -> bool:
        """Record exact free counts for our tokens (keyed by token start). Bumps only what changed."""
        self._require_live()
        tokens = list(self.state.tokens)
        for start, count in free.items():
            token = self.state.token_at(start)
            _need(token is not None and token.owner == self.own, "not-owner", f"token {start}")
            assert token is not None
            i = self.state.index_owning(start)
            _need(0 <= count <= self.state.token_size(i), "bad-free", f"{count} at {_ip(start)}")
            if token.free != count:
                tokens[i] = Token(start, self.own, token.version + 1, count)
        return self._commit(RingState(self.range, self.state.seeded_by, tuple(tokens), self.state.removed))

    def rmpeer(self, dead: PeerName, *, adopt_orphans: bool = False) -> tuple[int, ...]:
        """Remove ``dead``: tombstone it, then take over the tokens whose heir we are.

        Returns the tokens we inherited (often none: the heir is usually someone else, who takes over
        when the tombstone reaches it). Idempotent. Refused (``last-owner``) if no live owner would be
        left; ``adopt_orphans`` then makes us take the whole ring, which, like Weave's rmpeer, is
        safe only if one peer does it: it is the one operation here that is not concurrency-safe.
        """
        self._require_live()
        _need(valid_peer_name(dead), "bad-name", repr(dead))
        _need(dead != self.own, "self", "a peer cannot rmpeer itself; use leave")
        if dead in self.state.removed and not (adopt_orphans and self.state.orphaned):
            return ()
        if dead not in self.state.owners():
            # Nothing to remove: a tombstone of a name that owns nothing here would only grow the ring
            # (reclaiming nodes that left, which own nothing, would otherwise fill it over the years).
            return ()
        _need(len(self.state.removed) < MAX_NAMES, "too-large", "removed set")
        tombstoned = RingState(self.range, self.state.seeded_by, self.state.tokens, self.state.removed | {dead})
        if tombstoned.orphaned:
            _need(adopt_orphans, "last-owner", f"removing {dead} would leave no live owner")
            tokens = tuple(
                Token(t.start, self.own, min(t.version + INHERIT_VERSION_JUMP, MAX_VERSION),
                      tombstoned.token_size(i))
                for i, t in enumerate(tombstoned.tokens)
            )
            self._commit(RingState(self.range, self.state.seeded_by, tokens, tombstoned.removed))
            return tuple(t.start for t in tokens)
        state, taken = _materialize(tombstoned, self.own)
        self._commit(state)
        return taken

    def leave(self, to: PeerName | None = None) -> tuple[int, ...]:
        """Hand every token we own to ``to``, or each to its natural heir (the owner of the nearest
        preceding token that is neither ours nor removed). Returns the tokens handed over.

        The caller must have no leases left: like a grant, the hand-over carries no lease records.
        """
        self._require_live()
        if to is not None:
            self._require_recipient(to)
        mine = [i for i, t in enumerate(self.state.tokens) if t.owner == self.own]
        if not mine:
            return ()
        if to is None:
            others = RingState(
                self.range, self.state.seeded_by, self.state.tokens, self.state.removed | {self.own}
            )
            heirs = others.heirs()
            _need(all(self.state.tokens[i].start in heirs for i in mine), "no-heir", "we own everything")
        else:
            heirs = {self.state.tokens[i].start: to for i in mine}
        tokens = list(self.state.tokens)
        for i in mine:
            t = tokens[i]
            tokens[i] = Token(t.start, heirs[t.start], t.version + 1, self.state.token_size(i))
        self._commit(RingState(self.range, self.state.seeded_by, tuple(tokens), self.state.removed))
        return tuple(tokens[i].start for i in mine)

    # -- remote state -------------------------------------------------------------------------------

    def _check_steps(self, remote: RingState) -> None:
        """Raise :class:`RingError` (``version-jump``, the whole state refused) if a token of ``remote``
        runs more than :data:`MAX_VERSION_STEP` ahead of ours (of 0 for a token new to us).

        The check is per token against what we hold, and honest histories never trip it: edits bump by
        one, an inheritance by :data:`INHERIT_VERSION_JUMP`. Every ring that carries such a jump was
        refused by every honest peer it reached first, so no honest relay spreads one.
        """
        for theirs in remote.tokens:
            mine = self.state.token_at(theirs.start)
            step = theirs.version - (mine.version if mine is not None else 0)
            _need(step <= MAX_VERSION_STEP, "version-jump", f"token {_ip(theirs.start)} v{theirs.version}")

    def check_remote(self, remote: RingState) -> None:
        """Raise :class:`RingError` if ``remote`` breaks an invariant or conflicts with what only we can
        know: our own tokens and the insides of our ranges."""
        remote.validate()
        _need(remote.range == self.range, "range-mismatch", f"{remote.range} vs {self.range}")
        _need(self.own not in remote.removed, "removed", "this peer was removed by rmpeer")
        ours = self.state
        for theirs in remote.tokens:
            mine = ours.token_at(theirs.start)
            if mine is not None:
                _need(
                    not (mine.owner == self.own and theirs.version > mine.version),
                    "newer-version-of-own-token",
                    f"{_ip(theirs.start)} v{theirs.version} > our v{mine.version}",
                )
            elif ours.seeded and ours.owner_of(theirs.start) == self.own:
                raise RingError(
                    "entry-in-my-range", f"{theirs.owner} has token {_ip(theirs.start)} inside our range"
                )

    def merge(self, remote: RingState) -> MergeResult:
        """Join ``remote`` into our state, then take over anything we have become heir of.

        Every token is taken at its higher version, whoever relayed it: IPAM gossip relies on second-hand
        propagation (a ring carries everything its sender heard), and taking an edit only from its author
        would leave a view behind for ever when the author dies before its broadcast reached everyone,
        which rmpeer then turns into two owners (docs/ipam.md §9). Refused whole: states that break an
        invariant, conflict with our own tokens (:meth:`check_remote`), jump a version by more than
        :data:`MAX_VERSION_STEP` (:meth:`_check_steps`), or whose join is too large (:func:`check_size`).

        On :class:`RingError` the rejection is counted under its reason and our state is untouched.
        """
        try:
            self.check_remote(remote)
            self._check_steps(remote)
            joined = self.state.join(remote)
            check_size(joined)
        except RingError as err:
            self.rejected[err.reason] += 1
            raise
        state, taken = _materialize(joined, self.own)
        before = self.owned_ranges()
        changed = self._commit(state)
        return MergeResult(changed, self.owned_ranges() != before, taken)


# -- encoding ---------------------------------------------------------------------------------------


def encode_ring(state: RingState) -> list[Any]:
    """Plain msgpack-able data: ``[format, range_start, range_size, seed, tokens, removed]`` with names
    as their six raw bytes and each token as ``[start, owner, version, free]``."""
    return [
        FORMAT_VERSION,
        state.range.start,
        state.range.size,
        [peer_name_to_bytes(n) for n in state.seeded_by],
        [[t.start, peer_name_to_bytes(t.owner), t.version, t.free] for t in state.tokens],
        [peer_name_to_bytes(n) for n in sorted(state.removed)],
    ]


_READ = StrictReader(RingDecodeError)
"""The shared strict checks and bounded unpack (:mod:`weaved.core.codec`), raising
:class:`RingDecodeError`."""
_dneed = _READ.need
_dint = _READ.integer
_dlist = _READ.array
_dname = _READ.name


def decode_ring(data: Any) -> RingState:
    """Parse :func:`encode_ring` output strictly. Raises :class:`RingDecodeError` and nothing else."""
    try:
        fields = _dlist(data, "ring", 6, 6)
        _dneed(fields[0] == FORMAT_VERSION and type(fields[0]) is int, "unsupported-version", repr(fields[0]))
        start = _dint(fields[1], 0, ADDRESS_SPACE - 1, "range start")
        size = _dint(fields[2], 1, ADDRESS_SPACE - start, "range size")
        seed = tuple(_dname(n, "seed name") for n in _dlist(fields[3], "seed", MAX_NAMES))
        tokens: list[Token] = []
        for raw in _dlist(fields[4], "tokens", MAX_TOKENS):
            t = _dlist(raw, "token", 4, 4)
            tokens.append(
                Token(
                    _dint(t[0], 0, ADDRESS_SPACE - 1, "token start"),
                    _dname(t[1], "owner"),
                    _dint(t[2], 1, MAX_VERSION, "version"),
                    _dint(t[3], 0, ADDRESS_SPACE, "free"),
                )
            )
        removed_list = [_dname(n, "removed name") for n in _dlist(fields[5], "removed", MAX_NAMES)]
        _dneed(removed_list == sorted(set(removed_list)), "bad-field", "removed must be sorted and distinct")
        state = RingState(AddressRange(start, size), seed, tuple(tokens), frozenset(removed_list))
        state.validate()
        return state
    except RingDecodeError:
        raise
    except RingError as err:
        raise RingDecodeError(err.reason, err.detail) from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise RingDecodeError("bad-field", type(exc).__name__) from None


def ring_to_bytes(state: RingState) -> bytes:
    packed: bytes = msgpack.packb(encode_ring(state), use_bin_type=True)
    return packed


def ring_from_bytes(data: bytes) -> RingState:
    """Unpack and :func:`decode_ring`, with msgpack's size limits set so that a small input cannot
    make us allocate a large structure. Raises :class:`RingDecodeError` and nothing else."""
    _dneed(isinstance(data, bytes | bytearray), "bad-field", "bytes expected")
    raw = _READ.unpack(data, max_size=MAX_ENCODED, max_str=64, max_array=MAX_TOKENS)
    return decode_ring(raw)
