"""`python -m aegisd.demo protocol` runs, round-trips every message, shows only uniform blocks."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aegisd.demo", "protocol"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "match: True" in out
    sizes = set(re.findall(r"wire: .*? (\d+) bytes, version byte 0x01", out))
    assert sizes == {"16384"}
    assert len(re.findall(r"wire: ", out)) >= 7
