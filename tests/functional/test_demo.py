"""`make demo` (python -m aegisd.demo): a real relay, two real daemons, the CLI; run whole."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from aegisd.demo import LIVE_CONVERSATION, OFFLINE_TEXT


def test_demo_runs_end_to_end() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "aegisd.demo"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    # The tails, whole: pytest shortens a tuple's repr, which hid why a run under load failed.
    assert r.returncode == 0, f"stdout: ...{r.stdout[-2000:]}\nstderr: ...{r.stderr[-2000:]}"
    out = r.stdout
    # Both directions, and the message held by the relay while bob was offline.
    conversation = out.split("7. The conversation")[1]
    for _sender, _receiver, text in LIVE_CONVERSATION:
        first_line = text.splitlines()[0]
        assert conversation.count(first_line) == 2  # on alice's side and on bob's
    assert conversation.count(OFFLINE_TEXT) == 2
    assert "me -> bob: Hi Bob!" in conversation and "me -> alice: Hi Alice." in conversation
    # Both safety numbers: twelve groups of five digits each, equal.
    numbers = re.findall(r"Safety number with \w+:\n((?:\s+\d{5}(?: \d{5}){3}\n){3})", out)
    assert len(numbers) == 2
    assert re.sub(r"\s", "", numbers[0]) == re.sub(r"\s", "", numbers[1])
    assert "safety numbers match: True" in out
    # The relay: files listed, one opaque block held, no text found.
    assert "relay.sqlite3" in out and "stored block 1: 16," in out
    assert "not found" in out
    base = re.search(r"Everything lives under (\S+) ", out)
    assert base is not None and not Path(base.group(1)).exists()
    # It ends by saying how to go on: the CLI is in .venv/bin, which the README takes up.
    assert ". .venv/bin/activate" in out.split("Stopped what the demo started")[0]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "Your first conversation, on one machine" in readme


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored and children inherit that; the demo
    # must see Ctrl-C however the suite was launched.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_interrupted_stops_everything() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegisd.demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until both daemons run, then Ctrl-C
        lines.append(line)
        if "bob$ aegis name bob" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (lines, out, err)
    assert "interrupted" in err
    base = re.search(r"Everything lives under (\S+) ", "".join(lines))
    assert base is not None
    deadline = time.monotonic() + 10
    while Path(base.group(1)).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(base.group(1)).exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert base.group(1) not in ps  # no relay or daemon of this run left
