"""The one passphrase strength rule (aegisd/passphrase_strength.py, docs/backup.md §4)."""

from __future__ import annotations

import subprocess
import sys

from aegisd import passphrase_strength as strength

WEAK = (
    "x", "abc", "short", "aaaaaaaaaaaaaaaaaaaa", "abababababab", "123456789012",
    "1234567890123456", "password1234", "Password1234!", "qwertyuiop12", "abcdefghijkl",
    "passwordpassword", "iloveyou2024!", "asdfghjkl;'#", "Abcd1234Abcd1234",
    # Passed the hand-written estimator this rule replaced (59 and 79 "bits"):
    "Summer2024!!", "P@ssw0rd2024!",
    # Long, but weak at its start (only the first 72 characters are estimated).
    "a" * 500,
)  # fmt: skip
STRONG = (
    "correct horse battery staple", "Tr0ub4dor&3xyz", "ünïcödé pässwörd",
    "purple monkey dishwasher", "wobble quintet marrow dune", "tr0ub4dor & 3",
)  # fmt: skip


def test_weak_passphrases_are_refused_with_short_advice_that_never_quotes_them() -> None:
    for weak in WEAK:
        problem = strength.problem(weak)
        assert problem is not None and problem.startswith("the passphrase is too weak")
        assert "10^12" in problem and strength.ADVICE in problem
        assert len(weak) < 4 or weak not in problem  # ("x" is in any sentence)
        assert len(problem) < 240 and "\n" not in problem  # one or two terminal lines
        assert strength.is_weak(weak)


def test_strong_passphrases_pass() -> None:
    for strong in STRONG:
        assert strength.problem(strong) is None, strong
        assert strength.guesses_log10(strong) >= strength.MIN_GUESSES_LOG10


def test_empty_is_refused() -> None:
    assert strength.problem("") is not None


def test_importing_the_rule_loads_no_dictionary() -> None:
    # The CLI imports this module; zxcvbn's dictionaries load only when a passphrase is judged.
    code = (
        "import sys, aegisd.passphrase_strength\n"
        "assert 'zxcvbn' not in sys.modules\n"
        "aegisd.passphrase_strength.problem('x')\n"
        "assert 'zxcvbn' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
