"""Times and sizes as the CLI shows them to people (JSON output keeps the API's numbers).

Times: the API's timestamps are milliseconds since the Unix epoch (docs/api.md, "Messaging");
people see the local date and time to the second. Sizes: decimal units (kB, MB, GB), as
file managers show them; a size given on the command line may use them too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import click


def when(ms: int | None) -> str:
    """A local date and time for people, from the API's milliseconds since the epoch."""
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def clock(ms: int | None) -> str:
    """The local time of day (for a stream of events: the date is today's)."""
    if not ms:
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def size_text(n: int) -> str:
    """A byte count for people: 999 B, 1.5 kB, 134.1 MB."""
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}  # fmt: skip


class Size(click.ParamType[int]):
    """A size in bytes: 100000000, 100MB, 1.5GB, 512kB, 64MiB."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m[2].lower() if m else ""
        if m is None or unit not in _UNITS:
            self.fail(f"{value!r} is not a size (examples: 100000000, 100MB, 1.5GB)", param, ctx)
        n = int(float(m[1]) * _UNITS[unit])
        if n < 1:
            self.fail(f"{value!r} is less than one byte", param, ctx)
        return n


def receipt_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--read-receipts and --receipt-delay-max, the same for `aegis settings` and `aegis
    privacy` (both set `settings.set`'s receipt params)."""
    func = click.option(
        "--receipt-delay-max",
        type=click.FloatRange(0.5, 3600),
        metavar="SECONDS",
        help="Receipts leave after a random delay of 0.5 s up to SECONDS (default 3).",
    )(func)
    return click.option(
        "--read-receipts", type=click.Choice(["on", "off"]), help="Send read receipts or not."
    )(func)
