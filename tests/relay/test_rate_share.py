"""A node's share of a mailbox's rates among N nodes sharing a store (docs/relay-protocol.md
§8.1): 1/N of the rate and of the burst, the burst at least one deposit (a node must still take
some) and never more than configured (a burst of 0 stays 0)."""

from __future__ import annotations

from nacl.signing import SigningKey

from relay.config import Config
from relay.state import MailboxState
from relay.storage import MailboxRow


def _state(cfg: Config, nodes: int) -> MailboxState:
    sig = bytes(SigningKey.generate().verify_key)
    row = MailboxRow(1, b"o", b"d", sig, b"s" * 32, b"b" * 32, False, (), 0)
    return MailboxState(row, cfg, 0.0, nodes)


def test_each_node_takes_its_share() -> None:
    cfg = Config(deposit_rate=10.0, deposit_burst=8, bundle_fetch_rate=1.0, bundle_fetch_burst=3)
    mb = _state(cfg, 2)
    assert (mb.deposit_bucket.rate, mb.deposit_bucket.burst) == (5.0, 4.0)
    assert (mb.bundle_bucket.rate, mb.bundle_bucket.burst) == (0.5, 1.5)
    assert [mb.deposit_bucket.take(0.0) for _ in range(5)] == [True] * 4 + [False]
    # Fewer nodes later: the share grows; the bucket refills to it at the new rate.
    mb.share(cfg, 1, 0.0)
    assert (mb.deposit_bucket.rate, mb.deposit_bucket.burst) == (10.0, 8.0)
    assert [mb.deposit_bucket.take(1.0) for _ in range(9)] == [True] * 8 + [False]
    # More nodes: what the bucket held is cut to the new burst at once.
    mb.share(cfg, 4, 1.0)
    assert mb.deposit_bucket.tokens <= 2.0


def test_burst_bounds() -> None:
    mb = _state(Config(deposit_burst=1, bundle_fetch_burst=0), 8)
    assert mb.deposit_bucket.burst == 1.0  # at least one deposit per node
    assert mb.bundle_bucket.burst == 0.0  # none configured: none on any node


def test_a_share_change_settles_at_the_old_rate() -> None:
    """What a bucket earned before the node count changed is earned at the old rate: a second
    at 10/s is 10 tokens (cut to the new burst), not 5 at the new rate."""
    cfg = Config(deposit_rate=10.0, deposit_burst=20)
    mb = _state(cfg, 1)
    assert [mb.deposit_bucket.take(0.0) for _ in range(21)] == [True] * 20 + [False]
    mb.share(cfg, 2, 1.0)  # a second later, a second node
    assert [mb.deposit_bucket.take(1.0) for _ in range(11)] == [True] * 10 + [False]
