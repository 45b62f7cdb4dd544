"""The Double Ratchet with header encryption (Signal's specification, section 4), with a
post-quantum step: every DH ratchet step also carries a fresh ML-KEM-768 encapsulation key and a
ciphertext to the peer's previous one, and the root KDF mixes both secrets.

    KDF_RK(rk, dh_out || kem_ss) = HKDF-SHA256(salt=rk, ikm, info="AegisLink_v1_ratchet", 96)
                                   -> (rk', ck, next_header_key)
    KDF_CK(ck) = (HMAC-SHA256(ck, 0x02) -> ck', HMAC-SHA256(ck, 0x01) -> mk)

The message key is the AES-256-GCM key of exactly one body, so the body nonce is all zero.
Header keys encrypt many headers, so each header has a fresh random 96-bit nonce.

Receiving is transactional: everything is computed in locals and the state is written only after
the body authenticated, so a forged, replayed or truncated message changes nothing.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from . import wire
from .errors import DecodeError, DecryptionError, StateError
from .primitives import Entropy

MAX_SKIP = 2000  # per chain: keys one header may skip, and skipped keys kept (oldest evicted)
MAX_SKIPPED_TOTAL = 5000  # stored skipped keys, all chains together; the oldest are evicted
SESSION_INFO = b"AegisLink_v1_session_keys"
RATCHET_INFO = b"AegisLink_v1_ratchet"
_ZERO_SALT = bytes(32)
_MAX_COUNTER = 0xFFFFFFFF


def derive_session_keys(sk: bytes) -> tuple[bytes, bytes, bytes]:
    """SK -> (initial root key, initiator's header key HKA, responder's next header key NHKB)."""
    out = p.hkdf(sk, _ZERO_SALT, SESSION_INFO, 96)
    return out[:32], out[32:64], out[64:]


def kdf_rk(rk: bytes, ikm: bytes) -> tuple[bytes, bytes, bytes]:
    out = p.hkdf(ikm, rk, RATCHET_INFO, 96)
    return out[:32], out[32:64], out[64:]


def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    """(next chain key, message key)."""
    return p.hmac_sha256(ck, b"\x02"), p.hmac_sha256(ck, b"\x01")


def _parse_header(plaintext: bytes) -> wire.RatchetHeader:
    try:
        return wire.RatchetHeader.from_bytes(plaintext)
    except DecodeError:
        raise DecryptionError() from None


class Ratchet:
    __slots__ = (
        "_hkr_cipher",
        "_hks_cipher",
        "_send_prefix",
        "_skipped_total",
        "dh_remote",
        "dh_self",
        "hk_recv",
        "hk_send",
        "kem_ct_out",
        "kem_self",
        "nhk_recv",
        "nhk_send",
        "prev_n",
        "recv_ck",
        "recv_n",
        "root_key",
        "send_ck",
        "send_n",
        "skipped",
    )

    def __init__(
        self,
        root_key: bytes,
        dh_self: X25519PrivateKey,
        dh_remote: bytes | None = None,
        kem_self: MLKEM768PrivateKey | None = None,
        kem_ct_out: bytes | None = None,
        send_ck: bytes | None = None,
        recv_ck: bytes | None = None,
        send_n: int = 0,
        recv_n: int = 0,
        prev_n: int = 0,
        hk_send: bytes | None = None,
        hk_recv: bytes | None = None,
        nhk_send: bytes | None = None,
        nhk_recv: bytes | None = None,
        skipped: dict[bytes, dict[int, bytes]] | None = None,
    ) -> None:
        self.root_key = root_key
        self.dh_self = dh_self
        self.dh_remote = dh_remote
        self.kem_self = kem_self
        self.kem_ct_out = kem_ct_out
        self.send_ck = send_ck
        self.recv_ck = recv_ck
        self.send_n = send_n
        self.recv_n = recv_n
        self.prev_n = prev_n
        self.hk_send = hk_send
        self.hk_recv = hk_recv
        self.nhk_send = nhk_send
        self.nhk_recv = nhk_recv
        self.skipped = skipped if skipped is not None else {}
        self._skipped_total = sum(len(v) for v in self.skipped.values())
        self._refresh_caches()

    def _refresh_caches(self) -> None:
        # Per-chain constants, so that a message in a running chain costs no key setup.
        self._hks_cipher = p.aead(self.hk_send) if self.hk_send is not None else None
        self._hkr_cipher = p.aead(self.hk_recv) if self.hk_recv is not None else None
        if self.kem_self is not None:
            self._send_prefix = wire.header_prefix(
                p.x25519_public(self.dh_self), p.mlkem_ek(self.kem_self), self.kem_ct_out
            )
        else:
            self._send_prefix = b""

    # --- initialisation (RatchetInitAliceHE / RatchetInitBobHE) -------------------------------

    @classmethod
    def init_initiator(cls, entropy: Entropy, sk: bytes, responder_dh_pub: bytes) -> Ratchet:
        rk, hka, nhkb = derive_session_keys(sk)
        dh_self = entropy.x25519_private()
        kem_self = entropy.mlkem_private()
        # The first chain has no KEM ciphertext: the responder has no ratchet KEM key yet (the
        # handshake's KEM secret already protects it).
        rk, cks, nhks = kdf_rk(rk, p.dh(dh_self, responder_dh_pub))
        return cls(
            rk, dh_self, dh_remote=responder_dh_pub, kem_self=kem_self, send_ck=cks,
            hk_send=hka, nhk_send=nhks, nhk_recv=nhkb,
        )  # fmt: skip

    @classmethod
    def init_responder(cls, sk: bytes, signed_prekey: X25519PrivateKey) -> Ratchet:
        rk, hka, nhkb = derive_session_keys(sk)
        return cls(rk, signed_prekey, nhk_send=nhkb, nhk_recv=hka)

    # --- sending ------------------------------------------------------------------------------

    def encrypt(self, entropy: Entropy, body: bytes, ad: bytes) -> bytes:
        """enc_header || body ciphertext. `ad` authenticates both (session AD || version)."""
        ck, cipher = self.send_ck, self._hks_cipher
        if ck is None or cipher is None:
            raise StateError("this session cannot send before it has received")
        if self.send_n >= _MAX_COUNTER:
            raise StateError("sending chain exhausted")
        self.send_ck, mk = kdf_ck(ck)
        nonce = entropy.random(wire.NONCE_LEN)
        header = self._send_prefix + wire.pack_counters(self.prev_n, self.send_n)
        enc_header = nonce + cipher.encrypt(nonce, header, ad)
        self.send_n += 1
        return enc_header + p.seal_once(mk, body, ad + enc_header)

    # --- receiving ----------------------------------------------------------------------------

    def decrypt(self, entropy: Entropy, message: bytes, ad: bytes) -> bytes:
        if len(message) < wire.ENC_HEADER_LEN + wire.TAG_LEN:
            raise DecryptionError()
        enc_header = message[: wire.ENC_HEADER_LEN]
        body = message[wire.ENC_HEADER_LEN :]
        nonce, header_ct = enc_header[: wire.NONCE_LEN], enc_header[wire.NONCE_LEN :]
        body_ad = ad + enc_header

        # The current receiving chain first (the common case), then older chains' skipped keys,
        # then the next header key (a new chain). Header keys are unique per chain, so the order
        # changes cost, not outcome.
        hk_recv = self.hk_recv
        if hk_recv is not None and self._hkr_cipher is not None:
            pt = p.open_with(self._hkr_cipher, nonce, header_ct, ad)
            if pt is not None:
                header = _parse_header(pt)
                keys = self.skipped.get(hk_recv)
                if keys is not None and header.n in keys:
                    return self._receive_skipped(hk_recv, keys, header.n, body, body_ad)
                return self._receive_in_chain(header, body, body_ad)

        for hk, keys in self.skipped.items():
            if hk == hk_recv:
                continue
            pt = p.open_with(p.aead(hk), nonce, header_ct, ad)
            if pt is not None:
                return self._receive_skipped(hk, keys, _parse_header(pt).n, body, body_ad)

        if self.nhk_recv is not None:
            pt = p.open_with(p.aead(self.nhk_recv), nonce, header_ct, ad)
            if pt is not None:
                return self._receive_new_chain(entropy, _parse_header(pt), body, body_ad)

        raise DecryptionError()

    def _receive_skipped(
        self, hk: bytes, keys: dict[int, bytes], n: int, body: bytes, body_ad: bytes
    ) -> bytes:
        mk = keys.get(n)
        if mk is None:
            raise DecryptionError()
        plaintext = p.open_once(mk, body, body_ad)
        del keys[n]
        if not keys:
            del self.skipped[hk]
        self._skipped_total -= 1
        return plaintext

    def _receive_in_chain(self, header: wire.RatchetHeader, body: bytes, body_ad: bytes) -> bytes:
        recv_ck, hk_recv = self.recv_ck, self.hk_recv
        if (
            recv_ck is None
            or hk_recv is None
            or self.dh_remote is None
            or not p.constant_time_equal(header.dh_pub, self.dh_remote)
            or header.n < self.recv_n  # already received: a duplicate or a replay
            or header.n - self.recv_n > MAX_SKIP
        ):
            raise DecryptionError()
        ck, skipped = _skip(recv_ck, self.recv_n, header.n)
        ck, mk = kdf_ck(ck)
        plaintext = p.open_once(mk, body, body_ad)
        self.recv_ck, self.recv_n = ck, header.n + 1
        self._store_skipped(hk_recv, skipped)
        return plaintext

    def _receive_new_chain(
        self, entropy: Entropy, header: wire.RatchetHeader, body: bytes, body_ad: bytes
    ) -> bytes:
        # Keys left in the current receiving chain, up to the peer's previous chain length.
        old_skipped: dict[int, bytes] = {}
        if self.recv_ck is not None:
            if header.prev_n > self.recv_n + MAX_SKIP:
                raise DecryptionError()
            _, old_skipped = _skip(self.recv_ck, self.recv_n, header.prev_n)
        if header.n > MAX_SKIP:
            raise DecryptionError()
        # The KEM ciphertext must be present exactly when we have offered an encapsulation key.
        if self.kem_self is None:
            if header.kem_ct is not None:
                raise DecryptionError()
            kem_in = b""
        else:
            if header.kem_ct is None:
                raise DecryptionError()
            kem_in = p.mlkem_decapsulate(self.kem_self, header.kem_ct)
        rk, ckr, nhkr = kdf_rk(self.root_key, p.dh(self.dh_self, header.dh_pub) + kem_in)
        ckr, new_skipped = _skip(ckr, 0, header.n)
        ckr, mk = kdf_ck(ckr)
        plaintext = p.open_once(mk, body, body_ad)

        # Authenticated: now take our own sending step and commit everything.
        new_dh = entropy.x25519_private()
        new_kem = entropy.mlkem_private()
        kem_out, kem_ct = entropy.encapsulate(p.mlkem_load_ek(header.kem_ek))
        rk, cks, nhks = kdf_rk(rk, p.dh(new_dh, header.dh_pub) + kem_out)

        if self.hk_recv is not None:
            self._store_skipped(self.hk_recv, old_skipped)
        new_hk_recv = self.nhk_recv
        assert new_hk_recv is not None
        self._store_skipped(new_hk_recv, new_skipped)
        self.prev_n, self.send_n, self.recv_n = self.send_n, 0, header.n + 1
        self.hk_send, self.hk_recv = self.nhk_send, new_hk_recv
        self.nhk_send, self.nhk_recv = nhks, nhkr
        self.root_key, self.send_ck, self.recv_ck = rk, cks, ckr
        self.dh_remote, self.dh_self = header.dh_pub, new_dh
        self.kem_self, self.kem_ct_out = new_kem, kem_ct
        self._refresh_caches()
        return plaintext

    def _store_skipped(self, hk: bytes, keys: dict[int, bytes]) -> None:
        if not keys:
            return
        chain = self.skipped.setdefault(hk, {})
        before = len(chain)
        chain.update(keys)
        while len(chain) > MAX_SKIP:
            del chain[next(iter(chain))]
        self._skipped_total += len(chain) - before
        while self._skipped_total > MAX_SKIPPED_TOTAL:
            oldest_hk = next(iter(self.skipped))
            chain = self.skipped[oldest_hk]
            del chain[next(iter(chain))]
            if not chain:
                del self.skipped[oldest_hk]
            self._skipped_total -= 1

    # --- persistence --------------------------------------------------------------------------

    def to_record(self) -> wire.RatchetStateRecord:
        return wire.RatchetStateRecord(
            root_key=self.root_key,
            dh_self_priv=p.x25519_private_raw(self.dh_self),
            dh_remote=self.dh_remote,
            kem_self_seed=p.mlkem_seed(self.kem_self) if self.kem_self is not None else None,
            kem_ct_out=self.kem_ct_out,
            send_ck=self.send_ck,
            recv_ck=self.recv_ck,
            send_n=self.send_n,
            recv_n=self.recv_n,
            prev_n=self.prev_n,
            hk_send=self.hk_send,
            hk_recv=self.hk_recv,
            nhk_send=self.nhk_send,
            nhk_recv=self.nhk_recv,
            skipped={hk: dict(keys) for hk, keys in self.skipped.items()},
        )

    @classmethod
    def from_record(cls, r: wire.RatchetStateRecord) -> Ratchet:
        return cls(
            r.root_key,
            p.x25519_from_private(r.dh_self_priv),
            dh_remote=r.dh_remote,
            kem_self=p.mlkem_from_seed(r.kem_self_seed) if r.kem_self_seed is not None else None,
            kem_ct_out=r.kem_ct_out,
            send_ck=r.send_ck,
            recv_ck=r.recv_ck,
            send_n=r.send_n,
            recv_n=r.recv_n,
            prev_n=r.prev_n,
            hk_send=r.hk_send,
            hk_recv=r.hk_recv,
            nhk_send=r.nhk_send,
            nhk_recv=r.nhk_recv,
            skipped={hk: dict(keys) for hk, keys in r.skipped.items()},
        )

    def __repr__(self) -> str:
        return f"Ratchet(send_n={self.send_n}, recv_n={self.recv_n}, <keys hidden>)"


def _skip(ck: bytes, start: int, until: int) -> tuple[bytes, dict[int, bytes]]:
    """Advance a chain from `start` to `until`, returning the message keys passed over."""
    keys: dict[int, bytes] = {}
    for n in range(start, until):
        ck, keys[n] = kdf_ck(ck)
    return ck, keys
