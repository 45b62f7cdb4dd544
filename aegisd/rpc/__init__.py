"""The daemon's JSON-RPC 2.0 API on a Unix socket (docs/api.md)."""

from __future__ import annotations

from .errors import AppError, InvalidParamsError, RpcError
from .events import EventBus, EventFilter
from .methods import REQUIRED, CallContext, Registry
from .server import MAX_REQUEST_BYTES, PeerCred, RpcServer, peer_allowed, peer_cred

__all__ = [
    "MAX_REQUEST_BYTES",
    "REQUIRED",
    "AppError",
    "CallContext",
    "EventBus",
    "EventFilter",
    "InvalidParamsError",
    "PeerCred",
    "Registry",
    "RpcError",
    "RpcServer",
    "peer_allowed",
    "peer_cred",
]
