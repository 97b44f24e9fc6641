-- stampede's system of record. Everything lives in the `stampede` schema so
-- it can share a database with other applications.
--
-- Ids on the wire are u64 (sku, user) and u128 (reservation): u64 values
-- are stored in bigint with the same 64 bits (a value >= 2^63 reads as
-- negative), u128 reservation ids as uuid (big-endian bytes of the id).
-- Times are the engine's own (unix ms in the log), stored as timestamptz.

CREATE SCHEMA stampede;

-- One row per sale: the engine's counters. The CHECK is the invariant the
-- engine asserts; a batch that would break it fails and nothing is applied.
CREATE TABLE stampede.sales (
    sku            bigint      PRIMARY KEY,
    total          bigint      NOT NULL,
    available      bigint      NOT NULL,
    reserved       bigint      NOT NULL,
    sold           bigint      NOT NULL,
    limit_per_user integer     NOT NULL,
    ttl_ms         bigint      NOT NULL,
    hot            boolean     NOT NULL,
    paused         boolean     NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_lsn    bigint      NOT NULL,
    CONSTRAINT counters_add_up CHECK (
        available >= 0 AND reserved >= 0 AND sold >= 0 AND available + reserved + sold = total
    )
);

-- Every reservation ever made, with its current state.
CREATE TABLE stampede.reservations (
    id           uuid        PRIMARY KEY,
    sku          bigint      NOT NULL,
    user_id      bigint      NOT NULL,
    qty          integer     NOT NULL CHECK (qty > 0),
    state        text        NOT NULL CHECK (state IN ('held', 'confirmed', 'released', 'expired')),
    reserved_at  timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    -- When it was confirmed, released or expired (NULL while held).
    settled_at   timestamptz,
    confirmed_at timestamptz,
    payment_ref  bytea,
    updated_lsn  bigint      NOT NULL
);
CREATE INDEX reservations_by_sku_user ON stampede.reservations (sku, user_id);

-- Append-only: one row per settled log record. The primary key on the LSN
-- makes applying a record twice impossible, not merely unlikely.
CREATE TABLE stampede.ledger (
    lsn            bigint      PRIMARY KEY,
    kind           text        NOT NULL,
    sku            bigint      NOT NULL,
    reservation_id uuid,
    user_id        bigint,
    qty            bigint,
    at             timestamptz NOT NULL,
    expires_at     timestamptz,
    payment_ref    bytea,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);

-- How far the log is settled: advanced in the same transaction as the
-- records it covers, so a crash can neither lose nor repeat one.
CREATE TABLE stampede.watermark (
    id               boolean     PRIMARY KEY DEFAULT true CHECK (id),
    settled_lsn      bigint      NOT NULL,
    -- Engine time of the record at settled_lsn.
    settled_event_at timestamptz,
    updated_at       timestamptz NOT NULL
);
INSERT INTO stampede.watermark (id, settled_lsn, settled_event_at, updated_at) VALUES (true, 0, NULL, now());
