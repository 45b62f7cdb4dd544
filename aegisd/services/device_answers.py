"""Proven answers (docs/devices.md §5.2, docs/protocol.md §28.4): a session this device opened
with a contact's listed device is deposited to only once that device proved its device key in
it, not on the strength of its answer alone.

Why: the opener fetched the device's bundle from the relay, and a bundle is signed by the
identity, not by the device. A removed device still holds the identity key; with a relay that
serves its bundle at a listed device's bundle address and hands it the first contact, it could
answer in that device's place and receive everything sent to that device. So the answering
device follows its answer (a hello, 0x03) with a device hello (0x41) bound to the opener's
EK_A.pub, signed by its device key, which the opener checks under the list it holds. A removed
device holds no listed device key.

The opener keeps, per contact and device (in the store, so a restart between the two loses
nothing): the EK_A.pub of the sessions it opened with that device (the current one and those a
reopening superseded, at most REOPENS + 1), the answer's mailbox while the proof has not come,
and a proof that came before the answer. All of it is dropped with the device's session.
Nothing here logs a device ID or a contact.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.store import Store
from aegisd.store.devices import SETTING_KEY, SETTING_OWN_LIST, SETTING_SELF

from .mailbox import address_from_bytes, address_to_bytes

#: {contact id: {device hex: [EK_A.pub hex, ...]}}: the sessions this device opened with it.
SETTING_OPENED_EKS = "devices.opened_eks"
#: {contact id: {device hex: mailbox address hex}}: answers whose proof has not come yet.
SETTING_UNPROVEN = "devices.answers_unproven"
#: {contact id: [device hex, ...]}: proofs that came before their answer.
SETTING_PROVEN = "devices.answers_proven"
#: Sessions opened with one device whose EK_A.pub is kept (the current one and the superseded).
MAX_EKS = 4
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


def opened(store: Store, contact_id: int, device_id: bytes, ek: bytes) -> None:
    """This device opened a session with ``device_id`` whose EK_A.pub is ``ek`` (inside the
    opening's transaction): an earlier answer or proof was for an earlier session."""
    eks = _map(store, SETTING_OPENED_EKS, contact_id)
    key = device_id.hex()
    eks[key] = ([e for e in eks.get(key, []) if e != ek.hex()] + [ek.hex()])[-MAX_EKS:]
    _put(store, SETTING_OPENED_EKS, contact_id, eks)
    unproven = _map(store, SETTING_UNPROVEN, contact_id)
    unproven.pop(key, None)
    _put(store, SETTING_UNPROVEN, contact_id, unproven)
    proven = [d for d in _ids(store, SETTING_PROVEN, contact_id) if d != key]
    _put(store, SETTING_PROVEN, contact_id, proven)


def forget(store: Store, contact_id: int, keep: AbstractSet[bytes] | None = None) -> None:
    """Drop what is kept for the contact's devices not in ``keep`` (all of them for None)."""
    names = {d.hex() for d in keep or set()}
    for name in (SETTING_OPENED_EKS, SETTING_UNPROVEN):
        items = _map(store, name, contact_id)
        _put(store, name, contact_id, {k: v for k, v in items.items() if k in names})
    proven = [d for d in _ids(store, SETTING_PROVEN, contact_id) if d in names]
    _put(store, SETTING_PROVEN, contact_id, proven)


def answer_came(
    store: Store, contact_id: int, device_id: bytes, reply: wire.MailboxAddress
) -> wire.MailboxAddress | None:
    """The device's answer (its mailbox) came: returned when its proof came already (the
    answer is taken), else kept until the proof comes (None)."""
    key = device_id.hex()
    proven = _ids(store, SETTING_PROVEN, contact_id)
    if key in proven:
        _put(store, SETTING_PROVEN, contact_id, [d for d in proven if d != key])
        return reply
    unproven = _map(store, SETTING_UNPROVEN, contact_id)
    unproven[key] = address_to_bytes(reply).hex()
    _put(store, SETTING_UNPROVEN, contact_id, unproven)
    return None


def proof_came(
    store: Store, contact_id: int, identity: PublicIdentity, listed: dv.DeviceList,
    device_id: bytes, hello: dv.DeviceHello,
) -> wire.MailboxAddress | None:  # fmt: skip
    """A device hello naming ``device_id`` in that device's session. A proof of a session this
    device opened with it: the answer kept for it, now taken (returned), or None when the
    answer has not come (the proof is kept for it). Anything else (a hello bound to no session,
    as a list's signer sends): None, nothing kept."""
    eks = _map(store, SETTING_OPENED_EKS, contact_id)
    for ek in eks.get(device_id.hex(), []):
        try:
            entry = hello.check(identity, listed, bytes.fromhex(str(ek)))
        except (dv.UnlistedDevice, dv.ForgedDeviceProof):
            continue
        if entry.device_id == device_id:
            break
    else:
        return None
    key = device_id.hex()
    unproven = _map(store, SETTING_UNPROVEN, contact_id)
    kept = unproven.pop(key, None)
    _put(store, SETTING_UNPROVEN, contact_id, unproven)
    if kept is None:
        proven = [d for d in _ids(store, SETTING_PROVEN, contact_id) if d != key] + [key]
        _put(store, SETTING_PROVEN, contact_id, proven)
        return None
    return address_from_bytes(bytes.fromhex(str(kept)))


def proof(
    store: Store, identity: IdentityKeyPair, ek: bytes, reply: wire.MailboxAddress
) -> bytes | None:
    """What follows this device's answer to a session a contact's device opened (EK_A.pub
    ``ek``): its device hello bound to ``ek``, naming the mailbox it answered with. None
    without a list of its own (a device no list names is opened with by no one)."""
    own, me, key = (store.get_setting(n) for n in (SETTING_OWN_LIST, SETTING_SELF, SETTING_KEY))
    if own is None or me is None or key is None:
        return None
    version = dv.DeviceList.from_bytes(bytes.fromhex(str(own))).version
    hello = dv.DeviceHello.sign(bytes.fromhex(str(key)), identity.public, bytes.fromhex(str(me)),
                                reply, version, ek)  # fmt: skip
    return dv.encode_device_payload(hello)


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
