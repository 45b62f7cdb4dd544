"""Entry point of `aegis-bridge`. The bridge is not built yet; it says so and exits non-zero."""

from __future__ import annotations

import sys


def main() -> None:
    print(
        "aegis-bridge: desktop notifications are not available yet in this release", file=sys.stderr
    )
    sys.exit(2)
