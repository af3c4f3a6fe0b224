//! Record routing: every record from the bulk ring, every warning from the
//! control thread and every open the guard decided goes to the part that
//! handles it, in ring order. That order is what makes the identity caches
//! sound: a free or an exec is always handled before any signature that
//! follows it.
//!
//! A drain is bounded (`RECORDS_PER_TURN`, `TIME_PER_TURN`); what is left
//! waits in the ring for the next turn, which starts at once.

use std::time::{Duration, Instant};

use keywarden_probe_types::open_flags;
use tracing::error;

use super::{Sensor, secret_opens::OpenParts};
use crate::{
    liveness,
    records::{Record, decode},
};

/// Ring records one turn of the event loop handles at most. Then the turn
/// writes what is due (coalesced opens, the analyzer's results, the output)
/// and reports shedding. Unbounded, a flood kept the thread in one drain
/// for as long as it lasted, and everything it produced piled up unwritten
/// (issue 16, row 4: 1.5 GB). 4096 open records are about 1.4 MiB of the
/// 16 MiB ring, and one turn's events stay well inside the output backlog.
pub(super) const RECORDS_PER_TURN: u32 = 4096;

/// Time one turn spends on ring records at most, for records that each
/// cost more (a key file read and parsed): the output and the warnings
/// still move several times a second.
pub(super) const TIME_PER_TURN: Duration = Duration::from_millis(50);

impl Sensor {
    /// Handles what is waiting: warnings, guard verdicts, and ring records
    /// up to this turn's bounds. Returns whether records may be left in
    /// the ring.
    pub(super) fn drain(&mut self) -> bool {
        // Both channels are bounded (1024 and 4096): taken whole.
        while let Ok(w) = self.warnings.try_recv() {
            self.out.warn(w.process, w.module, w.detail);
        }
        while let Ok(g) = self.guarded.try_recv() {
            self.secrets.on_guarded(g, &mut self.attr, &mut self.out);
        }
        let started = Instant::now();
        let mut handled = 0u32;
        loop {
            if handled >= RECORDS_PER_TURN || started.elapsed() >= TIME_PER_TURN {
                return true;
            }
            let rec = match self.events.next() {
                Some(item) => decode(&item),
                None => return false,
            };
            self.handle(rec);
            // A drain under load can last: it is progress all the same.
            handled += 1;
            if handled.is_multiple_of(liveness::RECORDS_PER_STAMP) {
                self.liveness.event_progressed();
            }
        }
    }

    /// Takes up to `at_most` records off the ring without handling them
    /// (at exit, once the final drain is over), and returns how many.
    pub(super) fn discard_ring(&mut self, at_most: u64) -> u64 {
        let mut n = 0;
        while n < at_most && self.events.next().is_some() {
            n += 1;
        }
        n
    }

    fn handle(&mut self, rec: Record) {
        match rec {
            Record::Sign(r, sig) => self.keys.on_sign(&r, &sig, &mut self.attr, &mut self.out),
            Record::Data { header, bytes } => self.keys.ident.on_data(&header, &bytes),
            Record::HandleFree(f) => self.keys.ident.on_free(f.tgid, f.handle),
            // The control thread snapshotted the new image; here the old
            // image's pointers stop meaning anything.
            Record::ExecMark(x) => {
                let tgid = x.task.tgid();
                self.attr.exec_marked(tgid, x.task.ktime_ns);
                self.decisions.enforcer.forget(tgid);
                self.keys.forget_process(tgid);
            }
            Record::Exit(x) => {
                let tgid = x.task.tgid();
                self.decisions.enforcer.forget(tgid);
                self.keys.forget_process(tgid);
                self.attr.exited(tgid, x.task.ktime_ns);
            }
            Record::Exec(_) => {}
            Record::FileOpen(f) => {
                self.secrets.on_open(
                    &f,
                    OpenParts {
                        attr: &mut self.attr,
                        ident: &mut self.keys.ident,
                        decisions: &mut self.decisions,
                        out: &mut self.out,
                    },
                );
                // A process held because it opened a protected key file
                // goes on once judged, whatever the outcome.
                if f.flags & open_flags::HELD != 0 {
                    self.decisions.release(f.task.tgid());
                }
            }
            Record::Killed(k) => self.decisions.on_killed(&k, &mut self.attr, &mut self.out),
            Record::Malformed { kind, len } => {
                error!(kind, len, "malformed record from the probes")
            }
        }
    }
}
