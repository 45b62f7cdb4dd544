"""Giving freed memory back to the system.

What a client that does not read made the relay hold (up to conn_buffer each) is freed when the
connection ends, but the C allocator keeps freed blocks for reuse, so the relay's size stayed at
its peak after such clients were gone (issue 15, item 5). glibc's malloc_trim returns them;
elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
with contextlib.suppress(OSError, AttributeError, TypeError):
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim


def give_back() -> None:
    """Return free heap memory to the system (glibc); a no-op where unavailable."""
    if _trim is not None:
        _trim(0)
