"""The daemon's pump driven in-process over real loopback UDP: wake-up, leave, bad input, bursts, summaries."""

from __future__ import annotations

import io
import random
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute, TaskGroup, UDPSocket

from weaved.adapters.daemon import RECEIVE_BATCH, Node
from weaved.adapters.ipam import open_allocator
from weaved.adapters.store import SnapshotStore
from weaved.adapters.udp import open_control_socket
from weaved.config import HostPort
from weaved.core.ipam.ring import AddressRange
from weaved.core.ipam.seeding import SeedInit
from weaved.core.mesh import MeshConfig, MeshPeer
from weaved.core.types import Endpoint, PeerIdentity, PeerUID, default_short_id, derive_peer_name
from weaved.core.wire import Hello, decode

pytestmark = pytest.mark.anyio

QUIET = MeshConfig(anti_entropy_interval=3600.0)
"""No timer due for a long while: anything sent promptly was sent because the pump was woken."""


def identity(nickname: str) -> PeerIdentity:
    name = derive_peer_name("test/" + nickname)
    return PeerIdentity(name, nickname, PeerUID(random.getrandbits(63) + 1), default_short_id(name))


def port_of(udp: UDPSocket) -> int:
    return int(udp.extra(SocketAttribute.local_port))


async def until(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    with anyio.fail_after(timeout, shield=False):
        while not predicate():
            await anyio.sleep(0.01)
    assert predicate(), what


@contextmanager
def loopback_node(nickname: str) -> Iterator[Node]:
    """A node on its own control socket on 127.0.0.1 (a port the kernel picks), its pump not started; its
    IPAM owns a /24 alone and keeps its state in a temporary directory."""
    me = identity(nickname)
    with open_control_socket("127.0.0.1", 0) as sock, tempfile.TemporaryDirectory() as state_dir:
        store = SnapshotStore(Path(state_dir))
        allocator, nicknames = open_allocator(me.name, AddressRange.from_cidr("10.32.0.0/24"), SeedInit((me.name,)),
                                              store, random.Random(7))
        config = MeshConfig(port=sock.getsockname()[1], anti_entropy_interval=QUIET.anti_entropy_interval)
        yield Node(MeshPeer(me, config, random.Random(7), now=time.monotonic()), sock, allocator, store,
                   nicknames=nicknames)


@asynccontextmanager
async def running_node(tg: TaskGroup, nickname: str) -> AsyncIterator[Node]:
    with loopback_node(nickname) as node:
        done = anyio.Event()

        async def pump() -> None:
            await node.pump()
            done.set()

        tg.start_soon(pump)
        yield node
        node.stop()
        with anyio.fail_after(2):
            await done.wait()


async def test_connect_wakes_the_pump_to_dial_at_once() -> None:
    async with anyio.create_task_group() as tg, running_node(tg, "a") as node, \
            await anyio.create_udp_socket(local_host="127.0.0.1") as far:
        await anyio.wait_all_tasks_blocked()  # the pump now waits for a timer hundreds of seconds away
        assert await node.connect(HostPort("127.0.0.1", port_of(far))) == [node_endpoint(far)]
        with anyio.fail_after(1):
            data, (_, port) = await far.receive()
        assert isinstance(decode(data).body, Hello)
        assert port == node.peer.config.port


def node_endpoint(udp: UDPSocket) -> Endpoint:
    return Endpoint("127.0.0.1", port_of(udp))


async def test_two_nodes_connect_and_a_leave_is_seen_at_once(logs: io.StringIO) -> None:
    async with anyio.create_task_group() as tg, running_node(tg, "a") as a:
        async with running_node(tg, "b") as b:
            await a.connect(HostPort("127.0.0.1", b.peer.config.port))
            await until(lambda: a.snapshot().established == 1 and b.snapshot().established == 1, "established")
        # b has left (its pump returned after sending goodbyes): a drops it without waiting for a timeout
        await until(lambda: a.snapshot().established == 0, "a saw the goodbye", timeout=QUIET.dead_after / 2)
    text = logs.getvalue()
    assert "connection established" in text
    assert "reason='peer left'" in text


async def test_garbage_costs_a_counter_not_the_pump() -> None:
    async with anyio.create_task_group() as tg, running_node(tg, "a") as node, \
            await anyio.create_udp_socket(local_host="127.0.0.1") as far:
        await far.sendto(b"\xc1 not msgpack", "127.0.0.1", node.peer.config.port)
        await until(lambda: sum(v for k, v in node.snapshot().counters.items() if k.startswith("dropped_")) == 1,
                    "the datagram was counted as dropped")
        await node.connect(HostPort("127.0.0.1", port_of(far)))
        with anyio.fail_after(1):
            await far.receive()  # still pumping


BURST = 300
"""Well over the 100 datagrams anyio's UDP socket kept (it silently dropped older ones), and over
:data:`RECEIVE_BATCH`; yet small enough for a default-sized kernel buffer (``net.core.rmem_max`` = 208 KiB
holds some 500 tiny datagrams)."""


async def test_a_burst_that_arrives_before_the_pump_reads_is_not_lost() -> None:
    assert max(100, RECEIVE_BATCH) < BURST
    with loopback_node("a") as node, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as far:
        for i in range(BURST):  # malformed, distinct: each one is counted, none is answered
            far.sendto(b"\xc1" + i.to_bytes(2, "big"), ("127.0.0.1", node.peer.config.port))
        await anyio.sleep(0.1)  # the event loop runs; nothing reads the socket until the pump does
        assert node.snapshot().counters.get("rx_datagrams", 0) == 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(node.pump)
            await until(lambda: node.snapshot().counters.get("rx_datagrams", 0) >= BURST, "the whole burst was read")
            node.stop()
    counters = node.snapshot().counters
    assert counters["rx_datagrams"] == BURST
    assert sum(v for k, v in counters.items() if k.startswith("dropped_")) == BURST


async def test_summaries_are_logged_periodically(logs: io.StringIO) -> None:
    async with anyio.create_task_group() as tg, running_node(tg, "a") as node:
        with anyio.move_on_after(5) as scope:
            async with anyio.create_task_group() as summaries:
                summaries.start_soon(node.log_summaries, 0.02)
                await until(lambda: logs.getvalue().count("mesh summary") >= 2, "two summaries")
                summaries.cancel_scope.cancel()
        assert not scope.cancelled_caught
    assert "peers=1 established=0 failed=0 targets=0" in logs.getvalue()
