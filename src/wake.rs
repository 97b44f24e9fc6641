//! A bounded queue whose consumer thread sleeps without spinning, for the
//! shard and log-writer threads.
//!
//! Why not crossbeam's blocking receive: before it parks, it spins and then
//! calls `sched_yield` a few times (`Backoff::snooze`). That pays off on a
//! machine with idle cores; on a small one the yields take the cores the
//! connection threads need. Measured under an unbatched durable load on 2
//! cores: 8% of the server's CPU went to those yields in the shard and
//! log-writer threads (perf, `Backoff::snooze` under `recv_timeout`).
//!
//! Here the queue is still crossbeam's (its `try_send` / `try_recv` never
//! block), and waiting is a plain park: the consumer says it sleeps, looks
//! once more, and parks; a producer that finds it sleeping unparks it. A
//! producer pays one fence and one load per message when the consumer is
//! awake. The flag protocol is Dekker's: each side writes its own flag
//! (the message, `sleeping`), fences, then reads the other's, so at least
//! one of them sees the other and no wake-up is lost.

use std::mem::ManuallyDrop;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

pub use crossbeam_channel::{RecvTimeoutError, SendError, TryRecvError, TrySendError};

struct Sleeper {
    sleeping: AtomicBool,
    /// Live producers (crossbeam counts them too, but says so only through
    /// a receive, which would take a message).
    producers: AtomicUsize,
    /// The consumer thread, set by its first wait.
    thread: OnceLock<Thread>,
}

impl Sleeper {
    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::Relaxed) {
            if let Some(thread) = self.thread.get() {
                thread.unpark();
            }
        }
    }
}

/// A queue of at most `capacity` messages and its two ends.
pub fn bounded<T>(capacity: usize) -> (Tx<T>, Rx<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let sleeper =
        Arc::new(Sleeper { sleeping: AtomicBool::new(false), producers: AtomicUsize::new(1), thread: OnceLock::new() });
    (Tx { tx: ManuallyDrop::new(tx), sleeper: sleeper.clone() }, Rx { rx, sleeper })
}

/// The producing end; cheap to clone.
pub struct Tx<T> {
    /// Dropped by hand, before the wake that lets a sleeping consumer see
    /// that the last producer is gone.
    tx: ManuallyDrop<crossbeam_channel::Sender<T>>,
    sleeper: Arc<Sleeper>,
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        self.sleeper.producers.fetch_add(1, Ordering::SeqCst);
        Tx { tx: ManuallyDrop::new((*self.tx).clone()), sleeper: self.sleeper.clone() }
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.tx) };
        self.sleeper.producers.fetch_sub(1, Ordering::SeqCst);
        self.sleeper.wake();
    }
}

impl<T> Tx<T> {
    /// Queue `msg` unless the queue is full (or the consumer is gone).
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        self.tx.try_send(msg)?;
        self.sleeper.wake();
        Ok(())
    }

    /// Queue `msg`, waiting for room (rare messages only: admin commands,
    /// shutdown; the request path never waits).
    pub fn send(&self, msg: T) -> Result<(), SendError<T>> {
        self.tx.send(msg)?;
        self.sleeper.wake();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.tx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

/// The consuming end, owned by one thread.
pub struct Rx<T> {
    rx: crossbeam_channel::Receiver<T>,
    sleeper: Arc<Sleeper>,
}

impl<T> Rx<T> {
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        self.rx.try_recv()
    }

    /// The next message, waiting until `deadline` at most.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        loop {
            match self.rx.try_recv() {
                Ok(msg) => return Ok(msg),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            self.sleeper.thread.get_or_init(std::thread::current);
            self.sleeper.sleeping.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            // Once more, now that a producer will see we sleep.
            if !self.rx.is_empty() || self.sleeper.producers.load(Ordering::SeqCst) == 0 {
                self.sleeper.sleeping.store(false, Ordering::Relaxed);
                continue;
            }
            std::thread::park_timeout(deadline - now);
            self.sleeper.sleeping.store(false, Ordering::Relaxed);
        }
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// Every message until the last producer is gone.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(move || loop {
            match self.recv_timeout(Duration::from_secs(1)) {
                Ok(msg) => return Some(msg),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_wake_up_is_lost_and_the_last_producer_leaving_is_seen() {
        let (tx, rx) = bounded::<u64>(64);
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..50_000u64 {
                        let mut msg = p * 1_000_000 + i;
                        loop {
                            match tx.try_send(msg) {
                                Ok(()) => break,
                                Err(TrySendError::Full(back)) => {
                                    msg = back;
                                    std::thread::yield_now();
                                }
                                Err(TrySendError::Disconnected(_)) => panic!("consumer gone"),
                            }
                        }
                        if i % 1000 == 0 {
                            // Let the consumer fall asleep now and then.
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u64; 4];
        let mut received = 0;
        loop {
            // The producers never pause for long: a receive that waits 5 s
            // missed its wake-up.
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(msg) => {
                    let (p, i) = ((msg / 1_000_000) as usize, msg % 1_000_000);
                    assert_eq!(i, next[p], "in order per producer");
                    next[p] += 1;
                    received += 1;
                }
                Err(RecvTimeoutError::Timeout) => panic!("a wake-up was lost after {received} messages"),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(received, 200_000);
    }

    #[test]
    fn a_sleeping_consumer_wakes_when_the_last_producer_goes() {
        let (tx, rx) = bounded::<u8>(1);
        let consumer = std::thread::spawn(move || {
            let started = Instant::now();
            let result = rx.recv_timeout(Duration::from_secs(30));
            (result.is_err(), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(tx);
        let (disconnected, waited) = consumer.join().unwrap();
        assert!(disconnected);
        assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    }
}
