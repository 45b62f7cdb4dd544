"""Reading a passphrase from a file. Standard library only: the CLI imports it too."""

from __future__ import annotations

import sys


class SecretFileError(ValueError):
    """The file cannot give a passphrase; the message says why (never what it holds)."""


def read_first_line(name: str) -> str:
    """The first line of ``name`` ('-' is standard input), without its line ending."""
    try:
        if name == "-":
            text = sys.stdin.readline()
        else:
            with open(name, encoding="utf-8") as f:
                text = f.readline()
    except OSError as exc:
        raise SecretFileError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{name} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise SecretFileError(f"{name} holds no passphrase (its first line is empty)")
    return text
