"""The parts of bench/attack.py that need no processes: percentiles, the pass rule, the
recovery time of the full-disk scenario, the table and the relay options it passes."""

from __future__ import annotations

from bench.attack import (
    Phase,
    format_table,
    outcome,
    percentile,
    recovery_time,
    relay_options,
    verdict,
)
from relay import wire
from relay.client import HandshakeFailed, RelayClosed, RelayError


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    values = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(list(reversed(values)), 1) == 1.0
    # Few samples: p99 is the largest, never an index past the end.
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0


def phase(latencies: list[float], failures: int = 0) -> Phase:
    p = Phase()
    for i, lat in enumerate(latencies):
        p.record(float(i), lat)
    for i in range(failures):
        p.record(float(len(latencies) + i), None, "busy")
    return p


def test_verdict_is_issue_15s_bar() -> None:
    base = phase([0.001] * 98 + [0.010] * 2)  # p99 (the 99th of 100) is 10 ms
    ratio, result = verdict(base, phase([0.002] * 98 + [0.030] * 2))
    assert result == "PASS" and ratio is not None and abs(ratio - 3.0) < 1e-9
    assert verdict(base, phase([0.002] * 98 + [0.031] * 2))[1] == "FAIL"  # p99 above 3x
    # 98 % success fails however fast the rest was.
    assert verdict(base, phase([0.001] * 98, failures=2))[1] == "FAIL"
    assert verdict(base, phase([0.001] * 99, failures=1))[1] == "PASS"
    # Nothing succeeded under attack, or no baseline: FAIL, no ratio.
    assert verdict(base, phase([], failures=5)) == (None, "FAIL")
    assert verdict(phase([]), base) == (None, "FAIL")


def test_phase_counts() -> None:
    p = phase([0.1, 0.2], failures=2)
    p.record(9.0, None, "http503")
    assert p.total == 5
    assert p.success == 2 / 5
    assert p.failures == {"busy": 2, "http503": 1}
    assert Phase().success is None


def test_recovery_time() -> None:
    events = [(1.0, False), (2.0, True), (3.0, False), (4.0, True), (5.0, True), (6.0, True),
              (7.0, True), (8.0, True)]
    assert recovery_time(events, 0.5, run=5) == 3.5  # the run from 4.0 to the end
    assert recovery_time(events, 0.5, run=6) is None  # too short to count
    assert recovery_time(list(reversed(events)), 0.5, run=5) == 3.5  # completion order is not
    assert recovery_time(events, 6.0, run=2) == 0.0  # events before `since` do not count
    # Successes that stop again (room freed for a moment) are no recovery.
    assert recovery_time([*events, (9.0, False)], 0.5, run=1) is None
    assert recovery_time([], 0.0, run=1) is None
    assert recovery_time([(float(i), True) for i in range(20)], 0.0) == 0.0


def test_outcome_names() -> None:
    assert outcome(RelayError(wire.E_BUSY)) == "busy"
    assert outcome(RelayError(17)) == "full"
    assert outcome(RelayError(250)) == "error250"
    assert outcome(HandshakeFailed("x", 503)) == "http503"
    assert outcome(HandshakeFailed("x")) == "handshake"
    assert outcome(TimeoutError()) == "no_answer"
    assert outcome(RelayClosed()) == "closed"
    assert outcome(ConnectionResetError()) == "closed"


def test_table() -> None:
    rows = [
        {"scenario": "1", "base_p50": 0.002, "base_p99": 0.0081, "att_p50": 0.009,
         "att_p99": 0.145, "ratio_p99": 17.9, "success": 0.995, "verdict": "FAIL",
         "rss_before": 44.0, "rss_peak": 47.2, "rss_after": 46.0, "note": "hostile got: ok 5"},
        {"scenario": "disk", "verdict": "SKIP", "note": "skipped: cannot mount"},
    ]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["scenario", "base50", "base99", "att50", "att99", "x99", "ok",
                                "%", "verdict", "RSS", "MB"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["1", "store", "flood", "2.0", "8.1", "9.0", "145.0", "17.9",
                                "99.5", "FAIL", "44/47/46"]
    assert lines[3].split() == ["disk", "full", "disk", "-", "-", "-", "-", "-", "-", "SKIP",
                                "-/-/-"]
    assert "1: hostile got: ok 5" in lines
    assert "disk: skipped: cannot mount" in lines


def test_relay_options_only_known_settings() -> None:
    opts = relay_options({"max_connections": 1000, "no_such_setting_yet": 5})
    assert opts == ["--max-connections", "1000"]
