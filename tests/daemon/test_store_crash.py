"""kill -9 in the middle of writing: every commit the writer reported survives, intact."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from aegisd.store import Keyring, Store, create_profile

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from aegisd.store import Keyring, Store
    home = Path(sys.argv[1])
    key = Keyring.load(home / "keyring.json").unlock(None)
    store = Store.open(home / "aegis.db", key)
    c = store.contact_by_name("bob")
    i = 0
    while True:
        with store.transaction():
            store.put_session(c.id, b"state-%d" % i)
            m = store.add_message(c.id, "in", "message %d" % i)
            ev = store.append_event("message.received", {"id": m.id, "i": i})
        print(i, ev.seq, flush=True)  # acknowledged only after the commit
        i += 1
    """
)


def test_kill_9_loses_no_committed_write(short_tmp):
    home = short_tmp / "p"
    store = create_profile(home, None)
    store.add_contact("bob")
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(home)], stdout=subprocess.PIPE, text=True
    )
    acked: list[tuple[int, int]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            i, seq = map(int, line.split())
            acked.append((i, seq))
            if len(acked) == 300:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        for line in proc.stdout:  # printed before the kill, not read yet
            if line.endswith("\n"):
                i, seq = map(int, line.split())
                acked.append((i, seq))
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    key = Keyring.load(home / "keyring.json").unlock(None)
    store = Store.open(home / "aegis.db", key)
    try:
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        c = store.contact_by_name("bob")
        assert c is not None
        msgs = store.history(c.id, limit=100_000)
        events = store.events_after(0, limit=100_000)
        # Everything acknowledged is there; at most one more (committed, not yet printed).
        assert len(msgs) == len(events) in (len(acked), len(acked) + 1)
        assert [m.body for m in msgs[: len(acked)]] == [f"message {i}" for i, _ in acked]
        assert [e.seq for e in events[: len(acked)]] == [seq for _, seq in acked]
        # Session state and messages committed together.
        last = len(msgs) - 1
        assert store.get_session(c.id) == b"state-%d" % last
        assert events[-1].data["i"] == last
    finally:
        store.close()
