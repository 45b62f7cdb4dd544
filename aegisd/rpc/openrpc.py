"""The API described for machines: an OpenRPC 1.2 document generated from the registry.

Each method's name, params (JSON types from the annotations MethodSpec reads, required or
not, defaults) and result type come from the code the daemon serves, so the description
cannot drift from it: the daemon answers ``rpc.discover`` with this document (as OpenRPC
suggests), docs/openrpc.json holds the same document for the methods of a normal daemon, and
a test compares the two. Prose (what a method does, its errors) stays in docs/api.md.

    python -m aegisd.rpc.openrpc > docs/openrpc.json
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Union

from .methods import MethodSpec, Registry

OPENRPC_VERSION = "1.2.6"
_SIMPLE = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}

#: Application errors (docs/api.md, "Errors"): code and data.error name, every one the daemon
#: can answer (tests/unit/test_docs_match_code.py compares this list with the table and with
#: the errors raised in aegisd/). A name used by several codes is keyed NAME_CODE after its
#: first use in the document's components.
APP_ERRORS = [
    (1001, "locked"),
    (1002, "wrong_passphrase"),
    (1003, "permission_denied"),
    (1004, "no_passphrase"),
    (1005, "no_such_subscription"),
    (1006, "store_error"),
    (1010, "relay_unavailable"),
    (1011, "rate_limited"),
    (1012, "no_tor"),
    (1013, "relay_in_use"),
    (1014, "relay_full"),
    (1020, "not_found"),
    (1021, "exists"),
    (1022, "bad_link"),
    (1023, "expired"),
    (1024, "not_ready"),
    (1024, "no_relay"),
    (1025, "blocked"),
    (1026, "too_large"),
    (1027, "busy"),
    (1028, "call_state"),
    (1029, "media"),
    (1030, "bad_file"),
    (1031, "too_large"),
    (1032, "not_complete"),
    (1033, "exists"),
    (1034, "not_retryable"),
    (1035, "reveals_ip"),
    (1036, "no_audio_device"),
    (1040, "exists"),
    (1041, "weak_passphrase"),
    (1042, "not_a_backup"),
    (1043, "wrong_passphrase"),
    (1044, "damaged"),
    (1045, "truncated"),
    (1046, "not_fresh"),
    (1047, "io_error"),
    (1048, "too_many_mailboxes"),
    (1050, "not_allowed"),
    (1060, "group_refused"),
    (1090, "bad_link"),
    (1090, "bad_profile"),
    (1091, "expired"),
    (1091, "gone"),
    (1091, "used"),
    (1092, "no_link"),
    (1092, "no_code"),
    (1092, "busy"),
    (1092, "installing"),
    (1092, "ended"),
    (1093, "too_many_devices"),
    (1094, "not_fresh"),
    (1095, "not_found"),
    (1095, "this_device"),
]


def _error_components() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code, name in APP_ERRORS:
        key = name if name not in out else f"{name}_{code}"
        out[key] = {"code": code, "message": name, "data": {"error": name}}
    return out


def schema_of(tp: Any) -> dict[str, Any]:
    """JSON Schema of a param or result annotation (the subset methods.py accepts)."""
    if tp is Any:
        return {}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [schema_of(a) for a in typing.get_args(tp)]
        if all(set(m) == {"type"} and isinstance(m["type"], str) for m in members):
            return {"type": [m["type"] for m in members]}
        return {"oneOf": members}
    if origin is list:
        args = typing.get_args(tp)
        out: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Any:
            out["items"] = schema_of(args[0])
        return out
    if origin is dict:
        return {"type": "object"}
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    raise TypeError(f"no JSON Schema for the annotation {tp!r}")


def describe(spec: MethodSpec) -> dict[str, Any]:
    params = []
    for name, tp, default in spec.params:
        schema = schema_of(tp)
        required = default is inspect.Parameter.empty
        if not required:
            schema = {**schema, "default": default}
        params.append({"name": name, "required": required, "schema": schema})
    result_tp = typing.get_type_hints(spec.func).get("return", Any)
    method: dict[str, Any] = {
        "name": spec.name,
        "paramStructure": "either",
        "params": params,
        "result": {"name": "result", "schema": schema_of(result_tp)},
        # Specification extension: the method fails with 1001 locked while locked.
        "x-needs-unlock": spec.unlocked,
    }
    doc = inspect.getdoc(spec.func)
    if doc:
        method["summary"] = doc.split("\n\n")[0].replace("\n", " ")
    return method


def document(registry: Registry, *, version: str, api_version: int) -> dict[str, Any]:
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "aegisd JSON-RPC API",
            "version": version,
            "description": (
                "The per-user AegisLink daemon's API on its Unix socket; docs/api.md is the "
                "prose reference. x-api-version is version().api_version."
            ),
            "x-api-version": api_version,
        },
        "methods": [describe(s) for s in registry.specs()],
        "components": {"errors": _error_components()},
    }


def dumps(doc: dict[str, Any]) -> str:
    """The document as docs/openrpc.json holds it."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[str, Any]:
    """The document of a normal daemon (no test methods), from a throwaway profile: the
    daemon's methods are registered when it is built, so none has to run."""
    from ..daemon import Daemon
    from ..paths import resolve
    from ..store import create_profile

    with tempfile.TemporaryDirectory(prefix="aegis-openrpc-") as tmp:
        home = Path(tmp) / "p"
        create_profile(home, None).close()
        daemon = Daemon(resolve(home))
        return daemon.discover()


def main() -> int:
    sys.stdout.write(dumps(generate()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
