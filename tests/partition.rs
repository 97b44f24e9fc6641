//! Partitions, for real: etcd and three `stampede-server` processes, each
//! in a network namespace of its own, joined by veth pairs to a bridge in
//! the root namespace, where this test's clients stay. Each round cuts the
//! leader off from etcd and from both standbys, both ways, while the
//! clients can still reach it, under a load that records every answer from
//! every node. Rounds alternate between blackhole routes (the leader's
//! sends fail at once) and silent drops at the receivers (nothing is
//! refused, everything times out, as across a real partition). Then:
//!
//! - the old leader stops acknowledging within its lease bound, and exits
//!   to rejoin (status 75; the test is its supervisor and restarts it at
//!   once, still cut off, as systemd would);
//! - the standbys elect a new leader, and acknowledgements come from it;
//! - no two leaders' acknowledgements overlap in time (each node's
//!   acknowledgements are grouped by the term it led when it gave them);
//! - after healing, the old leader cuts its unacknowledged tail (kept in
//!   `*.discarded` files, which are read back here) and follows;
//! - at the end the leader's STATE_DUMP holds every acknowledged operation
//!   from both sides of every partition, in its acknowledged state, and
//!   nothing the cut-off leader wrote but never acknowledged; the counters
//!   add up and nothing is oversold.
//!
//! What this cannot show: the lease fence on its own. With a synchronous
//! standby (the default), a leader cut off from its standbys stops
//! acknowledging at the cut, fence or no fence, and the standby that takes
//! over stops following it before it campaigns; the lease bound checked
//! here holds either way.
//!
//! Needs root (network namespaces), iproute2 and etcd; where namespaces
//! cannot be created it fails saying why, it does not skip.
//! `STAMPEDE_PARTITION_ROUNDS` raises the number of partitions (default 2);
//! failures print the seed (`STAMPEDE_SEED` replays its timing choices).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{Etcd, TestCluster};
use common::netns::{Cut, Netns};
use common::process::{ADMIN, CHECKOUT};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stampede::limits::LEADER_LEASE_TTL_MS_DEFAULT;
use stampede_protocol::client::{Client, ClientConfig, ClientError};
use stampede_protocol::event::Event;
use stampede_protocol::message::{ClusterReply, DumpEntry, HoldState, NodeRole, Outcome, SaleCreate};
use stampede_protocol::replication::ReplicationClient;
use stampede_protocol::Status;

const NODES: usize = 3;
const PORT: u16 = 7070;
const SKUS: u64 = 2;
/// Ample: no answer depends on stock running out.
const STOCK: u64 = 1_000_000;
const LIMIT: u32 = 1_000;
/// Requests one pinned driver keeps in flight (requests to a cut-off
/// leader hang; a few must still be sent to it after the cut).
const PINNED_INFLIGHT: usize = 16;
/// How long a checkout keeps retrying one operation across nodes.
const RETRY_FOR: Duration = Duration::from_secs(15);

fn lease_ttl() -> Duration {
    Duration::from_millis(LEADER_LEASE_TTL_MS_DEFAULT)
}

fn host(node: usize) -> String {
    format!("n{}", node + 1)
}

/// The cluster and the network it runs in. Fields drop in declaration
/// order: the processes are killed (by PID) before their namespaces go.
struct World {
    cluster: TestCluster,
    net: Netns,
}

impl World {
    fn start() -> World {
        let mut hosts = vec![("etcd", 2u8)];
        let names: Vec<String> = (0..NODES).map(host).collect();
        hosts.extend(names.iter().enumerate().map(|(i, n)| (n.as_str(), 11 + i as u8)));
        let net = Netns::create(&hosts);
        let etcd = Etcd::start_wrapped(&net.wrap("etcd"), &net.host("etcd").ip);
        let placement = (0..NODES).map(|i| (format!("{}:{PORT}", net.host(&host(i)).ip), net.wrap(&host(i)))).collect();
        let ttl = LEADER_LEASE_TTL_MS_DEFAULT.to_string();
        let cluster = TestCluster::start_placed(etcd, placement, &["--lease-ttl-ms", &ttl]);
        World { cluster, net }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Reserve,
    Confirm,
    Release,
}

/// What one attempt (one request to one node) came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    /// Acknowledged (reserved, confirmed, released), with the outcome's
    /// detail (expiry, settlement time).
    Ack(u64),
    /// A final answer that changed nothing, or a refusal before deciding
    /// (`not_leader`, `sync_standby_unavailable`, ...).
    Refused(Status),
    /// Never left this process (no connection could be made).
    Unsent,
    /// Sent, never answered: it may or may not have happened.
    Unknown,
}

#[derive(Clone, Debug)]
struct Attempt {
    id: u128,
    op: Op,
    /// The node it went to; `None` for the leader-following client
    /// library, which picks the node itself.
    node: Option<usize>,
    sent: Instant,
    /// When the answer arrived (the client's receive time).
    done: Instant,
    res: Res,
}

#[derive(Clone, Copy, Debug)]
struct Ask {
    sku: u64,
    user: u64,
    qty: u32,
}

#[derive(Default)]
struct Ledger {
    asks: HashMap<u128, Ask>,
    attempts: Vec<Attempt>,
    /// Acknowledged reservations free for a confirm or a release.
    held: Vec<u128>,
    /// Every reservation ever acknowledged (a retry answers again).
    acked: HashSet<u128>,
}

fn classify(op: Op, result: &Result<Outcome, ClientError>) -> Res {
    match result {
        Ok(o) => match (op, o.status) {
            (Op::Reserve, Status::Reserved) | (Op::Confirm, Status::Confirmed) | (Op::Release, Status::Released) => {
                Res::Ack(o.detail)
            }
            (_, status) => Res::Refused(status),
        },
        Err(ClientError::Server { status, .. }) if status.is_retryable() => Res::Refused(*status),
        Err(ClientError::Connect { .. }) => Res::Unsent,
        Err(_) => Res::Unknown,
    }
}

/// The load: shared by the drivers, recording every attempt.
struct Load {
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
    next_id: AtomicU64,
    seed: u64,
    /// One client per node, pinned to it (one attempt per call, no
    /// following): every answer is known to come from that node.
    pinned: Vec<Client>,
}

impl Load {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// A new reservation to ask for, or a confirm or release of one held.
    fn next_op(&self, rng: &mut SmallRng) -> (Op, u128) {
        let roll = rng.gen_range(0..10);
        if roll >= 7 {
            let mut ledger = self.ledger.lock();
            if !ledger.held.is_empty() {
                let i = rng.gen_range(0..ledger.held.len());
                let id = ledger.held.swap_remove(i);
                return (if roll < 9 { Op::Confirm } else { Op::Release }, id);
            }
        }
        let id = (u128::from(self.seed) << 64) | u128::from(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let ask = Ask { sku: rng.gen_range(1..=SKUS), user: rng.gen_range(0..200_000), qty: rng.gen_range(1..=2) };
        self.ledger.lock().asks.insert(id, ask);
        (Op::Reserve, id)
    }

    async fn send(&self, client: &Client, op: Op, id: u128) -> Result<Outcome, ClientError> {
        match op {
            Op::Reserve => {
                let ask = self.ledger.lock().asks[&id];
                client.reserve(ask.sku, ask.user, ask.qty, id).await
            }
            Op::Confirm => client.confirm(id, format!("pay-{id:x}").as_bytes()).await,
            Op::Release => client.release(id).await,
        }
    }

    fn record(&self, attempt: Attempt) {
        let mut ledger = self.ledger.lock();
        if attempt.op == Op::Reserve && matches!(attempt.res, Res::Ack(_)) && ledger.acked.insert(attempt.id) {
            ledger.held.push(attempt.id);
        }
        ledger.attempts.push(attempt);
    }

    /// One attempt on node `node`.
    async fn attempt(&self, node: usize, op: Op, id: u128) -> Res {
        let sent = Instant::now();
        let result = self.send(&self.pinned[node], op, id).await;
        let res = classify(op, &result);
        self.record(Attempt { id, op, node: Some(node), sent, done: Instant::now(), res });
        res
    }

    /// A confirm or release that provably did nothing: the reservation is
    /// free for another one.
    fn give_back(&self, op: Op, id: u128, results: &[Res]) {
        let harmless = results.iter().all(|r| match r {
            Res::Unsent => true,
            Res::Refused(status) => status.is_retryable(),
            Res::Ack(_) | Res::Unknown => false,
        });
        if op != Op::Reserve && harmless {
            self.ledger.lock().held.push(id);
        }
    }

    /// The node that leads with the highest term, as the nodes say.
    async fn find_leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, client) in self.pinned.iter().enumerate() {
            if let Ok(reply) = client.cluster().await {
                if reply.role == NodeRole::Leader && best.is_none_or(|(term, _)| reply.term > term) {
                    best = Some((reply.term, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

/// Open loop on one node: a request every few ms, each on its own task,
/// whatever the node answers (or not). The one pinned to the leader keeps
/// talking to it through the partition.
async fn pinned_driver(load: Arc<Load>, node: usize, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let inflight = Arc::new(tokio::sync::Semaphore::new(PINNED_INFLIGHT));
    while !load.stopped() {
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let (op, id) = load.next_op(&mut rng);
        let load2 = load.clone();
        tokio::spawn(async move {
            let res = load2.attempt(node, op, id).await;
            load2.give_back(op, id, &[res]);
            drop(permit);
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..30))).await;
    }
    // Every request ends within the client's timeouts.
    let all = tokio::time::timeout(Duration::from_secs(20), inflight.acquire_many(PINNED_INFLIGHT as u32)).await;
    assert!(all.is_ok(), "node {node}'s requests did not end");
}

/// A checkout service that follows the leader itself, retrying each
/// operation with the same id on whichever node leads, so each answer's
/// node is known.
async fn following_driver(load: Arc<Load>, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut leader = 0;
    while !load.stopped() {
        let (op, id) = load.next_op(&mut rng);
        let deadline = Instant::now() + RETRY_FOR;
        let mut results = Vec::new();
        loop {
            let res = load.attempt(leader, op, id).await;
            results.push(res);
            match res {
                Res::Ack(_) => break,
                Res::Refused(status) if !status.is_retryable() => break,
                _ => {}
            }
            if Instant::now() >= deadline || load.stopped() {
                break;
            }
            match load.find_leader().await {
                Some(i) => leader = i,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            if results.len() % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        load.give_back(op, id, &results);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..8))).await;
    }
}

/// A checkout service on the client library's own leader following (every
/// address given): its answers count for the final history, not for the
/// per-leader timing (the node that answered is not known).
async fn library_driver(load: Arc<Load>, client: Client, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    while !load.stopped() {
        let (op, id) = load.next_op(&mut rng);
        let sent = Instant::now();
        let result = load.send(&client, op, id).await;
        let res = classify(op, &result);
        load.record(Attempt { id, op, node: None, sent, done: Instant::now(), res });
        load.give_back(op, id, &[res]);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..8))).await;
    }
}

fn pinned_config(addr: &str) -> ClientConfig {
    let mut config = ClientConfig::new(addr, CHECKOUT);
    config.connections = 2;
    config.max_attempts = 1;
    config.connect_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(2);
    config
}

/// One partition, as it happened.
#[derive(Debug)]
struct Round {
    cut: Cut,
    old: usize,
    old_term: u64,
    new: usize,
    new_term: u64,
    cut_start: Instant,
    /// Every blackhole route in place.
    cut_done: Instant,
    old_exited: Instant,
    elected_seen: Instant,
    healed: Instant,
    rejoined: Instant,
    /// The `*.discarded` files the old leader wrote when it rejoined, and
    /// the records in them.
    discarded_files: Vec<String>,
    discarded: Vec<(u64, Event)>,
}

/// A term: the node that led it and when it may have acknowledged.
#[derive(Debug)]
struct Span {
    term: u64,
    node: usize,
    from: Instant,
    until: Option<Instant>,
}

/// CLUSTER on each of `among`: the one that says it leads with the
/// highest term.
async fn leader_among(cluster: &TestCluster, among: &[usize]) -> Option<(usize, ClusterReply)> {
    let mut best: Option<(usize, ClusterReply)> = None;
    for &i in among {
        if let Some(reply) = cluster.describe(i).await {
            if reply.role == NodeRole::Leader && best.as_ref().is_none_or(|(_, b)| reply.term > b.term) {
                best = Some((i, reply));
            }
        }
    }
    best
}

/// Sleep `d`, restarting meanwhile any node that exits to rejoin.
async fn supervised_sleep(cluster: &mut TestCluster, d: Duration, restarted: &mut HashSet<usize>) {
    let until = Instant::now() + d;
    loop {
        restarted.extend(cluster.supervise_nowait());
        let now = Instant::now();
        if now >= until {
            return;
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
    }
}

fn discarded_files(dir: &Path) -> HashSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".discarded"))
                .collect()
        })
        .unwrap_or_default()
}

/// The records in a discarded piece of log: a whole segment (with its
/// header) or the bytes cut off one (from a record boundary).
fn discarded_records(path: &Path) -> Vec<(u64, Event)> {
    let name = path.file_name().unwrap().to_string_lossy();
    if !name.starts_with("wal-") {
        return Vec::new();
    }
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut at = if name.contains(".from-") { 0 } else { stampede::wal::segment::SEGMENT_HEADER_BYTES };
    let mut out = Vec::new();
    while at < bytes.len() {
        match stampede_protocol::record::decode_record(&bytes[at..]) {
            Ok((lsn, event, used)) => {
                out.push((lsn, event));
                at += used;
            }
            Err(_) => break,
        }
    }
    out
}

fn since(t: Instant, origin: Instant) -> String {
    if t >= origin {
        format!("+{:.3}s", (t - origin).as_secs_f64())
    } else {
        format!("-{:.3}s", (origin - t).as_secs_f64())
    }
}

/// Whether an attempt went to a leader after it was cut off and before
/// the network healed: nothing it wrote could reach a standby, so nothing
/// it wrote may survive unless it was sent again elsewhere.
fn doomed(a: &Attempt, rounds: &[Round]) -> bool {
    rounds.iter().any(|r| a.node == Some(r.old) && a.sent >= r.cut_done && a.sent < r.healed)
}

/// Acknowledgements by term: each node's acknowledgements belong to the
/// term it led at the time; none may come from a node that did not lead,
/// a term's last must come before the next term's first, and a cut-off
/// leader's last within its lease bound. Problems, and a summary line per
/// round.
fn check_terms(attempts: &[Attempt], spans: &[Span], rounds: &[Round], t0: Instant) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut first: Vec<Option<Instant>> = vec![None; spans.len()];
    let mut last: Vec<Option<Instant>> = vec![None; spans.len()];
    let mut count = vec![0usize; spans.len()];
    for a in attempts.iter().filter(|a| matches!(a.res, Res::Ack(_))) {
        let Some(node) = a.node else { continue };
        let span = spans.iter().position(|s| s.node == node && s.from <= a.done && s.until.is_none_or(|u| a.done <= u));
        let Some(k) = span else {
            problems.push(format!(
                "{:?} of {:#x} acknowledged by {} at {} while it did not lead",
                a.op,
                a.id,
                host(node),
                since(a.done, t0)
            ));
            continue;
        };
        count[k] += 1;
        first[k] = Some(first[k].map_or(a.done, |f| f.min(a.done)));
        last[k] = Some(last[k].map_or(a.done, |l| l.max(a.done)));
    }
    // The fence closes ttl - ttl/4 after the last renewal was *sent*, and
    // none can have been sent successfully after the cut began, so the
    // cut-off leader's last reply leaves before cut + 3/4 ttl. 500 ms more
    // for that reply to reach this process and its task to be scheduled on
    // a 2-core machine also running etcd and three servers. (etcd expires
    // the lease at the earliest a full ttl after the last renewal it
    // handled: only then can the next term start.)
    let bound = lease_ttl() * 3 / 4 + Duration::from_millis(500);
    let mut summary = Vec::new();
    for (k, r) in rounds.iter().enumerate() {
        let (old_last, new_first) = (last[k], first[k + 1]);
        match (old_last, new_first) {
            (Some(old_last), Some(new_first)) => {
                if old_last >= new_first {
                    problems.push(format!(
                        "round {k}: acknowledgements overlap: {} (term {}) acknowledged until {}, {} (term {}) from {}",
                        host(r.old),
                        r.old_term,
                        since(old_last, r.cut_start),
                        host(r.new),
                        r.new_term,
                        since(new_first, r.cut_start)
                    ));
                }
                if old_last > r.cut_start + bound {
                    problems.push(format!(
                        "round {k}: {} acknowledged {} after it was cut off (bound {bound:?})",
                        host(r.old),
                        since(old_last, r.cut_start)
                    ));
                }
            }
            (None, _) => problems.push(format!("round {k}: no acknowledgement from {} before the cut", host(r.old))),
            (_, None) => problems.push(format!("round {k}: no acknowledgement from the new leader {}", host(r.new))),
        }
        summary.push(format!(
            "round {k}: {} (term {}, {} acks) cut off ({:?}) at {}; its last ack {} after the cut, bound {bound:?}; \
             it exited to rejoin {}; {} elected (term {}) {}, its first ack {}; healed {}, {} caught up {}; \
             {} record(s) of its tail discarded in {:?}",
            host(r.old),
            r.old_term,
            count[k],
            r.cut,
            since(r.cut_start, t0),
            old_last.map_or("-".into(), |t| since(t, r.cut_start)),
            since(r.old_exited, r.cut_start),
            host(r.new),
            r.new_term,
            since(r.elected_seen, r.cut_start),
            new_first.map_or("-".into(), |t| since(t, r.cut_start)),
            since(r.healed, r.cut_start),
            host(r.old),
            since(r.rejoined, r.cut_start),
            r.discarded.len(),
            r.discarded_files,
        ));
    }
    (problems, summary)
}

/// The old leader's cut tail against what it was asked: what it wrote
/// after the cut and never acknowledged is in it, and nothing it
/// acknowledged is.
fn check_tail(r: &Round, k: usize, attempts: &[Attempt]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut cut: HashSet<(Op, u128)> = HashSet::new();
    for (_, event) in &r.discarded {
        match event {
            Event::Reserved { reservation_id, .. } => cut.insert((Op::Reserve, *reservation_id)),
            Event::Confirmed { reservation_id, .. } => cut.insert((Op::Confirm, *reservation_id)),
            Event::Released { reservation_id, .. } => cut.insert((Op::Release, *reservation_id)),
            _ => false,
        };
    }
    let acked_by_old =
        attempts.iter().filter(|a| a.node == Some(r.old) && matches!(a.res, Res::Ack(_)) && a.done <= r.old_exited);
    for a in acked_by_old {
        if cut.contains(&(a.op, a.id)) {
            problems.push(format!(
                "round {k}: {:?} of {:#x}, acknowledged by {} at {}, is in its discarded tail",
                a.op,
                a.id,
                host(r.old),
                since(a.done, r.cut_start)
            ));
        }
    }
    // A request is fresh when it is the first for its operation and id: a
    // repeat may be answered with what was committed before the cut, a
    // fresh one is decided now, and its record can reach no standby.
    let mut first_sent: HashMap<(Op, u128), Instant> = HashMap::new();
    for a in attempts {
        let first = first_sent.entry((a.op, a.id)).or_insert(a.sent);
        *first = (*first).min(a.sent);
    }
    let cut_off = |a: &&Attempt| a.node == Some(r.old) && a.sent >= r.cut_done && a.sent < r.healed;
    let fresh = |a: &&Attempt| first_sent[&(a.op, a.id)] == a.sent;
    for a in attempts.iter().filter(cut_off).filter(fresh).filter(|a| matches!(a.res, Res::Ack(_))) {
        problems.push(format!(
            "round {k}: {:?} of {:#x}, first sent to {} {} after the cut, was acknowledged ({:?}) though no \
             standby could hold it",
            a.op,
            a.id,
            host(r.old),
            since(a.sent, r.cut_start),
            a.res
        ));
    }
    // The cut-off leader decides requests until it gives up, 3/4 TTL after
    // the last renewal it sent, which was at most a little over 1/4 TTL
    // before the cut: so until about half a TTL after the cut at the
    // earliest. A fresh request sent within a quarter TTL of the cut and
    // never answered was decided and written there.
    let written_by = r.cut_start + lease_ttl() / 4;
    let unanswered: Vec<&Attempt> = attempts
        .iter()
        .filter(cut_off)
        .filter(fresh)
        .filter(|a| a.res == Res::Unknown && a.sent <= written_by)
        .collect();
    if !unanswered.is_empty() && r.discarded_files.is_empty() {
        problems.push(format!(
            "round {k}: {} had an unacknowledged tail ({} request(s) sent to it after the cut, never answered) \
             but wrote no *.discarded file when it rejoined",
            host(r.old),
            unanswered.len()
        ));
    }
    for a in &unanswered {
        if !cut.contains(&(a.op, a.id)) {
            problems.push(format!(
                "round {k}: {:?} of {:#x}, sent to {} {} after the cut and never answered, is not in its discarded \
                 tail",
                a.op,
                a.id,
                host(r.old),
                since(a.sent, r.cut_start)
            ));
        }
    }
    if unanswered.is_empty() {
        problems.push(format!(
            "round {k}: no request reached {} between the cut and {} (the load is too thin to show its tail)",
            host(r.old),
            since(written_by, r.cut_start)
        ));
    }
    problems
}

/// The leader's whole state against every answer from every node.
fn audit(dump: Vec<DumpEntry>, ledger: &Ledger, rounds: &[Round]) -> (Vec<String>, usize) {
    let mut reservations = HashMap::new();
    let mut sales = HashMap::new();
    for entry in dump {
        match entry {
            DumpEntry::Sale(s) => {
                sales.insert(s.sku, s);
            }
            DumpEntry::Reservation(r) => {
                reservations.insert(r.reservation_id, r);
            }
        }
    }
    let mut by_id: HashMap<u128, Vec<&Attempt>> = HashMap::new();
    for a in &ledger.attempts {
        by_id.entry(a.id).or_default().push(a);
    }
    let mut problems = Vec::new();
    let mut acked = 0;
    for (id, attempts) in &by_id {
        let ask = ledger.asks[id];
        let acks = |op: Op| -> Vec<u64> {
            attempts
                .iter()
                .filter(|a| a.op == op)
                .filter_map(|a| match a.res {
                    Res::Ack(detail) => Some(detail),
                    _ => None,
                })
                .collect()
        };
        let (reserved, confirmed, released) = (acks(Op::Reserve), acks(Op::Confirm), acks(Op::Release));
        // An attempt that may have taken effect without our knowing.
        let may = |op: Op| attempts.iter().any(|a| a.op == op && a.res == Res::Unknown && !doomed(a, rounds));
        let Some(r) = reservations.get(id) else {
            if !reserved.is_empty() {
                problems.push(format!("acknowledged reservation {id:#x} is gone ({ask:?}, {attempts:?})"));
            }
            continue;
        };
        if (r.sku, r.user, r.qty) != (ask.sku, ask.user, ask.qty) {
            problems.push(format!("reservation {id:#x} changed: {r:?} vs {ask:?}"));
        }
        if reserved.is_empty() {
            if !may(Op::Reserve) {
                let unanswered = attempts.iter().any(|a| a.op == Op::Reserve && a.res == Res::Unknown);
                problems.push(if unanswered {
                    format!(
                        "reservation {id:#x} exists, but only a cut-off leader was asked for it and never \
                         acknowledged it: its tail survived ({r:?}, {attempts:?})"
                    )
                } else {
                    format!("reservation {id:#x} exists but every request for it was refused ({attempts:?})")
                });
            }
            continue;
        }
        acked += 1;
        if reserved.iter().any(|&expires| expires != r.expires_at_ms) {
            problems.push(format!("reservation {id:#x}: acknowledged expiries {reserved:?}, now {}", r.expires_at_ms));
        }
        let state_ok = if !confirmed.is_empty() {
            r.state == HoldState::Confirmed
                && confirmed.iter().all(|&at| at == r.settled_at_ms)
                && r.payment_ref.as_ref() == format!("pay-{id:x}").as_bytes()
        } else if !released.is_empty() {
            r.state == HoldState::Released
        } else {
            match r.state {
                HoldState::Held => true,
                HoldState::Confirmed => may(Op::Confirm),
                HoldState::Released => may(Op::Release),
                HoldState::Expired => false,
            }
        };
        if !state_ok || (!confirmed.is_empty() && !released.is_empty()) {
            problems.push(format!(
                "reservation {id:#x}: confirms acknowledged {confirmed:?}, releases {released:?}, now {:?} \
                 (settled at {}; {attempts:?})",
                r.state, r.settled_at_ms
            ));
        }
    }
    for id in reservations.keys() {
        if !by_id.contains_key(id) {
            problems.push(format!("reservation {id:#x} exists but nobody asked for it"));
        }
    }
    for sku in 1..=SKUS {
        let Some(s) = sales.get(&sku) else {
            problems.push(format!("sale {sku} missing"));
            continue;
        };
        let units = |state: HoldState| -> u64 {
            reservations.values().filter(|r| r.sku == sku && r.state == state).map(|r| u64::from(r.qty)).sum()
        };
        let (held, sold) = (units(HoldState::Held), units(HoldState::Confirmed));
        if s.available + s.reserved + s.sold != s.total
            || s.total != STOCK
            || s.sold > s.total
            || s.reserved != held
            || s.sold != sold
        {
            problems.push(format!("sku {sku}: {s:?}, while its reservations hold {held} and sold {sold}"));
        }
    }
    (problems, acked)
}

fn fail_if(problems: &[String], ctx: &str, cluster: &TestCluster) {
    assert!(
        problems.is_empty(),
        "{ctx}: {} problem(s), e.g. {:#?}\n{}",
        problems.len(),
        &problems[..problems.len().min(8)],
        cluster.log_tails(25)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_and_its_standbys_stops_acknowledging_and_rejoins_without_its_tail() {
    let seed = common::seed();
    let rounds: usize = std::env::var("STAMPEDE_PARTITION_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let mut rng = SmallRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let mut w = tokio::task::block_in_place(World::start);
    eprintln!(
        "seed {seed}: network {} (bridge {} at {}), etcd at {}, nodes {} (started in {:.1}s)",
        w.net.prefix,
        w.net.bridge,
        w.net.gateway,
        w.cluster.etcd.endpoint,
        w.cluster.addrs(),
        t0.elapsed().as_secs_f64()
    );

    let admin = w.cluster.client(ADMIN).await;
    for sku in 1..=SKUS {
        let sale =
            SaleCreate { sku, stock: STOCK, limit_per_user: LIMIT, ttl_ms: 3_600_000, hot: sku == 1, queue: None };
        assert_eq!(admin.create_sale(sale).await.unwrap().status, Status::Ok, "seed {seed}: creating sale {sku}");
    }
    w.cluster.wait_caught_up(Duration::from_secs(30)).await;
    let first = w.cluster.wait_leader(Duration::from_secs(10)).await;
    let first_term = w.cluster.describe(first).await.expect("the leader answers").term;

    let mut pinned = Vec::new();
    for node in &w.cluster.nodes {
        pinned.push(Client::connect(pinned_config(&node.addr)).await.expect("connect to a node"));
    }
    let mut library = ClientConfig::new(w.cluster.addrs(), CHECKOUT);
    library.connections = 2;
    library.max_attempts = 3;
    library.request_timeout = Duration::from_secs(2);
    library.failover_timeout = RETRY_FOR;
    let library = Client::connect(library).await.expect("connect to the cluster");
    let load = Arc::new(Load {
        ledger: Mutex::new(Ledger::default()),
        stop: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        seed,
        pinned,
    });
    let load_started = Instant::now();
    let mut tasks = Vec::new();
    for node in 0..NODES {
        tasks.push(tokio::spawn(pinned_driver(load.clone(), node, seed.wrapping_add(node as u64))));
    }
    for f in 0..2 {
        tasks.push(tokio::spawn(following_driver(load.clone(), seed.wrapping_add(100 + f))));
    }
    tasks.push(tokio::spawn(library_driver(load.clone(), library, seed.wrapping_add(200))));

    let mut spans = vec![Span { term: first_term, node: first, from: load_started, until: None }];
    let mut done: Vec<Round> = Vec::new();
    for round in 0..rounds {
        let ctx = format!("seed {seed} round {round}");
        w.cluster.wait_caught_up(Duration::from_secs(30)).await;
        // A standby in the synchronous set, or nobody may take over.
        let started = Instant::now();
        let (old, old_term) = loop {
            let all: Vec<usize> = (0..NODES).collect();
            if let Some((i, reply)) = leader_among(&w.cluster, &all).await {
                if reply.nodes.iter().any(|n| n.in_sync_set && n.streaming) {
                    break (i, reply.term);
                }
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{ctx}: no leader with a synchronous standby");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let expected = spans.last().unwrap();
        assert_eq!(
            (old, old_term),
            (expected.node, expected.term),
            "{ctx}: the leader changed with the network whole\n{}",
            w.cluster.log_tails(25)
        );
        let before = discarded_files(&w.cluster.nodes[old].dir);
        let standbys: Vec<usize> = (0..NODES).filter(|&i| i != old).collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1_000))).await;

        let mut others = vec!["etcd".to_string()];
        others.extend(standbys.iter().map(|&i| host(i)));
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        let cut = if round % 2 == 0 { Cut::Routes } else { Cut::Silent };
        let cut_start = Instant::now();
        w.net.isolate(&host(old), &others, cut);
        let cut_done = Instant::now();
        eprintln!(
            "{ctx}: cut {} (term {old_term}) off from {others:?} ({cut:?}) at {}",
            host(old),
            since(cut_start, t0)
        );

        // The old leader fences itself and exits to rejoin (restarted at
        // once, still cut off); a standby takes over.
        let mut restarted = HashSet::new();
        let (mut new, mut old_exited) = (None, None);
        while new.is_none() || old_exited.is_none() {
            let now = w.cluster.supervise_nowait();
            if now.contains(&old) && old_exited.is_none() {
                old_exited = Some(Instant::now());
            }
            restarted.extend(now);
            if new.is_none() {
                if let Some((i, reply)) = leader_among(&w.cluster, &standbys).await {
                    if reply.term > old_term {
                        new = Some((i, reply.term, Instant::now()));
                    }
                }
            }
            assert!(
                cut_start.elapsed() < Duration::from_secs(20),
                "{ctx}: 20 s after the cut: new leader {new:?}, old leader exited: {}\n{}",
                old_exited.is_some(),
                w.cluster.log_tails(25)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (new, new_term, elected_seen) = new.unwrap();
        let old_exited = old_exited.unwrap();
        // Hold the partition until the new leader has acknowledged, and a
        // little more.
        let held_from = Instant::now();
        loop {
            let acked = load
                .ledger
                .lock()
                .attempts
                .iter()
                .any(|a| a.node == Some(new) && matches!(a.res, Res::Ack(_)) && a.done > cut_start);
            if acked {
                break;
            }
            assert!(
                held_from.elapsed() < Duration::from_secs(15),
                "{ctx}: the new leader {} acknowledged nothing within 15 s\n{}",
                host(new),
                w.cluster.log_tails(25)
            );
            supervised_sleep(&mut w.cluster, Duration::from_millis(50), &mut restarted).await;
        }
        supervised_sleep(&mut w.cluster, Duration::from_millis(rng.gen_range(0..1_000)), &mut restarted).await;

        w.net.heal();
        let healed = Instant::now();
        eprintln!("{ctx}: healed at {}", since(healed, t0));
        // The restarted old leader finds the new one, cuts its tail and
        // follows.
        restarted.extend(w.cluster.supervise_nowait());
        for i in 0..NODES {
            if w.cluster.is_starting(i) {
                tokio::task::block_in_place(|| w.cluster.wait_started(i, Duration::from_secs(30)));
            }
        }
        w.cluster.wait_caught_up(Duration::from_secs(30)).await;
        let rejoined = Instant::now();
        let reply = w.cluster.describe(old).await.expect("the old leader answers");
        assert_eq!(reply.role, NodeRole::Standby, "{ctx}: the old leader rejoined as a standby: {reply:?}");
        let leader = leader_among(&w.cluster, &(0..NODES).collect::<Vec<_>>()).await.map(|(i, r)| (i, r.term));
        assert_eq!(leader, Some((new, new_term)), "{ctx}: the new leader still leads\n{}", w.cluster.log_tails(25));

        let dir = &w.cluster.nodes[old].dir;
        let mut files: Vec<String> = discarded_files(dir).difference(&before).cloned().collect();
        files.sort();
        let discarded = files.iter().flat_map(|f| discarded_records(&dir.join(f))).collect();
        spans.last_mut().unwrap().until = Some(old_exited);
        spans.push(Span { term: new_term, node: new, from: cut_start, until: None });
        let r = Round {
            cut,
            old,
            old_term,
            new,
            new_term,
            cut_start,
            cut_done,
            old_exited,
            elected_seen,
            healed,
            rejoined,
            discarded_files: files,
            discarded,
        };
        let problems = check_tail(&r, round, &load.ledger.lock().attempts);
        fail_if(&problems, &ctx, &w.cluster);
        done.push(r);
        // Load with the whole cluster again before the next cut.
        supervised_sleep(&mut w.cluster, Duration::from_millis(rng.gen_range(300..800)), &mut HashSet::new()).await;
    }

    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a load task did not stop"))
            .unwrap_or_else(|e| panic!("seed {seed}: a load task failed: {e}"));
    }
    let ctx = format!("seed {seed} final");
    w.cluster.wait_caught_up(Duration::from_secs(30)).await;
    let ledger = std::mem::take(&mut *load.ledger.lock());

    let (problems, summary) = check_terms(&ledger.attempts, &spans, &done, t0);
    for line in &summary {
        eprintln!("seed {seed} {line}");
    }
    fail_if(&problems, &ctx, &w.cluster);

    let final_leader = leader_among(&w.cluster, &(0..NODES).collect::<Vec<_>>()).await.map(|(i, r)| (i, r.term));
    let last = spans.last().unwrap();
    assert_eq!(final_leader, Some((last.node, last.term)), "{ctx}: the leader changed after the last partition");
    let mut log =
        ReplicationClient::connect(&w.cluster.nodes[last.node].addr, ADMIN).await.expect("connect to the leader");
    let dump = log.state_dump().await.expect("STATE_DUMP");
    let (problems, acked) = audit(dump.entries, &ledger, &done);
    let unknown = ledger.attempts.iter().filter(|a| a.res == Res::Unknown).count();
    let doomed_count = ledger.attempts.iter().filter(|a| doomed(a, &done)).count();
    eprintln!(
        "{ctx}: {} attempts, {} acknowledged reservations checked against the leader's STATE_DUMP at LSN {}, \
         {unknown} unanswered ({doomed_count} sent to a cut-off leader); {:.1}s in all",
        ledger.attempts.len(),
        acked,
        dump.lsn,
        t0.elapsed().as_secs_f64()
    );
    fail_if(&problems, &ctx, &w.cluster);
}
