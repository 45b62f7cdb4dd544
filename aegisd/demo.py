"""`make demo`: the real thing on embedded defaults, then (``protocol``) the protocol alone.

``python -m aegisd.demo`` starts a local relay (``aegis-relay`` on a free 127.0.0.1 port, cheap
proofs of work, its data under a temporary directory) and two daemons, alice and bob (profiles
without passphrase under the same directory). Everything after that goes through the ``aegis``
CLI, as a person would type it: bob creates a one-time invitation, alice adds him with it, they
exchange messages both ways, alice sends one more while bob is offline (so the relay holds it),
bob comes back and receives it. Then it prints the conversation on both sides, both safety
numbers, and what the relay's data directory holds, and it stops everything it started, also on
Ctrl-C or an error.

``python -m aegisd.demo protocol``: two in-process parties run the protocol core and show what
the wire carries. Alice fetches Bob's prekey bundle (in memory, as the relay would serve it),
checks it against the identity she got out of band, opens a session with a sealed first-contact
block, and the two exchange messages. For each block we print what an observer of the wire sees:
its size, its only cleartext byte (the version), and how random the rest looks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aegisd.core import pqxdh, wire
from aegisd.core.identity import IdentityKeyPair, format_safety_number, safety_number
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Reassembler, Session, accept_first_contact, initiate_session

CONVERSATION = [
    ("alice", "Hi Bob, it's Alice. Is this thing on?"),
    ("bob", "Loud and clear. The relay only sees 16 KiB of noise."),
    ("bob", "(a second message in the same chain: no public-key work)"),
    ("alice", "Then here is a long one. " + "Metadata matters. " * 1200),
    ("bob", "Got all of it, reassembled from several identical-looking blocks."),
]


def entropy_bits_per_byte(data: bytes) -> float:
    counts = Counter(data)
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def observe(label: str, block: bytes) -> None:
    print(
        f"    wire: {label:<13} {len(block)} bytes, version byte 0x{block[0]:02x}, "
        f"then {block[1:9].hex()}... ({entropy_bits_per_byte(block[1:]):.3f} bits/byte)"
    )


def protocol_main() -> None:
    entropy = SystemEntropy()
    now = 1_700_000_000  # the core takes time as an argument; any clock will do here
    alice = IdentityKeyPair.generate(entropy)
    bob = IdentityKeyPair.generate(entropy)
    bob_store = PrekeyStore.create(entropy, bob, now)
    xs, kems = bob_store.generate_one_time(entropy, 5)

    print("AegisLink protocol demo: PQXDH (X25519 + ML-KEM-768), post-quantum Double Ratchet")
    print(
        f"with header encryption, sealed first contact; every block is {wire.BLOCK_SIZE} bytes.\n"
    )
    print("1. Bob publishes a signed prekey bundle; Alice verifies it against Bob's identity.")
    bundle = pqxdh.verify_bundle(
        bob_store.bundle_base().to_bytes(), xs[0].to_bytes(), kems[0].to_bytes(), bob.public
    )
    print("2. Alice sends a sealed first-contact block (her identity is inside the encryption).")
    first_text = "Hello Bob! (first contact)"
    alice_session, block = initiate_session(entropy, alice, bundle, first_text.encode())
    observe("first contact", block)
    fc = accept_first_contact(entropy, bob_store, block)
    print(f"    bob reads: {fc.fragment.data.decode()!r} from a sender whose keys verified")
    bob_session = fc.session

    print("3. The conversation:")
    sessions: dict[str, Session] = {"alice": alice_session, "bob": bob_session}
    reassemblers = {"alice": Reassembler(), "bob": Reassembler()}
    for sender, text in CONVERSATION:
        receiver = "bob" if sender == "alice" else "alice"
        blocks = sessions[sender].encrypt(entropy, text.encode())
        for b in blocks:
            observe(f"{len(blocks)} block(s)", b)
        content = None
        for b in blocks:
            content = reassemblers[receiver].add(sessions[receiver].decrypt(entropy, b))
        assert content is not None and content.decode() == text
        shown = text if len(text) < 80 else text[:60] + f"... ({len(text)} chars)"
        print(f"    {sender} -> {receiver}: {shown}")

    print("4. Safety numbers (compare out of band; equal on both sides):")
    a_view = safety_number(alice.public, alice_session.remote)
    b_view = safety_number(bob.public, bob_session.remote)
    print("    alice sees:\n      " + format_safety_number(a_view).replace("\n", "\n      "))
    print("    bob sees:\n      " + format_safety_number(b_view).replace("\n", "\n      "))
    print(f"    match: {a_view == b_view}")
    print(
        "\nAn observer of the wire saw only equal-size blocks whose single cleartext byte is the"
        "\nversion: no identity key, address, ratchet key, counter, message kind or length."
    )


# --- the live demo: a relay, two daemons, the CLI ----------------------------------------

# Cheap proofs of work (the defaults cost a second or so per anonymous operation).
RELAY_OPTIONS = ["--pow-deposit-bits", "8", "--pow-bundle-bits", "8", "--pow-blob-bits", "8",
                 "--pow-create-bits", "8"]
TIMEOUT = 60.0

LIVE_CONVERSATION = [
    ("alice", "bob", "Hi Bob! Alice here, over our own relay."),
    (
        "bob",
        "alice",
        "Hi Alice. The relay only ever sees 16 KiB of noise\naddressed to a random ID.",
    ),
    ("alice", "bob", "And our two mailboxes have unrelated IDs, set up inside the encryption."),
]
OFFLINE_TEXT = "Sent while you were offline: the relay kept it for you, sealed."


class DemoError(Exception):
    pass


class Stage:
    """Everything the demo starts, so that it can stop all of it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.relay: subprocess.Popen[bytes] | None = None
        self.relay_sock: socket.socket | None = None
        self.relay_port = 0
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def relay_data(self) -> Path:
        return self.base / "relay-data"

    def home(self, name: str) -> Path:
        return self.base / name

    # processes ------------------------------------------------------------------------

    def start_relay(self) -> None:
        # We listen ourselves and hand the socket over: a free port, known without a race.
        self.relay_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.relay_sock.bind(("127.0.0.1", 0))
        self.relay_sock.listen(128)
        self.relay_port = self.relay_sock.getsockname()[1]
        fd = self.relay_sock.fileno()
        log = open(self.base / "relay.log", "wb")  # noqa: SIM115 (handed to the child)
        with log:
            self.relay = subprocess.Popen(  # noqa: S603 (our interpreter, our module)
                [sys.executable, "-m", "relay.main", "--listen-fd", str(fd),
                 "--data", str(self.relay_data), *RELAY_OPTIONS],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(fd,), start_new_session=True,
            )  # fmt: skip
        wait_until(lambda: "relay started" in read_text(self.base / "relay.log"), "the relay",
                   self.relay)  # fmt: skip

    @property
    def relay_url(self) -> str:
        return f"ws://127.0.0.1:{self.relay_port}/v1/ws"

    def start_daemon(self, name: str) -> None:
        home = self.home(name)
        log = open(self.base / f"{name}-aegisd.log", "ab")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "aegisd.main", "run", "--home", str(home)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops it in order
            )  # fmt: skip
        self.daemons[name] = proc
        wait_until(lambda: aegis(home, "status", check=False).returncode == 0,
                   f"{name}'s daemon", proc)  # fmt: skip

    def stop_daemon(self, name: str) -> None:
        proc = self.daemons.pop(name, None)
        if proc is not None:
            stop_process(proc)

    def stop_all(self) -> None:
        for name in list(self.daemons):
            self.stop_daemon(name)
        if self.relay is not None:
            stop_process(self.relay)
            self.relay = None
        if self.relay_sock is not None:
            self.relay_sock.close()
            self.relay_sock = None


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_until(
    predicate: Callable[[], Any],
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = TIMEOUT,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise DemoError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.05)


def aegis(
    home: Path, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the `aegis` CLI for one profile, as a separate process."""
    r = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(home)],
        input=input, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    if check and r.returncode != 0:
        raise DemoError(f"aegis {args[0]} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def aegis_json(home: Path, *args: str) -> Any:
    return json.loads(aegis(home, *args, "--json").stdout)


def show(who: str, args: list[str], output: str, shorten: bool = False) -> None:
    shown = [a if len(a) < 60 or not shorten else a[:40] + "..." for a in args]
    shown = [json.dumps(a) if (" " in a or "\n" in a) else a for a in shown]
    print(f"  {who}$ aegis {' '.join(shown)}")
    for line in output.rstrip("\n").splitlines():
        print(f"    {line}")


def step(text: str) -> None:
    print(f"\n{text}")


def relay_connected(home: Path) -> bool:
    return bool(aegis_json(home, "status")["relay"]["connected"])


def established(home: Path, name: str) -> bool:
    return any(
        c["name"] == name and c["established"] for c in aegis_json(home, "contacts")["contacts"]
    )


def has_message(home: Path, contact: str, text: str, status: str | None = None) -> bool:
    msgs = aegis_json(home, "messages", contact)["messages"]
    return any(m["text"] == text and (status is None or m["status"] == status) for m in msgs)


def relay_files(root: Path) -> Iterator[tuple[Path, int]]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path, path.stat().st_size


def relay_blocks(data: Path) -> list[bytes]:
    """The blocks the relay holds right now (read-only look at its SQLite database)."""
    db = sqlite3.connect(f"file:{data / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        return [bytes(row[0]) for row in db.execute("SELECT block FROM messages ORDER BY id")]
    finally:
        db.close()


NEXT_STEPS = """
Next, your own conversation: the demo installed everything into .venv/, not on your PATH.
  . .venv/bin/activate      # then aegis, aegis-relay and python contrib/echo_bot.py work
README.md, "Your first conversation, on one machine", goes on from there."""


def live_main() -> int:
    base = Path(tempfile.mkdtemp(prefix="aegis-demo-", dir="/tmp"))  # short: socket paths
    stage = Stage(base)
    interrupted = False

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        run_live(stage)
        print(NEXT_STEPS)
        return 0
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        for name in ("relay.log", "alice-aegisd.log", "bob-aegisd.log"):
            tail = read_text(base / name).strip().splitlines()[-5:]
            if tail:
                print(f"  last lines of {name}:", *tail, sep="\n    ", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        try:
            stage.stop_all()
        finally:
            shutil.rmtree(base, ignore_errors=True)
            signal.signal(signal.SIGTERM, old)
            print(
                f"\nStopped what the demo started; removed {base}.",
                file=sys.stderr if interrupted else sys.stdout,
            )


def run_live(stage: Stage) -> None:
    alice, bob = stage.home("alice"), stage.home("bob")
    print("AegisLink demo: a local relay, two daemons (alice and bob), and the aegis CLI.")
    print(f"Everything lives under {stage.base} and goes away at the end.")

    step("1. The relay")
    stage.start_relay()
    print(f"  aegis-relay on 127.0.0.1:{stage.relay_port}, data in {stage.relay_data}")

    step("2. Two profiles (no passphrase, for the demo) and their daemons")
    print(f"  (every command below runs with --home {stage.base}/<name>)")
    for name, home in (("alice", alice), ("bob", bob)):
        args = ["init", "--no-passphrase", "--relay", stage.relay_url]
        show(name, args, aegis(home, *args).stdout.splitlines()[0])
        stage.start_daemon(name)
        show(name, ["name", name], aegis(home, "name", name).stdout)
    for name, home in (("alice", alice), ("bob", bob)):
        wait_until(functools.partial(relay_connected, home), f"{name}'s relay link")
    show("alice", ["status"], aegis(alice, "status").stdout)

    step("3. Bob invites Alice with a one-time link (he would send it over another channel)")
    link = aegis(bob, "invite").stdout.strip()
    show("bob", ["invite"], link[:72] + f"... ({len(link)} characters)")
    added = aegis(alice, "contact", "add", "bob", link).stdout
    show("alice", ["contact", "add", "bob", link], added, shorten=True)
    wait_until(lambda: established(bob, "alice"), "bob to receive the invitation's use")
    wait_until(lambda: established(alice, "bob"), "bob's answer")
    show("bob", ["contacts"], aegis(bob, "contacts").stdout)
    show("alice", ["contacts"], aegis(alice, "contacts").stdout)

    step("4. Messages, both ways")
    homes = {"alice": alice, "bob": bob}
    for sender, receiver, text in LIVE_CONVERSATION:
        if "\n" in text:  # multi-line: from standard input
            r = aegis(homes[sender], "send", receiver, "-", input=text + "\n")
            show(sender, ["send", receiver, "-"], f"(message read from standard input)\n{r.stdout}")
        else:
            show(
                sender,
                ["send", receiver, text],
                aegis(homes[sender], "send", receiver, text).stdout,
            )
        wait_until(
            functools.partial(has_message, homes[receiver], sender, text),
            f"{receiver} to receive the message",
        )

    step("5. Bob goes offline; Alice writes anyway. The relay holds the message.")
    stage.stop_daemon("bob")
    print("  (bob's daemon stopped)")
    show("alice", ["send", "bob", OFFLINE_TEXT], aegis(alice, "send", "bob", OFFLINE_TEXT).stdout)
    wait_until(lambda: has_message(alice, "bob", OFFLINE_TEXT, "sent"), "the deposit")
    show_relay(stage)

    step("6. Bob comes back and receives it")
    stage.start_daemon("bob")
    print("  (bob's daemon started)")
    wait_until(lambda: has_message(bob, "alice", OFFLINE_TEXT), "the held message")
    # Delivery receipts leave after a short random delay (so their timing tells nothing).
    with contextlib.suppress(DemoError):
        wait_until(lambda: has_message(alice, "bob", OFFLINE_TEXT, "delivered"), "receipts", None,
                   timeout=10)  # fmt: skip
    blocks_left = len(relay_blocks(stage.relay_data))
    print(f"  the relay now holds {blocks_left} message block(s): delivered blocks are deleted")

    step("7. The conversation, as each side sees it")
    show("alice", ["messages", "bob"], aegis(alice, "messages", "bob").stdout)
    show("bob", ["messages", "alice", "--mark-read"],
         aegis(bob, "messages", "alice", "--mark-read").stdout)  # fmt: skip

    step("8. Safety numbers (compare them in person or on a call; then `aegis verify` marks it)")
    a = aegis(alice, "verify", "bob", "--yes")
    b = aegis(bob, "verify", "alice", "--yes")
    show("alice", ["verify", "bob", "--yes"], a.stdout)
    show("bob", ["verify", "alice", "--yes"], b.stdout)
    a_num = aegis_json(alice, "verify", "bob")["safety_number"]
    b_num = aegis_json(bob, "verify", "alice")["safety_number"]
    print(f"  safety numbers match: {a_num == b_num}")
    if a_num != b_num:
        raise DemoError("the safety numbers differ")


def show_relay(stage: Stage) -> None:
    data = stage.relay_data
    print(f"  What the relay's data directory ({data}) holds:")
    files = list(relay_files(data))
    for path, size in files:
        print(f"    {path.relative_to(data)}  {size:,} bytes")
    blocks = relay_blocks(data)
    for i, block in enumerate(blocks, 1):
        print(
            f"    stored block {i}: {len(block):,} bytes, "
            f"{entropy_bits_per_byte(block):.3f} bits/byte (8 is perfectly random)"
        )
    if blocks:
        print("    (a 16,384-byte block as sent, sealed again by the relay for the mailbox's owner:"
              " a 24-byte nonce and a 16-byte tag more)")
    texts = [t.encode() for _, _, t in LIVE_CONVERSATION] + [OFFLINE_TEXT.encode()]
    found = [
        str(path.relative_to(data))
        for path, _ in files
        if leaks(path.read_bytes(), texts, [b"alice", b"bob"])
    ]
    if found:
        raise DemoError(f"readable text in relay files: {', '.join(found)}")
    lines = [ln for ln in read_text(stage.base / "relay.log").splitlines() if ln.strip()]
    print(f"  The relay's whole output so far: {' | '.join(lines)}")
    print(
        f"  Searched every relay file byte by byte for the {len(LIVE_CONVERSATION) + 1} message "
        "texts and the names alice and bob: not found. (A 3-byte name turns up by chance about\n"
        "  once in 16 MB of random bytes, so a name counts where the bytes around it are text.)\n"
        "  The relay stores sealed, equal-size blocks under random mailbox IDs, re-encrypted for\n"
        "  the mailbox owner; it cannot read them or tell from them who sent them. (One daemon\n"
        "  still uses one connection for all its mailboxes, which a relay watching connections\n"
        "  can link: see docs/threat-model.md.)"
    )


def leaks(data: bytes, texts: list[bytes], names: list[bytes]) -> bool:
    """Whether `data` holds one of `texts`, or one of the short `names` amid readable text.

    A long text cannot occur in random bytes by chance; a 3-byte name can (about once per
    16 MB), so a name counts only where most of the 32 bytes around it are printable, as in a
    log line, a JSON document or a text column, and not inside a sealed block.
    """
    if any(t in data for t in texts):
        return True
    for name in names:
        for match in re.finditer(re.escape(name), data):
            around = data[max(0, match.start() - 16):match.end() + 16]
            printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in around)
            if printable >= 0.75 * len(around):
                return True
    return False


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["protocol"]:
        protocol_main()
        return
    if args:
        sys.exit("usage: python -m aegisd.demo [protocol]")
    os.environ.pop("AEGIS_HOME", None)  # the demo's profiles only
    sys.exit(live_main())


if __name__ == "__main__":
    main()
