"""Encrypted backup files (docs/backup.md): the header, the key derivation, the authenticated
chunk stream and the strict serialisation of what a backup holds.

Pure: no file or clock access. The caller reads and writes the file and passes the time in.

File = header || stream. The header names the format version and the Argon2id parameters; the
keys come from Argon2id(passphrase, salt) (64 bytes: a stream key and a header key); the
header ends with an HMAC under the header key, so that a wrong passphrase (or an altered
header) is told apart from damage to the body; the stream is libsodium's secretstream
(XChaCha20-Poly1305, via PyNaCl) in chunks of CHUNK_SIZE plaintext bytes, the last one tagged
FINAL, every chunk with the whole header as associated data. A well-kept construct rather than
a hand-made one: it authenticates the order of the chunks and detects truncation.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from argon2.low_level import ARGON2_VERSION, Type, hash_secret_raw
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from . import wire
from .errors import DecodeError, ProtocolError, UnsupportedVersion
from .primitives import Entropy

MAGIC = b"AEGISBAK"
#: Version 5 is written; every version here is read. Version 2 added the groups (docs/protocol.md
#: §23); version 3 has group message IDs unique per (group, sender) rather than in the whole
#: section, which a version-2 reader refused as damaged, and the groups being joined. The header's
#: version and the contents' first byte are bumped together, so that an older daemon refuses a
#: newer file ("too new") before asking for the key derivation.
#: Version 4 adds what a message carries besides its text (replies' quotes, edit and deletion
#: marks, reactions: docs/protocol.md §26).
#: Version 5 adds the person's devices (docs/devices.md §10): the device list held and the
#: delete keys held for the other devices' mailboxes, so that an import can reset them.
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
KDF_ARGON2ID = 1
SALT_LEN = 16
KEY_LEN = 32
HEADER_MAC_LEN = 32  # HMAC-SHA256 of the header's first HEADER_MAC_OFFSET bytes
STREAM_HEADER_LEN: int = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
ABYTES: int = sodium.crypto_secretstream_xchacha20poly1305_ABYTES  # 17
HEADER_MAC_OFFSET = len(MAGIC) + 1 + 1 + 4 + 4 + 4 + SALT_LEN + 8 + STREAM_HEADER_LEN  # 70
HEADER_LEN = HEADER_MAC_OFFSET + HEADER_MAC_LEN  # 102
CHUNK_SIZE = 64 * 1024  # plaintext bytes per chunk (the last may be shorter, even empty)
TAG_MESSAGE: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

KIND_BACKUP_CONTENTS = 0x30

#: Progress callback: (bytes done, bytes in all).
Progress = Callable[[int, int], None]


class BackupError(ProtocolError):
    """A backup file cannot be used. The message is for the user and holds no secret."""


class NotABackup(BackupError, DecodeError):
    """Not a backup file, an unsupported version, or key-derivation parameters refused."""


class BackupKeyError(BackupError):
    """The header's MAC does not verify: a wrong passphrase, or an altered header (the two
    cannot be told apart: the header is authenticated by a key derived from the passphrase)."""

    def __init__(self) -> None:
        super().__init__(
            "wrong passphrase, or the backup's header was altered (the two look the same)"
        )


class BackupDamaged(BackupError):
    def __init__(self) -> None:
        super().__init__("the backup file was altered or damaged")


class BackupTruncated(BackupError):
    def __init__(self) -> None:
        super().__init__("the backup file is truncated (its end is missing)")


# --- key derivation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KdfParams:
    memory_kib: int
    passes: int
    lanes: int


#: RFC 9106's second recommended option: 64 MiB, 3 passes, 4 lanes.
DEFAULT_KDF = KdfParams(64 * 1024, 3, 4)
#: The least a file may ask for (OWASP's Argon2id minimum: 19 MiB, 2 passes, 1 lane): a file
#: asking for less is refused, so an attacker cannot hand out a cheap-to-crack file.
MIN_KDF = KdfParams(19 * 1024, 2, 1)
#: The most a file may ask for, checked before anything is allocated.
MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
MAX_PASSES = 16
MAX_LANES = 16


def check_kdf(kdf: KdfParams) -> None:
    """Refuse parameters below the minimum or absurdly high (NotABackup, saying which)."""
    if kdf.memory_kib < MIN_KDF.memory_kib or kdf.passes < MIN_KDF.passes or kdf.lanes < 1:
        raise NotABackup(
            "the backup's key-derivation parameters are below the minimum "
            f"({MIN_KDF.memory_kib} KiB, {MIN_KDF.passes} passes, 1 lane): refused"
        )
    if kdf.memory_kib > MAX_MEMORY_KIB or kdf.passes > MAX_PASSES or kdf.lanes > MAX_LANES:
        raise NotABackup(
            "the backup's key-derivation parameters are out of range "
            f"(at most {MAX_MEMORY_KIB} KiB, {MAX_PASSES} passes, {MAX_LANES} lanes): refused"
        )
    if kdf.memory_kib < 8 * kdf.lanes:
        raise NotABackup("the backup's key-derivation parameters are inconsistent")


def normalize_passphrase(passphrase: str) -> bytes:
    """NFC, so the same passphrase typed on any system opens the file."""
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def derive_keys(passphrase: str, salt: bytes, kdf: KdfParams) -> tuple[bytes, bytes]:
    """(stream key, header key): the two halves of one 64-byte Argon2id output. Separate keys,
    so that the header's MAC and the stream never share one."""
    check_kdf(kdf)
    out = hash_secret_raw(
        secret=normalize_passphrase(passphrase),
        salt=salt,
        time_cost=kdf.passes,
        memory_cost=kdf.memory_kib,
        parallelism=kdf.lanes,
        hash_len=2 * KEY_LEN,
        type=Type.ID,
        version=ARGON2_VERSION,
    )
    return out[:KEY_LEN], out[KEY_LEN:]


def header_mac(header_key: bytes, header: bytes) -> bytes:
    """HMAC-SHA256 over the header's fields (everything before the MAC itself)."""
    return hmac.new(header_key, header[:HEADER_MAC_OFFSET], hashlib.sha256).digest()


# The passphrase's strength is not this module's concern: aegisd/passphrase_strength.py holds
# the one rule for every passphrase a user chooses (docs/backup.md §4).


# --- header -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    kdf: KdfParams
    salt: bytes
    length: int  # plaintext bytes: the file's exact size follows, so truncation shows early
    stream_header: bytes
    mac: bytes = b""  # set when parsed; encrypt() appends it to to_bytes()
    version: int = FORMAT_VERSION

    @property
    def file_size(self) -> int:
        return HEADER_LEN + self.length + ABYTES * chunk_count(self.length)

    def to_bytes(self) -> bytes:
        """The fields before the MAC (HEADER_MAC_OFFSET bytes)."""
        return (
            MAGIC
            + bytes([self.version, KDF_ARGON2ID])
            + struct.pack(">III", self.kdf.memory_kib, self.kdf.passes, self.kdf.lanes)
            + self.salt
            + struct.pack(">Q", self.length)
            + self.stream_header
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        """Parse and check the header (first HEADER_LEN bytes of ``data``) before any key
        derivation: a file asking for too little or too much work is refused here."""
        if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
            raise NotABackup("this is not an AegisLink backup file")
        if len(data) < HEADER_LEN:
            raise BackupTruncated()
        r = wire.Reader(data[:HEADER_LEN])
        r.take(len(MAGIC))
        version = r.u8()
        if version not in READABLE_VERSIONS:
            raise NotABackup("this backup was written by a newer version of AegisLink")
        if r.u8() != KDF_ARGON2ID:
            raise NotABackup("this backup uses an unknown key derivation")
        kdf = KdfParams(r.u32(), r.u32(), r.u32())
        check_kdf(kdf)
        return cls(
            kdf, r.take(SALT_LEN), r.u64(), r.take(STREAM_HEADER_LEN), r.take(HEADER_MAC_LEN),
            version,
        )  # fmt: skip


# --- the encrypted stream ---------------------------------------------------------------------


def chunk_count(length: int) -> int:
    """Chunks for ``length`` plaintext bytes: full chunks, then the final one (maybe empty)."""
    return length // CHUNK_SIZE + 1


def encrypt(
    entropy: Entropy,
    passphrase: str,
    plaintext: bytes,
    kdf: KdfParams = DEFAULT_KDF,
    progress: Progress | None = None,
) -> bytes:
    """The whole backup file for ``plaintext``."""
    salt = entropy.random(SALT_LEN)
    key, header_key = derive_keys(passphrase, salt, kdf)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    stream_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    fields = Header(kdf, salt, len(plaintext), stream_header).to_bytes()
    header = fields + header_mac(header_key, fields)
    out = [header]
    total = len(plaintext)
    pos = 0
    while True:
        chunk = plaintext[pos : pos + CHUNK_SIZE]
        pos += len(chunk)
        final = len(chunk) < CHUNK_SIZE  # a full last chunk is followed by an empty final one
        out.append(
            sodium.crypto_secretstream_xchacha20poly1305_push(
                state, chunk, header, TAG_FINAL if final else TAG_MESSAGE
            )
        )
        if progress is not None:
            progress(pos, total)
        if final:
            return b"".join(out)


def decrypt(passphrase: str, data: bytes, progress: Progress | None = None) -> bytes:
    """The plaintext of a whole backup file. Raises NotABackup (before deriving a key),
    BackupKeyError, BackupDamaged or BackupTruncated."""
    parsed = Header.from_bytes(data)
    if len(data) < parsed.file_size:
        raise BackupTruncated()
    if len(data) > parsed.file_size:
        raise BackupDamaged()  # bytes after the end the header announces
    header = data[:HEADER_LEN]
    key, header_key = derive_keys(passphrase, parsed.salt, parsed.kdf)
    # The header's MAC decides "wrong passphrase" (or altered header); from here on, a chunk
    # that does not open is damage to the body, whichever chunk it is.
    if not hmac.compare_digest(header_mac(header_key, header), parsed.mac):
        raise BackupKeyError()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    try:
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, parsed.stream_header, key)
    except CryptoError:
        raise BackupDamaged() from None
    parts: list[bytes] = []
    pos = HEADER_LEN
    total = len(data)
    while True:
        if pos >= total:
            raise BackupTruncated()  # the stream ended before its FINAL chunk
        piece = data[pos : pos + CHUNK_SIZE + ABYTES]
        pos += len(piece)
        if len(piece) < ABYTES:
            raise BackupTruncated()
        try:
            chunk, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, piece, header)
        except CryptoError:
            raise BackupDamaged() from None
        parts.append(chunk)
        if progress is not None:
            progress(pos, total)
        if tag == TAG_FINAL:
            if pos != total:
                raise BackupDamaged()  # bytes after the final chunk
            return b"".join(parts)
        if tag != TAG_MESSAGE:
            raise BackupDamaged()


# --- contents ---------------------------------------------------------------------------------

MESSAGE_STATUSES = ("queued", "sent", "delivered", "read", "failed", "expired", "received")
MAX_CONTACTS = 100_000
MAX_MESSAGES = 10_000_000
MAX_MAILBOXES = 100_000
MAX_SETTINGS = 256
MAX_BODY_BYTES = 1 << 20
MAX_SETTING_VALUE = 4096
MAX_NAME_FIELD = 1024  # contact names are at most 64 characters (up to 256 UTF-8 bytes)


@dataclass(frozen=True)
class BackupMailbox:
    """A mailbox the exported profile owned: everything needed to delete it at the relay."""

    relay_url: str
    sign_seed: bytes
    box_secret: bytes
    owner_id: bytes
    deposit_id: bytes
    relay_box_pub: bytes
    token: bytes

    def __repr__(self) -> str:
        return "BackupMailbox(<hidden>)"


QUOTED_DIRECTIONS = (None, "in", "out")  # a reply's quoted message: not found, theirs, ours
MAX_REACTIONS = 256  # one per person: two in a conversation, one per member in a group
MAX_QUOTED_ID = 128  # a group message's API id is 97 characters (author:wire id in hex)
_EXTRA_REPLY, _EXTRA_EDITED, _EXTRA_DELETED = 1, 2, 4


@dataclass(frozen=True)
class BackupReaction:
    """One person's reaction. ``reactor`` None: ours; in a conversation b"" is the contact's;
    in a group, the member's Ed25519 key."""

    reactor: bytes | None
    emoji: str
    created_at: int


@dataclass(frozen=True)
class BackupExtras:
    """What a message carries besides its text (contents version 4; docs/protocol.md §26)."""

    reply_to: str | None = None  # the quoted message's ID in the same conversation
    quoted: str | None = None  # the reply's copy of the quoted text (None: not found or deleted)
    quoted_dir: str | None = None  # "in" / "out": whose message it copies; None: not found
    edited_at: int | None = None
    edits: int = 0
    edit_sent_at: int | None = None
    deleted: bool = False
    reactions: tuple[BackupReaction, ...] = ()

    def __repr__(self) -> str:
        return "BackupExtras(<hidden>)"


NO_EXTRAS = BackupExtras()


@dataclass(frozen=True)
class BackupMessage:
    message_id: str
    outgoing: bool
    body: str
    status: str
    sent_at: int | None
    created_at: int
    status_at: int
    extras: BackupExtras = NO_EXTRAS

    def __repr__(self) -> str:
        return "BackupMessage(<hidden>)"


@dataclass(frozen=True)
class BackupContact:
    name: str
    identity: wire.IdentityRecord
    verified: bool
    blocked: bool
    created_at: int
    send_to: wire.MailboxAddress | None  # the contact's mailbox we deposit to
    messages: tuple[BackupMessage, ...]
    mailboxes: tuple[BackupMailbox, ...]  # our receiving mailboxes for this contact


GROUP_STATUSES = ("queued", "delivered", "read")  # an outgoing group message, per member
MAX_GROUPS = 10_000
MAX_GROUP_LOG_BYTES = 8 << 20  # 4096 stored changes of at most ~1.3 KB, and the base
MAX_GROUP_INVITATIONS = 1_000  # the service keeps at most a few dozen waiting
MAX_INVITATION_BYTES = 1 << 20
MAX_SENT_INVITES = 100_000


@dataclass(frozen=True)
class BackupGroupMessage:
    message_id: str
    sender_key: bytes | None  # Ed25519 key of the sender; None: our own (outgoing)
    body: str
    sent_at: int | None
    created_at: int
    statuses: tuple[tuple[int, str], ...]  # outgoing: (contact index, status) per member
    extras: BackupExtras = NO_EXTRAS

    def __repr__(self) -> str:
        return "BackupGroupMessage(<hidden>)"


@dataclass(frozen=True)
class BackupGroup:
    log: wire.GroupLogRecord  # as the core stores it (members: its head's)
    created_at: int
    messages: tuple[BackupGroupMessage, ...]

    def __repr__(self) -> str:
        return "BackupGroup(<hidden>)"


@dataclass(frozen=True)
class BackupInvitation:
    """A group invitation received and not answered yet."""

    contact: int  # index into BackupContents.contacts: who sent it
    payload: wire.GroupInvitePayload
    created_at: int

    def __repr__(self) -> str:
        return "BackupInvitation(<hidden>)"


@dataclass(frozen=True)
class BackupSentInvite:
    """An invitation we sent whose answer has not come yet."""

    invite_id: bytes
    group: int  # index into BackupGroups.groups
    contact: int  # index into BackupContents.contacts
    version: int


@dataclass(frozen=True)
class BackupJoining:
    """A group we accepted an invitation to and are not a member of yet (version 3): what
    lets the inviter's refusal (docs/protocol.md §25.7 step 3) undo the accept."""

    group: int  # index into BackupGroups.groups
    invite_id: bytes
    contact: int  # the inviter: index into BackupContents.contacts


@dataclass(frozen=True)
class BackupGroups:
    """Contents versions 2 and 3: the groups, and which contacts serve groups only (hidden)."""

    group_contacts: tuple[int, ...] = ()  # indices into contacts, increasing
    groups: tuple[BackupGroup, ...] = ()
    invitations: tuple[BackupInvitation, ...] = ()
    sent_invites: tuple[BackupSentInvite, ...] = ()
    joining: tuple[BackupJoining, ...] = ()  # version 3; empty when read from version 2


#: The devices section (contents version 5). The list is opaque here (aegisd/core/devices.py
#: parses it, and imports this module): the importer parses it and checks its signature.
MAX_DEVICE_LIST_BYTES = 4096  # a list of MAX_DEVICE_SETS entries is at most about 2,300
MAX_DEVICE_SETS = 6  # devices.MAX_DEVICES (a test checks they agree)
MAX_CAPS_PER_DEVICE = 16  # services/devices.py takes at most as many from one device
DEVICE_ID_LEN = 16
OWNER_ID_LEN = 16
DELETE_KEY_LEN = 32


@dataclass(frozen=True)
class BackupDeleteCap:
    """The capability to delete one mailbox of another device at its relay (its owner ID and
    delete key, docs/devices.md §6): it reads nothing."""

    relay_url: str
    owner_id: bytes
    delete_key: bytes

    def __repr__(self) -> str:
        return "BackupDeleteCap(<hidden>)"


@dataclass(frozen=True)
class BackupDevices:
    """Contents version 5: the device list the profile held (its bytes, docs/protocol.md
    §28.1; None: it never linked) and, by device ID (strictly increasing, each listed), the
    delete capabilities it held for that device's mailboxes. Never a device key."""

    device_list: bytes | None = None
    delete_keys: tuple[tuple[bytes, tuple[BackupDeleteCap, ...]], ...] = ()

    def __repr__(self) -> str:
        return "BackupDevices(<hidden>)"


@dataclass(frozen=True)
class BackupContents:
    created_at_ms: int
    ed_priv: bytes
    x_priv: bytes
    binding_sig: bytes
    display_name: str
    settings: tuple[tuple[str, str], ...]  # (name, JSON text)
    contacts: tuple[BackupContact, ...]
    mailboxes: tuple[BackupMailbox, ...]  # address and invitation mailboxes
    # Attachments (issue 7, another part) will be a list here, written after `mailboxes`; in
    # contents versions 1 to 5 the count field is present and must be 0.
    groups: BackupGroups = BackupGroups()  # versions 2 and 3; empty when read from version 1
    devices: BackupDevices = BackupDevices()  # version 5; empty when read from an earlier one

    def __repr__(self) -> str:
        return "BackupContents(<hidden>)"

    def to_bytes(self, version: int = FORMAT_VERSION) -> bytes:
        """The contents in ``version`` 5 (written by the daemon), 4 or 3 (for tests of older
        readers and files; a message with extras cannot be written in 3, devices only in 5)."""
        if version not in (3, 4, FORMAT_VERSION):
            raise ValueError("only contents versions 3 to 5 are written")
        if version < 5 and self.devices != BackupDevices():
            raise ValueError("the devices need contents version 5")
        w = wire.Writer().u8(version).u8(KIND_BACKUP_CONTENTS)
        w.u64(self.created_at_ms)
        w.fixed(self.ed_priv, 32).fixed(self.x_priv, 32).fixed(self.binding_sig, 64)
        _put_str(w, self.display_name, wire.MAX_NAME_BYTES)
        _count(w, len(self.settings), MAX_SETTINGS)
        for name, value in self.settings:
            _put_str(w, name, 64)
            _put_bytes(w, value.encode(), MAX_SETTING_VALUE)
        _count(w, len(self.contacts), MAX_CONTACTS)
        for c in self.contacts:
            _put_str(w, c.name, MAX_NAME_FIELD)
            w.raw(c.identity.to_bytes()).flag(c.verified).flag(c.blocked).u64(c.created_at)
            w.flag(c.send_to is not None)
            if c.send_to is not None:
                c.send_to.write(w)
            _count(w, len(c.messages), MAX_MESSAGES)
            for m in c.messages:
                _write_message(w, m)
                _write_extras(w, m.extras, version, group=False)
            _write_mailboxes(w, c.mailboxes)
        _write_mailboxes(w, self.mailboxes)
        w.u32(0)  # attachments: none in versions 1 to 5
        _write_groups(w, self.groups, len(self.contacts), version)
        if version >= 5:
            _write_devices(w, self.devices)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> BackupContents:
        r = wire.Reader(data)
        version = r.u8()
        if version not in READABLE_VERSIONS:
            raise UnsupportedVersion("unsupported backup contents version")
        if r.u8() != KIND_BACKUP_CONTENTS:
            raise DecodeError("unexpected object kind")
        created = r.u64()
        ed_priv, x_priv, sig = r.take(32), r.take(32), r.take(64)
        display_name = _str(r, wire.MAX_NAME_BYTES)
        settings = []
        for _ in range(_read_count(r, MAX_SETTINGS)):
            name = _str(r, 64)
            value = _str(r, MAX_SETTING_VALUE, wide=True)
            try:
                json.loads(value)
            except ValueError:
                raise DecodeError("a setting value is not JSON") from None
            settings.append((name, value))
        contacts = []
        for _ in range(_read_count(r, MAX_CONTACTS)):
            name = _str(r, MAX_NAME_FIELD)
            if not name:
                raise DecodeError("empty contact name")
            identity = wire.IdentityRecord.read(r)
            verified, blocked, created_at = r.flag(), r.flag(), r.u64()
            send_to = wire.MailboxAddress.read(r) if r.flag() else None
            messages = tuple(
                _read_message(r, version) for _ in range(_read_count(r, MAX_MESSAGES))
            )
            contacts.append(
                BackupContact(
                    name, identity, verified, blocked, created_at, send_to, messages,
                    _read_mailboxes(r),
                )
            )  # fmt: skip
        mailboxes = _read_mailboxes(r)
        if r.u32() != 0:
            raise DecodeError("attachments are not defined in backup contents versions 1 to 5")
        groups = _read_groups(r, len(contacts), version) if version >= 2 else BackupGroups()
        devices = _read_devices(r) if version >= 5 else BackupDevices()
        r.done()
        return cls(
            created, ed_priv, x_priv, sig, display_name, tuple(settings), tuple(contacts),
            mailboxes, groups, devices,
        )  # fmt: skip


def _count(w: wire.Writer, n: int, limit: int) -> None:
    if n > limit:
        raise ValueError("too many items for a backup")
    w.u32(n)


def _read_count(r: wire.Reader, limit: int) -> int:
    n = r.u32()
    if n > limit:
        raise DecodeError("count field out of range")
    return n


def _put_bytes(w: wire.Writer, b: bytes, limit: int) -> None:
    if len(b) > limit:
        raise ValueError("field too long")
    w.varbytes(b)


def _put_str(w: wire.Writer, s: str, limit: int) -> None:
    b = s.encode()
    if limit <= 255:
        if len(b) > limit:
            raise ValueError("field too long")
        w.u8(len(b)).raw(b)
    else:
        _put_bytes(w, b, limit)


def _str(r: wire.Reader, limit: int, *, wide: bool = False) -> str:
    if wide or limit > 255:
        raw = r.varbytes(limit)
    else:
        n = r.u8()
        if n > limit:
            raise DecodeError("length field out of range")
        raw = r.take(n)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8") from None


def _write_message(w: wire.Writer, m: BackupMessage) -> None:
    if m.status not in MESSAGE_STATUSES:
        raise ValueError("unknown message status")
    _put_str(w, m.message_id, 64)
    w.flag(m.outgoing).u8(MESSAGE_STATUSES.index(m.status))
    w.flag(m.sent_at is not None)
    if m.sent_at is not None:
        w.u64(m.sent_at)
    w.u64(m.created_at).u64(m.status_at)
    _put_bytes(w, m.body.encode(), MAX_BODY_BYTES)


def _read_message(r: wire.Reader, version: int) -> BackupMessage:
    mid = _str(r, 64)
    if not mid:
        raise DecodeError("empty message id")
    outgoing = r.flag()
    status_index = r.u8()
    if status_index >= len(MESSAGE_STATUSES):
        raise DecodeError("unknown message status")
    status = MESSAGE_STATUSES[status_index]
    if (outgoing and status == "received") or (not outgoing and status not in ("received", "read")):
        raise DecodeError("message status does not fit its direction")
    sent_at = r.u64() if r.flag() else None
    created_at, status_at = r.u64(), r.u64()
    body = _str(r, MAX_BODY_BYTES, wide=True)
    extras = _read_extras(r, body, group=False) if version >= 4 else NO_EXTRAS
    return BackupMessage(mid, outgoing, body, status, sent_at, created_at, status_at, extras)


def _write_extras(w: wire.Writer, x: BackupExtras, version: int, *, group: bool) -> None:
    """Contents version 4, after a message's body (docs/backup.md §2, "Extras")."""
    if version < 4:
        if x != NO_EXTRAS:
            raise ValueError("a message's extras need contents version 4")
        return
    flags = ((_EXTRA_REPLY if x.reply_to is not None else 0)
             | (_EXTRA_EDITED if x.edited_at is not None else 0)
             | (_EXTRA_DELETED if x.deleted else 0))  # fmt: skip
    w.u8(flags)
    if x.reply_to is not None:
        if not x.reply_to or x.quoted_dir not in QUOTED_DIRECTIONS:
            raise ValueError("a reply names the message it quotes")
        _put_str(w, x.reply_to, MAX_QUOTED_ID)
        w.u8(QUOTED_DIRECTIONS.index(x.quoted_dir)).flag(x.quoted is not None)
        if x.quoted is not None:
            _put_bytes(w, x.quoted.encode(), MAX_BODY_BYTES)
    if x.edited_at is not None:
        w.u64(x.edited_at).u32(max(1, x.edits)).flag(x.edit_sent_at is not None)
        if x.edit_sent_at is not None:
            w.u64(x.edit_sent_at)
    _count(w, len(x.reactions), MAX_REACTIONS)
    for rx in x.reactions:
        w.flag(rx.reactor is None)  # ours
        if rx.reactor is not None and group:
            w.fixed(rx.reactor, 32)
        _put_str(w, rx.emoji, wire.MAX_REACTION_BYTES)
        w.u64(rx.created_at)


def _read_extras(r: wire.Reader, body: str, *, group: bool) -> BackupExtras:
    flags = r.u8()
    if flags & ~(_EXTRA_REPLY | _EXTRA_EDITED | _EXTRA_DELETED):
        raise DecodeError("unknown message extras")
    reply_to = quoted = quoted_dir = None
    if flags & _EXTRA_REPLY:
        reply_to = _str(r, MAX_QUOTED_ID)
        d = r.u8()
        if not reply_to or d >= len(QUOTED_DIRECTIONS):
            raise DecodeError("a malformed reply")
        quoted_dir = QUOTED_DIRECTIONS[d]
        quoted = _str(r, MAX_BODY_BYTES, wide=True) if r.flag() else None
        if quoted is not None and quoted_dir is None:
            raise DecodeError("a quote of a message not found")
    edited_at = edit_sent_at = None
    edits = 0
    if flags & _EXTRA_EDITED:
        edited_at, edits = r.u64(), r.u32()
        edit_sent_at = r.u64() if r.flag() else None
        if edits == 0:
            raise DecodeError("an edit mark with no edit")
    deleted = bool(flags & _EXTRA_DELETED)
    reactions: list[BackupReaction] = []
    reactors: set[bytes | None] = set()
    for _ in range(_read_count(r, MAX_REACTIONS if group else 2)):
        reactor = None if r.flag() else (r.take(32) if group else b"")
        emoji = _str(r, wire.MAX_REACTION_BYTES)
        try:
            wire.check_reaction(emoji)
        except ValueError:
            raise DecodeError("not a reaction") from None
        if not emoji or reactor in reactors:
            raise DecodeError("an empty or repeated reaction")
        reactors.add(reactor)
        reactions.append(BackupReaction(reactor, emoji, r.u64()))
    if deleted and (body or edited_at is not None or quoted is not None or reactions):
        raise DecodeError("a deleted message keeps only its mark")
    return BackupExtras(reply_to, quoted, quoted_dir, edited_at, edits, edit_sent_at, deleted,
                        tuple(reactions))  # fmt: skip


def _write_mailboxes(w: wire.Writer, items: tuple[BackupMailbox, ...]) -> None:
    _count(w, len(items), MAX_MAILBOXES)
    for mb in items:
        _put_str(w, mb.relay_url, wire.MAX_URL_BYTES)
        w.fixed(mb.sign_seed, 32).fixed(mb.box_secret, 32)
        for field in (mb.owner_id, mb.deposit_id):
            _put_str_bytes(w, field)
        w.fixed(mb.relay_box_pub, 32)
        _put_str_bytes(w, mb.token)


def _put_str_bytes(w: wire.Writer, b: bytes) -> None:
    if len(b) > wire.MAX_MAILBOX_FIELD:
        raise ValueError("field too long")
    w.u8(len(b)).raw(b)


def _short_bytes(r: wire.Reader) -> bytes:
    n = r.u8()
    if n > wire.MAX_MAILBOX_FIELD:
        raise DecodeError("length field out of range")
    return r.take(n)


def _read_mailboxes(r: wire.Reader) -> tuple[BackupMailbox, ...]:
    out = []
    for _ in range(_read_count(r, MAX_MAILBOXES)):
        url = _str(r, wire.MAX_URL_BYTES)
        sign_seed, box_secret = r.take(32), r.take(32)
        owner_id, deposit_id = _short_bytes(r), _short_bytes(r)
        relay_box_pub = r.take(32)
        token = _short_bytes(r)
        if not url or not owner_id or not deposit_id:
            raise DecodeError("incomplete mailbox")
        out.append(
            BackupMailbox(url, sign_seed, box_secret, owner_id, deposit_id, relay_box_pub, token)
        )
    return tuple(out)


# --- groups (contents versions 2 and 3) -----------------------------------------------------------


def _write_groups(w: wire.Writer, g: BackupGroups, n_contacts: int, version: int) -> None:
    if list(g.group_contacts) != sorted(set(g.group_contacts)) or any(
        i >= n_contacts for i in g.group_contacts
    ):
        raise ValueError("group contacts must be increasing contact indices")
    _count(w, len(g.group_contacts), MAX_CONTACTS)
    for i in g.group_contacts:
        w.u32(i)
    _count(w, len(g.groups), MAX_GROUPS)
    for group in g.groups:
        _put_bytes(w, group.log.to_bytes(), MAX_GROUP_LOG_BYTES)
        w.u64(group.created_at)
        _count(w, len(group.messages), MAX_MESSAGES)
        for m in group.messages:
            _put_str(w, m.message_id, 64)
            w.flag(m.sender_key is None)  # outgoing
            if m.sender_key is not None:
                w.fixed(m.sender_key, 32)
            w.flag(m.sent_at is not None)
            if m.sent_at is not None:
                w.u64(m.sent_at)
            w.u64(m.created_at)
            _put_bytes(w, m.body.encode(), MAX_BODY_BYTES)
            _count(w, len(m.statuses), wire.MAX_GROUP_MEMBERS)
            for contact, status in m.statuses:
                if contact >= n_contacts:
                    raise ValueError("status for an unknown contact")
                w.u32(contact).u8(GROUP_STATUSES.index(status))
            _write_extras(w, m.extras, version, group=True)
    _count(w, len(g.invitations), MAX_GROUP_INVITATIONS)
    for inv in g.invitations:
        if inv.contact >= n_contacts:
            raise ValueError("invitation from an unknown contact")
        w.u32(inv.contact)
        _put_bytes(w, wire.encode_payload(inv.payload), MAX_INVITATION_BYTES)
        w.u64(inv.created_at)
    _count(w, len(g.sent_invites), MAX_SENT_INVITES)
    for s in g.sent_invites:
        if s.contact >= n_contacts or s.group >= len(g.groups):
            raise ValueError("sent invitation for an unknown group or contact")
        w.fixed(s.invite_id, wire.MESSAGE_ID_LEN).u32(s.group).u32(s.contact).u64(s.version)
    if len({j.group for j in g.joining}) != len(g.joining):
        raise ValueError("a group joined twice")
    _count(w, len(g.joining), MAX_GROUPS)
    for j in g.joining:
        if j.contact >= n_contacts or j.group >= len(g.groups):
            raise ValueError("joining an unknown group or through an unknown contact")
        w.u32(j.group).fixed(j.invite_id, wire.MESSAGE_ID_LEN).u32(j.contact)


def _index(r: wire.Reader, n: int) -> int:
    i = r.u32()
    if i >= n:
        raise DecodeError("index out of range")
    return i


def _read_groups(r: wire.Reader, n_contacts: int, version: int) -> BackupGroups:
    hidden = tuple(_index(r, n_contacts) for _ in range(_read_count(r, MAX_CONTACTS)))
    if any(a >= b for a, b in itertools.pairwise(hidden)):
        raise DecodeError("group contacts not in increasing order")
    groups: list[BackupGroup] = []
    group_ids: set[bytes] = set()
    for _ in range(_read_count(r, MAX_GROUPS)):
        log = wire.GroupLogRecord.from_bytes(r.varbytes(MAX_GROUP_LOG_BYTES))
        if log.base.group_id in group_ids:
            raise DecodeError("a group appears twice")
        group_ids.add(log.base.group_id)
        created_at = r.u64()
        messages = []
        # a message is named by its group, its sender and its id (docs/protocol.md §25.9):
        # two senders may share an id
        message_ids: set[tuple[bytes | None, str]] = set()
        for _ in range(_read_count(r, MAX_MESSAGES)):
            mid = _str(r, 64)
            sender = None if r.flag() else r.take(32)
            if not mid or (sender, mid) in message_ids:
                raise DecodeError("empty or repeated group message id")
            message_ids.add((sender, mid))
            sent_at = r.u64() if r.flag() else None
            created, body = r.u64(), _str(r, MAX_BODY_BYTES, wide=True)
            statuses = []
            seen: set[int] = set()
            for _ in range(_read_count(r, wire.MAX_GROUP_MEMBERS)):
                contact, index = _index(r, n_contacts), r.u8()
                if index >= len(GROUP_STATUSES) or contact in seen:
                    raise DecodeError("unknown or repeated group message status")
                seen.add(contact)
                statuses.append((contact, GROUP_STATUSES[index]))
            if sender is not None and statuses:
                raise DecodeError("an incoming group message has no per-member status")
            extras = _read_extras(r, body, group=True) if version >= 4 else NO_EXTRAS
            messages.append(
                BackupGroupMessage(mid, sender, body, sent_at, created, tuple(statuses), extras)
            )
        groups.append(BackupGroup(log, created_at, tuple(messages)))
    invitations = []
    for _ in range(_read_count(r, MAX_GROUP_INVITATIONS)):
        contact = _index(r, n_contacts)
        payload = wire.decode_payload(r.varbytes(MAX_INVITATION_BYTES))
        if not isinstance(payload, wire.GroupInvitePayload):
            raise DecodeError("not a group invitation")
        invitations.append(BackupInvitation(contact, payload, r.u64()))
    sent = []
    invite_ids: set[bytes] = set()
    for _ in range(_read_count(r, MAX_SENT_INVITES)):
        invite_id = r.take(wire.MESSAGE_ID_LEN)
        if invite_id in invite_ids:
            raise DecodeError("a sent invitation appears twice")
        invite_ids.add(invite_id)
        group, contact = _index(r, len(groups)), _index(r, n_contacts)
        sent.append(BackupSentInvite(invite_id, group, contact, r.u64()))
    joining = []
    joined: set[int] = set()
    for _ in range(_read_count(r, MAX_GROUPS) if version >= 3 else 0):
        group = _index(r, len(groups))
        if group in joined:
            raise DecodeError("a group joined twice")
        joined.add(group)
        invite_id = r.take(wire.MESSAGE_ID_LEN)
        joining.append(BackupJoining(group, invite_id, _index(r, n_contacts)))
    return BackupGroups(hidden, tuple(groups), tuple(invitations), tuple(sent), tuple(joining))


# --- devices (contents version 5) ------------------------------------------------------------


def _write_devices(w: wire.Writer, d: BackupDevices) -> None:
    w.flag(d.device_list is not None)
    if d.device_list is not None:
        if not d.device_list:
            raise ValueError("an empty device list")
        _put_bytes(w, d.device_list, MAX_DEVICE_LIST_BYTES)
    ids = [device_id for device_id, _ in d.delete_keys]
    if ids != sorted(set(ids)) or (ids and d.device_list is None):
        raise ValueError("delete keys by increasing device ID, and only with a list")
    _count(w, len(d.delete_keys), MAX_DEVICE_SETS)
    for device_id, caps in d.delete_keys:
        if not caps:
            raise ValueError("a device with no delete key is left out")
        w.fixed(device_id, DEVICE_ID_LEN)
        _count(w, len(caps), MAX_CAPS_PER_DEVICE)
        for cap in caps:
            if not cap.relay_url:
                raise ValueError("a delete key names its relay")
            _put_str(w, cap.relay_url, wire.MAX_URL_BYTES)
            w.fixed(cap.owner_id, OWNER_ID_LEN).fixed(cap.delete_key, DELETE_KEY_LEN)


def _read_devices(r: wire.Reader) -> BackupDevices:
    device_list = r.varbytes(MAX_DEVICE_LIST_BYTES) if r.flag() else None
    if device_list is not None and not device_list:
        raise DecodeError("an empty device list")
    sets: list[tuple[bytes, tuple[BackupDeleteCap, ...]]] = []
    n = _read_count(r, MAX_DEVICE_SETS)
    if n and device_list is None:
        raise DecodeError("delete keys without a device list")
    for _ in range(n):
        device_id = r.take(DEVICE_ID_LEN)
        if sets and device_id <= sets[-1][0]:
            raise DecodeError("delete keys not by increasing device ID")
        k = _read_count(r, MAX_CAPS_PER_DEVICE)
        if k == 0:
            raise DecodeError("a device with no delete key")
        caps = []
        for _ in range(k):
            url = _str(r, wire.MAX_URL_BYTES)
            if not url:
                raise DecodeError("a delete key without its relay")
            caps.append(BackupDeleteCap(url, r.take(OWNER_ID_LEN), r.take(DELETE_KEY_LEN)))
        sets.append((device_id, tuple(caps)))
    return BackupDevices(device_list, tuple(sets))
