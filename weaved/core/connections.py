"""Per-address connection and dial-target records, and the reconnect backoff.

Theory of operation
-------------------
UDP has no connections, so the mesh makes its own, one per remote address (a peer listens and sends
on the same port, so an inbound datagram's source is also the address to dial back)::

    outbound:  CONNECTING --HELLO_ACK--> ESTABLISHED
    inbound:   (HELLO) --> PENDING --any further datagram from that incarnation--> ESTABLISHED

Each end picks a random *token* per connection and sends it in its HELLO or HELLO_ACK; the other end
echoes it in HELLO_ACK, heartbeats and goodbyes. Only someone who saw the handshake knows it, so a
forger who merely spoofs a neighbour's address cannot cut the link (goodbye), keep a dead one alive
(heartbeats), or pass for our own returning HELLO. Peers of an older version send no token; their
connections work as before, without that protection.

A connection that hears nothing for ``dead_after`` seconds fails. A *target* is an address we want a
connection to: given by the operator (``--peer``, ``weaved connect``) or learnt from other peers'
connection lists. A target with no connection is dialled after a jittered, capped exponential backoff.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from weaved.core.types import Endpoint, PeerIdentity, PeerName


class ConnState(StrEnum):
    CONNECTING = "connecting"
    PENDING = "pending"
    ESTABLISHED = "established"


@dataclass
class Connection:
    address: Endpoint
    outbound: bool
    state: ConnState
    remote: PeerIdentity | None
    """Known once a HELLO or HELLO_ACK told us who is at ``address``."""
    protocol_version: int
    last_received: float
    next_send: float
    """When to retransmit HELLO (connecting) or send the next heartbeat (established)."""
    handshake_deadline: float
    overlays: tuple[str, ...] = ()
    """What the remote advertised in its HELLO or HELLO_ACK (the data path reads its sleeve port here)."""
    local_token: int = 0
    """Our random token for this connection: sent in our HELLO or HELLO_ACK, expected back in echoes."""
    peer_token: int | None = None
    """The remote's token, which we echo; None until learnt, and for ever from a peer too old to send one."""
    verified: bool = False
    """The remote echoed our token: it receives at ``address`` (not a blind spoofer)."""
    owed_digest: bool = False
    """A digest was refused for want of credit before the remote was verified: sent once it is."""

    @property
    def tokens(self) -> bool:
        """Whether the remote speaks tokens: then its heartbeats and goodbyes must echo ours."""
        return self.peer_token is not None

    def label(self) -> str | None:
        return self.remote.label() if self.remote else None


class TargetSource(StrEnum):
    DIRECT = "direct"
    LEARNT = "learnt"


@dataclass
class Target:
    address: Endpoint
    source: TargetSource
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    known_name: PeerName | None = None
    """The peer last seen at this address: no need to dial while it is connected elsewhere."""
    name_in_use: int = 0
    """Refusals because another live peer there uses our name; a few in a row mean a clone."""
    give_up: bool = False
    """Set for a name collision: retrying cannot help."""
    is_self: bool = False
    """The address turned out to be our own (a peer list that includes us)."""


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: ``base * factor**attempts``, ±``jitter`` fraction, at most ``cap``."""

    base: float = 1.0
    factor: float = 1.5
    cap: float = 20.0
    jitter: float = 0.5

    def delay(self, attempts: int, rng: random.Random) -> float:
        raw = min(self.cap, self.base * self.factor ** max(0, attempts - 1))
        return min(self.cap, raw * (1.0 + self.jitter * (2.0 * rng.random() - 1.0)))
