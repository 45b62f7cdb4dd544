"""Typed errors of the aegisd JSON-RPC API (docs/api.md, "Errors").

Every error the daemon answers becomes an instance of one class: the JSON-RPC protocol's own
errors by code, application errors (codes 1000-1999) by their stable ``data.error`` name, so
that a bot writes ``except NotFound:`` rather than comparing codes. Unknown names and codes
still raise :class:`RpcError` (or :class:`AppError`) with everything the daemon sent.
"""

from __future__ import annotations

from typing import Any


class AegisClientError(Exception):
    """Base class of every exception this library raises."""


class DaemonNotRunning(AegisClientError):
    """Nothing answers on the socket (no daemon, or a stale socket)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"aegisd is not running (no answer on {path})")
        self.path = path


class ConnectionLost(AegisClientError):
    """The daemon closed the connection (it stopped or restarted) before answering."""


class ProtocolError(AegisClientError):
    """The daemon sent something that is not JSON-RPC 2.0 as this library knows it."""


def is_secret_param(name: str) -> bool:
    """Params that carry a passphrase, a password or a secret (docs/api.md)."""
    return any(word in name for word in ("passphrase", "password", "secret"))


class RpcError(AegisClientError):
    """The daemon answered with a JSON-RPC error object."""

    #: JSON-RPC error code (class attribute for the classes with a fixed code).
    code: int = 0
    #: The stable application error name (``data.error``), for application errors.
    name: str | None = None
    #: The method and params of the call the daemon refused, when the client set them (so
    #: that a frontend can word the error in its own terms: aegis_cli/errors.py).
    method: str | None = None
    params: Any = None

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def set_call(self, method: str, params: Any) -> None:
        """Remember the refused call, its secrets blanked: an exception outlives the call and
        may be logged or reported whole (unlock, passphrase.change, backup and TURN params)."""
        self.method = method
        if isinstance(params, dict):
            params = {k: "[hidden]" if is_secret_param(k) else v for k, v in params.items()}
        self.params = params

    def to_object(self) -> dict[str, Any]:
        """The JSON-RPC error object, as the daemon sent it (docs/api.md, "Errors")."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    @property
    def error(self) -> str | None:
        """``data.error`` when the daemon sent one."""
        if isinstance(self.data, dict) and isinstance(self.data.get("error"), str):
            return str(self.data["error"])
        return None


# -- JSON-RPC 2.0's own errors ---------------------------------------------------------------


class ParseError(RpcError):
    code = -32700


class InvalidRequest(RpcError):
    code = -32600


class MethodNotFound(RpcError):
    code = -32601


class InvalidParams(RpcError):
    code = -32602

    @property
    def field(self) -> str | None:
        """The param the daemon complained about, when it named one."""
        if isinstance(self.data, dict) and isinstance(self.data.get("field"), str):
            return str(self.data["field"])
        return None


class InternalError(RpcError):
    code = -32603


# -- application errors (1000-1999), one class per data.error name ----------------------------


class AppError(RpcError):
    """An application error: ``data.error`` is a stable name; match on the class."""


class Locked(AppError):
    code, name = 1001, "locked"


class WrongPassphrase(AppError):
    code, name = 1002, "wrong_passphrase"


class PermissionDenied(AppError):
    code, name = 1003, "permission_denied"


class NoPassphrase(AppError):
    code, name = 1004, "no_passphrase"


class NoSuchSubscription(AppError):
    code, name = 1005, "no_such_subscription"


class StoreError(AppError):
    code, name = 1006, "store_error"


class RelayUnavailable(AppError):
    code, name = 1010, "relay_unavailable"


class RateLimited(AppError):
    code, name = 1011, "rate_limited"

    @property
    def retry_after(self) -> float | None:
        if isinstance(self.data, dict) and isinstance(self.data.get("retry_after"), int | float):
            return float(self.data["retry_after"])
        return None


class NoTor(AppError):
    """Mode tor (network.set, relay.set) and no tor program on this machine."""

    code, name = 1012, "no_tor"


class RelayInUse(AppError):
    """relay.set on a profile with contacts: their mailboxes live at the current relay."""

    code, name = 1013, "relay_in_use"


class NotFound(AppError):
    code, name = 1020, "not_found"


class Exists(AppError):
    code, name = 1021, "exists"


class BadLink(AppError):
    code, name = 1022, "bad_link"


class Expired(AppError):
    code, name = 1023, "expired"


class NotReady(AppError):
    code, name = 1024, "not_ready"


class NoRelay(NotReady):
    """Code 1024 with ``data.error`` ``no_relay``: the profile has no relay configured."""

    code, name = 1024, "no_relay"


class Blocked(AppError):
    code, name = 1025, "blocked"


class TooLarge(AppError):
    code, name = 1026, "too_large"


class RevealsIp(AppError):
    """calls.start / calls.accept: the call would show the user's IP address to the contact
    (Tor or a proxy, no TURN hide-my-IP); pass ``reveal_ip=True`` to allow it."""

    code, name = 1035, "reveals_ip"


class NotAllowed(AppError):
    """messages.edit / react / reply / delete for everyone: not allowed on this message (not
    yours, a file, deleted for everyone, or past the 24-hour edit window)."""

    code, name = 1050, "not_allowed"


class GroupRefused(AppError):
    """group.*: the group's rules refuse the change or the call; ``reason`` says which
    (not_permitted, last_owner, not_a_member, group_full, invalid_change, ...)."""

    code, name = 1060, "group_refused"

    @property
    def reason(self) -> str | None:
        return str(self.data.get("reason")) if isinstance(self.data, dict) else None


_BY_CODE: dict[int, type[RpcError]] = {
    c.code: c for c in (ParseError, InvalidRequest, MethodNotFound, InvalidParams, InternalError)
}
_BY_NAME: dict[str, type[AppError]] = {
    c.name: c
    for c in (
        Locked,
        WrongPassphrase,
        PermissionDenied,
        NoPassphrase,
        NoSuchSubscription,
        StoreError,
        RelayUnavailable,
        RateLimited,
        NoTor,
        RelayInUse,
        NotFound,
        Exists,
        BadLink,
        Expired,
        NotReady,
        NoRelay,
        Blocked,
        TooLarge,
        RevealsIp,
        NotAllowed,
        GroupRefused,
    )
    if c.name is not None
}


def from_error_object(err: Any) -> RpcError:
    """The exception for one JSON-RPC error object."""
    if not isinstance(err, dict):
        return RpcError(0, f"malformed error object: {type(err).__name__}")
    code = err.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else 0
    message = err.get("message")
    message = message if isinstance(message, str) else ""
    data = err.get("data")
    if 1000 <= code <= 1999:
        name = data.get("error") if isinstance(data, dict) else None
        cls: type[RpcError] = _BY_NAME.get(name, AppError) if isinstance(name, str) else AppError
    else:
        cls = _BY_CODE.get(code, RpcError)
    return cls(code, message, data)
