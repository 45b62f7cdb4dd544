"""Identities and small groups for the group-core tests (aegisd/core/group.py)."""

from __future__ import annotations

from aegisd.core import group as g
from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy

ENTROPY = SystemEntropy()
# Keys are slow-ish to make; tests share a pool (a test never mutates a key pair).
PEOPLE = [IdentityKeyPair.generate(ENTROPY) for _ in range(8)]


def group_of(roles: list[int], name: str = "Friends") -> tuple[g.GroupLog, list[IdentityKeyPair]]:
    """A group whose first person is the creating owner and person i has roles[i - 1]."""
    owner = PEOPLE[0]
    log = g.GroupLog(g.create_group(ENTROPY, owner, name, "about"))
    people = [owner]
    for i, role in enumerate(roles, start=1):
        person = PEOPLE[i]
        log.receive(g.add_member(owner, log.head, person.public))
        if role != wire.ROLE_MEMBER:
            log.receive(g.set_role(owner, log.head, person.public.ed_pub, role))
        people.append(person)
    return log, people
