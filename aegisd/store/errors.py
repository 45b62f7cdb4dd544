"""Errors of the store. No message carries a key, a passphrase or stored content."""

from __future__ import annotations

from aegisd.core.errors import AegisError  # the one hierarchy; errors.py imports no crypto


class StoreError(AegisError):
    """Base of every error the store raises on purpose."""


class WrongPassphrase(StoreError):
    """The passphrase does not unwrap the database key. Deliberately uninformative."""

    def __init__(self) -> None:
        super().__init__("wrong passphrase")


class ProfileExists(StoreError):
    """``create`` was asked to overwrite an existing profile."""


class NoProfile(StoreError):
    """There is no profile (no keyring file) in the given directory."""


class KeyringError(StoreError):
    """The keyring file is unreadable, of an unknown version, or has unsafe permissions."""


class NoPassphrase(StoreError):
    """A passphrase operation on a profile that keeps its key in a key file."""


class SchemaError(StoreError):
    """The database schema is newer than this code knows, or a migration failed."""
