//! Events: every state change of the engine, as data.
//!
//! A command (RESERVE, CONFIRM, ...) is first *decided* against the current
//! state; if it changes anything, the decision is one `Event`, which is then
//! *applied*. Applying the same events in the same order always yields the
//! same state, so the event stream is what the write-ahead log stores and
//! what recovery, replication and the reconciler replay. Events carry every
//! input the apply step needs (times included) and never read the clock.

use bytes::Bytes;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    SaleCreated { sku: u64, stock: u64, limit_per_user: u32, ttl_ms: u64, hot: bool, at_ms: u64 },
    Restocked { sku: u64, qty: u64, at_ms: u64 },
    Paused { sku: u64, at_ms: u64 },
    Resumed { sku: u64, at_ms: u64 },
    Reserved { sku: u64, user: u64, qty: u32, reservation_id: u128, expires_at_ms: u64, at_ms: u64 },
    Confirmed { sku: u64, reservation_id: u128, at_ms: u64, payment_ref: Bytes },
    Released { sku: u64, reservation_id: u128, at_ms: u64 },
    Expired { sku: u64, reservation_id: u128, at_ms: u64 },
}

impl Event {
    /// The SKU whose state this event changes (every event has exactly one).
    pub fn sku(&self) -> u64 {
        match self {
            Event::SaleCreated { sku, .. }
            | Event::Restocked { sku, .. }
            | Event::Paused { sku, .. }
            | Event::Resumed { sku, .. }
            | Event::Reserved { sku, .. }
            | Event::Confirmed { sku, .. }
            | Event::Released { sku, .. }
            | Event::Expired { sku, .. } => *sku,
        }
    }
}
