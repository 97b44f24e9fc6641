//! Events: every state change of the engine, as data. The type lives in
//! the protocol crate because the replication stream carries it; see
//! `stampede_protocol::event` for its documentation and byte format.

pub use stampede_protocol::event::Event;
