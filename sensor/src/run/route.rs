//! Record routing: every record from the bulk ring, every warning from the
//! control thread and every open the guard decided goes to the part that
//! handles it, in ring order. That order is what makes the identity caches
//! sound: a free or an exec is always handled before any signature that
//! follows it.
//!
//! A drain is bounded (`RECORDS_PER_TURN`, `TIME_PER_TURN`); what is left
//! waits in the ring for the next turn, which starts at once.
//!
//! One exception keeps the order per process: while a key file a process
//! opened is being read (off this thread, `keys/reader.rs`), that process's
//! later records wait, in order, and go on once the read is done. Its
//! signatures are then checked against the keys it loaded, and its exit
//! comes after its open. Other processes' records do not wait.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use hashbrown::HashMap;
use tracing::{error, warn};

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
/// default 8 MiB ring, and one turn's events stay well inside the output backlog.
pub(super) const RECORDS_PER_TURN: u32 = 4096;

/// Time one turn spends on ring records at most, for records that each
/// cost more (a key file read and parsed): the output and the warnings
/// still move several times a second.
pub(super) const TIME_PER_TURN: Duration = Duration::from_millis(50);

/// Longest a rules reload waits for the records before it (`settle`): a
/// key-file read's deadline, and some.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// Records held back behind key-file reads, at most. Past this, the read
/// that holds back the process whose record overflowed is given up: its
/// key is reported unknown, and nothing else is lost.
pub(super) const DEFERRED_MAX: usize = 8192;

/// Records of processes whose key file is being read, in ring order.
#[derive(Default)]
pub(super) struct Deferred {
    by_process: HashMap<u32, VecDeque<Record>>,
    len: usize,
}

impl Deferred {
    /// From now on, `tgid`'s records wait.
    fn block(&mut self, tgid: u32) {
        self.by_process.entry(tgid).or_default();
    }
}

/// The parts an open touches, borrowed from the sensor's fields.
macro_rules! open_parts {
    ($s:expr) => {
        &mut OpenParts {
            attr: &mut $s.attr,
            ident: &mut $s.keys.ident,
            decisions: &mut $s.decisions,
            out: &mut $s.out,
            key_openers: &mut $s.key_openers,
        }
    };
}

impl Sensor {
    /// Handles what is waiting: warnings, guard verdicts, finished
    /// key-file reads, and ring records up to this turn's bounds. Returns
    /// whether records may be left in the ring.
    pub(super) fn drain(&mut self) -> bool {
        // Both channels are bounded (1024 and 4096): taken whole.
        while let Ok(w) = self.warnings.try_recv() {
            self.out.warn(w.process, w.module, w.detail);
        }
        while let Ok(g) = self.guarded.try_recv() {
            self.secrets.on_guarded(g, &mut self.attr, &mut self.out);
        }
        self.collect_opens(true);
        let started = Instant::now();
        let mut handled = 0u32;
        loop {
            if handled >= RECORDS_PER_TURN || started.elapsed() >= TIME_PER_TURN {
                return true;
            }
            // A process whose read is done goes on before the next record.
            if self.secrets.reading_any() {
                self.collect_opens(false);
            }
            let rec = match self.events.next() {
                Some(item) => decode(&item),
                None => return false,
            };
            self.route(rec);
            // A drain under load can last: it is progress all the same.
            handled += 1;
            if handled.is_multiple_of(liveness::RECORDS_PER_STAMP) {
                self.liveness.event_progressed();
            }
        }
    }

    /// Before a rules reload: the records already in the ring, and the
    /// key-file reads their processes wait on, are handled first, so every
    /// event is judged by the rules in force when it happened. Bounded by
    /// `SETTLE_MAX` (a flood may never leave the ring empty).
    pub(super) fn settle(&mut self) {
        let until = Instant::now() + SETTLE_MAX;
        loop {
            while self.drain() && Instant::now() < until {}
            let waiting = self.secrets.reading_any() || !self.deferred.by_process.is_empty();
            if !waiting || Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
            self.collect_opens(false);
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

    /// At shutdown, after the last drain: every key-file read gets until
    /// its deadline, the records waiting for them are handled, and opens
    /// whose result never came are judged without one.
    pub(super) fn finish_opens(&mut self) {
        loop {
            let free = self.secrets.flush_reads(open_parts!(self));
            for tgid in free {
                self.replay(tgid);
            }
            if self.secrets.reading_any() {
                continue; // a replayed result started another read
            }
            // Nothing is being read, so nothing should wait; if anything
            // does, it goes on now.
            let waiting: Vec<u32> = self.deferred.by_process.keys().copied().collect();
            if waiting.is_empty() {
                break;
            }
            for tgid in waiting {
                self.replay(tgid);
            }
        }
        self.secrets.flush_awaiting(open_parts!(self));
    }

    /// Finished (or late) key-file reads: their opens are judged, and their
    /// processes' records go on. With `expire`, also the opens whose result
    /// is overdue.
    fn collect_opens(&mut self, expire: bool) {
        let now = Instant::now();
        let free = self.secrets.poll(open_parts!(self), now);
        if expire {
            self.secrets.expire_awaiting(open_parts!(self), now);
        }
        for tgid in free {
            self.replay(tgid);
        }
    }

    /// A record goes to its handler, or waits behind its process's read.
    fn route(&mut self, rec: Record) {
        let Some(tgid) = rec.tgid() else {
            return self.handle(rec);
        };
        let Some(queue) = self.deferred.by_process.get_mut(&tgid) else {
            return self.handle(rec);
        };
        queue.push_back(rec);
        self.deferred.len += 1;
        if self.deferred.len > DEFERRED_MAX {
            warn!(
                pid = tgid,
                waiting = self.deferred.len,
                "too many records wait for key-file reads; giving up this process's"
            );
            if let Some(tgid) = self.secrets.give_up(tgid, open_parts!(self)) {
                self.replay(tgid);
            }
        }
    }

    /// `tgid`'s read is done: its waiting records are handled in order,
    /// until one of them starts another read (then the rest wait again).
    fn replay(&mut self, tgid: u32) {
        let Some(mut queue) = self.deferred.by_process.remove(&tgid) else {
            return;
        };
        while let Some(rec) = queue.pop_front() {
            self.deferred.len -= 1;
            self.handle(rec);
            if let Some(again) = self.deferred.by_process.get_mut(&tgid) {
                // Blocked again just now, so nothing else waits there yet.
                again.append(&mut queue);
                return;
            }
        }
    }

    fn handle(&mut self, rec: Record) {
        match rec {
            Record::Sign(r, sig) => self.keys.on_sign(&r, &sig, &mut self.attr, &mut self.out),
            Record::SexpSign(r, copy) => {
                self.keys
                    .on_sexp_sign(&r, &copy, &mut self.attr, &mut self.out)
            }
            Record::Data { header, bytes } => self.keys.ident.on_data(&header, &bytes),
            Record::HandleFree(f) => self.keys.ident.on_free(f.tgid, f.handle),
            // The control thread snapshotted the new image; here the old
            // image's pointers stop meaning anything.
            Record::ExecMark(x) => {
                let tgid = x.task.tgid();
                self.secrets.settle(tgid, open_parts!(self));
                self.attr.exec_marked(tgid, x.task.ktime_ns);
                self.decisions.enforcer.forget(tgid);
                self.keys.forget_process(tgid);
            }
            Record::Exit(x) => {
                let tgid = x.task.tgid();
                self.secrets.settle(tgid, open_parts!(self));
                self.decisions.enforcer.forget(tgid);
                self.keys.forget_process(tgid);
                self.attr.exited(tgid, x.task.ktime_ns);
            }
            Record::Exec(_) => {}
            // The open waits for its result; a process held because it
            // opened a protected key file goes on once its open is judged
            // (`secret_opens.rs`).
            Record::FileOpen(f) => self.secrets.on_open(f, open_parts!(self)),
            Record::OpenResult(r) => {
                if let Some(tgid) = self.secrets.on_result(&r, open_parts!(self)) {
                    self.deferred.block(tgid);
                }
            }
            Record::Killed(k) => self.decisions.on_killed(&k, &mut self.attr, &mut self.out),
            Record::Malformed { kind, len } => {
                error!(kind, len, "malformed record from the probes")
            }
        }
    }
}
