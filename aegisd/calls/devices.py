"""Which microphone and speaker a call can use, checked before the call starts or is answered.

Through PortAudio (``sounddevice``): see aegisd/calls/sound.py for why. Imported only when a
call needs a device; it loads libportaudio2 but none of aiortc's media stack (PyAV, FFmpeg).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

RATE = 48000  # Opus runs at 48 kHz: no resampling on the way to the encoder

open_streams = 0  # PortAudio may only be re-initialised while no stream is open
_checking = threading.Lock()  # check runs in a worker thread: one at a time (PortAudio is global)


class NoAudioDevice(Exception):
    """No microphone or speaker can be opened; the message says which (no device details)."""


def portaudio() -> Any:
    try:
        import sounddevice
    except Exception:  # OSError: no libportaudio2; PortAudioError: it cannot start
        raise NoAudioDevice("PortAudio (libportaudio2) is not installed") from None
    return sounddevice


def _rescan(sd: Any) -> None:
    """PortAudio lists the devices once, when it is initialised: start it again so that a sound
    server started (or a headset plugged in) since the last call is seen."""
    if open_streams == 0:
        with contextlib.suppress(Exception):
            sd._terminate()
            sd._initialize()


def check(need_input: bool, need_output: bool, input_device: str | None,
          output_device: str | None) -> None:  # fmt: skip
    """Raise NoAudioDevice unless the devices this call needs accept 48 kHz mono 16-bit.
    Slow (seconds, when PortAudio's ALSA plugins time out) and blocking: the daemon runs it in
    a thread (asyncio.to_thread), never on its event loop."""
    if not (need_input or need_output):
        return
    with _checking:
        _check(need_input, need_output, input_device, output_device)


def _check(need_input: bool, need_output: bool, input_device: str | None,
           output_device: str | None) -> None:  # fmt: skip
    sd = portaudio()
    _rescan(sd)
    wanted = (("microphone", need_input, input_device, sd.check_input_settings),
              ("speaker", need_output, output_device, sd.check_output_settings))  # fmt: skip
    for what, needed, device, probe in wanted:
        if not needed:
            continue
        try:
            probe(device=device, channels=1, dtype="int16", samplerate=RATE)
        except Exception:  # ValueError (no such device) or PortAudioError: the same to the user
            where = f" named {device!r}" if device else ""
            raise NoAudioDevice(f"no {what}{where} on the daemon's machine") from None
