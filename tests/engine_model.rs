//! Model-based test: random operation sequences run against the engine and
//! against a plain reference model written independently from the spec;
//! every outcome and every counter must agree. Then the engine's event
//! stream is replayed into a fresh engine, which must reach the same state
//! (the property the write-ahead log relies on).
//!
//! The engine side is two engines sharing one id directory, as two shards
//! do, and sales move between them at random (SALE_MOVED: the tables are
//! handed over); the model knows nothing of placement, so a move must
//! change no answer.
//!
//! Sales have one location (made by the old SALE_CREATE) or several, with a
//! region; reservations name preferred locations, a region, or none, and
//! the model picks the location from the spec's rule (the first in order
//! with all the units); locations are restocked and added as it runs. The
//! counters are compared per location after every step.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use stampede::engine::{Engine, Event, HoldState, ReservationDirectory};
use stampede_protocol::message::{Outcome, Reserve, SaleCreate, SaleLocations, Where};
use stampede_protocol::Status;

#[derive(Clone, Debug)]
enum Op {
    /// One location (`stock.len() == 1`, id 0, the old SALE_CREATE) or
    /// several (ids 1, 2, ...; region 7 takes them in reverse).
    Create {
        sku: u64,
        stock: Vec<u64>,
        limit: u32,
        hot: bool,
    },
    /// At the first location (`None`, the old RESTOCK) or at one by id.
    Restock {
        sku: u64,
        location: Option<u16>,
        qty: u64,
    },
    AddLocation {
        sku: u64,
        location: u16,
        stock: u64,
    },
    Pause {
        sku: u64,
        paused: bool,
    },
    Reserve {
        sku: u64,
        user: u64,
        qty: u32,
        id: u128,
        at: Where,
    },
    Confirm {
        id: u128,
        payment: u8,
    },
    Release {
        id: u128,
    },
    /// Hand the sale to the other engine (a live move between shards).
    Move {
        sku: u64,
    },
    /// Move the clock; `tick` also runs the shard's expiry pass.
    Advance {
        ms: u64,
        tick: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let sku = 1..4u64;
    let id = 1..25u128;
    prop_oneof![
        1 => (sku.clone(), proptest::collection::vec(0..4u64, 1..4), 1..4u32, any::<bool>())
            .prop_map(|(sku, stock, limit, hot)| Op::Create { sku, stock, limit, hot }),
        1 => (sku.clone(), proptest::option::of(0..5u16), 0..4u64)
            .prop_map(|(sku, location, qty)| Op::Restock { sku, location, qty }),
        1 => (sku.clone(), 0..6u16, 0..3u64).prop_map(|(sku, location, stock)| Op::AddLocation { sku, location, stock }),
        1 => (sku.clone(), any::<bool>()).prop_map(|(sku, paused)| Op::Pause { sku, paused }),
        8 => (sku.clone(), 0..5u64, 0..4u32, id.clone(), at()).prop_map(|(sku, user, qty, id, at)| Op::Reserve { sku, user, qty, id, at }),
        3 => (id.clone(), 0..2u8).prop_map(|(id, payment)| Op::Confirm { id, payment }),
        3 => id.prop_map(|id| Op::Release { id }),
        2 => sku.clone().prop_map(|sku| Op::Move { sku }),
        3 => (0..1500u64, any::<bool>()).prop_map(|(ms, tick)| Op::Advance { ms, tick }),
    ]
}

/// Where a reservation may take its units: the default order, region 7
/// (mapped) or 8 (not: the default), or a list of ids (6 is never a
/// location: `unknown_location`).
fn at() -> impl Strategy<Value = Where> {
    prop_oneof![
        2 => Just(Where::Default),
        1 => prop_oneof![Just(7u16), Just(8u16)].prop_map(Where::Region),
        3 => proptest::collection::vec(0..7u16, 1..4).prop_map(|mut ids| {
            ids.dedup();
            Where::locations(&ids)
        }),
    ]
}

/// The locations section of a sale made with `stock.len() > 1` locations.
fn locations_of(stock: &[u64]) -> SaleLocations {
    let n = stock.len() as u16;
    SaleLocations {
        locations: stock.iter().enumerate().map(|(i, &s)| (i as u16 + 1, s)).collect(),
        regions: vec![(7, (1..=n).rev().collect())],
    }
}

fn ttl_ms(sku: u64) -> u64 {
    700 * sku
}

// ----------------------------------------------------------------- the model

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct MLoc {
    id: u16,
    total: u64,
    available: u64,
    reserved: u64,
    sold: u64,
}

#[derive(Debug, Default)]
struct MSale {
    total: u64,
    available: u64,
    reserved: u64,
    sold: u64,
    limit: u32,
    paused: bool,
    /// In the order added.
    locations: Vec<MLoc>,
    /// Region 7's order of ids (sales made with several locations).
    region7: Vec<u16>,
}

impl MSale {
    fn at(&mut self, id: u16) -> &mut MLoc {
        self.locations.iter_mut().find(|l| l.id == id).expect("a location of the sale")
    }

    /// The spec's choice: the first location in order with all `qty`
    /// units; `sold_out` if none in the order has any, else
    /// `insufficient_stock`; an unknown id in a list: `unknown_location`.
    fn choose(&self, at: &Where, qty: u64) -> Result<u16, Status> {
        let default: Vec<u16> = self.locations.iter().map(|l| l.id).collect();
        let order: Vec<u16> = match at {
            Where::Default => default,
            Where::Region(7) if !self.region7.is_empty() => self.region7.clone(),
            Where::Region(_) => default,
            Where::Locations { .. } => {
                if at.list().iter().any(|id| !default.contains(id)) {
                    return Err(Status::UnknownLocation);
                }
                at.list().to_vec()
            }
        };
        let avail = |id: u16| self.locations.iter().find(|l| l.id == id).unwrap().available;
        if let Some(&id) = order.iter().find(|&&id| avail(id) >= qty) {
            return Ok(id);
        }
        Err(if order.iter().any(|&id| avail(id) > 0) { Status::InsufficientStock } else { Status::SoldOut })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MState {
    Held,
    Confirmed,
    Released,
    Expired,
}

#[derive(Debug)]
struct MRes {
    sku: u64,
    user: u64,
    qty: u32,
    location: u16,
    state: MState,
    expires: u64,
    settled: u64,
    payment: Option<u8>,
}

#[derive(Default)]
struct Model {
    sales: BTreeMap<u64, MSale>,
    res: HashMap<u128, MRes>,
}

impl Model {
    fn held_units(&self, sku: u64, user: u64) -> u64 {
        self.res
            .values()
            .filter(|r| r.sku == sku && r.user == user && matches!(r.state, MState::Held | MState::Confirmed))
            .map(|r| u64::from(r.qty))
            .sum()
    }

    fn expire(&mut self, id: u128, now: u64) {
        let r = self.res.get_mut(&id).unwrap();
        r.state = MState::Expired;
        r.settled = now;
        let s = self.sales.get_mut(&r.sku).unwrap();
        s.reserved -= u64::from(r.qty);
        s.available += u64::from(r.qty);
        let l = s.at(r.location);
        l.reserved -= u64::from(r.qty);
        l.available += u64::from(r.qty);
    }

    fn tick(&mut self, now: u64) {
        let due: Vec<u128> =
            self.res.iter().filter(|(_, r)| r.state == MState::Held && r.expires <= now).map(|(id, _)| *id).collect();
        for id in due {
            self.expire(id, now);
        }
    }

    fn apply(&mut self, op: &Op, now: u64) -> Outcome {
        match *op {
            Op::Create { sku, ref stock, limit, .. } => {
                if self.sales.contains_key(&sku) {
                    return Outcome::of(Status::SaleExists);
                }
                let total = stock.iter().sum();
                let (locations, region7) = if stock.len() == 1 {
                    (vec![MLoc { id: 0, total, available: total, ..Default::default() }], Vec::new())
                } else {
                    let l = locations_of(stock);
                    let locations =
                        l.locations.iter().map(|&(id, s)| MLoc { id, total: s, available: s, ..Default::default() });
                    (locations.collect(), l.regions[0].1.clone())
                };
                let sale = MSale { total, available: total, limit, locations, region7, ..Default::default() };
                self.sales.insert(sku, sale);
                Outcome::of(Status::Ok)
            }
            Op::Restock { sku, location, qty } => match self.sales.get_mut(&sku) {
                None => Outcome::of(Status::UnknownSku),
                Some(s) => {
                    let id = location.unwrap_or(s.locations[0].id);
                    if !s.locations.iter().any(|l| l.id == id) {
                        return Outcome::of(Status::UnknownLocation);
                    }
                    if qty == 0 {
                        return Outcome::of(Status::InvalidArgument);
                    }
                    s.total += qty;
                    s.available += qty;
                    let l = s.at(id);
                    l.total += qty;
                    l.available += qty;
                    // RESTOCK answers the sale's total, RESTOCK_AT the location's.
                    Outcome::new(Status::Ok, if location.is_some() { l.total } else { s.total })
                }
            },
            Op::AddLocation { sku, location, stock } => match self.sales.get_mut(&sku) {
                None => Outcome::of(Status::UnknownSku),
                Some(s) if s.locations.iter().any(|l| l.id == location) => Outcome::of(Status::LocationExists),
                Some(s) => {
                    s.locations.push(MLoc { id: location, total: stock, available: stock, ..Default::default() });
                    s.total += stock;
                    s.available += stock;
                    Outcome::new(Status::Ok, s.total)
                }
            },
            Op::Pause { sku, paused } => match self.sales.get_mut(&sku) {
                None => Outcome::of(Status::UnknownSku),
                Some(s) => {
                    s.paused = paused;
                    Outcome::of(Status::Ok)
                }
            },
            Op::Reserve { sku, user, qty, id, ref at } => {
                if !self.sales.contains_key(&sku) {
                    return Outcome::of(Status::UnknownSku);
                }
                // Rules 2a and 2b: the id holds a reservation of this SKU.
                let other_sku = match self.res.get(&id) {
                    Some(r) if r.sku == sku => {
                        return if (r.user, r.qty) == (user, qty) {
                            Outcome::reserved_at(r.expires, r.location)
                        } else {
                            Outcome::of(Status::IdConflict)
                        };
                    }
                    other => other.is_some(),
                };
                if qty == 0 {
                    return Outcome::of(Status::InvalidArgument);
                }
                let held = self.held_units(sku, user);
                let s = &self.sales[&sku];
                if s.paused {
                    return Outcome::of(Status::Paused);
                }
                if s.available == 0 {
                    return Outcome::of(Status::SoldOut);
                }
                let location = match s.choose(at, u64::from(qty)) {
                    Ok(id) => id,
                    Err(status) => return Outcome::of(status),
                };
                // The limit counts units at every location of the sale.
                if held + u64::from(qty) > u64::from(s.limit) {
                    return Outcome::of(Status::LimitExceeded);
                }
                // Rule 8: the id is claimed for another SKU.
                if other_sku {
                    return Outcome::of(Status::IdConflict);
                }
                let expires = now + ttl_ms(sku);
                let s = self.sales.get_mut(&sku).unwrap();
                s.available -= u64::from(qty);
                s.reserved += u64::from(qty);
                let l = s.at(location);
                l.available -= u64::from(qty);
                l.reserved += u64::from(qty);
                let r = MRes { sku, user, qty, location, state: MState::Held, expires, settled: 0, payment: None };
                self.res.insert(id, r);
                Outcome::reserved_at(expires, location)
            }
            Op::Confirm { id, payment } => {
                let Some(r) = self.res.get(&id) else { return Outcome::of(Status::UnknownReservation) };
                match r.state {
                    MState::Held if now >= r.expires => {
                        let expires = r.expires;
                        self.expire(id, now);
                        Outcome::new(Status::Expired, expires)
                    }
                    MState::Held => {
                        let r = self.res.get_mut(&id).unwrap();
                        r.state = MState::Confirmed;
                        r.settled = now;
                        r.payment = Some(payment);
                        let s = self.sales.get_mut(&r.sku).unwrap();
                        s.reserved -= u64::from(r.qty);
                        s.sold += u64::from(r.qty);
                        let l = s.at(r.location);
                        l.reserved -= u64::from(r.qty);
                        l.sold += u64::from(r.qty);
                        Outcome::new(Status::Confirmed, now)
                    }
                    MState::Confirmed if r.payment == Some(payment) => Outcome::new(Status::Confirmed, r.settled),
                    MState::Confirmed => Outcome::of(Status::IdConflict),
                    MState::Released => Outcome::of(Status::AlreadyReleased),
                    MState::Expired => Outcome::new(Status::Expired, r.expires),
                }
            }
            Op::Release { id } => {
                let Some(r) = self.res.get(&id) else { return Outcome::of(Status::UnknownReservation) };
                match r.state {
                    MState::Held if now >= r.expires => {
                        let expires = r.expires;
                        self.expire(id, now);
                        Outcome::new(Status::Expired, expires)
                    }
                    MState::Held => {
                        let r = self.res.get_mut(&id).unwrap();
                        r.state = MState::Released;
                        r.settled = now;
                        let s = self.sales.get_mut(&r.sku).unwrap();
                        s.reserved -= u64::from(r.qty);
                        s.available += u64::from(r.qty);
                        let l = s.at(r.location);
                        l.reserved -= u64::from(r.qty);
                        l.available += u64::from(r.qty);
                        Outcome::of(Status::Released)
                    }
                    MState::Released => Outcome::of(Status::Released),
                    MState::Expired => Outcome::new(Status::Expired, r.expires),
                    MState::Confirmed => Outcome::of(Status::AlreadyConfirmed),
                }
            }
            Op::Move { sku } if self.sales.contains_key(&sku) => Outcome::of(Status::Ok),
            Op::Move { .. } => Outcome::of(Status::UnknownSku),
            Op::Advance { .. } => Outcome::of(Status::Ok),
        }
    }
}

// ---------------------------------------------------------------- the engine

/// Two shards' engines over one id directory.
struct Shards([Engine; 2]);

impl Shards {
    fn new() -> Shards {
        let directory = Arc::new(ReservationDirectory::new());
        Shards([Engine::new(directory.clone()), Engine::new(directory)])
    }

    /// The engine holding `sku` (a new sale goes by its SKU, as the pool does).
    fn holder(&self, sku: u64) -> usize {
        (0..2).find(|&i| self.0[i].placement(sku).is_some()).unwrap_or((sku % 2) as usize)
    }

    fn run(&mut self, op: &Op, now: u64, events: &mut Vec<Event>) -> Outcome {
        let sku = match *op {
            Op::Create { sku, .. }
            | Op::Restock { sku, .. }
            | Op::AddLocation { sku, .. }
            | Op::Pause { sku, .. }
            | Op::Reserve { sku, .. } => sku,
            Op::Confirm { id, .. } | Op::Release { id } => self.0[0].sku_of(id).unwrap_or(0),
            Op::Move { sku } => {
                let from = self.holder(sku);
                let Some((hot, _)) = self.0[from].placement(sku) else { return Outcome::of(Status::UnknownSku) };
                let moving = self.0[from].move_out(sku, !hot, true, now, events).expect("it has the sale");
                self.0[1 - from].put_sale(moving);
                return Outcome::of(Status::Ok);
            }
            Op::Advance { .. } => 0,
        };
        let i = self.holder(sku);
        run_engine(&mut self.0[i], op, now, events)
    }

    fn state(&self) -> Vec<(u64, stampede_protocol::message::SaleStatus)> {
        let mut all = state_of(&self.0[0]);
        all.extend(state_of(&self.0[1]));
        all.sort_unstable_by_key(|(sku, _)| *sku);
        all
    }
}

fn run_engine(engine: &mut Engine, op: &Op, now: u64, events: &mut Vec<Event>) -> Outcome {
    match *op {
        Op::Create { sku, ref stock, limit, hot } => {
            let create = SaleCreate {
                sku,
                stock: stock.iter().sum(),
                limit_per_user: limit,
                ttl_ms: ttl_ms(sku),
                hot,
                queue: None,
            };
            if stock.len() == 1 {
                engine.create_sale(&create, now, events)
            } else {
                engine.create_sale_at(&create, Some(&locations_of(stock)), now, events)
            }
        }
        Op::Restock { sku, location: None, qty } => engine.restock(sku, qty, now, events),
        Op::Restock { sku, location: Some(location), qty } => engine.restock_at(sku, location, qty, now, events),
        Op::AddLocation { sku, location, stock } => engine.add_location(sku, location, stock, now, events),
        Op::Pause { sku, paused } => engine.set_paused(sku, paused, now, events),
        Op::Reserve { sku, user, qty, id, at } => {
            engine.reserve_at(&Reserve { sku, user, qty, reservation_id: id }, &at, now, events)
        }
        Op::Confirm { id, payment } => {
            engine.confirm(engine.sku_of(id).unwrap_or(0), id, &Bytes::from(vec![payment]), now, events)
        }
        Op::Release { id } => engine.release(engine.sku_of(id).unwrap_or(0), id, now, events),
        Op::Move { .. } => unreachable!("Shards::run moves"),
        Op::Advance { .. } => Outcome::of(Status::Ok),
    }
}

fn state_of(engine: &Engine) -> Vec<(u64, stampede_protocol::message::SaleStatus)> {
    let mut skus: Vec<u64> = engine.skus().collect();
    skus.sort_unstable();
    skus.into_iter().map(|sku| (sku, engine.status(sku, 0).sale)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn engine_agrees_with_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut shards = Shards::new();
        let mut model = Model::default();
        let mut events = Vec::new();
        let mut now = 1_000_000u64;
        for (step, op) in ops.iter().enumerate() {
            if let Op::Advance { ms, tick } = *op {
                now += ms;
                if tick {
                    for engine in &mut shards.0 {
                        engine.expire_due(now, &mut events);
                    }
                    model.tick(now);
                }
                continue;
            }
            let got = shards.run(op, now, &mut events);
            let want = model.apply(op, now);
            prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            for (sku, s) in &model.sales {
                let e = shards.0[shards.holder(*sku)].status(*sku, 0).sale;
                prop_assert_eq!(
                    (e.total, e.available, e.reserved, e.sold, e.paused),
                    (s.total, s.available, s.reserved, s.sold, s.paused),
                    "step {}: sku {} counters after {:?}", step, sku, op
                );
                let at = shards.0[shards.holder(*sku)].locations(*sku).locations;
                let want: Vec<(u16, u64, u64, u64, u64)> =
                    s.locations.iter().map(|l| (l.id, l.total, l.available, l.reserved, l.sold)).collect();
                let got: Vec<(u16, u64, u64, u64, u64)> =
                    at.iter().map(|l| (l.location, l.total, l.available, l.reserved, l.sold)).collect();
                prop_assert_eq!(got, want, "step {}: sku {} locations after {:?}", step, sku, op);
            }
        }
        for engine in &shards.0 {
            engine.check_invariants();
        }

        // Replay: the event stream alone rebuilds the same state.
        let mut replayed = Engine::new(Arc::new(ReservationDirectory::new()));
        for event in &events {
            replayed.apply(event);
        }
        replayed.check_invariants();
        prop_assert_eq!(state_of(&replayed), shards.state());
        for sku in model.sales.keys() {
            prop_assert_eq!(replayed.locations(*sku), shards.0[shards.holder(*sku)].locations(*sku));
        }
        // And a snapshot image of each engine imports to the same state.
        for engine in &shards.0 {
            let mut imported = Engine::new(Arc::new(ReservationDirectory::new()));
            for image in engine.export() {
                let sku = image.sku;
                imported.import(image).expect("a consistent image");
                prop_assert_eq!(imported.locations(sku), engine.locations(sku));
            }
            prop_assert_eq!(imported.digest(), engine.digest());
        }
        for (id, r) in &model.res {
            let sku = replayed.sku_of(*id).expect("claimed");
            let a = shards.0[shards.holder(sku)].reservation(*id).expect("engine has it");
            let b = replayed.reservation(*id).expect("replay has it");
            let want = match r.state {
                MState::Held => HoldState::Held,
                MState::Confirmed => HoldState::Confirmed,
                MState::Released => HoldState::Released,
                MState::Expired => HoldState::Expired,
            };
            prop_assert_eq!(a.state, want);
            prop_assert_eq!((a.state, a.expires_at_ms, a.settled_at_ms), (b.state, b.expires_at_ms, b.settled_at_ms));
            prop_assert_eq!((a.location, b.location), (a.location, a.location));
        }
    }
}
