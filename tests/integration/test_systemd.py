"""Socket activation (LISTEN_FDS/LISTEN_PID, fd 3) and readiness (READY=1 on NOTIFY_SOCKET),
each with a real socket handed to a real aegisd process; and the units in contrib/systemd."""

from __future__ import annotations

import configparser
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aegis_cli.client import Client
from aegisd.store import create_profile

ROOT = Path(__file__).resolve().parents[2]

# Plays systemd's part between fork and exec: the socket goes to fd 3, LISTEN_PID is the pid
# that will run aegisd (exec keeps it).
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "me" else "1"
os.execv(sys.executable, [sys.executable, "-m", "aegisd.main", "run", "--home", sys.argv[3]])
"""


def _profile(tmp: Path) -> Path:
    home = tmp / "p"
    create_profile(home, None).close()
    return home


def _activate(listener: socket.socket, home: Path, pid: str = "me") -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(listener.fileno()), pid, str(home)],
        pass_fds=(listener.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    return err


def _read_line(sock: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "the daemon closed the connection"
        buf += chunk
    return json.loads(buf)


def test_socket_activation(short_tmp: Path) -> None:
    home = _profile(short_tmp)
    path = short_tmp / "run" / "aegisd.sock"  # not the profile's socket: proves which is used
    path.parent.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    os.chmod(path, 0o600)
    # A client connects and asks before the daemon exists: the kernel queues it, as with
    # systemd's socket, and the daemon answers once it runs.
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.settimeout(30)
    early.connect(str(path))
    early.sendall(b'{"jsonrpc": "2.0", "method": "version", "id": 1}\n')
    proc = _activate(listener, home)
    listener.close()  # the daemon holds it now
    try:
        reply = _read_line(early)
        assert reply["result"]["api_version"] == 2
        early.close()
        with Client(path, timeout=20) as c:
            status = c.call("status")
            assert status["pid"] == proc.pid  # exec kept the pid LISTEN_PID named
        assert not (home / "aegisd.sock").exists()  # it bound nothing of its own
        with Client(path, timeout=20) as c:
            c.call("daemon.stop")
        proc.wait(20)
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    assert "(inherited)" in err
    assert path.is_socket()  # the socket's owner (systemd) removes it, not the daemon


def test_listen_pid_of_another_process_is_ignored(short_tmp: Path) -> None:
    home = _profile(short_tmp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_tmp / "other.sock"))
    listener.listen(1)
    proc = _activate(listener, home, pid="1")
    listener.close()
    try:
        deadline = time.monotonic() + 30
        while not (home / "aegisd.sock").is_socket():
            assert proc.poll() is None, _stop(proc)
            assert time.monotonic() < deadline, "aegisd did not bind its own socket"
            time.sleep(0.05)
        with Client(home / "aegisd.sock", timeout=20) as c:
            assert c.call("version")["api_version"] == 2
    finally:
        err = _stop(proc)
    assert "(inherited)" not in err


def test_inherited_descriptor_that_is_not_a_listening_socket(short_tmp: Path) -> None:
    home = _profile(short_tmp)
    a, b = socket.socketpair()  # a Unix stream socket, but not listening
    proc = _activate(a, home)
    a.close()
    proc.wait(30)
    err = _stop(proc)
    b.close()
    assert proc.returncode == 1
    assert "not a listening Unix stream socket" in err


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_notification(short_tmp: Path, kind: str) -> None:
    home = _profile(short_tmp)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        name = str(short_tmp / "notify")
        notify.bind(name)
    else:
        name = "@aegis-test-" + secrets.token_hex(8)
        notify.bind("\0" + name[1:])
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegisd.main", "run", "--home", str(home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.split("\n"), msg
        assert "STATUS=unlocked" in msg.split("\n")
        # Ready means listening: the very first connection succeeds, no retry.
        with Client(home / "aegisd.sock", timeout=20) as c:
            assert c.call("version")["api_version"] == 2
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode() == "STOPPING=1"
        proc.wait(20)
    finally:
        err = _stop(proc)
        notify.close()
    assert proc.returncode == 0, err


def test_units() -> None:
    unit_dir = ROOT / "contrib" / "systemd"

    def load(name: str) -> configparser.RawConfigParser:
        cp = configparser.RawConfigParser(strict=False)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read_string((unit_dir / name).read_text())
        return cp

    service, sock = load("aegisd.service"), load("aegisd.socket")
    svc = service["Service"]
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "on-failure"
    assert "aegisd" in svc["ExecStart"]
    for option in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "LimitCORE", "UMask"):
        assert option in svc, option
    assert sock["Socket"]["ListenStream"] == "%t/aegis/aegisd.sock"
    assert sock["Socket"]["SocketMode"] == "0600"
