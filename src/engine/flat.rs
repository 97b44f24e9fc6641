//! A small single-threaded hash map whose lookups can be prefetched.
//!
//! Why not `std::collections::HashMap`: a shard deciding a run of RESERVEs
//! for a million distinct users misses the cache in every table it touches
//! (the id index, the per-user record), and those misses, one after the
//! other, were most of a decision's cost. std's map (hashbrown) offers no
//! way to know where a key's probe starts, so nothing can be loaded ahead.
//! Here the probe starts at a slot that is a pure function of the key, and
//! [`FlatMap::prefetch`] loads its line while earlier requests are decided.
//!
//! The shape is the plainest that does the job: open addressing with
//! linear probing over `(key, value)` slots of plain integers, at most half
//! full (short probes, and a miss on an absent key ends at the first empty
//! slot), doubled when full, deletion by backward shift (no tombstones).
//! The all-zero key marks an empty slot; the one real key equal to it is
//! kept aside. Allocated zeroed, so a presized table costs memory only as
//! its pages are touched. The `flat_map_matches_std` property test checks
//! it against std's map.

use std::hash::{BuildHasher, Hash};

use foldhash::fast::RandomState;

/// Plain integer types (and aggregates of them) whose all-zero bytes are a
/// valid value, so a table of them can come from zeroed memory.
///
/// # Safety
/// Implement only for types where every all-zero bit pattern is valid.
pub unsafe trait Zeroable {}

// SAFETY: plain integers.
unsafe impl Zeroable for u32 {}
// SAFETY: `repr(C)` pair of zero-valid types.
unsafe impl<K: Zeroable + Copy, V: Zeroable + Copy> Zeroable for Slot<K, V> {}
// SAFETY: plain integers.
unsafe impl Zeroable for u64 {}
// SAFETY: plain integers.
unsafe impl Zeroable for [u64; 2] {}
// SAFETY: an atomic integer has the bit validity of its integer.
unsafe impl Zeroable for std::sync::atomic::AtomicU64 {}

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot<K: Copy, V: Copy> {
    key: K,
    value: V,
}

pub struct FlatMap<K: Copy, V: Copy> {
    slots: Box<[Slot<K, V>]>,
    mask: usize,
    /// Occupied slots (not counting `zero_key`).
    len: usize,
    /// The value of the all-zero key, which cannot live in a slot.
    zero_key: Option<V>,
    hasher: RandomState,
}

const MIN_SLOTS: usize = 16;

impl<K: Zeroable + Copy + Eq + Hash, V: Zeroable + Copy> Default for FlatMap<K, V> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<K: Zeroable + Copy + Eq + Hash, V: Zeroable + Copy> FlatMap<K, V> {
    /// Room for `capacity` keys without growing.
    pub fn with_capacity(capacity: usize) -> Self {
        let slots = (2 * capacity).next_power_of_two().max(MIN_SLOTS);
        FlatMap { slots: zeroed(slots), mask: slots - 1, len: 0, zero_key: None, hasher: RandomState::default() }
    }

    fn zero() -> K {
        unsafe_zeroed()
    }

    fn home(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) & self.mask
    }

    pub fn len(&self) -> usize {
        self.len + usize::from(self.zero_key.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Make room for `additional` more keys without growing.
    pub fn reserve(&mut self, additional: usize) {
        let needed = 2 * (self.len + additional);
        if needed > self.slots.len() {
            self.resize(needed.next_power_of_two());
        }
    }

    /// Allocate every page of the table now (see [`prefault`]).
    pub fn prefault(&mut self) {
        prefault(&mut self.slots);
    }

    /// Start loading the line where `key`'s probe begins (a hint only).
    #[inline]
    pub fn prefetch(&self, key: &K) {
        prefetch_line(&self.slots[self.home(key)]);
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: &K) -> (usize, bool) {
        let zero = Self::zero();
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            if slot.key == *key {
                return (i, true);
            }
            if slot.key == zero {
                return (i, false);
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        if *key == Self::zero() {
            return self.zero_key;
        }
        let (i, found) = self.find(key);
        found.then(|| self.slots[i].value)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key`, inserting `default` first if it is absent.
    pub fn get_or_insert(&mut self, key: K, default: V) -> &mut V {
        if key == Self::zero() {
            return self.zero_key.get_or_insert(default);
        }
        if 2 * (self.len + 1) > self.slots.len() {
            self.resize(2 * self.slots.len());
        }
        let (i, found) = self.find(&key);
        if !found {
            self.slots[i] = Slot { key, value: default };
            self.len += 1;
        }
        &mut self.slots[i].value
    }

    /// Insert or overwrite; returns the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let previous = self.get(&key);
        *self.get_or_insert(key, value) = value;
        previous
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        if *key == Self::zero() {
            return self.zero_key.as_mut();
        }
        let (i, found) = self.find(key);
        found.then(|| &mut self.slots[i].value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        if *key == Self::zero() {
            return self.zero_key.take();
        }
        let (mut hole, found) = self.find(key);
        if !found {
            return None;
        }
        let value = self.slots[hole].value;
        // Backward shift: move later members of the run into the hole when
        // their home is not between the hole and them (cyclically), so every
        // key stays reachable from its home without tombstones.
        let zero = Self::zero();
        let mut i = (hole + 1) & self.mask;
        loop {
            let slot = self.slots[i];
            if slot.key == zero {
                break;
            }
            let home = self.home(&slot.key);
            let distance_home = i.wrapping_sub(home) & self.mask;
            let distance_hole = i.wrapping_sub(hole) & self.mask;
            if distance_home >= distance_hole {
                self.slots[hole] = slot;
                hole = i;
            }
            i = (i + 1) & self.mask;
        }
        self.slots[hole] = Slot { key: zero, value: unsafe_zeroed() };
        self.len -= 1;
        Some(value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (K, V)> + '_ {
        let zero = Self::zero();
        self.zero_key
            .map(|v| (zero, v))
            .into_iter()
            .chain(self.slots.iter().filter(move |s| s.key != zero).map(|s| (s.key, s.value)))
    }

    pub fn values(&self) -> impl Iterator<Item = V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, zeroed(slots));
        self.mask = slots - 1;
        self.len = 0;
        let zero = Self::zero();
        for slot in old.iter().filter(|s| s.key != zero) {
            let (i, _) = self.find(&slot.key);
            self.slots[i] = *slot;
            self.len += 1;
        }
    }
}

impl<K: Zeroable + Copy + Eq + Hash + Ord, V: Zeroable + Copy + PartialEq> PartialEq for FlatMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(&k) == Some(v))
    }
}

impl<K: Zeroable + Copy + Eq + Hash + Ord + std::fmt::Debug, V: Zeroable + Copy + std::fmt::Debug> std::fmt::Debug
    for FlatMap<K, V>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut entries: Vec<(K, V)> = self.iter().collect();
        entries.sort_unstable_by_key(|a| a.0);
        f.debug_map().entries(entries.iter().map(|(k, v)| (k, v))).finish()
    }
}

/// Start loading the cache line holding `value` (a hint: no effect on
/// results, never faults).
#[inline]
pub fn prefetch_line<T>(value: &T) {
    let ptr: *const T = value;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching never faults and reads nothing; the address is
    // that of a live value. SSE is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(ptr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Write one byte of every page of `values` (keeping its value), so the
/// pages are allocated now rather than at their first use. For a table
/// whose first use is a flash sale's first second: every early request
/// would otherwise touch a fresh page at random, and a fresh (huge) page is
/// a fault and up to 2 MiB of zeroing on the shard thread.
pub fn prefault<T>(values: &mut [T]) {
    let bytes = std::mem::size_of_val(values);
    let base = values.as_mut_ptr().cast::<u8>();
    for offset in (0..bytes).step_by(4096) {
        // SAFETY: `offset` is within the slice's bytes, which we hold
        // exclusively; the byte is read and written back unchanged
        // (volatile, so the write is not optimised away).
        unsafe {
            let byte = base.add(offset);
            std::ptr::write_volatile(byte, std::ptr::read_volatile(byte));
        }
    }
}

/// `n` zeroed values: the allocator hands back untouched pages for a large
/// table, so a presized table costs resident memory only as it fills.
pub fn zeroed<T: Zeroable>(n: usize) -> Box<[T]> {
    let layout = std::alloc::Layout::array::<T>(n).expect("table size");
    if layout.size() == 0 {
        return (0..n).map(|_| unsafe_zeroed()).collect();
    }
    // SAFETY: non-zero size, checked above.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: a live allocation of `Layout::array::<T>(n)`, which is what
    // `Box<[T]>` frees; all-zero bytes are a valid `T` (`Zeroable`).
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) }
}

fn unsafe_zeroed<T: Zeroable>() -> T {
    // SAFETY: `T: Zeroable`.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Bump(u64),
        Remove(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys (collisions, runs, key 0) and some large ones.
        let key = prop_oneof![0u64..40, any::<u64>()];
        prop_oneof![
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Bump),
            key.prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Random inserts, in-place updates and removals agree with std's
        /// map after every step (growth and backward-shift deletion).
        #[test]
        fn flat_map_matches_std(ops in proptest::collection::vec(op(), 1..400)) {
            let mut flat: FlatMap<u64, u32> = FlatMap::default();
            let mut model: HashMap<u64, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(flat.insert(k, v), model.insert(k, v)),
                    Op::Bump(k) => {
                        *flat.get_or_insert(k, 0) += 1;
                        *model.entry(k).or_insert(0) += 1;
                    }
                    Op::Remove(k) => prop_assert_eq!(flat.remove(&k), model.remove(&k)),
                }
                prop_assert_eq!(flat.len(), model.len());
            }
            for (k, v) in &model {
                prop_assert_eq!(flat.get(k), Some(*v));
            }
            let mut seen: Vec<(u64, u32)> = flat.iter().collect();
            let mut expected: Vec<(u64, u32)> = model.into_iter().collect();
            seen.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(seen, expected);
        }
    }
}
