//! Opens of files that may hold keys or secrets. A key or certificate file
//! teaches the sensor which public keys a process loaded; a watched secret
//! file becomes a (coalesced) File System Activity event. Library opens go
//! to the control thread instead (`control.rs`).

use std::{
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    sync::Arc,
    time::Duration,
};

use hashbrown::HashMap;
use keywarden_analyzer::event::{self, Event, IdentifiedBy, SecretFile, SecretFileOpen, Verdict};
use keywarden_probe_types::{FileOpenRecord, Task, open_flags};
use tracing::debug;

use super::{attribution::Attributor, emitter::Emitter};
use crate::{
    enforce::{decisions::Decisions, guard::GuardedOpen},
    enrich::process::ProcessInfo,
    keys::{
        identify::{Identifier, identity_of},
        material::{self, KeyFile, KeyInfo},
        safe_open,
    },
    records::c_str,
    secrets::watch::{Closed, Coalescer, WatchList},
};

/// Parsed key files, by file identity, so a file opened on every request is
/// parsed once. Failures are cached too (most `.pem` files are not keys).
type KeyFileCache = HashMap<(u64, u64, i64, u64), Arc<Result<KeyFile, String>>>;

/// The parts an open touches besides the secret-open state itself.
pub struct OpenParts<'a> {
    pub attr: &'a mut Attributor,
    pub ident: &'a mut Identifier,
    pub decisions: &'a mut Decisions,
    pub out: &'a mut Emitter,
}

pub struct SecretOpens {
    pub watch: WatchList,
    coalescer: Coalescer<SecretFileOpen>,
    key_files: KeyFileCache,
}

/// The first open of a secret file by a process in its coalescing window:
/// everything its event says besides who opened it.
struct FirstOpen<'a> {
    path: &'a str,
    key_file: Option<&'a KeyFile>,
    host_path: Option<String>,
    /// The watch-list glob (or `rule:ID`) that made it reportable.
    matched: String,
    /// A blocking rule's decision, and the rule.
    verdict: Option<(Verdict, String)>,
}

impl SecretOpens {
    pub fn new(watch: WatchList, coalesce: Duration) -> Self {
        Self {
            watch,
            coalescer: Coalescer::new(coalesce),
            key_files: HashMap::new(),
        }
    }

    /// A possible key file or a watched secret file was opened.
    pub fn on_open(&mut self, f: &FileOpenRecord, p: OpenParts<'_>) {
        let tgid = f.task.tgid();
        let path = c_str(&f.path);
        if f.flags & open_flags::TRUNCATED != 0 {
            debug!(pid = tgid, "path longer than the probe copies; not matched");
            return;
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
        if !guarded
            && f.flags & open_flags::KEY_FILE == 0
            && self.coalescer.join(tgid, &absolute, time_ms)
        {
            return; // a repeat within the window: counted, nothing else to do
        }
        let watched = if f.flags & open_flags::WATCHED != 0 {
            self.watch.matches(&absolute)
        } else {
            None
        };
        let is_key_file = f.flags & open_flags::KEY_FILE != 0;
        let protected_name = f.flags & open_flags::PROTECTED != 0;
        // Only files that may hold keys are read; a .env or a token never is.
        let key_file = if is_key_file
            || protected_name
            || watched.as_ref().is_some_and(|m| m.only_private_keys)
        {
            self.key_file(&info, &path, f)
        } else {
            None
        };
        if let Some(Ok(k)) = key_file.as_deref() {
            if is_key_file {
                p.ident.add_process_keys(tgid, k.keys.clone(), &absolute);
            }
            if p.decisions.enforcer.protects_any() && k.has_private_key {
                p.decisions.protect_file(&absolute, k);
                p.decisions
                    .judge_key_load(&f.task, &info, k, &absolute, p.attr, &p.out.origin);
            }
        }
        let Some(m) = watched else { return };
        if guarded {
            return;
        }
        let holds_private_key = matches!(key_file.as_deref(), Some(Ok(k)) if k.has_private_key);
        if m.only_private_keys && !holds_private_key {
            return;
        }
        if self.coalescer.join(tgid, &absolute, time_ms) {
            return;
        }
        // A process with too many files in open windows (a flood of
        // distinct names) has this one shed, counted. Its key file was
        // still read and judged above: only the event is not written.
        if !self.coalescer.admit(tgid) {
            return;
        }
        let keys = match key_file.as_deref() {
            Some(Ok(k)) => Some(k),
            _ => None,
        };
        self.start(
            &f.task,
            &info,
            FirstOpen {
                path: &absolute,
                key_file: keys,
                host_path,
                matched: m.glob.clone(),
                verdict: None,
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
        if self.coalescer.join(g.tgid, &g.host_path, time_ms) {
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
                host_path: Some(g.host_path.clone()),
                matched,
                verdict,
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
            o.path,
            time_ms,
            SecretFileOpen {
                seq,
                process: who.process,
                container: who.container,
                cgroup: who.cgroup,
                file: event::File::regular(o.path),
                key: (keys.len() == 1)
                    .then(|| identity_of(&keys[0], o.path, IdentifiedBy::KeyFile)),
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

    /// Parses a key or certificate file the process opened, once per file
    /// version. The path is resolved inside the process's own root (or
    /// working directory, for a relative path) and opened without blocking
    /// or following magic links (`safe_open`); `None` when it cannot be
    /// resolved. A relative path is kept beneath the working directory: a
    /// `../x.pem` is not climbed (never out of the process's view).
    fn key_file(
        &mut self,
        info: &ProcessInfo,
        path: &str,
        f: &FileOpenRecord,
    ) -> Option<Arc<Result<KeyFile, String>>> {
        // The process's root and working directory now, not at its exec:
        // a process may chroot or chdir after it starts. (Gone already:
        // those the control thread took at exec.)
        let tgid = f.task.tgid();
        let (now, kept) = if path.starts_with('/') {
            (format!("/proc/{tgid}/root"), info.root.as_ref())
        } else if f.resolvable(path) {
            (format!("/proc/{tgid}/cwd"), info.cwd.as_ref())
        } else {
            debug!(path = %path, "cannot resolve opened file");
            return None;
        };
        let now = std::fs::File::open(now).ok().map(OwnedFd::from);
        let Some(base) = now.as_ref().or(kept) else {
            debug!(path = %path, "cannot resolve opened file");
            return None;
        };
        let file = match safe_open::open_beneath(base.as_fd(), path) {
            Ok(file) => file,
            // A missing file is the common case (and a flood's: distinct
            // names that do not exist), not worth a log line each.
            Err(safe_open::Refused::Open(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return None;
            }
            Err(e) => {
                debug!(path = %path, error = %e, "opened file not read");
                return None;
            }
        };
        let md = file.metadata().ok()?;
        let id = (
            md.dev(),
            md.ino(),
            md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            md.size(),
        );
        if let Some(r) = self.key_files.get(&id) {
            return Some(r.clone());
        }
        let r = Arc::new(material::read_key_file_from(file, path).map_err(|e| e.to_string()));
        if let Err(e) = &*r {
            debug!("{e}");
        }
        if self.key_files.len() > 10_000 {
            self.key_files.clear();
        }
        self.key_files.insert(id, r.clone());
        Some(r)
    }
}
