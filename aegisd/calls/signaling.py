"""Call signaling sealed under per-call ephemeral X25519 keys (docs/protocol.md §21).

Pure: no I/O, randomness injected. Each side makes a fresh key pair for one call; the public
halves travel in INVITE / ACCEPT (inside the ratchet). From then on OFFER, ANSWER, CANDIDATE and
HANGUP are sealed with NaCl crypto_box (X25519, XSalsa20-Poly1305) under the two per-call keys,
so what history, events or a later compromise of the ratchet state hold never opens a past
call's SDP. The secret key lives only in memory and is dropped at hangup (``erase``).

Sealed plaintext: version (1) || call_id (16) || sender (1: 1 caller, 2 callee) || seq (u32,
from 1, strictly increasing per sender) || kind (1) || data. A message whose seq is not above the
last accepted one is a replay. Both sides' boxes share one key (X25519 is symmetric), so the
sender byte is what stops a message from being reflected back to the side that sealed it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError, StateError
from aegisd.core.primitives import Entropy

SIG_VERSION = 1
SIG_OFFER = 1
SIG_ANSWER = 2
SIG_CANDIDATE = 3
SIG_HANGUP = 4
SIG_KINDS = (SIG_OFFER, SIG_ANSWER, SIG_CANDIDATE, SIG_HANGUP)
SIG_FROM_CALLER = 1
SIG_FROM_CALLEE = 2
MAX_SIG_DATA = wire.MAX_CALL_SEALED - 64  # room for the header and the box tag
_HEADER = struct.Struct(">B16sBIB")


class ReplayError(StateError):
    """A sealed signaling message whose sequence number was already passed."""


@dataclass(frozen=True)
class Signal:
    seq: int
    kind: int
    data: bytes


def new_call_key(entropy: Entropy) -> tuple[bytes, bytes]:
    """(secret, public) of a fresh per-call X25519 key pair."""
    secret = entropy.random(32)
    return secret, bytes(PrivateKey(secret).public_key)


def encode_signal(call_id: bytes, sender: int, seq: int, kind: int, data: bytes) -> bytes:
    if (
        kind not in SIG_KINDS
        or sender not in (SIG_FROM_CALLER, SIG_FROM_CALLEE)
        or len(data) > MAX_SIG_DATA
        or not 0 < seq < 2**32
    ):
        raise ValueError("bad signaling message")
    return _HEADER.pack(SIG_VERSION, call_id, sender, seq, kind) + data


def decode_signal(call_id: bytes, sender: int, plain: bytes) -> Signal:
    """``sender``: the side the message must come from (the peer's)."""
    if len(plain) < _HEADER.size:
        raise DecodeError("truncated signaling message")
    version, inner_id, inner_sender, seq, kind = _HEADER.unpack_from(plain)
    if version != SIG_VERSION or kind not in SIG_KINDS or seq == 0:
        raise DecodeError("malformed signaling message")
    if inner_sender not in (SIG_FROM_CALLER, SIG_FROM_CALLEE):
        raise DecodeError("malformed signaling message")
    if inner_id != call_id:  # sealed for another call: bound inside the box
        raise DecodeError("signaling message of another call")
    if inner_sender != sender:  # our own message, reflected back to us
        raise DecodeError("signaling message from the wrong side")
    data = plain[_HEADER.size :]
    if len(data) > MAX_SIG_DATA:
        raise DecodeError("signaling message too long")
    return Signal(seq, kind, data)


class CallChannel:
    """The sealed channel of one call, between our per-call secret and the peer's public key."""

    def __init__(
        self, call_id: bytes, own_secret: bytes, peer_public: bytes, *, caller: bool
    ) -> None:
        if len(call_id) != wire.CALL_ID_LEN or len(peer_public) != wire.CALL_KEY_LEN:
            raise ValueError("bad call id or key length")
        try:
            self._box: Box | None = Box(PrivateKey(own_secret), PublicKey(peer_public))
        except (CryptoError, ValueError, RuntimeError):
            # libsodium refuses a low-order public key (an all-zero shared secret).
            raise DecryptionError() from None
        self.call_id = call_id
        self._own = SIG_FROM_CALLER if caller else SIG_FROM_CALLEE
        self._peer = SIG_FROM_CALLEE if caller else SIG_FROM_CALLER
        self._send_seq = 0
        self._recv_seq = 0

    @property
    def open(self) -> bool:
        return self._box is not None

    def seal(self, entropy: Entropy, kind: int, data: bytes) -> wire.CallSealedPayload:
        if self._box is None:
            raise StateError("the call's keys are erased")
        self._send_seq += 1
        nonce = entropy.random(wire.CALL_NONCE_LEN)
        plain = encode_signal(self.call_id, self._own, self._send_seq, kind, data)
        box = self._box.encrypt(plain, nonce).ciphertext
        return wire.CallSealedPayload(self.call_id, nonce, bytes(box))

    def unseal(self, payload: wire.CallSealedPayload) -> Signal:
        """The message, or DecryptionError (one error for every failure to open), DecodeError
        (opened, malformed), ReplayError (an old sequence number). State changes only on
        success."""
        if self._box is None or payload.call_id != self.call_id:
            raise DecryptionError()
        try:
            plain = self._box.decrypt(payload.box, payload.nonce)
        except (CryptoError, ValueError, TypeError):
            raise DecryptionError() from None
        signal = decode_signal(self.call_id, self._peer, bytes(plain))
        if signal.seq <= self._recv_seq:
            raise ReplayError("replayed signaling message")
        self._recv_seq = signal.seq
        return signal

    def erase(self) -> None:
        """Forget the per-call keys (Python cannot wipe the bytes; nothing else refers to them,
        and they are never written to disk)."""
        self._box = None
