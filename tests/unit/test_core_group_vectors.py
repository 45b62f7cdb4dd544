"""Known answers for groups (tests/vectors/group_v1.json, test-only keys): the file is what the
scenario produces from its seed, and the bytes check out as docs/protocol.md §25 describes
them, without the scenario."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

from aegisd.core import group as g
from aegisd.core import wire
from aegisd.core.primitives import ed25519_from_private, ed25519_public
from tests.support.entropy import DeterministicEntropy
from tests.vectors import group_scenario

VECTORS = json.loads((Path(group_scenario.__file__).with_name("group_v1.json")).read_text())


def test_the_scenario_reproduces_the_file() -> None:
    seed = bytes.fromhex(VECTORS["seed"])
    assert group_scenario.run_scenario(DeterministicEntropy(seed)) == VECTORS


def test_the_bytes_are_what_section_25_says() -> None:
    creation = wire.GroupStateRecord.from_bytes(bytes.fromhex(VECTORS["creation_state"]))
    assert creation.group_id.hex() == VECTORS["group_id"] and creation.version == 0
    assert creation.head == bytes(32)
    r = wire.Reader(bytes.fromhex(VECTORS["signed_base"]))
    base = wire.SignedGroupState.read(r)
    r.done()
    assert base.state == creation and g.verify_state(base) == g.GroupState.from_record(creation)
    log = g.GroupLog(g.GroupState.from_record(creation))
    for step in VECTORS["changes"]:
        raw = bytes.fromhex(step["change"])
        # body || sig; sig over the label and the body; hash over the whole change.
        assert bytes.fromhex(step["signature_input"]) == b"AegisLink-v1 group change" + raw[:-64]
        assert hashlib.sha256(raw).hexdigest() == step["hash"]
        change = wire.GroupChangeRecord.from_bytes(raw)
        assert change.to_bytes() == raw
        assert (change.parent_version, change.parent_hash) == (log.head.version, log.head.head)
        assert log.receive(change).outcome is g.Outcome.APPLIED
        assert log.head.record().to_bytes().hex() == step["state_after"]
        assert log.head.head.hex() == step["hash"]
    assert hashlib.sha256(log.record().to_bytes()).hexdigest() == VECTORS["log_record_sha256"]
    # Ann left, Ben was removed: Cat, owner, alone.
    (cat,) = log.head.members
    assert (
        cat.role == wire.ROLE_OWNER
        and cat.identity.to_bytes().hex() == VECTORS["identities"]["cat"]
    )


def test_the_draws_are_the_blocks_section_25_names() -> None:
    """§25's vector paragraph: identities from blocks 1 to 6, the group ID is block 7."""
    seed = bytes.fromhex(VECTORS["seed"])
    block = [hmac.digest(seed, struct.pack(">Q", k), "sha256") for k in range(8)]
    assert VECTORS["group_id"] == block[7].hex()
    ann = wire.IdentityRecord.from_bytes(bytes.fromhex(VECTORS["identities"]["ann"]))
    assert ann.ed_pub == ed25519_public(ed25519_from_private(block[1]))
