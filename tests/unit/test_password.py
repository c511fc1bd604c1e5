"""Reading the mesh password at start: clear errors, one trailing newline stripped, never a silent clear mesh."""

from __future__ import annotations

from pathlib import Path

import pytest

from weaved.adapters.password import PasswordError, read_password, secure_config
from weaved.config import parse_settings


def settings_for(path: Path, optional: bool = False):  # type: ignore[no-untyped-def]
    env = {"WEAVE_PASSWORD_FILE": str(path)}
    if optional:
        env["WEAVE_PASSWORD_FILE_OPTIONAL"] = "1"
    return parse_settings({}, env, "node-0")


def test_a_missing_file_is_an_error_unless_declared_optional(tmp_path: Path) -> None:
    with pytest.raises(PasswordError, match="does not exist"):
        read_password(settings_for(tmp_path / "nope"))
    assert read_password(settings_for(tmp_path / "nope", optional=True))[0] is None


@pytest.mark.parametrize("content", [b"", b"\n", b"  \r\n"])
def test_an_empty_password_file_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "p").write_bytes(content)
    with pytest.raises(PasswordError, match="is empty"):
        read_password(settings_for(tmp_path / "p"))


@pytest.mark.parametrize(("content", "password"), [(b"pw\n", b"pw"), (b"pw\r\n", b"pw"), (b"pw", b"pw"),
                                                   (b"pw\n\n", b"pw\n"), (b" pw ", b" pw ")])
def test_exactly_one_trailing_newline_is_not_part_of_the_password(tmp_path: Path, content: bytes,
                                                                   password: bytes) -> None:
    (tmp_path / "p").write_bytes(content)
    assert read_password(settings_for(tmp_path / "p"))[0] == password


def test_an_unreadable_file_says_why(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(PasswordError, match="cannot read password file"):
        read_password(settings_for(tmp_path / "dir"))


def test_the_same_password_from_a_file_or_the_environment_gives_the_same_key(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"s3cret\n")
    from_file, _ = secure_config(settings_for(tmp_path / "p"))
    from_env, source = secure_config(parse_settings({}, {"WEAVE_PASSWORD": "s3cret"}, "node-0"))
    assert from_file is not None and from_env is not None and from_file.psk == from_env.psk
    assert source == "WEAVE_PASSWORD" and "s3cret" not in repr(from_env)
    assert secure_config(parse_settings({}, {}, "node-0")) == (None, "none")
