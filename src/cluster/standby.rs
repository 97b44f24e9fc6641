//! Following the leader: a hot standby.
//!
//! 1. **Handshake** ([`handshake`]): FOLLOW with our term, last LSN and
//!    term history. The leader answers where our log parts from its own
//!    (`truncate_to`); when that is before our last record, our tail was
//!    never acknowledged (it is not in the new leader's history) and must
//!    be cut ([`cut_log_after`]: kept in `*.discarded` files) before we can
//!    follow. `lsn_unavailable` means the leader no longer holds the log we
//!    need: we install its newest snapshot instead ([`install_snapshot`]).
//!    Both happen at start, before this node's log writer runs.
//! 2. **Follow** ([`follow`]): append each frame's records, unchanged, to
//!    our own log at the same LSNs (the log writer fdatasyncs them), apply
//!    them to our engines (recovery's code: [`Replica`]), and send
//!    FOLLOW_ACK with our durable and applied LSNs after every sync. A
//!    TERM_STARTED record goes into the history file before the record
//!    goes into the log.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use stampede_protocol::client::ClientError;
use stampede_protocol::event::Event;
use stampede_protocol::message::{Follow, FollowAck, FollowBatch};
use stampede_protocol::replication::{Acker, FollowStream, ReplicationClient};
use stampede_protocol::Status;
use tokio_util::sync::CancellationToken;

use super::{history, ClusterState, History};
use crate::recovery::Replica;
use crate::wal::segment::{list_segments, sync_dir, SEGMENT_HEADER_BYTES};
use crate::wal::writer::{WalControl, WalMsg};

/// How a handshake with the leader ended.
pub enum Handshake {
    /// Follow from here: our log is a prefix of the leader's.
    Follow { stream: FollowStream, acker: Acker, first: Box<FollowBatch> },
    /// Our records after this LSN are not in the leader's history.
    Truncate(u64),
    /// The leader no longer holds the records after our last one.
    NeedSnapshot,
    /// The leader refused (not the leader, an older term) or is unreachable.
    Failed(String),
}

/// What this node tells the leader about its log.
pub struct OurLog<'a> {
    pub term: u64,
    pub last_lsn: u64,
    pub history: &'a History,
    pub node_id: &'a str,
    pub advertise: &'a str,
}

/// FOLLOW the leader at `addr` and read its first frame.
pub async fn handshake(addr: &str, token: &str, ours: OurLog<'_>) -> Handshake {
    let client = match ReplicationClient::connect(addr, token).await {
        Ok(client) => client,
        Err(e) => return Handshake::Failed(format!("connecting to the leader at {addr}: {e}")),
    };
    let follow = Follow {
        term: ours.term,
        last_lsn: ours.last_lsn,
        history: ours.history.clone(),
        node_id: ours.node_id.to_string(),
        addr: ours.advertise.to_string(),
    };
    let (mut stream, acker) = match client.follow(follow).await {
        Ok(pair) => pair,
        Err(e) => return Handshake::Failed(format!("FOLLOW: {e}")),
    };
    let timeout = std::time::Duration::from_secs(5);
    let first = match tokio::time::timeout(timeout, stream.next_batch()).await {
        Ok(Ok(first)) => first,
        Ok(Err(ClientError::Server { status: Status::LsnUnavailable, .. })) => return Handshake::NeedSnapshot,
        Ok(Err(e)) => return Handshake::Failed(format!("FOLLOW refused: {e}")),
        Err(_) => return Handshake::Failed("no FOLLOW reply within 5 s".into()),
    };
    if first.truncate_to < ours.last_lsn {
        return Handshake::Truncate(first.truncate_to);
    }
    Handshake::Follow { stream, acker, first: Box::new(first) }
}

/// Why following ended.
#[derive(Debug)]
pub enum Ended {
    /// Asked to stop (a promotion, a new leader).
    Cancelled,
    /// The stream broke or the leader refused: reconnect or elect.
    Lost(String),
    /// Something only a restart from the data dir can sort out.
    Rejoin(String),
}

/// Follow until cancelled or the stream ends: append, apply, acknowledge.
/// Returns the replica (a promotion serves from it) and why it ended.
///
/// Appending and acknowledging happen here; applying happens on a thread
/// of its own ("standby-apply"), so a busy apply never delays the
/// FOLLOW_ACK the leader's replies wait for. The replica comes back only
/// once that thread has applied every record handed to it: a promotion
/// serves from a state that covers the whole log it kept.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    mut stream: FollowStream,
    acker: Acker,
    first: FollowBatch,
    replica: Replica,
    wal: WalControl,
    mut synced: tokio::sync::watch::Receiver<u64>,
    cluster: Arc<ClusterState>,
    dir: &Path,
    cancel: CancellationToken,
) -> (Replica, Ended) {
    let term = first.term;
    let mut next_lsn = replica.last_lsn() + 1;
    // FOLLOW_ACK after every sync of our log (and every so often anyway,
    // so the leader sees our applied LSN move too).
    let acks = {
        let (acker, cluster, cancel) = (acker.clone(), cluster.clone(), cancel.clone());
        tokio::spawn(async move {
            let tick = std::time::Duration::from_millis(crate::limits::CLUSTER_POLL_INTERVAL_MS);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = synced.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(tick) => {}
                }
                let durable = *synced.borrow_and_update();
                cluster.durable_lsn.store(durable, Ordering::Release);
                let applied = cluster.applied_lsn.load(Ordering::Acquire);
                if acker.ack(FollowAck { durable_lsn: durable, applied_lsn: applied }).await.is_err() {
                    return;
                }
            }
        })
    };
    let applier = Applier::start(replica, cluster.clone());
    let mut batch = first;
    let ended = loop {
        if batch.term != term {
            break Ended::Lost(format!("the stream's term changed from {term} to {}", batch.term));
        }
        if let Err(e) = append(&batch, next_lsn, &wal, &cluster, dir) {
            break Ended::Rejoin(e);
        }
        if let Some((last, _)) = batch.records.last() {
            next_lsn = last + 1;
            if applier.send(std::mem::take(&mut batch.records)).await.is_err() {
                break Ended::Rejoin("the standby's apply thread stopped".into());
            }
        }
        batch = tokio::select! {
            _ = cancel.cancelled() => break Ended::Cancelled,
            _ = applier.failed.cancelled() => break Ended::Rejoin("applying failed".into()),
            next = stream.next_batch() => match next {
                Ok(batch) => batch,
                Err(e) => break Ended::Lost(e.to_string()),
            },
        };
    };
    acks.abort();
    let (replica, failure) = applier.finish().await;
    match failure {
        Some(e) => (replica, Ended::Rejoin(e)),
        None => (replica, ended),
    }
}

/// The standby's apply thread: records in order, applied in batches.
struct Applier {
    tx: tokio::sync::mpsc::Sender<Vec<(u64, Event)>>,
    thread: std::thread::JoinHandle<(Replica, Option<String>)>,
    /// Cancelled when applying failed (the thread has stopped).
    failed: CancellationToken,
}

impl Applier {
    fn start(mut replica: Replica, cluster: Arc<ClusterState>) -> Applier {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(u64, Event)>>(crate::limits::STANDBY_APPLY_QUEUE_FRAMES);
        let failed = CancellationToken::new();
        let on_failure = failed.clone();
        let thread = std::thread::Builder::new()
            .name("standby-apply".into())
            .spawn(move || {
                while let Some(records) = rx.blocking_recv() {
                    if let Err(e) = replica.apply(&records) {
                        on_failure.cancel();
                        return (replica, Some(e));
                    }
                    cluster.applied_lsn.store(replica.last_lsn(), Ordering::Release);
                }
                (replica, None)
            })
            .expect("spawning the standby apply thread");
        Applier { tx, thread, failed }
    }

    async fn send(&self, records: Vec<(u64, Event)>) -> Result<(), ()> {
        self.tx.send(records).await.map_err(|_| ())
    }

    /// Wait until every record handed over is applied.
    async fn finish(self) -> (Replica, Option<String>) {
        drop(self.tx);
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(done)) => done,
            // The thread's panics are caught by Replica::apply; anything
            // else is a bug worth the process.
            _ => panic!("the standby apply thread panicked"),
        }
    }
}

/// Append one frame's records to our log (the history file first when a
/// term starts inside it).
fn append(
    batch: &FollowBatch,
    next_lsn: u64,
    wal: &WalControl,
    cluster: &ClusterState,
    dir: &Path,
) -> Result<(), String> {
    let (Some((first_lsn, _)), Some((last_lsn, _))) = (batch.records.first(), batch.records.last()) else {
        return Ok(());
    };
    if *first_lsn != next_lsn {
        return Err(format!("the leader sent LSN {first_lsn}, our log ends at {}", next_lsn - 1));
    }
    record_terms(dir, &mut cluster.history.lock(), &batch.records)
        .map_err(|e| format!("writing the term history: {e}"))?;
    wal.send(WalMsg::Records { bytes: batch.raw.clone(), first_lsn: *first_lsn, last_lsn: *last_lsn })
        .map_err(|_| "the log writer stopped".to_string())
}

/// A new term starts inside these records (the leader's, about to be
/// appended): write the history file first, so it always covers the log.
pub fn record_terms(dir: &Path, ours: &mut History, records: &[(u64, Event)]) -> std::io::Result<()> {
    let terms: Vec<(u64, u64)> = records
        .iter()
        .filter_map(|(lsn, event)| match event {
            Event::TermStarted { term, .. } => Some((*term, *lsn)),
            _ => None,
        })
        .collect();
    if terms.is_empty() {
        return Ok(());
    }
    ours.extend(terms);
    history::store(dir, ours)
}

/// Cut our log after `lsn`: the records after it (not in the leader's
/// history, never acknowledged) go to `*.discarded` files, and so do
/// snapshots that include them and history entries after `lsn`. Run
/// before the log writer starts; recovery then rebuilds the state.
pub fn cut_log_after(dir: &Path, lsn: u64) -> std::io::Result<Vec<String>> {
    let mut kept_aside = Vec::new();
    let segments = list_segments(dir)?;
    for (i, (first, path)) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|(n, _)| *n);
        if *first > lsn {
            kept_aside.push(crate::recovery::discard_file(path)?.display().to_string());
        } else if next_first.is_none_or(|n| n > lsn + 1) {
            // This segment holds `lsn`: cut right after its record.
            let offset = record_end_offset(path, *first, lsn)?;
            let size = crate::storage::len(path)?;
            if offset < size {
                kept_aside.push(crate::recovery::cut_keeping(path, offset)?.display().to_string());
            }
        }
    }
    for (snapshot_lsn, path) in crate::wal::snapshot::list_snapshots(dir)? {
        if snapshot_lsn > lsn {
            kept_aside.push(crate::recovery::discard_file(&path)?.display().to_string());
        }
    }
    let mut ours = history::load(dir)?;
    ours.retain(|&(_, first)| first <= lsn);
    history::store(dir, &ours)?;
    sync_dir(dir)?;
    Ok(kept_aside)
}

/// The byte offset just after record `lsn` in the segment starting at
/// `first_lsn` (the header's end if `lsn` is before the segment).
fn record_end_offset(path: &Path, first_lsn: u64, lsn: u64) -> std::io::Result<u64> {
    let bytes = crate::storage::read(path)?;
    let mut at = SEGMENT_HEADER_BYTES;
    let mut next = first_lsn;
    while next <= lsn && at < bytes.len() {
        match crate::wal::record::verify_record(&bytes[at..]) {
            Ok((found, used)) if found == next => {
                at += used;
                next += 1;
            }
            _ => break,
        }
    }
    Ok(at as u64)
}

/// Replace our state with the leader's snapshot (its records are no longer
/// in its log): the snapshot file goes in, every segment and snapshot we
/// had goes to `*.discarded`, the history restarts at the snapshot's term.
pub fn install_snapshot(dir: &Path, lsn: u64, term: u64, file: &[u8]) -> std::io::Result<Vec<String>> {
    let name = crate::wal::snapshot::snapshot_name(lsn);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, file)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    crate::wal::snapshot::read_snapshot(&tmp).map_err(std::io::Error::other)?;
    let mut kept_aside = Vec::new();
    for (_, path) in list_segments(dir)? {
        kept_aside.push(crate::recovery::discard_file(&path)?.display().to_string());
    }
    for (_, path) in crate::wal::snapshot::list_snapshots(dir)? {
        kept_aside.push(crate::recovery::discard_file(&path)?.display().to_string());
    }
    std::fs::rename(&tmp, dir.join(&name))?;
    history::store(dir, &vec![(term, lsn)])?;
    sync_dir(dir)?;
    Ok(kept_aside)
}
