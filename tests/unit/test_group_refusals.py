"""Every refusal of the group core maps to one RPC error, 1060 group_refused, whose reason
names the rule (docs/api.md "Errors")."""

from __future__ import annotations

from aegisd.core import errors
from aegisd.rpc import errors as E
from aegisd.services.groups_state import refused

REASONS = {
    "UnknownGroup": "unknown_group", "ForgedChange": "forged_change",
    "ReplayedChange": "replayed_change", "NotAMember": "not_a_member",
    "NotPermitted": "not_permitted", "GroupFull": "group_full", "LastOwner": "last_owner",
    "InvalidChange": "invalid_change", "OutOfWindow": "out_of_window",
}  # fmt: skip


def test_every_group_error_is_one_rpc_error_with_its_reason() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.GroupError)
               and c is not errors.GroupError]  # fmt: skip
    assert {c.__name__ for c in classes} == set(REASONS)
    for cls in classes:
        err = refused(cls("why"))
        assert err.code == E.GROUP_REFUSED == 1060
        assert err.data == {"error": "group_refused", "reason": REASONS[cls.__name__]}
        assert err.message == "why"
