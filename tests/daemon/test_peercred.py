"""SO_PEERCRED: a peer whose uid is not the daemon's is refused (credentials injected)."""

from __future__ import annotations

import asyncio
import json
import os
import socket

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
