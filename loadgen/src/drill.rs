//! The drill loop: workers, closed or open loop, latency, the tally, and
//! the invariants checked against the target at the end (`audit.rs`).
//!
//! Workers: `connections x depth` tasks, each with one request (or batch)
//! in flight, pulling the next virtual users from a shared counter. No
//! task per user: a million users cost a counter.
//!
//! Open loop (`--rate`): virtual user k is *due* at a fixed time on the
//! schedule (constant rate, or the spike profile). A worker that picks it
//! up late still measures from the due time, so queueing inside an
//! overloaded system shows up in the latency instead of silently lowering
//! the offered load: the coordinated-omission correction wrk2 makes.
//!
//! Due times are exact (microseconds, spread evenly within each ms), and
//! users are released by a pacer thread that sleeps with the OS's
//! high-resolution timers, not by tokio timers: those fire on a 1 ms tick,
//! and since latency counts from the due time, their lateness (0-1 ms,
//! more than the server's own p50) would be charged to the target.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use stampede_protocol::Status;

use crate::audit::{self, Acked, LocationAudit, Tally};
use crate::report::{Invariants, Latency, OpSummary, RegionServed, Regional, Second, ServerCpu, Summary};
use crate::scenario::{AfterReserve, Plan, Scenario, Session, REGIONAL_WAREHOUSES, REGIONS};
use crate::target::{SkuState, Target};

/// Latencies are recorded in microseconds up to this (anything slower is
/// clamped: it is a failure by any standard).
const LATENCY_US_MAX: u64 = 60_000_000;
/// How long a queued user keeps polling before giving up.
const QUEUE_POLL_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Spike {
    /// Peak rate as a multiple of `--rate`.
    pub factor: f64,
    /// When the ramp starts (seconds into the drill); it reaches the peak 1 s later.
    pub at_secs: f64,
    /// How long the peak holds.
    pub hold_secs: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DrillConfig {
    pub connections: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// The checkout-service shape: this many concurrent callers over the
    /// connections (instead of `connections * depth` requests in flight).
    pub callers: Option<usize>,
    /// Reserve operations per request (RESERVE_BATCH; a pipeline for Redis).
    pub batch: usize,
    pub duration_secs: f64,
    /// Open loop at this many virtual users per second; closed loop if `None`.
    pub rate: Option<f64>,
    pub spike: Option<Spike>,
    /// Only PING: the protocol and network floor.
    pub ping_only: bool,
    /// The target server's process id (on this machine): its CPU time over
    /// the load phase is reported per request (`Summary::server_cpu`).
    pub server_pid: Option<u32>,
    #[serde(skip)]
    pub progress: bool,
}

impl DrillConfig {
    /// A closed loop of `connections` x `depth` requests in flight, `batch`
    /// reserves each, for at most 30 s, quiet (tests and tools start here).
    pub fn closed_loop(connections: usize, depth: usize, batch: usize) -> DrillConfig {
        DrillConfig {
            connections,
            depth,
            callers: None,
            batch,
            duration_secs: 30.0,
            rate: None,
            spike: None,
            ping_only: false,
            server_pid: None,
            progress: false,
        }
    }
}

#[derive(Clone, Copy)]
enum OpKind {
    Reserve,
    Confirm,
    Release,
    Join,
    Poll,
    Ping,
    /// `shifting`: a reserve on a SKU that is not the phase's hot one
    /// (also counted under `Reserve`; kept apart to show that ordinary
    /// SKUs stay fast while another is hot).
    ReserveOrdinary,
}

const OP_NAMES: [&str; 7] = ["reserve", "confirm", "release", "join", "poll", "ping", "reserve_ordinary"];

/// How often the `shifting` drill reads each SKU's placement.
const PLACEMENT_POLL_MS: u64 = 50;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_max(LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Latency histograms shared by all workers: one per operation, made
/// before the clock starts, and one per second of the drill. (One set per
/// worker meant 128 workers allocating and zeroing 140 KB histograms at the
/// same instant, at the start and every second: stalls of the load
/// generator itself that showed up as 20-200 ms in the target's p99.)
/// Recording takes an uncontended lock for ~50 ns.
#[derive(Default)]
struct Latencies {
    ops: Vec<Histogram<u64>>,
    /// Requests and their latencies per second.
    timeline: Vec<(u64, Histogram<u64>)>,
}

type SharedLatencies = Arc<std::sync::Mutex<Latencies>>;

/// What one worker saw; merged at the end. (Answers about reservations
/// go to the shared [`Tally`].)
struct Recorder {
    started: Instant,
    latencies: SharedLatencies,
    outcomes: BTreeMap<&'static str, u64>,
}

impl Recorder {
    fn new(started: Instant, latencies: SharedLatencies) -> Recorder {
        Recorder { started, latencies, outcomes: BTreeMap::new() }
    }

    fn record(&mut self, op: OpKind, since: Instant) {
        let now = Instant::now();
        let us = (now.saturating_duration_since(since).as_micros() as u64).clamp(1, LATENCY_US_MAX);
        let second = now.duration_since(self.started).as_secs() as usize;
        let mut latencies = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        latencies.ops[op as usize].record(us).expect("clamped");
        let timeline = &mut latencies.timeline;
        while timeline.len() <= second {
            timeline.push((0, histogram()));
        }
        let slot = &mut timeline[second];
        slot.0 += 1;
        slot.1.record(us).expect("clamped");
    }

    /// Also count a latency under a second name (not in the timeline:
    /// it is not another request).
    fn also(&mut self, op: OpKind, since: Instant) {
        let us = (since.elapsed().as_micros() as u64).clamp(1, LATENCY_US_MAX);
        let mut latencies = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        latencies.ops[op as usize].record(us).expect("clamped");
    }

    fn outcome(&mut self, name: &'static str) {
        *self.outcomes.entry(name).or_default() += 1;
    }

    fn merge(&mut self, other: Recorder) {
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
    }
}

/// When virtual user k is due (open loop): the cumulative rate per ms.
struct Schedule {
    /// cumulative[i] = users due by the end of millisecond i.
    cumulative: Vec<f64>,
}

impl Schedule {
    fn new(rate: f64, spike: Option<Spike>, duration_secs: f64) -> Schedule {
        let ms = (duration_secs * 1000.0).ceil() as usize + 1;
        let mut cumulative = Vec::with_capacity(ms);
        let mut total = 0.0;
        for i in 0..ms {
            let t = i as f64 / 1000.0;
            let factor = match spike {
                Some(s) if t >= s.at_secs && t < s.at_secs + 1.0 => 1.0 + (s.factor - 1.0) * (t - s.at_secs),
                Some(s) if t >= s.at_secs + 1.0 && t < s.at_secs + 1.0 + s.hold_secs => s.factor,
                _ => 1.0,
            };
            total += rate * factor / 1000.0;
            cumulative.push(total);
        }
        Schedule { cumulative }
    }

    /// Offset from the start at which user `k` is due; `None` past the end.
    /// Users due within one millisecond are spread evenly across it.
    fn due(&self, k: u64) -> Option<Duration> {
        let target = (k + 1) as f64;
        let i = self.cumulative.partition_point(|&c| c < target);
        let end = *self.cumulative.get(i)?;
        let begin = if i == 0 { 0.0 } else { self.cumulative[i - 1] };
        let fraction = if end > begin { (target - begin) / (end - begin) } else { 1.0 };
        Some(Duration::from_secs_f64((i as f64 + fraction.clamp(0.0, 1.0)) / 1000.0))
    }
}

/// Open loop: releases each user (one semaphore permit) at its due time.
/// An OS thread, so its sleeps have microsecond resolution; past the end
/// of the schedule it lets every worker through, and they stop at the
/// first user the schedule does not have.
fn pace(schedule: Arc<Schedule>, started: Instant, permits: Arc<tokio::sync::Semaphore>, stop: Arc<AtomicBool>) {
    /// Below this a sleep is not worth it: the OS adds ~50 us of slack.
    const SPIN_BELOW: Duration = Duration::from_micros(20);
    let mut released = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(due) = schedule.due(released) else { break };
        let now = started.elapsed();
        if due > now + SPIN_BELOW {
            std::thread::sleep(due - now);
            continue;
        }
        // Everything due by now goes out at once.
        let mut n = 1;
        while schedule.due(released + n).is_some_and(|d| d <= now) {
            n += 1;
        }
        permits.add_permits(n as usize);
        released += n;
    }
    // Past the end of the schedule: let every worker through. Not
    // `close()`: a closed semaphore refuses even the permits still in it,
    // and workers running behind the schedule (an overloaded target) would
    // drop the users it made due last, hiding the very overload the open
    // loop measures. A worker past the schedule's last user stops.
    permits.add_permits(tokio::sync::Semaphore::MAX_PERMITS - permits.available_permits());
}

struct Shared {
    target: Arc<Target>,
    plan: Arc<Plan>,
    config: DrillConfig,
    next: AtomicU64,
    started: Instant,
    deadline: Instant,
    schedule: Option<Arc<Schedule>>,
    /// Open loop: one permit per user whose due time has come.
    permits: Arc<tokio::sync::Semaphore>,
    latencies: SharedLatencies,
    tally: Tally,
    requests: AtomicU64,
    reserved: AtomicU64,
    /// `shifting`: when each phase's first user was taken (ms into the
    /// drill; `u64::MAX`: not yet).
    phase_started_ms: Vec<AtomicU64>,
    /// `regional`: what each region's shoppers were answered (one per
    /// region of [`REGIONS`]; empty for the other scenarios).
    regions: Vec<RegionTally>,
}

/// `regional`: one region's answers, counted as they come.
#[derive(Default)]
struct RegionTally {
    shoppers: AtomicU64,
    explicit: AtomicU64,
    reserved: AtomicU64,
    /// Reservations per warehouse (index in [`REGIONAL_WAREHOUSES`]), and
    /// one slot past them for a location the sale does not have.
    by_warehouse: [AtomicU64; REGIONAL_WAREHOUSES.len() + 1],
    refused: AtomicU64,
    errors: AtomicU64,
}

impl RegionTally {
    fn count(&self, session: &Session, answer: Option<(Status, u16)>) {
        let count = |n: &AtomicU64| {
            n.fetch_add(1, Ordering::Relaxed);
        };
        count(&self.shoppers);
        if session.at.is_some_and(|at| !at.list().is_empty()) {
            count(&self.explicit);
        }
        match answer {
            Some((Status::Reserved, location)) => {
                count(&self.reserved);
                let slot = REGIONAL_WAREHOUSES.iter().position(|&(id, _)| id == location);
                count(&self.by_warehouse[slot.unwrap_or(REGIONAL_WAREHOUSES.len())]);
            }
            Some(_) => count(&self.refused),
            None => count(&self.errors),
        }
    }

    fn report(&self, region: &crate::scenario::Region) -> RegionServed {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let mut served = RegionServed {
            region: region.id,
            name: region.name.to_string(),
            order: region.order.to_vec(),
            shoppers: load(&self.shoppers),
            explicit: load(&self.explicit),
            reserved: load(&self.reserved),
            refused: load(&self.refused),
            errors: load(&self.errors),
            ..RegionServed::default()
        };
        for (slot, n) in self.by_warehouse.iter().enumerate() {
            let n = load(n);
            let id = REGIONAL_WAREHOUSES.get(slot).map(|&(id, _)| id);
            match id.and_then(|id| region.order.iter().position(|&o| o == id)) {
                Some(0) => served.first_choice += n,
                Some(_) => served.further += n,
                None => served.elsewhere += n,
            }
            if n > 0 {
                // u16::MAX: a location the sale was never given.
                served.by_warehouse.push((id.unwrap_or(u16::MAX), n));
            }
        }
        served
    }
}

fn status_name(status: Status) -> &'static str {
    status.name()
}

async fn worker(shared: Arc<Shared>) -> Recorder {
    let mut rec = Recorder::new(shared.started, shared.latencies.clone());
    let batch = shared.config.batch.max(1) as u64;
    let users = shared.plan.users;
    loop {
        // Open loop: wait for the pacer to release a batch of users first,
        // then take the next ones; in all no more are taken than released,
        // so every user taken is due.
        if shared.schedule.is_some() {
            match shared.permits.acquire_many(batch as u32).await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        let k = shared.next.fetch_add(batch, Ordering::Relaxed);
        // Closed loop stops at the deadline. Open loop sends everything the
        // schedule made due before it, however late: dropping late users
        // would hide exactly the overload the latency is meant to show.
        if k >= users || (shared.schedule.is_none() && Instant::now() >= shared.deadline) {
            break;
        }
        let n = batch.min(users - k);
        let due = match &shared.schedule {
            Some(schedule) => match schedule.due(k + n - 1) {
                Some(offset) => shared.started + offset,
                None => break,
            },
            None => Instant::now(),
        };
        if shared.config.ping_only {
            // PINGs cannot be batched: a batch's users go one after the
            // other, each timed from its own send (closed loop) or from the
            // batch's due time (open loop).
            for _ in 0..n {
                let start = if shared.schedule.is_some() { due } else { Instant::now() };
                match shared.target.ping().await {
                    Ok(()) => rec.outcome("ok"),
                    Err(_) => rec.outcome("error"),
                }
                rec.record(OpKind::Ping, start);
                shared.requests.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if let Some((phase, _)) = shared.plan.phase_of(k) {
            let at = shared.started.elapsed().as_millis() as u64;
            let _ = shared.phase_started_ms[phase as usize].compare_exchange(
                u64::MAX,
                at,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let mut sessions: Vec<Session> = (k..k + n).map(|i| shared.plan.session(i)).collect();
        if shared.plan.scenario == Scenario::Queue {
            sessions = wait_for_admission(&shared, &mut rec, sessions).await;
            if sessions.is_empty() {
                continue;
            }
        }
        let start = if shared.schedule.is_some() { due } else { Instant::now() };
        let sent_ms = now_ms();
        let results = shared.target.reserve(&shared.plan, &sessions).await;
        rec.record(OpKind::Reserve, start);
        let ordinary = |s: &Session| shared.plan.phase_of(s.index).is_some_and(|(_, hot)| hot != s.sku);
        if sessions.iter().all(ordinary) {
            rec.also(OpKind::ReserveOrdinary, start);
        }
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let region_of = |s: &Session| s.region.and_then(|r| shared.regions.get(usize::from(r)));
        let results = match results {
            Ok(results) => results,
            Err(e) => {
                tracing::debug!(error = %e, "reserve failed");
                for session in &sessions {
                    rec.outcome("error");
                    shared.tally.set(session.index, Acked::Unknown);
                    if let Some(region) = region_of(session) {
                        region.count(session, None);
                    }
                }
                continue;
            }
        };
        let mut winners = Vec::new();
        for (session, (status, detail, location)) in sessions.iter().zip(results) {
            rec.outcome(status_name(status));
            if let Some(region) = region_of(session) {
                region.count(session, Some((status, location)));
            }
            if status == Status::Reserved {
                shared.reserved.fetch_add(1, Ordering::Relaxed);
                // The target's expiry if it said (stampede does), else a
                // lower bound: it decided after the request was sent.
                let expires_at_ms = if detail != 0 { detail } else { sent_ms + shared.plan.ttl_of(session.sku) };
                if session.at.is_some() {
                    shared.tally.held_at(session.index, expires_at_ms, location);
                } else {
                    shared.tally.held(session.index, expires_at_ms);
                }
                if session.then != AfterReserve::Abandon {
                    winners.push(*session);
                }
            }
        }
        // Winners pay or give up, concurrently (abandoned holds expire).
        let settles = winners.iter().map(|session| {
            let shared = &shared;
            async move {
                let started = Instant::now();
                let (op, result) = match session.then {
                    AfterReserve::Release => (OpKind::Release, shared.target.release(session).await),
                    _ => (OpKind::Confirm, shared.target.confirm(session).await),
                };
                (session.index, started, op, result)
            }
        });
        for (index, started, op, result) in futures_util::future::join_all(settles).await {
            rec.record(op, started);
            shared.requests.fetch_add(1, Ordering::Relaxed);
            let acked = match result {
                Ok(Status::Confirmed) => Some(Acked::Confirmed),
                Ok(Status::Released) => Some(Acked::Released),
                Ok(Status::Expired) => Some(Acked::Lapsed),
                // Any other answer (busy, ...) left the hold as it was.
                Ok(_) => None,
                // Unknown outcome: it may or may not have been applied.
                Err(_) => Some(Acked::Unknown),
            };
            rec.outcome(result.map_or("error", status_name));
            if let Some(acked) = acked {
                shared.tally.set(index, acked);
            }
        }
    }
    rec
}

/// Queue scenario: join, then poll until admitted (or turned away).
async fn wait_for_admission(shared: &Shared, rec: &mut Recorder, sessions: Vec<Session>) -> Vec<Session> {
    let mut admitted = Vec::new();
    for session in sessions {
        let started = Instant::now();
        let mut ticket = shared.target.ticket(&session, true).await;
        rec.record(OpKind::Join, started);
        shared.requests.fetch_add(1, Ordering::Relaxed);
        loop {
            match &ticket {
                Ok(t) if t.status == Status::Admitted => {
                    admitted.push(session);
                    break;
                }
                Ok(t) if t.status == Status::Waiting && Instant::now() < shared.deadline => {}
                Ok(t) => {
                    rec.outcome(t.status.name());
                    break;
                }
                Err(_) => {
                    rec.outcome("error");
                    break;
                }
            }
            tokio::time::sleep(QUEUE_POLL_INTERVAL).await;
            let started = Instant::now();
            ticket = shared.target.ticket(&session, false).await;
            rec.record(OpKind::Poll, started);
            shared.requests.fetch_add(1, Ordering::Relaxed);
        }
    }
    admitted
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn latency(h: &Histogram<u64>) -> Latency {
    Latency {
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// Outcomes every summary lists, even when none happened (readers of the
/// JSON look them up by name).
const OUTCOMES_ALWAYS: [&str; 5] = ["reserved", "sold_out", "limit_exceeded", "busy", "error"];

/// Run one drill against `target` (already connected) and check the
/// invariants. `label` names the target in the report.
pub async fn run(target: Arc<Target>, plan: Arc<Plan>, config: DrillConfig, label: &str) -> anyhow::Result<Summary> {
    Ok(execute(target, plan, config, label).await?.0)
}

/// The audit at the end of a drill: the target's state, read now, against
/// the drill's tally (see [`crate::audit`]). Also returns the target's
/// counters per SKU.
pub async fn verify(target: &Target, plan: &Plan, tally: &Tally) -> anyhow::Result<(Invariants, Vec<SkuState>)> {
    let (invariants, sales, _) = verify_detailed(target, plan, tally).await?;
    Ok((invariants, sales))
}

/// [`verify`], also returning the audit of each location of the plan's
/// sales with locations (`regional`).
pub async fn verify_detailed(
    target: &Target,
    plan: &Plan,
    tally: &Tally,
) -> anyhow::Result<(Invariants, Vec<SkuState>, Vec<LocationAudit>)> {
    let state = target.state(plan).await?;
    let (invariants, locations) = audit::check_detailed(plan, tally, &state, now_ms());
    Ok((invariants, state.sales, locations))
}

/// [`run`], also returning the tally (to audit the target again later).
pub async fn execute(
    target: Arc<Target>,
    plan: Arc<Plan>,
    config: DrillConfig,
    label: &str,
) -> anyhow::Result<(Summary, Tally)> {
    if !config.ping_only {
        target.prepare(&plan).await?;
    }
    // Made (and its memory touched) before the clock starts.
    let tally_users = if config.ping_only { 0 } else { plan.users };
    let tally = if plan.has_locations() {
        Tally::with_locations(tally_users, now_ms())
    } else {
        Tally::new(tally_users, now_ms())
    };
    let latencies = Arc::new(std::sync::Mutex::new(Latencies {
        ops: (0..OP_NAMES.len()).map(|_| histogram()).collect(),
        timeline: Vec::new(),
    }));
    let started = Instant::now();
    let schedule = config.rate.map(|rate| Arc::new(Schedule::new(rate, config.spike, config.duration_secs)));
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let stop_pacer = Arc::new(AtomicBool::new(false));
    let pacer = schedule.clone().map(|schedule| {
        let (permits, stop) = (permits.clone(), stop_pacer.clone());
        std::thread::Builder::new()
            .name("loadgen-pacer".into())
            .spawn(move || pace(schedule, started, permits, stop))
            .expect("spawn the pacer thread")
    });
    let shared = Arc::new(Shared {
        target: target.clone(),
        plan: plan.clone(),
        deadline: started + Duration::from_secs_f64(config.duration_secs),
        config: config.clone(),
        next: AtomicU64::new(0),
        started,
        schedule,
        permits,
        latencies,
        tally,
        requests: AtomicU64::new(0),
        reserved: AtomicU64::new(0),
        phase_started_ms: (0..crate::scenario::SHIFTING_PHASES).map(|_| AtomicU64::new(u64::MAX)).collect(),
        regions: if plan.scenario == Scenario::Regional {
            REGIONS.iter().map(|_| RegionTally::default()).collect()
        } else {
            Vec::new()
        },
    });
    let done = Arc::new(AtomicBool::new(false));
    let progress = config.progress.then(|| {
        let (shared, done) = (shared.clone(), done.clone());
        tokio::spawn(async move {
            let mut last = 0;
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let requests = shared.requests.load(Ordering::Relaxed);
                eprint!(
                    "\r[{:6.1}s] {:>12} requests  {:>10} req/s  {:>10} reserved  ",
                    started.elapsed().as_secs_f64(),
                    requests,
                    requests - last,
                    shared.reserved.load(Ordering::Relaxed)
                );
                last = requests;
            }
            eprintln!();
        })
    });
    // `shifting` on stampede: watch where each SKU runs.
    let watcher = (plan.scenario == Scenario::Shifting && target.dedicated(1).await.is_some()).then(|| {
        let (target, plan, done) = (target.clone(), plan.clone(), done.clone());
        tokio::spawn(async move {
            let mut moves = Vec::new();
            let mut placed: BTreeMap<u64, bool> = BTreeMap::new();
            while !done.load(Ordering::Relaxed) {
                for sale in &plan.sales {
                    let Some(dedicated) = target.dedicated(sale.sku).await else { continue };
                    if placed.insert(sale.sku, dedicated).unwrap_or(false) != dedicated {
                        moves.push((started.elapsed().as_secs_f64(), sale.sku, dedicated));
                    }
                }
                tokio::time::sleep(Duration::from_millis(PLACEMENT_POLL_MS)).await;
            }
            moves
        })
    });
    let server_cpu_before = config.server_pid.map(process_cpu_us).transpose()?;
    let workers: Vec<_> = (0..config.callers.unwrap_or(config.connections * config.depth).max(1))
        .map(|_| tokio::spawn(worker(shared.clone())))
        .collect();
    let mut total = Recorder::new(started, shared.latencies.clone());
    for w in workers {
        total.merge(w.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu_us = match (config.server_pid, server_cpu_before) {
        (Some(pid), Some(before)) => Some(process_cpu_us(pid)? - before),
        _ => None,
    };
    done.store(true, Ordering::Relaxed);
    stop_pacer.store(true, Ordering::Relaxed);
    if let Some(pacer) = pacer {
        let _ = pacer.join();
    }
    if let Some(p) = progress {
        let _ = p.await;
    }

    let moves = match watcher {
        Some(w) => Some(w.await?),
        None => None,
    };
    let placement = moves.map(|moves| placement_report(&shared.phase_started_ms, moves));
    let latencies = total.latencies.clone();
    let shared = Arc::into_inner(shared).expect("workers and the progress task are done");
    let (tally, region_tallies) = (shared.tally, shared.regions);
    let (invariants, audit, warehouses) = if config.ping_only {
        (Invariants { ok: true, ..Invariants::default() }, Vec::new(), Vec::new())
    } else {
        verify_detailed(&target, &plan, &tally).await?
    };
    let regional = (plan.scenario == Scenario::Regional && !config.ping_only).then(|| Regional {
        warehouses,
        regions: REGIONS.iter().zip(&region_tallies).map(|(region, tally)| tally.report(region)).collect(),
    });

    let latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    let mut all = histogram();
    let mut ops = BTreeMap::new();
    for (name, h) in OP_NAMES.iter().zip(&latencies.ops) {
        if !h.is_empty() {
            if *name != "reserve_ordinary" {
                all.add(h).expect("same bounds");
            }
            ops.insert(name.to_string(), OpSummary { count: h.len(), latency_us: latency(h) });
        }
    }
    let requests = all.len();
    let timeline = latencies
        .timeline
        .iter()
        .enumerate()
        .map(|(second, (n, h))| Second {
            second: second as u64,
            requests: *n,
            p50_us: if *n > 0 { h.value_at_quantile(0.5) } else { 0 },
            p99_us: if *n > 0 { h.value_at_quantile(0.99) } else { 0 },
            max_us: h.max(),
        })
        .collect();
    let mut outcomes: BTreeMap<String, u64> = total.outcomes.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    for name in OUTCOMES_ALWAYS {
        outcomes.entry(name.to_string()).or_default();
    }
    let summary = Summary {
        scenario: plan.scenario,
        target: label.to_string(),
        users: plan.users,
        duration_s: elapsed,
        requests,
        throughput_rps: requests as f64 / elapsed,
        latency_us: latency(&all),
        ops,
        outcomes,
        invariants,
        audit,
        timeline,
        server_cpu: server_cpu_us
            .map(|cpu_us| ServerCpu { cpu_us, us_per_request: cpu_us as f64 / requests.max(1) as f64 }),
        config,
        failover: None,
        placement,
        regional,
    };
    Ok((summary, tally))
}

/// Each phase's hot SKU and how long after the phase began it was first
/// seen on a dedicated shard.
fn placement_report(started_ms: &[AtomicU64], moves: Vec<(f64, u64, bool)>) -> crate::report::Placement {
    let mut phases = Vec::new();
    for (phase, started) in started_ms.iter().enumerate() {
        let started = started.load(Ordering::Relaxed);
        if started == u64::MAX {
            continue;
        }
        let started_s = started as f64 / 1000.0;
        let hot_sku = phase as u64 % crate::scenario::SHIFTING_SKUS + 1;
        // Dedicated at the phase's start already, or moved there after it.
        let before = moves.iter().rev().find(|(t, sku, _)| *sku == hot_sku && *t <= started_s);
        let promoted_after_ms = if before.is_some_and(|(_, _, dedicated)| *dedicated) {
            Some(0.0)
        } else {
            moves
                .iter()
                .find(|(t, sku, dedicated)| *sku == hot_sku && *dedicated && *t > started_s)
                .map(|(t, ..)| (t - started_s) * 1000.0)
        };
        phases.push(crate::report::Phase { phase: phase as u64, hot_sku, started_s, promoted_after_ms });
    }
    crate::report::Placement { phases, moves }
}

/// CPU time (user + system, every thread) a process has used so far, in
/// microseconds, from `/proc/PID/stat` (resolution: one clock tick, 10 ms
/// on Linux; measure over seconds).
pub fn process_cpu_us(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| anyhow::anyhow!("reading /proc/{pid}/stat (--server-pid): {e}"))?;
    // The command name may hold spaces: fields are counted after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?.parse()?)
    };
    // SAFETY: sysconf reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok((ticks(11)? + ticks(12)?) * 1_000_000 / per_second)
}
