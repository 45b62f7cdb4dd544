"""A contact's ICE candidates on non-public addresses are not probed (review of issue 15,
finding 12): aegisd/calls/candidates.py."""

from __future__ import annotations

from aegisd.calls.candidates import public_candidates, relay_is_local

SDP = (
    "v=0\r\n"
    "o=- 1 1 IN IP4 0.0.0.0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"
    "a=fingerprint:sha-256 AB:CD\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.1 6379 typ host\r\n"
    "a=candidate:2 1 udp 2130706431 192.168.1.10 5000 typ host\r\n"
    "a=candidate:3 1 udp 2130706431 169.254.169.254 80 typ host\r\n"
    "a=candidate:4 1 udp 2130706431 ::1 5000 typ host\r\n"
    "a=candidate:5 1 udp 2130706431 ::ffff:10.0.0.1 5000 typ host\r\n"
    "a=candidate:6 1 udp 2130706431 printer.local 5000 typ host\r\n"
    "a=candidate:7 1 udp 1694498815 93.184.216.34 41000 typ srflx raddr 0.0.0.0 rport 0\r\n"
    "a=candidate:8 1 udp 16777215 2606:4700::1111 3478 typ relay raddr :: rport 0\r\n"
    "a=end-of-candidates\r\n"
)


def test_only_public_candidates_are_kept() -> None:
    out, dropped = public_candidates(SDP)
    assert dropped == 6
    kept = [line for line in out.splitlines() if line.startswith("a=candidate:")]
    assert kept == [
        "a=candidate:7 1 udp 1694498815 93.184.216.34 41000 typ srflx raddr 0.0.0.0 rport 0",
        "a=candidate:8 1 udp 16777215 2606:4700::1111 3478 typ relay raddr :: rport 0",
    ]
    assert "a=fingerprint:sha-256 AB:CD\r\n" in out and out.endswith("a=end-of-candidates\r\n")


def test_a_local_own_relay_keeps_local_candidates() -> None:
    # Tests (and a user running everything on one machine or LAN) call over loopback.
    assert relay_is_local("ws://127.0.0.1:8765/v1/ws")
    assert relay_is_local("ws://localhost:8765")
    assert relay_is_local("wss://192.168.1.2/v1/ws")
    assert relay_is_local("wss://nas.local/v1/ws")
    assert not relay_is_local("wss://relay.example.org/v1/ws")
    assert not relay_is_local("wss://93.184.216.34/v1/ws")
    assert not relay_is_local(None)
