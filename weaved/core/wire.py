"""Control-plane wire format: a msgpack envelope around one typed message.

Theory of operation
-------------------
Every control datagram on UDP 6783 is one msgpack array::

    [MAGIC, protocol_version, msg_type, sender_name(6 bytes), sender_uid, body]

``body`` is a positional array whose shape depends on ``msg_type``. Message type numbers are part of
the protocol: the enum is append-only (never renumber, never reuse). ``HELLO`` and ``REJECT`` keep
their shape in every protocol version, so a peer can always tell another why it will not talk.

Fields appended later are optional and sent only to peers that showed they read them: the connection
tokens (a random number each end picks per connection, sent in HELLO and HELLO_ACK, and echoed in
HELLO_ACK, HEARTBEAT and GOODBYE) travel only once the other end sent one, so an older peer never sees a
shape it would refuse. Decoders ignore fields they do not know.

:func:`decode` raises :class:`DecodeError` and nothing else, whatever the bytes: a malformed datagram
must cost the receiver one counter increment, never a crash. Sizes are bounded before and during
unpacking (msgpack's own limits), so a small datagram cannot make us allocate a large one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Any

import msgpack

from weaved.core.codec import StrictReader
from weaved.core.entries import ConnectionEntry, PeerEntry
from weaved.core.types import (
    UID_MAX,
    Endpoint,
    PeerName,
    PeerUID,
    ShortID,
    peer_name_from_bytes,
    peer_name_to_bytes,
)

MAGIC = "wv"
PROTOCOL_MIN = 1
PROTOCOL_MAX = 1

MAX_DATAGRAM = 65_000
"""Hard cap on one control datagram (below the 65,507-byte UDP/IPv4 payload limit)."""

GOSSIP_CHUNK_TARGET = 1_200
"""Gossip is packed into datagrams of about this size so that it does not fragment on a 1500 MTU
underlay; a single entry larger than this still goes, alone, up to :data:`MAX_DATAGRAM`."""

MAX_NICKNAME = 64
MAX_REASON = 256
MAX_CHANNEL = 32
MAX_ITEMS = 8_192
MAX_OVERLAYS = 8
MAX_TTL = 64


class MsgType(IntEnum):
    """WARNING: append only. The numbers are part of the protocol."""

    HELLO = 1
    HELLO_ACK = 2
    REJECT = 3
    HEARTBEAT = 4
    GOODBYE = 5
    GOSSIP_UPDATE = 6
    GOSSIP_SUMMARY = 7
    GOSSIP_DIGEST = 8
    GOSSIP_REQUEST = 9
    RELAY = 10


class DecodeError(Exception):
    """The one error :func:`decode` raises; ``reason`` is a short stable label used in metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --- message bodies -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Handshake opener: our supported version range and identity beyond name and UID."""

    version_min: int
    version_max: int
    nickname: str
    short_id: ShortID
    overlays: tuple[str, ...]
    reachable: int | None
    """How many peers the sender reaches now; 0 marks an isolated peer that a full peer still takes.
    None when the sender did not say (a HELLO of an older shape)."""
    token: int | None = None
    """The dialler's random connection token (sent only with ``reachable``); None from an older peer."""


@dataclass(frozen=True, slots=True)
class HelloAck:
    """Handshake answer: the version chosen and the acceptor's identity."""

    version: int
    nickname: str
    short_id: ShortID
    overlays: tuple[str, ...]
    token: int | None = None
    """The acceptor's random connection token; sent only when the HELLO carried one."""
    echo: int | None = None
    """The HELLO's token, echoed: proves the acceptor saw our HELLO (a blind forger cannot)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Refusal with a stable code (``version``, ``collision``, ``duplicate``, ``limit``) and text."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Keeps an established connection alive; also confirms a pending inbound handshake."""

    token: int | None = None
    """The receiver's connection token, echoed (None to a peer that sent none)."""


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The sender is leaving on purpose: drop the connection now instead of waiting for a timeout."""

    token: int | None = None
    """The receiver's connection token, echoed: a forger who never saw the handshake cannot cut a link."""


@dataclass(frozen=True, slots=True)
class GossipUpdate:
    """Topology entries that are news to the sender (a delta, or an answer to a request)."""

    entries: tuple[PeerEntry, ...]


@dataclass(frozen=True, slots=True)
class GossipSummary:
    """Anti-entropy probe: a hash over every (name, version, uid) the sender knows."""

    digest_hash: bytes
    count: int


@dataclass(frozen=True, slots=True)
class DigestItem:
    name: PeerName
    version: int
    uid: PeerUID


@dataclass(frozen=True, slots=True)
class GossipDigest:
    """Anti-entropy answer: (a chunk of) what the sender knows, without the connection lists."""

    items: tuple[DigestItem, ...]


@dataclass(frozen=True, slots=True)
class GossipRequest:
    """Names whose entries the sender lacks or holds an older version of."""

    names: tuple[PeerName, ...]


@dataclass(frozen=True, slots=True)
class Relay:
    """An application payload routed hop by hop over the mesh (``dst`` None means broadcast)."""

    src: PeerName
    dst: PeerName | None
    channel: str
    ttl: int
    payload: bytes


Body = (
    Hello | HelloAck | Reject | Heartbeat | Goodbye | GossipUpdate | GossipSummary | GossipDigest
    | GossipRequest | Relay
)

_TYPE_OF: dict[type, MsgType] = {
    Hello: MsgType.HELLO,
    HelloAck: MsgType.HELLO_ACK,
    Reject: MsgType.REJECT,
    Heartbeat: MsgType.HEARTBEAT,
    Goodbye: MsgType.GOODBYE,
    GossipUpdate: MsgType.GOSSIP_UPDATE,
    GossipSummary: MsgType.GOSSIP_SUMMARY,
    GossipDigest: MsgType.GOSSIP_DIGEST,
    GossipRequest: MsgType.GOSSIP_REQUEST,
    Relay: MsgType.RELAY,
}


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded datagram: who sent it (name and incarnation), in which protocol version, and what."""

    version: int
    sender: PeerName
    sender_uid: PeerUID
    body: Body

    @property
    def msg_type(self) -> MsgType:
        return _TYPE_OF[type(self.body)]


# --- encoding -------------------------------------------------------------------------------------


@lru_cache(maxsize=65_536)
def _addr_raw(address: Endpoint) -> bytes:
    return ipaddress.ip_address(address.host).packed


@lru_cache(maxsize=65_536)
def _entry_raw(entry: PeerEntry) -> list[Any]:
    """Entries are immutable and sent to many neighbours many times: build each raw form once."""
    return [
        peer_name_to_bytes(entry.name),
        entry.nickname,
        entry.uid,
        entry.version,
        entry.short_id,
        [
            [
                peer_name_to_bytes(c.remote),
                _addr_raw(c.address),
                c.address.port,
                (1 if c.outbound else 0) | (2 if c.established else 0),
            ]
            for c in entry.connections
        ],
    ]


def _body_raw(body: Body) -> list[Any]:
    match body:
        case Hello():
            return [body.version_min, body.version_max, body.nickname, body.short_id, list(body.overlays),
                    *([] if body.reachable is None else [body.reachable]),
                    *([] if body.reachable is None or body.token is None else [body.token])]
        case HelloAck():
            return [body.version, body.nickname, body.short_id, list(body.overlays),
                    *([] if body.token is None else [body.token, body.echo or 0])]
        case Reject():
            return [body.code, body.reason]
        case Heartbeat() | Goodbye():
            return [] if body.token is None else [body.token]
        case GossipUpdate():
            return [_entry_raw(e) for e in body.entries]
        case GossipSummary():
            return [body.digest_hash, body.count]
        case GossipDigest():
            return [[peer_name_to_bytes(i.name), i.version, i.uid] for i in body.items]
        case GossipRequest():
            return [peer_name_to_bytes(n) for n in body.names]
        case Relay():
            dst = peer_name_to_bytes(body.dst) if body.dst is not None else None
            return [peer_name_to_bytes(body.src), dst, body.channel, body.ttl, body.payload]
    raise TypeError(f"not a message body: {body!r}")  # pragma: no cover - exhaustive match


def encode(message: Message) -> bytes:
    """Serialise a message. Encoding our own message never fails for well-formed values."""
    data: bytes = msgpack.packb(
        [
            MAGIC,
            message.version,
            int(message.msg_type),
            peer_name_to_bytes(message.sender),
            message.sender_uid,
            _body_raw(message.body),
        ],
        use_bin_type=True,
    )
    return data


def encoded_entry_size(entry: PeerEntry) -> int:
    """Bytes an entry adds to a GOSSIP_UPDATE; used to pack chunks without re-encoding them."""
    return len(msgpack.packb(_entry_raw(entry), use_bin_type=True))


# --- decoding -------------------------------------------------------------------------------------


_READ = StrictReader(DecodeError)
"""The shared strict checks (:mod:`weaved.core.codec`), raising :class:`DecodeError`. Bound once to
module names: these run for every field of every datagram, the simulated network's hottest code."""
_need = _READ.need
_int = _READ.integer
_str = _READ.text
_bytes = _READ.blob
_list = _READ.array
_name = _READ.name


@lru_cache(maxsize=65_536)
def _endpoint_cached(ip: bytes, port: int) -> Endpoint:
    """Addresses repeat in every entry; parsing them is the decoder's hottest step without a cache."""
    return Endpoint(str(ipaddress.ip_address(ip)), port)


def _connection(raw: Any) -> ConnectionEntry:
    cf = _list(raw, "connection", MAX_ITEMS, 4)
    name, ip, port, flags = cf
    _need(type(name) is bytes and len(name) == 6, "bad-field", "remote")
    _need(type(ip) is bytes and len(ip) in (4, 16), "bad-field", "address")
    _int(port, 1, 65535, "port")
    _int(flags, 0, 3, "flags")
    return _connection_cached(name, ip, port, flags)


@lru_cache(maxsize=65_536)
def _connection_cached(name: bytes, ip: bytes, port: int, flags: int) -> ConnectionEntry:
    """The same connection appears in many datagrams: validated fields map to one shared object."""
    return ConnectionEntry(peer_name_from_bytes(name), _endpoint_cached(ip, port), bool(flags & 1), bool(flags & 2))


def _entry(raw: Any) -> PeerEntry:
    fields = _list(raw, "entry", MAX_ITEMS, 6)
    conns = [_connection(c) for c in _list(fields[5], "connections", MAX_ITEMS)]
    return PeerEntry(
        name=_name(fields[0], "entry name"),
        nickname=_str(fields[1], MAX_NICKNAME, "nickname"),
        uid=PeerUID(_int(fields[2], 0, UID_MAX, "uid")),
        version=_int(fields[3], 0, UID_MAX, "version"),
        short_id=ShortID(_int(fields[4], 0, 4095, "short_id")),
        connections=tuple(conns),
    )


def _overlays(raw: Any) -> tuple[str, ...]:
    return tuple(_str(o, MAX_CHANNEL, "overlay") for o in _list(raw, "overlays", MAX_OVERLAYS))


def _optional_token(raw: Any, what: str) -> int | None:
    f = _list(raw, what, MAX_ITEMS)
    return _int(f[0], 0, UID_MAX, "token") if f else None


def _body(msg_type: MsgType, raw: Any) -> Body:
    match msg_type:
        case MsgType.HELLO:
            # HELLO must stay readable across versions (so that we can say why we refuse): the first five
            # fields are fixed for ever, later ones optional, and fields we do not know are ignored.
            f = _list(raw, "hello", MAX_ITEMS)
            _need(len(f) >= 5, "bad-field", "hello arity")
            reachable = _int(f[5], 0, 1 << 32, "reachable") if len(f) > 5 else None
            # Lenient: a HELLO of another version may carry something else there; it is then not a token.
            token = f[6] if len(f) > 6 and type(f[6]) is int and 0 <= f[6] <= UID_MAX else None
            return Hello(_int(f[0], 0, 255, "version_min"), _int(f[1], 0, 255, "version_max"),
                         _str(f[2], MAX_NICKNAME, "nickname"), ShortID(_int(f[3], 0, 4095, "short_id")),
                         _overlays(f[4]), reachable, token)
        case MsgType.HELLO_ACK:
            f = _list(raw, "hello_ack", MAX_ITEMS)
            _need(len(f) >= 4, "bad-field", "hello_ack arity")
            tokens = (_int(f[4], 0, UID_MAX, "token"), _int(f[5], 0, UID_MAX, "echo")) if len(f) > 5 else (None, None)
            return HelloAck(_int(f[0], 0, 255, "version"), _str(f[1], MAX_NICKNAME, "nickname"),
                            ShortID(_int(f[2], 0, 4095, "short_id")), _overlays(f[3]), *tokens)
        case MsgType.REJECT:
            f = _list(raw, "reject", MAX_ITEMS, 2)
            return Reject(_str(f[0], MAX_CHANNEL, "code"), _str(f[1], MAX_REASON, "reason"))
        case MsgType.HEARTBEAT:
            return Heartbeat(_optional_token(raw, "heartbeat"))
        case MsgType.GOODBYE:
            return Goodbye(_optional_token(raw, "goodbye"))
        case MsgType.GOSSIP_UPDATE:
            return GossipUpdate(tuple(_entry(e) for e in _list(raw, "update", MAX_ITEMS)))
        case MsgType.GOSSIP_SUMMARY:
            f = _list(raw, "summary", MAX_ITEMS, 2)
            return GossipSummary(_bytes(f[0], 8, "hash"), _int(f[1], 0, 1 << 32, "count"))
        case MsgType.GOSSIP_DIGEST:
            items = []
            for item in _list(raw, "digest", MAX_ITEMS):
                f = _list(item, "digest item", MAX_ITEMS, 3)
                items.append(DigestItem(_name(f[0], "digest name"), _int(f[1], 0, UID_MAX, "version"),
                                        PeerUID(_int(f[2], 0, UID_MAX, "uid"))))
            return GossipDigest(tuple(items))
        case MsgType.GOSSIP_REQUEST:
            return GossipRequest(tuple(_name(n, "requested name") for n in _list(raw, "request", MAX_ITEMS)))
        case MsgType.RELAY:
            f = _list(raw, "relay", MAX_ITEMS, 5)
            dst = None if f[1] is None else _name(f[1], "dst")
            return Relay(_name(f[0], "src"), dst, _str(f[2], MAX_CHANNEL, "channel"),
                         _int(f[3], 0, MAX_TTL, "ttl"), _bytes(f[4], None, "payload"))
    raise DecodeError("unknown-type", str(int(msg_type)))  # pragma: no cover - exhaustive match


_ANY_VERSION = (MsgType.HELLO, MsgType.REJECT)


def decode(data: bytes) -> Message:
    """Parse one datagram. Raises :class:`DecodeError` (and only that) on anything malformed."""
    raw = _READ.unpack(data, max_size=MAX_DATAGRAM, max_str=MAX_DATAGRAM, max_array=MAX_ITEMS)
    try:
        envelope = _list(raw, "envelope", MAX_ITEMS, 6)
        _need(envelope[0] == MAGIC, "bad-magic")
        version = _int(envelope[1], 0, 255, "version")
        type_number = _int(envelope[2], 0, 255, "msg_type")
        try:
            msg_type = MsgType(type_number)
        except ValueError:
            raise DecodeError("unknown-type", str(type_number)) from None
        if msg_type not in _ANY_VERSION:
            _need(PROTOCOL_MIN <= version <= PROTOCOL_MAX, "unsupported-version", str(version))
        return Message(version, _name(envelope[3], "sender"), PeerUID(_int(envelope[4], 0, UID_MAX, "uid")),
                       _body(msg_type, envelope[5]))
    except DecodeError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise DecodeError("bad-field", type(exc).__name__) from None
