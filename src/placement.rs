//! Where sales run: the demand monitor that gives a sale outgrowing its
//! pool shard a shard of its own, and gives the core back when it cools.
//!
//! Demand is counted where it is decided: each sale's gauge carries the
//! number of requests its shard has decided for it (written by that shard
//! only, on a cache line of its own), and each shard adds up the time its
//! cycles take. Nothing on the request path is shared or locked for this.
//! Every `PLACEMENT_INTERVAL_MS` the monitor reads those counters, turns
//! them into rates, and asks [`Policy::decide`] (plain code, no clock, no
//! I/O: the unit tests drive it with made-up samples) whether to move one
//! sale. The move itself is [`Router::move_sale`]: live, logged as
//! SALE_MOVED, and placed the same way by recovery and standbys.
//!
//! The policy, with every threshold in `limits.rs`:
//! - **promote** a pool sale that is not pinned when, for
//!   `PROMOTE_AFTER_INTERVALS` intervals in a row, it decides at least
//!   `promote_ops_per_s`, or it takes `PROMOTE_SHARE_PERCENT` of the
//!   decisions of a saturated pool shard (busy `SATURATED_BUSY_PERCENT`
//!   of the time, or refusing requests `busy`); the hottest first, one
//!   move per interval, while fewer than `dedicated_max` dedicated shards
//!   run (when that many run, a sale the monitor promoted that has gone
//!   cold gives its shard up at once for the hot one);
//! - **demote** a dedicated sale the monitor placed (not pinned) once it
//!   has decided fewer than `demote_ops_per_s` for `demote_after` without
//!   a break. The gap between the two rates is the hysteresis: a sale
//!   hovering near one threshold does not bounce between shards.
//!
//! An admin's placement (`stampede-ctl sale move`, or a sale created
//! `--hot`) is pinned: the monitor never moves it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stampede_protocol::Status;

use crate::limits::{
    DEMOTE_AFTER_MS_DEFAULT, DEMOTE_OPS_PER_S_DEFAULT, PLACEMENT_INTERVAL_MS, PROMOTE_AFTER_INTERVALS,
    PROMOTE_OPS_PER_S_DEFAULT, PROMOTE_SHARE_PERCENT, SATURATED_BUSY_PERCENT,
};
use crate::shard::Router;

/// Sales whose demand `/metrics` and PLACEMENT show, hottest first.
pub const TOP_SALES_SHOWN: usize = stampede_protocol::message::sale::PLACEMENT_SALES_MAX;

/// Cores this process may run on (the default cap on dedicated shards).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The monitor's settings (`stampede-server --placement-*`).
#[derive(Clone, Debug)]
pub struct PlacementConfig {
    /// Move sales by demand at all (admins can always move them).
    pub auto: bool,
    pub promote_ops_per_s: u64,
    pub demote_ops_per_s: u64,
    pub demote_after: Duration,
    /// Dedicated shards the monitor may bring the server up to.
    pub dedicated_max: usize,
    pub interval: Duration,
}

impl PlacementConfig {
    pub fn defaults(cores: usize) -> Self {
        PlacementConfig {
            auto: true,
            promote_ops_per_s: PROMOTE_OPS_PER_S_DEFAULT,
            demote_ops_per_s: DEMOTE_OPS_PER_S_DEFAULT,
            demote_after: Duration::from_millis(DEMOTE_AFTER_MS_DEFAULT),
            dedicated_max: crate::limits::auto_dedicated_default(cores),
            interval: Duration::from_millis(PLACEMENT_INTERVAL_MS),
        }
    }
}

/// One sale's demand over the last interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SaleDemand {
    pub sku: u64,
    /// Requests its shard decided per second.
    pub ops_per_s: f64,
    pub dedicated: bool,
    pub pinned: bool,
    /// The shard it runs on.
    pub shard: usize,
}

/// One shard over the last interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShardLoad {
    pub shard: usize,
    pub dedicated: bool,
    /// Share of the interval spent deciding, in percent.
    pub busy_percent: f64,
    /// Requests refused `busy` (queue full) in the interval.
    pub refused: u64,
}

/// What the monitor decided for one interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Promote(u64),
    Demote(u64),
}

/// The monitor's memory between intervals: how long each sale has met
/// a condition without a break.
#[derive(Debug, Default)]
pub struct Policy {
    /// Intervals in a row each pool sale has been hot.
    hot_streak: HashMap<u64, u32>,
    /// Since when each dedicated sale has been cold (monitor time, ms).
    cold_since: HashMap<u64, u64>,
}

impl Policy {
    /// One interval's decision at monitor time `now_ms`, from every sale's
    /// demand and every shard's load, with `dedicated` shards running.
    pub fn decide(
        &mut self,
        config: &PlacementConfig,
        now_ms: u64,
        sales: &[SaleDemand],
        shards: &[ShardLoad],
        dedicated: usize,
    ) -> Option<Decision> {
        let shard_ops = |shard: usize| -> f64 { sales.iter().filter(|s| s.shard == shard).map(|s| s.ops_per_s).sum() };
        let saturated = |shard: usize| {
            shards
                .iter()
                .any(|l| l.shard == shard && (l.busy_percent >= SATURATED_BUSY_PERCENT as f64 || l.refused > 0))
        };
        // Streaks: forget sales that are gone or no longer qualify.
        let mut streaks = HashMap::new();
        let mut cold = HashMap::new();
        for sale in sales.iter().filter(|s| !s.pinned) {
            if sale.dedicated {
                if sale.ops_per_s < config.demote_ops_per_s as f64 {
                    cold.insert(sale.sku, self.cold_since.get(&sale.sku).copied().unwrap_or(now_ms));
                }
                continue;
            }
            let by_rate = sale.ops_per_s >= config.promote_ops_per_s as f64;
            let total = shard_ops(sale.shard);
            let by_share = saturated(sale.shard)
                && total > 0.0
                && sale.ops_per_s * 100.0 >= PROMOTE_SHARE_PERCENT as f64 * total
                // Alone on its shard, it has no one to be isolated from.
                && sales.iter().any(|s| s.shard == sale.shard && s.sku != sale.sku && s.ops_per_s > 0.0);
            if by_rate || by_share {
                streaks.insert(sale.sku, self.hot_streak.get(&sale.sku).copied().unwrap_or(0) + 1);
            }
        }
        self.hot_streak = streaks;
        self.cold_since = cold;
        if !config.auto {
            return None;
        }
        // Cool first: a demotion frees a shard a promotion may want.
        let demote_after = config.demote_after.as_millis() as u64;
        if let Some((&sku, _)) = self
            .cold_since
            .iter()
            .filter(|(_, &since)| now_ms.saturating_sub(since) >= demote_after)
            .min_by_key(|(&sku, &since)| (since, sku))
        {
            self.cold_since.remove(&sku);
            return Some(Decision::Demote(sku));
        }
        let hottest = sales
            .iter()
            .filter(|s| self.hot_streak.get(&s.sku).is_some_and(|&n| n >= PROMOTE_AFTER_INTERVALS))
            .max_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s).then(b.sku.cmp(&a.sku)))?;
        if dedicated >= config.dedicated_max {
            // No shard to spare: a sale of ours that has gone cold gives
            // its shard up now rather than after `demote_after` (the
            // coldest first); the hot one follows next interval.
            let coldest = sales
                .iter()
                .filter(|s| self.cold_since.contains_key(&s.sku))
                .min_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s).then(a.sku.cmp(&b.sku)))?;
            self.cold_since.remove(&coldest.sku);
            return Some(Decision::Demote(coldest.sku));
        }
        self.hot_streak.remove(&hottest.sku);
        Some(Decision::Promote(hottest.sku))
    }
}

/// Move counters and the latest demand, for `/metrics` and STATUS.
#[derive(Debug, Default)]
pub struct PlacementStats {
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
    /// Moves an admin asked for.
    pub admin_moves: AtomicU64,
    /// Moves that moved a sale, and how long its requests were held in all
    /// and at most (microseconds).
    pub moves: AtomicU64,
    pub move_held_us_sum: AtomicU64,
    pub move_held_us_max: AtomicU64,
    /// The hottest sales of the last interval (`TOP_SALES_SHOWN`).
    pub top: Mutex<Vec<SaleDemand>>,
    /// Each shard's load over the last interval.
    pub shards: Mutex<Vec<ShardLoad>>,
    /// The monitor's settings, as it runs (PLACEMENT reports them).
    pub auto: AtomicBool,
    pub dedicated_max: AtomicUsize,
}

impl PlacementStats {
    pub fn record_move(&self, held: Duration) {
        let us = held.as_micros() as u64;
        self.moves.fetch_add(1, Ordering::Relaxed);
        self.move_held_us_sum.fetch_add(us, Ordering::Relaxed);
        self.move_held_us_max.fetch_max(us, Ordering::Relaxed);
    }
}

/// Counters read at the previous interval.
#[derive(Default)]
struct Readings {
    decided: HashMap<u64, u64>,
    busy_ns: HashMap<usize, u64>,
    refused: HashMap<usize, u64>,
}

/// Run the monitor until the router stops (the server shuts down or the
/// task is aborted). Reads every interval; moves at most one sale per
/// interval, waiting for the move to finish.
pub async fn monitor(router: Arc<Router>, config: PlacementConfig) {
    router.placement.auto.store(config.auto, Ordering::Relaxed);
    router.placement.dedicated_max.store(config.dedicated_max, Ordering::Relaxed);
    let started = Instant::now();
    let mut policy = Policy::default();
    let mut last = Readings::default();
    let mut last_at = Instant::now();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match router.refusing() {
            Some(Status::ShuttingDown) => return,
            // Fenced (`not_leader`) or waiting for a synchronous standby:
            // no demand to read, and a move could not be logged.
            Some(_) => continue,
            None => {}
        }
        let now = Instant::now();
        let seconds = now.duration_since(last_at).as_secs_f64().max(1e-3);
        last_at = now;
        let mut readings = Readings::default();
        let mut sales = Vec::new();
        for (sku, route) in router.routes() {
            let decided = route.gauge.decided();
            let before = last.decided.get(&sku).copied().unwrap_or(decided);
            readings.decided.insert(sku, decided);
            sales.push(SaleDemand {
                sku,
                ops_per_s: decided.saturating_sub(before) as f64 / seconds,
                dedicated: route.shard.hot,
                pinned: route.gauge.pinned(),
                shard: route.shard.id,
            });
        }
        let mut shards = Vec::new();
        for shard in router.shards() {
            let busy = shard.stats.busy_ns.load(Ordering::Relaxed);
            let refused = shard.stats.refused_busy.load(Ordering::Relaxed);
            let busy_before = last.busy_ns.get(&shard.id).copied().unwrap_or(busy);
            let refused_before = last.refused.get(&shard.id).copied().unwrap_or(refused);
            readings.busy_ns.insert(shard.id, busy);
            readings.refused.insert(shard.id, refused);
            shards.push(ShardLoad {
                shard: shard.id,
                dedicated: shard.hot,
                busy_percent: (busy.saturating_sub(busy_before) as f64 / 1e9 / seconds * 100.0).min(100.0),
                refused: refused.saturating_sub(refused_before),
            });
        }
        last = readings;
        let now_ms = started.elapsed().as_millis() as u64;
        let decision = policy.decide(&config, now_ms, &sales, &shards, router.dedicated_shards());
        sales.sort_by(|a, b| b.ops_per_s.total_cmp(&a.ops_per_s).then(a.sku.cmp(&b.sku)));
        sales.truncate(TOP_SALES_SHOWN);
        *router.placement.top.lock() = sales;
        *router.placement.shards.lock() = shards;
        let Some(decision) = decision else { continue };
        let (sku, dedicated) = match decision {
            Decision::Promote(sku) => (sku, true),
            Decision::Demote(sku) => (sku, false),
        };
        let result = router.move_sale(sku, dedicated, false).await;
        if result.outcome.status == Status::Ok {
            let counter = if dedicated { &router.placement.promotions } else { &router.placement.demotions };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                sku,
                to = if dedicated { "a dedicated shard" } else { "the pool" },
                held_us = result.took.map_or(0, |d| d.as_micros() as u64),
                "sale moved by demand"
            );
        } else {
            tracing::warn!(sku, status = %result.outcome.status.name(), "demand monitor's move refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PlacementConfig {
        PlacementConfig {
            auto: true,
            promote_ops_per_s: 1000,
            demote_ops_per_s: 100,
            demote_after: Duration::from_millis(1000),
            dedicated_max: 1,
            interval: Duration::from_millis(250),
        }
    }

    fn sale(sku: u64, ops_per_s: f64, dedicated: bool, shard: usize) -> SaleDemand {
        SaleDemand { sku, ops_per_s, dedicated, pinned: false, shard }
    }

    fn idle(shard: usize) -> ShardLoad {
        ShardLoad { shard, dedicated: false, busy_percent: 10.0, refused: 0 }
    }

    #[test]
    fn a_sale_hot_for_two_intervals_is_promoted_once() {
        let mut policy = Policy::default();
        let sales = [sale(1, 5000.0, false, 0), sale(2, 10.0, false, 0)];
        assert_eq!(policy.decide(&config(), 0, &sales, &[idle(0)], 0), None, "one interval is a burst");
        assert_eq!(policy.decide(&config(), 250, &sales, &[idle(0)], 0), Some(Decision::Promote(1)));
        // Full: no more dedicated shards.
        let more = [sale(2, 5000.0, false, 0)];
        assert_eq!(policy.decide(&config(), 500, &more, &[idle(0)], 1), None);
        assert_eq!(policy.decide(&config(), 750, &more, &[idle(0)], 1), None);
    }

    #[test]
    fn a_cold_sale_gives_its_shard_up_at_once_to_a_hot_one_when_none_is_free() {
        let mut policy = Policy::default();
        // Sku 1 was promoted and has cooled; sku 2 is hot now; one shard.
        let sales = [sale(1, 50.0, true, 9), sale(2, 5000.0, false, 0), sale(3, 10.0, false, 0)];
        assert_eq!(policy.decide(&config(), 0, &sales, &[idle(0)], 1), None, "a burst");
        assert_eq!(policy.decide(&config(), 250, &sales, &[idle(0)], 1), Some(Decision::Demote(1)));
        let after = [sale(1, 50.0, false, 0), sale(2, 5000.0, false, 0), sale(3, 10.0, false, 0)];
        assert_eq!(policy.decide(&config(), 500, &after, &[idle(0)], 0), Some(Decision::Promote(2)));
        // A dedicated sale still warm (above the demotion rate) keeps its shard.
        let mut policy = Policy::default();
        let warm = [sale(1, 500.0, true, 9), sale(2, 5000.0, false, 0)];
        for t in 0..8 {
            assert_eq!(policy.decide(&config(), t * 250, &warm, &[idle(0)], 1), None);
        }
    }

    #[test]
    fn a_streak_broken_starts_over() {
        let mut policy = Policy::default();
        let hot = [sale(1, 5000.0, false, 0)];
        let cool = [sale(1, 50.0, false, 0)];
        assert_eq!(policy.decide(&config(), 0, &hot, &[idle(0)], 0), None);
        assert_eq!(policy.decide(&config(), 250, &cool, &[idle(0)], 0), None);
        assert_eq!(policy.decide(&config(), 500, &hot, &[idle(0)], 0), None);
        assert_eq!(policy.decide(&config(), 750, &hot, &[idle(0)], 0), Some(Decision::Promote(1)));
    }

    #[test]
    fn a_large_share_of_a_saturated_shard_is_promoted_below_the_rate() {
        let mut policy = Policy::default();
        let sales = [sale(1, 600.0, false, 0), sale(2, 200.0, false, 0), sale(3, 900.0, false, 1)];
        let busy = [ShardLoad { shard: 0, dedicated: false, busy_percent: 95.0, refused: 0 }, idle(1)];
        assert_eq!(policy.decide(&config(), 0, &sales, &busy, 0), None);
        assert_eq!(policy.decide(&config(), 250, &sales, &busy, 0), Some(Decision::Promote(1)));
        // The same share of a shard with room to spare: nothing.
        let mut policy = Policy::default();
        let calm = [idle(0), idle(1)];
        assert_eq!(policy.decide(&config(), 0, &sales, &calm, 0), None);
        assert_eq!(policy.decide(&config(), 250, &sales, &calm, 0), None);
    }

    #[test]
    fn a_sale_alone_on_a_saturated_shard_is_not_promoted_for_its_share() {
        let mut policy = Policy::default();
        let sales = [sale(1, 600.0, false, 0)];
        let busy = [ShardLoad { shard: 0, dedicated: false, busy_percent: 95.0, refused: 10 }];
        assert_eq!(policy.decide(&config(), 0, &sales, &busy, 0), None);
        assert_eq!(policy.decide(&config(), 250, &sales, &busy, 0), None);
    }

    #[test]
    fn a_cooled_sale_is_demoted_only_after_staying_cold() {
        let mut policy = Policy::default();
        let cold = [sale(1, 10.0, true, 5)];
        let warm = [sale(1, 500.0, true, 5)];
        assert_eq!(policy.decide(&config(), 0, &cold, &[], 1), None);
        assert_eq!(policy.decide(&config(), 900, &cold, &[], 1), None);
        // Between the two thresholds: not cold, the clock starts over.
        assert_eq!(policy.decide(&config(), 950, &warm, &[], 1), None);
        assert_eq!(policy.decide(&config(), 1500, &cold, &[], 1), None);
        assert_eq!(policy.decide(&config(), 2400, &cold, &[], 1), None);
        assert_eq!(policy.decide(&config(), 2500, &cold, &[], 1), Some(Decision::Demote(1)));
    }

    #[test]
    fn pinned_sales_and_a_monitor_turned_off_move_nothing() {
        let mut policy = Policy::default();
        let pinned = [
            SaleDemand { pinned: true, ..sale(1, 9000.0, false, 0) },
            SaleDemand { pinned: true, ..sale(2, 0.0, true, 4) },
        ];
        for t in 0..10 {
            assert_eq!(policy.decide(&config(), t * 1000, &pinned, &[idle(0)], 1), None);
        }
        let off = PlacementConfig { auto: false, ..config() };
        let hot = [sale(3, 9000.0, false, 0)];
        for t in 0..10 {
            assert_eq!(policy.decide(&off, t * 250, &hot, &[idle(0)], 0), None);
        }
    }
}
