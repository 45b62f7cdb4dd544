"""Search index benchmark (issue 17): what the FTS5 index inside the store costs.

    PYTHONPATH=. .venv/bin/python bench/search_index.py [--messages 20000]

Builds a store at the schema before the index (`_message_search_index`) with --messages
random texts (3 to 15 words of a 5,000-word vocabulary), then opens it at the current schema
(the migration indexes them) and prints: the file's size without and with the index, the
migration's time, the time of a search (a common word, a two-word query, a word that is in
no message; best of 20), and the time of a deletion with FTS5's secure-delete on, beside the
same store with it switched off (the baseline, same run), and the time of the rebuild and
WAL checkpoint that follows deletions (store/schema.py `_search_index_dirty`) beside the
check that decides whether one is needed (Store.search_leaks). Each deletion
is its own transaction (synchronous=FULL: an fsync each, as in the daemon). A measurement:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import aegisd.store.db as store_db
from aegisd.store import schema
from aegisd.store import search as S
from aegisd.store.db import Store


def _deletions(store: Store, n: int) -> float:
    ids = [r[0] for r in store._q(
        "SELECT id FROM messages ORDER BY random() LIMIT ?", (n,)).fetchall()]  # fmt: skip
    start = time.perf_counter()
    for mid in ids:
        store.delete_message(mid)
    return (time.perf_counter() - start) / max(1, len(ids)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    args = ap.parse_args()
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    tmp = Path(tempfile.mkdtemp(prefix="aegis-search-"))
    try:
        path, key = tmp / "aegis.db", os.urandom(32)
        before = schema.MIGRATIONS[: schema.MIGRATIONS.index(schema._message_search_index)]
        setattr(store_db, "MIGRATIONS", before)  # noqa: B010 - the schema as it was
        setattr(store_db, "SCHEMA_VERSION", len(before))  # noqa: B010
        store = Store.open(path, key, create=True)
        contact = store.add_contact("bob")
        text_bytes = 0
        with store.transaction():
            for _ in range(args.messages):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
                text_bytes += len(text.encode())
                # Rows as that schema has them (Store.add_message writes today's columns).
                store._q(
                    "INSERT INTO messages (id, contact_id, direction, body, status, created_at, "
                    "status_at) VALUES (?, ?, 'in', ?, 'received', 0, 0)",
                    (os.urandom(16).hex(), contact.id, text),
                )
        store.close()
        without = path.stat().st_size
        setattr(store_db, "MIGRATIONS", schema.MIGRATIONS)  # noqa: B010
        setattr(store_db, "SCHEMA_VERSION", schema.SCHEMA_VERSION)  # noqa: B010
        start = time.perf_counter()
        store = Store.open(path, key)
        migrated = time.perf_counter() - start
        store.close()
        with_index = path.stat().st_size
        print(f"{args.messages} messages, {text_bytes / 1e6:.2f} MB of text: the file is "
              f"{without / 1e6:.2f} MB without the index, {with_index / 1e6:.2f} MB with it; "
              f"the migration took {migrated:.2f} s")  # fmt: skip
        store = Store.open(path, key)
        for query in (words[0], f"{words[1]} {words[2]}", "zzzzqq"):
            match, best = S.fts_query(query), float("inf")
            for _ in range(20):
                start = time.perf_counter()
                hits = S.search(store, match, limit=20)
                best = min(best, time.perf_counter() - start)
            print(f"search {query!r}: {best * 1000:.2f} ms, {len(hits)} hits")
        store.delete_message(store._q("SELECT id FROM messages LIMIT 1").fetchone()[0])
        start = time.perf_counter()
        leaks = store.search_leaks("messages_fts")
        checked = time.perf_counter() - start
        print(f"one deletion: the check of the index's %_idx terms against the live ones took "
              f"{checked * 1000:.1f} ms (a rebuild needed: {leaks})")  # fmt: skip
        on = _deletions(store, 200)
        start = time.perf_counter()
        leaks = store.search_leaks("messages_fts")
        checked = time.perf_counter() - start
        start = time.perf_counter()
        with store.transaction():
            store._q("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
        store.checkpoint()
        rebuilt = time.perf_counter() - start
        print(f"200 deletions: the check took {checked * 1000:.1f} ms (a rebuild needed: "
              f"{leaks}); the rebuild of the index and the WAL truncated: {rebuilt:.2f} s")
        store.rebuild_dirty_search()
        store._q("INSERT INTO messages_fts (messages_fts, rank) VALUES ('secure-delete', 0)")
        off = _deletions(store, 200)
        print(f"one deletion: {on:.2f} ms with secure-delete, {off:.2f} ms without (baseline)")
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
