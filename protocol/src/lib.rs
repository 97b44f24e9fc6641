//! The stampede wire protocol: frame codec, typed messages and the async
//! client library used by checkout services, `stampede-ctl` and the loadgen.
//!
//! # Layout
//!
//! - [`limits`]: every number a peer must respect (frame size, batch size, ...).
//! - [`status`]: the numbered, stable status codes carried by every reply.
//! - [`frame`]: the 32-byte checksummed header and the streaming
//!   [`FrameCodec`](frame::FrameCodec) (a `tokio_util` decoder that checks
//!   lengths before allocating and never panics on hostile input).
//! - [`wire`]: bounds-checked reading of message bodies.
//! - [`message`]: one module per operation (`# Format` docs next to the
//!   encode/decode code), dispatched by the [`Request`](message::Request) and
//!   [`Reply`](message::Reply) enums.
//! - [`event`], [`record`]: the events of the engine and the checksummed
//!   log record that carries one (the WAL's format and the replication
//!   stream's).
//! - [`ledger`]: what each event does to the rows a log consumer keeps
//!   (sales, reservations): the reconciler's settlement and report, and
//!   the simulator's check of the reconciler's view.
//! - [`client`]: pipelined, reconnecting, retry-safe async client.
//! - [`tls`]: optional TLS (rustls) for client connections.
//! - [`replication`]: the log-streaming and state-dump client (reconciler).
//! - `metrics_http` (feature `metrics-http`): the Prometheus `/metrics`,
//!   `/healthz` and `/readyz` endpoint the server and the reconciler serve.
//!
//! PROTOCOL.md next to this crate is the normative spec; the hex test
//! vectors in `testdata/` are checked by `tests/vectors.rs` against this code.
//!
//! A request flows: caller -> [`client::Client`] picks a connection ->
//! `Request::encode_frame` -> socket -> server's `FrameCodec` ->
//! `Request::decode` -> engine -> `Reply::encode_frame` -> socket -> the
//! client's reader task matches the request id -> the caller's future resolves.

pub mod client;
pub mod event;
pub mod frame;
pub mod ledger;
pub mod limits;
pub mod message;
#[cfg(feature = "metrics-http")]
pub mod metrics_http;
pub mod record;
pub mod replication;
pub mod status;
pub mod tls;
pub mod wire;

pub use frame::{Frame, FrameCodec, FrameError};
pub use message::{Opcode, Reply, Request};
pub use status::Status;
