"""Several devices per person (docs/devices.md): the device link and its handshake between two
in-memory sides, the confirmation code, the signed device list and its winner rule, and
strict parsers that raise only DecodeError on any input."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import replace
from itertools import permutations
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import devices as d
from aegisd.core import primitives as p
from aegisd.core import wire
from aegisd.core.backup import BackupContents
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


DEVICE_KEYS = {i: d.new_device_key(DeterministicEntropy(bytes([i]) * 4)) for i in range(1, 12)}


def device(i: int) -> d.DeviceEntry:
    return d.DeviceEntry(
        bytes([i]) * 16, mailbox(i, token=i % 2 == 0), bytes([i + 1]) * 16, NOW, DEVICE_KEYS[i][1]
    )


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
        reveal = self.join.receive_accept(self.n_rng, accept, NOW + 3)
        code_e = self.offer.receive_reveal(reveal, NOW + 4)
        assert self.join.code is not None
        return code_e, self.join.code

    def profile_blocks(self, extra: bytes = b"x", lst: d.DeviceList = FIRST) -> list[bytes]:
        self.codes()
        self.offer.confirm(NOW + 5)
        return self.offer.profile_blocks(
            self.e_rng, replace(profile(extra), device_list=lst), NOW + 6
        )

    def received(self, extra: bytes = b"x", lst: d.DeviceList = FIRST) -> d.LinkProfile:
        out = None
        for block in self.profile_blocks(extra, lst):
            out = self.join.add_profile_block(block, NOW + 7) or out
        assert out is not None
        return out

    def done(self, me: int = 9, extra: bytes = b"x") -> bytes:
        self.received(extra)
        self.join.confirm(NOW + 8)
        return self.join.done_block(self.n_rng, device(me), NOW + 9)


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
    link.offer.confirm(NOW + 5)
    blocks = link.offer.profile_blocks(link.e_rng, profile(b"p" * 40_000), NOW + 6)
    assert len(blocks) == wire.padme(3) and {len(b) for b in blocks} == {wire.BLOCK_SIZE}
    got = None
    for block in reversed(blocks):  # any order
        got = link.join.add_profile_block(block, NOW + 7) or got
    assert got == profile(b"p" * 40_000)
    link.join.confirm(NOW + 8)
    me = device(9)
    done = link.join.done_block(link.n_rng, me, NOW + 9)
    new, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, NOW + 10)
    assert new is not None and new.ids() == {device(1).device_id, me.device_id}
    assert new.version == (NOW + 10) * d.VERSIONS_PER_SECOND and new.entry(me.device_id) == me
    new.verify(IDENTITY.public)
    identity, got_list = link.join.receive_final(final, NOW + 11)
    assert identity.public.same_keys(IDENTITY.public) and got_list == new
    assert link.offer.finished and link.join.finished


def test_every_handshake_block_is_one_block_with_only_the_version_fixed() -> None:
    link = Link()
    request = link.request()
    accept = link.offer.accept_request(link.e_rng, request, NOW + 2)
    reveal = link.join.receive_accept(link.n_rng, accept, NOW + 3)
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
        link.join.receive_accept(link.n_rng, flip(accept, at), NOW + 3)
    reveal = link.join.receive_accept(link.n_rng, accept, NOW + 3)
    with pytest.raises(DecryptionError):
        link.offer.receive_reveal(flip(reveal, at), NOW + 4)
    assert link.offer.code is None
    assert link.offer.receive_reveal(reveal, NOW + 4) == link.join.code


def test_a_tampered_profile_or_closing_block_fails() -> None:
    link = Link()
    blocks = link.profile_blocks()
    with pytest.raises(DecryptionError):
        link.join.add_profile_block(flip(blocks[0], 100), NOW + 7)
    assert link.join.add_profile_block(blocks[0], NOW + 7) is not None
    link.join.confirm(NOW + 8)
    done = link.join.done_block(link.n_rng, device(9), NOW + 9)
    with pytest.raises(DecryptionError):
        link.offer.receive_done(link.e_rng, IDENTITY, FIRST, flip(done, 50), NOW + 10)
    assert not link.offer.finished
    _, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, NOW + 10)
    with pytest.raises(DecryptionError):
        link.join.receive_final(flip(final, 60), NOW + 11)
    assert not link.join.finished
    link.join.receive_final(final, NOW + 11)


def test_a_wrong_link_secret_fails_with_the_same_error() -> None:
    link = Link()
    wrong = replace(link.offer.link, link_secret=bytes(32))
    _, request = d.LinkJoin.start(link.n_rng, wrong, mailbox(8), NOW + 1)
    with pytest.raises(DecryptionError):
        link.offer.accept_request(link.e_rng, request, NOW + 2)


def test_blocks_of_one_step_do_not_open_as_another() -> None:
    link = Link()
    link.codes()
    link.offer.confirm(NOW + 5)
    block = link.offer.profile_blocks(link.e_rng, profile(), NOW + 6)[0]
    with pytest.raises(DecryptionError):  # e2n key: N's own reveal key does not open it
        d._open_session(link.offer._keys.n2e, block, d.STEP_PROFILE)  # type: ignore[union-attr]
    with pytest.raises(DecryptionError):
        d._open_session(link.offer._keys.e2n, block, d.STEP_DONE)  # type: ignore[union-attr]


def _reveal_of(join: d.LinkJoin, n_nonce: bytes) -> bytes:
    assert join._keys is not None
    return d._seal_session(
        DeterministicEntropy(b"R"), join._keys.n2e, bytes([d.STEP_REVEAL]) + n_nonce
    )


def test_a_reveal_of_another_nonce_than_the_committed_one_is_refused() -> None:
    link = Link()
    accept = link.offer.accept_request(link.e_rng, link.request(), NOW + 2)
    genuine = link.join.receive_accept(link.n_rng, accept, NOW + 3)
    # Sealed under the right key, step and padding: only the nonce is not the committed one.
    with pytest.raises(DecryptionError):
        link.offer.receive_reveal(_reveal_of(link.join, bytes(32)), NOW + 4)
    assert link.offer.code is None
    assert link.offer.receive_reveal(genuine, NOW + 4) == link.join.code


def test_a_man_in_the_middle_cannot_choose_his_nonce_after_es_ciphertext() -> None:
    # Mallory holds the leaked link and answers E in N's place; N was shown a link of hers.
    link = Link()
    mallory_rng = DeterministicEntropy(b"M")
    mallory_n, request_m = d.LinkJoin.start(mallory_rng, link.offer.link, mailbox(9), NOW + 1)
    accept = link.offer.accept_request(link.e_rng, request_m, NOW + 2)
    mallory_n.receive_accept(mallory_rng, accept, NOW + 3)
    mallory_e = d.LinkOffer.create(mallory_rng, mailbox(7), NOW)
    swapped = Link()
    swapped.offer, swapped.text = mallory_e, mallory_e.link.to_text()
    _, code_n = swapped.codes()
    # E's ciphertext is fixed now: to make E show N's code she would pick the nonce now. Any
    # nonce but the one she committed to before seeing it is refused.
    with pytest.raises(DecryptionError):
        link.offer.receive_reveal(_reveal_of(mallory_n, bytes(32)), NOW + 4)
    code_e = link.offer.receive_reveal(_reveal_of(mallory_n, mallory_n._nonce), NOW + 4)
    assert code_e != code_n
    # A device that used E's real link never opens E's answer to Mallory...
    real_n, _ = d.LinkJoin.start(DeterministicEntropy(b"N"), link.offer.link, mailbox(8), NOW)
    with pytest.raises(DecryptionError):
        real_n.receive_accept(link.n_rng, accept, NOW + 3)
    # ...and Mallory cannot answer a request made under E's link: she lacks E's ephemeral key.
    real = Link()
    mallory_with_secret = d.LinkOffer(
        replace(mallory_e.link, link_secret=real.offer.link.link_secret), mallory_e._e, NOW
    )
    with pytest.raises(DecryptionError):
        mallory_with_secret.accept_request(mallory_rng, real.request(), NOW + 2)


def test_a_link_works_once() -> None:
    link = Link()
    request = link.request()
    link.offer.accept_request(link.e_rng, request, NOW + 2)
    with pytest.raises(d.LinkUsed):  # replayed
        link.offer.accept_request(link.e_rng, request, NOW + 3)
    _, other = d.LinkJoin.start(DeterministicEntropy(b"N2"), link.offer.link, mailbox(9), NOW)
    with pytest.raises(d.LinkUsed):  # a second device on the same link
        link.offer.accept_request(link.e_rng, other, NOW + 3)


def _request_with(link: Link, inner: bytes) -> bytes:
    """A request sealed under the link (what a holder of the link can make), any content."""
    rng = DeterministicEntropy(b"H")
    n = rng.x25519_private()
    n_pub = p.x25519_public(n)
    key = d._request_key(link.offer.link, p.dh(n, link.offer.link.e_pub), n_pub)
    prefix = bytes([wire.VERSION]) + n_pub
    return prefix + p.seal_once(key, d._pad(inner, d.REQUEST_CONTENT_LEN), prefix)


def _inner(ek: bytes, reply: wire.MailboxAddress) -> bytes:
    w = wire.Writer().u8(d.STEP_REQUEST).raw(ek).raw(d._commit(bytes(32)))
    return reply.write(w).bytes()


def test_a_request_that_opens_uses_the_link_up_even_when_refused() -> None:
    good_ek = p.mlkem_ek(DeterministicEntropy(b"K").mlkem_private())
    elsewhere = wire.MailboxAddress("wss://other.example/v1/ws", bytes(16), bytes(32))
    for inner in (
        _inner(b"\xff" * wire.MLKEM_EK_LEN, mailbox(8)),  # an ML-KEM key that does not load
        _inner(good_ek, elsewhere),  # a reply mailbox on another relay than the link's
        _inner(good_ek, mailbox(8, token=False)),  # a reply mailbox without a token
    ):
        link = Link()
        with pytest.raises(DecryptionError):
            link.offer.accept_request(link.e_rng, _request_with(link, inner), NOW + 2)
        assert link.offer.reply_to is None
        with pytest.raises(d.LinkUsed):
            link.offer.accept_request(link.e_rng, link.request(), NOW + 3)
    # The same content with a good key and the link's relay is taken.
    link = Link()
    link.offer.accept_request(link.e_rng, _request_with(link, _inner(good_ek, mailbox(8))), NOW)
    assert link.offer.reply_to == mailbox(8)


def test_n_puts_its_reply_mailbox_on_the_links_relay() -> None:
    link = Link()
    elsewhere = wire.MailboxAddress("wss://other.example/v1/ws", bytes(16), bytes(32))
    with pytest.raises(ValueError):
        d.LinkJoin.start(link.n_rng, link.offer.link, elsewhere, NOW)


def test_an_expired_link_is_refused_on_both_sides() -> None:
    link = Link()
    assert link.offer.link.expires == NOW + d.LINK_TTL
    with pytest.raises(d.LinkExpired):
        link.request(now=NOW + d.LINK_TTL)
    request = link.request(now=NOW + d.LINK_TTL - 1)
    with pytest.raises(d.LinkExpired):
        link.offer.accept_request(link.e_rng, request, NOW + d.LINK_TTL)
    assert link.offer.reply_to is None


END = NOW + d.LINK_TTL


def test_every_step_of_both_sides_refuses_after_expiry() -> None:
    link = Link()
    accept = link.offer.accept_request(link.e_rng, link.request(), NOW + 2)
    with pytest.raises(d.LinkExpired):
        link.join.receive_accept(link.n_rng, accept, END)
    reveal = link.join.receive_accept(link.n_rng, accept, END - 1)
    with pytest.raises(d.LinkExpired):
        link.offer.receive_reveal(reveal, END)
    link.offer.receive_reveal(reveal, END - 1)
    with pytest.raises(d.LinkExpired):
        link.offer.confirm(END)
    link.offer.confirm(END - 1)
    with pytest.raises(d.LinkExpired):  # the identity key never leaves after expiry
        link.offer.profile_blocks(link.e_rng, profile(), END)
    (block,) = link.offer.profile_blocks(link.e_rng, profile(), END - 1)
    with pytest.raises(d.LinkExpired):
        link.join.add_profile_block(block, END)
    link.join.add_profile_block(block, END - 1)
    with pytest.raises(d.LinkExpired):
        link.join.confirm(END)
    link.join.confirm(END - 1)
    with pytest.raises(d.LinkExpired):
        link.join.done_block(link.n_rng, device(9), END)
    done = link.join.done_block(link.n_rng, device(9), END - 1)
    with pytest.raises(d.LinkExpired):  # E signs no list after expiry
        link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, END)
    new, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, END - 1)
    assert new is not None
    # E sent its final before expiry: N takes it for FINAL_GRACE more seconds, not later.
    with pytest.raises(d.LinkExpired):
        link.join.receive_final(final, END + d.FINAL_GRACE)
    assert link.join.receive_final(final, END + d.FINAL_GRACE - 1)[1] == new


def test_nothing_leaves_before_the_user_confirms_and_steps_keep_their_order() -> None:
    link = Link()
    with pytest.raises(StateError):
        link.offer.confirm(NOW)  # no code yet
    link.codes()
    with pytest.raises(StateError):
        link.offer.profile_blocks(link.e_rng, profile(), NOW + 5)
    link.offer.confirm(NOW + 5)
    blocks = link.offer.profile_blocks(link.e_rng, profile(), NOW + 6)
    with pytest.raises(d.LinkUsed):
        link.offer.profile_blocks(link.e_rng, profile(), NOW + 6)
    with pytest.raises(d.LinkUsed):
        link.join.receive_accept(link.n_rng, blocks[0], NOW + 6)
    link.join.add_profile_block(blocks[0], NOW + 7)
    with pytest.raises(StateError):
        link.join.done_block(link.n_rng, device(9), NOW + 8)  # N's user has not confirmed
    with pytest.raises(d.LinkUsed):
        link.join.add_profile_block(blocks[0], NOW + 8)
    link.join.confirm(NOW + 8)
    done = link.join.done_block(link.n_rng, device(9), NOW + 9)
    with pytest.raises(d.LinkUsed):  # the closing block is made once
        link.join.done_block(link.n_rng, device(9), NOW + 9)
    _, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, NOW + 10)
    with pytest.raises(d.LinkUsed):
        link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, NOW + 10)
    link.join.receive_final(final, NOW + 11)
    with pytest.raises(d.LinkUsed):
        link.join.receive_final(final, NOW + 11)


def test_a_profile_whose_list_is_not_the_identitys_is_refused() -> None:
    link = Link()
    forged = d.DeviceList.sign(STRANGER, 1, [device(1)])
    (block,) = link.profile_blocks(lst=forged)
    with pytest.raises(DecryptionError):
        link.join.add_profile_block(block, NOW + 7)


def test_e_adds_the_new_device_to_the_list_it_holds_at_the_end() -> None:
    link = Link()
    done = link.done()
    # Meanwhile another link completed: E now holds device 3 too. E adds N to THAT list.
    meanwhile = d.DeviceList.sign(IDENTITY, NOW * 1000, [device(1), device(3)])
    new, final = link.offer.receive_done(link.e_rng, IDENTITY, meanwhile, done, NOW + 10)
    assert new is not None and new.beats(meanwhile)
    assert list(new.devices) == [device(1), device(3), device(9)]
    assert link.join.receive_final(final, NOW + 11)[1] == new


def test_a_closing_block_with_two_entries_adds_nothing() -> None:
    link = Link()
    link.done()
    two = device(9).to_bytes() + device(10).to_bytes()
    content = wire.Writer().u8(d.STEP_DONE).u16(len(two)).raw(two).bytes()
    block = d._seal_session(link.n_rng, link.join._keys.n2e, content)  # type: ignore[union-attr]
    with pytest.raises(DecryptionError):
        link.offer.receive_done(link.e_rng, IDENTITY, FIRST, block, NOW + 10)
    assert not link.offer.finished


def test_e_refuses_a_new_device_when_the_list_it_holds_is_full() -> None:
    link = Link()
    done = link.done()
    full = d.DeviceList.sign(IDENTITY, NOW * 1000, [device(i) for i in range(1, 7)])
    new, final = link.offer.receive_done(link.e_rng, IDENTITY, full, done, NOW + 10)
    assert new is None and link.offer.finished
    with pytest.raises(d.TooManyDevices):  # N is told, and drops the profile
        link.join.receive_final(final, NOW + 11)
    taken = Link()
    done = taken.done(me=1)  # a device ID that is in E's list already
    new, final = taken.offer.receive_done(taken.e_rng, IDENTITY, FIRST, done, NOW + 10)
    assert new is None
    with pytest.raises(d.LinkRefused):
        taken.join.receive_final(final, NOW + 11)


def test_e_sends_no_identity_key_when_the_list_is_full() -> None:
    full = d.DeviceList.sign(IDENTITY, 3, [device(i) for i in range(1, 7)])
    link = Link()
    with pytest.raises(d.TooManyDevices):
        link.profile_blocks(lst=full)


def test_a_final_block_whose_list_lacks_the_new_device_is_refused() -> None:
    link = Link()
    done = link.done()
    other = d.DeviceList.sign(IDENTITY, NOW * 1000, [device(1), device(10)])
    content = d._final_content(d.FINAL_ACCEPTED, other)
    final = d._seal_session(link.e_rng, link.offer._keys.e2n, content)  # type: ignore[union-attr]
    assert done
    with pytest.raises(DecryptionError):
        link.join.receive_final(final, NOW + 11)


def test_a_reply_mailbox_without_a_token_is_refused() -> None:
    link = Link()
    with pytest.raises(ValueError):
        d.LinkJoin.start(link.n_rng, link.offer.link, mailbox(8, token=False), NOW)


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
        d.accept(IDENTITY.public, FIRST, by_stranger, NOW)
    altered = replace(d.DeviceList.sign(IDENTITY, 2, [device(1)]), version=3)
    with pytest.raises(d.ForgedDeviceList):
        d.accept(IDENTITY.public, FIRST, altered, NOW)
    swapped = replace(FIRST, devices=(device(2),))
    with pytest.raises(d.ForgedDeviceList):
        swapped.verify(IDENTITY.public)


def test_a_higher_version_wins_and_a_lower_or_the_same_is_refused() -> None:
    v2 = d.DeviceList.sign(IDENTITY, 2, [device(1), device(2)])
    assert d.accept(IDENTITY.public, FIRST, v2, NOW) == v2
    with pytest.raises(d.StaleDeviceList):
        d.accept(IDENTITY.public, v2, FIRST, NOW)
    with pytest.raises(d.StaleDeviceList):
        d.accept(IDENTITY.public, v2, v2, NOW)
    assert d.accept(IDENTITY.public, None, FIRST, NOW) == FIRST


def _hold(lists: list[d.DeviceList]) -> d.DeviceList:
    held: d.DeviceList | None = None
    for lst in lists:
        with contextlib.suppress(d.StaleDeviceList):
            held = d.accept(IDENTITY.public, held, lst, NOW)
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
    merged = d.rebase(IDENTITY, parent, loser, winner, NOW)
    assert merged is not None and merged.version == NOW * d.VERSIONS_PER_SECOND
    assert merged.ids() == {device(i).device_id for i in (1, 2, 4)}
    with pytest.raises(d.NotConcurrent):  # the winner's device has nothing to rebase
        d.rebase(IDENTITY, parent, winner, loser, NOW)
    assert {_hold(list(order)) for order in permutations([parent, a, b, merged])} == {merged}


def test_a_rebase_that_the_winner_already_holds_signs_nothing() -> None:
    parent = d.DeviceList.sign(IDENTITY, 2, [device(1), device(2)])
    a = d.DeviceList.sign(IDENTITY, 3, [device(1)])
    b = d.DeviceList.sign(IDENTITY, 3, [device(1)])  # the same change, the same bytes
    assert a == b and d.rebase(IDENTITY, parent, a, b, NOW) is None


def test_a_list_version_is_at_least_the_clock_and_may_not_run_ahead_of_it() -> None:
    assert d.next_version(None, NOW) == NOW * 1000
    ahead = d.DeviceList.sign(IDENTITY, (NOW + 5) * 1000, [device(1)])
    assert d.next_version(ahead, NOW) == (NOW + 5) * 1000 + 1  # one more than the parent
    # Any holder of the identity key could sign 2^63 - 1 and pin the list for good: refused.
    top = d.DeviceList.sign(IDENTITY, d.LIST_VERSION_LIMIT - 1, [device(1), device(2)])
    with pytest.raises(d.FutureDeviceList):
        d.accept(IDENTITY.public, FIRST, top, NOW)
    limit = (NOW + d.MAX_LIST_SKEW) * 1000
    edge = d.DeviceList.sign(IDENTITY, limit, [device(1)])
    assert d.accept(IDENTITY.public, FIRST, edge, NOW) == edge
    with pytest.raises(d.FutureDeviceList):
        d.accept(IDENTITY.public, FIRST, replace_version(edge, limit + 1), NOW)
    with pytest.raises(d.FutureDeviceList):  # a rebase onto it fails with a DeviceError
        d.next_version(top, NOW)


def replace_version(lst: d.DeviceList, version: int) -> d.DeviceList:
    return d.DeviceList.sign(IDENTITY, version, lst.devices)


def test_a_later_import_of_the_same_backup_beats_the_earlier() -> None:
    backup = d.DeviceList.sign(IDENTITY, NOW * 1000, [device(1), device(2)])
    # Two machines import the same backup, a minute apart: each signs itself alone.
    first = d.DeviceList.sign(IDENTITY, d.next_version(backup, NOW + 3600), [device(3)])
    second = d.DeviceList.sign(IDENTITY, d.next_version(backup, NOW + 3660), [device(4)])
    assert second.beats(first) and first.beats(backup)
    # A change the old devices made after the backup, before the import, loses to it too.
    later = d.DeviceList.sign(IDENTITY, d.next_version(backup, NOW + 60), [device(1)])
    assert first.beats(later)
    assert _hold([backup, second, later, first]) == second


def test_only_concurrent_lists_are_rebased() -> None:
    # Device 1 removes device 2 (X, lost); X, which holds the identity key, re-adds itself on
    # top. The newer list is accepted, not rebased: no device re-signs forever.
    v1 = d.DeviceList.sign(IDENTITY, 1, [device(1), device(2)])
    a_mine = d.DeviceList.sign(IDENTITY, 2, [device(1)])
    x_mine = d.DeviceList.sign(IDENTITY, 3, [device(1), device(2)])
    with pytest.raises(d.NotConcurrent):
        d.rebase(IDENTITY, v1, a_mine, x_mine, NOW)
    assert d.accept(IDENTITY.public, a_mine, x_mine, NOW) == x_mine
    # The person's own devices alert: a device they removed is back.
    change = d.diff(v1, a_mine)
    assert change.removed == {device(2).device_id} and not change.added
    assert d.readded(change.removed, x_mine) == {device(2).device_id}
    assert d.readded(change.removed, a_mine) == frozenset()


def test_a_rebase_carries_a_changed_entry_too() -> None:
    parent = d.DeviceList.sign(IDENTITY, 2, [device(1), device(2)])
    moved = replace(device(2), mailbox=mailbox(12))  # device 2 rotated its device mailbox
    a = d.DeviceList.sign(IDENTITY, 3, [device(1), moved])
    b = d.DeviceList.sign(IDENTITY, 3, [device(1), device(2), device(4)])
    loser, winner = (a, b) if b.beats(a) else (b, a)
    merged = d.rebase(IDENTITY, parent, loser, winner, NOW)
    assert merged is not None
    assert list(merged.devices) == [device(1), moved, device(4)]
    assert d.diff(parent, merged) == d.ListChange(
        frozenset({device(4).device_id}), frozenset(), frozenset({device(2).device_id})
    )


# --- device keys ------------------------------------------------------------------------------

LISTED = d.DeviceList.sign(IDENTITY, 5, [device(1), device(2)])
EK = b"\x11" * 32  # the session's EK_A.pub


def hello(i: int, key: int | None = None, ek: bytes = EK) -> d.DeviceHello:
    priv = DEVICE_KEYS[key if key is not None else i][0]
    return d.DeviceHello.sign(priv, IDENTITY.public, device(i).device_id, mailbox(i), 5, ek)


def test_a_hello_proves_the_listed_device_key() -> None:
    got = d.DeviceHello.from_bytes(hello(2).to_bytes())
    assert got.check(IDENTITY.public, LISTED, EK) == device(2)


def test_a_removed_device_holding_the_identity_key_cannot_pass_for_a_listed_one() -> None:
    # Device 3 was removed; it still holds the identity key but only its own device key.
    with pytest.raises(d.ForgedDeviceProof):
        hello(2, key=3).check(IDENTITY.public, LISTED, EK)
    with pytest.raises(d.UnlistedDevice):  # as itself, it is in no list
        hello(3).check(IDENTITY.public, LISTED, EK)
    with pytest.raises(d.ForgedDeviceProof):  # an old hello of device 2 in another session
        hello(2).check(IDENTITY.public, LISTED, b"\x22" * 32)
    with pytest.raises(d.ForgedDeviceProof):  # another identity's list entry does not help
        hello(2).check(STRANGER.public, d.DeviceList.sign(STRANGER, 5, [device(2)]), EK)
    altered = replace(hello(2), list_version=6)
    with pytest.raises(d.ForgedDeviceProof):
        altered.check(IDENTITY.public, LISTED, EK)


def test_a_first_contact_opens_with_a_hello_bound_to_its_own_ek() -> None:
    """initiate_session gives a content callable the session's EK_A.pub (the block prefix's):
    the receiver checks the hello with the EK of the block it opened, and a hello lifted into
    another session (another EK) does not prove the device (docs/protocol.md §28.4)."""
    from aegisd.core import pqxdh
    from aegisd.core.session import accept_first_contact, initiate_session
    from tests.support.parties import bob_with_store

    entropy = DeterministicEntropy(b"first contact")
    _bob, store, xs, kems = bob_with_store(entropy)
    seen: list[bytes] = []

    def content(ek: bytes) -> bytes:
        seen.append(ek)
        return d.encode_device_payload(hello(2, ek=ek))

    blocks = []
    for i in range(2):
        bundle = pqxdh.verify_bundle(store.bundle_base().to_bytes(), xs[i], kems[i])
        blocks.append(initiate_session(entropy, IDENTITY, bundle, content)[1])
    eks = [wire.FirstContactPrefix.from_block(b).ephemeral_pub for b in blocks]
    assert seen == eks and eks[0] != eks[1]
    fc = accept_first_contact(entropy, store, blocks[0])
    got = d.decode_device_payload(fc.fragment.data)
    assert isinstance(got, d.DeviceHello)
    assert got.check(fc.sender, LISTED, eks[0]) == device(2)
    with pytest.raises(d.ForgedDeviceProof):
        got.check(fc.sender, LISTED, eks[1])


def test_a_bundle_proves_the_listed_device_key() -> None:
    base = b"bundle base" * 100
    data = d.device_bundle(DEVICE_KEYS[2][0], IDENTITY.public, device(2).device_id, base)
    assert d.check_device_bundle(IDENTITY.public, LISTED, device(2).device_id, data) == base
    planted = d.device_bundle(DEVICE_KEYS[3][0], IDENTITY.public, device(2).device_id, base)
    with pytest.raises(d.ForgedDeviceProof):  # planted at device 2's address by device 3
        d.check_device_bundle(IDENTITY.public, LISTED, device(2).device_id, planted)
    with pytest.raises(d.ForgedDeviceProof):  # device 1's bundle served as device 2's
        d.check_device_bundle(
            IDENTITY.public,
            LISTED,
            device(2).device_id,
            d.device_bundle(DEVICE_KEYS[1][0], IDENTITY.public, device(1).device_id, base),
        )
    with pytest.raises(DecodeError):
        d.check_device_bundle(IDENTITY.public, LISTED, device(2).device_id, data[:80])


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
    loser, winner = (a, b) if b.beats(a) else (b, a)
    with pytest.raises(d.TooManyDevices):
        d.rebase(IDENTITY, parent, loser, winner, NOW)


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
    "hello": (
        d.DeviceHello.from_bytes,
        d.DeviceHello.sign(
            DEVICE_KEYS[2][0], IDENTITY.public, bytes(16), mailbox(2), 7, bytes(32)
        ).to_bytes(),
    ),
    "profile": (d.LinkProfile.from_bytes, profile().to_bytes()),
    "device payload: list": (d.decode_device_payload, d.encode_list_payload(FIRST)),
    "device payload: hello": (
        d.decode_device_payload,
        d.DeviceHello.sign(
            DEVICE_KEYS[2][0], IDENTITY.public, bytes(16), mailbox(2), 7, bytes(32)
        ).to_bytes(),
    ),
    "device payload: ack": (
        d.decode_device_payload,
        d.encode_device_payload(d.ListAck.of(FIRST)),
    ),
    "device payload: request": (
        d.decode_device_payload,
        d.encode_device_payload(d.ListRequest(FIRST.version, FIRST.digest())),
    ),
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
        link.join.receive_accept(link.n_rng, block, NOW + 3)


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


# --- a second device on a used link; the new device's "installed" and E's "listed" -------------


def _second(link: Link, seed: bytes = b"N2", reply: int = 9) -> tuple[d.LinkJoin, bytes]:
    return d.LinkJoin.start(DeterministicEntropy(seed), link.offer.link, mailbox(reply), NOW)


def test_a_second_device_is_told_at_once_that_the_link_was_used() -> None:
    link = Link()
    link.offer.accept_request(link.e_rng, link.request(), NOW + 2)
    keys = link.offer._keys
    second, request = _second(link)
    reply, used = link.offer.refuse_request(request, NOW + 3)
    assert reply == mailbox(9) and len(used) == wire.BLOCK_SIZE and used[0] == wire.VERSION
    with pytest.raises(d.LinkUsed, match="this link was already used"):
        second.receive_accept(DeterministicEntropy(b"x"), used, NOW + 4)
    assert second.finished and second.code is None
    # The running link is unharmed: its keys, its reply mailbox, every later step.
    assert link.offer._keys == keys and link.offer.reply_to == mailbox(8)


def test_a_refusal_leaves_the_running_link_to_complete() -> None:
    link = Link()
    accept = link.offer.accept_request(link.e_rng, link.request(), NOW + 2)
    _, request = _second(link)
    link.offer.refuse_request(request, NOW + 2)
    reveal = link.join.receive_accept(link.n_rng, accept, NOW + 3)
    _, request = _second(link, b"N3", 10)
    link.offer.refuse_request(request, NOW + 3)  # while the user decides
    assert link.offer.receive_reveal(reveal, NOW + 4) == link.join.code
    link.offer.confirm(NOW + 5)
    for block in link.offer.profile_blocks(link.e_rng, profile(), NOW + 6):
        link.join.add_profile_block(block, NOW + 7)
    link.join.confirm(NOW + 8)
    done = link.join.done_block(link.n_rng, device(9), NOW + 9)
    new, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, NOW + 10)
    _, request = _second(link, b"N4", 11)
    link.offer.refuse_request(request, NOW + 10)  # while E waits for "installed"
    assert link.join.receive_final(final, NOW + 11)[1] == new


def test_the_used_answer_opens_for_its_requester_only_and_never_as_an_accept() -> None:
    link = Link()
    link.offer.accept_request(link.e_rng, link.request(), NOW + 2)
    _, request = _second(link)
    _, used = link.offer.refuse_request(request, NOW + 3)
    third, _ = _second(link, b"N3", 10)
    with pytest.raises(DecryptionError):  # another requester's answer: not "used" for it
        third.receive_accept(DeterministicEntropy(b"x"), used, NOW + 4)
    with pytest.raises(DecryptionError):  # the first N never reads it as anything
        link.join.receive_accept(link.n_rng, used, NOW + 4)
    assert not link.join.finished
    second, request = _second(link, b"N5", 12)
    _, used = link.offer.refuse_request(request, NOW + 3)
    with pytest.raises(DecryptionError):  # tampered: the relay cannot forge "used"
        second.receive_accept(DeterministicEntropy(b"x"), flip(used, 40), NOW + 4)
    assert not second.finished


def test_a_replayed_first_request_is_not_answered_and_answers_are_bounded() -> None:
    link = Link()
    request = link.request()
    with pytest.raises(StateError):  # before the link is used: accept_request's
        link.offer.refuse_request(request, NOW + 1)
    link.offer.accept_request(link.e_rng, request, NOW + 2)
    with pytest.raises(d.LinkUsed):  # a replay: the real N must never read "used"
        link.offer.refuse_request(request, NOW + 3)
    with pytest.raises(DecryptionError):  # a block that is no request
        link.offer.refuse_request(flip(request, 50), NOW + 3)
    _, other = _second(link)
    for _ in range(d.MAX_REFUSALS):
        link.offer.refuse_request(other, NOW + 3)
    with pytest.raises(d.LinkUsed):
        link.offer.refuse_request(other, NOW + 3)
    with pytest.raises(d.LinkExpired):
        Link().offer.refuse_request(other, END + d.FINAL_GRACE)


def test_a_malformed_request_under_the_link_gets_no_answer() -> None:
    link = Link()
    link.offer.accept_request(link.e_rng, link.request(), NOW + 2)
    good_ek = p.mlkem_ek(DeterministicEntropy(b"K").mlkem_private())
    elsewhere = wire.MailboxAddress("wss://other.example/v1/ws", bytes(16), bytes(32))
    for inner in (_inner(good_ek, elsewhere), _inner(good_ek, mailbox(8, token=False))):
        with pytest.raises(DecryptionError):  # E never deposits on another relay
            link.offer.refuse_request(_request_with(link, inner), NOW + 3)


def marked(settings: tuple[tuple[str, str], ...] = ((d.DELETE_KEYS_SETTING, "{}"),)) -> bytes:
    """A profile's contents (the backup format) with these settings: by default the marker of
    an E that reads N's "installed" bytes, with no key of its own."""
    ed, x = IDENTITY.raw_private()
    return BackupContents(1, ed, x, IDENTITY.public.binding_sig, "me", settings, (), ()).to_bytes()


def _finished(link: Link, current: d.DeviceList = FIRST, extra: bytes = b"x") -> d.DeviceList:
    done = link.done(extra=extra)
    new, final = link.offer.receive_done(link.e_rng, IDENTITY, current, done, NOW + 10)
    assert new is not None and link.join.receive_final(final, NOW + 11)[1] == new
    return new


def test_e_lists_the_new_device_only_once_it_says_it_installed() -> None:
    link = Link()
    new = _finished(link)
    with pytest.raises(d.LinkUsed):  # no "listed" before "installed"
        link.join.receive_listed(bytes(wire.BLOCK_SIZE), NOW + 12)
    installed = link.join.installed_block(link.n_rng)
    with pytest.raises(d.LinkUsed):
        link.join.installed_block(link.n_rng)
    with pytest.raises(DecryptionError):
        link.offer.receive_installed(link.e_rng, IDENTITY, FIRST, flip(installed, 30), NOW + 12)
    assert not link.offer.installed
    listed, ack = link.offer.receive_installed(link.e_rng, IDENTITY, FIRST, installed, NOW + 12)
    assert listed == new and link.offer.installed
    with pytest.raises(d.LinkUsed):
        link.offer.receive_installed(link.e_rng, IDENTITY, FIRST, installed, NOW + 13)
    link.join.receive_listed(ack, NOW + 13)
    assert link.join.listed
    with pytest.raises(d.LinkUsed):
        link.join.receive_listed(ack, NOW + 14)


def test_installed_carries_the_new_devices_extra_bytes() -> None:
    """N's "installed" carries the daemon's bytes (its mailboxes' delete keys); an N that
    sends none (the old block: the step, then zeros) gives E empty bytes; a length past the
    bound or non-zero padding after the bytes is refused, nothing listed."""
    link = Link()
    _finished(link, extra=marked())
    extra = b'[{"k": 1}]'
    installed = link.join.installed_block(link.n_rng, extra)
    link.offer.receive_installed(link.e_rng, IDENTITY, FIRST, installed, NOW + 12)
    assert link.offer.installed_extra == extra
    assert link.offer.joined == device(9)
    old = Link()
    _finished(old)
    plain = d._seal_session(old.n_rng, old.join._keys.n2e,  # type: ignore[union-attr]
                            bytes([d.STEP_INSTALLED]))
    old.offer.receive_installed(old.e_rng, IDENTITY, FIRST, plain, NOW + 12)
    assert old.offer.installed and old.offer.installed_extra == b""
    for content in (bytes([d.STEP_INSTALLED]) + struct.pack(">H", d.MAX_INSTALLED_EXTRA + 1),
                    bytes([d.STEP_INSTALLED]) + struct.pack(">H", 1) + b"ab"):
        bad = Link()
        _finished(bad)
        block = d._seal_session(bad.n_rng, bad.join._keys.n2e, content)  # type: ignore[union-attr]
        with pytest.raises(DecryptionError):
            bad.offer.receive_installed(bad.e_rng, IDENTITY, FIRST, block, NOW + 12)
        assert not bad.offer.installed
    late = Link()
    _finished(late)
    with pytest.raises(ValueError):
        late.join.installed_block(late.n_rng, bytes(d.MAX_INSTALLED_EXTRA + 1))


def _older_e_reads(block: bytes, link: Link) -> bytes:
    """The content of N's "installed" as an E from before delete keys checks it: the step
    byte, then only zero padding (else it never lists N)."""
    content = d._open_session(link.offer._keys.n2e, block,  # type: ignore[union-attr]
                              d.STEP_INSTALLED)
    if any(content[1:]):
        raise DecryptionError()
    return content


def test_n_sends_its_keys_only_to_an_e_whose_profile_says_it_reads_them() -> None:
    """Without the marker in the profile (an older E, or a profile that is no backup contents)
    N's "installed" carries no bytes, so an older E lists it; with the marker (even with
    no key of E's: `{}`) it carries them."""
    extra = b'[{"k": 1}]'
    for contents in (b"x", marked((("other.setting", "1"),))):
        old = Link()
        _finished(old, extra=contents)
        assert old.join.profile is not None and not old.join.profile.takes_installed_extra()
        block = old.join.installed_block(old.n_rng, extra)
        _older_e_reads(block, old)  # an older E takes it
        old.offer.receive_installed(old.e_rng, IDENTITY, FIRST, block, NOW + 12)
        assert old.offer.installed and old.offer.installed_extra == b""
    new = Link()
    _finished(new, extra=marked())
    assert new.join.profile is not None and new.join.profile.takes_installed_extra()
    block = new.join.installed_block(new.n_rng, extra)
    new.offer.receive_installed(new.e_rng, IDENTITY, FIRST, block, NOW + 12)
    assert new.offer.installed_extra == extra


def test_installed_and_listed_blocks_keep_their_steps_and_deadlines() -> None:
    link = Link()
    _finished(link)
    installed = link.join.installed_block(link.n_rng)
    keys = link.join._keys
    assert keys is not None
    for step in (d.STEP_REVEAL, d.STEP_DONE):  # an "installed" opens as no other step
        with pytest.raises(DecryptionError):
            d._open_session(keys.n2e, installed, step)
    with pytest.raises(d.LinkExpired):
        link.offer.receive_installed(link.e_rng, IDENTITY, FIRST, installed, END + d.FINAL_GRACE)
    _, ack = link.offer.receive_installed(
        link.e_rng, IDENTITY, FIRST, installed, END + d.FINAL_GRACE - 1
    )
    with pytest.raises(d.LinkExpired):
        link.join.receive_listed(ack, END + 2 * d.FINAL_GRACE)
    link.join.receive_listed(ack, END + 2 * d.FINAL_GRACE - 1)


def test_a_list_changed_between_final_and_installed_is_signed_again_with_the_new_device() -> None:
    link = Link()
    with_three = d.DeviceList.sign(IDENTITY, NOW * 1000, [device(1), device(3)])
    new = _finished(link, with_three)
    # Meanwhile E's user removed device 3: E lists N on the list it holds now.
    removed = d.DeviceList.sign(IDENTITY, new.version, [device(1)])
    installed = link.join.installed_block(link.n_rng)
    listed, _ = link.offer.receive_installed(link.e_rng, IDENTITY, removed, installed, NOW + 12)
    assert list(listed.devices) == [device(1), device(9)]
    assert listed.beats(new) and listed.beats(removed)
    listed.verify(IDENTITY.public)
    full = Link()
    _finished(full)
    six = d.DeviceList.sign(IDENTITY, NOW * 1000 + 5, [device(i) for i in range(1, 7)])
    with pytest.raises(d.TooManyDevices):
        full.offer.receive_installed(
            full.e_rng, IDENTITY, six, full.join.installed_block(full.n_rng), NOW + 12
        )
    assert not full.offer.installed


def test_a_refused_final_gives_no_installed_block() -> None:
    link = Link()
    done = link.done(me=1)  # a device ID E lists already
    _, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, NOW + 10)
    with pytest.raises(d.LinkRefused):
        link.join.receive_final(final, NOW + 11)
    with pytest.raises(d.LinkUsed):
        link.join.installed_block(link.n_rng)
    with pytest.raises(d.LinkUsed):  # and E never lists it
        link.offer.receive_installed(link.e_rng, IDENTITY, FIRST, bytes(wire.BLOCK_SIZE), NOW + 12)


def test_device_payloads_round_trip_and_are_wires_numbers() -> None:
    hello_ = hello(2)
    for payload in (FIRST, hello_, d.ListAck.of(FIRST), d.ListRequest(3, bytes(range(32)))):
        data = d.encode_device_payload(payload)
        assert wire.is_device_payload(data)
        assert d.decode_device_payload(data) == payload
        with pytest.raises(DecodeError):  # the ordinary payload parser refuses them
            wire.decode_payload(data)
    assert d.encode_device_payload(d.ListAck.of(FIRST))[:2] == bytes([1, 0x42])
    assert d.encode_device_payload(d.ListRequest(1, bytes(32)))[:2] == bytes([1, 0x43])
    assert d.ListAck.of(FIRST).names(FIRST) and not d.ListAck(1, bytes(32)).names(FIRST)
    assert not wire.is_device_payload(wire.encode_payload(wire.CoverPayload()))
    with pytest.raises(DecodeError):  # version 0 is no list's
        d.decode_device_payload(bytes([1, 0x42]) + bytes(8 + 32))
    with pytest.raises(DecodeError):
        d.decode_device_payload(bytes([1, 0x44]) + bytes(40))


def test_a_further_request_is_answered_used_through_the_grace_only() -> None:
    """E answers USED until its run's end, `expires + FINAL_GRACE` (refuse_request's grace),
    while a request itself is taken only until `expires` (accept_request's)."""
    link = Link()
    _finished(link)
    second, request = _second(link)
    with pytest.raises(d.LinkExpired):  # a first request past the expiry: never accepted
        Link().offer.accept_request(link.e_rng, request, END)
    reply, used = link.offer.refuse_request(request, END + d.FINAL_GRACE - 1)
    assert reply == mailbox(9)
    with pytest.raises(d.LinkUsed, match="already used"):
        second.receive_accept(DeterministicEntropy(b"x"), used, NOW + 4)
    with pytest.raises(d.LinkExpired):
        link.offer.refuse_request(request, END + d.FINAL_GRACE)


def test_a_further_request_in_the_fetch_that_used_the_link_is_answered_used() -> None:
    """Two requests fetched together: the first uses the link, the second is LinkUsed for
    accept_request and answered by refuse_request (what the daemon does with it)."""
    link = Link()
    first = link.request()
    second, other = _second(link)
    link.offer.accept_request(link.e_rng, first, NOW + 2)
    with pytest.raises(d.LinkUsed):
        link.offer.accept_request(link.e_rng, other, NOW + 2)
    reply, used = link.offer.refuse_request(other, NOW + 2)
    assert reply == mailbox(9) and link.offer.reply_to == mailbox(8)
    with pytest.raises(d.LinkUsed):
        second.receive_accept(DeterministicEntropy(b"x"), used, NOW + 3)


def test_installed_re_checks_the_id_and_key_on_the_list_held_then() -> None:
    """E's list changed between the final and "installed" to one that holds N's ID, or N's
    device key under another ID: nothing is listed (LinkRefused)."""
    for clash in (device(9), replace(device(3), device_key=device(9).device_key)):
        link = Link()
        new = _finished(link)
        changed = d.DeviceList.sign(IDENTITY, new.version + 1, [device(1), clash])
        with pytest.raises(d.LinkRefused):
            link.offer.receive_installed(
                link.e_rng, IDENTITY, changed, link.join.installed_block(link.n_rng), NOW + 12
            )
        assert not link.offer.installed


def test_installed_signs_above_both_the_final_and_the_list_held() -> None:
    """The re-signed list's version is next_version of the newer of the two: a list held now
    that is newer than the final's list (E signed another since), or older (a concurrent
    one that lost to it on E: `newest = signed if ...`)."""
    for offset in (5_000, -5):
        link = Link()
        new = _finished(link)
        changed = d.DeviceList.sign(IDENTITY, new.version + offset, [device(1), device(3)])
        listed, _ = link.offer.receive_installed(
            link.e_rng, IDENTITY, changed, link.join.installed_block(link.n_rng), NOW + 12
        )
        assert listed.beats(new) and listed.beats(changed)
        assert listed.version == d.next_version(new if offset < 0 else changed, NOW + 12)
        assert list(listed.devices) == [device(1), device(3), device(9)]


def test_the_users_limit_bounds_the_final_and_the_re_signed_list() -> None:
    """`limit` (the user's devices.max_linked + 1) refuses as MAX_DEVICES does: at the final
    (full), and at "installed" when the list held then reached it."""
    link = Link()
    done = link.done()
    new, final = link.offer.receive_done(link.e_rng, IDENTITY, FIRST, done, NOW + 10, limit=1)
    assert new is None
    with pytest.raises(d.TooManyDevices):
        link.join.receive_final(final, NOW + 11)
    link = Link()
    new = _finished(link)
    two = d.DeviceList.sign(IDENTITY, new.version + 1, [device(1), device(3)])
    installed = link.join.installed_block(link.n_rng)
    with pytest.raises(d.TooManyDevices):
        link.offer.receive_installed(link.e_rng, IDENTITY, two, installed, NOW + 12, limit=2)
    assert not link.offer.installed
    listed, _ = link.offer.receive_installed(link.e_rng, IDENTITY, two, installed, NOW + 12, 3)
    assert len(listed.devices) == 3
