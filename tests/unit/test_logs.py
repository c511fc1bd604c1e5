"""Event → log line mapping, and what the configured renderers actually print."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from weaved.adapters.logs import LogLine, configure_logging, describe_event, describe_summary, emit, reset_logging
from weaved.core.events import (
    ConnectionStateChanged,
    NameCollision,
    PeerJoined,
    PeerLeft,
    PeerRestarted,
    RelayDelivered,
)
from weaved.core.status import ConnectionStatus, MeshStatus, PeerStatus

N2 = "aa:bb:cc:dd:ee:02"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    reset_logging()


def test_connection_established() -> None:
    line = describe_event(ConnectionStateChanged("198.51.100.12:6783", f"{N2}(n2)", "connecting", "established",
                                                 "protocol 1"))
    assert line == LogLine("info", "connection established", {
        "peer": f"{N2}(n2)", "address": "198.51.100.12:6783", "previous": "connecting", "reason": "protocol 1"})
    assert list(line.fields)[:2] == ["peer", "address"], "who and where come first on the line"


def test_failed_connection_is_a_warning_and_unknown_peer_is_omitted() -> None:
    line = describe_event(ConnectionStateChanged("198.51.100.14:6783", None, "connecting", "failed",
                                                 "no answer to handshake"))
    assert line.level == "warning"
    assert line.message == "connection failed"
    assert "peer" not in line.fields
    assert line.fields["reason"] == "no answer to handshake"


def test_peer_joined_lists_addresses_as_one_value() -> None:
    line = describe_event(PeerJoined(N2, "n2", ("198.51.100.12:6783", "198.51.100.13:6783")))
    assert line == LogLine("info", "peer joined",
                           {"name": N2, "nickname": "n2", "addresses": "198.51.100.12:6783,198.51.100.13:6783"})
    assert describe_event(PeerJoined(N2, "n2", ())).fields["addresses"] == "-"


def test_peer_left_restarted_collision_relay() -> None:
    assert describe_event(PeerLeft(N2, "n2", "no longer reachable")) == LogLine(
        "info", "peer left", {"name": N2, "nickname": "n2", "reason": "no longer reachable"})
    assert describe_event(PeerRestarted(N2, "n2")) == LogLine("info", "peer restarted", {"name": N2, "nickname": "n2"})
    collision = describe_event(NameCollision("198.51.100.9:6783", N2, "clone"))
    assert (collision.level, collision.message) == ("error", "peer name collision")
    assert collision.fields["address"] == "198.51.100.9:6783"
    assert "peer-name" in collision.fields["hint"]
    assert describe_event(RelayDelivered(N2, "ipam", b"12345")) == LogLine(
        "debug", "relay delivered", {"src": N2, "channel": "ipam", "bytes": 5})


def test_summary_counts_the_snapshot() -> None:
    status = MeshStatus(
        "aa:bb:cc:dd:ee:01", "n1", 1, 1, "weaved 1..1", 6783, 200,
        peers=[PeerStatus(f"aa:bb:cc:dd:ee:0{i}", f"n{i}", i, 1, i, [], None) for i in range(1, 6)],
        connections=[ConnectionStatus(f"10.0.0.{i}:6783", True, s, None, None, "")
                     for i, s in enumerate(["established"] * 4 + ["failed"])],
        targets=["10.0.0.1:6783", "10.0.0.2:6783", "10.0.0.3:6783", "10.0.0.4:6783"],
        counters={"rx_datagrams": 10, "tx_datagrams": 12, "dropped_bad-field": 2, "dropped_unexpected": 1},
    )
    assert describe_summary(status) == LogLine("info", "mesh summary", {
        "peers": 5, "established": 4, "failed": 1, "targets": 4, "rx_datagrams": 10, "tx_datagrams": 12, "dropped": 3})


def test_console_lines_are_readable_and_plain_when_not_a_tty() -> None:
    out = io.StringIO()
    configure_logging("console", "info", out)
    emit(structlog.get_logger(), describe_event(
        ConnectionStateChanged("198.51.100.12:6783", f"{N2}(n2)", "connecting", "established", "protocol 1")))
    emit(structlog.get_logger(), LogLine("debug", "hidden at info", {}))
    text = out.getvalue()
    assert "\x1b[" not in text, "no colour codes in a file"
    assert text.count("\n") == 1, "debug is filtered at level info"
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[info\s*\] connection established\s+"
        rf"peer={N2}\(n2\) address=198\.51\.100\.12:6783 previous=connecting reason='protocol 1'$",
        text.rstrip("\n"),
    ), text


def test_json_lines_parse_with_event_level_and_timestamp() -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out)
    emit(structlog.get_logger(), describe_event(PeerLeft(N2, "n2", "no longer reachable")))
    emit(structlog.get_logger(), describe_event(RelayDelivered(N2, "ipam", b"x")))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["peer left", "relay delivered"]
    assert records[0]["level"] == "info"
    assert records[0]["name"] == N2
    assert records[1]["level"] == "debug"
    assert records[0]["timestamp"].endswith("Z")


def test_standard_library_records_share_the_format_and_are_not_doubled() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", first)
    configure_logging("json", "info", second)
    logging.getLogger("aiohttp.server").error("Error handling request")
    assert first.getvalue() == ""
    record = json.loads(second.getvalue())
    assert (record["event"], record["level"]) == ("Error handling request", "error")
