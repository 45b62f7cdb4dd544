"""Malformed, oversized, unknown-version, out-of-order frames; timeouts; connection cap; fuzz."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from relay import pow as pow_
from relay import wire
from relay.client import HandshakeFailed, RelayClient, RelayError

from .conftest import RelayProcess, run
from .helpers import block, new_owner


async def raw_exchange(url: str, frames: list[bytes | str], hello: bool = False,
                       wait: float = 10) -> tuple[list[bytes], int | None]:
    """Send frames on a fresh connection; return what came back and the close code."""
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=1 << 20) as ws:
        got: list[bytes] = []
        if hello:
            await ws.send_bytes(wire.encode(wire.HELLO, 1))
            msg = await ws.receive(timeout=wait)
            assert wire.decode(msg.data).type == wire.HELLO_OK
        for f in frames:
            if isinstance(f, str):
                await ws.send_str(f)
            else:
                await ws.send_bytes(f)
        while True:
            try:
                msg = await ws.receive(timeout=wait)
            except TimeoutError:
                return got, None
            if msg.type == aiohttp.WSMsgType.BINARY:
                got.append(msg.data)
            else:
                return got, ws.close_code


def codes(frames: list[bytes]) -> list[int]:
    out = []
    for f in frames:
        fr = wire.decode(f)
        if fr.type == wire.ERROR:
            out.append(wire.parse_error(fr.body))
    return out


CASES: list[tuple[str, list[bytes | str], bool, int]] = [
    ("command before hello", [wire.encode(wire.DEPOSIT, 7, b"x")], False, wire.E_OUT_OF_ORDER),
    ("short frame", [b"\x01\x01"], False, wire.E_BAD_FRAME),
    ("unknown version", [bytes([1, wire.HELLO, 0, 0, 0, 1])], False, wire.E_BAD_VERSION),
    ("hello with a body", [wire.encode(wire.HELLO, 1, b"x")], False, wire.E_BAD_FRAME),
    ("text frame", ["hello"], False, wire.E_BAD_FRAME),
    ("second hello", [wire.encode(wire.HELLO, 2)], True, wire.E_OUT_OF_ORDER),
    ("unknown type", [wire.encode(0x50, 2)], True, wire.E_UNKNOWN_TYPE),
    ("server-only type", [wire.encode(wire.MSG, 2)], True, wire.E_UNKNOWN_TYPE),
    ("bad auth kind", [wire.encode(wire.DEPOSIT, 2, bytes(16) + b"\x09" + bytes(40))], True,
     wire.E_BAD_FRAME),
    ("truncated create", [wire.encode(wire.CREATE, 2, bytes(100))], True, wire.E_BAD_FRAME),
    ("bad ack length", [wire.encode(wire.ACK, 2, bytes(17))], True, wire.E_BAD_FRAME),
    ("bad bundle items", [wire.encode(wire.BUNDLE_ADD, 2, bytes(16) + b"\x01\x01\x00\x05ab"
                                      + bytes(64))], True, wire.E_BAD_FRAME),
]


@pytest.mark.parametrize(("name", "frames", "hello", "code"), CASES, ids=[c[0] for c in CASES])
def test_fatal_errors_close_with_error_frame(relay: RelayProcess, name: str,
                                             frames: list[bytes | str], hello: bool,
                                             code: int) -> None:
    got, close = run(raw_exchange(relay.url, frames, hello))
    assert codes(got) == [code], name
    assert close == 1002


def test_oversized_frame_closes_1009(relay: RelayProcess) -> None:
    big = wire.encode(wire.DEPOSIT, 2, bytes(70000))
    _, close = run(raw_exchange(relay.url, [big], hello=True))
    assert close == 1009


@pytest.mark.both_backends
def test_recoverable_errors_keep_connection(relay: RelayProcess) -> None:
    async def body() -> None:
        c = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o = await new_owner(c, token=token)
        for bad in (b"", bytes(wire.BLOCK_SIZE - 1), bytes(wire.BLOCK_SIZE + 1)):
            with pytest.raises(RelayError) as e:
                await c.request(wire.DEPOSIT, o.deposit_id + bytes([wire.AUTH_TOKEN]) + token
                                + bad)
            assert e.value.code == wire.E_BAD_BLOCK
        with pytest.raises(RelayError) as e:
            await c.ack([os.urandom(16)])
        assert e.value.code == wire.E_UNKNOWN_MESSAGE
        # Bad signature and missing mailbox: the same answer.
        answers = []
        for owner_id, key in ((o.owner_id, SigningKey.generate()), (os.urandom(16), o.sig)):
            with pytest.raises(RelayError) as e:
                await c.subscribe(owner_id, key)
            answers.append(e.value.code)
        assert answers == [wire.E_DENIED, wire.E_DENIED]
        # A signature over another connection's challenge is worthless here.
        other = await RelayClient.connect(relay.url)
        rid = 99
        unsigned = o.owner_id
        sig = o.sig.sign(wire.auth_message(other.challenge,
                                           wire.encode(wire.SUBSCRIBE, rid, unsigned)))
        with pytest.raises(RelayError) as e:
            await c.request(wire.SUBSCRIBE, unsigned + sig.signature, rid=rid)
        assert e.value.code == wire.E_DENIED
        # A box key NaCl cannot use (all zero, low order) and a bad creation signature.
        with pytest.raises(RelayError) as e:
            await c.create(SigningKey.generate(), bytes(32))
        assert e.value.code == wire.E_DENIED
        rid = 100
        sig_pub, box_pub = bytes(SigningKey.generate().verify_key), os.urandom(32)
        nonce = pow_.solve(c.hello.pow_create_bits, c.challenge, wire.POW_CREATE,
                           pow_.ZERO_TARGET, wire.create_pow_hash(sig_pub, box_pub, 0))
        unsigned = sig_pub + box_pub + b"\x00" + nonce  # paid for, badly signed
        with pytest.raises(RelayError) as e:
            await c.request(wire.CREATE, unsigned + bytes(64), rid=rid)
        assert e.value.code == wire.E_DENIED
        await c.deposit(o.deposit_id, block(), token=token)  # still usable
        await c.close()
        await other.close()

    run(body())


def test_handshake_and_idle_timeouts(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(handshake_timeout=0.5, idle_timeout=0.8)
    # Generous idle timeout here: only silence longer than it may close the connection.
    rp_sub = relay_factory(idle_timeout=1.5)

    async def body() -> None:
        got, close = await raw_exchange(rp.url, [], hello=False)
        assert codes(got) == [wire.E_TIMEOUT] and close == 1002
        got, close = await raw_exchange(rp.url, [], hello=True)
        assert codes(got) == [wire.E_TIMEOUT] and close == 1002
        # A subscribed connection is not idle: it stays.
        c = await RelayClient.connect(rp_sub.url)
        token = os.urandom(32)
        o = await new_owner(c, token=token)
        await o.subscribe(c)
        await asyncio.sleep(4)
        await c.deposit(o.deposit_id, block(), token=token)
        await asyncio.wait_for(c.messages.get(), 10)
        await c.close()

    run(body())
    assert "Traceback" not in rp.output() + rp_sub.output()


def test_connection_cap(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(max_connections=2)

    async def body() -> None:
        a = await RelayClient.connect(rp.url)
        b = await RelayClient.connect(rp.url)
        with pytest.raises(HandshakeFailed) as e:
            await RelayClient.connect(rp.url)
        assert e.value.status == 503
        assert str(e.value) == "the relay answered 503: it is full or shutting down"
        await a.close()
        await b.close()

    run(body())


@pytest.mark.both_backends
def test_queue_limit_and_rate_limit(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(queue_limit=3, deposit_burst=5, deposit_rate=0.001)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        o = await new_owner(c, token=token)
        for _ in range(3):
            await c.deposit(o.deposit_id, block(), token=token)
        with pytest.raises(RelayError) as e:
            await c.deposit(o.deposit_id, block(), token=token)
        assert e.value.code == wire.E_QUEUE_FULL
        msgs = await o.fetch(c)
        await c.ack([m.msg_id for m in msgs])
        await c.deposit(o.deposit_id, block(), token=token)
        with pytest.raises(RelayError) as e:
            await c.deposit(o.deposit_id, block(), token=token)
        assert e.value.code == wire.E_RATE_LIMITED
        await c.close()

    run(body())


# --- fuzz -----------------------------------------------------------------------------------


PARSERS: list[Callable[[bytes], object]] = [
    wire.decode, wire.parse_create, wire.parse_deposit, wire.parse_items, wire.parse_bundle,
    wire.HelloOk.parse, lambda b: wire.parse_ack(b, 32),
    lambda b: wire.split_signed(b, 0, 4096), wire.parse_error,
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(range(len(PARSERS))))
def test_parsers_raise_only_frame_error(data: bytes, which: int) -> None:
    with contextlib.suppress(wire.FrameError):
        PARSERS[which](data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_items_roundtrip(data: bytes) -> None:
    items = [data[i:i + 7] for i in range(0, len(data), 7)][:255] or [b"x"]
    assert wire.parse_items(wire.encode_items(wire.ITEM_MLKEM, items)) == (wire.ITEM_MLKEM, items)


@pytest.mark.both_backends
def test_live_fuzz_never_crashes(relay: RelayProcess) -> None:
    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(sorted(wire.CLIENT_TYPES - {wire.HELLO})),
           st.binary(max_size=400), st.integers(0, 2**32 - 1))
    def one(ftype: int, body: bytes, rid: int) -> None:
        got, _ = run(raw_exchange(relay.url, [struct.pack(">BBI", 1, ftype, rid) + body],
                                  hello=True, wait=0.3))
        for f in got:
            fr = wire.decode(f)
            if fr.type == wire.ERROR:
                assert wire.parse_error(fr.body) != wire.E_INTERNAL

    one()
    assert relay.proc is not None and relay.proc.poll() is None
    assert "Traceback" not in relay.output() and "internal error" not in relay.output()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.both_backends
def test_client_that_does_not_read_is_not_buffered_without_bound(relay: RelayProcess) -> None:
    """Thousands of 16 KiB answers requested without reading: the relay stops reading too."""
    from nacl.public import PrivateKey

    async def body() -> None:
        up = await RelayClient.connect(relay.url)
        await up.blob_quota(1)
        blob_id, cap = os.urandom(16), os.urandom(32)
        await up.blob_put(blob_id, cap, block())
        assert relay.proc is not None
        before = _rss_mb(relay.proc.pid)
        key = bytes(PrivateKey.generate().public_key)
        n = 5000
        async with aiohttp.ClientSession() as s, s.ws_connect(relay.url,
                                                               max_msg_size=1 << 20) as ws:
            await ws.send_bytes(wire.encode(wire.HELLO, 1))
            await ws.receive(timeout=10)
            for i in range(n):
                await ws.send_bytes(wire.encode(wire.BLOB_GET, i + 2, blob_id + cap + key))
            await asyncio.sleep(1.5)
            grown = _rss_mb(relay.proc.pid) - before
            assert grown < 30, f"relay grew {grown:.0f} MB for a client that does not read"
            got = 0
            while got < n:  # nothing was dropped: every answer arrives once we read
                msg = await ws.receive(timeout=20)
                assert wire.decode(msg.data).type == wire.BLOB
                got += 1
        # Other clients were served all along.
        await up.blob_del(blob_id, cap)
        await up.close()

    run(body())


@pytest.mark.both_backends
def test_saturated_storage_answers_busy(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(max_pending_writes=0)  # every write finds the storage "saturated"

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        o = await new_owner(c, token=token)
        with pytest.raises(RelayError) as e:
            await c.deposit(o.deposit_id, block(), token=token)
        assert e.value.code == wire.E_BUSY
        await c.subscribe(o.owner_id, o.sig)  # the connection stays usable
        await c.close()

    run(body())
