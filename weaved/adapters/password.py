"""The mesh password at start: read it (environment or file), derive the key once, hand the core its config.

Why an adapter: :mod:`weaved.config` is pure and never reads files, and the core never touches the OS; the
password file, the OS random source and the wall clock (for handshake stamps) all live here. The password
is never logged and never kept: only the derived key (scrypt, see :func:`weaved.core.handshake.derive_psk`)
reaches the core. One trailing newline is stripped, because ``echo secret > file`` and ``kubectl create
secret --from-file`` both leave one, and a password that differs by it on one node would lock that node
out with nothing visible to tell why.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from weaved.config import Settings
from weaved.core.handshake import derive_psk
from weaved.core.secure import SecureConfig


class PasswordError(Exception):
    """The password cannot be read or is unusable; the message is one line for the operator."""


def password_in_file(raw: bytes) -> bytes:
    """What a password file holds as the password: its bytes without one trailing newline (``\\n`` or
    ``\\r\\n``). The one rule for every reader (the daemon, the lab's expectation of who meets whom)."""
    return raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw


def read_password(settings: Settings) -> tuple[bytes | None, str]:
    """The password and where it came from (for the start log line, which never shows the password)."""
    if settings.password is not None:
        return settings.password, "WEAVE_PASSWORD"
    path = settings.password_file
    if path is None:
        return None, "none"
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        if settings.password_file_optional:
            return None, f"none (no file at {path})"
        raise PasswordError(f"password file {path} does not exist") from None
    except OSError as exc:
        raise PasswordError(f"cannot read password file {path}: {exc.strerror or exc}") from None
    password = password_in_file(raw)
    if not password.strip():
        raise PasswordError(f"password file {path} is empty")
    return password, f"file {path}"


def secure_config(settings: Settings) -> tuple[SecureConfig | None, str]:
    """The core's :class:`SecureConfig` (None without a password) and the password's source."""
    password, source = read_password(settings)
    if password is None:
        return None, source
    return SecureConfig(psk=derive_psk(password), entropy=os.urandom, stamp_base=int(time.time() * 1000),
                        trusted_subnets=settings.trusted_subnets), source
