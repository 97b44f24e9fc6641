//! Cluster messages: who leads (CLUSTER, 0x03), and the standby's side of
//! synchronous replication: FOLLOW (0x33) streams the leader's log to a
//! standby, FOLLOW_ACK (0x34) carries the standby's durable LSN back, and
//! SNAPSHOT_FETCH (0x35) hands a new standby the leader's newest snapshot.
//!
//! # Format
//!
//! CLUSTER request: empty body. Reply (0x83), CLUSTER_REPLY:
//! ```text
//!  0  2 status          u16: ok
//!  2  8 term            u64: the term this node knows (0: none yet)
//! 10  1 role            u8: 0 none (electing, starting), 1 leader, 2 standby, 3 single (no cluster)
//! 11  1 leader_addr_len u8, then leader_addr (UTF-8 host:port; empty when unknown)
//!  .  1 node_count      u8, then per node:
//!         id_len u8, id (UTF-8), addr_len u8, addr (UTF-8), role u8,
//!         flags u8 (bit 0 in the synchronous set, bit 1 streaming from the leader),
//!         durable_lsn u64, applied_lsn u64
//! ```
//!
//! FOLLOW request body:
//! ```text
//!  0  8 term           u64: the highest term the follower knows
//!  8  8 last_lsn       u64: the last record in the follower's log (0: none)
//! 16  2 history_count  u16 (<= HISTORY_ENTRIES_MAX), then per entry:
//!         term u64, first_lsn u64 (records from first_lsn on, up to the
//!         next entry's, were written in term)
//!  .  1 node_id_len    u8, node_id (UTF-8)
//!  .  1 addr_len       u8, addr (UTF-8: where the follower serves clients)
//! ```
//! Replies (0xb3), FOLLOW_BATCH, a stream like REPLICATE's:
//! ```text
//!  0  2 status          u16: ok; anything else ends the stream: not_leader,
//!                       stale_term, lsn_unavailable (fetch a snapshot first),
//!                       busy, shutting_down, internal_error
//!  2  8 term            u64: the leader's term
//! 10  8 commit_lsn      u64: durable on the leader and its synchronous standbys
//! 18  8 truncate_to     u64: the follower's log must end at this LSN before it
//!                       appends the records (its records after it are not in
//!                       the leader's history); the same in every frame
//! 26  8 server_time_ms  u64
//! 34  4 count           u32, then `count` log records (the WAL format),
//!                       LSNs consecutive from truncate_to + 1 on
//! ```
//!
//! FOLLOW_ACK request body (no reply):
//! ```text
//!  0  8 durable_lsn  u64: every record <= this is fdatasync'ed in the follower's log
//!  8  8 applied_lsn  u64: ... and applied to its engines
//! ```
//!
//! SNAPSHOT_FETCH request: empty body. Replies (0xb5), SNAPSHOT_CHUNK:
//! ```text
//!  0  2 status      u16: ok, busy, internal_error
//!  2  1 flags       u8: bit 0 last chunk
//!  3  8 lsn         u64: the snapshot covers every record <= lsn
//! 11  8 term        u64: the term of record `lsn`
//! 19  8 offset      u64: where these bytes go in the snapshot file
//! 27  8 total_bytes u64: the snapshot file's size
//! 35  4 len         u32, then `len` bytes of the file
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::event::Event;
use crate::limits::HISTORY_ENTRIES_MAX;
use crate::record::{decode_record, encode_record};
use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// A node's part in its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NodeRole {
    /// Starting, electing, or cut off: serves nothing that sells.
    None = 0,
    Leader = 1,
    Standby = 2,
    /// No cluster configured: this node decides alone.
    Single = 3,
}

impl NodeRole {
    pub fn from_u8(v: u8) -> Option<NodeRole> {
        [NodeRole::None, NodeRole::Leader, NodeRole::Standby, NodeRole::Single].into_iter().find(|r| *r as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            NodeRole::None => "none",
            NodeRole::Leader => "leader",
            NodeRole::Standby => "standby",
            NodeRole::Single => "single",
        }
    }
}

/// One node as CLUSTER reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub addr: String,
    pub role: NodeRole,
    pub in_sync_set: bool,
    pub streaming: bool,
    pub durable_lsn: u64,
    pub applied_lsn: u64,
}

/// CLUSTER reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterReply {
    pub status: Status,
    pub term: u64,
    pub role: NodeRole,
    pub leader_addr: String,
    pub nodes: Vec<NodeInfo>,
}

fn put_str(dst: &mut BytesMut, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(255)];
    dst.put_u8(bytes.len() as u8);
    dst.extend_from_slice(bytes);
}

fn read_str(r: &mut Reader<'_>, what: &str) -> Result<String, Malformed> {
    let len = r.u8()? as usize;
    String::from_utf8(r.bytes(len)?.to_vec()).map_err(|_| Malformed(format!("{what} is not UTF-8")))
}

fn read_status(r: &mut Reader<'_>) -> Result<Status, Malformed> {
    let code = r.u16()?;
    Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))
}

fn read_role(r: &mut Reader<'_>) -> Result<NodeRole, Malformed> {
    let v = r.u8()?;
    NodeRole::from_u8(v).ok_or_else(|| Malformed(format!("unknown node role {v}")))
}

impl ClusterReply {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        dst.put_u64_le(self.term);
        dst.put_u8(self.role as u8);
        put_str(dst, &self.leader_addr);
        let nodes = &self.nodes[..self.nodes.len().min(255)];
        dst.put_u8(nodes.len() as u8);
        for n in nodes {
            put_str(dst, &n.id);
            put_str(dst, &n.addr);
            dst.put_u8(n.role as u8);
            dst.put_u8(u8::from(n.in_sync_set) | (u8::from(n.streaming) << 1));
            dst.put_u64_le(n.durable_lsn);
            dst.put_u64_le(n.applied_lsn);
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "CLUSTER reply");
        let status = read_status(&mut r)?;
        let term = r.u64()?;
        let role = read_role(&mut r)?;
        let leader_addr = read_str(&mut r, "leader_addr")?;
        let count = r.u8()?;
        let mut nodes = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let id = read_str(&mut r, "node id")?;
            let addr = read_str(&mut r, "node addr")?;
            let role = read_role(&mut r)?;
            let flags = r.u8()?;
            if flags & !3 != 0 {
                return Err(Malformed(format!("CLUSTER reply: node flags {flags:#04x}")));
            }
            nodes.push(NodeInfo {
                id,
                addr,
                role,
                in_sync_set: flags & 1 != 0,
                streaming: flags & 2 != 0,
                durable_lsn: r.u64()?,
                applied_lsn: r.u64()?,
            });
        }
        r.finish()?;
        Ok(ClusterReply { status, term, role, leader_addr, nodes })
    }
}

/// A node's term history: `(term, first_lsn)`, ascending in both.
pub type History = Vec<(u64, u64)>;

/// FOLLOW request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Follow {
    pub term: u64,
    pub last_lsn: u64,
    pub history: History,
    pub node_id: String,
    pub addr: String,
}

impl Follow {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.term);
        dst.put_u64_le(self.last_lsn);
        // The newest entries matter most: where the logs part is recent.
        let history = &self.history[self.history.len().saturating_sub(HISTORY_ENTRIES_MAX)..];
        dst.put_u16_le(history.len() as u16);
        for (term, first_lsn) in history {
            dst.put_u64_le(*term);
            dst.put_u64_le(*first_lsn);
        }
        put_str(dst, &self.node_id);
        put_str(dst, &self.addr);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "FOLLOW");
        let term = r.u64()?;
        let last_lsn = r.u64()?;
        let count = usize::from(r.u16()?);
        if count > HISTORY_ENTRIES_MAX {
            return Err(Malformed(format!("FOLLOW: {count} history entries, at most {HISTORY_ENTRIES_MAX}")));
        }
        let mut history = Vec::with_capacity(count);
        for _ in 0..count {
            history.push((r.u64()?, r.u64()?));
        }
        let node_id = read_str(&mut r, "node_id")?;
        let addr = read_str(&mut r, "addr")?;
        r.finish()?;
        Ok(Follow { term, last_lsn, history, node_id, addr })
    }
}

/// Bytes of a FOLLOW_BATCH body before its records.
pub const FOLLOW_BATCH_HEADER_BYTES: usize = 38;

/// One FOLLOW_BATCH frame, decoded (records checksummed and consecutive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowBatch {
    pub status: Status,
    pub term: u64,
    pub commit_lsn: u64,
    pub truncate_to: u64,
    pub server_time_ms: u64,
    /// Each record as decoded.
    pub records: Vec<(u64, Event)>,
    /// The records as they came, back to back: a standby appends these
    /// bytes to its own log unchanged.
    pub raw: Bytes,
}

impl FollowBatch {
    /// Write the body header; the caller appends `count` raw records.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_header(
        status: Status,
        term: u64,
        commit_lsn: u64,
        truncate_to: u64,
        server_time_ms: u64,
        count: u32,
        dst: &mut BytesMut,
    ) {
        dst.put_u16_le(status.code());
        dst.put_u64_le(term);
        dst.put_u64_le(commit_lsn);
        dst.put_u64_le(truncate_to);
        dst.put_u64_le(server_time_ms);
        dst.put_u32_le(count);
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        let count = self.records.len() as u32;
        let (s, t, c, tr, now) = (self.status, self.term, self.commit_lsn, self.truncate_to, self.server_time_ms);
        FollowBatch::encode_header(s, t, c, tr, now, count, dst);
        for (lsn, event) in &self.records {
            encode_record(*lsn, event, dst);
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "FOLLOW_BATCH");
        let status = read_status(&mut r)?;
        let term = r.u64()?;
        let commit_lsn = r.u64()?;
        let truncate_to = r.u64()?;
        let server_time_ms = r.u64()?;
        let count = r.u32()? as usize;
        let raw = Bytes::copy_from_slice(&body[FOLLOW_BATCH_HEADER_BYTES..]);
        let mut rest = &raw[..];
        let mut records: Vec<(u64, Event)> =
            Vec::with_capacity(count.min(rest.len() / crate::record::RECORD_HEADER_BYTES));
        for i in 0..count {
            let (lsn, event, used) =
                decode_record(rest).map_err(|e| Malformed(format!("FOLLOW_BATCH record {i}: {e}")))?;
            if let Some((previous, _)) = records.last() {
                if lsn != previous + 1 {
                    return Err(Malformed(format!("FOLLOW_BATCH record {i}: LSN {lsn} after {previous}")));
                }
            }
            records.push((lsn, event));
            rest = &rest[used..];
        }
        if !rest.is_empty() {
            return Err(Malformed(format!("FOLLOW_BATCH: {} bytes after {count} records", rest.len())));
        }
        Ok(FollowBatch { status, term, commit_lsn, truncate_to, server_time_ms, records, raw })
    }
}

/// FOLLOW_ACK request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowAck {
    pub durable_lsn: u64,
    pub applied_lsn: u64,
}

impl FollowAck {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.durable_lsn);
        dst.put_u64_le(self.applied_lsn);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "FOLLOW_ACK");
        let ack = FollowAck { durable_lsn: r.u64()?, applied_lsn: r.u64()? };
        r.finish()?;
        Ok(ack)
    }
}

/// Bytes of a SNAPSHOT_CHUNK body before its data.
pub const SNAPSHOT_CHUNK_HEADER_BYTES: usize = 39;

/// SNAPSHOT_CHUNK reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    pub status: Status,
    pub last: bool,
    pub lsn: u64,
    pub term: u64,
    pub offset: u64,
    pub total_bytes: u64,
    pub data: Bytes,
}

impl SnapshotChunk {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        dst.put_u8(u8::from(self.last));
        dst.put_u64_le(self.lsn);
        dst.put_u64_le(self.term);
        dst.put_u64_le(self.offset);
        dst.put_u64_le(self.total_bytes);
        dst.put_u32_le(self.data.len() as u32);
        dst.extend_from_slice(&self.data);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "SNAPSHOT_CHUNK");
        let status = read_status(&mut r)?;
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(Malformed(format!("SNAPSHOT_CHUNK: flags {flags:#04x}")));
        }
        let (lsn, term, offset, total_bytes) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let len = r.u32()? as usize;
        let data = r.bytes(len)?;
        r.finish()?;
        Ok(SnapshotChunk { status, last: flags & 1 != 0, lsn, term, offset, total_bytes, data })
    }
}
