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
//! Hence a chain of insert-only open-addressing tiers of [`Slot`]s
//! (128-bit id, SKU, ready flag; 32 bytes, two per cache line), each with
//! linear probing within a window of [`DIRECTORY_PROBE_SLOTS`]. An id is
//! claimed with one 128-bit CAS from 0 (ids are never 0), and slots never
//! empty again. Its position in a tier is a pure function of the id, so a
//! shard deciding a batch [`prefetch`](ReservationDirectory::prefetch)es
//! the slots of the next requests and each CAS finds its line in cache.
//!
//! The first tier is presized (a server's, for a large drop). An id whose
//! window is full goes on to the next tier, twice the size of the one
//! before; the first claim to find the last tier's window full adds one.
//! A new tier is fresh zeroed memory: nothing is ever copied, so the
//! directory grows to any size without a stop-the-world resize. (Its
//! former overflow tier, a papaya map, resized by copying: at ten million
//! ids, stalls of seconds for every thread that touched it.)
//!
//! Why the tiers never disagree: an id goes to tier k + 1 only after its
//! window in tier k was seen full, and a full window stays full; an insert
//! into tier k needs an empty slot in the window, which a claimer of the
//! same id would have stopped at. So for any id, at most one tier can hold
//! it, and a probe that meets an empty slot knows no later tier holds it.
//!
//! A claim publishes the id first (the CAS), then the SKU, then `ready`.
//! A reader that finds its id not yet ready treats it as not there
//! (`sku_of`: the reservation is being decided and has not been answered)
//! or as a conflict (`claim`: the claimer is another shard thread, and one
//! SKU belongs to one shard, so it is a different SKU).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use foldhash::fast::RandomState;
use portable_atomic::AtomicU128;

use super::flat::{populate_shared, prefault, prefetch_line, zeroed, Table, Zeroable, TABLE_IN_BACKGROUND_BYTES};
use crate::limits::{DIRECTORY_IDS_PRESIZED, DIRECTORY_MAIN_SLOTS_MAX, DIRECTORY_PROBE_SLOTS, DIRECTORY_TIERS_MAX};

/// One entry of a tier. All-zero bytes are an empty slot, so a tier is
/// allocated zeroed and its pages are faulted in only when used.
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
    /// Shared with the helper threads that prepare the next tier.
    chain: Arc<Chain>,
    hasher: RandomState,
}

/// Tiers in order, each twice the size of the one before; a null pointer
/// ends the chain. Only ever added to (one CAS from null) and freed with
/// the chain, so readers never wait and never see a tier go away.
struct Chain {
    tiers: [AtomicPtr<Tier>; DIRECTORY_TIERS_MAX],
}

impl Drop for Chain {
    fn drop(&mut self) {
        for tier in &mut self.tiers {
            let ptr = *tier.get_mut();
            if !ptr.is_null() {
                // SAFETY: every non-null pointer came from `Box::into_raw`
                // in `publish` and is freed only here, once (`&mut self`).
                drop(unsafe { Box::from_raw(ptr) });
            }
        }
    }
}

impl Chain {
    /// Tier `k`, if it exists.
    #[inline]
    fn tier(&self, k: usize) -> Option<&Tier> {
        let ptr = self.tiers.get(k)?.load(Ordering::Acquire);
        // SAFETY: a non-null tier pointer stays valid until the chain is
        // dropped, which cannot happen while `&self` is alive.
        (!ptr.is_null()).then(|| unsafe { &*ptr })
    }

    /// Make `tier` tier `k`, unless another thread did first: returns the
    /// one in place.
    fn publish(&self, k: usize, tier: Tier) -> &Tier {
        let fresh = Box::into_raw(Box::new(tier));
        match self.tiers[k].compare_exchange(std::ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: just published; valid until the chain is dropped.
            Ok(_) => unsafe { &*fresh },
            // SAFETY: `fresh` came from `Box::into_raw` above and was never
            // published; `theirs` is, and is valid until the chain is dropped.
            Err(theirs) => unsafe {
                drop(Box::from_raw(fresh));
                &*theirs
            },
        }
    }
}

struct Tier {
    slots: Table<Slot>,
    mask: usize,
    /// Ids claimed into this tier, counted without a locked instruction
    /// (a plain load and store: shards racing may lose a count, which
    /// only delays the next tier's preparation a little). On a cache line
    /// of its own: a shard writes it at every claim, and the line with
    /// `slots` and `mask` is read by every lookup on the I/O threads.
    claimed: CacheLine<AtomicUsize>,
    /// Whether the next tier's preparation has been asked for.
    next_requested: AtomicBool,
}

impl Tier {
    fn new(slots: usize) -> Tier {
        Tier {
            slots: zeroed(slots),
            mask: slots - 1,
            claimed: CacheLine(AtomicUsize::new(0)),
            next_requested: AtomicBool::new(false),
        }
    }

    /// Whether a tier of `slots` is small enough to fault in on the spot
    /// rather than on a helper thread.
    fn small(slots: usize) -> bool {
        slots * std::mem::size_of::<Slot>() < TABLE_IN_BACKGROUND_BYTES
    }

    /// A tier with its pages resident and writable (see `prefault`: a
    /// probe reads a slot before the claim writes it, and a page read
    /// first costs an inter-processor interrupt when first written).
    fn prefaulted(slots: usize) -> Tier {
        let mut tier = Tier::new(slots);
        prefault(&mut tier.slots);
        tier
    }

    #[inline]
    fn home(&self, hash: u64) -> &Slot {
        &self.slots[hash as usize & self.mask]
    }

    #[inline]
    fn probe(&self, id: u128, hash: u64) -> Probe<'_> {
        let home = hash as usize & self.mask;
        for step in 0..DIRECTORY_PROBE_SLOTS {
            let slot = &self.slots[(home + step) & self.mask];
            match slot.id.load(Ordering::Acquire) {
                0 => return Probe::Empty(slot),
                current if current == id => return Probe::Found(slot),
                _ => {}
            }
        }
        Probe::Full
    }
}

/// A value alone on its cache line (no false sharing with its neighbours).
#[repr(align(64))]
struct CacheLine<T>(T);

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

/// Where a probe of one tier ended.
enum Probe<'a> {
    /// The id's slot (ready or not).
    Found(&'a Slot),
    /// An empty slot where the id would go.
    Empty(&'a Slot),
    /// The whole window is taken by other ids: look in the next tier.
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

    /// Fault the first tier in now, as a serving directory should be: when
    /// a server starts rather than under the first reservations of a drop
    /// (a page fault and a page of zeroing per 128 ids was a third of the
    /// reserve time in the engine benchmark, and the first requests of a
    /// drill waited on them). Not for throwaway directories (state dumps).
    pub fn prefaulted(mut self) -> Self {
        let chain = Arc::get_mut(&mut self.chain).expect("not shared before it serves");
        let first = *chain.tiers[0].get_mut();
        // SAFETY: the first tier exists from construction, and the chain is
        // exclusively ours (checked above).
        prefault(&mut unsafe { &mut *first }.slots);
        self
    }

    /// A first tier with room for `capacity` ids at a load of at most one
    /// half (short probes), up to `DIRECTORY_MAIN_SLOTS_MAX`; more ids go
    /// on in further tiers.
    pub fn with_capacity(capacity: usize) -> Self {
        let slots = (2 * capacity).next_power_of_two().clamp(DIRECTORY_PROBE_SLOTS, DIRECTORY_MAIN_SLOTS_MAX);
        let chain = Chain { tiers: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())) };
        chain.publish(0, Tier::new(slots));
        ReservationDirectory { chain: Arc::new(chain), hasher: RandomState::default() }
    }

    #[inline]
    fn hash(&self, id: u128) -> u64 {
        self.hasher.hash_one(id)
    }

    #[inline]
    fn tier(&self, k: usize) -> Option<&Tier> {
        self.chain.tier(k)
    }

    /// Tier `k`, adding it if it does not exist yet: a claim found every
    /// window before it full. That happens early now and then (a cluster
    /// in a tier far from full), for a handful of ids, so a big tier added
    /// here is left to fault in page by page as ids land in it; it is
    /// faulted in as a whole once the tier before it is half full
    /// ([`Self::count_claim`]).
    fn tier_or_add(&self, k: usize) -> &Tier {
        if let Some(tier) = self.tier(k) {
            return tier;
        }
        assert!(k < DIRECTORY_TIERS_MAX, "reservation directory: all {DIRECTORY_TIERS_MAX} tiers full");
        let slots = 2 * self.tier(k - 1).expect("tiers are added in order").slots.len();
        self.chain.publish(k, if Tier::small(slots) { Tier::prefaulted(slots) } else { Tier::new(slots) })
    }

    /// Count a claim into tier `k`. Once it holds as many ids as it was
    /// sized for (half its slots), before ids spill on in earnest (windows
    /// fill at about two thirds), a helper thread prepares tier `k + 1`:
    /// allocated and faulted in, then published (if it is big enough to be
    /// worth a thread; a small one is faulted in when it is added). A
    /// directory that never outgrows its presized first tier never spends
    /// the memory.
    fn count_claim(&self, k: usize, tier: &Tier) {
        let claimed = tier.claimed.0.load(Ordering::Relaxed) + 1;
        tier.claimed.0.store(claimed, Ordering::Relaxed);
        if 2 * claimed < tier.slots.len() || tier.next_requested.load(Ordering::Relaxed) {
            return;
        }
        if tier.next_requested.swap(true, Ordering::Relaxed) || k + 1 >= DIRECTORY_TIERS_MAX {
            return;
        }
        let slots = 2 * tier.slots.len();
        if Tier::small(slots) {
            return;
        }
        let chain = self.chain.clone();
        // No thread (resource limits): the tier faults in page by page.
        let _ = std::thread::Builder::new().name("directory-tier".into()).spawn(move || match chain.tier(k + 1) {
            // Added early by a claim: fault it in where it is, in use.
            Some(tier) => populate_shared(&tier.slots),
            // Published only once faulted in. A claim that needed it
            // before added its own (and ours is freed, see `publish`):
            // fault in that one, where it is.
            None => populate_shared(&chain.publish(k + 1, Tier::prefaulted(slots)).slots),
        });
    }

    /// Start loading the lines `id`'s claim or lookup will touch first, so
    /// a caller working through a batch overlaps the misses of the next ids
    /// with the work on this one. A hint only: no effect on results.
    ///
    /// That is its home in the first tier, and in each further tier while
    /// the one before is more than 5/8 full: below that, windows are
    /// seldom full, ids seldom go on, and loading a line of the next tier
    /// for every id would only cost memory bandwidth (and, in a tier still
    /// being faulted in, page faults).
    #[inline]
    pub fn prefetch(&self, id: u128) {
        let hash = self.hash(id);
        let mut k = 0;
        while let Some(tier) = self.tier(k) {
            prefetch_line(tier.home(hash));
            if 8 * tier.claimed.0.load(Ordering::Relaxed) < 5 * tier.slots.len() {
                break;
            }
            k += 1;
        }
    }

    /// Atomically claim `id` (never 0) for `sku`. Two shards racing for one
    /// id: exactly one gets `New`, the other `Conflict`.
    pub fn claim(&self, id: u128, sku: u64) -> Claim {
        assert_ne!(id, 0, "reservation id 0 is never valid");
        let hash = self.hash(id);
        let mut k = 0;
        loop {
            let tier = self.tier_or_add(k);
            match tier.probe(id, hash) {
                Probe::Found(slot) => {
                    let ready = slot.ready.load(Ordering::Acquire) == 1;
                    return if ready && slot.sku.load(Ordering::Relaxed) == sku {
                        Claim::Same
                    } else {
                        Claim::Conflict
                    };
                }
                Probe::Empty(slot) => {
                    if slot.id.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        slot.sku.store(sku, Ordering::Relaxed);
                        slot.ready.store(1, Ordering::Release);
                        self.count_claim(k, tier);
                        return Claim::New;
                    }
                    // Another id took this slot first (or the same id, on
                    // another thread): probe this tier again.
                }
                Probe::Full => k += 1,
            }
        }
    }

    /// The SKU that holds `id`, if any.
    pub fn sku_of(&self, id: u128) -> Option<u64> {
        let hash = self.hash(id);
        let mut k = 0;
        while let Some(tier) = self.tier(k) {
            match tier.probe(id, hash) {
                Probe::Found(slot) => {
                    return (slot.ready.load(Ordering::Acquire) == 1).then(|| slot.sku.load(Ordering::Relaxed))
                }
                Probe::Empty(_) => return None,
                Probe::Full => k += 1,
            }
        }
        None
    }

    /// Ids held (a full scan: for tests and tools, not hot paths).
    pub fn len(&self) -> usize {
        (0..DIRECTORY_TIERS_MAX)
            .map_while(|k| self.tier(k))
            .map(|tier| tier.slots.iter().filter(|slot| slot.ready.load(Ordering::Acquire) == 1).count())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tiers in use (tests: growth is exercised).
    pub fn tiers(&self) -> usize {
        (0..DIRECTORY_TIERS_MAX).map_while(|k| self.tier(k)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Past its first tier the directory goes on in further tiers, and
    /// every id is found in exactly the tier it was claimed in.
    #[test]
    fn grows_through_tiers() {
        let dir = ReservationDirectory::with_capacity(16);
        let slots = dir.tier(0).unwrap().slots.len() as u128;
        let n = 40 * slots;
        for id in 1..=n {
            assert_eq!(dir.claim(id, (id % 5) as u64), Claim::New, "id {id}");
        }
        assert!(dir.tiers() >= 4, "the small first tier must have grown a chain: {} tiers", dir.tiers());
        for id in 1..=n {
            assert_eq!(dir.sku_of(id), Some((id % 5) as u64), "id {id}");
            assert_eq!(dir.claim(id, (id % 5) as u64), Claim::Same, "id {id}");
            assert_eq!(dir.claim(id, 99), Claim::Conflict, "id {id}");
        }
        assert_eq!(dir.len() as u128, n);
    }

    /// Threads race to claim overlapping ids for different SKUs (and to add
    /// tiers): each id is won exactly once, and every loser sees a conflict.
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
            assert!(dir.tiers() > 2, "seed {seed}: the race also added tiers");
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
