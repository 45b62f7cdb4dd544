"""Calls with the microphone and the speaker: real daemons, a real relay and a real PulseAudio
(started here, with its own socket) on a machine without a sound card.

Alice's microphone is a 440 Hz sine source and Bob's a 660 Hz one; each speaker is a null sink
whose monitor the test records: a call without --play / --record must carry each microphone's
tone to the other side's speaker. Without any sound device the same call is refused with a clear
error, and --play / --record still work headless.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from tests.daemon.conftest import DaemonProc
from tests.relay.conftest import RelayProcess

from .calls_support import analyse, write_tone
from .conftest import TONES, Peer, connect
from .sound_server import PulseAudio, dominant

T_CALL = 45.0


def no_sound_env(tmp: Path) -> dict[str, str]:
    """No sound server (PULSE_SERVER names a socket that does not exist) and, on this machine,
    no sound card: PortAudio finds no device."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
    env["PULSE_SERVER"] = f"unix:{tmp / 'no-such-socket'}"
    return env


@pytest.fixture
def make(tmp_short: Path, relay_proc: RelayProcess) -> Iterator[Callable[..., Peer]]:
    """Peers whose daemon runs in the given environment (the sound it can reach)."""
    made: list[Peer] = []
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"

    def _make(name: str, env: dict[str, str]) -> Peer:
        p = Peer(tmp_short / name, url, name)
        made.append(p)
        p.stop()
        p.proc = DaemonProc(p.home, [], env)
        p.proc.wait_ready()
        p.call("calls.configure", {"host_candidates": "loopback"})
        return p

    try:
        yield _make
    finally:
        for p in made:
            p.stop()


def cli(p: Peer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(p.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def cli_json(p: Peer, *args: str) -> Any:
    r = cli(p, *args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def rpc_error(p: Peer, method: str, params: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(RpcCallError) as info:
        p.call(method, params)
    err = info.value
    return {"code": err.code, "message": err.message, "data": err.data}


def wait_state(p: Peer, call_id: str, state: str) -> None:
    def found() -> bool:
        for ev in p.events(0, types=["call.state"]):
            if ev["data"].get("call_id") == call_id and ev["data"].get("state") == state:
                return True
        return False

    p.wait_for(found, f"call {state}", timeout=T_CALL)


def hear(sound: PulseAudio, name: str, hz: float) -> tuple[float, float]:
    """Listen to NAME's speaker, a second at a time, until the tone plays there (bounded)."""
    level, freq = 0.0, 0.0
    deadline = time.monotonic() + T_CALL
    while time.monotonic() < deadline:
        level, freq = dominant(sound.listen(name, 1.0))
        if level > 300 and abs(freq - hz) < 10:
            break
    return level, freq


def test_voice_call_carries_each_microphone_to_the_other_speaker(
    sound: PulseAudio, make: Callable[..., Peer]
) -> None:
    alice = make("alice", sound.daemon_env("alice"))
    bob = make("bob", sound.daemon_env("bob"))
    connect(alice, bob)
    # Before the call the speakers play nothing: the tone heard below comes through the call.
    for name in ("alice", "bob"):
        level, _ = dominant(sound.listen(name, 0.5))
        assert level < 50, (name, level)

    started = cli_json(alice, "call", "bob", "--no-wait")
    call_id = started["call_id"]
    bob.wait_for(lambda: bob.call("calls.list")["calls"], "the call to ring", timeout=T_CALL)
    answered = cli_json(bob, "answer")
    assert answered["state"] == "connecting"
    wait_state(alice, call_id, "active")
    wait_state(bob, call_id, "active")

    level, freq = hear(sound, "bob", TONES["alice"])
    assert level > 300 and abs(freq - TONES["alice"]) < 10, (level, freq)
    level, freq = hear(sound, "alice", TONES["bob"])
    assert level > 300 and abs(freq - TONES["bob"]) < 10, (level, freq)

    cli_json(alice, "hangup")
    wait_state(bob, call_id, "ended")
    # The devices are released with the call: the speakers fall silent again.
    for name in ("alice", "bob"):
        p = alice if name == "alice" else bob
        p.wait_for(lambda n=name: dominant(sound.listen(n, 0.5))[0] < 50, "silence")


def test_without_a_sound_device_calls_need_files(
    make: Callable[..., Peer], tmp_short: Path
) -> None:
    assert not Path("/proc/asound/cards").exists() or "no soundcards" in Path(
        "/proc/asound/cards"
    ).read_text(), "this test needs a machine without a sound card"
    env = no_sound_env(tmp_short)
    alice, bob = make("alice", env), make("bob", env)
    connect(alice, bob)
    tone, rec = tmp_short / "tone.wav", tmp_short / "rec.wav"
    write_tone(tone, 440.0, 4.0)

    # No microphone: refused before anything is sent, saying what to do instead.
    err = rpc_error(alice, "calls.start", {"contact": "bob"})
    assert err["code"] == 1036 and err["data"]["error"] == "no_audio_device", err
    assert "no microphone" in err["message"] and "--play" in err["message"]
    r = cli(alice, "call", "bob")
    assert r.returncode == 1 and "no microphone" in r.stderr and "--play" in r.stderr, r
    # A file to play but nowhere to hear the answer: no speaker.
    err = rpc_error(alice, "calls.start", {"contact": "bob", "play": str(tone)})
    assert err["code"] == 1036 and "no speaker" in err["message"], err

    # A file that is not media is refused too (it used to be accepted, then sent nothing).
    text = tmp_short / "notes.txt"
    text.write_text("not a sound\n" * 100)
    err = rpc_error(alice, "calls.start", {"contact": "bob", "play": str(text),
                                           "record": str(tmp_short / "x.wav")})  # fmt: skip
    # (FFmpeg reads a text file as pictures of text: a "video" without sound.)
    assert err["code"] == 1029 and err["message"] == "the file to play has no sound", err
    noise = tmp_short / "noise.wav"
    noise.write_bytes(os.urandom(4096))
    err = rpc_error(alice, "calls.start", {"contact": "bob", "play": str(noise),
                                           "record": str(tmp_short / "x.wav")})  # fmt: skip
    assert err["code"] == 1029 and "not an audio or video file" in err["message"], err
    assert alice.call("calls.list")["calls"] == []
    assert not (tmp_short / "x.wav").exists()

    # Headless: --play and --record stand in for both devices.
    out = tmp_short / "alice-rec.wav"
    started = alice.call("calls.start", {"contact": "bob", "play": str(tone),
                                         "record": str(out)})  # fmt: skip
    call_id = started["call_id"]
    bob.wait_for(lambda: bob.call("calls.list")["calls"], "the call to ring", timeout=T_CALL)
    err = rpc_error(bob, "calls.accept", {})  # bob has no devices either
    assert err["code"] == 1036, err
    assert [c["state"] for c in bob.call("calls.list")["calls"]] == ["ringing"]  # still
    bob.call("calls.accept", {"play": str(tone), "record": str(rec)})
    wait_state(bob, call_id, "active")
    # Recordings are the user's alone, like every file the daemon writes for them.
    for path in (rec, out):
        bob.wait_for(path.exists, "the recording")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    bob.wait_for(
        lambda: any(e["data"].get("kind") == "audio" for e in bob.events(0, ["call.media"])),
        "audio",
        timeout=T_CALL,
    )
    time.sleep(2)  # let some of the tone be recorded (the check below is on content, not time)
    alice.call("calls.hangup", {})
    wait_state(bob, call_id, "ended")
    _, freq = analyse(rec)
    assert abs(freq - 440.0) < 10, freq


def test_named_device_that_does_not_exist(sound: PulseAudio, make: Callable[..., Peer]) -> None:
    """call-settings names the microphone / speaker; a name that matches no device is the same
    clear error (and '' goes back to the default device)."""
    alice = make("alice", sound.daemon_env("alice"))
    bob = make("bob", sound.daemon_env("bob"))
    connect(alice, bob)
    r = cli(alice, "call-settings", "--input-device", "no-such-mic")
    assert r.returncode == 0, r.stderr
    assert "microphone: no-such-mic" in r.stdout
    err = rpc_error(alice, "calls.start", {"contact": "bob"})
    assert err["code"] == 1036 and "no microphone named 'no-such-mic'" in err["message"], err
    settings = cli_json(alice, "call-settings", "--input-device", "")
    assert settings["input_device"] is None
    started = alice.call("calls.start", {"contact": "bob"})
    assert started["state"] == "calling"
    alice.call("calls.hangup", {})


# A stand-in for the sounddevice module whose device check blocks until the test lets it go:
# PortAudio's re-initialisation can take seconds when an ALSA plugin times out.
SLOW_SOUNDDEVICE = '''
import os, time

_gate = os.environ["AEGIS_TEST_SOUND_GATE"]


def _wait(**_kw):
    open(_gate + ".entered", "w").close()
    deadline = time.monotonic() + 60  # bounded: a test that fails does not hang the daemon
    while not os.path.exists(_gate + ".open") and time.monotonic() < deadline:
        time.sleep(0.02)


def _terminate():
    pass


def _initialize():
    pass


check_input_settings = check_output_settings = _wait
'''


def test_slow_device_check_does_not_block_the_daemon(
    make: Callable[..., Peer], tmp_short: Path
) -> None:
    """The sound-device check runs beside the daemon, not on it: while it hangs the daemon
    answers and takes the caller's CANCEL, and the answer given meanwhile then fails cleanly
    (the call ended; no ACCEPT leaves, nothing is left live)."""
    fake = tmp_short / "fake"
    fake.mkdir()
    (fake / "sounddevice.py").write_text(SLOW_SOUNDDEVICE)
    gate = tmp_short / "gate"
    env = no_sound_env(tmp_short)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(fake), env.get("PYTHONPATH")) if x)
    env["AEGIS_TEST_SOUND_GATE"] = str(gate)
    alice, bob = make("alice", no_sound_env(tmp_short)), make("bob", env)
    connect(alice, bob)
    tone = tmp_short / "tone.wav"
    write_tone(tone, 440.0, 2.0)
    started = alice.call("calls.start", {"contact": "bob", "play": str(tone),
                                         "record": str(tmp_short / "a.wav")})  # fmt: skip
    call_id = started["call_id"]
    bob.wait_for(lambda: bob.call("calls.list")["calls"], "the call to ring", timeout=T_CALL)

    answered: dict[str, Any] = {}

    def answer() -> None:
        assert bob.proc is not None
        try:
            with bob.proc.client(timeout=T_CALL + 60) as c:
                answered["result"] = c.call("calls.accept", {"call_id": call_id})
        except RpcCallError as exc:
            answered["error"] = exc.code

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        bob.wait_for(Path(str(gate) + ".entered").exists, "the device check", timeout=T_CALL)
        # The check hangs; the daemon still answers, and the caller gives up meanwhile.
        assert [c["state"] for c in bob.call("calls.list")["calls"]] == ["ringing"]
        alice.call("calls.hangup", {"call_id": call_id})
        wait_state(bob, call_id, "ended")
    finally:
        Path(str(gate) + ".open").touch()
        t.join(T_CALL)
    assert answered == {"error": 1028}, answered  # call_state: it ended while being answered
    assert bob.call("calls.list")["calls"] == []
    assert bob.call("calls.history", {"limit": 1})["calls"][0]["reason"] == "missed"
    states = [e["data"]["state"] for e in alice.events(types=["call.state"])
              if e["data"]["call_id"] == call_id]  # fmt: skip
    # No ACCEPT reached alice (a RINGING may have, before she hung up).
    assert "connecting" not in states and states[-1] == "ended", states
