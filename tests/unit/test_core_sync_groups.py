"""Groups between one's own devices (aegisd/core/sync_groups.py, docs/protocol.md §28.6,
payload 0x4A): both items round trip, the parser is strict and bounded, and no other parser
takes them."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import devices as dv
from aegisd.core import group as core
from aegisd.core import sync as sy
from aegisd.core import sync_groups as sg
from aegisd.core import wire
from aegisd.core.errors import DecodeError, UnsupportedVersion
from aegisd.core.identity import IdentityKeyPair
from tests.support.entropy import DeterministicEntropy

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RNG = DeterministicEntropy(b"sync groups")
ALICE = IdentityKeyPair.generate(RNG)
BOB = IdentityKeyPair.generate(RNG)


def _log() -> core.GroupLog:
    log = core.GroupLog(core.create_group(RNG, ALICE, "desks", "two of them"))
    log.receive(core.add_member(ALICE, log.head, BOB.public))
    log.receive(core.rename(ALICE, log.head, "desks, renamed", ""))
    return log


LOG = _log()
STATE = sg.GroupStateItem((BOB.public.ed_pub,), LOG.record(),
                          wire.TimerPayload(1_700_000_000_000, 3600))  # fmt: skip
SENT = sg.GroupSentItem(LOG.head.group_id, bytes(range(16)), 1_700_000_000_000, "héllo")
ASK = sg.GroupAskItem(LOG.head.group_id)


def test_both_items_round_trip_under_0x4a_and_no_other_parser_takes_them() -> None:
    for item in (STATE, SENT, ASK, sg.GroupStateItem((), LOG.record()),
                 sg.GroupSentItem(bytes(32), bytes(16), 0, "")):  # fmt: skip
        data = sg.encode(item)
        assert data[:2] == bytes([1, 0x4A])
        assert wire.is_sync_group_payload(data)
        assert not wire.is_sync_payload(data) and not wire.is_device_payload(data)
        assert sg.decode(data) == item
        for other in (wire.decode_payload, dv.decode_device_payload, sy.decode_sync_payload):
            with pytest.raises(DecodeError):
                other(data)
    again = core.GroupLog.from_record(sg.decode(sg.encode(STATE)).log)  # type: ignore[union-attr]
    assert again.head == LOG.head


def test_group_sync_payloads_are_parsed_strictly() -> None:
    state = sg.encode(STATE)
    with pytest.raises(DecodeError):
        sg.decode(state + b"\x00")
    with pytest.raises(DecodeError):
        sg.decode(state[:-1])
    with pytest.raises(UnsupportedVersion):
        sg.decode(b"\x02" + state[1:])
    with pytest.raises(DecodeError):
        sg.decode(bytes([1, 0x4B]) + state[2:])
    with pytest.raises(DecodeError):  # an unknown item
        sg.decode(state[:2] + b"\x04" + state[3:])
    ask = sg.encode(ASK)
    assert len(ask) == 3 + 32
    for bad in (ask + b"\x00", ask[:-1]):  # an ask is the group's ID and nothing else
        with pytest.raises(DecodeError):
            sg.decode(bad)
    key = BOB.public.ed_pub
    twice = state[:3] + (2).to_bytes(2, "big") + key + key + state[5 + 32 :]
    at = 5 + 32 + 8  # the timer's seconds: not a timer
    with pytest.raises(DecodeError):
        sg.decode(state[:at] + (wire.TIMER_MAX_S + 1).to_bytes(4, "big") + state[at + 4 :])
    with pytest.raises(ValueError):
        sg.encode(sg.GroupStateItem((), LOG.record(), wire.TimerPayload(1, 10**9)))
    with pytest.raises(DecodeError):  # hidden keys not strictly ascending
        sg.decode(twice)
    with pytest.raises(DecodeError):
        sg.decode(state[:3] + (257).to_bytes(2, "big") + bytes(257 * 32))
    sent = sg.encode(SENT)
    with pytest.raises(DecodeError):  # not UTF-8
        sg.decode(sent + b"\xff")
    with pytest.raises(DecodeError):  # shorter than its fixed fields
        sg.decode(sent[: 3 + 32 + 16 + 7])
    with pytest.raises(DecodeError):
        sg.decode(sg.encode(sg.GroupSentItem(bytes(32), bytes(16), 0, "a"))
                  + bytes(wire.MAX_TEXT_BYTES))  # fmt: skip
    with pytest.raises(ValueError):
        sg.encode(sg.GroupSentItem(bytes(32), bytes(16), 0, "a" * 70_000))
    with pytest.raises(ValueError):
        sg.encode(sg.GroupStateItem((key, key), LOG.record()))
    with pytest.raises(DecodeError):
        sg.decode(bytes(sg.MAX_GROUP_SYNC_BYTES + 1))


def test_the_longest_state_fits_its_bound() -> None:
    """A base of 256 members (all group-only), MAX_SYNC_LOG_CHANGES changes as long as a
    change can be: within MAX_GROUP_SYNC_BYTES, and one change more is refused."""
    members = [IdentityKeyPair.generate(DeterministicEntropy(b"m%d" % i)) for i in range(255)]
    state = core.create_group(RNG, ALICE, "n" * wire.MAX_GROUP_NAME_BYTES,
                              "d" * wire.MAX_GROUP_DESCRIPTION_BYTES)  # fmt: skip
    base = core.GroupState(state.group_id, 0, state.head, state.name, state.description,
                           tuple(sorted([*state.members, *(core.Member(m.public, 1)
                                                           for m in members)],
                                        key=lambda m: m.key)))  # fmt: skip
    change = core.rename(ALICE, base, "m" * wire.MAX_GROUP_NAME_BYTES,
                         "d" * wire.MAX_GROUP_DESCRIPTION_BYTES)  # fmt: skip
    assert len(change.to_bytes()) <= 1325
    changes = (change,) * sg.MAX_SYNC_LOG_CHANGES
    hidden = tuple(sorted(m.public.ed_pub for m in members))
    data = sg.encode(sg.GroupStateItem(hidden, wire.GroupLogRecord(base.record(), changes)))
    assert 150_000 < len(data) <= sg.MAX_GROUP_SYNC_BYTES
    assert sg.MAX_GROUP_SYNC_FRAGMENTS * wire.RATCHET_CAPACITY >= sg.MAX_GROUP_SYNC_BYTES
    with pytest.raises(ValueError):
        sg.encode(sg.GroupStateItem(hidden, wire.GroupLogRecord(base.record(),
                                                                (*changes, change))))
    too_many = data[: -len(changes) * (len(change.to_bytes()) + 4) - 4]
    too_many += (len(changes) + 1).to_bytes(4, "big")
    too_many += b"".join(len(c.to_bytes()).to_bytes(4, "big") + c.to_bytes()
                         for c in (*changes, change))  # fmt: skip
    with pytest.raises(DecodeError):
        sg.decode(too_many)


@pytest.mark.parametrize("sample", [STATE, SENT, ASK])
@FUZZ
@given(data=st.data())
def test_mutated_group_sync_payloads_raise_only_decode_error(
    sample: sg.GroupSyncItem, data: st.DataObject
) -> None:
    mutated = bytearray(sg.encode(sample))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with contextlib.suppress(DecodeError):
        sg.decode(bytes(mutated[:cut]) + data.draw(st.binary(max_size=32)))


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    for prefix in (b"", bytes([1, 0x4A]), bytes([1, 0x4A, 1]), bytes([1, 0x4A, 2])):
        with contextlib.suppress(DecodeError):
            sg.decode(prefix + data)
