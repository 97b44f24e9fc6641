//! The end-of-drill audit: what the drill was told, reservation by
//! reservation, checked against what the target holds.
//!
//! During the drill every answer about a virtual user's reservation is
//! written to a [`Tally`]: a dense table indexed by the virtual user, one
//! state byte and one expiry each (5 bytes a user: ten million users cost
//! 50 MB, and recording an answer is two relaxed stores, no hashing). After
//! the drill the target's whole state is read ([`TargetState`]: counters
//! per SKU and every reservation it has, settled ones included) and
//! [`check`] compares the two:
//!
//! - **oversold**: per SKU, counters that do not add up (`available +
//!   reserved + sold != total`), units sold beyond the stock, a sold
//!   counter that differs from the units of the confirmed reservations (a
//!   unit sold twice, or a sale with no reservation behind it), and sales
//!   acknowledged to the drill beyond the stock;
//! - **limit_violations**: (sku, user) pairs holding more than the limit,
//!   by the target's reservations and by the drill's acknowledgements;
//! - **lost_acks**: acknowledged reservations the target does not have in
//!   the acknowledged state (a hold that cannot have expired yet, a sale,
//!   a release), or has under another sku, user or quantity;
//! - **phantoms**: reservations the target holds or sold that the drill
//!   was refused, or never asked for.
//!
//! An answer the drill never read (a timeout, a broken connection) may or
//! may not have been applied: such a reservation is held to the limit and
//! the counters only.
//!
//! A sale whose stock sits in several locations (the `regional` scenario)
//! is also checked location by location ([`LocationAudit`]): the tally
//! then keeps the location each `reserved` answer named, and
//!
//! - an acknowledged reservation the target has at another location is a
//!   **lost ack** (the drill was told where the units are);
//! - per location (**oversold**, in units): `available + reserved + sold
//!   == total`; `sold` within the location's stock; `sold` and `reserved`
//!   equal to the units of the confirmed and held reservations the target
//!   lists there; confirmations acknowledged there within its stock; and,
//!   with the acknowledgements, `acked_sold <= sold <= acked_sold +
//!   in_flight` and `acked_held <= reserved <= acked_held + maybe_held +
//!   in_flight`, where `acked_held` are acknowledged holds that cannot have
//!   lapsed, `maybe_held` those that may have, and `in_flight` the answers
//!   lost for reservations there or whose location the drill never learnt
//!   (the same slack the per-SKU checks give them);
//! - the sale's counters are the sums of its locations' (a location the
//!   plan made and the target lost counts its stock).

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use serde::Serialize;

use stampede_protocol::message::HoldState;

use crate::report::Invariants;
use crate::scenario::Plan;
use crate::target::{LocationState, SkuState};

/// A hold whose expiry is this close to the audit may have expired by the
/// time the target's state was read: it is not required to be held.
const EXPIRY_MARGIN_MS: u64 = 1_000;

/// What the drill was told about one virtual user's reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Acked {
    /// Never asked, or refused (sold out, over the limit, busy, ...).
    Nothing = 0,
    /// RESERVE answered `reserved`.
    Held = 1,
    /// CONFIRM answered `confirmed`.
    Confirmed = 2,
    /// RELEASE answered `released`.
    Released = 3,
    /// CONFIRM or RELEASE answered `expired`: the hold had lapsed.
    Lapsed = 4,
    /// The answer was lost: it may or may not have been applied.
    Unknown = 5,
}

impl Acked {
    fn from_u8(v: u8) -> Acked {
        match v {
            1 => Acked::Held,
            2 => Acked::Confirmed,
            3 => Acked::Released,
            4 => Acked::Lapsed,
            5 => Acked::Unknown,
            _ => Acked::Nothing,
        }
    }
}

/// Every virtual user's last answer, written by the drill's workers (each
/// user is taken by exactly one worker, so relaxed stores suffice; the
/// audit reads after every worker has been joined).
pub struct Tally {
    /// Wall-clock ms that expiries are stored relative to.
    epoch_ms: u64,
    state: Vec<AtomicU8>,
    /// A lower bound of the hold's expiry, ms after `epoch_ms` (u32: 49
    /// days, far past the longest TTL).
    expires: Vec<AtomicU32>,
    /// Sales with locations ([`Tally::with_locations`]): the location the
    /// `reserved` answer named, plus one (0: not known); empty otherwise.
    location: Vec<AtomicU32>,
}

impl Tally {
    /// A tally for `users` virtual users, made (and its memory touched)
    /// before the drill's clock starts.
    pub fn new(users: u64, epoch_ms: u64) -> Tally {
        let users = usize::try_from(users).expect("users fit in memory");
        Tally {
            epoch_ms,
            state: (0..users).map(|_| AtomicU8::new(0)).collect(),
            expires: (0..users).map(|_| AtomicU32::new(0)).collect(),
            location: Vec::new(),
        }
    }

    /// A tally that also keeps where each reservation's units are (4 more
    /// bytes a user): for plans whose sales have locations.
    pub fn with_locations(users: u64, epoch_ms: u64) -> Tally {
        let mut tally = Tally::new(users, epoch_ms);
        tally.location = (0..tally.state.len()).map(|_| AtomicU32::new(0)).collect();
        tally
    }

    pub fn users(&self) -> u64 {
        self.state.len() as u64
    }

    pub fn set(&self, index: u64, acked: Acked) {
        self.state[index as usize].store(acked as u8, Ordering::Relaxed);
    }

    /// RESERVE answered `reserved`; the hold lasts at least until `expires_at_ms`.
    pub fn held(&self, index: u64, expires_at_ms: u64) {
        let offset = expires_at_ms.saturating_sub(self.epoch_ms).min(u64::from(u32::MAX)) as u32;
        self.expires[index as usize].store(offset, Ordering::Relaxed);
        self.set(index, Acked::Held);
    }

    /// RESERVE_AT answered `reserved` at `location`; the hold lasts at least
    /// until `expires_at_ms`. (Without [`Tally::with_locations`], as `held`.)
    pub fn held_at(&self, index: u64, expires_at_ms: u64, location: u16) {
        if let Some(slot) = self.location.get(index as usize) {
            slot.store(u32::from(location) + 1, Ordering::Relaxed);
        }
        self.held(index, expires_at_ms);
    }

    /// Where the `reserved` answer said the units are (`None`: not known,
    /// or the tally keeps no locations).
    pub fn location(&self, index: u64) -> Option<u16> {
        let v = self.location.get(index as usize)?.load(Ordering::Relaxed);
        v.checked_sub(1).map(|l| l as u16)
    }

    /// The answer and, for a hold, the lower bound of its expiry.
    pub fn get(&self, index: u64) -> (Acked, u64) {
        let i = index as usize;
        let acked = Acked::from_u8(self.state[i].load(Ordering::Relaxed));
        (acked, self.epoch_ms + u64::from(self.expires[i].load(Ordering::Relaxed)))
    }
}

/// One reservation as the target has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetReservation {
    pub id: u128,
    pub sku: u64,
    pub user: u64,
    pub qty: u32,
    pub state: HoldState,
    pub expires_at_ms: u64,
    /// Where its units are (0: a sale without locations).
    pub location: u16,
}

/// Everything the target holds for the drill's sales.
#[derive(Clone, Debug, Default)]
pub struct TargetState {
    pub sales: Vec<SkuState>,
    /// Per location, for sales with several (none for the others).
    pub locations: Vec<LocationState>,
    /// Every reservation, settled ones included (a target that forgets
    /// expired holds lists them as absent).
    pub reservations: Vec<TargetReservation>,
}

/// What the target has under one virtual user's reservation id.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    Absent,
    /// Held, and its expiry has not passed.
    Held,
    /// Held past its expiry (the target has not expired it yet).
    HeldPastExpiry,
    Confirmed,
    Released,
    Expired,
    /// Present, but for another sku, user or quantity than the drill asked
    /// (`live`: held or sold). The drill never sends that: a target bug.
    Mismatch {
        live: bool,
    },
}

/// One location of a sale with several, as the audit found it: the
/// target's counters, what the drill was told about it, and whether the
/// two agree (see the module's notes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocationAudit {
    pub sku: u64,
    pub location: u16,
    /// The location's stock as the drill created it.
    pub stock: u64,
    /// The target's counters (all 0 if it does not have the location).
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// Acknowledged reservations whose `reserved` answer named this
    /// location, each checked against the target's.
    pub acknowledged: u64,
    /// Confirmations acknowledged here.
    pub acked_sold: u64,
    /// Holds acknowledged here that cannot have lapsed...
    pub acked_held: u64,
    /// ...and those that may have.
    pub maybe_held: u64,
    /// Answers the drill never read that may have left units here.
    pub in_flight: u64,
    /// Acknowledged here, but the target has the reservation elsewhere.
    pub misplaced: u64,
    /// Units this location's counters cannot account for.
    pub unaccounted: u64,
    pub ok: bool,
}

/// Compare the drill's tally with the target's state, read at `now_ms`
/// (wall clock, after the state was read).
pub fn check(plan: &Plan, tally: &Tally, state: &TargetState, now_ms: u64) -> Invariants {
    check_detailed(plan, tally, state, now_ms).0
}

/// [`check`], also returning each location's audit (sales with locations).
pub fn check_detailed(
    plan: &Plan,
    tally: &Tally,
    state: &TargetState,
    now_ms: u64,
) -> (Invariants, Vec<LocationAudit>) {
    let mut invariants = Invariants::default();
    let users = tally.users();
    let mut locations = planned_locations(plan, state);

    // What the target has, by virtual user (and, for sales with
    // locations, where).
    let mut found = vec![Found::Absent; users as usize];
    let mut found_at: Vec<u16> = if locations.is_empty() { Vec::new() } else { vec![0; users as usize] };
    // Units of the target's confirmed and held reservations per location.
    let mut listed: Vec<((u64, u16), (u64, u64))> = Vec::new();
    let mut confirmed_units: Vec<(u64, u64)> = Vec::new();
    let mut holders: Vec<((u64, u64), u64)> = Vec::new();
    for r in &state.reservations {
        let live = matches!(r.state, HoldState::Held | HoldState::Confirmed);
        if live {
            holders.push(((r.sku, r.user), u64::from(r.qty)));
        }
        if r.state == HoldState::Confirmed {
            add(&mut confirmed_units, r.sku, u64::from(r.qty));
        }
        if !locations.is_empty() && live {
            let key = (r.sku, r.location);
            let at = match listed.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => {
                    listed.push((key, (0, 0)));
                    listed.len() - 1
                }
            };
            let units = &mut listed[at].1;
            if r.state == HoldState::Confirmed {
                units.0 += u64::from(r.qty);
            } else {
                units.1 += u64::from(r.qty);
            }
        }
        let Some(index) = plan.index_of(r.id).filter(|&i| i < users) else {
            // Not an id of this drill's: nobody was told about it.
            invariants.phantoms += u64::from(live);
            continue;
        };
        let asked = plan.session(index);
        if let Some(slot) = found_at.get_mut(index as usize) {
            *slot = r.location;
        }
        found[index as usize] = if (r.sku, r.user, r.qty) != (asked.sku, asked.user, 1) {
            Found::Mismatch { live }
        } else {
            match r.state {
                HoldState::Held if r.expires_at_ms > now_ms => Found::Held,
                HoldState::Held => Found::HeldPastExpiry,
                HoldState::Confirmed => Found::Confirmed,
                HoldState::Released => Found::Released,
                HoldState::Expired => Found::Expired,
            }
        };
    }

    // Each acknowledgement against what the target has.
    let mut acked_units: Vec<((u64, u64), u64)> = Vec::new();
    let mut acked_sold: Vec<(u64, u64)> = Vec::new();
    for index in 0..users {
        let (acked, expires_at_ms) = tally.get(index);
        let has = found[index as usize];
        let kept = match acked {
            // Nothing acknowledged, but something held or sold under the
            // id; or, whatever the answer, held or sold for someone else.
            Acked::Nothing => {
                invariants.phantoms += u64::from(matches!(
                    has,
                    Found::Held | Found::HeldPastExpiry | Found::Confirmed | Found::Mismatch { live: true }
                ));
                continue;
            }
            Acked::Unknown => {
                invariants.phantoms += u64::from(has == Found::Mismatch { live: true });
                // Its units may be anywhere the drill did not hear of, or
                // at the location a `reserved` answer named before.
                let session = plan.session(index);
                for l in locations.iter_mut().filter(|l| l.sku == session.sku) {
                    l.in_flight += u64::from(tally.location(index).is_none_or(|at| at == l.location));
                }
                continue;
            }
            // A hold that cannot have expired must be held; one that may
            // have may also be gone, but never settled by someone else.
            Acked::Held if expires_at_ms > now_ms + EXPIRY_MARGIN_MS => has == Found::Held,
            Acked::Held => matches!(has, Found::Held | Found::HeldPastExpiry | Found::Expired | Found::Absent),
            Acked::Confirmed => has == Found::Confirmed,
            Acked::Released => has == Found::Released,
            Acked::Lapsed => matches!(has, Found::HeldPastExpiry | Found::Expired | Found::Absent),
        };
        invariants.acknowledged += 1;
        // Sales with locations: the reservation must be where the drill
        // was told (if the target has it at all).
        let mut misplaced = false;
        if let Some(at) = tally.location(index) {
            let session = plan.session(index);
            misplaced = has != Found::Absent && found_at.get(index as usize).is_some_and(|&f| f != at);
            if let Some(l) = locations.iter_mut().find(|l| (l.sku, l.location) == (session.sku, at)) {
                l.acknowledged += 1;
                l.misplaced += u64::from(misplaced);
                match acked {
                    Acked::Confirmed => l.acked_sold += 1,
                    Acked::Held if expires_at_ms > now_ms + EXPIRY_MARGIN_MS => l.acked_held += 1,
                    Acked::Held => l.maybe_held += 1,
                    _ => {}
                }
            } else {
                // Acknowledged at a location the sale was never given.
                misplaced = true;
            }
        }
        invariants.lost_acks += u64::from(!kept || misplaced);
        // Units the drill was told a user holds: sales, and holds that
        // cannot have lapsed (a lapsed hold's units went back, and the
        // user may rightly have reserved again).
        let holding = match acked {
            Acked::Confirmed => true,
            Acked::Held => expires_at_ms > now_ms + EXPIRY_MARGIN_MS,
            _ => false,
        };
        if holding {
            let session = plan.session(index);
            acked_units.push(((session.sku, session.user), 1));
            if acked == Acked::Confirmed {
                add(&mut acked_sold, session.sku, 1);
            }
        }
    }

    // Counters, per SKU.
    for sale in &state.sales {
        let stock = plan.sales.iter().find(|s| s.sku == sale.sku).map_or(0, |s| s.stock);
        let counted = sale.available + sale.reserved + sale.sold;
        invariants.oversold += counted.abs_diff(sale.total);
        invariants.oversold += sale.sold.saturating_sub(stock);
        invariants.oversold += sale.sold.abs_diff(units_of(&confirmed_units, sale.sku));
        invariants.oversold += units_of(&acked_sold, sale.sku).saturating_sub(stock);
    }

    // Counters, per location, and the sale's as their sums.
    for l in &mut locations {
        let units = listed.iter().find(|(k, _)| *k == (l.sku, l.location)).map_or((0, 0), |(_, u)| *u);
        l.unaccounted = location_unaccounted(l, units);
        l.ok = l.unaccounted == 0 && l.misplaced == 0;
        invariants.oversold += l.unaccounted;
    }
    for sale in &state.sales {
        if plan.locations_of(sale.sku).is_none() {
            continue;
        }
        let at: Vec<&LocationState> = state.locations.iter().filter(|l| l.sku == sale.sku).collect();
        let sum = |f: fn(&LocationState) -> u64| at.iter().map(|l| f(l)).sum::<u64>();
        invariants.oversold += sale.total.abs_diff(sum(|l| l.total))
            + sale.available.abs_diff(sum(|l| l.available))
            + sale.reserved.abs_diff(sum(|l| l.reserved))
            + sale.sold.abs_diff(sum(|l| l.sold));
    }

    // Per (sku, user): what the target holds and what the drill was told.
    invariants.limit_violations = over_limit(plan, holders) + over_limit(plan, acked_units);
    invariants.ok = invariants.oversold == 0
        && invariants.limit_violations == 0
        && invariants.lost_acks == 0
        && invariants.phantoms == 0;
    (invariants, locations)
}

/// One row per location of the plan's sales with locations, and per
/// location the target has that the plan did not make, with the target's
/// counters filled in.
fn planned_locations(plan: &Plan, state: &TargetState) -> Vec<LocationAudit> {
    let mut rows = Vec::new();
    for sale in plan.sales.iter().filter(|s| s.locations.is_some()) {
        for &(location, stock) in &sale.locations.as_ref().expect("filtered").locations {
            rows.push(LocationAudit { sku: sale.sku, location, stock, ..LocationAudit::default() });
        }
    }
    for l in &state.locations {
        let row = match rows.iter_mut().position(|r| (r.sku, r.location) == (l.sku, l.location)) {
            Some(i) => &mut rows[i],
            None => {
                rows.push(LocationAudit { sku: l.sku, location: l.location, ..LocationAudit::default() });
                rows.last_mut().expect("pushed")
            }
        };
        (row.total, row.available, row.reserved, row.sold) = (l.total, l.available, l.reserved, l.sold);
    }
    rows
}

/// Units a location's counters cannot account for, given the units of the
/// confirmed and held reservations the target lists there (`listed`) and
/// what the drill was told (see the module's notes).
fn location_unaccounted(l: &LocationAudit, (listed_sold, listed_held): (u64, u64)) -> u64 {
    let outside = |v: u64, low: u64, high: u64| low.saturating_sub(v) + v.saturating_sub(high);
    let counted = l.available + l.reserved + l.sold;
    // A location the target does not have at all: its whole stock.
    let missing = if l.total == 0 && counted == 0 { l.stock } else { 0 };
    missing
        + counted.abs_diff(l.total)
        + l.sold.saturating_sub(l.stock)
        + l.sold.abs_diff(listed_sold)
        + l.reserved.abs_diff(listed_held)
        + l.acked_sold.saturating_sub(l.stock)
        + outside(l.sold, l.acked_sold, l.acked_sold + l.in_flight)
        + outside(l.reserved, l.acked_held, l.acked_held + l.maybe_held + l.in_flight)
}

/// (sku, user) pairs whose units exceed the sale's limit.
fn over_limit(plan: &Plan, mut units: Vec<((u64, u64), u64)>) -> u64 {
    // Sorting groups each pair's units together without a hash map of
    // every user (the drills go to ten million users).
    units.sort_unstable_by_key(|(key, _)| *key);
    let mut violations = 0;
    for group in units.chunk_by(|a, b| a.0 == b.0) {
        let ((sku, _), _) = group[0];
        let total: u64 = group.iter().map(|(_, n)| n).sum();
        violations += u64::from(total > u64::from(plan.limit_of(sku)));
    }
    violations
}

/// Per-SKU sums kept in a small vector: a drill has at most 100 SKUs.
fn add(sums: &mut Vec<(u64, u64)>, sku: u64, units: u64) {
    match sums.iter_mut().find(|(s, _)| *s == sku) {
        Some((_, n)) => *n += units,
        None => sums.push((sku, units)),
    }
}

fn units_of(sums: &[(u64, u64)], sku: u64) -> u64 {
    sums.iter().find(|(s, _)| *s == sku).map_or(0, |(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    const NOW_MS: u64 = 1_000_000;
    const TTL_MS: u64 = 600_000;

    fn reservation(plan: &Plan, index: u64, state: HoldState) -> TargetReservation {
        let s = plan.session(index);
        TargetReservation {
            id: s.reservation_id,
            sku: s.sku,
            user: s.user,
            qty: 1,
            state,
            expires_at_ms: NOW_MS + TTL_MS,
            location: 0,
        }
    }

    /// Ten users for three units: 0 held, 1 confirmed, 2 released (so 2
    /// units are out), the rest refused.
    fn consistent() -> (Plan, Tally, TargetState) {
        let plan = Plan::new(Scenario::Flash, 10, 3, TTL_MS, 5);
        let tally = Tally::new(10, NOW_MS - 5_000);
        tally.held(0, NOW_MS + TTL_MS);
        tally.set(1, Acked::Confirmed);
        tally.set(2, Acked::Released);
        let state = TargetState {
            sales: vec![SkuState { sku: 1, total: 3, available: 1, reserved: 1, sold: 1 }],
            locations: Vec::new(),
            reservations: vec![
                reservation(&plan, 0, HoldState::Held),
                reservation(&plan, 1, HoldState::Confirmed),
                reservation(&plan, 2, HoldState::Released),
            ],
        };
        (plan, tally, state)
    }

    #[test]
    fn a_consistent_state_passes_and_counts_what_it_checked() {
        let (plan, tally, state) = consistent();
        let invariants = check(&plan, &tally, &state, NOW_MS);
        assert!(invariants.ok, "{invariants:?}");
        assert_eq!(invariants.acknowledged, 3);
    }

    #[test]
    fn a_missing_or_changed_reservation_is_a_lost_ack() {
        let (plan, tally, mut state) = consistent();
        state.reservations.remove(0);
        state.sales[0].reserved = 0;
        state.sales[0].available = 2;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).lost_acks, 1, "the hold is gone");

        let (plan, tally, mut state) = consistent();
        state.reservations[1].state = HoldState::Released;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).lost_acks, 1, "the sale was undone");

        let (plan, tally, mut state) = consistent();
        state.reservations[0].user += 1;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).lost_acks, 1, "held for someone else");
    }

    #[test]
    fn a_hold_that_may_have_expired_need_not_be_held() {
        let (plan, tally, mut state) = consistent();
        tally.held(0, NOW_MS + 200);
        state.reservations[0].state = HoldState::Expired;
        state.sales[0].reserved = 0;
        state.sales[0].available = 2;
        assert!(check(&plan, &tally, &state, NOW_MS).ok);
        // ...but it may not have been sold behind the drill's back.
        state.reservations[0].state = HoldState::Confirmed;
        state.sales[0].available = 1;
        state.sales[0].sold = 2;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).lost_acks, 1);
    }

    #[test]
    fn a_reservation_the_drill_was_refused_is_a_phantom() {
        let (plan, tally, mut state) = consistent();
        state.reservations.push(reservation(&plan, 7, HoldState::Held));
        state.sales[0].available = 0;
        state.sales[0].reserved = 2;
        let invariants = check(&plan, &tally, &state, NOW_MS);
        assert_eq!((invariants.phantoms, invariants.ok), (1, false));
        // A lost answer may have been applied: not a phantom.
        tally.set(7, Acked::Unknown);
        assert!(check(&plan, &tally, &state, NOW_MS).ok);
    }

    #[test]
    fn a_refused_id_held_for_someone_else_is_a_phantom() {
        let (plan, tally, mut state) = consistent();
        let mut stranger = reservation(&plan, 7, HoldState::Held);
        stranger.user += 1;
        state.reservations.push(stranger);
        state.sales[0].available = 0;
        state.sales[0].reserved = 2;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).phantoms, 1);
        tally.set(7, Acked::Unknown);
        assert_eq!(check(&plan, &tally, &state, NOW_MS).phantoms, 1, "a lost answer does not excuse another user");
    }

    #[test]
    fn counters_that_disagree_with_the_reservations_are_oversold() {
        let (plan, tally, mut state) = consistent();
        state.sales[0].sold = 2;
        state.sales[0].available = 0;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).oversold, 1, "a sale with no confirmed reservation");

        let (plan, tally, mut state) = consistent();
        state.sales[0].available = 2;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).oversold, 1, "counters that do not add up");

        let (plan, tally, mut state) = consistent();
        for index in 3..6 {
            tally.set(index, Acked::Confirmed);
            state.reservations.push(reservation(&plan, index, HoldState::Confirmed));
        }
        state.sales[0] = SkuState { sku: 1, total: 5, available: 0, reserved: 1, sold: 4 };
        let invariants = check(&plan, &tally, &state, NOW_MS);
        assert_eq!(invariants.oversold, 1 + 1, "sold past the stock of 3, by the counters and by the acks");
    }

    #[test]
    fn a_user_over_the_limit_is_found_in_either_record() {
        // `mixed`: users 3k..3k+2 are one shopper, limit 2.
        let plan = Plan::new(Scenario::Mixed, 9, 10, TTL_MS, 5);
        let tally = Tally::new(9, NOW_MS);
        let sku = plan.session(3).sku;
        let mut state = TargetState {
            sales: vec![SkuState { sku, total: 10, available: 7, reserved: 3, sold: 0 }],
            locations: Vec::new(),
            reservations: Vec::new(),
        };
        for index in 3..6 {
            tally.held(index, NOW_MS + TTL_MS);
            state.reservations.push(reservation(&plan, index, HoldState::Held));
        }
        let invariants = check(&plan, &tally, &state, NOW_MS);
        assert_eq!(invariants.limit_violations, 2, "three units for one shopper, on the target and in the acks");

        // The first hold lapsed (its units went back) before the other two:
        // the shopper holds two, within the limit, by either record.
        tally.held(3, NOW_MS - 10_000);
        state.reservations[0].state = HoldState::Expired;
        state.sales[0].available = 8;
        state.sales[0].reserved = 2;
        let invariants = check(&plan, &tally, &state, NOW_MS);
        assert!(invariants.ok, "{invariants:?}");
    }

    /// `regional`, ten users: 0 holds a unit at warehouse 1, 1 bought one
    /// at 2, 2 released one at 3; the counters per location agree.
    fn regional() -> (Plan, Tally, TargetState) {
        let plan = Plan::new(Scenario::Regional, 10, 100, TTL_MS, 5);
        let tally = Tally::with_locations(10, NOW_MS - 5_000);
        let mut locations: Vec<LocationState> = crate::scenario::regional_stock(100)
            .into_iter()
            .map(|(location, n)| LocationState { sku: 1, location, total: n, available: n, reserved: 0, sold: 0 })
            .collect();
        let mut reservations = Vec::new();
        for (index, at, acked, state) in [
            (0, 1, Acked::Held, HoldState::Held),
            (1, 2, Acked::Confirmed, HoldState::Confirmed),
            (2, 3, Acked::Released, HoldState::Released),
        ] {
            tally.held_at(index, NOW_MS + TTL_MS, at);
            tally.set(index, acked);
            reservations.push(TargetReservation { location: at, ..reservation(&plan, index, state) });
            let l = locations.iter_mut().find(|l| l.location == at).unwrap();
            match state {
                HoldState::Held => (l.available, l.reserved) = (l.available - 1, l.reserved + 1),
                HoldState::Confirmed => (l.available, l.sold) = (l.available - 1, l.sold + 1),
                _ => {}
            }
        }
        let sales = vec![SkuState { sku: 1, total: 100, available: 98, reserved: 1, sold: 1 }];
        (plan, tally, TargetState { sales, locations, reservations })
    }

    #[test]
    fn a_consistent_regional_state_passes_location_by_location() {
        let (plan, tally, state) = regional();
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert!(invariants.ok, "{invariants:?} {rows:?}");
        assert_eq!(invariants.acknowledged, 3);
        assert_eq!(rows.iter().map(|r| r.location).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(rows.iter().map(|r| r.stock).collect::<Vec<_>>(), [40, 25, 15, 10, 6, 4]);
        assert_eq!((rows[0].acked_held, rows[1].acked_sold, rows[2].acknowledged), (1, 1, 1));
        assert!(rows.iter().all(|r| r.ok), "{rows:?}");
    }

    #[test]
    fn a_reservation_at_another_location_is_a_lost_ack() {
        let (plan, tally, mut state) = regional();
        // The hold acknowledged at 1 is at 2 on the target (counters moved too).
        state.reservations[0].location = 2;
        state.locations[0].reserved = 0;
        state.locations[0].available = 40;
        state.locations[1].reserved = 1;
        state.locations[1].available = 23;
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert_eq!(invariants.lost_acks, 1, "{invariants:?}");
        assert_eq!(rows[0].misplaced, 1);
        assert!(!rows[0].ok && !invariants.ok);
    }

    #[test]
    fn location_counters_must_add_up_and_sum_to_the_sale() {
        let (plan, tally, mut state) = regional();
        // A unit sold at 2 with no confirmed reservation behind it.
        state.locations[1].sold = 2;
        state.locations[1].available = 23;
        state.sales[0].sold = 2;
        state.sales[0].available = 97;
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert!(invariants.oversold >= 1 && !rows[1].ok, "{invariants:?} {rows:?}");
        assert!(rows.iter().enumerate().all(|(i, r)| r.ok == (i != 1)));

        let (plan, tally, mut state) = regional();
        state.sales[0].total = 101;
        state.sales[0].available = 99;
        assert_eq!(check(&plan, &tally, &state, NOW_MS).oversold, 2, "the sale is not the sum of its locations");

        let (plan, tally, mut state) = regional();
        state.locations[5].available = 3;
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert_eq!(rows[5].unaccounted, 1, "a location whose counters do not add up");
        assert!(!invariants.ok);

        let (plan, tally, mut state) = regional();
        state.locations.pop();
        state.sales[0].total = 96;
        state.sales[0].available = 94;
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert_eq!((invariants.oversold, rows[5].unaccounted), (4, 4), "a warehouse lost with its 4 units");
    }

    #[test]
    fn a_lost_answer_may_have_left_units_at_any_location() {
        let (plan, tally, mut state) = regional();
        // The drill never heard back for user 3: the target sold it at 4.
        tally.set(3, Acked::Unknown);
        state.reservations.push(TargetReservation { location: 4, ..reservation(&plan, 3, HoldState::Confirmed) });
        state.locations[3].available = 9;
        state.locations[3].sold = 1;
        state.sales[0].available = 97;
        state.sales[0].sold = 2;
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert!(invariants.ok, "{invariants:?} {rows:?}");
        assert_eq!(rows[3].in_flight, 1);
        // Without the lost answer it is a sale nobody was told about.
        tally.set(3, Acked::Nothing);
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert_eq!((invariants.phantoms, rows[3].ok), (1, false));
    }

    #[test]
    fn no_location_sells_past_its_stock() {
        let (plan, tally, mut state) = regional();
        // Warehouse 6 (4 units) sold 5, all acknowledged.
        for index in 3..8 {
            tally.held_at(index, NOW_MS + TTL_MS, 6);
            tally.set(index, Acked::Confirmed);
            state
                .reservations
                .push(TargetReservation { location: 6, ..reservation(&plan, index, HoldState::Confirmed) });
        }
        state.locations[5] = LocationState { sku: 1, location: 6, total: 5, available: 0, reserved: 0, sold: 5 };
        state.sales[0] = SkuState { sku: 1, total: 101, available: 94, reserved: 1, sold: 6 };
        let (invariants, rows) = check_detailed(&plan, &tally, &state, NOW_MS);
        assert_eq!(rows[5].unaccounted, 1 + 1, "sold past the stock of 4, by the counters and by the acks");
        assert!(!invariants.ok);
    }
}
