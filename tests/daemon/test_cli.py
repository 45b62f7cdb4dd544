"""The `aegis` CLI as a user runs it: real processes, real daemon."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import FAST_KDF_ARGS, PASSPHRASE

FORBIDDEN = ("cryptography", "nacl", "sqlcipher3", "aiohttp", "aiortc", "argon2", "jsonrpcserver")


def aegis(*args, env=None, input=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        input=input,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def home(short_tmp, cli_env):
    h = short_tmp / "h"
    pf = short_tmp / "pf"
    pf.write_text(PASSPHRASE + "\n")
    r = aegis("init", "--home", str(h), "--passphrase-file", str(pf), *FAST_KDF_ARGS, env=cli_env)
    assert r.returncode == 0, r.stderr
    yield h
    # Stop a daemon a test left running, by its pid.
    pid_file = h / "aegisd.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), 9)


def one_line_error(r, code=1):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("aegis: error: ")
    return lines[0]


def test_full_life_cycle(home, short_tmp, cli_env):
    h = str(home)
    pf = str(short_tmp / "pf")
    line = one_line_error(aegis("status", "--home", h, env=cli_env), 3)
    assert "not running" in line and f"aegis daemon --home {h}" in line
    r = aegis("daemon", "--detach", "--home", h, env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "locked" in r.stdout
    one_line_error(aegis("daemon", "--detach", "--home", h, env=cli_env))  # already running
    r = aegis("status", "--home", h, "--json", env=cli_env)
    st = json.loads(r.stdout)
    assert st["locked"] is True and st["has_passphrase"] is True
    assert st["relay"]["configured"] is None and st["relay"]["reason"] == "locked"
    r = aegis("status", "--home", h, env=cli_env)
    assert "relay: unknown while locked" in r.stdout and "not configured" not in r.stdout
    # Unlock: no terminal and no file is a clear error, not a hang.
    line = one_line_error(aegis("unlock", "--home", h, env=cli_env, input=""))
    assert "--passphrase-file" in line
    wrong = short_tmp / "wrong"
    wrong.write_text("nope\n")
    line = one_line_error(aegis("unlock", "--home", h, "--passphrase-file", str(wrong)))
    assert line == "aegis: error: wrong passphrase"
    r = aegis("unlock", "--home", h, "--passphrase-file", "-", input=PASSPHRASE + "\n")
    assert r.returncode == 0 and r.stdout.strip() == "unlocked"
    r = aegis("lock", "--home", h, "--json", env=cli_env)
    assert json.loads(r.stdout) == {"locked": True}
    new = short_tmp / "new"
    weak = short_tmp / "weak"
    weak.write_text("Summer2024!!\n")
    line = one_line_error(aegis(
        "passphrase", "--home", h, "--old-passphrase-file", pf, "--new-passphrase-file", str(weak)
    ))  # fmt: skip
    assert "too weak" in line and "Summer2024" not in line
    new.write_text("velvet orbit lantern zebra\n")
    r = aegis(
        "passphrase", "--home", h, "--old-passphrase-file", pf, "--new-passphrase-file", str(new)
    )
    assert r.returncode == 0, r.stderr
    one_line_error(aegis("unlock", "--home", h, "--passphrase-file", pf))
    assert aegis("unlock", "--home", h, "--passphrase-file", str(new)).returncode == 0
    r = aegis("stop", "--home", h, env=cli_env)
    assert r.returncode == 0 and "stopped" in r.stdout
    one_line_error(aegis("stop", "--home", h, env=cli_env), 3)
    for out in (r.stdout, r.stderr):
        assert PASSPHRASE not in out


def test_json_errors_and_usage_errors(home, cli_env):
    r = aegis("status", "--home", str(home), "--json", env=cli_env)
    assert r.returncode == 3
    err = json.loads(r.stdout)["error"]
    assert err["data"] == {"error": "not_running"} and "aegis daemon" in err["message"]
    one_line_error(aegis("frobnicate"), 2)
    one_line_error(aegis("status", "--bogus"), 2)
    line = one_line_error(aegis("init", "--home", str(home), "--no-passphrase"))
    assert "already exists" in line


def test_aegis_home_environment_variable(home, cli_env):
    env = dict(cli_env, AEGIS_HOME=str(home))
    r = aegis("daemon", "--detach", env=env)
    assert r.returncode == 0, r.stderr
    assert (home / "aegisd.sock").exists()
    assert aegis("stop", env=env).returncode == 0


def test_init_no_passphrase_then_daemon_starts_unlocked(short_tmp, cli_env):
    h = str(short_tmp / "np")
    r = aegis("init", "--home", h, "--no-passphrase", "--json", env=cli_env)
    assert json.loads(r.stdout) == {"has_passphrase": False, "home": h}
    try:
        assert aegis("daemon", "--detach", "--home", h, env=cli_env).returncode == 0
        st = json.loads(aegis("status", "--home", h, "--json").stdout)
        assert st["locked"] is False
        line = one_line_error(aegis("lock", "--home", h))
        assert "no passphrase" in line
        # A passphrase file for a profile without a passphrase: 1004, as docs/api.md says,
        # not "unlocked" (issue 14, item 10).
        pf = short_tmp / "pf-np"
        pf.write_text(PASSPHRASE + "\n")
        line = one_line_error(aegis("unlock", "--home", h, "--passphrase-file", str(pf)))
        assert "has no passphrase" in line
        r = aegis("unlock", "--home", h, "--passphrase-file", str(pf), "--json")
        assert r.returncode == 1
        assert '"no_passphrase"' in r.stdout  # (its nesting is item 8's, not this test's)
        assert aegis("unlock", "--home", h).stdout.strip() == "unlocked"
    finally:
        aegis("stop", "--home", h)


def test_daemon_without_profile_names_init(short_tmp, cli_env):
    h = str(short_tmp / "none")
    line = one_line_error(aegis("daemon", "--home", h, env=cli_env))
    assert f"aegis init --home {h}" in line


def test_cli_imports_no_crypto_and_no_daemon_internals(home, cli_env):
    """Run real CLI commands in a fresh interpreter and look at sys.modules afterwards."""
    h = str(home)
    assert aegis("daemon", "--detach", "--home", h, env=cli_env).returncode == 0
    try:
        probe = textwrap.dedent(
            f"""
            import json, sys
            from aegis_cli.main import main
            for argv in (["status", "--home", {h!r}, "--json"], ["lock", "--home", {h!r}],
                         ["send", "bob", "hi", "--home", {h!r}],
                         ["messages", "bob", "--home", {h!r}],
                         ["backup", "export", "/nonexistent/b.bak", "--home", {h!r}],
                         ["status", "--home", "/nonexistent"]):
                try:
                    main(argv)
                except SystemExit:
                    pass
            print(json.dumps(sorted(sys.modules)))
            """
        )
        r = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env, check=False
        )
        modules = json.loads(r.stdout.strip().splitlines()[-1])
        assert "aegis_cli.main" in modules and "click" in modules
        bad = [m for m in modules if m.split(".")[0] in FORBIDDEN]
        assert bad == []
        # Only the standard-library-only modules shared with thin clients.
        shared = {"aegisd.paths", "aegisd.relayurl", "aegisd.secretfile"}
        internals = [m for m in modules if m.startswith("aegisd.") and m not in shared]
        assert internals == []
    finally:
        aegis("stop", "--home", h)


def test_daemon_in_the_foreground_is_aegisd_itself(home, cli_env):
    """`aegis daemon` execs aegisd: signals reach it directly, and it logs to stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "daemon", "--home", str(home)],
        stderr=subprocess.PIPE,
        env=cli_env,
    )
    try:
        for _ in range(1500):
            if aegis("status", "--home", str(home)).returncode == 0:
                break
            assert proc.poll() is None
        st = json.loads(aegis("status", "--home", str(home), "--json").stdout)
        assert st["pid"] == proc.pid
        proc.terminate()
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        assert "listening on" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_listen_streams_events(short_tmp, cli_env):
    h = str(short_tmp / "np")
    assert aegis("init", "--home", h, "--no-passphrase", env=cli_env).returncode == 0
    assert aegis("daemon", "--detach", "--test-methods", "--home", h).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "listen", "--home", h, "--json", "--since", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["type"] == "daemon.unlocked" and first["seq"] == 1
        from aegis_cli.client import Client

        with Client(f"{h}/aegisd.sock") as c:
            c.call("debug.emit", {"type": "debug.hello", "data": {"n": 1}})
        ev = json.loads(proc.stdout.readline())
        assert ev["type"] == "debug.hello" and ev["data"] == {"n": 1} and ev["seq"] == 2
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        aegis("stop", "--home", h)


def test_init_with_relay_url(short_tmp, cli_env):
    h = str(short_tmp / "r")
    line = one_line_error(
        aegis("init", "--home", h, "--no-passphrase", "--relay", "ws://relay.example")
    )
    assert "--insecure-plaintext-relay" in line
    line = one_line_error(aegis("init", "--home", h, "--no-passphrase", "--relay", "http://x"))
    assert "wss://" in line
    assert not (short_tmp / "r").exists()
    r = aegis("init", "--home", h, "--no-passphrase", "--relay", "ws://127.0.0.1:8765/")
    assert r.returncode == 0, r.stderr
    try:
        assert aegis("daemon", "--detach", "--home", h).returncode == 0
        st = json.loads(aegis("status", "--home", h, "--json").stdout)
        reason = st["relay"].pop("reason")
        assert st["relay"] == {
            "configured": True,
            "connected": False,
            "url": "ws://127.0.0.1:8765/",
        }
        assert reason in ("connecting", "relay unreachable")
        assert "ws://127.0.0.1:8765/ (not connected)" in aegis("status", "--home", h).stdout
    finally:
        aegis("stop", "--home", h)


def test_init_refuses_a_weak_passphrase_file(short_tmp, cli_env):
    """Issue 14, item 12: the profile passphrase follows the backup's rule (it accepted "x")."""
    h = short_tmp / "weak"
    pf = short_tmp / "pf-weak"
    for weak in ("x", "abc", "password1234"):
        pf.write_text(weak + "\n")
        line = one_line_error(aegis("init", "--home", str(h), "--passphrase-file", str(pf),
                                    *FAST_KDF_ARGS, env=cli_env))  # fmt: skip
        assert "too weak" in line and "10^12" in line
        assert not (h / "keyring.json").exists()
    # aegisd init (what `aegis init` runs) applies the same rule to an API-level caller.
    r = subprocess.run(
        [sys.executable, "-m", "aegisd.main", "init", "--home", str(h), "--passphrase-file", "-",
         *FAST_KDF_ARGS],
        input="password1234\n", capture_output=True, text=True, check=False, env=cli_env,
    )  # fmt: skip
    assert r.returncode == 1 and "too weak" in r.stderr and "password1234" not in r.stderr
    assert not (h / "keyring.json").exists()


def test_a_weak_profile_passphrase_still_unlocks_and_is_told(spawn, short_tmp):
    """Issue 14, item 12: a profile made before the rule keeps working, and says so."""
    d = spawn(passphrase="abc")
    h = str(d.home)
    pf = short_tmp / "pf-abc"
    pf.write_text("abc\n")
    r = aegis("unlock", "--home", h, "--passphrase-file", str(pf))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "unlocked",
        "your passphrase is weak: change it with: aegis passphrase",
    ]
    r = aegis("status", "--home", h)
    assert "passphrase: yes (your passphrase is weak: change it with: aegis passphrase)" in r.stdout
    assert json.loads(aegis("status", "--home", h, "--json").stdout)["weak_passphrase"] is True
    d.stop()
    assert "weak" not in d.stderr()  # never on disk: the log must not point at weak profiles
