//! The inventory engine: the state of a set of SKUs, changed only by events.
//!
//! One `Engine` lives in each shard thread and owns the SKUs routed to that
//! shard; nothing else touches its maps, so they need no locks. Each command
//! is decided against the current state, producing an [`Outcome`] for the
//! caller and at most one [`Event`], which is applied through the same
//! `apply_*` code that recovery uses for replay.
//!
//! Invariants, asserted after every applied event (and by
//! [`Engine::check_invariants`] over the whole state):
//! - per sale: `available + reserved + sold == total`, none negative
//!   (unsigned arithmetic with overflow checks on in release builds);
//! - per user: reserved + sold units <= the sale's limit;
//! - `reserved` equals the sum of the sale's held reservations.
//!
//! Published state: each sale's `available` count and paused flag are mirrored
//! into a [`SkuGauge`] of atomics, written only by this engine, so connection
//! tasks can answer `sold_out` without a hop to the shard thread.

pub mod chunked;
pub mod directory;
pub mod event;
pub mod flat;
pub mod image;
pub mod queue;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use foldhash::fast::RandomState;
use stampede_protocol::message::{
    LocationStatus, LocationsReply, Outcome, QueueTicket, Reserve, SaleCreate, SaleLocations, SaleStatus, StatusReply,
    Where,
};
use stampede_protocol::Status;

use chunked::{ChunkedQueue, ChunkedVec};
pub use directory::{Claim, ReservationDirectory};
pub use event::Event;
use flat::{FlatMap, Zeroable};
pub use image::{ReservationImage, SaleImage};
pub use queue::{QueueImage, TicketState, WaitingRoom};

use crate::limits::{
    EXPIRY_TICK_MS, LOCATIONS_PER_SALE_MAX, QUEUE_ADMISSION_MS_MAX, QUEUE_ADMIT_RATE_PER_S_MAX, QUEUE_START_AT_MS_MAX,
    QUEUE_WAITING_MAX, REGIONS_PER_SALE_MAX, RESERVATION_TTL_MS_MAX, RESERVE_PREFS_MAX, SALE_PRESIZED_RESERVATIONS_MAX,
    STOCK_UNITS_MAX,
};

/// How far ahead of the request being decided [`Engine::reserve_run`]
/// prefetches: far enough that a miss (~100 ns) completes while the
/// requests in between are decided (~100 ns each when cached), near enough
/// that the lines are still in L1.
pub const RESERVE_PREFETCH_AHEAD: usize = 8;

type FastMap<K, V> = std::collections::HashMap<K, V, RandomState>;

/// Check a SALE_CREATE's arguments (stock, limit, TTL within limits).
pub fn validate_sale(cmd: &SaleCreate) -> Result<(), Status> {
    let valid =
        cmd.stock <= STOCK_UNITS_MAX && cmd.limit_per_user >= 1 && (1..=RESERVATION_TTL_MS_MAX).contains(&cmd.ttl_ms);
    let queue_valid = cmd.queue.is_none_or(|q| {
        (1..=QUEUE_ADMIT_RATE_PER_S_MAX).contains(&q.admit_rate_per_s)
            && (1..=QUEUE_ADMISSION_MS_MAX).contains(&q.admission_ms)
            && q.start_at_ms <= QUEUE_START_AT_MS_MAX
    });
    if valid && queue_valid {
        Ok(())
    } else {
        Err(Status::InvalidArgument)
    }
}

/// Check a sale's locations: 1..=16 of them with distinct ids, their stock
/// summing to the sale's, regions (not 0, distinct) ordering known ones.
pub fn validate_locations(cmd: &SaleCreate, locations: &SaleLocations) -> Result<(), Status> {
    let ids: Vec<u16> = locations.locations.iter().map(|&(id, _)| id).collect();
    let distinct = |list: &[u16]| (1..list.len()).all(|i| !list[..i].contains(&list[i]));
    let valid = (1..=LOCATIONS_PER_SALE_MAX).contains(&ids.len())
        && distinct(&ids)
        && locations.stock() == cmd.stock
        && locations.regions.len() <= REGIONS_PER_SALE_MAX
        && distinct(&locations.regions.iter().map(|(r, _)| *r).collect::<Vec<_>>())
        && locations
            .regions
            .iter()
            .all(|(region, order)| *region != 0 && (1..=RESERVE_PREFS_MAX).contains(&order.len()) && distinct(order));
    if !valid {
        return Err(Status::InvalidArgument);
    }
    if locations.regions.iter().any(|(_, order)| order.iter().any(|id| !ids.contains(id))) {
        return Err(Status::UnknownLocation);
    }
    Ok(())
}

/// A sale's state as the connection tasks see it, without asking the shard.
///
/// Atomics, single writer (the owning shard thread), many readers. `Release`
/// stores pair with `Acquire` loads so a reader that sees a count also sees
/// the sale that produced it.
#[derive(Debug, Default)]
pub struct SkuGauge {
    available: AtomicU64,
    /// Reserved and sold units, for metrics only (read with `Relaxed`).
    reserved: AtomicU64,
    sold: AtomicU64,
    /// Users in the sale's virtual queue; `u64::MAX`: the sale has none.
    waiting: AtomicU64,
    paused: AtomicBool,
    /// An admin placed the sale (see `Event::SaleMoved`).
    pinned: AtomicBool,
    /// Requests the shard has decided for this sale (the demand monitor's
    /// rate). On a line of its own: it changes on every request, refused
    /// ones too, and the counters above are read by every connection.
    decided: Demand,
    /// Per location, for a sale with several (metrics); made at its first
    /// publication, room for `LOCATIONS_PER_SALE_MAX`.
    locations: std::sync::OnceLock<Box<[LocationGauge]>>,
    location_count: std::sync::atomic::AtomicUsize,
}

/// One location's counters, published for metrics (relaxed: a scrape
/// reads each number as it was at some moment).
#[derive(Debug, Default)]
pub struct LocationGauge {
    id: std::sync::atomic::AtomicU32,
    available: AtomicU64,
    reserved: AtomicU64,
    sold: AtomicU64,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Demand(AtomicU64);

impl SkuGauge {
    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Acquire)
    }
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }
    pub fn sold(&self) -> u64 {
        self.sold.load(Ordering::Relaxed)
    }
    /// Users waiting in the sale's queue, if it has one (metrics).
    pub fn waiting(&self) -> Option<u64> {
        Some(self.waiting.load(Ordering::Relaxed)).filter(|&w| w != u64::MAX)
    }
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }
    /// Requests decided for this sale so far (by whichever shard holds
    /// it), to within `DECIDED_PUBLISHED_EVERY`.
    pub fn decided(&self) -> u64 {
        self.decided.0.load(Ordering::Relaxed)
    }

    /// `(location, available, reserved, sold)` of each location, for a
    /// sale with several (`None`: one location, the sale's own counters).
    pub fn locations(&self) -> Option<Vec<(u16, u64, u64, u64)>> {
        let list = self.locations.get()?;
        let n = self.location_count.load(Ordering::Acquire);
        Some(
            list[..n]
                .iter()
                .map(|l| {
                    let id = l.id.load(Ordering::Relaxed) as u16;
                    (
                        id,
                        l.available.load(Ordering::Relaxed),
                        l.reserved.load(Ordering::Relaxed),
                        l.sold.load(Ordering::Relaxed),
                    )
                })
                .collect(),
        )
    }
}

/// A sale's decided-request count is published to its gauge once every
/// this many decisions: a store to a line of its own on every request cost
/// the 1M-user reserve benchmark ~9%; the monitor's rate is then exact to
/// 64 requests per interval (256/s at 250 ms, against thresholds of
/// thousands).
const DECIDED_PUBLISHED_EVERY: u64 = 64;

/// Life of one reservation (one definition, shared with STATE_DUMP).
pub use stampede_protocol::message::HoldState;

#[derive(Clone, Debug)]
pub struct Reservation {
    pub sku: u64,
    pub user: u64,
    pub qty: u32,
    pub state: HoldState,
    pub expires_at_ms: u64,
    /// Confirm, release or expiry time; 0 while held.
    pub settled_at_ms: u64,
    /// Index of its location in the sale's (in the record's spare bytes).
    pub location: u8,
}

// With its 16-byte id (IdKey) a record is 56 bytes in `Holds::records`.
const _: () = assert!(std::mem::size_of::<Reservation>() <= 40);

/// One location's (warehouse's) share of a sale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Location {
    id: u16,
    total: u64,
    available: u64,
    reserved: u64,
    sold: u64,
}

impl Location {
    fn new(id: u16, stock: u64) -> Self {
        Location { id, total: stock, available: stock, reserved: 0, sold: 0 }
    }
}

#[derive(Debug)]
struct Sale {
    /// Sums over `locations`.
    total: u64,
    available: u64,
    reserved: u64,
    sold: u64,
    /// Where the units are, in the order they were added (the default
    /// order of a reservation). A sale made without locations has one, id 0.
    locations: Vec<Location>,
    /// Orders of locations (indices into `locations`) by shopper region.
    regions: Vec<(u16, Box<[u8]>)>,
    limit_per_user: u32,
    ttl_ms: u64,
    /// On a shard of its own (created `hot`, or moved there).
    hot: bool,
    /// An admin chose the placement: the demand monitor leaves it alone.
    pinned: bool,
    paused: bool,
    /// Held reservations (count, not units).
    holds: u64,
    /// Every reservation of the sale, settled ones included (they answer
    /// retries). Per sale, not per engine, so that moving a sale to
    /// another shard hands its tables over instead of copying them.
    reservations: Holds,
    /// Payment references of confirmed reservations, kept apart so the
    /// hot reservation record stays small; read only by a retried CONFIRM.
    payment_refs: FastMap<IdKey, Box<[u8]>>,
    /// Units reserved + sold per user: the per-user purchase record
    /// (a u64 key and u32 value in a swiss table, ~17-36 bytes each with
    /// load factor; the `user_record_bytes` test measures it).
    users: FlatMap<u64, u32>,
    /// Pending expiries in deadline order. A sale's TTL is fixed, and
    /// deadlines are made monotonic at reserve time, so a FIFO queue does
    /// what a timer wheel would: O(1) to add, O(1) per expiry, no scan.
    /// Entries for reservations settled early are skipped when popped.
    /// Chunked, so growing it never copies the queue (see `chunked.rs`).
    expiry: ChunkedQueue<ExpiryEntry>,
    gauge: Arc<SkuGauge>,
    /// The virtual queue, if the sale has one (boxed: most sales do not).
    queue: Option<Box<WaitingRoom>>,
    /// Requests decided for the sale (see `SkuGauge::decided`); a `Cell`
    /// because read-only decisions (POLL, a CONFIRM found settled) count.
    decided: std::cell::Cell<u64>,
}

impl Sale {
    /// One more request decided for this sale.
    #[inline]
    fn count_decided(&self) {
        let n = self.decided.get() + 1;
        self.decided.set(n);
        if n.is_multiple_of(DECIDED_PUBLISHED_EVERY) {
            self.gauge.decided.0.store(n, Ordering::Relaxed);
        }
    }

    fn publish(&self) {
        let waiting = self.queue.as_ref().map_or(u64::MAX, |q| q.waiting());
        self.gauge.waiting.store(waiting, Ordering::Relaxed);
        self.gauge.reserved.store(self.reserved, Ordering::Relaxed);
        self.gauge.sold.store(self.sold, Ordering::Relaxed);
        self.gauge.available.store(self.available, Ordering::Release);
        self.gauge.paused.store(self.paused, Ordering::Release);
        self.gauge.pinned.store(self.pinned, Ordering::Relaxed);
    }

    /// Each location's counters (LOCATIONS, snapshot images).
    fn location_statuses(&self) -> Vec<LocationStatus> {
        let status = |l: &Location| LocationStatus {
            location: l.id,
            total: l.total,
            available: l.available,
            reserved: l.reserved,
            sold: l.sold,
        };
        self.locations.iter().map(status).collect()
    }

    /// Each region's order as location ids.
    fn region_orders(&self) -> Vec<(u16, Vec<u16>)> {
        let ids = |order: &[u8]| order.iter().map(|&i| self.locations[usize::from(i)].id).collect();
        self.regions.iter().map(|(r, order)| (*r, ids(order))).collect()
    }

    /// Location `id`'s index.
    fn location_index(&self, id: u16) -> Option<usize> {
        self.locations.iter().position(|l| l.id == id)
    }

    /// Where a reservation of `qty` units takes them from: the first
    /// location in `at`'s order that has them all (never split). Refusals
    /// say why: `sold_out` when none of those locations has a unit,
    /// `insufficient_stock` when some have fewer, `unknown_location` for
    /// an id the sale does not have.
    fn choose(&self, at: &Where, qty: u64) -> Result<usize, Status> {
        let mut any = false;
        let mut pick = |i: usize| {
            let available = self.locations[i].available;
            any |= available > 0;
            available >= qty
        };
        let found = match at {
            Where::Default => (0..self.locations.len()).find(|&i| pick(i)),
            Where::Region(region) => match self.regions.iter().find(|(r, _)| r == region) {
                Some((_, order)) => order.iter().map(|&i| usize::from(i)).find(|&i| pick(i)),
                None => (0..self.locations.len()).find(|&i| pick(i)),
            },
            Where::Locations { .. } => {
                let mut found = None;
                for &id in at.list() {
                    let i = self.location_index(id).ok_or(Status::UnknownLocation)?;
                    if found.is_none() && pick(i) {
                        found = Some(i);
                    }
                }
                found
            }
        };
        match found {
            Some(i) => Ok(i),
            None if any => Err(Status::InsufficientStock),
            None => Err(Status::SoldOut),
        }
    }

    fn assert_location(&self, sku: u64, i: usize) {
        let l = &self.locations[i];
        assert_eq!(
            l.available + l.reserved + l.sold,
            l.total,
            "sku {sku} location {}: available {} + reserved {} + sold {} != total {}",
            l.id,
            l.available,
            l.reserved,
            l.sold,
            l.total
        );
    }

    /// Publish location `i`'s counters (a sale with several locations;
    /// a sale with one, id 0, has the sale's).
    #[inline]
    fn publish_location(&self, i: usize) {
        if self.locations.len() == 1 && self.locations[0].id == 0 {
            return;
        }
        let list = self
            .gauge
            .locations
            .get_or_init(|| (0..LOCATIONS_PER_SALE_MAX).map(|_| LocationGauge::default()).collect());
        let l = &self.locations[i];
        let g = &list[i];
        g.id.store(u32::from(l.id), Ordering::Relaxed);
        g.available.store(l.available, Ordering::Relaxed);
        g.reserved.store(l.reserved, Ordering::Relaxed);
        g.sold.store(l.sold, Ordering::Relaxed);
        self.gauge.location_count.fetch_max(self.locations.len(), Ordering::Release);
    }

    /// Every location's counters (after a sale is made, loaded or moved).
    fn publish_locations(&self) {
        for i in 0..self.locations.len() {
            self.publish_location(i);
        }
    }

    fn assert_invariant(&self, sku: u64) {
        assert_eq!(
            self.available + self.reserved + self.sold,
            self.total,
            "sku {sku}: available {} + reserved {} + sold {} != total {}",
            self.available,
            self.reserved,
            self.sold,
            self.total
        );
    }

    fn status(&self, now_ms: u64) -> SaleStatus {
        SaleStatus {
            total: self.total,
            available: self.available,
            reserved: self.reserved,
            sold: self.sold,
            limit_per_user: self.limit_per_user,
            ttl_ms: self.ttl_ms,
            reservations: self.holds,
            hot: self.hot,
            paused: self.paused,
            pinned: self.pinned,
            queue: self.queue.as_ref().map(|q| Box::new(q.stats(now_ms))),
        }
    }

    /// Nothing available and nothing held that could come back: the sale
    /// is over for everyone still in line.
    fn sold_out_for_good(&self) -> bool {
        self.available == 0 && self.holds == 0
    }
}

/// A reservation id as a map key: two u64s, so a bucket of the reservation
/// map (key + 40-byte record) is 56 bytes instead of the 64 that u128's
/// 16-byte alignment forces. At millions of reservations that is 12% less
/// memory to fault in and to miss on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct IdKey([u64; 2]);

impl From<u128> for IdKey {
    fn from(id: u128) -> Self {
        IdKey([id as u64, (id >> 64) as u64])
    }
}

impl IdKey {
    fn id(self) -> u128 {
        u128::from(self.0[0]) | (u128::from(self.0[1]) << 64)
    }
}

// SAFETY: two plain integers.
unsafe impl Zeroable for IdKey {}

/// An engine's reservations: the records in the order they were made (a
/// push per reservation, no probing), found by id through a prefetchable
/// index. Records are never removed: a settled id keeps answering retries.
#[derive(Default)]
struct Holds {
    index: FlatMap<IdKey, u32>,
    /// Chunked: a growing `Vec` would copy every record on the shard
    /// thread each time it doubles (see `chunked.rs`).
    records: ChunkedVec<(IdKey, Reservation)>,
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Holds({} records)", self.records.len())
    }
}

impl Holds {
    fn get(&self, key: &IdKey) -> Option<&Reservation> {
        self.index.get(key).map(|i| &self.records[i as usize].1)
    }
    fn get_mut(&mut self, key: &IdKey) -> Option<&mut Reservation> {
        self.index.get(key).map(|i| &mut self.records[i as usize].1)
    }
    /// Add a record for a new id; false (and nothing added) if it exists.
    fn insert(&mut self, key: IdKey, reservation: Reservation) -> bool {
        let next = u32::try_from(self.records.len()).expect("over 4G reservations in one shard");
        let slot = self.index.get_or_insert(key, next);
        if *slot != next {
            return false;
        }
        self.records.push((key, reservation));
        true
    }
    fn reserve(&mut self, additional: usize) {
        // Records need no room made: they go into chunks as they come.
        self.index.reserve(additional);
    }
    fn prefetch(&self, key: &IdKey) {
        self.index.prefetch(key);
    }
    fn iter(&self) -> impl Iterator<Item = (&IdKey, &Reservation)> {
        self.records.iter().map(|(key, r)| (key, r))
    }
    fn values(&self) -> impl Iterator<Item = &Reservation> {
        self.records.iter().map(|(_, r)| r)
    }
}

/// A pending expiry: deadline and reservation id. Three u64s (24 bytes)
/// rather than `(u64, u128)`, which u128's 16-byte alignment pads to 32.
#[derive(Clone, Copy, Debug)]
struct ExpiryEntry {
    deadline_ms: u64,
    id: IdKey,
}

impl ExpiryEntry {
    fn new(deadline_ms: u64, id: u128) -> Self {
        ExpiryEntry { deadline_ms, id: id.into() }
    }
    fn id(&self) -> u128 {
        self.id.id()
    }
}

/// A sale on its way from one engine to another: its counters and every
/// table it owns (reservations, per-user records, expiries, queue, gauge).
pub struct MovingSale {
    sku: u64,
    sale: Box<Sale>,
}

/// The state machine of one shard. See the module doc.
pub struct Engine {
    sales: FastMap<u64, Sale>,
    directory: Arc<ReservationDirectory>,
    /// SKUs whose sale has a queue (the tick visits only these).
    queued: Vec<u64>,
}

impl Engine {
    pub fn new(directory: Arc<ReservationDirectory>) -> Self {
        Engine { sales: FastMap::default(), directory, queued: Vec::new() }
    }

    /// Make room in `sku`'s tables for `additional` more reservations
    /// (recovery knows roughly how many are coming; growing a
    /// multi-million-entry table rehashes it).
    pub fn reserve_capacity(&mut self, sku: u64, additional: usize) {
        let Some(sale) = self.sales.get_mut(&sku) else { return };
        sale.reservations.reserve(additional);
        // Most reservations of a sale end confirmed; sizing for all of them
        // costs 32 bytes a slot but saves rehashing millions of entries
        // (~15% of replay time in the 10M-event benchmark).
        sale.payment_refs.reserve(additional);
        sale.users.reserve(additional);
    }

    /// Take sale `sku` out of this engine, tables and all, to hand to
    /// another shard ([`Self::put_sale`]): nothing is copied, so a sale
    /// with a million reservations moves as fast as one with none. Its
    /// reservation ids stay claimed for it in the shared directory.
    pub fn take_sale(&mut self, sku: u64) -> Option<MovingSale> {
        let sale = self.sales.remove(&sku)?;
        self.queued.retain(|&q| q != sku);
        Some(MovingSale { sku, sale: Box::new(sale) })
    }

    /// Decide a move of `sku` away from this engine: its SALE_MOVED event
    /// (the new placement), then the sale taken out to hand over.
    pub fn move_out(
        &mut self,
        sku: u64,
        dedicated: bool,
        pinned: bool,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<MovingSale, Status> {
        if !self.sales.contains_key(&sku) {
            return Err(Status::UnknownSku);
        }
        let event = Event::SaleMoved { sku, dedicated, pinned, at_ms: now_ms };
        self.apply(&event);
        events.push(event);
        Ok(self.take_sale(sku).expect("checked above"))
    }

    /// Log a placement for a sale that stays on this engine (a change of
    /// pin); nothing if it is already so.
    pub fn place(&mut self, sku: u64, dedicated: bool, pinned: bool, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        match self.placement(sku) {
            None => Outcome::of(Status::UnknownSku),
            Some(now) if now == (dedicated, pinned) => Outcome::of(Status::Ok),
            Some(_) => {
                let event = Event::SaleMoved { sku, dedicated, pinned, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
                Outcome::of(Status::Ok)
            }
        }
    }

    /// Adopt a sale another engine gave up with [`Self::take_sale`].
    pub fn put_sale(&mut self, moving: MovingSale) {
        let MovingSale { sku, sale } = moving;
        if sale.queue.is_some() {
            self.queued.push(sku);
        }
        sale.publish();
        let previous = self.sales.insert(sku, *sale);
        assert!(previous.is_none(), "sku {sku} moved onto a shard that has it");
    }

    /// Whether `sku` runs on a shard of its own, and whether an admin
    /// pinned it there (or in the pool).
    pub fn placement(&self, sku: u64) -> Option<(bool, bool)> {
        self.sales.get(&sku).map(|s| (s.hot, s.pinned))
    }

    /// The published gauge of a sale (for routing tables).
    pub fn gauge(&self, sku: u64) -> Option<Arc<SkuGauge>> {
        self.sales.get(&sku).map(|s| s.gauge.clone())
    }

    /// The SKU reservation `id` was claimed for, from the id directory
    /// (what a connection asks before routing a CONFIRM or RELEASE).
    pub fn sku_of(&self, id: u128) -> Option<u64> {
        self.directory.sku_of(id)
    }

    /// Reservation `id`, found through the id directory (tests and tools;
    /// the request path knows the SKU).
    pub fn reservation(&self, id: u128) -> Option<&Reservation> {
        let sku = self.directory.sku_of(id)?;
        self.sales.get(&sku)?.reservations.get(&id.into())
    }

    pub fn skus(&self) -> impl Iterator<Item = u64> + '_ {
        self.sales.keys().copied()
    }

    /// Units reserved + sold by `user` for `sku`.
    pub fn user_units(&self, sku: u64, user: u64) -> u32 {
        self.sales.get(&sku).and_then(|s| s.users.get(&user)).unwrap_or(0)
    }

    // ----------------------------------------------------------------- decide

    pub fn create_sale(&mut self, cmd: &SaleCreate, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        self.create_sale_at(cmd, None, now_ms, events)
    }

    /// SALE_CREATE, with the sale's locations if it has several (`None`:
    /// one location, id 0, holding all the stock).
    pub fn create_sale_at(
        &mut self,
        cmd: &SaleCreate,
        locations: Option<&SaleLocations>,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if let Some(sale) = self.sales.get(&cmd.sku) {
            // SALE_CREATED and QUEUE_CONFIGURED are two records: a crash
            // can keep the first and tear off the second (never
            // acknowledged). The admin's retry completes the creation, as
            // long as nothing has happened to the sale since.
            let same_locations = match locations {
                None => sale.locations == [Location::new(0, cmd.stock)] && sale.regions.is_empty(),
                Some(l) => {
                    sale.locations.iter().map(|l| (l.id, l.total)).eq(l.locations.iter().copied())
                        && sale.locations.iter().all(|l| l.available == l.total)
                }
            };
            let untouched = sale.queue.is_none()
                && same_locations
                && sale.total == cmd.stock
                && sale.available == cmd.stock
                && sale.limit_per_user == cmd.limit_per_user
                && sale.ttl_ms == cmd.ttl_ms
                && sale.hot == cmd.hot
                && !sale.paused
                && sale.holds == 0
                && sale.sold == 0;
            if !(untouched && cmd.queue.is_some() && validate_sale(cmd).is_ok()) {
                return Outcome::of(Status::SaleExists);
            }
            self.configure_queue(cmd, now_ms, events);
            return Outcome::of(Status::Ok);
        }
        if let Err(status) = validate_sale(cmd) {
            return Outcome::of(status);
        }
        let event = match locations {
            None => Event::SaleCreated {
                sku: cmd.sku,
                stock: cmd.stock,
                limit_per_user: cmd.limit_per_user,
                ttl_ms: cmd.ttl_ms,
                hot: cmd.hot,
                at_ms: now_ms,
            },
            Some(locations) => {
                if let Err(status) = validate_locations(cmd, locations) {
                    return Outcome::of(status);
                }
                Event::SaleCreatedAt {
                    sku: cmd.sku,
                    limit_per_user: cmd.limit_per_user,
                    ttl_ms: cmd.ttl_ms,
                    hot: cmd.hot,
                    at_ms: now_ms,
                    locations: Box::new(locations.clone()),
                }
            }
        };
        self.apply(&event);
        events.push(event);
        self.configure_queue(cmd, now_ms, events);
        Outcome::of(Status::Ok)
    }

    /// The QUEUE_CONFIGURED half of a queued SALE_CREATE (if it has a queue).
    fn configure_queue(&mut self, cmd: &SaleCreate, now_ms: u64, events: &mut Vec<Event>) {
        let Some(q) = cmd.queue else { return };
        let event = Event::QueueConfigured {
            sku: cmd.sku,
            admit_rate_per_s: q.admit_rate_per_s,
            admit_cap: q.admit_cap,
            admission_ms: q.admission_ms,
            start_at_ms: q.start_at_ms,
            at_ms: now_ms,
        };
        self.apply(&event);
        events.push(event);
    }

    /// RESTOCK: more units at the sale's first location.
    pub fn restock(&mut self, sku: u64, qty: u64, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        let Some(sale) = self.sales.get(&sku) else {
            return Outcome::of(Status::UnknownSku);
        };
        let first = sale.locations[0].id;
        let outcome = self.restock_at(sku, first, qty, now_ms, events);
        // (RESTOCK answers the sale's new total.)
        match outcome.status {
            Status::Ok => Outcome::new(Status::Ok, self.sales[&sku].total),
            _ => outcome,
        }
    }

    /// RESTOCK_AT: more units at location `location`; answers its new total.
    pub fn restock_at(&mut self, sku: u64, location: u16, qty: u64, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        let Some(sale) = self.sales.get(&sku) else {
            return Outcome::of(Status::UnknownSku);
        };
        let Some(i) = sale.location_index(location) else {
            return Outcome::of(Status::UnknownLocation);
        };
        if qty == 0 || sale.total.saturating_add(qty) > STOCK_UNITS_MAX {
            return Outcome::of(Status::InvalidArgument);
        }
        let event = Event::Restocked { sku, qty, at_ms: now_ms, location };
        self.apply(&event);
        events.push(event);
        Outcome::new(Status::Ok, self.sales[&sku].locations[i].total)
    }

    /// LOCATION_ADD: a new location with `stock` units; answers the
    /// sale's new total.
    pub fn add_location(
        &mut self,
        sku: u64,
        location: u16,
        stock: u64,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Some(sale) = self.sales.get(&sku) else {
            return Outcome::of(Status::UnknownSku);
        };
        if sale.location_index(location).is_some() {
            return Outcome::of(Status::LocationExists);
        }
        if sale.locations.len() >= LOCATIONS_PER_SALE_MAX || sale.total.saturating_add(stock) > STOCK_UNITS_MAX {
            return Outcome::of(Status::InvalidArgument);
        }
        let event = Event::LocationAdded { sku, location, stock, at_ms: now_ms };
        self.apply(&event);
        events.push(event);
        Outcome::new(Status::Ok, self.sales[&sku].total)
    }

    /// REGION_SET: shoppers of `region` take units from `order`, first
    /// that has them.
    pub fn set_region(
        &mut self,
        sku: u64,
        region: u16,
        order: &[u16],
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Some(sale) = self.sales.get(&sku) else {
            return Outcome::of(Status::UnknownSku);
        };
        let distinct = (1..order.len()).all(|i| !order[..i].contains(&order[i]));
        let new_region = !sale.regions.iter().any(|(r, _)| *r == region);
        if region == 0
            || !(1..=RESERVE_PREFS_MAX).contains(&order.len())
            || !distinct
            || (new_region && sale.regions.len() >= REGIONS_PER_SALE_MAX)
        {
            return Outcome::of(Status::InvalidArgument);
        }
        if order.iter().any(|&id| sale.location_index(id).is_none()) {
            return Outcome::of(Status::UnknownLocation);
        }
        let event = Event::RegionSet { sku, region, order: order.into(), at_ms: now_ms };
        self.apply(&event);
        events.push(event);
        Outcome::of(Status::Ok)
    }

    /// LOCATIONS: each location's counters and the regions' orders.
    pub fn locations(&self, sku: u64) -> LocationsReply {
        let Some(sale) = self.sales.get(&sku) else {
            return LocationsReply::of(Status::UnknownSku);
        };
        LocationsReply { status: Status::Ok, locations: sale.location_statuses(), regions: sale.region_orders() }
    }

    pub fn set_paused(&mut self, sku: u64, paused: bool, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        let Some(sale) = self.sales.get(&sku) else {
            return Outcome::of(Status::UnknownSku);
        };
        if sale.paused != paused {
            let event =
                if paused { Event::Paused { sku, at_ms: now_ms } } else { Event::Resumed { sku, at_ms: now_ms } };
            self.apply(&event);
            events.push(event);
        }
        Outcome::of(Status::Ok)
    }

    pub fn status(&self, sku: u64, now_ms: u64) -> StatusReply {
        match self.sales.get(&sku) {
            Some(sale) => StatusReply { status: Status::Ok, sale: sale.status(now_ms) },
            None => StatusReply { status: Status::UnknownSku, sale: SaleStatus::default() },
        }
    }

    /// RESERVE. Idempotent on `reservation_id`: a retry of a reservation that
    /// succeeded answers `reserved` with the original expiry and changes
    /// nothing; a refused attempt leaves no trace, so its retry is decided
    /// afresh.
    pub fn reserve(&mut self, op: &Reserve, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        self.reserve_at(op, &Where::Default, now_ms, events)
    }

    /// RESERVE_AT: RESERVE from the first location in `at`'s order that
    /// has all `qty` units, decided with the stock, the per-user limit
    /// (over all the sale's locations) and idempotency in one step. A
    /// retry answers the original reservation, wherever it is.
    pub fn reserve_at(&mut self, op: &Reserve, at: &Where, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        let Some(sale) = self.sales.get_mut(&op.sku) else {
            return Outcome::of(Status::UnknownSku);
        };
        sale.count_decided();
        if let Some(existing) = sale.reservations.get(&op.reservation_id.into()) {
            return if existing.sku == op.sku && existing.user == op.user && existing.qty == op.qty {
                Outcome::reserved_at(existing.expires_at_ms, sale.locations[usize::from(existing.location)].id)
            } else {
                Outcome::of(Status::IdConflict)
            };
        }
        if op.qty == 0 || op.reservation_id == 0 {
            return Outcome::of(Status::InvalidArgument);
        }
        if sale.paused {
            return Outcome::of(Status::Paused);
        }
        // Stock before admission, as the connection's fast path answers
        // from the published counters without knowing the queue: a user
        // gets the same refusal whichever path decides (PROTOCOL.md §6.2).
        if sale.available == 0 {
            return Outcome::of(Status::SoldOut);
        }
        let location = match sale.choose(at, u64::from(op.qty)) {
            Ok(i) => i,
            Err(status) => return Outcome::of(status),
        };
        if sale.queue.as_ref().is_some_and(|q| !q.may_reserve(op.user, now_ms)) {
            return Outcome::of(Status::NotAdmitted);
        }
        let held = sale.users.get(&op.user).unwrap_or(0);
        if u64::from(held) + u64::from(op.qty) > u64::from(sale.limit_per_user) {
            return Outcome::of(Status::LimitExceeded);
        }
        // Claim last: only a reservation that will succeed takes an id.
        match self.directory.claim(op.reservation_id, op.sku) {
            Claim::New => {}
            // Same SKU but not in our map cannot happen: this shard owns the SKU.
            Claim::Same | Claim::Conflict => return Outcome::of(Status::IdConflict),
        }
        // Monotonic deadlines keep the expiry queue sorted even if the wall
        // clock steps back.
        let floor = sale.expiry.back().map_or(0, |entry| entry.deadline_ms);
        let expires_at_ms = (now_ms + sale.ttl_ms).max(floor);
        let location = sale.locations[location].id;
        let event = Event::Reserved {
            sku: op.sku,
            user: op.user,
            qty: op.qty,
            reservation_id: op.reservation_id,
            expires_at_ms,
            at_ms: now_ms,
            location,
        };
        self.apply_reserved(&event);
        events.push(event);
        Outcome::reserved_at(expires_at_ms, location)
    }

    /// Decide a run of RESERVEs in order, exactly as [`Self::reserve`] one by
    /// one, while prefetching the directory slot of the request
    /// [`RESERVE_PREFETCH_AHEAD`] places ahead: the claim's CAS then finds
    /// its line in cache instead of stalling on a miss (at 1M users that
    /// miss was most of a reservation's cost).
    pub fn reserve_run<T>(
        &mut self,
        items: &[T],
        op_of: impl Fn(&T) -> &Reserve,
        now_ms: u64,
        events: &mut Vec<Event>,
        mut out: impl FnMut(&T, Outcome),
    ) {
        for item in items.iter().take(RESERVE_PREFETCH_AHEAD) {
            self.prefetch_reserve(op_of(item));
        }
        // Sold out, the requests behind will most likely be refused on
        // cached state: prefetching for them would be wasted work.
        let mut prefetching = true;
        for (i, item) in items.iter().enumerate() {
            if let Some(ahead) = items.get(i + RESERVE_PREFETCH_AHEAD).filter(|_| prefetching) {
                self.prefetch_reserve(op_of(ahead));
            }
            let outcome = self.reserve(op_of(item), now_ms, events);
            prefetching = outcome.status != Status::SoldOut;
            out(item, outcome);
        }
    }

    /// Start loading what deciding `op` will miss on (a hint; see
    /// [`Self::reserve_run`]).
    #[inline]
    pub fn prefetch_reserve(&self, op: &Reserve) {
        if op.reservation_id == 0 {
            return;
        }
        self.directory.prefetch(op.reservation_id);
        if let Some(sale) = self.sales.get(&op.sku) {
            sale.reservations.prefetch(&op.reservation_id.into());
            sale.users.prefetch(&op.user);
        }
    }

    /// Start loading what deciding a CONFIRM or RELEASE of `id` (of
    /// `sku`) will miss on: its reservation record (a hint).
    #[inline]
    pub fn prefetch_reservation(&self, sku: u64, id: u128) {
        if let Some(sale) = self.sales.get(&sku) {
            sale.reservations.prefetch(&id.into());
        }
    }

    /// Start loading what applying `event` in replay will miss on: the
    /// reservation index, and for a new reservation the per-user record.
    #[inline]
    pub fn prefetch_apply(&self, event: &Event) {
        match *event {
            Event::Reserved { sku, user, reservation_id, .. } => {
                if let Some(sale) = self.sales.get(&sku) {
                    sale.reservations.prefetch(&reservation_id.into());
                    sale.users.prefetch(&user);
                }
            }
            Event::Confirmed { sku, reservation_id, .. }
            | Event::Released { sku, reservation_id, .. }
            | Event::Expired { sku, reservation_id, .. } => self.prefetch_reservation(sku, reservation_id),
            _ => {}
        }
    }

    /// The record of reservation `id` of `sku`, if this engine has it.
    fn held_record(&self, sku: u64, id: u128) -> Option<&Reservation> {
        let sale = self.sales.get(&sku)?;
        sale.count_decided();
        sale.reservations.get(&id.into())
    }

    /// CONFIRM of reservation `id` of `sku` (the id directory's answer).
    /// A reservation past its expiry is expired here (even if the expiry
    /// tick has not run yet), so a late payment is never accepted.
    pub fn confirm(
        &mut self,
        sku: u64,
        id: u128,
        payment_ref: &Bytes,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Some(r) = self.held_record(sku, id) else {
            return Outcome::of(Status::UnknownReservation);
        };
        match r.state {
            HoldState::Held if now_ms >= r.expires_at_ms => {
                let expires_at_ms = r.expires_at_ms;
                let event = Event::Expired { sku, reservation_id: id, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
                Outcome::new(Status::Expired, expires_at_ms)
            }
            HoldState::Held => {
                let event =
                    Event::Confirmed { sku, reservation_id: id, at_ms: now_ms, payment_ref: payment_ref.clone() };
                self.apply(&event);
                events.push(event);
                Outcome::new(Status::Confirmed, now_ms)
            }
            HoldState::Confirmed
                if self.sales[&sku].payment_refs.get(&IdKey::from(id)).map(|p| &p[..]) == Some(&payment_ref[..]) =>
            {
                Outcome::new(Status::Confirmed, r.settled_at_ms)
            }
            HoldState::Confirmed => Outcome::of(Status::IdConflict),
            HoldState::Released => Outcome::of(Status::AlreadyReleased),
            HoldState::Expired => Outcome::new(Status::Expired, r.expires_at_ms),
        }
    }

    /// RELEASE of reservation `id` of `sku`. Idempotent: releasing twice
    /// answers `released` twice.
    pub fn release(&mut self, sku: u64, id: u128, now_ms: u64, events: &mut Vec<Event>) -> Outcome {
        let Some(r) = self.held_record(sku, id) else {
            return Outcome::of(Status::UnknownReservation);
        };
        match r.state {
            HoldState::Held if now_ms >= r.expires_at_ms => {
                let expires_at_ms = r.expires_at_ms;
                let event = Event::Expired { sku, reservation_id: id, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
                Outcome::new(Status::Expired, expires_at_ms)
            }
            HoldState::Held => {
                let event = Event::Released { sku, reservation_id: id, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
                Outcome::of(Status::Released)
            }
            HoldState::Released => Outcome::of(Status::Released),
            HoldState::Expired => Outcome::new(Status::Expired, r.expires_at_ms),
            HoldState::Confirmed => Outcome::of(Status::AlreadyConfirmed),
        }
    }

    /// Expire every held reservation whose deadline is <= `now_ms`.
    /// Cost: O(1) per popped entry; returns the number expired.
    pub fn expire_due(&mut self, now_ms: u64, events: &mut Vec<Event>) -> usize {
        let mut expired = 0;
        let skus: Vec<u64> = self
            .sales
            .iter()
            .filter(|(_, s)| s.expiry.front().is_some_and(|entry| entry.deadline_ms <= now_ms))
            .map(|(sku, _)| *sku)
            .collect();
        for sku in skus {
            loop {
                let sale = self.sales.get_mut(&sku).expect("sku listed above");
                let Some(entry) = sale.expiry.front() else {
                    break;
                };
                let (deadline, id) = (entry.deadline_ms, entry.id());
                if deadline > now_ms {
                    break;
                }
                sale.expiry.pop_front();
                let still_held = sale
                    .reservations
                    .get(&id.into())
                    .is_some_and(|r| r.state == HoldState::Held && r.expires_at_ms == deadline);
                if still_held {
                    let event = Event::Expired { sku, reservation_id: id, at_ms: now_ms };
                    self.apply(&event);
                    events.push(event);
                    expired += 1;
                }
            }
        }
        expired
    }

    // ------------------------------------------------------------ the queue

    /// JOIN: a place in the sale's line (idempotent per user: joining again
    /// answers the same ticket; after a lapse it is a new place at the back).
    pub fn join(&mut self, sku: u64, user: u64, now_ms: u64, events: &mut Vec<Event>) -> QueueTicket {
        let Some(sale) = self.sales.get(&sku) else {
            return QueueTicket::of(Status::UnknownSku);
        };
        let Some(room) = &sale.queue else {
            // No queue: everyone is admitted, with no deadline.
            return QueueTicket::of(Status::Admitted);
        };
        if matches!(room.ticket(user, now_ms), TicketState::None | TicketState::Lapsed) {
            if sale.sold_out_for_good() {
                return QueueTicket::of(Status::SoldOut);
            }
            if room.waiting() >= QUEUE_WAITING_MAX {
                return QueueTicket { estimated_wait_ms: 1000, ..QueueTicket::of(Status::Busy) };
            }
            let event = Event::QueueJoined { sku, user, at_ms: now_ms };
            self.apply(&event);
            events.push(event);
        }
        self.poll(sku, user, now_ms)
    }

    /// POLL: where `user` stands in the sale's line.
    pub fn poll(&self, sku: u64, user: u64, now_ms: u64) -> QueueTicket {
        let Some(sale) = self.sales.get(&sku) else {
            return QueueTicket::of(Status::UnknownSku);
        };
        sale.count_decided();
        let Some(room) = &sale.queue else {
            return QueueTicket::of(Status::Admitted);
        };
        let ticket = room.ticket(user, now_ms);
        if sale.sold_out_for_good() && ticket != TicketState::None {
            return QueueTicket::of(Status::SoldOut);
        }
        let stock_pending = sale.available == 0;
        match ticket {
            TicketState::None => QueueTicket::of(Status::NoTicket),
            TicketState::PreStart => QueueTicket {
                pre_start: true,
                stock_pending,
                estimated_wait_ms: room.config.start_at_ms.saturating_sub(now_ms),
                ..QueueTicket::of(Status::Waiting)
            },
            TicketState::Waiting { position } => QueueTicket {
                stock_pending,
                position,
                estimated_wait_ms: room.estimated_wait_ms(position),
                ..QueueTicket::of(Status::Waiting)
            },
            TicketState::Admitted { until_ms, .. } => {
                QueueTicket { stock_pending, admitted_until_ms: until_ms, ..QueueTicket::of(Status::Admitted) }
            }
            TicketState::Lapsed => QueueTicket::of(Status::Expired),
        }
    }

    /// The queues' clock: start what is due (with a seed from `seed`),
    /// lapse unused admissions, admit the next in line at the rate, under
    /// the cap. Runs on every shard cycle and tick.
    pub fn queue_tick(&mut self, now_ms: u64, seed: &mut dyn FnMut() -> u64, events: &mut Vec<Event>) {
        for i in 0..self.queued.len() {
            let sku = self.queued[i];
            if self.room_mut(sku).start_due(now_ms) {
                let event = Event::QueueStarted { sku, seed: seed(), at_ms: now_ms };
                self.apply(&event);
                events.push(event);
            }
            if !self.room_mut(sku).started() {
                continue;
            }
            if self.sales[&sku].paused {
                // Windows stand still while no one can reserve (RESUMED
                // moves them out by the pause).
                continue;
            }
            while let Some(user) = self.room_mut(sku).due_lapse(now_ms) {
                let event = Event::AdmissionLapsed { sku, user, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
            }
            let sale = &self.sales[&sku];
            let cap = match sale.queue.as_ref().expect("queued").config.admit_cap {
                0 => sale.available,
                cap => u64::from(cap).min(sale.available),
            };
            let admission_ms = sale.queue.as_ref().expect("queued").config.admission_ms;
            let budget = self.room_mut(sku).admission_budget(now_ms, EXPIRY_TICK_MS);
            for _ in 0..budget {
                let room = self.room_mut(sku);
                if room.admitted_outstanding() as u64 >= cap {
                    break;
                }
                let Some(user) = room.head() else { break };
                room.spend_token();
                let until_ms = (now_ms + admission_ms).max(room.last_deadline());
                let event = Event::Admitted { sku, user, until_ms, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
            }
        }
    }

    fn room_mut(&mut self, sku: u64) -> &mut WaitingRoom {
        self.sales.get_mut(&sku).and_then(|s| s.queue.as_deref_mut()).expect("a queued sale")
    }

    // ------------------------------------------------------------------ apply

    /// Apply one event but leave the id-directory claim of a RESERVED event
    /// to the caller, by pushing `(id, sku)` onto `claims`. Replay uses this
    /// to fill the shared directory on another core while it applies.
    pub fn apply_deferring_claim(&mut self, event: &Event, claims: &mut Vec<(u128, u64)>) {
        match *event {
            Event::Reserved { sku, reservation_id, .. } => {
                claims.push((reservation_id, sku));
                self.apply_reserved(event);
            }
            _ => self.apply(event),
        }
    }

    /// Apply one event. Used by the command path above and by replay; the
    /// event must be valid for the current state (it was decided against
    /// it), so violations are bugs and panic.
    pub fn apply(&mut self, event: &Event) {
        match *event {
            Event::SaleCreated { sku, stock, limit_per_user, ttl_ms, hot, .. } => {
                self.add_sale(sku, vec![Location::new(0, stock)], Vec::new(), limit_per_user, ttl_ms, hot);
            }
            Event::SaleCreatedAt { sku, limit_per_user, ttl_ms, hot, ref locations, .. } => {
                let list: Vec<Location> =
                    locations.locations.iter().map(|&(id, stock)| Location::new(id, stock)).collect();
                let index = |id: u16| list.iter().position(|l| l.id == id).expect("validated") as u8;
                let regions = locations
                    .regions
                    .iter()
                    .map(|(r, order)| (*r, order.iter().map(|&id| index(id)).collect()))
                    .collect();
                self.add_sale(sku, list, regions, limit_per_user, ttl_ms, hot);
            }
            Event::LocationAdded { sku, location, stock, .. } => {
                let sale = self.sale_mut(sku);
                assert!(sale.location_index(location).is_none(), "sku {sku}: location {location} added twice");
                sale.locations.push(Location::new(location, stock));
                sale.total += stock;
                sale.available += stock;
                sale.assert_invariant(sku);
                sale.publish();
                sale.publish_locations();
            }
            Event::RegionSet { sku, region, ref order, .. } => {
                let sale = self.sale_mut(sku);
                let order: Box<[u8]> = order
                    .iter()
                    .map(|&id| sale.location_index(id).unwrap_or_else(|| panic!("sku {sku}: no location {id}")) as u8)
                    .collect();
                match sale.regions.iter_mut().find(|(r, _)| *r == region) {
                    Some((_, o)) => *o = order,
                    None => sale.regions.push((region, order)),
                }
            }
            Event::Restocked { sku, qty, location, .. } => {
                let sale = self.sale_mut(sku);
                let i = sale.location_index(location).unwrap_or_else(|| panic!("sku {sku}: no location {location}"));
                sale.locations[i].total += qty;
                sale.locations[i].available += qty;
                sale.total += qty;
                sale.available += qty;
                sale.assert_location(sku, i);
                sale.assert_invariant(sku);
                sale.publish();
                sale.publish_location(i);
            }
            Event::Paused { sku, at_ms } | Event::Resumed { sku, at_ms } => {
                let sale = self.sale_mut(sku);
                sale.paused = matches!(event, Event::Paused { .. });
                sale.publish();
                if let Some(room) = sale.queue.as_deref_mut() {
                    if sale.paused {
                        room.apply_paused(at_ms);
                    } else {
                        room.apply_resumed(at_ms);
                    }
                }
            }
            Event::Reserved { sku, reservation_id, .. } => {
                // Replay path: the live path claimed the id while deciding.
                let claim = self.directory.claim(reservation_id, sku);
                assert!(!matches!(claim, Claim::Conflict), "id {reservation_id:#x} held by another sku");
                self.apply_reserved(event);
            }
            Event::Confirmed { sku, reservation_id, at_ms, ref payment_ref } => {
                let (_, qty, i) = self.settle(sku, reservation_id, HoldState::Confirmed, at_ms);
                let sale = self.sale_mut(sku);
                sale.payment_refs.insert(reservation_id.into(), payment_ref[..].into());
                sale.reserved -= u64::from(qty);
                sale.sold += u64::from(qty);
                sale.locations[i].reserved -= u64::from(qty);
                sale.locations[i].sold += u64::from(qty);
                sale.assert_location(sku, i);
                sale.assert_invariant(sku);
                sale.publish();
                sale.publish_location(i);
            }
            Event::Released { sku, reservation_id, at_ms } | Event::Expired { sku, reservation_id, at_ms } => {
                let state =
                    if matches!(event, Event::Released { .. }) { HoldState::Released } else { HoldState::Expired };
                let (user, qty, i) = self.settle(sku, reservation_id, state, at_ms);
                let sale = self.sale_mut(sku);
                sale.reserved -= u64::from(qty);
                sale.available += u64::from(qty);
                sale.locations[i].reserved -= u64::from(qty);
                sale.locations[i].available += u64::from(qty);
                let units = sale.users.get_mut(&user).expect("holder has a user record");
                *units -= qty;
                if *units == 0 {
                    sale.users.remove(&user);
                }
                sale.assert_location(sku, i);
                sale.assert_invariant(sku);
                sale.publish();
                sale.publish_location(i);
            }
            Event::QueueConfigured { sku, admit_rate_per_s, admit_cap, admission_ms, start_at_ms, at_ms } => {
                let config =
                    stampede_protocol::message::QueueConfig { admit_rate_per_s, admit_cap, admission_ms, start_at_ms };
                let sale = self.sale_mut(sku);
                assert!(sale.queue.is_none(), "sku {sku}: queue configured twice");
                sale.queue = Some(Box::new(WaitingRoom::new(config, at_ms)));
                sale.publish();
                self.queued.push(sku);
            }
            Event::QueueJoined { sku, user, at_ms } => {
                self.room_mut(sku).apply_joined(user, at_ms);
                self.sale_mut(sku).publish();
            }
            Event::QueueStarted { sku, seed, .. } => self.room_mut(sku).apply_started(seed),
            Event::Admitted { sku, user, until_ms, .. } => {
                self.room_mut(sku).apply_admitted(user, until_ms);
                self.sale_mut(sku).publish();
            }
            Event::AdmissionLapsed { sku, user, .. } => self.room_mut(sku).apply_lapsed(user),
            // Marks where a leader's term begins (the cluster's history);
            // no sale changes.
            Event::TermStarted { .. } => {}
            // Where the sale runs; the caller moves its state (see
            // `take_sale`). Units and reservations stay as they are.
            Event::SaleMoved { sku, dedicated, pinned, .. } => {
                let sale = self.sale_mut(sku);
                sale.hot = dedicated;
                sale.pinned = pinned;
                sale.publish();
            }
        }
    }

    /// A new sale (SALE_CREATED or SALE_CREATED_AT).
    fn add_sale(
        &mut self,
        sku: u64,
        locations: Vec<Location>,
        regions: Vec<(u16, Box<[u8]>)>,
        limit_per_user: u32,
        ttl_ms: u64,
        hot: bool,
    ) {
        let stock = locations.iter().map(|l| l.total).sum::<u64>();
        // A hot sale's tables are sized for its stock and faulted in up
        // front: growing a table of a million entries rehashes all of them
        // (a stall of tens of milliseconds for the shard in the middle of
        // the drop), and the first touch of each page of a big table costs
        // a fault and up to 2 MiB of zeroing, which the drop's first
        // requests would pay. Ordinary sales share a pool shard and grow
        // on demand.
        let presized = if hot { stock.min(SALE_PRESIZED_RESERVATIONS_MAX) as usize } else { 0 };
        let mut users = FlatMap::with_capacity(presized);
        let mut reservations = Holds::default();
        if presized > 0 {
            reservations.reserve(presized);
            reservations.index.prefault();
            users.prefault();
        }
        let sale = Sale {
            total: stock,
            available: stock,
            reserved: 0,
            sold: 0,
            locations,
            regions,
            limit_per_user,
            ttl_ms,
            hot,
            // An admin who asks for a hot sale means it.
            pinned: hot,
            paused: false,
            holds: 0,
            reservations,
            payment_refs: FastMap::default(),
            users,
            expiry: ChunkedQueue::default(),
            gauge: Arc::new(SkuGauge::default()),
            queue: None,
            decided: Default::default(),
        };
        sale.publish();
        sale.publish_locations();
        let previous = self.sales.insert(sku, sale);
        assert!(previous.is_none(), "sku {sku} created twice");
    }

    /// Apply `Reserved` once the id is claimed in the directory.
    fn apply_reserved(&mut self, event: &Event) {
        let Event::Reserved { sku, user, qty, reservation_id, expires_at_ms, location, .. } = *event else {
            unreachable!("apply_reserved called with {event:?}")
        };
        let sale = self.sales.get_mut(&sku).expect("reserve on unknown sku");
        if let Some(room) = sale.queue.as_deref_mut() {
            room.apply_reserved(user);
        }
        let i = sale.location_index(location).unwrap_or_else(|| panic!("sku {sku}: no location {location}"));
        sale.locations[i].available -= u64::from(qty);
        sale.locations[i].reserved += u64::from(qty);
        sale.assert_location(sku, i);
        sale.available -= u64::from(qty);
        sale.reserved += u64::from(qty);
        sale.holds += 1;
        let units = sale.users.get_or_insert(user, 0);
        *units += qty;
        assert!(*units <= sale.limit_per_user, "user {user} above limit on sku {sku}");
        sale.expiry.push_back(ExpiryEntry::new(expires_at_ms, reservation_id));
        sale.assert_invariant(sku);
        sale.publish();
        sale.publish_location(i);
        let reservation =
            Reservation { sku, user, qty, state: HoldState::Held, expires_at_ms, settled_at_ms: 0, location: i as u8 };
        let added = sale.reservations.insert(reservation_id.into(), reservation);
        assert!(added, "reservation {reservation_id:#x} applied twice");
    }

    /// Move a held reservation of `sku` to its final state; returns
    /// (user, qty, location index).
    fn settle(&mut self, sku: u64, id: u128, state: HoldState, at_ms: u64) -> (u64, u32, usize) {
        let sale = self.sale_mut(sku);
        let r = sale.reservations.get_mut(&id.into()).expect("settling an unknown reservation");
        assert_eq!(r.state, HoldState::Held, "reservation {id:#x} settled twice");
        r.state = state;
        r.settled_at_ms = at_ms;
        let (user, qty, location) = (r.user, r.qty, usize::from(r.location));
        sale.holds -= 1;
        (user, qty, location)
    }

    fn sale_mut(&mut self, sku: u64) -> &mut Sale {
        self.sales.get_mut(&sku).unwrap_or_else(|| panic!("event for unknown sku {sku}"))
    }

    /// Check every invariant over the whole state (tests, after recovery):
    /// counters against the reservations, in one pass over them.
    pub fn check_invariants(&self) {
        #[derive(Default, PartialEq, Debug)]
        struct Tally {
            reserved: u64,
            sold: u64,
            holds: u64,
            users: FlatMap<u64, u32>,
        }
        for (&sku, sale) in &self.sales {
            let mut tally = Tally::default();
            // (reserved, sold) per location, from the reservations.
            let mut at = vec![(0u64, 0u64); sale.locations.len()];
            for r in sale.reservations.values() {
                assert_eq!(r.sku, sku, "a reservation of sku {} among sku {sku}'s", r.sku);
                let here = at.get_mut(usize::from(r.location)).expect("a reservation at a location the sale has");
                match r.state {
                    HoldState::Held => {
                        tally.reserved += u64::from(r.qty);
                        tally.holds += 1;
                        *tally.users.get_or_insert(r.user, 0) += r.qty;
                        here.0 += u64::from(r.qty);
                    }
                    HoldState::Confirmed => {
                        tally.sold += u64::from(r.qty);
                        *tally.users.get_or_insert(r.user, 0) += r.qty;
                        here.1 += u64::from(r.qty);
                    }
                    HoldState::Released | HoldState::Expired => {}
                }
            }
            assert!(!sale.locations.is_empty(), "sku {sku}: no location");
            for (i, l) in sale.locations.iter().enumerate() {
                sale.assert_location(sku, i);
                assert_eq!(
                    (l.reserved, l.sold),
                    at[i],
                    "sku {sku} location {}: counters disagree with reservations",
                    l.id
                );
            }
            let sum = |f: fn(&Location) -> u64| sale.locations.iter().map(f).sum::<u64>();
            assert_eq!(
                (sum(|l| l.total), sum(|l| l.available), sum(|l| l.reserved), sum(|l| l.sold)),
                (sale.total, sale.available, sale.reserved, sale.sold),
                "sku {sku}: the sale's counters are not the sums over its locations"
            );
            sale.assert_invariant(sku);
            assert_eq!(tally.reserved, sale.reserved, "sku {sku}: reserved counter disagrees with reservations");
            assert_eq!(tally.sold, sale.sold, "sku {sku}: sold counter disagrees with reservations");
            assert_eq!(tally.holds, sale.holds, "sku {sku}: hold count disagrees");
            assert_eq!(tally.users, sale.users, "sku {sku}: per-user records disagree with reservations");
            assert!(tally.users.values().all(|u| u <= sale.limit_per_user), "sku {sku}: user above limit");
            assert_eq!(sale.gauge.available(), sale.available, "sku {sku}: gauge not published");
        }
    }
}
