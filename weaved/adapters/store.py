"""IPAM state on disk: ``STATE_DIR/ipam.msgpack``, written atomically and fsync'd.

Theory of operation
-------------------
The allocator's durability rule (see :mod:`weaved.core.ipam.allocator`) says a lease must be on disk
before its address is handed out, and a donor must have recorded a grant before the recipient hears of
it. :meth:`SnapshotStore.write` is what "on disk" means: the bytes go to a temporary file in the same
directory, the file is fsync'd, renamed over the old one, and the directory is fsync'd so the rename
itself survives a power cut. A reader (the next start, after a crash at any instant) sees the old file or
the new one, never a mix, never an empty file.

The file wraps the allocator's opaque snapshot with the peer name and the range it belongs to, so a start
with another ``IPALLOC_RANGE`` or another peer name (a deleted ``peer-name`` file) is refused with a
one-line error that says what to fix, instead of restoring leases into a ring they do not belong to.
It also keeps the nicknames of the ring's owners, so ``weaved status ipam`` and ``weaved rmpeer NICKNAME``
still know a dead peer by name after this daemon restarted (the mesh forgets unreachable peers).

Every problem surfaces as :class:`StoreError` whose ``str()`` is one line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

IPAM_FILE = "ipam.msgpack"
FORMAT_VERSION = 1
MAX_FILE = 16 << 20
"""Far above any real snapshot (a ring's 4 MiB bound plus leases); bounds what a corrupt file can cost."""
MAX_NICKNAMES = 4_096
MAX_NICKNAME = 256


class StoreError(Exception):
    """The IPAM file cannot be read, belongs to another range or peer, or cannot be written."""


@dataclass(frozen=True)
class Stored:
    """What the file holds: the allocator's snapshot plus who it belongs to."""

    peer: str
    range: str
    snapshot: bytes
    nicknames: dict[str, str] = field(default_factory=dict)


def encode_stored(stored: Stored) -> bytes:
    data: bytes = msgpack.packb(
        [FORMAT_VERSION, stored.peer, stored.range, stored.snapshot, dict(sorted(stored.nicknames.items()))],
        use_bin_type=True,
    )
    return data


def decode_stored(data: bytes) -> Stored:
    """Parse the file's bytes; raises ValueError with a short reason."""
    if len(data) > MAX_FILE:
        raise ValueError(f"{len(data)} bytes, more than {MAX_FILE}")
    try:
        raw: Any = msgpack.unpackb(data, raw=False, max_ext_len=0, max_map_len=MAX_NICKNAMES,
                                   max_array_len=16, max_bin_len=MAX_FILE, max_str_len=MAX_NICKNAME)
    except Exception as exc:  # msgpack raises many types; all mean "not our format"
        raise ValueError(f"not msgpack ({type(exc).__name__})") from None
    if not (isinstance(raw, list) and len(raw) == 5):
        raise ValueError("not an IPAM state file")
    version, peer, range_text, snapshot, nicknames = raw
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version!r}, this weaved reads {FORMAT_VERSION}")
    if not (isinstance(peer, str) and isinstance(range_text, str) and isinstance(snapshot, bytes)
            and isinstance(nicknames, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in nicknames.items())):
        raise ValueError("malformed fields")
    return Stored(peer, range_text, snapshot, nicknames)


class SnapshotStore:
    """The IPAM file of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / IPAM_FILE
        self._tmp = state_dir / f".{IPAM_FILE}.tmp"

    def load(self, peer: str, address_range: str) -> Stored | None:
        """What the last run stored, or None on a first start. Refuses a file of another range or peer."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            stored = decode_stored(data)
        except ValueError as exc:
            raise StoreError(f"{self.path} is corrupt ({exc}): remove it to start IPAM afresh "
                             "(this peer's leases are then forgotten)") from None
        if stored.range != address_range:
            raise StoreError(f"{self.path} holds IPAM state for range {stored.range} but IPALLOC_RANGE is "
                             f"{address_range}: fix IPALLOC_RANGE, or remove the file to start IPAM afresh")
        if stored.peer != peer:
            raise StoreError(f"{self.path} belongs to peer {stored.peer} but this peer is {peer} "
                             "(was the peer-name file replaced?): restore the name, or remove the file")
        return stored

    def write(self, stored: Stored) -> None:
        """Replace the file atomically and durably (blocking: run it in a worker thread)."""
        data = encode_stored(stored)
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None
