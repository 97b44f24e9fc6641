//! The term history of a node's log: which term wrote which LSNs.
//!
//! Every leader starts its term with a TERM_STARTED record at the LSN after
//! the last one it holds, so `(term, first_lsn)` pairs, ascending in both,
//! say which term wrote every record: record `x` belongs to the last entry
//! whose `first_lsn <= x`. Two nodes hold the same record at LSN `x` exactly
//! when their histories give `x` the same term (one leader per term, one
//! linear log per leader), so comparing histories finds where two logs
//! part without reading them (as Raft's log matching, and PostgreSQL's
//! timeline history files).
//!
//! # Format
//!
//! `history` in the data dir, text, one entry per line: `term first_lsn`.
//! Written atomically (`history.tmp`, fsync, rename, fsync the dir) before
//! the TERM_STARTED record it describes, so the file always covers the log;
//! entries past the log's end (a crash between the two) are dropped at
//! start. Recovery also feeds back every TERM_STARTED it replays, so a lost
//! file is rebuilt for the records the log still holds.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use stampede_protocol::message::History;

pub const HISTORY_FILE: &str = "history";

pub fn path(dir: &Path) -> PathBuf {
    dir.join(HISTORY_FILE)
}

/// Read the history (empty if there is none yet: a node that never had a
/// leader, whose records are all of term 0).
pub fn load(dir: &Path) -> std::io::Result<History> {
    let text = match crate::storage::read(&path(dir)) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut history = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(term)), Some(Ok(first_lsn)), None) => history.push((term, first_lsn)),
            _ => {
                return Err(std::io::Error::other(format!(
                    "{}: line {} is not `term first_lsn`",
                    path(dir).display(),
                    n + 1
                )))
            }
        }
    }
    Ok(normalized(history))
}

/// Sorted, one entry per term, terms and LSNs both ascending (a later
/// entry wins where they disagree).
fn normalized(mut history: History) -> History {
    history.sort_by_key(|&(term, _)| term);
    history.dedup_by_key(|&mut (term, _)| term);
    let mut out: History = Vec::with_capacity(history.len());
    for (term, first_lsn) in history {
        while out.last().is_some_and(|&(_, previous)| previous > first_lsn) {
            out.pop();
        }
        out.push((term, first_lsn));
    }
    out
}

/// Write the whole history atomically.
pub fn store(dir: &Path, history: &History) -> std::io::Result<()> {
    let mut text = Vec::new();
    for (term, first_lsn) in history {
        writeln!(text, "{term} {first_lsn}")?;
    }
    crate::storage::write_atomically(&path(dir), &text)
}

/// The history after startup: the file's entries within the log (up to
/// `last_lsn`), merged with the TERM_STARTED records recovery replayed.
pub fn reconcile(mut history: History, replayed: &[(u64, u64)], last_lsn: u64) -> History {
    history.retain(|&(_, first_lsn)| first_lsn <= last_lsn);
    history.extend_from_slice(replayed);
    normalized(history)
}

/// The term that wrote record `lsn` (0 before the first entry).
pub fn term_of(history: &History, lsn: u64) -> u64 {
    history.iter().rev().find(|&&(_, first_lsn)| first_lsn <= lsn).map_or(0, |&(term, _)| term)
}

/// The highest term in the history (0 if none).
pub fn last_term(history: &History) -> u64 {
    history.last().map_or(0, |&(term, _)| term)
}

/// The last LSN a follower with history `theirs` ending at `their_last`
/// keeps when it follows a leader with `ours` ending at `our_last`: the
/// common point, and never past its own end. Records after it are cut.
pub fn follow_from(ours: &History, our_last: u64, theirs: &History, their_last: u64) -> u64 {
    common_point(ours, our_last, theirs, their_last).min(their_last)
}

/// The last LSN at which a log with history `ours` ending at `our_last`
/// and one with `theirs` ending at `their_last` hold the same record:
/// records up to it are identical in both, and nothing after it is.
pub fn common_point(ours: &History, our_last: u64, theirs: &History, their_last: u64) -> u64 {
    // Ranges [first, end] of each term in a history.
    let ranges = |history: &History, last: u64| -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        // Records before the first entry were written in term 0.
        let end_of_term0 = history.first().map_or(last, |&(_, first)| first - 1).min(last);
        if end_of_term0 >= 1 {
            out.push((0, 1, end_of_term0));
        }
        for (i, &(term, first)) in history.iter().enumerate() {
            let end = history.get(i + 1).map_or(last, |&(_, next)| next.saturating_sub(1)).min(last);
            if end >= first {
                out.push((term, first, end));
            }
        }
        out
    };
    let (a, b) = (ranges(ours, our_last), ranges(theirs, their_last));
    let mut common = 0;
    for &(term, first_a, end_a) in &a {
        for &(other, first_b, end_b) in &b {
            if term == other {
                let (first, end) = (first_a.max(first_b), end_a.min(end_b));
                if first <= end {
                    common = common.max(end);
                }
            }
        }
    }
    common
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_of_and_common_point() {
        let leader: History = vec![(3, 1), (7, 101), (9, 151)];
        assert_eq!(term_of(&leader, 1), 3);
        assert_eq!(term_of(&leader, 100), 3);
        assert_eq!(term_of(&leader, 101), 7);
        assert_eq!(term_of(&leader, 500), 9);
        // A follower of term 7 that got further than the leader of term 7
        // wrote before term 9 began: its records 151..=160 are not the
        // leader's.
        let follower: History = vec![(3, 1), (7, 101)];
        assert_eq!(common_point(&leader, 200, &follower, 160), 150);
        // One that is simply behind: everything it has is common.
        assert_eq!(common_point(&leader, 200, &follower, 120), 120);
        // Never in the same term beyond 3.
        let other: History = vec![(3, 1), (8, 90)];
        assert_eq!(common_point(&leader, 200, &other, 95), 89);
        // Empty logs, and logs of term 0 only (no cluster yet).
        assert_eq!(common_point(&leader, 200, &Vec::new(), 0), 0);
        assert_eq!(common_point(&vec![(5, 11)], 20, &Vec::new(), 10), 10);
        assert_eq!(common_point(&vec![(5, 11)], 20, &Vec::new(), 15), 10);
    }

    #[test]
    fn reconcile_drops_entries_past_the_log_and_adds_replayed_ones() {
        let file: History = vec![(3, 1), (7, 101), (9, 151)];
        assert_eq!(reconcile(file.clone(), &[], 150), vec![(3, 1), (7, 101)]);
        assert_eq!(reconcile(Vec::new(), &[(7, 101), (9, 151)], 200), vec![(7, 101), (9, 151)]);
        assert_eq!(reconcile(file, &[(9, 151)], 200), vec![(3, 1), (7, 101), (9, 151)]);
    }

    #[test]
    fn store_and_load() {
        let dir = std::env::temp_dir().join(format!("stampede-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), Vec::new());
        store(&dir, &vec![(3, 1), (7, 101)]).unwrap();
        assert_eq!(load(&dir).unwrap(), vec![(3, 1), (7, 101)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
