//! Which processes' key-object frees the probes see, and since when.
//!
//! The sensor caches a signature's verdict per (process, key object), and
//! a cached verdict is only sound while every later free of that object is
//! seen: a freed address can come back holding another key. So the free
//! functions (`EVP_PKEY_free`, `EVP_PKEY_sign_init`) must be probed in every
//! process whose verdicts are cached, and nowhere else need they be.
//!
//! Probing them host-wide made every TLS *client* on the host trap on each
//! real free (five per handshake for a client of the system OpenSSL) though
//! it never signs. A uprobe attached for one process is installed in that
//! process only, so the sensor attaches the free probes of a library to a
//! process when that process first signs through it, and caches only the
//! signatures made once they are in place (`covers`). A process's first
//! signatures are verified; the cost moves from every client to the
//! signer's first milliseconds.
//!
//! Past `max_processes` watched processes the library's free probes go
//! host-wide (one attach, every process covered from then on), which bounds
//! the file descriptors and perf events the sensor holds.
//!
//! Plain bookkeeping, generic over the link handle so it can be tested
//! without a kernel; `run.rs` does the attaching.

use hashbrown::HashMap;

/// Processes watched one by one before a library's free probes go
/// host-wide. Each costs the sensor a perf event (a file descriptor) per
/// free function of the library, two or three.
pub const MAX_WATCHED_PROCESSES: usize = 256;

/// A process's start time (clock ticks after boot, `/proc/PID/stat` field
/// 22): with the pid, it names one process for good.
pub fn start_time(tgid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'. Field 3 is the first after it, so 22 is the 20th.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// What to do for a process that signed through a library whose frees are
/// not watched for it yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Watched, host-wide, or known to be impossible: nothing to do.
    Nothing,
    AttachProcess,
    AttachHostWide,
}

enum Watch<L> {
    /// Frees in the process are seen from `since` (CLOCK_MONOTONIC ns, the
    /// probes' clock) until the link is detached. `started`: the process's
    /// start time, to tell it from a later process given the same pid.
    Attached { link: L, since: u64, started: u64 },
    /// The attach failed because the process is gone or going; its exit
    /// (or exec) record clears this, and so does the next sweep
    /// (`retry_unwatchable`).
    Unwatchable,
}

enum HostWide {
    Since(u64),
    /// The host-wide attach failed too: this library's verdicts are never
    /// cached.
    Failed,
}

pub struct FreeWatches<L> {
    /// (tgid, library index) -> watch.
    processes: HashMap<(u32, u32), Watch<L>>,
    host_wide: HashMap<u32, HostWide>,
    attached: usize,
    max_processes: usize,
}

impl<L> FreeWatches<L> {
    pub fn new(max_processes: usize) -> Self {
        Self {
            processes: HashMap::new(),
            host_wide: HashMap::new(),
            attached: 0,
            max_processes,
        }
    }

    /// Whether every free in `tgid` of a key object from `library` after
    /// `ktime` is seen, so a verdict on a signature made at `ktime` (its
    /// return) may be cached. A free during the signing call itself would be
    /// a use after free in the process.
    pub fn covers(&self, tgid: u32, library: u32, ktime: u64) -> bool {
        if let Some(HostWide::Since(since)) = self.host_wide.get(&library)
            && *since <= ktime
        {
            return true;
        }
        matches!(
            self.processes.get(&(tgid, library)),
            Some(Watch::Attached { since, .. }) if *since <= ktime
        )
    }

    pub fn next_step(&self, tgid: u32, library: u32) -> Step {
        if self.host_wide.contains_key(&library) || self.processes.contains_key(&(tgid, library)) {
            Step::Nothing
        } else if self.attached >= self.max_processes {
            Step::AttachHostWide
        } else {
            Step::AttachProcess
        }
    }

    /// The process's free probes for `library` are in place since `since`.
    /// Returns a link this one replaces (to detach); `next_step` never asks
    /// for a second attach, so that is none in practice.
    pub fn attached(
        &mut self,
        tgid: u32,
        library: u32,
        link: L,
        since: u64,
        started: u64,
    ) -> Option<L> {
        self.attached += 1;
        let watch = Watch::Attached {
            link,
            since,
            started,
        };
        match self.processes.insert((tgid, library), watch) {
            Some(Watch::Attached { link, .. }) => {
                self.attached -= 1;
                Some(link)
            }
            _ => None,
        }
    }

    /// The process could not be attached (it is exiting); not tried again
    /// until its exit or exec record.
    pub fn unwatchable(&mut self, tgid: u32, library: u32) {
        self.processes.insert((tgid, library), Watch::Unwatchable);
    }

    /// The library's free probes are host-wide since `since` (`None`: the
    /// attach failed). Returns the per-process links of that library, which
    /// the host-wide probes make redundant: detach them *after* this attach,
    /// so coverage has no gap.
    pub fn host_wide(&mut self, library: u32, since: Option<u64>) -> Vec<L> {
        self.host_wide
            .insert(library, since.map_or(HostWide::Failed, HostWide::Since));
        if since.is_none() {
            return Vec::new();
        }
        self.take_where(|_, l| l == library)
    }

    /// The process exited or exec'd a new image: its links, to detach.
    pub fn forget(&mut self, tgid: u32) -> Vec<L> {
        if self.processes.is_empty() {
            return Vec::new();
        }
        self.take_where(|t, _| t == tgid)
    }

    /// Removes the entries whose (tgid, library) match, returning their links.
    fn take_where(&mut self, matches: impl Fn(u32, u32) -> bool) -> Vec<L> {
        let mut links = Vec::new();
        for (_, w) in self.processes.extract_if(|&(t, l), _| matches(t, l)) {
            if let Watch::Attached { link, .. } = w {
                self.attached -= 1;
                links.push(link);
            }
        }
        links
    }

    /// Watched processes that are gone, or whose pid now names another
    /// process (`alive(tgid, started)` says no). Their exit records should
    /// have said so; this catches one that was lost, which would otherwise
    /// leave a reused pid looking watched.
    pub fn gone(&self, alive: impl Fn(u32, u64) -> bool) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .processes
            .iter()
            .filter_map(|(&(tgid, _), w)| match w {
                Watch::Attached { started, .. } if !alive(tgid, *started) => Some(tgid),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Processes that could not be attached are tried again at their next
    /// signature (an exit record that was lost would otherwise leave their
    /// pid unwatchable for good).
    pub fn retry_unwatchable(&mut self) {
        self.processes
            .retain(|_, w| matches!(w, Watch::Attached { .. }));
    }

    /// Processes watched one by one right now.
    pub fn watched(&self) -> usize {
        self.attached
    }

    /// Libraries whose free probes went host-wide.
    pub fn host_wide_libraries(&self) -> usize {
        self.host_wide
            .values()
            .filter(|h| matches!(h, HostWide::Since(_)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_this_process() {
        let me = std::process::id();
        let t = start_time(me).expect("our own start time");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t), "stable");
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_process_is_covered_only_after_its_attach() {
        let mut w = FreeWatches::<&str>::new(8);
        assert!(!w.covers(10, 0, 500));
        assert_eq!(w.next_step(10, 0), Step::AttachProcess);
        assert_eq!(w.attached(10, 0, "link", 100, 7), None);
        assert_eq!(w.next_step(10, 0), Step::Nothing);
        assert!(
            !w.covers(10, 0, 99),
            "signed before the probes were in place"
        );
        assert!(w.covers(10, 0, 100));
        assert!(!w.covers(10, 1, 100), "another library of the process");
        assert!(!w.covers(11, 0, 100), "another process");
        assert_eq!(w.forget(10), vec!["link"]);
        assert!(!w.covers(10, 0, 500), "exited or exec'd: nothing holds");
        assert_eq!(w.watched(), 0);
        assert_eq!(w.next_step(10, 0), Step::AttachProcess);
    }

    #[test]
    fn an_unwatchable_process_is_not_retried_until_it_is_forgotten() {
        let mut w = FreeWatches::<u32>::new(8);
        w.unwatchable(10, 0);
        assert_eq!(w.next_step(10, 0), Step::Nothing);
        assert!(!w.covers(10, 0, u64::MAX));
        assert!(w.forget(10).is_empty());
        assert_eq!(w.next_step(10, 0), Step::AttachProcess);
        w.unwatchable(10, 0);
        w.attached(11, 0, 1, 100, 8);
        w.retry_unwatchable();
        assert_eq!(w.next_step(10, 0), Step::AttachProcess);
        assert_eq!(w.next_step(11, 0), Step::Nothing, "attached ones stay");
    }

    #[test]
    fn past_the_cap_a_library_goes_host_wide_and_drops_its_process_links() {
        let mut w = FreeWatches::<u32>::new(2);
        w.attached(10, 0, 1, 100, 7);
        w.attached(11, 1, 2, 100, 8);
        assert_eq!(w.next_step(12, 0), Step::AttachHostWide);
        let mut dropped = w.host_wide(0, Some(200));
        dropped.sort();
        assert_eq!(dropped, vec![1], "only library 0's links");
        assert_eq!(w.watched(), 1);
        assert!(w.covers(12, 0, 200), "every process, from the attach on");
        assert!(!w.covers(12, 0, 199));
        assert!(w.covers(10, 0, 200));
        assert!(w.covers(11, 1, 100), "library 1 is still per process");
        assert_eq!(w.next_step(13, 0), Step::Nothing);
        assert_eq!(w.next_step(13, 1), Step::AttachProcess);
        assert_eq!(w.host_wide_libraries(), 1);
    }

    #[test]
    fn a_failed_host_wide_attach_covers_nothing_and_keeps_process_links() {
        let mut w = FreeWatches::<u32>::new(1);
        w.attached(10, 0, 1, 100, 7);
        assert!(w.host_wide(0, None).is_empty());
        assert!(w.covers(10, 0, 100), "its own probes still stand");
        assert!(!w.covers(12, 0, u64::MAX));
        assert_eq!(
            w.next_step(12, 0),
            Step::Nothing,
            "not retried per signature"
        );
        assert_eq!(w.host_wide_libraries(), 0);
    }

    #[test]
    fn a_process_whose_exit_was_missed_is_found_gone() {
        let mut w = FreeWatches::<u32>::new(8);
        w.attached(10, 0, 1, 100, 7);
        w.attached(10, 1, 2, 100, 7);
        w.attached(11, 0, 3, 100, 8);
        w.unwatchable(12, 0);
        // pid 10 now names a process started later; 11 is as it was.
        let alive = |tgid: u32, started: u64| (tgid, started) == (11, 8);
        assert_eq!(w.gone(alive), vec![10]);
        let mut links = w.forget(10);
        links.sort();
        assert_eq!(links, vec![1, 2]);
        assert!(w.gone(alive).is_empty());
    }

    #[test]
    fn attaching_the_same_process_twice_counts_once() {
        let mut w = FreeWatches::<u32>::new(8);
        assert_eq!(w.attached(10, 0, 1, 100, 7), None);
        assert_eq!(
            w.attached(10, 0, 2, 150, 7),
            Some(1),
            "the old link, to detach"
        );
        assert_eq!(w.watched(), 1);
        assert_eq!(w.forget(10), vec![2]);
    }
}
