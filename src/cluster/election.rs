//! Who leads, decided by etcd: the keys, campaigning, and the leader's
//! lease.
//!
//! Keys, under `/stampede/<cluster>/`:
//!
//! | key | value (JSON) | lease |
//! |---|---|---|
//! | `leader` | `{"node", "addr"}` | the leader's: gone when it stops renewing |
//! | `sync` | `{"term", "leader", "standbys"}`: who holds every acknowledged record | none (survives every node) |
//! | `nodes/<id>` | `{"addr", "role", "term", "durable_lsn", "applied_lsn"}` | the node's own, renewed every second |
//!
//! **Term.** The revision at which etcd created the `leader` key: it only
//! grows, one per election, and every node reads the same number.
//!
//! **Campaign.** A node may campaign only if the `sync` key names it (as
//! the last leader or one of its synchronous standbys), or if there is no
//! `sync` key yet (a new cluster). Those nodes hold every acknowledged
//! record: the leader acknowledges nothing that is not durable on all of
//! them, and it changes the set in etcd before it counts on a new member
//! (Patroni's synchronous mode). With `--sync-standbys 0` (asynchronous
//! replication) no node is known to hold them all, and any node may
//! campaign: a failover then loses what the old leader acknowledged beyond
//! the winner's log. The campaign is one transaction: create `leader` if
//! it does not exist, attached to a fresh lease.
//!
//! **Lease and fencing.** The leader renews its lease every `ttl / 4`. It
//! notes the time *before* sending each renewal; etcd extends the lease
//! from when it handles the request, which is later. So the leader's own
//! deadline, `sent + ttl - margin`, falls before etcd can expire the
//! lease and let another node win: the leader stops acknowledging (the log
//! writer's fence) before a successor can exist. `margin` (a quarter of
//! the TTL) covers the difference between the two clocks' rates over one
//! TTL, which on a machine that keeps time is far smaller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::etcd::{Etcd, EtcdError, Kv};
use super::ClusterConfig;
use crate::clock::{Monotonic, SystemMonotonic};

/// The `leader` key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderKey {
    pub node: String,
    pub addr: String,
}

/// The `sync` key's value: who may take over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncKey {
    pub term: u64,
    pub leader: String,
    pub standbys: Vec<String>,
}

/// The `nodes/<id>` key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKey {
    pub addr: String,
    pub role: String,
    pub term: u64,
    pub durable_lsn: u64,
    pub applied_lsn: u64,
}

/// A leadership won: the lease that keeps it and the term it started.
#[derive(Clone, Debug)]
pub struct Leadership {
    pub lease: i64,
    pub term: u64,
    /// Until when this node may acknowledge (see the module doc).
    pub valid_until: Instant,
}

/// The election's rules over an etcd client (`K`: etcd itself, or the
/// simulator's model of it) and a monotonic clock (the lease deadlines).
pub struct Election<K: Kv = Etcd> {
    etcd: K,
    clock: Arc<dyn Monotonic>,
    prefix: String,
    node_id: String,
    advertise: String,
    ttl: Duration,
    /// `--sync-standbys 0`: no standby is known to hold every acknowledged
    /// record, so any may take over (the documented loss window).
    asynchronous: bool,
}

impl Election<Etcd> {
    pub fn new(config: &ClusterConfig) -> Election {
        Election::over(config, Etcd::new(&config.etcd), Arc::new(SystemMonotonic))
    }
}

impl<K: Kv> Election<K> {
    /// The election over any etcd client and clock (the simulator's).
    pub fn over(config: &ClusterConfig, etcd: K, clock: Arc<dyn Monotonic>) -> Election<K> {
        Election {
            etcd,
            clock,
            prefix: format!("/stampede/{}/", config.cluster),
            node_id: config.node_id.clone(),
            advertise: config.advertise.clone(),
            ttl: config.lease_ttl,
            asynchronous: config.sync_standbys == 0,
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The current leader and its term, if there is one.
    pub async fn leader(&self) -> Result<Option<(LeaderKey, u64)>, EtcdError> {
        let Some(kv) = self.etcd.get(&self.key("leader")).await? else { return Ok(None) };
        let leader = serde_json::from_slice(&kv.value).map_err(|e| EtcdError::Malformed(format!("leader key: {e}")))?;
        Ok(Some((leader, kv.create_revision as u64)))
    }

    /// The synchronous set the last leader recorded.
    pub async fn sync_set(&self) -> Result<Option<SyncKey>, EtcdError> {
        let Some(kv) = self.etcd.get(&self.key("sync")).await? else { return Ok(None) };
        serde_json::from_slice(&kv.value).map(Some).map_err(|e| EtcdError::Malformed(format!("sync key: {e}")))
    }

    /// Whether this node may campaign: it holds every acknowledged record
    /// (it is named in `sync`), or replication is asynchronous and nobody
    /// can be sure to (then the first standby to campaign wins, and what
    /// the old leader acknowledged beyond it is lost: the loss window of
    /// `--sync-standbys 0`).
    pub async fn eligible(&self) -> Result<bool, EtcdError> {
        if self.asynchronous {
            return Ok(true);
        }
        Ok(match self.sync_set().await? {
            None => true,
            Some(sync) => sync.leader == self.node_id || sync.standbys.contains(&self.node_id),
        })
    }

    /// Try to become the leader. `Some` if this node won.
    pub async fn campaign(&self) -> Result<Option<Leadership>, EtcdError> {
        let sent = self.clock.now();
        let lease = self.etcd.grant(self.ttl.as_secs().max(1)).await?;
        let value = serde_json::to_vec(&LeaderKey { node: self.node_id.clone(), addr: self.advertise.clone() })
            .expect("serialises");
        match self.etcd.create(&self.key("leader"), &value, lease).await {
            Ok(Some(revision)) => {
                Ok(Some(Leadership { lease, term: revision as u64, valid_until: self.deadline_from(sent) }))
            }
            Ok(None) => {
                let _ = self.etcd.revoke(lease).await;
                Ok(None)
            }
            Err(e) => {
                let _ = self.etcd.revoke(lease).await;
                Err(e)
            }
        }
    }

    /// Until when a renewal sent at `sent` lets the leader acknowledge.
    fn deadline_from(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.ttl / 4
    }

    /// Renew the leader's lease; `Ok(false)` if etcd no longer has it.
    pub async fn renew(&self, leadership: &mut Leadership) -> Result<bool, EtcdError> {
        let sent = self.clock.now();
        if !self.etcd.keep_alive(leadership.lease).await? {
            return Ok(false);
        }
        leadership.valid_until = self.deadline_from(sent);
        Ok(true)
    }

    /// Record the synchronous set, only while `term` still leads.
    pub async fn write_sync_set(&self, term: u64, standbys: &[String]) -> Result<bool, EtcdError> {
        let value = SyncKey { term, leader: self.node_id.clone(), standbys: standbys.to_vec() };
        let value = serde_json::to_vec(&value).expect("serialises");
        self.etcd.put_if_created_at(&self.key("leader"), term as i64, &self.key("sync"), &value).await
    }

    /// Give up leadership at once (a clean stop): the lease, with the key.
    pub async fn resign(&self, leadership: &Leadership) {
        let _ = self.etcd.revoke(leadership.lease).await;
    }

    /// Register (or refresh) this node's key under a node lease.
    pub async fn register(&self, lease: &mut Option<i64>, value: &NodeKey) -> Result<(), EtcdError> {
        let current = match *lease {
            Some(id) if self.etcd.keep_alive(id).await? => id,
            _ => {
                let id = self.etcd.grant(crate::limits::NODE_LEASE_TTL_S).await?;
                *lease = Some(id);
                id
            }
        };
        let value = serde_json::to_vec(value).expect("serialises");
        self.etcd.put(&self.key(&format!("nodes/{}", self.node_id)), &value, current).await.map(|_| ())
    }

    /// Every registered node: `(id, value)`.
    pub async fn nodes(&self) -> Result<Vec<(String, NodeKey)>, EtcdError> {
        let prefix = self.key("nodes/");
        let mut out = Vec::new();
        for kv in self.etcd.get_prefix(&prefix).await? {
            if let Ok(node) = serde_json::from_slice(&kv.value) {
                out.push((kv.key.trim_start_matches(&prefix).to_string(), node));
            }
        }
        Ok(out)
    }
}
