"""conversations.delete against a file that arrives while it runs (review of the issue-17
fixes, finding 5): the files are forgotten one by one, each under the messenger lock, with
awaits in between; a file stored meanwhile must not be left behind, its row and encrypted
copy kept with no message. A real SQLCipher store and the real RPC method; the arrival is
made certain by storing it during the first round of forgetting."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aegisd.rpc import Registry
from aegisd.services import api
from aegisd.store import attachments as attachment_store
from aegisd.store import create_profile
from aegisd.store.keyring import KdfParams
from tests.daemon.test_store_attachments import _row

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


class _Messenger(SimpleNamespace):
    """What conversations.delete uses of the messenger; the other methods registered beside
    it are never called here."""

    def __getattr__(self, name: str) -> Any:
        return None


def test_a_file_arriving_during_the_deletion_goes_with_the_conversation(tmp_path: Path) -> None:
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        c = store.add_contact("bob")
        first = store.add_message(c.id, "in", "[file] a", status="received").id
        attachment_store.add(store, _row(first, c.id, 1))
        late = os.urandom(16).hex()
        forgotten: list[str] = []

        async def forget(ids: list[str]) -> None:
            if not forgotten:  # a file comes in while the first ones are being forgotten
                store.add_message(c.id, "in", "[file] b", status="received", message_id=late)
                attachment_store.add(store, _row(late, c.id, 2))
            for aid in ids:
                with store.transaction():
                    store._q("DELETE FROM attachments WHERE id = ?", (aid,))
                forgotten.append(aid)
            await asyncio.sleep(0)

        m: Any = _Messenger(
            store=store, lock=asyncio.Lock(), attachments=SimpleNamespace(forget=forget),
            contacts=SimpleNamespace(by_name=lambda name: store.contact_by_name(name)),
        )  # fmt: skip
        registry = Registry()
        api.register(registry, m)
        call = registry.for_jsonrpcserver()["conversations.delete"]
        result = asyncio.run(call(None, contact="bob"))
        assert result._value.result == {"deleted": 2}  # type: ignore[union-attr]
        assert forgotten == [first, late]
        assert store._q("SELECT count(*) FROM attachments").fetchone()[0] == 0
    finally:
        store.close()
