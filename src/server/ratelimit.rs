//! Per-user request rate on the reserve path: token buckets shared by every
//! connection (a bot gains nothing from more connections).
//!
//! Buckets live in a fixed table indexed by hashes of the user id, not in a
//! map with an entry per user. At a drop, a million users arrive within
//! seconds: a map growing by a million entries (allocation, concurrent
//! resizes) stalled the connection tasks for half a second at the start of
//! a drill, and held memory for every user ever seen until swept. A fixed
//! table costs [`USER_RATE_BUCKETS`] x 8 bytes, faulted in at start, and
//! nothing per user; a check is two atomic updates.
//!
//! Users share buckets, so each user has two (two independent hashes): a
//! request is allowed if either of its buckets has a token, and takes one
//! from each that has. A user over the rate drains both of its buckets and
//! is refused; a user sharing one bucket with a heavy user still has the
//! other. Refusing someone innocent takes both of their buckets being
//! drained by others: the square of the share of buckets that heavy users
//! drain (100k heavy users drain ~5% of 4M buckets: 0.25% of light users
//! are at risk; the `heavy_users_do_not_starve_light_ones` test).
//!
//! A bucket is one `AtomicU64`: the milli-tokens *missing* in the high
//! half (0: full, so a zeroed table is all full buckets) and the time of
//! the last update in ms since the limiter started in the low half.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use foldhash::fast::RandomState;

use crate::engine::flat::{prefault, zeroed, Table};
use crate::limits::USER_RATE_BUCKETS;

pub struct UserRateLimiter {
    /// Refill in milli-tokens per ms (= tokens per second), bucket size in
    /// milli-tokens.
    rate_milli_per_ms: u64,
    burst_milli: u64,
    started: Instant,
    buckets: Table<AtomicU64>,
    /// Two independently seeded hashes of the user id (random per process,
    /// so nobody can pick user ids that collide on purpose).
    hashers: [RandomState; 2],
}

fn pack(missing_milli: u64, at_ms: u32) -> u64 {
    (missing_milli << 32) | u64::from(at_ms)
}

fn unpack(v: u64) -> (u64, u32) {
    (v >> 32, v as u32)
}

impl UserRateLimiter {
    /// `rate_per_s` requests per second per user, bursts of `burst`.
    pub fn new(rate_per_s: u32, burst: u32) -> UserRateLimiter {
        // Faulted in now, at server start: the first requests of a drop
        // would each land on a fresh page of the table (two at random), and
        // with transparent huge pages each is up to 2 MiB of zeroing on a
        // connection task (~45 ms of stall at a drill's start).
        let mut buckets = zeroed(USER_RATE_BUCKETS);
        prefault(&mut buckets);
        UserRateLimiter {
            rate_milli_per_ms: u64::from(rate_per_s.max(1)),
            burst_milli: u64::from(burst.max(1)) * 1000,
            started: Instant::now(),
            buckets,
            hashers: [RandomState::default(), RandomState::default()],
        }
    }

    fn now_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Take one token for `user`: `Ok`, or `Err(retry_after_ms)`.
    pub fn check(&self, user: u64) -> Result<(), u64> {
        let now = self.now_ms();
        let mask = self.buckets.len() - 1;
        let [a, b] = self.hashers.each_ref().map(|h| &self.buckets[h.hash_one(user) as usize & mask]);
        if std::ptr::eq(a, b) {
            return self.take(a, now);
        }
        match (self.take(a, now), self.take(b, now)) {
            (Ok(()), _) | (_, Ok(())) => Ok(()),
            (Err(wait_a), Err(wait_b)) => Err(wait_a.min(wait_b)),
        }
    }

    /// Take a token from one bucket, or say how long until it has one.
    fn take(&self, bucket: &AtomicU64, now: u32) -> Result<(), u64> {
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let (missing, at) = unpack(current);
            let elapsed = u64::from(now.wrapping_sub(at));
            let missing = missing.saturating_sub(elapsed.saturating_mul(self.rate_milli_per_ms));
            if missing + 1000 > self.burst_milli {
                let short = missing + 1000 - self.burst_milli;
                return Err(short.div_ceil(self.rate_milli_per_ms).max(1));
            }
            let next = pack(missing + 1000, now);
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = UserRateLimiter::new(10, 5);
        for _ in 0..5 {
            assert!(limiter.check(7).is_ok());
        }
        let retry = limiter.check(7).unwrap_err();
        assert!((1..=100).contains(&retry), "retry after {retry} ms at 10/s");
        assert!(limiter.check(8).is_ok(), "another user has buckets of their own");
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.check(7).is_ok(), "refilled at 10/s");
    }

    /// Many heavy users drain their buckets; light users, who share buckets
    /// with them by chance, are almost never refused (the second bucket),
    /// and every heavy user is held to about its rate.
    #[test]
    fn heavy_users_do_not_starve_light_ones() {
        let limiter = UserRateLimiter::new(1, 10);
        // 100k heavy users: 40 requests each, burst 10.
        let heavy = 100_000u64;
        let mut allowed_heavy = 0u64;
        for user in 0..heavy {
            for _ in 0..40 {
                allowed_heavy += u64::from(limiter.check(user).is_ok());
            }
        }
        // Each heavy user gets at most the burst of each of its two buckets
        // (plus a token or two of refill while the test runs).
        assert!(allowed_heavy <= 24 * heavy, "heavy users allowed {allowed_heavy}");
        // A heavy user whose two buckets were both drained by earlier heavy
        // users gets less than its burst (~0.25% of them): on average
        // nearly the whole burst.
        assert!(allowed_heavy >= 99 * heavy / 10, "heavy users get their burst: {allowed_heavy}");
        // 100k light users, 3 requests each.
        let refused_light =
            (heavy..2 * heavy).filter(|&user| (0..3).any(|_| limiter.check(user).is_err())).count() as u64;
        // A light user is refused only if both of its buckets were drained:
        // ~5% of buckets are, so ~0.25% of light users; allow 0.5%.
        assert!(refused_light <= heavy / 200, "{refused_light} light users refused");
    }
}
