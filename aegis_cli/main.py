"""``aegis``: the thin command-line client of aegisd.

It speaks JSON-RPC to the daemon's socket and imports no cryptography, nacl, sqlcipher3,
aiohttp or aiortc (tests/daemon/test_cli.py checks sys.modules). The two commands that need
the store without a running daemon, ``init`` and ``daemon``, run ``aegisd`` in a child process.

Every command takes --home DIR (or AEGIS_HOME) and --json, before or after the command's name
(`aegis --home DIR status` and `aegis status --home DIR` are the same). Errors are one line on
stderr (with --json, one JSON object on stdout; aegis_cli/errors.py) and a non-zero exit
status: 1 error, 2 usage, 3 the daemon is not running, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from aegis_client import safe_text
from aegis_client.safe_text import body, one_line
from aegisd.paths import PathError, ProfilePaths, check_socket_path, resolve
from aegisd.relayurl import RelayUrlError, check_chosen_relay_url
from aegisd.secretfile import SecretFileError, read_first_line

from . import actions, units
from .client import Client, DaemonNotRunning, RpcCallError
from .errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_RUNNING,
    EXIT_USAGE,
    Fail,
    connection_lost,
    printable,
    user_message,
)

F = TypeVar("F", bound=Callable[..., Any])

#: The last command's context, for wording an error after the command failed (main()).
_current: Ctx | None = None


class Ctx:
    def __init__(self, home: str | None, as_json: bool) -> None:
        self.home = home
        self.as_json = as_json
        self.paths: ProfilePaths = resolve(home)
        global _current
        _current = self

    def client(self, timeout: float | None = 60.0) -> Client:
        try:
            check_socket_path(self.paths.socket)
            return Client(self.paths.socket, timeout=timeout)
        except DaemonNotRunning:
            raise not_running(self.paths) from None
        except PermissionError:
            raise Fail(f"permission denied on {self.paths.socket}") from None

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            return c.call(method, params)

    def out(self, result: dict[str, Any], text: str) -> None:
        if self.as_json:
            click.echo(json.dumps(result, sort_keys=True))
        else:
            # Each command shows what a peer chose through aegis_client.safe_text already;
            # this is the last guard: nothing that reaches the terminal is a control.
            click.echo(safe_text.lines(text))

    def aegisd_argv(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "aegisd.main", *args]
        if self.home:
            argv += ["--home", str(self.paths.home)]
        return argv


def not_running(paths: ProfilePaths) -> Fail:
    if not paths.keyring.exists():  # no daemon can run: there is no profile yet
        return Fail(
            f"no profile in {paths.home}; create one with: aegis init{paths.home_option()}"
            " --relay URL",
            EXIT_NOT_RUNNING,
            {"error": "not_running"},
        )
    return Fail(
        f"the daemon is not running; start it with: aegis daemon{paths.home_option()}",
        EXIT_NOT_RUNNING,
        {"error": "not_running"},
    )


HOME_HELP = (
    "Profile directory: every file of the profile, socket included, lives there "
    "(default: $AEGIS_HOME, else the per-user data directory)."
)
JSON_HELP = "Print results (and errors) as JSON."


def common(func: F) -> F:
    """--home and --json on every command, with the same meaning as before the command name.

    Given before and after the command name, --json is on if either says so; two different
    --home values are refused (a usage error) rather than one silently winning."""

    @click.option("--home", metavar="DIR", help=HOME_HELP)
    @click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
    @functools.wraps(func)
    def wrapper(home: str | None, as_json: bool, **kwargs: Any) -> Any:
        here = click.get_current_context()
        root = here.find_root().params
        homes = [h for h in (root.get("home"), *here.meta.get("aegis.home", []), home) if h]
        for other in homes[1:]:
            if not _same_dir(homes[0], other):
                raise click.UsageError(
                    f"--home is given twice ({homes[0]} and {other}): give it once"
                )
        as_json = as_json or bool(root.get("as_json")) or bool(here.meta.get("aegis.as_json"))
        ctx = Ctx(homes[0] if homes else None, as_json)
        click.get_current_context().obj = ctx
        return func(ctx, **kwargs)

    return wrapper  # type: ignore[return-value]


def _same_dir(a: str, b: str) -> bool:
    norm = [os.path.abspath(os.path.expanduser(x)) for x in (a, b)]
    return norm[0] == norm[1]


def read_secret_file(name: str) -> str:
    """First line of a passphrase file ('-' is standard input), without its line ending."""
    try:
        return read_first_line(name)
    except SecretFileError as exc:
        raise Fail(str(exc)) from None


#: How many times a new passphrase is asked for (too weak, or the two entries differ).
NEW_SECRET_ATTEMPTS = 3


def strength_problem(passphrase: str) -> str | None:
    """The daemon's strength rule (aegisd/passphrase_strength.py), applied here first so that a
    weak passphrase is refused before it is typed a second time. Imported lazily: its
    dictionaries are for the commands that choose a passphrase."""
    from aegisd.passphrase_strength import problem

    return problem(passphrase)


def ask_secret(prompt: str, *, confirm: bool = False, option: str) -> str:
    """Ask for a passphrase, never echoed. ``confirm``: a new passphrase: the strength rule is
    checked first, then it is asked for again (a weak or mistyped one is asked for anew)."""
    if not sys.stdin.isatty():
        raise Fail(f"no terminal to ask for the passphrase: use {option} FILE ('-' for stdin)")
    for attempt in range(1, NEW_SECRET_ATTEMPTS + 1):
        value = str(click.prompt(prompt, hide_input=True, err=True))
        if not value:
            raise Fail("the passphrase must not be empty")
        if not confirm:
            return value
        problem = strength_problem(value)
        if problem is None:
            again = str(click.prompt("Repeat for confirmation", hide_input=True, err=True))
            if again == value:
                return value
            problem = "the two entries do not match"
        if attempt == NEW_SECRET_ATTEMPTS:
            raise Fail(problem)
        click.echo(f"{problem}\nTry again.", err=True)
    raise AssertionError("unreachable")


def new_secret_from_file(name: str) -> str:
    """A new passphrase from a file: the strength rule before anything else happens."""
    value = read_secret_file(name)
    problem = strength_problem(value) if value else None
    if problem is not None:
        raise Fail(problem, data={"error": "weak_passphrase"})
    return value


WEAK_NOTE = "your passphrase is weak: change it with: aegis passphrase"


def _wait(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _answers(paths: ProfilePaths) -> bool:
    try:
        with Client(paths.socket, timeout=5) as c:
            c.call("version")
        return True
    except (DaemonNotRunning, OSError, RpcCallError, ValueError):
        return False


# -- commands -----------------------------------------------------------------------------


def _summary(help_text: str | None) -> str:
    """A command's one-line summary in `aegis --help`: its docstring's whole first sentence.

    click cuts the first line at the terminal's width minus the longest command name, so
    summaries ended mid-sentence with "..."; a summary is a sentence and is never cut (it
    wraps instead: keep first sentences short)."""
    words = (help_text or "").partition("\n\n")[0].split()
    for i, word in enumerate(words):
        if word.endswith(".") and (i == len(words) - 1 or not words[i + 1][:1].islower()):
            return " ".join(words[: i + 1])
    return " ".join(words)


class AegisCommand(click.Command):
    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or _summary(self.help)


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A group's --home/--json (aegis relay --home DIR show): kept in the context's meta, which
    every context of the command line shares, for `common` to read."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value:
            ctx.meta.setdefault(f"aegis.{name}", []).append(value)
        return value

    return callback


class AegisGroup(click.Group):
    command_class = AegisCommand
    group_class = type  # subgroups (aegis contact ...) are AegisGroups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(p.name == "home" for p in self.params):  # a subgroup: same options
            self.params += [
                click.Option(["--home"], metavar="DIR", help=HOME_HELP, expose_value=False,
                             callback=_remember("home")),
                click.Option(["--json", "as_json"], is_flag=True, help=JSON_HELP,
                             expose_value=False, callback=_remember("as_json")),
            ]  # fmt: skip

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or _summary(self.help)


@click.group(cls=AegisGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aegislink", prog_name="aegis")
@click.option("--home", metavar="DIR", help=HOME_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def cli(home: str | None, as_json: bool) -> None:
    """AegisLink: an end-to-end encrypted messenger that hides metadata from its relay.

    --home and --json go before or after the command's name. Lists (messages,
    attachments, requests, invitations, calls) are in the order things happened, oldest
    first, as in a chat log; contacts are in the order of their names; conversations and
    search results are newest first. Times are local."""


@cli.command()
@common
@click.option(
    "--passphrase-file", metavar="FILE", help="Read the passphrase from FILE ('-': stdin)."
)
@click.option("--no-passphrase", is_flag=True, help="No passphrase: the key goes in a 0600 file.")
@click.option(
    "--relay", metavar="URL", help="The relay: wss://HOST[:PORT][/PATH] (ws:// if local)."
)
@click.option(
    "--insecure-plaintext-relay",
    is_flag=True,
    help="Allow an unencrypted ws:// relay on another host (everyone on the path sees it).",
)
@click.option(
    "--tor",
    "use_tor",
    is_flag=True,
    help="Reach relays through a Tor the daemon runs itself (the default for a relay that is "
    "not on this machine).",
)
@click.option(
    "--proxy",
    metavar="URL",
    help="Reach relays only through this SOCKS5 proxy (a system Tor: socks5://127.0.0.1:9050).",
)
@click.option(
    "--direct",
    is_flag=True,
    help="Connect to relays without Tor: the relay sees your IP address.",
)
@click.option("--tor-path", metavar="PATH", help="The tor program (default: searched).")
@click.option(
    "--link",
    "link_text",
    metavar="LINK",
    help="Join a profile as a new device: the link `aegis device link` printed (needs --relay); "
    "`-` reads it from standard input (a link in argv is visible to the machine's users).",
)
@click.option("--yes", is_flag=True, help="With --link: take the profile without asking.")
@click.option("--kdf-memory-kib", type=int, hidden=True)
@click.option("--kdf-time-cost", type=int, hidden=True)
@click.option("--kdf-parallelism", type=int, hidden=True)
def init(
    ctx: Ctx,
    passphrase_file: str | None,
    no_passphrase: bool,
    relay: str | None,
    insecure_plaintext_relay: bool,
    use_tor: bool,
    proxy: str | None,
    direct: bool,
    tor_path: str | None,
    link_text: str | None,
    yes: bool,
    kdf_memory_kib: int | None,
    kdf_time_cost: int | None,
    kdf_parallelism: int | None,
) -> None:
    """Create a profile (a new database and its key).

    Relays are reached through a Tor the daemon runs itself, unless the relay is on this
    machine (loopback) or you choose --proxy or --direct."""
    import subprocess  # only here and in `daemon`: keeps the other commands' start-up lean

    from aegisd.netmode import effective_mode, find_tor, tor_missing_message

    if passphrase_file and no_passphrase:
        raise Fail("--passphrase-file and --no-passphrase exclude each other", EXIT_USAGE)
    if sum((use_tor, proxy is not None, direct)) > 1:
        raise Fail("--tor, --proxy and --direct exclude each other", EXIT_USAGE)
    if link_text is not None and relay is None:
        raise Fail("--link needs --relay (this device's relay)", EXIT_USAGE)
    if (ctx.paths.keyring).exists():
        raise Fail(f"a profile already exists in {ctx.paths.home}")
    check_socket_path(ctx.paths.socket)
    if relay is not None:  # before asking for a passphrase; aegisd checks it again
        try:
            check_chosen_relay_url(relay, insecure_plaintext=insecure_plaintext_relay)
        except RelayUrlError as exc:
            raise Fail(str(exc)) from None
        mode = "tor" if use_tor else "proxy" if proxy else "direct" if direct else None
        if tor_path is not None:
            tor_path = os.path.abspath(os.path.expanduser(tor_path))
        if effective_mode(mode, proxy, relay) == "tor" and find_tor(tor_path) is None:
            if tor_path is not None:
                raise Fail(f"--tor-path: {tor_path} is not an executable file")
            raise Fail(tor_missing_message())  # aegisd checks it again
    argv = ctx.aegisd_argv("init")
    stdin = None
    pw = None
    if link_text is not None:
        from .devices import read_link

        link_text = read_link(link_text)
        if no_passphrase:
            click.echo("WARNING: --no-passphrase: this machine will keep the profile's identity "
                       "keys with no passphrase; anyone who reads its disk holds them.",
                       err=True)  # fmt: skip
    home_before = set(os.listdir(ctx.paths.home)) if ctx.paths.home.is_dir() else None
    if no_passphrase:
        argv.append("--no-passphrase")
    else:
        pw = (
            new_secret_from_file(passphrase_file)
            if passphrase_file
            else ask_secret("New passphrase", confirm=True, option="--passphrase-file")
        )
        argv += ["--passphrase-file", "-"]
        stdin = pw + "\n"
    if relay is not None:
        argv += ["--relay", relay]
    if insecure_plaintext_relay:
        argv.append("--insecure-plaintext-relay")
    if proxy is not None:  # aegisd checks it (the CLI imports nothing of the transport)
        argv += ["--proxy", proxy]
    if use_tor:
        argv.append("--tor")
    if direct:
        argv.append("--direct")
    if tor_path is not None:
        argv += ["--tor-path", os.path.abspath(os.path.expanduser(tor_path))]
    for flag, value in (
        ("--kdf-memory-kib", kdf_memory_kib),
        ("--kdf-time-cost", kdf_time_cost),
        ("--kdf-parallelism", kdf_parallelism),
    ):
        if value is not None:
            argv += [flag, str(value)]
    proc = subprocess.run(  # noqa: S603 (our own interpreter and module)
        argv, input=stdin, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        msg = lines[-1].removeprefix("aegisd: error: ") if lines else "aegisd init failed"
        raise Fail(msg)
    if link_text is not None:
        from .devices import join_new_device

        click.echo(f"Created a profile in {ctx.paths.home}; starting its daemon.", err=True)
        join_new_device(ctx, link_text, pw, yes, lambda: _answers(ctx.paths), home_before)
        return
    ctx.out(
        {"home": str(ctx.paths.home), "has_passphrase": not no_passphrase},
        f"Created a profile in {ctx.paths.home}"
        f" ({'no passphrase' if no_passphrase else 'passphrase-protected'}).\n"
        f"Start the daemon with: aegis daemon{ctx.paths.home_option()}"
        + ("" if relay else
           f"\nNo relay yet: choose one with: aegis relay set URL{ctx.paths.home_option()}"),
    )


@cli.command(short_help="Start aegisd for this profile.")
@common
@click.option("--detach", is_flag=True, help="Run in the background; log to aegisd.log.")
@click.option("--passphrase-file", metavar="FILE", help="Unlock at start with this passphrase.")
@click.option("--test-methods", is_flag=True, hidden=True)
def daemon(ctx: Ctx, detach: bool, passphrase_file: str | None, test_methods: bool) -> None:
    """Start aegisd for this profile (in the foreground unless --detach)."""
    import subprocess

    if not ctx.paths.keyring.exists():
        raise Fail(
            f"no profile in {ctx.paths.home}: create one with: aegis init{ctx.paths.home_option()}"
        )
    check_socket_path(ctx.paths.socket)
    if _answers(ctx.paths):
        raise Fail("the daemon is already running")
    argv = ctx.aegisd_argv("run")
    if passphrase_file:
        argv += ["--passphrase-file", os.path.abspath(passphrase_file)]
    if test_methods:
        argv.append("--test-methods")
    if not detach:
        sys.stdout.flush()
        os.execv(sys.executable, argv)  # noqa: S606 (replace this process: signals go to aegisd)
    log_path = ctx.paths.log
    ctx.paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    if not _wait(lambda: proc.poll() is not None or _answers(ctx.paths), 30):
        raise Fail(f"aegisd did not answer within 30 s; see {log_path}")
    if proc.poll() is not None:
        last = ""
        try:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            # The text after the marker: log lines may start with a timestamp.
            last = lines[-1].partition("aegisd: error: ")[2] or lines[-1] if lines else ""
        except OSError:
            pass
        raise Fail(last or f"aegisd exited with status {proc.returncode}; see {log_path}")
    status = ctx.call("status")
    ctx.out(
        {"pid": proc.pid, "locked": status["locked"], "log": str(log_path)},
        f"aegisd started (pid {proc.pid}, {'locked' if status['locked'] else 'unlocked'}); "
        f"log: {log_path}",
    )


@cli.command()
@common
def stop(ctx: Ctx) -> None:
    """Stop the daemon."""
    ctx.call("daemon.stop")
    if not _wait(lambda: not _answers(ctx.paths), 15):
        raise Fail("the daemon did not stop within 15 s")
    ctx.out({"stopped": True}, "aegisd stopped")


@cli.command(short_help="Show the daemon's state and its relay connection.")
@common
def status(ctx: Ctx) -> None:
    """Show whether the daemon runs, is locked, and is connected to its relay."""
    from .network import describe_tor, relay_text

    st = ctx.call("status")
    net = st.get("network") or {}
    net_text = ""
    if net.get("mode"):
        net_text = f"\nnetwork: {net['mode']}"
        if net["mode"] == "tor":
            net_text += f" ({describe_tor(net.get('tor'))})"
    ctx.out(
        st,
        f"aegisd {st['version']} (pid {st['pid']}): {'locked' if st['locked'] else 'unlocked'}\n"
        f"passphrase: {'yes' if st['has_passphrase'] else 'no'}"
        f"{' (' + WEAK_NOTE + ')' if st.get('weak_passphrase') else ''}\n"
        f"relay: {relay_text(st)}{net_text}"
        + (f"\nWARNING: {st['superseded']}" if st.get("superseded") else "")
        + (f"\nWARNING: {st['relay_lost']}" if st.get("relay_lost") else "")
        + (f"\nNOTE: {st['address_renewed']} (aegis address shows the new link)"
           if st.get("address_renewed") else "")
        + (f"\nWARNING: {(st.get('relay') or {})['refusing']}"
           if (st.get("relay") or {}).get("refusing") else "")
        + (f"\ncontacts failed: {', '.join(map(one_line, st['contacts_failed']))}"
           " (aegis contacts says why)"
           if st.get("contacts_failed") else ""),
    )


@cli.command()
@common
@click.option(
    "--passphrase-file", metavar="FILE", help="Read the passphrase from FILE ('-': stdin)."
)
def unlock(ctx: Ctx, passphrase_file: str | None) -> None:
    """Unlock the profile (prompts for the passphrase)."""
    with ctx.client() as c:
        st = c.call("status")
        if not st["has_passphrase"] and not passphrase_file:
            result = c.call("unlock")
        else:
            # A passphrase file for a profile without a passphrase goes to the daemon all the
            # same: it answers 1004 no_passphrase (docs/api.md), rather than "unlocked".
            pw = (
                read_secret_file(passphrase_file)
                if passphrase_file
                else ask_secret("Passphrase", option="--passphrase-file")
            )
            result = c.call("unlock", {"passphrase": pw})
    text = "unlocked"
    if result.get("weak_passphrase"):
        text += f"\n{WEAK_NOTE}"
    ctx.out(result, text)


@cli.command(short_help="Lock the profile (the daemon forgets its key).")
@common
def lock(ctx: Ctx) -> None:
    """Lock the profile: the daemon closes the database and forgets its key."""
    ctx.call("lock")
    ctx.out({"locked": True}, "locked")


@cli.command(short_help="Change the profile passphrase.")
@common
@click.option("--old-passphrase-file", metavar="FILE", help="The current passphrase, from FILE.")
@click.option("--new-passphrase-file", metavar="FILE", help="The new passphrase, from FILE.")
@click.option("--no-passphrase", is_flag=True, help="Remove the passphrase (key in a 0600 file).")
def passphrase(
    ctx: Ctx, old_passphrase_file: str | None, new_passphrase_file: str | None, no_passphrase: bool
) -> None:
    """Change the passphrase (the database key is re-wrapped, not the database)."""
    if new_passphrase_file and no_passphrase:
        raise Fail("--new-passphrase-file and --no-passphrase exclude each other", EXIT_USAGE)
    with ctx.client() as c:
        st = c.call("status")
        old = None
        if st["has_passphrase"]:
            old = (
                read_secret_file(old_passphrase_file)
                if old_passphrase_file
                else ask_secret("Current passphrase", option="--old-passphrase-file")
            )
        new = None
        if not no_passphrase:
            new = (
                new_secret_from_file(new_passphrase_file)
                if new_passphrase_file
                else ask_secret("New passphrase", confirm=True, option="--new-passphrase-file")
            )
        result = c.call("passphrase.change", {"old_passphrase": old, "new_passphrase": new})
    ctx.out(result, "passphrase changed" if new is not None else "passphrase removed")


@cli.command(short_help="The full-screen chat client (F1 lists its keys).")
@common
def chat(ctx: Ctx) -> None:
    """A full-screen client: conversations, messages as they arrive, contact requests,
    invitations and the daemon's state. F1 or ? lists the keys; Ctrl+Q quits. It needs the
    daemon running (aegis daemon) and waits for it when it stops."""
    ctx.client().close()  # the daemon is running and the socket is ours, or a clear error
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        raise Fail("aegis chat needs a terminal (for scripts: aegis send, aegis listen)")
    # Textual is imported here only: no other command loads it.
    from .chat.app import run

    failure = run(ctx.paths.socket)
    if failure is not None:
        raise Fail(failure)


@cli.command(short_help="Print events as they happen, until interrupted.")
@common
@click.option("--since", type=int, metavar="SEQ", help="First replay the events after SEQ.")
@click.option(
    "--type", "types", multiple=True, metavar="TYPE", help="Only these types (e.g. message.*)."
)
def listen(ctx: Ctx, since: int | None, types: tuple[str, ...]) -> None:
    """Print events as they happen, one line each, until interrupted.

    A line gives the local time, who and what happened; with --json, each event is one JSON
    object (seq, type, time_ms, data). When the daemon stops or restarts, listen says so on
    standard error, waits for it and goes on after the last event it printed: none is
    printed twice or missed (typing indicators are live: shown as they come, never stored,
    so missed while listen is not running). Ctrl-C ends it (exit status 0)."""
    from .listen import describe, follow

    params: dict[str, Any] = {"types": list(types)} if types else {}

    def emit(ev: dict[str, Any]) -> None:
        if ctx.as_json:  # as events.list gives it: the subscription id changes on reconnect
            ev = {k: v for k, v in ev.items() if k != "subscription"}
            click.echo(json.dumps(ev, sort_keys=True))
        else:
            click.echo(safe_text.fit(describe(ev), safe_text.terminal_width()))

    try:
        follow(lambda: ctx.client(timeout=None), params, since, emit)
    except KeyboardInterrupt:  # Ctrl-C is how listen is meant to end: no error
        sys.exit(0)


# -- messaging ----------------------------------------------------------------------------


_when = units.when


def _print_link(ctx: Ctx, result: dict[str, Any], qr: bool, note: str) -> None:
    """The link alone on standard output (so `$(aegis invite)` is the link); a note on stderr."""
    link = str(result["link"])
    if ctx.as_json:
        ctx.out(result, link)
        return
    if qr:
        click.echo(_qr_text(link), nl=False)
    click.echo(link)
    click.echo(note, err=True)


def _qr_text(link: str) -> str:
    from aegis_client.qr import QRUnavailable, qr_text  # lazily: only `--qr` pays for it

    try:
        return qr_text(link)
    except QRUnavailable:
        raise Fail("--qr needs the segno package: pip install segno") from None


@cli.command()
@common
@click.option(
    "--expires",
    type=click.IntRange(60, 90 * 24 * 3600),
    default=7 * 24 * 3600,
    show_default=True,
    metavar="SECONDS",
    help="The invitation is void after this many seconds.",
)
@click.option("--qr", is_flag=True, help="Also print the link as a QR code.")
def invite(ctx: Ctx, expires: int, qr: bool) -> None:
    """Create a one-time invitation link (void once used)."""
    result = ctx.call("invitations.create", {"expires_in": expires})
    until = _when(result["expires_at"])
    _print_link(
        ctx,
        result,
        qr,
        f"One-time invitation {result['invitation']}, valid until {until}.\n"
        "The other side runs: aegis contact add NAME LINK",
    )


@cli.command()
@common
@click.option("--revoke", metavar="ID", help="Revoke this invitation: its link stops working.")
def invitations(ctx: Ctx, revoke: str | None) -> None:
    """List your unused invitations (or revoke one)."""
    if revoke is not None:
        result = ctx.call("invitations.revoke", {"invitation": revoke})
        ctx.out(result, f"revoked invitation {revoke}")
        return
    result = ctx.call("invitations.list")
    lines = [
        f"{i['invitation']}  valid until {_when(i['expires_at'])}"
        for i in result["invitations"]
    ]
    ctx.out(result, "\n".join(lines) if lines else "no unused invitations")


@cli.command(short_help="Show your long-term contact address.")
@common
@click.option("--rotate", is_flag=True, help="Replace the address: the old one stops working.")
@click.option("--qr", is_flag=True, help="Also print the link as a QR code.")
def address(ctx: Ctx, rotate: bool, qr: bool) -> None:
    """Show your long-term contact address (requests to it wait for `aegis accept`)."""
    result = ctx.call("address.rotate" if rotate else "address.get")
    note = (
        "A new address; the old one no longer works."
        if rotate
        else ("Requests sent to this address wait for: aegis requests / aegis accept ID")
    )
    _print_link(ctx, result, qr, note)


def _safety_lines(number: str, indent: str = "  ") -> str:
    groups = [number[i : i + 5] for i in range(0, len(number), 5)]
    return "\n".join(indent + " ".join(groups[i : i + 4]) for i in range(0, len(groups), 4))


@cli.command(short_help="List contact requests waiting for an answer.")
@common
def requests(ctx: Ctx) -> None:
    """List contact requests waiting for you to accept or reject them."""
    result = ctx.call("requests.list")
    reqs = result["requests"]
    shown: list[str] = []
    for r in reqs:
        shown.append(f"{r['request']}  {one_line(r['name'] or '(no name)')}  "
                     f"({_when(r['created_at'])})")
        shown.append(_safety_lines(r["safety_number"], "    "))
    ctx.out(result, "\n".join(shown) if shown else "no pending requests")


@cli.command()
@common
@click.argument("request_id", metavar="ID", type=int)
@click.option("--name", help="The name to give the contact (default: the name they sent).")
def accept(ctx: Ctx, request_id: int, name: str | None) -> None:
    """Accept a contact request."""
    params: dict[str, Any] = {"request": request_id}
    if name is not None:
        params["name"] = name
    result = ctx.call("requests.accept", params)
    ctx.out(result, f"accepted: {one_line(result['name'])} is now a contact")


@cli.command()
@common
@click.argument("request_id", metavar="ID", type=int)
def reject(ctx: Ctx, request_id: int) -> None:
    """Reject a contact request."""
    result = ctx.call("requests.reject", {"request": request_id})
    ctx.out(result, f"rejected request {request_id}")


@cli.group()
def contact() -> None:
    """Add, rename, remove or block a contact."""


@contact.command("add")
@common
@click.argument("name")
@click.argument("link")
def contact_add(ctx: Ctx, name: str, link: str) -> None:
    """Add a contact from an invitation or address LINK, under NAME."""
    result = ctx.call("contacts.add", {"name": name, "link": link})
    ctx.out(
        result,
        f"added {one_line(result['name'])}; "
        + (
            "you can send messages now"
            if result["established"]
            else "waiting for their answer (an invitation is answered at once; "
            "an address once they accept)"
            + ("" if result.get("first_contact") != "pending" else
               "; the relay could not be reached yet: aegis contacts shows if it fails")
        ),
    )


@contact.command("rename")
@common
@click.argument("name")
@click.argument("new_name")
def contact_rename(ctx: Ctx, name: str, new_name: str) -> None:
    """Rename a contact."""
    result = ctx.call("contacts.rename", {"name": name, "new_name": new_name})
    ctx.out(result, f"renamed {one_line(name)} to {one_line(result['name'])}")


@contact.command("remove")
@common
@click.argument("name")
def contact_remove(ctx: Ctx, name: str) -> None:
    """Remove a contact (and stop receiving from them)."""
    result = ctx.call("contacts.remove", {"name": name})
    ctx.out(result, f"removed {name}")


@contact.command("block")
@common
@click.argument("name")
@click.option("--undo", is_flag=True, help="Unblock instead.")
def contact_block(ctx: Ctx, name: str, undo: bool) -> None:
    """Block a contact (their messages are dropped; you cannot send to them)."""
    result = ctx.call("contacts.block", {"name": name, "blocked": not undo})
    ctx.out(result, f"{'unblocked' if undo else 'blocked'} {name}")


@cli.command()
@common
def contacts(ctx: Ctx) -> None:
    """List your contacts."""
    result = ctx.call("contacts.list")
    shown = []
    for c in result["contacts"]:
        flags = [
            f"failed: {one_line(c['failed'])}" if c.get("failed")
            else "established" if c["established"] else "waiting for their answer",
            *(["verified"] if c["verified"] else []),
            *(["blocked"] if c["blocked"] else []),
        ]
        shown.append(f"{one_line(c['name'])}  ({', '.join(flags)})")
    ctx.out(result, "\n".join(shown) if shown else "no contacts yet")


def _confirm(prompt: str) -> bool:
    """y/N on the terminal (or a line of standard input); end of input means no."""
    click.echo(f"{prompt} [y/N] ", nl=False, err=True)
    answer = sys.stdin.readline()
    if not answer:
        click.echo("", err=True)
    return answer.strip().lower() in ("y", "yes")


@cli.command(short_help="Compare safety numbers with NAME, then mark verified.")
@common
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Mark the contact verified without asking.")
def verify(ctx: Ctx, name: str, yes: bool) -> None:
    """Show the safety number shared with NAME, then mark NAME verified.

    Compare the twelve groups with your contact in person or on a call: they see the same
    number on their side. Without --yes, asks first (with --json, only --yes marks).
    """
    with ctx.client() as c:
        sn = c.call("contacts.safety_number", {"name": name})
        if not ctx.as_json:
            click.echo(f"Safety number with {one_line(sn['contact'])}:")
            click.echo(_safety_lines(sn["safety_number"]))
        do_it = yes or (not ctx.as_json and _confirm(f"Does it match what {one_line(name)} sees?"))
        verified = False
        if do_it:
            verified = bool(c.call("contacts.verify", {"name": name})["verified"])
    result = {"contact": sn["contact"], "safety_number": sn["safety_number"], "verified": verified}
    if ctx.as_json:
        ctx.out(result, "")
    else:
        click.echo(f"{one_line(sn['contact'])} is marked verified" if verified
                   else "not marked verified")


@cli.command(short_help="Send a message or a file to NAME.")
@common
@click.argument("name", required=False)
@click.argument("message", required=False)
@click.option(
    "--file", "file_paths", metavar="PATH", multiple=True,
    type=click.Path(dir_okay=True, path_type=str),
    help="Send this file (encrypted, as an attachment) instead of a message; repeat it to "
    "send several files together.",
)  # fmt: skip
@click.option("--caption", metavar="TEXT",
              help="With --file: a caption shown with the file (with several, the first).")
@click.option("--group", metavar="GROUP",
              help="Send MESSAGE (given as NAME), or the --file, to this group.")
def send(
    ctx: Ctx, name: str | None, message: str | None, file_paths: tuple[str, ...],
    caption: str | None, group: str | None,
) -> None:  # fmt: skip
    """Send MESSAGE to NAME ('-': read the message from standard input), or a file.

    Prints the message id once the daemon has accepted (and stored) the message; it is
    delivered in the background, also later if the relay is unreachable now.

    With --file PATH the daemon encrypts the file into the profile, uploads it and then sends
    its key to NAME. On a terminal a progress bar follows the upload (Ctrl-C stops watching,
    not the upload); otherwise (and with --json) the attachment id is printed at once.

    With --group GROUP, MESSAGE (the one argument) or --file PATH goes to the group; a file
    is uploaded once per member (docs/protocol.md §25.10) and the message id is printed.

    --caption TEXT goes with the file; --file given several times (up to 32) sends the files
    together, each its own upload, the caption with the first; the attachment ids are
    printed, one a line. With --group: one --file, with a --caption if wanted.
    """
    file_path = file_paths[0] if len(file_paths) == 1 else None
    if caption is not None and not file_paths:
        raise click.UsageError("--caption goes with --file")
    if group is not None:  # aegis send --group GROUP MESSAGE: the one argument is the message
        from . import groups

        if file_paths:
            if name is not None:
                raise click.UsageError("with --group and --file, give no MESSAGE")
            if file_path is None:
                raise click.UsageError("a group takes one --file")
            groups.send_file(ctx, group, os.path.abspath(file_path), Fail, caption)
            return
        if message is not None or name is None:
            raise click.UsageError("with --group, give the MESSAGE only")
        groups.send(ctx, group, name, Fail)
        return
    if name is None:
        raise click.UsageError("missing NAME")
    if file_paths:
        if message is not None:
            raise click.UsageError("give a MESSAGE or --file, not both")
        if file_path is None:
            from . import files

            files.send_batch(ctx, name, list(file_paths), caption)
            return
        _send_file(ctx, name, file_path, caption)
        return
    if message is None:
        raise click.UsageError("missing MESSAGE (or --file PATH)")
    message = actions.read_text(message, Fail)
    result = ctx.call("messages.send", {"contact": name, "text": message})
    ctx.out(result, str(result["message_id"]))


@cli.command()
@common
@click.argument("name", required=False)
@click.option(
    "--limit", type=click.IntRange(1, 500), default=50, show_default=True, metavar="N",
    help="Show the last N messages.",
)  # fmt: skip
@click.option("--before", type=int, metavar="SEQ", help="Only messages older than SEQ (paging).")
@click.option(
    "--mark-read/--no-mark-read", default=True, show_default=True,
    help="Mark the incoming messages shown read (the sender sees \"read\" if read receipts "
    "are on).",
)  # fmt: skip
@click.option("--group", metavar="GROUP", help="Show this group's messages instead.")
@click.option("--ids", is_flag=True, help="Start each message with its id (for reply, react...).")
def messages(
    ctx: Ctx, name: str | None, limit: int, before: int | None, mark_read: bool,
    group: str | None, ids: bool = False,
) -> None:  # fmt: skip
    """Show the conversation with NAME (or a group's, with --group), oldest first.

    The incoming messages shown are marked read (--no-mark-read: not). When older messages
    exist, a line on stderr gives the command that shows them."""
    if group is not None:
        if name is not None:
            raise click.UsageError("give NAME or --group, not both")
        from . import groups

        groups.show_messages(ctx, group, limit, before, Fail, mark_read=mark_read, ids=ids)
        return
    if name is None:
        raise click.UsageError("missing NAME (or --group GROUP)")
    params: dict[str, Any] = {"contact": name, "limit": limit}
    if before is not None:
        params["before"] = before
    with ctx.client() as c:
        result = c.call("messages.history", params)
        unread = [m["message_id"] for m in result["messages"]
                  if m["direction"] == "in" and m["status"] == "received"]  # fmt: skip
        if mark_read and unread:  # those shown only: one that came in since was not seen
            c.call("messages.mark_read", {"contact": name, "message_ids": unread})
        timer = c.call("conversations.get_timer", {"contact": name})
    # The contact's text as safe_text shows it: no control reaches the terminal, and each
    # line after a message's first is indented, so none passes for a message header.
    who = one_line(name)
    shown = [(f"{m['message_id']}  " if ids else "") + message_line(m, who)
             for m in result["messages"]]  # fmt: skip
    # On a terminal, wrapped to its width by us (continuations indented): its own soft wrap
    # could start a row at column 0 with a forged header (safe_text.fit).
    width = safe_text.terminal_width()
    shown = [safe_text.fit(line, width) for line in shown]
    if timer["seconds"]:
        from .disappear import timer_text

        shown.insert(0, f"(disappearing messages: {timer_text(int(timer['seconds']))})")
    ctx.out(result, "\n".join(shown) if shown else f"no messages with {who}")
    if result["next_before"] is not None and not ctx.as_json:
        from .conversations import page_back_hint

        page_back_hint(ctx, f"messages {shlex.quote(name)}", result["next_before"], limit)


def message_line(m: dict[str, Any], who: str) -> str:
    """One message of `aegis messages` (``who`` already through one_line): a reply's quote,
    "(deleted)" for a message deleted for everyone, the edit mark and reactions after it, and
    when it disappears; or a line recording a change of the disappearing timer."""
    if m.get("timer_change") is not None:  # a change of the disappearing timer (§27)
        from .disappear import timer_text

        setter = "you" if m["direction"] == "out" else who
        value = timer_text(int(m["timer_change"]))
        return f"{_when(m['created_at'])}  {setter} set disappearing messages to {value}"
    text = "(deleted)" if m.get("deleted") else actions.quote(m) + body(m["text"])
    extra = actions.marks(m, _when)
    if m.get("expires_at"):
        goes = time.localtime(m["expires_at"] / 1000)
        extra += f"  (disappears {time.strftime('%H:%M:%S', goes)})"
    if m["direction"] == "out":
        return f"{_when(m['created_at'])}  me -> {who}: {text}  [{m['status']}]{extra}"
    return f"{_when(m['sent_at'] or m['created_at'])}  {who}: {text}{extra}"


PROGRESS_MIN = 1 << 20  # files from this size get a progress bar on a terminal


def _send_file(ctx: Ctx, name: str, file_path: str, caption: str | None = None) -> None:
    path = os.path.abspath(file_path)  # the daemon's working directory is not ours
    params = {"contact": name, "path": path}
    if caption is not None:
        params["caption"] = caption
    result = ctx.call("attachments.send", params)
    aid = str(result["attachment_id"])
    if ctx.as_json or not sys.stderr.isatty() or result["size"] < PROGRESS_MIN:
        ctx.out(result, aid)
        return
    total = int(result["blocks"])
    with ctx.client() as c, click.progressbar(
        length=total, label=f"uploading {one_line(result['name'])}", file=sys.stderr
    ) as bar:
        done = 0
        while True:
            info = c.call("attachments.get", {"attachment_id": aid})
            bar.update(int(info["done"]) - done)
            done = int(info["done"])
            if info["state"] != "uploading":
                break
            time.sleep(0.2)
    if info["state"] == "failed":
        raise Fail(f"the upload failed: {one_line(info['error'])}", data={"attachment_id": aid})
    click.echo(aid)


_size = units.size_text


@cli.command(short_help="List files sent and received, oldest first.")
@common
@click.argument("name", required=False)
@click.option(
    "--max-size", type=units.Size(), metavar="SIZE",
    help="Set the size limit for files you send and receive: bytes, or with a unit (100MB, "
    "1.5GB; default 100MB); a received file over it waits until you raise it and retry.",
)  # fmt: skip
def attachments(ctx: Ctx, name: str | None, max_size: int | None) -> None:
    """List the files sent and received (with NAME only those with NAME), oldest first."""
    if max_size is not None:
        if name is not None:
            raise click.UsageError("--max-size applies to every contact: give no NAME")
        result = ctx.call("attachments.config", {"max_size": max_size})
        ctx.out(
            result,
            f"attachment size limit: {_size(result['max_size'])} ({result['max_size']} bytes)",
        )
        return
    result = ctx.call("attachments.list", {"contact": name} if name else {})
    shown = [attachment_line(a) for a in result["attachments"]]
    ctx.out(result, "\n".join(shown) if shown else "no attachments")


def attachment_line(a: dict[str, Any]) -> str:
    """One attachment of `aegis attachments`: the peer's file name, contact name and failure
    reason through safe_text (whatever the daemon already cleaned)."""
    arrow = "->" if a["direction"] == "out" else "<-"
    state = a["state"]
    if state in ("uploading", "downloading"):
        state += f" {100 * a['done'] // max(1, a['blocks'])}%"
    if a["error"]:
        state += f": {one_line(a['error'])}"
    # null: a group member the user never added as a contact (its name stays hidden)
    who = one_line(a["contact"]) if a["contact"] is not None else "(a group member)"
    return (
        f"{a['attachment_id']}  {_when(a['created_at'])}  {arrow} {who}  "
        f"{one_line(a['name'])}  {_size(a['size'])}  [{state}]"
    )


@cli.group(short_help="Save, retry or delete one attachment.")
def attachment() -> None:
    """Save, retry or delete one attachment (ids: aegis attachments; the first 8 characters,
    as aegis listen shows them, are enough when no other id starts the same)."""


def _attachment_id(ctx: Ctx, given: str) -> str:
    """A whole id, or the start of one (as `aegis listen` shows them, like git's short ids):
    resolved among the profile's attachments when exactly one starts so."""
    given = given.strip().lower()
    if len(given) >= 32 or len(given) < 4:
        return given
    ids = [str(a["attachment_id"]) for a in ctx.call("attachments.list")["attachments"]]
    hits = sorted({i for i in ids if i.startswith(given)})
    if len(hits) > 1:
        raise Fail(f"the id {printable(given)} is ambiguous: {', '.join(hits)}",
                   name="ambiguous")  # fmt: skip
    return hits[0] if hits else given


@attachment.command("save")
@common
@click.argument("attachment_id", metavar="ID")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--overwrite", is_flag=True, help="Replace an existing file at PATH.")
def attachment_save(ctx: Ctx, attachment_id: str, path: str, overwrite: bool) -> None:
    """Decrypt a received file to PATH (a directory: under the file's own name)."""
    result = ctx.call(
        "attachments.save",
        {"attachment_id": _attachment_id(ctx, attachment_id), "path": os.path.abspath(path),
         "overwrite": overwrite},
    )
    ctx.out(result, f"saved {one_line(result['path'])}")


@attachment.command("retry")
@common
@click.argument("attachment_id", metavar="ID")
def attachment_retry(ctx: Ctx, attachment_id: str) -> None:
    """Try a failed upload or download again."""
    result = ctx.call("attachments.retry", {"attachment_id": _attachment_id(ctx, attachment_id)})
    ctx.out(result, f"{result['state']}")


@attachment.command("delete")
@common
@click.argument("attachment_id", metavar="ID")
def attachment_delete(ctx: Ctx, attachment_id: str) -> None:
    """Forget an attachment and delete its encrypted copy in the profile."""
    result = ctx.call("attachments.delete", {"attachment_id": _attachment_id(ctx, attachment_id)})
    ctx.out(result, "deleted")


@cli.command()
@common
@units.receipt_options
def settings(ctx: Ctx, read_receipts: str | None, receipt_delay_max: float | None) -> None:
    """Show the settings (or change those given)."""
    params: dict[str, Any] = {}
    if read_receipts is not None:
        params["read_receipts"] = read_receipts == "on"
    if receipt_delay_max is not None:
        params["receipt_delay_max"] = receipt_delay_max
    from .network import privacy_text

    result = ctx.call("settings.set", params) if params else ctx.call("settings.get")
    privacy = ctx.call("privacy.get")
    ctx.out(
        {**result, "privacy": privacy},
        f"read receipts: {'on' if result['read_receipts'] else 'off'}\n"
        f"receipt delay: 0.5 to {result['receipt_delay_max']:g} s\n"
        f"{privacy_text(privacy)}\n(change the level with: aegis privacy --level LEVEL)",
    )


@cli.command("name", short_help="Set the display name your contacts see.")
@common
@click.argument("display_name")
def set_name(ctx: Ctx, display_name: str) -> None:
    """Set the display name sent with your invitations and requests."""
    result = ctx.call("identity.set_name", {"display_name": display_name})
    ctx.out(result, f"display name: {result['display_name'] or '(none)'}")


# `aegis backup ...` (aegis_cli/backup.py): registered with this module's helpers, so that its
# errors are this module's Fail also when run as `python -m aegis_cli.main`.
from . import backup as _backup  # noqa: E402

_backup.register(sys.modules[__name__])


# -- entry point --------------------------------------------------------------------------


def _fail(error: dict[str, Any], exit_status: int, as_json: bool) -> NoReturn:
    """Report one error (a JSON-RPC error object: aegis_cli/errors.py) and exit."""
    if as_json:
        click.echo(json.dumps({"error": error}, sort_keys=True))
    else:
        # A daemon's message may quote what someone else chose (a link, a relay's answer).
        click.echo(f"aegis: error: {one_line(error['message'])}", err=True)
    sys.exit(exit_status)


def _contact_names() -> list[str]:
    """The profile's contact names, for "did you mean" (after a command failed)."""
    if _current is None:
        return []
    with Client(_current.paths.socket, timeout=5) as c:
        return [str(x["name"]) for x in c.call("contacts.list")["contacts"]]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    global _current
    _current = None
    try:
        cli.main(args=args, prog_name="aegis", standalone_mode=False)
    except Fail as exc:
        _fail(exc.to_object(), exc.code, as_json)
    except RpcCallError as exc:
        # The daemon's code and data as it sent them; the message in the CLI's words.
        _fail({**exc.to_object(), "message": user_message(exc, _contact_names)}, 1, as_json)
    except DaemonNotRunning:
        fail = not_running(_current.paths if _current is not None else resolve(None))
        _fail(fail.to_object(), fail.code, as_json)
    except PathError as exc:
        _fail(Fail(str(exc)).to_object(), EXIT_ERROR, as_json)
    except click.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
        _fail(Fail(exc.format_message() + hint, EXIT_USAGE).to_object(), EXIT_USAGE, as_json)
    except click.ClickException as exc:
        _fail(Fail(exc.format_message()).to_object(), EXIT_ERROR, as_json)
    except (click.Abort, KeyboardInterrupt):
        _fail(Fail("interrupted", EXIT_INTERRUPTED).to_object(), EXIT_INTERRUPTED, as_json)
    except (ConnectionError, TimeoutError) as exc:
        _fail(connection_lost(type(exc).__name__), EXIT_ERROR, as_json)
    sys.exit(0)


def _register_extensions() -> None:
    from . import (
        actions,
        calls,
        conversations,
        devices,
        disappear,
        groups,
        network,
        typing_indicators,
    )

    devices.register(sys.modules[__name__])

    calls.register(sys.modules[__name__])
    conversations.register(sys.modules[__name__])
    actions.register(sys.modules[__name__])
    disappear.register(sys.modules[__name__])
    groups.register(sys.modules[__name__])
    typing_indicators.register(sys.modules[__name__])
    network.register(sys.modules[__name__])
    network.register_privacy(sys.modules[__name__])


_register_extensions()

if __name__ == "__main__":
    main()
