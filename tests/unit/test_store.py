"""The IPAM state file: atomic, durable replacement; one-line refusals of corrupt or foreign files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from weaved.adapters.ipam import open_allocator
from weaved.adapters.store import IPAM_FILE, SnapshotStore, Stored, StoreError, decode_stored, encode_stored
from weaved.core.ipam.allocator import Allocator
from weaved.core.ipam.ring import AddressRange
from weaved.core.ipam.seeding import SeedInit
from weaved.core.types import PeerName

ME = PeerName("aa:bb:cc:dd:ee:01")
RANGE = AddressRange.from_cidr("10.32.0.0/24")


def leased_snapshot(count: int) -> bytes:
    allocator = Allocator(ME, RANGE, SeedInit((ME,)), random.Random(1))
    for i in range(count):
        allocator.allocate(f"c{i}", "eth0", 0.0)
    return allocator.snapshot()


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    assert store.load(ME, str(RANGE)) is None, "a first start has nothing"
    stored = Stored(ME, str(RANGE), leased_snapshot(3), {ME: "n1", "aa:bb:cc:dd:ee:02": "n2"})
    store.write(stored)
    assert store.load(ME, str(RANGE)) == stored
    assert decode_stored(encode_stored(stored)) == stored


def test_the_allocator_restores_its_leases_from_the_store(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.write(Stored(ME, str(RANGE), leased_snapshot(5), {ME: "n1"}))
    allocator, nicknames = open_allocator(ME, RANGE, SeedInit((ME,)), store, random.Random(2))
    assert [lease.container_id for lease in allocator.leases()] == [f"c{i}" for i in range(5)]
    assert nicknames == {ME: "n1"}


def test_write_replaces_through_a_synced_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data reaches the disk (fsync of the file) before the rename, and the rename before we return
    (fsync of the directory): readers never see a partial file."""
    store = SnapshotStore(tmp_path)
    store.write(Stored(ME, str(RANGE), b"old"))
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        calls.append(f"fsync {path.name}")
        if path.name.endswith(".tmp"):
            assert store.load(ME, str(RANGE)) == Stored(ME, str(RANGE), b"old"), "old file intact until rename"
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(f"replace {Path(src).name} {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.write(Stored(ME, str(RANGE), b"new"))
    assert calls == [f"fsync .{IPAM_FILE}.tmp", f"replace .{IPAM_FILE}.tmp {IPAM_FILE}", f"fsync {tmp_path.name}"]
    assert store.load(ME, str(RANGE)) == Stored(ME, str(RANGE), b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [IPAM_FILE], "no temporary file left behind"


def test_a_write_that_fails_leaves_the_old_file_and_says_why(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "gone")
    with pytest.raises(StoreError, match=r"^cannot write .*gone/ipam.msgpack: No such file or directory$"):
        store.write(Stored(ME, str(RANGE), b"x"))


@pytest.mark.parametrize("content", [b"", b"\xc1garbage", b"\x93\x01\x02\x03", b"\x95\x09abcd"])
def test_a_corrupt_file_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    (tmp_path / IPAM_FILE).write_bytes(content)
    with pytest.raises(StoreError) as info:
        SnapshotStore(tmp_path).load(ME, str(RANGE))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / IPAM_FILE} is corrupt (")
    assert "remove it" in message and "\n" not in message


def test_a_snapshot_the_allocator_cannot_restore_is_one_line_naming_the_file(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.write(Stored(ME, str(RANGE), b"\x93\x01\x02\x03"))
    with pytest.raises(StoreError) as info:
        open_allocator(ME, RANGE, SeedInit((ME,)), store, random.Random(1))
    assert str(info.value).startswith(f"{tmp_path / IPAM_FILE}: cannot restore IPAM state")
    assert "\n" not in str(info.value)


def test_another_range_or_peer_is_refused_with_what_to_fix(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.write(Stored(ME, str(RANGE), leased_snapshot(1)))
    with pytest.raises(StoreError) as info:
        store.load(ME, "10.32.0.0/12")
    assert str(info.value) == (
        f"{tmp_path / IPAM_FILE} holds IPAM state for range 10.32.0.0/24 but IPALLOC_RANGE is 10.32.0.0/12: "
        "fix IPALLOC_RANGE, or remove the file to start IPAM afresh")
    with pytest.raises(StoreError, match="belongs to peer aa:bb:cc:dd:ee:01 but this peer is aa:bb:cc:dd:ee:09"):
        store.load(PeerName("aa:bb:cc:dd:ee:09"), str(RANGE))


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / IPAM_FILE).mkdir()
    with pytest.raises(StoreError, match=r"^cannot read .*ipam.msgpack: Is a directory$"):
        SnapshotStore(tmp_path).load(ME, str(RANGE))
