"""contrib/relay's systemd units pass `systemd-analyze verify` (installed by `make system-deps`;
it needs no running systemd, so it runs in a container too), and their ExecStart gives the relay
only options it has."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

CONTRIB = ROOT / "contrib" / "relay"
UNITS = {"aegis-relay@.service": "aegis-relay@8765.service",
         "aegis-relay.service": "aegis-relay.service"}


def _exec_start(unit: Path) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    return str(line).split()


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_verifies(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian: systemd; make system-deps)")
    # An offline root: the system's own units (the targets a unit is ordered after), the unit
    # under test, and an executable where ExecStart expects the installed relay (verify checks
    # that it exists; what it accepts is checked below).
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(CONTRIB / name, root / "etc/systemd/system" / name)
    binary = root / _exec_start(CONTRIB / name)[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    r = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", UNITS[name]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(UNITS))
def test_exec_start_uses_only_relay_options(name: str) -> None:
    helptext = subprocess.run([sys.executable, "-m", "relay.main", "--help"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    options = [w.split("=")[0] for w in _exec_start(CONTRIB / name) if w.startswith("--")]
    assert options
    assert [o for o in options if not re.search(rf"{re.escape(o)}\b", helptext)] == []
