"""``aegis send NAME --file A --file B ... [--caption TEXT]``: several files in one send
(``attachments.send_batch``; docs/protocol.md §22.3). JSON-RPC only, like the rest of the CLI."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .main import Ctx


def send_batch(ctx: Ctx, name: str, file_paths: list[str], caption: str | None) -> None:
    """Prints the attachment ids, one a line (the first carries the caption)."""
    # The daemon's working directory is not ours: absolute paths.
    params: dict[str, Any] = {"contact": name, "paths": [os.path.abspath(p) for p in file_paths]}
    if caption is not None:
        params["caption"] = caption
    result = ctx.call("attachments.send_batch", params)
    ctx.out(result, "\n".join(str(a["attachment_id"]) for a in result["attachments"]))
