"""Shell completion of the `aegis` CLI, as README.md documents it, in a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AEGIS = Path(sys.executable).parent / "aegis"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PATH"] = f"{AEGIS.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(*args: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args],
        cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F _aegis_completion aegis"), ("zsh", "#compdef aegis"),
     ("fish", "complete --no-files --command aegis")],
)  # fmt: skip
def test_completion_scripts(shell: str, marker: str) -> None:
    assert marker in _run(_AEGIS_COMPLETE=f"{shell}_source")


def test_completes_commands_and_options() -> None:
    words = _run(_AEGIS_COMPLETE="bash_complete", COMP_WORDS="aegis se", COMP_CWORD="1")
    assert {"plain,send", "plain,settings"} <= set(words.split())
    assert all(w.startswith("plain,se") for w in words.split())
    words = _run(
        _AEGIS_COMPLETE="bash_complete", COMP_WORDS="aegis invite --", COMP_CWORD="2"
    )
    assert "plain,--qr" in words.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
@pytest.mark.skipif(not AEGIS.exists(), reason="the aegis console script is not installed")
def test_in_bash() -> None:
    script = (
        'eval "$(_AEGIS_COMPLETE=bash_source aegis)"\n'
        "COMP_WORDS=(aegis contact re); COMP_CWORD=2\n"
        "_aegis_completion aegis\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout  # fmt: skip
    assert {"remove", "rename"} <= set(out.split())
    assert all(w.startswith("re") for w in out.split())
