"""The media engine alone (real aiortc, two peer connections in this process, loopback only):
the DTLS fingerprint the sealed SDP carries is the one checked against the peer's certificate."""

from __future__ import annotations

import asyncio
import re

import aioice.ice
import pytest

from aegisd.calls import engine

# No sound card here: these tests are about the connection, not the sound (test_calls_sound.py).
SILENT = engine.Devices(use_sound_card=False)


@pytest.fixture(autouse=True)
def loopback_only() -> object:
    """Host candidates on 127.0.0.1 only (as calls.host_candidates = "loopback" does in the
    daemon); aioice's own function comes back afterwards."""
    original = aioice.ice.get_host_addresses
    engine.restrict_host_candidates_to_loopback()
    yield None
    aioice.ice.get_host_addresses = original


def _other_fingerprint(sdp: str) -> str:
    """The same SDP with a different (well-formed) sha-256 fingerprint."""
    def flip(m: re.Match[str]) -> str:
        return m.group(1) + ("00" if m.group(2) != "00" else "11")

    out = re.sub(r"(a=fingerprint:sha-256 )([0-9A-F]{2})", flip, sdp)
    assert out != sdp
    return out


async def _call(tamper_answer: bool) -> tuple[list[str], list[str], list[str]]:
    states_a: list[str] = []
    states_b: list[str] = []
    media: list[str] = []
    a = engine.MediaSession(
        engine.IceConfig(), False, None, None, states_a.append, media.append, SILENT
    )
    b = engine.MediaSession(
        engine.IceConfig(), False, None, None, states_b.append, media.append, SILENT
    )
    try:
        offer = await a.create_offer()
        assert re.search(r"typ host", offer) and "127.0.0.1" in offer
        for line in offer.splitlines():  # every candidate offered is on loopback
            if line.startswith("a=candidate:"):
                assert " 127.0.0.1 " in line, line
        answer = await b.answer_offer(offer)
        if tamper_answer:
            answer = _other_fingerprint(answer)
        await a.accept_answer(answer)
        # Generous (a loaded machine): until A failed, or both sides got their first frame.
        for _ in range(1200):
            if "failed" in states_a or (len(media) >= 2 and "connected" in states_a):
                break
            await asyncio.sleep(0.05)
        return states_a, states_b, media
    finally:
        await a.close()
        await b.close()


def test_matching_fingerprint_connects_and_media_flows() -> None:
    states_a, _, media = asyncio.run(_call(tamper_answer=False))
    assert "connected" in states_a and media == ["audio", "audio"]  # each side hears silence


def test_mismatching_fingerprint_fails_the_call() -> None:
    states_a, _, media = asyncio.run(_call(tamper_answer=True))
    assert "failed" in states_a and "connected" not in states_a
    assert media == []


def test_description_without_fingerprint_is_refused() -> None:
    async def run() -> None:
        a = engine.MediaSession(engine.IceConfig(), False, None, None, print, print, SILENT)
        b = engine.MediaSession(engine.IceConfig(), False, None, None, print, print, SILENT)
        try:
            offer = await a.create_offer()
            stripped = "\r\n".join(
                line for line in offer.split("\r\n") if not line.startswith("a=fingerprint")
            )
            with pytest.raises(engine.FingerprintMismatch):
                await b.answer_offer(stripped)
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_ice_servers_are_always_explicit() -> None:
    """aiortc given no server list would ask Google's public STUN server."""
    assert engine.IceConfig().rtc().iceServers == []
    relay = engine.IceConfig((("turn:127.0.0.1:3478", "u", "p"),), relay_only=True).rtc()
    assert relay.iceTransportPolicy.name == "RELAY" and len(relay.iceServers or []) == 1


def test_loopback_restriction_can_be_undone() -> None:
    """calls.host_candidates back to "all" gives aioice its own address enumeration again."""
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
    engine.use_all_host_candidates()
    assert aioice.ice.get_host_addresses is engine._AIOICE_HOST_ADDRESSES
    engine.restrict_host_candidates_to_loopback()
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
