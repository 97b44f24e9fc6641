//! Typed messages: one module per operation, one enum each way that dispatches.
//!
//! A request frame's opcode selects the body layout; the reply to it carries
//! `opcode | 0x80` (`REPLY_BIT`) and the same request id. Malformed input
//! gets an ERROR (0xff) reply. See PROTOCOL.md for the full byte layouts;
//! each module's `# Format` section is the same text next to the code.

pub mod batch;
pub mod cluster;
pub mod confirm;
pub mod dump;
pub mod hello;
pub mod location;
pub mod queue;
pub mod release;
pub mod replicate;
pub mod reserve;
pub mod sale;

use bytes::{BufMut, BytesMut};

pub use batch::BatchOp;
pub use cluster::{ClusterReply, Follow, FollowAck, FollowBatch, History, NodeInfo, NodeRole, SnapshotChunk};
pub use confirm::Confirm;
pub use dump::{DumpChunk, DumpEntry, HoldState, LocationEntry, ReservationEntry, SaleEntry};
pub use hello::{Hello, HelloReply, Role};
pub use location::{
    LocationAdd, LocationStatus, LocationsReply, RegionSet, ReserveAt, RestockAt, SaleLocations, Where,
};
pub use queue::{QueueConfig, QueueStats, QueueTicket, TicketRequest};
pub use release::Release;
pub use replicate::{LogBatch, Replicate, Settled};
pub use reserve::{Outcome, Reserve};
pub use sale::{PlacementReply, Restock, SaleCreate, SaleMove, SalePlacement, SaleStatus, StatusReply};

use crate::frame::{encode_frame_with, Frame};
use crate::limits::ERROR_MESSAGE_BYTES_MAX;
use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// Set in a reply's opcode.
pub const REPLY_BIT: u8 = 0x80;

/// Request opcodes. Stable: never renumbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Hello = 0x01,
    Ping = 0x02,
    Cluster = 0x03,
    Reserve = 0x10,
    ReserveBatch = 0x11,
    Confirm = 0x12,
    Release = 0x13,
    Status = 0x14,
    Join = 0x15,
    Poll = 0x16,
    Batch = 0x17,
    ReserveAt = 0x18,
    Locations = 0x19,
    SaleCreate = 0x20,
    Restock = 0x21,
    Pause = 0x22,
    Resume = 0x23,
    SaleMove = 0x24,
    Placement = 0x25,
    RestockAt = 0x26,
    LocationAdd = 0x27,
    RegionSet = 0x28,
    Replicate = 0x30,
    Settled = 0x31,
    StateDump = 0x32,
    Follow = 0x33,
    FollowAck = 0x34,
    SnapshotFetch = 0x35,
}

/// Opcode of the ERROR reply, sent for frames that could not be handled.
pub const ERROR_OPCODE: u8 = 0xff;

impl Opcode {
    pub const ALL: &'static [Opcode] = &[
        Opcode::Hello,
        Opcode::Ping,
        Opcode::Cluster,
        Opcode::Reserve,
        Opcode::ReserveBatch,
        Opcode::Confirm,
        Opcode::Release,
        Opcode::Status,
        Opcode::Join,
        Opcode::Poll,
        Opcode::Batch,
        Opcode::ReserveAt,
        Opcode::Locations,
        Opcode::SaleCreate,
        Opcode::Restock,
        Opcode::Pause,
        Opcode::Resume,
        Opcode::SaleMove,
        Opcode::Placement,
        Opcode::RestockAt,
        Opcode::LocationAdd,
        Opcode::RegionSet,
        Opcode::Replicate,
        Opcode::Settled,
        Opcode::StateDump,
        Opcode::Follow,
        Opcode::FollowAck,
        Opcode::SnapshotFetch,
    ];

    pub fn from_u8(v: u8) -> Option<Opcode> {
        Opcode::ALL.iter().copied().find(|op| *op as u8 == v)
    }

    pub const fn reply(self) -> u8 {
        self as u8 | REPLY_BIT
    }

    /// Whether a connection with `role` may send this opcode. Checkout
    /// services get the checkout operations, the reconciler gets the log
    /// (replication), admin gets everything; HELLO needs no role.
    pub const fn allowed_for(self, role: Role) -> bool {
        match self {
            Opcode::Hello => true,
            Opcode::Ping | Opcode::Cluster => !matches!(role, Role::None),
            Opcode::Reserve
            | Opcode::ReserveBatch
            | Opcode::Confirm
            | Opcode::Release
            | Opcode::Status
            | Opcode::Join
            | Opcode::Poll
            | Opcode::Batch
            | Opcode::ReserveAt
            | Opcode::Locations => matches!(role, Role::Checkout | Role::Admin),
            Opcode::SaleCreate
            | Opcode::Restock
            | Opcode::Pause
            | Opcode::Resume
            | Opcode::SaleMove
            | Opcode::Placement
            | Opcode::RestockAt
            | Opcode::LocationAdd
            | Opcode::RegionSet => matches!(role, Role::Admin),
            Opcode::Replicate
            | Opcode::Settled
            | Opcode::StateDump
            | Opcode::Follow
            | Opcode::FollowAck
            | Opcode::SnapshotFetch => matches!(role, Role::Replication | Role::Admin),
        }
    }

    /// The roles that may send this opcode, for error messages and the spec.
    pub fn roles(self) -> &'static str {
        match self {
            Opcode::Hello => "any",
            Opcode::Ping | Opcode::Cluster => "checkout, admin, replication",
            Opcode::Reserve
            | Opcode::ReserveBatch
            | Opcode::Confirm
            | Opcode::Release
            | Opcode::Status
            | Opcode::Join
            | Opcode::Poll
            | Opcode::Batch
            | Opcode::ReserveAt
            | Opcode::Locations => "checkout, admin",
            Opcode::SaleCreate
            | Opcode::Restock
            | Opcode::Pause
            | Opcode::Resume
            | Opcode::SaleMove
            | Opcode::Placement
            | Opcode::RestockAt
            | Opcode::LocationAdd
            | Opcode::RegionSet => "admin",
            Opcode::Replicate
            | Opcode::Settled
            | Opcode::StateDump
            | Opcode::Follow
            | Opcode::FollowAck
            | Opcode::SnapshotFetch => "replication, admin",
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    Ping,
    Reserve(Reserve),
    ReserveBatch(Vec<Reserve>),
    /// RESERVE, CONFIRM and RELEASE in any mix (see `batch`).
    Batch(Vec<BatchOp>),
    Confirm(Confirm),
    Release(Release),
    Status {
        sku: u64,
    },
    Join(TicketRequest),
    Poll(TicketRequest),
    SaleCreate(SaleCreate),
    /// SALE_CREATE with its locations section (flag bit 2).
    SaleCreateAt(SaleCreate, SaleLocations),
    Restock(Restock),
    /// RESERVE with a choice of location.
    ReserveAt(ReserveAt),
    /// A sale's locations and regions.
    Locations {
        sku: u64,
    },
    RestockAt(RestockAt),
    LocationAdd(LocationAdd),
    RegionSet(RegionSet),
    Pause {
        sku: u64,
    },
    Resume {
        sku: u64,
    },
    /// Move a sale to a shard of its own (`dedicated`) or back to the
    /// pool; the placement is pinned (the demand monitor leaves it).
    SaleMove(SaleMove),
    /// Where sales run and the demand the monitor sees.
    Placement,
    Replicate(Replicate),
    Settled(Settled),
    StateDump,
    Cluster,
    Follow(Follow),
    FollowAck(FollowAck),
    SnapshotFetch,
}

impl Request {
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::Hello,
            Request::Ping => Opcode::Ping,
            Request::Reserve(_) => Opcode::Reserve,
            Request::ReserveBatch(_) => Opcode::ReserveBatch,
            Request::Batch(_) => Opcode::Batch,
            Request::Confirm(_) => Opcode::Confirm,
            Request::Release(_) => Opcode::Release,
            Request::Status { .. } => Opcode::Status,
            Request::Join(_) => Opcode::Join,
            Request::Poll(_) => Opcode::Poll,
            Request::SaleCreate(_) | Request::SaleCreateAt(..) => Opcode::SaleCreate,
            Request::ReserveAt(_) => Opcode::ReserveAt,
            Request::Locations { .. } => Opcode::Locations,
            Request::RestockAt(_) => Opcode::RestockAt,
            Request::LocationAdd(_) => Opcode::LocationAdd,
            Request::RegionSet(_) => Opcode::RegionSet,
            Request::Restock(_) => Opcode::Restock,
            Request::Pause { .. } => Opcode::Pause,
            Request::Resume { .. } => Opcode::Resume,
            Request::SaleMove(_) => Opcode::SaleMove,
            Request::Placement => Opcode::Placement,
            Request::Replicate(_) => Opcode::Replicate,
            Request::Settled(_) => Opcode::Settled,
            Request::StateDump => Opcode::StateDump,
            Request::Cluster => Opcode::Cluster,
            Request::Follow(_) => Opcode::Follow,
            Request::FollowAck(_) => Opcode::FollowAck,
            Request::SnapshotFetch => Opcode::SnapshotFetch,
        }
    }

    /// Append this request as a complete frame.
    pub fn encode_frame(&self, request_id: u64, dst: &mut BytesMut) {
        encode_frame_with(dst, self.opcode() as u8, request_id, |b| self.encode_body(b));
    }

    pub fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Request::Hello(m) => m.encode(dst),
            Request::Ping | Request::StateDump | Request::Cluster | Request::SnapshotFetch | Request::Placement => {}
            Request::Follow(m) => m.encode(dst),
            Request::FollowAck(m) => m.encode(dst),
            Request::Reserve(m) => m.encode(dst),
            Request::ReserveBatch(ops) => reserve::encode_batch(ops, dst),
            Request::Batch(ops) => batch::encode(ops, dst),
            Request::Confirm(m) => m.encode(dst),
            Request::Release(m) => m.encode(dst),
            Request::Status { sku } | Request::Pause { sku } | Request::Resume { sku } | Request::Locations { sku } => {
                sale::encode_sku(*sku, dst)
            }
            Request::SaleCreate(m) => m.encode(dst),
            Request::SaleCreateAt(m, locations) => m.encode_with(Some(locations), dst),
            Request::ReserveAt(m) => m.encode(dst),
            Request::RestockAt(m) => m.encode(dst),
            Request::LocationAdd(m) => m.encode(dst),
            Request::RegionSet(m) => m.encode(dst),
            Request::Restock(m) => m.encode(dst),
            Request::SaleMove(m) => m.encode(dst),
            Request::Join(m) | Request::Poll(m) => m.encode(dst),
            Request::Replicate(m) => m.encode(dst),
            Request::Settled(m) => m.encode(dst),
        }
    }

    /// Parse a request frame. The error carries the status to reply with.
    pub fn decode(frame: &Frame) -> Result<Request, (Status, String)> {
        let opcode = Opcode::from_u8(frame.opcode)
            .ok_or_else(|| (Status::UnknownOpcode, format!("unknown request opcode {:#04x}", frame.opcode)))?;
        let body = &frame.body[..];
        let malformed = |m: Malformed| (Status::MalformedBody, m.0);
        Ok(match opcode {
            Opcode::Hello => Request::Hello(Hello::decode(body).map_err(malformed)?),
            Opcode::Ping => {
                Reader::new(body, "PING").finish().map_err(malformed)?;
                Request::Ping
            }
            Opcode::Reserve => Request::Reserve(Reserve::decode(body).map_err(malformed)?),
            Opcode::ReserveBatch => Request::ReserveBatch(reserve::decode_batch(body).map_err(batch_error)?),
            Opcode::Batch => Request::Batch(batch::decode(body).map_err(batch_error)?),
            Opcode::Confirm => Request::Confirm(Confirm::decode(body).map_err(malformed)?),
            Opcode::Release => Request::Release(Release::decode(body).map_err(malformed)?),
            Opcode::Status => Request::Status { sku: sale::decode_sku(body, "STATUS").map_err(malformed)? },
            Opcode::Join => Request::Join(TicketRequest::decode(body, "JOIN").map_err(malformed)?),
            Opcode::Poll => Request::Poll(TicketRequest::decode(body, "POLL").map_err(malformed)?),
            Opcode::SaleCreate => match SaleCreate::decode_with_locations(body).map_err(malformed)? {
                (create, None) => Request::SaleCreate(create),
                (create, Some(locations)) => Request::SaleCreateAt(create, locations),
            },
            Opcode::ReserveAt => Request::ReserveAt(ReserveAt::decode(body).map_err(malformed)?),
            Opcode::Locations => Request::Locations { sku: sale::decode_sku(body, "LOCATIONS").map_err(malformed)? },
            Opcode::RestockAt => Request::RestockAt(RestockAt::decode(body).map_err(malformed)?),
            Opcode::LocationAdd => Request::LocationAdd(LocationAdd::decode(body).map_err(malformed)?),
            Opcode::RegionSet => Request::RegionSet(RegionSet::decode(body).map_err(malformed)?),
            Opcode::Restock => Request::Restock(Restock::decode(body).map_err(malformed)?),
            Opcode::Pause => Request::Pause { sku: sale::decode_sku(body, "PAUSE").map_err(malformed)? },
            Opcode::Resume => Request::Resume { sku: sale::decode_sku(body, "RESUME").map_err(malformed)? },
            Opcode::SaleMove => Request::SaleMove(SaleMove::decode(body).map_err(malformed)?),
            Opcode::Placement => {
                Reader::new(body, "PLACEMENT").finish().map_err(malformed)?;
                Request::Placement
            }
            Opcode::Replicate => Request::Replicate(Replicate::decode(body).map_err(malformed)?),
            Opcode::Settled => Request::Settled(Settled::decode(body).map_err(malformed)?),
            Opcode::StateDump => {
                Reader::new(body, "STATE_DUMP").finish().map_err(malformed)?;
                Request::StateDump
            }
            Opcode::Cluster => {
                Reader::new(body, "CLUSTER").finish().map_err(malformed)?;
                Request::Cluster
            }
            Opcode::Follow => Request::Follow(Follow::decode(body).map_err(malformed)?),
            Opcode::FollowAck => Request::FollowAck(FollowAck::decode(body).map_err(malformed)?),
            Opcode::SnapshotFetch => {
                Reader::new(body, "SNAPSHOT_FETCH").finish().map_err(malformed)?;
                Request::SnapshotFetch
            }
        })
    }
}

/// The ERROR a batch body that could not be decoded is answered with.
fn batch_error(e: reserve::BatchError) -> (Status, String) {
    match e {
        reserve::BatchError::TooLarge(n) => {
            (Status::BatchTooLarge, format!("batch of {n} operations; allowed 1..={}", crate::limits::BATCH_OPS_MAX))
        }
        reserve::BatchError::Malformed(m) => (Status::MalformedBody, m.0),
    }
}

/// ERROR (0xff) reply body: `status u16, message_len u16, message utf-8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: Status,
    pub message: String,
}

impl ErrorReply {
    pub fn encode(&self, dst: &mut BytesMut) {
        let mut end = self.message.len().min(ERROR_MESSAGE_BYTES_MAX);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        dst.put_u16_le(self.status.code());
        dst.put_u16_le(end as u16);
        dst.extend_from_slice(&self.message.as_bytes()[..end]);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "ERROR");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let len = r.u16()? as usize;
        let message =
            String::from_utf8(r.bytes(len)?.to_vec()).map_err(|_| Malformed("ERROR: message is not UTF-8".into()))?;
        r.finish()?;
        Ok(ErrorReply { status, message })
    }
}

/// A parsed reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Hello(HelloReply),
    /// PING, RESERVE, CONFIRM, RELEASE, SALE_CREATE, RESTOCK, PAUSE, RESUME,
    /// SALE_MOVE, SETTLED.
    Outcome(Outcome),
    /// RESERVE_AT: the outcome with its location.
    OutcomeAt(Outcome),
    Batch(Vec<Outcome>),
    Locations(LocationsReply),
    Status(StatusReply),
    /// JOIN and POLL.
    Ticket(QueueTicket),
    /// One frame of the REPLICATE stream.
    LogBatch(LogBatch),
    /// One frame of a STATE_DUMP.
    DumpChunk(DumpChunk),
    Cluster(ClusterReply),
    Placement(PlacementReply),
    /// One frame of a FOLLOW stream.
    /// Boxed: a frame's records make it the largest reply by far.
    FollowBatch(Box<FollowBatch>),
    /// One frame of a SNAPSHOT_FETCH.
    SnapshotChunk(SnapshotChunk),
    Error(ErrorReply),
}

impl Reply {
    /// The status of a single-result reply (`None` for a batch).
    pub fn status(&self) -> Option<Status> {
        match self {
            Reply::Hello(r) => Some(r.status),
            Reply::Outcome(o) | Reply::OutcomeAt(o) => Some(o.status),
            Reply::Locations(l) => Some(l.status),
            Reply::Batch(_) => None,
            Reply::Status(s) => Some(s.status),
            Reply::Ticket(t) => Some(t.status),
            Reply::LogBatch(b) => Some(b.status),
            Reply::DumpChunk(c) => Some(c.status),
            Reply::Cluster(c) => Some(c.status),
            Reply::Placement(p) => Some(p.status),
            Reply::FollowBatch(b) => Some(b.status),
            Reply::SnapshotChunk(c) => Some(c.status),
            Reply::Error(e) => Some(e.status),
        }
    }

    /// Append this reply as a complete frame. `opcode` is the request's.
    pub fn encode_frame(&self, request_opcode: Opcode, request_id: u64, dst: &mut BytesMut) {
        let opcode = match self {
            Reply::Error(_) => ERROR_OPCODE,
            _ => request_opcode.reply(),
        };
        encode_frame_with(dst, opcode, request_id, |b| self.encode_body(b));
    }

    pub fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Reply::Hello(m) => m.encode(dst),
            Reply::Outcome(m) => m.encode(dst),
            Reply::OutcomeAt(m) => location::encode_outcome_at(m, dst),
            Reply::Locations(m) => m.encode(dst),
            Reply::Batch(results) => reserve::encode_batch_reply(results, dst),
            Reply::Status(m) => m.encode(dst),
            Reply::Ticket(m) => m.encode(dst),
            Reply::LogBatch(m) => m.encode(dst),
            Reply::DumpChunk(m) => m.encode(dst),
            Reply::Cluster(m) => m.encode(dst),
            Reply::Placement(m) => m.encode(dst),
            Reply::FollowBatch(m) => m.encode(dst),
            Reply::SnapshotChunk(m) => m.encode(dst),
            Reply::Error(m) => m.encode(dst),
        }
    }

    /// Parse a reply frame.
    pub fn decode(frame: &Frame) -> Result<Reply, Malformed> {
        let body = &frame.body[..];
        if frame.opcode == ERROR_OPCODE {
            return Ok(Reply::Error(ErrorReply::decode(body)?));
        }
        let opcode = (frame.opcode & REPLY_BIT != 0)
            .then(|| Opcode::from_u8(frame.opcode & !REPLY_BIT))
            .flatten()
            .ok_or_else(|| Malformed(format!("unknown reply opcode {:#04x}", frame.opcode)))?;
        Ok(match opcode {
            Opcode::Hello => Reply::Hello(HelloReply::decode(body)?),
            Opcode::ReserveBatch | Opcode::Batch => Reply::Batch(reserve::decode_batch_reply(body)?),
            Opcode::Status => Reply::Status(StatusReply::decode(body)?),
            Opcode::ReserveAt => Reply::OutcomeAt(location::decode_outcome_at(body)?),
            Opcode::Locations => Reply::Locations(LocationsReply::decode(body)?),
            Opcode::Join | Opcode::Poll => Reply::Ticket(QueueTicket::decode(body)?),
            Opcode::Replicate => Reply::LogBatch(LogBatch::decode(body)?),
            Opcode::StateDump => Reply::DumpChunk(DumpChunk::decode(body)?),
            Opcode::Cluster => Reply::Cluster(ClusterReply::decode(body)?),
            Opcode::Placement => Reply::Placement(PlacementReply::decode(body)?),
            Opcode::Follow => Reply::FollowBatch(Box::new(FollowBatch::decode(body)?)),
            Opcode::SnapshotFetch => Reply::SnapshotChunk(SnapshotChunk::decode(body)?),
            _ => Reply::Outcome(Outcome::decode(body)?),
        })
    }
}
