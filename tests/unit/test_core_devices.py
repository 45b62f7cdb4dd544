"""Several devices per person (docs/devices.md): the device link and its handshake between two
in-memory sides, the confirmation code, the signed device list and its winner rule, and
strict parsers that raise only DecodeError on any input."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from itertools import permutations
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import devices as d
from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError, StateError, UnsupportedVersion
from aegisd.core.identity import IdentityKeyPair
from tests.support.entropy import DeterministicEntropy

NOW = 1_800_000_000
URL = "wss://relay.example/v1/ws"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IDENTITY = IdentityKeyPair.generate(DeterministicEntropy(b"identity"))
STRANGER = IdentityKeyPair.generate(DeterministicEntropy(b"stranger"))


def mailbox(i: int, token: bool = True) -> wire.MailboxAddress:
    return wire.MailboxAddress(URL, bytes([i]) * 16, bytes([i]) * 32 if token else b"")


def device(i: int) -> d.DeviceEntry:
    return d.DeviceEntry(bytes([i]) * 16, mailbox(i, token=i % 2 == 0), bytes([i + 1]) * 16, NOW)


FIRST = d.DeviceList.sign(IDENTITY, 1, [device(1)])


def profile(extra: bytes = b"contacts, groups, settings") -> d.LinkProfile:
    ed, x = IDENTITY.raw_private()
    return d.LinkProfile(ed, x, IDENTITY.public.binding_sig, FIRST, extra)


class Link:
    """E and N, each with its own entropy, run up to the step a test needs."""

    def __init__(self, now: int = NOW) -> None:
        self.e_rng = DeterministicEntropy(b"E")
        self.n_rng = DeterministicEntropy(b"N")
        self.offer = d.LinkOffer.create(self.e_rng, mailbox(7), now)
        self.text = self.offer.link.to_text()

    def request(self, now: int = NOW + 1) -> bytes:
        self.join, block = d.LinkJoin.start(
            self.n_rng, d.DeviceLink.from_text(self.text), mailbox(8), now
        )
        return block

    def codes(self) -> tuple[str, str]:
        accept = self.offer.accept_request(self.e_rng, self.request(), NOW + 2)
        reveal = self.join.receive_accept(self.n_rng, accept)
        code_e = self.offer.receive_reveal(reveal)
        assert self.join.code is not None
        return code_e, self.join.code

    def profile_blocks(self, extra: bytes = b"x") -> list[bytes]:
        self.codes()
        self.offer.confirm()
        return self.offer.profile_blocks(self.e_rng, profile(extra))

    def received(self, extra: bytes = b"x") -> d.LinkProfile:
        out = None
        for block in self.profile_blocks(extra):
            out = self.join.add_profile_block(block) or out
        assert out is not None
        return out


def flip(block: bytes, at: int) -> bytes:
    out = bytearray(block)
    out[at] ^= 0x01
    return bytes(out)


# --- the handshake --------------------------------------------------------------------------


def test_a_full_link_gives_both_sides_the_same_keys_code_and_profile() -> None:
    link = Link()
    assert link.offer.link.to_text().startswith("aegis:")
    code_e, code_n = link.codes()
    assert code_e == code_n
    assert len(code_e) == 7 and code_e[3] == " " and code_e.replace(" ", "").isdigit()
    assert link.offer._keys == link.join._keys  # the session keys themselves
    assert link.offer.reply_to == mailbox(8)
    link.offer.confirm()
    blocks = link.offer.profile_blocks(link.e_rng, profile(b"p" * 40_000))
    assert len(blocks) == wire.padme(3) and {len(b) for b in blocks} == {wire.BLOCK_SIZE}
    got = None
    for block in reversed(blocks):  # any order
        got = link.join.add_profile_block(block) or got
    assert got == profile(b"p" * 40_000)
    link.join.confirm()
    me = device(9)
    identity, new, done = link.join.done_block(link.n_rng, me)
    assert identity.public.same_keys(IDENTITY.public)
    assert new.version == 2 and new.ids() == {device(1).device_id, me.device_id}
    assert link.offer.receive_done(IDENTITY.public, FIRST, done) == new
    assert link.offer.finished and link.join.finished


def test_every_handshake_block_is_one_block_with_only_the_version_fixed() -> None:
    link = Link()
    request = link.request()
    accept = link.offer.accept_request(link.e_rng, request, NOW + 2)
    reveal = link.join.receive_accept(link.n_rng, accept)
    for block in (request, accept, reveal):
        assert len(block) == wire.BLOCK_SIZE and block[0] == wire.VERSION


def test_the_profile_block_count_is_padded() -> None:
    link = Link()
    count = len(link.profile_blocks(b"q" * (5 * d.PROFILE_CHUNK_LEN)))
    assert count == wire.padme(6) == 6
    link = Link()
    assert len(link.profile_blocks(b"q" * (8 * d.PROFILE_CHUNK_LEN))) == wire.padme(9) == 10


@pytest.mark.parametrize("at", [0, 1, 40, 5000, wire.BLOCK_SIZE - 1])
def test_a_tampered_request_fails_with_one_error_and_leaves_the_link_usable(at: int) -> None:
    link = Link()
    request = link.request()
    with pytest.raises(DecryptionError):
        link.offer.accept_request(link.e_rng, flip(request, at), NOW + 2)
    assert link.offer.reply_to is None
    link.offer.accept_request(link.e_rng, request, NOW + 2)  # the genuine one still works


@pytest.mark.parametrize("at", [0, 1, 2000, wire.BLOCK_SIZE - 1])
def test_a_tampered_accept_or_reveal_fails(at: int) -> None:
    link = Link()
    accept = link.offer.accept_request(link.e_rng, link.request(), NOW + 2)
    with pytest.raises(DecryptionError):
        link.join.receive_accept(link.n_rng, flip(accept, at))
    reveal = link.join.receive_accept(link.n_rng, accept)
    with pytest.raises(DecryptionError):
        link.offer.receive_reveal(flip(reveal, at))
    assert link.offer.code is None
    assert link.offer.receive_reveal(reveal) == link.join.code


def test_a_tampered_profile_or_closing_block_fails() -> None:
    link = Link()
    blocks = link.profile_blocks()
    with pytest.raises(DecryptionError):
        link.join.add_profile_block(flip(blocks[0], 100))
    assert link.join.add_profile_block(blocks[0]) is not None
    link.join.confirm()
    _, _, done = link.join.done_block(link.n_rng, device(9))
    with pytest.raises(DecryptionError):
        link.offer.receive_done(IDENTITY.public, FIRST, flip(done, 50))
    assert not link.offer.finished
    link.offer.receive_done(IDENTITY.public, FIRST, done)


def test_a_wrong_link_secret_fails_with_the_same_error() -> None:
    link = Link()
    wrong = replace(link.offer.link, link_secret=bytes(32))
    _, request = d.LinkJoin.start(link.n_rng, wrong, mailbox(8), NOW + 1)
    with pytest.raises(DecryptionError):
        link.offer.accept_request(link.e_rng, request, NOW + 2)


def test_blocks_of_one_step_do_not_open_as_another() -> None:
    link = Link()
    link.codes()
    link.offer.confirm()
    block = link.offer.profile_blocks(link.e_rng, profile())[0]
    with pytest.raises(DecryptionError):  # e2n key: N's own reveal key does not open it
        d._open_session(link.offer._keys.n2e, block, d.STEP_PROFILE)  # type: ignore[union-attr]
    with pytest.raises(DecryptionError):
        d._open_session(link.offer._keys.e2n, block, d.STEP_DONE)  # type: ignore[union-attr]


def test_a_man_in_the_middle_who_replaces_ns_keys_yields_different_codes() -> None:
    # Mallory knows the link (it leaked) and answers in N's place: E's session is with her.
    link = Link()
    request_n = link.request()
    mallory_rng = DeterministicEntropy(b"M")
    mallory_n, request_m = d.LinkJoin.start(mallory_rng, link.offer.link, mailbox(9), NOW + 1)
    accept = link.offer.accept_request(link.e_rng, request_m, NOW + 2)
    code_e = link.offer.receive_reveal(mallory_n.receive_accept(mallory_rng, accept))
    # N never opens E's answer (it was made for Mallory's keys)...
    with pytest.raises(DecryptionError):
        link.join.receive_accept(link.n_rng, accept)
    # ...and Mallory cannot answer N's request under E's link: she lacks E's ephemeral key.
    mallory_e = d.LinkOffer.create(mallory_rng, mailbox(7), NOW)
    mallory_e_with_secret = d.LinkOffer(
        replace(mallory_e.link, link_secret=link.offer.link.link_secret), mallory_e._e, NOW
    )
    with pytest.raises(DecryptionError):
        mallory_e_with_secret.accept_request(mallory_rng, request_n, NOW + 2)
    # If she also showed N a link of her own, N's code comes from another session than E's.
    swapped = Link()
    swapped.offer = mallory_e
    swapped.text = mallory_e.link.to_text()
    _, code_n = swapped.codes()
    assert code_e != code_n


def test_a_link_works_once() -> None:
    link = Link()
    request = link.request()
    link.offer.accept_request(link.e_rng, request, NOW + 2)
    with pytest.raises(d.LinkUsed):  # replayed
        link.offer.accept_request(link.e_rng, request, NOW + 3)
    _, other = d.LinkJoin.start(DeterministicEntropy(b"N2"), link.offer.link, mailbox(9), NOW)
    with pytest.raises(d.LinkUsed):  # a second device on the same link
        link.offer.accept_request(link.e_rng, other, NOW + 3)


def test_an_expired_link_is_refused_on_both_sides() -> None:
    link = Link()
    assert link.offer.link.expires == NOW + d.LINK_TTL
    with pytest.raises(d.LinkExpired):
        link.request(now=NOW + d.LINK_TTL)
    request = link.request(now=NOW + d.LINK_TTL - 1)
    with pytest.raises(d.LinkExpired):
        link.offer.accept_request(link.e_rng, request, NOW + d.LINK_TTL)
    assert link.offer.reply_to is None


def test_nothing_leaves_before_the_user_confirms_and_steps_keep_their_order() -> None:
    link = Link()
    with pytest.raises(StateError):
        link.offer.confirm()  # no code yet
    link.codes()
    with pytest.raises(StateError):
        link.offer.profile_blocks(link.e_rng, profile())
    link.offer.confirm()
    blocks = link.offer.profile_blocks(link.e_rng, profile())
    with pytest.raises(d.LinkUsed):
        link.offer.profile_blocks(link.e_rng, profile())
    with pytest.raises(d.LinkUsed):
        link.join.receive_accept(link.n_rng, blocks[0])
    link.join.add_profile_block(blocks[0])
    with pytest.raises(StateError):
        link.join.done_block(link.n_rng, device(9))  # N's user has not confirmed
    with pytest.raises(d.LinkUsed):
        link.join.add_profile_block(blocks[0])


def test_a_profile_whose_list_is_not_the_identitys_is_refused() -> None:
    link = Link()
    link.codes()
    link.offer.confirm()
    forged = replace(profile(), device_list=d.DeviceList.sign(STRANGER, 1, [device(1)]))
    (block,) = link.offer.profile_blocks(link.e_rng, forged)
    with pytest.raises(DecryptionError):
        link.join.add_profile_block(block)


def test_the_closing_list_must_add_exactly_the_new_device() -> None:
    link = Link()
    link.received()
    link.join.confirm()
    _, _, done = link.join.done_block(link.n_rng, device(9))
    newer = d.DeviceList.sign(IDENTITY, 5, [device(1), device(3)])
    with pytest.raises(d.StaleDeviceList):  # E meanwhile holds a newer list
        link.offer.receive_done(IDENTITY.public, newer, done)


def test_the_closing_list_may_not_change_the_other_devices() -> None:
    link = Link()
    link.received()
    link.join.confirm()
    identity, _, _ = link.join.done_block(link.n_rng, device(9))
    moved = replace(device(1), mailbox=mailbox(5))
    altered = d.DeviceList.sign(identity, 2, [moved, device(9)])
    content = wire.Writer().u8(d.STEP_DONE).u16(len(altered.to_bytes())).raw(altered.to_bytes())
    block = d._seal_session(link.n_rng, link.join._keys.n2e, content.bytes())  # type: ignore[union-attr]
    with pytest.raises(d.StaleDeviceList):
        link.offer.receive_done(IDENTITY.public, FIRST, block)
    assert not link.offer.finished


def test_a_reply_mailbox_without_a_token_is_refused() -> None:
    link = Link()
    with pytest.raises(ValueError):
        d.LinkJoin.start(link.n_rng, link.offer.link, mailbox(8, token=False), NOW)


def test_a_seventh_device_cannot_link() -> None:
    full = d.DeviceList.sign(IDENTITY, 3, [device(i) for i in range(1, 7)])
    link = Link()
    link.codes()
    link.offer.confirm()
    for block in link.offer.profile_blocks(link.e_rng, replace(profile(), device_list=full)):
        link.join.add_profile_block(block)
    link.join.confirm()
    with pytest.raises(d.TooManyDevices):
        link.join.done_block(link.n_rng, device(9))


def test_the_code_depends_on_ns_committed_nonce() -> None:
    key = bytes(32)
    assert d.confirmation_code(key, b"a" * 32) != d.confirmation_code(key, b"b" * 32)
    codes = {d.confirmation_code(bytes([i]) * 32, b"n" * 32) for i in range(200)}
    assert len(codes) > 190  # spread over the 10^6 codes


# --- the device list ------------------------------------------------------------------------


def test_a_list_round_trips_and_verifies() -> None:
    lst = d.DeviceList.sign(IDENTITY, 4, [device(3), device(1), device(2)])
    assert [x.device_id for x in lst.devices] == sorted(x.device_id for x in lst.devices)
    assert d.DeviceList.from_bytes(lst.to_bytes()) == lst
    lst.verify(IDENTITY.public)
    assert d.decode_list_payload(d.encode_list_payload(lst)) == lst
    assert d.encode_list_payload(lst)[:2] == bytes([wire.VERSION, d.PAYLOAD_DEVICE_LIST])


def test_a_list_not_signed_by_the_identity_is_refused() -> None:
    by_stranger = d.DeviceList.sign(STRANGER, 2, [device(1), device(2)])
    with pytest.raises(d.ForgedDeviceList):
        d.accept(IDENTITY.public, FIRST, by_stranger)
    altered = replace(d.DeviceList.sign(IDENTITY, 2, [device(1)]), version=3)
    with pytest.raises(d.ForgedDeviceList):
        d.accept(IDENTITY.public, FIRST, altered)
    swapped = replace(FIRST, devices=(device(2),))
    with pytest.raises(d.ForgedDeviceList):
        swapped.verify(IDENTITY.public)


def test_a_higher_version_wins_and_a_lower_or_the_same_is_refused() -> None:
    v2 = d.DeviceList.sign(IDENTITY, 2, [device(1), device(2)])
    assert d.accept(IDENTITY.public, FIRST, v2) == v2
    with pytest.raises(d.StaleDeviceList):
        d.accept(IDENTITY.public, v2, FIRST)
    with pytest.raises(d.StaleDeviceList):
        d.accept(IDENTITY.public, v2, v2)
    assert d.accept(IDENTITY.public, None, FIRST) == FIRST


def _hold(lists: list[d.DeviceList]) -> d.DeviceList:
    held: d.DeviceList | None = None
    for lst in lists:
        with contextlib.suppress(d.StaleDeviceList):
            held = d.accept(IDENTITY.public, held, lst)
    assert held is not None
    return held


def test_concurrent_lists_converge_and_the_loser_rebases() -> None:
    parent = d.DeviceList.sign(IDENTITY, 2, [device(1), device(2), device(3)])
    # Device 1 removes device 3 (lost) while device 2 links device 4: both sign version 3.
    a = d.DeviceList.sign(IDENTITY, 3, [device(1), device(2)])
    b = d.DeviceList.sign(IDENTITY, 3, [device(1), device(2), device(3), device(4)])
    winner, loser = (a, b) if a.beats(b) else (b, a)
    # Every contact holds the same list whatever the order of arrival.
    assert {_hold(list(order)) for order in permutations([parent, a, b])} == {winner}
    # The loser's device signs its change again on the winner; the winner's device has nothing
    # to re-sign; every holder then ends with both changes.
    merged = d.rebase(IDENTITY, parent, loser, winner)
    assert merged is not None and merged.version == 4
    assert merged.ids() == {device(i).device_id for i in (1, 2, 4)}
    assert d.rebase(IDENTITY, parent, winner, merged) is None
    assert {_hold(list(order)) for order in permutations([parent, a, b, merged])} == {merged}


def test_a_rebase_that_the_winner_already_holds_signs_nothing() -> None:
    parent = d.DeviceList.sign(IDENTITY, 2, [device(1), device(2)])
    a = d.DeviceList.sign(IDENTITY, 3, [device(1)])
    b = d.DeviceList.sign(IDENTITY, 3, [device(1)])  # the same change, the same bytes
    assert a == b and d.rebase(IDENTITY, parent, a, b) is None


def test_more_than_max_devices_is_refused() -> None:
    assert d.MAX_DEVICES == 6
    with pytest.raises(d.TooManyDevices):
        d.DeviceList.sign(IDENTITY, 1, [device(i) for i in range(1, 8)])
    six = d.DeviceList.sign(IDENTITY, 1, [device(i) for i in range(1, 7)])
    body = bytearray(six.to_bytes())
    seven = bytes(body[:10]) + bytes([7]) + bytes(body[11:-64])
    w = wire.Writer()
    device(7).write(w)
    with pytest.raises(DecodeError):
        d.DeviceList.from_bytes(seven + w.bytes() + bytes(64))
    parent = d.DeviceList.sign(IDENTITY, 2, [device(i) for i in range(1, 6)])
    a = d.DeviceList.sign(IDENTITY, 3, [device(i) for i in range(1, 7)])
    b = d.DeviceList.sign(IDENTITY, 3, [*(device(i) for i in range(1, 6)), device(8)])
    with pytest.raises(d.TooManyDevices):
        d.rebase(IDENTITY, parent, a, b)


def test_structural_refusals() -> None:
    with pytest.raises(ValueError):  # duplicate device IDs
        d.DeviceList.sign(IDENTITY, 1, [device(1), device(1)])
    with pytest.raises(ValueError):
        d.DeviceList.sign(IDENTITY, 0, [device(1)])
    with pytest.raises(d.TooManyDevices):
        d.DeviceList.sign(IDENTITY, 1, [])
    two = d.DeviceList.sign(IDENTITY, 1, [device(1), device(2)])
    unordered = replace(two, devices=(device(2), device(1)))
    with pytest.raises(ValueError):
        unordered.to_bytes()
    raw = two.to_bytes()
    e1, e2 = wire.Writer(), wire.Writer()
    device(1).write(e1)
    device(2).write(e2)
    head = raw[:11]
    with pytest.raises(DecodeError):
        d.DeviceList.from_bytes(head + e2.bytes() + e1.bytes() + raw[-64:])
    with pytest.raises(DecodeError):  # a link mailbox always has a token
        d.DeviceLink.from_bytes(_untokened_link())
    with pytest.raises(ValueError):
        replace(Link().offer.link, mailbox=mailbox(3, token=False)).to_bytes()
    # A device link is not a contact link, and a contact link is not a device link.
    text = Link().text
    with pytest.raises(DecodeError):
        wire.ContactLink.from_text(text)
    with pytest.raises(DecodeError):
        d.DeviceLink.from_text(text + "A")
    with pytest.raises(DecodeError):
        d.DeviceLink.from_text(text.replace("aegis:", "aegis:="))


def _untokened_link() -> bytes:
    link = Link().offer.link
    w = wire.Writer().u8(wire.VERSION).u8(d.LINK_DEVICE)
    mailbox(3, token=False).write(w)
    return w.raw(link.link_secret).raw(link.e_pub).u64(link.expires).bytes()


def test_reprs_hold_no_secret() -> None:
    link = Link()
    link.codes()
    for obj in (link.offer.link, link.offer, link.join, profile()):
        text = repr(obj)
        for secret in (link.offer.link.link_secret, IDENTITY.raw_private()[0]):
            assert secret.hex() not in text and repr(secret) not in text


# --- strict parsers -------------------------------------------------------------------------

_SAMPLE_LINK = Link().offer.link
PARSERS: dict[str, tuple[Callable[[bytes], Any], bytes]] = {
    "link": (d.DeviceLink.from_bytes, _SAMPLE_LINK.to_bytes()),
    "list": (
        d.DeviceList.from_bytes,
        d.DeviceList.sign(IDENTITY, 9, [device(1), device(2)]).to_bytes(),
    ),
    "payload": (d.decode_list_payload, d.encode_list_payload(FIRST)),
    "profile": (d.LinkProfile.from_bytes, profile().to_bytes()),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_round_trip_and_strictness(name: str) -> None:
    parse, sample = PARSERS[name]
    assert parse(sample) is not None
    with pytest.raises(DecodeError):
        parse(sample + b"\x00")
    with pytest.raises(DecodeError):
        parse(sample[:-1])
    with pytest.raises(UnsupportedVersion):
        parse(b"\x02" + sample[1:])


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_decode_error(name: str, data: bytes) -> None:
    parse, sample = PARSERS[name]
    with contextlib.suppress(DecodeError):
        parse(sample[:2] + data)
    with contextlib.suppress(DecodeError):
        parse(data)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_input_raises_only_decode_error(name: str, data: st.DataObject) -> None:
    parse, sample = PARSERS[name]
    mutated = bytearray(sample)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated) - 1)) :]
    elif kind == "extend":
        mutated += data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(0, len(mutated)))
        mutated[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    with contextlib.suppress(DecodeError):
        parse(bytes(mutated))


@FUZZ
@given(data=st.text(max_size=300))
def test_link_text_raises_only_decode_error(data: str) -> None:
    with contextlib.suppress(DecodeError):
        d.DeviceLink.from_text(data)
    with contextlib.suppress(DecodeError):
        d.DeviceLink.from_text("aegis:" + data)


@settings(max_examples=25, deadline=None)
@given(data=st.binary(min_size=64, max_size=64))
def test_random_blocks_fail_every_step_with_one_error(data: bytes) -> None:
    block = bytes([wire.VERSION]) + (data * (wire.BLOCK_SIZE // 64))[1:]
    link = Link()
    with pytest.raises(DecryptionError):
        link.offer.accept_request(link.e_rng, block, NOW + 2)
    link.request()
    with pytest.raises(DecryptionError):
        link.join.receive_accept(link.n_rng, block)


# --- docs/devices.md against the code --------------------------------------------------------


def test_the_design_documents_constants_and_labels_are_the_codes() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "devices.md").read_text()
    section = text.split("## 2. Constants", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", section, re.MULTILINE)
    assert len(names) >= 9
    for name, value in names:
        number = int(value.split()[0].strip("`").replace(",", ""), 0)
        assert getattr(d, name) == number, name
    labels = re.findall(r'^\| [^|]+ \| `"([^"]+)"` \| (\d+) \|', section, re.MULTILINE)
    code_labels = {v for k, v in vars(d).items() if k.endswith("_LABEL") and isinstance(v, bytes)}
    assert {label.encode() for label, _ in labels} == code_labels
    for label, length in labels:
        assert len(label) == int(length)
