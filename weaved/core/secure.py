"""The sealed control transport: sessions per remote address, made by the handshake, under the mesh.

Theory of operation
-------------------
With a password, :class:`~weaved.core.mesh.MeshPeer` never puts a control message on the wire in clear.
Everything it sends to an address goes through :meth:`SecureTransport.seal`, and every datagram that
arrives goes through :meth:`SecureTransport.open` before it is decoded. Four kinds of datagram exist,
told apart by the first byte (a clear msgpack envelope starts with ``0x96``, so none of these is ever
mistaken for one)::

    INIT      01 | sender index (4) | ephemeral (32) | sealed claim + tag     first handshake message
    RESPONSE  02 | sender index (4) | receiver index (4) | ephemeral (32) | sealed claim + tag
    SEALED    04 | receiver index (4) | counter (8) | ChaCha20-Poly1305(message) + tag (AAD: the 13 bytes)
    NOTICE    05 | code (1)                                                     clear, unauthenticated hint

A *session* is one finished handshake with one address; indexes (random, 32 bits, chosen by each side for
its own receiving end, as WireGuard does) let a datagram name the session that opens it. A session is
bound to the name and UID the peer's handshake claim carried: :meth:`open` returns them with the message,
and the mesh drops a message whose envelope names anyone else, so nothing arriving on a session can speak
for another peer (a relayed payload's origin is the relay's own business, see ``core/mesh.py``).

Lifecycle, per address (:class:`Link`):

* sending with no usable session queues the datagram (a few, newest kept) and starts a handshake; a
  handshake that gets no answer is retried with a *fresh* first message every second while the mesh
  keeps wanting that address (a resent message would be refused as a replay);
* the initiator's session is usable at once; the responder's only once a datagram opened under it
  (the initiator sends an empty keep-alive right away), so a first message replayed from a capture, even
  to a responder that restarted and forgot the stamps it saw, never displaces the live session;
* the initiator rekeys after :data:`REKEY_AFTER` seconds (the responder does, if the initiator did not,
  30 s later); the previous session still opens for :data:`REJECT_AFTER` after it was made, so nothing in
  flight is lost; after that it is gone, and with it the keys: forward secrecy in time as well.

Refusals are counted (``dropped_<reason>``, ``handshake_<result>``) and reported once a minute per
address as an :class:`~weaved.core.events.AuthFailed` event ("wrong or missing password"). A NOTICE tells
the other side why it gets no answer: it is unauthenticated, so it only ever produces a log line or an
earlier handshake, never a state change a forger could want.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from weaved.core.events import AuthFailed
from weaved.core.guards import RateGate
from weaved.core.handshake import (
    Claim,
    Entropy,
    HandshakeError,
    Initiator,
    SessionKeys,
    decode_claim,
    encode_claim,
    respond,
)
from weaved.core.seal import COUNTER_LIMIT, TAG_SIZE, PeerSleeveKeys, ReplayWindow, SleeveKeys, nonce
from weaved.core.types import Endpoint, PeerName, PeerUID

REKEY_AFTER: Final = 120.0
"""Seconds after which the initiator makes a new session (WireGuard's REKEY_AFTER_TIME)."""
RESPONDER_REKEY_AFTER: Final = REKEY_AFTER + 30.0
REJECT_AFTER: Final = 180.0
"""A session older than this neither seals nor opens anything (WireGuard's REJECT_AFTER_TIME)."""
REKEY_AFTER_MESSAGES: Final = 1 << 60
RETRY_INTERVAL: Final = 1.0
"""Between two first messages to an address that did not answer."""
WANT_WINDOW: Final = 5.0
"""How long a handshake keeps being retried after the mesh last wanted to send to that address."""
QUEUE_LIMIT: Final = 16
"""Datagrams kept per address while its handshake runs (the newest: the mesh resends what matters)."""
MAX_LINKS: Final = 4096
MAX_STAMPS: Final = 4096
LOG_INTERVAL: Final = 60.0
"""One AuthFailed event per address and reason per this many seconds."""
NOTICE_INTERVAL: Final = 1.0


class Kind(IntEnum):
    INIT = 1
    RESPONSE = 2
    SEALED = 4
    NOTICE = 5


class Notice(IntEnum):
    """Codes of the clear NOTICE: why the other side gets no answer (a hint, never authenticated)."""

    AUTH = 1
    """Your first handshake message did not open here: wrong password."""
    PASSWORD_REQUIRED = 2
    """You sent a clear datagram; we only speak sealed ones (we have a password, you have none)."""
    NO_SESSION = 3
    """No session of ours has the index you used (we restarted): make a new one."""
    NO_PASSWORD = 4
    """You sent a handshake; we have no password (answered by a peer without one)."""


KINDS: Final = frozenset(int(k) for k in Kind)
INIT_HEADER = struct.Struct("!BI")
RESPONSE_HEADER = struct.Struct("!BII")
SEALED_HEADER = struct.Struct("!BIQ")
SEALED_OVERHEAD: Final = SEALED_HEADER.size + TAG_SIZE

NOTICE_TEXT: Final = {
    Notice.AUTH: "wrong or missing password",
    Notice.PASSWORD_REQUIRED: "wrong or missing password (we have one, the peer sent in clear)",
    Notice.NO_PASSWORD: "wrong or missing password (the peer has none)",
}


def notice(code: Notice) -> bytes:
    return bytes((Kind.NOTICE, code))


@dataclass(frozen=True)
class SecureConfig:
    """What the transport needs besides the identity: the key, randomness and whom to trust for data."""

    psk: bytes
    entropy: Entropy
    stamp_base: int
    """Wall-clock milliseconds at start: handshake stamps grow across restarts (see handshake.py)."""
    trusted_subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Peers at these addresses get unsealed sleeve data when they trust us too (``--trusted-subnets``)."""

    def __repr__(self) -> str:
        return f"SecureConfig(trusted_subnets={self.trusted_subnets})"


@dataclass
class Session:
    """One finished handshake with one address, bound to the peer it authenticated."""

    local_index: int
    remote_index: int
    address: Endpoint
    name: PeerName
    uid: PeerUID
    keys: SessionKeys
    created: float
    initiator: bool
    confirmed: bool
    plain_data: bool
    """Both ends trust each other's subnet: sleeve data goes unsealed (control stays sealed)."""
    send_aead: ChaCha20Poly1305 = field(init=False, repr=False)
    recv_aead: ChaCha20Poly1305 = field(init=False, repr=False)
    counter: int = 0
    window: ReplayWindow = field(default_factory=ReplayWindow)

    def __post_init__(self) -> None:
        self.send_aead = ChaCha20Poly1305(self.keys.control_send)
        self.recv_aead = ChaCha20Poly1305(self.keys.control_recv)

    def sleeve_keys(self) -> SleeveKeys:
        return SleeveKeys(self.local_index, self.remote_index, self.keys.sleeve_send, self.keys.sleeve_recv)


@dataclass
class Pending:
    """A handshake we started and that has not been answered yet."""

    index: int
    initiator: Initiator
    next_retry: float


@dataclass
class Link:
    """Everything about one remote address."""

    address: Endpoint
    current: Session | None = None
    previous: Session | None = None
    unconfirmed: Session | None = None
    pending: Pending | None = None
    queue: deque[bytes] = field(default_factory=lambda: deque(maxlen=QUEUE_LIMIT))
    wanted_until: float = 0.0
    """The mesh sent to this address recently: keep handshaking until then."""
    last_nudge: float = float("-inf")

    def sessions(self) -> Iterable[Session]:
        return (s for s in (self.current, self.previous, self.unconfirmed) if s is not None)


@dataclass(frozen=True, slots=True)
class Opened:
    """An authenticated control datagram and the peer its session is bound to."""

    data: bytes
    name: PeerName
    uid: PeerUID


class SecureTransport:
    """Sessions and sealing for one peer; see the module docstring. Sans-IO: ``send`` queues a datagram."""

    def __init__(self, name: PeerName, uid: PeerUID, config: SecureConfig, send: Callable[[bytes, Endpoint], None],
                 emit: Callable[[AuthFailed], None], counters: Counter[str], now: float) -> None:
        self._name = name
        self._uid = uid
        self._config = config
        self._send = send
        self._emit = emit
        self.counters = counters
        self._start = now
        self._stamp = config.stamp_base
        self._links: dict[Endpoint, Link] = {}
        self._by_index: dict[int, Session] = {}
        self._pending: dict[int, tuple[Link, Pending]] = {}
        self._stamps: dict[PeerName, int] = {}
        self._said = RateGate(MAX_LINKS, keep=LOG_INTERVAL)

    # --- sending ----------------------------------------------------------------------------------

    def seal(self, data: bytes, address: Endpoint, now: float) -> None:
        """Send ``data`` sealed to ``address``, or queue it behind a handshake."""
        link = self._link(address)
        link.wanted_until = now + WANT_WINDOW
        session = self._usable(link, now)
        if session is None:
            link.queue.append(data)
            if link.pending is None:
                self._initiate(link, now)
            return
        self._seal_with(session, data)
        self._maybe_rekey(link, session, now)

    def _seal_with(self, session: Session, data: bytes) -> None:
        header = SEALED_HEADER.pack(Kind.SEALED, session.remote_index, session.counter)
        sealed = session.send_aead.encrypt(nonce(session.counter), data, header)
        session.counter += 1
        self._send(header + sealed, session.address)

    def _usable(self, link: Link, now: float) -> Session | None:
        session = link.current
        if session is None or now >= session.created + REJECT_AFTER or session.counter >= COUNTER_LIMIT:
            return None
        return session

    def _maybe_rekey(self, link: Link, session: Session, now: float) -> None:
        if link.pending is not None:
            return
        due = REKEY_AFTER if session.initiator else RESPONDER_REKEY_AFTER
        if now >= session.created + due or session.counter >= REKEY_AFTER_MESSAGES:
            self.counters["rekeys"] += 1
            self._initiate(link, now)

    def _next_stamp(self, now: float) -> int:
        self._stamp = max(self._stamp + 1, self._config.stamp_base + int((now - self._start) * 1000))
        return self._stamp

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._config.entropy(4), "big")
            if index not in self._by_index and index not in self._pending:
                return index

    def _initiate(self, link: Link, now: float) -> None:
        if link.pending is not None:
            self._pending.pop(link.pending.index, None)
        index = self._new_index()
        claim = Claim(self._name, self._uid, index, self._next_stamp(now), self._trusts(link.address))
        initiator = Initiator(self._config.psk, encode_claim(claim), self._config.entropy)
        link.pending = Pending(index, initiator, now + RETRY_INTERVAL)
        self._pending[index] = (link, link.pending)
        self.counters["handshake_initiated"] += 1
        self._send(INIT_HEADER.pack(Kind.INIT, index) + initiator.message, link.address)

    # --- receiving --------------------------------------------------------------------------------

    def open(self, data: bytes, source: Endpoint, now: float) -> Opened | None:
        """The control datagram ``data`` carried, with its bound peer; None when there is nothing to
        decode (a handshake step, a keep-alive, or a datagram dropped and counted)."""
        kind = data[0] if data else -1
        if kind == Kind.SEALED:
            return self._on_sealed(data, source, now)
        if kind == Kind.INIT:
            self._on_init(data, source, now)
        elif kind == Kind.RESPONSE:
            self._on_response(data, source, now)
        elif kind == Kind.NOTICE:
            self._on_notice(data, source, now)
        else:
            # A clear envelope (a peer without a password) or noise: we only speak sealed datagrams.
            self._drop("unsealed")
            self._refuse(source, "wrong or missing password (the peer sent in clear: it has none)",
                         Notice.PASSWORD_REQUIRED, now)
        return None

    def _on_sealed(self, data: bytes, source: Endpoint, now: float) -> Opened | None:
        if len(data) < SEALED_OVERHEAD:
            self._drop("short")
            return None
        _, index, counter = SEALED_HEADER.unpack_from(data)
        session = self._by_index.get(index)
        if session is None:
            self._drop("no-session")
            if self._said.allow((source, "no-session"), now, NOTICE_INTERVAL):
                self._send(notice(Notice.NO_SESSION), source)
            return None
        if session.address != source:
            self._drop("address-mismatch")
            return None
        if now >= session.created + REJECT_AFTER:
            self._drop("expired")
            return None
        if not session.window.fresh(counter):
            self._drop("replay")
            return None
        header = data[:SEALED_HEADER.size]
        try:
            plain = session.recv_aead.decrypt(nonce(counter), data[SEALED_HEADER.size:], header)
        except InvalidTag:
            self._drop("auth")
            return None
        session.window.mark(counter)
        if not session.confirmed:
            self._confirm(session)
        if not plain:
            return None  # a keep-alive that confirms a fresh session
        return Opened(plain, session.name, session.uid)

    def _on_init(self, data: bytes, source: Endpoint, now: float) -> None:
        if len(data) < INIT_HEADER.size:
            self._drop("short")
            return
        _, their_index = INIT_HEADER.unpack_from(data)
        local_index = self._new_index()
        seen: list[Claim] = []

        def answer(payload: bytes) -> bytes:
            claim = decode_claim(payload)
            if claim.index != their_index:
                raise HandshakeError("bad-handshake", "index does not match its sealed copy")
            if claim.stamp <= self._stamps.get(claim.name, -1):
                raise HandshakeError("replay", "not newer than the last handshake of that peer")
            seen.append(claim)
            return encode_claim(Claim(self._name, self._uid, local_index, 0, self._trusts(source)))

        try:
            _, reply, keys = respond(self._config.psk, data[INIT_HEADER.size:], answer, self._config.entropy)
        except HandshakeError as exc:
            self._handshake_failed(exc, source, now)
            return
        claim = seen[0]
        self._remember_stamp(claim.name, claim.stamp)
        link = self._link(source)
        session = Session(local_index, their_index, source, claim.name, claim.uid, keys, now, initiator=False,
                          confirmed=False, plain_data=claim.trusts_you and self._trusts(source))
        if link.unconfirmed is not None:
            self._by_index.pop(link.unconfirmed.local_index, None)
        link.unconfirmed = session
        self._by_index[local_index] = session
        self.counters["handshake_answered"] += 1
        self._send(RESPONSE_HEADER.pack(Kind.RESPONSE, local_index, their_index) + reply, source)

    def _on_response(self, data: bytes, source: Endpoint, now: float) -> None:
        if len(data) < RESPONSE_HEADER.size:
            self._drop("short")
            return
        _, their_index, our_index = RESPONSE_HEADER.unpack_from(data)
        found = self._pending.get(our_index)
        if found is None or found[0].address != source:
            self._drop("unexpected-response")
            return
        link, pending = found
        try:
            payload, keys = pending.initiator.finish(data[RESPONSE_HEADER.size:])
            claim = decode_claim(payload)
            if claim.index != their_index:
                raise HandshakeError("bad-handshake", "index does not match its sealed copy")
        except HandshakeError as exc:
            # Not a password mismatch (a responder with another password cannot answer at all, it sends a
            # NOTICE): a forged or damaged answer. Drop and count it; the real answer may still come.
            self._drop(exc.reason)
            self.counters[f"handshake_{exc.reason}"] += 1
            return
        del self._pending[our_index]
        link.pending = None
        session = Session(our_index, their_index, source, claim.name, claim.uid, keys, now, initiator=True,
                          confirmed=True, plain_data=claim.trusts_you and self._trusts(source))
        self._by_index[our_index] = session
        self._promote(link, session)
        self.counters["handshake_ok"] += 1
        queued = list(link.queue)
        link.queue.clear()
        for datagram in queued:
            self._seal_with(session, datagram)
        if not queued:
            self._seal_with(session, b"")  # confirms the session to the responder

    def _on_notice(self, data: bytes, source: Endpoint, now: float) -> None:
        code = data[1] if len(data) == 2 else 0
        link = self._links.get(source)
        if code == Notice.NO_SESSION and link is not None and link.current is not None:
            # The other side forgot our session (it restarted): handshake again, at most once a second.
            if link.pending is None and now - link.last_nudge >= RETRY_INTERVAL:
                link.last_nudge = now
                self._initiate(link, now)
            return
        if code in NOTICE_TEXT and link is not None and link.pending is not None:
            self.counters["handshake_refused"] += 1
            self._report(source, NOTICE_TEXT[Notice(code)], now)
            return
        self._drop("unexpected-notice")

    def _handshake_failed(self, exc: HandshakeError, source: Endpoint, now: float) -> None:
        self._drop(exc.reason)
        self.counters[f"handshake_{exc.reason}"] += 1
        if exc.reason == "auth":
            self._refuse(source, "wrong or missing password", Notice.AUTH, now)

    def _refuse(self, source: Endpoint, why: str, code: Notice, now: float) -> None:
        """Tell the log (once a minute per address) and the other side (once a second) why we refuse."""
        self._report(source, why, now)
        if self._said.allow((source, f"notice-{int(code)}"), now, NOTICE_INTERVAL):
            self._send(notice(code), source)

    def _report(self, source: Endpoint, why: str, now: float) -> None:
        if self._said.allow((source, why), now, LOG_INTERVAL):
            self._emit(AuthFailed(str(source), why))

    def _confirm(self, session: Session) -> None:
        session.confirmed = True
        link = self._links.get(session.address)
        if link is None:
            return
        if link.unconfirmed is session:
            link.unconfirmed = None
        self._promote(link, session)

    def _promote(self, link: Link, session: Session) -> None:
        if link.current is not None and link.current is not session:
            if link.previous is not None:
                self._by_index.pop(link.previous.local_index, None)
            link.previous = link.current
        link.current = session

    def _remember_stamp(self, name: PeerName, stamp: int) -> None:
        self._stamps.pop(name, None)
        self._stamps[name] = stamp
        if len(self._stamps) > MAX_STAMPS:
            del self._stamps[next(iter(self._stamps))]

    def _drop(self, reason: str) -> None:
        self.counters[f"dropped_{reason}"] += 1

    def _trusts(self, address: Endpoint) -> bool:
        if not self._config.trusted_subnets:
            return False
        ip = ipaddress.ip_address(address.host)
        return any(ip in net for net in self._config.trusted_subnets)

    def _link(self, address: Endpoint) -> Link:
        link = self._links.get(address)
        if link is None:
            if len(self._links) >= MAX_LINKS:
                self._evict()
            link = self._links[address] = Link(address)
        return link

    def _evict(self) -> None:
        """Drop the links with no session (the oldest first): what forged traffic can make us hold."""
        for address, link in list(self._links.items()):
            if link.current is None and len(self._links) >= MAX_LINKS // 2:
                self._forget(address, link)
        while len(self._links) >= MAX_LINKS:
            address, link = next(iter(self._links.items()))
            self._forget(address, link)

    def _forget(self, address: Endpoint, link: Link) -> None:
        for session in link.sessions():
            self._by_index.pop(session.local_index, None)
        if link.pending is not None:
            self._pending.pop(link.pending.index, None)
        del self._links[address]

    # --- time -------------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        for address, link in list(self._links.items()):
            for session in list(link.sessions()):
                if now >= session.created + REJECT_AFTER:
                    self._expire(link, session)
            pending = link.pending
            if pending is not None and now >= pending.next_retry:
                if now < link.wanted_until:
                    self.counters["handshake_retried"] += 1
                    self._initiate(link, now)
                else:
                    self.counters["handshake_timeout"] += 1
                    self._pending.pop(pending.index, None)
                    link.pending = None
                    link.queue.clear()
            if link.current is None and link.pending is None and link.unconfirmed is None and link.previous is None:
                del self._links[address]

    def _expire(self, link: Link, session: Session) -> None:
        self._by_index.pop(session.local_index, None)
        if link.current is session:
            link.current = None
        if link.previous is session:
            link.previous = None
        if link.unconfirmed is session:
            link.unconfirmed = None

    def next_deadline(self) -> float | None:
        deadlines = []
        for link in self._links.values():
            if link.pending is not None:
                deadlines.append(link.pending.next_retry)
            deadlines.extend(s.created + REJECT_AFTER for s in link.sessions())
        return min(deadlines, default=None)

    # --- what others read -------------------------------------------------------------------------

    def session(self, address: Endpoint) -> Session | None:
        link = self._links.get(address)
        return link.current if link is not None else None

    def sleeve_keys(self, address: Endpoint) -> PeerSleeveKeys | None:
        """The sleeve keys for the neighbour at ``address``; None when its data goes unsealed (trusted
        subnet) or no session exists yet."""
        link = self._links.get(address)
        if link is None or link.current is None or link.current.plain_data:
            return None
        previous = link.previous.sleeve_keys() if link.previous is not None else None
        return PeerSleeveKeys(link.current.sleeve_keys(), previous)

    @property
    def trusted_subnets(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return self._config.trusted_subnets

