"""Netlink sockets inside a pod's network namespace, without ever leaving a thread there.

Theory of operation
-------------------
A netlink socket talks to the network namespace it was *created* in, whatever thread uses it later. So
the only moment a thread has to be inside the pod's namespace is the ``socket()`` call. Python 3.11 has no
``os.setns``; :func:`netns_socket` starts a dedicated, short-lived thread that ``setns(2)``s into the pod's
namespace (by the file descriptor the CNI forwarder passed), creates the socket, switches back, and ends.
If switching back fails the thread ends anyway, so no thread of the daemon — in particular none of
anyio's reused worker threads — can ever be left in the wrong namespace. The same thread reads or writes
``/proc/sys/net/...`` of the pod when asked (those files, too, belong to the namespace of the opener).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
NS_GET_NSTYPE = 0xB703
"""ioctl on a namespace fd: its CLONE_NEW* type (Linux 4.11+)."""

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def is_netns(fd: int) -> bool:
    """Whether ``fd`` refers to a network namespace (not some other file the runtime named)."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def in_netns(netns_fd: int, action: Callable[[], T], timeout: float = 10.0) -> T:
    """Run ``action`` in a fresh thread that is inside ``netns_fd``'s namespace only while it runs.

    Raises OSError when ``netns_fd`` is not a network namespace (``setns`` says EINVAL), or whatever
    ``action`` raised. Blocking: call it from a worker thread.
    """
    box: dict[str, object] = {}

    def body() -> None:
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(netns_fd)
            try:
                box["value"] = action()
            except BaseException as exc:
                box["error"] = exc
            finally:
                _setns(own)  # if this raises, the thread ends here: nothing else ever runs in it
        except BaseException as exc:
            box.setdefault("error", exc)
        finally:
            os.close(own)

    thread = threading.Thread(target=body, name="weaved-netns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError("a network namespace operation did not finish in time")
    if "error" in box:
        error = box["error"]
        assert isinstance(error, BaseException)
        raise error
    return box["value"]  # type: ignore[return-value]


def netns_socket(netns_fd: int) -> socket.socket:
    """A NETLINK_ROUTE socket bound to the namespace of ``netns_fd``."""
    return in_netns(netns_fd, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                                    NETLINK_ROUTE))
