"""Generate tests/vectors/group_v1.json: known answers for group state and changes (§25).

Run: python -m tests.vectors.group_scenario. TEST-ONLY keys: every key derives from the
published seed below, through the stream of tests/support/entropy.py (docs/protocol.md §16).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aegisd.core import group as g
from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair
from tests.support.entropy import DeterministicEntropy

SEED = b"AegisLink group vector seed v1 -- public, test-only"
VECTOR_FILE = Path(__file__).with_name("group_v1.json")


def run_scenario(entropy: DeterministicEntropy) -> dict[str, Any]:
    """Ann (owner) creates "Walkers", adds Ben as admin and Cat as member; Ben renames it;
    Ann makes Cat an owner; Ann leaves; Cat removes Ben. Draws: Ann's, Ben's and Cat's
    identities (Ed25519 seed, then X25519 key, each one block), then the group ID (one
    block)."""
    ann, ben, cat = (IdentityKeyPair.generate(entropy) for _ in range(3))
    state = g.create_group(entropy, ann, "Walkers", "Sundays")
    log = g.GroupLog(state)
    base = g.sign_state(ann, state)
    steps = [
        lambda s: g.add_member(ann, s, ben.public, wire.ROLE_ADMIN),
        lambda s: g.add_member(ann, s, cat.public),
        lambda s: g.rename(ben, s, "Walkers ✓", "Sundays, 9:00\nbring water"),
        lambda s: g.set_role(ann, s, cat.public.ed_pub, wire.ROLE_OWNER),
        lambda s: g.leave(ann, s),
        lambda s: g.remove_member(cat, s, ben.public.ed_pub),
    ]
    changes = []
    for make in steps:
        change = make(log.head)
        log.receive(change)
        changes.append(
            {
                "change": change.to_bytes().hex(),
                "signature_input": change.signature_message().hex(),
                "hash": g.change_hash(change).hex(),
                "state_after": log.head.record().to_bytes().hex(),
            }
        )
    return {
        "seed": SEED.hex(),
        "identities": {
            n: k.public.to_bytes().hex() for n, k in (("ann", ann), ("ben", ben), ("cat", cat))
        },
        "group_id": state.group_id.hex(),
        "creation_state": state.record().to_bytes().hex(),
        "signed_base": base.write(wire.Writer()).bytes().hex(),
        "changes": changes,
        "log_record_sha256": hashlib.sha256(log.record().to_bytes()).hexdigest(),
    }


def main() -> None:
    VECTOR_FILE.write_text(json.dumps(run_scenario(DeterministicEntropy(SEED)), indent=1) + "\n")


if __name__ == "__main__":
    main()
