"""Why the daemon cannot reach its relay: said in `status` (relay.reason) and once in its log.

A real daemon, pointed at loopback servers that are not an AegisLink relay (an HTTP 404, plain
text, a WebSocket that echoes or sends text, a relay of another version, a closed port, TLS
problems), and at a real relay by a URL without its /v1/ws path (issue 14, item 2)."""

from __future__ import annotations

import asyncio
import datetime
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from aegisd.netmode import SETTING_ISOLATION
from aegisd.relayurl import SETTING_URL
from aegisd.store import create_profile
from relay import wire
from tests.daemon.conftest import FAST_KDF, DaemonProc
from tests.relay.conftest import ROOT, RelayProcess

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeServer:
    """An aiohttp server on 127.0.0.1 in a thread of its own, counting the requests it got."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.hits = 0
        self._handler = handler
        self._tls = tls
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def any_path(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            return await self._handler(request)

        async def start() -> None:
            app = web.Application()
            app.router.add_route("GET", "/{tail:.*}", any_path)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls)
            await site.start()
            self.port = self._runner.addresses[0][1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def not_found(request: web.Request) -> web.StreamResponse:
    return web.Response(status=404, text="404: Not Found")


async def plain_text(request: web.Request) -> web.StreamResponse:
    return web.Response(text="hello, this is a web page\n")


async def _websocket(request: web.Request,
                     on_binary: Callable[[bytes], bytes | str | None]) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            answer = on_binary(msg.data)
            if isinstance(answer, bytes):
                await ws.send_bytes(answer)
            elif isinstance(answer, str):
                await ws.send_str(answer)
    return ws


async def echo(request: web.Request) -> web.StreamResponse:
    return await _websocket(request, lambda data: data)


async def text_chat(request: web.Request) -> web.StreamResponse:
    return await _websocket(request, lambda data: '{"type": "welcome"}')


async def newer_version(request: web.Request) -> web.StreamResponse:
    """A future relay: it answers our HELLO with its bad_version error, in a newer version."""
    frame = bytearray(wire.error_frame(0, wire.E_BAD_VERSION))
    frame[0] = wire.VERSION + 1
    return await _websocket(request, lambda data: bytes(frame))


async def refuses_version(request: web.Request) -> web.StreamResponse:
    """A relay that no longer speaks our version: bad_version (rid 0), then it closes (§5)."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.receive()
    await ws.send_bytes(wire.error_frame(0, wire.E_BAD_VERSION))
    await ws.close(code=1002)
    return ws


def self_signed_tls(tmp: Path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()  # nothing listens there now
    return port


@pytest.fixture
def profile(short_tmp: Path) -> Iterator[Callable[..., DaemonProc]]:
    """profile(url, isolation=False): a profile whose stored relay URL is `url` (as written),
    its daemon up."""
    procs: list[DaemonProc] = []

    def make(url: str, isolation: bool = False) -> DaemonProc:
        home = short_tmp / f"p{len(procs)}"
        store = create_profile(home, None, FAST_KDF)
        store.set_setting(SETTING_URL, url)
        if isolation:
            store.set_setting(SETTING_ISOLATION, True)
        store.close()
        d = DaemonProc(home, [], None)
        procs.append(d)
        d.wait_ready()
        return d

    yield make
    for d in procs:
        d.kill()


def relay_status(d: DaemonProc) -> dict[str, Any]:
    with d.client() as c:
        st: dict[str, Any] = c.call("status")["relay"]
        return st


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def reason_after_retries(d: DaemonProc, server: FakeServer | None) -> str:
    """The status reason once the daemon has tried at least three times; then its log must
    hold that reason exactly once (no line per retry), and no address."""
    st = wait_for(lambda: (s := relay_status(d))["reason"] not in (None, "connecting") and s,
                  "a reason in status")
    assert st["connected"] is False
    if server is not None:
        wait_for(lambda: server.hits >= 3, "three attempts")
    else:
        time.sleep(2)  # backoff 0.25 s, 0.5 s, 1 s: at least three attempts
    reason = str(relay_status(d)["reason"])
    d.stop()
    log = d.stderr()
    assert log.count(reason) == 1, log
    assert "127.0.0.1" not in log
    assert documented(reason), f"docs/api.md (status) does not list {reason!r}"
    return reason


def documented(reason: str) -> bool:
    """Whether docs/api.md's table of `relay.reason` strings has this one in its first column
    (a `<...>` in a documented string stands for its variable part)."""
    doc = (ROOT / "docs" / "api.md").read_text()
    section = doc[doc.index("`relay.reason`"):]
    section = section[:section.index("\n\n", section.index("| reason |"))]
    for row in section.splitlines()[4:]:
        for string in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if re.fullmatch(re.sub(r"<[^>]+>", ".+", re.escape(string)), reason):
                return True
    return False


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (not_found, "the relay answered 404: not an AegisLink relay at this URL"),
        (plain_text, "the relay answered 200: not an AegisLink relay at this URL"),
        (echo, "the server at this URL answered HELLO with something else "
               "(not an AegisLink relay)"),
        (text_chat, "the server at this URL does not speak the relay protocol "
                    "(not an AegisLink relay)"),
        (newer_version, f"the relay speaks version {wire.VERSION + 1} of the relay protocol, "
                        f"not {wire.VERSION}"),
        (refuses_version, f"the relay does not speak version {wire.VERSION} of the relay "
                          "protocol"),
    ],
)
def test_not_a_relay_is_reported(profile: Callable[[str], DaemonProc], handler: Handler,
                                 expected: str) -> None:
    server = FakeServer(handler)
    try:
        d = profile(f"ws://127.0.0.1:{server.port}/v1/ws")
        assert reason_after_retries(d, server) == expected
    finally:
        server.close()


def test_not_a_relay_is_reported_in_isolated_mode(profile: Callable[..., DaemonProc]) -> None:
    """Isolation (one connection per mailbox) takes another path through the link: the same
    reason, logged once."""
    server = FakeServer(not_found)
    try:
        d = profile(f"ws://127.0.0.1:{server.port}/v1/ws", isolation=True)
        with d.client() as c:
            assert c.call("network.get")["isolation"] is True
        assert reason_after_retries(d, server) == (
            "the relay answered 404: not an AegisLink relay at this URL")
    finally:
        server.close()


def test_closed_port_is_reported(profile: Callable[[str], DaemonProc]) -> None:
    d = profile(f"ws://127.0.0.1:{free_port()}/v1/ws")
    assert reason_after_retries(d, None) == (
        "connection refused: nothing listens at the relay's address and port")


def test_tls_to_a_plaintext_port_is_reported(profile: Callable[[str], DaemonProc]) -> None:
    server = FakeServer(not_found)
    try:
        d = profile(f"wss://127.0.0.1:{server.port}/v1/ws")
        assert reason_after_retries(d, None) == (
            "TLS: the handshake with the relay failed (is it a TLS port?)")
    finally:
        server.close()


def test_untrusted_certificate_is_reported(profile: Callable[[str], DaemonProc],
                                           short_tmp: Path) -> None:
    server = FakeServer(not_found, tls=self_signed_tls(short_tmp))
    try:
        d = profile(f"wss://127.0.0.1:{server.port}/v1/ws")
        assert reason_after_retries(d, None) == (
            "TLS: the relay's certificate is not trusted (self-signed)")
        assert server.hits == 0  # refused before any request was sent
    finally:
        server.close()


def test_init_without_path_reaches_the_relay(short_tmp: Path) -> None:
    """`aegis init --relay ws://127.0.0.1:PORT` (no /v1/ws): stored with the relay's path, and
    the daemon connects."""
    sub = short_tmp / "relay"
    sub.mkdir()
    rp = RelayProcess(sub, {})
    rp.start()
    d: DaemonProc | None = None
    try:
        home = short_tmp / "i"
        r = subprocess.run(
            [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(home),
             "--no-passphrase", "--relay", f"ws://127.0.0.1:{rp.port}"],
            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert r.returncode == 0, r.stderr
        d = DaemonProc(home, [], None)
        d.wait_ready()
        st = wait_for(lambda: (s := relay_status(d))["connected"] and s, "the relay")
        assert st["url"] == f"ws://127.0.0.1:{rp.port}/v1/ws"
    finally:
        if d is not None:
            d.kill()
        rp.close()


def test_url_stored_without_path_reaches_the_relay(profile: Callable[[str], DaemonProc],
                                                   short_tmp: Path) -> None:
    """A profile made before the path was optional (the URL stored as typed) connects too."""
    sub = short_tmp / "relay"
    sub.mkdir()
    rp = RelayProcess(sub, {})
    rp.start()
    try:
        d = profile(f"ws://127.0.0.1:{rp.port}")
        wait_for(lambda: relay_status(d)["connected"], "the relay")
    finally:
        rp.close()


def test_reasons_that_need_a_network_to_happen() -> None:
    """DNS and routing failures cannot be caused on loopback alone: the link's mapping of the
    exceptions aiohttp raises for them (and never the address they carry)."""
    import errno

    import aiohttp

    from aegisd.transport.relaylink import _reason

    class Key:  # what aiohttp's connection key offers to the exception's text
        host, port, ssl = "relay.example", 443, True

    dns = aiohttp.ClientConnectorDNSError(Key(), OSError(-2, "Name or service not known"))
    assert _reason(dns) == "the relay's host name could not be resolved (DNS)"
    route = aiohttp.ClientConnectorError(Key(), OSError(errno.EHOSTUNREACH, "No route to host"))
    assert _reason(route) == "relay unreachable: No route to host"
    for exc in (dns, route):
        assert "relay.example" not in _reason(exc) and documented(_reason(exc))


def test_a_fault_while_dialling_is_reported_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    """A bug while connecting (here injected: the first dials raise KeyError) neither ends the
    link silently (a failed HELLO_OK used to kill its task) nor logs on every retry."""
    import logging

    from aegisd.transport import relaylink
    from aegisd.transport.relaylink import RelayLink

    states: list[tuple[bool, str | None]] = []

    class Faulty(RelayLink):
        dials = 0

        async def _dial(self, url: str | None = None) -> Any:
            Faulty.dials += 1
            raise KeyError("not for the log")

    async def main() -> None:
        link = Faulty("ws://127.0.0.1:9/v1/ws", handler=None,  # type: ignore[arg-type]
                      subscriptions=list, on_state=lambda up, r: states.append((up, r)))
        link.start()
        for _ in range(200):  # at most 10 s: a dead link dials once
            if Faulty.dials >= 4:
                break
            await asyncio.sleep(0.05)
        await link.stop()
        assert Faulty.dials >= 4, "the link stopped trying"

    saved = relaylink.BACKOFF_FIRST
    relaylink.BACKOFF_FIRST = 0.01
    try:
        with caplog.at_level(logging.INFO, logger="aegisd.relay"):
            asyncio.run(main())
    finally:
        relaylink.BACKOFF_FIRST = saved
    assert set(states) == {(False, "internal error (KeyError)")}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["cannot reach the relay: internal error (KeyError)"]
    assert documented("internal error (KeyError)")
