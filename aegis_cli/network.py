"""``aegis network``, ``aegis relay`` and ``aegis privacy``: how the profile reaches its relay,
which relay, and how much cover traffic hides its timing.

One layout for these settings (docs/api.md "network.set", "relay.set"):

    aegis relay show                the relay and whether it is connected
    aegis relay set URL             point the profile at another relay
    aegis network                   the mode, the proxy, isolation, bridges and Tor's state
    aegis network --mode tor|proxy|direct [--proxy URL] [--isolation on|off]
                  [--bridge LINE ...] [--no-bridges] [--tor-path PATH]
                  [--trust-relay URL ...] [--no-trusted-relays]
    aegis privacy [--level off|default|strong] [--send-jitter-max SECONDS]
                  [--group-spread-max SECONDS]
                  [--read-receipts on|off] [--receipt-delay-max SECONDS]

`aegis privacy` holds everything about what the timing of your traffic shows: cover traffic,
send jitter and receipts (`aegis settings` shows the receipts too, for older scripts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from . import units

if TYPE_CHECKING:
    from .main import Ctx

MODE_TEXT = {
    "tor": "tor (through a Tor the daemon runs: relays see a Tor exit, not your address)",
    "proxy": "proxy (through your SOCKS5 proxy: relays see the proxy's or Tor's address)",
    "direct": "direct (relays see your IP address)",
}


def describe_tor(tor: dict[str, Any] | None) -> str:
    if not tor:
        return "not running"
    return str(tor.get("description") or tor.get("state"))


def relay_text(st: dict[str, Any]) -> str:
    """The relay line of `aegis status` and `aegis relay show`: the URL and, when it is not
    connected, why (the reason `status` gives; the errors send the user here to read it)."""
    r = st.get("relay") or {}
    if r.get("configured"):
        if r.get("connected"):
            return f"{r.get('url')} (connected)"
        return f"{r.get('url')} (not connected: {r.get('reason') or 'connecting'})"
    if st.get("locked"):
        return "unknown while locked (aegis unlock)"
    return "none configured: aegis relay set URL"


def network_text(r: dict[str, Any]) -> str:
    lines = [f"mode: {MODE_TEXT.get(r['mode'], r['mode'])}"
             + ("" if r.get("mode_chosen") else " [default for this relay]")]  # fmt: skip
    if r.get("proxy"):
        lines.append(f"proxy: {r['proxy']}")
    lines.append(f"isolation: {'on (one circuit per mailbox)' if r['isolation'] else 'off'}")
    if r["mode"] == "tor":
        lines.append(f"tor: {describe_tor(r.get('tor'))}")
        lines.append(f"tor program: {r.get('tor_path') or 'searched on PATH'}")
        bridges = r.get("bridges") or []
        lines.append(f"bridges: {len(bridges)}" if bridges else "bridges: none")
    trusted = r.get("trusted_relays") or []
    if trusted:
        lines.append("trusted relays (contacts may use them as yours): " + ", ".join(trusted))
    return "\n".join(lines)


def register(main: ModuleType) -> None:
    """Add the commands to the CLI (given the main module, as aegis_cli/calls.py explains)."""
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common
    Fail: type[Exception] = main.Fail

    @cli.command(short_help="Show or change how the daemon reaches relays.")
    @common
    @click.option(
        "--mode",
        type=click.Choice(["tor", "proxy", "direct"]),
        help="tor: a Tor the daemon runs; proxy: your SOCKS5 proxy; direct: no Tor (the relay "
        "sees your IP address).",
    )
    @click.option(
        "--proxy",
        metavar="URL",
        help="The SOCKS5 proxy, socks5://HOST:PORT (given alone, it also sets --mode proxy).",
    )
    @click.option(
        "--isolation",
        type=click.Choice(["on", "off"]),
        help="One connection and Tor circuit per mailbox (on by default with Tor or a proxy).",
    )
    @click.option(
        "--bridge",
        "bridges",
        multiple=True,
        metavar="LINE",
        help="A Tor bridge line ([obfs4] IP:PORT FINGERPRINT cert=... iat-mode=0); repeat for "
        "several. Replaces the bridges set before.",
    )
    @click.option("--no-bridges", is_flag=True, help="Stop using bridges.")
    @click.option("--tor-path", metavar="PATH", help="The tor program ('' to search PATH).")
    @click.option(
        "--trust-relay",
        "trusted",
        multiple=True,
        metavar="URL",
        help="A relay you trust as your own for what contacts send (e.g. one on your network: "
        "contacts' relays may otherwise not be local, or plain ws://); repeat for several. "
        "Replaces the list set before.",
    )
    @click.option("--no-trusted-relays", is_flag=True, help="Trust no relay but your own.")
    def network(
        ctx: Ctx,
        mode: str | None,
        proxy: str | None,
        isolation: str | None,
        bridges: tuple[str, ...],
        no_bridges: bool,
        tor_path: str | None,
        trusted: tuple[str, ...],
        no_trusted_relays: bool,
    ) -> None:
        """Show or change how the daemon reaches relays (Tor, a proxy, or directly)."""
        if bridges and no_bridges:
            raise Fail("--bridge and --no-bridges exclude each other", 2)
        if trusted and no_trusted_relays:
            raise Fail("--trust-relay and --no-trusted-relays exclude each other", 2)
        params: dict[str, Any] = {}
        if mode is not None:
            params["mode"] = mode
        if proxy is not None:
            params["proxy"] = proxy
        if isolation is not None:
            params["isolation"] = isolation == "on"
        if bridges or no_bridges:
            params["bridges"] = list(bridges)
        if trusted or no_trusted_relays:
            params["trusted_relays"] = list(trusted)
        if tor_path is not None:  # made absolute here: the daemon may run elsewhere
            params["tor_path"] = os.path.abspath(os.path.expanduser(tor_path)) if tor_path else ""
        result = ctx.call("network.set", params) if params else ctx.call("network.get")
        ctx.out(result, network_text(result))

    @cli.group(short_help="Show the relay, or use another one.")
    def relay() -> None:
        """Show the relay (aegis relay show), or use another one (aegis relay set URL)."""

    @relay.command("show")
    @common
    def relay_show(ctx: Ctx) -> None:
        """Show the relay and whether the daemon is connected to it."""
        st = ctx.call("status")
        r = st.get("relay") or {}
        text = relay_text(st)
        move = st.get("relay_move")
        if move:
            left = ", ".join(move["contacts_left"]) or "none"
            text += f"\nmoving from {move['from']}: contacts not yet moved: {left}"
        ctx.out({**r, "move": move}, f"relay: {text}")

    @relay.command("set")
    @common
    @click.argument("url")
    @click.option(
        "--insecure-plaintext-relay",
        is_flag=True,
        help="Allow an unencrypted ws:// relay on another host (everyone on the path sees it).",
    )
    def relay_set(ctx: Ctx, url: str, insecure_plaintext_relay: bool) -> None:
        """Use the relay at URL (wss://HOST[:PORT]/v1/ws; ws:// on loopback or a .onion).

        The address and pending invitations are replaced at once (links given out before stop
        working). Each contact is sent a new mailbox at the new relay; the old relay keeps
        receiving until the contact confirms it, then its mailbox there is deleted."""
        result = ctx.call(
            "relay.set", {"url": url, "insecure_plaintext": insecure_plaintext_relay}
        )
        note = ""
        if result.get("invitations_revoked"):
            note = f"\n{result['invitations_revoked']} pending invitation(s) stopped working."
        if result.get("contacts_moving"):
            note += (f"\n{result['contacts_moving']} contact(s) move to the new relay as each "
                     "confirms its new mailbox (aegis relay show says how many are left); the "
                     "old relay keeps receiving until then.")  # fmt: skip
        ctx.out(
            result,
            f"relay: {result['url']}\nmode: {MODE_TEXT.get(result['mode'], result['mode'])}"
            f"{note}\nYour address changes: aegis address shows the new one.",
        )


LEVEL_TEXT = {
    "off": "off: no cover traffic; messages leave at once, and the relay sees when and how much",
    "default": "default: one block per contact about every 20 minutes, real or cover",
    "strong": "strong: one block per contact about every 2 minutes, real or cover",
}


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


#: Each level's measured cost (docs/threat-model.md §4.2, `bench/cover.py`), for 20 contacts.
LEVEL_COSTS = (
    ("level", "per contact per day", "20 contacts a day", "a message waits", "CPU a day"),
    ("off", "what you send", "what you send", "no wait", "-"),
    ("default", "72 blocks each way", "about 31 MB sent", "20 min on average", "about 6 s"),
    ("strong", "720 blocks each way", "about 300 MB sent", "2 min on average", "about 52 s"),
)


def level_table() -> str:
    widths = [max(len(row[i]) for row in LEVEL_COSTS) for i in range(len(LEVEL_COSTS[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in LEVEL_COSTS)  # fmt: skip


def privacy_text(r: dict[str, Any]) -> str:
    level = r["level"]
    lines = [f"level: {LEVEL_TEXT.get(level, level)}"
             + ("" if r.get("level_chosen") else " [default for this relay]")]  # fmt: skip
    if r.get("interval"):
        minutes = r["interval"] / 60
        lines.append(
            f"cost: {r['blocks_per_contact_per_day']:g} blocks "
            f"({_size(r['bytes_per_contact_per_day'])}) per contact per day each way; a message "
            f"waits {minutes:.0f} minutes on average for its contact's next slot"
        )
    lines += ["", level_table()]
    return "\n".join(lines)


def timing_text(r: dict[str, Any]) -> str:
    """Send jitter and receipts (settings.get), as `aegis privacy` shows them."""
    jitter = float(r.get("send_jitter_max") or 0.0)
    jitter_text = (
        f"a random delay of 0 to {jitter:g} s before a text leaves"
        if jitter
        else "off (texts leave at once, or at their cover slot)"
    )
    spread = float(r.get("group_spread_max") or 0.0)
    spread_text = (
        f"each member's copy after a random 0 to {spread:g} s" if spread else "off (at once)"
    )
    return "\n".join([
        f"send jitter: {jitter_text}",
        f"group fan-out spread (cover off): {spread_text}",
        f"read receipts: {'on' if r['read_receipts'] else 'off'}",
        f"receipt delay: 0.5 to {r['receipt_delay_max']:g} s "
        "(with cover on, receipts ride the slots)",
    ])  # fmt: skip


def register_privacy(main: ModuleType) -> None:
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common

    @cli.command(short_help="Show or set the cover-traffic level.")
    @common
    @click.option(
        "--level",
        type=click.Choice(["off", "default", "strong"]),
        help="Cover traffic: off, default (cheap, slow), strong (costly, faster).",
    )
    @click.option(
        "--send-jitter-max",
        type=click.FloatRange(0, 3600),
        metavar="SECONDS",
        help="Hold each text for a random 0 to SECONDS before it leaves (0: off, the default).",
    )
    @click.option(
        "--group-spread-max",
        type=click.FloatRange(0, 3600),
        metavar="SECONDS",
        help="With cover off, each member's copy of a group message leaves after its own "
             "random 0 to SECONDS.",
    )  # fmt: skip
    @units.receipt_options
    def privacy(
        ctx: Ctx,
        level: str | None,
        send_jitter_max: float | None,
        group_spread_max: float | None,
        read_receipts: str | None,
        receipt_delay_max: float | None,
    ) -> None:
        """Show or set what hides when and how often you write: cover traffic, send jitter
        and receipts.

        With cover on, every contact gets blocks at a steady random rate whether you write or
        not; your messages and receipts take the place of cover blocks, so they wait for the
        next one. docs/threat-model.md has each level's measured cost."""
        params: dict[str, Any] = {}
        if send_jitter_max is not None:
            params["send_jitter_max"] = send_jitter_max
        if group_spread_max is not None:
            params["group_spread_max"] = group_spread_max
        if read_receipts is not None:
            params["read_receipts"] = read_receipts == "on"
        if receipt_delay_max is not None:
            params["receipt_delay_max"] = receipt_delay_max
        # The timing settings first: the daemon checks them whole before it changes any, and the
        # level, a click.Choice, cannot be refused for its value: nothing is half applied.
        timing = ctx.call("settings.set", params) if params else ctx.call("settings.get")
        result = ctx.call("privacy.set", {"level": level}) if level else ctx.call("privacy.get")
        ctx.out(
            {**result, "send_jitter_max": float(timing.get("send_jitter_max") or 0.0),
             "group_spread_max": float(timing.get("group_spread_max") or 0.0),
             "read_receipts": timing["read_receipts"],
             "receipt_delay_max": timing["receipt_delay_max"]},
            f"{privacy_text(result)}\n\n{timing_text(timing)}",
        )  # fmt: skip
