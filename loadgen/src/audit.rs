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

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use stampede_protocol::message::HoldState;

use crate::report::Invariants;
use crate::scenario::Plan;
use crate::target::SkuState;

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
        }
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
}

/// Everything the target holds for the drill's sales.
#[derive(Clone, Debug, Default)]
pub struct TargetState {
    pub sales: Vec<SkuState>,
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

/// Compare the drill's tally with the target's state, read at `now_ms`
/// (wall clock, after the state was read).
pub fn check(plan: &Plan, tally: &Tally, state: &TargetState, now_ms: u64) -> Invariants {
    let mut invariants = Invariants::default();
    let users = tally.users();

    // What the target has, by virtual user.
    let mut found = vec![Found::Absent; users as usize];
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
        let Some(index) = plan.index_of(r.id).filter(|&i| i < users) else {
            // Not an id of this drill's: nobody was told about it.
            invariants.phantoms += u64::from(live);
            continue;
        };
        let asked = plan.session(index);
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
        invariants.lost_acks += u64::from(!kept);
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

    // Per (sku, user): what the target holds and what the drill was told.
    invariants.limit_violations = over_limit(plan, holders) + over_limit(plan, acked_units);
    invariants.ok = invariants.oversold == 0
        && invariants.limit_violations == 0
        && invariants.lost_acks == 0
        && invariants.phantoms == 0;
    invariants
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
}
