"""``aegis call``, ``answer``, ``decline``, ``hangup``, ``calls`` and ``call-settings``.

Thin like the rest of the CLI: JSON-RPC only, no aiortc (the daemon runs the media). --play and
--record name files the daemon opens for you (it runs as the same user); the CLI passes them as
absolute paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from aegis_client.safe_text import one_line

from .client import RpcCallError

if TYPE_CHECKING:
    from .main import Ctx

ENDED_OK = ("hangup", "remote_hangup")


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _when(ms: int | None) -> str:
    """A local date and time (the daemon keeps milliseconds since the epoch)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _duration(ms: int) -> str:
    seconds = max(0, round(ms / 1000))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _describe(c: dict[str, Any], when: bool = False) -> str:
    """One line about a call; ``when``: its start time first (the list and the history).
    An ended call that was answered says how long it lasted."""
    arrow = "to" if c["direction"] == "out" else "from"
    kind = "video call" if c.get("video") else "call"
    reason = f" ({one_line(c['reason'])})" if c.get("reason") else ""
    lasted = ""
    if c.get("answered_at") and c.get("ended_at"):
        lasted = f", {_duration(c['ended_at'] - c['answered_at'])}"
    elif c.get("state") == "active" and c.get("answered_at"):
        lasted = f" since {time.strftime('%H:%M', time.localtime(c['answered_at'] / 1000))}"
    start = f"{_when(c.get('created_at'))}  " if when else ""
    # The contact's name and a reason may come from the peer: shown without controls.
    return (f"{start}{kind} {arrow} {one_line(c['contact'])}: {one_line(c['state'])}{reason}"
            f"{lasted}  [{one_line(c['call_id'])}]")


def _value(v: Any) -> str:
    """A setting as people read it (not Python's True / None)."""
    if v is None:
        return "not set"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


# call-settings: what each result member is called on screen, in this order.
SETTING_LABELS = (
    ("ring_timeout", "ring timeout (seconds)"),
    ("input_device", "microphone"),
    ("output_device", "speaker"),
    ("host_candidates", "host candidates"),
    ("hide_ip", "hide my IP"),
    ("turn_url", "TURN server"),
    ("turn_username", "TURN username"),
    ("turn_password_set", "TURN password"),
)


def _settings_text(result: dict[str, Any]) -> str:
    lines = []
    for key, label in SETTING_LABELS:
        if key not in result:
            continue
        value = result[key]
        if key in ("input_device", "output_device") and value is None:
            text = "the system's default"
        elif key == "turn_password_set":
            text = "set" if value else "not set"
        else:
            text = _value(value)
        lines.append(f"{label}: {text}")
    lines += [f"{k}: {_value(v)}" for k, v in sorted(result.items())
              if k not in dict(SETTING_LABELS)]  # fmt: skip
    return "\n".join(lines)


media_options = [
    click.option(
        "--reveal-ip",
        is_flag=True,
        help="With Tor or a proxy and no TURN hide-my-IP: allow this call to show your IP "
        "address to the other side (calls do not go through Tor).",
    ),
    click.option(
        "--play", metavar="FILE",
        help="Send this audio/video file instead of the microphone's sound.",
    ),
    click.option(
        "--record", metavar="FILE",
        help="Record what the other side sends (.wav: audio only) instead of playing it on "
        "the speaker.",
    ),
]


def with_media(func: Any) -> Any:
    for option in reversed(media_options):
        func = option(func)
    return func


def register(main: ModuleType) -> None:
    """Add the call commands to the CLI. Given the main module (not imported from here: run as
    ``python -m aegis_cli.main`` it is ``__main__``, and a second copy would have its own
    ``Fail`` and command group)."""
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common
    Fail: type[Exception] = main.Fail
    read_secret_file: Callable[[str], str] = main.read_secret_file

    @cli.command()
    @common
    @click.argument("name")
    @click.option("--video", is_flag=True, help="A video call (audio and video).")
    @with_media
    @click.option("--no-wait", is_flag=True, help="Return once the call rings; do not follow it.")
    def call(
        ctx: Ctx,
        name: str,
        video: bool,
        reveal_ip: bool,
        play: str | None,
        record: str | None,
        no_wait: bool,
    ) -> None:
        """Call the contact NAME.

        Uses the microphone and speaker of the machine the daemon runs on (its default ones,
        or those named in call-settings); --play and --record use files instead (no sound
        device needed). Follows the call until it ends (Ctrl-C hangs up), printing each
        state; exits 1 when the call was not answered (unanswered, rejected, busy, failed).
        With --no-wait it returns at once and the call goes on in the daemon (aegis hangup
        ends it).
        """
        params = {"contact": name, "video": video, "play": _abs(play), "record": _abs(record),
                  "reveal_ip": reveal_ip}  # fmt: skip
        if no_wait:
            result = ctx.call("calls.start", params)
            ctx.out(result, _describe(result))
            return
        with ctx.client(timeout=None) as events:
            # Ctrl-C while the call is being started is held until its id is known, so that
            # the call it started is hung up rather than left ringing at the contact.
            held: list[int] = []
            previous = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
            try:
                events.call("events.subscribe", {"types": ["call.state", "call.media"]})
                started = ctx.call("calls.start", params)
            finally:
                signal.signal(signal.SIGINT, previous)
            call_id = started["call_id"]
            shown = started["state"]  # the daemon also announces this state: print it once
            if not ctx.as_json:
                click.echo(_describe(started))
            try:
                if held:
                    raise KeyboardInterrupt
                for note in events.notifications():
                    ev = note.get("params") or {}
                    data = ev.get("data") or {}
                    if data.get("call_id") != call_id:
                        continue
                    if ctx.as_json:
                        click.echo(json.dumps(ev, sort_keys=True))
                    elif ev.get("type") == "call.media":
                        click.echo(f"receiving {one_line(data['kind'])}")
                    elif data.get("state") != shown:
                        shown = data.get("state")
                        click.echo(_describe({**started, **data}))
                    if ev.get("type") == "call.state" and data.get("state") == "ended":
                        if data.get("reason") not in ENDED_OK:
                            raise Fail(f"the call ended: {one_line(data.get('reason'))}")
                        return
            except KeyboardInterrupt:
                # The call may have ended meanwhile: still "interrupted", not an error.
                with contextlib.suppress(RpcCallError):
                    ctx.call("calls.hangup", {"call_id": call_id})
                raise


    @cli.command()
    @common
    @click.argument("call_id", required=False)
    @with_media
    def answer(
        ctx: Ctx, call_id: str | None, reveal_ip: bool, play: str | None, record: str | None
    ) -> None:
        """Answer the ringing call (CALL_ID: which one, when several ring)."""
        result = ctx.call("calls.accept", {"call_id": call_id, "play": _abs(play),
                                           "record": _abs(record),
                                           "reveal_ip": reveal_ip})  # fmt: skip
        ctx.out(result, _describe(result))


    @cli.command()
    @common
    @click.argument("call_id", required=False)
    def decline(ctx: Ctx, call_id: str | None) -> None:
        """Decline the ringing call."""
        result = ctx.call("calls.reject", {"call_id": call_id})
        ctx.out(result, _describe({**result, "reason": "rejected"}))


    @cli.command()
    @common
    @click.argument("call_id", required=False)
    def hangup(ctx: Ctx, call_id: str | None) -> None:
        """Hang up the call in progress (or cancel the one ringing)."""
        result = ctx.call("calls.hangup", {"call_id": call_id})
        ctx.out(result, _describe({**result, "state": "ended", "reason": "hangup"}))


    @cli.command()
    @common
    @click.argument("name", required=False)
    @click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
    def calls(ctx: Ctx, name: str | None, limit: int) -> None:
        """The call history (of NAME only, if given), oldest first, then the calls in progress
        (the newest: printed last)."""
        live = ctx.call("calls.list")["calls"]
        # calls.history gives the newest first; the CLI lists everything oldest first, so the
        # calls in progress (newer than every ended one) come last.
        history = ctx.call("calls.history", {"contact": name, "limit": limit})["calls"][::-1]
        lines = [_describe(c, when=True) for c in history if c["state"] == "ended"]
        lines += [_describe(c, when=True) for c in live]
        ctx.out({"live": live, "history": history}, "\n".join(lines) if lines else "no calls yet")


    @cli.command("call-settings")
    @common
    @click.option("--ring-timeout", type=click.FloatRange(1, 600), metavar="SECONDS")
    @click.option("--turn-url", metavar="URL", help="turn:HOST:PORT ('' removes it).")
    @click.option("--turn-username", metavar="NAME")
    @click.option("--turn-password-file", metavar="FILE", help="First line: the TURN password.")
    @click.option("--hide-ip/--show-ip", default=None,
                  help="Relay every call through the TURN server (the peer never sees your IP).")
    @click.option("--host-candidates", type=click.Choice(["all", "loopback"]),
                  help="'loopback': offer only 127.0.0.1 (local testing).")  # fmt: skip
    @click.option("--input-device", metavar="NAME",
                  help="The microphone to use (a PortAudio device name or part of it); '' "
                  "goes back to the system's default.")  # fmt: skip
    @click.option("--output-device", metavar="NAME",
                  help="The speaker to use, likewise.")  # fmt: skip
    def call_settings(
        ctx: Ctx,
        ring_timeout: float | None,
        turn_url: str | None,
        turn_username: str | None,
        turn_password_file: str | None,
        hide_ip: bool | None,
        host_candidates: str | None,
        input_device: str | None,
        output_device: str | None,
    ) -> None:
        """Show or change the call settings (the TURN password is never shown).

        The sound devices are those of the machine the daemon runs on: without a
        setting, the system's default microphone and speaker (PulseAudio or PipeWire,
        else ALSA).
        """
        params: dict[str, Any] = {
            k: v
            for k, v in {"ring_timeout": ring_timeout, "turn_url": turn_url,
                         "turn_username": turn_username, "hide_ip": hide_ip,
                         "host_candidates": host_candidates, "input_device": input_device,
                         "output_device": output_device}.items()
            if v is not None
        }
        if turn_password_file is not None:
            params["turn_password"] = read_secret_file(turn_password_file)
        result = ctx.call("calls.configure" if params else "calls.settings", params or None)
        ctx.out(result, _settings_text(result))
