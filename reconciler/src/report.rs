//! `stampede-reconciler report`: does PostgreSQL agree with the engine?
//!
//! Both sides are compared at the same log position:
//! 1. Read PostgreSQL in one REPEATABLE READ transaction: the watermark W,
//!    every sale and reservation, the ledger's extent (a consistent picture
//!    at W, even while `run` keeps settling).
//! 2. Ask the server for STATE_DUMP: the engine's state at its synced LSN
//!    X. X >= W always (only synced records are ever settled).
//! 3. Stream the records W+1..=X and apply them to the PostgreSQL picture
//!    with the settlement code, which gives PostgreSQL "as of X".
//! 4. Compare per SKU (counters, then every reservation field by field),
//!    and check the global invariants on both sides.
//!
//! The lag is X - W records, and in seconds the server's clock minus the
//! engine time of record W+1 (the oldest unsettled one).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use sqlx::postgres::PgPool;
use stampede_protocol::message::{DumpEntry, HoldState, ReservationEntry, SaleEntry};
use stampede_protocol::replication::{ReplicationClient, StateDump};

use crate::db;
use crate::model::{Model, ReservationRow, SaleRow};

/// A held reservation this long past its expiry counts as "still holding
/// stock after its expiry". The engine expires holds on a 10 ms tick; the
/// margin covers a busy shard and the gap between dump and report.
pub const EXPIRY_GRACE_MS: u64 = 5_000;

/// Examples of differing reservations named per SKU (the counts are exact).
const EXAMPLES_PER_SKU: usize = 5;

/// How long to wait for the records between the watermark and the dump.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub limit_per_user: u32,
    pub paused: bool,
    /// On a shard of its own (SALE_MOVED keeps both sides up to date).
    pub hot: bool,
    pub reservations: u64,
    /// Per location (id order): the same counters, compared one by one.
    pub locations: Vec<LocationCounters>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocationCounters {
    pub location: u16,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SkuReport {
    pub sku: u64,
    pub engine: Option<Counters>,
    pub database: Option<Counters>,
    pub counters_equal: bool,
    /// Reservations in the engine but not in the database, and the reverse.
    pub missing_in_database: u64,
    pub missing_in_engine: u64,
    /// Reservations in both whose fields differ.
    pub differing: u64,
    /// A few of the reservations above, `id: what differs`.
    pub examples: Vec<String>,
    pub ok: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    /// `engine` or `database`.
    pub side: &'static str,
    pub sku: Option<u64>,
    pub rule: &'static str,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The log position both sides were compared at.
    pub lsn: u64,
    pub server_time_ms: u64,
    /// How far PostgreSQL had settled when the report read it.
    pub settled_lsn: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
    pub ledger_rows: u64,
    pub skus: Vec<SkuReport>,
    pub violations: Vec<Violation>,
    pub skus_differing: u64,
    pub ok: bool,
}

impl Counters {
    /// A sale's counters as either side reports them (the reservation
    /// count is filled in once the holds are grouped).
    fn of(sale: (u64, u64, u64, u64), limit_per_user: u32, paused: bool, hot: bool) -> Counters {
        let (total, available, reserved, sold) = sale;
        // A sale without locations has one, id 0, with all its units.
        let locations = vec![LocationCounters { location: 0, total, available, reserved, sold }];
        Counters { total, available, reserved, sold, limit_per_user, paused, hot, reservations: 0, locations }
    }
}

impl From<&SaleEntry> for Counters {
    fn from(s: &SaleEntry) -> Counters {
        Counters::of((s.total, s.available, s.reserved, s.sold), s.limit_per_user, s.paused, s.hot)
    }
}

impl From<&SaleRow> for Counters {
    fn from(s: &SaleRow) -> Counters {
        let mut c = Counters::of((s.total, s.available, s.reserved, s.sold), s.limit_per_user, s.paused, s.hot);
        c.locations = s
            .locations
            .iter()
            .map(|l| LocationCounters {
                location: l.location,
                total: l.total,
                available: l.available,
                reserved: l.reserved,
                sold: l.sold,
            })
            .collect();
        c.locations.sort_unstable_by_key(|l| l.location);
        c
    }
}

/// A reservation as both sides can describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hold {
    sku: u64,
    user: u64,
    qty: u32,
    state: HoldState,
    expires_at_ms: u64,
    settled_at_ms: u64,
    payment_ref: Vec<u8>,
    location: u16,
}

impl From<&ReservationEntry> for Hold {
    fn from(r: &ReservationEntry) -> Hold {
        Hold {
            sku: r.sku,
            user: r.user,
            qty: r.qty,
            state: r.state,
            expires_at_ms: r.expires_at_ms,
            settled_at_ms: r.settled_at_ms,
            payment_ref: r.payment_ref.to_vec(),
            location: r.location,
        }
    }
}

impl From<&ReservationRow> for Hold {
    fn from(r: &ReservationRow) -> Hold {
        Hold {
            sku: r.sku,
            user: r.user,
            qty: r.qty,
            state: r.state,
            expires_at_ms: r.expires_at_ms,
            settled_at_ms: r.settled_at_ms.unwrap_or(0),
            payment_ref: r.payment_ref.clone().unwrap_or_default(),
            location: r.location,
        }
    }
}

fn differences(engine: &Hold, database: &Hold) -> String {
    let mut out = Vec::new();
    macro_rules! field {
        ($name:ident) => {
            if engine.$name != database.$name {
                out.push(format!("{} engine={:?} database={:?}", stringify!($name), engine.$name, database.$name));
            }
        };
    }
    field!(sku);
    field!(user);
    field!(qty);
    field!(state);
    field!(expires_at_ms);
    field!(settled_at_ms);
    field!(payment_ref);
    field!(location);
    out.join(", ")
}

/// One side's state: sales and reservations grouped per SKU.
struct Side {
    sales: BTreeMap<u64, Counters>,
    holds: HashMap<u64, HashMap<u128, Hold>>,
}

impl Side {
    fn from_dump(dump: &StateDump) -> Side {
        let mut side = Side { sales: BTreeMap::new(), holds: HashMap::new() };
        // Sales whose LOCATION entries replaced the implied location 0.
        let mut located = std::collections::HashSet::new();
        for entry in &dump.entries {
            match entry {
                DumpEntry::Sale(s) => {
                    side.sales.insert(s.sku, s.into());
                }
                DumpEntry::Location(l) => {
                    let Some(sale) = side.sales.get_mut(&l.sku) else { continue };
                    if located.insert(l.sku) {
                        sale.locations.clear();
                    }
                    sale.locations.push(LocationCounters {
                        location: l.location,
                        total: l.total,
                        available: l.available,
                        reserved: l.reserved,
                        sold: l.sold,
                    });
                    sale.locations.sort_unstable_by_key(|l| l.location);
                }
                DumpEntry::Reservation(r) => {
                    side.holds.entry(r.sku).or_default().insert(r.reservation_id, r.into());
                }
            }
        }
        side.count_reservations();
        side
    }

    fn from_model(model: &Model) -> Side {
        let mut side = Side { sales: BTreeMap::new(), holds: HashMap::new() };
        for (row, _) in model.sales.values() {
            side.sales.insert(row.sku, row.into());
        }
        for (row, _) in model.reservations.values() {
            side.holds.entry(row.sku).or_default().insert(row.id, row.into());
        }
        side.count_reservations();
        side
    }

    fn count_reservations(&mut self) {
        for (sku, counters) in self.sales.iter_mut() {
            counters.reservations = self.holds.get(sku).map_or(0, |h| h.len() as u64);
        }
    }

    /// The invariants every state must satisfy, at engine time `now_ms`.
    fn check(&self, side: &'static str, now_ms: u64, out: &mut Vec<Violation>) {
        let mut violate = |sku: Option<u64>, rule: &'static str, detail: String| {
            out.push(Violation { side, sku, rule, detail });
        };
        for (&sku, c) in &self.sales {
            if c.available + c.reserved + c.sold != c.total {
                violate(
                    Some(sku),
                    "counters_add_up",
                    format!(
                        "available {} + reserved {} + sold {} != total {}",
                        c.available, c.reserved, c.sold, c.total
                    ),
                );
            }
            let (mut held, mut sold) = (0u64, 0u64);
            let mut per_user: HashMap<u64, u64> = HashMap::new();
            // (held, sold) per location, from the reservations.
            let mut at: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
            let mut overdue = 0u64;
            for hold in self.holds.get(&sku).into_iter().flat_map(|h| h.values()) {
                let here = at.entry(hold.location).or_default();
                match hold.state {
                    HoldState::Held => {
                        held += u64::from(hold.qty);
                        here.0 += u64::from(hold.qty);
                        if hold.expires_at_ms + EXPIRY_GRACE_MS < now_ms {
                            overdue += 1;
                        }
                    }
                    HoldState::Confirmed => {
                        sold += u64::from(hold.qty);
                        here.1 += u64::from(hold.qty);
                    }
                    HoldState::Released | HoldState::Expired => continue,
                }
                *per_user.entry(hold.user).or_default() += u64::from(hold.qty);
            }
            if held != c.reserved || sold != c.sold {
                violate(
                    Some(sku),
                    "counters_match_reservations",
                    format!("held units {held} vs reserved {}, confirmed units {sold} vs sold {}", c.reserved, c.sold),
                );
            }
            // Per location: each adds up, each matches its reservations,
            // and the sale's counters are their sums.
            let mut sums = (0u64, 0u64, 0u64, 0u64);
            for l in &c.locations {
                sums = (sums.0 + l.total, sums.1 + l.available, sums.2 + l.reserved, sums.3 + l.sold);
                if l.available + l.reserved + l.sold != l.total {
                    violate(
                        Some(sku),
                        "location_counters_add_up",
                        format!(
                            "location {}: available {} + reserved {} + sold {} != total {}",
                            l.location, l.available, l.reserved, l.sold, l.total
                        ),
                    );
                }
                let (h, s) = at.remove(&l.location).unwrap_or_default();
                if (h, s) != (l.reserved, l.sold) {
                    violate(
                        Some(sku),
                        "location_counters_match_reservations",
                        format!(
                            "location {}: held units {h} vs reserved {}, confirmed units {s} vs sold {}",
                            l.location, l.reserved, l.sold
                        ),
                    );
                }
            }
            if sums != (c.total, c.available, c.reserved, c.sold) {
                violate(Some(sku), "locations_sum_to_sale", format!("locations sum to {sums:?}"));
            }
            if let Some((location, _)) = at.iter().find(|(_, (h, s))| h + s > 0) {
                violate(
                    Some(sku),
                    "reservation_without_location",
                    format!("units held or sold at location {location}, which the sale does not have"),
                );
            }
            let over: Vec<String> = per_user
                .iter()
                .filter(|(_, &units)| units > u64::from(c.limit_per_user))
                .map(|(user, units)| format!("user {user}: {units}"))
                .collect();
            if !over.is_empty() {
                violate(Some(sku), "user_limit", format!("limit {}: {}", c.limit_per_user, over.join(", ")));
            }
            if overdue > 0 {
                violate(
                    Some(sku),
                    "expired_still_held",
                    format!("{overdue} reservation(s) held more than {EXPIRY_GRACE_MS} ms past their expiry"),
                );
            }
        }
        for sku in self.holds.keys().filter(|sku| !self.sales.contains_key(sku)) {
            violate(Some(*sku), "reservation_without_sale", format!("reservations for sku {sku}, which has no sale"));
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReportConfig {
    pub server: String,
    pub token: String,
}

/// Build the report (no output; see [`Report::render`]).
pub async fn report(pool: &PgPool, config: &ReportConfig) -> anyhow::Result<Report> {
    db::check_schema(pool).await?;
    // 1. PostgreSQL, consistent at its watermark.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let (settled_lsn, _) = db::watermark(&mut tx, false).await?;
    let mut model = db::load_all(&mut tx).await.context("reading sales and reservations")?;
    let (ledger_rows, ledger_min, ledger_max) = db::ledger_extent(&mut tx).await?;
    tx.rollback().await?;

    // 2. The engine at its synced LSN.
    let mut client = ReplicationClient::connect_leader(&config.server, &config.token).await?;
    let dump = client.state_dump().await.context("STATE_DUMP")?;
    if dump.lsn < settled_lsn {
        bail!(
            "the database has settled up to LSN {settled_lsn} but the server's log ends at {}: \
             the database is ahead of this server (a different or restored data dir?)",
            dump.lsn
        );
    }

    // 3. Bring the PostgreSQL picture forward to the dump's LSN.
    let mut violations = Vec::new();
    let mut oldest_unsettled_at_ms = None;
    if dump.lsn > settled_lsn {
        let client = ReplicationClient::connect_leader(&config.server, &config.token).await?;
        let (mut stream, _) = client.replicate(settled_lsn + 1).await?;
        let catch_up = async {
            while stream.next_lsn() <= dump.lsn {
                let batch = stream.next_batch().await?;
                for (lsn, event) in batch.records.iter().filter(|(lsn, _)| *lsn <= dump.lsn) {
                    if *lsn == settled_lsn + 1 {
                        oldest_unsettled_at_ms = Some(event.at_ms());
                    }
                    if let Err(e) = model.apply(*lsn, event) {
                        violations.push(Violation {
                            side: "database",
                            sku: event.sku(),
                            rule: "log_applies",
                            detail: e.to_string(),
                        });
                    }
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(CATCH_UP_TIMEOUT, catch_up).await.context("timed out reading the unsettled records")??;
    }

    // 4. Compare.
    let engine = Side::from_dump(&dump);
    let database = Side::from_model(&model);
    engine.check("engine", dump.server_time_ms, &mut violations);
    database.check("database", dump.server_time_ms, &mut violations);
    let expected_ledger = match (ledger_min, ledger_max) {
        (Some(1), Some(max)) => max == settled_lsn && ledger_rows == max,
        (None, None) => settled_lsn == 0,
        _ => false,
    };
    if !expected_ledger {
        violations.push(Violation {
            side: "database",
            sku: None,
            rule: "ledger_complete",
            detail: format!(
                "ledger holds {ledger_rows} rows (LSN {ledger_min:?}..={ledger_max:?}); \
                 the watermark says 1..={settled_lsn}: an event is missing or repeated"
            ),
        });
    }
    let mut skus: Vec<u64> = engine.sales.keys().chain(database.sales.keys()).copied().collect();
    skus.sort_unstable();
    skus.dedup();
    let empty = HashMap::new();
    let mut sku_reports = Vec::with_capacity(skus.len());
    for sku in skus {
        let (e, d) = (engine.sales.get(&sku), database.sales.get(&sku));
        let (e_holds, d_holds) = (engine.holds.get(&sku).unwrap_or(&empty), database.holds.get(&sku).unwrap_or(&empty));
        let mut report = SkuReport {
            sku,
            engine: e.cloned(),
            database: d.cloned(),
            counters_equal: e.is_some() && e == d,
            missing_in_database: 0,
            missing_in_engine: 0,
            differing: 0,
            examples: Vec::new(),
            ok: false,
        };
        let mut ids: Vec<&u128> = e_holds.keys().chain(d_holds.keys()).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let what = match (e_holds.get(id), d_holds.get(id)) {
                (Some(_), None) => {
                    report.missing_in_database += 1;
                    "missing in the database".to_string()
                }
                (None, Some(_)) => {
                    report.missing_in_engine += 1;
                    "not in the engine".to_string()
                }
                (Some(a), Some(b)) if a != b => {
                    report.differing += 1;
                    differences(a, b)
                }
                _ => continue,
            };
            if report.examples.len() < EXAMPLES_PER_SKU {
                report.examples.push(format!("{id:032x}: {what}"));
            }
        }
        report.ok = report.counters_equal
            && report.missing_in_database == 0
            && report.missing_in_engine == 0
            && report.differing == 0;
        sku_reports.push(report);
    }
    let skus_differing = sku_reports.iter().filter(|r| !r.ok).count() as u64;
    let lag_seconds = oldest_unsettled_at_ms.map_or(0.0, |at| dump.server_time_ms.saturating_sub(at) as f64 / 1000.0);
    Ok(Report {
        lsn: dump.lsn,
        server_time_ms: dump.server_time_ms,
        settled_lsn,
        lag_records: dump.lsn - settled_lsn,
        lag_seconds,
        ledger_rows,
        ok: skus_differing == 0 && violations.is_empty(),
        skus: sku_reports,
        violations,
        skus_differing,
    })
}

impl Report {
    /// The table for a person.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "stampede reconciliation at LSN {}: database settled to {} (lag {} records, {:.1} s); ledger {} rows",
            self.lsn, self.settled_lsn, self.lag_records, self.lag_seconds, self.ledger_rows
        );
        let _ = writeln!(
            out,
            "{:>20}  {:>29}  {:>29}  {:>9}  result",
            "sku", "engine total/avail/res/sold", "database total/avail/res/sold", "holds"
        );
        let counters = |c: &Option<Counters>| match c {
            Some(c) => format!("{}/{}/{}/{}", c.total, c.available, c.reserved, c.sold),
            None => "-".to_string(),
        };
        for sku in &self.skus {
            let holds = sku.engine.as_ref().map_or(0, |c| c.reservations);
            let result = if sku.ok {
                "ok".to_string()
            } else {
                format!(
                    "DIFFERS (counters {}, missing in db {}, not in engine {}, differing {})",
                    if sku.counters_equal { "equal" } else { "differ" },
                    sku.missing_in_database,
                    sku.missing_in_engine,
                    sku.differing
                )
            };
            let _ = writeln!(
                out,
                "{:>20}  {:>29}  {:>29}  {:>9}  {}",
                sku.sku,
                counters(&sku.engine),
                counters(&sku.database),
                holds,
                result
            );
            for example in &sku.examples {
                let _ = writeln!(out, "{:>20}    {example}", "");
            }
        }
        for v in &self.violations {
            let sku = v.sku.map_or(String::new(), |s| format!(" sku {s}"));
            let _ = writeln!(out, "VIOLATION ({}{sku}) {}: {}", v.side, v.rule, v.detail);
        }
        let _ = writeln!(
            out,
            "{}: {} sku(s), {} differing, {} invariant violation(s)",
            if self.ok { "CLEAN" } else { "DISAGREEMENT" },
            self.skus.len(),
            self.skus_differing,
            self.violations.len()
        );
        out
    }
}
