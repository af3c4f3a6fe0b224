//! Record routing: every record from the bulk ring, every warning from the
//! control thread and every open the guard decided goes to the part that
//! handles it, in ring order. That order is what makes the identity caches
//! sound: a free or an exec is always handled before any signature that
//! follows it.

use keywarden_probe_types::open_flags;
use tracing::error;

use super::{Sensor, secret_opens::OpenParts};
use crate::{
    liveness,
    records::{Record, decode},
};

impl Sensor {
    /// Handles everything waiting: warnings, guard verdicts, ring records.
    pub(super) fn drain(&mut self) {
        while let Ok(w) = self.warnings.try_recv() {
            self.out.warn(w.process, w.module, w.detail);
        }
        while let Ok(g) = self.guarded.try_recv() {
            self.secrets.on_guarded(g, &mut self.attr, &mut self.out);
        }
        let mut handled = 0u32;
        loop {
            let rec = match self.events.next() {
                Some(item) => decode(&item),
                None => break,
            };
            self.handle(rec);
            // A drain under load can last: it is progress all the same.
            handled = handled.wrapping_add(1);
            if handled.is_multiple_of(liveness::RECORDS_PER_STAMP) {
                self.liveness.event_progressed();
            }
        }
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
            Record::OpenResult(_) => {}
            Record::Killed(k) => self.decisions.on_killed(&k, &mut self.attr, &mut self.out),
            Record::Malformed { kind, len } => {
                error!(kind, len, "malformed record from the probes")
            }
        }
    }
}
