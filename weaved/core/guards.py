"""Bounded defences against forged control datagrams: an answer budget per source and a broadcast filter.

Theory of operation
-------------------
UDP sources are forgeable, so a datagram that makes us answer can aim the answer at anyone we are
connected to. Three defences, each with tables that stay bounded whatever arrives:

* :class:`AnswerBudget`: gossip answers to one address (a digest for a summary, entries for a request,
  a push for a digest) are paid from credit that the address earns at :data:`ANSWER_RATIO` times the bytes
  it sent us within the last :data:`BUDGET_WINDOW` seconds. A connection whose handshake proved that the
  peer receives at its address (it echoed our random token) also gets one grant, the size of a full pull
  of our topology, so a joining peer still pulls everything at once. A spoofer can thus draw at most four
  times what it sends, plus one grant per real connection.
* :class:`BroadcastFilter`: a broadcast relay (``dst`` None) is handled once per (origin, payload hash)
  within :data:`BROADCAST_WINDOW` seconds; a replayed or looping broadcast dies at the first peer that
  has seen it. Broadcast payloads (IPAM ring state) are idempotent, so a dropped repeat loses nothing.
* :class:`RateGate`: one reply (or log line) per key per interval, for what a single forged datagram can
  trigger: the mesh's "unknown connection" rejects, the sealed transport's notices and refusal lines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from weaved.core.types import Endpoint, PeerName

ANSWER_RATIO = 4
"""Answer bytes per received byte (QUIC allows 3 before address validation; our grant stands in for that)."""
BUDGET_WINDOW = 60.0
"""Credit not topped up for this long is forgotten."""
MAX_SOURCES = 1024
"""Budget table size. Only addresses with an established connection earn credit, far fewer than this."""
BROADCAST_WINDOW = 2.0
MAX_BROADCASTS = 4096


@dataclass
class _Credit:
    bytes: float
    updated: float


class AnswerBudget:
    """Per-address byte credit for answers (see the module docstring)."""

    def __init__(self, ratio: int = ANSWER_RATIO, window: float = BUDGET_WINDOW, limit: int = MAX_SOURCES) -> None:
        self._ratio = ratio
        self._window = window
        self._limit = limit
        self._credit: dict[Endpoint, _Credit] = {}

    def __len__(self) -> int:
        return len(self._credit)

    def _get(self, source: Endpoint, now: float) -> _Credit:
        credit = self._credit.get(source)
        if credit is None or now - credit.updated > self._window:
            if credit is None and len(self._credit) >= self._limit:
                self._credit = {k: c for k, c in self._credit.items() if now - c.updated <= self._window}
                if len(self._credit) >= self._limit:
                    self._credit.clear()
            credit = self._credit[source] = _Credit(0.0, now)
        return credit

    def earn(self, source: Endpoint, received: int, now: float, cap: int) -> None:
        """``source`` sent us ``received`` bytes: it may draw ``ratio`` times that, up to ``cap`` in all."""
        credit = self._get(source, now)
        credit.bytes = min(float(cap), credit.bytes + self._ratio * received)
        credit.updated = now

    def grant(self, source: Endpoint, amount: int, now: float) -> None:
        """One-off credit for a connection whose handshake proved the peer receives at ``source``."""
        credit = self._get(source, now)
        credit.bytes = max(credit.bytes, float(amount))
        credit.updated = now

    def spend(self, source: Endpoint, size: int, now: float) -> bool:
        """Take ``size`` bytes of credit for an answer to ``source``; False (nothing taken) if short."""
        credit = self._get(source, now)
        if credit.bytes < size:
            return False
        credit.bytes -= size
        return True

    def forget(self, source: Endpoint) -> None:
        self._credit.pop(source, None)


class BroadcastFilter:
    """Remembers recent broadcasts by (origin, payload hash), bounded and expiring."""

    def __init__(self, window: float = BROADCAST_WINDOW, limit: int = MAX_BROADCASTS) -> None:
        self._window = window
        self._limit = limit
        self._seen: dict[tuple[PeerName, bytes], float] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, origin: PeerName, channel: str, payload: bytes, now: float) -> bool:
        """True for a broadcast not seen within the window (and remember it); False for a repeat."""
        key = (origin, hashlib.blake2b(channel.encode() + b"\0" + payload, digest_size=16).digest())
        seen = self._seen.get(key)
        if seen is not None and now - seen < self._window:
            return False
        if len(self._seen) >= self._limit:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self._window}
            if len(self._seen) >= self._limit:
                # A flood of distinct broadcasts within one window: forget the older half, oldest first.
                for old in list(self._seen)[: self._limit // 2]:
                    del self._seen[old]
        self._seen.pop(key, None)  # re-inserted at the end: the dict stays in order of last sighting
        self._seen[key] = now
        return True


class RateGate:
    """At most one "yes" per key per interval: for replies and log lines that a forged datagram can trigger
    (so they neither amplify nor flood the log). Bounded: when ``limit`` keys are held, the ones past
    their interval go, and if that is not enough, all of them (a flood then costs at most one extra yes
    per key, never memory)."""

    __slots__ = ("_keep", "_last", "_limit")

    def __init__(self, limit: int = 4096, keep: float = 0.0) -> None:
        """``keep``: the longest interval callers use, so that clearing room on a short interval's call never
        forgets a long interval's keys (a once-a-minute log line would else repeat under a flood)."""
        self._last: dict[object, float] = {}
        self._limit = limit
        self._keep = keep

    def allow(self, key: object, now: float, interval: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < interval:
            return False
        if len(self._last) >= self._limit:
            horizon = max(interval, self._keep)
            self._last = {k: t for k, t in self._last.items() if now - t < horizon}
            if len(self._last) >= self._limit:
                self._last.clear()
        self._last[key] = now
        return True

    def __len__(self) -> int:
        return len(self._last)
