//! A node's life in its cluster.
//!
//! ```text
//! start ──> [join] ──leader exists──> handshake ──ok──> STANDBY ──leader gone, eligible──> campaign
//!              │                        │ truncate / snapshot: fix the data dir, recover, join again
//!              └──no leader, eligible──> campaign ──won──> promote ──> LEADER ──lease lost──> fence, exit 75
//! ```
//!
//! - **Join** runs before this node's log writer starts, so a standby whose
//!   log must be cut, or replaced by the leader's snapshot, does so on its
//!   data dir and recovers again. At run time the same situations end the
//!   process with [`EXIT_REJOIN`](crate::limits::EXIT_REJOIN), and its
//!   supervisor restarts it into this path.
//! - **Promote**: the history file gets the new term first, then etcd's
//!   `sync` key is rewritten (this node alone, until standbys are caught
//!   up), then TERM_STARTED goes into the log, then the shards start with
//!   the standby's engines. Replies wait for the synchronous set.
//! - **Lead**: renew the lease every quarter TTL and move the writer's
//!   fence with it; maintain the synchronous set: a caught-up standby joins
//!   in etcd *before* the writer counts on it, a stalled or gone member is
//!   replaced by a caught-up one in one step; with too few, either hold
//!   (default: new requests get `sync_standby_unavailable` after the
//!   timeout) or, in the async degraded mode, go on alone after the timeout.
//!   Losing the lease closes the fence at once (no reply leaves after the
//!   deadline), refuses new requests `not_leader`, and exits to rejoin.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stampede_protocol::event::Event;
use stampede_protocol::message::NodeRole;
use stampede_protocol::Status;
use tokio_util::sync::CancellationToken;

use super::election::{Election, LeaderKey, Leadership, NodeKey};
use super::etcd::Kv;
use super::standby::{self, Ended, Handshake, OurLog};
use super::History;
use super::{history, ClusterConfig, ClusterState, StandbyInfo, SyncDegrade};
use crate::clock::{Monotonic, SystemMonotonic};
use crate::limits::CLUSTER_POLL_INTERVAL_MS;
use crate::recovery::Replica;
use crate::server::Shared;
use crate::shard::SinkFactory;
use crate::wal::writer::{Fence, WalControl, WalMsg, WalStats, WalWatches};

/// Called when this node must restart to rejoin (the server exits 75).
pub type RejoinHandler = Arc<dyn Fn(&str) + Send + Sync>;

fn poll() -> Duration {
    Duration::from_millis(CLUSTER_POLL_INTERVAL_MS)
}

/// How [`join`] found this node's place.
pub enum Start {
    /// Follow this leader from the handshake already made.
    Standby { leader: LeaderKey, term: u64, handshake: Handshake },
    /// Lead, from this log position.
    Leader(Leadership),
}

/// What [`join`] needs to fix the data dir between attempts.
pub struct JoinLog<'a> {
    pub dir: &'a std::path::Path,
    pub last_lsn: u64,
    pub history: &'a history::History,
}

/// What joining asks the caller to do with the data dir.
pub enum Join {
    Start(Start),
    /// Cut the log after this LSN, recover again, join again.
    Truncate(u64),
    /// Install this snapshot (lsn, term, file), recover again, join again.
    Snapshot(u64, u64, Vec<u8>),
}

/// Find this node's place: follow the leader there is, or become it.
pub async fn join(config: &ClusterConfig, election: &Election, log: JoinLog<'_>) -> Join {
    loop {
        match election.leader().await {
            Ok(Some((leader, term))) if leader.node != config.node_id => {
                let ours = OurLog {
                    term: history::last_term(log.history).max(term),
                    last_lsn: log.last_lsn,
                    history: log.history,
                    node_id: &config.node_id,
                    advertise: &config.advertise,
                };
                match standby::handshake(&leader.addr, &config.peer_token, ours).await {
                    Handshake::Truncate(lsn) => return Join::Truncate(lsn),
                    Handshake::NeedSnapshot => match fetch_snapshot(&leader.addr, &config.peer_token).await {
                        Ok((lsn, term, file)) => return Join::Snapshot(lsn, term, file),
                        Err(e) => tracing::warn!(error = %e, "fetching the leader's snapshot failed; retrying"),
                    },
                    Handshake::Failed(reason) => {
                        tracing::info!(leader = %leader.node, %reason, "cannot follow the leader yet; retrying")
                    }
                    handshake @ Handshake::Follow { .. } => {
                        return Join::Start(Start::Standby { leader, term, handshake })
                    }
                }
            }
            // Our own key from a life before this process: wait for its
            // lease to run out (its holder, us, is gone).
            Ok(Some(_)) => {}
            Ok(None) => match election.eligible().await {
                Ok(true) => match election.campaign().await {
                    Ok(Some(leadership)) => return Join::Start(Start::Leader(leadership)),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "campaign failed"),
                },
                Ok(false) => tracing::info!("no leader, and this node may not lead (not in the synchronous set)"),
                Err(e) => tracing::warn!(error = %e, "etcd unreachable"),
            },
            Err(e) => tracing::warn!(error = %e, "etcd unreachable"),
        }
        tokio::time::sleep(poll()).await;
    }
}

async fn fetch_snapshot(addr: &str, token: &str) -> Result<(u64, u64, Vec<u8>), String> {
    let mut client =
        stampede_protocol::replication::ReplicationClient::connect(addr, token).await.map_err(|e| e.to_string())?;
    client.snapshot().await.map_err(|e| e.to_string())
}

/// Everything the running manager drives.
pub struct Manager {
    pub config: ClusterConfig,
    pub election: Election,
    pub cluster: Arc<ClusterState>,
    pub dir: PathBuf,
    pub wal: WalControl,
    pub watches: WalWatches,
    pub stats: Arc<WalStats>,
    pub fence: Arc<Fence>,
    pub shared: Arc<Shared>,
    pub sinks: Option<SinkFactory>,
    pub rejoin: RejoinHandler,
    /// The leadership held, for a clean stop to give it up.
    pub leadership: Arc<parking_lot::Mutex<Option<Leadership>>>,
}

impl Manager {
    /// Run from `start` until the process ends.
    pub async fn run(self, start: Start, replica: Replica) {
        match start {
            Start::Leader(leadership) => self.promote(replica, leadership).await,
            Start::Standby { leader, term, handshake } => self.stand_by(replica, leader, term, handshake).await,
        }
    }

    fn rejoin(&self, reason: &str) {
        tracing::warn!(%reason, "leaving the cluster to rejoin");
        (self.rejoin)(reason);
    }

    /// Follow leaders until this node becomes one.
    async fn stand_by(self, mut replica: Replica, mut leader: LeaderKey, mut term: u64, mut handshake: Handshake) {
        loop {
            let Handshake::Follow { stream, acker, first } = handshake else {
                return self.rejoin("the leader's history and ours must be reconciled from the data dir");
            };
            self.cluster.set_role(NodeRole::Standby, term, &leader.addr);
            tracing::info!(leader = %leader.node, term, from_lsn = replica.last_lsn() + 1, "following");
            let cancel = CancellationToken::new();
            let watcher = tokio::spawn(watch_leader(self.election_handle(), leader.clone(), term, cancel.clone()));
            let (returned, ended) = standby::follow(
                stream,
                acker,
                *first,
                replica,
                self.wal.clone(),
                self.watches.synced.clone(),
                self.cluster.clone(),
                &self.dir,
                cancel.clone(),
            )
            .await;
            cancel.cancel();
            watcher.abort();
            replica = returned;
            match ended {
                Ended::Rejoin(reason) => return self.rejoin(&reason),
                Ended::Cancelled | Ended::Lost(_) => {
                    if let Ended::Lost(reason) = &ended {
                        tracing::info!(%reason, "the stream from the leader ended");
                    }
                }
            }
            // Who leads now? Follow them, or lead.
            loop {
                self.cluster.set_role(NodeRole::None, term, "");
                match self.election.leader().await {
                    Ok(Some((next, next_term))) if next.node != self.config.node_id => {
                        let hist = self.cluster.history.lock().clone();
                        let ours = OurLog {
                            term: history::last_term(&hist).max(next_term),
                            last_lsn: replica.last_lsn(),
                            history: &hist,
                            node_id: &self.config.node_id,
                            advertise: &self.config.advertise,
                        };
                        match standby::handshake(&next.addr, &self.config.peer_token, ours).await {
                            hs @ Handshake::Follow { .. } => {
                                (leader, term, handshake) = (next, next_term, hs);
                                break;
                            }
                            Handshake::Truncate(_) | Handshake::NeedSnapshot => {
                                return self.rejoin("our log must be cut or replaced to follow the new leader");
                            }
                            Handshake::Failed(reason) => tracing::info!(%reason, "cannot follow yet"),
                        }
                    }
                    Ok(None) => match self.election.eligible().await {
                        Ok(true) => match self.election.campaign().await {
                            Ok(Some(leadership)) => return self.promote(replica, leadership).await,
                            Ok(None) => {}
                            Err(e) => tracing::warn!(error = %e, "campaign failed"),
                        },
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "etcd unreachable"),
                    },
                    Ok(Some(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "etcd unreachable"),
                }
                tokio::time::sleep(poll()).await;
            }
        }
    }

    fn election_handle(&self) -> Election {
        Election::new(&self.config)
    }

    /// Become the leader of `leadership.term` with `replica`'s state.
    async fn promote(mut self, replica: Replica, leadership: Leadership) {
        let term = leadership.term;
        let start_lsn = replica.last_lsn() + 1;
        tracing::info!(term, start_lsn, "won the election; promoting");
        let mut ours = self.cluster.history.lock().clone();
        let begun = begin_term(&self.dir, &mut ours, &self.election, term, start_lsn).await;
        *self.cluster.history.lock() = ours;
        if let Err(reason) = begun {
            return self.rejoin(&reason);
        }
        let set = if self.config.sync_standbys == 0 { Some(Vec::new()) } else { None };
        let _ = self.wal.send(WalMsg::SyncSet(set));
        *self.cluster.sync_set.lock() = Vec::new();
        self.fence.extend_to(leadership.valid_until);
        *self.leadership.lock() = Some(leadership.clone());
        let sinks = self.sinks.take().expect("promoted once");
        // TERM_STARTED first: every record of this term follows it.
        let mut sink = sinks(usize::MAX);
        let at_ms = self.shared.clock.now_ms();
        sink.submit(&mut vec![Event::TermStarted { term, at_ms }], &mut Vec::new());
        drop(sink);
        self.shared.install_router(replica.into_engines(), sinks);
        self.cluster.set_role(NodeRole::Leader, term, &self.config.advertise);
        tracing::info!(term, "leading");
        self.lead(leadership).await
    }

    /// Renew the lease, keep the synchronous set, until the lease is lost.
    async fn lead(self, leadership: Leadership) {
        let mut lease = LeaseKeeper::new(&self.config, leadership, Instant::now());
        let mut next_registration = Instant::now();
        let mut node_lease = None;
        let mut sync = SyncKeeper::new(&self.config);
        loop {
            tokio::time::sleep(poll()).await;
            let now = Instant::now();
            if let Err(reason) = lease.poll(&self.election, &self.fence, &SystemMonotonic).await {
                return self.lose(reason);
            }
            if now >= next_registration {
                next_registration = now + Duration::from_secs(1);
                let key = self.node_key(NodeRole::Leader);
                if let Err(e) = self.election.register(&mut node_lease, &key).await {
                    tracing::debug!(error = %e, "node registration failed");
                }
            }
            if let Err(reason) = sync.keep(&self, lease.leadership.term).await {
                return self.lose(&reason);
            }
        }
    }

    /// The lease is gone: stop acknowledging at once, refuse, rejoin.
    fn lose(&self, reason: &str) {
        self.fence.close();
        if let Some(router) = self.shared.router() {
            router.refuse(Status::NotLeader);
        }
        self.cluster.set_role(NodeRole::None, self.cluster.term(), "");
        tracing::error!(%reason, "lost leadership: no more acknowledgements from this node");
        self.rejoin(reason);
    }

    fn node_key(&self, role: NodeRole) -> NodeKey {
        NodeKey {
            addr: self.config.advertise.clone(),
            role: role.name().to_string(),
            term: self.cluster.term(),
            durable_lsn: self.stats.synced_lsn.load(Ordering::Acquire),
            applied_lsn: self.stats.synced_lsn.load(Ordering::Acquire),
        }
    }
}

/// Cancel `cancel` when the leader key no longer names `leader` in `term`.
async fn watch_leader(election: Election, leader: LeaderKey, term: u64, cancel: CancellationToken) {
    loop {
        tokio::time::sleep(poll()).await;
        match election.leader().await {
            Ok(Some((now, now_term))) if now == leader && now_term == term => {}
            Ok(_) => {
                cancel.cancel();
                return;
            }
            // etcd unreachable: keep following; the stream tells us if the
            // leader is gone.
            Err(_) => {}
        }
    }
}

/// The first steps of a new term, in the order that keeps the cluster
/// safe: the term history (so it always covers the log), then the `sync`
/// key naming this node alone (nobody else may take over until its
/// standbys hold what it writes). `Err`: the node must rejoin. Plain code
/// over any etcd client, so the simulator promotes through it too.
pub async fn begin_term<K: Kv>(
    dir: &Path,
    history: &mut History,
    election: &Election<K>,
    term: u64,
    start_lsn: u64,
) -> Result<(), String> {
    history.push((term, start_lsn));
    history::store(dir, history).map_err(|e| format!("cannot write the term history: {e}"))?;
    match election.write_sync_set(term, &[]).await {
        Ok(true) => Ok(()),
        Ok(false) => Err("lost the leader key before promoting".into()),
        Err(e) => Err(format!("cannot record the synchronous set: {e}")),
    }
}

/// The leader's lease as its manager keeps it: renew every quarter TTL
/// (at most every poll), move the writer's fence with each renewal, and
/// end the leadership when etcd refuses a renewal or none succeeded before
/// the deadline. Plain rules over any etcd client and clock, so the
/// simulator keeps its leaders' leases through them too.
pub struct LeaseKeeper {
    pub leadership: Leadership,
    renew_every: Duration,
    next_renewal: Instant,
}

impl LeaseKeeper {
    pub fn new(config: &ClusterConfig, leadership: Leadership, now: Instant) -> LeaseKeeper {
        let renew_every = (config.lease_ttl / 4).max(poll());
        LeaseKeeper { leadership, renew_every, next_renewal: now + renew_every }
    }

    /// One poll of the manager: renew if due. `Err(reason)`: the
    /// leadership is over (close the fence, refuse, exit to rejoin).
    pub async fn poll<K: Kv>(
        &mut self,
        election: &Election<K>,
        fence: &Fence,
        clock: &dyn Monotonic,
    ) -> Result<(), &'static str> {
        if clock.now() >= self.next_renewal {
            match election.renew(&mut self.leadership).await {
                Ok(true) => {
                    fence.extend_to(self.leadership.valid_until);
                    self.next_renewal = clock.now() + self.renew_every;
                }
                Ok(false) => return Err("etcd expired our lease"),
                Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
            }
        }
        if clock.now() >= self.leadership.valid_until {
            return Err("could not renew the lease in time");
        }
        Ok(())
    }
}

/// The leader's synchronous set, kept in etcd and in the log writer. The
/// policy ([`SyncKeeper::plan`]) is plain code over what the leader knows
/// of its standbys, so the simulator runs it too; `keep`
/// carries its decisions out (etcd, the writer, the router).
pub struct SyncKeeper {
    wanted: usize,
    timeout: Duration,
    degrade: SyncDegrade,
    /// Since when the set has been short of `wanted` with replies waiting.
    short_since: Option<Instant>,
    refusing: bool,
}

/// One round of the synchronous-set policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPlan {
    /// A new set: record it in etcd first (holding every release while it
    /// changes), then use it.
    pub change: Option<Vec<String>>,
    /// Short of members for longer than the timeout, and allowed to go on
    /// without them (`--sync-degrade async`).
    pub degraded: bool,
    /// Short for too long and not degraded: refuse new requests.
    pub refuse: bool,
}

impl SyncKeeper {
    pub fn new(config: &ClusterConfig) -> SyncKeeper {
        SyncKeeper {
            wanted: config.sync_standbys,
            timeout: config.sync_timeout,
            degrade: config.degrade,
            short_since: None,
            refusing: false,
        }
    }

    /// Members the writer needs before it releases (`--sync-standbys`).
    pub fn wanted(&self) -> usize {
        self.wanted
    }

    /// Drop members that are gone or stalled, add caught-up standbys, and
    /// apply the policy when the set stays short. `commit`: the committed
    /// LSN; `waiting`: replies wait for the set; `current`: the set in
    /// force; `standbys`: what the leader knows of each.
    pub fn plan(
        &mut self,
        now: Instant,
        commit: u64,
        waiting: bool,
        current: &[String],
        standbys: &BTreeMap<String, StandbyInfo>,
    ) -> SyncPlan {
        if self.wanted == 0 {
            return SyncPlan { change: None, degraded: false, refuse: false };
        }
        // Stalled: replies wait for records it has not made durable, and
        // it has made no progress for the timeout.
        let healthy = |id: &String| {
            standbys.get(id).is_some_and(|s| {
                let idle = s.last_progress.is_none_or(|t| now.saturating_duration_since(t) > self.timeout);
                let stalled = waiting && s.durable_lsn <= commit && idle;
                s.streaming && !stalled
            })
        };
        let mut desired: Vec<String> = current.iter().filter(|id| healthy(id)).cloned().collect();
        // A standby may join once it holds everything acknowledged so far.
        let mut candidates: Vec<(&String, u64)> = standbys
            .iter()
            .filter(|(id, s)| s.streaming && s.durable_lsn >= commit && !desired.contains(id) && healthy(id))
            .map(|(id, s)| (id, s.durable_lsn))
            .collect();
        candidates.sort_by_key(|(_, durable)| std::cmp::Reverse(*durable));
        for (id, _) in candidates {
            if desired.len() >= self.wanted {
                break;
            }
            desired.push(id.clone());
        }
        let full = desired.len() >= self.wanted;
        if !full {
            self.short_since.get_or_insert(now);
        } else {
            self.short_since = None;
        }
        let short_too_long = self.short_since.is_some_and(|t| now.saturating_duration_since(t) > self.timeout);
        let degraded = !full && short_too_long && self.degrade == SyncDegrade::Async;
        let change =
            (desired.as_slice() != current && (full || degraded || desired.len() > current.len())).then_some(desired);
        SyncPlan { change, degraded, refuse: !full && short_too_long && !degraded }
    }

    /// One round: plan, record a change in etcd before the writer uses it,
    /// release with the set only when it is complete (or degraded), and
    /// refuse new requests while the policy says so. `Err` if etcd says we
    /// no longer lead.
    async fn keep(&mut self, m: &Manager, term: u64) -> Result<(), String> {
        if self.wanted == 0 {
            return Ok(());
        }
        let commit = m.stats.committed_lsn.load(Ordering::Acquire);
        let waiting = m.stats.groups_waiting.load(Ordering::Acquire) > 0;
        let current = m.cluster.sync_set.lock().clone();
        let standbys = m.cluster.standbys.lock().clone();
        let plan = self.plan(Instant::now(), commit, waiting, &current, &standbys);
        if let Some(desired) = plan.change {
            // Hold every release while the set changes; etcd first, so no
            // node the writer stops counting on can be promoted later, and
            // none it starts counting on is unknown to etcd.
            let _ = m.wal.send(WalMsg::SyncSet(None));
            match m.election.write_sync_set(term, &desired).await {
                Ok(true) => {}
                Ok(false) => return Err("the leader key changed while recording the synchronous set".into()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the synchronous set; holding replies");
                    return Ok(());
                }
            }
            tracing::info!(?current, ?desired, "synchronous set changed");
            *m.cluster.sync_set.lock() = desired;
        }
        // Release with the set only when it is complete (or degraded).
        let set = m.cluster.sync_set.lock().clone();
        let usable = set.len() >= self.wanted || plan.degraded;
        let _ = m.wal.send(WalMsg::SyncSet(usable.then_some(set)));
        // Short of healthy members for too long, and not degraded: refuse
        // new requests rather than hold ever more replies.
        if plan.refuse != self.refusing {
            self.refusing = plan.refuse;
            if let Some(router) = m.shared.router() {
                if plan.refuse {
                    tracing::error!(
                        wanted = self.wanted,
                        "no synchronous standby for too long: refusing new requests (sync_standby_unavailable)"
                    );
                    router.refuse(Status::SyncStandbyUnavailable);
                } else {
                    tracing::info!("synchronous standbys back: serving again");
                    router.stop_refusing(Status::SyncStandbyUnavailable);
                }
            }
        }
        Ok(())
    }
}
