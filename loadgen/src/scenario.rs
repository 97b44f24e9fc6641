//! Scenarios: which sales exist and what each virtual user does.
//!
//! A virtual user is an index `0..users`, not a task: its SKU, user id and
//! reservation id are derived from the index, so millions of users cost
//! nothing until a worker picks them up. Randomness is SplitMix64 of the
//! index and the drill's seed: a drill is repeatable.

use clap::ValueEnum;
use serde::Serialize;
use stampede_protocol::message::{QueueConfig, SaleLocations, Where};

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

/// The `regional` sale's warehouses (location ids) and their share of its
/// stock, per mille: skewed, as a retailer's stock is.
pub const REGIONAL_WAREHOUSES: [(u16, u64); 6] = [(1, 400), (2, 250), (3, 150), (4, 100), (5, 60), (6, 40)];

/// One region of the `regional` scenario: its share of the shoppers and
/// the warehouses it ships from, nearest first.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Region {
    /// The region id the sale maps (RESERVE_AT's `region`, never 0).
    pub id: u16,
    pub name: &'static str,
    /// Share of the shoppers.
    pub demand: f64,
    /// Its warehouses, nearest first (the sale's order for the region).
    pub order: &'static [u16],
}

/// The `regional` scenario's regions: skewed demand (40/30/20/10 %), each
/// shipping from 3-4 warehouses, sharing some with its neighbours so they
/// compete for them (1 and 2 by the two big ones, 3 and 4 by the small ones).
pub const REGIONS: [Region; 4] = [
    Region { id: 1, name: "north", demand: 0.40, order: &[1, 2, 4] },
    Region { id: 2, name: "east", demand: 0.30, order: &[2, 1, 3] },
    Region { id: 3, name: "south", demand: 0.20, order: &[3, 5, 2, 6] },
    Region { id: 4, name: "west", demand: 0.10, order: &[6, 4, 5, 3] },
];

/// Share of the `regional` shoppers who send an explicit list of
/// warehouses (their region's order, then every other warehouse: "nearest
/// first, else from anywhere") instead of their region.
pub const REGIONAL_EXPLICIT_SHARE: f64 = 0.2;

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
    /// One sale whose stock sits in 6 warehouses (40/25/15/10/6/4 %); 4
    /// regions (40/30/20/10 % of the shoppers) each ship from 3-4 of them,
    /// nearest first, sharing some. Shoppers reserve by region (1 in 5
    /// with an explicit list), then confirm (70 %), release (20 %) or
    /// abandon. Stampede only.
    Regional,
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
    /// Stock split over locations (warehouses) and the regions' orders.
    pub locations: Option<SaleLocations>,
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
    /// `regional`: where the units may come from (RESERVE_AT); `None`: a
    /// plain RESERVE.
    pub at: Option<Where>,
    /// `regional`: the index of the shopper's region in [`REGIONS`].
    pub region: Option<u8>,
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
        let sale = |sku, stock, limit, hot| SaleSpec {
            sku,
            stock,
            limit_per_user: limit,
            ttl_ms,
            hot,
            queue: None,
            locations: None,
        };
        let sales = match scenario {
            Scenario::Flash | Scenario::Checkout => vec![sale(HOT_SKU, stock, 1, true)],
            Scenario::Mixed => (1..=MIXED_SKUS).map(|sku| sale(sku, stock, 2, sku <= 2)).collect(),
            Scenario::Shifting => (1..=SHIFTING_SKUS).map(|sku| sale(sku, stock, 1, false)).collect(),
            Scenario::Regional => vec![SaleSpec {
                locations: Some(SaleLocations {
                    locations: regional_stock(stock),
                    regions: REGIONS.iter().map(|r| (r.id, r.order.to_vec())).collect(),
                }),
                ..sale(HOT_SKU, stock, 1, true)
            }],
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
            Scenario::Regional => match unit(splitmix64(h)) {
                p if p < 0.7 => AfterReserve::Confirm,
                p if p < 0.9 => AfterReserve::Release,
                _ => AfterReserve::Abandon,
            },
            _ => AfterReserve::Confirm,
        };
        let (at, region) = if self.scenario == Scenario::Regional {
            let (region, explicit) = regional_choice(splitmix64(h ^ 0x2e61_0a11));
            let order = REGIONS[region].order;
            let at = if explicit {
                // Nearest first, then every other warehouse by id.
                let mut list: Vec<u16> = order.to_vec();
                list.extend(REGIONAL_WAREHOUSES.iter().map(|&(id, _)| id).filter(|id| !order.contains(id)));
                Where::locations(&list)
            } else {
                Where::Region(REGIONS[region].id)
            };
            (Some(at), Some(region as u8))
        } else {
            (None, None)
        };
        // Reservation ids: the drill's seed in the high half, the index low:
        // unique per drill, repeatable, never 0.
        let reservation_id = (u128::from(self.seed | 1) << 64) | u128::from(index + 1);
        Session { index, sku, user, reservation_id, then, at, region }
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

    /// The locations `sku`'s sale has (`None`: one, id 0, the plain kind).
    pub fn locations_of(&self, sku: u64) -> Option<&SaleLocations> {
        self.sales.iter().find(|s| s.sku == sku).and_then(|s| s.locations.as_ref())
    }

    /// Whether any of the plan's sales has its stock in several locations.
    pub fn has_locations(&self) -> bool {
        self.sales.iter().any(|s| s.locations.is_some())
    }

    /// The reservation TTL of `sku`'s sale.
    pub fn ttl_of(&self, sku: u64) -> u64 {
        self.sales.iter().find(|s| s.sku == sku).map_or(0, |s| s.ttl_ms)
    }
}

/// The `regional` sale's stock split over [`REGIONAL_WAREHOUSES`] by their
/// shares (rounded down; the remainder goes to the first, the largest).
pub fn regional_stock(stock: u64) -> Vec<(u16, u64)> {
    let mut split: Vec<(u16, u64)> = REGIONAL_WAREHOUSES
        .iter()
        .map(|&(id, permille)| (id, (u128::from(stock) * u128::from(permille) / 1000) as u64))
        .collect();
    let rest = stock - split.iter().map(|(_, n)| n).sum::<u64>();
    split[0].1 += rest;
    split
}

/// A `regional` shopper's region (index in [`REGIONS`], by its demand
/// share) and whether it sends an explicit list, from a hash.
fn regional_choice(h: u64) -> (usize, bool) {
    let u = unit(h);
    let mut cumulative = 0.0;
    let mut region = REGIONS.len() - 1;
    for (i, r) in REGIONS.iter().enumerate() {
        cumulative += r.demand;
        if u < cumulative {
            region = i;
            break;
        }
    }
    (region, unit(splitmix64(h)) < REGIONAL_EXPLICIT_SHARE)
}
