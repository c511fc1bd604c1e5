"""The framing between the C forwarder (``cni/weave-net.c``) and the daemon, pure.

Theory of operation
-------------------
One request per connection, one answer back, then both sides close. All integers are big-endian u32::

    request  b"WCN1" | env_len | conf_len | has_fd | env (KEY=VALUE\\0 ...) | conf (the stdin bytes)
    answer   b"WCR1" | exit_status | out_len | out (the plugin's stdout bytes)

The pod's network namespace travels as an SCM_RIGHTS file descriptor with the header when ``has_fd`` is 1.
Lengths are checked against the same limits the forwarder enforces before anything is read, so a client
can never make the daemon buffer more than :data:`MAX_ENV` + :data:`MAX_CONF` bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

REQUEST_MAGIC = b"WCN1"
ANSWER_MAGIC = b"WCR1"
HEADER_SIZE = 16
ANSWER_HEADER_SIZE = 12
MAX_ENV = 64 * 1024
MAX_CONF = 1024 * 1024
MAX_OUT = 1024 * 1024
FORWARDED = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
"""The variables the forwarder sends (any other name in a request is refused)."""


class FrameError(ValueError):
    """A request that does not follow the framing; ``str()`` says how."""


@dataclass(frozen=True)
class Header:
    env_len: int
    conf_len: int
    has_fd: bool


def parse_header(data: bytes) -> Header:
    if len(data) != HEADER_SIZE:
        raise FrameError(f"header is {len(data)} bytes, want {HEADER_SIZE}")
    magic, env_len, conf_len, has_fd = struct.unpack(">4sIII", data)
    if magic != REQUEST_MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if env_len > MAX_ENV:
        raise FrameError(f"environment of {env_len} bytes exceeds {MAX_ENV}")
    if conf_len > MAX_CONF:
        raise FrameError(f"configuration of {conf_len} bytes exceeds {MAX_CONF}")
    if has_fd not in (0, 1):
        raise FrameError(f"has_fd is {has_fd}")
    return Header(env_len, conf_len, bool(has_fd))


def parse_env(data: bytes) -> dict[str, str]:
    """``KEY=VALUE\\0`` records; only :data:`FORWARDED` names, each at most once, UTF-8."""
    env: dict[str, str] = {}
    if not data:
        return env
    if not data.endswith(b"\0"):
        raise FrameError("environment not NUL-terminated")
    for record in data[:-1].split(b"\0"):
        key, sep, value = record.partition(b"=")
        try:
            name, text = key.decode(), value.decode()
        except UnicodeDecodeError:
            raise FrameError("environment is not UTF-8") from None
        if not sep or name not in FORWARDED:
            raise FrameError(f"unexpected environment record {record[:40]!r}")
        if name in env:
            raise FrameError(f"{name} given twice")
        env[name] = text
    return env


def encode_request(env: dict[str, str], conf: bytes, has_fd: bool) -> bytes:
    """The request as the forwarder frames it (for tests and tools speaking to the daemon directly)."""
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return struct.pack(">4sIII", REQUEST_MAGIC, len(body), len(conf), int(has_fd)) + body + conf


def encode_answer(status: int, out: bytes) -> bytes:
    if not 0 <= status <= 255:
        raise ValueError(f"exit status {status} out of range")
    if len(out) > MAX_OUT:
        raise ValueError(f"answer of {len(out)} bytes exceeds {MAX_OUT}")
    return struct.pack(">4sII", ANSWER_MAGIC, status, len(out)) + out


def parse_answer(data: bytes) -> tuple[int, bytes]:
    if len(data) < ANSWER_HEADER_SIZE:
        raise FrameError("answer too short")
    magic, status, length = struct.unpack(">4sII", data[:ANSWER_HEADER_SIZE])
    if magic != ANSWER_MAGIC or length != len(data) - ANSWER_HEADER_SIZE:
        raise FrameError("malformed answer")
    return status, data[ANSWER_HEADER_SIZE:]
