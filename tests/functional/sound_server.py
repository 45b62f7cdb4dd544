"""A real PulseAudio for the call tests, on a machine without a sound card.

Started by the tests with its own runtime directory and socket under a temporary directory (never
the user's session): each daemon gets a microphone (a sine source of its own frequency) and a
speaker (a null sink), named through PULSE_SOURCE / PULSE_SINK in its environment. What a
daemon plays is read back from its sink's monitor with parec.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

RATE = 48000


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} (Debian packages pulseaudio, pulseaudio-utils) is not installed: run "
            "`make system-deps` as root"
        )
    return path


class PulseAudio:
    """``tones`` maps a person to the frequency of their microphone; each also has a speaker."""

    def __init__(self, tmp: Path, tones: dict[str, float]) -> None:
        self.dir = tmp
        self.socket = tmp / "native"
        lines = [f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}"]
        for name, hz in tones.items():
            lines.append(f"load-module module-null-sink sink_name={name}_speaker rate={RATE}")
            lines.append(f"load-module module-sine-source source_name={name}_mic rate={RATE} "
                         f"frequency={int(hz)}")  # fmt: skip
        # A silent microphone (the monitor of a sink nothing plays to), for comparison.
        lines.append(f"load-module module-null-sink sink_name=quiet rate={RATE}")
        (tmp / "default.pa").write_text("\n".join(lines) + "\n")
        for sub in ("runtime", "state", "config"):
            (tmp / sub).mkdir(exist_ok=True)
        env = self._env()
        self.log = tmp / "pulse.log"
        # As root (CI) PulseAudio warns but runs per-user with -n and our own paths; no D-Bus,
        # no autospawn, no exit when idle.
        self.proc = subprocess.Popen(
            [_exe("pulseaudio"), "-n", "--daemonize=no", "--exit-idle-time=-1",
             "--disallow-exit", "--use-pid-file=no", "--system=no", "-F",
             str(tmp / "default.pa"), f"--log-target=file:{self.log}"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pulseaudio exited:\n{self.log_text()}")
            r = subprocess.run([_exe("pactl"), "list", "short", "sinks"], env=self.client_env(),
                               capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
            if r.returncode == 0 and "quiet" in r.stdout:
                return
            time.sleep(0.1)
        raise AssertionError(f"pulseaudio did not start:\n{self.log_text()}")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "ALSA_"))}
        env.update({
            "HOME": str(self.dir), "XDG_CONFIG_HOME": str(self.dir / "config"),
            "XDG_RUNTIME_DIR": str(self.dir / "runtime"),
            "PULSE_RUNTIME_PATH": str(self.dir / "runtime"),
            "PULSE_STATE_PATH": str(self.dir / "state"),
        })  # fmt: skip
        return env

    def client_env(self, mic: str | None = None, speaker: str | None = None) -> dict[str, str]:
        """The environment of a program that uses this server (and no other)."""
        env = self._env()
        env["PULSE_SERVER"] = f"unix:{self.socket}"
        if mic is not None:
            env["PULSE_SOURCE"] = mic
        if speaker is not None:
            env["PULSE_SINK"] = speaker
        return env

    def daemon_env(self, name: str) -> dict[str, str]:
        return self.client_env(f"{name}_mic", f"{name}_speaker")

    def listen(self, name: str, seconds: float) -> np.ndarray:
        """`seconds` of what plays on NAME's speaker (mono 16-bit samples)."""
        want = int(RATE * seconds) * 2
        proc = subprocess.Popen(
            [_exe("parec"), "--raw", "--format=s16le", f"--rate={RATE}", "--channels=1",
             "-d", f"{name}_speaker.monitor", "--latency-msec=50"],
            env=self.client_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None
        data = bytearray()
        try:
            while len(data) < want:
                chunk = proc.stdout.read(want - len(data))
                if not chunk:
                    raise AssertionError(f"parec ended early:\n{self.log_text()}")
                data.extend(chunk)
        finally:
            proc.terminate()
            proc.wait(10)
        return np.frombuffer(bytes(data), dtype="<i2").astype(np.float64)

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log.read_text(errors="replace")[-4000:]
        return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def dominant(samples: np.ndarray) -> tuple[float, float]:
    """(RMS level, dominant frequency in Hz) of mono samples at RATE."""
    rms = float(np.sqrt(np.mean(samples**2)))
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    spectrum[0] = 0
    freqs = np.fft.rfftfreq(len(samples), 1 / RATE)
    return rms, float(freqs[int(np.argmax(spectrum))])


@contextlib.contextmanager
def pulseaudio(tmp: Path, tones: dict[str, float]) -> Iterator[PulseAudio]:
    server = PulseAudio(tmp, tones)
    try:
        yield server
    finally:
        server.close()
