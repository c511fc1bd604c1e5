"""Structured logs: one readable line per thing an operator cares about.

Theory of operation
-------------------
The core reports what happened as :mod:`~weaved.core.events` values; :func:`describe_event` turns each
into a :class:`LogLine` (level, a short fixed message to grep for, and key=value fields). That mapping is
pure, so it is unit-tested without a logger. :func:`emit` hands a line to structlog, which
:func:`configure_logging` sets up for people (``console``: timestamp, level, message, then fields in a
stable order, colours only on a terminal) or for log pipelines (``json``: one object per line).

Messages are stable strings (``connection established``, ``peer left`` …) and details go in fields, so
``grep 'peer left'`` or a JSON query on ``event`` keeps working when the details change.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

from weaved.core.events import (
    AuthFailed,
    ConnectionStateChanged,
    MeshEvent,
    NameCollision,
    PeerJoined,
    PeerLeft,
    PeerRestarted,
    RelayDelivered,
)
from weaved.core.status import MeshStatus

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass(frozen=True)
class LogLine:
    """What to log: ``level`` is a key of :data:`LEVELS`, ``message`` the structlog event."""

    level: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


def _join(addresses: tuple[str, ...] | list[str]) -> str:
    """Addresses as one comma-separated value: reads well in console lines and stays a plain string in JSON."""
    return ",".join(addresses) if addresses else "-"


def describe_event(event: MeshEvent) -> LogLine:
    """The log line for one core event."""
    match event:
        case ConnectionStateChanged(address=address, peer=peer, old=old, new=new, reason=reason):
            fields: dict[str, Any] = {"peer": peer} if peer else {}
            fields |= {"address": address, "previous": old, "reason": reason}
            return LogLine("warning" if new == "failed" else "info", f"connection {new}", fields)
        case PeerJoined(name=name, nickname=nickname, addresses=addresses):
            return LogLine("info", "peer joined", {"name": name, "nickname": nickname, "addresses": _join(addresses)})
        case PeerLeft(name=name, nickname=nickname, reason=reason):
            return LogLine("info", "peer left", {"name": name, "nickname": nickname, "reason": reason})
        case PeerRestarted(name=name, nickname=nickname):
            return LogLine("info", "peer restarted", {"name": name, "nickname": nickname})
        case NameCollision(address=address, name=name, nickname=nickname):
            return LogLine("error", "peer name collision", {
                "address": address, "name": name, "nickname": nickname,
                "hint": "two live peers share a name (cloned machine id?): delete STATE_DIR/peer-name on one",
            })
        case AuthFailed(address=address, reason=reason):
            return LogLine("warning", f"peer at {address}: {reason}", {"address": address, "reason": reason})
        case RelayDelivered(src=src, channel=channel, payload=payload):
            return LogLine("debug", "relay delivered", {"src": src, "channel": channel, "bytes": len(payload)})
    # A new event type in the core must not crash the daemon; it still gets a line until it gets a mapping.
    return LogLine("info", type(event).__name__, dataclasses.asdict(event))  # pragma: no cover


def describe_summary(status: MeshStatus) -> LogLine:
    """The periodic ``mesh summary`` line: the mesh's health in one glance."""
    failed = sum(1 for c in status.connections if c.state == "failed")
    dropped = sum(v for k, v in status.counters.items() if k.startswith("dropped_"))
    return LogLine("info", "mesh summary", {
        "peers": len(status.peers),
        "established": status.established,
        "failed": failed,
        "targets": len(status.targets),
        "rx_datagrams": status.counters.get("rx_datagrams", 0),
        "tx_datagrams": status.counters.get("tx_datagrams", 0),
        "dropped": dropped,
    })


def emit(logger: Any, line: LogLine) -> None:
    """Send ``line`` to a structlog logger at its level."""
    getattr(logger, line.level)(line.message, **line.fields)


class _WeavedHandler(logging.StreamHandler[TextIO]):
    """Marks the stdlib handler we install, so configuring twice replaces it instead of doubling lines."""


def configure_logging(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Route structlog to ``stream`` (stderr by default) as ``console`` or ``json`` lines at ``level``.

    Libraries that log through the standard library (aiohttp's server errors, asyncio's warnings) are
    rendered the same way, so the daemon's output stays one format that one parser can read.
    """
    out = stream if stream is not None else sys.stderr
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty(), sort_keys=False, pad_event_to=24)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exc_info: list[Any] = [structlog.processors.format_exc_info] if fmt == "json" else []
    structlog.configure(
        processors=[*shared, *exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = _WeavedHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exc_info, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _WeavedHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])


def reset_logging() -> None:
    """Undo :func:`configure_logging` (for tests and embedders that configure logging several times)."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _WeavedHandler)]:
        root.removeHandler(handler)
