"""What the proof of work of one CREATE costs an honest daemon (issue 15 review item 5).

A relay with default settings asks 22 bits (relay/config.py pow_create_bits); the daemon solves
it in a thread (relay/client.py create), outside the messenger lock. This solves it N times with
the client's own solver on fresh challenges and prints the mean, median, p95 and max seconds of
one core. Bounded: N solves of 2**bits hashes each (about a minute for N=15 at 22 bits).

    python -m bench.create_pow [--bits 22] [-n 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from relay import pow as pow_
from relay import wire


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=22)
    ap.add_argument("-n", type=int, default=15)
    args = ap.parse_args()
    times: list[float] = []
    for _ in range(args.n):
        payload = wire.create_pow_hash(os.urandom(32), os.urandom(32), 0)
        t0 = time.perf_counter()
        pow_.solve(args.bits, os.urandom(32), wire.POW_CREATE, pow_.ZERO_TARGET, payload)
        times.append(time.perf_counter() - t0)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    print(f"create proof, {args.bits} bits, n={args.n}: mean {statistics.mean(times):.2f} s, "
          f"median {statistics.median(times):.2f} s, p95 {p95:.2f} s, max {times[-1]:.2f} s")


if __name__ == "__main__":
    main()
