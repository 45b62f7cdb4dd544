"""A daemon against a relay with the DEFAULT proof-of-work settings (issue 15 review item 5).

Tests run relays with cheap proofs (tests/relay/conftest.py FAST); production relays ask
`pow_create_bits` = 22 for every CREATE. This starts a relay with relay/config.py's defaults and
one daemon, and times `invitations.create` N times (one CREATE each; the first may also wait
for the address the daemon makes when it connects), then prints each wall time and the mean.
Bounded: N+1 proofs of 2**22 hashes (about half a minute to a minute for N = 5).

    python -m bench.daemon_create [-n 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from relay.config import Config
from tests.functional.conftest import Peer
from tests.relay.conftest import RelayProcess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    cfg = Config()
    defaults = {f"--pow-{k}-bits": str(getattr(cfg, f"pow_{k}_bits"))
                for k in ("deposit", "bundle", "blob", "create")}
    with tempfile.TemporaryDirectory(prefix="aegis-create-") as tmp:
        root = Path(tmp)
        (root / "relay").mkdir()
        relay = RelayProcess(root / "relay", defaults)
        relay.start()
        peer = None
        try:
            peer = Peer(root / "alice", f"ws://127.0.0.1:{relay.port}/v1/ws", "alice")
            peer.wait_connected()
            times = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                peer.call("invitations.create")
                times.append(time.perf_counter() - t0)
            print(f"relay defaults {defaults}")
            print("invitations.create (s): " + ", ".join(f"{t:.1f}" for t in times)
                  + f"; the first may wait for the address; mean of the others "
                  f"{statistics.mean(times[1:] or times):.1f} s")
        finally:
            if peer is not None:
                peer.stop()
            relay.close()


if __name__ == "__main__":
    main()
