"""Proven answers (docs/devices.md §5.2, docs/protocol.md §28.4): a session with a contact's
listed device is deposited to only once that device proved its device key **in that session**,
not on the strength of an answer alone.

Why: the opener fetched the device's bundle from the relay, and a bundle is signed by the
identity, not by the device. A removed device still holds the identity key; with a relay that
serves its bundle at a listed device's bundle address and hands it the first contact, it could
answer in that device's place and receive everything sent to that device. So the answering
device follows its answer (a hello, 0x03) with a device hello (0x41) bound to the opener's
EK_A.pub, signed by its device key, which the opener checks under the list it holds. A removed
device holds no listed device key.

Everything is per session, named by its EK_A.pub (the opener's, ours or the device's): the
answer and the proof count only when both came in the same session and the proof binds that
session's EK_A.pub; a session a reopening replaced that decrypts a block again becomes the
device's session with the mailbox it was proven with, or none (nothing goes to the device
until that session is proven too). Kept in the store, so a restart between the two loses
nothing:

- ``devices.session_eks`` {contact id: {device hex: EK_A.pub hex}}: the device's session's;
  the superseded sessions (device_sessions.py) carry their own beside their state.
- ``devices.session_answers`` {contact id: {EK hex: mailbox address hex}}: answers that came.
- ``devices.session_proofs`` {contact id: [EK hex, ...]}: proofs that came.

Answers and proofs of sessions no longer held (neither a device's session nor a superseded
one) are pruned whenever a session is opened, adopted or swapped. Nothing here logs a device
ID or a contact.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.store import Store
from aegisd.store.devices import SETTING_KEY, SETTING_OWN_LIST, SETTING_SELF

from .mailbox import address_from_bytes, address_to_bytes

SETTING_SESSION_EKS = "devices.session_eks"
SETTING_ANSWERS = "devices.session_answers"
SETTING_PROOFS = "devices.session_proofs"
#: {request id: EK_A.pub hex}: a contact request that came as a device's opening (a device
#: hello, or a hello tagged DEVICE_SESSION: a contact's device, added on another device of
#: ours whose sync has not come): accepted, its answer carries our proof too.
SETTING_REQUEST_EKS = "devices.request_eks"


def _map(store: Store, name: str, contact_id: int) -> dict[str, Any]:
    return dict(dict(store.get_setting(name) or {}).get(str(contact_id)) or {})


def _ids(store: Store, name: str, contact_id: int) -> list[str]:
    return [str(d) for d in dict(store.get_setting(name) or {}).get(str(contact_id)) or []]


def _put(store: Store, name: str, contact_id: int, value: object) -> None:
    everything = dict(store.get_setting(name) or {})
    if value:
        everything[str(contact_id)] = value
    else:
        everything.pop(str(contact_id), None)
    store.set_setting(name, everything or None)


def session_ek(store: Store, contact_id: int, device_id: bytes) -> bytes | None:
    """The EK_A.pub of the session held with the device (None: one from before this rule)."""
    ek = _map(store, SETTING_SESSION_EKS, contact_id).get(device_id.hex())
    return None if ek is None else bytes.fromhex(str(ek))


def _set_session(store: Store, contact_id: int, device_id: bytes, ek: bytes | None) -> None:
    eks = _map(store, SETTING_SESSION_EKS, contact_id)
    if ek is None:
        eks.pop(device_id.hex(), None)
    else:
        eks[device_id.hex()] = ek.hex()
    _put(store, SETTING_SESSION_EKS, contact_id, eks)


def prune(store: Store, contact_id: int, superseded: Iterable[str]) -> None:
    """Keep answers and proofs of the sessions still held only: the devices' sessions and the
    superseded ones (their EK hex in ``superseded``)."""
    held = set(_map(store, SETTING_SESSION_EKS, contact_id).values()) | set(superseded)
    answers = _map(store, SETTING_ANSWERS, contact_id)
    _put(store, SETTING_ANSWERS, contact_id, {k: v for k, v in answers.items() if k in held})
    _put(store, SETTING_PROOFS, contact_id,
         [k for k in _ids(store, SETTING_PROOFS, contact_id) if k in held])  # fmt: skip


def opened(store: Store, contact_id: int, device_id: bytes, ek: bytes) -> None:
    """This device opened a session with ``device_id`` whose EK_A.pub is ``ek`` (inside the
    opening's transaction): it is the device's session from now on, unanswered."""
    _set_session(store, contact_id, device_id, ek)


def adopted(
    store: Store, contact_id: int, device_id: bytes, ek: bytes, reply: wire.MailboxAddress
) -> None:
    """The device opened the session (EK_A.pub ``ek``) with a hello proven by its device key,
    naming ``reply``: proven and answered at once."""
    _set_session(store, contact_id, device_id, ek)
    answers = _map(store, SETTING_ANSWERS, contact_id)
    answers[ek.hex()] = address_to_bytes(reply).hex()
    _put(store, SETTING_ANSWERS, contact_id, answers)
    proofs = [k for k in _ids(store, SETTING_PROOFS, contact_id) if k != ek.hex()] + [ek.hex()]
    _put(store, SETTING_PROOFS, contact_id, proofs)


def swapped(store: Store, contact_id: int, device_id: bytes, ek: bytes | None) -> bytes | None:
    """A superseded session (EK_A.pub ``ek``) decrypted a block and is the device's session
    again: the mailbox to deposit to (its answer's, when it was proven), else None."""
    _set_session(store, contact_id, device_id, ek)
    return _proven_answer(store, contact_id, ek)


def _proven_answer(store: Store, contact_id: int, ek: bytes | None) -> bytes | None:
    if ek is None or ek.hex() not in _ids(store, SETTING_PROOFS, contact_id):
        return None
    answer = _map(store, SETTING_ANSWERS, contact_id).get(ek.hex())
    return None if answer is None else bytes.fromhex(str(answer))


def answer_came(
    store: Store, contact_id: int, device_id: bytes, reply: wire.MailboxAddress
) -> wire.MailboxAddress | None:
    """The device's answer (its mailbox) came in its session: returned when that session's
    proof came already (take it), else kept until it does (None)."""
    ek = session_ek(store, contact_id, device_id)
    if ek is None:
        return None
    answers = _map(store, SETTING_ANSWERS, contact_id)
    answers[ek.hex()] = address_to_bytes(reply).hex()
    _put(store, SETTING_ANSWERS, contact_id, answers)
    return reply if _proven_answer(store, contact_id, ek) is not None else None


def proof_came(
    store: Store, contact_id: int, identity: PublicIdentity, listed: dv.DeviceList,
    device_id: bytes, hello: dv.DeviceHello,
) -> wire.MailboxAddress | None:  # fmt: skip
    """A device hello naming ``device_id`` in that device's session. A proof of that very
    session (bound to its EK_A.pub, by the listed key of ``device_id``): the answer that came
    in it, now taken (returned), or None when the answer has not come (the proof is kept for
    it). Anything else (a hello bound to another session or to none, as a list's signer
    sends): None, nothing kept."""
    ek = session_ek(store, contact_id, device_id)
    if ek is None:
        return None
    try:
        entry = hello.check(identity, listed, ek)
    except (dv.UnlistedDevice, dv.ForgedDeviceProof):
        return None
    if entry.device_id != device_id:
        return None
    proofs = [k for k in _ids(store, SETTING_PROOFS, contact_id) if k != ek.hex()] + [ek.hex()]
    _put(store, SETTING_PROOFS, contact_id, proofs)
    answer = _proven_answer(store, contact_id, ek)
    return None if answer is None else address_from_bytes(answer)


def forget(store: Store, contact_id: int, keep: Iterable[bytes] | None = None) -> None:
    """The devices not in ``keep`` (all of them for None) are no longer the contact's: what is
    kept for their sessions goes (their superseded sessions are pruned with the next one)."""
    names = {d.hex() for d in keep or ()}
    eks = _map(store, SETTING_SESSION_EKS, contact_id)
    _put(store, SETTING_SESSION_EKS, contact_id, {k: v for k, v in eks.items() if k in names})
    if keep is None:
        _put(store, SETTING_ANSWERS, contact_id, None)
        _put(store, SETTING_PROOFS, contact_id, None)


def own_hello(
    store: Store, identity: IdentityKeyPair, reply: wire.MailboxAddress, ek: bytes
) -> dv.DeviceHello | None:
    """This device's hello naming ``reply``, bound to ``ek`` (a session's EK_A.pub, or
    LEGACY_EK for none); None without a list of its own (no list names it)."""
    own, me, key = (store.get_setting(n) for n in (SETTING_OWN_LIST, SETTING_SELF, SETTING_KEY))
    if own is None or me is None or key is None:
        return None
    version = dv.DeviceList.from_bytes(bytes.fromhex(str(own))).version
    return dv.DeviceHello.sign(bytes.fromhex(str(key)), identity.public, bytes.fromhex(str(me)),
                               reply, version, ek)  # fmt: skip


def proof(
    store: Store, identity: IdentityKeyPair, ek: bytes, reply: wire.MailboxAddress
) -> bytes | None:
    """What follows this device's answer to a session a contact's device opened (EK_A.pub
    ``ek``): its device hello bound to ``ek``, naming the mailbox it answered with."""
    hello = own_hello(store, identity, reply, ek)
    return None if hello is None else dv.encode_device_payload(hello)


def request_came(store: Store, request_id: int, ek: bytes | None) -> None:
    """A contact request stored (or replaced by a newer first contact of its identity): the
    EK_A.pub of a device's opening kept with it, else nothing (inside its transaction)."""
    eks = dict(store.get_setting(SETTING_REQUEST_EKS) or {})
    eks.pop(str(request_id), None)
    if ek is not None:
        eks[str(request_id)] = ek.hex()
    store.set_setting(SETTING_REQUEST_EKS, eks or None)


def request_ended(store: Store, request_id: int) -> bytes | None:
    """The request accepted or rejected: its opening's EK_A.pub, if it was a device's."""
    eks = dict(store.get_setting(SETTING_REQUEST_EKS) or {})
    ek = eks.pop(str(request_id), None)
    store.set_setting(SETTING_REQUEST_EKS, eks or None)
    return None if ek is None else bytes.fromhex(str(ek))
