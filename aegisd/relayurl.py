"""Which relay URLs the daemon accepts. Standard library only.

* ``wss://`` to any host (the relay client verifies the certificate);
* ``ws://`` only to a loopback host (127.0.0.0/8, ::1, localhost), where there is no network
  to protect, or to a v3 onion service (``NAME.onion``: Tor encrypts the connection end to end
  and authenticates the relay by its name; it can only be reached through Tor);
* ``ws://`` to any other host only with the loudly named ``--insecure-plaintext-relay``
  option, since everyone on the path then sees the blocks and the timing.

The URL has no user info, query or fragment. Its path is optional: none (or ``/``) means the
relay's own endpoint, ``/v1/ws`` (docs/relay-protocol.md §1); any other path is kept, for a
relay behind a reverse proxy that serves it elsewhere. It is stored in the profile's encrypted
settings (``relay.url``, ``relay.insecure_plaintext``) by ``aegis init --relay URL``.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

SETTING_URL = "relay.url"
SETTING_INSECURE = "relay.insecure_plaintext"
INSECURE_OPTION = "--insecure-plaintext-relay"
#: The relay's WebSocket endpoint (relay/app.py), meant by a URL without a path.
DEFAULT_PATH = "/v1/ws"


class RelayUrlError(ValueError):
    """The URL is refused; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_onion(host: str) -> bool:
    """A v3 onion service name: 56 base32 characters, then .onion (subdomains allowed)."""
    labels = host.lower().rstrip(".").split(".")
    return (
        len(labels) >= 2
        and labels[-1] == "onion"
        and len(labels[-2]) == 56
        and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in labels[-2])
    )


def check_relay_url(url: str, *, insecure_plaintext: bool = False) -> str:
    """Return the URL, normalised, or raise RelayUrlError."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise RelayUrlError("the relay URL is malformed") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("ws", "wss"):
        raise RelayUrlError("the relay URL must start with wss:// (or ws:// for a local relay)")
    if not host:
        raise RelayUrlError("the relay URL has no host")
    if parts.username is not None or parts.password is not None:
        raise RelayUrlError("the relay URL must not hold a user name or password")
    if parts.query or parts.fragment:
        raise RelayUrlError("the relay URL must not have a query or fragment")
    if host.endswith(".onion") and not is_onion(host):
        raise RelayUrlError("the relay URL's .onion name is not a v3 onion address (56 characters)")
    if scheme == "ws" and not is_loopback(host) and not is_onion(host) and not insecure_plaintext:
        raise RelayUrlError(
            "ws:// is plaintext and only allowed to a loopback or onion relay; use wss://, or "
            f"{INSECURE_OPTION} if you really mean it"
        )
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{scheme}://{netloc}{_path(parts.path)}"


def check_chosen_relay_url(url: str, *, insecure_plaintext: bool = False) -> str:
    """A relay URL the user types (init, relay.set): the policy of `check_relay_url`, and a
    path that is the relay's, so that a typo (`/ws`) is refused at once instead of showing up
    later as a relay that answers 404. Relays behind a proxy may add a prefix (`/chat/v1/ws`).
    Links from others are not held to it: their daemons checked them when chosen."""
    url = check_relay_url(url, insecure_plaintext=insecure_plaintext)
    path = urlsplit(url).path
    if not path.endswith(DEFAULT_PATH):
        raise RelayUrlError(
            f"the relay URL's path must end in {DEFAULT_PATH}, the relay's WebSocket path "
            f"(or be left out): e.g. wss://HOST{DEFAULT_PATH}"
        )
    return url


#: Names that never lead to a public relay: they resolve on the user's own machine or network.
_LOCAL_SUFFIXES = (".localhost", ".local", ".localdomain", ".internal", ".lan", ".home.arpa",
                   ".intranet", ".corp", ".home", ".test", ".invalid", ".example")  # fmt: skip


def host_of(url: str | None) -> str | None:
    """The URL's host, lower case (None without a URL or host)."""
    if not url:
        return None
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return host.lower() if host else None


def is_public_address(host: str) -> bool:
    """An IP address of the public Internet (not loopback, private, link-local, shared,
    multicast, reserved or unspecified; an IPv4-mapped IPv6 address counts as its IPv4)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def is_public_name(host: str) -> bool:
    """A DNS name that may be public: dotted, and not a name of the local machine or network.
    (Where it resolves is checked when it is dialled directly: network.PublicResolver.)"""
    host = host.rstrip(".")
    tld = host.rsplit(".", 1)[-1]
    # A numeric last label is an IPv4 address in a legacy form (127.1), never a DNS name.
    return "." in host and not tld.isdigit() and not host.endswith(_LOCAL_SUFFIXES)


def check_peer_relay_url(url: str, own_url: str | None) -> str:
    """A relay URL chosen by someone else (a contact's or a stranger's mailbox, a file's relay):
    dialled without the user choosing it, so held to a stricter policy than the user's own
    (docs/threat-model.md, "A hostile contact"). Returns the URL, normalised, or raises
    RelayUrlError.

    * a v3 onion service: allowed (ws:// too: Tor encrypts and authenticates it);
    * the host of the user's own relay (``own_url``): allowed, with ws:// only if the own relay
      uses ws:// (a local or plaintext relay the user chose; tests run there);
    * anything else: ``wss://`` only, to a public IP address or a public DNS name (no loopback,
      private or link-local address, no ``localhost`` or local-network name), so that a contact
      cannot make the daemon knock on services of the user's machine or network."""
    url = check_relay_url(url, insecure_plaintext=True)  # the URL's form; the rest is below
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if is_onion(host):
        return url
    own = urlsplit(own_url) if own_url else None
    if own is not None and host == (own.hostname or "").lower():
        if parts.scheme == "ws" and own.scheme.lower() != "ws":
            raise RelayUrlError("a contact's relay URL must use wss://")
        return url
    if parts.scheme != "wss":
        raise RelayUrlError("a contact's relay URL must use wss:// (or be an onion service)")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if not is_public_name(host):
            raise RelayUrlError("a contact's relay URL names a local host") from None
        return url
    if not is_public_address(host):
        raise RelayUrlError("a contact's relay URL is a loopback, private or local address")
    return url


def relay_endpoint(url: str) -> str:
    """The URL a connection is made to: `url` with the default path when it has none.

    For URLs that were stored or received before the path became optional (a profile made with
    ``ws://127.0.0.1:8765``, a contact's invitation): no policy check here, only the path."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url  # malformed: the connection fails and says so
    path = _path(parts.path)
    if path == parts.path:
        return url
    return parts._replace(path=path).geturl()


def same_relay(a: str | None, b: str | None) -> bool:
    """Whether two URLs name the same relay endpoint: ``ws://h:p`` and ``ws://h:p/v1/ws`` do
    (and a host or scheme spelled in capitals). Every comparison of relay URLs uses this."""
    if a is None or b is None:
        return a is b
    return endpoint_key(a) == endpoint_key(b)


def endpoint_key(url: str) -> str:
    """The normalised endpoint of `url` (for comparisons and as a key; never dialled)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return url
    host = (parts.hostname or "").lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{parts.scheme.lower()}://{netloc}{_path(parts.path)}"


def _path(path: str) -> str:
    return DEFAULT_PATH if path in ("", "/") else path
