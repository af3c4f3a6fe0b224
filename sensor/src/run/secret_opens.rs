//! (Over 600 lines: about 650 of one state machine, an open's entry, its
//! result, the key read, the judgement and the coalesced event, with its
//! tests after; the read itself is `keys/reader.rs`.)
//!
//! Opens of files that may hold keys or secrets. A key or certificate file
//! teaches the sensor which public keys a process loaded; a watched secret
//! file becomes a (coalesced) File System Activity event. Library opens go
//! to the control thread instead (`control.rs`).
//!
//! An open comes in two records: the probe reports it at entry, so that
//! the opener of a protected key can be held before the open returns, and
//! what it came to at exit (`OpenResultRecord`). The entry waits here for
//! its result, and only then is the open judged:
//! * a key file is read only when the process's own open of it succeeded
//!   and asked to read (not `O_PATH`, not write-only). The sensor reads as
//!   root: a file the process could not open (a symlink to another user's
//!   key, say) is none of its business, and no key is claimed for it;
//! * the read happens on the key reader (`keys/reader.rs`), off this
//!   thread, with a deadline (`reader::DEADLINE`); meanwhile the process's
//!   later records wait in order (`route.rs`), so the signatures it makes
//!   with the key are checked against it;
//! * a held opener goes on once its open is judged.

use std::{
    os::fd::AsFd,
    sync::Arc,
    time::{Duration, Instant},
};

use hashbrown::{HashMap, HashSet};
use keywarden_analyzer::event::{
    self, Event, IdentifiedBy, KeyIdentity, OpenResult, SecretFile, SecretFileOpen, Verdict,
};
use keywarden_probe_types::{ExeId, FileOpenRecord, OpenResultRecord, Task, open_flags};
use tracing::{debug, warn};

use super::{attribution::Attributor, emitter::Emitter};
use crate::{
    enforce::{decisions::Decisions, guard::GuardedOpen},
    enrich::process::ProcessInfo,
    keys::{
        identify::{Identifier, Source, identity_of},
        material::{self, KeyFile, KeyInfo},
        reader::{self, Done, Job, KeyReadStats, KeyReader},
    },
    records::c_str,
    secrets::watch::{Closed, Coalescer, Match, WatchList},
};

/// How long an entry waits for its result before it is judged without
/// one: the result record was lost (a full ring), or the open blocks (a
/// FIFO). Reads of the file need the result, so none is made.
const RESULT_WAIT: Duration = Duration::from_secs(1);

/// `key.unknown_reason` of a secret-file open whose key file was shed.
const SHED: &str = "the key file was not read: too many key files were waiting to be read";

/// The parts an open touches besides the secret-open state itself.
pub struct OpenParts<'a> {
    pub attr: &'a mut Attributor,
    pub ident: &'a mut Identifier,
    pub decisions: &'a mut Decisions,
    pub out: &'a mut Emitter,
    pub key_openers: &'a mut super::key_openers::KeyOpeners,
}

/// What an open came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opened {
    /// The descriptor it returned.
    Fd(i32),
    /// The errno it failed with.
    Failed(i32),
    /// Not seen: the result record was lost, or the open was interrupted
    /// by a signal and is restarted (reported again then).
    Unknown,
}

impl Opened {
    fn of(ret: i64) -> Self {
        match ret {
            fd if fd >= 0 => Opened::Fd(fd as i32),
            // ERESTARTSYS ..= ERESTART_RESTARTBLOCK: the kernel restarts
            // the call, whose entry and result come again.
            -516..=-512 => Opened::Unknown,
            _ => Opened::Failed((-ret) as i32),
        }
    }

    fn result(self) -> OpenResult {
        match self {
            Opened::Fd(_) => OpenResult::Succeeded,
            Opened::Failed(errno) => {
                let e = nix::errno::Errno::from_raw(errno);
                OpenResult::Failed(format!("{e:?} ({})", e.desc()))
            }
            Opened::Unknown => OpenResult::Unknown,
        }
    }
}

/// A key file's contents, as far as the sensor learnt them.
enum KeyRead {
    /// Not read: not a file whose keys matter, or the process's open did
    /// not succeed (or did not ask to read).
    NotRead,
    Read(Arc<Result<KeyFile, String>>),
    /// The sensor meant to read it and could not in time: why.
    Missed(String),
}

/// An open with its result, attributed.
struct Judged {
    f: Box<FileOpenRecord>,
    opened: Opened,
    info: Arc<ProcessInfo>,
    /// The path made absolute (as the process saw it).
    absolute: String,
    host_path: Option<String>,
    /// A block rule guards it: the guard reports it.
    guarded: bool,
    watched: Option<Match>,
}

/// A key file on the reader, and when this thread stops waiting for it.
struct Reading {
    open: Judged,
    deadline: Instant,
}

pub struct SecretOpens {
    pub watch: WatchList,
    coalescer: Coalescer<SecretFileOpen>,
    /// Entry records waiting for their result, by thread id, with when.
    awaiting: HashMap<u32, (Box<FileOpenRecord>, Instant)>,
    /// Key files being read, by reader job.
    reading: HashMap<u64, Reading>,
    reader: KeyReader,
    /// Processes already named for an io_uring open into a registered
    /// file slot. By pid: a reused pid is not named again until the set
    /// starts over.
    unexamined_warned: HashSet<u32>,
}

/// Most processes remembered as named for unexamined opens.
const UNEXAMINED_WARNED_MAX: usize = 4096;

/// The first open of a secret file by a process in its coalescing window:
/// everything its event says besides who opened it.
struct FirstOpen<'a> {
    path: &'a str,
    key_file: Option<&'a KeyFile>,
    /// Why the key is unknown, when the sensor meant to read it and could
    /// not in time.
    key_unknown: Option<String>,
    host_path: Option<String>,
    /// The watch-list glob (or `rule:ID`) that made it reportable.
    matched: String,
    /// A blocking rule's decision, and the rule.
    verdict: Option<(Verdict, String)>,
    result: OpenResult,
}

/// The coalescing window an open joins: its process's opens of the same
/// path with the same outcome. A success never joins a window of failed
/// opens: a process could otherwise fail an open on purpose first, and
/// have its read of the file reported as that failure, counted.
fn window(path: &str, result: &OpenResult) -> String {
    match result {
        OpenResult::Succeeded => path.to_owned(),
        OpenResult::Failed(_) => format!("{path}\0failed"),
        OpenResult::Unknown => format!("{path}\0unknown"),
    }
}

/// Lets a process held at its open go on: its open is judged.
fn release_if_held(f: &FileOpenRecord, decisions: &mut Decisions) {
    if f.flags & open_flags::HELD != 0 {
        decisions.release(f.task.tgid(), f.task.ktime_ns);
    }
}

impl SecretOpens {
    /// Starts the key reader's worker.
    pub fn new(watch: WatchList, coalesce: Duration) -> std::io::Result<Self> {
        Ok(Self {
            watch,
            coalescer: Coalescer::new(coalesce),
            awaiting: HashMap::new(),
            reading: HashMap::new(),
            reader: KeyReader::start()?,
            unexamined_warned: HashSet::new(),
        })
    }

    /// Key files not read for want of time or room, since the start.
    pub fn key_read_stats(&self) -> KeyReadStats {
        self.reader.stats
    }

    /// Whether any key file is being read.
    pub fn reading_any(&self) -> bool {
        !self.reading.is_empty()
    }

    fn reading_for(&self, tgid: u32) -> bool {
        self.reading.values().any(|r| r.open.f.task.tgid() == tgid)
    }

    /// An open's entry record: it waits for its result. An open the probe
    /// could not look at is named instead.
    pub fn on_open(&mut self, f: Box<FileOpenRecord>, p: &mut OpenParts<'_>) {
        if f.flags & open_flags::UNEXAMINED != 0 {
            self.unexamined(&f, p);
            return;
        }
        let tid = f.task.tid();
        if let Some((lost, _)) = self.awaiting.insert(tid, (f, Instant::now())) {
            // The thread opened again: the earlier result was lost.
            self.judge(lost, Opened::Unknown, None, p);
        }
    }

    /// A process opened a file through io_uring into a registered file
    /// slot: no descriptor, so the probe could not tell which file. A
    /// coverage warning names the process, once per process (the set is
    /// bounded and starts over when full).
    fn unexamined(&mut self, f: &FileOpenRecord, p: &mut OpenParts<'_>) {
        let tgid = f.task.tgid();
        let info = p.attr.process_at(tgid, f.task.ktime_ns);
        if !self.unexamined_warned.insert(tgid) {
            return;
        }
        if self.unexamined_warned.len() > UNEXAMINED_WARNED_MAX {
            self.unexamined_warned.clear();
        }
        let program = info.exe_path.clone().unwrap_or_else(|| c_str(&f.task.comm));
        p.out.warn(
            Some(p.attr.who(&f.task, &info).process),
            info.exe_path.as_deref().map(event::File::regular),
            format!(
                "{program} (pid {tgid}) opened a file through io_uring into a registered file \
                 slot: it gets no descriptor, so the sensor cannot tell which file (a key file \
                 opened this way is not seen)"
            ),
        );
    }

    /// An open's result: its open is judged. `Some(tgid)` when a key file
    /// of that process is now being read; its later records must wait.
    pub fn on_result(&mut self, r: &OpenResultRecord, p: &mut OpenParts<'_>) -> Option<u32> {
        let tid = r.pid_tgid as u32;
        let Some((mut f, _)) = self.awaiting.remove(&tid) else {
            debug!(
                tid,
                "an open's result without its open (the entry record was lost)"
            );
            return None;
        };
        // What the opened file's own name added at the exit: a key file's
        // name, a protected key's (and then perhaps a hold) that the path
        // the process gave did not show.
        f.flags |= r.flags & (open_flags::KEY_FILE | open_flags::PROTECTED | open_flags::HELD);
        let file = (r.file.valid != 0).then_some(r.file);
        self.judge(f, Opened::of(r.ret), file, p)
    }

    /// The process exec'd or exited: opens whose result never came are
    /// judged now, while it is still attributed as it was.
    pub fn settle(&mut self, tgid: u32, p: &mut OpenParts<'_>) {
        let tids: Vec<u32> = self
            .awaiting
            .iter()
            .filter(|(_, (f, _))| f.task.tgid() == tgid)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in tids {
            if let Some((f, _)) = self.awaiting.remove(&tid) {
                self.judge(f, Opened::Unknown, None, p);
            }
        }
    }

    /// Answered reads, reads past their deadline: judged now. Returns the
    /// processes whose records may go on.
    pub fn poll(&mut self, p: &mut OpenParts<'_>, now: Instant) -> Vec<u32> {
        let mut free = Vec::new();
        while let Some(done) = self.reader.try_done() {
            free.extend(self.answered(done, p));
        }
        let late: Vec<u64> = self
            .reading
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let why = format!(
                "the key file was not read: the read did not finish within {} ms",
                reader::DEADLINE.as_millis()
            );
            free.extend(self.abandon(id, why, p));
        }
        free
    }

    /// Entries that waited too long for their result: judged without one.
    /// Not those of a process whose records wait for a read (its results
    /// wait with them).
    pub fn expire_awaiting(&mut self, p: &mut OpenParts<'_>, now: Instant) {
        let old: Vec<u32> = self
            .awaiting
            .iter()
            .filter(|(_, (f, since))| {
                now.duration_since(*since) >= RESULT_WAIT && !self.reading_for(f.task.tgid())
            })
            .map(|(tid, _)| *tid)
            .collect();
        for tid in old {
            if let Some((f, _)) = self.awaiting.remove(&tid) {
                self.judge(f, Opened::Unknown, None, p);
            }
        }
    }

    /// Too many records of `tgid` wait for its key file: the read is given
    /// up, and they go on. `Some(tgid)` when there was such a read.
    pub fn give_up(&mut self, tgid: u32, p: &mut OpenParts<'_>) -> Option<u32> {
        let id = self
            .reading
            .iter()
            .find(|(_, r)| r.open.f.task.tgid() == tgid)
            .map(|(id, _)| *id)?;
        let why = "the key file was not read: too many of the process's records waited for it";
        self.abandon(id, why.to_owned(), p)
    }

    /// At shutdown: every read gets until its deadline. Returns the
    /// processes whose records may go on.
    pub fn flush_reads(&mut self, p: &mut OpenParts<'_>) -> Vec<u32> {
        let mut free = Vec::new();
        while let Some(deadline) = self.reading.values().map(|r| r.deadline).min() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.reader.wait_done(wait) {
                Some(done) => free.extend(self.answered(done, p)),
                None => free.extend(self.poll(p, Instant::now())),
            }
        }
        free
    }

    /// At shutdown, last: entries whose result never came are judged
    /// without one.
    pub fn flush_awaiting(&mut self, p: &mut OpenParts<'_>) {
        let tids: Vec<u32> = self.awaiting.keys().copied().collect();
        for tid in tids {
            if let Some((f, _)) = self.awaiting.remove(&tid) {
                self.judge(f, Opened::Unknown, None, p);
            }
        }
    }

    /// An open and its result: reported, and its key file read when it
    /// may be. `Some(tgid)` when the read is under way.
    fn judge(
        &mut self,
        f: Box<FileOpenRecord>,
        opened: Opened,
        file: Option<ExeId>,
        p: &mut OpenParts<'_>,
    ) -> Option<u32> {
        let tgid = f.task.tgid();
        let path = c_str(&f.path);
        // A path cut at entry cannot be matched; one walked from the opened
        // file (`RESOLVED`) is reported however long, and read through the
        // process's descriptor.
        if f.flags & open_flags::TRUNCATED != 0 && f.flags & open_flags::RESOLVED == 0 {
            debug!(pid = tgid, "path longer than the probe copies; not matched");
            release_if_held(&f, p.decisions);
            return None;
        }
        let info = p.attr.process_at(tgid, f.task.ktime_ns);
        // A path relative to a directory descriptor cannot be made absolute
        // here; it is matched as it is (`**/name` globs still apply).
        let absolute = if f.resolvable(&path) {
            info.absolute(&path)
        } else {
            path.clone()
        };
        let time_ms = p.attr.wall_ms(f.task.ktime_ns);
        let host_path = info.host_path(tgid, &absolute);
        // Opens of guarded files are reported by the guard, with a verdict.
        let guarded = p
            .decisions
            .enforcer
            .is_guarded(host_path.as_deref().unwrap_or(&absolute));
        let is_key_file = f.flags & open_flags::KEY_FILE != 0;
        // The kernel's watch prefilter ran on the path the process gave,
        // and the exit's test on the opened file's name only (a `token`
        // anywhere): the globs are matched here.
        let watched = if f.flags & (open_flags::WATCHED | open_flags::RESOLVED) != 0 {
            self.watch.matches(&absolute)
        } else {
            None
        };
        if !guarded && !is_key_file && f.flags & open_flags::PROTECTED == 0 && watched.is_none() {
            // Passed a kernel test, matched no glob: nothing to report or
            // read, and no coalescing window to spend on it.
            release_if_held(&f, p.decisions);
            return None;
        }
        if !guarded
            && !is_key_file
            && self
                .coalescer
                .join(tgid, &window(&absolute, &opened.result()), time_ms)
        {
            // A repeat within the window: counted, nothing else to do.
            release_if_held(&f, p.decisions);
            return None;
        }
        // Only files that may hold keys are read; a .env or a token never is.
        let wants_keys = is_key_file
            || f.flags & open_flags::PROTECTED != 0
            || watched.as_ref().is_some_and(|m| m.only_private_keys);
        let open = Judged {
            f,
            opened,
            info,
            absolute,
            host_path,
            guarded,
            watched,
        };
        // A file the process opened without asking to read it (`O_PATH`
        // needs no permission on it at all) is read only to judge a
        // protected key: such a descriptor can be reopened for reading
        // through /proc/self/fd. Its keys are not claimed for it.
        let may_read = open.f.reads() || open.f.flags & open_flags::PROTECTED != 0;
        let key = match opened {
            Opened::Fd(fd) if wants_keys && may_read => {
                match self.reader.submit(Self::job(&open, &path, fd, file)) {
                    Some(id) => {
                        let deadline = Instant::now() + reader::DEADLINE;
                        self.reading.insert(id, Reading { open, deadline });
                        return Some(tgid);
                    }
                    None => KeyRead::Missed(SHED.to_owned()),
                }
            }
            _ => KeyRead::NotRead,
        };
        self.finish(open, key, p);
        None
    }

    /// The reader's job for a successful open: the process's descriptor,
    /// and where its path resolves should that be gone.
    fn job(open: &Judged, path: &str, fd: i32, file: Option<ExeId>) -> Job {
        let f = &open.f;
        // The root and working directory the control thread kept at exec;
        // the reader prefers the process's own now, and checks either
        // against the root the open resolved from.
        let kept = if path.starts_with('/') {
            open.info.root.as_ref()
        } else if f.resolvable(path) {
            open.info.cwd.as_ref()
        } else {
            None
        };
        Job {
            tgid: f.task.tgid(),
            fd,
            opened: file,
            path: path.to_owned(),
            shown_as: open.absolute.clone(),
            kept_base: kept.and_then(|h| h.try_clone().ok()),
            kept_mnt_ns: open.info.mnt_ns,
            root: (f.root.valid != 0).then_some(f.root),
            resolvable: f.resolvable(path),
        }
    }

    /// A read answered: its open is finished. The process whose records
    /// may go on, unless the read was abandoned already.
    fn answered(&mut self, done: Done, p: &mut OpenParts<'_>) -> Option<u32> {
        let r = self.reading.remove(&done.id)?;
        let tgid = r.open.f.task.tgid();
        debug!(
            pid = tgid,
            path = %r.open.absolute,
            via = ?done.via,
            "key file read"
        );
        self.finish(r.open, KeyRead::Read(done.result), p);
        Some(tgid)
    }

    /// A read given up: its open is finished without it.
    fn abandon(&mut self, id: u64, why: String, p: &mut OpenParts<'_>) -> Option<u32> {
        let r = self.reading.remove(&id)?;
        self.reader.stats.abandoned += 1;
        let tgid = r.open.f.task.tgid();
        warn!(pid = tgid, path = %r.open.absolute, "{why}");
        self.finish(r.open, KeyRead::Missed(why), p);
        Some(tgid)
    }

    /// The rest of an open once its key file is known (or not): the keys
    /// the process loaded, protection and condemnation, the release of a
    /// held opener, and the secret-file event.
    fn finish(&mut self, open: Judged, key: KeyRead, p: &mut OpenParts<'_>) {
        let Judged {
            f,
            opened,
            info,
            absolute,
            host_path,
            guarded,
            watched,
        } = open;
        let tgid = f.task.tgid();
        let read = match &key {
            KeyRead::Read(r) => (**r).as_ref().ok(),
            KeyRead::NotRead | KeyRead::Missed(_) => None,
        };
        // What the process itself could read: the keys it loaded, and what
        // its event says the file holds.
        let key_file = read.filter(|_| f.reads());
        if let Some(k) = key_file
            && f.flags & open_flags::KEY_FILE != 0
        {
            p.ident.add_process_keys(tgid, k.keys.clone(), &absolute);
            p.ident
                .add_certificates(&k.certificates, &Source::File(absolute.clone()));
        }
        if let Some(k) = read
            && p.decisions.enforcer.protects_any()
            && k.has_private_key
        {
            p.decisions.protect_file(&absolute, k);
            p.decisions
                .judge_key_load(&f.task, &info, k, &absolute, p.attr, &p.out.origin);
        }
        // Judged (condemned or not): a held opener goes on.
        release_if_held(&f, p.decisions);
        if let Some(k) = key_file
            && k.has_private_key
        {
            p.key_openers
                .opened_private_key(tgid, &info, &absolute, p.out);
        }
        let Some(m) = watched else { return };
        if guarded {
            return;
        }
        let holds_private_key = key_file.is_some_and(|k| k.has_private_key);
        if m.only_private_keys && !holds_private_key {
            return;
        }
        if self.coalescer.join(
            tgid,
            &window(&absolute, &opened.result()),
            p.attr.wall_ms(f.task.ktime_ns),
        ) {
            return;
        }
        // A process with too many files in open windows (a flood of
        // distinct names) has this one shed, counted. Its key file was
        // still read and judged above: only the event is not written.
        if !self.coalescer.admit(tgid) {
            return;
        }
        let key_unknown = match &key {
            KeyRead::Missed(why) => Some(why.clone()),
            KeyRead::NotRead | KeyRead::Read(_) => None,
        };
        self.start(
            &f.task,
            &info,
            FirstOpen {
                path: &absolute,
                key_file,
                key_unknown,
                host_path,
                matched: m.glob.clone(),
                verdict: None,
                result: opened.result(),
            },
            p.attr,
            p.out,
        );
    }

    /// An open the guard decided: reported like any secret-file open, with
    /// its verdict.
    pub fn on_guarded(&mut self, g: GuardedOpen, attr: &mut Attributor, out: &mut Emitter) {
        let mut comm = [0u8; 16];
        let n = g.comm.len().min(15);
        comm[..n].copy_from_slice(&g.comm.as_bytes()[..n]);
        let task = Task {
            pid_tgid: ((g.tgid as u64) << 32) | g.tgid as u64,
            uid_gid: g.uid as u64,
            cgroup_id: g.cgroup_id,
            ktime_ns: g.ktime_ns,
            comm,
        };
        let time_ms = attr.wall_ms(g.ktime_ns);
        if self
            .coalescer
            .join(g.tgid, &window(&g.host_path, &OpenResult::Unknown), time_ms)
        {
            return;
        }
        let watched = self.watch.matches(&g.host_path);
        if g.verdict.is_none() && watched.is_none() {
            return; // allowed, no rule decided, and not watched
        }
        let key_file = if g
            .host_path
            .rsplit('/')
            .next()
            .is_some_and(material::looks_like_key_file)
            || watched.as_ref().is_some_and(|m| m.only_private_keys)
        {
            // The guard's path is the host's view of the very file.
            std::fs::File::open("/").ok().and_then(|root| {
                material::read_key_file_in_root(root.as_fd(), &g.host_path, &g.host_path).ok()
            })
        } else {
            None
        };
        let matched = match (&watched, &g.verdict) {
            (Some(m), _) => m.glob.clone(),
            (None, Some((_, rule))) => format!("rule:{rule}"),
            (None, None) => String::new(),
        };
        let verdict = g.verdict.map(|(allowed, rule)| {
            (
                if allowed {
                    Verdict::Allowed
                } else {
                    Verdict::Denied
                },
                rule,
            )
        });
        self.start(
            &task,
            &g.process,
            FirstOpen {
                path: &g.host_path,
                key_file: key_file.as_ref(),
                key_unknown: None,
                host_path: Some(g.host_path.clone()),
                matched,
                verdict,
                // The guard's verdict is what is known of the result.
                result: OpenResult::Unknown,
            },
            attr,
            out,
        );
    }

    /// The first open of a secret file by a process in its coalescing
    /// window (later ones `join` it).
    fn start(
        &mut self,
        task: &Task,
        info: &ProcessInfo,
        o: FirstOpen<'_>,
        attr: &mut Attributor,
        out: &mut Emitter,
    ) {
        let time_ms = attr.wall_ms(task.ktime_ns);
        let keys: &[KeyInfo] = o.key_file.map_or(&[], |k| &k.keys);
        let who = attr.who(task, info);
        let seq = out.next_seq();
        let evicted = self.coalescer.add(
            task.tgid(),
            &window(o.path, &o.result),
            time_ms,
            SecretFileOpen {
                seq,
                who,
                file: event::File::regular(o.path),
                key: if keys.len() == 1 {
                    Some(identity_of(&keys[0], o.path, IdentifiedBy::KeyFile))
                } else {
                    o.key_unknown.map(KeyIdentity::unknown)
                },
                secret: SecretFile {
                    host_path: o.host_path,
                    matched: o.matched,
                    count: 1,
                    first_time: time_ms,
                    last_time: time_ms,
                    keys: keys.iter().map(|k| k.spki_sha256.clone()).collect(),
                    holds_private_key: o.key_file.is_some_and(|k| k.has_private_key),
                    verdict: o.verdict.as_ref().map(|(v, _)| *v),
                    rule: o.verdict.map(|(_, rule)| rule),
                },
                result: o.result,
            },
        );
        // `watch::CAPACITY` windows were open: the oldest closed
        // early, and is written now.
        if let Some(closed) = evicted {
            Self::emit_closed(closed, out);
        }
    }

    /// Emits coalesced secret-file opens whose window has closed (all with
    /// `flush`).
    pub fn emit_due(&mut self, flush: bool, out: &mut Emitter) {
        for closed in self.coalescer.due(flush) {
            Self::emit_closed(closed, out);
        }
    }

    /// A closed window's event, with the count and time of its last open.
    fn emit_closed((mut open, count, last): Closed<SecretFileOpen>, out: &mut Emitter) {
        open.secret.count = count;
        open.secret.last_time = last;
        let ev = Event::secret_file_open(&out.origin, open);
        out.emit(ev, None);
    }

    /// Opens shed so far because their process had too many files in open
    /// windows.
    pub fn shed(&self) -> u64 {
        self.coalescer.shed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit's return value as the event reports it: a descriptor is a
    /// success, an error its errno by name, and an interrupted open (the
    /// kernel restarts it, and reports it again) is not a result.
    #[test]
    fn open_results_read_as_the_event_reports_them() {
        assert_eq!(Opened::of(3), Opened::Fd(3));
        assert_eq!(Opened::of(0), Opened::Fd(0));
        assert_eq!(Opened::of(-13), Opened::Failed(13));
        assert_eq!(
            Opened::of(-13).result(),
            OpenResult::Failed("EACCES (Permission denied)".into())
        );
        assert_eq!(
            Opened::of(-2).result(),
            OpenResult::Failed("ENOENT (No such file or directory)".into())
        );
        assert_eq!(Opened::of(-512), Opened::Unknown);
        assert_eq!(Opened::of(-516), Opened::Unknown);
        assert_eq!(Opened::of(5).result(), OpenResult::Succeeded);
        assert_eq!(Opened::Unknown.result(), OpenResult::Unknown);
    }

    /// A process's successful opens of a path share one window, failed
    /// ones (whatever the errno) another, and ones without a result a third.
    #[test]
    fn successes_and_failures_coalesce_apart() {
        let ok = window("/k.pem", &Opened::of(3).result());
        assert_eq!(ok, window("/k.pem", &Opened::of(7).result()));
        let failed = window("/k.pem", &Opened::of(-2).result());
        assert_eq!(failed, window("/k.pem", &Opened::of(-13).result()));
        let unknown = window("/k.pem", &Opened::Unknown.result());
        assert!(ok != failed && failed != unknown && ok != unknown);
        assert_ne!(ok, window("/other.pem", &Opened::of(3).result()));
    }
}
