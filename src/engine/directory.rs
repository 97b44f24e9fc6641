//! The global reservation-id directory: which SKU holds each reservation id.
//!
//! Reservation ids are chosen by clients and unique across the whole server,
//! but reservations live in the shard that owns their SKU. CONFIRM and
//! RELEASE carry only the id, so the connection task looks the id up here to
//! find the SKU (and from it the shard). The directory is also what rejects
//! one id reused for a different SKU, which no single shard could see.
//!
//! Why papaya: it is written by every shard thread (once per successful
//! reservation) and read by every connection task (on confirm, release and
//! sold-out retries). A lock-free map keeps the reserve path free of
//! mutexes, and reads never wait behind a writer.

use foldhash::fast::RandomState;

use crate::limits::DIRECTORY_IDS_PRESIZED;

pub struct ReservationDirectory {
    /// reservation id -> sku. Entries are never removed: a confirmed or
    /// released id must keep answering retries.
    ids: papaya::HashMap<u128, u64, RandomState>,
}

/// Result of claiming an id for a SKU.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id was free and now belongs to the SKU.
    New,
    /// The id already belonged to this SKU (replay, or a retry).
    Same,
    /// The id belongs to another SKU.
    Conflict { sku: u64 },
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

    /// Sized for a large drop (`DIRECTORY_IDS_PRESIZED`): resizing a
    /// concurrent table is the most expensive thing on the reserve path.
    pub fn for_server() -> Self {
        Self::with_capacity(DIRECTORY_IDS_PRESIZED)
    }

    pub fn with_capacity(capacity: usize) -> Self {
        ReservationDirectory {
            ids: papaya::HashMap::builder()
                .hasher(RandomState::default())
                .capacity(capacity)
                // Blocking resizes finish sooner than incremental ones; a
                // latency spike on one resize is better than slower reserves
                // for the whole resize.
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
        }
    }

    /// Atomically claim `id` for `sku`. Two shards racing for one id: exactly
    /// one gets `New`, the other `Conflict`.
    pub fn claim(&self, id: u128, sku: u64) -> Claim {
        match self.ids.pin().try_insert(id, sku) {
            Ok(_) => Claim::New,
            Err(occupied) if *occupied.current == sku => Claim::Same,
            Err(occupied) => Claim::Conflict { sku: *occupied.current },
        }
    }

    /// The SKU that holds `id`, if any.
    pub fn sku_of(&self, id: u128) -> Option<u64> {
        self.ids.pin().get(&id).copied()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
