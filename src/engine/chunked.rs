//! Growable sequences that never move what they hold.
//!
//! A `Vec` or `VecDeque` grows by doubling: everything is copied into a
//! new allocation twice the size, whose pages are then faulted in. At
//! eight million reservations that is half a gigabyte copied and a
//! gigabyte of fresh memory touched, on the shard thread, in the middle of
//! a sale: a stall of hundreds of milliseconds for every buyer of the SKU.
//! These grow by one fixed chunk at a time instead, so a push costs the
//! same at the ten-millionth element as at the first. An index costs one
//! more load (the chunk's pointer, from a small, cache-resident table).

use std::collections::VecDeque;

/// Elements per chunk: 64 Ki, so a chunk of 56-byte reservation records is
/// 3.5 MiB (one allocation, faulted in as it fills) and ten million
/// records need a table of only 153 chunk pointers. (A vector's first
/// chunk grows to this size by doubling.)
const CHUNK_SHIFT: u32 = 16;
const CHUNK_LEN: usize = 1 << CHUNK_SHIFT;

/// Entries of a first chunk (a queue's next ones double up to CHUNK_LEN;
/// a vector's first one grows to it).
const QUEUE_FIRST_CHUNK_LEN: usize = 16;

/// An append-only vector in fixed-size chunks.
pub struct ChunkedVec<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for ChunkedVec<T> {
    fn default() -> Self {
        ChunkedVec { chunks: Vec::new(), len: 0 }
    }
}

impl<T> ChunkedVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK_LEN => last.push(value),
            _ => self.push_to_new_chunk(value),
        }
        self.len += 1;
    }

    /// The first chunk starts small and grows by doubling (copying at
    /// most half a chunk, once); the ones after it are whole from the
    /// start. Every sale has one of these tables, and most stay small.
    #[cold]
    fn push_to_new_chunk(&mut self, value: T) {
        let capacity = if self.chunks.is_empty() { QUEUE_FIRST_CHUNK_LEN } else { CHUNK_LEN };
        let mut chunk = Vec::with_capacity(capacity);
        chunk.push(value);
        self.chunks.push(chunk);
    }

    #[inline]
    pub fn get(&self, index: usize) -> Option<&T> {
        self.chunks.get(index >> CHUNK_SHIFT)?.get(index & (CHUNK_LEN - 1))
    }

    #[inline]
    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.chunks.get_mut(index >> CHUNK_SHIFT)?.get_mut(index & (CHUNK_LEN - 1))
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

impl<T> std::ops::Index<usize> for ChunkedVec<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        self.get(index).expect("index within the vector")
    }
}

impl<T> std::ops::IndexMut<usize> for ChunkedVec<T> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        self.get_mut(index).expect("index within the vector")
    }
}

/// A FIFO queue in chunks: pushed at the back, popped at the front; a
/// chunk is freed once everything in it has been popped. Chunks start
/// small and double up to `CHUNK_LEN` entries: every sale has a queue
/// (its pending expiries), and most hold a few entries at a time, so a
/// first chunk of 1.5 MiB for each would be memory for nothing.
pub struct ChunkedQueue<T> {
    chunks: VecDeque<Vec<T>>,
    /// Elements already popped from the front chunk.
    head: usize,
    len: usize,
}

impl<T> Default for ChunkedQueue<T> {
    fn default() -> Self {
        ChunkedQueue { chunks: VecDeque::new(), head: 0, len: 0 }
    }
}

impl<T: Copy> ChunkedQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            // `len < capacity`: a push never reallocates a chunk.
            Some(chunk) if chunk.len() < chunk.capacity() => chunk.push(value),
            _ => self.push_to_new_chunk(value),
        }
        self.len += 1;
    }

    #[cold]
    fn push_to_new_chunk(&mut self, value: T) {
        let previous = self.chunks.back().map_or(0, Vec::capacity);
        let mut chunk = Vec::with_capacity((2 * previous).clamp(QUEUE_FIRST_CHUNK_LEN, CHUNK_LEN));
        chunk.push(value);
        self.chunks.push_back(chunk);
    }

    #[inline]
    pub fn front(&self) -> Option<&T> {
        (self.len > 0).then(|| &self.chunks[0][self.head])
    }

    pub fn back(&self) -> Option<&T> {
        (self.len > 0).then(|| self.chunks.back().and_then(|c| c.last())).flatten()
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let value = *self.front()?;
        self.head += 1;
        self.len -= 1;
        // The front chunk is spent once fully popped, if it is not also
        // the back chunk being filled (a chunk before the back one is full).
        if self.head == self.chunks[0].len() && (self.chunks.len() > 1 || self.len == 0) {
            self.chunks.pop_front();
            self.head = 0;
        }
        Some(value)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten().skip(self.head)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for ChunkedQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.chunks.iter().flatten().skip(self.head)).finish()
    }
}

impl<T: Copy> FromIterator<T> for ChunkedQueue<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut queue = ChunkedQueue::default();
        for value in iter {
            queue.push_back(value);
        }
        queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Pushes and pops across chunk boundaries agree with VecDeque.
        #[test]
        fn queue_matches_vecdeque(ops in proptest::collection::vec(prop_oneof![Just(None), (0u32..3000).prop_map(Some)], 1..12)) {
            let mut queue: ChunkedQueue<u64> = ChunkedQueue::default();
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next = 0u64;
            for op in ops {
                match op {
                    // Push a burst (crossing chunks), or pop a burst.
                    Some(n) => for _ in 0..n * 30 {
                        queue.push_back(next);
                        model.push_back(next);
                        next += 1;
                    },
                    None => for _ in 0..70_000 {
                        prop_assert_eq!(queue.pop_front(), model.pop_front());
                    },
                }
                prop_assert_eq!(queue.len(), model.len());
                prop_assert_eq!(queue.front(), model.front());
                prop_assert_eq!(queue.back(), model.back());
            }
            prop_assert!(queue.iter().eq(model.iter()));
        }
    }

    #[test]
    fn vec_indexes_across_chunks() {
        let mut v: ChunkedVec<u64> = ChunkedVec::default();
        let n = 3 * CHUNK_LEN + 5;
        for i in 0..n {
            v.push(i as u64 * 3);
        }
        assert_eq!(v.len(), n);
        assert!((0..n).all(|i| v[i] == i as u64 * 3));
        assert_eq!(v.get(n), None);
        v[CHUNK_LEN] = 7;
        assert_eq!(v.iter().nth(CHUNK_LEN), Some(&7));
        assert_eq!(v.iter().count(), n);
    }
}
