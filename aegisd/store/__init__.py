"""The daemon's storage: an SQLCipher database whose random key is wrapped by a passphrase.

Public API::

    create_profile(home, passphrase, kdf=None) -> Store   # new keyring + new database
    Keyring.load(home / KEYRING_NAME).unlock(passphrase) -> key  (slow: Argon2id)
    Store.open(home / DB_NAME, key) -> Store

See keyring.py for the key at rest and db.py for the tables and methods. A feature's tables
have a module of their own (conversations.py, search.py, cover.py, attachments.py,
typing_state.py, ...): functions taking the Store, whose SQL goes through ``Store.query`` and
whose writes run inside ``store.transaction()``. Code outside this package calls those
functions and the Store's methods, never SQL.
"""

from __future__ import annotations

from pathlib import Path

from ..paths import DB_NAME, KEYRING_NAME, ensure_private_dir
from .db import Contact, Event, Message, OutboxItem, Store
from .errors import (
    KeyringError,
    NoPassphrase,
    NoProfile,
    ProfileExists,
    SchemaError,
    StoreError,
    WrongPassphrase,
)
from .keyring import DEFAULT_KDF, KdfParams, Keyring

__all__ = [
    "DEFAULT_KDF",
    "Contact",
    "Event",
    "KdfParams",
    "Keyring",
    "KeyringError",
    "Message",
    "NoPassphrase",
    "NoProfile",
    "OutboxItem",
    "ProfileExists",
    "SchemaError",
    "Store",
    "StoreError",
    "WrongPassphrase",
    "create_profile",
    "open_profile",
]


def create_profile(home: Path, passphrase: str | None, kdf: KdfParams | None = None) -> Store:
    """Create the profile directory (0700), its keyring and its empty database.

    ``passphrase=None`` is the explicit no-passphrase choice (key in the 0600 keyring file).
    Returns the open store; the caller closes it.
    """
    ensure_private_dir(home)
    if (home / KEYRING_NAME).exists() or (home / DB_NAME).exists():
        raise ProfileExists(f"a profile already exists in {home}")
    _keyring, key = Keyring.create(home / KEYRING_NAME, passphrase, kdf)
    try:
        return Store.open(home / DB_NAME, key, create=True)
    except BaseException:
        (home / KEYRING_NAME).unlink(missing_ok=True)
        for suffix in ("", "-wal", "-shm"):
            (home / (DB_NAME + suffix)).unlink(missing_ok=True)
        raise


def open_profile(home: Path, passphrase: str | None) -> Store:
    """Unlock and open an existing profile (synchronously; Argon2id makes this slow)."""
    if not (home / KEYRING_NAME).exists():
        raise NoProfile(f"no profile in {home}")
    key = Keyring.load(home / KEYRING_NAME).unlock(passphrase)
    return Store.open(home / DB_NAME, key)
