"""Every knob of the relay, with its default (docs/relay-protocol.md, section Limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    data_dir: str = "./relay-data"
    # Queued blocks and blobs expire after this many seconds (default 14 days).
    message_ttl: int = 14 * 24 * 3600
    # Expiry is stored rounded up to this many seconds, so it does not reveal arrival times.
    expiry_granularity: int = 3600
    sweep_interval: float = 60.0
    checkpoint_interval: float = 60.0
    # Proof-of-work difficulties in leading zero bits (0 disables a check).
    pow_deposit_bits: int = 18
    pow_bundle_bits: int = 18
    pow_blob_bits: int = 20
    # Frames and connections.
    max_frame: int = 65536
    max_connections: int = 10000
    # Connections one source address (an IPv6 /64) may hold, counted from the TCP accept, before
    # any HTTP (0: no cap). Loopback peers (a reverse proxy, Tor) are exempt unless
    # source_cap_loopback: behind those every client has the proxy's address (relay/gate.py).
    source_connections: int = 1000
    source_cap_loopback: bool = False
    # Seconds for a new connection to send HELLO, and (counted from the TCP accept) to complete
    # the HTTP upgrade before it.
    handshake_timeout: float = 10.0
    idle_timeout: float = 120.0
    # A subscribed connection that sends nothing (no frame, no WebSocket ping) this long is
    # closed; the daemon pings every 20 s (aegisd/transport/relaylink.py, HEARTBEAT).
    subscribed_idle_timeout: float = 300.0
    ping_interval: float = 30.0
    max_inflight: int = 64  # concurrent requests per connection
    # Bytes waiting to be sent to one client (the relay's queue and the transport's buffer):
    # above it the relay stops reading the client's requests and pushing to it; a connection
    # that stays above it for stall_timeout seconds is closed.
    conn_buffer: int = 2 * 1024 * 1024
    stall_timeout: float = 60.0
    frame_rate: float = 5000.0  # frames per second per connection (token bucket)
    frame_burst: int = 10000
    # Mailboxes.
    max_mailboxes: int = 1_000_000
    creates_per_connection: int = 1000
    subscriptions_per_connection: int = 1000
    queue_limit: int = 10000  # blocks queued per mailbox
    window: int = 32  # unacknowledged blocks in flight per subscription
    deposit_rate: float = 200.0  # deposits per second per mailbox (token bucket)
    deposit_burst: int = 1000
    tokens_per_mailbox: int = 16
    # Prekey bundles.
    bundle_items_per_kind: int = 200
    bundle_fetch_rate: float = 1.0  # fetches per second per mailbox
    bundle_fetch_burst: int = 20
    bundle_fetches_per_connection: int = 100
    # Blob area (file attachments): 8192 blocks of 16 KiB admit one 100 MB file per quota.
    blob_quota_blocks: int = 8192
    blob_max_bytes: int = 4 * 1024 * 1024 * 1024
    pow_per_connection: int = 20000
    # Mailbox lookups that miss the in-memory cache (each costs a storage read), per connection.
    lookup_rate: float = 100.0
    lookup_burst: int = 2000
    # Storage.
    max_batch: int = 512  # operations per group commit
    # ... and bytes written per group commit: the commit under way is what a new operation
    # waits for, so this bounds everyone's wait while one client floods the writer.
    max_batch_bytes: int = 1024 * 1024
    # Bytes kept free for the database (disk, and free pages in it): below, storing more gets
    # `full` while acknowledgements and deletions still run; an eighth is held in a reserve file,
    # released if the disk fills all the same; the WAL is kept under half (relay/storage.py).
    disk_reserve: int = 64 * 1024 * 1024
    # Largest database, bytes (0: the disk's size); reaching it counts as a full disk.
    max_db_bytes: int = 0
    # Storage operations waiting at most (each deposit holds a 16 KiB block meanwhile): beyond,
    # deposits and blob uploads get `busy`, so a flood cannot exhaust memory.
    max_pending_writes: int = 8192
