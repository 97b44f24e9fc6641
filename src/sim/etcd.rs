//! A model of the etcd the election uses: one linearizable key space with
//! revisions, leases that expire on etcd's own clock, and links from each
//! node that can be cut. It implements [`Kv`], so the real
//! [`Election`](crate::cluster::election::Election) runs against it.
//!
//! What it models (SIMULATION.md, "etcd"): every request is answered at
//! once, in the order made (etcd is linearizable; the simulator has one
//! thread); a lease expires when etcd's clock passes its last grant or
//! renewal plus its TTL, and its keys go with it; etcd's clock may run up
//! to `DRIFT_PPM_MAX` faster or slower than the nodes' (the lease margin
//! covers that); a node cut off from etcd gets `Unreachable` for every
//! request until the cut ends. What it does not model: etcd's own
//! failures and elections (we use etcd, we do not write it), and requests
//! that etcd applied but whose answer was lost.

use std::collections::BTreeMap;
use std::future::{ready, Future};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::clock::ManualMonotonic;
use crate::cluster::etcd::{EtcdError, KeyValue, Kv};

/// etcd's clock runs at most this much (parts per million) faster or
/// slower than the nodes'. The leader's margin (a quarter of the TTL)
/// covers far more; SIMULATION.md gives the bound.
pub const DRIFT_PPM_MAX: i64 = 100_000;

#[derive(Debug)]
struct Key {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
}

#[derive(Debug)]
struct Lease {
    ttl_ms: u64,
    /// On etcd's clock.
    expires_at_ms: u64,
}

#[derive(Debug)]
struct State {
    revision: i64,
    keys: BTreeMap<String, Key>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
    /// Nodes cut off from etcd until this time (the nodes' clock, ms).
    cut_until_ms: BTreeMap<String, u64>,
}

/// The simulated etcd, shared by every node's client.
#[derive(Clone, Debug)]
pub struct SimEtcd {
    state: Arc<Mutex<State>>,
    clock: ManualMonotonic,
    drift_ppm: i64,
}

/// One node's client of [`SimEtcd`].
#[derive(Clone, Debug)]
pub struct SimEtcdClient {
    etcd: SimEtcd,
    node: String,
}

impl SimEtcd {
    pub fn new(clock: ManualMonotonic, drift_ppm: i64) -> SimEtcd {
        assert!(drift_ppm.abs() <= DRIFT_PPM_MAX, "drift within the documented bound");
        let state = State {
            revision: 1,
            keys: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease: 1,
            cut_until_ms: BTreeMap::new(),
        };
        SimEtcd { state: Arc::new(Mutex::new(state)), clock, drift_ppm }
    }

    pub fn client(&self, node: &str) -> SimEtcdClient {
        SimEtcdClient { etcd: self.clone(), node: node.to_string() }
    }

    /// etcd's own clock, in ms.
    fn now_ms(&self) -> u64 {
        let nodes = self.clock.elapsed_ms() as i128;
        (nodes * (1_000_000 + self.drift_ppm as i128) / 1_000_000) as u64
    }

    /// Cut `node` off from etcd for `ms` of the nodes' time.
    pub fn cut(&self, node: &str, ms: u64) {
        let until = self.clock.elapsed_ms() + ms;
        self.state.lock().cut_until_ms.insert(node.to_string(), until);
    }

    /// End every cut (the faults stop).
    pub fn heal(&self) {
        self.state.lock().cut_until_ms.clear();
    }

    /// Expire the leases etcd's clock has passed, and their keys.
    fn expire(&self, state: &mut State) {
        let now = self.now_ms();
        let expired: Vec<i64> =
            state.leases.iter().filter(|(_, lease)| lease.expires_at_ms <= now).map(|(&id, _)| id).collect();
        for id in expired {
            Self::revoke_in(state, id);
        }
    }

    fn revoke_in(state: &mut State, id: i64) {
        if state.leases.remove(&id).is_none() {
            return;
        }
        let before = state.keys.len();
        state.keys.retain(|_, key| key.lease != id);
        if state.keys.len() != before {
            state.revision += 1;
        }
    }

    /// Run `f` on the state as etcd would answer `node`'s request now.
    fn call<T>(&self, node: &str, f: impl FnOnce(&mut State, u64) -> Result<T, EtcdError>) -> Result<T, EtcdError> {
        let mut state = self.state.lock();
        if state.cut_until_ms.get(node).is_some_and(|&until| self.clock.elapsed_ms() < until) {
            return Err(EtcdError::Unreachable(format!("{node} is cut off from etcd")));
        }
        self.expire(&mut state);
        let now = self.now_ms();
        f(&mut state, now)
    }

    fn put_in(state: &mut State, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        if lease != 0 && !state.leases.contains_key(&lease) {
            return Err(EtcdError::Refused { status: 400, body: "requested lease not found".into() });
        }
        state.revision += 1;
        let revision = state.revision;
        let create_revision = state.keys.get(key).map_or(revision, |k| k.create_revision);
        state
            .keys
            .insert(key.to_string(), Key { value: value.to_vec(), create_revision, mod_revision: revision, lease });
        Ok(revision)
    }
}

fn kv(key: &str, k: &Key) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: k.value.clone(),
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        lease: k.lease,
    }
}

impl Kv for SimEtcdClient {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, _| Ok(s.keys.get(key).map(|k| kv(key, k)))))
    }

    fn get_prefix(&self, prefix: &str) -> impl Future<Output = Result<Vec<KeyValue>, EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, _| {
            Ok(s.keys
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| kv(k, v))
                .collect())
        }))
    }

    fn put(&self, key: &str, value: &[u8], lease: i64) -> impl Future<Output = Result<i64, EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, _| SimEtcd::put_in(s, key, value, lease)))
    }

    fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> impl Future<Output = Result<Option<i64>, EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, _| {
            if s.keys.contains_key(key) {
                return Ok(None);
            }
            SimEtcd::put_in(s, key, value, lease).map(Some)
        }))
    }

    fn put_if_created_at(
        &self,
        guard: &str,
        create_revision: i64,
        key: &str,
        value: &[u8],
    ) -> impl Future<Output = Result<bool, EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, _| {
            if s.keys.get(guard).map_or(0, |k| k.create_revision) != create_revision {
                return Ok(false);
            }
            SimEtcd::put_in(s, key, value, 0).map(|_| true)
        }))
    }

    fn grant(&self, ttl_s: u64) -> impl Future<Output = Result<i64, EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, now| {
            let id = s.next_lease;
            s.next_lease += 1;
            let ttl_ms = ttl_s.max(1) * 1000;
            s.leases.insert(id, Lease { ttl_ms, expires_at_ms: now + ttl_ms });
            Ok(id)
        }))
    }

    fn keep_alive(&self, lease: i64) -> impl Future<Output = Result<bool, EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, now| match s.leases.get_mut(&lease) {
            Some(l) => {
                l.expires_at_ms = now + l.ttl_ms;
                Ok(true)
            }
            None => Ok(false),
        }))
    }

    fn revoke(&self, lease: i64) -> impl Future<Output = Result<(), EtcdError>> + Send {
        ready(self.etcd.call(&self.node, |s, _| {
            SimEtcd::revoke_in(s, lease);
            Ok(())
        }))
    }
}

/// Run a future of the election to its end: over [`SimEtcd`] every one is
/// ready at its first poll (no timers, no I/O).
pub fn now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("a simulated etcd request did not complete at once"),
    }
}
