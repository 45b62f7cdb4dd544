"""README.md's first conversation, run as a newcomer would type it.

The blocks marked `<!-- quickstart... -->` are run by bash exactly as written, after the
activation line of the same section, with two substitutions only: the relay's port (8765, which
may be taken on a shared machine) and the directory `/tmp/aegis-try` (a fresh one per run). The
last line of each block reads the conversation; its output must show the message once it
arrived."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## Your first conversation") :]
SECTION = SECTION[: SECTION.index("\n## ", 1)]
GROUPS = README[README.index("## Groups") :]
GROUPS = GROUPS[: GROUPS.index("\n## ", 1)]
LATER = "# a moment later: "


def block(marker: str, section: str = SECTION) -> list[str]:
    """The lines of the ```sh block that follows the marker comment."""
    m = re.search(r"<!-- " + re.escape(marker) + r":[^\n]*-->\n```sh\n(.*?)```", section, re.S)
    assert m, f"README.md has no block marked {marker}"
    return [line for line in m.group(1).splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_first_conversation_works_as_written(tmp_short: Path) -> None:
    activate = re.search(r"```sh\n(\. \.venv/bin/activate)[^\n]*\n```", SECTION)
    assert activate, "the section starts by activating the venv"
    assert (ROOT / ".venv" / "bin" / "activate").exists(), "make demo makes .venv"
    first, bot = block("quickstart"), block("quickstart-bot")
    group = block("quickstart-group", GROUPS)
    port, base = str(free_port()), str(tmp_short / "try")

    def as_run(lines: list[str]) -> list[str]:
        return [line.replace("/tmp/aegis-try", base).replace("8765", port) for line in lines]

    def script(lines: list[str]) -> str:
        # `$!` after each block: the job it left in the background, to end it afterwards.
        return "\n".join(["set -e", activate.group(1), *lines, 'echo "$!" >> "$PIDS"'])

    env = {k: v for k, v in os.environ.items() if k not in ("AEGIS_HOME", "VIRTUAL_ENV")}
    env["PIDS"] = str(tmp_short / "pids")
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a newcomer's PATH: no venv on it

    def run(lines: list[str]) -> None:
        # Output to a file, not a pipe: the jobs left in the background keep theirs open.
        log = tmp_short / "out.log"
        with log.open("w") as out:
            done = subprocess.run(
                ["bash", "-c", script(lines)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        assert done.returncode == 0, log.read_text()

    def read_until(line: str, want: str) -> None:
        deadline, out = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["bash", "-c", "\n".join([activate.group(1), line])],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            out = done.stdout + done.stderr
            if done.returncode == 0 and want in out:
                return
            time.sleep(0.5)
        raise AssertionError(f"{line!r} never showed {want!r}: {out}")

    try:
        *steps, check = as_run(first)
        run(steps)
        assert "# a moment later: Alice: hi Bob" in check
        read_until(check.split("#")[0], "Alice: hi Bob")
        *steps, check = as_run(bot)
        run(steps)
        assert "# a moment later: bot: echo: ping" in check
        read_until(check.split("#")[0], "bot: echo: ping")
        # Groups, on the same profiles: each "a moment later" line is read until it shows
        # what its comment says; the lines between run as written.
        assert sum(LATER in line for line in group) == 3
        steps = []
        for line in as_run(group):
            if LATER in line:
                run(steps)
                steps = []
                command, want = line.split(LATER)
                read_until(command.split("  #")[0], want.strip())
            else:
                steps.append(line)
        assert not steps, "the group walkthrough ends by reading the messages"
    finally:
        for name in ("alice", "bob", "bot"):
            home = Path(base) / name
            if home.exists():
                subprocess.run(
                    [str(ROOT / ".venv" / "bin" / "aegis"), "stop", "--home", str(home)],
                    capture_output=True,
                    timeout=60,
                )
        pids = tmp_short / "pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)


def test_the_echo_bot_runs_from_a_clone_without_the_venv(tmp_short: Path) -> None:
    """`python3 contrib/echo_bot.py` with the system's python, nothing installed: it takes the
    client library from the clone, and says plainly that no daemon runs for the profile."""
    base = getattr(__import__("sys"), "_base_executable", None)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run(
        [base, "-c", "import aegis_client"], capture_output=True, env=env, cwd=tmp_short
    )
    assert probe.returncode != 0, "the base interpreter must not have AegisLink installed"
    done = subprocess.run(
        [base, str(ROOT / "contrib" / "echo_bot.py"), "--home", str(tmp_short / "none")],
        cwd=tmp_short,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ModuleNotFoundError" not in done.stderr, done.stderr
    assert done.returncode != 0 and "daemon" in done.stderr.lower(), done.stderr
