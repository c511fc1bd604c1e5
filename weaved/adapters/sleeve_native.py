"""The C hot loop of the offload sleeve (``weaved/adapters/_sleevepump.c``), when it was built.

Theory of operation
-------------------
:class:`~weaved.adapters.sleeve_offload.OffloadLoop` is the whole data path in Python; the C pump runs the
same loop without the GIL and does the two common cases itself (a packet for a version-2 neighbour, a whole
frame for us), handing everything else back to the Python methods in the same buffers. This module is the
seam: whether the extension is there (:data:`AVAILABLE`), and the forwarding table packed the way the pump
reads it (:func:`pack_table`), a pure function of the table so it can be checked without the pump.

The layout (native byte order, what the C structs in ``_sleevepump.c`` declare): a head of magic, own short
id, segment count, sender count, owner count, key count and a 4096-bit map of the known short ids; then per ring
segment ``start, end, next-hop IPv4 (network order), port, destination short id, chunk limit, routable``; then per
sender ``IPv4, port, sealed``; then per owner piece of the ring ``start, end, short id, 0`` (the spoofing
check); then the sleeve keys (:data:`KEY`: each neighbour's send key and its one or two receive keys). A
segment the Python path must decide (a drop reason, a next hop that is not an IPv4 literal) is packed with
``routable = 0`` and the pump hands its packets back.
"""

from __future__ import annotations

import socket
import struct
from types import ModuleType

from weaved.core import sleeve
from weaved.core.forwarding import ForwardingTable

_pump: ModuleType | None
try:
    from weaved.adapters import _sleevepump as _pump
    from weaved.adapters._sleevepump import Pump
except ImportError:  # built without a C compiler: the Python loop carries the traffic alone
    _pump = None

AVAILABLE = _pump is not None
TABLE_MAGIC = 0x57535432
"""Must equal the C side's (``_sleevepump.TABLE_MAGIC``, checked by the tests)."""
HEAD = struct.Struct("=IIIIII512s")
SEGMENT = struct.Struct("=II4sHHHH")
SENDER = struct.Struct("=4sHH")
OWNER = struct.Struct("=IIHH")
KEY = struct.Struct("=4sHHI32s")
"""A sleeve key: the neighbour's IPv4 and port, 0 (we seal with it) or 1 (we open with it), id, key."""
SENDER_SEALED = 1
NO_ADDRESS = bytes(4)
MAX_ADDRESS = 0xFFFF_FFFF


def _ipv4(host: str) -> bytes | None:
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return None


def pack_table(table: ForwardingTable, own_chunk: int) -> bytes:
    """``table`` as the pump reads it; chunk limits are already capped at ``own_chunk`` (our underlay's)."""
    known = bytearray(512)
    for short_id in table.known:
        if 0 <= short_id <= sleeve.MAX_SHORT_ID:
            known[short_id >> 3] |= 1 << (short_id & 7)
    segments = []
    for start, end, route in zip(table.starts, table.ends, table.routes, strict=True):
        end = min(end, MAX_ADDRESS)  # the last address of all then goes to the Python path
        ip = None if isinstance(route, str) else _ipv4(route[1][0])
        if isinstance(route, str) or ip is None:
            segments.append(SEGMENT.pack(start, end, NO_ADDRESS, 0, 0, 0, 0))
            continue
        dst, address = route
        limit = min(table.chunk_limits.get(address, 0), own_chunk)
        segments.append(SEGMENT.pack(start, end, ip, address[1], dst, limit, 1))
    senders = [SENDER.pack(ip, port, SENDER_SEALED if (host, port) in table.keys else 0)
               for host, port in sorted(table.senders) if (ip := _ipv4(host)) is not None]
    keys = []
    for (host, port), peer in sorted(table.keys.items()):
        if (ip := _ipv4(host)) is None:
            continue
        keys.append(KEY.pack(ip, port, 0, peer.current.send_id, peer.current.send_key))
        for session in (peer.current, peer.previous):
            if session is not None:
                keys.append(KEY.pack(ip, port, 1, session.recv_id, session.recv_key))
    owners = [OWNER.pack(start, min(end, MAX_ADDRESS), short_id, 0)
              for start, end, short_id in zip(table.owner_starts, table.owner_ends, table.owner_ids, strict=True)
              if start < MAX_ADDRESS]
    head = HEAD.pack(TABLE_MAGIC, table.own_short_id, len(segments), len(senders), len(owners), len(keys),
                     bytes(known))
    return head + b"".join(segments) + b"".join(senders) + b"".join(owners) + b"".join(keys)


AEADS: tuple[str, ...] = () if _pump is None else tuple(getattr(_pump, "AEADS", ("openssl",)))
"""The libraries the pump can seal with here, fastest first ('libgcrypt' where it was built with libgcrypt and
the CPU has AES-NI and PCLMULQDQ, then 'openssl'): all the same AES-256-GCM (``_sleevepump.c``)."""


def new_pump(read_buffer: bytearray, receive_buffer: bytearray, aead: str | None = None) -> Pump | None:
    """A pump over the Python loop's buffers, or None when the extension was not built. ``aead``: one of
    :data:`AEADS` (tests), None the fastest."""
    return None if _pump is None else _pump.Pump(read_buffer, receive_buffer, aead)
