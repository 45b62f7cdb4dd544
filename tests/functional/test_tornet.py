"""The private Tor network works end to end, and the recorder tells who opened a connection.

A client tor configured with nothing but `client_torrc_lines()` (what the daemon's managed tor
adds in test mode) reaches a local server through the exit and through the onion service; the
recorder in front of the server sees the exit's pid on the first path, the onion host's on the
second, and this test's own pid on a direct connection. No tor of the network, nor the
client, holds a socket with an address outside loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp_socks import ProxyConnector

from tests.recorder import Recorder, process_endpoints
from tests.tornet import TorClient, TorNetwork

TIMEOUT = aiohttp.ClientTimeout(total=30)


async def _serve() -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.add_routes([web.get("/hello", hello), web.get("/v1/ws", echo)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def _via(socks_port: int) -> aiohttp.ClientSession:
    # A fresh SOCKS username per session: its own circuits (IsolateSOCKSAuth); names are
    # resolved by tor (rdns), as the daemon does.
    user = secrets.token_hex(4)
    connector = ProxyConnector.from_url(
        f"socks5://{user}:x@127.0.0.1:{socks_port}", rdns=True
    )
    return aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)


async def _through_tor(net: TorNetwork, socks_port: int) -> tuple[str, str]:
    async with _via(socks_port) as s, s.get(f"http://127.0.0.1:{net.exit_ports[0]}/hello") as r:
        via_exit = await r.text()
    deadline = time.monotonic() + 60
    while True:  # a retry covers a descriptor being republished (new one every 8 min here)
        try:
            async with _via(socks_port) as s, s.ws_connect(
                f"ws://{net.onion_hostname}/v1/ws"
            ) as ws:
                await ws.send_str("ping")
                via_onion = (await ws.receive(timeout=30)).data
            return via_exit, via_onion
        except (TimeoutError, aiohttp.ClientError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(2)


async def _direct(port: int) -> str:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(
        f"http://127.0.0.1:{port}/hello"
    ) as r:
        return await r.text()


def test_exit_and_onion_paths_reach_the_server_from_the_network_tors(
    tor_network: TorNetwork, tmp_short: Path
) -> None:
    net = tor_network
    client = TorClient(tmp_short / "client", net.client_torrc_lines())
    client.start(timeout=60)
    try:

        async def scenario() -> None:
            runner, port = await _serve()
            try:
                with Recorder(net.exit_ports[0], port) as exit_rec, Recorder(
                    net.onion_port, port
                ) as onion_rec:
                    assert await _through_tor(net, client.socks_port) == ("hello", "echo:ping")
                    tor_seen = (exit_rec.wait(1), onion_rec.wait(1))
                    assert await _direct(exit_rec.port) == "hello"
                    direct = exit_rec.wait(2)[1:]
            finally:
                await runner.cleanup()
            (via_exit,), (via_onion,) = tor_seen
            assert (via_exit.pid, via_exit.program) == (net.exit_pid, "tor"), via_exit
            assert (via_onion.pid, via_onion.program) == (net.hs_pid, "tor"), via_onion
            assert [c.pid for c in direct] == [os.getpid()], direct
            for c in (via_exit, via_onion, *direct):
                assert c.peer[0] == "127.0.0.1"  # all alike by address: the pid tells them apart
                # Requests and answers went through the recorder before the client had them.
                assert c.bytes_from_client > 0 and c.bytes_to_client > 0, c

        asyncio.run(scenario())

        for name, pid in [*net.pids.items(), ("client", client.pid)]:
            for protocol, local, remote in process_endpoints(pid):
                for host, _port in (local, remote):
                    ip = ipaddress.ip_address(host)
                    assert ip.is_loopback or ip.is_unspecified, (name, protocol, local, remote)
    finally:
        client.stop()
