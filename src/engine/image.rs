//! A sale's complete state as plain data: what snapshots store, what the
//! state digest hashes, and what recovery loads back.
//!
//! Export writes out only the primary facts (counters, flags, every
//! reservation with its state); import rebuilds everything derived from
//! them (per-user records, expiry queue, hold count, id directory, gauge)
//! and checks that the counters agree with the reservations, so a damaged
//! or inconsistent snapshot is refused (with the reason) rather than served.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use stampede_protocol::wire::{Malformed, Reader};

use stampede_protocol::message::{LocationStatus, LocationsReply};
use stampede_protocol::Status;

use super::queue::{QueueImage, WaitingRoom};
use super::{Claim, Engine, ExpiryEntry, FastMap, FlatMap, HoldState, Reservation, Sale, SkuGauge};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaleImage {
    pub sku: u64,
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub limit_per_user: u32,
    pub ttl_ms: u64,
    pub hot: bool,
    /// The placement is an admin's (see `Event::SaleMoved`).
    pub pinned: bool,
    pub paused: bool,
    /// Every reservation of the sale, sorted by id (settled ones included:
    /// they answer retries).
    pub reservations: Vec<ReservationImage>,
    /// The virtual queue, if the sale has one.
    pub queue: Option<QueueImage>,
    /// Each location's counters, in the order they were added (one, id 0,
    /// for a sale made without locations).
    pub locations: Vec<LocationStatus>,
    /// Regions' orders of location ids.
    pub regions: Vec<(u16, Vec<u16>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationImage {
    pub id: u128,
    pub user: u64,
    pub qty: u32,
    pub state: HoldState,
    pub expires_at_ms: u64,
    pub settled_at_ms: u64,
    pub payment_ref: Option<Bytes>,
    /// The location id its units are at.
    pub location: u16,
}

fn state_code(state: HoldState) -> u8 {
    match state {
        HoldState::Held => 1,
        HoldState::Confirmed => 2,
        HoldState::Released => 3,
        HoldState::Expired => 4,
    }
}

impl SaleImage {
    /// One location, id 0, and no regions: the image has no locations
    /// section (and reads as before locations existed).
    fn plain(&self) -> bool {
        self.regions.is_empty() && self.locations.len() == 1 && self.locations[0].location == 0
    }

    /// # Format
    /// ```text
    /// sku u64, total u64, available u64, reserved u64, sold u64,
    /// limit_per_user u32, ttl_ms u64, flags u8 (bit 0 hot, bit 1 paused,
    /// bit 2 queued, bit 3 pinned, bit 4 locations), reservation_count u64,
    /// then per reservation:
    ///   id u128, user u64, qty u32, state u8 (1 held, 2 confirmed,
    ///   3 released, 4 expired), expires_at_ms u64, settled_at_ms u64,
    ///   payment_ref_len u8, payment_ref bytes, with locations: location u16
    /// then, if queued:
    ///   admit_rate_per_s u32, admit_cap u32, admission_ms u64,
    ///   start_at_ms u64, opened_at_ms u64, started u8,
    ///   pre_count u64, per pre-start joiner: user u64, joined_offset_ms u32,
    ///   line_count u64, per user in line: user u64, joined_offset_ms u32,
    ///   next u64, admitted_count u64, per admission: user u64, until_ms u64,
    ///   used_count u64, per used admission: user u64, until_ms u64,
    ///   admitted_total u64, lapsed_total u64, paused_at_ms u64
    /// then, with locations:
    ///   count u8, per location: location u16, total u64, available u64,
    ///   reserved u64, sold u64; regions u8, per region: region u16, n u8,
    ///   n x location u16
    /// ```
    /// Without the locations flag the sale has one location, id 0, with
    /// the sale's counters.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.sku);
        dst.put_u64_le(self.total);
        dst.put_u64_le(self.available);
        dst.put_u64_le(self.reserved);
        dst.put_u64_le(self.sold);
        dst.put_u32_le(self.limit_per_user);
        dst.put_u64_le(self.ttl_ms);
        dst.put_u8(
            u8::from(self.hot)
                | (u8::from(self.paused) << 1)
                | (u8::from(self.queue.is_some()) << 2)
                | (u8::from(self.pinned) << 3)
                | (u8::from(!self.plain()) << 4),
        );
        dst.put_u64_le(self.reservations.len() as u64);
        for r in &self.reservations {
            dst.put_u128_le(r.id);
            dst.put_u64_le(r.user);
            dst.put_u32_le(r.qty);
            dst.put_u8(state_code(r.state));
            dst.put_u64_le(r.expires_at_ms);
            dst.put_u64_le(r.settled_at_ms);
            let payment_ref = r.payment_ref.as_deref().unwrap_or(&[]);
            dst.put_u8(payment_ref.len() as u8);
            dst.extend_from_slice(payment_ref);
            if !self.plain() {
                dst.put_u16_le(r.location);
            }
        }
        if let Some(q) = &self.queue {
            q.config.encode(dst);
            dst.put_u64_le(q.opened_at_ms);
            dst.put_u8(u8::from(q.started));
            for list in [&q.pre, &q.line] {
                dst.put_u64_le(list.len() as u64);
                for &(user, joined) in list {
                    dst.put_u64_le(user);
                    dst.put_u32_le(joined);
                }
            }
            dst.put_u64_le(q.next);
            for list in [&q.admitted, &q.used] {
                dst.put_u64_le(list.len() as u64);
                for &(user, until_ms) in list {
                    dst.put_u64_le(user);
                    dst.put_u64_le(until_ms);
                }
            }
            dst.put_u64_le(q.admitted_total);
            dst.put_u64_le(q.lapsed_total);
            dst.put_u64_le(q.paused_at_ms);
        }
        if !self.plain() {
            LocationsReply { status: Status::Ok, locations: self.locations.clone(), regions: self.regions.clone() }
                .encode_sections(dst);
        }
    }

    pub fn read(r: &mut Reader<'_>) -> Result<SaleImage, Malformed> {
        let sku = r.u64()?;
        let total = r.u64()?;
        let available = r.u64()?;
        let reserved = r.u64()?;
        let sold = r.u64()?;
        let limit_per_user = r.u32()?;
        let ttl_ms = r.u64()?;
        let flags = r.u8()?;
        let count = r.u64()?;
        let mut reservations = Vec::new();
        for _ in 0..count {
            let id = r.u128()?;
            let user = r.u64()?;
            let qty = r.u32()?;
            let state = match r.u8()? {
                1 => HoldState::Held,
                2 => HoldState::Confirmed,
                3 => HoldState::Released,
                4 => HoldState::Expired,
                other => return Err(Malformed(format!("reservation state {other}"))),
            };
            let expires_at_ms = r.u64()?;
            let settled_at_ms = r.u64()?;
            let len = r.u8()? as usize;
            let payment_ref = if state == HoldState::Confirmed { Some(r.bytes(len)?) } else { None };
            if state != HoldState::Confirmed && len != 0 {
                return Err(Malformed("payment_ref on an unconfirmed reservation".into()));
            }
            let location = if flags & 16 != 0 { r.u16()? } else { 0 };
            reservations.push(ReservationImage {
                id,
                user,
                qty,
                state,
                expires_at_ms,
                settled_at_ms,
                payment_ref,
                location,
            });
        }
        let queue = if flags & 4 != 0 { Some(read_queue(r)?) } else { None };
        let (locations, regions) = if flags & 16 != 0 {
            let sections = LocationsReply::read_sections(Status::Ok, r)?;
            (sections.locations, sections.regions)
        } else {
            (vec![LocationStatus { location: 0, total, available, reserved, sold }], Vec::new())
        };
        Ok(SaleImage {
            sku,
            total,
            available,
            reserved,
            sold,
            limit_per_user,
            ttl_ms,
            hot: flags & 1 != 0,
            pinned: flags & 8 != 0,
            paused: flags & 2 != 0,
            reservations,
            queue,
            locations,
            regions,
        })
    }
}

fn read_queue(r: &mut Reader<'_>) -> Result<QueueImage, Malformed> {
    let config = stampede_protocol::message::QueueConfig::read(r)?;
    let opened_at_ms = r.u64()?;
    let started = r.u8()? != 0;
    let mut joiners = || -> Result<Vec<(u64, u32)>, Malformed> {
        let count = r.u64()?;
        // Each entry is 12 bytes: never trust a count beyond the input.
        let mut list = Vec::with_capacity((count as usize).min(r.remaining() / 12));
        for _ in 0..count {
            list.push((r.u64()?, r.u32()?));
        }
        Ok(list)
    };
    let pre = joiners()?;
    let line = joiners()?;
    let next = r.u64()?;
    let mut deadlines = || -> Result<Vec<(u64, u64)>, Malformed> {
        let count = r.u64()?;
        let mut list = Vec::with_capacity((count as usize).min(r.remaining() / 16));
        for _ in 0..count {
            list.push((r.u64()?, r.u64()?));
        }
        Ok(list)
    };
    let admitted = deadlines()?;
    let used = deadlines()?;
    Ok(QueueImage {
        config,
        opened_at_ms,
        started,
        pre,
        line,
        next,
        admitted,
        used,
        admitted_total: r.u64()?,
        lapsed_total: r.u64()?,
        paused_at_ms: r.u64()?,
    })
}

impl Engine {
    /// Every sale as an image, sorted by SKU (deterministic output).
    pub fn export(&self) -> Vec<SaleImage> {
        let mut images: Vec<SaleImage> = self
            .sales
            .iter()
            .map(|(&sku, s)| {
                let mut reservations: Vec<ReservationImage> = s
                    .reservations
                    .iter()
                    .map(|(&key, r)| ReservationImage {
                        id: key.id(),
                        user: r.user,
                        qty: r.qty,
                        state: r.state,
                        expires_at_ms: r.expires_at_ms,
                        settled_at_ms: r.settled_at_ms,
                        payment_ref: s.payment_refs.get(&key).map(|p| Bytes::copy_from_slice(p)),
                        location: s.locations[usize::from(r.location)].id,
                    })
                    .collect();
                reservations.sort_unstable_by_key(|r| r.id);
                SaleImage {
                    sku,
                    total: s.total,
                    available: s.available,
                    reserved: s.reserved,
                    sold: s.sold,
                    limit_per_user: s.limit_per_user,
                    ttl_ms: s.ttl_ms,
                    hot: s.hot,
                    pinned: s.pinned,
                    paused: s.paused,
                    reservations,
                    queue: s.queue.as_ref().map(|q| q.export()),
                    locations: s.location_statuses(),
                    regions: s.region_orders(),
                }
            })
            .collect();
        images.sort_unstable_by_key(|i| i.sku);
        images
    }

    /// Load a sale image (recovery). An image that contradicts itself (its
    /// counters do not add up or disagree with its reservations, a user
    /// above the limit, an id twice or claimed by another sale, a queue
    /// cursor beyond its line) is refused with the reason: serving from
    /// inconsistent state could oversell, and recovery falls back to an
    /// older snapshot or to the log instead. After an error this engine
    /// holds part of the image and must be discarded.
    pub fn import(&mut self, image: SaleImage) -> Result<(), String> {
        let mut claims = Vec::new();
        self.import_deferring_claims(image, &mut claims)?;
        for (id, sku) in claims {
            if matches!(self.directory.claim(id, sku), Claim::Conflict) {
                return Err(format!("reservation {id:#x} of sku {sku} belongs to another sku too"));
            }
        }
        Ok(())
    }

    /// [`Self::import`], leaving the id-directory claims to the caller as
    /// `(id, sku)` pairs (recovery makes them on another core meanwhile;
    /// a claim that conflicts means the image is inconsistent).
    pub fn import_deferring_claims(&mut self, image: SaleImage, claims: &mut Vec<(u128, u64)>) -> Result<(), String> {
        let sku = image.sku;
        let total = image.available.checked_add(image.reserved).and_then(|n| n.checked_add(image.sold));
        if total != Some(image.total) {
            return Err(format!(
                "sku {sku}: available {} + reserved {} + sold {} != total {}",
                image.available, image.reserved, image.sold, image.total
            ));
        }
        if self.sales.contains_key(&sku) {
            return Err(format!("sku {sku} appears twice"));
        }
        let locations = import_locations(&image)?;
        let regions = image
            .regions
            .iter()
            .map(|(region, order)| {
                let order = order
                    .iter()
                    .map(|id| locations.iter().position(|l| l.id == *id).map(|i| i as u8))
                    .collect::<Option<Box<[u8]>>>()
                    .ok_or_else(|| format!("sku {sku}: region {region} orders a location it does not have"))?;
                Ok((*region, order))
            })
            .collect::<Result<Vec<_>, String>>()?;
        // (reserved, sold) per location, from the reservations.
        let mut at = vec![(0u64, 0u64); locations.len()];
        if let Some(q) = &image.queue {
            if q.next > q.line.len() as u64 {
                return Err(format!("sku {sku}: queue cursor {} beyond its line of {}", q.next, q.line.len()));
            }
        }
        // Sized for every holder at once: growing it while importing
        // millions of entries would move them over and over.
        let holders = image.reservations.iter().filter(|r| matches!(r.state, HoldState::Held | HoldState::Confirmed));
        let mut users: FlatMap<u64, u32> = FlatMap::with_capacity(holders.count());
        let mut table = super::Holds::default();
        table.reserve(image.reservations.len());
        let mut payment_refs = FastMap::default();
        let mut held: Vec<(u64, u128)> = Vec::new();
        let (mut reserved, mut sold, mut holds) = (0u64, 0u64, 0u64);
        claims.reserve(image.reservations.len());
        let list = &image.reservations;
        for (i, r) in list.iter().enumerate() {
            // Prefetch a few entries ahead, as replay does: the tables are
            // far larger than the cache, and each insert would otherwise
            // wait for its misses one after the other.
            if let Some(ahead) = list.get(i + super::RESERVE_PREFETCH_AHEAD) {
                table.prefetch(&ahead.id.into());
                users.prefetch(&ahead.user);
            }
            let location = locations.iter().position(|l| l.id == r.location).ok_or_else(|| {
                format!("reservation {:#x} at location {}, which sku {sku} does not have", r.id, r.location)
            })?;
            match r.state {
                HoldState::Held => {
                    reserved += u64::from(r.qty);
                    holds += 1;
                    held.push((r.expires_at_ms, r.id));
                    *users.get_or_insert(r.user, 0) += r.qty;
                    at[location].0 += u64::from(r.qty);
                }
                HoldState::Confirmed => {
                    sold += u64::from(r.qty);
                    *users.get_or_insert(r.user, 0) += r.qty;
                    at[location].1 += u64::from(r.qty);
                }
                HoldState::Released | HoldState::Expired => {}
            }
            claims.push((r.id, sku));
            if let Some(payment_ref) = &r.payment_ref {
                payment_refs.insert(r.id.into(), payment_ref[..].into());
            }
            let added = table.insert(
                r.id.into(),
                Reservation {
                    sku,
                    user: r.user,
                    qty: r.qty,
                    state: r.state,
                    expires_at_ms: r.expires_at_ms,
                    settled_at_ms: r.settled_at_ms,
                    location: location as u8,
                },
            );
            if !added {
                return Err(format!("reservation {:#x} appears twice", r.id));
            }
        }
        if (reserved, sold) != (image.reserved, image.sold) {
            return Err(format!(
                "sku {sku}: counters say reserved {} and sold {}, its reservations add up to {reserved} and {sold}",
                image.reserved, image.sold
            ));
        }
        if let Some((l, _)) = locations.iter().zip(&at).find(|(l, at)| (l.reserved, l.sold) != **at) {
            return Err(format!("sku {sku} location {}: its counters disagree with its reservations", l.id));
        }
        if let Some((user, units)) = users.iter().find(|&(_, units)| units > image.limit_per_user) {
            return Err(format!(
                "sku {sku}: user {user} holds {units} units, above the limit {}",
                image.limit_per_user
            ));
        }
        held.sort_unstable();
        let sale = Sale {
            total: image.total,
            available: image.available,
            reserved,
            sold,
            locations,
            regions,
            limit_per_user: image.limit_per_user,
            ttl_ms: image.ttl_ms,
            hot: image.hot,
            pinned: image.pinned,
            paused: image.paused,
            holds,
            reservations: table,
            payment_refs,
            users,
            expiry: held
                .into_iter()
                .map(|(deadline, id)| ExpiryEntry::new(deadline, id))
                .collect::<super::chunked::ChunkedQueue<_>>(),
            gauge: Arc::new(SkuGauge::default()),
            queue: image.queue.map(|q| Box::new(WaitingRoom::import(q))),
            decided: Default::default(),
        };
        if sale.queue.is_some() {
            self.queued.push(sku);
        }
        sale.assert_invariant(sku);
        sale.publish();
        sale.publish_locations();
        self.sales.insert(sku, sale);
        Ok(())
    }

    /// A digest of each sale's complete state (counters, flags and every
    /// reservation), for checking that recovery restored exactly what was
    /// there. Stable across runs and hash seeds.
    pub fn digest(&self) -> std::collections::BTreeMap<u64, u64> {
        self.export()
            .into_iter()
            .map(|image| {
                let mut buf = BytesMut::new();
                image.encode(&mut buf);
                (image.sku, image_digest(&buf))
            })
            .collect()
    }
}

/// An image's locations, checked: each adds up, ids are distinct, and the
/// sums are the sale's counters.
fn import_locations(image: &SaleImage) -> Result<Vec<super::Location>, String> {
    let sku = image.sku;
    if image.locations.is_empty() || image.locations.len() > crate::limits::LOCATIONS_PER_SALE_MAX {
        return Err(format!("sku {sku}: {} locations", image.locations.len()));
    }
    let mut sums = (0u64, 0u64, 0u64, 0u64);
    let mut list: Vec<super::Location> = Vec::with_capacity(image.locations.len());
    for l in &image.locations {
        let total = l.available.checked_add(l.reserved).and_then(|n| n.checked_add(l.sold));
        if total != Some(l.total) {
            return Err(format!("sku {sku} location {}: its counters do not add up", l.location));
        }
        if list.iter().any(|x| x.id == l.location) {
            return Err(format!("sku {sku}: location {} appears twice", l.location));
        }
        sums = (
            sums.0.saturating_add(l.total),
            sums.1.saturating_add(l.available),
            sums.2.saturating_add(l.reserved),
            sums.3.saturating_add(l.sold),
        );
        list.push(super::Location {
            id: l.location,
            total: l.total,
            available: l.available,
            reserved: l.reserved,
            sold: l.sold,
        });
    }
    if sums != (image.total, image.available, image.reserved, image.sold) {
        return Err(format!("sku {sku}: the sale's counters are not the sums over its locations"));
    }
    Ok(list)
}

/// CRC-32C of the encoded image (hardware, a few GB/s: the simulator
/// compares states at every catch-up) in the high half, its length in the
/// low half.
fn image_digest(bytes: &[u8]) -> u64 {
    u64::from(crc32c::crc32c(bytes)) << 32 | bytes.len() as u64 & 0xffff_ffff
}
