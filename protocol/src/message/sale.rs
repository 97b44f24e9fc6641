//! Sale administration (admin role) and STATUS (any role).
//!
//! # Format
//!
//! SALE_CREATE (0x20) request body, 29 bytes:
//! ```text
//!  0  8 sku             u64
//!  8  8 stock           u64, <= STOCK_UNITS_MAX
//! 16  4 limit_per_user  u32, >= 1 (units a user may hold reserved + sold)
//! 20  8 ttl_ms          u64, reservation time-to-live, 1..=RESERVATION_TTL_MS_MAX
//! 28  1 flags           u8: bit 0 = hot (own shard thread), bit 1 = queued
//!                       (a queue definition follows, see `queue.rs`); other bits 0
//! ```
//! Reply: `Outcome`: ok | sale_exists | invalid_argument.
//!
//! RESTOCK (0x21) request body, 16 bytes: `sku u64, qty u64` (qty >= 1).
//! Reply: `Outcome`: ok (detail = new total) | unknown_sku | invalid_argument.
//!
//! PAUSE (0x22) and RESUME (0x23) request body, 8 bytes: `sku u64`.
//! Reply: `Outcome`: ok | unknown_sku. While paused, RESERVE answers
//! `paused`; CONFIRM and RELEASE of existing reservations still work.
//!
//! STATUS (0x14) request body, 8 bytes: `sku u64`. Reply body, 55 bytes:
//! ```text
//!  0  2 status          u16: ok | unknown_sku (then all fields are 0)
//!  2  8 total           u64 (initial stock + restocks)
//! 10  8 available       u64
//! 18  8 reserved        u64 (units held by unexpired reservations)
//! 26  8 sold            u64
//! 34  4 limit_per_user  u32
//! 38  8 ttl_ms          u64
//! 46  8 reservations    u64 (active reservations, count)
//! 54  1 flags           u8: bit 0 hot (on a shard of its own now), bit 1
//!                       paused, bit 2 queued (36 bytes of queue figures
//!                       follow, see `queue.rs`), bit 3 pinned (an admin
//!                       placed it; the demand monitor leaves it)
//! ```
//! `available + reserved + sold == total` holds in every reply.

use bytes::{BufMut, BytesMut};

use super::location::SaleLocations;
use super::queue::{QueueConfig, QueueStats};
use crate::status::Status;
use crate::wire::{Malformed, Reader};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaleCreate {
    pub sku: u64,
    pub stock: u64,
    pub limit_per_user: u32,
    pub ttl_ms: u64,
    pub hot: bool,
    /// A virtual queue gates the sale (`None`: anyone may reserve).
    pub queue: Option<QueueConfig>,
}

impl SaleCreate {
    pub fn encode(&self, dst: &mut BytesMut) {
        self.encode_with(None, dst);
    }

    /// With its locations section (flag bit 2), if it has one.
    pub fn encode_with(&self, locations: Option<&SaleLocations>, dst: &mut BytesMut) {
        dst.put_u64_le(self.sku);
        dst.put_u64_le(self.stock);
        dst.put_u32_le(self.limit_per_user);
        dst.put_u64_le(self.ttl_ms);
        dst.put_u8(self.hot as u8 | (u8::from(self.queue.is_some()) << 1) | (u8::from(locations.is_some()) << 2));
        if let Some(queue) = &self.queue {
            queue.encode(dst);
        }
        if let Some(locations) = locations {
            locations.encode(dst);
        }
    }

    /// A SALE_CREATE without locations (one location, id 0).
    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        match Self::decode_with_locations(body)? {
            (create, None) => Ok(create),
            (_, Some(_)) => Err(Malformed("SALE_CREATE: a locations section where none is expected".into())),
        }
    }

    pub fn decode_with_locations(body: &[u8]) -> Result<(Self, Option<SaleLocations>), Malformed> {
        let mut r = Reader::new(body, "SALE_CREATE");
        let sku = r.u64()?;
        let stock = r.u64()?;
        let limit_per_user = r.u32()?;
        let ttl_ms = r.u64()?;
        let flags = r.u8()?;
        if flags & !0b111 != 0 {
            return Err(Malformed(format!("SALE_CREATE: unknown flag bits {flags:#04x}")));
        }
        let queue = if flags & 2 != 0 { Some(QueueConfig::read(&mut r)?) } else { None };
        let locations = if flags & 4 != 0 { Some(SaleLocations::read(&mut r)?) } else { None };
        r.finish()?;
        Ok((SaleCreate { sku, stock, limit_per_user, ttl_ms, hot: flags & 1 == 1, queue }, locations))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restock {
    pub sku: u64,
    pub qty: u64,
}

impl Restock {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.sku);
        dst.put_u64_le(self.qty);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "RESTOCK");
        let op = Restock { sku: r.u64()?, qty: r.u64()? };
        r.finish()?;
        Ok(op)
    }
}

/// A request whose body is just a SKU (PAUSE, RESUME, STATUS).
/// SALE_MOVE request body (9 bytes): `sku u64, placement u8` (bit 0:
/// a shard of its own; 0: the pool; other bits must be 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaleMove {
    pub sku: u64,
    pub dedicated: bool,
}

impl SaleMove {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.sku);
        dst.put_u8(u8::from(self.dedicated));
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "SALE_MOVE");
        let sku = r.u64()?;
        let placement = r.u8()?;
        if placement > 1 {
            return Err(Malformed(format!("SALE_MOVE: placement {placement:#x}")));
        }
        r.finish()?;
        Ok(SaleMove { sku, dedicated: placement == 1 })
    }
}

/// PLACEMENT reply (`0xa5`): where sales run and the demand the server's
/// monitor sees.
/// ```text
///  0  2 status            u16: ok | not_leader (then every field is 0)
///  2  2 dedicated_shards  u16: shards running one sale each now
///  4  2 dedicated_max     u16: how many the monitor may bring it up to
///  6  1 auto              u8: 1 if the monitor moves sales by demand
///  7  2 count             u16: sales below, hottest first (at most 10)
///  9 13 per sale          sku u64, placement u8 (bit 0 dedicated, bit 1
///                         pinned), decided_per_s u32 (requests its shard
///                         decided per second over the last interval)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementReply {
    pub status: Status,
    pub dedicated_shards: u16,
    pub dedicated_max: u16,
    pub auto: bool,
    pub sales: Vec<SalePlacement>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SalePlacement {
    pub sku: u64,
    pub dedicated: bool,
    pub pinned: bool,
    pub decided_per_s: u32,
}

/// Sales a PLACEMENT reply lists at most.
pub const PLACEMENT_SALES_MAX: usize = 10;

impl PlacementReply {
    pub fn of(status: Status) -> Self {
        PlacementReply { status, dedicated_shards: 0, dedicated_max: 0, auto: false, sales: Vec::new() }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        dst.put_u16_le(self.dedicated_shards);
        dst.put_u16_le(self.dedicated_max);
        dst.put_u8(u8::from(self.auto));
        let sales = &self.sales[..self.sales.len().min(PLACEMENT_SALES_MAX)];
        dst.put_u16_le(sales.len() as u16);
        for s in sales {
            dst.put_u64_le(s.sku);
            dst.put_u8(u8::from(s.dedicated) | (u8::from(s.pinned) << 1));
            dst.put_u32_le(s.decided_per_s);
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "PLACEMENT reply");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let dedicated_shards = r.u16()?;
        let dedicated_max = r.u16()?;
        let auto = r.u8()? != 0;
        let count = r.u16()? as usize;
        if count > PLACEMENT_SALES_MAX {
            return Err(Malformed(format!("PLACEMENT reply: {count} sales")));
        }
        let mut sales = Vec::with_capacity(count);
        for _ in 0..count {
            let sku = r.u64()?;
            let placement = r.u8()?;
            let decided_per_s = r.u32()?;
            sales.push(SalePlacement { sku, dedicated: placement & 1 != 0, pinned: placement & 2 != 0, decided_per_s });
        }
        r.finish()?;
        Ok(PlacementReply { status, dedicated_shards, dedicated_max, auto, sales })
    }
}

pub fn encode_sku(sku: u64, dst: &mut BytesMut) {
    dst.put_u64_le(sku);
}

pub fn decode_sku(body: &[u8], what: &'static str) -> Result<u64, Malformed> {
    let mut r = Reader::new(body, what);
    let sku = r.u64()?;
    r.finish()?;
    Ok(sku)
}

/// STATUS reply.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SaleStatus {
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub limit_per_user: u32,
    pub ttl_ms: u64,
    pub reservations: u64,
    /// On a shard of its own now (created hot, or moved there).
    pub hot: bool,
    pub paused: bool,
    /// The placement is an admin's (`--hot` or SALE_MOVE): the server's
    /// demand monitor does not move the sale.
    pub pinned: bool,
    /// The sale's queue figures, if it has a queue. Boxed: every reply
    /// travels through the connection's channel by value, and most sales
    /// have no queue.
    pub queue: Option<Box<QueueStats>>,
}

/// STATUS reply with its status code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReply {
    pub status: Status,
    pub sale: SaleStatus,
}

impl StatusReply {
    pub fn encode(&self, dst: &mut BytesMut) {
        let s = &self.sale;
        dst.put_u16_le(self.status.code());
        dst.put_u64_le(s.total);
        dst.put_u64_le(s.available);
        dst.put_u64_le(s.reserved);
        dst.put_u64_le(s.sold);
        dst.put_u32_le(s.limit_per_user);
        dst.put_u64_le(s.ttl_ms);
        dst.put_u64_le(s.reservations);
        dst.put_u8(s.hot as u8 | (s.paused as u8) << 1 | u8::from(s.queue.is_some()) << 2 | u8::from(s.pinned) << 3);
        if let Some(queue) = &s.queue {
            queue.encode(dst);
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "STATUS reply");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let total = r.u64()?;
        let available = r.u64()?;
        let reserved = r.u64()?;
        let sold = r.u64()?;
        let limit_per_user = r.u32()?;
        let ttl_ms = r.u64()?;
        let reservations = r.u64()?;
        let flags = r.u8()?;
        let queue = if flags & 4 != 0 { Some(Box::new(QueueStats::read(&mut r)?)) } else { None };
        r.finish()?;
        let sale = SaleStatus {
            total,
            available,
            reserved,
            sold,
            limit_per_user,
            ttl_ms,
            reservations,
            hot: flags & 1 != 0,
            paused: flags & 2 != 0,
            pinned: flags & 8 != 0,
            queue,
        };
        Ok(StatusReply { status, sale })
    }
}
