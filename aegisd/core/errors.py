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


class GroupError(ProtocolError):
    """A group change, base or message is refused; the group's state is unchanged."""


class UnknownGroup(GroupError):
    """The change names a group ID this member does not hold."""


class ForgedChange(GroupError):
    """A signature (of a change, a signed base or an added identity's binding) does not verify."""


class ReplayedChange(GroupError):
    """The change is already known, or applies to a version that is final."""


class NotAMember(GroupError):
    """The author is not a member of the state the change applies to (removed, or never one)."""


class NotPermitted(GroupError):
    """The author's role in the state the change applies to does not allow the change."""


class GroupFull(GroupError):
    """The change would take the group over MAX_GROUP_MEMBERS."""


class LastOwner(GroupError):
    """The change would leave other members without an owner."""


class InvalidChange(GroupError):
    """The change does not fit the state (target not a member, already one, nothing changes)."""


class OutOfWindow(GroupError):
    """The change's parent is unknown and it cannot be held back (too far ahead, or too many)."""
