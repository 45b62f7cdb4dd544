"""Tor's control protocol as the daemon speaks it (aegisd/transport/torcontrol.py): the reply
parsers on hostile input, SAFECOOKIE against a server that does or does not know the cookie,
and the torrc and bridge-line checks of aegisd/transport/tor.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegisd.netmode import NeedsTor, check_mode_for_relay, default_mode, effective_mode
from aegisd.relayurl import RelayUrlError, check_relay_url, is_onion
from aegisd.transport.tor import TorConfig, TorConfigError, TorStatus, _clean, check_bridge_line
from aegisd.transport.torcontrol import (
    ControlError,
    TorControl,
    parse_bootstrap,
    parse_kv,
    parse_reply_line,
    safecookie_hashes,
    unquote,
)

ONION = "a" * 56 + ".onion"
FP = "0123456789ABCDEF0123456789ABCDEF01234567"


def test_bootstrap_lines() -> None:
    b = parse_bootstrap('NOTICE BOOTSTRAP PROGRESS=45 TAG=loading_descriptors SUMMARY="Loading '
                        'relay descriptors"')  # fmt: skip
    assert (b.progress, b.tag, b.done) == (45, "loading_descriptors", False)
    assert b.summary == "Loading relay descriptors"
    done = parse_bootstrap('NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"')
    assert done.done and done.warning is None
    warn = parse_bootstrap('WARN BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="x" WARNING="Connection '
                           'refused" REASON=CONNECTREFUSED COUNT=3')  # fmt: skip
    assert warn.warning == "Connection refused" and warn.progress == 5
    for bad in ("NOTICE BOOTSTRAP PROGRESS=101 TAG=x", "NOTICE CIRCUIT_ESTABLISHED",
                "NOTICE BOOTSTRAP TAG=x", "NOTICE BOOTSTRAP PROGRESS=x", "",
                'NOTICE BOOTSTRAP PROGRESS=5 SUMMARY="unterminated'):  # fmt: skip
        with pytest.raises(ControlError):
            parse_bootstrap(bad)


def test_quoted_strings_and_pairs() -> None:
    assert unquote(r'"a \"b\" \\ \n \101"rest') == ('a "b" \\ \n A', "rest")
    assert parse_kv('A=1 B="x y" FLAG C=') == {"A": "1", "B": "x y", "FLAG": "", "C": ""}
    assert parse_reply_line("250-key=value") == (250, "-", "key=value")
    assert parse_reply_line("650 STATUS_CLIENT x") == (650, " ", "STATUS_CLIENT x")
    for bad in ("25", "abc-x", "250x", "2500 ok"):
        with pytest.raises(ControlError):
            parse_reply_line(bad)
    with pytest.raises(ControlError):
        parse_kv('A="unterminated')
    with pytest.raises(ControlError):
        parse_kv("=x")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_parsers_raise_only_control_error(text: str) -> None:
    """Whatever a (compromised or broken) Tor sends, the parsers give a value or ControlError."""
    for parse in (parse_bootstrap, parse_kv, parse_reply_line):
        with contextlib.suppress(ControlError):
            parse(text)
    if text.startswith('"'):
        with contextlib.suppress(ControlError):
            unquote(text)


class FakeTor:
    """A control-socket server speaking just enough of the protocol to authenticate, with a
    cookie of its own (which may differ from the one in the cookie file)."""

    def __init__(self, path: Path, cookie: bytes, cookie_file: Path) -> None:
        self.path, self.cookie, self.cookie_file = path, cookie, cookie_file
        self.authenticated = False
        self.lines: list[str] = []

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        server_nonce = os.urandom(32)
        client_nonce = b""
        while line := (await r.readline()).decode().rstrip("\r\n"):
            self.lines.append(line)
            verb, _, arg = line.partition(" ")
            if verb == "PROTOCOLINFO":
                w.write(b"250-PROTOCOLINFO 1\r\n250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE=\""
                        + str(self.cookie_file).encode() + b"\"\r\n250-VERSION Tor=\"0.4.9\"\r\n"
                        b"250 OK\r\n")  # fmt: skip
            elif verb == "AUTHCHALLENGE":
                client_nonce = bytes.fromhex(arg.split()[1])
                server_hash, _ = safecookie_hashes(self.cookie, client_nonce, server_nonce)
                w.write(f"250 AUTHCHALLENGE SERVERHASH={server_hash.hex()} "
                        f"SERVERNONCE={server_nonce.hex()}\r\n".encode())  # fmt: skip
            elif verb == "AUTHENTICATE":
                _, want = safecookie_hashes(self.cookie, client_nonce, server_nonce)
                self.authenticated = hmac.compare_digest(bytes.fromhex(arg), want)
                w.write(b"250 OK\r\n" if self.authenticated else b"515 Bad authentication\r\n")
            elif verb == "GETINFO" and arg == "status/bootstrap-phase":
                w.write(b"650 STATUS_CLIENT NOTICE BOOTSTRAP PROGRESS=50 TAG=x SUMMARY=\"y\"\r\n"
                        b'250-status/bootstrap-phase=NOTICE BOOTSTRAP PROGRESS=50 TAG=x '
                        b'SUMMARY="y"\r\n250 OK\r\n')  # fmt: skip
            elif verb == "GETINFO" and arg == "net/listeners/socks":
                w.write(b'250-net/listeners/socks="127.0.0.1:9150"\r\n250 OK\r\n')
            elif verb == "GETINFO" and arg == "config-text":
                w.write(b"250+config-text=\r\nBridge x\r\n..dotted\r\n.\r\n250 OK\r\n")
            else:
                w.write(b"510 Unrecognized command\r\n")
            await w.drain()
        w.close()


def _run_fake(cookie_in_file: bytes, server_cookie: bytes) -> tuple[FakeTor, list[object]]:
    async def go() -> tuple[FakeTor, list[object]]:
        d = Path(tempfile.mkdtemp(prefix="tc", dir="/tmp"))
        cookie_file = d / "cookie"
        cookie_file.write_bytes(cookie_in_file)
        fake = FakeTor(d / "control", server_cookie, cookie_file)
        server = await asyncio.start_unix_server(fake.serve, str(fake.path))
        out: list[object] = []
        events: list[str] = []
        control = await TorControl.connect(fake.path)
        control.on_event = events.append
        try:
            await control.authenticate()
            out.append(await control.bootstrap())
            out.append(await control.socks_listener())
            out.append(await control.getinfo("config-text"))
            out.append(events)
            out.append((await control.command("FROB")).code)
        except ControlError as exc:
            out.append(exc)
        finally:
            await control.close()
            server.close()
        return fake, out

    return asyncio.run(go())


def test_safecookie_against_a_server_that_knows_the_cookie() -> None:
    cookie = os.urandom(32)
    fake, out = _run_fake(cookie, cookie)
    assert fake.authenticated
    assert not any(cookie.hex() in line for line in fake.lines)  # the cookie never crossed
    boot, socks, config, events, code = out
    assert boot.progress == 50  # type: ignore[attr-defined]
    assert socks == ("127.0.0.1", 9150)
    assert config == "Bridge x\n.dotted"
    assert events == ['STATUS_CLIENT NOTICE BOOTSTRAP PROGRESS=50 TAG=x SUMMARY="y"']
    assert code == 510


def test_safecookie_refuses_a_server_that_does_not_know_the_cookie() -> None:
    fake, out = _run_fake(os.urandom(32), os.urandom(32))
    assert not fake.authenticated
    assert isinstance(out[0], ControlError) and "does not know" in str(out[0])
    assert not any(line.startswith("AUTHENTICATE") for line in fake.lines)


def test_bridge_lines() -> None:
    line = f"obfs4 192.0.2.1:443 {FP} cert=AbC+/= iat-mode=0"
    assert check_bridge_line(f"  Bridge {line}  ") == line
    assert check_bridge_line(f"[2001:db8::1]:443 {FP}") == f"[2001:db8::1]:443 {FP}"
    for bad in (
        "", "obfs4", "snowflake 192.0.2.1:1 " + FP, "192.0.2.1:443\nControlPort 9051",
        f"obfs4 192.0.2.1:443 {FP}", f"obfs4 192.0.2.1:443 {FP} cert=x\x00",
        f"192.0.2.1:443 {FP} cert=x", "example.org:443", "x" * 2000,
        f"obfs4 192.0.2.1:443 {FP} cert=a ExitNodes=1",  # fine as key=value, see below
    ):  # fmt: skip
        if bad.endswith("ExitNodes=1"):
            assert check_bridge_line(bad).endswith("ExitNodes=1")  # one torrc line, no injection
            continue
        with pytest.raises(TorConfigError):
            check_bridge_line(bad)


def test_torrc() -> None:
    cfg = TorConfig(Path("/tmp/p/tor"), bridges=(f"obfs4 192.0.2.1:443 {FP} cert=x",),
                    obfs4="/usr/bin/obfs4proxy")  # fmt: skip
    text = cfg.torrc(1234)
    assert 'ControlPort unix:"/tmp/p/tor/control"' in text
    assert "SocksPort 127.0.0.1:auto IsolateSOCKSAuth" in text
    assert "SafeLogging 1" in text and "__OwningControllerProcess 1234" in text
    assert "UseBridges 1" in text
    # Unquoted: Tor runs the rest of the line as it is (quotes would be part of the name).
    assert "ClientTransportPlugin obfs4 exec /usr/bin/obfs4proxy\n" in text
    with pytest.raises(TorConfigError):
        TorConfig(Path("/tmp/p"), bridges=(f"obfs4 192.0.2.1:443 {FP} cert=x",),
                  obfs4="/opt/my obfs4/obfs4proxy").torrc(1)  # fmt: skip
    assert all("\n" not in line for line in text.splitlines())
    with pytest.raises(TorConfigError):
        TorConfig(Path('/tmp/a"b')).torrc(1)
    with pytest.raises(TorConfigError):  # obfs4 without obfs4proxy
        TorConfig(Path("/tmp/p"), bridges=(f"obfs4 192.0.2.1:443 {FP} cert=x",)).torrc(1)


def test_status_text_holds_no_address() -> None:
    assert "192.0.2.7" not in _clean("Problem bootstrapping: host ABC at 192.0.2.7:9001 refused")
    line = (f"Proxy Client: unable to connect OR connection (handshaking (proxy)) with "
            f"2001:db8::7:9001 ID=<none> RSA_ID={FP} (\"general SOCKS server failure\") "
            f"via ${FP}~bridge1 for {ONION[:-6]}.onion at 08:02:07")  # fmt: skip
    cleaned = _clean(line)
    for secret in (FP, "2001:db8::7", "bridge1", ONION[:-6]):
        assert secret not in cleaned, cleaned
    assert "08:02:07" in cleaned and "general SOCKS server failure" in cleaned
    s = TorStatus(state="restarting", reason="Tor was killed by signal 9", failures=3, retry_in=4)
    assert s.describe() == ("Tor is not running: Tor was killed by signal 9 (failed 3 times in a "
                            "row); trying again in 4 s")  # fmt: skip


def test_modes_and_onion_urls() -> None:
    assert is_onion(ONION) and is_onion("www." + ONION)
    assert not is_onion("a" * 16 + ".onion") and not is_onion("x.onion")
    assert not is_onion(ONION + ".org")
    assert check_relay_url(f"ws://{ONION}/v1/ws") == f"ws://{ONION}/v1/ws"  # no insecure flag
    with pytest.raises(RelayUrlError):
        check_relay_url("ws://abc.onion/v1/ws")
    assert default_mode("ws://127.0.0.1:1/v1/ws") == "direct"
    assert default_mode("wss://relay.example.org/v1/ws") == "tor"
    assert default_mode(f"ws://{ONION}/v1/ws") == "tor"
    assert default_mode(None) == "direct"
    assert effective_mode(None, "socks5://127.0.0.1:9050", "wss://x.org/") == "proxy"
    assert effective_mode("direct", None, "wss://x.org/") == "direct"
    with pytest.raises(NeedsTor):
        check_mode_for_relay("direct", f"ws://{ONION}/v1/ws")
    check_mode_for_relay("proxy", f"ws://{ONION}/v1/ws")


def test_safecookie_hashes_match_the_spec() -> None:
    c, n1, n2 = b"c" * 32, b"1" * 32, b"2" * 32
    server, client = safecookie_hashes(c, n1, n2)
    key = b"Tor safe cookie authentication server-to-controller hash"
    assert server == hmac.new(key, c + n1 + n2, hashlib.sha256).digest()
    assert client != server
