"""Strict readers for untrusted msgpack data, shared by every decoder in the core.

Theory of operation
-------------------
The control-plane envelope (:mod:`weaved.core.wire`), the IPAM ring and the seeding votes are all
decoded from bytes another peer sent. Each decoder follows the same recipe: bound the input size,
unpack with msgpack's own limits so that a small input cannot make us allocate a large structure,
then walk the result checking every field's exact type and range. Anything wrong becomes one error
with a short stable ``reason`` (metrics and tests depend on the labels) and a ``detail`` naming the
field.

That recipe lives here once. What differs per decoder is only which exception it raises (each module
keeps its own error type, so callers and tests catch what they always caught), so a
:class:`StrictReader` is built once per decoder around that error class and its methods are bound to
module-level names. The checks compare exact types (``type(x) is int``, not ``isinstance``): msgpack
produces exactly these types, and ``bool`` must not pass as an integer. Values are returned as they
are, not copied: they are exact builtin types, so a copy would buy nothing and cost time on the
control plane's hottest path.

Pure: no I/O, no clock, only :mod:`msgpack`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from weaved.core.types import PeerName, peer_name_from_bytes

BAD_FIELD = "bad-field"
TOO_LARGE = "too-large"
NOT_MSGPACK = "not-msgpack"

ErrorFactory = Callable[[str, str], Exception]
"""Builds the decoder's own exception from ``(reason, detail)``; every decode error class has this
constructor, so passing the class itself is enough."""


class StrictReader:
    """Field checks and a bounded unpack that raise ``error(reason, detail)`` on anything malformed.

    ``long_list`` is the reason for a list longer than allowed: ``too-large`` for most decoders, but
    the seeding decoder has always reported ``bad-field`` there and keeps doing so.
    """

    __slots__ = ("_error", "_long_list")

    def __init__(self, error: ErrorFactory, *, long_list: str = TOO_LARGE) -> None:
        self._error = error
        self._long_list = long_list

    def need(self, condition: bool, reason: str, detail: str = "") -> None:
        """Raise the decoder's error with ``reason`` unless ``condition`` holds."""
        if not condition:
            raise self._error(reason, detail)

    def integer(self, value: Any, lo: int, hi: int, what: str) -> int:
        """An ``int`` (not a ``bool``) in ``[lo, hi]``."""
        if type(value) is not int or not lo <= value <= hi:
            raise self._error(BAD_FIELD, what)
        return value

    def text(self, value: Any, max_len: int, what: str) -> str:
        """A ``str`` of at most ``max_len`` characters."""
        if type(value) is not str or len(value) > max_len:
            raise self._error(BAD_FIELD, what)
        return value

    def blob(self, value: Any, length: int | None, what: str) -> bytes:
        """A ``bytes`` value, of exactly ``length`` bytes unless ``length`` is None."""
        if type(value) is not bytes or (length is not None and len(value) != length):
            raise self._error(BAD_FIELD, what)
        return value

    def array(self, value: Any, what: str, max_len: int, fixed: int | None = None) -> list[Any]:
        """A ``list`` of at most ``max_len`` items, and of exactly ``fixed`` items unless that is None
        (``<what> arity`` names the mismatch, so a wrong shape is told apart from a wrong value)."""
        if type(value) is not list:
            raise self._error(BAD_FIELD, what)
        if len(value) > max_len:
            raise self._error(self._long_list, what)
        if fixed is not None and len(value) != fixed:
            raise self._error(BAD_FIELD, f"{what} arity")
        return value

    def name(self, value: Any, what: str) -> PeerName:
        """A peer name sent as its six raw bytes."""
        if type(value) is not bytes or len(value) != 6:
            raise self._error(BAD_FIELD, what)
        return peer_name_from_bytes(value)

    def unpack(self, data: bytes | bytearray, *, max_size: int, max_str: int, max_array: int) -> Any:
        """Unpack at most ``max_size`` bytes of msgpack with every container and string bounded (no
        maps, no extension types at all), so that the work and memory are bounded by the input size.
        Raises ``too-large`` for oversized input and ``not-msgpack`` for anything msgpack refuses."""
        if len(data) > max_size:
            raise self._error(TOO_LARGE, f"{len(data)} bytes")
        try:
            return msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_bin_len=max_str,
                max_str_len=max_str,
                max_array_len=max_array,
                max_map_len=0,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises many types; all mean "not our format"
            raise self._error(NOT_MSGPACK, type(exc).__name__) from None
