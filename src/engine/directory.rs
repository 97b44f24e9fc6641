//! The global reservation-id directory: which SKU holds each reservation id.
//!
//! Reservation ids are chosen by clients and unique across the whole server,
//! but reservations live in the shard that owns their SKU. CONFIRM and
//! RELEASE carry only the id, so the connection task looks the id up here to
//! find the SKU (and from it the shard). The directory is also what rejects
//! one id reused for a different SKU, which no single shard could see.
//!
//! It is written by every shard thread (once per successful reservation) and
//! read by every connection task, so it must be lock-free. It is also the
//! costliest step of a reservation: claiming an id is an atomic
//! compare-and-swap on a random, usually uncached line, and a locked
//! instruction waits for its miss with nothing else overlapping. With a
//! general-purpose concurrent map (papaya) that one CAS was half of the
//! engine's time per reservation at 1M users.
//!
//! Hence two tiers:
//! - **main**: a presized open-addressing table of [`Slot`]s (128-bit id,
//!   SKU, ready flag; 32 bytes, two per cache line), linear probing within a
//!   window of [`DIRECTORY_PROBE_SLOTS`]. Insert-only: an id is claimed with
//!   one 128-bit CAS from 0 (ids are never 0), and slots never empty again.
//!   Its position is a pure function of the id, so a shard deciding a batch
//!   [`prefetch`](ReservationDirectory::prefetch)es the slots of the next
//!   requests and each CAS finds its line in cache.
//! - **overflow**: a papaya map for ids whose whole probe window is taken,
//!   which is how the directory grows past its presized size without a
//!   stop-the-world resize.
//!
//! Why the two tiers never disagree: an id goes to overflow only after its
//! window was seen full, and a full window stays full; an insert into main
//! needs an empty slot in the window, which a claimer of the same id would
//! have stopped at. So for any id, at most one tier can hold it, and a probe
//! that meets an empty slot in main knows overflow does not hold it either.
//!
//! A claim publishes the id first (the CAS), then the SKU, then `ready`.
//! A reader that finds its id not yet ready treats it as not there
//! (`sku_of`: the reservation is being decided and has not been answered)
//! or as a conflict (`claim`: the claimer is another shard thread, and one
//! SKU belongs to one shard, so it is a different SKU).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use foldhash::fast::RandomState;
use portable_atomic::AtomicU128;

use super::flat::{prefault, prefetch_line, zeroed, Zeroable};
use crate::limits::{DIRECTORY_IDS_PRESIZED, DIRECTORY_MAIN_SLOTS_MAX, DIRECTORY_PROBE_SLOTS};

/// One entry of the main table. All-zero bytes are an empty slot, so the
/// table is allocated zeroed and its pages are faulted in only when used.
#[repr(C, align(32))]
#[derive(Default)]
struct Slot {
    id: AtomicU128,
    sku: AtomicU64,
    /// 1 once `sku` is published.
    ready: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

// SAFETY: atomic integers, whose all-zero value is 0.
unsafe impl Zeroable for Slot {}

pub struct ReservationDirectory {
    main: Box<[Slot]>,
    mask: usize,
    hasher: RandomState,
    /// reservation id -> sku, for ids whose main window was full.
    overflow: papaya::HashMap<u128, u64, RandomState>,
}

/// Result of claiming an id for a SKU.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id was free and now belongs to the SKU.
    New,
    /// The id already belonged to this SKU (replay, or a retry).
    Same,
    /// The id belongs to another SKU.
    Conflict,
}

/// Where a probe of the main table ended.
enum Probe<'a> {
    /// The id's slot (ready or not).
    Found(&'a Slot),
    /// An empty slot where the id would go.
    Empty(&'a Slot),
    /// The whole window is taken by other ids: look in overflow.
    Full,
}

impl Default for ReservationDirectory {
    /// A small directory (tests, tools); servers use [`Self::for_server`].
    fn default() -> Self {
        Self::with_capacity(1024)
    }
}

impl ReservationDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sized for a large drop (`DIRECTORY_IDS_PRESIZED`) and prefaulted.
    pub fn for_server() -> Self {
        Self::with_capacity(DIRECTORY_IDS_PRESIZED).prefaulted()
    }

    /// Fault the main table in now, as a serving directory should be: when
    /// a server starts rather than under the first reservations of a drop
    /// (a page fault and a page of zeroing per 128 ids was a third of the
    /// reserve time in the engine benchmark, and the first requests of a
    /// drill waited on them). Not for throwaway directories (state dumps).
    pub fn prefaulted(mut self) -> Self {
        prefault(&mut self.main);
        self
    }

    /// Room for `capacity` ids at a load of at most one half in main (short
    /// probes), up to `DIRECTORY_MAIN_SLOTS_MAX`; overflow is presized for
    /// the rest, since resizing it is what papaya does slowest.
    pub fn with_capacity(capacity: usize) -> Self {
        let slots = (2 * capacity).next_power_of_two().clamp(DIRECTORY_PROBE_SLOTS, DIRECTORY_MAIN_SLOTS_MAX);
        let overflow_capacity = capacity.saturating_sub(slots / 2).max(1024);
        ReservationDirectory {
            main: zeroed(slots),
            mask: slots - 1,
            hasher: RandomState::default(),
            overflow: papaya::HashMap::builder()
                .hasher(RandomState::default())
                .capacity(overflow_capacity)
                // Blocking resizes finish sooner than incremental ones.
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
        }
    }

    fn home(&self, id: u128) -> usize {
        (self.hasher.hash_one(id) as usize) & self.mask
    }

    fn probe(&self, id: u128) -> Probe<'_> {
        let home = self.home(id);
        for step in 0..DIRECTORY_PROBE_SLOTS {
            let slot = &self.main[(home + step) & self.mask];
            match slot.id.load(Ordering::Acquire) {
                0 => return Probe::Empty(slot),
                current if current == id => return Probe::Found(slot),
                _ => {}
            }
        }
        Probe::Full
    }

    /// Start loading the line `id`'s claim or lookup will touch first, so a
    /// caller working through a batch overlaps the misses of the next ids
    /// with the work on this one. A hint only: no effect on results.
    #[inline]
    pub fn prefetch(&self, id: u128) {
        prefetch_line(&self.main[self.home(id)]);
    }

    /// Atomically claim `id` (never 0) for `sku`. Two shards racing for one
    /// id: exactly one gets `New`, the other `Conflict`.
    pub fn claim(&self, id: u128, sku: u64) -> Claim {
        assert_ne!(id, 0, "reservation id 0 is never valid");
        let mut probe = self.probe(id);
        loop {
            match probe {
                Probe::Found(slot) => {
                    let ready = slot.ready.load(Ordering::Acquire) == 1;
                    return if ready && slot.sku.load(Ordering::Relaxed) == sku {
                        Claim::Same
                    } else {
                        Claim::Conflict
                    };
                }
                Probe::Empty(slot) => match slot.id.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        slot.sku.store(sku, Ordering::Relaxed);
                        slot.ready.store(1, Ordering::Release);
                        return Claim::New;
                    }
                    // Another id took this slot first (or the same id, on
                    // another thread): look again from the start.
                    Err(_) => probe = self.probe(id),
                },
                Probe::Full => {
                    return match self.overflow.pin().try_insert(id, sku) {
                        Ok(_) => Claim::New,
                        Err(occupied) if *occupied.current == sku => Claim::Same,
                        Err(_) => Claim::Conflict,
                    };
                }
            }
        }
    }

    /// The SKU that holds `id`, if any.
    pub fn sku_of(&self, id: u128) -> Option<u64> {
        match self.probe(id) {
            Probe::Found(slot) => (slot.ready.load(Ordering::Acquire) == 1).then(|| slot.sku.load(Ordering::Relaxed)),
            Probe::Empty(_) => None,
            Probe::Full => self.overflow.pin().get(&id).copied(),
        }
    }

    /// Ids held (a full scan of main: for tests and tools, not hot paths).
    pub fn len(&self) -> usize {
        let main = self.main.iter().filter(|slot| slot.ready.load(Ordering::Acquire) == 1).count();
        main + self.overflow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids held in overflow (tests: the fallback tier is exercised).
    pub fn overflow_len(&self) -> usize {
        self.overflow.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn claim_same_conflict_and_lookup() {
        let dir = ReservationDirectory::new();
        assert_eq!(dir.claim(7, 1), Claim::New);
        assert_eq!(dir.claim(7, 1), Claim::Same);
        assert_eq!(dir.claim(7, 2), Claim::Conflict);
        assert_eq!(dir.sku_of(7), Some(1));
        assert_eq!(dir.sku_of(8), None);
        // Ids differing only in their high half are different ids.
        assert_eq!(dir.claim(7 | (1 << 64), 3), Claim::New);
        assert_eq!(dir.sku_of(7 | (1 << 64)), Some(3));
        assert_eq!(dir.len(), 2);
    }

    /// Past its main table the directory goes on in overflow, and every id
    /// is found in exactly the tier it was claimed in.
    #[test]
    fn grows_through_overflow() {
        let dir = ReservationDirectory::with_capacity(16);
        let slots = dir.main.len() as u128;
        let n = 4 * slots;
        for id in 1..=n {
            assert_eq!(dir.claim(id, (id % 5) as u64), Claim::New, "id {id}");
        }
        assert!(dir.overflow_len() > 0, "the small main table must have overflowed");
        for id in 1..=n {
            assert_eq!(dir.sku_of(id), Some((id % 5) as u64), "id {id}");
            assert_eq!(dir.claim(id, (id % 5) as u64), Claim::Same, "id {id}");
            assert_eq!(dir.claim(id, 99), Claim::Conflict, "id {id}");
        }
        assert_eq!(dir.len() as u128, n);
    }

    /// Threads race to claim overlapping ids for different SKUs: each id is
    /// won exactly once, and every loser sees a conflict, in both tiers.
    /// Seeded rounds; the seed is printed on failure.
    #[test]
    fn racing_claims_have_one_winner() {
        for seed in 0..20u64 {
            let dir = Arc::new(ReservationDirectory::with_capacity(64));
            let ids: Arc<Vec<u128>> = Arc::new(
                (0..2_000u64).map(|i| u128::from(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed) | 1 << 100).collect(),
            );
            let threads: Vec<_> = (0..4u64)
                .map(|sku| {
                    let (dir, ids) = (dir.clone(), ids.clone());
                    std::thread::spawn(move || {
                        let order: Vec<u128> = if sku % 2 == 0 {
                            ids.iter().copied().collect()
                        } else {
                            ids.iter().rev().copied().collect()
                        };
                        order.into_iter().filter(|&id| dir.claim(id, sku) == Claim::New).collect::<Vec<_>>()
                    })
                })
                .collect();
            let won: Vec<Vec<u128>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let total: usize = won.iter().map(Vec::len).sum();
            assert_eq!(total, ids.len(), "seed {seed}: every id won exactly once");
            for (sku, ids) in won.iter().enumerate() {
                for &id in ids {
                    assert_eq!(dir.sku_of(id), Some(sku as u64), "seed {seed}: id {id:#x}");
                }
            }
        }
    }
}
