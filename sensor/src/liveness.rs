//! Holding needs everyone who releases to be alive.
//!
//! The probes stop (SIGSTOP) a process only while this sensor's heartbeat
//! in the pinned `HOLD_LEASE` is under 2 s old (`sensor_alive` in the
//! kernel crate). So the heartbeat must mean "whoever would release this
//! process is running", and two threads release:
//!
//! * the control thread (`control.rs`): processes held at exec or at the
//!   open of a new library, released once it has attached;
//! * the event thread (`run/route.rs`): processes held at the open of a
//!   protected key file, released once `enforce::decisions` has judged them.
//!
//! The design, the simplest that covers both: the control thread writes the
//! heartbeat, as it always did, so if it stops the lease goes stale within
//! 2 s by itself; and it writes it only while the event thread shows
//! progress here, giving the lease up at once when it does not. The event
//! thread stamps its progress as it goes round its loop (at least every
//! `EVENT_TICK`, idle or not) and every few records of a long drain, so a
//! busy thread is not taken for a stalled one.
//!
//! The hold watchdog (`watchdog.rs`), a child process that releases
//! everyone this sensor held once it exits, counts too: without it a
//! sensor killed mid-hold would leave its held processes stopped, so when
//! it is gone this sensor holds nobody.
//!
//! Alternatives not taken: two heartbeats in `HOLD_LEASE`, one per thread,
//! each checked by the probes for its own kind of hold, would keep exec
//! holds going while only the event thread is stuck, but change the layout
//! of a map every running sensor shares; the heartbeat on the event thread
//! alone would miss a stuck control thread. A stalled sensor thus holds
//! nobody new. Whoever is already held when a thread stalls is released by
//! the control thread's sweep of holds older than 2 s, or, when the
//! control thread is the one stuck and the sensor is then killed, by the
//! watchdog (`watchdog.rs`).
//!
//! Before its loop the event thread is off duty and does not count, so
//! start-up (discovery, reading `key_paths`), which can take a while, does
//! not stop the control thread's holds. It has nearly nothing to release
//! then: no protected key file is known before `key_paths` are read, just
//! before the loop, whose first drain releases whoever was held meanwhile.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// The event thread is taken as stalled when it has shown no progress for
/// this long. Then holding stops at the control thread's next beat (every
/// 500 ms), so at most 1.5 s after the event thread last moved.
pub const EVENT_STALL: Duration = Duration::from_secs(1);

/// The event thread wakes at least this often, whatever `poll_interval_ms`
/// says, so an idle thread is seen alive.
pub const EVENT_TICK: Duration = Duration::from_millis(250);

/// Records the event thread handles between two progress stamps.
pub const RECORDS_PER_STAMP: u32 = 64;

#[derive(Debug, Default)]
pub struct Liveness {
    /// CLOCK_MONOTONIC ns of the event thread's last progress; 0 while it
    /// is off duty (before its loop).
    event_progress: AtomicU64,
    /// The read end of the watchdog's stdout, which it never writes after
    /// saying it is ready: readable (end-of-file) once it has exited.
    watchdog: Option<OwnedFd>,
}

impl Liveness {
    pub fn new(watchdog: OwnedFd) -> Self {
        Self {
            event_progress: AtomicU64::new(0),
            watchdog: Some(watchdog),
        }
    }

    /// The event thread moved on: it went round its loop, or handled
    /// `RECORDS_PER_STAMP` records. Its first call puts it on duty.
    pub fn event_progressed(&self) {
        self.event_progress
            .store(crate::clock::monotonic_ns(), Ordering::Relaxed);
    }

    /// Why this sensor must hold nobody new right now, if it must not.
    pub fn stalled(&self) -> Option<&'static str> {
        self.stalled_at(crate::clock::monotonic_ns())
    }

    fn stalled_at(&self, now_ns: u64) -> Option<&'static str> {
        if self.watchdog_gone() {
            return Some(
                "the hold watchdog exited, and a sensor killed without it would leave the processes it holds stopped",
            );
        }
        let last = self.event_progress.load(Ordering::Relaxed);
        if last != 0 && now_ns.saturating_sub(last) >= EVENT_STALL.as_nanos() as u64 {
            return Some(
                "the event thread, which releases the openers of protected key files, has not moved for over a second",
            );
        }
        None
    }

    fn watchdog_gone(&self) -> bool {
        let Some(fd) = &self.watchdog else {
            return false;
        };
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
            Ok(n) if n > 0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn an_event_thread_off_duty_never_stops_holding() {
        let l = Liveness::default();
        assert_eq!(l.stalled_at(1_000 * S), None);
    }

    #[test]
    fn an_event_thread_that_stops_moving_stops_holding() {
        let l = Liveness::default();
        l.event_progressed();
        let at = l.event_progress.load(Ordering::Relaxed);
        assert_eq!(l.stalled_at(at + S / 2), None);
        assert!(l.stalled_at(at + EVENT_STALL.as_nanos() as u64).is_some());
        l.event_progressed();
        assert_eq!(l.stalled(), None, "moving again: holding again");
    }

    #[test]
    fn holding_stops_when_the_watchdog_is_gone() {
        let (read, write) = std::io::pipe().unwrap();
        let l = Liveness::new(read.into());
        assert_eq!(l.stalled(), None, "the watchdog runs");
        drop(write);
        assert!(l.stalled().is_some(), "the watchdog exited");
    }
}
