"""JSON-RPC error codes: the protocol's own, and the daemon's application range.

Every error object has one shape (docs/api.md, "Errors"): ``code``, ``message`` (for people)
and ``data``, an object whose ``error`` member is a stable, machine-readable name; other
members depend on the error. Application errors use codes 1000-1999 (outside the range
-32768..-32000 that JSON-RPC 2.0 reserves).
"""

from __future__ import annotations

from typing import Any

# JSON-RPC 2.0, section 5.1.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: data.error of the protocol's own errors.
PROTOCOL_NAMES = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal",
}

# Application range.
APP_MIN = 1000
APP_MAX = 1999
LOCKED = 1001
WRONG_PASSPHRASE = 1002
PERMISSION_DENIED = 1003
NO_PASSPHRASE = 1004
NO_SUCH_SUBSCRIPTION = 1005
STORE_ERROR = 1006
# Messaging (docs/api.md, "Errors"); the services raise these.
RELAY_UNAVAILABLE = 1010
RATE_LIMITED = 1011
#: The relay holds as much as it allows (relay-protocol.md error 17, ``full``).
RELAY_FULL = 1014
NOT_FOUND = 1020
EXISTS = 1021
BAD_LINK = 1022
EXPIRED = 1023
#: The contact (or the profile) cannot send now: no session yet, failed, restored elsewhere.
NOT_READY = 1024
BLOCKED = 1025
TOO_LARGE = 1026
TOO_MANY_MAILBOXES = 1048
#: A group's rules refuse the change (data.reason: the core's GroupError, snake_case).
GROUP_REFUSED = 1060
#: A passphrase being chosen (passphrase.change, backup.export) is below the strength rule.
WEAK_PASSPHRASE = 1041


def error_object(code: int, message: str, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC error object in the one shape: ``data`` an object with a stable ``error``
    name (a protocol error's string detail moves to ``data.detail``; -32601's is the method
    name, in ``data.method``)."""
    if not isinstance(data, dict):
        extra = {} if data is None else {"method" if code == METHOD_NOT_FOUND else "detail": data}
        data = {"error": PROTOCOL_NAMES.get(code, "error"), **extra}
    elif "error" not in data:
        data = {"error": PROTOCOL_NAMES.get(code, "error"), **data}
    return {"code": code, "message": message, "data": data}


class RpcError(Exception):
    """An error a method returns to its caller. ``message`` and ``data`` must hold no secret."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class AppError(RpcError):
    """An application error: code in 1000-1999, data.error a stable name."""

    def __init__(self, code: int, name: str, message: str, **extra: Any) -> None:
        assert APP_MIN <= code <= APP_MAX
        super().__init__(code, message, {"error": name, **extra})


class InvalidParamsError(RpcError):
    """-32602 whose message names the bad field."""

    def __init__(self, field: str | None, problem: str, **extra: Any) -> None:
        where = f"'{field}' " if field is not None else ""
        super().__init__(
            INVALID_PARAMS,
            f"Invalid params: {where}{problem}",
            {"error": "invalid_params", "field": field, **extra},
        )


def locked() -> AppError:
    return AppError(LOCKED, "locked", "the profile is locked: unlock it first (aegis unlock)")


def wrong_passphrase() -> AppError:
    return AppError(WRONG_PASSPHRASE, "wrong_passphrase", "wrong passphrase")


def no_passphrase(message: str) -> AppError:
    return AppError(NO_PASSPHRASE, "no_passphrase", message)


def weak_passphrase(problem: str) -> AppError:
    """``problem`` is aegisd/passphrase_strength.py's text: it never quotes the passphrase."""
    return AppError(WEAK_PASSPHRASE, "weak_passphrase", problem)


def store_error(message: str) -> AppError:
    """The store refused (a damaged keyring, a schema newer than this aegisd, ...).
    Store messages never hold secrets (aegisd/store/errors.py)."""
    return AppError(STORE_ERROR, "store_error", message)


def not_found(what: str) -> AppError:
    return AppError(NOT_FOUND, "not_found", f"no such {what}")


def relay_unavailable() -> AppError:
    return AppError(
        RELAY_UNAVAILABLE,
        "relay_unavailable",
        "the relay is not reachable right now; try again later (aegis status shows why)",
    )


RELAY_FULL_TEXT = (
    "the relay is full: it holds as many mailboxes or as much stored data as it allows; try "
    "again later, or move to another relay (aegis relay set URL)"
)


def relay_full() -> AppError:
    """The relay refused to store more (relay-protocol.md error 17, `full`): not a network
    problem, so not relay_unavailable."""
    return AppError(RELAY_FULL, "relay_full", RELAY_FULL_TEXT)
