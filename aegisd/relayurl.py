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
import socket
from collections.abc import Iterable
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


def normal_host(host: str) -> str:
    """The host as it is dialled: IDNA-mapped (``localhost`` in full-width letters is
    ``localhost``: the HTTP client maps it the same way, so every check must see the mapped
    form), lower case, without a trailing dot. Raises RelayUrlError for a name IDNA refuses."""
    host = host.lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise RelayUrlError("the relay URL's host is not a valid name") from None
    return host.rstrip(".") if not host.startswith("[") else host


def is_numeric_oddity(host: str) -> bool:
    """A host that the system reads as an IPv4 address though it is not a plain dotted quad
    (``127.1``, ``0x7f.0.0.1``, ``127.0.0.0x1``, ``2130706433``), or whose last label is a
    number (no DNS name ends in one): refused everywhere, since name checks would not see
    the address it means."""
    if ":" in host:
        return False
    try:
        ipaddress.IPv4Address(host)
        return False  # a plain dotted quad: checked as the address it is
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        pass
    last = host.rsplit(".", 1)[-1]
    hexadecimal = last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])
    return last.isdigit() or hexadecimal


def host_key(host: str | None) -> str | None:
    """A host for comparisons: the spellings of the machine's own address (``localhost``,
    ``127.0.0.1``, ``::1``, ``::ffff:127.0.0.1``) are one host. Other loopback addresses
    (127.0.0.2) stay apart: a service may listen on one of them only."""
    if host is None:
        return None
    host = host.lower().strip("[]")
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip == ipaddress.IPv6Address("::1"):
            return "127.0.0.1"
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
    return str(ip)


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
    host = normal_host(parts.hostname or "")
    if scheme not in ("ws", "wss"):
        raise RelayUrlError("the relay URL must start with wss:// (or ws:// for a local relay)")
    if not host:
        raise RelayUrlError("the relay URL has no host")
    if is_numeric_oddity(host):
        raise RelayUrlError("the relay URL's host is a number that is not a plain IP address")
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
    if not host:
        return None
    try:
        return normal_host(host)  # the host as dialled (IDNA-mapped)
    except RelayUrlError:
        return host.lower()


#: IPv6 prefixes that carry an IPv4 address in their last 32 bits: IPv4-compatible (::/96),
#: IPv4-mapped, IPv4-translated (::ffff:0:0:0/96) and NAT64 (64:ff9b::/96; a NAT64 network's
#: DNS64 answers in it, so it is judged by the IPv4 address inside).
_EMBEDS_V4_LAST32 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"))  # fmt: skip
#: Prefixes whose IPv4 address is not simply the last 32 bits, or that may reach anything:
#: refused (local-use NAT64, Teredo; 6to4 is judged by its embedded address below).
_REFUSED_V6 = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b:1::/48", "2001::/32"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _EMBEDS_V4_LAST32):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(host: str) -> bool:
    """An IP address of the public Internet (not loopback, private, link-local, shared,
    multicast, reserved or unspecified). An IPv6 address that embeds an IPv4 address
    (mapped, compatible, translated, NAT64, 6to4) counts as that IPv4 address; local-use
    NAT64 and Teredo are refused."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _REFUSED_V6):
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return inner.is_global and not inner.is_multicast
    return ip.is_global and not ip.is_multicast


def is_public_name(host: str) -> bool:
    """A DNS name that may be public: dotted, and not a name of the local machine or network.
    (Where it resolves is checked when it is dialled directly: network.PublicResolver.)"""
    host = host.rstrip(".")
    tld = host.rsplit(".", 1)[-1]
    # A numeric last label is an IPv4 address in a legacy form (127.1), never a DNS name.
    return "." in host and not tld.isdigit() and not host.endswith(_LOCAL_SUFFIXES)


def check_peer_relay_url(url: str, own_url: str | Iterable[str] | None) -> str:
    """A relay URL chosen by someone else (a contact's or a stranger's mailbox, a file's relay):
    dialled without the user choosing it, so held to a stricter policy than the user's own
    (docs/threat-model.md, "A hostile contact"). Returns the URL, normalised, or raises
    RelayUrlError.

    * a v3 onion service: allowed (ws:// too: Tor encrypts and authenticates it);
    * the host of one of the user's own relays (``own_url``: the relay, and the old one of a
      move under way): allowed, with ws:// only if that relay uses ws:// (a local or plaintext
      relay the user chose; tests run there); every loopback spelling is the same host;
    * anything else: ``wss://`` only, to a public IP address or a public DNS name (no loopback,
      private or link-local address, no ``localhost`` or local-network name), so that a contact
      cannot make the daemon knock on services of the user's machine or network."""
    url = check_relay_url(url, insecure_plaintext=True)  # the URL's form; the rest is below
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if is_onion(host):
        return url
    owns = [own_url] if isinstance(own_url, str) else list(own_url or ())
    mine = [urlsplit(o) for o in owns if o and host_key(host_of(o)) == host_key(host)]
    if mine:
        if parts.scheme == "ws" and not any(o.scheme.lower() == "ws" for o in mine):
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
