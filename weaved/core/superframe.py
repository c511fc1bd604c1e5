"""Sleeve frame version 2: a TSO super-packet cut into self-contained chunks, one inner segment each.

Theory of operation
-------------------
With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD(CSUM|TSO4)`` the kernel hands the sleeve TCP *super-packets* of
up to ~64 KB (one IPv4+TCP header, then many MSS-sized segments' worth of payload) behind a 10-byte virtio
header, and takes the same back. Sending one such packet costs one read, one ``sendmsg`` with
``UDP_SEGMENT`` (the kernel cuts it into wire datagrams) and, at the receiver, one ``recvmsg`` of the
coalesced batch (``UDP_GRO``) and one ``writev``: a few syscalls per 64 KB instead of ~45.

The cut is made along the *inner* segment boundaries: chunk ``i`` carries exactly the payload of inner
segment ``i``, preceded by a copy of the super-packet's headers, so every wire datagram is a complete inner
packet in all but its sequence number, IP id and lengths, and those follow from the chunk's index::

     0               1               2               3
    +---------------+---------------+---------------+---------------+
    |  magic 0x57 'W'  0x53 'S'     |  version (2)  |  ttl          |
    +---------------+---------------+---------------+---------------+
    |  src short id                 |  dst short id                 |
    +---------------+---------------+---------------+---------------+
    |  frame id (48 bits, per sender) ...                           |
    +               +               +---------------+---------------+
    |  ... frame id                 |  index        |  count        |
    +---------------+---------------+---------------+---------------+
    |  virtio_net_hdr (10 bytes, little-endian, as the TUN gave it)  |
    |  inner IPv4 + TCP header of the super-packet (H bytes)         |
    |  payload of inner segment ``index`` (MSS bytes; the last one may be shorter)
    +---------------------------------------------------------------+

All chunks of a frame have the same size except the last, which is what UDP GSO needs. The receiver:

* **fast path**: a GRO batch that holds exactly the chunks ``0..count-1`` of one frame (checked with one
  ``unpack`` of every chunk's 64-bit id word) is written to the TUN as the original super-packet: chunk 0's
  virtio header and headers, then every chunk's payload, gathered by ``writev`` without a copy;
* **otherwise** (a chunk lost on the wire, a frame split over two batches, reordering) each run of
  consecutive chunks is written as a smaller super-packet with its headers fixed up by :func:`run_header`
  (sequence number, IP id, total length, IP checksum, the TCP pseudo-header sum, FIN/PSH/CWR). So one lost
  wire packet costs the inner segment it carried, not the whole super-packet, and the receiver keeps no
  reassembly state at all.

A packet that is not a super-packet (an ACK, ICMP, UDP) is a frame of one chunk.

Peers negotiate: a peer whose TUN takes virtio headers advertises ``sleeve-gso:SIZE`` (the largest UDP
payload it takes per chunk) beside ``sleeve:PORT``; to any other peer we send version-1 frames, one whole
packet each, with checksums finished and super-packets cut into real segments in userspace
(:func:`segments`). Pure and sans-IO like the rest of ``weaved.core``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import lru_cache
from typing import Final

from weaved.core import sleeve
from weaved.core.sleeve import FrameError
from weaved.core.sleeveseal import OVERHEAD as SEAL_OVERHEAD

VERSION: Final = 2
CHUNK_HEADER = struct.Struct("!HBBHHQ")
"""magic, version, ttl, src short id, dst short id, id word (frame << 16 | index << 8 | count)."""
CHUNK_HEADER_SIZE: Final = CHUNK_HEADER.size
WORD_OFFSET: Final = 8
WORD = struct.Struct("!Q")
VNET = struct.Struct("<BBHHHH")
"""``struct virtio_net_hdr``: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""
VNET_SIZE: Final = VNET.size
PREFIX: Final = CHUNK_HEADER_SIZE + VNET_SIZE
"""Bytes in front of the inner packet in every chunk (26)."""
OVERHEAD: Final = sleeve.IPV4_HEADER + sleeve.UDP_HEADER + PREFIX
"""Underlay bytes per inner packet: outer IPv4 + UDP + chunk header + virtio header = 54."""
ZERO_VNET: Final = bytes(VNET_SIZE)
"""The virtio header of a packet that needs nothing done: what a version-1 packet gets on a vnet TUN."""

F_NEEDS_CSUM: Final = 1
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
MAX_CHUNKS: Final = 255
UDP_MAX_PAYLOAD: Final = 65_507
"""The most one UDP send may carry (IPv4), GSO included (EMSGSIZE beyond)."""
MAX_GSO_SEGMENTS: Final = 64
"""Segments per UDP GSO send that every kernel with UDP GSO takes (128 on ≥ 6.10, 64 before)."""
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
OVERLAY: Final = "sleeve-gso"
"""Advertised as ``sleeve-gso:SIZE`` by a peer that takes version-2 frames of chunks up to SIZE bytes."""
MIN_CHUNK: Final = PREFIX + sleeve.IPV4_HEADER + 20 + 1
MIN_GSO_SIZE: Final = 536
"""The smallest segment size a received super-packet may have (IPv4's default MSS): a virtio header with
gso_size 1 would make the TUN (or a relay's userspace segmentation) cut one chunk into ~1,400 packets. A
sender whose TCP really uses a smaller MSS cuts those super-packets itself (version-1 segments)."""


def pod_mtu(underlay_mtu: int, sealed: bool = False) -> int:
    """The MTU pods and the TUN get so that a full-size inner packet plus :data:`OVERHEAD` fits one underlay
    packet. The same with and without offloads, so that nodes of both kinds agree on the pod MTU. ``sealed``
    (a password): room for the seal too (:data:`weaved.core.sleeveseal.OVERHEAD`), one MTU for all peers,
    those on trusted subnets included."""
    return max(sleeve.MIN_MTU, underlay_mtu - OVERHEAD - (SEAL_OVERHEAD if sealed else 0))


def word(frame: int, index: int, count: int) -> int:
    """The 64-bit id word of chunk ``index`` of ``count`` in ``frame`` (48 bits of frame id kept)."""
    return (frame & 0xFFFF_FFFF_FFFF) << 16 | index << 8 | count


def chunks_per_send(chunk: int) -> int:
    """How many chunks of ``chunk`` bytes one GSO send may carry."""
    return max(1, min(MAX_GSO_SEGMENTS, UDP_MAX_PAYLOAD // chunk))


def tun_gso_max_size(mtu: int, header: int = 52) -> int:
    """The TUN's ``gso_max_size`` that keeps a super-packet (headers ``header``, MSS ``mtu - header``) within
    one GSO send: beyond it a frame takes two sends and reaches the peer as two runs (sealed chunks, 28 bytes
    bigger, sometimes do: the pods' limit, set by the CNI plugin, is the same formula)."""
    return chunks_per_send(PREFIX + mtu) * (mtu - header) + header


def chunk_limit(overlays: tuple[str, ...] | list[str]) -> int:
    """The chunk size a neighbour takes (its ``sleeve-gso:SIZE``), 0 when it speaks version 1 only."""
    for overlay in overlays:
        name, _, size = overlay.partition(":")
        if name == OVERLAY and size.isdigit() and MIN_CHUNK <= int(size) <= UDP_MAX_PAYLOAD:
            return int(size)
    return 0


def overlay(chunk: int) -> str:
    return f"{OVERLAY}:{chunk}"


# --- checksums ----------------------------------------------------------------------------------------

def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's complement sum of ``data`` (padded with a zero byte when odd), in 1..0xFFFF or 0.

    A big-endian integer of the bytes is congruent to the sum of its 16-bit words modulo 0xFFFF (because
    2**16 ≡ 1), so one ``int.from_bytes`` and one ``%`` replace a Python loop over the words."""
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\x00"
    value = int.from_bytes(raw, "big")
    total = value % 0xFFFF
    return 0xFFFF if total == 0 and value != 0 else total


def fold_add(a: int, b: int) -> int:
    """One's complement addition of two 16-bit values."""
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def ipv4_header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The checksum field value for an IPv4 header (whose own checksum field is taken as zero)."""
    raw = bytearray(header)
    raw[10:12] = b"\x00\x00"
    return ~ones_sum(raw) & 0xFFFF


def complete_checksum(packet: bytearray, csum_start: int, csum_offset: int) -> None:
    """What the kernel's ``skb_checksum_help`` does for a ``NEEDS_CSUM`` packet: sum from ``csum_start`` to
    the end (the checksum field holds the pseudo-header sum) and store the complement."""
    at = csum_start + csum_offset
    if at + 2 > len(packet) or csum_start >= len(packet):
        raise FrameError("bad-vnet")
    value = ~ones_sum(memoryview(packet)[csum_start:]) & 0xFFFF
    packet[at:at + 2] = value.to_bytes(2, "big")


def header_length(packet: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """IPv4 + TCP header length of the TCP/IPv4 packet at ``offset`` (from IHL and the data offset)."""
    ihl = (packet[offset] & 0x0F) * 4
    return ihl + (packet[offset + ihl + 12] >> 4) * 4


# --- the receiver's fix-up of a run --------------------------------------------------------------------

def run_header(template: bytes | bytearray | memoryview, first: int, chunks: int, total: int,
               payload: int) -> bytes:
    """Virtio header + IPv4/TCP headers for chunks ``first .. first+chunks-1`` (of ``total``) of a frame whose
    super-packet headers (virtio + IPv4 + TCP, as the chunks carry them) are ``template``, when those chunks
    hold ``payload`` bytes of TCP payload in all.

    The result is what the sending kernel's own segmentation would have put in front of that stretch:
    sequence number advanced by ``first`` MSS, IP id by ``first``, total length and IP checksum for the
    new size, the TCP checksum field (which holds the pseudo-header sum, ``NEEDS_CSUM``) moved to the new
    length, CWR only on the first segment, FIN and PSH only on the last. More than one chunk stays a
    super-packet (``GSO_TCPV4``, same MSS); a single chunk becomes a plain packet."""
    hdr = bytearray(template)
    flags, _gso_type, _hdr_len, mss, csum_start, csum_offset = VNET.unpack_from(hdr, 0)
    ip = VNET_SIZE
    ihl = (hdr[ip] & 0x0F) * 4
    tcp = ip + ihl
    headers = len(hdr) - VNET_SIZE
    if ihl < 20 or headers < ihl + 20 or mss == 0:
        raise FrameError("bad-vnet")
    old_total = hdr[ip + 2] << 8 | hdr[ip + 3]
    new_total = headers + payload
    hdr[ip + 2:ip + 4] = new_total.to_bytes(2, "big")
    ip_id = ((hdr[ip + 4] << 8 | hdr[ip + 5]) + first) & 0xFFFF
    hdr[ip + 4:ip + 6] = ip_id.to_bytes(2, "big")
    hdr[ip + 10:ip + 12] = ipv4_header_checksum(hdr[ip:ip + ihl]).to_bytes(2, "big")
    seq = (int.from_bytes(hdr[tcp + 4:tcp + 8], "big") + first * mss) & 0xFFFF_FFFF
    hdr[tcp + 4:tcp + 8] = seq.to_bytes(4, "big")
    tcp_flags = hdr[tcp + 13]
    if first > 0:
        tcp_flags &= ~TCP_CWR
    if first + chunks < total:
        tcp_flags &= ~(TCP_FIN | TCP_PSH)
    hdr[tcp + 13] = tcp_flags
    if flags & F_NEEDS_CSUM:
        check = hdr[tcp + 16] << 8 | hdr[tcp + 17]
        # The pseudo-header sum covers the TCP length: take the old one out, put the new one in.
        check = fold_add(fold_add(check, ~(old_total - ihl) & 0xFFFF), new_total - ihl)
        hdr[tcp + 16:tcp + 18] = check.to_bytes(2, "big")
    if chunks > 1:
        VNET.pack_into(hdr, 0, flags, GSO_TCPV4, headers, mss, csum_start, csum_offset)
    else:
        VNET.pack_into(hdr, 0, flags, GSO_NONE, headers, 0, csum_start, csum_offset)
    return bytes(hdr)


# --- version-1 peers: finish in userspace what the offloads left undone -------------------------------

def segments(vnet: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview) -> Iterator[bytearray]:
    """Complete IPv4 packets, checksums finished, for a packet read with virtio header ``vnet``: what a TUN
    without offloads would have handed over. A super-packet is cut into its MSS segments."""
    flags, gso_type, _hdr_len, mss, csum_start, csum_offset = VNET.unpack_from(vnet, 0)
    if gso_type == GSO_NONE:
        out = bytearray(packet)
        if flags & F_NEEDS_CSUM:
            complete_checksum(out, csum_start, csum_offset)
        yield out
        return
    if gso_type != GSO_TCPV4 or mss == 0 or len(packet) < 40:
        raise FrameError("bad-vnet")
    headers = header_length(packet)
    if headers > len(packet):
        raise FrameError("bad-vnet")
    template = bytes(vnet[:VNET_SIZE]) + bytes(packet[:headers])
    data = memoryview(packet)[headers:]
    total = max(1, -(-len(data) // mss))
    for index in range(total):
        piece = data[index * mss:(index + 1) * mss]
        out = bytearray(run_header(template, index, 1, total, len(piece))[VNET_SIZE:])
        out += piece
        complete_checksum(out, csum_start, csum_offset)
        yield out


# --- the receiver's checks ------------------------------------------------------------------------------

def decode_chunk(buf: bytes | bytearray | memoryview, offset: int, length: int) -> tuple[int, int, int, int, int, int]:
    """``(ttl, src, dst, frame, index, count)`` of the chunk of ``length`` bytes at ``offset``, after checking
    its header and virtio header. Raises :class:`FrameError`."""
    if length < PREFIX + sleeve.IPV4_HEADER:
        raise FrameError("short")
    magic, version, ttl, src, dst, wid = CHUNK_HEADER.unpack_from(buf, offset)
    if magic != sleeve.MAGIC:
        raise FrameError("bad-magic")
    if version != VERSION:
        raise FrameError("bad-version")
    if src > sleeve.MAX_SHORT_ID or dst > sleeve.MAX_SHORT_ID:
        raise FrameError("bad-short-id")
    index, count = (wid >> 8) & 0xFF, wid & 0xFF
    if count == 0 or index >= count:
        raise FrameError("bad-chunk")
    check_vnet(buf, offset + CHUNK_HEADER_SIZE, length - CHUNK_HEADER_SIZE)
    if count > 1 and buf[offset + CHUNK_HEADER_SIZE + 1] != GSO_TCPV4:
        raise FrameError("bad-chunk")  # only super-packets are cut into several chunks
    return ttl, src, dst, wid >> 16, index, count


def check_vnet(buf: bytes | bytearray | memoryview, offset: int, length: int) -> None:
    """The virtio header at ``offset`` describes the IPv4 packet after it (``length`` bytes for both)."""
    flags, gso_type, _hdr_len, mss, csum_start, csum_offset = VNET.unpack_from(buf, offset)
    inner = length - VNET_SIZE
    first = buf[offset + VNET_SIZE]
    if first >> 4 != 4:
        raise FrameError("not-ipv4")
    ihl = (first & 0x0F) * 4
    if ihl < sleeve.IPV4_HEADER or ihl > inner:
        raise FrameError("bad-ip-header")
    # Only NEEDS_CSUM: DATA_VALID (2) would tell the pod's stack that the checksum was already verified.
    if gso_type not in (GSO_NONE, GSO_TCPV4) or flags & ~F_NEEDS_CSUM:
        raise FrameError("bad-vnet")
    if flags & F_NEEDS_CSUM and (csum_start < ihl or csum_start + csum_offset + 2 > inner):
        raise FrameError("bad-vnet")
    if gso_type == GSO_TCPV4 and (mss < MIN_GSO_SIZE or not flags & F_NEEDS_CSUM or buf[offset + VNET_SIZE + 9] != 6
                                  or ihl + 20 > inner):
        raise FrameError("bad-vnet")


@lru_cache(maxsize=256)
def batch_words(count: int, size: int) -> struct.Struct:
    """A Struct that reads the id word of each of ``count`` chunks of ``size`` bytes laid end to end (the
    last may be shorter), so one C call checks a whole GRO batch."""
    gap = size - WORD.size
    return struct.Struct("!" + f"{WORD_OFFSET}xQ{gap - WORD_OFFSET}x" * (count - 1) + f"{WORD_OFFSET}xQ")


def is_whole_frame(buf: bytes | bytearray | memoryview, count: int, size: int) -> bool:
    """True when the ``count`` chunks of ``size`` bytes at the start of ``buf`` are exactly chunks
    ``0..count-1`` of one frame, in order. False (never an exception) for sizes that cannot hold a chunk
    header or a ``buf`` too short for them."""
    if count < 1 or size < WORD_OFFSET + WORD.size or len(buf) < (count - 1) * size + WORD_OFFSET + WORD.size:
        return False
    if count == 1:  # ACKs, UDP, ICMP: no Struct per datagram size
        return bool(WORD.unpack_from(buf, WORD_OFFSET)[0] & 0xFFFF == 1)
    words = batch_words(count, size).unpack_from(buf, 0)
    first = words[0]
    if first & 0xFFFF != count:  # index 0 and this many chunks in the frame
        return False
    return bool(words == tuple(range(first, first + (count << 8), 256)))
