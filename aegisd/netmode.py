"""Network modes: which one a profile uses, and where the tor program is. Standard library
only: the thin CLI imports this module (aegis init checks for Tor before asking for a
passphrase). How each mode connects is aegisd/transport/network.py; the managed Tor is
aegisd/transport/tor.py.
"""

from __future__ import annotations

import os
import shutil
from typing import Any
from urllib.parse import urlsplit

from aegisd.relayurl import is_loopback, is_onion

SETTING_MODE = "network.mode"
SETTING_PROXY = "network.proxy"
SETTING_ISOLATION = "network.isolation"
SETTING_BRIDGES = "network.bridges"
SETTING_TOR_PATH = "network.tor_path"
# Relays the user trusts as its own for what contacts send: their URLs pass the policy for relay
# URLs chosen by others (relayurl.check_peer_relay_url) as the user's own relay does.
SETTING_TRUSTED_RELAYS = "network.trusted_relays"
MAX_TRUSTED_RELAYS = 8
MODES = ("tor", "proxy", "direct")


class Unreachable(Exception):
    """This relay cannot be reached in this profile's network mode; str() says why."""


class NeedsTor(Unreachable):
    """An onion relay, in direct mode: it can only be reached through Tor."""

    def __str__(self) -> str:
        return "an onion relay can only be reached through Tor (aegis network --mode tor)"


class NeedsChoice(Unreachable):
    """A relay not on loopback, for a profile that connects directly only because its own
    relay is on loopback and it never chose a mode: neither Tor (not running) nor a direct
    connection (which the user never chose) may be used."""

    def __str__(self) -> str:
        return (
            "this profile connects directly only to relays on this machine (its relay is "
            "local and it never chose a network mode); to reach other relays choose one: "
            "aegis network --mode tor, or --mode direct (that relay then sees your IP address)"
        )


def is_local(url: str | None) -> bool:
    host = urlsplit(url).hostname if url else None
    return host is not None and is_loopback(host.lower())


def default_mode(relay_url: str | None) -> str:
    """The mode of a profile that never chose one: Tor unless the relay is on loopback."""
    return "direct" if relay_url is None or is_local(relay_url) else "tor"


def effective_mode(mode: object, proxy: object, relay_url: str | None) -> str:
    if mode in MODES:
        return str(mode)
    if proxy:  # a proxy set without a mode (settings.set, older clients)
        return "proxy"
    return default_mode(relay_url)


def check_mode_for_relay(mode: str, relay_url: str | None, chosen: bool = True) -> None:
    """Raise Unreachable when ``relay_url`` may not be reached in ``mode``: an onion relay
    without Tor, or, for a profile that never chose its mode and so connects directly only
    because its relay is local, any relay that is not on loopback."""
    host = urlsplit(relay_url).hostname if relay_url else None
    if mode != "direct" or not host:
        return
    if is_onion(host.lower()):
        raise NeedsTor()
    if not chosen and not is_loopback(host.lower()):
        raise NeedsChoice()


#: Where a tor program is looked for when PATH has none (Debian puts it in /usr/sbin, which
#: is not on an ordinary user's PATH; Homebrew in /opt/homebrew or /usr/local).
TOR_CANDIDATES = (
    "/usr/sbin/tor", "/usr/bin/tor", "/usr/local/sbin/tor", "/usr/local/bin/tor",
    "/opt/homebrew/bin/tor", "/opt/local/bin/tor",
)  # fmt: skip
OBFS4_NAMES = ("obfs4proxy", "lyrebird")
OBFS4_CANDIDATES = (
    "/usr/bin/obfs4proxy", "/usr/bin/lyrebird", "/usr/local/bin/obfs4proxy",
    "/usr/local/bin/lyrebird", "/opt/homebrew/bin/obfs4proxy", "/opt/homebrew/bin/lyrebird",
)  # fmt: skip

INSTALL_HINT = (
    "install Tor (Debian/Ubuntu: sudo apt install tor; Fedora: sudo dnf install tor; "
    "Arch: sudo pacman -S tor; macOS: brew install tor)"
)


def find_tor(configured: str | None = None) -> str | None:
    """The tor program to run: the configured path, else PATH, else the usual places."""
    if configured:
        return configured if is_executable(configured) else None
    found = shutil.which("tor")
    if found:
        return found
    return next((p for p in TOR_CANDIDATES if is_executable(p)), None)


def find_obfs4() -> str | None:
    for name in OBFS4_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in OBFS4_CANDIDATES if is_executable(p)), None)


def is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def tor_missing_message() -> str:
    return (
        f"no tor program found: {INSTALL_HINT}; or choose --direct knowingly (the relay then "
        "sees your IP address on every connection, and with it when you write and read)"
    )

def own_extra(store: Any) -> tuple[str, ...]:
    """Relays that count as the user's own beside its relay: the old one of a move under way
    and those the user trusts (network.trusted_relays)."""
    move = (store.get_setting("relay.move") or {}).get("from")
    trusted = store.get_setting(SETTING_TRUSTED_RELAYS) or []
    return tuple(str(u) for u in [move, *trusted] if u)
