//! The relational state the reconciler keeps, as plain data, and the one
//! function that applies a log record to it: what each event means to a
//! consumer of the log that keeps sales and reservations as rows.
//!
//! It lives in the protocol crate, next to the events it interprets, so
//! that every consumer shares one definition: the reconciler (which
//! re-exports it as `model`) and the deterministic simulator, which applies
//! the committed log to it and compares the rows with the engine's state.
//!
//! Settlement loads the rows a batch touches from PostgreSQL, applies the
//! batch here, and writes the changed rows back; the report loads every
//! row, applies the records PostgreSQL has not settled yet, and compares
//! the result with the engine's dump. Both use [`Model::apply`], so the
//! rows in PostgreSQL and the report's view of them follow one definition
//! of what each event means, which mirrors the engine's own apply step.

use std::collections::HashMap;

use crate::event::Event;
use crate::message::HoldState;

/// One row of `stampede.sales`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaleRow {
    pub sku: u64,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub limit_per_user: u32,
    pub ttl_ms: u64,
    pub hot: bool,
    pub paused: bool,
    pub created_at_ms: u64,
    /// Its rows of `stampede.sale_locations`, in the order the locations
    /// were added; the sale's counters are their sums.
    pub locations: Vec<LocationRow>,
}

/// One row of `stampede.sale_locations`: a location's share of a sale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocationRow {
    pub location: u16,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

impl LocationRow {
    pub fn new(location: u16, stock: u64) -> Self {
        LocationRow { location, total: stock, available: stock, reserved: 0, sold: 0 }
    }
}

impl SaleRow {
    /// A new sale (nothing reserved or sold) over `locations`.
    pub fn new(sku: u64, locations: Vec<LocationRow>, limit_per_user: u32, ttl_ms: u64, hot: bool, at_ms: u64) -> Self {
        let stock = locations.iter().map(|l| l.total).sum();
        SaleRow {
            sku,
            total: stock,
            available: stock,
            reserved: 0,
            sold: 0,
            limit_per_user,
            ttl_ms,
            hot,
            paused: false,
            created_at_ms: at_ms,
            locations,
        }
    }

    /// Location `id`'s row.
    pub fn location_mut(&mut self, id: u16) -> Option<&mut LocationRow> {
        self.locations.iter_mut().find(|l| l.location == id)
    }
}

/// One row of `stampede.reservations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationRow {
    pub id: u128,
    pub sku: u64,
    pub user: u64,
    pub qty: u32,
    pub state: HoldState,
    pub reserved_at_ms: u64,
    pub expires_at_ms: u64,
    /// Confirm, release or expiry time; `None` while held.
    pub settled_at_ms: Option<u64>,
    /// Set when confirmed.
    pub payment_ref: Option<Vec<u8>>,
    /// The location (warehouse) its units are held at or sold from.
    pub location: u16,
}

/// Whether a row came from the database (update it) or from this batch
/// (insert it), and whether it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Loaded { dirty: bool },
    New,
}

/// A record that does not fit the state: the log and the database disagree.
#[derive(Debug, thiserror::Error)]
#[error("log record {lsn} ({what}) does not fit the settled state: {reason}")]
pub struct ApplyError {
    pub lsn: u64,
    pub what: &'static str,
    pub reason: String,
}

/// Sales and reservations: all of them (report) or the ones a batch
/// touches (settlement).
#[derive(Default, Debug)]
pub struct Model {
    pub sales: HashMap<u64, (SaleRow, Origin)>,
    pub reservations: HashMap<u128, (ReservationRow, Origin)>,
}

fn kind_name(event: &Event) -> &'static str {
    match event {
        Event::SaleCreated { .. } => "sale_created",
        Event::Restocked { .. } => "restocked",
        Event::Paused { .. } => "paused",
        Event::Resumed { .. } => "resumed",
        Event::Reserved { .. } => "reserved",
        Event::Confirmed { .. } => "confirmed",
        Event::Released { .. } => "released",
        Event::Expired { .. } => "expired",
        Event::QueueConfigured { .. } => "queue_configured",
        Event::QueueJoined { .. } => "queue_joined",
        Event::QueueStarted { .. } => "queue_started",
        Event::Admitted { .. } => "admitted",
        Event::AdmissionLapsed { .. } => "admission_lapsed",
        Event::TermStarted { .. } => "term_started",
        Event::SaleMoved { .. } => "sale_moved",
        Event::SaleCreatedAt { .. } => "sale_created_at",
        Event::LocationAdded { .. } => "location_added",
        Event::RegionSet { .. } => "region_set",
    }
}

/// The ledger's name for an event's kind.
pub fn event_kind(event: &Event) -> &'static str {
    kind_name(event)
}

/// The reservation an event settles, if any.
pub fn settled_reservation(event: &Event) -> Option<u128> {
    match event {
        Event::Confirmed { reservation_id, .. }
        | Event::Released { reservation_id, .. }
        | Event::Expired { reservation_id, .. } => Some(*reservation_id),
        _ => None,
    }
}

impl Model {
    pub fn load_sale(&mut self, row: SaleRow) {
        self.sales.insert(row.sku, (row, Origin::Loaded { dirty: false }));
    }

    pub fn load_reservation(&mut self, row: ReservationRow) {
        self.reservations.insert(row.id, (row, Origin::Loaded { dirty: false }));
    }

    /// Apply one log record, exactly as the engine applied it.
    pub fn apply(&mut self, lsn: u64, event: &Event) -> Result<(), ApplyError> {
        let what = kind_name(event);
        let fail = |reason: String| ApplyError { lsn, what, reason };
        match event {
            Event::SaleCreated { sku, stock, limit_per_user, ttl_ms, hot, at_ms } => {
                if self.sales.contains_key(sku) {
                    return Err(fail(format!("sku {sku} already has a sale")));
                }
                let locations = vec![LocationRow::new(0, *stock)];
                let row = SaleRow::new(*sku, locations, *limit_per_user, *ttl_ms, *hot, *at_ms);
                self.sales.insert(*sku, (row, Origin::New));
            }
            Event::SaleCreatedAt { sku, limit_per_user, ttl_ms, hot, at_ms, locations } => {
                if self.sales.contains_key(sku) {
                    return Err(fail(format!("sku {sku} already has a sale")));
                }
                let locations = locations.locations.iter().map(|&(id, stock)| LocationRow::new(id, stock)).collect();
                let row = SaleRow::new(*sku, locations, *limit_per_user, *ttl_ms, *hot, *at_ms);
                self.sales.insert(*sku, (row, Origin::New));
            }
            Event::LocationAdded { sku, location, stock, .. } => {
                let sale = self.sale(*sku).ok_or_else(|| fail(format!("unknown sku {sku}")))?;
                if sale.location_mut(*location).is_some() {
                    return Err(fail(format!("sku {sku} already has location {location}")));
                }
                sale.locations.push(LocationRow::new(*location, *stock));
                sale.total += stock;
                sale.available += stock;
            }
            Event::RegionSet { sku, .. } => {
                if !self.sales.contains_key(sku) {
                    return Err(fail(format!("unknown sku {sku}")));
                }
            }
            Event::Restocked { sku, qty, location, .. } => {
                let sale = self.sale(*sku).ok_or_else(|| fail(format!("unknown sku {sku}")))?;
                let at =
                    sale.location_mut(*location).ok_or_else(|| fail(format!("sku {sku}: no location {location}")))?;
                at.total += qty;
                at.available += qty;
                sale.total += qty;
                sale.available += qty;
            }
            Event::Paused { sku, .. } | Event::Resumed { sku, .. } => {
                let sale = self.sale(*sku).ok_or_else(|| fail(format!("unknown sku {sku}")))?;
                sale.paused = matches!(event, Event::Paused { .. });
            }
            Event::Reserved { sku, user, qty, reservation_id, expires_at_ms, at_ms, location } => {
                if self.reservations.contains_key(reservation_id) {
                    return Err(fail(format!("reservation {reservation_id:#x} already exists")));
                }
                let sale = self.sale(*sku).ok_or_else(|| fail(format!("unknown sku {sku}")))?;
                let qty64 = u64::from(*qty);
                let at =
                    sale.location_mut(*location).ok_or_else(|| fail(format!("sku {sku}: no location {location}")))?;
                if at.available < qty64 {
                    return Err(fail(format!(
                        "sku {sku}: {qty} reserved at location {location}, {} available there",
                        at.available
                    )));
                }
                at.available -= qty64;
                at.reserved += qty64;
                sale.available -= qty64;
                sale.reserved += qty64;
                let row = ReservationRow {
                    id: *reservation_id,
                    sku: *sku,
                    user: *user,
                    qty: *qty,
                    state: HoldState::Held,
                    reserved_at_ms: *at_ms,
                    expires_at_ms: *expires_at_ms,
                    settled_at_ms: None,
                    payment_ref: None,
                    location: *location,
                };
                self.reservations.insert(*reservation_id, (row, Origin::New));
            }
            Event::Confirmed { sku, reservation_id, at_ms, payment_ref } => {
                let (qty, location) = self.settle(*reservation_id, *sku, HoldState::Confirmed, *at_ms).map_err(fail)?;
                let (row, _) = self.reservations.get_mut(reservation_id).expect("settled above");
                row.payment_ref = Some(payment_ref.to_vec());
                let sale = self.sale(*sku).ok_or_else(|| fail(format!("unknown sku {sku}")))?;
                sale.reserved -= qty;
                sale.sold += qty;
                let at = sale.location_mut(location).expect("checked in settle");
                at.reserved -= qty;
                at.sold += qty;
            }
            Event::Released { sku, reservation_id, at_ms } | Event::Expired { sku, reservation_id, at_ms } => {
                let state =
                    if matches!(event, Event::Released { .. }) { HoldState::Released } else { HoldState::Expired };
                let (qty, location) = self.settle(*reservation_id, *sku, state, *at_ms).map_err(fail)?;
                let sale = self.sale(*sku).ok_or_else(|| fail(format!("unknown sku {sku}")))?;
                sale.reserved -= qty;
                sale.available += qty;
                let at = sale.location_mut(location).expect("checked in settle");
                at.reserved -= qty;
                at.available += qty;
            }
            // The virtual queue changes no sale or reservation row; its
            // events are kept in the ledger (who joined and was admitted
            // when, and the start's shuffle seed).
            Event::QueueConfigured { sku, .. }
            | Event::QueueJoined { sku, .. }
            | Event::QueueStarted { sku, .. }
            | Event::Admitted { sku, .. }
            | Event::AdmissionLapsed { sku, .. } => {
                if !self.sales.contains_key(sku) {
                    return Err(fail(format!("unknown sku {sku}")));
                }
            }
            // A new leader's first record: in the ledger (which node led
            // from which LSN on is auditable), no row changes.
            Event::TermStarted { .. } => {}
            // `hot` says where the sale runs now, as the engine's STATUS
            // and STATE_DUMP do.
            Event::SaleMoved { sku, dedicated, .. } => {
                let sale = self.sale(*sku).ok_or_else(|| fail(format!("unknown sku {sku}")))?;
                sale.hot = *dedicated;
            }
        }
        Ok(())
    }

    /// A sale to change, marked dirty.
    fn sale(&mut self, sku: u64) -> Option<&mut SaleRow> {
        let (row, origin) = self.sales.get_mut(&sku)?;
        if let Origin::Loaded { dirty } = origin {
            *dirty = true;
        }
        Some(row)
    }

    /// Move a held reservation to `state`; returns its quantity and location.
    fn settle(&mut self, id: u128, sku: u64, state: HoldState, at_ms: u64) -> Result<(u64, u16), String> {
        let (row, origin) =
            self.reservations.get_mut(&id).ok_or_else(|| format!("reservation {id:#x} is not known"))?;
        if row.sku != sku {
            return Err(format!("reservation {id:#x} belongs to sku {}, not {sku}", row.sku));
        }
        if row.state != HoldState::Held {
            return Err(format!("reservation {id:#x} is already {}", row.state.name()));
        }
        let location_holds = |s: &SaleRow| {
            s.locations.iter().find(|l| l.location == row.location).is_some_and(|l| l.reserved >= u64::from(row.qty))
        };
        if self.sales.get(&sku).is_none_or(|(s, _)| s.reserved < u64::from(row.qty) || !location_holds(s)) {
            return Err(format!(
                "sku {sku} (location {}) holds fewer reserved units than reservation {id:#x}",
                row.location
            ));
        }
        row.state = state;
        row.settled_at_ms = Some(at_ms);
        if let Origin::Loaded { dirty } = origin {
            *dirty = true;
        }
        Ok((u64::from(row.qty), row.location))
    }
}
