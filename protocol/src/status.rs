//! Numbered status codes: every reply carries one.
//!
//! The numbers are part of the wire format and are **never renumbered or
//! reused**: a client written against version 1 of the spec must read a
//! status the same way forever. New outcomes get new numbers. The table in
//! PROTOCOL.md ("Status codes") is generated from the same list and a test
//! checks the two agree.
//!
//! Domain outcomes (sold out, limit exceeded, ...) are ordinary replies, not
//! errors: a checkout service must handle them on its happy path. Only the
//! 50-series protocol errors close the connection.

/// A stable, numbered outcome. `#[repr(u16)]`: the discriminant is the wire value.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    // --- success -------------------------------------------------------
    /// Generic success (ping, hello, admin operations).
    Ok = 0,
    /// RESERVE: units are held for the caller until `detail` (unix ms).
    Reserved = 1,
    /// CONFIRM: the reservation is sold. `detail` = confirm time (unix ms).
    Confirmed = 2,
    /// RELEASE: the reservation's units went back to available stock.
    Released = 3,
    /// JOIN / POLL: in line; the ticket carries the position.
    Waiting = 4,
    /// JOIN / POLL: admitted; reserve before `admitted_until_ms`.
    Admitted = 5,

    // --- domain refusals (nothing changed) ----------------------------
    /// No unit of this SKU is available right now.
    SoldOut = 10,
    /// Some units are available but fewer than the quantity asked for.
    InsufficientStock = 11,
    /// The user's reserved + sold units for this SKU would exceed the limit.
    LimitExceeded = 12,
    /// The sale is paused by an admin.
    Paused = 13,
    /// No sale exists for this SKU.
    UnknownSku = 14,
    /// No reservation with this id exists.
    UnknownReservation = 15,
    /// The reservation expired before it was confirmed; its stock went back.
    /// The caller should void its payment authorisation.
    Expired = 16,
    /// CONFIRM on a reservation that the client released.
    AlreadyReleased = 17,
    /// RELEASE on a reservation that is already confirmed (sold).
    AlreadyConfirmed = 18,
    /// The reservation id was already used by a different request
    /// (other SKU, user, quantity or payment reference).
    IdConflict = 19,
    /// SALE_CREATE for a SKU that already has a sale.
    SaleExists = 20,
    /// A field is out of range (quantity 0, stock over the maximum, ...).
    InvalidArgument = 21,
    /// REPLICATE from an LSN the log no longer holds (retention deleted
    /// it) or that lies beyond its end.
    LsnUnavailable = 22,
    /// REPLICATE or STATE_DUMP on a server that keeps no write-ahead log.
    NoLog = 23,
    /// RESERVE on a queued sale by a user without a valid admission.
    NotAdmitted = 24,
    /// POLL for a user who has not joined the sale's queue.
    NoTicket = 25,
    /// A location (warehouse) the sale does not have: RESERVE_AT's list,
    /// RESTOCK_AT, REGION_SET.
    UnknownLocation = 26,
    /// LOCATION_ADD of a location the sale already has.
    LocationExists = 27,

    // --- overload (retry later) ---------------------------------------
    /// The shard's queue is full. `detail` = suggested retry delay in ms.
    Busy = 30,
    /// The server is shutting down; retry against it (or another) later.
    ShuttingDown = 31,
    /// This user sent RESERVEs faster than the per-user rate allows.
    /// `detail` = when to retry, in ms. Nothing was done.
    RateLimited = 32,
    /// This node does not lead its cluster (a standby, a node still
    /// electing, or a leader whose lease ran out). Nothing was done: ask
    /// CLUSTER for the leader and resend there.
    NotLeader = 33,
    /// The leader has fewer synchronous standbys than it must wait for;
    /// nothing was done (no acknowledgement may rest on one disk only).
    SyncStandbyUnavailable = 34,
    /// FOLLOW between nodes of different terms: the older side must step
    /// down or catch up first.
    StaleTerm = 35,

    // --- auth ---------------------------------------------------------
    /// A request other than HELLO arrived before a successful HELLO.
    Unauthenticated = 40,
    /// HELLO carried a token that matches no configured role.
    AuthFailed = 41,
    /// The connection's role may not perform this operation.
    Forbidden = 42,

    // --- protocol errors: the server replies, then closes -------------
    /// The first four bytes of a frame are not the magic number.
    BadMagic = 50,
    /// The frame's protocol version is not one this server speaks.
    UnsupportedVersion = 51,
    /// The declared body length exceeds `FRAME_BODY_BYTES_MAX`.
    FrameTooLarge = 52,
    /// The opcode is not defined (or is a reply opcode sent as a request).
    UnknownOpcode = 53,
    /// Header or body checksum mismatch.
    BadChecksum = 54,
    /// The body does not match the opcode's layout (too short, too long,
    /// bad enum value, non-zero reserved bytes, invalid UTF-8).
    MalformedBody = 55,
    /// A batch holds more operations than `BATCH_OPS_MAX` (or zero).
    BatchTooLarge = 56,

    /// The server failed in a way that is not the client's fault.
    InternalError = 60,
}

impl Status {
    /// Every status, in wire order. Used by the spec table test and the decoder.
    pub const ALL: &'static [Status] = &[
        Status::Ok,
        Status::Reserved,
        Status::Confirmed,
        Status::Released,
        Status::Waiting,
        Status::Admitted,
        Status::SoldOut,
        Status::InsufficientStock,
        Status::LimitExceeded,
        Status::Paused,
        Status::UnknownSku,
        Status::UnknownReservation,
        Status::Expired,
        Status::AlreadyReleased,
        Status::AlreadyConfirmed,
        Status::IdConflict,
        Status::SaleExists,
        Status::InvalidArgument,
        Status::LsnUnavailable,
        Status::NoLog,
        Status::NotAdmitted,
        Status::NoTicket,
        Status::UnknownLocation,
        Status::LocationExists,
        Status::Busy,
        Status::ShuttingDown,
        Status::RateLimited,
        Status::NotLeader,
        Status::SyncStandbyUnavailable,
        Status::StaleTerm,
        Status::Unauthenticated,
        Status::AuthFailed,
        Status::Forbidden,
        Status::BadMagic,
        Status::UnsupportedVersion,
        Status::FrameTooLarge,
        Status::UnknownOpcode,
        Status::BadChecksum,
        Status::MalformedBody,
        Status::BatchTooLarge,
        Status::InternalError,
    ];

    /// The wire value.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// Decode a wire value; `None` for a number this version does not know.
    pub fn from_code(code: u16) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| s.code() == code)
    }

    /// The snake_case name used in JSON output and in PROTOCOL.md.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Reserved => "reserved",
            Status::Confirmed => "confirmed",
            Status::Released => "released",
            Status::Waiting => "waiting",
            Status::Admitted => "admitted",
            Status::SoldOut => "sold_out",
            Status::InsufficientStock => "insufficient_stock",
            Status::LimitExceeded => "limit_exceeded",
            Status::Paused => "paused",
            Status::UnknownSku => "unknown_sku",
            Status::UnknownReservation => "unknown_reservation",
            Status::Expired => "expired",
            Status::AlreadyReleased => "already_released",
            Status::AlreadyConfirmed => "already_confirmed",
            Status::IdConflict => "id_conflict",
            Status::SaleExists => "sale_exists",
            Status::InvalidArgument => "invalid_argument",
            Status::LsnUnavailable => "lsn_unavailable",
            Status::NoLog => "no_log",
            Status::NotAdmitted => "not_admitted",
            Status::NoTicket => "no_ticket",
            Status::UnknownLocation => "unknown_location",
            Status::LocationExists => "location_exists",
            Status::Busy => "busy",
            Status::ShuttingDown => "shutting_down",
            Status::RateLimited => "rate_limited",
            Status::NotLeader => "not_leader",
            Status::SyncStandbyUnavailable => "sync_standby_unavailable",
            Status::StaleTerm => "stale_term",
            Status::Unauthenticated => "unauthenticated",
            Status::AuthFailed => "auth_failed",
            Status::Forbidden => "forbidden",
            Status::BadMagic => "bad_magic",
            Status::UnsupportedVersion => "unsupported_version",
            Status::FrameTooLarge => "frame_too_large",
            Status::UnknownOpcode => "unknown_opcode",
            Status::BadChecksum => "bad_checksum",
            Status::MalformedBody => "malformed_body",
            Status::BatchTooLarge => "batch_too_large",
            Status::InternalError => "internal_error",
        }
    }

    /// True for the 50-series: the server closes the connection after replying.
    pub const fn is_protocol_error(self) -> bool {
        let code = self as u16;
        code >= 50 && code < 60
    }

    /// True when retrying the same request later may succeed.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Status::Busy
                | Status::ShuttingDown
                | Status::RateLimited
                | Status::NotLeader
                | Status::SyncStandbyUnavailable
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for &status in Status::ALL {
            assert!(seen.insert(status.code()), "duplicate code {}", status.code());
            assert_eq!(Status::from_code(status.code()), Some(status));
        }
        assert_eq!(Status::from_code(9999), None);
    }
}
