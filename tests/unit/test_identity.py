"""The peer name persists across restarts and is written atomically; the UID is new at each start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from weaved.adapters.identity import (
    MACHINE_ID_FILE,
    PEER_NAME_FILE,
    SALT_FILE,
    IdentityError,
    load_identity,
    write_atomically,
)
from weaved.core.types import default_short_id, derive_peer_name


def machine_id_file(tmp_path: Path, content: str = "0123456789abcdef0123456789abcdef\n") -> Path:
    path = tmp_path / "machine-id"
    path.write_text(content)
    return path


def test_first_start_derives_the_name_from_machine_id_and_nickname(tmp_path: Path) -> None:
    state = tmp_path / "state"
    identity = load_identity(state, "node-1", machine_id_file(tmp_path))
    salt = (state / SALT_FILE).read_text().strip()
    assert len(salt) == 16
    assert identity.name == derive_peer_name(f"0123456789abcdef0123456789abcdef/node-1/{salt}")
    assert identity.nickname == "node-1"
    assert identity.short_id == default_short_id(identity.name)
    assert (state / PEER_NAME_FILE).read_text() == identity.name + "\n"
    assert 0 < identity.uid < 2**64


def test_restart_keeps_the_name_and_draws_a_new_uid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_identity(state, "node-1", machine_id_file(tmp_path))
    second = load_identity(state, "renamed", machine_id_file(tmp_path, "another-machine\n"))
    assert second.name == first.name, "the persisted name wins over a changed nickname or machine id"
    assert second.nickname == "renamed"
    assert second.uid != first.uid


def test_two_daemons_on_one_machine_differ_by_nickname(tmp_path: Path) -> None:
    mid = machine_id_file(tmp_path)
    assert load_identity(tmp_path / "a", "n1", mid).name != load_identity(tmp_path / "b", "n2", mid).name


def test_without_a_machine_id_a_random_one_is_made_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    missing = tmp_path / "no-such-machine-id"
    first = load_identity(state, "node-1", missing)
    made_up = (state / MACHINE_ID_FILE).read_text().strip()
    assert len(made_up) == 32
    salt = (state / SALT_FILE).read_text().strip()
    assert first.name == derive_peer_name(f"{made_up}/node-1/{salt}")
    (state / PEER_NAME_FILE).unlink()
    assert load_identity(state, "node-1", missing).name == first.name, "same made-up machine id, same name"


def test_an_empty_machine_id_counts_as_missing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    load_identity(state, "node-1", machine_id_file(tmp_path, "\n"))
    assert (state / MACHINE_ID_FILE).exists()


def test_a_corrupt_name_file_is_an_error_not_a_silent_rename(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / PEER_NAME_FILE).write_text("not-a-name\n")
    with pytest.raises(IdentityError, match="not a peer name; fix or delete it"):
        load_identity(state, "node-1", machine_id_file(tmp_path))


def test_an_unusable_state_dir_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(IdentityError, match=r"^cannot use state directory .*file/sub: "):
        load_identity(blocker / "sub", "node-1", machine_id_file(tmp_path))


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomically(target, "one")
    write_atomically(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(tmp_path) == ["f"]


def test_a_wiped_state_dir_gives_a_new_name_on_the_same_machine(tmp_path: Path) -> None:
    """Same machine id, same node name, new state: a new peer (IPAM tombstones burn old names for ever)."""
    mid = machine_id_file(tmp_path)
    first = load_identity(tmp_path / "state", "node-1", mid)
    again = load_identity(tmp_path / "state", "node-1", mid)
    wiped = load_identity(tmp_path / "fresh", "node-1", mid)
    assert again.name == first.name
    assert wiped.name != first.name


def test_the_salt_survives_a_lost_name_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_identity(state, "node-1", machine_id_file(tmp_path))
    (state / PEER_NAME_FILE).unlink()
    assert load_identity(state, "node-1", machine_id_file(tmp_path)).name == first.name
