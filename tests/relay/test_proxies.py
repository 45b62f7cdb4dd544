"""The load balancers of contrib/relay/ (issue 20), each run from contrib's own file
(tests/relay/nginx.py, tests/relay/haproxy.py) in front of two relay nodes on one PostgreSQL
database: a client reaches a node through it over WebSocket, the next client is sent to the
other node (least connections), a block deposited on one node is pushed to its owner on the
other, and the balancer wrote nothing holding the client's address or port (contrib's promise:
nginx's access log off and its error log at `crit` to /dev/null; no `log` line in HAProxy)."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.client import RelayClient

from .conftest import RelayProcess, run
from .haproxy import HAProxy
from .helpers import block, new_owner, next_message
from .nginx import CONTRIB as CONTRIB_NGINX
from .nginx import Nginx
from .test_metadata import CLIENT_ADDR, holds

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def _established(port: int) -> int:
    """Connections held open to 127.0.0.1:`port` right now (the kernel's table)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if local == f"0100007F:{port:04X}" and state == "01":
            n += 1
    return n


async def _held(port: int) -> int:
    """Connections to a node that stay: the least of a few looks (a health check's passes)."""
    looks = []
    for _ in range(6):
        looks.append(_established(port))
        await asyncio.sleep(0.05)
    return min(looks)


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_contrib_balancer_in_front_of_two_nodes(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path, proxy: str) -> None:
    a, b = relay_factory(), relay_factory()
    lb: Nginx | HAProxy = (Nginx([a.port, b.port]) if proxy == "nginx"
                           else HAProxy(tmp_path, [a.port, b.port]))
    ports: list[int] = []
    try:
        # HAProxy passes /health through untouched; nginx proxies it (contrib's location).
        deadline = time.monotonic() + 10
        while True:  # HAProxy sends nothing to a node before its first health check passed
            try:
                with urllib.request.urlopen(lb.url.replace("/v1/ws", "/health"),
                                            timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)

        async def connect() -> RelayClient:
            c = await RelayClient.connect(lb.url, local_addr=(CLIENT_ADDR, 0))
            ports.append(c.ws.get_extra_info("sockname")[1])
            return c

        async def counts() -> tuple[int, int]:
            return await _held(a.port), await _held(b.port)

        async def body() -> None:
            owner_c = await connect()
            first = await counts()
            assert sorted(first) == [0, 1], first  # the WebSocket goes through, to one node
            token = os.urandom(32)
            alice = await new_owner(owner_c, token=token)
            await alice.subscribe(owner_c)
            sender = await connect()
            assert await counts() == (1, 1)  # least connections: the other node
            for i in range(3):
                blk = block(b"through %s %d" % (proxy.encode(), i))
                await sender.deposit(alice.deposit_id, blk, token=token)
                m = await next_message(owner_c, timeout=10)  # pushed across nodes
                assert alice.open(m) == blk
                await owner_c.ack([m.msg_id])
            assert await alice.fetch(owner_c) == []
            for c in (owner_c, sender):
                await c.close()

        run(body())
        # What the balancer wrote: nginx's files in its prefix (an access log would be there),
        # HAProxy's output.
        written = ({p: p.read_bytes() for p in lb.files()} if isinstance(lb, Nginx)
                   else {lb.log_path: lb.log_path.read_bytes()})
    finally:
        lb.close()
    if isinstance(lb, Nginx):
        # contrib's promise, in its own words: no access log, errors below `crit` nowhere.
        conf = CONTRIB_NGINX.read_text()
        assert re.findall(r"^\s*access_log\s+([^;]*);", conf, re.M) == ["off"]
        assert re.findall(r"^\s*error_log\s+([^;]*);", conf, re.M) == ["/dev/null crit"]
        assert not [p for p in written if p.parent.name == "logs"]  # no access log made
    needles = [CLIENT_ADDR.encode(), *(str(p).encode() for p in ports)]
    for path, data in written.items():
        assert not [n for n in needles if holds(data, n)], path
    for rp in (a, b):
        assert not [n for n in needles if holds(rp.output().encode(), n)]
