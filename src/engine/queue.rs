//! The virtual queue (waiting room) of one sale.
//!
//! People take a place in line (JOIN), watch their position (POLL) and are
//! admitted in order at a fixed rate; only an admitted user may RESERVE,
//! within an admission window. Joining twice, from any number of
//! connections, returns the same ticket, so extra connections and refreshes
//! gain nothing.
//!
//! Before the start time, joiners go into a *pre-queue*. At the start the
//! pre-queue is shuffled with a seed that is written to the log
//! (QUEUE_STARTED) and placed ahead of everyone who joins later, who are
//! served strictly first come, first served. Racing the clock or joining
//! early therefore gains nothing, and the order can be recomputed by an
//! auditor from the log alone. **The shuffle**, exactly: SplitMix64 seeded
//! with `seed` drives a Fisher-Yates shuffle of the pre-queue in join
//! order, `for i in (1..n).rev() { j = next() % (i + 1); swap(i, j) }`.
//!
//! Admission happens on the shard's tick: a token bucket refilled at
//! `admit_rate_per_s` (holding at most one tick's worth, so a stall never
//! turns into a burst) admits the first in line while the number of
//! admitted-but-not-yet-reserved users is below the cap: the configured cap
//! if any, and never more than the units still available. An admission
//! that runs out unused lapses and the next user moves up.
//!
//! Tickets are sequence numbers: the line is a vector of users in admission
//! order and `next` is the first not yet admitted, so a position is
//! `seq - next + 1`: O(1), and it can only go down. Memory per waiting user:
//! 8 bytes in the line, 4 for the join time, and one entry (16 bytes + ~3
//! of table overhead at most load factors) in the ticket map.
//!
//! Everything here changes only through events (`apply_*`), like the rest
//! of the engine; the live `decide` side is in `Engine` (mod.rs).

use std::collections::VecDeque;

use stampede_protocol::message::{QueueConfig, QueueStats};

use super::FastMap;

/// A ticket for a user who joined before the start: no place yet.
const PRE_START: u64 = u64::MAX;

/// Where a user stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// Never joined.
    None,
    /// Joined before the start; placed by the shuffle.
    PreStart,
    /// In line; 1 = next to be admitted.
    Waiting { position: u64 },
    /// May reserve until `until_ms` (`used`: has reserved already).
    Admitted { until_ms: u64, used: bool },
    /// The admission ran out unused.
    Lapsed,
}

/// The queue state of one sale.
#[derive(Debug)]
pub struct WaitingRoom {
    pub config: QueueConfig,
    /// Base of the join-time offsets (the sale's creation time).
    opened_at_ms: u64,
    started: bool,
    /// Pre-start joiners in join order, with their join offsets.
    pre: Vec<u64>,
    pre_joined: Vec<u32>,
    /// Users by sequence number (admission order) and their join offsets.
    line: Vec<u64>,
    joined: Vec<u32>,
    /// Sequence number of the first user not yet admitted.
    next: usize,
    /// user -> sequence number of their ticket (or `PRE_START`).
    tickets: FastMap<u64, u64>,
    /// Admitted, not yet reserved, not lapsed: user -> deadline.
    admitted: FastMap<u64, u64>,
    /// Admission deadlines in order (a fixed window and monotonic time keep
    /// them sorted): lapses cost O(1) each.
    deadlines: VecDeque<(u64, u64)>,
    /// Admitted and reserved: user -> deadline (more reserves, within the
    /// per-user limit, until it).
    used: FastMap<u64, u64>,
    pub admitted_total: u64,
    pub lapsed_total: u64,
    /// When the sale was last paused (admission windows stop meanwhile).
    paused_at_ms: u64,
    /// Token bucket for live admission decisions. Not part of the state
    /// the log rebuilds: after a restart it starts empty.
    tokens: f64,
    refilled_at_ms: u64,
}

/// SplitMix64 (Steele, Lea, Flood 2014): the documented generator of the
/// start shuffle. Tiny, fast, and fixed forever, so the order a seed
/// produces never changes with a library upgrade.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The start shuffle (see the module doc): permutes `order` in place.
pub fn shuffle<T>(order: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..order.len()).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
}

impl WaitingRoom {
    /// A queue whose start time is not in the future is open at once:
    /// there is no pre-queue to shuffle.
    pub fn new(config: QueueConfig, opened_at_ms: u64) -> WaitingRoom {
        WaitingRoom {
            config,
            opened_at_ms,
            started: config.start_at_ms <= opened_at_ms,
            pre: Vec::new(),
            pre_joined: Vec::new(),
            line: Vec::new(),
            joined: Vec::new(),
            next: 0,
            tickets: FastMap::default(),
            admitted: FastMap::default(),
            deadlines: VecDeque::new(),
            used: FastMap::default(),
            admitted_total: 0,
            lapsed_total: 0,
            paused_at_ms: 0,
            tokens: 0.0,
            refilled_at_ms: 0,
        }
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// Whether the start is due at `now_ms` (and has not happened).
    pub fn start_due(&self, now_ms: u64) -> bool {
        !self.started && now_ms >= self.config.start_at_ms
    }

    /// Users in line (pre-start joiners included).
    pub fn waiting(&self) -> u64 {
        (self.pre.len() + self.line.len() - self.next) as u64
    }

    /// Where `user` stands at `now_ms`. A used admission ends at its
    /// deadline like an unused one (the user may JOIN again).
    pub fn ticket(&self, user: u64, now_ms: u64) -> TicketState {
        let Some(&seq) = self.tickets.get(&user) else {
            return TicketState::None;
        };
        if seq == PRE_START {
            return TicketState::PreStart;
        }
        if seq as usize >= self.next {
            return TicketState::Waiting { position: seq - self.next as u64 + 1 };
        }
        if let Some(&until_ms) = self.admitted.get(&user) {
            return TicketState::Admitted { until_ms, used: false };
        }
        match self.used.get(&user) {
            Some(&until_ms) if now_ms < until_ms => TicketState::Admitted { until_ms, used: true },
            _ => TicketState::Lapsed,
        }
    }

    /// May `user` reserve at `now_ms`?
    pub fn may_reserve(&self, user: u64, now_ms: u64) -> bool {
        match self.ticket(user, now_ms) {
            TicketState::Admitted { until_ms, .. } => now_ms < until_ms,
            _ => false,
        }
    }

    /// Estimated wait for `position`, at the configured rate.
    pub fn estimated_wait_ms(&self, position: u64) -> u64 {
        position.saturating_mul(1000) / u64::from(self.config.admit_rate_per_s.max(1))
    }

    pub fn stats(&self, now_ms: u64) -> QueueStats {
        let oldest_joined =
            if !self.started { self.pre_joined.iter().min().copied() } else { self.joined.get(self.next).copied() };
        QueueStats {
            waiting: self.waiting(),
            admit_rate_per_s: self.config.admit_rate_per_s,
            admitted_outstanding: self.admitted.len() as u64,
            admitted_total: self.admitted_total,
            oldest_wait_ms: oldest_joined.map_or(0, |j| now_ms.saturating_sub(self.opened_at_ms + u64::from(j))),
        }
    }

    /// Admitted users not yet reserved (they hold a place under the cap).
    pub fn admitted_outstanding(&self) -> usize {
        self.admitted.len()
    }

    /// The first user in line, if any (after the start).
    pub fn head(&self) -> Option<u64> {
        if !self.started {
            return None;
        }
        self.line.get(self.next).copied()
    }

    /// The next admission deadline that is due at `now_ms`, if any, with
    /// its user (skipping entries of users who reserved meanwhile).
    pub fn due_lapse(&mut self, now_ms: u64) -> Option<u64> {
        while let Some(&(deadline, user)) = self.deadlines.front() {
            if deadline > now_ms {
                return None;
            }
            if self.admitted.get(&user) == Some(&deadline) {
                return Some(user);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// Live admission budget: refill the bucket to `now_ms` and return how
    /// many users may be admitted now (before the cap is applied).
    pub fn admission_budget(&mut self, now_ms: u64, tick_ms: u64) -> u64 {
        let rate = f64::from(self.config.admit_rate_per_s);
        if self.refilled_at_ms == 0 {
            self.refilled_at_ms = now_ms;
        }
        let elapsed = now_ms.saturating_sub(self.refilled_at_ms) as f64;
        self.refilled_at_ms = now_ms;
        // At most one tick's worth (and at least one user) can be banked:
        // a stall (a full cap, an empty line) never becomes a burst.
        let burst = (rate * tick_ms as f64 / 1000.0).max(1.0);
        self.tokens = (self.tokens + rate * elapsed / 1000.0).min(burst);
        self.tokens.floor() as u64
    }

    /// The latest admission deadline handed out (deadlines stay sorted even
    /// if the wall clock steps back).
    pub fn last_deadline(&self) -> u64 {
        self.deadlines.back().map_or(0, |&(deadline, _)| deadline)
    }

    /// Spend one admission token (the caller admitted someone).
    pub fn spend_token(&mut self) {
        self.tokens -= 1.0;
    }

    // ---------------------------------------------------------------- apply

    fn offset(&self, at_ms: u64) -> u32 {
        at_ms.saturating_sub(self.opened_at_ms).min(u64::from(u32::MAX)) as u32
    }

    /// QUEUE_JOINED: a new ticket (a lapsed user goes to the back).
    pub fn apply_joined(&mut self, user: u64, at_ms: u64) {
        debug_assert!(matches!(self.ticket(user, at_ms), TicketState::None | TicketState::Lapsed));
        let offset = self.offset(at_ms);
        if self.started {
            self.tickets.insert(user, self.line.len() as u64);
            self.line.push(user);
            self.joined.push(offset);
        } else {
            self.tickets.insert(user, PRE_START);
            self.pre.push(user);
            self.pre_joined.push(offset);
        }
    }

    /// QUEUE_STARTED: shuffle the pre-queue ahead of the line.
    pub fn apply_started(&mut self, seed: u64) {
        assert!(!self.started, "queue started twice");
        assert!(self.line.is_empty(), "joins after the start before it");
        let mut pre: Vec<(u64, u32)> =
            std::mem::take(&mut self.pre).into_iter().zip(std::mem::take(&mut self.pre_joined)).collect();
        shuffle(&mut pre, seed);
        self.line.reserve(pre.len());
        self.joined.reserve(pre.len());
        for (seq, (user, joined)) in pre.into_iter().enumerate() {
            self.tickets.insert(user, seq as u64);
            self.line.push(user);
            self.joined.push(joined);
        }
        self.started = true;
    }

    /// ADMITTED: the first in line may reserve until `until_ms`.
    pub fn apply_admitted(&mut self, user: u64, until_ms: u64) {
        assert!(self.started, "admission before the start");
        assert_eq!(self.line.get(self.next), Some(&user), "admitted out of order");
        self.next += 1;
        self.admitted.insert(user, until_ms);
        self.deadlines.push_back((until_ms, user));
        self.admitted_total += 1;
    }

    /// ADMISSION_LAPSED.
    pub fn apply_lapsed(&mut self, user: u64) {
        let removed = self.admitted.remove(&user);
        assert!(removed.is_some(), "lapse of user {user}, who holds no admission");
        if self.deadlines.front().is_some_and(|&(_, u)| u == user) {
            self.deadlines.pop_front();
        }
        self.lapsed_total += 1;
    }

    /// PAUSED: remember when, to stop the admission clock.
    pub fn apply_paused(&mut self, at_ms: u64) {
        self.paused_at_ms = at_ms;
    }

    /// RESUMED: admission windows do not run while no one can reserve, so
    /// every outstanding one moves out by the pause (a uniform shift keeps
    /// the deadline FIFO sorted).
    pub fn apply_resumed(&mut self, at_ms: u64) {
        let paused_ms = at_ms.saturating_sub(self.paused_at_ms);
        for (deadline, _) in self.deadlines.iter_mut() {
            *deadline += paused_ms;
        }
        for deadline in self.admitted.values_mut() {
            *deadline += paused_ms;
        }
    }

    /// A RESERVED by an admitted user uses the admission.
    pub fn apply_reserved(&mut self, user: u64) {
        if let Some(until_ms) = self.admitted.remove(&user) {
            self.used.insert(user, until_ms);
        }
    }

    // ------------------------------------------------------------- images

    pub fn export(&self) -> QueueImage {
        let admitted: Vec<(u64, u64)> = self
            .deadlines
            .iter()
            .filter(|(deadline, user)| self.admitted.get(user) == Some(deadline))
            .map(|&(deadline, user)| (user, deadline))
            .collect();
        let mut used: Vec<(u64, u64)> = self.used.iter().map(|(&u, &d)| (u, d)).collect();
        used.sort_unstable();
        QueueImage {
            config: self.config,
            opened_at_ms: self.opened_at_ms,
            started: self.started,
            pre: self.pre.iter().copied().zip(self.pre_joined.iter().copied()).collect(),
            line: self.line.iter().copied().zip(self.joined.iter().copied()).collect(),
            next: self.next as u64,
            admitted,
            used,
            admitted_total: self.admitted_total,
            lapsed_total: self.lapsed_total,
            paused_at_ms: self.paused_at_ms,
        }
    }

    pub fn import(image: QueueImage) -> WaitingRoom {
        let mut room = WaitingRoom::new(image.config, image.opened_at_ms);
        room.started = image.started;
        for (user, joined) in image.pre {
            room.tickets.insert(user, PRE_START);
            room.pre.push(user);
            room.pre_joined.push(joined);
        }
        for (seq, (user, joined)) in image.line.into_iter().enumerate() {
            // A user who lapsed and joined again appears twice: the later
            // ticket is the live one.
            room.tickets.insert(user, seq as u64);
            room.line.push(user);
            room.joined.push(joined);
        }
        room.next = image.next as usize;
        assert!(room.next <= room.line.len(), "queue image: next beyond the line");
        for (user, deadline) in image.admitted {
            room.admitted.insert(user, deadline);
            room.deadlines.push_back((deadline, user));
        }
        room.used = image.used.into_iter().collect();
        room.admitted_total = image.admitted_total;
        room.lapsed_total = image.lapsed_total;
        room.paused_at_ms = image.paused_at_ms;
        room
    }
}

/// A queue's state as plain data (snapshots, digests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueImage {
    pub config: QueueConfig,
    pub opened_at_ms: u64,
    pub started: bool,
    /// (user, join offset ms) in join order.
    pub pre: Vec<(u64, u32)>,
    /// (user, join offset ms) in admission order.
    pub line: Vec<(u64, u32)>,
    pub next: u64,
    /// (user, deadline) of outstanding admissions, in deadline order.
    pub admitted: Vec<(u64, u64)>,
    /// (user, deadline) of admissions already used, by user.
    pub used: Vec<(u64, u64)>,
    pub admitted_total: u64,
    pub lapsed_total: u64,
    pub paused_at_ms: u64,
}
