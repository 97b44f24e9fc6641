"""Every number this package respects or defaults to, in one place.

The first block mirrors PROTOCOL.md §8 ("Limits") name for name and value
for value; ``tests/test_spec_tables.py`` parses that table and checks that
each entry here agrees, so the spec and this file cannot drift apart. The
second block holds the client's own defaults (timeouts, attempts, backoff),
which mirror the Rust reference client (PROTOCOL.md §9, "Reference
defaults"). Nothing else in the package hard-codes a limit: it imports it
from here.
"""

from __future__ import annotations

# --- PROTOCOL.md §8: wire limits (bind both peers) and server limits ----

#: Version byte of every frame header. Another version is refused.
PROTOCOL_VERSION: int = 1
#: Fixed header size (§2.1).
HEADER_BYTES: int = 32
#: The largest frame body. A larger ``body_len`` is refused before any
#: allocation, by the server and by this package's frame reader.
FRAME_BODY_BYTES_MAX: int = 65536
#: Most operations in one RESERVE_BATCH or BATCH frame.
BATCH_OPS_MAX: int = 1024
#: Longest CONFIRM ``payment_ref``.
PAYMENT_REF_BYTES_MAX: int = 64
#: Longest HELLO token.
TOKEN_BYTES_MAX: int = 256
#: Longest ERROR message (the server truncates at a UTF-8 boundary).
ERROR_MESSAGE_BYTES_MAX: int = 1024
#: Requests one connection may have in flight; past it the server stops
#: reading that connection. The client keeps at most this many frames
#: in flight per connection (a BATCH counts as one).
CONNECTION_REQUESTS_INFLIGHT_MAX: int = 4096
#: From accept to a successful HELLO.
HANDSHAKE_TIMEOUT_MS: int = 5000
#: Default per-user RESERVE rate of the server (``rate_limited`` above it).
USER_RESERVES_PER_S_DEFAULT: int = 100
#: Default burst of that rate.
USER_RESERVES_BURST_DEFAULT: int = 200
#: An authenticated connection idle this long is closed by the server;
#: the client then reconnects on its next call.
CONNECTION_IDLE_TIMEOUT_MS: int = 300000
#: The ``detail`` of ``busy``, and the delay after a STATUS ``busy``
#: (which carries none).
BUSY_RETRY_AFTER_MS: int = 10
#: Most concurrent connections of the server.
CONNECTIONS_MAX: int = 10000
#: Units per sale (initial stock plus restocks), 2^48.
STOCK_UNITS_MAX: int = 281474976710656
#: Longest reservation ``ttl_ms``: one week.
RESERVATION_TTL_MS_MAX: int = 604800000
#: How often an idle shard runs expiry.
EXPIRY_TICK_MS: int = 10
#: Most hot shards the server creates.
HOT_SHARDS_MAX: int = 64
#: Operations held for a sale while it moves (SALE_MOVE, or the server's
#: demand monitor); beyond it they are answered ``busy``.
MOVE_HELD_OPS_MAX: int = 65536
#: Largest record payload in the log and in LOG_BATCH / FOLLOW_BATCH.
RECORD_PAYLOAD_BYTES_MAX: int = 4096
#: An idle REPLICATE stream sends an empty LOG_BATCH this often.
REPLICATION_HEARTBEAT_MS: int = 1000
#: Concurrent REPLICATE streams.
REPLICATION_STREAMS_MAX: int = 8
#: Frames one stream or dump may have queued for its socket.
REPLICATION_FRAMES_INFLIGHT_MAX: int = 16
#: STATE_DUMPs at once.
STATE_DUMPS_CONCURRENT_MAX: int = 1
#: Most locations (warehouses) of one sale.
LOCATIONS_PER_SALE_MAX: int = 16
#: Most locations one RESERVE_AT lists, and one region orders.
RESERVE_PREFS_MAX: int = 8
#: Most regions one sale maps.
REGIONS_PER_SALE_MAX: int = 16
#: Highest ``admit_rate_per_s`` of a queued sale.
QUEUE_ADMIT_RATE_PER_S_MAX: int = 1000000
#: Longest admission window: one hour.
QUEUE_ADMISSION_MS_MAX: int = 3600000
#: Latest ``start_at_ms`` (the year 2286).
QUEUE_START_AT_MS_MAX: int = 9999999999999
#: Users one sale's line holds.
QUEUE_WAITING_MAX: int = 10000000
#: How long a closing server keeps reading (and discarding) after its
#: last reply.
CONNECTION_CLOSE_LINGER_MS: int = 1000
#: At shutdown, how long connections get to send the replies they owe.
SHUTDOWN_CONNECTIONS_DRAIN_MS: int = 2000
#: Term history entries a FOLLOW carries.
HISTORY_ENTRIES_MAX: int = 1024
#: Snapshot bytes in one SNAPSHOT_CHUNK.
SNAPSHOT_CHUNK_BYTES_MAX: int = 61440
#: The leader's etcd lease by default.
LEADER_LEASE_TTL_MS_DEFAULT: int = 2000
#: Capacity of a shard's queue in messages (informative).
SHARD_QUEUE_MESSAGES_MAX: int = 65536
#: Operations queued for one shard (informative).
SHARD_QUEUE_OPS_MAX: int = 65536

# --- Derived wire sizes -------------------------------------------------

#: Largest u64 / u128 values, for argument checks before encoding.
U64_MAX: int = (1 << 64) - 1
U128_MAX: int = (1 << 128) - 1
U32_MAX: int = (1 << 32) - 1
U16_MAX: int = (1 << 16) - 1
#: Bytes of the ``count`` field that opens a batch body.
BATCH_COUNT_BYTES: int = 2

# --- Client defaults (PROTOCOL.md §9, "Reference defaults") --------------

#: How long one attempt waits for its reply, in seconds.
REQUEST_TIMEOUT_S: float = 5.0
#: How long opening a connection (TCP, then TLS) may take, in seconds.
CONNECT_TIMEOUT_S: float = 3.0
#: Attempts per call, the first included, on transient failures and on
#: ``busy`` / ``rate_limited`` / ``shutting_down``.
MAX_ATTEMPTS: int = 5
#: Backoff after a transport failure: starts here and doubles...
BACKOFF_INITIAL_S: float = 0.005
#: ...up to this.
BACKOFF_MAX_S: float = 0.5
#: A server's retry-after hint is clamped to this range (ms), so a zero
#: hint does not spin and a huge one does not stall a checkout.
RETRY_AFTER_MIN_MS: int = 1
RETRY_AFTER_MAX_MS: int = 1000
#: Delay before resending after ``shutting_down`` (it carries no hint).
SHUTTING_DOWN_RETRY_MS: int = 100
#: How long a call keeps looking for a leader during a failover, seconds.
FAILOVER_TIMEOUT_S: float = 10.0
#: Pause between two rounds of asking the nodes who leads, seconds.
LEADER_POLL_INTERVAL_S: float = 0.05
#: Connections a client opens to its server. A few, so one slow socket
#: does not hold every call, while each still carries big batches.
CONNECTIONS_DEFAULT: int = 2
#: Request ids of BATCH frames the client packs carry this bit, so they
#: never meet the ids of individual calls (counted from 1).
PACKED_REQUEST_ID_BIT: int = 1 << 63
#: The default server address (the reference server's default).
DEFAULT_ADDRESS: str = "127.0.0.1:7070"
#: Environment variable the token is read from when none is given.
TOKEN_ENV: str = "STAMPEDE_TOKEN"
