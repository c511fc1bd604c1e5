"""MeshPeer: the sans-IO state machine of one weaved peer's control plane.

Theory of operation
-------------------
The adapter owns a UDP socket and a clock and drives this object with four calls, aioquic-style:

* :meth:`MeshPeer.receive_datagram` for each datagram that arrives,
* :meth:`MeshPeer.handle_timer` once :meth:`MeshPeer.next_deadline` has passed,
* :meth:`MeshPeer.datagrams_to_send` to collect what to send (after every call),
* :meth:`MeshPeer.events` to collect what to log.

Nothing here reads a clock, opens a socket or draws global randomness: ``now`` is an argument and the
random generator is injected, which is what lets ``tests/sim`` run hundreds of peers, seeded, in one
thread with virtual time.

Pieces, each in its own module: :mod:`~weaved.core.wire` (codec), :mod:`~weaved.core.connections`
(handshake records and backoff), :mod:`~weaved.core.topology` (the CRDT), :mod:`~weaved.core.routes`
(BFS next hops and broadcast trees) and :mod:`~weaved.core.gossip` (fan-out, chunking, digests). This
module wires them together: the handshake, heartbeats and failure detection, the connection maker,
gossip timers, relaying, and the status snapshot.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from weaved.core import gossip
from weaved.core.connections import Backoff, Connection, ConnState, Target, TargetSource
from weaved.core.entries import ConnectionEntry, PeerEntry
from weaved.core.events import (
    AuthFailed,
    ConnectionStateChanged,
    MeshEvent,
    NameCollision,
    PeerJoined,
    PeerLeft,
    PeerRestarted,
    RelayDelivered,
)
from weaved.core.guards import AnswerBudget, BroadcastFilter, RateGate
from weaved.core.routes import broadcast_children
from weaved.core.seal import PeerSleeveKeys
from weaved.core.secure import KINDS as SEALED_KINDS
from weaved.core.secure import Kind as SecureKind
from weaved.core.secure import Notice, SecureConfig, SecureTransport, notice
from weaved.core.status import ConnectionStatus, MeshStatus, PeerConnectionStatus, PeerStatus
from weaved.core.topology import MAX_UNREACHABLE, Topology
from weaved.core.types import SHORT_ID_SPACE, Endpoint, PeerIdentity, PeerName, PeerUID, ShortID
from weaved.core.wire import (
    MAX_TTL,
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    Body,
    DecodeError,
    DigestItem,
    Goodbye,
    GossipDigest,
    GossipRequest,
    GossipSummary,
    GossipUpdate,
    Heartbeat,
    Hello,
    HelloAck,
    Message,
    Reject,
    Relay,
    decode,
    encode,
)

OVERLAYS: tuple[str, ...] = ("sleeve",)

ENVELOPE_MIN, ENVELOPE_MAX = 16, 32
"""Bounds on the bytes around a body (magic, version, type, name, UID): what a source earns is counted
low, what we answer high, so the 4x bound holds on real bytes."""
DIGEST_ITEM_MIN = 11
"""Smallest encoded digest item (array header, 6-byte name, two one-byte integers)."""

MAX_LEARNT_TARGETS = 4096
"""Dial targets learnt from gossip (one per peer address in an honest mesh): more means forged entries."""


@dataclass(frozen=True)
class MeshConfig:
    """Timers and limits. Defaults suit a LAN or a cluster; every knob is here so tests can shrink it."""

    port: int = 6783
    conn_limit: int = 200
    """Most connections (established or in progress) we hold, like Weave's CONN_LIMIT. A peer that the
    reaches nobody yet is still accepted, up to a quarter more, so a late joiner is not stranded."""
    heartbeat_interval: float = 1.0
    dead_after: float = 6.0
    """Silence after which an established connection is declared failed."""
    hello_interval: float = 0.5
    """HELLO retransmission while connecting (UDP may lose it)."""
    handshake_timeout: float = 5.0
    gossip_delay: float = 0.2
    """Coalescing window: changes within it go out in one round."""
    anti_entropy_interval: float = 5.0
    max_pending: int = 16
    """Inbound handshakes awaiting confirmation at once; bounds what forged HELLOs can occupy."""
    join_grace: float = 10.0
    """How long after our first connection we count as settled and take isolated peers past the limit."""
    settle_delay: float = 0.2
    """Routes, join/leave events and garbage collection run this long after a burst of changes."""
    backoff: Backoff = field(default_factory=Backoff)
    overlays: tuple[str, ...] = OVERLAYS
    """What we advertise in HELLO/HELLO_ACK; the data path adds its port (``sleeve:6785``)."""


class MeshPeer:
    """One peer's mesh control plane. See the module docstring for how an adapter drives it."""

    def __init__(
        self,
        identity: PeerIdentity,
        config: MeshConfig,
        rng: random.Random,
        now: float,
        initial_version: int = 1,
        secure: SecureConfig | None = None,
    ) -> None:
        """``initial_version`` should grow across restarts (the daemon passes wall-clock ms) so a new
        incarnation supersedes the old entry at once; if it does not, the peer bumps past it anyway.
        ``secure`` (a password is set): every datagram goes through a :class:`SecureTransport`."""
        self.identity = identity
        self.config = config
        self._rng = rng
        self._conns: dict[Endpoint, Connection] = {}
        self._targets: dict[Endpoint, Target] = {}
        self._out: list[tuple[bytes, Endpoint]] = []
        self._events: list[MeshEvent] = []
        self.counters: Counter[str] = Counter()
        self._leaving = False
        self.topology = Topology(
            PeerEntry(identity.name, identity.nickname, identity.uid, initial_version, identity.short_id, ())
        )
        self._pending_gossip: set[PeerName] = set()
        self._gossip_source: dict[PeerName, PeerName] = {}
        """For each pending entry, the neighbour it came from (skipped when forwarding it)."""
        self._gossip_due: float | None = None
        self._settle_due: float | None = None
        self._next_anti_entropy = now + config.anti_entropy_interval * rng.random()
        self._reachable: dict[PeerName, PeerUID] = {}
        self._said_goodbye: set[PeerName] = set()
        self._connected_since: float | None = None
        self._rate = RateGate(keep=60.0)
        self._own_conflicts: dict[PeerUID, list[float]] = {}
        """Recent bumps forced by another incarnation of our name, by its UID (a live clone keeps going)."""
        """When we last went from no established connection to one (start of being 'settled')."""
        self._sizes = gossip.EntrySizeCache()
        self._now = now
        """The latest time an adapter call gave us: what sealing (session age, rekeying) is judged by."""
        self._transport = None if secure is None else SecureTransport(
            identity.name, identity.uid, secure, self._send_raw, self._emit, self.counters, now)
        self._budget = AnswerBudget()
        self._broadcasts = BroadcastFilter()
        self._clock_base = (initial_version, now)
        """Versions start at wall-clock ms: our version then plus the time since is our clock in ms."""
        self._changed_since_settle: set[PeerName] = set()
        self._budget_cap_value = 0

    # --- adapter interface ------------------------------------------------------------------------

    def add_target(self, address: Endpoint, now: float) -> None:
        """Dial ``address`` (from ``--peer`` or ``weaved connect``) and keep it connected."""
        self._now = now
        target = self._targets.get(address)
        if target is None:
            self._targets[address] = Target(address, TargetSource.DIRECT, next_attempt=now)
        else:
            target.source = TargetSource.DIRECT
            target.next_attempt = min(target.next_attempt, now)
            target.give_up = False

    def forget_target(self, address: Endpoint) -> None:
        """Stop (re)dialling ``address``; an existing connection stays until it fails."""
        self._targets.pop(address, None)

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        self._now = now
        self.counters["rx_datagrams"] += 1
        self.counters["rx_bytes"] += len(data)
        bound: tuple[PeerName, PeerUID] | None = None
        if self._transport is not None:
            opened = self._transport.open(data, source, now)
            if opened is None:
                return
            data, bound = opened.data, (opened.name, opened.uid)
        elif data[:1] and data[0] in SEALED_KINDS:
            self._sealed_without_password(data, source, now)
            return
        try:
            message = decode(data)
        except DecodeError as exc:
            self._drop(exc.reason)
            return
        if self._leaving:
            return
        if bound is not None and bound != (message.sender, message.sender_uid):
            # A member speaking for another peer: its session is bound to the name its handshake proved.
            self._drop("identity-mismatch")
            return
        self._dispatch(message, source, now)

    def _sealed_without_password(self, data: bytes, source: Endpoint, now: float) -> None:
        """A handshake or sealed datagram reached us, and we have no password: say so, once a minute in
        the log and once a second to the sender (its log then says the same)."""
        self._drop("password-mismatch")
        if self._rate_ok(("auth-log", source), now, 60.0):
            self._events.append(AuthFailed(str(source), "wrong or missing password (the peer has one, we none)"))
        if data[0] != SecureKind.NOTICE and self._rate_ok(("auth-notice", source), now, 1.0):
            self._send_raw(notice(Notice.NO_PASSWORD), source)

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self._leaving:
            return
        if self._transport is not None:
            self._transport.handle_timer(now)
        self._tick_connections(now)
        self._dial_targets(now)
        if self._settle_due is not None and now >= self._settle_due:
            self._settle(now)
        if self._gossip_due is not None and now >= self._gossip_due:
            self._flush_gossip()
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self.config.anti_entropy_interval
            neighbours = self._established()
            if neighbours:
                self._send_summary(self._rng.choice(neighbours))

    def next_deadline(self) -> float | None:
        if self._leaving:
            return None
        deadlines = [self._next_anti_entropy]
        if self._gossip_due is not None:
            deadlines.append(self._gossip_due)
        if self._settle_due is not None:
            deadlines.append(self._settle_due)
        for conn in self._conns.values():
            deadlines.append(conn.next_send)
            if conn.state is ConnState.ESTABLISHED:
                deadlines.append(conn.last_received + self.config.dead_after)
            else:
                deadlines.append(conn.handshake_deadline)
        if len(self._conns) < self.config.conn_limit:
            deadlines.extend(t.next_attempt for t in self._targets.values() if self._dialable(t))
        if self._transport is not None and (secure_due := self._transport.next_deadline()) is not None:
            deadlines.append(secure_due)
        return min(deadlines)

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[MeshEvent]:
        events, self._events = self._events, []
        return events

    def leave(self, now: float) -> None:
        """Say goodbye to every neighbour and stop; peers drop us at once instead of timing out."""
        self._now = now
        for conn in list(self._conns.values()):
            if conn.remote is not None:
                self._send(conn.address, Goodbye(conn.peer_token))
            self._remove_connection(conn, "we are leaving", now, publish=False)
        self._leaving = True

    def send_relay(self, dst: PeerName | None, channel: str, payload: bytes) -> bool:
        """Route an application payload to ``dst`` (None: every reachable peer). False if no route."""
        relay = Relay(self.identity.name, dst, channel, MAX_TTL, payload)
        if dst is None:
            self._forward_broadcast(relay)
            return True
        return self._forward_unicast(relay)

    def neighbours(self) -> dict[PeerName, tuple[Endpoint, tuple[str, ...]]]:
        """Established neighbours: their control address and the overlays they advertised (the data path
        derives their sleeve address from these)."""
        return {c.remote.name: (c.address, c.overlays) for c in self._established() if c.remote is not None}

    @property
    def encrypted(self) -> bool:
        """Whether a password is set: the control plane is sealed and the sleeve seals data to every
        neighbour in :meth:`sleeve_keys` (a neighbour missing there, on a trusted subnet, gets plain frames)."""
        return self._transport is not None

    def sleeve_keys(self) -> dict[PeerName, PeerSleeveKeys]:
        """Sleeve keys of each established neighbour whose data is sealed (see :mod:`weaved.core.seal`);
        they change at every rekey, the previous session still opening frames for a while."""
        if self._transport is None:
            return {}
        keys = {}
        for conn in self._established():
            assert conn.remote is not None
            found = self._transport.sleeve_keys(conn.address)
            if found is not None:
                keys[conn.remote.name] = found
        return keys

    def _data_mode(self, conn: Connection) -> str:
        """Weave's words for how a connection carries data: ``encrypted sleeve`` or ``sleeve``."""
        if self._transport is None:
            return "sleeve"
        session = self._transport.session(conn.address)
        return "sleeve" if session is not None and session.plain_data else "encrypted sleeve"

    def status(self, now: float) -> MeshStatus:
        hops = self.topology.next_hops()
        nick = {n: e.nickname for n, e in self.topology.entries.items()}
        peers = [
            PeerStatus(
                name=e.name, nickname=e.nickname, uid=e.uid, version=e.version, short_id=e.short_id,
                connections=[
                    PeerConnectionStatus(c.remote, nick.get(c.remote), str(c.address), c.outbound, c.established)
                    for c in e.connections
                ],
                next_hop=hops.get(e.name),
            )
            for e in sorted(self.topology.entries.values(), key=lambda e: e.name)
        ]
        connections = [
            ConnectionStatus(
                address=str(c.address), outbound=c.outbound, state=c.state.value,
                peer_name=c.remote.name if c.remote else None,
                peer_nickname=c.remote.nickname if c.remote else None,
                info=f"{self._data_mode(c)}, protocol {c.protocol_version}" if c.state is ConnState.ESTABLISHED
                else "",
            )
            for c in sorted(self._conns.values(), key=lambda c: c.address)
        ]
        for t in sorted(self._targets.values(), key=lambda t: t.address):
            if t.address in self._conns or t.is_self or not t.last_error:
                continue
            retry = "not retrying" if t.give_up else f"retry in {max(0.0, t.next_attempt - now):.1f}s"
            connections.append(ConnectionStatus(str(t.address), True, "failed", t.known_name,
                                                nick.get(t.known_name) if t.known_name else None,
                                                f"{t.last_error}, {retry}"))
        return MeshStatus(
            name=self.identity.name, nickname=self.identity.nickname, uid=self.identity.uid,
            short_id=self.topology.own.short_id, protocol=f"weaved {PROTOCOL_MIN}..{PROTOCOL_MAX}",
            port=self.config.port, conn_limit=self.config.conn_limit, peers=peers, connections=connections,
            targets=[str(t.address) for t in sorted(self._targets.values(), key=lambda t: t.address)
                     if not t.is_self],
            counters=dict(self.counters),
            encryption="enabled" if self._transport is not None else "disabled",
            trusted_subnets=[str(n) for n in self._transport.trusted_subnets] if self._transport is not None else [],
        )

    # --- sending ----------------------------------------------------------------------------------

    def _send(self, address: Endpoint, body: Body, version: int = PROTOCOL_MAX) -> None:
        data = encode(Message(version, self.identity.name, self.identity.uid, body))
        if isinstance(body, GossipUpdate | GossipSummary | GossipDigest | GossipRequest):
            self.counters["tx_gossip_bytes"] += len(data)
        if self._transport is not None:
            self._transport.seal(data, address, self._now)
        else:
            self._send_raw(data, address)

    def _send_raw(self, data: bytes, address: Endpoint) -> None:
        """Every datagram that leaves, sealed or not, passes here."""
        self._out.append((data, address))
        self.counters["tx_datagrams"] += 1
        self.counters["tx_bytes"] += len(data)

    def _emit(self, event: MeshEvent) -> None:
        self._events.append(event)

    def _drop(self, reason: str) -> None:
        self.counters[f"dropped_{reason}"] += 1

    def _hello_ack(self, conn: Connection) -> HelloAck:
        """Our answer on ``conn``: with our token and theirs echoed, if their HELLO carried one."""
        token = conn.local_token if conn.tokens else None
        return HelloAck(conn.protocol_version, self.identity.nickname, self.topology.own.short_id,
                        self.config.overlays, token, conn.peer_token)

    def _rate_ok(self, key: tuple[str, Endpoint], now: float, interval: float) -> bool:
        """At most one answer per ``key`` per ``interval``: replies that a forged datagram can trigger
        must not turn us into an amplifier. The table is bounded; when full, old keys are dropped."""
        if self._rate.allow(key, now, interval):
            return True
        self._drop("rate-limited")
        return False

    def _hello(self, conn: Connection) -> Hello:
        return Hello(PROTOCOL_MIN, PROTOCOL_MAX, self.identity.nickname, self.topology.own.short_id,
                     self.config.overlays, len(self.topology.next_hops()), conn.local_token)

    def _new_token(self) -> int:
        return self._rng.getrandbits(64)

    def _clock_ms(self, now: float) -> int:
        """Our wall clock in ms, on the scale versions start at (the daemon starts at wall-clock ms)."""
        version, since = self._clock_base
        return version + int(max(0.0, now - since) * 1000)

    # --- receiving --------------------------------------------------------------------------------

    def _dispatch(self, message: Message, source: Endpoint, now: float) -> None:
        if message.sender == self.identity.name:
            self._from_own_name(message, source, now)
            return
        body = message.body
        if isinstance(body, Hello):
            self._on_hello(message, body, source, now)
            return
        if isinstance(body, HelloAck):
            self._on_hello_ack(message, body, source, now)
            return
        if isinstance(body, Reject):
            self._on_reject(message, body, source, now)
            return
        conn = self._conns.get(source)
        if conn is None or conn.remote is None or conn.remote.name != message.sender \
                or conn.remote.uid != message.sender_uid:
            self._drop("unknown-sender")
            if isinstance(body, Heartbeat) and self._rate_ok(("unknown", source), now, 1.0):
                # The sender believes in a connection we do not have (we restarted): make it redial now.
                self._send(source, Reject("unknown-connection", "no connection with you; please reconnect"))
            return
        self._on_connection_message(conn, message, now)

    def _on_connection_message(self, conn: Connection, message: Message, now: float) -> None:
        """A datagram from the incarnation at the other end of ``conn`` (name, UID and address match)."""
        assert conn.remote is not None
        body = message.body
        if isinstance(body, Heartbeat | Goodbye) and conn.tokens and body.token != conn.local_token:
            # Only the peer that saw our HELLO or HELLO_ACK knows the token: anyone else merely spoofs
            # its address, and may neither cut the link nor keep a dead one alive.
            self._drop("bad-token")
            return
        if conn.state is ConnState.CONNECTING:
            self._drop("unexpected")
            return
        if not conn.tokens or isinstance(body, Heartbeat) or conn.state is ConnState.PENDING:
            # With tokens, only heartbeats (which carry ours) prove the peer alive: forged gossip in its
            # name must not keep a dead link up.
            conn.last_received = now
        if conn.tokens and isinstance(body, Heartbeat) and not conn.verified:
            conn.verified = True  # it received our token at this address
            if conn.state is ConnState.ESTABLISHED:
                self._grant_pull(conn, now)
                if conn.owed_digest:
                    # Its summary overtook the heartbeat that proves it: answer now.
                    conn.owed_digest = False
                    self._send_digest(conn.address, now)
        if conn.state is ConnState.PENDING:
            self._establish(conn, now, "handshake confirmed")
        self._budget.earn(conn.address, self._body_size(body, low=True), now, self._budget_cap())
        match body:
            case Heartbeat():
                pass
            case Goodbye():
                if len(self._said_goodbye) < 4 * self.config.conn_limit:
                    self._said_goodbye.add(conn.remote.name)
                self._remove_connection(conn, "peer left", now)
            case GossipUpdate():
                self._merge(body.entries, now, conn.remote.name)
            case GossipSummary():
                # A digest is as big as the topology: at most one per neighbour per half AE period.
                if body.digest_hash != self.topology.digest_hash() and self._rate_ok(
                        ("digest", conn.address), now, self.config.anti_entropy_interval / 2):
                    sent = self._send_digest(conn.address, now)
                    conn.owed_digest = not sent and conn.tokens and not conn.verified
            case GossipDigest():
                push, want = gossip.compare_digest(body.items, self.topology.entries)
                self._send_entries(conn.address, push, now)
                self._send_request(conn.address, want, now)
            case GossipRequest():
                entries = self.topology.entries
                self._send_entries(conn.address, [entries[n] for n in dict.fromkeys(body.names) if n in entries],
                                   now)
            case Relay():
                self._on_relay(body, now)

    # --- answer budget (see weaved.core.guards) ---------------------------------------------------

    def _body_size(self, body: Body, low: bool) -> int:
        """Bounds on the bytes of a datagram carrying ``body`` (the receive path does not pass them on,
        and encoding twice would cost the simulated network dearly): ``low`` for what a source earns,
        high for what we answer, so the 4x bound holds on real bytes. Entries are exact (cached)."""
        envelope = ENVELOPE_MIN if low else ENVELOPE_MAX
        match body:
            case GossipUpdate():
                return envelope + sum(self._sizes.size(e) for e in body.entries)
            case GossipDigest():
                return envelope + (DIGEST_ITEM_MIN if low else gossip.DIGEST_ITEM_SIZE) * len(body.items)
            case GossipRequest():
                return envelope + gossip.REQUEST_ITEM_SIZE * len(body.names)
            case Relay():
                return envelope + 20 + len(body.channel) + len(body.payload)
        return envelope + 16

    def _budget_cap(self) -> int:
        """Most credit one address may hold: about two full pulls of our view (digest and every entry),
        measured at each settle."""
        return self._budget_cap_value or 65_536

    def _measure_budget_cap(self) -> None:
        entries = self.topology.entries.values()
        pull = sum(self._sizes.size(e) + gossip.DIGEST_ITEM_SIZE for e in entries) + 1024
        self._budget_cap_value = max(65_536, 2 * pull)

    def _grant_pull(self, conn: Connection, now: float) -> None:
        """A peer that proved it receives at its address (it echoed our token) may pull our whole view
        at once, as a joining peer does; later answers are paid by what it sends."""
        self._budget.grant(conn.address, self._budget_cap() // 2, now)

    def _answer(self, address: Endpoint, body: Body, now: float) -> bool:
        """Send a gossip answer if ``address`` has the credit for it; False (and counted) if not."""
        if not self._budget.spend(address, self._body_size(body, low=False), now):
            self._drop("answer-budget")
            return False
        self._send(address, body)
        return True

    def _from_own_name(self, message: Message, source: Endpoint, now: float) -> None:
        if message.sender_uid == self.identity.uid:
            self._own_hello_came_back(message, source, now)
            return
        if isinstance(message.body, Hello):
            self._send(source, Reject("collision", f"peer name {self.identity.name} is already in use"))
            nickname = message.body.nickname
            self._events.append(NameCollision(str(source), message.sender, nickname))
        elif isinstance(message.body, Reject) and message.body.code == "collision":
            self._on_reject(message, message.body, source, now)
            return
        self._drop("name-collision")

    def _own_hello_came_back(self, message: Message, source: Endpoint, now: float) -> None:
        """Our name and UID: we dialled ourselves (a peer list that includes our own address), or someone
        forged it. Only our own HELLO carries the token of one of our dials in progress, so only that
        marks an address as ours; nothing else may cut a connection."""
        hello = message.body
        dial = None
        if isinstance(hello, Hello) and hello.token is not None:
            dial = next((c for c in self._conns.values()
                         if c.state is ConnState.CONNECTING and c.local_token == hello.token), None)
        if dial is None:
            self._drop("own-name")
            return
        for address in {dial.address, source}:
            target = self._targets.get(address)
            if target is not None:
                target.is_self = True
        self._remove_connection(dial, "that is our own address", now, quiet=True)

    def _negotiate(self, lo: int, hi: int) -> int | None:
        version = min(hi, PROTOCOL_MAX)
        return version if version >= max(lo, PROTOCOL_MIN) else None

    def _conn_by_name(self, name: PeerName, exclude: Endpoint) -> Connection | None:
        for conn in self._conns.values():
            if conn.address != exclude and conn.remote is not None and conn.remote.name == name:
                return conn
        return None

    def _check_duplicate(self, remote: PeerIdentity, source: Endpoint, now: float) -> str | None:
        """A reason to refuse ``remote`` at ``source`` when we are connected to its name elsewhere.

        The same incarnation at a second address is a duplicate path; a new incarnation while the old
        one is still heard from is a second live peer with that name. Otherwise it is a restart and the
        stale connection goes."""
        other = self._conn_by_name(remote.name, source)
        if other is None or other.remote is None:
            return None
        if other.remote.uid == remote.uid:
            return f"already connected to {remote.label()} via {other.address}"
        if other.state is ConnState.ESTABLISHED and now - other.last_received < 2 * self.config.heartbeat_interval:
            return f"name in use: {remote.label()} is also alive at {other.address}"
        self._remove_connection(other, "peer restarted elsewhere", now)
        return None

    def _on_hello(self, message: Message, hello: Hello, source: Endpoint, now: float) -> None:
        version = self._negotiate(hello.version_min, hello.version_max)
        if version is None:
            self._send(source, Reject("version", f"no common protocol version: we speak {PROTOCOL_MIN}.."
                                                 f"{PROTOCOL_MAX}, you {hello.version_min}..{hello.version_max}"))
            self._drop("version-mismatch")
            return
        remote = PeerIdentity(message.sender, hello.nickname, message.sender_uid, hello.short_id)
        conn = self._conns.get(source)
        if conn is not None and conn.remote == remote:
            if not self._on_repeated_hello(conn, hello, now):
                return
            conn = self._conns.get(source)
        reason = self._check_duplicate(remote, source, now)
        if reason is not None:
            self._send(source, Reject("duplicate", reason))
            return
        if conn is not None and conn.remote is not None:
            if conn.state is ConnState.ESTABLISHED and now - conn.last_received < 2 * self.config.heartbeat_interval:
                # The incarnation we know is alive at this address: a HELLO in its place is forged or
                # early; a real restart is silent first, and its next HELLO gets through.
                self._drop("hello-over-live-connection")
                return
            self._remove_connection(conn, "peer restarted", now)
            conn = None
        if conn is None:
            if self._refuse_for_limit(hello.reachable, now):
                self._send(source, Reject("limit", f"connection limit {self.config.conn_limit} reached"))
                self._drop("conn-limit")
                return
            if sum(c.state is ConnState.PENDING for c in self._conns.values()) >= self.config.max_pending:
                self._drop("too-many-pending")
                return
            conn = Connection(source, outbound=False, state=ConnState.PENDING, remote=remote,
                              protocol_version=version, last_received=now,
                              next_send=now + self.config.hello_interval,
                              handshake_deadline=now + self.config.handshake_timeout, overlays=hello.overlays,
                              local_token=self._new_token(), peer_token=hello.token)
            self._conns[source] = conn
            self._conn_event(conn, "new", "inbound handshake")
        else:
            # Simultaneous open: we were dialling them too. Keep our record (and token), now we know who it is.
            conn.remote, conn.protocol_version, conn.last_received = remote, version, now
            conn.overlays, conn.peer_token = hello.overlays, hello.token
            conn.next_send = now + self.config.hello_interval
            self._set_state(conn, ConnState.PENDING, "simultaneous handshake")
        self._learn_target_name(source, remote.name)
        self._send(source, self._hello_ack(conn), version)

    def _on_repeated_hello(self, conn: Connection, hello: Hello, now: float) -> bool:
        """A HELLO from the incarnation we already know at that address. True: handle it as a new
        handshake (the old connection is gone); False: answered or dropped here.

        Before we are established it is a retransmission (our ACK was lost) or the dialler's new
        attempt: refresh and answer. Once established, a HELLO cannot change what the handshake settled
        (overlays, token): the same token is a late duplicate, answered again; another token is the
        peer dialling anew (it dropped the link), believed only once the link has gone quiet, since
        anyone who read the peer's name and UID in gossip can forge one."""
        assert conn.remote is not None
        if conn.state is not ConnState.ESTABLISHED:
            conn.last_received, conn.overlays = now, hello.overlays
            if conn.state is ConnState.PENDING:
                conn.peer_token = hello.token
            self._send(conn.address, self._hello_ack(conn), conn.protocol_version)
            return False
        if hello.token == conn.peer_token:
            self._send(conn.address, self._hello_ack(conn), conn.protocol_version)
            return False
        if now - conn.last_received < 2 * self.config.heartbeat_interval:
            self._drop("hello-over-live-connection")
            return False
        self._remove_connection(conn, "peer dialled again", now)
        return True

    def _refuse_for_limit(self, their_reachable: int | None, now: float) -> bool:
        """At the connection limit, still take a peer that reaches nobody (up to a quarter above the
        limit): a late joiner whose every contact is full would else stay isolated for ever. Not while
        we are starting ourselves, when every peer of a starting herd still reaches nobody."""
        limit = self.config.conn_limit
        if len(self._conns) < limit:
            return False
        settled = self._connected_since is not None and now - self._connected_since >= self.config.join_grace
        isolated = their_reachable == 0
        return not settled or not isolated or len(self._conns) >= limit + max(1, limit // 4)

    def _on_hello_ack(self, message: Message, ack: HelloAck, source: Endpoint, now: float) -> None:
        conn = self._conns.get(source)
        remote = PeerIdentity(message.sender, ack.nickname, message.sender_uid, ack.short_id)
        if conn is None or conn.state is ConnState.ESTABLISHED:
            if conn is None or conn.remote != remote:
                self._drop("unexpected")
            return
        if ack.token is not None and ack.echo != conn.local_token:
            # An answer to a HELLO we did not send (or to an older one of ours): forged or stale.
            self._drop("bad-token")
            return
        if not PROTOCOL_MIN <= ack.version <= PROTOCOL_MAX:
            self._drop("version-mismatch")
            self._fail_connection(conn, f"peer chose unsupported protocol version {ack.version}", now)
            return
        reason = self._check_duplicate(remote, source, now)
        if reason is not None:
            self._learn_target_name(source, remote.name)
            self._fail_connection(conn, reason, now)
            return
        conn.remote, conn.protocol_version, conn.last_received = remote, ack.version, now
        conn.overlays, conn.peer_token, conn.verified = ack.overlays, ack.token, ack.token is not None
        self._learn_target_name(source, remote.name)
        self._send(source, Heartbeat(conn.peer_token))  # confirms the handshake to the acceptor
        self._establish(conn, now, f"protocol {ack.version}")

    def _on_reject(self, message: Message, reject: Reject, source: Endpoint, now: float) -> None:
        """A refusal. UDP sources are easy to forge, so it only counts for a dial still waiting for its
        answer, or from exactly the incarnation at the other end of the connection."""
        conn = self._conns.get(source)
        target = self._targets.get(source)
        from_peer = conn is not None and (
            conn.state is ConnState.CONNECTING
            or (conn.remote is not None and (conn.remote.name, conn.remote.uid) == (message.sender, message.sender_uid))
        )
        if not from_peer:
            self._drop("unexpected")
            return
        if conn is not None and conn.state is ConnState.ESTABLISHED and conn.tokens \
                and now - conn.last_received < 2 * self.config.heartbeat_interval:
            # The peer still sends us heartbeats with our token: it has not dropped the link, whoever
            # wrote this in its name. A peer that really dropped it goes quiet first.
            self._drop("reject-over-live-connection")
            return
        reason = f"rejected by peer: {reject.reason}"
        if conn is not None:
            self._fail_connection(conn, reason, now)
        if target is None:
            return
        if reject.code == "collision":
            target.give_up = True
            self._events.append(NameCollision(str(source), self.identity.name, self.identity.nickname))
        elif reject.code == "duplicate" and reject.reason.startswith("name in use"):
            # Once or twice this is our own previous incarnation, not yet timed out over there; for
            # longer than a failure timeout, another live peer has our name.
            target.name_in_use += 1
            if target.name_in_use >= 3:
                target.give_up = True
                self._events.append(NameCollision(str(source), self.identity.name, self.identity.nickname))
        elif reject.code == "limit":
            # A full peer stays full for a while: retrying it at the backoff floor only makes noise.
            target.next_attempt = now + self.config.backoff.cap * (0.5 + self._rng.random())
        elif reject.code == "unknown-connection":
            target.attempts, target.next_attempt = 0, now

    # --- connections ------------------------------------------------------------------------------

    def _set_state(self, conn: Connection, state: ConnState, reason: str) -> None:
        old = conn.state.value
        conn.state = state
        self._events.append(ConnectionStateChanged(str(conn.address), conn.label(), old, state.value, reason))

    def _conn_event(self, conn: Connection, old: str, reason: str) -> None:
        self._events.append(ConnectionStateChanged(str(conn.address), conn.label(), old, conn.state.value, reason))

    def _establish(self, conn: Connection, now: float, reason: str) -> None:
        assert conn.remote is not None
        if self._connected_since is None:
            self._connected_since = now
        # A neighbour we could not reach before comes from another part of the network (a joining peer,
        # a healed partition): reconcile whole views by digest. One already reachable shares our view
        # up to gossip in flight, which anti-entropy covers, so the digest round is skipped at scale.
        was_reachable = conn.remote.name in self.topology.next_hops()
        self._set_state(conn, ConnState.ESTABLISHED, reason)
        conn.next_send = now + self.config.heartbeat_interval
        target = self._targets.get(conn.address)
        if target is not None:
            target.attempts, target.last_error, target.name_in_use = 0, "", 0
        if conn.verified:
            self._grant_pull(conn, now)
        self._publish(now)
        self._send_entries(conn.address, [self.topology.own])
        if not was_reachable:
            self._send_summary(conn)

    def _fail_connection(self, conn: Connection, reason: str, now: float) -> None:
        target = self._targets.get(conn.address)
        if target is not None:
            target.attempts += 1
            target.last_error = reason
            target.next_attempt = now + self.config.backoff.delay(target.attempts, self._rng)
        self._remove_connection(conn, reason, now, new_state="failed")

    def _remove_connection(self, conn: Connection, reason: str, now: float, *, publish: bool = True,
                           new_state: str = "closed", quiet: bool = False) -> None:
        del self._conns[conn.address]
        self._budget.forget(conn.address)
        if not self._established():
            self._connected_since = None
        if not quiet:
            self._events.append(ConnectionStateChanged(str(conn.address), conn.label(), conn.state.value,
                                                       new_state, reason))
        target = self._targets.get(conn.address)
        if target is not None and target.next_attempt <= now and new_state != "failed":
            target.next_attempt = now + self.config.backoff.delay(max(1, target.attempts), self._rng)
        if publish and conn.remote is not None:
            self._publish(now)

    def _tick_connections(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.state is ConnState.ESTABLISHED:
                silent = now - conn.last_received
                if silent >= self.config.dead_after:
                    self._fail_connection(conn, f"heartbeat timeout: nothing heard for {silent:.1f}s", now)
                elif now >= conn.next_send:
                    self._send(conn.address, Heartbeat(conn.peer_token))
                    conn.next_send = now + self.config.heartbeat_interval
            elif now >= conn.handshake_deadline:
                what = "no answer to handshake" if conn.state is ConnState.CONNECTING else "handshake not confirmed"
                self._fail_connection(conn, what, now)
            elif conn.state is ConnState.CONNECTING and now >= conn.next_send:
                self._send(conn.address, self._hello(conn))
                conn.next_send = now + self.config.hello_interval
            elif conn.state is ConnState.PENDING and now >= conn.next_send:
                # Our HELLO_ACK may be lost, and after a simultaneous open nobody else retransmits.
                self._send(conn.address, self._hello_ack(conn), conn.protocol_version)
                conn.next_send = now + self.config.hello_interval

    def _connected_names(self) -> set[PeerName]:
        return {c.remote.name for c in self._conns.values() if c.remote is not None}

    def _dialable(self, target: Target) -> bool:
        return not (target.give_up or target.is_self or target.address in self._conns)

    def _dial_targets(self, now: float) -> None:
        """Dial due targets. Direct ones all at once; learnt ones one at a time, because in a large
        mesh there are hundreds of them and most peers may already be at their connection limit."""
        connected = self._connected_names()
        learnt_in_flight = any(
            c.state is ConnState.CONNECTING and (t := self._targets.get(c.address)) is not None
            and t.source is TargetSource.LEARNT
            for c in self._conns.values()
        )
        for target in list(self._targets.values()):
            if len(self._conns) >= self.config.conn_limit:
                return
            if not self._dialable(target) or target.next_attempt > now:
                continue
            if target.source is TargetSource.LEARNT:
                if learnt_in_flight:
                    target.next_attempt = now + self.config.hello_interval
                    continue
                if self._looks_full(target.known_name):
                    target.next_attempt = now + self.config.backoff.cap * (0.5 + self._rng.random())
                    continue
                learnt_in_flight = True
            if target.known_name in connected:
                target.next_attempt = now + self.config.backoff.cap
                continue
            conn = Connection(target.address, outbound=True, state=ConnState.CONNECTING, remote=None,
                              protocol_version=PROTOCOL_MAX, last_received=now,
                              next_send=now + self.config.hello_interval,
                              handshake_deadline=now + self.config.handshake_timeout,
                              local_token=self._new_token())
            self._conns[target.address] = conn
            self._conn_event(conn, "new", f"dialling {target.source.value} target")
            self._send(target.address, self._hello(conn))

    def _looks_full(self, name: PeerName | None) -> bool:
        """Whether a peer's gossiped entry already lists as many connections as our own limit allows.

        Peers of one cluster share CONN_LIMIT, so such a peer would refuse us; dialling it anyway only
        adds HELLO/REJECT noise. With differing limits this is a guess, and the REJECT still corrects it."""
        entry = self.topology.entries.get(name) if name is not None else None
        return entry is not None and len(entry.connections) >= self.config.conn_limit

    def _learn_target_name(self, address: Endpoint, name: PeerName) -> None:
        target = self._targets.get(address)
        if target is not None:
            target.known_name = name

    def _established(self) -> list[Connection]:
        return [c for c in self._conns.values() if c.state is ConnState.ESTABLISHED]

    # --- topology ---------------------------------------------------------------------------------

    def _publish(self, now: float) -> None:
        """Rebuild our own entry from our connections; bump the version and gossip it if it changed."""
        own = self.topology.own
        # Only established connections: a pending one may be a forged HELLO, and everyone dials the
        # addresses we publish.
        connections = tuple(sorted(
            (ConnectionEntry(c.remote.name, c.address, c.outbound, True)
             for c in self._conns.values() if c.remote is not None and c.state is ConnState.ESTABLISHED),
            key=lambda c: (c.remote, c.address),
        ))
        if connections == own.connections:
            return
        self._replace_own(own.version + 1, own.short_id, connections, now)

    def _replace_own(self, version: int, short_id: ShortID, connections: tuple[ConnectionEntry, ...],
                     now: float) -> None:
        own = self.topology.own
        self.topology.set_own(PeerEntry(own.name, own.nickname, own.uid, version, short_id, connections))
        self._queue_gossip([own.name], now)
        self._after_topology_change(now)

    def _merge(self, entries: tuple[PeerEntry, ...], now: float, source: PeerName) -> None:
        result = self.topology.merge(entries, self._clock_ms(now))
        if result.implausible:
            self.counters["dropped_version-jump"] += result.implausible
        if result.own_conflict is not None and self._bump_past(result.own_conflict, now):
            own = self.topology.own
            self._replace_own(result.own_conflict.version + 1, own.short_id, own.connections, now)
        if result.improved:
            for entry in result.improved:
                self._gossip_source[entry.name] = source
            self._queue_gossip([e.name for e in result.improved], now)
            self._after_topology_change(now, result.improved)
        limit = len(self.topology.entries) + MAX_UNREACHABLE
        if len(self._pending_gossip) > limit or len(self._changed_since_settle) > limit:
            # Names of entries collected meanwhile (a flood of invented ones): keep what still exists.
            known = self.topology.entries.keys()
            self._pending_gossip &= known
            self._changed_since_settle &= known
            self._gossip_source = {n: s for n, s in self._gossip_source.items() if n in known}

    def _bump_past(self, conflict: PeerEntry, now: float) -> bool:
        """Whether to bump our version past an entry that claims our name. A stale incarnation of us (we
        restarted) is overtaken once or twice; an incarnation that keeps coming back is a live clone:
        report the collision and stop the version war. Our own UID is never another incarnation: an
        entry with it that is not ours is forged, and is overtaken every time."""
        if conflict.uid == self.identity.uid:
            return True
        times = [t for t in self._own_conflicts.get(conflict.uid, []) if now - t < 60.0]
        times.append(now)
        self._own_conflicts[conflict.uid] = times
        if len(self._own_conflicts) > 64:
            self._own_conflicts = {conflict.uid: times}
        if len(times) == 4:
            self._events.append(NameCollision("(via gossip)", self.identity.name, conflict.nickname))
        return len(times) < 4

    def _after_topology_change(self, now: float, changed: list[PeerEntry] | None = None) -> None:
        """Cheap per-change work now; routes, join/leave events and GC are coalesced into :meth:`_settle`."""
        if self._settle_due is None:
            self._settle_due = now + self.config.settle_delay
        if changed:
            self._changed_since_settle.update(e.name for e in changed)

    def _settle(self, now: float) -> None:
        """Recompute reachability once per burst of changes: log joins/leaves/restarts, collect garbage."""
        self._settle_due = None
        hops = self.topology.next_hops()
        entries = self.topology.entries
        reachable = {name: entries[name].uid for name in hops}
        for name, uid in reachable.items():
            entry = entries[name]
            old_uid = self._reachable.get(name)
            if old_uid is None:
                addresses = tuple(sorted({str(c.address) for e in entries.values() for c in e.connections
                                          if c.remote == name}))
                self._events.append(PeerJoined(name, entry.nickname, addresses))
            elif old_uid != uid:
                self._events.append(PeerRestarted(name, entry.nickname))
        for name in self._reachable.keys() - reachable.keys():
            gone = entries.get(name)
            reason = "said goodbye" if name in self._said_goodbye else "no longer reachable"
            self._events.append(PeerLeft(name, gone.nickname if gone else "?", reason))
        self._said_goodbye -= self._reachable.keys() - reachable.keys()
        self._reachable = reachable
        self.topology.collect_garbage()
        self._measure_budget_cap()
        self._prune_learnt_targets()
        changed, self._changed_since_settle = self._changed_since_settle, set()
        self._learn_targets([entries[n] for n in sorted(changed) if n in reachable], now)
        self._settle_short_id(now)

    def _learn_targets(self, changed: list[PeerEntry], now: float) -> None:
        """Discovery: the addresses reachable peers use for their connections become dial targets.
        Only reachable ones (an invented entry must not send us dialling where the forger likes), and
        at most :data:`MAX_LEARNT_TARGETS` of them."""
        connected = self._connected_names()
        learnt = sum(t.source is TargetSource.LEARNT for t in self._targets.values())
        for entry in changed:
            if entry.name == self.identity.name:
                continue
            for c in entry.connections:
                if c.remote == self.identity.name or c.remote in connected or c.address in self._targets:
                    continue
                if learnt >= MAX_LEARNT_TARGETS:
                    self._drop("too-many-targets")
                    return
                self._targets[c.address] = Target(c.address, TargetSource.LEARNT, next_attempt=now,
                                                  known_name=c.remote)
                learnt += 1

    def _prune_learnt_targets(self) -> None:
        """Forget learnt addresses that no peer mentions any more (their peer is gone)."""
        mentioned = {c.address for e in self.topology.entries.values() for c in e.connections}
        for address, target in list(self._targets.items()):
            if target.source is TargetSource.LEARNT and address not in mentioned and address not in self._conns:
                del self._targets[address]

    def _settle_short_id(self, now: float) -> None:
        """Short ids must be unique among peers: on a clash the lower name keeps its id. Only peers we
        reach count (as for the data path, :meth:`Topology.short_ids`): invented entries cannot squat."""
        own = self.topology.own
        short_ids = self.topology.short_ids()
        if not any(sid == own.short_id and name < own.name for name, sid in short_ids.items()):
            return
        taken = set(short_ids.values())
        free = [i for i in range(SHORT_ID_SPACE) if i not in taken]
        if free:
            self._replace_own(own.version + 1, ShortID(self._rng.choice(free)), own.connections, now)

    # --- gossip -----------------------------------------------------------------------------------

    def _queue_gossip(self, names: list[PeerName], now: float) -> None:
        self._pending_gossip.update(names)
        if self._gossip_due is None:
            self._gossip_due = now + self.config.gossip_delay

    def _flush_gossip(self) -> None:
        self._gossip_due = None
        entries = [self.topology.entries[n] for n in sorted(self._pending_gossip) if n in self.topology.entries]
        sources, self._gossip_source = self._gossip_source, {}
        self._pending_gossip.clear()
        neighbours = self._established()
        if not entries or not neighbours:
            return
        count = gossip.fanout(len(self.topology.entries), len(neighbours))
        for conn in self._rng.sample(neighbours, count):
            assert conn.remote is not None
            # The neighbour we heard an entry from has it already: sending it back is pure overhead.
            news = [e for e in entries if sources.get(e.name) != conn.remote.name]
            self._send_entries(conn.address, news)

    def _send_all(self, address: Endpoint, bodies: list[Body], answer_at: float | None) -> bool:
        """Send ``bodies``; as an answer (``answer_at`` is now) only while the address has credit.
        False if the credit ran out first."""
        for body in bodies:
            if answer_at is None:
                self._send(address, body)
            elif not self._answer(address, body, answer_at):
                return False
        return True

    def _send_entries(self, address: Endpoint, entries: list[PeerEntry], answer_at: float | None = None) -> None:
        parts = gossip.chunk(entries, self._sizes.size)
        self._send_all(address, [GossipUpdate(tuple(part)) for part in parts], answer_at)

    def _send_summary(self, conn: Connection) -> None:
        self._send(conn.address, GossipSummary(self.topology.digest_hash(), len(self.topology.entries)))

    def _send_digest(self, address: Endpoint, answer_at: float) -> bool:
        items = [DigestItem(e.name, e.version, e.uid) for e in self.topology.entries.values()]
        parts = gossip.chunk(items, lambda _: gossip.DIGEST_ITEM_SIZE)
        return self._send_all(address, [GossipDigest(tuple(part)) for part in parts], answer_at)

    def _send_request(self, address: Endpoint, want: list[DigestItem], answer_at: float) -> None:
        parts = gossip.chunk([i.name for i in want], lambda _: gossip.REQUEST_ITEM_SIZE)
        self._send_all(address, [GossipRequest(tuple(part)) for part in parts], answer_at)

    # --- relay ------------------------------------------------------------------------------------

    def _on_relay(self, relay: Relay, now: float) -> None:
        if relay.dst is None:
            if not self._broadcasts.first_time(relay.src, relay.channel, relay.payload, now):
                self._drop("duplicate-broadcast")  # a replay, or a loop while views disagree
                return
            if relay.src != self.identity.name:
                self._events.append(RelayDelivered(relay.src, relay.channel, relay.payload))
                if relay.ttl > 1:  # views that disagree for a moment could otherwise make a cycle
                    self._forward_broadcast(Relay(relay.src, None, relay.channel, relay.ttl - 1, relay.payload))
            return
        if relay.dst == self.identity.name:
            self._events.append(RelayDelivered(relay.src, relay.channel, relay.payload))
            return
        if relay.ttl <= 1:
            self._drop("ttl-expired")
            return
        self._forward_unicast(Relay(relay.src, relay.dst, relay.channel, relay.ttl - 1, relay.payload))

    def _forward_unicast(self, relay: Relay) -> bool:
        assert relay.dst is not None
        hop = self.topology.next_hops().get(relay.dst)
        conn = self._conn_by_name(hop, exclude=Endpoint("0.0.0.0", 1)) if hop else None
        if conn is None or conn.state is not ConnState.ESTABLISHED:
            self._drop("no-route")
            return False
        self._send(conn.address, relay)
        return True

    def _forward_broadcast(self, relay: Relay) -> None:
        children = broadcast_children(relay.src, self.identity.name, self.topology.graph())
        by_name = {c.remote.name: c for c in self._established() if c.remote is not None}
        for child in children:
            conn = by_name.get(child)
            if conn is not None:
                self._send(conn.address, relay)
