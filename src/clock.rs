//! Time source for the engine. Reservation expiry times are absolute unix
//! milliseconds so they mean the same thing after a restart; the engine
//! never reads the clock itself, it is handed `now_ms`, which keeps it
//! deterministic for tests, replay and (later) simulation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the unix epoch.
    fn now_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A clock that moves only when told to (tests, simulation).
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start_ms)))
    }
    pub fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    /// Step back (a wall clock corrected by NTP; the simulator).
    pub fn step_back_ms(&self, ms: u64) {
        self.0.fetch_sub(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Monotonic time for leases and fences: how long since some start, never
/// stepping back. A seam so the simulator can run the lease rules (the
/// election's deadlines, the log writer's fence) on simulated time.
pub trait Monotonic: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> std::time::Instant;
}

/// `Instant::now()`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemMonotonic;

impl Monotonic for SystemMonotonic {
    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }
}

/// Monotonic time that moves only when told to: a fixed base plus the
/// milliseconds advanced so far (only differences between instants mean
/// anything, so a run stays a function of its seed).
#[derive(Clone, Debug)]
pub struct ManualMonotonic {
    base: std::time::Instant,
    ms: Arc<AtomicU64>,
}

impl ManualMonotonic {
    pub fn new() -> Self {
        ManualMonotonic { base: std::time::Instant::now(), ms: Arc::new(AtomicU64::new(0)) }
    }
    pub fn advance_ms(&self, ms: u64) {
        self.ms.fetch_add(ms, Ordering::SeqCst);
    }
    /// Milliseconds advanced since the start.
    pub fn elapsed_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

impl Default for ManualMonotonic {
    fn default() -> Self {
        Self::new()
    }
}

impl Monotonic for ManualMonotonic {
    fn now(&self) -> std::time::Instant {
        self.base + std::time::Duration::from_millis(self.elapsed_ms())
    }
}
