"""The backup file format (aegisd/core/backup.py), renewal blocks (aegisd/core/renewal.py)
and their strict parsers, fuzzed like the other parsers."""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core import group as g
from aegisd.core import renewal, wire
from aegisd.core.errors import DecodeError, DecryptionError, UnsupportedVersion
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.services import device_reset
from aegisd.services import devices as devices_service
from tests.support.groups import group_of

E = SystemEntropy()
PASS = "correct horse battery staple"
KDF = fmt.MIN_KDF
VECTORS_DIR = Path(__file__).parent.parent / "vectors"
ALICE = IdentityKeyPair.generate(E)
BOB = IdentityKeyPair.generate(E)
MAILBOX = wire.MailboxAddress("wss://relay.example/v1/ws", b"d" * 16, b"t" * 32)
OWNED = fmt.BackupMailbox("wss://relay.example/v1/ws", b"s" * 32, b"b" * 32, b"o" * 16,
                          b"d" * 16, b"r" * 32, b"t" * 32)  # fmt: skip


def sample_groups(n_contacts: int = 1) -> fmt.BackupGroups:
    """Two groups: one with rival changes in its log, history both ways (per-member
    status), a pending invitation and a sent one."""
    log, (owner, admin, _member) = group_of([wire.ROLE_ADMIN, wire.ROLE_MEMBER])
    rival = g.rename(admin, log.head, "B", "")
    log.receive(g.rename(owner, log.head, "A", ""))
    log.receive(rival)
    other, _ = group_of([], name="Other")
    base, changes = g.invitation_contents(owner, other)
    invite = wire.GroupInvitePayload(b"i" * 16, 5, base, changes)
    msgs = (
        fmt.BackupGroupMessage("m1", None, "to all ü", 10, 11, ((0, "read"),)),
        fmt.BackupGroupMessage("m2", admin.public.ed_pub, "back", 12, 13, ()),
        fmt.BackupGroupMessage("m3", None, "queued", None, 14, ()),
    )
    return fmt.BackupGroups(
        (0,) if n_contacts else (),
        (fmt.BackupGroup(log.record(), 7, msgs), fmt.BackupGroup(other.record(), 8, ())),
        (fmt.BackupInvitation(0, invite, 9),),
        (fmt.BackupSentInvite(b"s" * 16, 1, 0, 3),),
        (fmt.BackupJoining(1, b"j" * 16, 0),),
    )


def sample_contents(messages: int = 3) -> fmt.BackupContents:
    ed, x = ALICE.raw_private()
    msgs = tuple(
        fmt.BackupMessage(f"{i:032x}", i % 2 == 0, f"text {i} ünïcode", "delivered" if i % 2 == 0
                          else "received", None if i % 2 == 0 else 1000 + i, 2000 + i, 3000 + i)
        for i in range(messages)
    )  # fmt: skip
    contact = fmt.BackupContact(
        "bob", BOB.public.record(), True, False, 12345, MAILBOX, msgs, (OWNED,)
    )
    return fmt.BackupContents(
        99, ed, x, ALICE.public.binding_sig, "Alice", (("privacy.read_receipts", "false"),),
        (contact,), (OWNED,), sample_groups(),
    )  # fmt: skip


def test_contents_round_trip() -> None:
    c = sample_contents()
    assert fmt.BackupContents.from_bytes(c.to_bytes()) == c
    assert "text" not in repr(c) and "Alice" not in repr(c)
    # The longest contact name (64 characters of 4 UTF-8 bytes) fits.
    wide = c.contacts[0].__class__(**{**c.contacts[0].__dict__, "name": "\U0001f600" * 64})
    c2 = fmt.BackupContents(**{**c.__dict__, "contacts": (wide,)})
    assert fmt.BackupContents.from_bytes(c2.to_bytes()).contacts[0].name == "\U0001f600" * 64


def test_round_trip_any_size_and_exact_file_size() -> None:
    for n in (0, 1, fmt.CHUNK_SIZE - 1, fmt.CHUNK_SIZE, fmt.CHUNK_SIZE + 1, 3 * fmt.CHUNK_SIZE):
        plain = bytes(i % 251 for i in range(n))
        data = fmt.encrypt(E, PASS, plain, KDF)
        assert len(data) == fmt.Header.from_bytes(data).file_size
        assert fmt.decrypt(PASS, data) == plain


def test_each_failure_is_one_clear_error() -> None:
    plain = bytes(3 * fmt.CHUNK_SIZE + 10)
    data = fmt.encrypt(E, PASS, plain, KDF)
    with pytest.raises(fmt.BackupKeyError):
        fmt.decrypt("another passphrase entirely", data)
    for offset in (len(fmt.MAGIC) + 14, fmt.HEADER_MAC_OFFSET - 1, fmt.HEADER_LEN - 1):
        bad = bytearray(data)
        bad[offset] ^= 1  # salt, stream header, the header's MAC: the key does not fit
        with pytest.raises(fmt.BackupKeyError):
            fmt.decrypt(PASS, bytes(bad))
    # Damage to the body, the first chunk included, is "damaged", not "wrong passphrase".
    for offset in (fmt.HEADER_LEN, fmt.HEADER_LEN + 3,
                   fmt.HEADER_LEN + fmt.CHUNK_SIZE + fmt.ABYTES + 5, len(data) - 1):  # fmt: skip
        bad = bytearray(data)
        bad[offset] ^= 1
        with pytest.raises(fmt.BackupDamaged):
            fmt.decrypt(PASS, bytes(bad))
    # Chunks swapped: each authenticates alone, not in that place.
    c = fmt.CHUNK_SIZE + fmt.ABYTES
    h = fmt.HEADER_LEN
    swapped = data[:h] + data[h + c : h + 2 * c] + data[h : h + c] + data[h + 2 * c :]
    with pytest.raises(fmt.BackupDamaged):
        fmt.decrypt(PASS, swapped)
    for cut in (1, fmt.ABYTES, c, len(data) - fmt.HEADER_LEN):
        with pytest.raises(fmt.BackupTruncated):
            fmt.decrypt(PASS, data[:-cut])
    # A single-chunk file (most backups): a tampered body is damage, a wrong passphrase is not.
    small = fmt.encrypt(E, PASS, b"a short history", KDF)
    assert fmt.Header.from_bytes(small).file_size == fmt.HEADER_LEN + 15 + fmt.ABYTES
    with pytest.raises(fmt.BackupKeyError):
        fmt.decrypt("another passphrase entirely", small)
    for offset in range(fmt.HEADER_LEN, len(small), 7):
        bad = bytearray(small)
        bad[offset] ^= 0x80
        with pytest.raises(fmt.BackupDamaged):
            fmt.decrypt(PASS, bytes(bad))
    with pytest.raises(fmt.BackupDamaged):
        fmt.decrypt(PASS, data + b"\x00")
    # The length in the header is authenticated: cutting whole chunks and fixing the length
    # makes the header not fit the key.
    short = bytearray(data[: h + c + fmt.ABYTES + 5])
    o = len(fmt.MAGIC) + 14 + fmt.SALT_LEN
    short[o : o + 8] = struct.pack(">Q", fmt.CHUNK_SIZE + 5)
    assert fmt.Header.from_bytes(bytes(short)).file_size == len(short)
    with pytest.raises(fmt.BackupKeyError):
        fmt.decrypt(PASS, bytes(short))
    with pytest.raises(fmt.NotABackup):
        fmt.decrypt(PASS, b"PK\x03\x04 a zip file")


def _with_kdf(data: bytes, mem: int, passes: int, lanes: int) -> bytes:
    o = len(fmt.MAGIC) + 2
    return data[:o] + struct.pack(">III", mem, passes, lanes) + data[o + 12 :]


def test_kdf_parameters_checked_before_the_key_derivation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = fmt.encrypt(E, PASS, b"x", KDF)

    def no_kdf(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the key derivation ran")

    monkeypatch.setattr(fmt, "hash_secret_raw", no_kdf)
    for mem, passes, lanes in (
        (fmt.MIN_KDF.memory_kib - 1, 3, 1),  # below the floor: a downgrade
        (fmt.MIN_KDF.memory_kib, 1, 1),
        (64 * 1024, 3, 0),
        (4 * 1024 * 1024 + 1, 3, 4),  # over 4 GiB
        (2**32 - 1, 3, 4),
        (64 * 1024, 2**32 - 1, 4),
        (64 * 1024, 3, 10_000),
    ):
        with pytest.raises(fmt.NotABackup, match="refused"):
            fmt.decrypt(PASS, _with_kdf(data, mem, passes, lanes))
    bad_version = bytearray(data)
    bad_version[len(fmt.MAGIC)] = fmt.FORMAT_VERSION + 1
    with pytest.raises(fmt.NotABackup, match="newer version"):
        fmt.decrypt(PASS, bytes(bad_version))


def test_the_default_is_rfc9106_second_choice() -> None:
    assert fmt.KdfParams(64 * 1024, 3, 4) == fmt.DEFAULT_KDF
    fmt.check_kdf(fmt.DEFAULT_KDF)


def test_passphrase_is_normalised() -> None:
    data = fmt.encrypt(E, "caf\u00e9 au lait, s'il vous pla\u00eet", b"x", KDF)
    assert fmt.decrypt("cafe\u0301 au lait, s'il vous plai\u0302t", data) == b"x"


def test_contents_reject_bad_status_direction_and_attachments() -> None:
    good = replace(sample_contents(1), groups=fmt.BackupGroups()).to_bytes(4)
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(good[:-24] + b"\x00\x00\x00\x01" + good[-20:])
    with pytest.raises(UnsupportedVersion):
        fmt.BackupContents.from_bytes(bytes([fmt.FORMAT_VERSION + 1]) + good[1:])
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(good + b"\x00")
    ed, x = ALICE.raw_private()
    bad = fmt.BackupContents(1, ed, x, ALICE.public.binding_sig, "", (("a", "not json"),), (), ())
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(bad.to_bytes())
    incoming_sent = fmt.BackupMessage("m", False, "t", "sent", None, 1, 1)
    c = fmt.BackupContact("bob", BOB.public.record(), False, False, 1, None, (incoming_sent,), ())
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(
            fmt.BackupContents(1, ed, x, ALICE.public.binding_sig, "", (), (c,), ()).to_bytes()
        )


# --- versions 2 and 3 (groups) and the version before them -----------------------------------


def test_a_version_1_file_written_by_the_old_code_still_reads() -> None:
    """tests/vectors/backup_v1.bin was made by the version-1 code (backup_v1.json says which
    commit): the header's version 1 and its contents read, with no groups."""
    meta = json.loads((VECTORS_DIR / "backup_v1.json").read_text())
    data = (VECTORS_DIR / "backup_v1.bin").read_bytes()
    assert fmt.Header.from_bytes(data).version == 1
    plain = fmt.decrypt(meta["passphrase"], data)
    assert plain == bytes.fromhex(meta["contents_hex"]) and plain[0] == 1
    c = fmt.BackupContents.from_bytes(plain)
    assert c.display_name == "Alice" and c.groups == fmt.BackupGroups()
    assert [m.body for m in c.contacts[0].messages] == ["hello ünïcode", "hi"]
    assert c.contacts[0].messages[1].sent_at == 1001 and c.mailboxes[0].token == b"t" * 32
    # A version-1 contents with anything after the attachments' count is refused.
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(plain + bytes(16))


def test_version_3_carries_the_groups() -> None:
    c = sample_contents()
    data = c.to_bytes(3)
    assert data[0] == 3 and fmt.BackupContents.from_bytes(data) == c
    assert fmt.Header.from_bytes(fmt.encrypt(E, PASS, b"", KDF)).version == 5
    # version 2: no joining list at the end (and IDs unique in the whole section); it reads
    v2 = replace(c, groups=replace(c.groups, joining=()))
    assert fmt.BackupContents.from_bytes(b"\x02" + v2.to_bytes(3)[1:-4]) == v2
    with pytest.raises(DecodeError):  # a version-3 file without the list is truncated
        fmt.BackupContents.from_bytes(v2.to_bytes(3)[:-4])
    twice = replace(c.groups, joining=c.groups.joining * 2)
    with pytest.raises(ValueError):
        replace(c, groups=twice).to_bytes()
    with pytest.raises(DecodeError):  # the same group joined twice
        fmt.BackupContents.from_bytes(data[:-28] + b"\x00\x00\x00\x02" + data[-24:] * 2)
    again = fmt.BackupContents.from_bytes(data).groups
    log = g.GroupLog.from_record(again.groups[0].log)
    assert log.record() == again.groups[0].log and len(log.head.members) == 3
    assert again.groups[0].messages[0].statuses == ((0, "read"),)
    assert again.invitations[0].payload.base.state.name == "Other"
    assert again.joining == (fmt.BackupJoining(1, b"j" * 16, 0),)
    # Version 1 contents with groups appended are not version 2 or 3: refused.
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(b"\x01" + data[1:])


def test_a_version_3_file_written_by_the_old_code_still_reads() -> None:
    """tests/vectors/backup_v3.bin was made by the version-3 code (backup_v3.json says which
    commit): it reads, every message with no extras."""
    meta = json.loads((VECTORS_DIR / "backup_v3.json").read_text())
    data = (VECTORS_DIR / "backup_v3.bin").read_bytes()
    assert fmt.Header.from_bytes(data).version == 3
    plain = fmt.decrypt(meta["passphrase"], data)
    assert plain == bytes.fromhex(meta["contents_hex"]) and plain[0] == 3
    c = fmt.BackupContents.from_bytes(plain)
    assert [m.body for m in c.contacts[0].messages] == [f"text {i} ünïcode" for i in range(3)]
    assert [m.body for m in c.groups.groups[0].messages] == ["to all ü", "back", "queued"]
    every = [*c.contacts[0].messages, *c.groups.groups[0].messages]
    assert all(m.extras == fmt.NO_EXTRAS for m in every)
    assert c.groups.joining == (fmt.BackupJoining(1, b"j" * 16, 0),)
    assert fmt.BackupContents.from_bytes(c.to_bytes(3)) == c


def with_extras() -> fmt.BackupContents:
    """Version 4: a reply, an edited text, a deletion mark and reactions on both sides, in a
    conversation and in a group."""
    c = sample_contents()
    ms = c.contacts[0].messages
    rx = (fmt.BackupReaction(None, "👍", 5), fmt.BackupReaction(b"", "❤️", 6))
    ms = (
        replace(ms[0], extras=fmt.BackupExtras(edited_at=77, edits=2, edit_sent_at=70,
                                               reactions=rx)),
        replace(ms[1], extras=fmt.BackupExtras(reply_to=ms[0].message_id, quoted="quote ü",
                                               quoted_dir="out")),
        replace(ms[2], body="", extras=fmt.BackupExtras(deleted=True)),
    )  # fmt: skip
    gm = c.groups.groups[0].messages
    member = gm[1].sender_key
    assert member is not None
    gm = (
        replace(gm[0], extras=fmt.BackupExtras(
            reactions=(fmt.BackupReaction(member, "🎉", 8), fmt.BackupReaction(None, "🎉", 9)))),
        replace(gm[1], extras=fmt.BackupExtras(reply_to="m1", quoted=None, quoted_dir=None)),
        gm[2],
    )  # fmt: skip
    groups = replace(c.groups, groups=(replace(c.groups.groups[0], messages=gm),
                                       *c.groups.groups[1:]))  # fmt: skip
    return replace(c, contacts=(replace(c.contacts[0], messages=ms),), groups=groups)


def test_version_4_carries_replies_edits_deletions_and_reactions() -> None:
    c = with_extras()
    data = c.to_bytes(4)
    assert data[0] == 4 and fmt.BackupContents.from_bytes(data) == c
    with pytest.raises(ValueError):  # version 3 has no place for them
        c.to_bytes(3)
    plain = sample_contents()
    assert fmt.BackupContents.from_bytes(plain.to_bytes()) == plain


def test_a_version_4_file_written_by_the_old_code_still_reads() -> None:
    """tests/vectors/backup_v4.bin was made by the version-4 code (backup_v4.json says which
    commit): it reads, with its extras and no devices (an import: a list of one device)."""
    meta = json.loads((VECTORS_DIR / "backup_v4.json").read_text())
    data = (VECTORS_DIR / "backup_v4.bin").read_bytes()
    assert fmt.Header.from_bytes(data).version == 4
    plain = fmt.decrypt(meta["passphrase"], data)
    assert plain == bytes.fromhex(meta["contents_hex"]) and plain[0] == 4
    c = fmt.BackupContents.from_bytes(plain)
    assert c.devices == fmt.BackupDevices()
    assert c.contacts[0].messages[0].extras.edits == 2
    assert c.contacts[0].messages[2].extras.deleted
    assert fmt.BackupContents.from_bytes(c.to_bytes(4)) == c
    assert c.to_bytes(4) == plain
    # a version-4 contents with a devices section after its groups is refused
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(plain + b"\x00" + bytes(4))


ALICE_LIST = dv.DeviceList.sign(ALICE, 1_700_000_000_000, [
    dv.DeviceEntry(bytes([i]) * 16, MAILBOX, b"b" * 16, 5, bytes([i]) * 32) for i in (1, 2, 3)
])  # fmt: skip
CAP = fmt.BackupDeleteCap("wss://relay.example/v1/ws", b"o" * 16, b"k" * 32)


def sample_devices() -> fmt.BackupDevices:
    """Alice's list of three devices, and the delete keys held for two of them."""
    return fmt.BackupDevices(ALICE_LIST.to_bytes(), (
        (bytes([2]) * 16, (CAP,)),
        (bytes([3]) * 16, (CAP, replace(CAP, relay_url="ws://127.0.0.1:1/v1/ws"))),
    ))  # fmt: skip


def test_version_5_carries_the_device_list_and_delete_keys() -> None:
    c = replace(with_extras(), devices=sample_devices())
    data = c.to_bytes()
    assert data[0] == 5 and fmt.BackupContents.from_bytes(data) == c
    assert "relay.example" not in repr(c.devices) and "k" * 8 not in repr(c.devices.delete_keys)
    # the list is the signed list's bytes, as devices.py parses and checks them
    again = fmt.BackupContents.from_bytes(data).devices
    assert again.device_list is not None
    assert dv.DeviceList.from_bytes(again.device_list) == ALICE_LIST
    assert device_reset.check(again, ALICE.public) == ALICE_LIST
    # no devices (a profile that never linked): a flag and an empty count
    plain = sample_contents()
    assert plain.to_bytes()[-5:] == bytes(5)
    assert fmt.BackupContents.from_bytes(plain.to_bytes()).devices == fmt.BackupDevices()
    assert device_reset.check(fmt.BackupDevices(), ALICE.public) is None
    with pytest.raises(ValueError):  # version 4 has no place for them
        c.to_bytes(4)
    # the bounds are the protocol's and the daemon's
    assert fmt.MAX_DEVICE_SETS == dv.MAX_DEVICES and fmt.DEVICE_ID_LEN == dv.DEVICE_ID_LEN
    assert fmt.MAX_CAPS_PER_DEVICE == devices_service.MAX_CAPS_PER_DEVICE


def test_version_5_refuses_a_non_zero_attachments_count() -> None:
    """The attachments' count stays 0 in version 5: one before the groups and devices
    sections (20 and 5 bytes when empty) is refused, as in versions 1 to 4."""
    good = replace(sample_contents(1), groups=fmt.BackupGroups()).to_bytes()
    assert good[0] == 5 and good[-29:-25] == bytes(4)
    fmt.BackupContents.from_bytes(good)
    with pytest.raises(DecodeError, match="attachments"):
        fmt.BackupContents.from_bytes(good[:-29] + b"\x00\x00\x00\x01" + good[-25:])


def test_devices_section_is_strict() -> None:
    base = replace(sample_contents(), devices=fmt.BackupDevices())
    head = base.to_bytes()[:-5]
    good = replace(base, devices=sample_devices()).to_bytes()
    section = good[len(head):]
    lst = ALICE_LIST.to_bytes()
    one = bytes([2]) * 16 + b"\x00\x00\x00\x01" + bytes([25]) + b"wss://relay.example/v1/ws" + (
        b"o" * 16 + b"k" * 32)  # fmt: skip
    var_list = b"\x01" + len(lst).to_bytes(4, "big") + lst
    assert fmt.BackupContents.from_bytes(head + var_list + b"\x00\x00\x00\x01" + one)
    for bad in (
        b"\x02" + bytes(4),  # not a flag
        b"\x01" + bytes(4) + bytes(4),  # an empty list
        b"\x01" + (fmt.MAX_DEVICE_LIST_BYTES + 1).to_bytes(4, "big") + bytes(4),  # too long
        b"\x00" + b"\x00\x00\x00\x01" + one,  # delete keys without a list
        var_list + b"\x00\x00\x00\x02" + one + one,  # the same device twice
        var_list + b"\x00\x00\x00\x07" + one * 7,  # more than MAX_DEVICES
        var_list + b"\x00\x00\x00\x01" + bytes([2]) * 16 + bytes(4),  # a device with none
        var_list + b"\x00\x00\x00\x01" + bytes([2]) * 16 + b"\x00\x00\x00\x11"
        + one[20:] * 17,  # more than 16 delete keys for one device
        var_list + b"\x00\x00\x00\x01" + bytes([2]) * 16 + b"\x00\x00\x00\x01"
        + b"\x00" + b"o" * 16 + b"k" * 32,  # a delete key without its relay
        section[:-1],  # truncated
        section + b"\x00",  # trailing bytes
    ):  # fmt: skip
        with pytest.raises(DecodeError):
            fmt.BackupContents.from_bytes(head + bad)
    for wrong in (
        fmt.BackupDevices(None, sample_devices().delete_keys),
        fmt.BackupDevices(lst, sample_devices().delete_keys[::-1]),
        fmt.BackupDevices(lst, ((bytes([2]) * 16, ()),)),
        fmt.BackupDevices(b""),
    ):
        with pytest.raises(ValueError):
            replace(base, devices=wrong).to_bytes()
    # The importer's checks: the list signed by the backup's identity, delete keys of listed
    # devices only (a ValueError or DecodeError: "the backup's contents are malformed").
    forged = dv.DeviceList.sign(BOB, ALICE_LIST.version, ALICE_LIST.devices)
    with pytest.raises(ValueError):
        device_reset.check(replace(sample_devices(), device_list=forged.to_bytes()), ALICE.public)
    unlisted = fmt.BackupDevices(lst, ((bytes([9]) * 16, (CAP,)),))
    with pytest.raises(ValueError):
        device_reset.check(unlisted, ALICE.public)
    with pytest.raises(DecodeError):
        device_reset.check(fmt.BackupDevices(b"\x01\x30"), ALICE.public)


def test_extras_are_strict() -> None:
    c = sample_contents(1)
    m = c.contacts[0].messages[0]

    def encoded(x: fmt.BackupExtras, body: str | None = None) -> bytes:
        msg = replace(m, extras=x, body=m.body if body is None else body)
        return replace(c, contacts=(replace(c.contacts[0], messages=(msg,)),)).to_bytes()

    def refused(data: bytes) -> None:
        with pytest.raises(DecodeError):
            fmt.BackupContents.from_bytes(data)

    plain = encoded(fmt.NO_EXTRAS)
    at = plain.index(m.body.encode()) + len(m.body.encode())  # the flags byte
    assert plain[at:at + 5] == b"\x00" + bytes(4)
    refused(plain[:at] + b"\x08" + plain[at + 1:])  # an unknown flag
    refused(plain[:at] + b"\x02" + plain[at + 1:])  # edited, with nothing after
    # a deleted message with a body, or with reactions
    refused(encoded(fmt.BackupExtras(deleted=True)))
    refused(encoded(fmt.BackupExtras(deleted=True, reactions=(fmt.BackupReaction(None, "👍", 1),)),
                    body=""))
    # two reactions by one side, an empty one, or one that is not one emoji
    refused(encoded(fmt.BackupExtras(reactions=(fmt.BackupReaction(None, "👍", 1),) * 2)))
    for emoji in ("", "ab", "👍👍"):
        bad = encoded(fmt.BackupExtras(reactions=(fmt.BackupReaction(None, "👎", 1),)))
        refused(bad.replace("👎".encode(), emoji.encode()).replace(
            b"\x04" + "👎".encode(), bytes([len(emoji.encode())]) + emoji.encode()))
    # more than two reactions in a conversation
    three = encoded(fmt.BackupExtras(reactions=(fmt.BackupReaction(None, "👍", 1),
                                                fmt.BackupReaction(b"", "👎", 2))))
    refused(three.replace(b"\x00\x00\x00\x02\x01", b"\x00\x00\x00\x03\x01", 1))
    # an edit mark with no edit; a quote of a message not found
    zero = encoded(fmt.BackupExtras(edited_at=5, edits=1))
    refused(zero.replace(bytes(7) + b"\x05\x00\x00\x00\x01", bytes(7) + b"\x05" + bytes(4)))
    refused(encoded(fmt.BackupExtras(reply_to="x", quoted="q", quoted_dir="in")).replace(
        b"\x01x\x01\x01", b"\x01x\x00\x01"))


def test_groups_section_is_strict() -> None:
    ed, x = ALICE.raw_private()
    base = sample_contents()
    no_contacts = fmt.BackupContents(1, ed, x, ALICE.public.binding_sig, "", (), (), ())
    empty = no_contacts.to_bytes()
    assert empty[-20:] == bytes(20)  # five empty lists
    groups = base.groups
    one = groups.groups[0]
    for bad in (
        fmt.BackupGroups(group_contacts=(1,)),  # no such contact
        fmt.BackupGroups(groups=(one, one)),  # the same group twice
        fmt.BackupGroups(groups=(fmt.BackupGroup(one.log, 1, one.messages + one.messages[:1]),)),
    ):
        try:
            raw = fmt.BackupContents(**{**base.__dict__, "groups": bad}).to_bytes()
        except ValueError:
            continue  # the writer refuses it too
        with pytest.raises(DecodeError):
            fmt.BackupContents.from_bytes(raw)
    good = base.to_bytes(4)
    one_contact = fmt.BackupContents(**{**base.__dict__, "groups": fmt.BackupGroups()}).to_bytes(4)
    at = len(one_contact) - 20  # where the groups section starts (version 4: the last one)
    assert good[at : at + 8] == b"\x00\x00\x00\x01\x00\x00\x00\x00"  # group contacts: [0]
    with pytest.raises(DecodeError):  # an index past the contacts
        fmt.BackupContents.from_bytes(good[: at + 4] + b"\x00\x00\x00\x05" + good[at + 8 :])
    # An invitation that is not one.
    text = wire.encode_payload(wire.TextPayload(b"x" * 16, 1, "hi"))
    w = wire.Writer()
    w.u32(0).u32(0).u32(1).u32(0).varbytes(text).u64(1).u32(0).u32(0)
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(one_contact[:-20] + w.bytes())


def test_a_group_message_id_is_unique_per_sender_not_per_section() -> None:
    """Two members may use one message ID (docs/protocol.md §25.9): a file holding both still
    reads, as does one ID in two groups; one sender's ID twice in a group does not. Files
    written before (IDs unique in the whole section) are a case of this and read as before."""
    base = sample_contents()
    one, other = base.groups.groups
    ann, ben = b"a" * 32, b"b" * 32
    shared = (
        fmt.BackupGroupMessage("5b" * 16, None, "ours", 1, 2, ((0, "read"),)),
        fmt.BackupGroupMessage("5b" * 16, ann, "ann's", 3, 4, ()),
        fmt.BackupGroupMessage("5b" * 16, ben, "ben's copy", 5, 6, ()),
    )
    both = (fmt.BackupGroup(one.log, 1, shared), fmt.BackupGroup(other.log, 2, shared[1:2]))
    groups = fmt.BackupGroups(base.groups.group_contacts, both)
    c = fmt.BackupContents(**{**base.__dict__, "groups": groups})
    assert fmt.BackupContents.from_bytes(c.to_bytes()) == c
    twice = fmt.BackupGroups(groups=(fmt.BackupGroup(one.log, 1, shared + shared[1:2]),))
    raw = fmt.BackupContents(**{**base.__dict__, "groups": twice}).to_bytes()
    with pytest.raises(DecodeError):
        fmt.BackupContents.from_bytes(raw)


# --- renewal blocks ---------------------------------------------------------------------------

RENEW = wire.RenewPayload(b"r" * 16, 1_700_000_000_000, MAILBOX, b"bundle-address-1", "Alice")


def test_renewal_block_round_trip_and_binding() -> None:
    block = renewal.seal(E, ALICE, BOB.public, wire.encode_payload(RENEW))
    assert len(block) == wire.BLOCK_SIZE and block[0] == wire.VERSION
    assert renewal.decode(renewal.open_block(BOB, ALICE.public, block)) == RENEW
    assert b"Alice" not in block and MAILBOX.deposit_id not in block
    carol = IdentityKeyPair.generate(E)
    with pytest.raises(DecryptionError):
        renewal.open_block(BOB, carol.public, block)  # not from carol
    with pytest.raises(DecryptionError):
        renewal.open_block(carol, ALICE.public, block)  # not for carol
    with pytest.raises(DecryptionError):
        renewal.open_block(ALICE, BOB.public, block)  # reflected to its sender
    for i in (1, 40, wire.BLOCK_SIZE - 1):
        bad = bytearray(block)
        bad[i] ^= 1
        with pytest.raises(DecryptionError):
            renewal.open_block(BOB, ALICE.public, bytes(bad))
    # Two seals of the same request look unrelated.
    again = renewal.seal(E, ALICE, BOB.public, wire.encode_payload(RENEW))
    assert again[1:33] != block[1:33] and again[40:80] != block[40:80]
    with pytest.raises(DecodeError):
        renewal.decode(wire.encode_payload(wire.MailboxAckPayload(b"x" * 16)))


def test_renew_payload_is_strict() -> None:
    enc = wire.encode_payload(RENEW)
    assert enc[1] == wire.PAYLOAD_RENEW == 0x0A
    assert wire.decode_payload(enc) == RENEW
    with pytest.raises(DecodeError):
        wire.decode_payload(enc + b"\x00")
    with pytest.raises(ValueError):
        wire.encode_payload(wire.RenewPayload(b"r" * 16, 1, MAILBOX, b"", "x"))


# --- fuzz -------------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# version 5, with groups, extras and devices: the fuzz reaches them
CONTENTS = replace(with_extras(), devices=sample_devices()).to_bytes()
GROUPS_AT = len(replace(sample_contents(), groups=fmt.BackupGroups()).to_bytes()) - 25
DEVICES_AT = len(replace(with_extras(), devices=fmt.BackupDevices()).to_bytes()) - 5
FILE = fmt.encrypt(E, PASS, CONTENTS, KDF)
BLOCK = renewal.seal(E, ALICE, BOB.public, wire.encode_payload(RENEW))


def _parse_all(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        fmt.BackupContents.from_bytes(data)
    with contextlib.suppress(fmt.BackupError, DecodeError):
        fmt.Header.from_bytes(data)
    with contextlib.suppress(DecodeError):
        wire.decode_payload(data)
    with contextlib.suppress(DecryptionError):
        renewal.open_block(BOB, ALICE.public, data)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _parse_all(data)
    _parse_all(fmt.MAGIC + data)
    _parse_all(b"\x01\x30" + data)
    _parse_all(b"\x02\x30" + data)
    _parse_all(CONTENTS[:GROUPS_AT] + data)  # a groups section of random bytes
    _parse_all(CONTENTS[:DEVICES_AT] + data)  # a devices section of random bytes
    _parse_all(CONTENTS[:DEVICES_AT] + b"\x01" + data)


@FUZZ
@given(data=st.data())
def test_mutated_contents_header_and_block(data: st.DataObject) -> None:
    for sample in (CONTENTS, FILE[: fmt.HEADER_LEN], wire.encode_payload(RENEW), BLOCK):
        s = bytearray(sample)
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
        if kind == "flip":
            for _ in range(data.draw(st.integers(1, 4))):
                i = data.draw(st.integers(0, len(s) - 1))
                s[i] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del s[data.draw(st.integers(0, len(s) - 1)) :]
        elif kind == "extend":
            s += data.draw(st.binary(min_size=1, max_size=64))
        else:
            i = data.draw(st.integers(0, len(s)))
            s[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        _parse_all(bytes(s))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_mutated_file_gives_one_typed_error(data: st.DataObject) -> None:
    s = bytearray(FILE)
    # Anywhere but the cost fields (a flip there may ask for up to 1 GiB: slow, not wrong).
    i = data.draw(st.integers(len(fmt.MAGIC) + 14, len(s) - 1) | st.integers(0, 9))
    s[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, 3))
    mutated = bytes(s[: len(s) - cut])
    with pytest.raises(fmt.BackupError):
        fmt.decrypt(PASS, mutated)


def test_settings_are_json() -> None:
    c = fmt.BackupContents.from_bytes(CONTENTS)
    assert json.loads(c.settings[0][1]) is False


def test_backup_md_states_the_group_bounds() -> None:
    text = (Path(__file__).parent.parent.parent / "docs" / "backup.md").read_text()
    assert "format version: `0x05` written; `0x01` to `0x05` read" in text
    assert fmt.FORMAT_VERSION == 5 and fmt.READABLE_VERSIONS == (1, 2, 3, 4, 5)
    assert f"`var({fmt.MAX_DEVICE_LIST_BYTES})` the device list" in text
    assert f"`u32 n` (≤ {fmt.MAX_DEVICE_SETS}) devices" in text
    assert f"`u32 k` (1 to {fmt.MAX_CAPS_PER_DEVICE})" in text
    assert f"(≤ {fmt.MAX_REACTIONS}; in a conversation ≤ 2)" in text
    assert f"`var({fmt.MAX_GROUP_LOG_BYTES >> 20} MiB)`" in text
    assert f"groups | `u32 n` (≤ {fmt.MAX_GROUPS:,})" in text
    assert f"invitations | `u32 n` (≤ {fmt.MAX_GROUP_INVITATIONS:,})" in text
    assert f"sent invitations | `u32 n` (≤ {fmt.MAX_SENT_INVITES:,})" in text
    assert f"`u8` index into ({', '.join(f'`{s}`' for s in fmt.GROUP_STATUSES)})" in text
    assert f"`var({fmt.MAX_INVITATION_BYTES >> 20} MiB)` the group invitation payload" in text
