//! Scenarios: which sales exist and what each virtual user does.
//!
//! A virtual user is an index `0..users`, not a task: its SKU, user id and
//! reservation id are derived from the index, so millions of users cost
//! nothing until a worker picks them up. Randomness is SplitMix64 of the
//! index and the drill's seed: a drill is repeatable.

use clap::ValueEnum;
use serde::Serialize;
use stampede_protocol::message::QueueConfig;

/// SKU of the flash / checkout / queue sale.
pub const HOT_SKU: u64 = 1;
/// SKUs of the `mixed` scenario: 2 hot ones and a long tail.
pub const MIXED_SKUS: u64 = 100;
/// SKUs of the `shifting` scenario, none created hot...
pub const SHIFTING_SKUS: u64 = 20;
/// ...and the phases of its drill: in each, another SKU takes
/// `SHIFTING_HOT_SHARE` of the demand (phase k: SKU k + 1).
pub const SHIFTING_PHASES: u64 = 6;
pub const SHIFTING_HOT_SHARE: f64 = 0.85;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One hot SKU, limited stock, limit 1 per user: a spike of buyers, most lose.
    Flash,
    /// 100 SKUs with Zipf-skewed demand (s = 1.1), the top two hot; each
    /// shopper tries three times with a limit of 2.
    Mixed,
    /// Reserve, then confirm (p = 0.6), release (q = 0.2) or abandon (expires).
    Checkout,
    /// A queue-gated flash sale: join, poll until admitted, reserve, confirm.
    Queue,
    /// 20 ordinary SKUs (none created hot); the users come in 6 phases, and
    /// in each another SKU takes 85% of the demand: the server must find
    /// the hot one and give it a shard of its own, then give it back.
    Shifting,
}

/// What the drill creates before it starts.
#[derive(Clone, Debug)]
pub struct SaleSpec {
    pub sku: u64,
    pub stock: u64,
    pub limit_per_user: u32,
    pub ttl_ms: u64,
    pub hot: bool,
    pub queue: Option<QueueConfig>,
}

/// What one virtual user does.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    /// The virtual user's index (`Plan::session(index)`).
    pub index: u64,
    pub sku: u64,
    pub user: u64,
    pub reservation_id: u128,
    pub then: AfterReserve,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterReserve {
    Confirm,
    Release,
    Abandon,
}

/// A scenario instantiated for a drill.
#[derive(Clone, Debug)]
pub struct Plan {
    pub scenario: Scenario,
    pub users: u64,
    pub sales: Vec<SaleSpec>,
    /// Winners neither confirm nor release: every request is a RESERVE
    /// (the sell-through benchmark shape).
    pub reserve_only: bool,
    seed: u64,
    /// Cumulative Zipf weights of the mixed SKUs (index = sku - 1).
    zipf_cdf: Vec<f64>,
}

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A float in [0, 1) from a hash.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl Plan {
    /// `stock` is the hot sale's stock (per SKU in `mixed`); `ttl_ms` the
    /// reservation TTL (checkout abandons expire after it).
    pub fn new(scenario: Scenario, users: u64, stock: u64, ttl_ms: u64, seed: u64) -> Plan {
        let sale = |sku, stock, limit, hot| SaleSpec { sku, stock, limit_per_user: limit, ttl_ms, hot, queue: None };
        let sales = match scenario {
            Scenario::Flash | Scenario::Checkout => vec![sale(HOT_SKU, stock, 1, true)],
            Scenario::Mixed => (1..=MIXED_SKUS).map(|sku| sale(sku, stock, 2, sku <= 2)).collect(),
            Scenario::Shifting => (1..=SHIFTING_SKUS).map(|sku| sale(sku, stock, 1, false)).collect(),
            Scenario::Queue => vec![SaleSpec {
                queue: Some(QueueConfig {
                    // Admit fast enough that the drill is about the sale,
                    // capped by the stock (the cap follows it).
                    admit_rate_per_s: 50_000,
                    admit_cap: 0,
                    admission_ms: 30_000,
                    start_at_ms: 0,
                }),
                ..sale(HOT_SKU, stock, 1, true)
            }],
        };
        let mut zipf_cdf = Vec::new();
        if scenario == Scenario::Mixed {
            let mut total = 0.0;
            for rank in 1..=MIXED_SKUS {
                total += 1.0 / (rank as f64).powf(1.1);
                zipf_cdf.push(total);
            }
            for w in &mut zipf_cdf {
                *w /= total;
            }
        }
        Plan { scenario, users, sales, reserve_only: false, seed, zipf_cdf }
    }

    pub fn limit_of(&self, sku: u64) -> u32 {
        self.sales.iter().find(|s| s.sku == sku).map_or(1, |s| s.limit_per_user)
    }

    pub fn session(&self, index: u64) -> Session {
        let h = splitmix64(index ^ self.seed.rotate_left(17));
        // In `mixed` each shopper tries three times (limit 2), always for
        // the same SKU: the third attempt must be refused, which the
        // drill's tally checks.
        let user = if self.scenario == Scenario::Mixed { index / 3 } else { index };
        let sku = match self.scenario {
            Scenario::Mixed => {
                let u = unit(splitmix64(user ^ self.seed.rotate_left(29)));
                self.zipf_cdf.partition_point(|&c| c < u) as u64 + 1
            }
            Scenario::Shifting => {
                let (_, hot) = self.phase_of(index).expect("shifting");
                let u = splitmix64(h ^ 0x5eed);
                if unit(u) < SHIFTING_HOT_SHARE {
                    hot
                } else {
                    splitmix64(u) % SHIFTING_SKUS + 1
                }
            }
            _ => HOT_SKU,
        };
        let then = match self.scenario {
            _ if self.reserve_only => AfterReserve::Abandon,
            Scenario::Checkout => match unit(splitmix64(h)) {
                p if p < 0.6 => AfterReserve::Confirm,
                p if p < 0.8 => AfterReserve::Release,
                _ => AfterReserve::Abandon,
            },
            _ => AfterReserve::Confirm,
        };
        // Reservation ids: the drill's seed in the high half, the index low:
        // unique per drill, repeatable, never 0.
        let reservation_id = (u128::from(self.seed | 1) << 64) | u128::from(index + 1);
        Session { index, sku, user, reservation_id, then }
    }

    /// The virtual user whose reservation id this is, if it is one of
    /// this plan's (the inverse of the id `session` derives).
    pub fn index_of(&self, reservation_id: u128) -> Option<u64> {
        let (high, low) = ((reservation_id >> 64) as u64, reservation_id as u64);
        (high == self.seed | 1 && low > 0).then(|| low - 1)
    }

    /// `shifting`: the phase virtual user `index` belongs to and the SKU
    /// that is hot in it (users are taken in index order, so phases follow
    /// each other in time).
    pub fn phase_of(&self, index: u64) -> Option<(u64, u64)> {
        (self.scenario == Scenario::Shifting).then(|| {
            let phase = (index.saturating_mul(SHIFTING_PHASES) / self.users.max(1)).min(SHIFTING_PHASES - 1);
            (phase, phase % SHIFTING_SKUS + 1)
        })
    }

    /// The reservation TTL of `sku`'s sale.
    pub fn ttl_of(&self, sku: u64) -> u64 {
        self.sales.iter().find(|s| s.sku == sku).map_or(0, |s| s.ttl_ms)
    }
}
