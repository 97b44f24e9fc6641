//! Events: every state change of the engine, as data.
//!
//! A command (RESERVE, CONFIRM, ...) is first *decided* against the current
//! state; if it changes anything, the decision is one `Event`, which is then
//! *applied*. Applying the same events in the same order always yields the
//! same state, so the event stream is what the write-ahead log stores and
//! what recovery, replication and the reconciler replay. Events carry every
//! input the apply step needs (times included) and never read the clock.
//!
//! # Format
//!
//! An event payload is `kind u8` then the fields of that kind, in order
//! (all integers little-endian):
//! ```text
//! 1 SALE_CREATED  sku u64, stock u64, limit_per_user u32, ttl_ms u64, hot u8, at_ms u64
//! 2 RESTOCKED     sku u64, qty u64, at_ms u64
//! 3 PAUSED        sku u64, at_ms u64
//! 4 RESUMED       sku u64, at_ms u64
//! 5 RESERVED      sku u64, user u64, qty u32, reservation_id u128, expires_at_ms u64, at_ms u64
//! 6 CONFIRMED     sku u64, reservation_id u128, at_ms u64, payment_ref_len u8, payment_ref bytes
//! 7 RELEASED      sku u64, reservation_id u128, at_ms u64
//! 8 EXPIRED       sku u64, reservation_id u128, at_ms u64
//! 9 QUEUE_CONFIGURED  sku u64, admit_rate_per_s u32, admit_cap u32, admission_ms u64, start_at_ms u64, at_ms u64
//! 10 QUEUE_JOINED     sku u64, user u64, at_ms u64
//! 11 QUEUE_STARTED    sku u64, seed u64, at_ms u64
//! 12 ADMITTED         sku u64, user u64, until_ms u64, at_ms u64
//! 13 ADMISSION_LAPSED sku u64, user u64, at_ms u64
//! 14 TERM_STARTED     term u64, at_ms u64
//! 15 SALE_MOVED       sku u64, placement u8 (bit 0 dedicated, bit 1 pinned), at_ms u64
//! 16 RESERVED_AT      RESERVED's fields, then location u16
//! 17 SALE_CREATED_AT  sku u64, limit_per_user u32, ttl_ms u64, hot u8, at_ms u64, then the
//!                     locations section of SALE_CREATE (locations with their stock, regions)
//! 18 LOCATION_ADDED   sku u64, location u16, stock u64, at_ms u64
//! 19 RESTOCKED_AT     RESTOCKED's fields, then location u16
//! 20 REGION_SET       sku u64, region u16, n u8, n x location u16, at_ms u64
//! ```
//! Kinds are never renumbered; a new event gets a new kind. Locations: a
//! sale made by SALE_CREATED has one location, id 0; the older kinds
//! (RESERVED, RESTOCKED) act on location 0, and the `_AT` kinds name
//! another. CONFIRMED, RELEASED and EXPIRED act on the reservation's
//! location. The same
//! payload is what the server's write-ahead log stores and what the
//! replication stream (REPLICATE) carries, so a consumer decodes it with
//! this module (or from PROTOCOL.md alone).

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::{PAYMENT_REF_BYTES_MAX, RESERVE_PREFS_MAX};
use crate::message::SaleLocations;
use crate::wire::{Malformed, Reader};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    SaleCreated {
        sku: u64,
        stock: u64,
        limit_per_user: u32,
        ttl_ms: u64,
        hot: bool,
        at_ms: u64,
    },
    Restocked {
        sku: u64,
        qty: u64,
        at_ms: u64,
        /// The location restocked (0: the one of a sale without locations).
        location: u16,
    },
    Paused {
        sku: u64,
        at_ms: u64,
    },
    Resumed {
        sku: u64,
        at_ms: u64,
    },
    Reserved {
        sku: u64,
        user: u64,
        qty: u32,
        reservation_id: u128,
        expires_at_ms: u64,
        at_ms: u64,
        /// Where the units are held (0: the one of a sale without locations).
        location: u16,
    },
    Confirmed {
        sku: u64,
        reservation_id: u128,
        at_ms: u64,
        payment_ref: Bytes,
    },
    Released {
        sku: u64,
        reservation_id: u128,
        at_ms: u64,
    },
    Expired {
        sku: u64,
        reservation_id: u128,
        at_ms: u64,
    },
    /// The sale is gated by a virtual queue (right after its SALE_CREATED).
    QueueConfigured {
        sku: u64,
        admit_rate_per_s: u32,
        admit_cap: u32,
        admission_ms: u64,
        start_at_ms: u64,
        at_ms: u64,
    },
    /// `user` took a place in line (or, before the start, in the pre-queue).
    QueueJoined {
        sku: u64,
        user: u64,
        at_ms: u64,
    },
    /// The start: the pre-queue is shuffled with `seed` (see the queue
    /// module for the exact shuffle) and placed ahead of later joiners.
    QueueStarted {
        sku: u64,
        seed: u64,
        at_ms: u64,
    },
    /// The first user in line may reserve until `until_ms`.
    Admitted {
        sku: u64,
        user: u64,
        until_ms: u64,
        at_ms: u64,
    },
    /// An admission ran out unused; the place passes to the next in line.
    AdmissionLapsed {
        sku: u64,
        user: u64,
        at_ms: u64,
    },
    /// A node became the leader of its cluster for `term` (etcd decided);
    /// the first record it writes. It changes no sale: it marks where the
    /// history of one term begins, so nodes can find where their logs part.
    TermStarted {
        term: u64,
        at_ms: u64,
    },
    /// The sale moved to a shard of its own (`dedicated`) or back to the
    /// shared pool. `pinned`: an admin chose this placement, and the
    /// server's own demand monitor leaves it alone. Units and
    /// reservations do not change; recovery and standbys place the sale
    /// where this says.
    SaleMoved {
        sku: u64,
        dedicated: bool,
        pinned: bool,
        at_ms: u64,
    },
    /// A sale whose stock is split over locations (one record, so a torn
    /// creation never leaves half of them).
    SaleCreatedAt {
        sku: u64,
        limit_per_user: u32,
        ttl_ms: u64,
        hot: bool,
        at_ms: u64,
        locations: Box<SaleLocations>,
    },
    /// A new location of a running sale.
    LocationAdded {
        sku: u64,
        location: u16,
        stock: u64,
        at_ms: u64,
    },
    /// Region `region` takes its units from `order`, first that has them.
    RegionSet {
        sku: u64,
        region: u16,
        order: Box<[u16]>,
        at_ms: u64,
    },
}

impl Event {
    /// The SKU whose state this event changes; `None` for an event that
    /// changes no sale (TERM_STARTED).
    pub fn sku(&self) -> Option<u64> {
        Some(match self {
            Event::SaleCreated { sku, .. }
            | Event::Restocked { sku, .. }
            | Event::Paused { sku, .. }
            | Event::Resumed { sku, .. }
            | Event::Reserved { sku, .. }
            | Event::Confirmed { sku, .. }
            | Event::Released { sku, .. }
            | Event::Expired { sku, .. }
            | Event::QueueConfigured { sku, .. }
            | Event::QueueJoined { sku, .. }
            | Event::QueueStarted { sku, .. }
            | Event::Admitted { sku, .. }
            | Event::AdmissionLapsed { sku, .. }
            | Event::SaleMoved { sku, .. }
            | Event::SaleCreatedAt { sku, .. }
            | Event::LocationAdded { sku, .. }
            | Event::RegionSet { sku, .. } => *sku,
            Event::TermStarted { .. } => return None,
        })
    }

    /// The engine time of the event (unix ms).
    pub fn at_ms(&self) -> u64 {
        match self {
            Event::SaleCreated { at_ms, .. }
            | Event::Restocked { at_ms, .. }
            | Event::Paused { at_ms, .. }
            | Event::Resumed { at_ms, .. }
            | Event::Reserved { at_ms, .. }
            | Event::Confirmed { at_ms, .. }
            | Event::Released { at_ms, .. }
            | Event::Expired { at_ms, .. }
            | Event::QueueConfigured { at_ms, .. }
            | Event::QueueJoined { at_ms, .. }
            | Event::QueueStarted { at_ms, .. }
            | Event::Admitted { at_ms, .. }
            | Event::AdmissionLapsed { at_ms, .. }
            | Event::TermStarted { at_ms, .. }
            | Event::SaleMoved { at_ms, .. }
            | Event::SaleCreatedAt { at_ms, .. }
            | Event::LocationAdded { at_ms, .. }
            | Event::RegionSet { at_ms, .. } => *at_ms,
        }
    }
}

const SALE_CREATED: u8 = 1;
const RESTOCKED: u8 = 2;
const PAUSED: u8 = 3;
const RESUMED: u8 = 4;
const RESERVED: u8 = 5;
const CONFIRMED: u8 = 6;
const RELEASED: u8 = 7;
const EXPIRED: u8 = 8;
const QUEUE_CONFIGURED: u8 = 9;
const QUEUE_JOINED: u8 = 10;
const QUEUE_STARTED: u8 = 11;
const ADMITTED: u8 = 12;
const ADMISSION_LAPSED: u8 = 13;
const TERM_STARTED: u8 = 14;
const SALE_MOVED: u8 = 15;
const RESERVED_AT: u8 = 16;
const SALE_CREATED_AT: u8 = 17;
const LOCATION_ADDED: u8 = 18;
const RESTOCKED_AT: u8 = 19;
const REGION_SET: u8 = 20;

/// Append the payload encoding of `event`.
pub fn encode_event(event: &Event, dst: &mut BytesMut) {
    match event {
        Event::SaleCreated { sku, stock, limit_per_user, ttl_ms, hot, at_ms } => {
            dst.put_u8(SALE_CREATED);
            dst.put_u64_le(*sku);
            dst.put_u64_le(*stock);
            dst.put_u32_le(*limit_per_user);
            dst.put_u64_le(*ttl_ms);
            dst.put_u8(u8::from(*hot));
            dst.put_u64_le(*at_ms);
        }
        Event::Restocked { sku, qty, at_ms, location } => {
            dst.put_u8(if *location == 0 { RESTOCKED } else { RESTOCKED_AT });
            dst.put_u64_le(*sku);
            dst.put_u64_le(*qty);
            dst.put_u64_le(*at_ms);
            if *location != 0 {
                dst.put_u16_le(*location);
            }
        }
        Event::Paused { sku, at_ms } | Event::Resumed { sku, at_ms } => {
            dst.put_u8(if matches!(event, Event::Paused { .. }) { PAUSED } else { RESUMED });
            dst.put_u64_le(*sku);
            dst.put_u64_le(*at_ms);
        }
        Event::Reserved { sku, user, qty, reservation_id, expires_at_ms, at_ms, location } => {
            dst.put_u8(if *location == 0 { RESERVED } else { RESERVED_AT });
            dst.put_u64_le(*sku);
            dst.put_u64_le(*user);
            dst.put_u32_le(*qty);
            dst.put_u128_le(*reservation_id);
            dst.put_u64_le(*expires_at_ms);
            dst.put_u64_le(*at_ms);
            if *location != 0 {
                dst.put_u16_le(*location);
            }
        }
        Event::Confirmed { sku, reservation_id, at_ms, payment_ref } => {
            debug_assert!(payment_ref.len() <= PAYMENT_REF_BYTES_MAX);
            dst.put_u8(CONFIRMED);
            dst.put_u64_le(*sku);
            dst.put_u128_le(*reservation_id);
            dst.put_u64_le(*at_ms);
            dst.put_u8(payment_ref.len() as u8);
            dst.extend_from_slice(payment_ref);
        }
        Event::Released { sku, reservation_id, at_ms } | Event::Expired { sku, reservation_id, at_ms } => {
            dst.put_u8(if matches!(event, Event::Released { .. }) { RELEASED } else { EXPIRED });
            dst.put_u64_le(*sku);
            dst.put_u128_le(*reservation_id);
            dst.put_u64_le(*at_ms);
        }
        Event::QueueConfigured { sku, admit_rate_per_s, admit_cap, admission_ms, start_at_ms, at_ms } => {
            dst.put_u8(QUEUE_CONFIGURED);
            dst.put_u64_le(*sku);
            dst.put_u32_le(*admit_rate_per_s);
            dst.put_u32_le(*admit_cap);
            dst.put_u64_le(*admission_ms);
            dst.put_u64_le(*start_at_ms);
            dst.put_u64_le(*at_ms);
        }
        Event::QueueJoined { sku, user, at_ms } | Event::AdmissionLapsed { sku, user, at_ms } => {
            dst.put_u8(if matches!(event, Event::QueueJoined { .. }) { QUEUE_JOINED } else { ADMISSION_LAPSED });
            dst.put_u64_le(*sku);
            dst.put_u64_le(*user);
            dst.put_u64_le(*at_ms);
        }
        Event::QueueStarted { sku, seed, at_ms } => {
            dst.put_u8(QUEUE_STARTED);
            dst.put_u64_le(*sku);
            dst.put_u64_le(*seed);
            dst.put_u64_le(*at_ms);
        }
        Event::Admitted { sku, user, until_ms, at_ms } => {
            dst.put_u8(ADMITTED);
            dst.put_u64_le(*sku);
            dst.put_u64_le(*user);
            dst.put_u64_le(*until_ms);
            dst.put_u64_le(*at_ms);
        }
        Event::TermStarted { term, at_ms } => {
            dst.put_u8(TERM_STARTED);
            dst.put_u64_le(*term);
            dst.put_u64_le(*at_ms);
        }
        Event::SaleMoved { sku, dedicated, pinned, at_ms } => {
            dst.put_u8(SALE_MOVED);
            dst.put_u64_le(*sku);
            dst.put_u8(u8::from(*dedicated) | (u8::from(*pinned) << 1));
            dst.put_u64_le(*at_ms);
        }
        Event::SaleCreatedAt { sku, limit_per_user, ttl_ms, hot, at_ms, locations } => {
            dst.put_u8(SALE_CREATED_AT);
            dst.put_u64_le(*sku);
            dst.put_u32_le(*limit_per_user);
            dst.put_u64_le(*ttl_ms);
            dst.put_u8(u8::from(*hot));
            dst.put_u64_le(*at_ms);
            locations.encode(dst);
        }
        Event::LocationAdded { sku, location, stock, at_ms } => {
            dst.put_u8(LOCATION_ADDED);
            dst.put_u64_le(*sku);
            dst.put_u16_le(*location);
            dst.put_u64_le(*stock);
            dst.put_u64_le(*at_ms);
        }
        Event::RegionSet { sku, region, order, at_ms } => {
            dst.put_u8(REGION_SET);
            dst.put_u64_le(*sku);
            dst.put_u16_le(*region);
            dst.put_u8(order.len() as u8);
            for &id in order.iter() {
                dst.put_u16_le(id);
            }
            dst.put_u64_le(*at_ms);
        }
    }
}
/// The location of an `_AT` kind: never 0 (location 0 has the older kind,
/// so every event has one encoding).
fn nonzero(r: &mut Reader<'_>) -> Result<u16, Malformed> {
    match r.u16()? {
        0 => Err(Malformed("an _AT event for location 0 (that is the older kind)".into())),
        location => Ok(location),
    }
}

/// Decode one event payload (the whole payload must be consumed).
pub fn decode_event(payload: &[u8]) -> Result<Event, Malformed> {
    let mut r = Reader::new(payload, "event");
    let event = match r.u8()? {
        SALE_CREATED => Event::SaleCreated {
            sku: r.u64()?,
            stock: r.u64()?,
            limit_per_user: r.u32()?,
            ttl_ms: r.u64()?,
            hot: r.u8()? != 0,
            at_ms: r.u64()?,
        },
        RESTOCKED => Event::Restocked { sku: r.u64()?, qty: r.u64()?, at_ms: r.u64()?, location: 0 },
        RESTOCKED_AT => Event::Restocked { sku: r.u64()?, qty: r.u64()?, at_ms: r.u64()?, location: nonzero(&mut r)? },
        PAUSED => Event::Paused { sku: r.u64()?, at_ms: r.u64()? },
        RESUMED => Event::Resumed { sku: r.u64()?, at_ms: r.u64()? },
        kind @ (RESERVED | RESERVED_AT) => Event::Reserved {
            sku: r.u64()?,
            user: r.u64()?,
            qty: r.u32()?,
            reservation_id: r.u128()?,
            expires_at_ms: r.u64()?,
            at_ms: r.u64()?,
            location: if kind == RESERVED_AT { nonzero(&mut r)? } else { 0 },
        },
        CONFIRMED => {
            let sku = r.u64()?;
            let reservation_id = r.u128()?;
            let at_ms = r.u64()?;
            let len = r.u8()? as usize;
            if len > PAYMENT_REF_BYTES_MAX {
                return Err(Malformed(format!("payment_ref of {len} bytes")));
            }
            let payment_ref: Bytes = r.bytes(len)?;
            Event::Confirmed { sku, reservation_id, at_ms, payment_ref }
        }
        RELEASED => Event::Released { sku: r.u64()?, reservation_id: r.u128()?, at_ms: r.u64()? },
        EXPIRED => Event::Expired { sku: r.u64()?, reservation_id: r.u128()?, at_ms: r.u64()? },
        QUEUE_CONFIGURED => Event::QueueConfigured {
            sku: r.u64()?,
            admit_rate_per_s: r.u32()?,
            admit_cap: r.u32()?,
            admission_ms: r.u64()?,
            start_at_ms: r.u64()?,
            at_ms: r.u64()?,
        },
        QUEUE_JOINED => Event::QueueJoined { sku: r.u64()?, user: r.u64()?, at_ms: r.u64()? },
        QUEUE_STARTED => Event::QueueStarted { sku: r.u64()?, seed: r.u64()?, at_ms: r.u64()? },
        ADMITTED => Event::Admitted { sku: r.u64()?, user: r.u64()?, until_ms: r.u64()?, at_ms: r.u64()? },
        ADMISSION_LAPSED => Event::AdmissionLapsed { sku: r.u64()?, user: r.u64()?, at_ms: r.u64()? },
        TERM_STARTED => Event::TermStarted { term: r.u64()?, at_ms: r.u64()? },
        SALE_MOVED => {
            let sku = r.u64()?;
            let placement = r.u8()?;
            if placement > 3 {
                return Err(Malformed(format!("sale placement {placement:#x}")));
            }
            Event::SaleMoved { sku, dedicated: placement & 1 != 0, pinned: placement & 2 != 0, at_ms: r.u64()? }
        }
        SALE_CREATED_AT => Event::SaleCreatedAt {
            sku: r.u64()?,
            limit_per_user: r.u32()?,
            ttl_ms: r.u64()?,
            hot: r.u8()? != 0,
            at_ms: r.u64()?,
            locations: Box::new(SaleLocations::read(&mut r)?),
        },
        LOCATION_ADDED => Event::LocationAdded { sku: r.u64()?, location: r.u16()?, stock: r.u64()?, at_ms: r.u64()? },
        REGION_SET => {
            let sku = r.u64()?;
            let region = r.u16()?;
            let n = usize::from(r.u8()?);
            if !(1..=RESERVE_PREFS_MAX).contains(&n) {
                return Err(Malformed(format!("a region of {n} locations")));
            }
            let order = (0..n).map(|_| r.u16()).collect::<Result<Vec<u16>, _>>()?.into_boxed_slice();
            Event::RegionSet { sku, region, order, at_ms: r.u64()? }
        }
        kind => return Err(Malformed(format!("unknown event kind {kind}"))),
    };
    r.finish()?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOL.md and WAL.md list each kind's payload size; keep them true.
    #[test]
    fn payload_sizes_match_the_docs() {
        let sizes = [
            (Event::SaleCreated { sku: 0, stock: 0, limit_per_user: 0, ttl_ms: 0, hot: false, at_ms: 0 }, 38),
            (Event::Restocked { sku: 0, qty: 0, at_ms: 0, location: 0 }, 25),
            (Event::Restocked { sku: 0, qty: 0, at_ms: 0, location: 1 }, 27),
            (Event::Paused { sku: 0, at_ms: 0 }, 17),
            (
                Event::Reserved { sku: 0, user: 0, qty: 0, reservation_id: 0, expires_at_ms: 0, at_ms: 0, location: 0 },
                53,
            ),
            (
                Event::Reserved { sku: 0, user: 0, qty: 0, reservation_id: 0, expires_at_ms: 0, at_ms: 0, location: 1 },
                55,
            ),
            (
                Event::SaleCreatedAt {
                    sku: 0,
                    limit_per_user: 0,
                    ttl_ms: 0,
                    hot: false,
                    at_ms: 0,
                    locations: Box::new(SaleLocations {
                        locations: vec![(1, 0), (2, 0)],
                        regions: vec![(1, vec![2, 1])],
                    }),
                },
                // 30 + locations 1 + 2 x 10 + regions 1 + (2 + 1 + 2 x 2)
                59,
            ),
            (Event::LocationAdded { sku: 0, location: 0, stock: 0, at_ms: 0 }, 27),
            (Event::RegionSet { sku: 0, region: 0, order: vec![1, 2].into_boxed_slice(), at_ms: 0 }, 24),
            (Event::Confirmed { sku: 0, reservation_id: 0, at_ms: 0, payment_ref: Bytes::new() }, 34),
            (Event::Expired { sku: 0, reservation_id: 0, at_ms: 0 }, 33),
            (
                Event::QueueConfigured {
                    sku: 0,
                    admit_rate_per_s: 0,
                    admit_cap: 0,
                    admission_ms: 0,
                    start_at_ms: 0,
                    at_ms: 0,
                },
                41,
            ),
            (Event::QueueJoined { sku: 0, user: 0, at_ms: 0 }, 25),
            (Event::QueueStarted { sku: 0, seed: 0, at_ms: 0 }, 25),
            (Event::Admitted { sku: 0, user: 0, until_ms: 0, at_ms: 0 }, 33),
            (Event::AdmissionLapsed { sku: 0, user: 0, at_ms: 0 }, 25),
            (Event::TermStarted { term: 0, at_ms: 0 }, 17),
            (Event::SaleMoved { sku: 0, dedicated: false, pinned: false, at_ms: 0 }, 18),
        ];
        for (event, size) in sizes {
            let mut buf = BytesMut::new();
            encode_event(&event, &mut buf);
            assert_eq!(buf.len(), size, "{event:?}");
        }
    }
}
