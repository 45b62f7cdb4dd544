"""The ``aegisd`` command.

    aegisd [run] [--home DIR] [--passphrase-file F] [--log-level LEVEL]
    aegisd init  [--home DIR] (--passphrase-file F | --no-passphrase) [--relay URL]
                 [--tor | --proxy socks5://HOST:PORT | --direct] [--tor-path PATH]

``aegis daemon`` and ``aegis init`` run these, so that the thin CLI never loads the
cryptography or SQLCipher itself. A passphrase file holds the passphrase on its first line
("-" reads standard input); one trailing newline is removed. Log lines go to stderr, each with its
UTC time, and are life-cycle events or counts (never one per message); they hold
no key, passphrase, message text or address.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from . import __version__
from .paths import PathError, check_socket_path, resolve
from .secretfile import SecretFileError, read_first_line


def read_passphrase_file(name: str) -> str:
    """The first line of ``name`` ('-' for stdin), without its line ending."""
    try:
        return read_first_line(name)
    except SecretFileError as exc:
        raise SystemExit(f"aegisd: error: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aegisd", description="The AegisLink per-user daemon.")
    p.add_argument("--version", action="version", version=f"aegisd {__version__}")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve the profile (the default)")
    run.add_argument("--home", help="profile directory (default: AEGIS_HOME, else XDG dirs)")
    run.add_argument("--passphrase-file", help="unlock at start with the passphrase in FILE")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--test-methods", action="store_true", help=argparse.SUPPRESS)
    init = sub.add_parser("init", help="create a profile")
    init.add_argument("--home")
    g = init.add_mutually_exclusive_group(required=True)
    g.add_argument("--passphrase-file", help="the new passphrase, first line of FILE ('-': stdin)")
    g.add_argument("--no-passphrase", action="store_true", help="keep the key in a 0600 file")
    init.add_argument("--relay", metavar="URL", help="the relay (wss://, or ws:// to loopback)")
    how = init.add_mutually_exclusive_group()
    how.add_argument(
        "--tor",
        action="store_true",
        help="reach relays through a Tor the daemon runs itself (the default for a relay "
        "that is not on loopback)",
    )
    how.add_argument(
        "--proxy",
        metavar="URL",
        help="reach relays only through this SOCKS5 proxy, e.g. a system Tor: "
        "socks5://127.0.0.1:9050",
    )
    how.add_argument(
        "--direct",
        action="store_true",
        help="connect to relays directly: the relay sees your IP address",
    )
    init.add_argument("--tor-path", metavar="PATH", help="the tor program (default: searched)")
    init.add_argument(
        "--insecure-plaintext-relay",
        action="store_true",
        help="allow a ws:// (unencrypted) relay on another host",
    )
    # Argon2id cost; the defaults are the store's (64 MiB, 3 passes, 4 lanes). Tests lower them.
    init.add_argument("--kdf-memory-kib", type=int, help=argparse.SUPPRESS)
    init.add_argument("--kdf-time-cost", type=int, help=argparse.SUPPRESS)
    init.add_argument("--kdf-parallelism", type=int, help=argparse.SUPPRESS)
    return p


def _init(args: argparse.Namespace) -> int:
    from .netmode import (
        SETTING_MODE,
        SETTING_PROXY,
        SETTING_TOR_PATH,
        NeedsTor,
        check_mode_for_relay,
        effective_mode,
        find_tor,
        tor_missing_message,
    )
    from .relayurl import SETTING_INSECURE, SETTING_URL, RelayUrlError, check_chosen_relay_url
    from .store import DEFAULT_KDF, KdfParams, ProfileExists, StoreError, create_profile
    from .transport.network import ProxyUrlError, check_proxy_url

    paths = resolve(args.home)
    check_socket_path(paths.socket)  # refuse a profile whose socket could never be bound
    relay = None
    if args.relay is not None:
        try:
            relay = check_chosen_relay_url(
                args.relay, insecure_plaintext=args.insecure_plaintext_relay
            )
        except RelayUrlError as exc:
            print(f"aegisd: error: {exc}", file=sys.stderr)
            return 1
    proxy = None
    if args.proxy is not None:
        try:
            proxy = check_proxy_url(args.proxy)
        except ProxyUrlError as exc:
            print(f"aegisd: error: {exc}", file=sys.stderr)
            return 1
    mode = "tor" if args.tor else "proxy" if proxy else "direct" if args.direct else None
    if args.tor_path is not None:
        from .transport.tor import TorConfigError, check_tor_path

        try:
            check_tor_path(args.tor_path)
        except TorConfigError as exc:
            print(f"aegisd: error: --tor-path: {exc}", file=sys.stderr)
            return 1
    how = effective_mode(mode, proxy, relay)
    try:
        check_mode_for_relay(how, relay)
    except NeedsTor as exc:
        print(f"aegisd: error: {exc}", file=sys.stderr)
        return 1
    if how == "tor" and relay is not None and find_tor(args.tor_path) is None:
        print(f"aegisd: error: {tor_missing_message()}", file=sys.stderr)
        return 1
    passphrase = None if args.no_passphrase else read_passphrase_file(args.passphrase_file)
    if passphrase is not None:
        from .passphrase_strength import problem

        weak = problem(passphrase)  # the rule passphrase.change and backup.export apply
        if weak is not None:
            print(f"aegisd: error: {weak}", file=sys.stderr)
            return 1
    kdf = KdfParams(
        args.kdf_memory_kib or DEFAULT_KDF.memory_kib,
        args.kdf_time_cost or DEFAULT_KDF.time_cost,
        args.kdf_parallelism or DEFAULT_KDF.parallelism,
    )
    try:
        store = create_profile(paths.home, passphrase, kdf)
        try:
            with store.transaction():
                if relay is not None:
                    store.set_setting(SETTING_URL, relay)
                    store.set_setting(SETTING_INSECURE, bool(args.insecure_plaintext_relay))
                if proxy is not None:
                    store.set_setting(SETTING_PROXY, proxy)
                if mode is not None:  # else the default: Tor unless the relay is on loopback
                    store.set_setting(SETTING_MODE, mode)
                if args.tor_path is not None:
                    store.set_setting(SETTING_TOR_PATH, args.tor_path)
        finally:
            store.close()
    except ProfileExists:
        print(f"aegisd: error: a profile already exists in {paths.home}", file=sys.stderr)
        return 1
    except (StoreError, ValueError) as exc:
        print(f"aegisd: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from .daemon import Daemon, DaemonError
    from .store import StoreError

    # Every line starts with its UTC time, to the second. Lines are life-cycle events (start,
    # unlock, lock, the relay link's state, Tor's state, stop) or aggregates (aegisd/droplog.py):
    # never one per message, which a seized disk would turn into a diary.
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(
        "%(asctime)s aegisd: %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    paths = resolve(args.home)
    check_socket_path(paths.socket)
    passphrase = read_passphrase_file(args.passphrase_file) if args.passphrase_file else None

    async def main() -> None:
        daemon = Daemon(paths, test_methods=args.test_methods)
        await daemon.run(passphrase, have_passphrase=args.passphrase_file is not None)

    try:
        asyncio.run(main())
    except (DaemonError, StoreError) as exc:
        print(f"aegisd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "init", "-h", "--help", "--version"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args)
        return _run(args)
    except PathError as exc:
        print(f"aegisd: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
