//! Test vectors shared by PROTOCOL.md and the code.
//!
//! `testdata/vectors.txt` holds one frame per line: `name request_id hex`.
//! This test checks that (1) encoding each message below yields exactly the
//! stored bytes, (2) decoding the stored bytes yields the message, and
//! (3) PROTOCOL.md quotes every vector verbatim, so the spec cannot drift
//! from the code. Regenerate after an intentional format change with
//! `STAMPEDE_BLESS=1 cargo test -p stampede-protocol --test vectors`.

use bytes::{Bytes, BytesMut};
use stampede_protocol::event::Event;
use stampede_protocol::frame::FrameCodec;
use stampede_protocol::message::*;
use stampede_protocol::Status;
use tokio_util::codec::Decoder;

enum Msg {
    Req(Request),
    Rep(Opcode, Reply),
}

fn vectors() -> Vec<(&'static str, u64, Msg)> {
    use Msg::*;
    let reserve = Reserve { sku: 42, user: 7, qty: 1, reservation_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210 };
    vec![
        ("hello", 1, Req(Request::Hello(Hello { token: Bytes::from_static(b"secret") }))),
        (
            "hello_reply",
            1,
            Rep(
                Opcode::Hello,
                Reply::Hello(HelloReply {
                    status: Status::Ok,
                    role: Role::Checkout,
                    frame_body_bytes_max: 65536,
                    batch_ops_max: 1024,
                }),
            ),
        ),
        ("ping", 2, Req(Request::Ping)),
        ("ping_reply", 2, Rep(Opcode::Ping, Reply::Outcome(Outcome::new(Status::Ok, 1_795_000_000_000)))),
        ("reserve", 3, Req(Request::Reserve(reserve))),
        (
            "reserve_reply_reserved",
            3,
            Rep(Opcode::Reserve, Reply::Outcome(Outcome::new(Status::Reserved, 1_795_000_600_000))),
        ),
        ("reserve_reply_sold_out", 3, Rep(Opcode::Reserve, Reply::Outcome(Outcome::of(Status::SoldOut)))),
        ("reserve_reply_busy", 3, Rep(Opcode::Reserve, Reply::Outcome(Outcome::new(Status::Busy, 10)))),
        (
            "reserve_batch",
            4,
            Req(Request::ReserveBatch(vec![reserve, Reserve { sku: 43, user: 8, qty: 2, reservation_id: 2 }])),
        ),
        (
            "reserve_batch_reply",
            4,
            Rep(
                Opcode::ReserveBatch,
                Reply::Batch(vec![
                    Outcome::new(Status::Reserved, 1_795_000_600_000),
                    Outcome::of(Status::LimitExceeded),
                ]),
            ),
        ),
        (
            "batch",
            40,
            Req(Request::Batch(vec![
                BatchOp::Reserve(Reserve { sku: 43, user: 8, qty: 2, reservation_id: 2 }),
                BatchOp::Confirm(Confirm {
                    reservation_id: reserve.reservation_id,
                    payment_ref: Bytes::from_static(b"pi_1"),
                }),
                BatchOp::Release(Release { reservation_id: 3 }),
            ])),
        ),
        (
            "batch_reply",
            40,
            Rep(
                Opcode::Batch,
                Reply::Batch(vec![
                    Outcome::new(Status::Reserved, 1_795_000_600_000),
                    Outcome::new(Status::Confirmed, 1_795_000_030_000),
                    Outcome::of(Status::UnknownReservation),
                ]),
            ),
        ),
        (
            "confirm",
            5,
            Req(Request::Confirm(Confirm {
                reservation_id: reserve.reservation_id,
                payment_ref: Bytes::from_static(b"pi_1"),
            })),
        ),
        ("confirm_reply", 5, Rep(Opcode::Confirm, Reply::Outcome(Outcome::new(Status::Confirmed, 1_795_000_030_000)))),
        ("release", 6, Req(Request::Release(Release { reservation_id: reserve.reservation_id }))),
        ("release_reply", 6, Rep(Opcode::Release, Reply::Outcome(Outcome::of(Status::Released)))),
        ("status", 7, Req(Request::Status { sku: 42 })),
        (
            "status_reply",
            7,
            Rep(
                Opcode::Status,
                Reply::Status(StatusReply {
                    status: Status::Ok,
                    sale: SaleStatus {
                        total: 1000,
                        available: 990,
                        reserved: 6,
                        sold: 4,
                        limit_per_user: 1,
                        ttl_ms: 600_000,
                        reservations: 6,
                        hot: true,
                        paused: false,
                        pinned: false,
                        queue: None,
                    },
                }),
            ),
        ),
        (
            "sale_create",
            8,
            Req(Request::SaleCreate(SaleCreate {
                sku: 42,
                stock: 1000,
                limit_per_user: 1,
                ttl_ms: 600_000,
                hot: true,
                queue: None,
            })),
        ),
        ("sale_create_reply", 8, Rep(Opcode::SaleCreate, Reply::Outcome(Outcome::of(Status::Ok)))),
        ("restock", 9, Req(Request::Restock(Restock { sku: 42, qty: 100 }))),
        ("restock_reply", 9, Rep(Opcode::Restock, Reply::Outcome(Outcome::new(Status::Ok, 1100)))),
        ("pause", 10, Req(Request::Pause { sku: 42 })),
        ("resume", 11, Req(Request::Resume { sku: 42 })),
        (
            "error_reply",
            12,
            Rep(Opcode::Ping, Reply::Error(ErrorReply { status: Status::Forbidden, message: "needs admin".into() })),
        ),
        ("replicate", 13, Req(Request::Replicate(Replicate { from_lsn: 1001 }))),
        (
            "log_batch",
            13,
            Rep(
                Opcode::Replicate,
                Reply::LogBatch(LogBatch {
                    status: Status::Ok,
                    durable_lsn: 1002,
                    server_time_ms: 1_795_000_000_500,
                    records: vec![
                        (
                            1001,
                            Event::Reserved {
                                sku: 42,
                                user: 7,
                                qty: 1,
                                reservation_id: reserve.reservation_id,
                                expires_at_ms: 1_795_000_600_000,
                                at_ms: 1_795_000_000_000,
                                location: 0,
                            },
                        ),
                        (
                            1002,
                            Event::Confirmed {
                                sku: 42,
                                reservation_id: reserve.reservation_id,
                                at_ms: 1_795_000_030_000,
                                payment_ref: Bytes::from_static(b"pi_1"),
                            },
                        ),
                    ],
                }),
            ),
        ),
        (
            "log_batch_heartbeat",
            13,
            Rep(
                Opcode::Replicate,
                Reply::LogBatch(LogBatch {
                    status: Status::Ok,
                    durable_lsn: 1002,
                    server_time_ms: 1_795_000_001_500,
                    records: vec![],
                }),
            ),
        ),
        ("settled", 14, Req(Request::Settled(Settled { settled_lsn: 1002 }))),
        ("settled_reply", 14, Rep(Opcode::Settled, Reply::Outcome(Outcome::new(Status::Ok, 1002)))),
        ("state_dump", 15, Req(Request::StateDump)),
        (
            "dump_chunk",
            15,
            Rep(
                Opcode::StateDump,
                Reply::DumpChunk(DumpChunk {
                    status: Status::Ok,
                    last: true,
                    lsn: 1002,
                    server_time_ms: 1_795_000_031_000,
                    entries: vec![
                        DumpEntry::Sale(SaleEntry {
                            sku: 42,
                            total: 1000,
                            available: 999,
                            reserved: 0,
                            sold: 1,
                            limit_per_user: 1,
                            ttl_ms: 600_000,
                            hot: true,
                            paused: false,
                        }),
                        DumpEntry::Reservation(ReservationEntry {
                            sku: 42,
                            reservation_id: reserve.reservation_id,
                            user: 7,
                            qty: 1,
                            state: HoldState::Confirmed,
                            expires_at_ms: 1_795_000_600_000,
                            settled_at_ms: 1_795_000_030_000,
                            payment_ref: Bytes::from_static(b"pi_1"),
                            location: 0,
                        }),
                    ],
                }),
            ),
        ),
        ("join", 16, Req(Request::Join(TicketRequest { sku: 42, user: 7 }))),
        (
            "join_reply_waiting",
            16,
            Rep(
                Opcode::Join,
                Reply::Ticket(QueueTicket {
                    status: Status::Waiting,
                    pre_start: false,
                    stock_pending: false,
                    position: 1500,
                    estimated_wait_ms: 3000,
                    admitted_until_ms: 0,
                }),
            ),
        ),
        ("poll", 17, Req(Request::Poll(TicketRequest { sku: 42, user: 7 }))),
        (
            "poll_reply_admitted",
            17,
            Rep(
                Opcode::Poll,
                Reply::Ticket(QueueTicket {
                    admitted_until_ms: 1_795_000_120_000,
                    ..QueueTicket::of(Status::Admitted)
                }),
            ),
        ),
        (
            "sale_create_queued",
            18,
            Req(Request::SaleCreate(SaleCreate {
                sku: 42,
                stock: 1000,
                limit_per_user: 1,
                ttl_ms: 600_000,
                hot: true,
                queue: Some(QueueConfig {
                    admit_rate_per_s: 500,
                    admit_cap: 0,
                    admission_ms: 120_000,
                    start_at_ms: 1_795_000_000_000,
                }),
            })),
        ),
        (
            "status_reply_queued",
            19,
            Rep(
                Opcode::Status,
                Reply::Status(StatusReply {
                    status: Status::Ok,
                    sale: SaleStatus {
                        total: 1000,
                        available: 990,
                        reserved: 6,
                        sold: 4,
                        limit_per_user: 1,
                        ttl_ms: 600_000,
                        reservations: 6,
                        hot: true,
                        paused: false,
                        pinned: false,
                        queue: Some(Box::new(QueueStats {
                            waiting: 250_000,
                            admit_rate_per_s: 500,
                            admitted_outstanding: 12,
                            admitted_total: 1_010,
                            oldest_wait_ms: 2_020_000,
                        })),
                    },
                }),
            ),
        ),
        // Refusals a client must tell apart (PROTOCOL.md §5.1, §6.2, §6.9).
        ("reserve_reply_shutting_down", 3, Rep(Opcode::Reserve, Reply::Outcome(Outcome::of(Status::ShuttingDown)))),
        ("reserve_reply_rate_limited", 3, Rep(Opcode::Reserve, Reply::Outcome(Outcome::new(Status::RateLimited, 250)))),
        (
            "status_reply_busy",
            7,
            Rep(Opcode::Status, Reply::Status(StatusReply { status: Status::Busy, sale: SaleStatus::default() })),
        ),
        // SETTLED beyond what the stream sent (§5.13): detail = what it sent.
        (
            "settled_reply_refused",
            14,
            Rep(Opcode::Settled, Reply::Outcome(Outcome::new(Status::InvalidArgument, 1002))),
        ),
        // Clusters (§5.17 to §5.19, §6.12).
        ("reserve_reply_not_leader", 3, Rep(Opcode::Reserve, Reply::Outcome(Outcome::of(Status::NotLeader)))),
        ("cluster", 21, Req(Request::Cluster)),
        (
            "cluster_reply",
            21,
            Rep(
                Opcode::Cluster,
                Reply::Cluster(ClusterReply {
                    status: Status::Ok,
                    term: 15,
                    role: NodeRole::Standby,
                    leader_addr: "10.0.0.2:7070".into(),
                    nodes: vec![NodeInfo {
                        id: "n3".into(),
                        addr: "10.0.0.3:7070".into(),
                        role: NodeRole::Standby,
                        in_sync_set: true,
                        streaming: true,
                        durable_lsn: 1002,
                        applied_lsn: 1001,
                    }],
                }),
            ),
        ),
        (
            "follow",
            22,
            Req(Request::Follow(Follow {
                term: 15,
                last_lsn: 1000,
                history: vec![(2, 1), (15, 901)],
                node_id: "n3".into(),
                addr: "10.0.0.3:7070".into(),
            })),
        ),
        (
            "follow_batch",
            22,
            Rep(
                Opcode::Follow,
                Reply::FollowBatch(Box::new(FollowBatch {
                    status: Status::Ok,
                    term: 15,
                    commit_lsn: 1000,
                    truncate_to: 1000,
                    server_time_ms: 1_795_000_000_500,
                    records: vec![(1001, Event::TermStarted { term: 15, at_ms: 1_795_000_000_400 })],
                    raw: {
                        let event = Event::TermStarted { term: 15, at_ms: 1_795_000_000_400 };
                        let mut raw = bytes::BytesMut::new();
                        stampede_protocol::record::encode_record(1001, &event, &mut raw);
                        raw.freeze()
                    },
                })),
            ),
        ),
        ("follow_ack", 0, Req(Request::FollowAck(FollowAck { durable_lsn: 1001, applied_lsn: 1001 }))),
        ("snapshot_fetch", 23, Req(Request::SnapshotFetch)),
        (
            "snapshot_chunk",
            23,
            Rep(
                Opcode::SnapshotFetch,
                Reply::SnapshotChunk(SnapshotChunk {
                    status: Status::Ok,
                    last: true,
                    lsn: 900,
                    term: 2,
                    offset: 0,
                    total_bytes: 4,
                    data: Bytes::from_static(b"STMP"),
                }),
            ),
        ),
        // A second REPLICATE on a connection that streams (§5.12).
        (
            "log_batch_refused",
            20,
            Rep(
                Opcode::Replicate,
                Reply::LogBatch(LogBatch {
                    status: Status::InvalidArgument,
                    durable_lsn: 1002,
                    server_time_ms: 1_795_000_002_000,
                    records: vec![],
                }),
            ),
        ),
        // Placement (§5.10a): a sale moved to a shard of its own, pinned.
        ("sale_move", 24, Req(Request::SaleMove(SaleMove { sku: 42, dedicated: true }))),
        ("sale_move_reply", 24, Rep(Opcode::SaleMove, Reply::Outcome(Outcome::new(Status::Ok, 180)))),
        ("placement", 25, Req(Request::Placement)),
        (
            "placement_reply",
            25,
            Rep(
                Opcode::Placement,
                Reply::Placement(PlacementReply {
                    status: Status::Ok,
                    dedicated_shards: 1,
                    dedicated_max: 2,
                    auto: true,
                    sales: vec![
                        SalePlacement { sku: 42, dedicated: true, pinned: false, decided_per_s: 61_000 },
                        SalePlacement { sku: 7, dedicated: false, pinned: true, decided_per_s: 350 },
                    ],
                }),
            ),
        ),
        (
            "log_batch_sale_moved",
            13,
            Rep(
                Opcode::Replicate,
                Reply::LogBatch(LogBatch {
                    status: Status::Ok,
                    durable_lsn: 1003,
                    server_time_ms: 1_795_000_003_000,
                    records: vec![(
                        1003,
                        Event::SaleMoved { sku: 42, dedicated: true, pinned: true, at_ms: 1_795_000_002_500 },
                    )],
                }),
            ),
        ),
        ("reserve_at", 14, Req(Request::ReserveAt(ReserveAt { op: reserve, at: Where::locations(&[3, 1]) }))),
        ("reserve_at_region", 14, Req(Request::ReserveAt(ReserveAt { op: reserve, at: Where::Region(2) }))),
        ("reserve_at_reply", 14, Rep(Opcode::ReserveAt, Reply::OutcomeAt(Outcome::reserved_at(1_795_000_600_000, 3)))),
        (
            "sale_create_locations",
            15,
            Req(Request::SaleCreateAt(
                SaleCreate { sku: 42, stock: 100, limit_per_user: 2, ttl_ms: 600_000, hot: false, queue: None },
                SaleLocations { locations: vec![(1, 60), (3, 40)], regions: vec![(2, vec![3, 1])] },
            )),
        ),
        ("restock_at", 16, Req(Request::RestockAt(RestockAt { sku: 42, location: 3, qty: 25 }))),
        ("location_add", 17, Req(Request::LocationAdd(LocationAdd { sku: 42, location: 5, stock: 10 }))),
        ("region_set", 18, Req(Request::RegionSet(RegionSet { sku: 42, region: 4, order: vec![5, 3, 1] }))),
        ("locations", 19, Req(Request::Locations { sku: 42 })),
        (
            "locations_reply",
            19,
            Rep(
                Opcode::Locations,
                Reply::Locations(LocationsReply {
                    status: Status::Ok,
                    locations: vec![
                        LocationStatus { location: 1, total: 60, available: 59, reserved: 0, sold: 1 },
                        LocationStatus { location: 3, total: 65, available: 63, reserved: 2, sold: 0 },
                    ],
                    regions: vec![(2, vec![3, 1])],
                }),
            ),
        ),
        (
            "dump_chunk_locations",
            21,
            Rep(
                Opcode::StateDump,
                Reply::DumpChunk(DumpChunk {
                    status: Status::Ok,
                    last: true,
                    lsn: 2001,
                    server_time_ms: 1_795_000_031_000,
                    entries: vec![
                        DumpEntry::Sale(SaleEntry {
                            sku: 42,
                            total: 100,
                            available: 99,
                            reserved: 1,
                            sold: 0,
                            limit_per_user: 2,
                            ttl_ms: 600_000,
                            hot: false,
                            paused: false,
                        }),
                        DumpEntry::Location(LocationEntry {
                            sku: 42,
                            location: 1,
                            total: 60,
                            available: 60,
                            reserved: 0,
                            sold: 0,
                        }),
                        DumpEntry::Location(LocationEntry {
                            sku: 42,
                            location: 3,
                            total: 40,
                            available: 39,
                            reserved: 1,
                            sold: 0,
                        }),
                        DumpEntry::Reservation(ReservationEntry {
                            sku: 42,
                            reservation_id: reserve.reservation_id,
                            user: 7,
                            qty: 1,
                            state: HoldState::Held,
                            expires_at_ms: 1_795_000_600_000,
                            settled_at_ms: 0,
                            payment_ref: Bytes::new(),
                            location: 3,
                        }),
                    ],
                }),
            ),
        ),
        (
            "log_batch_locations",
            20,
            Rep(
                Opcode::Replicate,
                Reply::LogBatch(LogBatch {
                    status: Status::Ok,
                    durable_lsn: 2004,
                    server_time_ms: 1_795_000_004_000,
                    records: vec![
                        (
                            2000,
                            Event::SaleCreatedAt {
                                sku: 42,
                                limit_per_user: 2,
                                ttl_ms: 600_000,
                                hot: false,
                                at_ms: 1_795_000_000_000,
                                locations: Box::new(SaleLocations {
                                    locations: vec![(1, 60), (3, 40)],
                                    regions: vec![(2, vec![3, 1])],
                                }),
                            },
                        ),
                        (
                            2001,
                            Event::Reserved {
                                sku: 42,
                                user: 7,
                                qty: 1,
                                reservation_id: reserve.reservation_id,
                                expires_at_ms: 1_795_000_600_000,
                                at_ms: 1_795_000_000_100,
                                location: 3,
                            },
                        ),
                        (2002, Event::Restocked { sku: 42, qty: 25, at_ms: 1_795_000_001_000, location: 3 }),
                        (2003, Event::LocationAdded { sku: 42, location: 5, stock: 10, at_ms: 1_795_000_002_000 }),
                        (
                            2004,
                            Event::RegionSet {
                                sku: 42,
                                region: 4,
                                order: vec![5, 3, 1].into_boxed_slice(),
                                at_ms: 1_795_000_003_000,
                            },
                        ),
                    ],
                }),
            ),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn encode(request_id: u64, msg: &Msg) -> BytesMut {
    let mut buf = BytesMut::new();
    match msg {
        Msg::Req(r) => r.encode_frame(request_id, &mut buf),
        Msg::Rep(op, r) => r.encode_frame(*op, request_id, &mut buf),
    }
    buf
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn vectors_match_code_and_spec() {
    let path = root().join("testdata/vectors.txt");
    if std::env::var_os("STAMPEDE_BLESS").is_some() {
        let mut out =
            String::from("# name request_id frame_hex (generated by protocol/tests/vectors.rs; see PROTOCOL.md)\n");
        for (name, id, msg) in vectors() {
            out.push_str(&format!("{name} {id} {}\n", hex(&encode(id, &msg))));
        }
        std::fs::write(&path, out).expect("write vectors");
    }
    let stored = std::fs::read_to_string(&path).expect("read testdata/vectors.txt");
    let lines: Vec<&str> = stored.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let table = vectors();
    assert_eq!(lines.len(), table.len(), "vector count differs; re-bless");
    let spec = std::fs::read_to_string(root().join("PROTOCOL.md")).expect("read PROTOCOL.md");
    for (line, (name, id, msg)) in lines.iter().zip(&table) {
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some(*name));
        assert_eq!(parts.next().map(|s| s.parse::<u64>().unwrap()), Some(*id));
        let wire = unhex(parts.next().expect("hex column"));
        assert_eq!(hex(&encode(*id, msg)), hex(&wire), "{name}: encoding changed");
        let mut src = BytesMut::from(&wire[..]);
        let frame = FrameCodec::new().decode(&mut src).expect("decodes").expect("complete");
        assert!(src.is_empty(), "{name}: trailing bytes");
        assert_eq!(frame.request_id, *id);
        match msg {
            Msg::Req(r) => assert_eq!(&Request::decode(&frame).expect("request decodes"), r, "{name}"),
            Msg::Rep(_, r) => assert_eq!(&Reply::decode(&frame).expect("reply decodes"), r, "{name}"),
        }
        assert!(spec.contains(&hex(&wire)), "PROTOCOL.md does not quote vector {name}");
    }
}

#[test]
fn spec_lists_every_status_and_opcode() {
    let spec = std::fs::read_to_string(root().join("PROTOCOL.md")).expect("read PROTOCOL.md");
    for status in Status::ALL {
        let row = format!("| {} | `{}` |", status.code(), status.name());
        assert!(spec.contains(&row), "PROTOCOL.md lacks the status row `{row}`");
    }
    for op in Opcode::ALL {
        let row = format!("| `{:#04x}` |", *op as u8);
        assert!(spec.contains(&row), "PROTOCOL.md lacks the opcode row for {op:?} (`{row}`)");
    }
    for (name, value) in [
        ("FRAME_BODY_BYTES_MAX", stampede_protocol::limits::FRAME_BODY_BYTES_MAX),
        ("BATCH_OPS_MAX", stampede_protocol::limits::BATCH_OPS_MAX),
        ("PAYMENT_REF_BYTES_MAX", stampede_protocol::limits::PAYMENT_REF_BYTES_MAX),
        ("TOKEN_BYTES_MAX", stampede_protocol::limits::TOKEN_BYTES_MAX),
        ("RECORD_PAYLOAD_BYTES_MAX", stampede_protocol::limits::RECORD_PAYLOAD_BYTES_MAX),
        ("REPLICATION_HEARTBEAT_MS", stampede_protocol::limits::REPLICATION_HEARTBEAT_MS as usize),
        ("QUEUE_ADMISSION_MS_MAX", stampede_protocol::limits::QUEUE_ADMISSION_MS_MAX as usize),
        ("QUEUE_ADMIT_RATE_PER_S_MAX", stampede_protocol::limits::QUEUE_ADMIT_RATE_PER_S_MAX as usize),
        ("LOCATIONS_PER_SALE_MAX", stampede_protocol::limits::LOCATIONS_PER_SALE_MAX),
        ("RESERVE_PREFS_MAX", stampede_protocol::limits::RESERVE_PREFS_MAX),
        ("REGIONS_PER_SALE_MAX", stampede_protocol::limits::REGIONS_PER_SALE_MAX),
    ] {
        let row = format!("| `{name}` | {value} |");
        assert!(spec.contains(&row), "PROTOCOL.md lacks the limit row `{row}`");
    }
}
