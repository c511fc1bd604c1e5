"""Open the TUN device the sleeve reads pods' packets from and writes delivered packets to.

Theory of operation
-------------------
``open_tun`` attaches to (or creates) a layer-3 TUN device (``IFF_TUN | IFF_NO_PI``: every read is one bare
IP packet, no 4-byte packet-information prefix) and marks it *persistent*, so the device and the routes
that point into it outlive the daemon: a restart only interrupts the sleeve for as long as the daemon is
away, and the new process attaches to the same device by name. The descriptor is non-blocking so that a
reader thread can poll with a timeout and notice that it should stop.

Constants from ``linux/if_tun.h`` (x86-64, see ``reference/datapath-performance.md``).
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
TUN_PATH = "/dev/net/tun"


class TunError(OSError):
    """The TUN device cannot be opened; ``str()`` is one line for the operator."""


def open_tun(name: str) -> int:
    """A non-blocking descriptor on TUN device ``name`` (created if missing, persistent)."""
    if not 0 < len(name.encode()) < IFNAMSIZ:
        raise TunError(f"bad TUN device name {name!r}")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        os.close(fd)
        raise TunError(f"cannot attach TUN device {name}: {exc.strerror} (is it a device of another kind, "
                       "or held by another process?)") from None
    return fd
