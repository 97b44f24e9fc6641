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
//! slot), grown at half full into a table twice the size a few slots at a
//! time (see `grow`), deletion by backward shift (no tombstones).
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
    slots: Table<Slot<K, V>>,
    mask: usize,
    /// Keys in `slots` plus keys still in `old` (not counting `zero_key`).
    len: usize,
    /// The value of the all-zero key, which cannot live in a slot.
    zero_key: Option<V>,
    hasher: RandomState,
    /// The table before the last growth, while its keys move over.
    old: Option<Old<K, V>>,
    /// The next table, being allocated and faulted in by a helper thread
    /// (big tables only; see `prepare_successor`).
    successor: Option<std::thread::JoinHandle<Table<Slot<K, V>>>>,
    /// Keys the table was sized for (`with_capacity`, `reserve`): no
    /// successor is prepared before it holds more.
    presized: usize,
}

/// A table being emptied into its successor, a few slots per insert.
struct Old<K: Copy, V: Copy> {
    slots: Table<Slot<K, V>>,
    mask: usize,
    /// Next slot to move. Always at an empty slot between steps: keys move
    /// a whole run (the occupied slots between two empty ones) at a time,
    /// and a key's probe never leaves its run, so a key still here is
    /// found from its home exactly as before the growth began.
    cursor: usize,
    /// Slots not visited yet.
    left: usize,
}

const MIN_SLOTS: usize = 16;

/// A table at least this big is worth a helper thread: a directory tier
/// faulted in ahead (768 MiB takes ~250 ms here, which would otherwise
/// stall the shard thread), a table freed after a growth (unmapping a
/// gigabyte takes tens of milliseconds). A smaller one is faulted in and
/// freed on the spot (4 MiB: about a millisecond). Engine tables prepare
/// their successor ahead only from `SUCCESSOR_AHEAD_BYTES`.
pub(crate) const TABLE_IN_BACKGROUND_BYTES: usize = 4 << 20;

/// A successor table at least this big is prepared ahead (see
/// `prepare_successor`); a smaller one is faulted in when the growth
/// begins, a stall of ~1 ms per 3 MiB here (128 MiB: ~40 ms, once, at 4M
/// keys of 16 bytes). Holding a successor ahead costs twice the table's
/// memory for an eighth of its life; below this size that is not worth
/// the stall it saves.
const SUCCESSOR_AHEAD_BYTES: usize = 128 << 20;

/// Old slots visited per insert while a growth is under way. A growth
/// begins when the table is half full, with a successor twice its size,
/// which is half full again after as many inserts as the old table has
/// keys, i.e. half its slots: any budget of at least 2 slots per insert
/// ends the move in time. 8 ends it within an eighth of that, so lookups
/// seldom pay a second probe in the old table.
const MOVE_SLOTS_PER_INSERT: usize = 8;

impl<K: Zeroable + Copy + Eq + Hash + Send + 'static, V: Zeroable + Copy + Send + 'static> Default for FlatMap<K, V> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<K: Zeroable + Copy + Eq + Hash + Send + 'static, V: Zeroable + Copy + Send + 'static> FlatMap<K, V> {
    /// Room for `capacity` keys without growing.
    pub fn with_capacity(capacity: usize) -> Self {
        let slots = (2 * capacity).next_power_of_two().max(MIN_SLOTS);
        FlatMap {
            slots: zeroed(slots),
            mask: slots - 1,
            len: 0,
            zero_key: None,
            hasher: RandomState::default(),
            old: None,
            successor: None,
            presized: capacity,
        }
    }

    fn zero() -> K {
        unsafe_zeroed()
    }

    #[inline]
    fn hash(&self, key: &K) -> usize {
        self.hasher.hash_one(key) as usize
    }

    pub fn len(&self) -> usize {
        self.len + usize::from(self.zero_key.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Make room for `additional` more keys without growing (at once, not
    /// incrementally: this is for presizing, before the table is busy).
    pub fn reserve(&mut self, additional: usize) {
        let needed = 2 * (self.len + additional);
        if needed > self.slots.len() {
            self.finish_growth();
            // A successor prepared for the current size would be too small.
            self.successor = None;
            self.presized = self.len + additional;
            let old = std::mem::replace(&mut self.slots, zeroed(needed.next_power_of_two()));
            self.mask = self.slots.len() - 1;
            for slot in old.iter().filter(|s| s.key != Self::zero()) {
                let (i, _) = probe(&self.slots, self.mask, self.hash(&slot.key), &slot.key);
                self.slots[i] = *slot;
            }
        }
    }

    /// Allocate every page of the table now (see [`prefault`]).
    pub fn prefault(&mut self) {
        prefault(&mut self.slots);
    }

    /// Start loading the line where `key`'s probe begins (a hint only).
    #[inline]
    pub fn prefetch(&self, key: &K) {
        let hash = self.hash(key);
        prefetch_line(&self.slots[hash & self.mask]);
        if let Some(old) = &self.old {
            prefetch_line(&old.slots[hash & old.mask]);
        }
    }

    /// Where `key` is: `Some((in_old, slot))`, or `None` with the empty
    /// slot of the current table where it would go.
    #[inline]
    fn locate(&self, key: &K) -> Result<(bool, usize), usize> {
        let hash = self.hash(key);
        let (i, found) = probe(&self.slots, self.mask, hash, key);
        if found {
            return Ok((false, i));
        }
        if let Some(old) = &self.old {
            if let (j, true) = probe(&old.slots, old.mask, hash, key) {
                return Ok((true, j));
            }
        }
        Err(i)
    }

    #[inline]
    fn slot_mut(&mut self, in_old: bool, i: usize) -> &mut Slot<K, V> {
        match &mut self.old {
            Some(old) if in_old => &mut old.slots[i],
            _ => &mut self.slots[i],
        }
    }

    #[inline]
    pub fn get(&self, key: &K) -> Option<V> {
        if *key == Self::zero() {
            return self.zero_key;
        }
        match self.locate(key) {
            Ok((false, i)) => Some(self.slots[i].value),
            Ok((true, i)) => self.old.as_ref().map(|old| old.slots[i].value),
            Err(_) => None,
        }
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key`, inserting `default` first if it is absent.
    #[inline]
    pub fn get_or_insert(&mut self, key: K, default: V) -> &mut V {
        if key == Self::zero() {
            return self.zero_key.get_or_insert(default);
        }
        if self.old.is_some() {
            self.move_some(MOVE_SLOTS_PER_INSERT);
        }
        if 2 * (self.len + 1) > self.slots.len() && self.locate(&key).is_err() {
            self.grow();
        }
        let (in_old, i) = match self.locate(&key) {
            Ok(found) => found,
            Err(empty) => {
                self.slots[empty] = Slot { key, value: default };
                self.len += 1;
                if 8 * self.len >= 3 * self.slots.len() && self.successor.is_none() && self.successor_worth_preparing()
                {
                    self.prepare_successor();
                }
                (false, empty)
            }
        };
        &mut self.slot_mut(in_old, i).value
    }

    /// Insert or overwrite; returns the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let previous = self.get(&key);
        *self.get_or_insert(key, value) = value;
        previous
    }

    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        if *key == Self::zero() {
            return self.zero_key.as_mut();
        }
        let (in_old, i) = self.locate(key).ok()?;
        Some(&mut self.slot_mut(in_old, i).value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        if *key == Self::zero() {
            return self.zero_key.take();
        }
        let (in_old, i) = self.locate(key).ok()?;
        let hasher = &self.hasher;
        let value = match &mut self.old {
            // The hole's run stays where it is, on the cursor's unmoved
            // side: backward shift moves keys only within their run.
            Some(old) if in_old => remove_at(&mut old.slots, old.mask, hasher, i),
            _ => remove_at(&mut self.slots, self.mask, hasher, i),
        };
        self.len -= 1;
        Some(value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (K, V)> + '_ {
        let zero = Self::zero();
        let old: &[Slot<K, V>] = self.old.as_ref().map_or(&[], |old| &old.slots);
        self.zero_key
            .map(|v| (zero, v))
            .into_iter()
            .chain(self.slots.iter().chain(old).filter(move |s| s.key != zero).map(|s| (s.key, s.value)))
    }

    pub fn values(&self) -> impl Iterator<Item = V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    /// Start moving into a table twice the size. Lookups then probe both
    /// tables until every key has moved; no call ever waits for the whole
    /// table to be rehashed (at millions of keys that took the shard
    /// hundreds of milliseconds, in the middle of a sale).
    ///
    /// The new table comes faulted in (see [`prefault`]: otherwise a probe
    /// for an absent key maps the shared zero page, and the write that
    /// follows costs an inter-processor interrupt): prepared ahead by a
    /// helper if it is big, on the spot if it is small.
    fn grow(&mut self) {
        self.finish_growth();
        let slots = 2 * self.slots.len();
        let next = match self.successor.take().map(std::thread::JoinHandle::join) {
            Some(Ok(table)) if table.len() == slots => table,
            _ => {
                let mut table = zeroed(slots);
                prefault(&mut table);
                table
            }
        };
        let previous = std::mem::replace(&mut self.slots, next);
        self.mask = slots - 1;
        // At most half full: there is an empty slot to start from.
        let cursor = previous.iter().position(|s| s.key == Self::zero()).expect("a table is at most half full");
        let left = previous.len();
        self.old = Some(Old { mask: previous.len() - 1, slots: previous, cursor, left });
    }

    /// Whether the next table is big enough to prepare ahead, and this one
    /// has outgrown the size it was made for (see `prepare_successor`).
    #[inline]
    fn successor_worth_preparing(&self) -> bool {
        self.len > self.presized && 2 * std::mem::size_of_val(&self.slots[..]) >= SUCCESSOR_AHEAD_BYTES
    }

    /// Have a helper thread allocate and fault in the next table (twice
    /// this one) while this one fills from 3/8 to 1/2, if it is big enough
    /// to be worth holding ahead (at 16M slots: 2M inserts against ~250 ms
    /// of faulting; a late helper makes the growth wait for the rest). Not
    /// for a table still within the size it was made for: a sale's
    /// presized tables never spend the memory unless the sale outgrows them.
    fn prepare_successor(&mut self) {
        let slots = 2 * self.slots.len();
        let prepare = move || {
            let mut table = zeroed(slots);
            prefault(&mut table);
            table
        };
        // No thread (resource limits): the growth prepares it itself.
        self.successor = in_background("table-prepare", prepare);
    }

    fn finish_growth(&mut self) {
        self.move_some(usize::MAX);
    }

    /// Move the keys of at least `budget` old slots (finishing the run the
    /// budget ends in), and drop the old table once it is empty.
    fn move_some(&mut self, mut budget: usize) {
        let Some(old) = &mut self.old else { return };
        let zero = Self::zero();
        while old.left > 0 && (budget > 0 || old.slots[old.cursor].key != zero) {
            let slot = std::mem::replace(&mut old.slots[old.cursor], Slot { key: zero, value: unsafe_zeroed() });
            if slot.key != zero {
                let (i, found) = probe(&self.slots, self.mask, self.hasher.hash_one(slot.key) as usize, &slot.key);
                debug_assert!(!found, "a key is in one table only");
                self.slots[i] = slot;
            }
            old.cursor = (old.cursor + 1) & old.mask;
            old.left -= 1;
            budget = budget.saturating_sub(1);
        }
        if old.left == 0 {
            if let Some(old) = self.old.take() {
                free_in_background(old.slots);
            }
        }
    }
}

/// Linear probe for `key` from `hash`'s home: the slot holding it, or the
/// empty slot where it would go.
#[inline]
fn probe<K: Zeroable + Copy + Eq, V: Copy>(slots: &[Slot<K, V>], mask: usize, hash: usize, key: &K) -> (usize, bool) {
    let zero: K = unsafe_zeroed();
    let mut i = hash & mask;
    loop {
        let slot = &slots[i];
        if slot.key == *key {
            return (i, true);
        }
        if slot.key == zero {
            return (i, false);
        }
        i = (i + 1) & mask;
    }
}

/// Empty slot `hole` (which holds a key) by backward shift: later members
/// of its run move into the hole when their home is not between the hole
/// and them (cyclically), so every key stays reachable from its home
/// without tombstones. Returns the removed value.
fn remove_at<K: Zeroable + Copy + Eq + Hash, V: Zeroable + Copy>(
    slots: &mut [Slot<K, V>],
    mask: usize,
    hasher: &RandomState,
    mut hole: usize,
) -> V {
    let value = slots[hole].value;
    let zero: K = unsafe_zeroed();
    let mut i = (hole + 1) & mask;
    loop {
        let slot = slots[i];
        if slot.key == zero {
            break;
        }
        let home = hasher.hash_one(slot.key) as usize & mask;
        let distance_home = i.wrapping_sub(home) & mask;
        let distance_hole = i.wrapping_sub(hole) & mask;
        if distance_home >= distance_hole {
            slots[hole] = slot;
            hole = i;
        }
        i = (i + 1) & mask;
    }
    slots[hole] = Slot { key: zero, value: unsafe_zeroed() };
    value
}

impl<K: Zeroable + Copy + Eq + Hash + Ord + Send + 'static, V: Zeroable + Copy + PartialEq + Send + 'static> PartialEq
    for FlatMap<K, V>
{
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(&k) == Some(v))
    }
}

impl<
        K: Zeroable + Copy + Eq + Hash + Ord + std::fmt::Debug + Send + 'static,
        V: Zeroable + Copy + std::fmt::Debug + Send + 'static,
    > std::fmt::Debug for FlatMap<K, V>
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

/// Make every page of `values` resident and writable now, keeping its
/// contents, rather than at its first use. For a table whose first use is
/// a flash sale's first second, or a growth in the middle of one: every
/// request would otherwise touch a fresh page at random, and a fresh page
/// is a fault and a page of zeroing on the shard thread. Worse, a fresh
/// page that is read before it is written (a probe for an absent key) is
/// first mapped to the kernel's shared zero page, and the write that
/// follows must then flush that mapping from every core's TLB: an
/// inter-processor interrupt per page, which in a virtual machine is
/// tens of microseconds (at a growth to 32M slots, seconds of the shard's
/// time).
///
/// One `madvise(MADV_POPULATE_WRITE)` (Linux 5.14+) does it without a fault
/// per page; elsewhere, or if it is refused, one byte of each page is read
/// and written back.
pub fn prefault<T>(values: &mut [T]) {
    let bytes = std::mem::size_of_val(values);
    let base = values.as_mut_ptr().cast::<u8>();
    match populate(values) {
        // The edge pages, shared with other data, by hand (two at most).
        Some((start, end)) => {
            touch(base, start - base as usize);
            touch(end as *mut u8, base as usize + bytes - end);
        }
        None => touch(base, bytes),
    }
}

/// [`prefault`] for memory other threads may be using at the same time:
/// only the `madvise`, which changes no byte (a page nobody has written yet
/// is given its own zeroed page, atomically under the page-table lock), so
/// it is safe on a table that is already being read and written. The edge
/// pages and systems without `MADV_POPULATE_WRITE` fault in on first use.
pub fn populate_shared<T: Sync>(values: &[T]) {
    let _ = populate(values);
}

/// Drop a table no one uses any more; a big one on a helper thread, so the
/// caller does not wait for the unmapping.
fn free_in_background<T: Send + 'static>(table: Table<T>) {
    if std::mem::size_of_val(&table[..]) < TABLE_IN_BACKGROUND_BYTES {
        return;
    }
    // No thread (resource limits): the table is dropped here, with the closure.
    let _ = in_background("table-free", move || drop(table));
}

/// Helper threads preparing or freeing tables right now.
static BACKGROUND_JOBS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Helper threads preparing or freeing tables right now: they change
/// [`mapped_table_bytes`] when they finish, so a memory measurement waits
/// for none to be running.
pub fn background_jobs() -> usize {
    BACKGROUND_JOBS.load(std::sync::atomic::Ordering::Acquire)
}

/// Run `job` on a helper thread named `name`, counted in [`background_jobs`]
/// (`None`: no thread could be started; `job` was dropped unrun).
fn in_background<R: Send + 'static>(
    name: &str,
    job: impl FnOnce() -> R + Send + 'static,
) -> Option<std::thread::JoinHandle<R>> {
    use std::sync::atomic::Ordering;
    BACKGROUND_JOBS.fetch_add(1, Ordering::AcqRel);
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let result = job();
        BACKGROUND_JOBS.fetch_sub(1, Ordering::AcqRel);
        result
    });
    if spawned.is_err() {
        BACKGROUND_JOBS.fetch_sub(1, Ordering::AcqRel);
    }
    spawned.ok()
}

/// `madvise(MADV_POPULATE_WRITE)` over the whole pages inside `values`;
/// the page-aligned range it covered, or `None` if it did not run.
fn populate<T>(values: &[T]) -> Option<(usize, usize)> {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let base = values.as_ptr() as usize;
        let start = base.next_multiple_of(PAGE);
        let end = (base + std::mem::size_of_val(values)) / PAGE * PAGE;
        // SAFETY: the range lies within `values`; MADV_POPULATE_WRITE
        // changes no byte of it and needs no exclusive access.
        let done = end > start
            && unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) } == 0;
        done.then_some((start, end))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = values;
        None
    }
}

/// Read and write back one byte of every 4 KiB of `bytes` bytes from `base`.
fn touch(base: *mut u8, bytes: usize) {
    for offset in (0..bytes).step_by(4096) {
        // SAFETY: callers pass a range within a slice they hold
        // exclusively; the byte is read and written back unchanged
        // (volatile, so the write is not optimised away).
        unsafe {
            let byte = base.add(offset);
            std::ptr::write_volatile(byte, std::ptr::read_volatile(byte));
        }
    }
}

/// A fixed-size table of zero-valid values, allocated zeroed (see
/// [`zeroed`]). Dereferences to a slice.
pub struct Table<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    /// Mapped straight from the OS (freed with `munmap`), not from the
    /// allocator.
    mapped: bool,
}

// SAFETY: a `Table` owns its values like a `Box<[T]>` does.
unsafe impl<T: Send> Send for Table<T> {}
// SAFETY: as above; shared access hands out only `&[T]`.
unsafe impl<T: Sync> Sync for Table<T> {}

/// Tables at least this big come straight from `mmap`. Below it the
/// allocator's memset of recycled memory is cheaper than faulting in fresh
/// pages (a small table made often, as in tests and state dumps, stays
/// resident and warm); above it, a memset on the thread that needs the
/// table is the stall (see `zeroed`).
const TABLE_MAPPED_BYTES: usize = 64 << 20;

/// Bytes of tables mapped straight from the OS and not yet freed (address
/// space; pages are resident as they are touched). The allocator does not
/// see them, so memory accounting adds this.
static MAPPED_TABLE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// See [`MAPPED_TABLE_BYTES`].
pub fn mapped_table_bytes() -> usize {
    MAPPED_TABLE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// `n` zeroed values. A big table is mapped straight from the OS, whose
/// fresh pages are zero without being written and resident only once
/// touched: the allocator would hand back memory it recycled, and zero it
/// with a memset first (128 MiB: ~40 ms, on the thread that needed the
/// table, in the middle of a sale).
pub fn zeroed<T: Zeroable>(n: usize) -> Table<T> {
    let layout = std::alloc::Layout::array::<T>(n).expect("table size");
    if layout.size() == 0 {
        return Table { ptr: std::ptr::NonNull::dangling(), len: n, mapped: false };
    }
    #[cfg(unix)]
    if layout.size() >= TABLE_MAPPED_BYTES && layout.align() <= 4096 {
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // touched. Its pages are zero and page-aligned (>= T's alignment).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr != libc::MAP_FAILED {
            let ptr = std::ptr::NonNull::new(ptr.cast::<T>()).expect("mmap never maps address 0 here");
            MAPPED_TABLE_BYTES.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
            return Table { ptr, len: n, mapped: true };
        }
    }
    // SAFETY: non-zero size, checked above.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    let Some(ptr) = std::ptr::NonNull::new(ptr) else { std::alloc::handle_alloc_error(layout) };
    Table { ptr, len: n, mapped: false }
}

impl<T> Drop for Table<T> {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::array::<T>(self.len).expect("table size");
        if layout.size() == 0 {
            return;
        }
        // Zero-valid values are plain data (no destructors to run).
        #[cfg(unix)]
        if self.mapped {
            // SAFETY: the mapping made in `zeroed`, of exactly this size.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), layout.size()) };
            MAPPED_TABLE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
            return;
        }
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
    }
}

impl<T> std::ops::Deref for Table<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised (zero-valid) values at `ptr`, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for Table<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
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
        // Few keys (collisions, runs, key 0) and many large ones (growth).
        let key = prop_oneof![0u64..40, any::<u64>(), any::<u64>()];
        prop_oneof![
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Bump),
            key.prop_map(Op::Remove),
        ]
    }

    /// A growth moves a few keys per insert; meanwhile every key is found
    /// in one table or the other, and removals from the old one hold.
    #[test]
    fn growth_moves_keys_a_few_at_a_time() {
        let mut flat: FlatMap<u64, u32> = FlatMap::with_capacity(1024);
        for k in 1..=1024u64 {
            flat.insert(k, k as u32);
        }
        assert!(flat.old.is_none());
        flat.insert(5000, 5000);
        let old_keys =
            |f: &FlatMap<u64, u32>| f.old.as_ref().map_or(0, |o| o.slots.iter().filter(|s| s.key != 0).count());
        let moving = old_keys(&flat);
        assert!(moving > 900, "one insert moved only a few keys, not the table ({moving} left)");
        // Remove some keys wherever they are, look everything up.
        for k in (1..=1024u64).step_by(7) {
            assert_eq!(flat.remove(&k), Some(k as u32));
        }
        let mut inserts = 0;
        while flat.old.is_some() {
            inserts += 1;
            flat.insert(10_000 + inserts, 0);
            for k in 1..=1024u64 {
                let expected = (k % 7 != 1).then_some(k as u32);
                assert_eq!(flat.get(&k), expected, "key {k} after {inserts} inserts");
            }
        }
        assert!(inserts <= 4096 / MOVE_SLOTS_PER_INSERT as u64, "the move ended in {inserts} inserts");
        assert_eq!(flat.len(), 1024 - 147 + 1 + inserts as usize);
    }

    proptest! {
        /// Random inserts, in-place updates and removals agree with std's
        /// map after every step: growth (every operation of it, while keys
        /// are still moving from the old table) and backward-shift deletion
        /// in either table.
        #[test]
        fn flat_map_matches_std(ops in proptest::collection::vec(op(), 1..1000)) {
            let mut flat: FlatMap<u64, u32> = FlatMap::default();
            let mut model: HashMap<u64, u32> = HashMap::new();
            for op in ops {
                let key = match op {
                    Op::Insert(k, v) => {
                        prop_assert_eq!(flat.insert(k, v), model.insert(k, v));
                        k
                    }
                    Op::Bump(k) => {
                        *flat.get_or_insert(k, 0) += 1;
                        *model.entry(k).or_insert(0) += 1;
                        k
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(flat.remove(&k), model.remove(&k));
                        k
                    }
                };
                prop_assert_eq!(flat.get(&key), model.get(&key).copied());
                prop_assert_eq!(flat.len(), model.len());
                prop_assert_eq!(flat.iter().count(), model.len());
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
