"""Every knob of the relay, with its default (docs/relay-protocol.md, section Limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    data_dir: str = "./relay-data"
    # Where the relay stores: "" for SQLite in data_dir (one process); a postgresql:// URL for a
    # database several relay nodes share (relay/storage_pg.py, docs/relay-protocol.md §8.1).
    store: str = ""
    # PostgreSQL: at every checkpoint_interval the relay VACUUMs its tables, and rewrites one
    # holding at most this many rows (VACUUM FULL), so deleted blocks leave its files; a larger
    # one keeps them in freed space until new rows reuse it (docs/threat-model.md).
    pg_rewrite_rows: int = 4096
    # PostgreSQL: a node announces the deposits committed within this many milliseconds in one
    # notification (a NOTIFY serialises commits); 0: each deposit notifies in its own commit.
    pg_notify_batch_ms: float = 5.0
    # Queued blocks expire after this many seconds (default 14 days); blobs after blob_ttl.
    message_ttl: int = 14 * 24 * 3600
    # Expiry is stored rounded up to this many seconds, so it does not reveal arrival times.
    expiry_granularity: int = 3600
    sweep_interval: float = 60.0
    checkpoint_interval: float = 60.0
    # Proof-of-work difficulties in leading zero bits (0 disables a check).
    pow_deposit_bits: int = 18
    pow_bundle_bits: int = 18
    pow_blob_bits: int = 20  # per BLOB_POW_UNIT (256 blocks) of quota, rounded up (§6)
    # CREATE pays for a mailbox that may hold queue_limit blocks: 2^22 hashes, a few seconds of
    # one core, once per mailbox (docs/relay-protocol.md §9, Limits: the arithmetic).
    pow_create_bits: int = 22
    # Frames and connections.
    max_frame: int = 65536
    max_connections: int = 10000
    # Connections one source address (an IPv6 /64) may hold, counted from the TCP accept, before
    # any HTTP (0: no cap). Loopback peers (a reverse proxy, Tor) are exempt unless
    # source_cap_loopback: behind those every client has the proxy's address (relay/gate.py).
    source_connections: int = 1000
    source_cap_loopback: bool = False
    # Accept a CREATE with a delete-only key (§4.1). Off: such a CREATE is answered bad_frame,
    # as a relay from before delete keys does (its mailboxes can be deleted by the owner key only).
    delete_keys: bool = True
    # Seconds for a new connection to send HELLO, and (counted from the TCP accept) to complete
    # the HTTP upgrade before it.
    handshake_timeout: float = 10.0
    # New connections set up (handed to the HTTP server, whose upgrade, HELLO and SUBSCRIBE
    # follow) per turn of the event loop, in arrival order (relay/turnstile.py; 0: no bound).
    setups_per_turn: int = 2
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
    # The kernel's send buffer of each accepted socket (SO_SNDBUF; 0: the system's, which on
    # Linux grows to tcp_wmem's maximum, 4 MiB, for a client that does not read): outside
    # conn_buffer, so bounded too (issue 15 review, item 6). Linux doubles the value set.
    conn_sndbuf: int = 256 * 1024
    stall_timeout: float = 60.0
    frame_rate: float = 5000.0  # frames per second per connection (token bucket)
    frame_burst: int = 10000
    # Mailboxes.
    max_mailboxes: int = 1_000_000
    # A mailbox whose owner sent no command (and held no subscription) for mailbox_ttl seconds
    # is deleted. Its last use is stored rounded down to mailbox_use_granularity (a month: the
    # coarsest that still tells a 90-day-old mailbox from a live one): metadata, kept coarse.
    mailbox_ttl: int = 90 * 24 * 3600
    mailbox_use_granularity: int = 30 * 24 * 3600
    creates_per_connection: int = 1000
    subscriptions_per_connection: int = 1000
    # Blocks queued per mailbox: an honest user away 14 days under cover traffic finds at most
    # ~32 cover blocks per contact mailbox plus what the contact really sent (§9's arithmetic).
    queue_limit: int = 1024
    window: int = 32  # unacknowledged blocks in flight per subscription
    deposit_rate: float = 200.0  # deposits per second per mailbox (token bucket)
    deposit_burst: int = 1000
    tokens_per_mailbox: int = 16
    # Prekey bundles.
    bundle_items_per_kind: int = 200
    # One-time items handed out per second per mailbox (token bucket); fetches beyond it get
    # the base alone (last-resort keys), never a refusal: one per minute outlasts any honest
    # address's first contacts and bounds what a drainer makes the owner replenish.
    bundle_fetch_rate: float = 1 / 60
    bundle_fetch_burst: int = 20
    bundle_fetches_per_connection: int = 100
    # Blob area (file attachments): 8192 blocks of 16 KiB admit one 100 MB file per quota.
    blob_quota_blocks: int = 8192
    # A quota not used by a put for blob_quota_idle seconds, or granted blob_quota_lifetime
    # seconds ago, is released: one proof of work cannot hold the blob area for as long as a
    # connection lives (review of issue 15, item 4). An upload that takes longer asks (and
    # pays) for a new quota on its next connection, as the daemon does after `limit`.
    blob_quota_idle: float = 120.0
    blob_quota_lifetime: float = 600.0
    blob_max_bytes: int = 4 * 1024 * 1024 * 1024
    # Unfetched blobs expire after blob_ttl seconds (SimpleX's file relays: 48 h), not message_ttl.
    blob_ttl: int = 48 * 3600
    pow_per_connection: int = 20000
    # Mailbox lookups that miss the in-memory cache (each costs a storage read), per connection.
    lookup_rate: float = 100.0
    lookup_burst: int = 2000
    # Relay-wide storage budget for queued blocks and blobs, bytes (each counted as one
    # 16 KiB block); beyond it deposits and blob quotas get `full` (E_FULL).
    # 0: half of (the free space of the file system holding data_dir + the relay's files there),
    # measured at start.
    storage_budget: int = 0
    # Above crowded_fraction of that budget, a deposit to a mailbox already holding
    # crowded_queue_limit blocks gets `queue_full`: whoever fills the budget must spread it over
    # many mailboxes (each paid by CREATE), and short honest queues still take deposits while
    # it is crowded (review of issue 15, item 3; docs/relay-protocol.md, Limits).
    crowded_fraction: float = 0.5
    crowded_queue_limit: int = 64
    # Storage.
    max_batch: int = 512  # operations per group commit
    # ... and bytes written per group commit: the commit under way is what a new operation
    # waits for, so this bounds everyone's wait while one client floods the writer.
    max_batch_bytes: int = 1024 * 1024
    # WAL checkpoints run on a thread of their own after this many bytes committed, instead of
    # inside the commit that fills the WAL (relay/checkpointer.py; 0: SQLite's own only).
    checkpoint_bytes: int = 4 * 1024 * 1024
    # Bytes kept free for the database (disk, and free pages in it): below, storing more gets
    # `full` while acknowledgements and deletions still run; an eighth is held in a reserve file,
    # released if the disk fills all the same; the WAL is kept under half (relay/storage.py).
    disk_reserve: int = 64 * 1024 * 1024
    # Largest database, bytes (0: the disk's size); reaching it counts as a full disk.
    max_db_bytes: int = 0
    # Storage operations waiting at most (each deposit holds a 16 KiB block meanwhile): beyond,
    # deposits and blob uploads get `busy`, so a flood cannot exhaust memory.
    max_pending_writes: int = 8192
    # Fair share of the relay while it is loaded (issue 15, item 8): with fair_load storage
    # operations waiting relay-wide, a connection that already has fair_share of its own waiting
    # is not read further (its next DEPOSIT or BLOB_PUT waits, before any crypto or storage
    # work) until one of its own is done. One client's frames then stop crowding the event loop
    # and the writer while a light connection's deposit is still taken (0: off).
    fair_load: int = 16
    fair_share: int = 2
