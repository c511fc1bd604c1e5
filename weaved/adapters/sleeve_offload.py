"""The fast sleeve loop: a virtio-header TUN, super-packets cut into chunks, UDP GSO out and UDP GRO in.

Theory of operation
-------------------
The frame format and why it is cut along inner segments are in :mod:`weaved.core.superframe`; this module
is the I/O around it, one thread that serves both directions:

* **TUN → UDP.** One read into a preallocated buffer; one ``pack_into`` writes every chunk's prefix
  (chunk header; for chunks after the first also the virtio and inner headers) into a table, and one
  ``sendmsg`` with ``UDP_SEGMENT`` = chunk size gathers prefix, payload, prefix, payload... from the two
  buffers without a copy in Python (:class:`Gather`); the kernel cuts the datagrams.
* **UDP → TUN.** ``recvmsg_into`` with ``UDP_GRO`` returns a batch of same-size datagrams and their size in
  a control message. A batch that is exactly one frame goes to the TUN with one ``writev`` of chunk 0's
  headers and every chunk's payload; anything else is taken datagram by datagram and written as runs
  (:func:`weaved.core.superframe.run_header`). Version-1 frames from peers without offloads are taken too.
* **Relays** forward version-2 chunks unchanged but for the ttl when the next hop takes them, and cut them
  into finished version-1 packets when it does not.
* **Peers without offloads** (no ``sleeve-gso`` in their HELLO) get version-1 frames: the packet's checksum
  finished and super-packets segmented in userspace (:func:`weaved.core.superframe.segments`), slow but
  correct.

* **Sealing** (a password, :mod:`weaved.core.sleeveseal`): every datagram to or from a neighbour in
  ``table.keys`` is sealed on its own; :meth:`OffloadLoop._send` seals whatever the Python path sends
  (through the C pump's own keys and counters when it runs), :meth:`OffloadLoop._open_batch` opens a
  batch in place before anything else looks at it.

One thread, not two: after writing a packet into the TUN the answer (a TCP ACK, a ping reply) usually
comes back out of the TUN microseconds later, so the thread keeps polling both descriptors without
sleeping for :data:`SPIN_SECONDS` after the last packet, and a request/response costs no extra wake-up.
Everything a peer can send is dropped and counted by reason, never raised.

The C pump (:mod:`weaved.adapters.sleeve_native`), when it was built, runs this same loop without the GIL
and takes the two common cases itself: a packet for a neighbour that takes version-2 chunks, and a
datagram or GRO batch that is one whole frame for us. It hands everything else to :meth:`OffloadLoop._outbound`
and :meth:`OffloadLoop._inbound` in the same buffers, so this module stays the one definition of what
the sleeve does; the pump only makes the common case cheaper (``native=False`` runs Python alone).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeAlias

from weaved.adapters import sleeve_native
from weaved.adapters.sleeve import LoopBase
from weaved.core import sleeve, superframe
from weaved.core.forwarding import EMPTY, ForwardingTable
from weaved.core.sleeve import FrameError
from weaved.core.sleeveseal import OVERHEAD as SEAL_OVERHEAD
from weaved.core.sleeveseal import SEALED_VERSIONS, Sealer
from weaved.core.superframe import (
    CHUNK_HEADER,
    CHUNK_HEADER_SIZE,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    PREFIX,
    VNET,
    VNET_SIZE,
    ZERO_VNET,
)

Buffer: TypeAlias = bytes | bytearray | memoryview
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_TUN_READ = VNET_SIZE + 65_535
RX_BUFFER = 1 << 17
"""Receive buffer: a GRO batch is at most 64 KB; twice that leaves no doubt."""
SPIN_SECONDS = 200e-6
"""How long the thread keeps polling without sleeping after its last packet (see the module docstring)."""
DRAIN = 32
"""Packets taken from one descriptor before looking at the other, so neither direction starves."""
POLL_TIMEOUT_MS = 500


class Gather:
    """How one super-packet with ``headers`` bytes of IPv4+TCP headers and MSS ``mss`` leaves as chunks.

    The packet is read contiguously (virtio header first) into the loop's read buffer. The chunk
    prefixes (chunk header, then for chunks after the first a copy of the virtio and inner headers) are
    written by one ``pack_into`` into :attr:`table`, and ``sendmsg`` gathers prefix, payload, prefix,
    payload... from the two buffers, which :attr:`iov` lays out once for every chunk count. UDP GSO cuts
    that stream at every :attr:`size` bytes, i.e. exactly at the chunk boundaries."""

    def __init__(self, headers: int, mss: int, read: memoryview) -> None:
        self.headers, self.mss = headers, mss
        self.size = PREFIX + headers + mss
        prefix = PREFIX + headers
        self.table = bytearray(CHUNK_HEADER_SIZE + (superframe.MAX_CHUNKS - 1) * prefix)
        table = memoryview(self.table)
        first = VNET_SIZE + headers + mss
        self.iov: list[memoryview] = [table[:CHUNK_HEADER_SIZE], read[:first]]
        for index in range(1, -(-(len(read) - first) // mss) + 1):
            at = CHUNK_HEADER_SIZE + (index - 1) * prefix
            payload = first + (index - 1) * mss
            self.iov += [table[at:at + prefix], read[payload:payload + mss]]
        self._structs: dict[int, struct.Struct] = {}

    def prefixes(self, chunks: int) -> struct.Struct:
        """``8s Q`` for chunk 0, then ``8s Q {VNET_SIZE + headers}s`` per further chunk."""
        found = self._structs.get(chunks)
        if found is None:
            found = self._structs[chunks] = struct.Struct(
                "!8sQ" + f"8sQ{VNET_SIZE + self.headers}s" * (chunks - 1))
        return found


class OffloadLoop(LoopBase):
    """See the module docstring. ``own_chunk`` is the biggest chunk our underlay carries (its MTU − 28);
    ``native``: use the C pump when it was built."""

    def __init__(self, tun_fd: int, sock: socket.socket, *, own_chunk: int = 1472, native: bool = True) -> None:
        super().__init__(tun_fd)
        self._table: ForwardingTable = EMPTY
        self._sock = sock
        self._own_chunk = own_chunk
        self._thread: threading.Thread | None = None
        self._counts = Counter[str]()
        self._frame = 0
        self._read = bytearray(MAX_TUN_READ)
        self._readview = memoryview(self._read)
        self._gathers: dict[tuple[int, int], Gather] = {}
        self._head = bytearray(CHUNK_HEADER_SIZE)
        self._rx = bytearray(RX_BUFFER)
        self._rxview = memoryview(self._rx)
        self._segment_options: dict[int, list[tuple[int, int, bytes]]] = {}
        self._scatter: dict[tuple[int, int], list[memoryview]] = {}
        """(chunk size, inner headers) → the slices of a whole frame's payloads in the receive buffer."""
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        self._pump = sleeve_native.new_pump(self._read, self._rx) if native else None
        self._sealer = Sealer()
        self._seal_batch: Callable[[tuple[str, int], Buffer, int], bytes | None] = (
            self._pump.seal if self._pump is not None else self._seal_python)
        """Seals what the Python path sends: the pump's own (its counters are the ones its fast path uses,
        a nonce must never repeat) or :class:`~weaved.core.sleeveseal.Sealer` without it."""

    @property
    def native(self) -> bool:
        """True when the C pump carries the common cases (see the module docstring)."""
        return self._pump is not None

    @property
    def table(self) -> ForwardingTable:
        return self._table

    @table.setter
    def table(self, table: ForwardingTable) -> None:
        if self._pump is not None:  # first, so that a table the pump refuses is not half taken
            self._pump.set_table(sleeve_native.pack_table(table, self._own_chunk))
        else:
            self._sealer.update(table.keys)
        self._table = table

    # --- PacketLoop ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded, args=(self._run, self._counts), name="sleeve",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._pump is not None:
            self._pump.interrupt()
        if self._thread is not None:
            self._thread.join(timeout=2 * POLL_TIMEOUT_MS / 1000)

    def reattach(self, tun_fd: int) -> None:
        super().reattach(tun_fd)
        if self._pump is not None:
            self._pump.interrupt()  # run() returns and is called again with the new descriptor

    def counters(self) -> dict[str, int]:
        counts = Counter(dict(self._counts))  # one C-level copy: atomic under the GIL
        if self._pump is not None:
            counts.update(self._pump.counters())
        return dict(counts)

    # --- the thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        if self._pump is not None:
            self._pump.run(self._tun, self._sock.fileno(), self._outbound, self._inbound, SPIN_SECONDS,
                           POLL_TIMEOUT_MS)
            return
        poller = select.poll()
        registered = self._tun
        poller.register(registered, select.POLLIN)
        poller.register(self._sock.fileno(), select.POLLIN)
        readv, recv = os.readv, self._sock.recvmsg_into
        rxview = self._rxview
        ancillary = socket.CMSG_SPACE(4)
        clock = time.perf_counter
        yield_cpu = os.sched_yield
        busy_until = 0.0
        while not self._stopping:
            tun = self._tun
            if tun != registered:
                poller.unregister(registered)
                poller.register(tun, select.POLLIN)
                registered = tun
            worked = False
            read = [self._read]
            for _ in range(DRAIN):
                try:
                    n = readv(tun, read)
                except BlockingIOError:
                    break
                except OSError:  # the device was deleted: wait for the daemon to reattach a new one
                    self._counts["tun_read_errors"] += 1
                    time.sleep(POLL_TIMEOUT_MS / 1000)
                    break
                worked = True
                self._outbound(n)
            for _ in range(DRAIN):
                try:
                    n, anc, flags, source = recv([rxview], ancillary, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    self._counts["udp_receive_errors"] += 1  # e.g. ICMP port unreachable from a peer's past
                    break
                worked = True
                segment = n
                for level, kind, data in anc:
                    if level == SOL_UDP and kind == UDP_GRO:
                        segment = int.from_bytes(data[:4], sys.byteorder)
                if flags & socket.MSG_TRUNC:
                    self._counts["drop_udp_truncated"] += 1
                    continue
                self._inbound(n, segment, source)
            if worked:
                busy_until = clock() + SPIN_SECONDS
            elif clock() < busy_until:
                yield_cpu()  # keep the CPU awake, but let the pod, the peer's daemon or the kernel run
            else:
                poller.poll(POLL_TIMEOUT_MS)

    # --- TUN → UDP ----------------------------------------------------------------------------------

    def _gather_for(self, headers: int, mss: int) -> Gather:
        gather = self._gathers.get((headers, mss))
        if gather is None:
            if len(self._gathers) > 16:
                self._gathers.clear()
            gather = self._gathers[(headers, mss)] = Gather(headers, mss, self._readview)
        return gather

    def _outbound(self, n: int) -> None:
        counts = self._counts
        buf, view = self._read, self._readview
        if n < VNET_SIZE + sleeve.IPV4_HEADER or buf[VNET_SIZE] >> 4 != 4:
            counts["drop_tun_not-ipv4"] += 1
            return
        table = self.table
        route = table.lookup(int.from_bytes(buf[VNET_SIZE + 16:VNET_SIZE + 20], "big"))
        if isinstance(route, str):
            counts["drop_tun_" + route] += 1
            return
        dst, address = route
        counts["tx_packets"] += 1
        counts["tx_bytes"] += n - VNET_SIZE
        flags, gso_type, _hdr_len, mss, _cs, _co = VNET.unpack_from(buf, 0)
        overhead = SEAL_OVERHEAD if address in table.keys else 0
        limit = max(0, min(table.chunk_limits.get(address, 0), self._own_chunk) - overhead)
        frame = self._frame = self._frame + 1
        if gso_type == GSO_NONE:
            if limit and CHUNK_HEADER_SIZE + n <= limit:
                head = self._head
                CHUNK_HEADER.pack_into(head, 0, sleeve.MAGIC, superframe.VERSION, sleeve.DEFAULT_TTL,
                                       table.own_short_id, dst, superframe.word(frame, 0, 1))
                self._send([head, view[:n]], address, 0)
            else:
                self._send_v1(n, dst, address, flags)
            return
        if gso_type != GSO_TCPV4 or mss == 0:
            counts["drop_tun_bad-vnet"] += 1
            return
        headers = superframe.header_length(buf, VNET_SIZE)
        payload = n - VNET_SIZE - headers
        if payload <= 0:
            counts["drop_tun_bad-vnet"] += 1
            return
        chunks = -(-payload // mss)
        size = PREFIX + headers + mss
        if not limit or size > limit or chunks > superframe.MAX_CHUNKS or mss < superframe.MIN_GSO_SIZE:
            counts["tx_segmented"] += 1
            for packet in superframe.segments(view[:VNET_SIZE], view[VNET_SIZE:n]):
                self._send_packet_v1(packet, dst, address)
            return
        gather = self._gather_for(headers, mss)
        first = superframe.word(frame, 0, chunks)
        pre = sleeve.HEADER.pack(sleeve.MAGIC, superframe.VERSION, sleeve.DEFAULT_TTL, table.own_short_id, dst)
        values: list[object] = [pre, first]
        if chunks > 1:
            rest: list[object] = [pre, 0, bytes(view[:VNET_SIZE + headers])] * (chunks - 1)
            rest[1::3] = range(first + 256, first + (chunks << 8), 256)
            values += rest
        gather.prefixes(chunks).pack_into(gather.table, 0, *values)
        last = VNET_SIZE + headers + (chunks - 1) * mss
        iov = [*gather.iov[:2 * chunks - 1], view[last if chunks > 1 else 0:n]]  # one chunk: the whole packet
        per_send = superframe.chunks_per_send(size + overhead)
        for start in range(0, chunks, per_send):
            self._send(iov[2 * start:2 * (start + per_send)], address, size)
        counts["tx_superpackets"] += 1
        counts["tx_chunks"] += chunks

    def _send(self, data: Sequence[Buffer], address: tuple[str, int], segment: int) -> None:
        """One datagram, or with ``segment`` a GSO send the kernel cuts into datagrams of that size; sealed
        (each datagram on its own) when we share keys with the neighbour at ``address``."""
        if address in self.table.keys:
            sealed = self._seal_batch(address, b"".join(data), segment)
            if sealed is None:
                self._counts["drop_tun_auth"] += 1
                return
            size = segment + SEAL_OVERHEAD if segment else 0
            step = superframe.chunks_per_send(size) * size if size else len(sealed)
            view = memoryview(sealed)
            for at in range(0, len(sealed), step):
                piece = view[at:at + step]
                self._send_plain([piece], address, size if len(piece) > size else 0)
            self._counts["tx_sealed"] += -(-len(sealed) // size) if size else 1
            return
        self._send_plain(data, address, segment)

    def _seal_python(self, address: tuple[str, int], data: Buffer, segment: int) -> bytes | None:
        try:
            return self._sealer.seal_batch(address, data, segment)
        except FrameError:
            return None

    def _send_plain(self, data: Sequence[Buffer], address: tuple[str, int], segment: int) -> None:
        try:
            if segment:
                options = self._segment_options.get(segment)
                if options is None:
                    options = [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, sys.byteorder))]
                    self._segment_options[segment] = options
                self._sock.sendmsg(data, options, 0, address)
            else:
                self._sock.sendmsg(data, (), 0, address)
        except OSError as exc:
            too_big = exc.errno in (errno.EMSGSIZE, errno.EINVAL)
            self._counts["drop_tun_" + ("too-big" if too_big else "send-error")] += 1

    def _send_v1(self, n: int, dst: int, address: tuple[str, int], flags: int) -> None:
        """The plain packet in the read buffer to a version-1 peer: checksum finished when the kernel left it
        to us, the 8-byte header gathered in front of it."""
        packet = self._readview[VNET_SIZE:n]
        if flags & F_NEEDS_CSUM:
            _f, _g, _h, _m, csum_start, csum_offset = VNET.unpack_from(self._read, 0)
            finished = bytearray(packet)
            try:
                superframe.complete_checksum(finished, csum_start, csum_offset)
            except FrameError as exc:
                self._counts["drop_tun_" + exc.reason] += 1
                return
            self._send_packet_v1(finished, dst, address)
            return
        self._send_packet_v1(packet, dst, address)

    def _send_packet_v1(self, packet: Buffer, dst: int, address: tuple[str, int],
                        ttl: int = sleeve.DEFAULT_TTL, src: int | None = None) -> None:
        header = sleeve.HEADER.pack(sleeve.MAGIC, sleeve.VERSION, ttl,
                                    self.table.own_short_id if src is None else src, dst)
        self._send([header, packet], address, 0)

    # --- UDP → TUN ----------------------------------------------------------------------------------

    def _inbound(self, n: int, segment: int, source: tuple[str, int], opened: bool = False) -> None:
        """``n`` bytes in the receive buffer from ``source``, datagrams of ``segment`` bytes (GRO; the last
        may be shorter). ``opened``: the C pump already opened them (sealed datagrams, now plain frames)."""
        counts = self._counts
        table = self.table
        if source not in table.senders:
            counts["drop_udp_unknown-sender"] += 1
            return
        if n < sleeve.HEADER_SIZE:  # an empty datagram too, whose GRO "segment" is 0
            counts["drop_udp_short"] += 1
            return
        if not opened and source in table.keys:
            n, segment = self._open_batch(n, segment, source)
            if n == 0:
                return
        rx, view = self._rx, self._rxview
        count = -(-n // segment) if segment else 1
        if (n >= PREFIX + sleeve.IPV4_HEADER and rx[2] == superframe.VERSION
                and superframe.is_whole_frame(rx, count, segment)):
            try:
                ttl, src, dst, _frame, _index, _count = self._decode_chunk(0, min(segment, n))
            except FrameError as exc:
                counts["drop_udp_" + exc.reason] += 1
                return
            if dst != table.own_short_id:
                self._relay_chunks(0, n, segment, ttl, src, dst)
                return
            if count == 1:
                self._deliver([view[CHUNK_HEADER_SIZE:n]], n - PREFIX, 0)
                return
            headers = superframe.header_length(rx, PREFIX)
            skip = PREFIX + headers
            base = self._scatter.get((segment, headers))
            if base is None:
                if len(self._scatter) > 16:
                    self._scatter.clear()
                base = self._scatter[(segment, headers)] = [view[CHUNK_HEADER_SIZE:segment]] + [
                    view[at + skip:at + segment] for at in range(segment, RX_BUFFER - segment, segment)]
            last = (count - 1) * segment
            self._deliver([*base[:count - 1], view[last + skip:n]], n - count * skip + headers, count)
            return
        self._inbound_each(n, segment)

    def _open_batch(self, n: int, segment: int, source: tuple[str, int]) -> tuple[int, int]:
        """Open every datagram of a batch from a neighbour we share keys with, in place: the plain frames
        end up laid end to end from the start of the buffer, ``segment - OVERHEAD`` bytes apart (a datagram
        that does not open is dropped and counted, the others close up). The new ``(n, segment)``."""
        counts = self._counts
        rx, view = self._rx, self._rxview
        step = segment if 0 < segment < n else n
        out = 0
        for at in range(0, n, step):
            length = min(step, n - at)
            try:
                if length < 3 or rx[at + 2] not in SEALED_VERSIONS:
                    raise FrameError("unsealed")
                plain = self._sealer.open(view[at:at + length], source)
            except FrameError as exc:
                counts["drop_udp_" + exc.reason] += 1
                continue
            rx[out:out + len(plain)] = plain
            out += len(plain)
            counts["rx_sealed"] += 1
        opened = step - SEAL_OVERHEAD
        return out, (opened if out > opened else out)

    def _decode_chunk(self, at: int, length: int) -> tuple[int, int, int, int, int, int]:
        """:func:`weaved.core.superframe.decode_chunk` of the chunk at ``at``, from a peer we know."""
        decoded = superframe.decode_chunk(self._rx, at, length)
        if decoded[1] not in self.table.known:
            raise FrameError("unknown-source")
        self.table.check_inner(self._rx, at + PREFIX, decoded[1], decoded[2])
        return decoded

    def _deliver(self, iov: Sequence[Buffer], length: int, chunks: int) -> None:
        """Write one packet or super-packet of ``length`` bytes into the TUN. ``iov[0]`` starts with the
        virtio header, then the IPv4 header, whose total length must be ``length``."""
        counts = self._counts
        head = memoryview(iov[0])
        if len(head) < VNET_SIZE + 4 or (head[VNET_SIZE + 2] << 8 | head[VNET_SIZE + 3]) != length:
            counts["drop_udp_bad-length"] += 1
            return
        try:
            os.writev(self._tun, iov)
        except OSError:
            counts["drop_udp_tun-write-error"] += 1
            return
        counts["rx_packets"] += 1
        counts["rx_bytes"] += length
        if chunks > 1:
            counts["rx_superpackets"] += 1
            counts["rx_chunks"] += chunks

    def _deliver_v1(self, packet: memoryview) -> None:
        """A version-1 packet (checked by :func:`weaved.core.sleeve.decode_header`) into our virtio TUN."""
        try:
            os.writev(self._tun, [ZERO_VNET, packet])
        except OSError:
            self._counts["drop_udp_tun-write-error"] += 1
            return
        self._counts["rx_packets"] += 1
        self._counts["rx_bytes"] += len(packet)

    def _inbound_each(self, n: int, segment: int) -> None:
        """The general case: every datagram of the batch on its own; consecutive chunks of one frame for us
        are gathered into runs and written with fixed-up headers."""
        counts = self._counts
        table = self.table
        rx, view = self._rx, self._rxview
        run: list[tuple[int, int]] = []  # (offset, length) of consecutive chunks of one frame
        run_key: tuple[int, int, int] | None = None  # (src, frame, next index)
        run_count = 0
        for at in range(0, n, segment or n):
            length = min(segment or n, n - at)
            try:
                version = rx[at + 2] if length > 2 else -1
                if length < sleeve.HEADER_SIZE or (rx[at] << 8 | rx[at + 1]) != sleeve.MAGIC:
                    raise FrameError("short" if length < sleeve.HEADER_SIZE else "bad-magic")
                if version in SEALED_VERSIONS:
                    raise FrameError("auth")  # from a neighbour we share no keys with
                if version == sleeve.VERSION:
                    ttl, src, dst = sleeve.decode_header(view[at:at + length], length)
                    if src not in table.known:
                        raise FrameError("unknown-source")
                    table.check_inner(rx, at + sleeve.HEADER_SIZE, src, dst)
                    if dst == table.own_short_id:
                        self._deliver_v1(view[at + sleeve.HEADER_SIZE:at + length])
                    else:
                        self._relay_v1(at, length, ttl, src, dst)
                    continue
                ttl, src, dst, frame, index, count = self._decode_chunk(at, length)
            except FrameError as exc:
                counts["drop_udp_" + exc.reason] += 1
                continue
            if dst != table.own_short_id:
                self._relay_chunks(at, length, length, ttl, src, dst)
                continue
            if run and run_key == (src, frame, index):
                run.append((at, length))
                run_key = (src, frame, index + 1)
                continue
            if run:
                self._write_run(run, run_count, run_key)
            run, run_key, run_count = [(at, length)], (src, frame, index + 1), count
        if run:
            self._write_run(run, run_count, run_key)

    def _write_run(self, run: list[tuple[int, int]], count: int, key: tuple[int, int, int] | None) -> None:
        assert key is not None
        view = self._rxview
        first = key[2] - len(run)
        at, length = run[0]
        if count == 1:
            self._deliver([view[at + CHUNK_HEADER_SIZE:at + length]], length - PREFIX, 0)
            return
        headers = superframe.header_length(self._rx, at + PREFIX)
        skip = PREFIX + headers
        payloads = [view[a + skip:a + n] for a, n in run]
        payload = sum(len(p) for p in payloads)
        if first == 0 and len(run) == count:
            self._deliver([view[at + CHUNK_HEADER_SIZE:at + length], *payloads[1:]], headers + payload, count)
            return
        try:
            head = superframe.run_header(view[at + CHUNK_HEADER_SIZE:at + skip], first, len(run), count, payload)
        except FrameError as exc:
            self._counts["drop_udp_" + exc.reason] += 1
            return
        self._counts["rx_partial_runs"] += 1
        self._deliver([head, *payloads], headers + payload, len(run))

    # --- relays -------------------------------------------------------------------------------------

    def _next_hop(self, ttl: int, dst: int) -> tuple[str, int] | None:
        counts = self._counts
        if ttl <= 1:
            counts["drop_udp_ttl-expired"] += 1
            return None
        if dst not in self.table.known:
            counts["drop_udp_unknown-destination"] += 1
            return None
        hop = self.table.relay.get(dst)
        if hop is None:
            counts["drop_udp_no-route"] += 1
        return hop

    def _relay_v1(self, at: int, length: int, ttl: int, src: int, dst: int) -> None:
        hop = self._next_hop(ttl, dst)
        if hop is None:
            return
        self._rx[at + 3] = ttl - 1
        self._send([self._rxview[at:at + length]], hop, 0)
        self._counts["relayed_packets"] += 1
        self._counts["relayed_bytes"] += length - sleeve.HEADER_SIZE

    def _relay_chunks(self, at: int, n: int, segment: int, ttl: int, src: int, dst: int) -> None:
        """Send chunks ``rx[at:at+n]`` (of ``segment`` bytes each) on towards ``dst``."""
        hop = self._next_hop(ttl, dst)
        if hop is None:
            return
        rx, view = self._rx, self._rxview
        counts = self._counts
        overhead = SEAL_OVERHEAD if hop in self.table.keys else 0
        if segment + overhead <= min(self.table.chunk_limits.get(hop, 0), self._own_chunk):
            for offset in range(at, at + n, segment):
                rx[offset + 3] = ttl - 1
            self._send([view[at:at + n]], hop, segment if n > segment else 0)
        else:
            for offset in range(at, at + n, segment):
                length = min(segment, at + n - offset)
                try:
                    for packet in self._chunk_packets(offset, length):
                        self._send_packet_v1(packet, dst, hop, ttl - 1, src)
                except FrameError as exc:
                    counts["drop_udp_" + exc.reason] += 1
        counts["relayed_packets"] += 1
        counts["relayed_bytes"] += n

    def _chunk_packets(self, at: int, length: int) -> list[bytearray]:
        """A version-2 chunk as the finished IPv4 packet(s) a version-1 peer takes."""
        view = self._rxview
        _t, _s, _d, _f, index, count = superframe.decode_chunk(self._rx, at, length)
        vnet = view[at + CHUNK_HEADER_SIZE:at + PREFIX]
        if count == 1:
            return list(superframe.segments(vnet, view[at + PREFIX:at + length]))
        headers = superframe.header_length(self._rx, at + PREFIX)
        skip = PREFIX + headers
        head = superframe.run_header(view[at + CHUNK_HEADER_SIZE:at + skip], index, 1, count, length - skip)
        return list(superframe.segments(head[:VNET_SIZE], head[VNET_SIZE:] + bytes(view[at + skip:at + length])))

