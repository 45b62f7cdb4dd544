"""The one strength rule for every passphrase a user chooses: the profile's (``aegis init``,
``passphrase.change``) and a backup's (``backup.export``). docs/backup.md §4 justifies it.

The estimate is zxcvbn's (the maintained port of Dropbox's estimator: dictionaries of common
passwords, names and words, keyboard patterns, sequences, repeats, dates, l33t substitutions).
A passphrase must need at least ``10**MIN_GUESSES_LOG10`` guesses by its estimate. Both the
daemon (which enforces it) and the CLI (which checks before it asks for the confirmation)
call ``problem()``; zxcvbn is imported on the first call only, because its dictionaries take
time and memory that commands choosing no passphrase should not pay. Nothing here imports
cryptography, a database or the network: the CLI may import this module.
"""

from __future__ import annotations

import math
from typing import Any

#: The bar, as log10 of zxcvbn's guess estimate: 10**12 guesses (about 40 bits). An offline
#: attacker pays one Argon2id run per guess (64 MiB, 3 passes by default: 0.17 s on two cores
#: of a 2020s machine); at zxcvbn's "slow hash" rate of 10**4 guesses per second, 10**12
#: guesses take three years. See docs/backup.md §4.
MIN_GUESSES_LOG10 = 12

#: zxcvbn's matching is quadratic in the length; it refuses more than this many characters.
#: Only this prefix is estimated (a longer passphrase whose start is weak is refused).
MAX_ESTIMATED_CHARS = 72

#: Words that an attacker targeting AegisLink users tries first.
USER_INPUTS = ("aegis", "aegislink", "aegisd", "backup", "passphrase", "messenger", "relay")

RULE = f"at least 10^{MIN_GUESSES_LOG10} guesses as estimated by zxcvbn"
ADVICE = "Four or five random words are enough."


def _estimate(passphrase: str) -> dict[str, Any]:
    from zxcvbn import zxcvbn  # lazily: see the module's docstring

    result: dict[str, Any] = zxcvbn(passphrase[:MAX_ESTIMATED_CHARS], user_inputs=USER_INPUTS)
    return result


def guesses_log10(passphrase: str) -> float:
    """log10 of the number of guesses zxcvbn estimates the passphrase needs."""
    return math.log10(max(1.0, float(_estimate(passphrase)["guesses"])))


def problem(passphrase: str) -> str | None:
    """Why the passphrase is too weak (one or two short sentences), or None if it is strong
    enough. The text never quotes the passphrase: zxcvbn's feedback is fixed sentences."""
    if not passphrase:
        return "the passphrase must not be empty"
    result = _estimate(passphrase)
    exponent = math.log10(max(1.0, float(result["guesses"])))
    if exponent >= MIN_GUESSES_LOG10:
        return None
    feedback = result.get("feedback") or {}
    # zxcvbn's warning, else its first suggestion: one short sentence, never the input.
    hint = str(feedback.get("warning") or "").strip() or next(
        (str(s).strip() for s in feedback.get("suggestions", []) if str(s).strip()), ""
    )
    return (
        f"the passphrase is too weak: {hint + ' ' if hint else ''}{ADVICE} (zxcvbn estimates "
        f"about 10^{int(exponent)} guesses; at least 10^{MIN_GUESSES_LOG10} are needed)"
    )

def is_weak(passphrase: str) -> bool:
    return problem(passphrase) is not None
