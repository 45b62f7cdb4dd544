"""Method registration and parameter validation.

A method is an ``async def`` whose first parameter is the CallContext and whose other
parameters are JSON-RPC params, annotated with JSON types::

    registry = Registry()

    @registry.method("events.list", unlocked=True)
    async def events_list(ctx: CallContext, since: int = 0, limit: int = 100) -> dict: ...

Params may come by name (object) or by position (array). Validation is from the annotations:
jsonrpcserver only checks that ``inspect.signature(...).bind`` succeeds and then answers
"Invalid params" with Python's TypeError text as data; JSON-RPC clients need the message to
name the bad field and the type check to happen before the method runs, so that part is
hand-written here (a small subset of JSON types, no schema library needed).
"""

from __future__ import annotations

import inspect
import logging
import traceback
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Union

from jsonrpcserver import Error, Result, Success

from .errors import INTERNAL_ERROR, InvalidParamsError, RpcError, locked

log = logging.getLogger("aegisd.rpc")

Handler = Callable[..., Awaitable[Any]]

_MISSING = inspect.Parameter.empty


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a parameter that is required all the same: lets a method keep its
#: positional order when an optional parameter was added before required ones (positional
#: params bind in the function's order, so a method's order never changes).
REQUIRED: Any = _Required()


@dataclass
class CallContext:
    """What a method gets besides its params: the daemon and the calling connection."""

    app: Any
    connection: Any


def _json_type_name(tp: Any) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        dict: "an object",
        list: "an array",
        type(None): "null",
    }
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_json_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return "an array" if inner is Any else f"an array of {_json_type_name(inner)[2:]}s"
    if origin is dict:
        return "an object"
    return names.get(tp, str(tp))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp in (str, dict, list):
        return isinstance(value, tp)
    raise TypeError(f"unsupported param annotation {tp!r}")


@dataclass
class MethodSpec:
    name: str
    func: Handler
    unlocked: bool
    params: list[tuple[str, Any, Any]] = field(default_factory=list)  # name, type, default

    @classmethod
    def build(cls, name: str, func: Handler, unlocked: bool) -> MethodSpec:
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func)
        ps = list(sig.parameters.values())
        if not ps or ps[0].kind not in (ps[0].POSITIONAL_ONLY, ps[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"{name}: the first parameter must take the CallContext")
        spec = cls(name, func, unlocked)
        for p in ps[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{name}: *args/**kwargs are not allowed in RPC methods")
            tp = hints.get(p.name, Any)
            spec.params.append((p.name, tp, _MISSING if p.default is REQUIRED else p.default))
        return spec

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map JSON-RPC params onto the method's parameters, or raise InvalidParamsError."""
        names = [n for n, _, _ in self.params]
        given: dict[str, Any] = {}
        if args:
            if len(args) > len(names):
                raise InvalidParamsError(
                    None, f"too many positional params: {self.name} takes at most {len(names)}"
                )
            given.update(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise InvalidParamsError(key, "is not a parameter of " + self.name)
            given[key] = value
        out: dict[str, Any] = {}
        for pname, tp, default in self.params:
            if pname not in given:
                if default is _MISSING:
                    raise InvalidParamsError(pname, "is required", reason="missing")
                continue
            value = given[pname]
            if not _matches(value, tp):
                raise InvalidParamsError(pname, f"must be {_json_type_name(tp)}", reason="type")
            out[pname] = value
        return out


class Registry:
    """The daemon's methods. ``is_locked`` tells whether the store is closed."""

    def __init__(self, is_locked: Callable[[], bool] = lambda: False) -> None:
        self._specs: dict[str, MethodSpec] = {}
        self._wrapped: dict[str, Callable[..., Awaitable[Result]]] = {}
        self.is_locked = is_locked

    def register(self, name: str, func: Handler, *, unlocked: bool = False) -> None:
        """Add ``func`` as method ``name``; ``unlocked=True`` makes it fail with the
        ``locked`` error (1001) while the profile is locked."""
        if name in self._specs:
            raise ValueError(f"method {name} is already registered")
        spec = MethodSpec.build(name, func, unlocked)
        self._specs[name] = spec
        self._wrapped[name] = self._wrap(spec)

    def method(self, name: str, *, unlocked: bool = False) -> Callable[[Handler], Handler]:
        def deco(func: Handler) -> Handler:
            self.register(name, func, unlocked=unlocked)
            return func

        return deco

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[MethodSpec]:
        """Every method's spec, by name (aegisd/rpc/openrpc.py describes them)."""
        return [self._specs[n] for n in sorted(self._specs)]

    def for_jsonrpcserver(self) -> dict[str, Callable[..., Awaitable[Result]]]:
        """The methods as jsonrpcserver wants them: context first, returning a Result.

        A live view: methods registered later (say, by a service started on unlock) are
        served too."""
        return self._wrapped

    def _wrap(self, spec: MethodSpec) -> Callable[..., Awaitable[Result]]:
        async def call(ctx: CallContext, *args: Any, **kwargs: Any) -> Result:
            try:
                params = spec.bind(args, kwargs)
                if spec.unlocked and self.is_locked():
                    raise locked()
                return Success(await spec.func(ctx, **params))
            except RpcError as exc:
                if exc.data is None:
                    return Error(exc.code, exc.message)
                return Error(exc.code, exc.message, exc.data)
            except Exception as exc:
                # Never the exception's message: it could quote a secret. Type and frames only.
                frames = "".join(traceback.format_tb(exc.__traceback__))
                log.error("method %s failed with %s\n%s", spec.name, type(exc).__name__, frames)
                return Error(INTERNAL_ERROR, "Internal error", {"error": "internal"})

        return call
