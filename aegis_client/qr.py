"""A link as a QR code made of text (Unicode half blocks, two modules a character row), for
``aegis invite --qr`` and ``aegis chat``. segno is imported only when a code is drawn."""

from __future__ import annotations

import io


class QRUnavailable(RuntimeError):
    """segno (the QR encoder) is not installed."""


def qr_text(link: str) -> str:
    try:
        import segno
    except ImportError:
        raise QRUnavailable("a QR code needs the segno package: pip install segno") from None
    buf = io.StringIO()
    segno.make(link, error="m").terminal(out=buf, compact=True, border=2)
    return buf.getvalue()
