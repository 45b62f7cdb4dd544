"""The `aegis` CLI as a user runs it: real processes, real daemon."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

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


def json_error(r, code):
    """The one shape of a JSON error: {"error": JSON-RPC error object}, alone on stdout."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"code", "message", "data"}, err
    assert isinstance(err["code"], int) and isinstance(err["message"], str)
    assert isinstance(err["data"], dict) and isinstance(err["data"]["error"], str)
    return err


def test_json_errors_and_usage_errors(home, cli_env):
    r = aegis("status", "--home", str(home), "--json", env=cli_env)
    err = json_error(r, 3)
    assert err["code"] == 2002 and err["data"] == {"error": "not_running"}
    assert "aegis daemon" in err["message"]
    err = json_error(aegis("status", "--bogus", "--json", env=cli_env), 2)
    assert err["code"] == 2001 and err["data"] == {"error": "usage"}
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
            "url": "ws://127.0.0.1:8765/v1/ws",  # "/" (or no path) means the relay's /v1/ws
            "refusing": None,
        }
        assert reason in ("connecting", "relay unreachable",
                          "connection refused: nothing listens at the relay's address and port")
        # The reason is in the plain output too (the errors say "aegis status shows why").
        line = aegis("status", "--home", h).stdout.splitlines()[2]
        reason = json.loads(aegis("status", "--home", h, "--json").stdout)["relay"]["reason"]
        assert line == f"relay: ws://127.0.0.1:8765/v1/ws (not connected: {reason})"
        assert aegis("relay", "show", "--home", h).stdout.strip() == line
    finally:
        aegis("stop", "--home", h)


def test_global_options_before_or_after_the_command(home, short_tmp, cli_env):
    """--home and --json work before the command's name (as with git) as well as after it."""
    h = str(home)
    assert aegis("--home", h, "daemon", "--detach", env=cli_env).returncode == 0
    try:
        for args in (
            ("--home", h, "--json", "status"),
            ("--json", "--home", h, "status"),
            ("--home", h, "status", "--json"),
            ("status", "--home", h, "--json"),
            ("--json", "status", "--home", h),
            ("--home", h, "status", "--home", h, "--json"),  # the same directory twice is fine
        ):
            r = aegis(*args, env=cli_env)
            assert r.returncode == 0, (args, r.stderr)
            assert json.loads(r.stdout)["locked"] is True
        r = aegis("--home", h, "status", env=cli_env)
        assert r.returncode == 0 and r.stdout.startswith("aegisd ")
        # Between a group and its command too (aegis relay --home DIR show), as with git.
        for args in (
            ("relay", "--home", h, "--json", "show"),
            ("--json", "relay", "--home", h, "show"),
            ("relay", "--json", "show", "--home", h),
        ):
            r = aegis(*args, env=cli_env)
            assert r.returncode == 0, (args, r.stderr)
            assert json.loads(r.stdout)["configured"] is None  # locked: unknown
        r = aegis("relay", "--home", h, "show", env=cli_env)
        assert r.returncode == 0 and "unknown while locked" in r.stdout
        line = one_line_error(aegis("relay", "--home", "/x", "show", "--home", h, env=cli_env), 2)
        assert "--home is given twice" in line
        # --home on the command line wins over AEGIS_HOME, in either place.
        env = dict(cli_env, AEGIS_HOME=str(short_tmp / "elsewhere"))
        assert aegis("--home", h, "status", env=env).returncode == 0
        assert aegis("status", "--home", h, env=env).returncode == 0
        assert aegis("status", env=env).returncode == 3
        # Two different profiles: refused as a usage error, not one silently chosen.
        line = one_line_error(aegis("--home", h, "status", "--home", str(short_tmp), env=env), 2)
        assert "--home is given twice" in line
        err = json_error(aegis("--json", "--home", h, "lock", "--home", "/x", env=cli_env), 2)
        assert "--home is given twice" in err["message"]
        assert aegis("--home", h, "stop", env=cli_env).returncode == 0
    finally:
        aegis("stop", "--home", h)


def test_daemon_errors_keep_their_json_rpc_object(short_tmp, cli_env):
    """With --json, a daemon error is printed as the object the daemon sent (no nesting)."""
    h = str(short_tmp / "np")
    assert aegis("init", "--home", h, "--no-passphrase", env=cli_env).returncode == 0
    assert aegis("daemon", "--detach", "--home", h, env=cli_env).returncode == 0
    try:
        from aegis_cli.client import Client, RpcCallError

        with Client(f"{h}/aegisd.sock") as c, pytest.raises(RpcCallError) as sent:
            c.call("lock")
        err = json_error(aegis("lock", "--home", h, "--json", env=cli_env), 1)
        assert err == sent.value.to_object()
        assert err["code"] == 1004 and err["data"]["error"] == "no_passphrase"
        line = one_line_error(aegis("lock", "--home", h, env=cli_env))
        assert line == f"aegis: error: {err['message']}"
    finally:
        aegis("stop", "--home", h)


def _summaries(help_text):
    """The (name, summary) pairs of the Commands: section, wrapped lines joined."""
    out, section = [], False
    for line in help_text.splitlines():
        if line.strip() == "Commands:":
            section = True
            continue
        if not section or not line.strip():
            continue
        if line.startswith("  ") and not line.startswith("   "):
            name, _, summary = line.strip().partition(" ")
            out.append([name, summary.strip()])
        else:
            out[-1][1] += " " + line.strip()
    return out


@pytest.mark.parametrize("columns", ["60", "80", "200"])
def test_help_summaries_are_whole_sentences(columns, cli_env):
    env = dict(cli_env, COLUMNS=columns)
    top = aegis("--help", env=env)
    assert top.returncode == 0
    groups = {"contact", "attachment", "relay", "backup"}
    for args in [(), *((g,) for g in sorted(groups))]:
        r = aegis(*args, "--help", env=env)
        pairs = _summaries(r.stdout)
        assert pairs, r.stdout
        for name, summary in pairs:
            assert not summary.endswith("..."), (args, name, summary)
            assert summary.endswith("."), (args, name, summary)
    assert {"listen", "status", "send"} <= {n for n, _ in _summaries(top.stdout)}


def test_listen_survives_a_daemon_restart(short_tmp, cli_env):
    """`aegis listen` waits for a restarted daemon and goes on from the last event it printed,
    also for events that happened before it reconnected; each line is time, who, what."""
    h = str(short_tmp / "np")
    assert aegis("init", "--home", h, "--no-passphrase", env=cli_env).returncode == 0
    assert aegis("daemon", "--detach", "--test-methods", "--home", h).returncode == 0
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-m", "aegis_cli.main", "listen", "--home", h, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env,
        )
        for mode, extra in (("json", ("--json", "--since", "0")), ("text", ("--since", "1")))
    }
    from aegis_cli.client import Client

    def emit(n):
        with Client(f"{h}/aegisd.sock") as c:
            c.call("debug.emit", {"type": "debug.hello", "data": {"n": n}})

    try:
        j, t = procs["json"], procs["text"]
        assert json.loads(j.stdout.readline())["type"] == "daemon.unlocked"
        emit(1)
        assert json.loads(j.stdout.readline())["data"] == {"n": 1}
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  debug\.hello \{\"n\": 1\}\n",
                            t.stdout.readline())
        assert aegis("stop", "--home", h).returncode == 0
        for p in procs.values():
            assert "lost the connection to the daemon" in p.stderr.readline()
            assert p.poll() is None  # still running, waiting for the daemon
        assert aegis("daemon", "--detach", "--test-methods", "--home", h).returncode == 0
        emit(2)  # at once: listen may not be back yet, and must not miss it
        seen = [json.loads(j.stdout.readline()) for _ in range(3)]
        assert [(e["type"], e["data"]) for e in seen] == [
            ("daemon.locked", {}), ("daemon.unlocked", {}), ("debug.hello", {"n": 2})
        ]
        assert [e["seq"] for e in seen] == [3, 4, 5]  # after n=1 (seq 2): none twice or missed
        assert all(set(e) == {"seq", "type", "time_ms", "data"} for e in seen)
        for p in procs.values():
            assert "the daemon is back; continuing after event" in p.stderr.readline()
        lines = [t.stdout.readline() for _ in range(3)]
        assert [ln.split("  ", 1)[1] for ln in lines] == [
            "daemon: locked\n", "daemon: unlocked\n", 'debug.hello {"n": 2}\n'
        ]
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()
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


def test_a_profile_without_a_relay_points_at_relay_set(short_tmp, cli_env):
    """Issue 14, item 1: nothing may send a user to `aegis init` once a profile exists (init
    refuses then); a missing profile is named as such, not as a daemon to start."""
    h = str(short_tmp / "norelay")
    line = one_line_error(aegis("status", "--home", h, env=cli_env), 3)
    assert "no profile in" in line and "aegis init" in line
    r = aegis("init", "--home", h, "--no-passphrase", env=cli_env)
    assert r.returncode == 0 and "aegis relay set URL" in r.stdout
    line = one_line_error(aegis("status", "--home", h, env=cli_env), 3)
    assert "start it with: aegis daemon" in line
    assert aegis("daemon", "--detach", "--home", h, env=cli_env).returncode == 0
    try:
        line = one_line_error(aegis("invite", "--home", h, env=cli_env))
        assert "aegis relay set URL" in line and "aegis init" not in line
        # A typed relay URL in the user's words: the option's sentence, the path's rule.
        line = one_line_error(aegis("relay", "set", "ftp://x", "--home", h, env=cli_env))
        assert line.startswith("aegis: error: the relay URL must start with wss://"), line
        line = one_line_error(aegis("relay", "set", "ws://127.0.0.1:1/ws", "--home", h,
                                    env=cli_env))  # fmt: skip
        assert "must end in /v1/ws" in line
        # Ctrl-C is how `aegis listen` ends: exit 0, no error line.
        listen = subprocess.Popen(
            [sys.executable, "-m", "aegis_cli.main", "listen", "--home", h], env=cli_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        time.sleep(5)  # past its start-up (about 0.2 s): subscribed or reconnecting
        listen.send_signal(signal.SIGINT)
        _out, err = listen.communicate(timeout=30)
        assert listen.returncode == 0 and "error" not in err, (listen.returncode, err)
    finally:
        aegis("stop", "--home", h, env=cli_env)
