//! Per-user request rate on the reserve path: a token bucket per user id,
//! shared by every connection (a bot gains nothing from more connections).
//!
//! One lock-free map entry per active user: the bucket is one `AtomicU64`
//! (milli-tokens in the high half, the last refill in ms since the limiter
//! started in the low half), updated with a compare-and-swap, so checking
//! costs a hash lookup and one CAS on the connection's own task. Entries of
//! users idle long enough to have refilled are swept every few seconds,
//! so the map holds only users active right now.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

/// How often idle buckets are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

pub struct UserRateLimiter {
    /// Tokens (requests) per second and the bucket size, in milli-tokens.
    rate_milli_per_ms: u64,
    burst_milli: u64,
    started: Instant,
    buckets: papaya::HashMap<u64, AtomicU64, RandomState>,
}

fn pack(milli_tokens: u64, at_ms: u32) -> u64 {
    (milli_tokens << 32) | u64::from(at_ms)
}

fn unpack(v: u64) -> (u64, u32) {
    (v >> 32, v as u32)
}

impl UserRateLimiter {
    /// `rate_per_s` requests per second per user, bursts of `burst`.
    pub fn new(rate_per_s: u32, burst: u32) -> UserRateLimiter {
        UserRateLimiter {
            rate_milli_per_ms: u64::from(rate_per_s.max(1)),
            burst_milli: u64::from(burst.max(1)) * 1000,
            started: Instant::now(),
            buckets: papaya::HashMap::with_hasher(RandomState::default()),
        }
    }

    fn now_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Take one token for `user`: `Ok`, or `Err(retry_after_ms)`.
    pub fn check(&self, user: u64) -> Result<(), u64> {
        let now = self.now_ms();
        let buckets = self.buckets.pin();
        let bucket = buckets.get_or_insert_with(user, || AtomicU64::new(pack(self.burst_milli, now)));
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let (milli, at) = unpack(current);
            let elapsed = u64::from(now.wrapping_sub(at));
            let refilled = (milli + elapsed * self.rate_milli_per_ms).min(self.burst_milli);
            if refilled < 1000 {
                let missing = 1000 - refilled;
                return Err(missing.div_ceil(self.rate_milli_per_ms).max(1));
            }
            let next = pack(refilled - 1000, now);
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    /// Drop buckets that are full again (their users went quiet).
    pub fn sweep(&self) {
        let now = self.now_ms();
        let refill_ms = self.burst_milli / self.rate_milli_per_ms + 1;
        self.buckets.pin().retain(|_, bucket| {
            let (_, at) = unpack(bucket.load(Ordering::Relaxed));
            u64::from(now.wrapping_sub(at)) < refill_ms
        });
    }

    /// Users with a bucket right now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = UserRateLimiter::new(10, 5);
        for _ in 0..5 {
            assert!(limiter.check(7).is_ok());
        }
        let retry = limiter.check(7).unwrap_err();
        assert!((1..=100).contains(&retry), "retry after {retry} ms at 10/s");
        assert!(limiter.check(8).is_ok(), "another user has a bucket of their own");
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.check(7).is_ok(), "refilled at 10/s");
    }
}
