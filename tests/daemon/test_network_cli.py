"""Network modes through the CLI, with a real daemon and a real managed Tor (issue 12).

The daemons here run Tor against a "network" of one dead directory authority on 127.0.0.1:9
(AEGISD_TOR_EXTRA_TORRC, honoured with --test-methods only): Tor starts, is controlled,
reports bootstrap progress and never gets past "connecting", and nothing leaves loopback. The
messaging through a working private Tor network is tests/functional/test_tor.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import Client
from tests.support.procs import child, tor_control

from .conftest import DaemonProc

ONION = "ws://" + "b" * 56 + ".onion/v1/ws"
FP = "0123456789ABCDEF0123456789ABCDEF01234567"
BRIDGE = f"obfs4 127.0.0.1:9 {FP} cert=AAAA iat-mode=0"
DEAD_NETWORK = (  # DirAuthority lines replace the real network's authorities and mirrors
    "TestingTorNetwork 1\n"
    f"DirAuthority dead orport=9 no-v2 v3ident={FP} 127.0.0.1:9 {FP}\n"
    "UseDefaultFallbackDirs 0\n"
)
NO_TOR = (  # the CLI as on a machine without a tor program
    "import sys, aegisd.netmode as n; n.TOR_CANDIDATES = (); "
    "from aegis_cli.main import main; sys.argv[0] = 'aegis'; main()"
)


def aegis(*args: str, env: dict[str, str] | None = None, no_tor: bool = False) -> Any:
    argv = [sys.executable, "-c", NO_TOR] if no_tor else [sys.executable, "-m", "aegis_cli.main"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=env, timeout=60,
                          check=False)  # fmt: skip


def wait_for(pred: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_init_without_tor_refuses_with_how_to_install(short_tmp: Path) -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    home = short_tmp / "h"
    r = aegis("init", "--home", str(home), "--no-passphrase", "--relay",
              "wss://relay.example.org/v1/ws", env=env, no_tor=True)  # fmt: skip
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in ("apt install tor", "dnf install tor", "pacman -S tor", "brew install tor",
                   "--direct", "IP address"):  # fmt: skip
        assert needle in lines[0]
    assert not (home / "keyring.json").exists()
    # A relay on loopback needs no Tor; --direct is the knowing choice for a remote one.
    r = aegis("init", "--home", str(short_tmp / "l"), "--no-passphrase", "--relay",
              "ws://127.0.0.1:9/v1/ws", env=env, no_tor=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = aegis("init", "--home", str(home), "--no-passphrase", "--direct", "--relay",
              "wss://relay.example.org/v1/ws", env=env, no_tor=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # An onion relay cannot be reached directly.
    r = aegis("init", "--home", str(short_tmp / "o"), "--no-passphrase", "--direct",
              "--relay", ONION)  # fmt: skip
    assert r.returncode == 1 and "only be reached through Tor" in r.stderr
    r = aegis("init", "--home", str(short_tmp / "o"), "--no-passphrase", "--tor", "--proxy",
              "socks5://127.0.0.1:9050")  # fmt: skip
    assert r.returncode == 2 and "exclude each other" in r.stderr


class TorDaemon:
    def __init__(self, tmp: Path, relay: str, *init_args: str) -> None:
        self.home = tmp / "d"
        r = aegis("init", "--home", str(self.home), "--no-passphrase", "--relay", relay, *init_args)
        assert r.returncode == 0, r.stderr
        torrc = tmp / "dead.torrc"
        torrc.write_text(DEAD_NETWORK)
        env = {**os.environ, "AEGISD_TOR_EXTRA_TORRC": str(torrc)}
        self.proc = DaemonProc(self.home, ["--test-methods"], env)
        self.proc.wait_ready()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with Client(self.home / "aegisd.sock", timeout=20) as c:
            return c.call(method, params)

    def cli(self, *args: str) -> Any:
        return aegis(*args, "--home", str(self.home))

    def tor(self) -> dict[str, Any]:
        return dict(self.call("status")["network"]["tor"] or {})

    def tor_pid(self) -> int | None:
        """The managed Tor: the daemon's child process named tor."""
        return child(self.proc.proc.pid, "tor")

    def control(self, line: str) -> list[str]:
        return tor_control(self.home, line)


@pytest.fixture
def tor_daemon(short_tmp: Path) -> Any:
    made: list[TorDaemon] = []

    def make(relay: str, *init_args: str) -> TorDaemon:
        d = TorDaemon(short_tmp, relay, *init_args)
        made.append(d)
        return d

    yield make
    for d in made:
        d.proc.stop()


def test_managed_tor_life_cycle(tor_daemon: Any) -> None:
    d = tor_daemon(ONION)  # an onion relay: mode tor by default
    tor = wait_for(lambda: d.tor().get("state") == "bootstrapping" and d.tor(), "bootstrap")
    assert tor["progress"] >= 0
    st = d.call("status")
    assert st["network"]["mode"] == "tor" and st["relay"]["connected"] is False
    assert st["relay"]["reason"].startswith("Tor is bootstrapping")
    r = d.cli("status")
    assert "network: tor (Tor is bootstrapping" in r.stdout, r.stdout
    events = d.call("events.list", {"types": ["tor.*"]})["events"]
    assert events and events[0]["type"] == "tor.bootstrap" and "progress" in events[0]["data"]
    # The running Tor is configured as documented: SOCKS on loopback with isolation by
    # credentials, safe logging, owned by the daemon.
    pid = wait_for(d.tor_pid, "the tor process")
    socks = d.control("GETINFO net/listeners/socks")[0]
    assert socks.startswith('net/listeners/socks="127.0.0.1:')
    assert d.control("GETCONF SafeLogging") == ["SafeLogging=1"]
    assert "IsolateSOCKSAuth" in d.control("GETCONF SocksPort")[0]
    assert oct((d.home / "tor").stat().st_mode & 0o777) == "0o700"
    # Killed: status says why, and the daemon starts it again.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "killed by signal 9" in (d.tor().get("reason") or ""), "the reason")
    failed = d.call("events.list", {"types": ["tor.failed"]})["events"]
    assert failed and "killed by signal 9" in failed[-1]["data"]["reason"]
    new_pid = wait_for(lambda: (p := d.tor_pid()) not in (None, pid) and p, "a new tor")
    assert d.call("status")["relay"]["connected"] is False
    # Stopping the daemon stops Tor.
    d.proc.stop()
    wait_for(lambda: not Path(f"/proc/{new_pid}").exists(), "tor to exit with the daemon")


def test_network_and_relay_settings(tor_daemon: Any) -> None:
    d = tor_daemon(ONION)
    r = d.cli("network", "--mode", "direct")
    assert r.returncode == 1 and "only be reached through Tor" in r.stderr
    r = d.cli("network", "--mode", "proxy")
    assert r.returncode == 1 and "needs a proxy" in r.stderr
    # Bridges reach the running Tor's configuration, through obfs4proxy.
    r = d.cli("network", "--bridge", BRIDGE, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bridges"] == [BRIDGE]
    wait_for(lambda: d.tor_pid() and d.tor().get("state") == "bootstrapping", "tor restarted",
             timeout=90)  # a loaded machine: Tor's restart with obfs4proxy can be slow
    assert d.control("GETCONF UseBridges") == ["UseBridges=1"]
    assert d.control("GETCONF Bridge") == [f"Bridge={BRIDGE}"]
    assert "obfs4proxy" in d.control("GETCONF ClientTransportPlugin")[0]
    # ... and Tor runs the plugin (it tries the bridge at 127.0.0.1:9, which refuses).
    wait_for(lambda: child(d.tor_pid() or 0, "obfs4proxy"), "obfs4proxy under Tor")
    assert not (d.home / "tor" / "torrc").exists()  # the bridge lines never lie on disk
    r = d.cli("network", "--bridge", "obfs4 127.0.0.1:9 cert=x\nControlPort 9051")
    assert r.returncode == 1 and "--bridge (the 1st): " in r.stderr  # the option, not the param
    r = d.cli("network", "--no-bridges", "--json")
    assert json.loads(r.stdout)["bridges"] == []
    # relay set: a loopback relay with no chosen mode is reached directly, and Tor stops.
    tor_pid = d.tor_pid()
    r = d.cli("relay", "set", "ws://127.0.0.1:9/v1/ws", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "direct"
    assert d.call("status")["network"] == {"mode": "direct", "tor": None}
    wait_for(lambda: not Path(f"/proc/{tor_pid}").exists(), "tor to stop")
    r = d.cli("relay", "set", "ws://relay.example.org/v1/ws")
    assert r.returncode == 1 and "ws:// is plaintext" in r.stderr
    # The proxy mode and its settings; then tor chosen explicitly for a loopback relay.
    r = d.cli("network", "--proxy", "socks5://127.0.0.1:1", "--json")
    net = json.loads(r.stdout)
    assert (net["mode"], net["proxy"], net["isolation"]) == ("proxy", "socks5://127.0.0.1:1", True)
    r = d.cli("network", "--mode", "tor", "--isolation", "off", "--json")
    net = json.loads(r.stdout)
    assert (net["mode"], net["mode_chosen"], net["isolation"]) == ("tor", True, False)
    assert d.call("status")["network"]["tor"] is not None
    r = d.cli("network")
    assert "mode: tor" in r.stdout and "isolation: off" in r.stdout

