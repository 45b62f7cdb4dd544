"""Backup benchmark: each figure beside a baseline measured in the same run.

    .venv/bin/python bench/backup.py [MESSAGES]        (default 20000 messages)

Prints, as medians over several rounds:
  kdf        Argon2id with the default parameters (64 MiB, 3 passes, 4 lanes), beside the
             format's minimum (19 MiB, 2 passes, 1 lane): the one fixed cost of every export
             and import;
  stream     the secretstream encryption and decryption of a synthetic backup's contents
             (MESSAGES texts of 200 bytes over 10 contacts) in 64 KiB chunks, beside one
             AES-256-GCM pass over the same bytes (pyca/cryptography): the cost of chunking
             and authenticating the order;
  contents   serialising and parsing those contents (the strict parser), beside json.dumps /
             json.loads of the same data.
The machine is shared and noisy: every figure is a median.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aegisd.core import backup as fmt
from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy

E = SystemEntropy()
PASS = "correct horse battery staple"


def median_s(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def contents(n_messages: int) -> fmt.BackupContents:
    me = IdentityKeyPair.generate(E)
    ed, x = me.raw_private()
    per = n_messages // 10
    contacts = []
    for c in range(10):
        peer = IdentityKeyPair.generate(E)
        msgs = tuple(
            fmt.BackupMessage(f"{c:08x}{i:024x}", i % 2 == 0, "m" * 200,
                              "delivered" if i % 2 == 0 else "received", None, i, i)
            for i in range(per)
        )  # fmt: skip
        address = wire.MailboxAddress("wss://relay.example/v1/ws", bytes(16), bytes(32))
        contacts.append(
            fmt.BackupContact(f"c{c}", peer.public.record(), False, False, 0, address, msgs, ())
        )
    return fmt.BackupContents(
        0, ed, x, me.public.binding_sig, "me", (), tuple(contacts), ()
    )  # fmt: skip


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    salt = bytes(16)
    kdf_default = median_s(lambda: fmt.derive_keys(PASS, salt, fmt.DEFAULT_KDF), 5)
    kdf_min = median_s(lambda: fmt.derive_keys(PASS, salt, fmt.MIN_KDF), 5)
    print(f"kdf       default {kdf_default * 1000:8.1f} ms   minimum {kdf_min * 1000:8.1f} ms"
          f"   ratio {kdf_default / kdf_min:5.2f}")  # fmt: skip

    c = contents(n)
    plain = c.to_bytes()
    mb = len(plain) / 1e6
    key = bytes(32)
    # The stream alone: the KDF at its minimum, its measured cost subtracted.
    enc = median_s(lambda: fmt.encrypt(E, PASS, plain, fmt.MIN_KDF), 5) - kdf_min
    data = fmt.encrypt(E, PASS, plain, fmt.MIN_KDF)
    dec = median_s(lambda: fmt.decrypt(PASS, data), 5) - kdf_min
    gcm = median_s(lambda: AESGCM(key).encrypt(bytes(12), plain, b""), 5)
    print(f"stream    {mb:.1f} MB: encrypt {mb / enc:7.0f} MB/s   decrypt {mb / dec:7.0f} MB/s"
          f"   one AES-GCM pass {mb / gcm:7.0f} MB/s   ratio (encrypt time / AES-GCM) "
          f"{enc / gcm:5.2f}")  # fmt: skip

    as_json = [
        [m.message_id, m.outgoing, m.body, m.status, m.created_at]
        for bc in c.contacts
        for m in bc.messages
    ]
    ser = median_s(c.to_bytes, 5)
    par = median_s(lambda: fmt.BackupContents.from_bytes(plain), 5)
    jser = median_s(lambda: json.dumps(as_json), 5)
    text = json.dumps(as_json)
    jpar = median_s(lambda: json.loads(text), 5)
    print(f"contents  {n} messages: serialise {ser * 1000:7.1f} ms (json.dumps "
          f"{jser * 1000:6.1f} ms, ratio {ser / jser:5.2f})   parse {par * 1000:7.1f} ms "
          f"(json.loads {jpar * 1000:6.1f} ms, ratio {par / jpar:5.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
