"""contrib/relay/torrc-onion, the documented way to publish a relay as an onion service, is a
configuration Debian's tor accepts as it is (only its paths moved into a temporary
directory), with the DoS defences the docs name."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from aegisd.netmode import find_tor

ROOT = Path(__file__).resolve().parents[2]


def test_onion_relay_torrc_is_valid(tmp_path: Path) -> None:
    tor = find_tor()
    if tor is None:
        pytest.fail("tor is not installed: make system-deps installs it", pytrace=False)
    text = (ROOT / "contrib" / "relay" / "torrc-onion").read_text()
    for option in ("HiddenServicePoWDefensesEnabled 1", "HiddenServiceEnableIntroDoSDefense 1",
                   "HiddenServicePort 80 127.0.0.1:8765", "SafeLogging 1"):  # fmt: skip
        assert option in text
    hs = tmp_path / "hs"
    torrc = tmp_path / "torrc"
    torrc.write_text(text.replace("/var/lib/tor/aegis-relay/", f"{hs}/")
                     + f"DataDirectory {tmp_path / 'data'}\nSocksPort 0\n")  # fmt: skip
    (tmp_path / "defaults").write_text("")
    r = subprocess.run([tor, "--verify-config", "-f", str(torrc), "--defaults-torrc",
                        str(tmp_path / "defaults")], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0 and "Configuration was valid" in r.stdout, r.stdout + r.stderr
    warnings = [line for line in r.stdout.splitlines()
                if "[warn]" in line and "running Tor as root" not in line]  # fmt: skip
    assert warnings == []
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
