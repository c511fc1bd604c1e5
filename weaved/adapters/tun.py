"""Open the TUN device the sleeve reads pods' packets from and writes delivered packets to.

Theory of operation
-------------------
``open_tun`` attaches to (or creates) a layer-3 TUN device (``IFF_TUN | IFF_NO_PI``: every read is one bare
IP packet, no 4-byte packet-information prefix) and marks it *persistent*, so the device and the routes
that point into it outlive the daemon: a restart only interrupts the sleeve for as long as the daemon is
away, and the new process attaches to the same device by name. The descriptor is non-blocking so that a
reader thread can poll with a timeout and notice that it should stop.

With ``offload`` the device is opened with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD(CSUM|TSO4)``: every read
and write carries a 10-byte virtio header, and the kernel hands over TCP super-packets of up to
``gso_max_size`` bytes with their checksum left for later (:mod:`weaved.core.superframe`). Without it the
offloads are switched off explicitly, because they outlive a process on a persistent device and a reader
without virtio headers must never be handed a super-packet.

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
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
IFNAMSIZ = 16
TUN_PATH = "/dev/net/tun"


class TunError(OSError):
    """The TUN device cannot be opened; ``str()`` is one line for the operator."""


def open_tun(name: str, *, offload: bool = False) -> int:
    """A non-blocking descriptor on TUN device ``name`` (created if missing, persistent), with virtio headers
    and TSO when ``offload`` (see the module docstring)."""
    if not 0 < len(name.encode()) < IFNAMSIZ:
        raise TunError(f"bad TUN device name {name!r}")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 if offload else 0)
    except OSError as exc:
        os.close(fd)
        raise TunError(f"cannot attach TUN device {name}: {exc.strerror} (is it a device of another kind, "
                       "or held by another process?)") from None
    return fd
