"""The microphone and the speaker of the machine the daemon runs on, for calls.

Why PortAudio (through ``sounddevice``) and not PyAV's own devices: the PyAV wheel aiortc uses
is built with FFmpeg's ``alsa`` and ``oss`` devices but no ``pulse`` one, and its bundled copy of
libasound looks for its configuration where the wheel was built (not /usr/share/alsa), so it
knows no "default" device and loads none of the system's ALSA plugins. PortAudio is the
system's libportaudio2, linked to the system's libasound: its ALSA "default" device is whatever
the system makes of it, which on a desktop is the ALSA ``pulse`` plugin (libasound2-plugins),
i.e. PulseAudio's or PipeWire's (pipewire-pulse) default source and sink, and on a machine
without a sound server the sound card itself. PULSE_SOURCE / PULSE_SINK in the daemon's
environment pick other PulseAudio devices; the ``calls.input_device`` / ``calls.output_device``
settings pick a PortAudio device by name (or a part of it).

The daemon owns the device: a daemon on another machine (say, reached over SSH) uses that
machine's microphone and speaker, not those of the terminal the CLI runs in.

Imported with the media engine (aegisd/calls/engine.py). PortAudio's callbacks run on its own
thread; they only copy bytes, under a lock or through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import threading
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from . import devices
from .devices import RATE

FRAME = 960  # 20 ms, aiortc's audio frame
MAX_QUEUED = 10  # frames (200 ms): a stalled consumer drops the oldest, so latency stays bounded
MAX_BUFFERED = RATE * 2 // 5  # speaker: at most 200 ms of samples waiting


def _started(stream: Any) -> Any:
    """Start an opened PortAudio stream, counted as open (closed again if it cannot start)."""
    try:
        stream.start()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.close()
        raise
    devices.open_streams += 1
    return stream


class MicrophoneTrack(MediaStreamTrack):
    """The local audio track: 20 ms frames from the capture device."""

    kind = "audio"

    def __init__(self, device: str | None) -> None:
        super().__init__()
        sd = devices.portaudio()
        self._event_loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._pts = 0
        self._stream = _started(sd.RawInputStream(samplerate=RATE, channels=1, dtype="int16",
                                                  blocksize=FRAME, device=device,
                                                  callback=self._captured))  # fmt: skip

    def _captured(self, data: Any, frames: int, _time: Any, _status: Any) -> None:
        chunk = bytes(data)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the call is over
            self._event_loop.call_soon_threadsafe(self._put, chunk)

    def _put(self, chunk: bytes) -> None:
        while self._queue.qsize() >= MAX_QUEUED:
            self._queue.get_nowait()
        self._queue.put_nowait(chunk)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        chunk = await self._queue.get()
        samples = len(chunk) // 2
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(chunk)
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += samples
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            with contextlib.suppress(Exception):
                self._stream.stop()
                self._stream.close()
            devices.open_streams -= 1
        super().stop()


class SpeakerSink:
    """Plays the remote audio track on the output device; the sink interface of aiortc's
    MediaRecorder (addTrack, start, stop)."""

    def __init__(self, device: str | None) -> None:
        self._device = device
        self._tracks: list[MediaStreamTrack] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._stream: Any = None

    def addTrack(self, track: MediaStreamTrack) -> None:  # aiortc's sink interface
        self._tracks.append(track)

    async def start(self) -> None:
        if self._stream is not None:
            return
        sd = devices.portaudio()
        self._stream = _started(sd.RawOutputStream(samplerate=RATE, channels=1, dtype="int16",
                                                   blocksize=FRAME, device=self._device,
                                                   callback=self._play))  # fmt: skip
        self._tasks = [asyncio.get_running_loop().create_task(self._pull(t)) for t in self._tracks]

    async def _pull(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            for out in resampler.resample(frame):
                data = bytes(out.planes[0])[: out.samples * 2]
                with self._lock:
                    self._buffer.extend(data)
                    excess = len(self._buffer) - MAX_BUFFERED * 2
                    if excess > 0:  # the device is slower than the peer: drop the oldest
                        del self._buffer[:excess]

    def _play(self, out: Any, frames: int, _time: Any, _status: Any) -> None:
        n = len(out)
        with self._lock:
            chunk = bytes(self._buffer[:n])
            del self._buffer[:n]
        out[: len(chunk)] = chunk
        if len(chunk) < n:  # nothing received yet (or a gap): silence
            out[len(chunk) :] = bytes(n - len(chunk))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with contextlib.suppress(Exception):
                stream.stop()
                stream.close()
            devices.open_streams -= 1
