//! High availability: synchronous standbys that follow the leader's log,
//! and leadership decided by etcd.
//!
//! # Layout
//!
//! - [`etcd`]: the few etcd v3 operations used (JSON gateway over HTTP/1).
//! - [`history`]: the term history of a log, and where two logs part.
//! - [`election`]: the keys in etcd (leader, synchronous set, node
//!   registrations), campaigning, the leader's lease and its renewal.
//! - [`standby`]: following the leader: FOLLOW, append the records to our
//!   own log with the same LSNs, apply them (a hot standby), FOLLOW_ACK our
//!   durable LSN; cut a divergent tail; install a snapshot to start.
//! - [`manager`]: the node's life in the cluster: standby, campaign,
//!   promotion, leading (lease renewal, the synchronous set), fencing.
//! - [`ClusterState`] (here): what connections need to know of all that
//!   (role, term, leader, standbys), shared read-mostly.
//!
//! The leader's half of replication lives with the other log operations
//! (`server/log.rs`: FOLLOW, SNAPSHOT_FETCH) and in the log writer (replies
//! wait for the synchronous set: `wal/writer.rs`). Arrows run one way: the
//! node (`node.rs`) wires the manager to the server and the writer; nothing
//! here imports the node.
//!
//! # One reservation through a standby
//!
//! A shard on the leader decides it and hands the RESERVED event to the log
//! writer; the writer appends it (the *written* LSN moves); the FOLLOW
//! stream of each standby reads it from the segment file and sends it; the
//! standby appends the same bytes at the same LSN to its own log and
//! fdatasyncs, applies the event to its engines, and sends FOLLOW_ACK with
//! its durable LSN; meanwhile the leader has fdatasynced too. Once the
//! group is durable on the leader and on every member of the synchronous
//! set, and the leader's lease is still valid, the writer releases the
//! reply. The reconciler, streaming from the leader, sees the record once
//! it is *committed* (that same condition), so PostgreSQL never holds a
//! record a failover could take back.

pub mod election;
pub mod etcd;
pub mod history;
pub mod manager;
pub mod standby;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use stampede_protocol::message::{ClusterReply, NodeInfo, NodeRole};
use stampede_protocol::Status;

pub use history::History;

/// How a node takes part in a cluster (`stampede-server --etcd ...`).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// etcd client endpoints (`host:port`).
    pub etcd: Vec<String>,
    /// The cluster's name: its keys live under `/stampede/<cluster>/`.
    pub cluster: String,
    /// This node's id, unique in the cluster.
    pub node_id: String,
    /// Where clients and standbys reach this node (`host:port`).
    pub advertise: String,
    /// Standbys that must hold a record durably before its reply leaves
    /// (0: asynchronous replication).
    pub sync_standbys: usize,
    /// What the leader does when it has fewer synchronous standbys than it
    /// needs for longer than `sync_timeout`.
    pub degrade: SyncDegrade,
    /// A synchronous standby that acknowledges nothing for this long while
    /// replies wait is replaced (by a caught-up standby, if one is there).
    pub sync_timeout: Duration,
    /// The leader's etcd lease.
    pub lease_ttl: Duration,
    /// The token this node presents to its peers (the replication role).
    pub peer_token: String,
}

/// What a leader does without enough synchronous standbys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncDegrade {
    /// Never acknowledge a record that exists on one disk only: replies
    /// wait, and new requests are answered `sync_standby_unavailable`
    /// until a standby is back (the default).
    Never,
    /// After `sync_timeout`, acknowledge without a standby (the missing
    /// ones leave the synchronous set in etcd first, so they cannot be
    /// promoted). Loss window: what this leader acknowledges while alone is
    /// lost if its disk is.
    Async,
}

/// A standby as the leader sees it.
#[derive(Clone, Debug, Default)]
pub struct StandbyInfo {
    pub addr: String,
    pub streaming: bool,
    pub durable_lsn: u64,
    pub applied_lsn: u64,
    /// When its durable LSN last moved (for the synchronous timeout).
    pub last_progress: Option<std::time::Instant>,
}

/// A node's cluster state, for its connections: role, term, leader, and
/// (on the leader) its standbys. Role and term are atomics (read per
/// request); the rest is behind a mutex, read by CLUSTER and FOLLOW only.
pub struct ClusterState {
    pub config: Option<ClusterConfig>,
    role: AtomicU8,
    term: AtomicU64,
    leader_addr: Mutex<String>,
    pub history: Mutex<History>,
    pub standbys: Mutex<BTreeMap<String, StandbyInfo>>,
    pub sync_set: Mutex<Vec<String>>,
    /// This node's own durable and applied LSN (a standby's progress).
    pub durable_lsn: AtomicU64,
    pub applied_lsn: AtomicU64,
}

impl ClusterState {
    /// A node without a cluster: it decides alone.
    pub fn single() -> ClusterState {
        ClusterState::new(None, NodeRole::Single)
    }

    /// A cluster node, starting with no role.
    pub fn clustered(config: ClusterConfig) -> ClusterState {
        ClusterState::new(Some(config), NodeRole::None)
    }

    fn new(config: Option<ClusterConfig>, role: NodeRole) -> ClusterState {
        ClusterState {
            config,
            role: AtomicU8::new(role as u8),
            term: AtomicU64::new(0),
            leader_addr: Mutex::new(String::new()),
            history: Mutex::new(Vec::new()),
            standbys: Mutex::new(BTreeMap::new()),
            sync_set: Mutex::new(Vec::new()),
            durable_lsn: AtomicU64::new(0),
            applied_lsn: AtomicU64::new(0),
        }
    }

    pub fn role(&self) -> NodeRole {
        NodeRole::from_u8(self.role.load(Ordering::Acquire)).unwrap_or(NodeRole::None)
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Whether this node decides sales (the leader, or a single node).
    pub fn decides(&self) -> bool {
        matches!(self.role(), NodeRole::Leader | NodeRole::Single)
    }

    pub fn set_role(&self, role: NodeRole, term: u64, leader_addr: &str) {
        *self.leader_addr.lock() = leader_addr.to_string();
        self.term.fetch_max(term, Ordering::AcqRel);
        self.role.store(role as u8, Ordering::Release);
    }

    pub fn leader_addr(&self) -> String {
        self.leader_addr.lock().clone()
    }

    /// The CLUSTER reply: this node, and on a leader its standbys.
    /// `own_lsn` is this node's log head, when it has a log: a node that
    /// decides applies before it logs, so its durable LSN is also its
    /// applied one (a standby reports its own progress instead).
    pub fn describe(&self, own_addr: &str, own_lsn: Option<u64>) -> ClusterReply {
        let role = self.role();
        let id = self.config.as_ref().map_or_else(|| "single".to_string(), |c| c.node_id.clone());
        let addr = self.config.as_ref().map_or_else(|| own_addr.to_string(), |c| c.advertise.clone());
        let leader_addr = match role {
            NodeRole::Leader | NodeRole::Single => addr.clone(),
            _ => self.leader_addr(),
        };
        let sync_set = self.sync_set.lock().clone();
        let (durable_lsn, applied_lsn) = match (role, own_lsn) {
            (NodeRole::Leader | NodeRole::Single, Some(lsn)) => (lsn, lsn),
            _ => (self.durable_lsn.load(Ordering::Acquire), self.applied_lsn.load(Ordering::Acquire)),
        };
        let mut nodes = vec![NodeInfo {
            id: id.clone(),
            addr,
            role,
            in_sync_set: sync_set.contains(&id),
            streaming: role == NodeRole::Standby,
            durable_lsn,
            applied_lsn,
        }];
        for (standby_id, s) in self.standbys.lock().iter() {
            nodes.push(NodeInfo {
                id: standby_id.clone(),
                addr: s.addr.clone(),
                role: NodeRole::Standby,
                in_sync_set: sync_set.contains(standby_id),
                streaming: s.streaming,
                durable_lsn: s.durable_lsn,
                applied_lsn: s.applied_lsn,
            });
        }
        ClusterReply { status: Status::Ok, term: self.term(), role, leader_addr, nodes }
    }
}
