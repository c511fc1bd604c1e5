"""The sleeve's packet loop: TUN → UDP and UDP → TUN, one blocking thread each.

Theory of operation
-------------------
This module is the whole hot path, kept small and behind :class:`PacketLoop` so a faster one (vnet
headers, GSO, batching: ``reference/datapath-performance.md``) can replace it without touching the rest.

* **outbound** thread: read one IPv4 packet from the TUN into a preallocated buffer, behind room for the
  8-byte header; look the destination up in the current :class:`~weaved.core.forwarding.ForwardingTable`;
  write the header in front; ``sendto`` the next hop's sleeve address.
* **inbound** thread: ``recvfrom_into`` a preallocated buffer; accept only frames from an established
  neighbour's sleeve address; check the header and the inner packet (:func:`weaved.core.sleeve.decode_header`);
  a frame for us goes into the TUN, one for another peer is relayed with ``ttl - 1``.

Threads, not the event loop: a wake-up of the event loop per packet costs more than the packet
(measured: +10 µs asyncio, +50 µs anyio). Both threads read :attr:`PacketLoop.table`, which the daemon
replaces as a whole (one reference assignment is atomic under the GIL), so a packet is always handled with
one consistent table. Each thread keeps its own counters (no locks); :meth:`PacketLoop.counters` adds them
up for status and metrics.

The TUN descriptor is non-blocking: the outbound thread waits with ``poll`` for at most
:data:`POLL_TIMEOUT_MS` when the TUN is empty, so it notices :meth:`PacketLoop.stop`. The UDP socket is
blocking; :meth:`~PacketLoop.stop` shuts it down, which wakes a thread blocked in ``recvfrom_into``.
Packets that cannot be handled are dropped and counted by reason (:data:`weaved.core.sleeve.DROP_REASONS`),
never raised: nothing a peer sends can stop the loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from weaved.core import sleeve
from weaved.core.forwarding import EMPTY, ForwardingTable
from weaved.core.sleeveseal import SEALED_VERSIONS, Sealer

BUFFER_SIZE = 65_536 + sleeve.HEADER_SIZE
POLL_TIMEOUT_MS = 500
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
"""``linux/in.h``; Python's socket module has them at run time on Linux but typeshed does not list them."""
RECEIVE_BUFFER = 16 << 20
"""Asked-for UDP receive buffer (the kernel caps it at rmem_max without CAP_NET_ADMIN; with it
``SO_RCVBUFFORCE`` is used). A GRO batch of 44 chunks is charged at well over its 64 KB, and with 4 MiB
the C loop's receiver overflowed ~300 times per 5 s of ``iperf3 -P 4`` (``UdpRcvbufErrors``), which TCP
paid for with ~12,000 retransmits; 16 MiB: none (docs/performance.md)."""
SEND_BUFFER = 4 << 20
"""Asked-for UDP send buffer (``SO_SNDBUFFORCE`` or capped at wmem_max): the send blocks rather than drops."""


class PacketLoop(Protocol):
    """What the daemon needs from a packet loop (this one or a faster replacement)."""

    table: ForwardingTable

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def counters(self) -> dict[str, int]: ...

    def reattach(self, tun_fd: int) -> None: ...

    def close(self) -> None: ...


def open_sleeve_socket(host: str, port: int) -> socket.socket:
    """The sleeve's UDP socket: bound, blocking, big buffers, fragmentation allowed.

    ``IP_PMTUDISC_DONT``: a frame bigger than the path (an MTU set too high by hand) is fragmented by the
    kernel instead of being refused or black-holed; with the computed MTU nothing needs fragmenting.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        for force, plain, size in ((33, socket.SO_RCVBUF, RECEIVE_BUFFER), (32, socket.SO_SNDBUF, SEND_BUFFER)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class LoopBase:
    """What both packet loops share: the TUN descriptor (and the ones it replaced), the stop flag, and the
    guard that turns a bug in a packet thread into a counter instead of a dead data path."""

    def __init__(self, tun_fd: int) -> None:
        self._tun = tun_fd
        self._stopping = False
        self._retired: list[int] = []
        """Descriptors of TUN devices that were deleted under us: closed only by :meth:`close`, because a
        packet thread may be writing to one at this moment (closing it could let the number be reused)."""

    def reattach(self, tun_fd: int) -> None:
        """Use a new TUN descriptor (the device was deleted and created again); the packet threads switch at
        their next packet."""
        self._retired.append(self._tun)
        self._tun = tun_fd

    def close(self) -> None:
        """Close the TUN descriptors (current and retired) after ``stop()``."""
        for fd in {self._tun, *self._retired}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._retired.clear()

    def _guarded(self, body: Callable[[], None], counts: Counter[str]) -> None:
        """Run ``body`` until stopped; an exception costs ``internal_errors`` and ``body`` starts again."""
        while not self._stopping:
            try:
                body()
            except Exception:
                if self._stopping:
                    return
                counts["internal_errors"] += 1


class ThreadedLoop(LoopBase):
    """The plain, correct loop: one packet per syscall, two threads. See the module docstring."""

    def __init__(self, tun_fd: int, sock: socket.socket) -> None:
        super().__init__(tun_fd)
        self._sealer = Sealer()
        """Frames to and from neighbours in ``table.keys`` are sealed (:mod:`weaved.core.sleeveseal`). Both
        threads seal (the inbound one when it relays): :meth:`_seal` holds a lock, so a send counter is never
        read twice; only the inbound thread opens."""
        self._seal_lock = threading.Lock()
        self._table: ForwardingTable = EMPTY
        self._sock = sock
        self._threads: list[threading.Thread] = []
        self._out = Counter[str]()
        self._in = Counter[str]()

    @property
    def table(self) -> ForwardingTable:
        return self._table

    @table.setter
    def table(self, table: ForwardingTable) -> None:
        with self._seal_lock:
            self._sealer.update(table.keys)
        self._table = table

    def _seal(self, address: tuple[str, int], frame: memoryview) -> bytes:
        with self._seal_lock:
            return self._sealer.seal(address, frame)

    def start(self) -> None:
        for name, target, counts in (("sleeve-out", self._outbound, self._out),
                                     ("sleeve-in", self._inbound, self._in)):
            thread = threading.Thread(target=self._guarded, args=(target, counts), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask both threads to end and wait for them briefly (they are daemon threads in any case)."""
        self._stopping = True
        # ENOTCONN on an unconnected UDP socket, but the blocked receiver is woken all the same.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=2 * POLL_TIMEOUT_MS / 1000)

    def counters(self) -> dict[str, int]:
        # dict() of a dict is one C-level copy, atomic under the GIL; iterating the live Counters here
        # could meet a key a packet thread is adding at that moment.
        total = Counter(dict(self._out))
        total.update(dict(self._in))
        return dict(total)

    # --- TUN → UDP --------------------------------------------------------------------------------

    def _outbound(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        packet = view[sleeve.HEADER_SIZE:]
        poller = select.poll()
        registered = self._tun
        poller.register(registered, select.POLLIN)
        counts = self._out
        sendto = self._sock.sendto
        header = sleeve.HEADER.pack_into
        magic, version, ttl = sleeve.MAGIC, sleeve.VERSION, sleeve.DEFAULT_TTL
        while not self._stopping:
            tun = self._tun
            if tun != registered:
                poller.unregister(registered)
                poller.register(tun, select.POLLIN)
                registered = tun
            try:
                n = os.readv(tun, [packet])
            except BlockingIOError:
                poller.poll(POLL_TIMEOUT_MS)
                continue
            except OSError:  # the device was deleted: wait for the daemon to reattach a new one
                counts["tun_read_errors"] += 1
                time.sleep(POLL_TIMEOUT_MS / 1000)
                continue
            table = self.table
            if n < sleeve.IPV4_HEADER or buf[sleeve.HEADER_SIZE] >> 4 != 4:
                counts["drop_tun_not-ipv4"] += 1  # IPv6 router solicitations and the like
                continue
            route = table.lookup(int.from_bytes(buf[sleeve.HEADER_SIZE + 16:sleeve.HEADER_SIZE + 20], "big"))
            if isinstance(route, str):
                counts["drop_tun_" + route] += 1
                continue
            header(buf, 0, magic, version, ttl, table.own_short_id, route[0])
            try:
                if route[1] in table.keys:
                    sendto(self._seal(route[1], view[:n + sleeve.HEADER_SIZE]), route[1])
                    counts["tx_sealed"] += 1
                else:
                    sendto(view[:n + sleeve.HEADER_SIZE], route[1])
            except sleeve.FrameError as exc:
                counts["drop_tun_" + exc.reason] += 1
                continue
            except OSError as exc:
                counts["drop_tun_" + ("too-big" if exc.errno == errno.EMSGSIZE else "send-error")] += 1
                continue
            counts["tx_packets"] += 1
            counts["tx_bytes"] += n

    # --- UDP → TUN --------------------------------------------------------------------------------

    def _inbound(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        counts = self._in
        recv = self._sock.recvfrom_into
        sendto = self._sock.sendto
        write = os.write
        while not self._stopping:
            n, source = recv(buf)
            if self._stopping:
                return
            table = self.table
            if source not in table.senders:
                counts["drop_udp_unknown-sender"] += 1
                continue
            try:
                sealed = n > 2 and buf[2] in SEALED_VERSIONS
                if source in table.keys:
                    if not sealed:
                        raise sleeve.FrameError("unsealed")
                    plain = self._sealer.open(view[:n], source)
                    n = len(plain)
                    buf[:n] = plain
                    counts["rx_sealed"] += 1
                elif sealed:
                    raise sleeve.FrameError("auth")
                ttl, src, dst = sleeve.decode_header(buf, n)
                if src not in table.known:
                    raise sleeve.FrameError("unknown-source")
                table.check_inner(buf, sleeve.HEADER_SIZE, src, dst)
            except sleeve.FrameError as exc:
                counts["drop_udp_" + exc.reason] += 1
                continue
            if dst == table.own_short_id:
                try:
                    write(self._tun, view[sleeve.HEADER_SIZE:n])
                except OSError:
                    counts["drop_udp_tun-write-error"] += 1
                    continue
                counts["rx_packets"] += 1
                counts["rx_bytes"] += n - sleeve.HEADER_SIZE
                continue
            self._relay(buf, view, n, ttl, src, dst, table, counts, sendto)

    def _relay(self, buf: bytearray, view: memoryview, n: int, ttl: int, src: int, dst: int, table: ForwardingTable,
               counts: Counter[str], sendto: object) -> None:
        if ttl <= 1:
            counts["drop_udp_ttl-expired"] += 1
            return
        if dst not in table.known:
            counts["drop_udp_unknown-destination"] += 1
            return
        hop = table.relay.get(dst)
        if hop is None:
            counts["drop_udp_no-route"] += 1
            return
        sleeve.pack_header(buf, ttl - 1, src, dst)
        assert callable(sendto)
        try:
            if hop in table.keys:
                sendto(self._seal(hop, view[:n]), hop)
            else:
                sendto(view[:n], hop)
        except sleeve.FrameError as exc:
            counts["drop_udp_" + exc.reason] += 1
            return
        except OSError:
            counts["drop_udp_send-error"] += 1
            return
        counts["relayed_packets"] += 1
        counts["relayed_bytes"] += n - sleeve.HEADER_SIZE
