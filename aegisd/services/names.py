"""Display names chosen by someone else (a contact's hello, another own device's sync), made
safe to show. Shared by inbox.py and own_sync.py, which import each other's callers."""

from __future__ import annotations

import unicodedata


def clean_name(name: str, fallback: str = "new contact") -> str:
    """A display name chosen by someone else, made safe to show: no control, format (bidi
    override) or other invisible characters, at most 64 characters."""
    kept = "".join(
        ch for ch in name if not unicodedata.category(ch).startswith(("C", "Z")) or ch == " "
    )
    kept = " ".join(kept.split())[:64]
    return kept or fallback
