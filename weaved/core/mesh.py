"""MeshPeer: the sans-IO mesh state machine (IMPLEMENTATION IN PROGRESS - interface fixed)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from weaved.core.events import MeshEvent
from weaved.core.status import MeshStatus
from weaved.core.types import Endpoint, PeerIdentity


@dataclass(frozen=True)
class MeshConfig:
    port: int = 6783
    conn_limit: int = 200
    heartbeat_interval: float = 1.0
    dead_after: float = 6.0


class MeshPeer:
    def __init__(self, identity: PeerIdentity, config: MeshConfig, rng: random.Random, now: float,
                 initial_version: int = 1) -> None:
        raise NotImplementedError

    def add_target(self, address: Endpoint, now: float) -> None: ...
    def forget_target(self, address: Endpoint) -> None: ...
    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_deadline(self) -> float | None: ...
    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]: ...
    def events(self) -> list[MeshEvent]: ...
    def leave(self, now: float) -> None: ...
    def status(self, now: float) -> MeshStatus: ...
