"""Disappearing messages, the parts without processes: the timer payload's encoding and bounds
(docs/protocol.md §27), the rule that orders concurrent changes, the labels, the CLI's parser."""

from __future__ import annotations

import pytest

from aegis_cli.disappear import parse_timer, timer_text
from aegisd.core import wire
from aegisd.core.errors import DecodeError
from aegisd.services.disappearing import label, wins


def test_timer_payload_round_trips_and_is_bounded() -> None:
    for seconds in (0, 1, 300, 3600, 86_400, 604_800, wire.TIMER_MAX_S):
        p = wire.TimerPayload(1_700_000_000_123, seconds)
        raw = wire.encode_payload(p)
        assert raw[1] == wire.PAYLOAD_TIMER == 0x16 and len(raw) == 2 + 8 + 4
        assert wire.decode_payload(raw) == p
    good = wire.encode_payload(wire.TimerPayload(5, 60))
    for bad in (wire.TIMER_MAX_S + 1, 2**32 - 1):
        with pytest.raises(ValueError):
            wire.encode_payload(wire.TimerPayload(5, bad))
        with pytest.raises(DecodeError):  # a peer's value outside the range: refused
            wire.decode_payload(good[:-4] + bad.to_bytes(4, "big"))
    with pytest.raises(DecodeError):  # trailing bytes
        wire.decode_payload(good + b"\x00")
    with pytest.raises(DecodeError):  # truncated
        wire.decode_payload(good[:-1])


def test_concurrent_changes_converge() -> None:
    # Each side applies the other's change only if it wins over its own: the later one does,
    # at equal times the larger value; so both sides end with the same timer.
    a, b = (1000, 3600), (1000, 300)
    assert wins(a, b) and not wins(b, a)
    assert wins((1001, 0), (1000, 3600)) and not wins((999, 3600), (1000, 0))
    assert not wins(a, a)  # the same change again (a replay): nothing changes


def test_labels_and_cli_parser() -> None:
    assert [label(s) for s in (0, 1, 90, 300, 3600, 86_400, 604_800, 1_209_600)] == [
        "off", "1 second", "90 seconds", "5 minutes", "1 hour", "1 day", "1 week", "2 weeks",
    ]  # fmt: skip
    assert all(timer_text(s) == label(s) for s in (0, 1, 90, 300, 7200, 172_800))
    assert [parse_timer(t) for t in ("off", "5m", "1h", "1d", "1w", "90s", "2", "30min")] == [
        0, 300, 3600, 86_400, 604_800, 90, 2, 1800,
    ]  # fmt: skip
    for bad in ("", "soon", "-1", "1y", "1.5h"):
        with pytest.raises(Exception, match="duration"):
            parse_timer(bad)
