"""The database key and how it is kept at rest.

The SQLCipher database is encrypted under a random 32-byte key. That key is never derived from
the passphrase directly; it is *wrapped*: AES-256-GCM under a key-encryption key derived from
the passphrase with Argon2id. Changing the passphrase re-wraps the same database key, so the
database itself is not re-encrypted. A profile that explicitly chose no passphrase keeps the
raw key in the keyring file instead, and relies on the file's 0600 mode.

Keyring file (JSON, mode 0600), version 1::

    {"format": "aegis-keyring", "version": 1, "protection": "passphrase",
     "kdf": {"name": "argon2id", "argon2_version": 19, "memory_kib": 65536,
             "time_cost": 3, "parallelism": 4, "salt": "<base64, 16 bytes>"},
     "cipher": "aes-256-gcm", "nonce": "<base64, 12 bytes>",
     "wrapped_key": "<base64, 32 + 16 bytes>"}

    {"format": "aegis-keyring", "version": 1, "protection": "none", "key": "<hex, 32 bytes>"}

The associated data of the AEAD is the canonical JSON of every field except nonce and
wrapped_key, so the KDF parameters cannot be altered (weakened) without detection.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2.low_level import ARGON2_VERSION, Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import KeyringError, NoPassphrase, ProfileExists, WrongPassphrase

KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 12
FORMAT = "aegis-keyring"
VERSION = 1


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters; stored beside the wrapped key."""

    memory_kib: int = 64 * 1024
    time_cost: int = 3
    parallelism: int = 4

    def __post_init__(self) -> None:
        if self.parallelism < 1 or self.time_cost < 1 or self.memory_kib < 8 * self.parallelism:
            raise ValueError("invalid Argon2id parameters")


#: The default for new passphrases: 64 MiB, 3 passes, 4 lanes (RFC 9106's second choice).
DEFAULT_KDF = KdfParams()


def normalize_passphrase(passphrase: str) -> bytes:
    """NFC-normalise and encode, so the same passphrase typed on any system unwraps the key."""
    if not isinstance(passphrase, str) or passphrase == "":
        raise ValueError("the passphrase must be a non-empty string")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _derive(passphrase: str, salt: bytes, kdf: KdfParams) -> bytes:
    return hash_secret_raw(
        secret=normalize_passphrase(passphrase),
        salt=salt,
        time_cost=kdf.time_cost,
        memory_cost=kdf.memory_kib,
        parallelism=kdf.parallelism,
        hash_len=KEY_BYTES,
        type=Type.ID,
        version=ARGON2_VERSION,
    )


def _aad(doc: dict[str, Any]) -> bytes:
    header = {k: v for k, v in doc.items() if k not in ("nonce", "wrapped_key")}
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _wrap(key: bytes, passphrase: str, kdf: KdfParams) -> dict[str, Any]:
    salt = secrets.token_bytes(SALT_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "protection": "passphrase",
        "kdf": {
            "name": "argon2id",
            "argon2_version": ARGON2_VERSION,
            "memory_kib": kdf.memory_kib,
            "time_cost": kdf.time_cost,
            "parallelism": kdf.parallelism,
            "salt": base64.b64encode(salt).decode(),
        },
        "cipher": "aes-256-gcm",
    }
    kek = _derive(passphrase, salt, kdf)
    wrapped = AESGCM(kek).encrypt(nonce, key, _aad(doc))
    doc["nonce"] = base64.b64encode(nonce).decode()
    doc["wrapped_key"] = base64.b64encode(wrapped).decode()
    return doc


def _plain(key: bytes) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "protection": "none", "key": key.hex()}


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` with mode 0600: temp file, fsync, rename, fsync directory."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Keyring:
    """The keyring file of one profile: wraps, unwraps and re-wraps the database key."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self._doc = doc

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: Path, passphrase: str | None, kdf: KdfParams | None = None
    ) -> tuple[Keyring, bytes]:
        """Make a new random database key and keep it under ``passphrase``.

        ``passphrase=None`` is the explicit no-passphrase choice: the key goes in the 0600
        keyring file. Returns the keyring and the new database key.
        """
        if path.exists():
            raise ProfileExists(f"a profile already exists in {path.parent}")
        key = secrets.token_bytes(KEY_BYTES)
        doc = _plain(key) if passphrase is None else _wrap(key, passphrase, kdf or DEFAULT_KDF)
        _write_atomic(path, doc)
        return cls(path, doc), key

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            st = path.stat()
            raw = path.read_bytes()
        except FileNotFoundError:
            raise KeyringError(f"no keyring file in {path.parent}") from None
        except OSError as exc:
            raise KeyringError(f"cannot read the keyring file: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyringError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
                "(fix with: chmod 600 on it)"
            )
        try:
            doc = json.loads(raw)
        except ValueError:
            raise KeyringError("the keyring file is not valid JSON") from None
        cls._validate(doc)
        return cls(path, doc)

    @staticmethod
    def _validate(doc: Any) -> None:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise KeyringError("the keyring file is not an AegisLink keyring")
        if doc.get("version") != VERSION:
            raise KeyringError(f"unsupported keyring version {doc.get('version')!r}")
        prot = doc.get("protection")
        if prot == "none":
            if not isinstance(doc.get("key"), str) or len(doc["key"]) != 2 * KEY_BYTES:
                raise KeyringError("the keyring file is damaged (key)")
        elif prot == "passphrase":
            kdf = doc.get("kdf")
            if (
                not isinstance(kdf, dict)
                or kdf.get("name") != "argon2id"
                or doc.get("cipher") != "aes-256-gcm"
                or not all(isinstance(kdf.get(k), int) for k in _KDF_INT_FIELDS)
                or not all(isinstance(doc.get(k), str) for k in ("nonce", "wrapped_key"))
                or not isinstance(kdf.get("salt"), str)
            ):
                raise KeyringError("the keyring file is damaged (kdf or cipher)")
        else:
            raise KeyringError("the keyring file is damaged (protection)")

    # -- use ----------------------------------------------------------------------------

    @property
    def has_passphrase(self) -> bool:
        return bool(self._doc["protection"] == "passphrase")

    @property
    def kdf_params(self) -> KdfParams | None:
        if not self.has_passphrase:
            return None
        k = self._doc["kdf"]
        return KdfParams(k["memory_kib"], k["time_cost"], k["parallelism"])

    def unlock(self, passphrase: str | None) -> bytes:
        """Return the database key. Slow by design (Argon2id): run it off the event loop.

        Raises WrongPassphrase for any passphrase that does not unwrap the key, and
        NoPassphrase when a passphrase is given to a profile without one (or vice versa).
        """
        doc = self._doc
        if not self.has_passphrase:
            if passphrase is not None:
                raise NoPassphrase("this profile has no passphrase")
            return bytes.fromhex(doc["key"])
        if passphrase is None:
            raise NoPassphrase("this profile needs a passphrase")
        kdf = doc["kdf"]
        if kdf["argon2_version"] != ARGON2_VERSION:
            raise KeyringError("unsupported Argon2 version in the keyring file")
        try:
            params = KdfParams(kdf["memory_kib"], kdf["time_cost"], kdf["parallelism"])
            salt = base64.b64decode(kdf["salt"], validate=True)
            nonce = base64.b64decode(doc["nonce"], validate=True)
            wrapped = base64.b64decode(doc["wrapped_key"], validate=True)
        except ValueError:
            raise KeyringError("the keyring file is damaged (encoding)") from None
        kek = _derive(passphrase, salt, params)
        try:
            key = AESGCM(kek).decrypt(nonce, wrapped, _aad(doc))
        except InvalidTag:
            raise WrongPassphrase() from None
        if len(key) != KEY_BYTES:
            raise KeyringError("the keyring file is damaged (key length)")
        return key

    def change_passphrase(
        self, old: str | None, new: str | None, kdf: KdfParams | None = None
    ) -> None:
        """Re-wrap the database key: under ``new``, or (``new=None``) into the key file.

        ``old`` must unwrap the current key (None for a profile without a passphrase).
        The keyring file is replaced atomically; the database is untouched.
        """
        if new is not None:
            normalize_passphrase(new)  # reject an empty one before the slow unwrap
        key = self.unlock(old)
        doc = _plain(key) if new is None else _wrap(key, new, kdf or DEFAULT_KDF)
        _write_atomic(self.path, doc)
        self._doc = doc


_KDF_INT_FIELDS = ("argon2_version", "memory_kib", "time_cost", "parallelism")
