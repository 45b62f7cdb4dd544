"""RelayClient.connect never leaves a socket open when it gives up during the HELLO exchange
(cancelled, timed out or refused): a settings change or a lock cancels dials in flight, and a
leaked connection would keep linking mailboxes at the relay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiohttp import WSMsgType, web

from relay.client import RelayClient

from .conftest import RelayProcess, run


async def _silent_server() -> tuple[web.AppRunner, int, asyncio.Event, asyncio.Event]:
    # Accepts the WebSocket, never answers HELLO, and reports when the client went away.
    opened, closed = asyncio.Event(), asyncio.Event()

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        opened.set()
        async for msg in sock:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
        closed.set()
        return sock

    app = web.Application()
    app.router.add_get("/v1/ws", ws)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port, opened, closed


def test_connect_cancelled_during_hello_closes_the_socket() -> None:
    async def main() -> None:
        runner, port, opened, closed = await _silent_server()
        try:
            dial = asyncio.ensure_future(RelayClient.connect(f"ws://127.0.0.1:{port}/v1/ws"))
            await asyncio.wait_for(opened.wait(), 10)
            dial.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dial
            await asyncio.wait_for(closed.wait(), 10)  # times out if the socket leaked
        finally:
            await runner.cleanup()

    run(main())


def test_connect_timing_out_during_hello_closes_the_socket() -> None:
    async def main() -> None:
        runner, port, _opened, closed = await _silent_server()
        try:
            try:
                await RelayClient.connect(
                    f"ws://127.0.0.1:{port}/v1/ws", request_timeout=0.2
                )
            except TimeoutError:
                pass
            else:
                raise AssertionError("HELLO was never answered: connect must fail")
            await asyncio.wait_for(closed.wait(), 10)
        finally:
            await runner.cleanup()

    run(main())


def test_close_never_swallows_the_callers_cancellation(relay) -> None:
    """A task cancelled while it closes a client stays cancelled. (close() once swallowed the
    cancellation when it arrived while the reader was winding down: the outbox loop that was
    closing a deposit connection then ran on, and a stopping daemon waited for it forever;
    through Tor, where closing takes a round trip, a SIGTERM hit that window.)"""

    async def go() -> None:
        client = await RelayClient.connect(relay.url.replace("http://", "ws://"))
        real_close = client.ws.close

        async def slow_close(**kwargs: object) -> bool:  # the reader goes on, as behind Tor
            return False

        client.ws.close = slow_close  # type: ignore[method-assign]
        closing = asyncio.create_task(client.close())
        await asyncio.sleep(0)  # closing now waits for its reader to wind down
        closing.cancel()
        try:
            await closing
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("close() swallowed the cancellation")
        await real_close()

    run(go())



def test_hello_ok_announces_mailbox_and_blob_ttl(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """HELLO_OK tells a client how long an unused mailbox and an unfetched blob live (§3), so
    the daemon need not assume the defaults."""
    relay = relay_factory(mailbox_ttl=str(7 * 24 * 3600), blob_ttl=str(5 * 3600))

    async def main() -> None:
        c = await RelayClient.connect(relay.url)
        try:
            assert (c.mailbox_ttl, c.blob_ttl) == (7 * 24 * 3600, 5 * 3600)
        finally:
            await c.close()

    run(main())
