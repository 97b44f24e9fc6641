//! Client side of the log: REPLICATE (stream the write-ahead log), SETTLED
//! (report the consumer's progress) and STATE_DUMP (the engine's state at
//! one LSN). Used by the reconciler; any consumer of the log (a standby, an
//! audit tool) is a client of the same three operations.
//!
//! Unlike [`crate::client::Client`], one connection here carries one long
//! stream, so it is a plain framed socket: no pipelining pool, no retries.
//! A consumer that loses the connection reconnects and resumes from its own
//! durable watermark, which is what makes the stream exactly-once
//! downstream: the server may send a record twice across reconnects, and
//! the consumer's watermark (applied in the same transaction as the
//! records) tells it which ones it already has.
//!
//! # Example
//!
//! ```no_run
//! use stampede_protocol::replication::ReplicationClient;
//!
//! # async fn follow() -> Result<(), stampede_protocol::client::ClientError> {
//! let client = ReplicationClient::connect("127.0.0.1:7070", "replication-token").await?;
//! let (mut stream, settler) = client.replicate(1).await?;
//! loop {
//!     let batch = stream.next_batch().await?;
//!     if let Some((last, _)) = batch.records.last() {
//!         // ... apply batch.records durably, then:
//!         settler.settled(*last).await?;
//!     }
//! }
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use crate::client::ClientError;
use crate::frame::{Frame, FrameCodec};
use crate::message::{
    ClusterReply, DumpEntry, Follow, FollowAck, FollowBatch, Hello, LogBatch, NodeRole, Opcode, Replicate, Reply,
    Request, Role, Settled,
};
use crate::status::Status;

/// How long to wait for the TCP connection and the HELLO reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const HELLO_ID: u64 = 1;
const STREAM_ID: u64 = 2;
const DUMP_ID: u64 = 3;
const SNAPSHOT_ID: u64 = 4;
const CLUSTER_ID: u64 = 5;

/// An authenticated connection with the replication (or admin) role.
pub struct ReplicationClient {
    frames: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: OwnedWriteHalf,
    pub role: Role,
}

/// The engine's state at `lsn`, as STATE_DUMP returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDump {
    pub lsn: u64,
    pub server_time_ms: u64,
    pub entries: Vec<DumpEntry>,
}

async fn send(writer: &mut OwnedWriteHalf, request_id: u64, request: &Request) -> Result<(), ClientError> {
    let mut buf = BytesMut::new();
    request.encode_frame(request_id, &mut buf);
    writer.write_all(&buf).await.map_err(|_| ClientError::Disconnected)
}

async fn next_frame(frames: &mut FramedRead<OwnedReadHalf, FrameCodec>) -> Result<Frame, ClientError> {
    match frames.next().await {
        None => Err(ClientError::Disconnected),
        Some(Ok(frame)) => Ok(frame),
        Some(Err(e)) => Err(ClientError::Protocol(e.to_string())),
    }
}

fn decode(frame: &Frame) -> Result<Reply, ClientError> {
    match Reply::decode(frame) {
        Ok(Reply::Error(e)) => Err(ClientError::Server { status: e.status, message: e.message }),
        Ok(reply) => Ok(reply),
        Err(e) => Err(ClientError::Protocol(e.0)),
    }
}

impl ReplicationClient {
    /// Connect and authenticate. The token must grant the replication or
    /// the admin role.
    pub async fn connect(addr: &str, token: &str) -> Result<ReplicationClient, ClientError> {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
        let stream = match connect.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(ClientError::Connect { addr: addr.to_string(), source }),
            Err(_) => {
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(ClientError::Connect { addr: addr.to_string(), source });
            }
        };
        stream.set_nodelay(true).ok();
        let (read_half, mut writer) = stream.into_split();
        let mut frames = FramedRead::new(read_half, FrameCodec::new());
        let hello = Request::Hello(Hello { token: bytes::Bytes::copy_from_slice(token.as_bytes()) });
        send(&mut writer, HELLO_ID, &hello).await?;
        let reply = tokio::time::timeout(CONNECT_TIMEOUT, next_frame(&mut frames))
            .await
            .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT))??;
        let role = match decode(&reply)? {
            Reply::Hello(h) if h.status == Status::Ok => h.role,
            Reply::Hello(h) => return Err(ClientError::Auth(h.status)),
            other => return Err(ClientError::Protocol(format!("expected a HELLO reply, got {other:?}"))),
        };
        if !Opcode::Replicate.allowed_for(role) {
            return Err(ClientError::Server {
                status: Status::Forbidden,
                message: format!("the token grants the {} role; the log needs replication or admin", role.name()),
            });
        }
        Ok(ReplicationClient { frames, writer, role })
    }

    /// The engine's complete state at one LSN. The whole dump is collected
    /// in memory (about 60 bytes per reservation).
    pub async fn state_dump(&mut self) -> Result<StateDump, ClientError> {
        send(&mut self.writer, DUMP_ID, &Request::StateDump).await?;
        let mut dump: Option<StateDump> = None;
        loop {
            let frame = next_frame(&mut self.frames).await?;
            let chunk = match decode(&frame)? {
                Reply::DumpChunk(chunk) if frame.request_id == DUMP_ID => chunk,
                other => return Err(ClientError::Protocol(format!("expected a DUMP_CHUNK, got {other:?}"))),
            };
            if chunk.status != Status::Ok {
                return Err(ClientError::Server { status: chunk.status, message: "STATE_DUMP refused".into() });
            }
            let dump = dump.get_or_insert_with(|| StateDump {
                lsn: chunk.lsn,
                server_time_ms: chunk.server_time_ms,
                entries: Vec::new(),
            });
            if chunk.lsn != dump.lsn {
                return Err(ClientError::Protocol(format!("dump chunks at LSN {} and {}", dump.lsn, chunk.lsn)));
            }
            dump.entries.extend(chunk.entries);
            if chunk.last {
                break;
            }
        }
        Ok(dump.expect("at least one chunk"))
    }

    /// Connect to the node that decides: `addrs` is one address, or a
    /// cluster's nodes comma-separated, of which the leader is found
    /// (CLUSTER). The log of record is the leader's: a standby answers
    /// `not_leader` to REPLICATE and STATE_DUMP.
    pub async fn connect_leader(addrs: &str, token: &str) -> Result<ReplicationClient, ClientError> {
        let nodes: Vec<&str> = addrs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
        if nodes.len() <= 1 {
            return ReplicationClient::connect(addrs.trim(), token).await;
        }
        let mut last = ClientError::Disconnected;
        for node in &nodes {
            let mut client = match ReplicationClient::connect(node, token).await {
                Ok(client) => client,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match client.cluster().await {
                Ok(reply) if matches!(reply.role, NodeRole::Leader | NodeRole::Single) => return Ok(client),
                Ok(reply) if !reply.leader_addr.is_empty() => {
                    let mut leader = match ReplicationClient::connect(&reply.leader_addr, token).await {
                        Ok(leader) => leader,
                        Err(e) => {
                            last = e;
                            continue;
                        }
                    };
                    if matches!(leader.cluster().await, Ok(r) if r.role == NodeRole::Leader) {
                        return Ok(leader);
                    }
                }
                Ok(_) => {
                    last =
                        ClientError::Server { status: Status::NotLeader, message: format!("{node}: no leader known") }
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Who leads this node's cluster, as it knows it (CLUSTER).
    pub async fn cluster(&mut self) -> Result<ClusterReply, ClientError> {
        send(&mut self.writer, CLUSTER_ID, &Request::Cluster).await?;
        let frame = tokio::time::timeout(CONNECT_TIMEOUT, next_frame(&mut self.frames))
            .await
            .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT))??;
        match decode(&frame)? {
            Reply::Cluster(reply) if frame.request_id == CLUSTER_ID => Ok(reply),
            other => Err(ClientError::Protocol(format!("expected a CLUSTER reply, got {other:?}"))),
        }
    }

    /// The leader's newest snapshot (SNAPSHOT_FETCH): `(lsn, term of the
    /// record at lsn, the file's bytes)`.
    pub async fn snapshot(&mut self) -> Result<(u64, u64, Vec<u8>), ClientError> {
        send(&mut self.writer, SNAPSHOT_ID, &Request::SnapshotFetch).await?;
        let mut file = Vec::new();
        loop {
            let frame = next_frame(&mut self.frames).await?;
            let chunk = match decode(&frame)? {
                Reply::SnapshotChunk(chunk) if frame.request_id == SNAPSHOT_ID => chunk,
                other => return Err(ClientError::Protocol(format!("expected a SNAPSHOT_CHUNK, got {other:?}"))),
            };
            if chunk.status != Status::Ok {
                return Err(ClientError::Server { status: chunk.status, message: "SNAPSHOT_FETCH refused".into() });
            }
            if chunk.offset != file.len() as u64 || chunk.total_bytes < chunk.offset + chunk.data.len() as u64 {
                return Err(ClientError::Protocol(format!(
                    "snapshot chunk at offset {} after {} bytes",
                    chunk.offset,
                    file.len()
                )));
            }
            file.extend_from_slice(&chunk.data);
            if chunk.last {
                if file.len() as u64 != chunk.total_bytes {
                    return Err(ClientError::Protocol("snapshot ended short".into()));
                }
                return Ok((chunk.lsn, chunk.term, file));
            }
        }
    }

    /// Follow the log as a standby (FOLLOW). The stream's frames carry the
    /// leader's term and commit LSN; the first says where this node's log
    /// must end (`truncate_to`). The [`Acker`] sends FOLLOW_ACKs on the same
    /// connection.
    pub async fn follow(mut self, follow: Follow) -> Result<(FollowStream, Acker), ClientError> {
        send(&mut self.writer, STREAM_ID, &Request::Follow(follow)).await?;
        let acker = Acker { writer: Arc::new(tokio::sync::Mutex::new(self.writer)) };
        Ok((FollowStream { frames: self.frames, next_lsn: None }, acker))
    }

    /// Start streaming the log from `from_lsn`. Returns the receiving half
    /// and a [`Settler`] that reports progress on the same connection.
    pub async fn replicate(mut self, from_lsn: u64) -> Result<(LogStream, Settler), ClientError> {
        send(&mut self.writer, STREAM_ID, &Request::Replicate(Replicate { from_lsn })).await?;
        let settler = Settler { writer: Arc::new(tokio::sync::Mutex::new(self.writer)) };
        Ok((LogStream { frames: self.frames, next_lsn: from_lsn }, settler))
    }
}

/// The receiving half of a REPLICATE stream.
pub struct LogStream {
    frames: FramedRead<OwnedReadHalf, FrameCodec>,
    next_lsn: u64,
}

impl LogStream {
    /// The next LOG_BATCH (records may be empty: a heartbeat). Records are
    /// checksum-verified and checked to continue exactly where the previous
    /// batch ended; a refusal (`lsn_unavailable`, `no_log`) is an error.
    pub async fn next_batch(&mut self) -> Result<LogBatch, ClientError> {
        loop {
            let frame = next_frame(&mut self.frames).await?;
            match decode(&frame)? {
                Reply::LogBatch(batch) if frame.request_id == STREAM_ID => {
                    if batch.status != Status::Ok {
                        return Err(ClientError::Server {
                            status: batch.status,
                            message: format!("REPLICATE from LSN {} refused", self.next_lsn),
                        });
                    }
                    if let Some((first, _)) = batch.records.first() {
                        if *first != self.next_lsn {
                            return Err(ClientError::Protocol(format!(
                                "log stream jumped: expected LSN {}, got {first}",
                                self.next_lsn
                            )));
                        }
                    }
                    if let Some((last, _)) = batch.records.last() {
                        self.next_lsn = last + 1;
                    }
                    return Ok(batch);
                }
                // The reply to a SETTLED: ok, or a refusal worth surfacing.
                Reply::Outcome(outcome) if outcome.status == Status::Ok => continue,
                Reply::Outcome(outcome) => {
                    return Err(ClientError::Server {
                        status: outcome.status,
                        message: format!("SETTLED {} refused", outcome.detail),
                    })
                }
                other => return Err(ClientError::Protocol(format!("unexpected frame in the log stream: {other:?}"))),
            }
        }
    }

    /// The LSN the next record will carry.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }
}

/// Reports the consumer's settled LSN on the stream's connection; cheap to
/// clone. Its replies are consumed by [`LogStream::next_batch`].
#[derive(Clone)]
pub struct Settler {
    /// A tokio mutex: held across the socket write (an await).
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl Settler {
    pub async fn settled(&self, settled_lsn: u64) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().await;
        send(&mut writer, settled_lsn, &Request::Settled(Settled { settled_lsn })).await
    }
}

/// The receiving half of a FOLLOW stream.
pub struct FollowStream {
    frames: FramedRead<OwnedReadHalf, FrameCodec>,
    /// The LSN the next record must carry, once the first frame set it.
    next_lsn: Option<u64>,
}

impl FollowStream {
    /// The next FOLLOW_BATCH (records may be empty: a heartbeat), records
    /// checked to continue exactly. A refusal (`not_leader`, `stale_term`,
    /// `lsn_unavailable`, ...) is [`ClientError::Server`].
    pub async fn next_batch(&mut self) -> Result<FollowBatch, ClientError> {
        let frame = next_frame(&mut self.frames).await?;
        let batch = match decode(&frame)? {
            Reply::FollowBatch(batch) if frame.request_id == STREAM_ID => *batch,
            other => return Err(ClientError::Protocol(format!("unexpected frame in the follow stream: {other:?}"))),
        };
        if batch.status != Status::Ok {
            return Err(ClientError::Server { status: batch.status, message: "FOLLOW refused".into() });
        }
        let next = *self.next_lsn.get_or_insert(batch.truncate_to + 1);
        if let Some((first, _)) = batch.records.first() {
            if *first != next {
                return Err(ClientError::Protocol(format!("follow stream jumped: expected LSN {next}, got {first}")));
            }
        }
        if let Some((last, _)) = batch.records.last() {
            self.next_lsn = Some(last + 1);
        }
        Ok(batch)
    }
}

/// Sends FOLLOW_ACKs on a FOLLOW stream's connection; cheap to clone.
#[derive(Clone)]
pub struct Acker {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl Acker {
    pub async fn ack(&self, ack: FollowAck) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().await;
        send(&mut writer, 0, &Request::FollowAck(ack)).await
    }
}
