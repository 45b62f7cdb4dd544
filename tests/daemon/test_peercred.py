"""SO_PEERCRED: a peer whose uid is not the daemon's is refused (credentials injected)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from aegisd.rpc import PeerCred, Registry, RpcServer, peer_allowed, peer_cred


def test_peer_allowed_only_for_the_same_uid():
    assert peer_allowed(PeerCred(pid=1, uid=1000, gid=1000), 1000)
    assert not peer_allowed(PeerCred(pid=1, uid=1001, gid=1000), 1000)
    assert not peer_allowed(PeerCred(pid=1, uid=0, gid=0), 1000)  # not even root
    assert not peer_allowed(None, 1000)  # unknown credentials


def test_peer_cred_reads_the_real_credentials():
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        cred = peer_cred(a)
        assert cred is not None
        assert cred.uid == os.getuid() and cred.pid == os.getpid()
    finally:
        a.close()
        b.close()


def _exchange(sock_path: str, line: bytes) -> list[bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    try:
        if line:  # a refused peer is answered (and hung up on) before it writes anything
            s.sendall(line)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n") and b'"result"' in data:
                break
        return data.splitlines()
    finally:
        s.close()


def _serve_with(cred_uid: int, tmp_path, line: bytes) -> list[bytes]:
    async def main() -> list[bytes]:
        reg = Registry()

        async def ping(ctx) -> str:
            return "pong"

        reg.register("ping", ping)
        path = tmp_path / "s.sock"
        server = RpcServer(
            reg,
            path,
            get_peer_cred=lambda sock: PeerCred(pid=1, uid=cred_uid, gid=cred_uid),
            uid=4242,
        )
        await server.start()
        try:
            return await asyncio.to_thread(_exchange, str(path), line)
        finally:
            await server.close()

    return asyncio.run(main())


def test_other_uid_is_refused(tmp_path):
    lines = _serve_with(4243, tmp_path, b"")
    assert len(lines) == 1
    msg = json.loads(lines[0])
    assert msg["error"]["code"] == 1003 and msg["error"]["data"] == {"error": "permission_denied"}


def test_same_uid_is_served(tmp_path):
    lines = _serve_with(4242, tmp_path, b'{"jsonrpc":"2.0","method":"ping","id":1}\n')
    assert json.loads(lines[-1])["result"] == "pong"


def test_a_live_socket_is_not_taken_over(tmp_path):
    async def main() -> None:
        reg = Registry()
        path = tmp_path / "s.sock"
        first = RpcServer(reg, path)
        await first.start()
        try:
            second = RpcServer(reg, path)
            with pytest.raises(OSError, match="another daemon"):
                await second.start()
            assert path.is_socket()
        finally:
            await first.close()

    asyncio.run(main())


NOBODY = 65534


def _as_nobody(sock_path: str) -> int:
    """Fork; in the child become uid/gid 65534 and connect. Exit status: 0 refused with 1003,
    13 connect denied by file permissions, 1 served, 2 anything else."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 2
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(sock_path)
            except PermissionError:
                os._exit(13)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            msg = json.loads(data.splitlines()[0])
            code = 0 if msg.get("error", {}).get("code") == 1003 else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")


@needs_root
def test_real_other_user_is_refused_by_peer_uid():
    """A real second user (nobody) reaches a socket whose file permissions were opened on
    purpose: only the SO_PEERCRED check stands between them, and it refuses."""
    d = Path(tempfile.mkdtemp(prefix="aep", dir="/tmp"))
    try:

        async def main() -> int:
            reg = Registry()

            async def ping(ctx) -> str:
                return "pong"

            reg.register("ping", ping)
            sock = d / "s" / "x.sock"
            server = RpcServer(reg, sock)  # the real peer_cred; the daemon's uid is ours
            await server.start()
            try:
                os.chmod(d, 0o755)
                os.chmod(sock.parent, 0o755)
                os.chmod(sock, 0o666)
                return await asyncio.to_thread(_as_nobody, str(sock))
            finally:
                await server.close()

        assert asyncio.run(main()) == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_root
def test_real_other_user_cannot_reach_the_daemon_socket(spawn, short_tmp):
    """Against a real aegisd: the 0700 home and the 0600 socket each keep another user out."""
    d = spawn(passphrase=None)
    os.chmod(short_tmp, 0o755)  # the test's own temp dir; the profile's modes are untouched
    assert _as_nobody(str(d.sock)) == 13
    os.chmod(d.home, 0o755)  # now only the socket's 0600 mode stands
    try:
        assert _as_nobody(str(d.sock)) == 13
    finally:
        os.chmod(d.home, 0o700)


def test_methods_registered_after_start_are_served(tmp_path):
    async def main() -> list[bytes]:
        reg = Registry()
        server = RpcServer(reg, tmp_path / "s.sock")
        await server.start()
        try:

            async def late(ctx, n: int) -> int:
                return n + 1

            reg.register("late.method", late)
            return await asyncio.to_thread(
                _exchange,
                str(tmp_path / "s.sock"),
                b'{"jsonrpc":"2.0","method":"late.method","params":{"n":41},"id":1}\n',
            )
        finally:
            await server.close()

    assert json.loads(asyncio.run(main())[-1])["result"] == 42
