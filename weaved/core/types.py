"""Value types shared by the pure core: peer names, UIDs, short ids and UDP endpoints.

Peer names follow Weave Net: six bytes written like a MAC address (``aa:bb:cc:dd:ee:ff``). They sort
the same as strings and as integers, which keeps route computation deterministic across peers. On the
wire a name travels as its six raw bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import NewType

PeerName = NewType("PeerName", str)
"""Stable identity of a peer across restarts, MAC-formatted."""

PeerUID = NewType("PeerUID", int)
"""Random 64-bit number chosen at each start: a new UID means the peer restarted."""

ShortID = NewType("ShortID", int)
"""12-bit id used by the data path to name a peer compactly (Weave uses it as a VXLAN VNI half)."""

SHORT_ID_BITS = 12
SHORT_ID_SPACE = 1 << SHORT_ID_BITS
UID_MAX = (1 << 64) - 1


def peer_name_from_bytes(raw: bytes) -> PeerName:
    """Six raw bytes to the printable name."""
    if len(raw) != 6:
        raise ValueError(f"peer name must be 6 bytes, got {len(raw)}")
    return PeerName(":".join(f"{b:02x}" for b in raw))


def peer_name_to_bytes(name: PeerName) -> bytes:
    """The printable name back to its six raw bytes (raises ValueError if malformed)."""
    parts = name.split(":")
    if len(parts) != 6 or any(len(p) != 2 for p in parts):
        raise ValueError(f"malformed peer name {name!r}")
    return bytes(int(p, 16) for p in parts)


def derive_peer_name(seed: str) -> PeerName:
    """A name from a stable seed (machine id + node name), as a locally administered unicast MAC.

    Setting the locally-administered bit and clearing the multicast bit keeps the name from looking
    like any real NIC's address, which matters when names show up in tools that parse MACs.
    """
    digest = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    digest[0] = (digest[0] | 0x02) & 0xFE
    return peer_name_from_bytes(bytes(digest))


def default_short_id(name: PeerName) -> ShortID:
    """Deterministic first choice of short id; collisions are settled by the topology (lowest name keeps)."""
    return ShortID(int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big") % SHORT_ID_SPACE)


@lru_cache(maxsize=65_536)
def _check_ip(host: str) -> None:
    ipaddress.ip_address(host)  # raises ValueError on anything but an IP literal


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """A UDP address: IP literal and port. Host names are resolved by adapters, never by the core."""

    host: str
    port: int

    def __post_init__(self) -> None:
        _check_ip(self.host)
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int) -> Endpoint:
        """Parse ``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` (IP literals only)."""
        text = text.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
            return cls(host, port)
        if text.count(":") == 1:
            host, port_text = text.split(":")
            return cls(host, int(port_text))
        return cls(text, default_port)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Everything a peer says about itself in a handshake."""

    name: PeerName
    nickname: str
    uid: PeerUID
    short_id: ShortID

    def label(self) -> str:
        """Weave's ``name(nickname)`` form, used in status and logs."""
        return f"{self.name}({self.nickname})"
