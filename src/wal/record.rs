//! WAL record framing and the event payload encoding live in the protocol
//! crate (`stampede_protocol::record`, `stampede_protocol::event`): the
//! replication stream ships records exactly as the log stores them, so
//! there is one definition of the format for the log, the stream and every
//! consumer. This module re-exports them under the log's name.

pub use stampede_protocol::event::{decode_event, encode_event};
pub use stampede_protocol::record::*;
