//! Where a shard hands its events, and how replies wait for them.
//!
//! A shard decides a batch of requests, then calls [`LogSink::submit`] with
//! the batch's events and the replies that depend on them. The sink owns
//! the rule "no reply before its event is as durable as promised": it
//! delivers the replies only after the events have reached the log.
//!
//! Every reply of a shard goes through its sink, including replies that
//! produced no event (a retried RESERVE answered from memory): they are
//! queued behind the shard's events they observed, so no acknowledgement
//! rests on state the log has not taken. (Refusals can: see "Known limits"
//! in src/wal/WAL.md.)

use stampede_protocol::message::Outcome;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Event, SkuGauge};
use crate::server::conn::Outbound;
use std::sync::Arc;

/// Channel to a connection's writer task. Unbounded, because the number of
/// replies in it is bounded by the connection's in-flight request limit.
pub type ConnTx = mpsc::UnboundedSender<Outbound>;

/// Result of an admin command, with the sale's gauge for the routing table.
pub type AdminResult = (Outcome, Option<Arc<SkuGauge>>);

/// A reply waiting for its events to be logged.
pub enum Delivery {
    Conn(ConnTx, Outbound),
    Admin(oneshot::Sender<AdminResult>, AdminResult),
}

impl Delivery {
    /// Hand the reply over. A closed connection is not an error: the client
    /// went away and will retry with the same reservation id.
    pub fn deliver(self) {
        match self {
            Delivery::Conn(tx, msg) => {
                let _ = tx.send(msg);
            }
            Delivery::Admin(tx, result) => {
                let _ = tx.send(result);
            }
        }
    }
}

pub trait LogSink: Send + 'static {
    /// Take the events of one shard cycle and the replies that depend on
    /// them; deliver the replies once the events are logged. Both vectors
    /// are drained (their capacity is kept for the next cycle).
    fn submit(&mut self, events: &mut Vec<Event>, replies: &mut Vec<Delivery>);
}

/// No log: events are counted and dropped, replies go out at once.
/// State lives only in memory; a restart loses everything. The durable
/// write-ahead log replaces this sink.
#[derive(Debug, Default)]
pub struct VolatileSink {
    pub events_total: u64,
}

impl LogSink for VolatileSink {
    fn submit(&mut self, events: &mut Vec<Event>, replies: &mut Vec<Delivery>) {
        self.events_total += events.len() as u64;
        events.clear();
        for reply in replies.drain(..) {
            reply.deliver();
        }
    }
}
