"""What the aegis CLI says when something fails: one JSON shape, in the user's words.

Every error the CLI reports, the daemon's and its own, is a JSON-RPC 2.0 error object
(docs/api.md, "Errors"): ``{"code": int, "message": str, "data": {"error": name, ...}}``.
With ``--json`` the CLI prints ``{"error": OBJECT}`` on stdout; without, ``aegis: error:
MESSAGE`` on stderr. A daemon error keeps its ``code`` and ``data`` exactly; its ``message``
is reworded here, in one place, into the CLI's terms (``--max-size``, not ``'max_size'``;
``no such contact 'Bob' (did you mean 'bob'?)``). Errors the CLI finds itself use codes
2000-2099, which the daemon never sends.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

from aegis_client.errors import AegisClientError, RpcError

from .units import size_text

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130

#: The CLI's own errors (code, data.error), by exit status; never sent by the daemon.
CLI_ERRORS: dict[int, tuple[int, str]] = {
    EXIT_ERROR: (2000, "failed"),
    EXIT_USAGE: (2001, "usage"),
    EXIT_NOT_RUNNING: (2002, "not_running"),
    EXIT_INTERRUPTED: (2004, "interrupted"),
}
CONNECTION_LOST = (2003, "connection_lost")

INVALID_PARAMS = -32602


class Fail(AegisClientError):
    """An error the CLI reports itself: one line for the user, and the exit status."""

    def __init__(
        self, message: str, code: int = EXIT_ERROR, data: Any = None, name: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code  # the exit status
        self.data = data
        self.name = name

    def to_object(self) -> dict[str, Any]:
        number, default = CLI_ERRORS.get(self.code, CLI_ERRORS[EXIT_ERROR])
        data: dict[str, Any] = {"error": self.name or default}
        if isinstance(self.data, dict):
            data.update(self.data)
        return {"code": number, "message": self.message, "data": data}


def connection_lost(what: str) -> dict[str, Any]:
    number, name = CONNECTION_LOST
    return {"code": number, "message": f"lost the connection to the daemon ({what})",
            "data": {"error": name}}  # fmt: skip


#: API params -> what the user types for them on the command line.
WORDS = {
    "max_size": "--max-size",
    "caption": "--caption",
    "paths": "--file",
    "overwrite": "--overwrite",
    "force": "--force",
    "expires_in": "--expires",
    "read_receipts": "--read-receipts",
    "receipt_delay_max": "--receipt-delay-max",
    "send_jitter_max": "--send-jitter-max",
    "group_spread_max": "--group-spread-max",
    "kdf_memory_kib": "--kdf-memory-kib",
    "kdf_passes": "--kdf-passes",
    "kdf_lanes": "--kdf-lanes",
    "limit": "--limit",
    "offset": "--offset",
    "group": "GROUP",  # --group, or the GROUP argument of `aegis group ...`
    "before": "--before",
    "since": "--since",
    "types": "--type",
    "mode": "--mode",
    "proxy": "--proxy",
    "isolation": "--isolation",
    "bridges": "--bridge",
    "tor_path": "--tor-path",
    "trusted_relays": "--trust-relay",
    "level": "--level",
    "insecure_plaintext": "--insecure-plaintext-relay",
    "reveal_ip": "--reveal-ip",
    "play": "--play",
    "record": "--record",
    "video": "--video",
    "ring_timeout": "--ring-timeout",
    "turn_url": "--turn-url",
    "turn_username": "--turn-username",
    "turn_password": "--turn-password-file",
    "hide_ip": "--hide-ip",
    "host_candidates": "--host-candidates",
    "input_device": "--input-device",
    "output_device": "--output-device",
    "contact": "NAME",
    "name": "NAME",
    "new_name": "NEW_NAME",
    "display_name": "DISPLAY_NAME",
    "text": "MESSAGE",
    "link": "LINK",
    "url": "URL",
    "path": "PATH",
    "attachment_id": "ID",
    "request": "ID",
    "invitation": "ID",
    "call_id": "CALL_ID",
    "passphrase": "the passphrase",
    "old_passphrase": "the current passphrase",
    "new_passphrase": "the new passphrase",
}
#: Params in bytes: their numbers are also given in kB/MB/GB.
SIZE_PARAMS = frozenset({"max_size"})
#: What a `not_found` is about -> the param that named it.
NOT_FOUND_PARAMS = {
    "contact": ("contact", "name"),
    "request": ("request",),
    "invitation": ("invitation",),
    "attachment": ("attachment_id",),
    "message": ("message_id",),
    "call in progress": ("call_id",),
}


def printable(text: str, limit: int = 80) -> str:
    """What the user typed, safe to echo on a terminal (no control characters)."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def did_you_mean(name: str, names: Sequence[str]) -> list[str]:
    """Contacts whose name differs from ``name`` only in case, else near misses."""
    same = [n for n in names if n.casefold() == name.casefold()]
    if same:
        return same
    folded = {n.casefold(): n for n in names}
    close = difflib.get_close_matches(name.casefold(), list(folded), n=3, cutoff=0.6)
    return [folded[c] for c in close]


def _sizes(problem: str) -> str:
    return re.sub(
        r"\d+", lambda m: f"{m[0]} bytes ({size_text(int(m[0]))})" if int(m[0]) >= 1000
        else m[0], problem,
    )  # fmt: skip


def _nth(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def user_message(exc: RpcError, contact_names: Callable[[], Sequence[str]] | None = None) -> str:
    """The daemon's error message in the CLI's terms (its code and data stay as they are)."""
    message = exc.message or f"error {exc.code}"
    params: dict[str, Any] = exc.params if isinstance(exc.params, dict) else {}
    data: dict[str, Any] = exc.data if isinstance(exc.data, dict) else {}
    if exc.code == INVALID_PARAMS:
        field = data.get("field")
        prefix = f"Invalid params: '{field}' "
        if isinstance(field, str) and message.startswith(prefix):
            problem = message[len(prefix) :]
            if field in SIZE_PARAMS:
                problem = _sizes(problem)
            # A list param's "item N" is the N+1th time the option was given.
            problem = re.sub(r"^item (\d+): ", lambda m: f"(the {_nth(int(m[1]) + 1)}): ", problem)
            if problem.startswith("the "):  # a whole sentence already ("the relay URL must ...")
                return problem
            return f"{WORDS.get(field, field)} {problem}"
        return message.removeprefix("Invalid params: ")
    m = re.fullmatch(r"no such ([a-z ]+)", message)
    if exc.error == "not_found" and m and m[1] in NOT_FOUND_PARAMS:
        kind = m[1]
        given = next((params[p] for p in NOT_FOUND_PARAMS[kind] if params.get(p) is not None),
                     None)  # fmt: skip
        if given is None:
            return message
        if kind != "contact":
            return f"{message} {printable(str(given))}"
        text = f"no such contact '{printable(str(given))}'"
        try:
            names = list(contact_names()) if contact_names is not None else []
        except Exception:  # a suggestion is a nicety: the error stands without it
            names = []
        close = did_you_mean(str(given), names)
        if close:
            quoted = " or ".join(f"'{printable(n)}'" for n in close)
            return f"{text} (did you mean {quoted}? names are case-sensitive)"
        return f"{text} (aegis contacts lists them)"
    if exc.error in ("bad_file", "exists") and isinstance(params.get("path"), str):
        # Which file: the user may have given several commands, or a relative path.
        head, hint, rest = message.partition(" (use ")
        message = f"{head}: {printable(params['path'])}" + (f" (use {rest}" if hint else "")
    # Params named in a hint ("use overwrite") become the option the user types.
    return re.sub(
        r"\buse (\w+)\b",
        lambda m: f"use {WORDS[m[1]]}" if WORDS.get(m[1], "").startswith("--") else m[0],
        message,
    )
