"""The sleeve frame: how one IPv4 packet travels between peers inside a UDP datagram.

Theory of operation
-------------------
A pod's packet leaves its node through the TUN device ``weave-tun`` as a bare IPv4 packet. The sleeve
puts an 8-byte header in front of it and sends the result in one UDP datagram to the sleeve port of the
next peer on the mesh route towards the destination's owner::

     0               1               2               3
    +---------------+---------------+---------------+---------------+
    |  magic 0x57 'W'  0x53 'S'     |  version (1)  |  ttl          |
    +---------------+---------------+---------------+---------------+
    |  src short id (12 bits, 4 zero) |  dst short id (12 bits, 4 zero)|
    +---------------+---------------+---------------+---------------+
    |  IPv4 packet (header's total length = rest of the datagram)   |

``src`` is the peer whose TUN captured the packet, ``dst`` the peer that owns the destination address in
the IPAM ring (short ids are the mesh's 12-bit ids, unique once the topology settled). A peer that gets a
frame for another ``dst`` is a relay: it lowers ``ttl`` and sends the frame on to its own next hop; a frame
whose ``ttl`` would reach 0 is dropped, so views that disagree for a moment cannot loop a packet for ever.

One packet per datagram, nothing batched: that keeps the format trivial to check and the receiver free of
reassembly. The later fast path (vnet headers, GSO) will need another version number, which is why the
header carries one; a receiver drops versions it does not know (``bad-version``).

Everything a frame is checked for has a stable drop reason (:data:`DROP_REASONS`), counted by the adapter.
Nothing here does I/O: the functions work on ``bytes``/``bytearray``/``memoryview`` the adapter owns.
"""

from __future__ import annotations

import struct
from typing import Final

MAGIC: Final = 0x5753
"""``WS``: weaved sleeve. Lets a receiver tell a frame from stray traffic on the port at a glance."""
VERSION: Final = 1
HEADER = struct.Struct("!HBBHH")
"""magic, version, ttl, src short id, dst short id."""
HEADER_SIZE: Final = HEADER.size
DEFAULT_TTL: Final = 16
"""Hops a frame may take. Mesh routes are shortest paths; 16 leaves room for any real topology."""
MAX_SHORT_ID: Final = 0x0FFF
IPV4_HEADER: Final = 20
UDP_HEADER: Final = 8
OVERHEAD: Final = IPV4_HEADER + UDP_HEADER + HEADER_SIZE
"""Bytes the sleeve adds on the underlay: outer IPv4 (no options) + UDP + our header = 36."""
MIN_MTU: Final = 576
"""Smallest pod MTU we configure (IPv4's minimum datagram every host must accept)."""

DROP_REASONS: Final = (
    "short",               # shorter than header + a minimal IPv4 header
    "bad-magic",           # not a sleeve frame
    "bad-version",         # a frame format we do not speak
    "bad-short-id",        # a short id above 12 bits
    "not-ipv4",            # inner packet's version nibble is not 4
    "bad-ip-header",       # inner IHL below 5 or past the end
    "bad-length",          # inner total length differs from what the datagram holds
    "ttl-expired",         # relaying would take ttl to 0
    "unknown-sender",      # UDP source is not the sleeve address of an established neighbour
    "unknown-source",      # src short id is not a peer we know (or two peers share it right now)
    "unknown-destination", # dst short id is not a peer we know
    "no-route",            # no next hop towards dst, or the next hop has no sleeve address
    "unowned",             # a packet from our TUN for an address no peer owns (not in range / unseeded)
    "own-range",           # a packet from our TUN for an address we own: the kernel should not send it to us
    "too-big",             # the kernel refused to send the datagram (EMSGSIZE)
    "send-error",          # any other send failure
    "tun-write-error",     # the TUN refused the packet
    "bad-chunk",           # version 2: index not below count, or a non-TCP packet in several chunks
    "bad-vnet",            # version 2: a virtio header the TUN would refuse (or we never offer)
    "truncated",           # a datagram (or GRO batch) bigger than the receive buffer
    "spoofed-source",      # the inner source is not in a range the frame's sending peer owns
    "spoofed-destination", # the inner destination is not in a range the frame's dst peer owns
    "auth",                # a sealed frame whose key is unknown or whose tag does not verify
    "replay",              # a sealed frame whose counter was already seen (or fell behind the window)
    "unsealed",            # a plain frame from a neighbour we share sleeve keys with
)


class FrameError(ValueError):
    """A frame to drop; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def pack_header(buf: bytearray | memoryview, ttl: int, src: int, dst: int) -> None:
    """Write the header into the first :data:`HEADER_SIZE` bytes of ``buf`` (the packet follows it)."""
    HEADER.pack_into(buf, 0, MAGIC, VERSION, ttl, src, dst)


def encode(packet: bytes, src: int, dst: int, ttl: int = DEFAULT_TTL) -> bytes:
    """A whole frame (tests, tools); the hot loop uses :func:`pack_header` on its own buffer instead."""
    if not (0 <= src <= MAX_SHORT_ID and 0 <= dst <= MAX_SHORT_ID and 0 < ttl < 256):
        raise ValueError(f"bad frame fields src={src} dst={dst} ttl={ttl}")
    return HEADER.pack(MAGIC, VERSION, ttl, src, dst) + packet


def decode_header(frame: bytes | bytearray | memoryview, length: int) -> tuple[int, int, int]:
    """``(ttl, src, dst)`` of a received frame of ``length`` bytes, after checking the header and that
    the inner packet is a well-formed IPv4 packet of exactly the remaining size. Raises :class:`FrameError`."""
    if length < HEADER_SIZE + IPV4_HEADER:
        raise FrameError("short")
    magic, version, ttl, src, dst = HEADER.unpack_from(frame, 0)
    if magic != MAGIC:
        raise FrameError("bad-magic")
    if version != VERSION:
        raise FrameError("bad-version")
    if src > MAX_SHORT_ID or dst > MAX_SHORT_ID:
        raise FrameError("bad-short-id")
    check_ipv4(frame, HEADER_SIZE, length - HEADER_SIZE)
    return ttl, src, dst


def check_ipv4(buf: bytes | bytearray | memoryview, offset: int, length: int) -> None:
    """The ``length`` bytes at ``offset`` are one IPv4 packet whose header says exactly that length."""
    if length < IPV4_HEADER:
        raise FrameError("short")
    first = buf[offset]
    if first >> 4 != 4:
        raise FrameError("not-ipv4")
    if (first & 0x0F) < 5 or (first & 0x0F) * 4 > length:
        raise FrameError("bad-ip-header")
    if (buf[offset + 2] << 8 | buf[offset + 3]) != length:
        raise FrameError("bad-length")


def ipv4_destination(buf: bytes | bytearray | memoryview, offset: int) -> int:
    """The destination address of the IPv4 packet at ``offset``, as an integer."""
    return int.from_bytes(buf[offset + 16:offset + 20], "big")
