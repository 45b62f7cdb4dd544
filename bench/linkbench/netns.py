"""A network namespace per user, with no veth and no named namespace in /run/netns.

A short-lived thread of ours `unshare`s a new network namespace (its own, for a moment), brings
its loopback up, opens and keeps a descriptor of the namespace, binds and listens a TCP socket
on 127.0.0.1:PORT there, and goes back to our namespace. The socket stays in the namespace it
was made in, but we accept on it from here: every connection a process in that namespace makes
to 127.0.0.1:PORT lands in our process, in the host namespace, where the forwarder connects on
to the relay from whatever loopback source address it chooses.

The user's programs run inside with `nsenter --net=/proc/self/fd/N` (the descriptor passed to
the child), under `setpriv --pdeathsig TERM` so that they die with us even after a kill -9.
Unix sockets named by a path (the daemon's JSON-RPC socket) are not namespaced by the network
namespace, so the daemon is driven from here as usual.

Nothing persists: the namespace goes away with the last process in it and the last descriptor
(ours and the listening socket's). Root (CAP_SYS_ADMIN) is needed; Linux only.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH14s")

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"{what}: {os.strerror(err)} (root is needed)")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0, b"")))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP, b""))


class Namespace:
    """A new network namespace whose 127.0.0.1:port is `listener` (a socket of ours)."""

    def __init__(self, port: int, backlog: int = 256) -> None:
        self.fd = -1
        self.listener: socket.socket | None = None
        error: list[BaseException] = []
        thread = threading.Thread(target=self._make, args=(port, backlog, error), daemon=True)
        thread.start()
        thread.join()
        if error:
            self.close()
            raise NamespaceError(f"cannot make a network namespace: {error[0]}") from error[0]

    def _make(self, port: int, backlog: int, error: list[BaseException]) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            try:
                self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                _loopback_up()
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(backlog)
                s.setblocking(False)
                self.listener = s
            finally:
                # Back home, whatever happened; a thread that cannot go back must not live on.
                _check(_libc.setns(home, CLONE_NEWNET), "setns back")
        except BaseException as exc:
            error.append(exc)
        finally:
            os.close(home)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace; give `pass_fds=(ns.fd,)` to Popen."""
        return ["setpriv", "--pdeathsig", "TERM", "--", "nsenter",
                f"--net=/proc/self/fd/{self.fd}", "--", *argv]  # fmt: skip

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
