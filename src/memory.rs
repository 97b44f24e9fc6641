//! Process-wide memory settings of a server.

/// Turn transparent huge pages off for this process.
///
/// Why: the allocator (mimalloc) asks for huge pages on its arenas, and a
/// huge-page fault zeroes 2 MiB at once, or first compacts memory to find
/// them. On the latency path that was the tail of the whole server: with
/// them, an open-loop drill at half of peak had a p99 of 5-9 ms and a
/// 100-400 ms stall in its first second; without, a p99 of ~2 ms and no
/// stall. The price is TLB misses on the big tables: up to ~10% of the
/// engine's reserve benchmark at 1M users (7.8-8.5M decisions/s without,
/// 8.5-9.6M with, across runs on the project machine). Big tables
/// are prefaulted when created (see `engine::flat::prefault`), so what huge
/// pages would save on faults is saved anyway.
///
/// Returns whether the setting took (Linux only; elsewhere a no-op).
pub fn disable_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and
        // changes only this process's paging policy.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}
