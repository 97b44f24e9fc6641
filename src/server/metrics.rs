//! Metrics in the Prometheus text format, and the health endpoints, on
//! their own HTTP listener (`--metrics-listen`; off by default):
//!
//! - `GET /metrics`: every figure below, encoded by prometheus-client.
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 once recovery is done and the listener accepts;
//!   503 while shutting down (readiness).
//!
//! The request path never takes a lock for metrics: replies are counted in
//! a fixed matrix of atomics (opcode x status) by the connection writers,
//! gauges are read from the atomics the server keeps anyway (SKU gauges,
//! shard queues, log writer stats), and a [`Collector`] turns them into
//! metric families at scrape time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use stampede_protocol::message::Opcode;
use stampede_protocol::Status;

use super::Shared;
use crate::wal::writer::WalStats;

/// Replies sent, by opcode and status. Index: opcode slot x status slot;
/// the last opcode slot counts ERROR frames.
#[derive(Debug)]
pub struct RequestCounters {
    counts: Vec<AtomicU64>,
    /// Per opcode: time from reading the request to writing its reply.
    latencies: Vec<LatencyHistogram>,
}

/// Upper bounds of the latency buckets, in microseconds (plus +Inf).
const LATENCY_BUCKETS_US: [u64; 14] =
    [50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000];

/// A histogram of atomics: recording is a few relaxed adds, no lock, on
/// the connection writers' hot path.
#[derive(Debug)]
struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    fn new() -> Self {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_us: AtomicU64::new(0) }
    }

    fn record(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket (le seconds, count)): the
    /// encoder makes the counts cumulative, as the exposition format wants.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            total += n;
            let le = LATENCY_BUCKETS_US.get(i).map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((le, n));
        }
        (self.sum_us.load(Ordering::Relaxed) as f64 / 1e6, total, buckets)
    }
}

const ERROR_SLOT: usize = Opcode::ALL.len();

/// Status codes are below this (checked at compile time), so a status's
/// slot is its code: no search on the reply path.
const STATUS_SLOTS: usize = 64;
const _: () = {
    let mut i = 0;
    while i < Status::ALL.len() {
        assert!((Status::ALL[i] as usize) < STATUS_SLOTS);
        i += 1;
    }
};

/// Opcode byte -> its slot (position in `Opcode::ALL`), built at compile
/// time so the reply path indexes instead of searching.
const OPCODE_SLOTS: [u8; 256] = {
    let mut table = [u8::MAX; 256];
    let mut i = 0;
    while i < Opcode::ALL.len() {
        table[Opcode::ALL[i] as usize] = i as u8;
        i += 1;
    }
    table
};

fn opcode_slot(opcode: Opcode) -> usize {
    usize::from(OPCODE_SLOTS[opcode as usize])
}

impl Default for RequestCounters {
    fn default() -> Self {
        RequestCounters {
            counts: (0..(ERROR_SLOT + 1) * STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            latencies: (0..ERROR_SLOT).map(|_| LatencyHistogram::new()).collect(),
        }
    }
}

impl RequestCounters {
    fn slot(opcode: Option<Opcode>, status: Status) -> usize {
        opcode.map_or(ERROR_SLOT, opcode_slot) * STATUS_SLOTS + status.code() as usize
    }

    /// Record the latency of one reply to `opcode`.
    pub fn latency(&self, opcode: Opcode, elapsed: std::time::Duration) {
        self.latencies[opcode_slot(opcode)].record(elapsed.as_micros() as u64);
    }

    /// Outcomes with `status` answered so far to `opcode` (each operation
    /// of a batch counts).
    pub fn answered(&self, opcode: Opcode, status: Status) -> u64 {
        self.counts[Self::slot(Some(opcode), status)].load(Ordering::Relaxed)
    }

    /// Count one reply (`opcode` `None`: an ERROR frame).
    pub fn count(&self, opcode: Option<Opcode>, status: Status) {
        self.counts[Self::slot(opcode, status)].fetch_add(1, Ordering::Relaxed);
    }
}

fn opcode_name(slot: usize) -> String {
    match Opcode::ALL.get(slot) {
        Some(op) => format!("{op:?}").to_lowercase(),
        None => "error".to_string(),
    }
}

/// Everything /metrics reports, read at scrape time.
pub struct Exporter {
    pub shared: Arc<Shared>,
    pub wal: Option<Arc<WalStats>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        // Replies by opcode and status.
        {
            let mut family = encoder.encode_descriptor(
                "stampede_replies",
                "Replies sent, by request opcode and status",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let counters = &self.shared.requests;
            for (i, count) in counters.counts.iter().enumerate() {
                let n = count.load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let (op, code) = (i / STATUS_SLOTS, (i % STATUS_SLOTS) as u16);
                let status = Status::from_code(code).map_or("unknown", Status::name);
                let labels = [("opcode", opcode_name(op)), ("status", status.to_string())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "stampede_request_duration_seconds",
                "Time from reading a request to writing its reply, by opcode",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            for (slot, histogram) in self.shared.requests.latencies.iter().enumerate() {
                let (sum, count, buckets) = histogram.snapshot();
                if count == 0 {
                    continue;
                }
                let labels = [("opcode", opcode_name(slot))];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        gauge(
            &mut encoder,
            "stampede_connections",
            "Client connections being served",
            self.shared.connections_active() as i64,
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "stampede_shard_queue_depth",
                "Operations waiting in each shard's queue, each of a batch counted (busy is answered past 65536)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for shard in self.shared.router().map(|r| r.shards()).unwrap_or_default() {
                let labels = [("shard", shard.id.to_string()), ("hot", shard.hot.to_string())];
                ConstGauge::new(shard.queue_len() as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        self.encode_placement(&mut encoder)?;
        // Hot SKUs: their stock, live.
        for (name, help, pick) in [
            ("stampede_sku_available", "Units available, per hot SKU", 0),
            ("stampede_sku_reserved", "Units reserved, per hot SKU", 1),
            ("stampede_sku_sold", "Units sold, per hot SKU", 2),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (sku, route) in self.shared.router().map(|r| r.routes()).unwrap_or_default() {
                if !route.shard.hot {
                    continue;
                }
                let g = &route.gauge;
                let value = [g.available(), g.reserved(), g.sold()][pick];
                ConstGauge::new(value as i64).encode(family.encode_family(&[("sku", sku.to_string())])?)?;
            }
        }
        // Hot SKUs with several locations: each location's stock.
        for (name, help, pick) in [
            ("stampede_location_available", "Units available, per location of a hot SKU", 0),
            ("stampede_location_reserved", "Units reserved, per location of a hot SKU", 1),
            ("stampede_location_sold", "Units sold, per location of a hot SKU", 2),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (sku, route) in self.shared.router().map(|r| r.routes()).unwrap_or_default() {
                let Some(locations) = route.gauge.locations().filter(|_| route.shard.hot) else { continue };
                for (location, available, reserved, sold) in locations {
                    let value = [available, reserved, sold][pick];
                    let labels = [("sku", sku.to_string()), ("location", location.to_string())];
                    ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "stampede_queue_waiting",
                "Users waiting in a sale's virtual queue",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (sku, route) in self.shared.router().map(|r| r.routes()).unwrap_or_default() {
                if let Some(waiting) = route.gauge.waiting() {
                    ConstGauge::new(waiting as i64).encode(family.encode_family(&[("sku", sku.to_string())])?)?;
                }
            }
        }
        if let Some(wal) = &self.wal {
            counter(
                &mut encoder,
                "stampede_wal_records",
                "Records appended to the write-ahead log",
                wal.records_total.load(Ordering::Relaxed),
            )?;
            counter(
                &mut encoder,
                "stampede_wal_bytes",
                "Bytes appended to the write-ahead log",
                wal.bytes_total.load(Ordering::Relaxed),
            )?;
            counter(
                &mut encoder,
                "stampede_wal_syncs",
                "fdatasync calls of the log writer",
                wal.syncs_total.load(Ordering::Relaxed),
            )?;
            counter(&mut encoder, "stampede_wal_groups", "Group commits", wal.groups_total.load(Ordering::Relaxed))?;
            let synced = wal.synced_lsn.load(Ordering::Acquire);
            gauge(&mut encoder, "stampede_wal_synced_lsn", "Highest LSN on disk", synced as i64)?;
            wal.fsync_seconds.encode(encoder.encode_descriptor(
                "stampede_wal_fsync_seconds",
                "fdatasync latency of the log writer",
                None,
                wal.fsync_seconds.metric_type(),
            )?)?;
            wal.group_records.encode(encoder.encode_descriptor(
                "stampede_wal_group_records",
                "Records per group commit",
                None,
                wal.group_records.metric_type(),
            )?)?;
            if let Some(log) = &self.shared.log {
                let consumer = log.consumer_lsn();
                gauge(
                    &mut encoder,
                    "stampede_replication_settled_lsn",
                    "LSN the reconciler has settled (SETTLED)",
                    consumer as i64,
                )?;
                gauge(
                    &mut encoder,
                    "stampede_replication_lag_records",
                    "Records durable on the server but not yet settled by the reconciler",
                    synced.saturating_sub(consumer) as i64,
                )?;
            }
            gauge(
                &mut encoder,
                "stampede_wal_committed_lsn",
                "Highest LSN durable here and on every synchronous standby",
                wal.committed_lsn.load(Ordering::Relaxed) as i64,
            )?;
            gauge(
                &mut encoder,
                "stampede_cluster_replies_waiting",
                "Replies durable on this node, waiting for the synchronous standbys (or the lease)",
                wal.replies_waiting.load(Ordering::Relaxed) as i64,
            )?;
        }
        self.encode_cluster(&mut encoder)
    }
}

impl Exporter {
    /// Where sales run and what the demand monitor sees: the hottest
    /// sales' rates, each shard's busy share, moves made and how long a
    /// moving sale's requests were held.
    fn encode_placement(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let Some(router) = self.shared.router() else { return Ok(()) };
        let placement = &router.placement;
        {
            let mut family = encoder.encode_descriptor(
                "stampede_sale_decided_per_second",
                "Requests decided per second for the hottest sales (last monitor interval)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for sale in placement.top.lock().iter() {
                let labels = [
                    ("sku", sale.sku.to_string()),
                    ("placement", if sale.dedicated { "dedicated" } else { "pool" }.to_string()),
                    ("pinned", sale.pinned.to_string()),
                ];
                ConstGauge::new(sale.ops_per_s).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "stampede_shard_busy_ratio",
                "Share of the last monitor interval each shard spent deciding",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for load in placement.shards.lock().iter() {
                let labels = [("shard", load.shard.to_string()), ("hot", load.dedicated.to_string())];
                ConstGauge::new(load.busy_percent / 100.0).encode(family.encode_family(&labels)?)?;
            }
        }
        gauge(
            encoder,
            "stampede_dedicated_shards",
            "Shards running one sale each (created hot or moved there)",
            router.dedicated_shards() as i64,
        )?;
        for (name, help, value) in [
            (
                "stampede_placement_promotions",
                "Sales the demand monitor moved to a shard of their own",
                &placement.promotions,
            ),
            ("stampede_placement_demotions", "Sales the demand monitor moved back to the pool", &placement.demotions),
            ("stampede_placement_admin_moves", "Moves an admin asked for (SALE_MOVE)", &placement.admin_moves),
            ("stampede_sale_moves", "Moves that handed a sale to another shard", &placement.moves),
        ] {
            counter(encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        let max = ConstGauge::new(placement.move_held_us_max.load(Ordering::Relaxed) as f64 / 1e6);
        max.encode(encoder.encode_descriptor(
            "stampede_sale_move_held_seconds_max",
            "Longest time a moving sale's requests were held",
            None,
            max.metric_type(),
        )?)?;
        counter(
            encoder,
            "stampede_sale_move_held_microseconds",
            "Time moving sales' requests were held, in all (divide by stampede_sale_moves for the mean)",
            placement.move_held_us_sum.load(Ordering::Relaxed),
        )
    }

    /// The cluster: this node's role and term, the synchronous set, and
    /// each standby's progress and lag (on the leader).
    fn encode_cluster(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let cluster = &self.shared.cluster;
        {
            let mut family = encoder.encode_descriptor(
                "stampede_cluster_role",
                "1 for this node's role: leader, standby, none (electing), single (no cluster)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(1).encode(family.encode_family(&[("role", cluster.role().name())])?)?;
        }
        gauge(encoder, "stampede_cluster_term", "The term this node knows", cluster.term() as i64)?;
        gauge(
            encoder,
            "stampede_cluster_sync_set_size",
            "Standbys in the leader's synchronous set",
            cluster.sync_set.lock().len() as i64,
        )?;
        let head = self.wal.as_ref().map_or(0, |w| w.durable_lsn.load(Ordering::Relaxed));
        let standbys = cluster.standbys.lock().clone();
        for (name, help, pick) in [
            ("stampede_cluster_standby_durable_lsn", "Each standby's durable LSN (FOLLOW_ACK)", 0),
            (
                "stampede_cluster_standby_lag_records",
                "Records the leader holds that each standby has not made durable",
                1,
            ),
            ("stampede_cluster_standby_lag_seconds", "How long each standby has been behind without progress", 2),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (node, s) in &standbys {
                let lag = head.saturating_sub(s.durable_lsn);
                let value = match pick {
                    0 => s.durable_lsn as f64,
                    1 => lag as f64,
                    _ if lag == 0 => 0.0,
                    _ => s.last_progress.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                };
                ConstGauge::new(value).encode(family.encode_family(&[("node", node.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// Start the endpoint on `addr`; returns the bound address.
pub async fn start(addr: &str, exporter: Exporter, ready: Arc<AtomicBool>) -> std::io::Result<SocketAddr> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(exporter));
    stampede_protocol::metrics_http::start(addr, registry, ready).await
}
