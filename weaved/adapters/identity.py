"""The peer's identity: a name that survives restarts and a UID that does not.

Theory of operation
-------------------
Other peers remember us by name (their topology and, later, IPAM ownership refer to it), so the name must
stay the same across restarts and upgrades: it is kept in ``STATE_DIR/peer-name``. The first start derives
it from the machine id, the nickname and a salt, like Weave Net hashes ``/etc/machine-id``: two nodes
cloned from one image share a machine id but not a node name, and two daemons on one machine (the lab, the
tests) differ by nickname. A machine without ``/etc/machine-id`` gets a random one, persisted next to the
name.

The salt (``STATE_DIR/peer-salt``, random, made once) ties the name to *this state directory*: a node that
comes back with the same machine and node name but a wiped state directory is a new peer with a new name.
It must be: IPAM's ``rmpeer`` tombstones a name for ever (docs/ipam.md), and Kubernetes reclaim
(:mod:`weaved.core.kube.registry`) removes the old name when a Node is deleted or comes back with
another peer, so reusing the name would leave the new peer refused by the ring.

The UID is drawn afresh at every start: a new UID is how other peers tell a restart from a long silence.
Files are written atomically (temporary file, fsync, rename, fsync of the directory) so that a crash
mid-write can never leave an empty or half-written name behind, which would silently rename the peer.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from weaved.core.types import (
    UID_MAX,
    PeerIdentity,
    PeerName,
    PeerUID,
    default_short_id,
    derive_peer_name,
    peer_name_from_bytes,
    peer_name_to_bytes,
)

PEER_NAME_FILE = "peer-name"
MACHINE_ID_FILE = "machine-id"
SALT_FILE = "peer-salt"
SYSTEM_MACHINE_ID = Path("/etc/machine-id")


class IdentityError(RuntimeError):
    """The state directory cannot be used or holds a corrupt name; ``str()`` is one line for the operator."""


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_stripped(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def machine_id(state_dir: Path, system_path: Path = SYSTEM_MACHINE_ID) -> str:
    """The host's machine id, else one of our own made up once and kept in the state directory."""
    try:
        system = _read_stripped(system_path)
    except OSError:
        system = None
    if system:
        return system
    ours = _read_stripped(state_dir / MACHINE_ID_FILE)
    if ours:
        return ours
    made_up = secrets.token_hex(16)
    write_atomically(state_dir / MACHINE_ID_FILE, made_up + "\n")
    return made_up


def salt(state_dir: Path) -> str:
    """This state directory's random salt, made on first use (see the module docstring)."""
    ours = _read_stripped(state_dir / SALT_FILE)
    if ours:
        return ours
    made_up = secrets.token_hex(8)
    write_atomically(state_dir / SALT_FILE, made_up + "\n")
    return made_up


def load_peer_name(state_dir: Path, nickname: str, system_machine_id: Path = SYSTEM_MACHINE_ID) -> PeerName:
    """The persisted name, derived and saved on first start."""
    path = state_dir / PEER_NAME_FILE
    stored = _read_stripped(path)
    if stored is not None:
        try:
            return peer_name_from_bytes(peer_name_to_bytes(PeerName(stored.lower())))
        except ValueError:
            raise IdentityError(f"{path} holds {stored[:40]!r}, not a peer name; fix or delete it") from None
    name = derive_peer_name(machine_id(state_dir, system_machine_id) + "/" + nickname + "/" + salt(state_dir))
    write_atomically(path, name + "\n")
    return name


def load_identity(state_dir: Path, nickname: str, system_machine_id: Path = SYSTEM_MACHINE_ID) -> PeerIdentity:
    """This start's identity: persisted name, fresh random UID, default short id for the name."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        name = load_peer_name(state_dir, nickname, system_machine_id)
    except OSError as exc:
        raise IdentityError(f"cannot use state directory {state_dir}: {exc.strerror or exc}") from None
    uid = PeerUID(1 + secrets.randbelow(UID_MAX))  # never 0, which reads like "unset" in dumps
    return PeerIdentity(name=name, nickname=nickname, uid=uid, short_id=default_short_id(name))
