//! PostgreSQL: connecting, the schema (sqlx migrations embedded in the
//! binary), reading rows into the [`Model`] and writing a settled batch.
//!
//! Queries are runtime-checked (`sqlx::query`, not the `query!` macros), so
//! a fresh clone builds without a database. Every multi-row write is one
//! statement per table per batch, however many events the batch holds:
//! the two big inserts (new reservations, ledger) are binary `COPY`, about
//! twice as fast as `INSERT ... SELECT FROM UNNEST` here; the rest (sales,
//! settled reservations) are updates over `UNNEST`ed arrays.

use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Row;
use stampede_protocol::event::Event;
use stampede_protocol::message::HoldState;
use uuid::Uuid;

use crate::model::{event_kind, LocationRow, Model, Origin, ReservationRow, SaleRow};

/// The schema this binary writes; `sqlx::migrate!` embeds the files at
/// compile time (no database needed to build).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How PostgreSQL was reached, for error messages (the password removed).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &credentials[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Connect, with an error that says what to do when PostgreSQL is down.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(5)).connect(url).await.with_context(
        || {
            format!(
                "cannot reach PostgreSQL at {} (is it running? on a project machine: \
                 pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)",
                redact(url)
            )
        },
    )
}

/// Whether an error is the database (or the way to it) being briefly
/// unavailable: a restart, a failover, a dropped connection. Such work is
/// retried from the watermark; anything else (bad credentials, a missing
/// database or schema, a constraint violated) needs a person.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: admin shutdown, crash
            // shutdown, cannot connect now (starting up or shutting down);
            // 53300: too many connections; 40001/40P01: serialization
            // failure, deadlock (the transaction was rolled back).
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
        }),
        _ => false,
    }
}

/// Whether an error from [`connect`], [`migrate`] or [`check_schema`] is
/// transient (see [`is_transient`]).
pub fn is_transient_anyhow(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.downcast_ref::<sqlx::Error>().is_some_and(is_transient))
        || error.chain().any(|cause| {
            cause.downcast_ref::<sqlx::migrate::MigrateError>().is_some_and(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => is_transient(e),
                _ => false,
            })
        })
}

/// Bring the schema up to this binary's version (idempotent).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying the stampede schema migrations")
}

/// Refuse to work against a schema this binary does not match.
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .context("checking the schema version")?;
    let applied: Vec<i64> = if exists {
        sqlx::query_scalar("SELECT version FROM public._sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .context("reading the schema version")?
    } else {
        Vec::new()
    };
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let needed = *known.last().expect("at least one migration");
    let Some(&current) = applied.last() else {
        bail!("the database has no stampede schema; create it with `stampede-reconciler migrate`");
    };
    if let Some(unknown) = applied.iter().find(|v| !known.contains(v)) {
        bail!("the database schema has version {unknown}, newer than this binary knows ({needed}): upgrade the reconciler");
    }
    if current < needed {
        bail!(
            "the database schema is at version {current}, older than this binary needs ({needed}): \
             run `stampede-reconciler migrate`"
        );
    }
    Ok(())
}

/// The settled watermark: `(settled_lsn, engine time of that record in ms)`.
pub async fn watermark(conn: &mut PgConnection, for_update: bool) -> sqlx::Result<(u64, Option<u64>)> {
    let sql = if for_update {
        "SELECT settled_lsn, (extract(epoch FROM settled_event_at) * 1000)::int8 FROM stampede.watermark FOR UPDATE"
    } else {
        "SELECT settled_lsn, (extract(epoch FROM settled_event_at) * 1000)::int8 FROM stampede.watermark"
    };
    let row = sqlx::query(sql).fetch_one(&mut *conn).await?;
    Ok((row.get::<i64, _>(0) as u64, row.get::<Option<i64>, _>(1).map(|v| v as u64)))
}

fn state_from(name: &str) -> Result<HoldState, sqlx::Error> {
    [HoldState::Held, HoldState::Confirmed, HoldState::Released, HoldState::Expired]
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown reservation state {name:?}").into()))
}

const SALE_COLUMNS: &str = "sku, total, available, reserved, sold, limit_per_user, ttl_ms, hot, paused, \
     (extract(epoch FROM created_at) * 1000)::int8";

fn sale_row(row: &sqlx::postgres::PgRow) -> SaleRow {
    SaleRow {
        sku: row.get::<i64, _>(0) as u64,
        total: row.get::<i64, _>(1) as u64,
        available: row.get::<i64, _>(2) as u64,
        reserved: row.get::<i64, _>(3) as u64,
        sold: row.get::<i64, _>(4) as u64,
        limit_per_user: row.get::<i32, _>(5) as u32,
        ttl_ms: row.get::<i64, _>(6) as u64,
        hot: row.get(7),
        paused: row.get(8),
        created_at_ms: row.get::<i64, _>(9) as u64,
        locations: Vec::new(),
    }
}

const LOCATION_COLUMNS: &str = "sku, location, total, available, reserved, sold";

/// Each loaded sale's location rows (in location order).
async fn load_locations(conn: &mut PgConnection, skus: Option<&[i64]>, model: &mut Model) -> sqlx::Result<()> {
    let rows = match skus {
        Some(skus) => {
            let sql = format!(
                "SELECT {LOCATION_COLUMNS} FROM stampede.sale_locations WHERE sku = ANY($1) ORDER BY sku, location"
            );
            sqlx::query(&sql).bind(skus).fetch_all(&mut *conn).await?
        }
        None => {
            let sql = format!("SELECT {LOCATION_COLUMNS} FROM stampede.sale_locations ORDER BY sku, location");
            sqlx::query(&sql).fetch_all(&mut *conn).await?
        }
    };
    for row in rows {
        let sku = row.get::<i64, _>(0) as u64;
        if let Some((sale, _)) = model.sales.get_mut(&sku) {
            sale.locations.push(LocationRow {
                location: row.get::<i32, _>(1) as u16,
                total: row.get::<i64, _>(2) as u64,
                available: row.get::<i64, _>(3) as u64,
                reserved: row.get::<i64, _>(4) as u64,
                sold: row.get::<i64, _>(5) as u64,
            });
        }
    }
    Ok(())
}

const RESERVATION_COLUMNS: &str = "id, sku, user_id, qty, state, \
     (extract(epoch FROM reserved_at) * 1000)::int8, (extract(epoch FROM expires_at) * 1000)::int8, \
     (extract(epoch FROM settled_at) * 1000)::int8, payment_ref, location";

fn reservation_row(row: &sqlx::postgres::PgRow) -> Result<ReservationRow, sqlx::Error> {
    Ok(ReservationRow {
        id: row.get::<Uuid, _>(0).as_u128(),
        sku: row.get::<i64, _>(1) as u64,
        user: row.get::<i64, _>(2) as u64,
        qty: row.get::<i64, _>(3) as u32,
        state: state_from(row.get::<&str, _>(4))?,
        reserved_at_ms: row.get::<i64, _>(5) as u64,
        expires_at_ms: row.get::<i64, _>(6) as u64,
        settled_at_ms: row.get::<Option<i64>, _>(7).map(|v| v as u64),
        payment_ref: row.get(8),
        location: row.get::<i32, _>(9) as u16,
    })
}

/// Load the given sales and reservations into `model` (settlement).
pub async fn load_touched(conn: &mut PgConnection, skus: &[u64], ids: &[u128], model: &mut Model) -> sqlx::Result<()> {
    if !skus.is_empty() {
        let skus: Vec<i64> = skus.iter().map(|&s| s as i64).collect();
        let sql = format!("SELECT {SALE_COLUMNS} FROM stampede.sales WHERE sku = ANY($1)");
        for row in sqlx::query(&sql).bind(&skus).fetch_all(&mut *conn).await? {
            model.load_sale(sale_row(&row));
        }
        load_locations(conn, Some(&skus), model).await?;
    }
    if !ids.is_empty() {
        let ids: Vec<Uuid> = ids.iter().map(|&id| Uuid::from_u128(id)).collect();
        let sql = format!("SELECT {RESERVATION_COLUMNS} FROM stampede.reservations WHERE id = ANY($1)");
        for row in sqlx::query(&sql).bind(&ids).fetch_all(&mut *conn).await? {
            model.load_reservation(reservation_row(&row)?);
        }
    }
    Ok(())
}

/// Load every sale and reservation (the report).
pub async fn load_all(conn: &mut PgConnection) -> sqlx::Result<Model> {
    let mut model = Model::default();
    for row in sqlx::query(&format!("SELECT {SALE_COLUMNS} FROM stampede.sales")).fetch_all(&mut *conn).await? {
        model.load_sale(sale_row(&row));
    }
    load_locations(conn, None, &mut model).await?;
    let sql = format!("SELECT {RESERVATION_COLUMNS} FROM stampede.reservations");
    for row in sqlx::query(&sql).fetch_all(&mut *conn).await? {
        model.load_reservation(reservation_row(&row)?);
    }
    Ok(model)
}

/// The ledger's extent: `(rows, min lsn, max lsn)`.
pub async fn ledger_extent(conn: &mut PgConnection) -> sqlx::Result<(u64, Option<u64>, Option<u64>)> {
    let row = sqlx::query("SELECT count(*), min(lsn), max(lsn) FROM stampede.ledger").fetch_one(&mut *conn).await?;
    Ok((
        row.get::<i64, _>(0) as u64,
        row.get::<Option<i64>, _>(1).map(|v| v as u64),
        row.get::<Option<i64>, _>(2).map(|v| v as u64),
    ))
}

/// Why a write did not go through as planned.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(
        "{table}: expected to update {expected} rows, updated {updated}: the database changed under the reconciler"
    )]
    RowCount { table: &'static str, expected: usize, updated: u64 },
}

/// Write the changed rows of `model`, the ledger rows of `records` and the
/// new watermark. Runs inside the caller's transaction.
pub async fn write_batch(conn: &mut PgConnection, model: &Model, records: &[(u64, Event)]) -> Result<(), WriteError> {
    let (first, last) = (records.first().expect("non-empty").0, records.last().expect("non-empty").0);
    debug_assert!(first <= last);
    let lsn = last as i64;

    // --- sales ----------------------------------------------------------
    let mut new_sales: Vec<&SaleRow> = Vec::new();
    let mut changed_sales: Vec<&SaleRow> = Vec::new();
    for (row, origin) in model.sales.values() {
        match origin {
            Origin::New => new_sales.push(row),
            Origin::Loaded { dirty: true } => changed_sales.push(row),
            Origin::Loaded { dirty: false } => {}
        }
    }
    if !new_sales.is_empty() {
        let col = |f: fn(&SaleRow) -> i64| new_sales.iter().map(|r| f(r)).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO stampede.sales (sku, total, available, reserved, sold, limit_per_user, ttl_ms, hot, paused, \
             created_at, updated_lsn) \
             SELECT u.sku, u.total, u.available, u.reserved, u.sold, u.lim, u.ttl, u.hot, u.paused, \
             to_timestamp(u.created / 1000::float8), $11 \
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int4[], $7::int8[], \
             $8::bool[], $9::bool[], $10::int8[]) AS u(sku, total, available, reserved, sold, lim, ttl, hot, paused, created)",
        )
        .bind(col(|r| r.sku as i64))
        .bind(col(|r| r.total as i64))
        .bind(col(|r| r.available as i64))
        .bind(col(|r| r.reserved as i64))
        .bind(col(|r| r.sold as i64))
        .bind(new_sales.iter().map(|r| r.limit_per_user as i32).collect::<Vec<i32>>())
        .bind(col(|r| r.ttl_ms as i64))
        .bind(new_sales.iter().map(|r| r.hot).collect::<Vec<bool>>())
        .bind(new_sales.iter().map(|r| r.paused).collect::<Vec<bool>>())
        .bind(col(|r| r.created_at_ms as i64))
        .bind(lsn)
        .execute(&mut *conn)
        .await?;
    }
    if !changed_sales.is_empty() {
        let col = |f: fn(&SaleRow) -> i64| changed_sales.iter().map(|r| f(r)).collect::<Vec<i64>>();
        let updated = sqlx::query(
            "UPDATE stampede.sales s SET total = u.total, available = u.available, reserved = u.reserved, \
             sold = u.sold, paused = u.paused, hot = u.hot, updated_lsn = $8 \
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::bool[], $7::bool[]) \
             AS u(sku, total, available, reserved, sold, paused, hot) WHERE s.sku = u.sku",
        )
        .bind(col(|r| r.sku as i64))
        .bind(col(|r| r.total as i64))
        .bind(col(|r| r.available as i64))
        .bind(col(|r| r.reserved as i64))
        .bind(col(|r| r.sold as i64))
        .bind(changed_sales.iter().map(|r| r.paused).collect::<Vec<bool>>())
        .bind(changed_sales.iter().map(|r| r.hot).collect::<Vec<bool>>())
        .bind(lsn)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if updated != changed_sales.len() as u64 {
            return Err(WriteError::RowCount { table: "sales", expected: changed_sales.len(), updated });
        }
    }
    // Every location of a new or changed sale, written whole (a sale has
    // at most 16; the CHECK holds each to its invariant).
    let located: Vec<(u64, &LocationRow)> = new_sales
        .iter()
        .chain(&changed_sales)
        .flat_map(|sale| sale.locations.iter().map(move |l| (sale.sku, l)))
        .collect();
    if !located.is_empty() {
        let col = |f: fn(&LocationRow) -> u64| located.iter().map(|(_, l)| f(l) as i64).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO stampede.sale_locations (sku, location, total, available, reserved, sold, updated_lsn) \
             SELECT u.sku, u.location, u.total, u.available, u.reserved, u.sold, $7 \
             FROM UNNEST($1::int8[], $2::int4[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) \
                  AS u(sku, location, total, available, reserved, sold) \
             ON CONFLICT (sku, location) DO UPDATE SET total = EXCLUDED.total, available = EXCLUDED.available, \
             reserved = EXCLUDED.reserved, sold = EXCLUDED.sold, updated_lsn = EXCLUDED.updated_lsn",
        )
        .bind(located.iter().map(|(sku, _)| *sku as i64).collect::<Vec<i64>>())
        .bind(located.iter().map(|(_, l)| i32::from(l.location)).collect::<Vec<i32>>())
        .bind(col(|l| l.total))
        .bind(col(|l| l.available))
        .bind(col(|l| l.reserved))
        .bind(col(|l| l.sold))
        .bind(lsn)
        .execute(&mut *conn)
        .await?;
    }

    // --- reservations -----------------------------------------------------
    let mut new_holds: Vec<&ReservationRow> = Vec::new();
    let mut changed_holds: Vec<&ReservationRow> = Vec::new();
    for (row, origin) in model.reservations.values() {
        match origin {
            Origin::New => new_holds.push(row),
            Origin::Loaded { dirty: true } => changed_holds.push(row),
            Origin::Loaded { dirty: false } => {}
        }
    }
    if !new_holds.is_empty() {
        let mut copy = CopyBinary::new();
        for r in &new_holds {
            copy.row(12);
            copy.uuid(r.id);
            copy.i64(r.sku as i64);
            copy.i64(r.user as i64);
            copy.i64(i64::from(r.qty));
            copy.text(r.state.name());
            copy.timestamp(Some(r.reserved_at_ms));
            copy.timestamp(Some(r.expires_at_ms));
            copy.timestamp(r.settled_at_ms);
            copy.timestamp(r.settled_at_ms.filter(|_| r.state == HoldState::Confirmed));
            copy.bytea(r.payment_ref.as_deref());
            copy.i64(lsn);
            copy.i32(i32::from(r.location));
        }
        copy.send(
            conn,
            "COPY stampede.reservations (id, sku, user_id, qty, state, reserved_at, expires_at, settled_at, \
             confirmed_at, payment_ref, updated_lsn, location) FROM STDIN (FORMAT binary)",
        )
        .await?;
    }
    if !changed_holds.is_empty() {
        let updated = sqlx::query(
            "UPDATE stampede.reservations r SET state = u.state, settled_at = to_timestamp(u.sat / 1000::float8), \
             confirmed_at = CASE WHEN u.state = 'confirmed' THEN to_timestamp(u.sat / 1000::float8) END, \
             payment_ref = u.pref, updated_lsn = $5 \
             FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::bytea[]) AS u(id, state, sat, pref) \
             WHERE r.id = u.id AND r.state = 'held'",
        )
        .bind(changed_holds.iter().map(|r| Uuid::from_u128(r.id)).collect::<Vec<Uuid>>())
        .bind(changed_holds.iter().map(|r| r.state.name()).collect::<Vec<&str>>())
        .bind(changed_holds.iter().map(|r| r.settled_at_ms.map(|v| v as i64)).collect::<Vec<Option<i64>>>())
        .bind(changed_holds.iter().map(|r| r.payment_ref.clone()).collect::<Vec<Option<Vec<u8>>>>())
        .bind(lsn)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if updated != changed_holds.len() as u64 {
            return Err(WriteError::RowCount { table: "reservations", expected: changed_holds.len(), updated });
        }
    }

    // --- ledger -------------------------------------------------------------
    let mut copy = CopyBinary::new();
    let mut last_at = 0;
    for (record_lsn, event) in records {
        let location = match event {
            Event::Reserved { location, .. }
            | Event::Restocked { location, .. }
            | Event::LocationAdded { location, .. } => Some(*location),
            Event::RegionSet { region, .. } => Some(*region),
            _ => None,
        };
        let (id, user, qty, at, expiry, payment_ref) = match event {
            Event::SaleCreated { stock, at_ms, .. } => (None, None, Some(*stock as i64), *at_ms, None, None),
            // The stock in qty; the locations are in stampede.sale_locations.
            Event::SaleCreatedAt { locations, at_ms, .. } => {
                (None, None, Some(locations.stock() as i64), *at_ms, None, None)
            }
            Event::LocationAdded { stock, at_ms, .. } => (None, None, Some(*stock as i64), *at_ms, None, None),
            // The region's order of locations, as u16 little-endian in payment_ref.
            Event::RegionSet { at_ms, .. } => (None, None, None, *at_ms, None, None),
            Event::Restocked { qty, at_ms, .. } => (None, None, Some(*qty as i64), *at_ms, None, None),
            Event::Paused { at_ms, .. } | Event::Resumed { at_ms, .. } => (None, None, None, *at_ms, None, None),
            Event::Reserved { user, qty, reservation_id, expires_at_ms, at_ms, .. } => {
                (Some(*reservation_id), Some(*user as i64), Some(i64::from(*qty)), *at_ms, Some(*expires_at_ms), None)
            }
            Event::Confirmed { reservation_id, at_ms, payment_ref, .. } => {
                (Some(*reservation_id), None, None, *at_ms, None, Some(&payment_ref[..]))
            }
            Event::Released { reservation_id, at_ms, .. } | Event::Expired { reservation_id, at_ms, .. } => {
                (Some(*reservation_id), None, None, *at_ms, None, None)
            }
            // qty: the admission rate; expires_at: the admission window's
            // end (start time for the configuration).
            Event::QueueConfigured { admit_rate_per_s, start_at_ms, at_ms, .. } => {
                (None, None, Some(i64::from(*admit_rate_per_s)), *at_ms, Some(*start_at_ms), None)
            }
            Event::QueueJoined { user, at_ms, .. } | Event::AdmissionLapsed { user, at_ms, .. } => {
                (None, Some(*user as i64), None, *at_ms, None, None)
            }
            // The shuffle seed, in qty (bit-for-bit), so the order is auditable from PostgreSQL too.
            Event::QueueStarted { seed, at_ms, .. } => (None, None, Some(*seed as i64), *at_ms, None, None),
            Event::Admitted { user, until_ms, at_ms, .. } => {
                (None, Some(*user as i64), None, *at_ms, Some(*until_ms), None)
            }
            // The term, in qty; no sku (migration 0003 lets it be NULL).
            Event::TermStarted { term, at_ms } => (None, None, Some(*term as i64), *at_ms, None, None),
            // The placement flags (bit 0 dedicated, bit 1 pinned), in qty.
            Event::SaleMoved { dedicated, pinned, at_ms, .. } => {
                (None, None, Some(i64::from(*dedicated) | (i64::from(*pinned) << 1)), *at_ms, None, None)
            }
        };
        let order: Option<Vec<u8>> = match event {
            Event::RegionSet { order, .. } => Some(order.iter().flat_map(|id| id.to_le_bytes()).collect()),
            _ => None,
        };
        copy.row(10);
        copy.i64(*record_lsn as i64);
        copy.text(event_kind(event));
        match event.sku() {
            Some(sku) => copy.i64(sku as i64),
            None => copy.null(),
        }
        match id {
            Some(id) => copy.uuid(id),
            None => copy.null(),
        }
        match user {
            Some(user) => copy.i64(user),
            None => copy.null(),
        }
        match qty {
            Some(qty) => copy.i64(qty),
            None => copy.null(),
        }
        copy.timestamp(Some(at));
        copy.timestamp(expiry);
        copy.bytea(payment_ref.or(order.as_deref()));
        match location {
            Some(location) => copy.i32(i32::from(location)),
            None => copy.null(),
        }
        last_at = at;
    }
    copy.send(
        conn,
        "COPY stampede.ledger (lsn, kind, sku, reservation_id, user_id, qty, at, expires_at, payment_ref, location) \
         FROM STDIN (FORMAT binary)",
    )
    .await?;

    // --- watermark ------------------------------------------------------------
    sqlx::query(
        "UPDATE stampede.watermark SET settled_lsn = $1, settled_event_at = to_timestamp($2 / 1000::float8), \
         updated_at = now()",
    )
    .bind(lsn)
    .bind(last_at as i64)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A `COPY ... FROM STDIN (FORMAT binary)` payload. The format (PostgreSQL
/// docs, "COPY", binary format): a fixed signature and two zero words, then
/// per row a field count and per field a length (-1: NULL) and the value in
/// the type's binary send format (big-endian), then -1 as the trailer.
struct CopyBinary {
    buf: Vec<u8>,
}

/// Microseconds between the unix epoch and PostgreSQL's (2000-01-01 UTC).
const POSTGRES_EPOCH_UNIX_MS: i64 = 946_684_800_000;

impl CopyBinary {
    fn new() -> CopyBinary {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyBinary { buf }
    }

    fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.field(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.field(&v.to_be_bytes());
    }

    fn text(&mut self, v: &str) {
        self.field(v.as_bytes());
    }

    /// uuid: its 16 bytes, most significant first (`Uuid::from_u128`).
    fn uuid(&mut self, v: u128) {
        self.field(&v.to_be_bytes());
    }

    /// timestamptz from unix ms: microseconds since 2000-01-01 UTC.
    fn timestamp(&mut self, unix_ms: Option<u64>) {
        match unix_ms {
            // Saturating: the engine bounds its times, but a far-future
            // value must never panic the reconciler.
            Some(ms) => {
                self.i64((ms.min(i64::MAX as u64) as i64).saturating_sub(POSTGRES_EPOCH_UNIX_MS).saturating_mul(1000))
            }
            None => self.null(),
        }
    }

    fn bytea(&mut self, v: Option<&[u8]>) {
        match v {
            Some(bytes) => self.field(bytes),
            None => self.null(),
        }
    }

    async fn send(mut self, conn: &mut PgConnection, statement: &str) -> sqlx::Result<u64> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        let mut copy = conn.copy_in_raw(statement).await?;
        copy.send(self.buf).await?;
        copy.finish().await
    }
}
