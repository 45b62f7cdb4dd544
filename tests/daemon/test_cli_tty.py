"""Passphrase prompts on a real pseudo-terminal: asked for, confirmed, never echoed."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import subprocess
import sys
import time

from .conftest import FAST_KDF_ARGS

SECRET = "s3cret-typed-at-a-tty"


def _read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} in {out!r}")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child is gone
            break
        if not chunk:
            break
        out += chunk
    return out


def run_in_pty(args: list[str], answers: list[str]) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (child)
        env = {k: v for k, v in os.environ.items() if k != "AEGIS_HOME"}
        os.execve(sys.executable, [sys.executable, "-m", "aegis_cli.main", *args], env)
    out = b""
    try:
        for answer in answers:
            out += _read_until(fd, b": ")
            os.write(fd, answer.encode() + b"\r")
        out += _read_until(fd, b"\x00", timeout=30)  # everything until the child exits
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_init_unlock_passphrase_prompt_at_a_terminal(short_tmp):
    h = str(short_tmp / "t")
    code, out = run_in_pty(["init", "--home", h, *FAST_KDF_ARGS], [SECRET, SECRET])
    assert code == 0, out
    assert "New passphrase" in out and "Repeat for confirmation" in out
    assert SECRET not in out
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "daemon", "--detach", "--home", h],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    try:
        code, out = run_in_pty(["unlock", "--home", h], ["wrong guess"])
        assert code == 1 and "wrong passphrase" in out and "wrong guess" not in out
        code, out = run_in_pty(["unlock", "--home", h], [SECRET])
        assert code == 0 and "unlocked" in out and SECRET not in out
        code, out = run_in_pty(["passphrase", "--home", h], [SECRET, "another one", "another one"])
        assert code == 0 and "passphrase changed" in out
        assert SECRET not in out and "another one" not in out
        r = subprocess.run(
            [sys.executable, "-m", "aegis_cli.main", "status", "--home", h, "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert json.loads(r.stdout)["locked"] is False
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(
                [sys.executable, "-m", "aegis_cli.main", "stop", "--home", h],
                capture_output=True,
                check=False,
                timeout=30,
            )
