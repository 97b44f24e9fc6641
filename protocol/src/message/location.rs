//! Stock in several locations (warehouses) of one sale: RESERVE_AT (0x18),
//! LOCATIONS (0x19), RESTOCK_AT (0x26), LOCATION_ADD (0x27), REGION_SET
//! (0x28), and the locations section of SALE_CREATE (flag bit 2).
//!
//! A location is named by an id (`u16`, the retailer's warehouse number).
//! A reservation takes all its units from one location (never split); the
//! server picks the first location, in the request's order, that has them.
//!
//! # Format
//!
//! RESERVE_AT request body, 39 + 2n bytes:
//! ```text
//!  0 36 reserve   a RESERVE body (sku, user, qty, reservation_id)
//! 36  2 region    u16: 0 = none, else one of the sale's regions
//! 38  1 count     u8, 0..=RESERVE_PREFS_MAX: locations in order of preference
//! 39 2n locations u16 each
//! ```
//! At most one of `region` and `count` is non-zero; both zero: the sale's
//! default order (its locations in the order they were added). A region
//! the sale does not map uses the default order too.
//!
//! RESERVE_AT reply body, 12 bytes: an `Outcome` (as RESERVE's) then
//! `location u16`: the location of the reservation when the status is
//! `reserved` (a retry answers the original one), 0 otherwise.
//!
//! Locations section (SALE_CREATE with flag bit 2, after the queue section):
//! ```text
//! count u8 (1..=LOCATIONS_PER_SALE_MAX), count x {location u16, stock u64},
//! regions u8 (0..=REGIONS_PER_SALE_MAX), regions x {region u16 (not 0),
//!     n u8 (1..=RESERVE_PREFS_MAX), n x location u16}
//! ```
//! The sale's `stock` must be the sum of its locations' stock.
//!
//! RESTOCK_AT body, 18 bytes: `sku u64, location u16, qty u64`.
//! Reply: `Outcome`: ok (detail = the location's new total) | unknown_sku |
//! unknown_location | invalid_argument.
//!
//! LOCATION_ADD body, 18 bytes: `sku u64, location u16, stock u64`.
//! Reply: `Outcome`: ok (detail = the sale's new total) | unknown_sku |
//! location_exists | invalid_argument (too many locations, stock too large).
//!
//! REGION_SET body, 11 + 2n bytes: `sku u64, region u16 (not 0), n u8
//! (1..=RESERVE_PREFS_MAX), n x location u16`: the region's order, replacing
//! any earlier one. Reply: `Outcome`: ok | unknown_sku | unknown_location |
//! invalid_argument (too many regions).
//!
//! LOCATIONS request body, 8 bytes: `sku u64`. Reply body:
//! ```text
//!  0  2 status    u16: ok | unknown_sku (then nothing follows but two 0 counts)
//!  2  1 count     u8, then count x 34 bytes:
//!                 location u16, total u64, available u64, reserved u64, sold u64
//!     1 regions   u8, then regions x {region u16, n u8, n x location u16}
//! ```
//! For every location `available + reserved + sold == total`, and the
//! sale's STATUS counters are the sums over its locations.

use bytes::{BufMut, BytesMut};

use super::reserve::{Outcome, Reserve};
use crate::limits::{LOCATIONS_PER_SALE_MAX, REGIONS_PER_SALE_MAX, RESERVE_PREFS_MAX};
use crate::status::Status;
use crate::wire::{Malformed, Reader};

/// Where a reservation may take its units from, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Where {
    /// The sale's locations in the order they were added.
    #[default]
    Default,
    /// The order the sale maps this region to (the default if none).
    Region(u16),
    /// These locations, in this order (`count` of `ids` used).
    Locations { count: u8, ids: [u16; RESERVE_PREFS_MAX] },
}

impl Where {
    /// A list of preferred locations (at most `RESERVE_PREFS_MAX`).
    pub fn locations(list: &[u16]) -> Where {
        assert!(!list.is_empty() && list.len() <= RESERVE_PREFS_MAX, "{} preferred locations", list.len());
        let mut ids = [0; RESERVE_PREFS_MAX];
        ids[..list.len()].copy_from_slice(list);
        Where::Locations { count: list.len() as u8, ids }
    }

    /// The listed locations (empty unless `Locations`).
    pub fn list(&self) -> &[u16] {
        match self {
            Where::Locations { count, ids } => &ids[..usize::from(*count)],
            _ => &[],
        }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        let region = if let Where::Region(r) = self { *r } else { 0 };
        dst.put_u16_le(region);
        dst.put_u8(self.list().len() as u8);
        for &id in self.list() {
            dst.put_u16_le(id);
        }
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Where, Malformed> {
        let region = r.u16()?;
        let count = r.u8()?;
        if usize::from(count) > RESERVE_PREFS_MAX {
            return Err(Malformed(format!("RESERVE_AT: {count} preferred locations, at most {RESERVE_PREFS_MAX}")));
        }
        if region != 0 && count != 0 {
            return Err(Malformed("RESERVE_AT: a region and a list of locations".into()));
        }
        if count == 0 {
            return Ok(if region == 0 { Where::Default } else { Where::Region(region) });
        }
        let mut ids = [0; RESERVE_PREFS_MAX];
        for id in ids.iter_mut().take(usize::from(count)) {
            *id = r.u16()?;
        }
        Ok(Where::Locations { count, ids })
    }
}

/// RESERVE with a choice of location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReserveAt {
    pub op: Reserve,
    pub at: Where,
}

impl ReserveAt {
    pub fn encode(&self, dst: &mut BytesMut) {
        self.op.encode(dst);
        self.at.encode(dst);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "RESERVE_AT");
        let op = Reserve::read(&mut r)?;
        let at = Where::read(&mut r)?;
        r.finish()?;
        Ok(ReserveAt { op, at })
    }
}

/// RESERVE_AT's reply: the outcome and the location it reserved at.
pub fn encode_outcome_at(outcome: &Outcome, dst: &mut BytesMut) {
    outcome.encode(dst);
    dst.put_u16_le(outcome.location);
}

pub fn decode_outcome_at(body: &[u8]) -> Result<Outcome, Malformed> {
    let mut r = Reader::new(body, "RESERVE_AT reply");
    let mut outcome = Outcome::read(&mut r)?;
    outcome.location = r.u16()?;
    r.finish()?;
    Ok(outcome)
}

/// A sale's locations with their stock, and its regions' orders.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SaleLocations {
    pub locations: Vec<(u16, u64)>,
    pub regions: Vec<(u16, Vec<u16>)>,
}

impl SaleLocations {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u8(self.locations.len() as u8);
        for &(id, stock) in &self.locations {
            dst.put_u16_le(id);
            dst.put_u64_le(stock);
        }
        encode_regions(&self.regions, dst);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        let count = usize::from(r.u8()?);
        if !(1..=LOCATIONS_PER_SALE_MAX).contains(&count) {
            return Err(Malformed(format!("{count} locations, allowed 1..={LOCATIONS_PER_SALE_MAX}")));
        }
        let mut locations = Vec::with_capacity(count);
        for _ in 0..count {
            locations.push((r.u16()?, r.u64()?));
        }
        Ok(SaleLocations { locations, regions: read_regions(r)? })
    }

    /// The sale's stock: the sum over its locations.
    pub fn stock(&self) -> u64 {
        self.locations.iter().fold(0u64, |sum, &(_, stock)| sum.saturating_add(stock))
    }
}

/// `n u8` then `n` location ids (1..=RESERVE_PREFS_MAX).
fn encode_ids(ids: &[u16], dst: &mut BytesMut) {
    dst.put_u8(ids.len() as u8);
    for &id in ids {
        dst.put_u16_le(id);
    }
}

fn read_ids(r: &mut Reader<'_>) -> Result<Vec<u16>, Malformed> {
    let n = usize::from(r.u8()?);
    if !(1..=RESERVE_PREFS_MAX).contains(&n) {
        return Err(Malformed(format!("a region of {n} locations, allowed 1..={RESERVE_PREFS_MAX}")));
    }
    (0..n).map(|_| r.u16()).collect()
}

/// `regions u8`, then per region `region u16` and its order (`encode_ids`):
/// the regions section of SALE_CREATE, LOCATIONS and snapshot images.
fn encode_regions(regions: &[(u16, Vec<u16>)], dst: &mut BytesMut) {
    dst.put_u8(regions.len() as u8);
    for (region, order) in regions {
        dst.put_u16_le(*region);
        encode_ids(order, dst);
    }
}

fn read_regions(r: &mut Reader<'_>) -> Result<Vec<(u16, Vec<u16>)>, Malformed> {
    let count = usize::from(r.u8()?);
    if count > REGIONS_PER_SALE_MAX {
        return Err(Malformed(format!("{count} regions, at most {REGIONS_PER_SALE_MAX}")));
    }
    (0..count).map(|_| Ok((r.u16()?, read_ids(r)?))).collect()
}

/// RESTOCK_AT: `qty` more units at `location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestockAt {
    pub sku: u64,
    pub location: u16,
    pub qty: u64,
}

/// LOCATION_ADD: a new location with `stock` units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocationAdd {
    pub sku: u64,
    pub location: u16,
    pub stock: u64,
}

macro_rules! sku_location_u64 {
    ($ty:ident, $field:ident, $what:literal) => {
        impl $ty {
            pub fn encode(&self, dst: &mut BytesMut) {
                dst.put_u64_le(self.sku);
                dst.put_u16_le(self.location);
                dst.put_u64_le(self.$field);
            }

            pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
                let mut r = Reader::new(body, $what);
                let m = $ty { sku: r.u64()?, location: r.u16()?, $field: r.u64()? };
                r.finish()?;
                Ok(m)
            }
        }
    };
}
sku_location_u64!(RestockAt, qty, "RESTOCK_AT");
sku_location_u64!(LocationAdd, stock, "LOCATION_ADD");

/// REGION_SET: the order of locations for shoppers of `region`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSet {
    pub sku: u64,
    pub region: u16,
    pub order: Vec<u16>,
}

impl RegionSet {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.sku);
        dst.put_u16_le(self.region);
        encode_ids(&self.order, dst);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "REGION_SET");
        let sku = r.u64()?;
        let region = r.u16()?;
        let order = read_ids(&mut r)?;
        r.finish()?;
        Ok(RegionSet { sku, region, order })
    }
}

/// One location's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocationStatus {
    pub location: u16,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

/// LOCATIONS reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocationsReply {
    pub status: Status,
    pub locations: Vec<LocationStatus>,
    pub regions: Vec<(u16, Vec<u16>)>,
}

impl LocationsReply {
    pub fn of(status: Status) -> Self {
        LocationsReply { status, locations: Vec::new(), regions: Vec::new() }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16_le(self.status.code());
        self.encode_sections(dst);
    }

    /// The counts and entries after the status (also the locations section
    /// of a snapshot's sale image).
    pub fn encode_sections(&self, dst: &mut BytesMut) {
        dst.put_u8(self.locations.len() as u8);
        for l in &self.locations {
            dst.put_u16_le(l.location);
            dst.put_u64_le(l.total);
            dst.put_u64_le(l.available);
            dst.put_u64_le(l.reserved);
            dst.put_u64_le(l.sold);
        }
        encode_regions(&self.regions, dst);
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "LOCATIONS reply");
        let code = r.u16()?;
        let status = Status::from_code(code).ok_or_else(|| Malformed(format!("unknown status {code}")))?;
        let reply = Self::read_sections(status, &mut r)?;
        r.finish()?;
        Ok(reply)
    }

    pub fn read_sections(status: Status, r: &mut Reader<'_>) -> Result<Self, Malformed> {
        let count = usize::from(r.u8()?);
        if count > LOCATIONS_PER_SALE_MAX {
            return Err(Malformed(format!("{count} locations")));
        }
        let mut locations = Vec::with_capacity(count);
        for _ in 0..count {
            locations.push(LocationStatus {
                location: r.u16()?,
                total: r.u64()?,
                available: r.u64()?,
                reserved: r.u64()?,
                sold: r.u64()?,
            });
        }
        Ok(LocationsReply { status, locations, regions: read_regions(r)? })
    }
}
