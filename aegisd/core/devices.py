"""Several devices per person (docs/devices.md): the device link, the linking handshake, the
confirmation code and the signed device list.

Every device of a person holds the same identity key (copied to a new device inside the sealed
link exchange), so the safety number never changes; each device has its own device ID, its own
Ed25519 device key, prekeys, ratchet sessions and mailboxes. The identity signs the list of the
person's devices, each entry with its device key; a device proves that key in every hello and
bundle (`device_proof`), so holding the identity key is not enough to pass for a listed device.
A contact fans out to the newest list it holds.

Linking, between the existing device E and the new device N (docs/devices.md §4):

    link      E -> N out of band: E's link mailbox, link_secret (32), E's ephemeral X25519 e_pub
    request   N -> E: n_pub || Seal(k_req;  ek_N || commit(n_nonce) || N's reply mailbox)
    accept    E -> N: Seal(k_acc;  ML-KEM ciphertext to ek_N)
    reveal    N -> E: Seal(k_n2e;  n_nonce)                       both now show the code
    profile   E -> N: Seal(k_e2n;  identity keys, device list, profile)  after E's user confirms
    done      N -> E: Seal(k_n2e;  N's entry, with its device key)      after N's user confirms
    final     E -> N: Seal(k_e2n;  accepted + E's current list with N, signed by E; or refused)
    installed N -> E: Seal(k_n2e;  installed)          N committed the profile; E lists N only now
    listed    E -> N: Seal(k_e2n;  listed)             E stored the list with N

A further request that opens while the link runs (a second device with the same link) is
answered with a "used" block into its own reply mailbox, sealed under a key of that request
alone, so the second device fails at once and learns nothing but "used".

Every message is one or more blocks of BLOCK_SIZE bytes whose only fixed byte is the version,
like every other block. N commits to n_nonce before it sees E's ciphertext, and the code
depends on n_nonce, so a man in the middle who knows the link cannot grind its ciphertext to
make the two codes equal: his chance is 1 in 10^6 per link.

Pure: no I/O; randomness through `Entropy`, time as an argument (`now`, seconds since the epoch).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from . import primitives as p
from . import wire
from .backup import BackupContents
from .errors import DecodeError, DecryptionError, ProtocolError, StateError, UnsupportedVersion
from .identity import IdentityKeyPair, PublicIdentity
from .primitives import Entropy
from .wire import MailboxAddress, Reader, Writer

LINK_DEVICE = 3  # link kind after the contact links' 1 (invitation) and 2 (address)
KIND_DEVICE_LIST = 0x30
PAYLOAD_DEVICE_LIST = wire.PAYLOAD_DEVICE_LIST  # the device payloads' numbers are wire's
DEVICE_ID_LEN = 16
LINK_SECRET_LEN = 32
NONCE_SECRET_LEN = 32  # N's committed nonce
MAX_DEVICES = 6  # the first device and at most 5 linked ones: a protocol bound on fan-out
LINK_TTL = 600  # seconds a device link is valid
MAX_PROFILE_BLOCKS = 4096  # 64 MiB of profile, as many blocks as one message may span
MAX_TEXT_LEN = 2048  # a device link's text form
CODE_DIGITS = 6
LIST_VERSION_LIMIT = 2**63
VERSIONS_PER_SECOND = 1000  # a list version is at least the signer's clock in milliseconds
MAX_LIST_SKEW = 86_400  # seconds a list's version may run ahead of the holder's clock
FINAL_GRACE = 60  # seconds after expiry N still takes E's final block (sent before expiry)
MAX_REFUSALS = 16  # "used" answers E sends per link; later requests are dropped unanswered
MAX_INSTALLED_EXTRA = 8192  # bytes N's "installed" may carry (its mailboxes' delete keys)
#: The profile setting (docs/devices.md §4.2, §6) whose presence says that E reads the bytes
#: N's "installed" carries: such an E always sends it (JSON, `{}` when it has no key to give).
#: An E from before delete keys refuses anything but zeros after the step byte and never sends
#: it, so N sends it no bytes (it would never list N otherwise).
DELETE_KEYS_SETTING = "devices.delete_keys"
PAYLOAD_DEVICE_HELLO = wire.PAYLOAD_DEVICE_HELLO
PAYLOAD_DEVICE_LIST_ACK = wire.PAYLOAD_DEVICE_LIST_ACK
PAYLOAD_DEVICE_LIST_REQUEST = wire.PAYLOAD_DEVICE_LIST_REQUEST
PROOF_HELLO = 1
PROOF_BUNDLE = 2

DEVICE_LIST_LABEL = b"AegisLink-v1 device list"
_REQUEST_LABEL = b"AegisLink-v1 device link request"
_ACCEPT_LABEL = b"AegisLink-v1 device link accept"
_USED_LABEL = b"AegisLink-v1 device link used"
_SESSION_LABEL = b"AegisLink-v1 device link session"
_COMMIT_LABEL = b"AegisLink-v1 device link commit"
_CODE_LABEL = b"AegisLink-v1 device link code"
DEVICE_PROOF_LABEL = b"AegisLink-v1 device proof"

# Step bytes, first byte of every sealed content: a block of one step never opens as another.
STEP_REQUEST = 1
STEP_ACCEPT = 2
STEP_REVEAL = 3
STEP_PROFILE = 4
STEP_DONE = 5
STEP_FINAL = 6
STEP_USED = 7  # E's answer to a further request: the link was used already
STEP_INSTALLED = 8
STEP_LISTED = 9

FINAL_ACCEPTED = 0
FINAL_FULL = 1  # E's current list holds MAX_DEVICES devices
FINAL_TAKEN = 2  # N's device ID or device key is in E's current list already

_V = bytes([wire.VERSION])
_SALT = bytes(32)
# request: version || n_pub || AEAD(k_req, zeros, content, ad = version || n_pub)
REQUEST_CONTENT_LEN = wire.BLOCK_SIZE - 1 - wire.X25519_LEN - wire.TAG_LEN
# accept: version || AEAD(k_acc, zeros, content, ad = version)
ACCEPT_CONTENT_LEN = wire.BLOCK_SIZE - 1 - wire.TAG_LEN
# reveal, profile, done: version || nonce || AEAD(k, nonce, content, ad = version || nonce)
SESSION_CONTENT_LEN = wire.BLOCK_SIZE - 1 - wire.NONCE_LEN - wire.TAG_LEN
PROFILE_CHUNK_LEN = SESSION_CONTENT_LEN - 1 - 4 - 4  # step || u32 index || u32 count || chunk


class DeviceError(ProtocolError):
    """A device link or device list is refused; nothing changed."""


class LinkExpired(DeviceError):
    """The device link's ten minutes are over."""


class LinkUsed(DeviceError):
    """The device link was used already (a link works once), or the step is out of order."""

    def __init__(self, message: str = "this link was already used") -> None:
        super().__init__(message)


class ForgedDeviceList(DeviceError):
    """The device list is not signed by the identity it claims to be of."""


class StaleDeviceList(DeviceError):
    """The device list does not beat the one held (lower version, or the same list)."""


class TooManyDevices(DeviceError):
    """The device list would hold more than MAX_DEVICES devices."""


class FutureDeviceList(DeviceError):
    """The device list's version runs more than MAX_LIST_SKEW ahead of the holder's clock."""


class NotConcurrent(DeviceError):
    """A rebase of lists that are not concurrent (the winner's version is not the loser's)."""


class LinkRefused(DeviceError):
    """E refused to add the new device to its current list (its device ID is taken)."""


class UnlistedDevice(DeviceError):
    """A hello or bundle from a device ID that is not in the list held for the identity."""


class ForgedDeviceProof(DeviceError):
    """A hello or bundle not signed by the device key listed for its device ID."""


# --- the device list ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEntry:
    """One device of a person: its device key (Ed25519 public, which its hellos and bundle
    prove), where its contacts deposit to it and fetch its prekey bundle."""

    device_id: bytes
    mailbox: MailboxAddress
    bundle_address: bytes
    added_at: int  # seconds since the epoch
    device_key: bytes

    def write(self, w: Writer) -> Writer:
        w.fixed(self.device_id, DEVICE_ID_LEN).fixed(self.device_key, wire.ED25519_LEN)
        self.mailbox.write(w)
        if len(self.bundle_address) != wire.RELAY_ID_LEN:
            raise ValueError("a bundle address is 16 bytes")
        return w.u8(wire.RELAY_ID_LEN).raw(self.bundle_address).u64(self.added_at)

    @classmethod
    def read(cls, r: Reader) -> DeviceEntry:
        device_id, device_key = r.take(DEVICE_ID_LEN), r.take(wire.ED25519_LEN)
        mailbox = MailboxAddress.read(r)
        if r.u8() != wire.RELAY_ID_LEN:
            raise DecodeError("a bundle address is 16 bytes")
        return cls(device_id, mailbox, r.take(wire.RELAY_ID_LEN), r.u64(), device_key)

    def to_bytes(self) -> bytes:
        return self.write(Writer()).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceEntry:
        r = Reader(data)
        out = cls.read(r)
        r.done()
        return out


def _body(version: int, devices: tuple[DeviceEntry, ...]) -> bytes:
    if not 1 <= version < LIST_VERSION_LIMIT:
        raise ValueError("device list version out of range")
    if not 1 <= len(devices) <= MAX_DEVICES:
        raise TooManyDevices("a device list holds 1 to MAX_DEVICES devices")
    ids = [d.device_id for d in devices]
    if ids != sorted(set(ids)):
        raise ValueError("devices must be sorted by device ID, without duplicates")
    w = Writer().u8(wire.VERSION).u8(KIND_DEVICE_LIST).u64(version).u8(len(devices))
    for d in devices:
        d.write(w)
    return w.bytes()


def _signed_message(identity: PublicIdentity, body: bytes) -> bytes:
    return DEVICE_LIST_LABEL + identity.encode() + body


@dataclass(frozen=True)
class DeviceList:
    """The identity's signed list of its devices, sorted by device ID. A parsed list is not yet
    verified: `verify` (or `accept`) checks it against the identity it claims to be of."""

    version: int
    devices: tuple[DeviceEntry, ...]
    signature: bytes

    @classmethod
    def sign(
        cls, identity: IdentityKeyPair, version: int, devices: Sequence[DeviceEntry]
    ) -> DeviceList:
        ordered = tuple(sorted(devices, key=lambda d: d.device_id))
        body = _body(version, ordered)
        return cls(version, ordered, identity.sign(_signed_message(identity.public, body)))

    def body(self) -> bytes:
        return _body(self.version, self.devices)

    def to_bytes(self) -> bytes:
        return self.body() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceList:
        r = Reader(data)
        if r.u8() != wire.VERSION:
            raise UnsupportedVersion("unsupported device list version")
        if r.u8() != KIND_DEVICE_LIST:
            raise DecodeError("not a device list")
        version = r.u64()
        if not 1 <= version < LIST_VERSION_LIMIT:
            raise DecodeError("device list version out of range")
        count = r.u8()
        if not 1 <= count <= MAX_DEVICES:
            raise DecodeError("device count out of range")
        devices = tuple(DeviceEntry.read(r) for _ in range(count))
        ids = [d.device_id for d in devices]
        if ids != sorted(set(ids)):
            raise DecodeError("devices not in canonical order")
        out = cls(version, devices, r.take(wire.SIG_LEN))
        r.done()
        return out

    def verify(self, identity: PublicIdentity) -> None:
        if not identity.verify(self.signature, _signed_message(identity, self.body())):
            raise ForgedDeviceList("device list not signed by the identity")

    def digest(self) -> bytes:
        """SHA-256 of the signed body: the tie-break between two lists of one version."""
        return hashlib.sha256(self.body()).digest()

    def beats(self, other: DeviceList) -> bool:
        """The winner rule: the higher version; at one version, the greater digest."""
        return (self.version, self.digest()) > (other.version, other.digest())

    def ids(self) -> frozenset[bytes]:
        return frozenset(d.device_id for d in self.devices)

    def entry(self, device_id: bytes) -> DeviceEntry | None:
        return next((d for d in self.devices if d.device_id == device_id), None)


def next_version(current: DeviceList | None, now: int) -> int:
    """The version of a list signed now on `current`: one more than it, and at least the clock
    in milliseconds. So a later backup import (a list on an old parent) still beats an earlier
    one, and an honest version never runs far ahead of time (`accept` bounds it)."""
    version = max(1 if current is None else current.version + 1, now * VERSIONS_PER_SECOND)
    if version >= LIST_VERSION_LIMIT:
        raise FutureDeviceList("device list version out of range")
    return version


def accept(
    identity: PublicIdentity, current: DeviceList | None, incoming: DeviceList, now: int
) -> DeviceList:
    """The list a contact (or one of the person's devices) holds after receiving `incoming`:
    `incoming` when it is signed by `identity`, beats `current` and its version is not more
    than MAX_LIST_SKEW ahead of `now` (so no holder of the identity key can pin the list with
    a version no one can beat). Every holder of the same set of lists ends with the same one
    (the maximum under `beats`), in any order of arrival, once its clock has passed them."""
    incoming.verify(identity)
    if incoming.version > (now + MAX_LIST_SKEW) * VERSIONS_PER_SECOND:
        raise FutureDeviceList("device list version runs ahead of this clock")
    if current is not None and not incoming.beats(current):
        raise StaleDeviceList("device list does not beat the one held")
    return incoming


@dataclass(frozen=True)
class ListChange:
    """What `new` changes relative to `old`, by device ID."""

    added: frozenset[bytes]
    removed: frozenset[bytes]
    changed: frozenset[bytes]  # in both, with another entry (a rotated mailbox)


def diff(old: DeviceList, new: DeviceList) -> ListChange:
    changed = {x.device_id for x in new.devices if old.entry(x.device_id) not in (None, x)}
    return ListChange(new.ids() - old.ids(), old.ids() - new.ids(), frozenset(changed))


def readded(removed: frozenset[bytes], new: DeviceList) -> frozenset[bytes]:
    """The device IDs in `new` that a list this device held earlier had removed: the person's
    own devices accept such a list (every holder must converge) but alert the user
    (docs/devices.md §7)."""
    return removed & new.ids()


def rebase(
    identity: IdentityKeyPair, parent: DeviceList, mine: DeviceList, winner: DeviceList, now: int
) -> DeviceList | None:
    """A device signed `mine` on `parent` and lost to `winner`, signed concurrently by another
    device at the same version. Its change (the devices it added, removed or changed) is
    applied again on `winner` and signed as the next version; None when `winner` already holds
    that change. Lists that are not concurrent are not rebased (`NotConcurrent`): a newer list
    is simply accepted, so that a device that re-adds itself cannot make the others re-sign
    forever."""
    if winner.version != mine.version or parent.version >= mine.version:
        raise NotConcurrent("only a list that lost at its own version is rebased")
    if winner == mine:
        return None
    if not winner.beats(mine):
        raise NotConcurrent("this list won: there is nothing to rebase")
    change = diff(parent, mine)
    kept = [d for d in winner.devices if d.device_id not in change.removed]
    replaced = {d.device_id: d for d in mine.devices if d.device_id in change.changed}
    devices = [replaced.get(d.device_id, d) for d in kept]
    devices += [mine_d for mine_d in mine.devices if mine_d.device_id in change.added
                and mine_d.device_id not in winner.ids()]  # fmt: skip
    if sorted(devices, key=lambda d: d.device_id) == list(winner.devices):
        return None
    if len(devices) > MAX_DEVICES:
        raise TooManyDevices("the rebased list would hold more than MAX_DEVICES devices")
    if not devices:
        raise StateError("a device list keeps at least one device")
    return DeviceList.sign(identity, next_version(winner, now), devices)


def encode_list_payload(device_list: DeviceList) -> bytes:
    """The payload that tells a contact (inside a ratchet session) the person's device list."""
    return _V + bytes([PAYLOAD_DEVICE_LIST]) + device_list.to_bytes()


def decode_list_payload(data: bytes) -> DeviceList:
    r = Reader(data)
    if r.u8() != wire.VERSION:
        raise UnsupportedVersion("unsupported payload version")
    if r.u8() != PAYLOAD_DEVICE_LIST:
        raise DecodeError("not a device list payload")
    return DeviceList.from_bytes(data[2:])


# --- device keys and their proofs -------------------------------------------------------------


def new_device_key(entropy: Entropy) -> tuple[bytes, bytes]:
    """A device's own Ed25519 key pair (raw private, public). Never leaves the device: not in
    a link's profile, not synced, not in a backup (an import draws a new one)."""
    priv = entropy.ed25519_private()
    return p.ed25519_private_raw(priv), p.ed25519_public(priv)


def _proof_message(
    identity: PublicIdentity, device_id: bytes, purpose: int, message: bytes
) -> bytes:
    if len(device_id) != DEVICE_ID_LEN:
        raise ValueError("a device ID is 16 bytes")
    digest = hashlib.sha256(message).digest()
    return DEVICE_PROOF_LABEL + identity.encode() + device_id + bytes([purpose]) + digest


def device_proof(
    device_priv: bytes, identity: PublicIdentity, device_id: bytes, purpose: int, message: bytes
) -> bytes:
    """The device key's signature over `message` for one purpose (PROOF_HELLO, PROOF_BUNDLE)."""
    key = p.ed25519_from_private(device_priv)
    return key.sign(_proof_message(identity, device_id, purpose, message))


def check_device_proof(
    identity: PublicIdentity,
    held: DeviceList,
    device_id: bytes,
    purpose: int,
    message: bytes,
    signature: bytes,
) -> DeviceEntry:
    """The entry of `device_id` in the list held for `identity`, when `signature` is its listed
    device key's over `message`: `UnlistedDevice` if it is not listed (the daemon holds the
    message until a list names it, §5.2), `ForgedDeviceProof` if the key does not match."""
    entry = held.entry(device_id)
    if entry is None:
        raise UnlistedDevice("the device is not in the list held")
    signed = _proof_message(identity, device_id, purpose, message)
    if len(signature) != wire.SIG_LEN or not p.ed25519_verify(entry.device_key, signature, signed):
        raise ForgedDeviceProof("not signed by the listed device key")
    return entry


def device_bundle(
    device_priv: bytes, identity: PublicIdentity, device_id: bytes, base: bytes
) -> bytes:
    """What a device publishes at its bundle address: the bundle base (docs/protocol.md §6.2)
    followed by its device ID and the device key's proof over the base."""
    proof = device_proof(device_priv, identity, device_id, PROOF_BUNDLE, base)
    return base + device_id + proof


def check_device_bundle(
    identity: PublicIdentity, held: DeviceList, device_id: bytes, data: bytes
) -> bytes:
    """The bundle base of `data` fetched at `device_id`'s bundle address, when its device ID is
    that one and the listed device key signed it; verify_bundle (§6) still checks the base."""
    tail = DEVICE_ID_LEN + wire.SIG_LEN
    if len(data) <= tail:
        raise DecodeError("a device bundle is a bundle base, a device ID and a proof")
    base, got_id, proof = data[:-tail], data[-tail : -wire.SIG_LEN], data[-wire.SIG_LEN :]
    if got_id != device_id:
        raise ForgedDeviceProof("the bundle is another device's")
    check_device_proof(identity, held, device_id, PROOF_BUNDLE, base, proof)
    return base


@dataclass(frozen=True)
class DeviceHello:
    """The first payload of a session a device opens (with a contact device or its own): which
    listed device it is, where to answer it, the list version it holds, and its device key's
    proof over all that and the session's `EK_A.pub` (docs/protocol.md §7.1), so a hello is
    not replayed into another session."""

    device_id: bytes
    reply: MailboxAddress
    list_version: int
    signature: bytes

    def _signed(self) -> bytes:
        w = Writer().u8(wire.VERSION).u8(PAYLOAD_DEVICE_HELLO).fixed(self.device_id, DEVICE_ID_LEN)
        return self.reply.write(w).u64(self.list_version).bytes()

    @classmethod
    def sign(
        cls,
        device_priv: bytes,
        identity: PublicIdentity,
        device_id: bytes,
        reply: MailboxAddress,
        list_version: int,
        session_ek: bytes,
    ) -> DeviceHello:
        unsigned = cls(device_id, reply, list_version, b"")
        message = session_ek + unsigned._signed()
        sig = device_proof(device_priv, identity, device_id, PROOF_HELLO, message)
        return cls(device_id, reply, list_version, sig)

    def check(self, identity: PublicIdentity, held: DeviceList, session_ek: bytes) -> DeviceEntry:
        """The sender's entry, when the hello is its listed device key's for this session."""
        message = session_ek + self._signed()
        return check_device_proof(
            identity, held, self.device_id, PROOF_HELLO, message, self.signature
        )

    def to_bytes(self) -> bytes:
        return self._signed() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceHello:
        r = Reader(data)
        if r.u8() != wire.VERSION:
            raise UnsupportedVersion("unsupported payload version")
        if r.u8() != PAYLOAD_DEVICE_HELLO:
            raise DecodeError("not a device hello")
        out = cls(r.take(DEVICE_ID_LEN), MailboxAddress.read(r), r.u64(), r.take(wire.SIG_LEN))
        r.done()
        return out


@dataclass(frozen=True)
class ListAck:
    """A contact's acknowledgement of the list it now holds (0x42), sent to every listed
    device: the signer stops re-sending, and a device that does not hold that list asks for it
    (`ListRequest`), so every device of the person sees each list its contacts hold."""

    version: int
    digest: bytes  # SHA-256 of the list's signed body (DeviceList.digest)

    @classmethod
    def of(cls, device_list: DeviceList) -> ListAck:
        return cls(device_list.version, device_list.digest())

    def names(self, device_list: DeviceList | None) -> bool:
        return device_list is not None and (device_list.version, device_list.digest()) == (
            self.version, self.digest)  # fmt: skip


@dataclass(frozen=True)
class ListRequest:
    """A device of the person asks the contact for the list an acknowledgement named (0x43);
    the contact answers with the list it holds, which is that one or beats it."""

    version: int
    digest: bytes


DevicePayload = DeviceList | DeviceHello | ListAck | ListRequest


def encode_device_payload(payload: DevicePayload) -> bytes:
    if isinstance(payload, DeviceList):
        return encode_list_payload(payload)
    if isinstance(payload, DeviceHello):
        return payload.to_bytes()
    kind = PAYLOAD_DEVICE_LIST_ACK if isinstance(payload, ListAck) else PAYLOAD_DEVICE_LIST_REQUEST
    if not 1 <= payload.version < LIST_VERSION_LIMIT:
        raise ValueError("device list version out of range")
    w = Writer().u8(wire.VERSION).u8(kind).u64(payload.version)
    return w.fixed(payload.digest, 32).bytes()


def decode_device_payload(data: bytes) -> DevicePayload:
    """One of the device payloads 0x40-0x43 (docs/protocol.md §28), parsed strictly: raises
    only DecodeError / UnsupportedVersion. A list is not verified here (`accept` does)."""
    r = Reader(data)
    if r.u8() != wire.VERSION:
        raise UnsupportedVersion("unsupported payload version")
    kind = r.u8()
    if kind == PAYLOAD_DEVICE_LIST:
        return decode_list_payload(data)
    if kind == PAYLOAD_DEVICE_HELLO:
        return DeviceHello.from_bytes(data)
    if kind not in (PAYLOAD_DEVICE_LIST_ACK, PAYLOAD_DEVICE_LIST_REQUEST):
        raise DecodeError("not a device payload")
    version, digest = r.u64(), r.take(32)
    r.done()
    if not 1 <= version < LIST_VERSION_LIMIT:
        raise DecodeError("device list version out of range")
    return (ListAck if kind == PAYLOAD_DEVICE_LIST_ACK else ListRequest)(version, digest)


# --- the device link ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLink:
    """What `aegis device link` shows: E's one-time link mailbox, the link secret, E's
    ephemeral X25519 key and the expiry. Whoever holds it can try to link one device."""

    mailbox: MailboxAddress
    link_secret: bytes
    e_pub: bytes
    expires: int  # seconds since the epoch

    def to_bytes(self) -> bytes:
        if len(self.mailbox.send_token) != wire.RELAY_TOKEN_LEN:
            raise ValueError("a link mailbox takes a send token")
        w = Writer().u8(wire.VERSION).u8(LINK_DEVICE)
        self.mailbox.write(w)
        w.fixed(self.link_secret, LINK_SECRET_LEN).fixed(self.e_pub, wire.X25519_LEN)
        return w.u64(self.expires).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceLink:
        r = Reader(data)
        if r.u8() != wire.VERSION:
            raise UnsupportedVersion("unsupported link version")
        if r.u8() != LINK_DEVICE:
            raise DecodeError("not a device link")
        mailbox = MailboxAddress.read(r)
        if len(mailbox.send_token) != wire.RELAY_TOKEN_LEN:
            raise DecodeError("a link mailbox takes a send token")
        out = cls(mailbox, r.take(LINK_SECRET_LEN), r.take(wire.X25519_LEN), r.u64())
        r.done()
        return out

    def to_text(self) -> str:
        return wire.LINK_SCHEME + base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode()

    @classmethod
    def from_text(cls, text: str) -> DeviceLink:
        text = text.strip()
        if not text.startswith(wire.LINK_SCHEME) or len(text) > MAX_TEXT_LEN:
            raise DecodeError("not an AegisLink device link")
        body = text[len(wire.LINK_SCHEME) :]
        if not body or not body.isascii() or not all(c.isalnum() or c in "-_" for c in body):
            raise DecodeError("not an AegisLink device link")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise DecodeError("not an AegisLink device link") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
            raise DecodeError("non-canonical link encoding")
        return cls.from_bytes(raw)

    def __repr__(self) -> str:  # the link secret never shows
        return f"DeviceLink(mailbox={self.mailbox.relay_url!r}, expires={self.expires})"


# --- the profile a linked device receives ------------------------------------------------------


@dataclass(frozen=True)
class LinkProfile:
    """What E gives N: the identity's private keys, the current device list and the rest of the
    profile (contacts, groups, settings: the daemon's opaque bytes, docs/devices.md §6)."""

    ed_priv: bytes
    x_priv: bytes
    binding_sig: bytes
    device_list: DeviceList
    profile: bytes

    def to_bytes(self) -> bytes:
        w = Writer().u8(wire.VERSION)
        w.fixed(self.ed_priv, wire.ED25519_LEN).fixed(self.x_priv, wire.X25519_LEN)
        w.fixed(self.binding_sig, wire.SIG_LEN)
        listed = self.device_list.to_bytes()
        w.u16(len(listed)).raw(listed)
        return w.varbytes(self.profile).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LinkProfile:
        r = Reader(data)
        if r.u8() != wire.VERSION:
            raise UnsupportedVersion("unsupported profile version")
        ed, x, sig = r.take(wire.ED25519_LEN), r.take(wire.X25519_LEN), r.take(wire.SIG_LEN)
        device_list = DeviceList.from_bytes(r.take(r.u16()))
        out = cls(ed, x, sig, device_list, r.varbytes(MAX_PROFILE_BLOCKS * PROFILE_CHUNK_LEN))
        r.done()
        return out

    def identity(self) -> IdentityKeyPair:
        """The identity these keys make; the device list must be signed by it."""
        try:
            pair = IdentityKeyPair.from_raw(self.ed_priv, self.x_priv, self.binding_sig)
        except (ProtocolError, ValueError):
            raise DecryptionError() from None
        self.device_list.verify(pair.public)
        return pair

    def takes_installed_extra(self) -> bool:
        """Whether E reads the bytes of N's "installed": the profile (backup contents) carries
        the DELETE_KEYS_SETTING marker. A profile that cannot be read says no."""
        try:
            contents = BackupContents.from_bytes(self.profile)
        except (DecodeError, ProtocolError, ValueError):
            return False
        return any(name == DELETE_KEYS_SETTING for name, _ in contents.settings)

    def __repr__(self) -> str:
        return f"LinkProfile(<private>, list version {self.device_list.version})"


# --- the handshake ------------------------------------------------------------------------------


def _pad(content: bytes, n: int) -> bytes:
    if len(content) > n:
        raise ValueError("content too large for one block")
    return content + bytes(n - len(content))


def _unpad(content: bytes, used: int) -> None:
    # Padding is zeros: anything else is a block from someone else (only key holders seal).
    if any(content[used:]):
        raise DecryptionError()


def _commit(n_nonce: bytes) -> bytes:
    return hashlib.sha256(_COMMIT_LABEL + n_nonce).digest()


def _request_key(link: DeviceLink, dh: bytes, n_pub: bytes) -> bytes:
    return p.hkdf(dh, link.link_secret, _REQUEST_LABEL + link.e_pub + n_pub, wire.KEY_LEN)


def _accept_key(link: DeviceLink, dh: bytes, transcript: bytes) -> bytes:
    th = hashlib.sha256(transcript).digest()
    return p.hkdf(dh, link.link_secret, _ACCEPT_LABEL + th, wire.KEY_LEN)


def _used_key(link: DeviceLink, dh: bytes, transcript: bytes) -> bytes:
    # Only E (e) and the requester (n) can make it: the relay cannot tell a waiting N "used".
    th = hashlib.sha256(transcript).digest()
    return p.hkdf(dh, link.link_secret, _USED_LABEL + th, wire.KEY_LEN)


@dataclass(frozen=True, repr=False)
class _Keys:
    n2e: bytes
    e2n: bytes
    code_key: bytes


def _session_keys(link: DeviceLink, dh: bytes, ss: bytes, transcript: bytes) -> _Keys:
    th = hashlib.sha256(transcript).digest()
    okm = p.hkdf(link.link_secret + dh + ss, _SALT, _SESSION_LABEL + th, 3 * wire.KEY_LEN)
    return _Keys(okm[:32], okm[32:64], okm[64:])


def confirmation_code(code_key: bytes, n_nonce: bytes) -> str:
    """Six decimal digits shown on both screens, as "123 456" (bias below 2^-40)."""
    mac = p.hmac_sha256(code_key, _CODE_LABEL + n_nonce)
    number = int.from_bytes(mac[:8], "big") % 10**CODE_DIGITS
    digits = f"{number:0{CODE_DIGITS}d}"
    return f"{digits[:3]} {digits[3:]}"


def _seal_session(entropy: Entropy, key: bytes, content: bytes) -> bytes:
    nonce = entropy.random(wire.NONCE_LEN)
    prefix = _V + nonce
    block = prefix + p.aead(key).encrypt(nonce, _pad(content, SESSION_CONTENT_LEN), prefix)
    assert len(block) == wire.BLOCK_SIZE
    return block


def _open_session(key: bytes, block: bytes, step: int) -> bytes:
    if len(block) != wire.BLOCK_SIZE or block[0] != wire.VERSION:
        raise DecryptionError()
    prefix = block[: 1 + wire.NONCE_LEN]
    content = p.open_with(p.aead(key), prefix[1:], block[len(prefix) :], prefix)
    if content is None or content[0] != step:
        raise DecryptionError()
    return content


def _final_content(status: int, device_list: DeviceList | None) -> bytes:
    listed = b"" if device_list is None else device_list.to_bytes()
    return Writer().u8(STEP_FINAL).u8(status).u16(len(listed)).raw(listed).bytes()


class LinkOffer:
    """The existing device E's side of one link. Held in memory only: a restart voids the link
    (the ephemeral key is never stored), which costs the user a new link at most. Every step
    takes `now` and refuses after the link's expiry (`LinkExpired`)."""

    def __init__(self, link: DeviceLink, e_priv: bytes, created_at: int) -> None:
        self.link = link
        self._e = e_priv  # raw scalar: the core's key objects stay inside primitives
        self.created_at = created_at
        self.reply_to: MailboxAddress | None = None  # N's reply mailbox, once a request opened
        self.code: str | None = None
        self._keys: _Keys | None = None
        self._used = False
        self._commit = b""
        self._confirmed = False
        self._profile_sent = False
        self._n_pub = b""  # the request that used the link
        self._refusals = 0
        # After the final: (the list it was signed on, N's entry, the list signed), kept until
        # N says it installed the profile; only then does E list N.
        self._pending: tuple[DeviceList, DeviceEntry, DeviceList] | None = None
        self.installed = False
        self.finished = False
        # What N's "installed" carried besides its step: the daemon's opaque bytes (the delete
        # keys of N's mailboxes, docs/devices.md §4.2); empty from an N that sends none.
        self.installed_extra = b""

    @classmethod
    def create(
        cls, entropy: Entropy, mailbox: MailboxAddress, now: int, ttl: int = LINK_TTL
    ) -> LinkOffer:
        e = entropy.x25519_private()
        link = DeviceLink(mailbox, entropy.random(LINK_SECRET_LEN), p.x25519_public(e), now + ttl)
        return cls(link, p.x25519_private_raw(e), now)

    def _live(self, now: int, grace: int = 0) -> None:
        if now >= self.link.expires + grace:
            raise LinkExpired("the device link has expired")

    def _open_request(self, block: bytes) -> tuple[bytes, bytes, bytes]:
        """(n_pub, dh, content) of a block that opens as a request under this link."""
        if len(block) != wire.BLOCK_SIZE or block[0] != wire.VERSION:
            raise DecryptionError()
        n_pub = block[1 : 1 + wire.X25519_LEN]
        dh = p.dh(p.x25519_from_private(self._e), n_pub)
        prefix = block[: 1 + wire.X25519_LEN]
        content = p.open_once(_request_key(self.link, dh, n_pub), block[len(prefix) :], prefix)
        return n_pub, dh, content

    def _read_inner(self, content: bytes) -> tuple[bytes, bytes, MailboxAddress, int]:
        """(ek, commit, reply mailbox, bytes used) of an opened request; DecryptionError for
        anything malformed, a reply mailbox without a token, on another relay, or padding."""
        try:
            r = Reader(content)
            if r.u8() != STEP_REQUEST:
                raise DecryptionError()
            ek, commit = r.take(wire.MLKEM_EK_LEN), r.take(wire.KEY_LEN)
            reply_to = MailboxAddress.read(r)
            used = 1 + wire.MLKEM_EK_LEN + wire.KEY_LEN + len(reply_to.write(Writer()).bytes())
        except (DecodeError, ValueError):
            raise DecryptionError() from None
        # The reply mailbox is on the link's relay, spelled as in the link: a link holder
        # cannot make E connect to a relay of his choosing.
        if (
            len(reply_to.send_token) != wire.RELAY_TOKEN_LEN
            or reply_to.relay_url != self.link.mailbox.relay_url
        ):
            raise DecryptionError()
        _unpad(content, used)
        return ek, commit, reply_to, used

    def accept_request(self, entropy: Entropy, block: bytes, now: int) -> bytes:
        """Open N's request; answer with the accept block (to `reply_to`). A block that does
        not open under the link leaves the link usable (the relay, who sees the link mailbox's
        token, cannot burn it); one that opens uses it up, even if what it holds is refused
        (only a holder of the link secret can seal one)."""
        self._live(now)
        if self._used or self.finished:
            raise LinkUsed("the device link was used already")
        n_pub, dh, content = self._open_request(block)
        self._used = True
        self._n_pub = n_pub
        ek, commit, reply_to, used = self._read_inner(content)
        ss, ct = entropy.encapsulate(p.mlkem_load_ek(ek))
        transcript = self.link.to_bytes() + n_pub + content[:used]
        k_acc = _accept_key(self.link, dh, transcript)
        answer = _V + p.seal_once(k_acc, _pad(bytes([STEP_ACCEPT]) + ct, ACCEPT_CONTENT_LEN), _V)
        self._keys = _session_keys(self.link, dh, ss, transcript + ct)
        self._commit = commit
        self.reply_to = reply_to
        return answer

    def refuse_request(self, block: bytes, now: int) -> tuple[MailboxAddress, bytes]:
        """A further request while the link runs (a second device holding the link): the
        "used" block and the requester's reply mailbox to deposit it into, so it fails at once
        instead of waiting for the expiry. Nothing of the running link changes, and the answer
        carries nothing but "used" (its key is the requester's request's alone). A replay of
        the request that used the link is not answered (the real N must never read "used"),
        nor is anything past MAX_REFUSALS answers (`LinkUsed`: drop it); a block that does
        not open as a well-formed request is `DecryptionError`, before the link was used
        `StateError` (`accept_request` takes it)."""
        self._live(now, FINAL_GRACE)
        if not self._used:
            raise StateError("the link is not used yet")
        if self._refusals >= MAX_REFUSALS:
            raise LinkUsed("no more requests are answered on this link")
        n_pub, dh, content = self._open_request(block)
        if n_pub == self._n_pub:
            raise LinkUsed("the request that used the link, replayed")
        _, _, reply_to, used = self._read_inner(content)
        transcript = self.link.to_bytes() + n_pub + content[:used]
        self._refusals += 1
        answer = _pad(bytes([STEP_USED]), ACCEPT_CONTENT_LEN)
        return reply_to, _V + p.seal_once(_used_key(self.link, dh, transcript), answer, _V)

    def receive_reveal(self, block: bytes, now: int) -> str:
        """Open N's reveal; the code to show on E's screen, with the prompt "confirm only if
        the new device shows this code" (docs/devices.md §4.4)."""
        self._live(now)
        if self._keys is None or self.code is not None:
            raise LinkUsed("no reveal is expected now")
        content = _open_session(self._keys.n2e, block, STEP_REVEAL)
        n_nonce = content[1 : 1 + NONCE_SECRET_LEN]
        _unpad(content, 1 + NONCE_SECRET_LEN)
        if not p.constant_time_equal(_commit(n_nonce), self._commit):
            raise DecryptionError()
        self.code = confirmation_code(self._keys.code_key, n_nonce)
        return self.code

    def confirm(self, now: int) -> None:
        """The user saw the same code on both screens (called only after they said so)."""
        self._live(now)
        if self.code is None:
            raise StateError("there is no code to confirm yet")
        self._confirmed = True

    def profile_blocks(self, entropy: Entropy, profile: LinkProfile, now: int) -> list[bytes]:
        """The profile, sealed for N, in a Padmé-padded number of blocks; only once confirmed,
        and only if the list has room for N (the identity key is never sent for nothing)."""
        self._live(now)
        if not self._confirmed or self._keys is None:
            raise StateError("the code was not confirmed on this device")
        if self._profile_sent:
            raise LinkUsed("the profile was sent already")
        if len(profile.device_list.devices) >= MAX_DEVICES:
            raise TooManyDevices("the person has MAX_DEVICES devices already")
        data = profile.to_bytes()
        stream = struct.pack(">I", len(data)) + data
        count = wire.padme(max(1, -(-len(stream) // PROFILE_CHUNK_LEN)))
        if count > MAX_PROFILE_BLOCKS:
            raise StateError("the profile is too large to link")
        stream += bytes(count * PROFILE_CHUNK_LEN - len(stream))
        blocks = []
        for i in range(count):
            chunk = stream[i * PROFILE_CHUNK_LEN : (i + 1) * PROFILE_CHUNK_LEN]
            head = struct.pack(">BII", STEP_PROFILE, i, count)
            blocks.append(_seal_session(entropy, self._keys.e2n, head + chunk))
        self._profile_sent = True
        return blocks

    def receive_done(
        self,
        entropy: Entropy,
        identity: IdentityKeyPair,
        current: DeviceList,
        block: bytes,
        now: int,
        limit: int = MAX_DEVICES,
    ) -> tuple[DeviceList | None, bytes]:
        """N's closing block, its entry. E adds it to `current` (the list E holds NOW, which
        may have changed since the profile left) and signs the next version; the result and
        the final block for N (to `reply_to`), which says accepted (with that list) or refused
        (the list is full: `limit` devices, the user's own bound, at most MAX_DEVICES; or N's
        device ID or key is taken): then the list is None. E does
        not store the list yet: only once N says it installed the profile
        (`receive_installed`), so a new device that never took its final is never listed."""
        self._live(now)
        if not self._profile_sent or self._keys is None or self.finished:
            raise LinkUsed("no closing block is expected now")
        content = _open_session(self._keys.n2e, block, STEP_DONE)
        try:
            r = Reader(content[1:])
            n = r.u16()
            entry = DeviceEntry.from_bytes(r.take(n))
        except (DecodeError, ValueError):
            raise DecryptionError() from None
        _unpad(content, 3 + n)
        new: DeviceList | None = None
        if len(current.devices) >= min(limit, MAX_DEVICES):
            status = FINAL_FULL
        elif entry.device_id in current.ids() or any(
            x.device_key == entry.device_key for x in current.devices
        ):
            status = FINAL_TAKEN
        else:
            status = FINAL_ACCEPTED
            new = DeviceList.sign(identity, next_version(current, now), [*current.devices, entry])
            self._pending = (current, entry, new)
        self.finished = True
        return new, _seal_session(entropy, self._keys.e2n, _final_content(status, new))

    def receive_installed(
        self,
        entropy: Entropy,
        identity: IdentityKeyPair,
        current: DeviceList,
        block: bytes,
        now: int,
        limit: int = MAX_DEVICES,
    ) -> tuple[DeviceList, bytes]:
        """N's "installed" block, taken until the link's expiry plus FINAL_GRACE: the list to
        store now, with N, and the "listed" block for N. The list is the one the final carried
        when E still holds the list it was signed on; if E's list changed meanwhile (a
        removal), N's entry is added to the list held now and signed again, as the next
        version of both (`TooManyDevices` if it holds `limit` devices, the user's own bound,
        at most MAX_DEVICES, or `LinkRefused` if it holds N's ID or key: nothing listed)."""
        self._live(now, FINAL_GRACE)
        if self._pending is None or self._keys is None or self.installed:
            raise LinkUsed("no installed block is expected now")
        content = _open_session(self._keys.n2e, block, STEP_INSTALLED)
        # 0x08 || u16 len || extra (len): an N that sends no extra has zeros there (len 0).
        (size,) = struct.unpack_from(">H", content, 1)
        if size > MAX_INSTALLED_EXTRA:
            raise DecryptionError()
        _unpad(content, 3 + size)
        extra = content[3:3 + size]
        base, entry, signed = self._pending
        listed = signed
        if current != base:
            if len(current.devices) >= min(limit, MAX_DEVICES):
                raise TooManyDevices("the person has MAX_DEVICES devices already")
            if entry.device_id in current.ids() or any(
                x.device_key == entry.device_key for x in current.devices
            ):
                raise LinkRefused("the new device's ID or key is taken")
            newest = signed if signed.version > current.version else current
            devices = [*current.devices, entry]
            listed = DeviceList.sign(identity, next_version(newest, now), devices)
        self.installed = True
        self.installed_extra = extra
        return listed, _seal_session(entropy, self._keys.e2n, bytes([STEP_LISTED]))

    @property
    def joined(self) -> DeviceEntry | None:
        """N's entry, once its DONE was accepted (the device the link adds)."""
        return None if self._pending is None else self._pending[1]

    def __repr__(self) -> str:
        return "LinkOffer(<private>)"


class LinkJoin:
    """The new device N's side of one link. Every step takes `now` and refuses after the link's
    expiry (`LinkExpired`); E's final block, sent before expiry, is taken for FINAL_GRACE more
    seconds."""

    def __init__(self, link: DeviceLink) -> None:
        self.link = link
        self._n: bytes | None = None  # raw X25519 scalar
        self._kem: bytes | None = None  # ML-KEM-768 seed
        self._nonce = b""
        self._transcript = b""
        self._keys: _Keys | None = None
        self.code: str | None = None
        self._chunks: dict[int, bytes] = {}
        self._count = 0
        self.profile: LinkProfile | None = None
        self._confirmed = False
        self._me: DeviceEntry | None = None
        self.finished = False
        self._accepted = False  # E's final listed this device
        self._installed_sent = False
        self.listed = False  # E said it stored the list with this device

    def _live(self, now: int, grace: int = 0) -> None:
        if now >= self.link.expires + grace:
            raise LinkExpired("the device link has expired")

    @classmethod
    def start(
        cls, entropy: Entropy, link: DeviceLink, reply_to: MailboxAddress, now: int
    ) -> tuple[LinkJoin, bytes]:
        """The request block (to the link's mailbox); N's reply mailbox, on the link's relay
        (the same URL), goes inside it."""
        if now >= link.expires:
            raise LinkExpired("the device link has expired")
        if len(reply_to.send_token) != wire.RELAY_TOKEN_LEN:
            raise ValueError("the reply mailbox takes a send token")
        if reply_to.relay_url != link.mailbox.relay_url:
            raise ValueError("the reply mailbox is on the link's relay")
        self = cls(link)
        n = entropy.x25519_private()
        kem = entropy.mlkem_private()
        self._n, self._kem = p.x25519_private_raw(n), p.mlkem_seed(kem)
        self._nonce = entropy.random(NONCE_SECRET_LEN)
        n_pub = p.x25519_public(n)
        w = Writer().u8(STEP_REQUEST).raw(p.mlkem_ek(kem)).raw(_commit(self._nonce))
        inner = reply_to.write(w).bytes()
        dh = p.dh(n, link.e_pub)
        prefix = _V + n_pub
        sealed = p.seal_once(
            _request_key(link, dh, n_pub), _pad(inner, REQUEST_CONTENT_LEN), prefix
        )
        self._transcript = link.to_bytes() + n_pub + inner
        block = prefix + sealed
        assert len(block) == wire.BLOCK_SIZE
        return self, block

    def receive_accept(self, entropy: Entropy, block: bytes, now: int) -> bytes:
        """Open E's accept; the reveal block (to the link's mailbox). `code` is set."""
        self._live(now)
        if self._n is None or self._kem is None or self._keys is not None:
            raise LinkUsed("no accept is expected now")
        if len(block) != wire.BLOCK_SIZE or block[0] != wire.VERSION:
            raise DecryptionError()
        dh = p.dh(p.x25519_from_private(self._n), self.link.e_pub)
        try:
            content = p.open_once(_accept_key(self.link, dh, self._transcript), block[1:], _V)
        except DecryptionError:
            used = p.open_once(_used_key(self.link, dh, self._transcript), block[1:], _V)
            if used[0] != STEP_USED:
                raise DecryptionError() from None
            _unpad(used, 1)
            self.finished = True
            raise LinkUsed("this link was already used") from None
        if content[0] != STEP_ACCEPT:
            raise DecryptionError()
        ct = content[1 : 1 + wire.MLKEM_CT_LEN]
        _unpad(content, 1 + wire.MLKEM_CT_LEN)
        ss = p.mlkem_decapsulate(p.mlkem_from_seed(self._kem), ct)
        self._keys = _session_keys(self.link, dh, ss, self._transcript + ct)
        self.code = confirmation_code(self._keys.code_key, self._nonce)
        return _seal_session(entropy, self._keys.n2e, bytes([STEP_REVEAL]) + self._nonce)

    def add_profile_block(self, block: bytes, now: int) -> LinkProfile | None:
        """One of E's profile blocks, in any order; the profile once all have come. It is held,
        not applied, until E's final block accepts this device."""
        self._live(now)
        if self._keys is None or self.profile is not None:
            raise LinkUsed("no profile block is expected now")
        content = _open_session(self._keys.e2n, block, STEP_PROFILE)
        index, count = struct.unpack(">II", content[1:9])
        if not 0 < count <= MAX_PROFILE_BLOCKS or index >= count:
            raise DecryptionError()
        if self._count and count != self._count:
            raise DecryptionError()
        self._count = count
        self._chunks[index] = content[9:]
        if len(self._chunks) < count:
            return None
        stream = b"".join(self._chunks[i] for i in range(count))
        self._chunks = {}
        (n,) = struct.unpack(">I", stream[:4])
        if n > len(stream) - 4:
            raise DecryptionError()
        _unpad(stream, 4 + n)
        try:
            profile = LinkProfile.from_bytes(stream[4 : 4 + n])
            profile.identity()
        except (DecodeError, DeviceError):
            raise DecryptionError() from None
        self.profile = profile
        return profile

    def confirm(self, now: int) -> None:
        self._live(now)
        if self.profile is None:
            raise StateError("the profile has not arrived")
        self._confirmed = True

    def done_block(self, entropy: Entropy, me: DeviceEntry, now: int) -> bytes:
        """After the user confirmed on N: the closing block for E, carrying this device's entry
        (its device ID, device key, device mailbox and bundle address). N is in no list until
        E's final block (`receive_final`)."""
        self._live(now)
        if self._me is not None or self.finished:
            raise LinkUsed("the closing block was made already")
        if not self._confirmed or self.profile is None or self._keys is None:
            raise StateError("the code was not confirmed on this device")
        entry = me.to_bytes()
        content = Writer().u8(STEP_DONE).u16(len(entry)).raw(entry).bytes()
        self._me = me
        return _seal_session(entropy, self._keys.n2e, content)

    def receive_final(self, block: bytes, now: int) -> tuple[IdentityKeyPair, DeviceList]:
        """E's final block: the identity and E's list with this device, signed by E, when E
        accepted; `TooManyDevices` or `LinkRefused` when it refused (then the daemon forgets
        the profile, the identity key with it)."""
        self._live(now, FINAL_GRACE)
        if self._me is None or self.profile is None or self._keys is None or self.finished:
            raise LinkUsed("no final block is expected now")
        content = _open_session(self._keys.e2n, block, STEP_FINAL)
        try:
            r = Reader(content[1:])
            status, n = r.u8(), r.u16()
            listed = r.take(n)
        except DecodeError:
            raise DecryptionError() from None
        _unpad(content, 4 + n)
        self.finished = True
        if status == FINAL_FULL and not listed:
            raise TooManyDevices("the person has MAX_DEVICES devices already")
        if status != FINAL_ACCEPTED or not listed:
            raise LinkRefused("the existing device refused this device")
        identity = self.profile.identity()
        try:
            new = DeviceList.from_bytes(listed)
            accept(identity.public, self.profile.device_list, new, now)
        except (DecodeError, DeviceError):
            raise DecryptionError() from None
        if new.entry(self._me.device_id) != self._me:
            raise DecryptionError()
        self._accepted = True
        return identity, new

    def installed_block(self, entropy: Entropy, extra: bytes = b"") -> bytes:
        """After an accepted final, once the profile is committed: the block that tells E to
        list this device, with `extra` (the daemon's bytes: its mailboxes' delete keys, at
        most MAX_INSTALLED_EXTRA) only if E's profile says E reads them
        (`LinkProfile.takes_installed_extra`); otherwise none, as an older E expects. Not
        bound to a time: E takes it until expiry plus FINAL_GRACE."""
        if len(extra) > MAX_INSTALLED_EXTRA:
            raise ValueError("too much to say in one installed block")
        if not self._accepted or self._keys is None or self._installed_sent:
            raise LinkUsed("no installed block is due now")
        assert self.profile is not None  # accepted: the profile came
        if not self.profile.takes_installed_extra():
            extra = b""
        self._installed_sent = True
        content = Writer().u8(STEP_INSTALLED).u16(len(extra)).raw(extra).bytes()
        return _seal_session(entropy, self._keys.n2e, content)

    def receive_listed(self, block: bytes, now: int) -> None:
        """E's "listed" block: E stored the list with this device (taken until the expiry
        plus twice FINAL_GRACE: E sends it at most FINAL_GRACE after the expiry)."""
        self._live(now, 2 * FINAL_GRACE)
        if not self._installed_sent or self._keys is None or self.listed:
            raise LinkUsed("no listed block is expected now")
        content = _open_session(self._keys.e2n, block, STEP_LISTED)
        _unpad(content, 1)
        self.listed = True

    def __repr__(self) -> str:
        return "LinkJoin(<private>)"


def new_device_id(entropy: Entropy) -> bytes:
    return entropy.random(DEVICE_ID_LEN)
