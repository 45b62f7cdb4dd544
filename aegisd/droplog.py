"""Dropped incoming items and failures of a single message, call or transfer: counted
instead of logged one by one.

A log line per received block, message, call or transfer would, with the log's timestamps,
turn a seized disk into a diary of when this user was written to. So the services call
``dropped(why)`` for what they discard (a block that does not decrypt, signaling for no
call, a refused relay URL...), and one summary line is logged when the profile locks or the
daemon stops: how many, by reason, never which contact, mailbox or message.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("aegisd")

_counts: Counter[str] = Counter()


def dropped(why: str) -> None:
    """Count one discarded item; ``why`` is a fixed phrase (never data from the item)."""
    _counts[why] += 1


def pending() -> dict[str, int]:
    return dict(_counts)


def flush() -> None:
    """Log the counts since the last flush, in one line, and start again."""
    if not _counts:
        return
    detail = "; ".join(f"{why} ({n}x)" for why, n in sorted(_counts.items()))
    log.warning("since the unlock (counted, not logged one by one): %s", detail)
    _counts.clear()
