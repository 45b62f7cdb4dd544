"""How the daemon reaches relays, and whether every connection is kept apart from the others.

* ``network.mode``: ``tor`` (through the Tor the daemon runs itself: tor.py), ``proxy`` (through
  the SOCKS5 proxy in ``network.proxy``, e.g. a system Tor) or ``direct``. Absent (a profile
  that never chose): ``tor`` for a relay that is not on loopback, ``direct`` for one that is
  (docs/protocol.md §20.7). In ``tor`` and ``proxy`` modes there is no fallback to a direct
  connection: when Tor or the proxy is down, nothing connects.
* ``network.proxy``: ``socks5://HOST:PORT`` or absent. With a proxy every relay connection goes
  through it, names are resolved by the proxy (socks5h: never a local DNS lookup), and when the
  proxy cannot be reached the connection fails: there is no fallback to a direct connection.
* ``network.isolation``: one connection per receiving mailbox, owner commands and deposits on
  short-lived connections of their own. Through a proxy each connection also presents its own
  random SOCKS username and password, which makes Tor (IsolateSOCKSAuth, on by default) build a
  separate circuit for each. Default: on with a proxy, off without one, because without a proxy
  every connection comes from the same IP address, which links them anyway (docs/threat-model.md).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import resource
import secrets
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp_socks import ProxyConnector, ProxyType

from aegisd.netmode import MODES, check_mode_for_relay, effective_mode
from aegisd.relayurl import check_peer_relay_url, host_key, host_of, is_public_address

from .tor import ManagedTor, TorUnavailable

#: How long a connection waits for the managed Tor to finish bootstrapping before it fails.
TOR_READY_WAIT = 60.0

class ProxyUnavailable(Exception):
    """Mode proxy without a proxy URL (a damaged setting): nothing connects."""

    def __str__(self) -> str:
        return "network mode proxy has no proxy set: aegis network --proxy socks5://HOST:PORT"


class ProxyUrlError(ValueError):
    """The proxy URL is refused; the message says why."""


def check_proxy_url(url: str) -> str:
    """``socks5://HOST:PORT`` (``socks5h://`` is accepted as the same), normalised; no user
    info (the daemon chooses the SOCKS credentials itself), no path, query or fragment."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ProxyUrlError("the proxy URL is malformed") from None
    if parts.scheme.lower() not in ("socks5", "socks5h"):
        raise ProxyUrlError("the proxy URL must be socks5://HOST:PORT (e.g. Tor's 127.0.0.1:9050)")
    host = (parts.hostname or "").lower()
    if not host or port is None:
        raise ProxyUrlError("the proxy URL needs a host and a port: socks5://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise ProxyUrlError("the proxy URL must not hold a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyUrlError("the proxy URL must not have a path, query or fragment")
    netloc = f"[{host}]" if ":" in host else host
    return f"socks5://{netloc}:{port}"


@dataclass(frozen=True)
class Network:
    """The profile's network settings, as the transport uses them."""

    proxy: str | None = None
    isolation: bool = False
    mode: str = "direct"
    #: The managed Tor (mode ``tor``): its SOCKS port changes at every restart.
    tor: ManagedTor | None = field(default=None, compare=False)
    #: False for a profile that never chose a mode: then "direct" (its relay is local) holds
    #: for relays on loopback only (netmode.check_mode_for_relay).
    chosen: bool = True
    #: Hosts of the user's own relays (the relay, and the old one of a move under way): a
    #: connection to any other host was chosen by someone else, and its name may not resolve
    #: to a private address (PublicResolver).
    own_hosts: frozenset[str] = field(default=frozenset(), compare=False)
    #: The user's own relay URLs those hosts come from (their scheme decides whether ws:// to
    #: that host is the user's choice: relayurl.check_peer_relay_url).
    own_urls: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_settings(
        cls,
        proxy: object,
        isolation: object,
        mode: object = None,
        relay_url: str | None = None,
        tor: ManagedTor | None = None,
        also_own: tuple[str, ...] = (),
    ) -> Network:
        how = effective_mode(mode, proxy, relay_url)
        url = check_proxy_url(str(proxy)) if proxy and how == "proxy" else None
        iso = default_isolation(how) if isolation is None else bool(isolation)
        chosen = mode in MODES or bool(proxy)
        urls = tuple(u for u in (relay_url, *also_own) if u)
        own = frozenset(h for h in (host_key(host_of(u)) for u in urls) if h)
        return cls(url, iso, how, tor if how == "tor" else None, chosen, own, urls)

    def with_own(self, url: str) -> Network:
        """This network, with ``url`` among the user's own relays (a link to it)."""
        if url in self.own_urls:
            return self
        key = host_key(host_of(url))
        hosts = self.own_hosts | ({key} if key else set())
        return dataclasses.replace(self, own_hosts=frozenset(hosts), own_urls=(*self.own_urls, url))

    def is_own(self, url: str) -> bool:
        """Whether ``url`` is on a host of the user's own relays (any loopback spelling is
        the same host)."""
        return host_key(host_of(url)) in self.own_hosts

    def check_chosen_by_other(self, url: str) -> None:
        """Raise relayurl.RelayUrlError if ``url`` is not the user's own relay and fails the
        policy for relays chosen by someone else. Checked at every connection, so that URLs
        stored before the policy (or by an older version) are held to it too."""
        if not self.is_own(url):
            check_peer_relay_url(url, self.own_urls)

    @property
    def hides_address(self) -> bool:
        """Relays see a Tor exit's (or the proxy's) address, not ours."""
        return self.mode in ("tor", "proxy")

    def check(self, url: str) -> None:
        """Raise netmode.Unreachable if this mode may not connect to ``url`` at all."""
        check_mode_for_relay(self.mode, url, self.chosen)

    async def ready(self, url: str) -> None:
        """Wait until a connection to ``url`` can be attempted; raise why it cannot (check(),
        or the managed Tor not bootstrapped within TOR_READY_WAIT)."""
        self.check(url)
        if self.mode == "tor":
            if self.tor is None:
                raise TorUnavailable("Tor is not running")
            await self.tor.wait_ready(TOR_READY_WAIT)

    def connector(self, url: str | None = None) -> aiohttp.BaseConnector:
        """A connector for one connection (to ``url``). Through Tor or a proxy, names go to the
        proxy (rdns) and, with isolation, the connection gets SOCKS credentials no other
        connection has. Directly, a name of a relay that is not the user's own must resolve to
        public addresses only (a contact chose it: relayurl.check_peer_relay_url)."""
        if self.mode == "tor":
            if self.tor is None:
                raise TorUnavailable("Tor is not running")
            host, port = self.tor.socks_address()
        elif self.mode == "proxy":
            if self.proxy is None:
                raise ProxyUnavailable()
            parts = urlsplit(self.proxy)
            assert parts.hostname is not None and parts.port is not None
            host, port = parts.hostname, parts.port
        elif self.mode == "direct":
            if url is not None and not self.is_own(url):
                return PublicConnector(limit=0, resolver=PublicResolver())
            return aiohttp.TCPConnector(limit=0)
        else:  # nothing but an explicit "direct" ever connects without Tor or the proxy
            raise ProxyUnavailable()
        user = password = None
        if self.isolation:
            user, password = secrets.token_hex(8), secrets.token_hex(8)
        return ProxyConnector(
            proxy_type=ProxyType.SOCKS5,
            host=host,
            port=port,
            username=user,
            password=password,
            rdns=True,  # the proxy resolves the relay's name: no local DNS lookup
            limit=0,
        )


class PublicResolver(AbstractResolver):
    """Resolves a name chosen by someone else and keeps only its public addresses: the
    connection is made to what this returned, so a name cannot turn into a loopback or
    private address between the check and the connection (DNS rebinding)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if is_public_address(r["host"])]
        if not kept:
            raise OSError("the relay's name does not resolve to a public address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


class PublicConnector(aiohttp.TCPConnector):
    """A direct connector for a relay someone else chose: names go through PublicResolver,
    and an IP literal (which aiohttp never gives to the resolver) must be public too. Checked
    for every connection it makes, whatever URL led there."""

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.connector.Connection:  # fmt: skip
        host = (req.url.raw_host or "").strip("[]")
        if _is_ip(host) and not is_public_address(host):
            raise OSError("the relay's address is not a public address")
        return await super().connect(req, traces, timeout)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def default_isolation(mode: str) -> bool:
    return mode != "direct"


def raise_descriptor_limit() -> int:
    """Isolation holds one descriptor per receiving mailbox (measured: 200 mailboxes, 211
    descriptors): raise the soft limit to the hard one, as servers do. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft
