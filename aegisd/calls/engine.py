"""Everything aiortc: one WebRTC peer connection per call, its media sources and sinks.

Imported only when a call starts (aegisd/calls/service.py imports it lazily): aiortc pulls in
PyAV and the FFmpeg libraries, which an idle daemon should not map.

The SDP this module is given always comes out of the sealed signaling channel
(aegisd/calls/signaling.py): aiortc checks the DTLS certificate the peer presents against the
a=fingerprint lines of that SDP (RTCDtlsTransport refuses a mismatch), and ``apply_remote``
checks again that the fingerprints aiortc holds are exactly the sealed ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaBlackhole, MediaPlayer, MediaRecorder
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from .sound import MicrophoneTrack, SpeakerSink

log = logging.getLogger("aegisd.calls")

# aioice logs each candidate pair it checks and each TURN allocation at INFO, with their IP
# addresses; aiortc's debug lines describe the media path. aegisd logs at info by default, and
# no address may reach a log line at any level: both stay at WARNING whatever --log-level says.
for _name in ("aioice", "aiortc"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$", re.MULTILINE)


class FingerprintMismatch(Exception):
    """The DTLS fingerprints in use are not the ones the sealed SDP carried."""


@dataclass(frozen=True)
class IceConfig:
    """Where ICE may look for candidates. ``servers`` is always explicit: aiortc given no list
    falls back to a public STUN server, which would tell a third party that we are calling."""

    servers: tuple[tuple[str, str | None, str | None], ...] = ()  # (url, username, password)
    relay_only: bool = False  # "hide my IP": only TURN relay candidates

    def rtc(self) -> RTCConfiguration:
        servers = [RTCIceServer(urls=url, username=u, credential=p) for url, u, p in self.servers]
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


_AIOICE_HOST_ADDRESSES = aioice.ice.get_host_addresses  # aioice's own, to put back


def use_all_host_candidates() -> None:
    """Undo ``restrict_host_candidates_to_loopback`` (the setting went back to "all")."""
    aioice.ice.get_host_addresses = _AIOICE_HOST_ADDRESSES


def restrict_host_candidates_to_loopback() -> None:
    """Make ICE gather host candidates on 127.0.0.1 only (the calls.host_candidates =
    "loopback" setting, for tests and local use). aioice enumerates the host's addresses with
    the module function ``get_host_addresses``, leaving loopback out, and would offer every other
    interface address; replacing that function for this process is the one switch aioice offers.
    The daemon serves one profile, so the process-wide change is the profile's setting."""
    aioice.ice.get_host_addresses = _loopback_only


def _loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


def _create_private(path: str) -> None:
    """Create the recording 0600 (FFmpeg would create it 0644: anyone on the machine could
    listen), refusing a file or a symbolic link that appeared there since the call was started.
    FFmpeg then opens it for writing, which keeps the mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.close(fd)


def sdp_fingerprints(sdp: str) -> set[tuple[str, str]]:
    return {(alg.lower(), value.upper()) for alg, value in _FINGERPRINT.findall(sdp)}


class _Watched(MediaStreamTrack):
    """Passes a remote track's frames on and reports the first one (first media received)."""

    def __init__(self, inner: MediaStreamTrack, on_first: Callable[[str], None]) -> None:
        super().__init__()
        self.kind = inner.kind
        self._inner = inner
        self._on_first: Callable[[str], None] | None = on_first

    async def recv(self) -> Any:
        frame = await self._inner.recv()
        if self._on_first is not None:
            on_first, self._on_first = self._on_first, None
            on_first(self.kind)
        return frame


@dataclass(frozen=True)
class Devices:
    """Where sound comes from and goes to when no file is given: the microphone and speaker
    (PortAudio device names; None: the system's default). ``use_sound_card=False`` (the
    engine's own tests) sends silence and drops what is received."""

    input: str | None = None
    output: str | None = None
    use_sound_card: bool = True


@dataclass
class MediaSession:
    """One call's peer connection. ``on_state`` gets aiortc's connection states;
    ``on_media`` the kind of the first frame received ("audio" / "video"). Sound comes from
    ``play`` (a file) or else the microphone, and goes to ``record`` (a file) or else the
    speaker."""

    ice: IceConfig
    video: bool
    play: str | None
    record: str | None
    on_state: Callable[[str], None]
    on_media: Callable[[str], None]
    devices: Devices = field(default_factory=Devices)
    pc: RTCPeerConnection = field(init=False)
    _player: MediaPlayer | None = field(init=False, default=None)
    _microphone: MicrophoneTrack | None = field(init=False, default=None)
    _sink: MediaRecorder | MediaBlackhole | SpeakerSink | None = field(init=False, default=None)
    # Tracks nobody records (video into a .wav, the player's video in an audio call) are still
    # read, so that aiortc's frame queues do not grow for the length of the call.
    _drain: MediaBlackhole = field(init=False, default_factory=MediaBlackhole)
    _remote: list[_Watched] = field(init=False, default_factory=list)
    _sealed_fingerprints: set[tuple[str, str]] = field(init=False, default_factory=set)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.pc = RTCPeerConnection(self.ice.rtc())
        self.pc.on("connectionstatechange", self._state_changed)
        self.pc.on("track", self._track)
        if self.play is not None:
            self._player = MediaPlayer(self.play)
        if self.record is not None:
            _create_private(self.record)
            self._sink = MediaRecorder(self.record)
        elif self.devices.use_sound_card:
            self._sink = SpeakerSink(self.devices.output)
        else:
            self._sink = MediaBlackhole()

    def _state_changed(self) -> None:
        self.on_state(self.pc.connectionState)

    def _track(self, track: MediaStreamTrack) -> None:
        watched = _Watched(track, self.on_media)
        self._remote.append(watched)
        audio_only = self.record is None or self.record.lower().endswith((".wav", ".ogg"))
        if self._sink is not None and (track.kind == "audio" or not audio_only):
            self._sink.addTrack(watched)
        else:
            self._drain.addTrack(watched)

    def _add_local_tracks(self) -> None:
        audio = self._player.audio if self._player is not None else None
        video = self._player.video if self._player is not None else None
        if audio is None and self._player is None and self.devices.use_sound_card:
            audio = self._microphone = MicrophoneTrack(self.devices.input)
        # A played file without sound (a video alone) sends silence with its pictures.
        self.pc.addTrack(audio if audio is not None else AudioStreamTrack())
        if self.video:
            self.pc.addTrack(video if video is not None else VideoStreamTrack())
        elif video is not None:
            self._drain.addTrack(video)

    async def create_offer(self) -> str:
        self._add_local_tracks()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer_offer(self, sdp: str) -> str:
        await self.apply_remote(sdp, "offer")
        self._add_local_tracks()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self._start_sink()
        return str(self.pc.localDescription.sdp)

    async def accept_answer(self, sdp: str) -> None:
        await self.apply_remote(sdp, "answer")
        await self._start_sink()

    async def apply_remote(self, sdp: str, kind: str) -> None:
        """Use the sealed SDP, and check that the fingerprints aiortc will verify the peer's
        DTLS certificate against are exactly the sealed ones."""
        self._sealed_fingerprints = sdp_fingerprints(sdp)
        if not self._sealed_fingerprints:
            raise FingerprintMismatch("the peer's description has no DTLS fingerprint")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        # The parameters RTCDtlsTransport.start() will verify the peer's certificate against;
        # aiortc keeps them in a private map (no public getter).
        remote = getattr(self.pc, "_RTCPeerConnection__remoteDtls", None)
        if not remote:
            raise FingerprintMismatch("aiortc holds no DTLS parameters for the peer")
        for params in remote.values():
            held = {(f.algorithm.lower(), f.value.upper()) for f in params.fingerprints}
            if held != self._sealed_fingerprints:
                raise FingerprintMismatch("DTLS fingerprints differ from the sealed ones")

    async def _start_sink(self) -> None:
        if self._sink is not None:
            await self._sink.start()
        await self._drain.start()

    def transport(self) -> dict[str, Any]:
        """Candidate types (never addresses): what was offered and which pair carries media."""
        out: dict[str, Any] = {"local": [], "remote": [], "selected": None}
        trs = self.pc.getTransceivers()
        if not trs:
            return out
        ice = trs[0].sender.transport.transport
        out["local"] = sorted({c.type for c in ice.iceGatherer.getLocalCandidates()})
        out["remote"] = sorted({c.type for c in ice.getRemoteCandidates()})
        conn = getattr(ice, "_connection", None)  # aioice's Connection: the nominated pair
        pair = getattr(conn, "_nominated", {}).get(1) if conn is not None else None
        if pair is not None:
            out["selected"] = {
                "local": pair.local_candidate.type,
                "remote": pair.remote_candidate.type,
            }
        return out

    async def close(self) -> None:
        """Stop the player, the recorder (its file is finalised), every track and the peer
        connection (its UDP sockets and TURN allocations)."""
        if self._closed:
            return
        self._closed = True
        for track in self._remote:
            track.stop()
        if self._microphone is not None:
            self._microphone.stop()
        for sink in (self._sink, self._drain):
            if sink is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sink.stop(), 10)
        if self._player is not None:
            for t in (self._player.audio, self._player.video):
                if t is not None:
                    t.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pc.close(), 10)
