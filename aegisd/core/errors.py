"""The one error hierarchy of the protocol core.

No exception message ever carries key material, plaintext or a value derived from either.
Every failure to open a received block is the same `DecryptionError` with the same text, so a
caller (or anything that observes a caller) learns nothing about *why* it failed.
"""

from __future__ import annotations


class AegisError(Exception):
    """Base of every error AegisLink raises on purpose."""


class ProtocolError(AegisError):
    """Something about protocol data or protocol state is wrong."""


class DecodeError(ProtocolError):
    """Bytes do not parse as the expected wire format (length, version, tag or range)."""


class UnsupportedVersion(DecodeError):
    """The leading version byte names a format version this implementation does not speak."""


class DecryptionError(ProtocolError):
    """A received block could not be opened. Deliberately uninformative."""

    def __init__(self) -> None:
        super().__init__("block could not be decrypted")


class BundleError(ProtocolError):
    """A prekey bundle failed verification (signature or identity mismatch)."""


class StateError(ProtocolError):
    """The operation is not possible in the current state (e.g. content too large for a block)."""
