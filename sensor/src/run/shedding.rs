//! Loss under load, counted per cause and never silent.
//!
//! Each bound the sensor keeps sheds something when it is reached, and
//! counts it where it sheds: the probes count records the full ring buffer
//! refused (the kernel `STATS` map), the kernel counts runs of a probe it
//! skipped (`probes::skipped`), the coalescer counts opens of a
//! process with too many files in open windows, the emitter counts events
//! the full analyzer queue handed back (written unanalysed), the guard
//! counts verdicts its full queue could not report, and the sink counts
//! lines its full backlog refused or that were still unwritten at exit.
//! This module gathers them into one `Shed` and says when to report it: a
//! `coverage_warning` within about a second of a loss, at most one a
//! second while shedding lasts, and a last one at exit. A run that shed
//! anything also says so in its final `stopped:` line and its exit status
//! (`EXIT_SHED`).

use std::time::{Duration, Instant};

/// `keywarden run`'s exit status when it stopped as asked but shed events
/// on the way (1 is an error, 2 is `keywarden coverage` finding uncovered
/// code).
pub const EXIT_SHED: u8 = 3;

/// At most one shedding warning this often.
pub const WARN_EVERY: Duration = Duration::from_secs(1);

/// Events shed since the sensor started, per cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shed {
    /// Records the probes could not put in the full ring buffer, by kind
    /// (`stats::LOST_SIGN`, `LOST_DATA`, `LOST_OTHER`).
    pub ring_sign: u64,
    pub ring_data: u64,
    pub ring_other: u64,
    /// Records still in the ring when the sensor stopped reading it at
    /// exit (a flood that outlasted the final drain).
    pub ring_unread: u64,
    /// Runs of a probe program the kernel skipped: another BPF program was
    /// running on that CPU (`probes::skipped`). What they would have seen
    /// (a signature, an open, an exit) is missing.
    pub kernel_skipped: u64,
    /// Secret-file opens not reported: their process had too many files
    /// in open coalescing windows.
    pub coalescer: u64,
    /// Events the full analyzer queue handed back: written, but no rule
    /// saw them.
    pub analyzer: u64,
    /// Guarded opens whose verdict was enforced but not reported.
    pub guard: u64,
    /// Events the output backlog had no room for, or that were still
    /// unwritten at exit.
    pub sink: u64,
    /// Events the Parquet writer's full queue refused (`lake/`).
    pub parquet_backlog: u64,
    /// Events whose Parquet file could not be written (a full disk, a
    /// directory that is not the sensor's), or that were not written by
    /// the time the sensor stopped.
    pub parquet_write: u64,
}

impl Shed {
    /// Everything the ring buffer cost.
    pub fn ring(&self) -> u64 {
        self.ring_sign + self.ring_data + self.ring_other + self.ring_unread
    }

    pub fn total(&self) -> u64 {
        self.ring()
            + self.kernel_skipped
            + self.coalescer
            + self.analyzer
            + self.guard
            + self.sink
            + self.parquet_backlog
            + self.parquet_write
    }

    /// What was shed after `earlier`, cause by cause.
    fn since(&self, earlier: &Shed) -> Shed {
        Shed {
            ring_sign: self.ring_sign.saturating_sub(earlier.ring_sign),
            ring_data: self.ring_data.saturating_sub(earlier.ring_data),
            ring_other: self.ring_other.saturating_sub(earlier.ring_other),
            ring_unread: self.ring_unread.saturating_sub(earlier.ring_unread),
            kernel_skipped: self.kernel_skipped.saturating_sub(earlier.kernel_skipped),
            coalescer: self.coalescer.saturating_sub(earlier.coalescer),
            analyzer: self.analyzer.saturating_sub(earlier.analyzer),
            guard: self.guard.saturating_sub(earlier.guard),
            sink: self.sink.saturating_sub(earlier.sink),
            parquet_backlog: self.parquet_backlog.saturating_sub(earlier.parquet_backlog),
            parquet_write: self.parquet_write.saturating_sub(earlier.parquet_write),
        }
    }

    /// `cause=count` for every cause, in a fixed order (`docs/events.md`).
    pub fn causes(&self) -> String {
        format!(
            "ring_buffer={} kernel_skipped={} coalescer={} analyzer_queue={} guard_queue={} \
             sink_backlog={} parquet_backlog={} parquet_write={}",
            self.ring(),
            self.kernel_skipped,
            self.coalescer,
            self.analyzer,
            self.guard,
            self.sink,
            self.parquet_backlog,
            self.parquet_write
        )
    }

    /// The ring buffer's share by record kind.
    fn ring_kinds(&self) -> String {
        format!(
            "signature={} signed_data={} process_file={} unread_at_exit={}",
            self.ring_sign, self.ring_data, self.ring_other, self.ring_unread
        )
    }
}

/// When to warn, and what was already reported.
#[derive(Default)]
pub struct ShedReport {
    reported: Shed,
    last_warning: Option<Instant>,
}

impl ShedReport {
    /// The warning to emit at `now`, given the totals `shed`: `None` when
    /// nothing was shed since the last warning, or when that warning is
    /// under `WARN_EVERY` old (the loss then waits for the next one, so it
    /// is reported within about a second). `at_exit` reports regardless of
    /// the time.
    pub fn due(&mut self, shed: Shed, now: Instant, at_exit: bool) -> Option<String> {
        let new = shed.since(&self.reported);
        if new.total() == 0 {
            return None;
        }
        if !at_exit
            && self
                .last_warning
                .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            return None;
        }
        self.reported = shed;
        self.last_warning = Some(now);
        Some(format!(
            "events shed under load since the last report: {} (ring buffer by kind: {}); since the start: {}",
            new.causes(),
            new.ring_kinds(),
            shed.causes()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_is_reported_at_once_then_at_most_once_a_second() {
        let mut r = ShedReport::default();
        let t0 = Instant::now();
        assert_eq!(r.due(Shed::default(), t0, false), None, "nothing shed");
        let mut shed = Shed {
            coalescer: 5,
            ..Shed::default()
        };
        let first = r.due(shed, t0, false).expect("the first loss at once");
        assert!(
            first.starts_with(
                "events shed under load since the last report: ring_buffer=0 kernel_skipped=0 \
                 coalescer=5 analyzer_queue=0 guard_queue=0 sink_backlog=0 parquet_backlog=0 parquet_write=0"
            ),
            "{first}"
        );
        // More shedding within the second: held back, not lost.
        shed.ring_other = 7;
        shed.kernel_skipped = 4;
        shed.sink = 2;
        assert_eq!(r.due(shed, t0 + Duration::from_millis(300), false), None);
        shed.coalescer += 1;
        assert_eq!(r.due(shed, t0 + Duration::from_millis(900), false), None);
        let second = r
            .due(shed, t0 + Duration::from_millis(1000), false)
            .expect("a second later");
        assert!(
            second.contains(
                "since the last report: ring_buffer=7 kernel_skipped=4 coalescer=1 analyzer_queue=0 \
                 guard_queue=0 sink_backlog=2 parquet_backlog=0 parquet_write=0 \
                 (ring buffer by kind: signature=0 \
                 signed_data=0 process_file=7 unread_at_exit=0)"
            ),
            "{second}"
        );
        assert!(
            second.ends_with(
                "since the start: ring_buffer=7 kernel_skipped=4 coalescer=6 analyzer_queue=0 guard_queue=0 \
                 sink_backlog=2 parquet_backlog=0 parquet_write=0"
            ),
            "{second}"
        );
        // Nothing new: no warning, however long it has been.
        assert_eq!(r.due(shed, t0 + Duration::from_secs(60), false), None);
        // At exit, whatever the time.
        shed.analyzer = 3;
        let last = r
            .due(shed, t0 + Duration::from_millis(1001), true)
            .expect("at exit");
        assert!(last.contains("analyzer_queue=3 guard_queue=0"), "{last}");
    }

    #[test]
    fn totals_add_every_cause() {
        let shed = Shed {
            ring_sign: 1,
            ring_data: 2,
            ring_other: 3,
            ring_unread: 4,
            kernel_skipped: 11,
            coalescer: 5,
            analyzer: 6,
            guard: 7,
            sink: 8,
            parquet_backlog: 9,
            parquet_write: 10,
        };
        assert_eq!(shed.ring(), 10);
        assert_eq!(shed.total(), 66);
        assert_eq!(
            shed.causes(),
            "ring_buffer=10 kernel_skipped=11 coalescer=5 analyzer_queue=6 guard_queue=7 sink_backlog=8 \
             parquet_backlog=9 parquet_write=10"
        );
    }
}
