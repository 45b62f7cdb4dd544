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


def test_the_demo_leak_check_finds_names_in_text_but_not_in_random_bytes() -> None:
    import os as _os

    from aegisd.demo import leaks

    noise = bytearray(_os.urandom(4096))
    noise[1000:1003] = b"bob"  # a chance match amid random bytes
    assert not leaks(bytes(noise), [b"a long message text"], [b"bob"])
    assert leaks(bytes(noise) + b'{"contact": "bob", "note": "plain text around"}', [], [b"bob"])
    assert leaks(bytes(noise) + b"a long message text", [b"a long message text"], [b"bob"])
