"""Calls: the state machine, its timeouts, the history and the events (docs/protocol.md §21).

Signaling travels as ordinary ratchet payloads through the delivery layer
(services/delivery.py), so the relay sees ordinary blocks; the sealed part is
aegisd/calls/signaling.py. Media is aegisd/calls/engine.py, imported only when a call's media
starts.

States: outgoing  calling -> ringing -> connecting -> active -> ended
        incoming  ringing -> connecting -> active -> ended
(an outgoing call rings once the callee's daemon says so: RINGING; it may be answered before
that message arrives, or without it from a daemon that does not send it)
Reasons an ended call gives: hangup (we hung up), remote_hangup, rejected, busy, unanswered
(nobody answered within calls.ring_timeout), missed (an incoming call we did not answer),
cancelled (the caller gave up while ringing), failed (no media path, or a bad description),
crossed (both sides called each other at once: the call with the lower id goes on, the other
ends so on both sides), answered_elsewhere (another device of ours took the call).

Several devices (docs/devices.md §9): an INVITE goes in the session with each of the contact's
devices; every other message of a call goes in the session of one device only, and what comes
for a call is taken only from the device(s) it was sent to: the first ACCEPT with a good key
binds the call to its device, the others get a CANCEL "answered elsewhere" (a device whose
ACCEPT has a bad key is out, as if it had declined); the call ends only once no invited device
may still answer: rejected if one declined, else busy if one was busy, else failed.

Every await is a point where another step (a timer, the peer's HANGUP, a lock) may have ended the
call: state changes happen before awaits, and each step looks at the state again after one.

Nothing here logs or stores SDP, keys, candidates or addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aegisd import droplog
from aegisd.core import wire
from aegisd.core.errors import ProtocolError
from aegisd.relayurl import SETTING_URL as SETTING_RELAY_URL
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.rpc.errors import LOCKED
from aegisd.store.contact_devices import ROW_DEVICE
from aegisd.store.db import Contact

from . import signaling
from .candidates import public_candidates, relay_is_local
from .signaling import CallChannel, new_call_key

if TYPE_CHECKING:
    from aegisd.services.context import ServiceContext
    from aegisd.services.messenger import Messenger

    from .engine import MediaSession

log = logging.getLogger("aegisd.calls")

SETTING_RING_TIMEOUT = "calls.ring_timeout"
SETTING_HOST_CANDIDATES = "calls.host_candidates"  # "all" (default) or "loopback"
SETTING_HIDE_IP = "calls.hide_ip"
SETTING_TURN_URL = "calls.turn_url"
SETTING_TURN_USERNAME = "calls.turn_username"
SETTING_INPUT_DEVICE = "calls.input_device"  # PortAudio device name; unset: the default
SETTING_OUTPUT_DEVICE = "calls.output_device"
SETTING_TURN_PASSWORD = "calls.turn_password"  # noqa: S105 (its name) - a secret: never returned, logged or printed
RING_TIMEOUT = 45.0  # seconds a call rings before it ends unanswered
CONNECT_TIMEOUT = 30.0  # seconds from the answer to media flowing
STALE_INVITE_SLACK = 5.0  # an INVITE older than ring_timeout + this is a missed call at once
HISTORY_MAX = 500
LOCK_FLUSH = 3.0  # seconds a lock or stop waits for the HANGUP of a live call to leave

# Application error codes (docs/api.md, "Errors"): calls have 1027-1029; 1020 not_found,
# 1024 not_ready and 1025 blocked are the messenger's.
E_BUSY = 1027
E_CALL_STATE = 1028
E_MEDIA = 1029
E_REVEALS_IP = 1035  # a call would show the user's IP address: consent needed (reveal_ip)
E_NO_AUDIO = 1036  # no microphone / speaker for a call without play / record

TURN_URL_RE = re.compile(r"^turns?:[A-Za-z0-9.\-\[\]:]+(\?transport=(udp|tcp))?$")

LIVE = ("calling", "ringing", "connecting", "active")
UNANSWERED = ("calling", "ringing")  # an outgoing call waiting for the callee
# An invited device's state, as the caller knows it (Call.invited); FAILED: its ACCEPT had a bad
# key (a broken or hostile device: out of the call, as if it had declined).
INVITED, RANG, DECLINED, BUSY, FAILED = "invited", "ringing", "rejected", "busy", "failed"
WAITING = (INVITED, RANG)  # a device that may still answer


def _other_fingerprint(sdp: str) -> str:
    """--test-methods only: the SDP with every sha-256 fingerprint changed (still well formed)."""
    return re.sub(
        r"(a=fingerprint:sha-256 )([0-9A-Fa-f]{2})",
        lambda m: m.group(1) + ("00" if m.group(2) != "00" else "11"),
        sdp,
    )


def _ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Call:
    id: bytes
    contact_id: int
    contact: str
    direction: str  # "in" / "out"
    video: bool
    state: str
    created_at: int
    secret: bytes | None = None
    public: bytes = b""
    peer_public: bytes | None = None
    channel: CallChannel | None = None
    play: str | None = None
    record: str | None = None
    media: MediaSession | None = None
    timer: asyncio.TimerHandle | None = None
    answered_at: int | None = None
    ended_at: int | None = None
    media_seen: set[str] = field(default_factory=set)
    last_sealed: wire.CallSealedPayload | None = None  # for the replay test (--test-methods)
    bad_fingerprint: bool = False  # --test-methods: seal our SDP with a wrong DTLS fingerprint
    ring_task: asyncio.Task[None] | None = None  # the RINGING waiting for its delay (incoming)
    # The contact's device the call is tied to (ROW_DEVICE or a device ID): the one an
    # incoming INVITE came from, the one whose ACCEPT an outgoing call took; None before that.
    device: bytes | None = None
    # Outgoing: each device the INVITE went to, and what it answered (INVITED, RANG, ...).
    invited: dict[bytes, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "call_id": self.id.hex(),
            "contact": self.contact,
            "direction": self.direction,
            "video": self.video,
            "state": self.state,
            "created_at": self.created_at,
            "answered_at": self.answered_at,
            "ended_at": self.ended_at,
            "media": sorted(self.media_seen),
        }
        if self.media is not None:
            out["transport"] = self.media.transport()
        return out


class CallService:
    def __init__(self, ctx: ServiceContext, messenger: Messenger) -> None:
        self.ctx = ctx
        self.m = messenger
        self.calls: dict[bytes, Call] = {}  # the live ones
        self._tasks: set[asyncio.Task[None]] = set()

    # --- life cycle -------------------------------------------------------------------------

    async def on_unlock(self, store: Any) -> None:
        # Calls that were live when the daemon stopped or crashed are over.
        with store.transaction():
            store._q(  # the store's query helper: this table is the calls module's own
                "UPDATE calls SET end_reason = CASE WHEN state = 'ringing' AND direction = 'in' "
                "THEN 'missed' ELSE 'failed' END, state = 'ended', ended_at = ? "
                "WHERE state != 'ended'",
                (_ms(),),
            )

    async def on_lock(self, store: Any) -> None:
        live = list(self.calls.values())
        for call in live:
            await self._end(call, "hangup", notify=True)
        if live:
            # The messenger's hook (next) stops the outbox: give the HANGUP a moment to leave,
            # or the peer only notices when ICE consent runs out (~30 s). Bounded: a relay that
            # is down leaves it queued (it goes at the next unlock and is dropped there).
            from aegisd.services.delivery import PENDING_DESTINATION

            def due() -> bool:  # blocks that can leave now (not those awaiting a contact)
                items = store.pending_blocks(now=_ms(), limit=100)
                return any(i.destination != PENDING_DESTINATION for i in items)

            deadline = time.monotonic() + LOCK_FLUSH
            while due() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- settings ---------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        s = self.m.store
        return {
            "ring_timeout": float(s.get_setting(SETTING_RING_TIMEOUT, RING_TIMEOUT)),
            "host_candidates": s.get_setting(SETTING_HOST_CANDIDATES, "all"),
            "hide_ip": bool(s.get_setting(SETTING_HIDE_IP, False)),
            "turn_url": s.get_setting(SETTING_TURN_URL),
            "turn_username": s.get_setting(SETTING_TURN_USERNAME),
            "turn_password_set": s.get_setting(SETTING_TURN_PASSWORD) is not None,
            "input_device": s.get_setting(SETTING_INPUT_DEVICE),
            "output_device": s.get_setting(SETTING_OUTPUT_DEVICE),
        }

    def configure(self, **changes: Any) -> dict[str, Any]:
        s = self.m.store
        ring = changes.get("ring_timeout")
        if ring is not None and (isinstance(ring, bool) or not 1 <= ring <= 600):
            raise InvalidParamsError("ring_timeout", "must be between 1 and 600 seconds")
        hosts = changes.get("host_candidates")
        if hosts is not None and hosts not in ("all", "loopback"):
            raise InvalidParamsError("host_candidates", "must be 'all' or 'loopback'")
        url = changes.get("turn_url")
        if url not in (None, "") and not TURN_URL_RE.match(url):
            raise InvalidParamsError(
                "turn_url", "must look like turn:HOST:PORT (optionally ?transport=udp|tcp)"
            )
        for name in ("turn_username", "turn_password", "input_device", "output_device"):
            v = changes.get(name)
            if v is not None and not isinstance(v, str):
                raise InvalidParamsError(name, "must be a string")
            if v is not None and (len(v) > 256 or any(ch in v for ch in "\r\n\0")):
                raise InvalidParamsError(name, "must be at most 256 characters on one line")
        hide = changes.get("hide_ip")
        if hide is not None and not isinstance(hide, bool):
            raise InvalidParamsError("hide_ip", "must be true or false")
        final_url = s.get_setting(SETTING_TURN_URL) if url is None else (url or None)
        final_hide = bool(s.get_setting(SETTING_HIDE_IP, False)) if hide is None else hide
        if final_hide and not final_url:
            raise InvalidParamsError("hide_ip", "needs a TURN server (turn_url) to relay calls")
        with s.transaction():
            if ring is not None:
                s.set_setting(SETTING_RING_TIMEOUT, float(ring))
            if hosts is not None:
                s.set_setting(SETTING_HOST_CANDIDATES, hosts)
            if url is not None:
                s.set_setting(SETTING_TURN_URL, url or None)
            for key, name in ((SETTING_TURN_USERNAME, "turn_username"),
                              (SETTING_TURN_PASSWORD, "turn_password")):  # fmt: skip
                if changes.get(name) is not None:
                    s.set_setting(key, changes[name] or None)
            if hide is not None:
                s.set_setting(SETTING_HIDE_IP, hide)
            for key, name in ((SETTING_INPUT_DEVICE, "input_device"),
                              (SETTING_OUTPUT_DEVICE, "output_device")):  # fmt: skip
                if changes.get(name) is not None:  # "" goes back to the default device
                    s.set_setting(key, changes[name] or None)
        return self.settings()

    def _ring_timeout(self) -> float:
        return float(self.m.store.get_setting(SETTING_RING_TIMEOUT, RING_TIMEOUT))

    # --- API --------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return any(c.state in LIVE for c in self.calls.values())

    def _get(self, call_id: str | None) -> Call:
        if call_id is None:
            live = [c for c in self.calls.values() if c.state in LIVE]
            if len(live) == 1:
                return live[0]
            raise AppError(1020, "not_found", "no call in progress")
        try:
            raw = bytes.fromhex(call_id)
        except ValueError:
            raise InvalidParamsError("call_id", "must be a call id (hex)") from None
        call = self.calls.get(raw)
        if call is None:
            raise AppError(1020, "not_found", "no such call in progress")
        return call

    @staticmethod
    def _check_files(play: str | None, record: str | None) -> None:
        """The daemon opens these files for the user (the CLI runs as the same user)."""
        if play is not None:
            if not os.path.isabs(play):
                raise InvalidParamsError("play", "must be an absolute path")
            if not os.path.isfile(play) or not os.access(play, os.R_OK):
                raise AppError(E_MEDIA, "media", "the file to play cannot be read")
        if record is not None:
            if not os.path.isabs(record):
                raise InvalidParamsError("record", "must be an absolute path")
            parent = os.path.dirname(record) or "/"
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise AppError(E_MEDIA, "media", "the recording cannot be written there")
            if os.path.exists(record):
                raise AppError(E_MEDIA, "media", "the recording file exists already")

    async def _check_media(self, video: bool, play: str | None, record: str | None) -> None:
        """Refuse, before anything is sent, a call that would carry nothing: a --play file that
        is not media the call can send, or no microphone / speaker where no file stands in."""
        if play is not None:
            from .playable import probe  # PyAV: this call will load it anyway

            problem = await asyncio.to_thread(probe, play, video)
            if problem is not None:
                raise AppError(E_MEDIA, "media", f"the file to play {problem}")
        from . import devices

        s = self.m.store
        try:
            # In a thread: importing sounddevice and re-initialising PortAudio can take
            # seconds (ALSA's pulse plugin timing out), and the daemon must go on meanwhile.
            # The callers look at the call's state again after this await.
            await asyncio.to_thread(devices.check, play is None, record is None,
                                    s.get_setting(SETTING_INPUT_DEVICE),
                                    s.get_setting(SETTING_OUTPUT_DEVICE))  # fmt: skip
        except devices.NoAudioDevice as exc:
            raise AppError(
                E_NO_AUDIO,
                "no_audio_device",
                f"{exc}: without a sound device, send a file (--play FILE) and record what "
                "you receive (--record FILE)",
            ) from None
        if self.ctx.store is None:  # locked while the devices were checked
            raise AppError(LOCKED, "locked", "the profile was locked")

    def _check_address_consent(self, reveal_ip: bool, contact: str) -> None:
        """A profile that hides its address from relays (Tor, a proxy) does not show it to a
        contact through a call without being told to: Tor carries no UDP, so the media goes
        peer to peer (ICE host candidates) unless every candidate is a TURN relay (hide_ip)."""
        if reveal_ip or not self.m.network().hides_address:
            return
        s = self.m.store
        if s.get_setting(SETTING_HIDE_IP, False) and s.get_setting(SETTING_TURN_URL):
            return
        raise AppError(
            E_REVEALS_IP,
            "reveals_ip",
            f"this call would show your IP address to {contact}: calls do not go through Tor. "
            "Relay calls through a TURN server (aegis call-settings --turn-url ... --hide-ip), "
            "or allow it for this call (--reveal-ip)",
        )

    async def start(
        self, name: str, video: bool, play: str | None, record: str | None,
        reveal_ip: bool = False,
    ) -> dict[str, Any]:
        self._check_files(play, record)
        c = self.m.contacts.by_name(name)
        self._check_address_consent(reveal_ip, c.name)
        if c.blocked:
            raise AppError(1025, "blocked", "this contact is blocked")
        if self._busy():
            raise AppError(E_BUSY, "busy", "a call is in progress already")
        await self._check_media(video, play, record)
        if self._busy():  # another call started while the file and devices were checked
            raise AppError(E_BUSY, "busy", "a call is in progress already")
        call_id = self.m.entropy.random(wire.CALL_ID_LEN)
        secret, public = new_call_key(self.m.entropy)
        call = Call(call_id, c.id, c.name, "out", video, "calling", _ms(),
                    secret=secret, public=public, play=play, record=record)  # fmt: skip
        invite = wire.CallPayload(
            call_id, wire.CALL_INVITE, key=public, video=video, sent_at_ms=_ms()
        )
        # Registered before the await: a second calls.start, or an INVITE arriving meanwhile,
        # sees this call (busy, or crossed calls), and a hangup meanwhile finds it.
        self.calls[call_id] = call
        self._history_add(call)
        try:
            went = await self.m.send_call_payload(c.id, invite)
        except BaseException:  # not_ready etc.: as if the call had never been started
            self.calls.pop(call_id, None)
            call.secret = None
            self.m.store._q("DELETE FROM calls WHERE id = ?", (call_id.hex(),))
            raise
        if call.state == "ended":  # hung up while the INVITE was queued
            return call.describe()
        # Every device the INVITE went in rings; its answers are taken from these only.
        call.invited = dict.fromkeys(went, INVITED)
        self._set_state(call, "calling")
        self._arm(call, self._ring_timeout(), "unanswered")
        return call.describe()

    async def accept(
        self, call_id: str | None, play: str | None, record: str | None,
        reveal_ip: bool = False,
    ) -> dict[str, Any]:
        self._check_files(play, record)
        call = self._get(call_id)
        if call.direction != "in" or call.state != "ringing":
            raise AppError(E_CALL_STATE, "call_state", "this call is not ringing")
        self._check_address_consent(reveal_ip, call.contact)
        await self._check_media(call.video, play, record)
        if call.state != "ringing":  # cancelled or rung out while the devices were checked
            raise AppError(E_CALL_STATE, "call_state", "this call is not ringing")
        assert call.peer_public is not None
        secret, public = new_call_key(self.m.entropy)
        try:
            channel = CallChannel(call.id, secret, call.peer_public, caller=False)
        except ProtocolError:
            await self._end(call, "failed", notify=True)
            raise AppError(E_CALL_STATE, "call_state", "the call cannot be answered") from None
        call.secret, call.public, call.channel = secret, public, channel
        call.play, call.record = play, record
        # Connecting before the await: a CANCEL or the ring timeout arriving meanwhile ends the
        # call as it is now (and is not undone after the await).
        self._stop_ring(call)  # the ACCEPT says more than a RINGING would
        self._set_state(call, "connecting")
        self._arm(call, CONNECT_TIMEOUT, "failed")
        try:
            await self._send(call, wire.CallPayload(call.id, wire.CALL_ACCEPT, key=public))
        except AppError:
            await self._end(call, "failed", notify=False)
            raise
        if call.state == "ended":
            raise AppError(E_CALL_STATE, "call_state", "the call ended before it was answered")
        return call.describe()

    async def reject(self, call_id: str | None) -> dict[str, Any]:
        call = self._get(call_id)
        if call.direction != "in" or call.state != "ringing":
            raise AppError(E_CALL_STATE, "call_state", "this call is not ringing")
        await self._end(call, "rejected", notify=True)
        return call.describe()

    async def hangup(self, call_id: str | None) -> dict[str, Any]:
        call = self._get(call_id)
        await self._end(call, "hangup", notify=True)
        return call.describe()

    def live(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.calls.values()]

    def history(self, contact: str | None, limit: int) -> list[dict[str, Any]]:
        if not 1 <= limit <= HISTORY_MAX:
            raise InvalidParamsError("limit", f"must be between 1 and {HISTORY_MAX}")
        # contact_id -1 matches no contact: "every contact" without building SQL text.
        cid = self.m.contacts.by_name(contact).id if contact is not None else -1
        rows = self.m.store._q(
            "SELECT k.id, c.name, k.direction, k.video, k.state, k.end_reason, k.created_at, "
            "k.answered_at, k.ended_at FROM calls k JOIN contacts c ON c.id = k.contact_id "
            "WHERE (? = -1 OR k.contact_id = ?) ORDER BY k.created_at DESC, k.rowid DESC LIMIT ?",
            (cid, cid, limit),
        ).fetchall()
        keys = ("call_id", "contact", "direction", "video", "state", "reason", "created_at",
                "answered_at", "ended_at")  # fmt: skip
        out = [dict(zip(keys, r, strict=True)) for r in rows]
        for d in out:
            d["video"] = bool(d["video"])
        return out

    # --- state ------------------------------------------------------------------------------

    def _history_add(self, call: Call, state: str | None = None, reason: str | None = None) -> None:
        ended = _ms() if reason is not None else None
        self.m.store._q(
            "INSERT OR IGNORE INTO calls (id, contact_id, direction, video, state, end_reason, "
            "created_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (call.id.hex(), call.contact_id, call.direction, int(call.video),
             state or call.state, reason, call.created_at, ended),
        )  # fmt: skip

    def _set_state(self, call: Call, state: str, reason: str | None = None) -> None:
        call.state = state
        if state == "ended":
            call.ended_at = _ms()
        store = self.ctx.store
        if store is None:
            return
        with store.transaction():
            store._q(
                "UPDATE calls SET state = ?, end_reason = ?, answered_at = ?, ended_at = ? "
                "WHERE id = ?",
                (state, reason, call.answered_at, call.ended_at if state == "ended" else None,
                 call.id.hex()),
            )  # fmt: skip
            data: dict[str, Any] = {"call_id": call.id.hex(), "contact": call.contact,
                                    "direction": call.direction, "state": state}  # fmt: skip
            if reason is not None:
                data["reason"] = reason
            # When it was answered and ended (ms since the epoch, as in the history): how
            # long the call lasted, for whoever follows it.
            if state in ("active", "ended") and call.answered_at is not None:
                data["answered_at"] = call.answered_at
            if state == "ended":
                data["ended_at"] = call.ended_at
            self.ctx.events.emit("call.state", data)

    def _arm(self, call: Call, seconds: float, reason: str) -> None:
        if call.timer is not None:
            call.timer.cancel()
        loop = asyncio.get_running_loop()
        call.timer = loop.call_later(
            seconds, lambda: self._spawn(self._timeout(call, reason))
        )

    async def _timeout(self, call: Call, reason: str) -> None:
        if call.state in LIVE:
            await self._end(call, reason, notify=True)

    async def _end(self, call: Call, reason: str, *, notify: bool) -> None:
        """End a call once: tell the peer (if asked), erase the keys, release the media."""
        ended = self._finish(call, reason, notify=notify)
        if ended is None:
            return
        payload, media = ended
        if payload is not None:
            with contextlib.suppress(AppError, RuntimeError):
                await self._send(call, payload)
        if media is not None:
            await media.close()

    def _finish(
        self, call: Call, reason: str, *, notify: bool
    ) -> tuple[wire.Payload | None, MediaSession | None] | None:
        """The synchronous part of ending a call (no await: two ends racing, say a local and a
        remote hangup, cannot both get past the first line): the state, the timer, the keys.
        Returns what is left to do (the message for the peer, the media to close), or None if
        the call had ended already."""
        if call.state == "ended":
            return None
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        self._stop_ring(call)
        payload: wire.Payload | None = None
        if notify:
            if call.channel is not None and call.channel.open:
                payload = call.channel.seal(self.m.entropy, signaling.SIG_HANGUP, b"")
            elif call.direction == "out":
                payload = wire.CallPayload(call.id, wire.CALL_CANCEL)
            elif call.state == "ringing":
                payload = wire.CallPayload(
                    call.id, wire.CALL_REJECT, reason=wire.CALL_REASON_REJECTED
                )
        if call.channel is not None:
            call.channel.erase()
        call.secret = None
        media, call.media = call.media, None
        self.calls.pop(call.id, None)
        self._set_state(call, "ended", reason)
        return payload, media

    @staticmethod
    def _stop_ring(call: Call) -> None:
        """Forget the RINGING still waiting for its delay (the call was answered or ended)."""
        if call.ring_task is not None:
            call.ring_task.cancel()
            call.ring_task = None

    # --- signaling from the peer (called inside the receive transaction: no waiting) ----------

    def on_payload(
        self, c: Contact, payload: wire.CallPayload | wire.CallSealedPayload,
        device: bytes = ROW_DEVICE,
    ) -> None:
        """``device``: the contact's device whose session it came in (ROW_DEVICE: the row)."""
        tag = device
        call = self.calls.get(payload.call_id)
        if call is not None and call.contact_id != c.id:
            droplog.dropped("dropped call signaling from another contact")
            return
        if call is not None and not self._from_its_device(call, tag):
            # A device the call was not sent to, or not the one that took it (a removed or
            # hostile device of the contact cannot answer or end another device's call).
            droplog.dropped("dropped call signaling from another device")
            return
        if isinstance(payload, wire.CallSealedPayload):
            self._on_sealed(call, payload)
        elif payload.kind == wire.CALL_INVITE:
            self._on_invite(c, call, payload, tag)
        elif call is None:
            droplog.dropped("dropped call signaling for no call in progress")
        elif payload.kind == wire.CALL_RINGING and call.direction == "out" and (
            call.state in UNANSWERED
        ):
            if call.invited.get(tag) == INVITED:
                call.invited[tag] = RANG
            if call.state == "calling":
                self._set_state(call, "ringing")  # the ring timeout armed at start goes on
        elif payload.kind == wire.CALL_ACCEPT and call.direction == "out" and (
            call.state in UNANSWERED
        ) and call.invited.get(tag) in WAITING:
            self._on_accept(call, payload, tag)
        elif payload.kind == wire.CALL_REJECT and call.direction == "out" and (
            call.state in UNANSWERED
        ) and call.invited.get(tag) in WAITING:
            self._device_out(call, tag, BUSY if payload.reason == wire.CALL_REASON_BUSY
                             else DECLINED)  # fmt: skip
        elif payload.kind == wire.CALL_CANCEL and call.direction == "in":
            if payload.reason == wire.CALL_REASON_ANSWERED_ELSEWHERE:
                reason = "answered_elsewhere"
            else:
                reason = "missed" if call.state == "ringing" else "cancelled"
            self._spawn(self._end(call, reason, notify=False))
        else:
            droplog.dropped("dropped call signaling out of order")

    def _device_out(self, call: Call, tag: bytes, answer: str) -> None:
        """An invited device will not answer (``answer``: DECLINED, BUSY or FAILED): the call
        goes on ringing on the others, and ends once none may answer any more: rejected if one
        declined, else busy if one was busy, else failed (every ACCEPT had a bad key)."""
        call.invited[tag] = answer
        answers = set(call.invited.values())
        if answers & set(WAITING):
            return
        reason = "rejected" if DECLINED in answers else "busy" if BUSY in answers else "failed"
        self._spawn(self._end(call, reason, notify=False))

    @staticmethod
    def _from_its_device(call: Call, tag: bytes) -> bool:
        if call.device is not None:
            return tag == call.device
        return tag in call.invited  # an outgoing call not answered yet

    @staticmethod
    def _targets(call: Call) -> list[bytes]:
        """The sessions a message of this call goes in: the device it is tied to, else (an
        outgoing call not answered yet) every invited device that may still answer."""
        if call.device is not None:
            return [call.device]
        return [t for t, st in call.invited.items() if st in WAITING]

    async def _send(self, call: Call, payload: wire.Payload) -> None:
        if call.direction == "out" and call.device is None and not call.invited:
            # Hung up while its INVITE was being queued: the CANCEL follows it everywhere.
            await self.m.send_call_payload(call.contact_id, payload)
            return
        targets = self._targets(call)
        if targets:
            await self.m.send_call_payload(call.contact_id, payload, to=targets)

    def _on_invite(self, c: Contact, call: Call | None, p: wire.CallPayload, tag: bytes) -> None:
        if call is not None or self._known(p.call_id):
            return  # a duplicate: this call is known
        incoming = Call(p.call_id, c.id, c.name, "in", p.video, "ringing", _ms(),
                        peer_public=p.key, device=tag)  # fmt: skip
        age = (_ms() - p.sent_at_ms) / 1000
        if age > self._ring_timeout() + STALE_INVITE_SLACK:
            self._history_add(incoming, "ended", "missed")  # the caller gave up long ago
            return
        live = [x for x in self.calls.values() if x.state in LIVE]
        crossed = (
            len(live) == 1
            and live[0].contact_id == c.id
            and live[0].direction == "out"
            and live[0].state in UNANSWERED
        )
        if crossed and p.call_id < live[0].id:
            # Both called each other at once (each INVITE left before the other arrived). Both
            # sides compare the same two ids: the lower one goes on and rings here, ours ends
            # (the peer answers it busy); without this both calls would end busy. The
            # contact's other devices that ring for ours stop (CANCEL).
            ours = live[0]
            cancel = wire.CallPayload(ours.id, wire.CALL_CANCEL)
            others = [t for t in self._targets(ours) if t != tag]
            self._finish(ours, "crossed", notify=False)
            if not ours.invited:
                # Its INVITE is still waiting for the messenger's lock (the inbox holds it), so
                # where it goes is not known yet: the CANCEL queues behind it on that lock and
                # goes in every session it goes in (the crossing device drops it: it ended ours
                # itself, crossed).
                self._spawn(self._send_quietly(c.id, cancel, to=None))
            elif others:
                self._spawn(self._send_quietly(c.id, cancel, to=others))
        elif crossed:
            # Ours has the lower id: it goes on; the peer ends its own call when our INVITE
            # arrives there. It is still answered busy, so it ends even if that INVITE is late.
            self._history_add(incoming, "ended", "crossed")
            self._spawn(self._send_quietly(c.id, wire.CallPayload(
                p.call_id, wire.CALL_REJECT, reason=wire.CALL_REASON_BUSY),
                delay=self._reply_delay(), to=[tag]))  # fmt: skip
            return
        if self._busy():
            self._history_add(incoming, "ended", "busy")
            self._spawn(self._send_quietly(c.id, wire.CallPayload(
                p.call_id, wire.CALL_REJECT, reason=wire.CALL_REASON_BUSY),
                delay=self._reply_delay(), to=[tag]))  # fmt: skip
            self.ctx.events.emit(
                "call.missed", {"call_id": p.call_id.hex(), "contact": c.name, "reason": "busy"}
            )
            return
        self.calls[p.call_id] = incoming
        self._history_add(incoming)
        self.ctx.events.emit(
            "call.incoming", {"call_id": p.call_id.hex(), "contact": c.name, "video": p.video}
        )
        self._set_state(incoming, "ringing")
        self._arm(incoming, self._ring_timeout(), "missed")
        # Tell the caller it rings here (its user hears "ringing", not just "calling"); this
        # includes the call that goes on after crossed calls (it does ring here). Not at once:
        # after the receipts' random delay, like the busy answer above, so that the relay does
        # not see an instant reply to the INVITE's deposit; never sent if the call is answered
        # or ends first (_stop_ring). Not in a cover slot: slots are the interval apart
        # (minutes), longer than a ring lasts, and the rest of the call's signaling leaves
        # outside them anyway (docs/protocol.md §21, §24; docs/threat-model.md §6).
        incoming.ring_task = self._spawn(self._ring_later(incoming))

    def _reply_delay(self) -> float:
        """The delay before an automatic answer to an INVITE (RINGING, busy): that of a
        receipt, uniform in [0.5 s, privacy.receipt_delay_max]."""
        return self.m.delivery.receipt_delay()

    async def _ring_later(self, call: Call) -> None:
        await asyncio.sleep(self._reply_delay())
        if call.state != "ringing":  # answered, declined or ended meanwhile: nothing to say
            return
        call.ring_task = None  # from here on the RINGING is sent: an end no longer cancels it
        await self._send_quietly(call.contact_id, wire.CallPayload(call.id, wire.CALL_RINGING),
                                 to=self._targets(call))  # fmt: skip

    def _known(self, call_id: bytes) -> bool:
        row = self.m.store._q("SELECT 1 FROM calls WHERE id = ?", (call_id.hex(),)).fetchone()
        return row is not None

    async def _send_quietly(
        self, contact_id: int, payload: wire.Payload, delay: float = 0.0, *,
        to: list[bytes] | None,
    ) -> None:
        """``to`` as in Messenger.send_call_payload (None: the row and every answered device)."""
        if delay > 0:
            await asyncio.sleep(delay)
        with contextlib.suppress(AppError, RuntimeError):
            await self.m.send_call_payload(contact_id, payload, to=to)

    def _on_accept(self, call: Call, p: wire.CallPayload, tag: bytes) -> None:
        assert call.secret is not None
        try:
            channel = CallChannel(call.id, call.secret, p.key, caller=True)
        except ProtocolError:
            # A bad key: that device does not take the call (the others go on ringing); it
            # thinks it answered, so a CANCEL stops it connecting.
            droplog.dropped("dropped a call ACCEPT with a bad key")
            self._spawn(self._send_quietly(call.contact_id,
                                           wire.CallPayload(call.id, wire.CALL_CANCEL), to=[tag]))
            self._device_out(call, tag, FAILED)
            return
        # The first good ACCEPT takes the call: from here on only this device's session counts.
        others = [t for t in self._targets(call) if t != tag]
        call.device, call.channel = tag, channel
        if others:
            self._spawn(self._send_quietly(call.contact_id, wire.CallPayload(
                call.id, wire.CALL_CANCEL, reason=wire.CALL_REASON_ANSWERED_ELSEWHERE),
                to=others))  # fmt: skip
        call.peer_public = p.key
        call.answered_at = _ms()
        self._set_state(call, "connecting")
        self._arm(call, CONNECT_TIMEOUT, "failed")
        self._spawn(self._guard(call, self._send_offer(call)))

    def _on_sealed(self, call: Call | None, p: wire.CallSealedPayload) -> None:
        if call is None or call.channel is None:
            droplog.dropped("dropped sealed call signaling for no call in progress")
            return
        try:
            sig = call.channel.unseal(p)
        except ProtocolError as exc:
            droplog.dropped(f"dropped call signaling: {type(exc).__name__}")
            return
        if sig.kind == signaling.SIG_HANGUP:
            self._spawn(self._end(call, "remote_hangup", notify=False))
        elif sig.kind == signaling.SIG_OFFER and call.direction == "in" and call.media is None:
            self._spawn(self._guard(call, self._answer(call, sig.data)))
        elif sig.kind == signaling.SIG_ANSWER and call.direction == "out" and (
            call.media is not None
        ):
            self._spawn(self._guard(call, self._accept_answer(call, sig.data)))
        else:
            # CANDIDATE: aiortc gathers every candidate before it describes itself, so they
            # travel inside OFFER and ANSWER; a trickled one is not needed and is ignored.
            droplog.dropped(f"ignored call signaling of kind {sig.kind}")

    # --- media ------------------------------------------------------------------------------

    async def _guard(self, call: Call, coro: Any) -> None:
        """A media step; any failure ends the call (and tells the peer), without details."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            droplog.dropped(f"call media failed: {type(exc).__name__}")
            await self._end(call, "failed", notify=True)

    def _new_media(self, call: Call) -> MediaSession:
        from . import engine  # aiortc and PyAV: loaded with the first call only

        s = self.m.store
        # Process-wide (aioice has no per-connection switch): set for each call, so a change
        # of the setting applies to the next call.
        if s.get_setting(SETTING_HOST_CANDIDATES, "all") == "loopback":
            engine.restrict_host_candidates_to_loopback()
        else:
            engine.use_all_host_candidates()
        servers: tuple[tuple[str, str | None, str | None], ...] = ()
        url = s.get_setting(SETTING_TURN_URL)
        if url:
            servers = ((url, s.get_setting(SETTING_TURN_USERNAME),
                        s.get_setting(SETTING_TURN_PASSWORD)),)  # fmt: skip
        ice = engine.IceConfig(servers, relay_only=bool(s.get_setting(SETTING_HIDE_IP, False)))

        def on_state(state: str) -> None:
            if call.state == "ended":
                return
            if state == "connected" and call.state == "connecting":
                if call.timer is not None:
                    call.timer.cancel()
                    call.timer = None
                call.answered_at = call.answered_at or _ms()
                self._set_state(call, "active")
            elif state == "failed":
                self._spawn(self._end(call, "failed", notify=True))

        def on_media(kind: str) -> None:
            if call.state != "ended" and kind not in call.media_seen:
                call.media_seen.add(kind)
                self.ctx.events.emit(
                    "call.media", {"call_id": call.id.hex(), "contact": call.contact, "kind": kind}
                )

        devices = engine.Devices(s.get_setting(SETTING_INPUT_DEVICE),
                                 s.get_setting(SETTING_OUTPUT_DEVICE))  # fmt: skip
        media = engine.MediaSession(ice, call.video, call.play, call.record, on_state, on_media,
                                    devices)  # fmt: skip
        call.media = media
        return media

    async def _send_offer(self, call: Call) -> None:
        if call.state == "ended":  # ended before this task ran: make no peer connection
            return
        media = self._new_media(call)  # on the call at once: an end from now on closes it
        sdp = await media.create_offer()
        if call.state == "ended" or call.channel is None:
            return
        if call.bad_fingerprint:
            sdp = _other_fingerprint(sdp)
        sealed = call.last_sealed = call.channel.seal(
            self.m.entropy, signaling.SIG_OFFER, sdp.encode()
        )
        await self._send(call, sealed)

    def _remote_sdp(self, data: bytes) -> str:
        """The contact's SDP, without its candidates on addresses that are not public unless
        the user's own relay is local (candidates.py: no STUN probes to the user's machine or
        network at the contact's choice)."""
        sdp = data.decode()
        if relay_is_local(self.m.store.get_setting(SETTING_RELAY_URL)):
            return sdp
        sdp, dropped = public_candidates(sdp)
        if dropped:
            droplog.dropped(f"dropped {dropped} call candidate(s) on a non-public address")
        return sdp

    async def _answer(self, call: Call, offer: bytes) -> None:
        if call.state == "ended":
            return
        media = self._new_media(call)
        sdp = await media.answer_offer(self._remote_sdp(offer))
        if call.state == "ended" or call.channel is None:
            return
        if call.bad_fingerprint:
            sdp = _other_fingerprint(sdp)
        sealed = call.last_sealed = call.channel.seal(
            self.m.entropy, signaling.SIG_ANSWER, sdp.encode()
        )
        await self._send(call, sealed)

    async def _accept_answer(self, call: Call, answer: bytes) -> None:
        if call.media is None:  # ended meanwhile (the media was closed with it)
            return
        await call.media.accept_answer(self._remote_sdp(answer))

    async def debug_signal(self, call_id: str, mode: str) -> None:
        """--test-methods only: tamper (a HANGUP with one bit of its box flipped), replay (the
        last sealed message sent, again, in a new ratchet message), unknown (a HANGUP under
        another call id), fingerprint (this call's SDP, when it is sealed, will carry a wrong
        DTLS fingerprint: the peer must refuse the certificate we present)."""
        call = self._get(call_id)
        if mode == "fingerprint":
            call.bad_fingerprint = True
            return
        if call.channel is None:
            raise AppError(E_CALL_STATE, "call_state", "the call has no sealed channel yet")
        if mode == "replay":
            if call.last_sealed is None:
                raise AppError(E_CALL_STATE, "call_state", "nothing was sealed yet")
            payload = call.last_sealed
        else:
            sealed = call.channel.seal(self.m.entropy, signaling.SIG_HANGUP, b"")
            if mode == "tamper":
                box = bytearray(sealed.box)
                box[len(box) // 2] ^= 0x01
                payload = wire.CallSealedPayload(sealed.call_id, sealed.nonce, bytes(box))
            else:
                other = self.m.entropy.random(wire.CALL_ID_LEN)
                payload = wire.CallSealedPayload(other, sealed.nonce, sealed.box)
        await self._send(call, payload)
