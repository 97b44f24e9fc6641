//! Wire limits. Every number a peer must respect lives here, with the reason
//! for it; PROTOCOL.md quotes these values and a test checks it does.
//! Server-side limits (queues, connections) are in the server's `limits.rs`,
//! which re-exports this module so that file is the one place to read them all.

/// Protocol version spoken by this crate. A frame with another version is
/// refused with `unsupported_version`.
pub const PROTOCOL_VERSION: u8 = 1;

/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 32;

/// Largest frame body accepted. 64 KiB holds a full batch (1024 x 36-byte
/// reserve operations = 36 KiB plus the count) with room to spare, while a
/// connection's receive buffer stays small enough that 10k connections fit
/// in memory. The decoder refuses a larger declared length before allocating.
pub const FRAME_BODY_BYTES_MAX: usize = 64 * 1024;

/// Most reserve operations in one RESERVE_BATCH frame. 1024 amortises the
/// per-frame cost (header, checksum, syscall) to well under 1% while one
/// batch still completes within a single shard drain cycle.
pub const BATCH_OPS_MAX: usize = 1024;

/// Longest payment reference in CONFIRM. Payment provider ids (Stripe,
/// Adyen, PayPal) are under 40 characters; 64 leaves room and bounds the
/// per-reservation memory.
pub const PAYMENT_REF_BYTES_MAX: usize = 64;

/// Longest auth token in HELLO.
pub const TOKEN_BYTES_MAX: usize = 256;

/// Longest human-readable message in an ERROR reply.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// Retry delay a client uses for a `busy` reply that carries no hint
/// (the STATUS reply has no detail field).
pub const BUSY_RETRY_AFTER_MS_DEFAULT: u64 = 10;

/// Largest log record payload (the WAL and the replication stream). The largest event (CONFIRMED with a maximal
/// payment reference) is 98 bytes; anything near this bound is corruption.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 4096;

/// A REPLICATE stream sends an empty LOG_BATCH after this long without
/// records, so the consumer can tell an idle log from a dead connection
/// and always knows the server's durable LSN (its lag).
pub const REPLICATION_HEARTBEAT_MS: u64 = 1_000;

/// Term history entries a FOLLOW carries (the newest): one per leader
/// change the follower's log has seen. Where two logs part is recent, so a
/// long history's oldest entries never matter; this bounds the frame.
pub const HISTORY_ENTRIES_MAX: usize = 1024;

/// Bytes of snapshot file in one SNAPSHOT_CHUNK: a frame with room to spare.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 60 * 1024;

/// Longest admission window of a queued sale: 1 hour. An admitted user
/// holds a place no one behind can take; longer than this the line stalls.
pub const QUEUE_ADMISSION_MS_MAX: u64 = 3600 * 1000;

/// Most users admitted per second by one queue.
pub const QUEUE_ADMIT_RATE_PER_S_MAX: u32 = 1_000_000;

/// Latest queue start time (unix ms): the year 2286. Anything later is a
/// unit mistake (nanoseconds or microseconds), refused with
/// `invalid_argument` rather than a sale that never opens.
pub const QUEUE_START_AT_MS_MAX: u64 = 9_999_999_999_999;

/// Most locations (warehouses) one sale's stock may be split over. A
/// retailer ships a product from a handful of warehouses; 16 keeps a
/// reservation's choice a scan of one cache line or two, and the index of
/// a location fits the reservation record's spare byte.
pub const LOCATIONS_PER_SALE_MAX: usize = 16;

/// Most locations a RESERVE_AT lists in order of preference, and most in
/// one region's order. The shopper's nearest few warehouses; past 8, "any"
/// (the sale's default order) says the same.
pub const RESERVE_PREFS_MAX: usize = 8;

/// Most regions a sale maps to orders of locations.
pub const REGIONS_PER_SALE_MAX: usize = 16;
