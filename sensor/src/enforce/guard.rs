//! `block`: refuse opens of guarded files with EPERM, using fanotify
//! permission events.
//!
//! Why fanotify: BPF LSM (`file_open`) would decide in the kernel, but
//! many kernels (this project's CI kernel among them) refuse LSM programs.
//! fanotify permission events work on any kernel built with
//! `CONFIG_FANOTIFY_ACCESS_PERMISSIONS`: the opening thread sleeps until
//! this thread answers allow or deny.
//!
//! Only directories named by block rules are marked (with `FAN_EVENT_ON_CHILD`,
//! so files created or replaced later are covered), never a whole
//! filesystem: unrelated opens never wait for user space.
//!
//! Fail-open: if the sensor dies, the kernel drops the group, answers
//! pending events with allow and removes the marks. A dead sensor must not
//! make every guarded file unreadable (nginx could not restart, nor could an
//! operator repair the host); the death itself is visible (DaemonSet
//! restarts, the missing heartbeat in metrics).

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use globset::{GlobSet, GlobSetBuilder};
use keywarden_analyzer::{
    event::{self, Cgroup, Event, OpenResult, Origin, SecretFile, SecretFileOpen, User},
    rules::{Action, Rule, RuleSet, path_glob},
};
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, MaskFlags, Response,
};
use tracing::{debug, info, warn};

use crate::enrich::{
    pods::PodNames,
    process::{ProcessInfo, ProcessTable, cgroup2_root},
};

/// Fields a block rule may test: what is known before the file is read.
const DECIDABLE: &[&str] = &[
    "file.path",
    "file.name",
    "cgroup.path",
    "device.hostname",
    "container.uid",
    "container.runtime",
    "container.pod_uuid",
    "container.name",
    "container.pod_name",
    "container.pod_namespace",
];

/// A directory to mark, and whether its subdirectories are marked too.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Root {
    pub dir: PathBuf,
    pub recursive: bool,
}

/// One decided open, for the event thread to report.
#[derive(Debug)]
pub struct GuardedOpen {
    pub tgid: u32,
    pub uid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub ktime_ns: u64,
    pub host_path: String,
    /// (allowed, deciding rule); `None` when the path is under a block
    /// rule's glob but no block rule selected this open (it was allowed,
    /// and is reported like any watched open).
    pub verdict: Option<(bool, String)>,
    /// The process as the guard judged it, while its open waited. The
    /// event thread reports this one: its own lookup can come after the
    /// process exited and its records were forgotten (the exit travels
    /// through the event ring, this open through a channel).
    pub process: Arc<ProcessInfo>,
}

/// The directories block rules need marked. A glob must start with a fixed
/// directory: `**/*.key` would put every open on the host behind a
/// permission check, and is refused naming the rule.
pub fn plan(rules: &RuleSet) -> Result<Vec<Root>> {
    let mut roots = BTreeSet::new();
    for r in rules.with_action(Action::Block) {
        if r.threshold.is_some() {
            bail!(
                "rule {} ({}): block decides each open alone, so it cannot have a threshold",
                r.id,
                r.source
            );
        }
        for c in &r.conditions {
            if !DECIDABLE.contains(&c.field) && !c.field.starts_with("actor.") {
                bail!(
                    "rule {} ({}): block decides before the file is read, so it cannot test `{}`",
                    r.id,
                    r.source,
                    c.field
                );
            }
        }
        for glob in r.values_of("file.path").unwrap_or_default() {
            roots.insert(root_of(glob).with_context(|| format!("rule {} ({})", r.id, r.source))?);
        }
    }
    Ok(roots.into_iter().collect())
}

fn root_of(glob: &str) -> Result<Root> {
    let parts: Vec<&str> = glob.split('/').collect();
    let meta = |s: &str| s.contains(['*', '?', '[', '{']);
    let first_meta = parts.iter().position(|p| meta(p));
    let (fixed, recursive) = match first_meta {
        // A literal file: its directory (the file may be replaced).
        None => (&parts[..parts.len() - 1], false),
        // Only the file name varies (`**` there still means any depth).
        Some(i) if i == parts.len() - 1 => (&parts[..i], parts[i].contains("**")),
        Some(i) => (&parts[..i], true),
    };
    let dir = fixed.join("/");
    if !glob.starts_with('/') || dir.is_empty() {
        bail!(
            "block glob `{glob}` does not start with a fixed directory; guarding it would hold every open on the host"
        );
    }
    Ok(Root {
        dir: PathBuf::from(dir),
        recursive,
    })
}

struct BlockRule {
    rule: Rule,
    paths: GlobSet,
}

pub struct Guard {
    fan: Fanotify,
    rules: Vec<BlockRule>,
    roots: Vec<Root>,
    marked: BTreeSet<PathBuf>,
    procs: Arc<ProcessTable>,
    /// Kubernetes names of containers, shared with the event thread.
    pods: Arc<PodNames>,
    origin: Origin,
    cgroup_root: Option<PathBuf>,
    tx: crossbeam_channel::Sender<GuardedOpen>,
    /// Verdicts enforced but not reported: the queue to the event thread
    /// was full. The event thread reports the count (`run/shedding.rs`).
    shed: Arc<AtomicU64>,
    shutdown: Arc<AtomicBool>,
    own_tgid: i32,
}

impl Guard {
    /// Opens the fanotify group and marks every root. Missing directories
    /// are warned about, naming the rule's glob, and marked once they exist.
    pub fn new(
        rules: &RuleSet,
        procs: Arc<ProcessTable>,
        pods: Arc<PodNames>,
        origin: Origin,
        tx: crossbeam_channel::Sender<GuardedOpen>,
        shed: Arc<AtomicU64>,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Option<Self>> {
        let roots = plan(rules)?;
        if roots.is_empty() {
            return Ok(None);
        }
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .context("fanotify_init for block rules (needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")?;
        let mut block = Vec::new();
        for r in rules.with_action(Action::Block) {
            let mut b = GlobSetBuilder::new();
            for g in r.values_of("file.path").unwrap_or_default() {
                b.add(path_glob(g)?);
            }
            block.push(BlockRule {
                rule: r.clone(),
                paths: b.build()?,
            });
        }
        let mut guard = Guard {
            fan,
            rules: block,
            roots,
            marked: BTreeSet::new(),
            procs,
            pods,
            origin,
            cgroup_root: cgroup2_root(),
            tx,
            shed,
            shutdown,
            own_tgid: std::process::id() as i32,
        };
        for root in guard.roots.clone() {
            if !root.dir.is_dir() {
                warn!(
                    "block rules guard {}, which does not exist yet; it is guarded once it does",
                    root.dir.display()
                );
            }
        }
        guard.mark_all();
        info!(
            directories = guard.marked.len(),
            "block rules enforced with fanotify permission events (fail-open if the sensor dies)"
        );
        Ok(Some(guard))
    }

    /// Marks each root (and, for recursive roots, every directory below it)
    /// not marked yet. Called again periodically to catch new directories.
    fn mark_all(&mut self) {
        for root in self.roots.clone() {
            let mut dirs = Vec::new();
            collect_dirs(&root.dir, root.recursive, 0, &mut dirs);
            for d in dirs {
                if self.marked.contains(&d) {
                    continue;
                }
                match self.fan.mark(
                    MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_ONLYDIR,
                    MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_EVENT_ON_CHILD,
                    nix::fcntl::AT_FDCWD,
                    Some(d.as_path()),
                ) {
                    Ok(()) => {
                        debug!(dir = %d.display(), "guarded");
                        self.marked.insert(d);
                    }
                    Err(e) => warn!(dir = %d.display(), error = %e, "cannot guard directory"),
                }
            }
        }
    }

    pub fn run(mut self) {
        let mut last_scan = Instant::now();
        while !self.shutdown.load(Ordering::Relaxed) {
            let mut fds = [nix::poll::PollFd::new(
                self.fan.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
            loop {
                match self.fan.read_events() {
                    Ok(events) if events.is_empty() => break,
                    Ok(events) => {
                        for ev in events {
                            self.decide(&ev);
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(e) => {
                        warn!(error = %e, "reading fanotify events");
                        break;
                    }
                }
            }
            if last_scan.elapsed() >= Duration::from_secs(2) {
                self.mark_all();
                last_scan = Instant::now();
            }
        }
        // Dropping the group answers anything pending with allow.
    }

    fn decide(&mut self, ev: &nix::sys::fanotify::FanotifyEvent) {
        let Some(fd) = ev.fd() else {
            warn!("fanotify queue overflowed; some opens were allowed unexamined");
            return;
        };
        if !ev.mask().contains(MaskFlags::FAN_OPEN_PERM) {
            return;
        }
        let pid = ev.pid();
        let verdict = if pid == self.own_tgid {
            None
        } else {
            let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.judge(pid as u32, &path)
        };
        let allowed = verdict
            .as_ref()
            .and_then(|v| v.verdict.as_ref())
            .is_none_or(|(allowed, _)| *allowed);
        debug!(
            pid,
            allowed,
            decided = verdict.is_some(),
            "fanotify permission event"
        );
        let response = if allowed {
            Response::FAN_ALLOW
        } else {
            Response::FAN_DENY
        };
        if let Err(e) = self.fan.write_response(FanotifyResponse::new(fd, response)) {
            warn!(error = %e, pid, "answering a fanotify permission event");
        }
        if let Some(d) = crate::control::test_delay("KEYWARDEN_TEST_GUARD_REPORT_DELAY_MS") {
            // Test hook: the report reaches the event thread after the
            // process has exited (sensor/tests/enforcement.rs).
            std::thread::sleep(d);
        }
        if let Some(v) = verdict
            && self.tx.try_send(v).is_err()
        {
            // Counted and reported as shed by the event thread.
            let shed = self.shed.fetch_add(1, Ordering::Relaxed) + 1;
            if shed.is_power_of_two() {
                warn!(
                    pid,
                    shed, "guarded-open queue full; a verdict was enforced but not reported"
                );
            }
        }
    }

    /// `None`: the path is under no block rule's glob. Otherwise the open
    /// and its verdict: denied if any selecting rule does not allow the
    /// actor, none if no rule selects it.
    fn judge(&self, tgid: u32, host_path: &str) -> Option<GuardedOpen> {
        let candidates: Vec<&BlockRule> = self
            .rules
            .iter()
            .filter(|b| b.paths.is_match(host_path))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let ktime_ns = crate::clock::monotonic_ns();
        // Most processes were snapshotted at exec by the control thread.
        // Otherwise snapshot here, but never open an executable that lives
        // under a guarded directory: that open would wait for this thread.
        let info = match self.procs.lookup(tgid, ktime_ns) {
            Some(i) => i,
            None => {
                let exe = std::fs::read_link(format!("/proc/{tgid}/exe")).unwrap_or_default();
                let snapshot = if self.marked.iter().any(|d| exe.starts_with(d)) {
                    self.procs.snapshot_without_exe(tgid)
                } else {
                    self.procs.snapshot(tgid)
                };
                self.procs.record(tgid, 0, snapshot)
            }
        };
        let status = std::fs::read_to_string(format!("/proc/{tgid}/status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(u32::MAX);
        let comm = std::fs::read_to_string(format!("/proc/{tgid}/comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default();
        let cgroup_id = match (&self.cgroup_root, &info.cgroup_path) {
            (Some(root), Some(p)) => {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(root.join(p.trim_start_matches('/')))
                    .map(|m| m.ino())
                    .unwrap_or(0)
            }
            _ => 0,
        };
        // The event a rule sees: as the event thread will report it, less
        // what needs the file's contents.
        let name = host_path.rsplit('/').next().unwrap_or_default().to_owned();
        let mut container = info.container.clone();
        let pod = container.as_mut().and_then(|c| self.pods.fill(c));
        let probe = Event::secret_file_open(
            &self.origin,
            SecretFileOpen {
                seq: 0,
                who: event::Who {
                    process: event::Process {
                        pid: tgid,
                        tid: tgid,
                        name: comm.clone(),
                        cmd_line: info.cmd_line.clone(),
                        file: info.file(&self.procs),
                        user: User {
                            uid: uid.to_string(),
                            name: None,
                        },
                        container,
                    },
                    pod,
                    attribution_error: None,
                    cgroup: Some(Cgroup {
                        id: cgroup_id,
                        path: info.cgroup_path.clone(),
                    }),
                },
                file: event::File {
                    path: host_path.to_owned(),
                    name,
                    type_id: 1,
                    hashes: vec![],
                },
                key: None,
                secret: SecretFile {
                    host_path: Some(host_path.to_owned()),
                    matched: String::new(),
                    count: 1,
                    first_time: 0,
                    last_time: 0,
                    keys: vec![],
                    holds_private_key: false,
                    verdict: None,
                    rule: None,
                },
                // Still being decided: the guard's answer is the result.
                result: OpenResult::Unknown,
            },
        );
        let selecting: Vec<&BlockRule> = candidates
            .into_iter()
            .filter(|b| b.rule.selects(&probe))
            .collect();
        let denying = selecting.iter().find(|b| b.rule.matches(&probe));
        let verdict = match (denying, selecting.first()) {
            (Some(d), _) => Some((false, d.rule.id.clone())),
            (None, Some(first)) => Some((true, first.rule.id.clone())),
            (None, None) => None,
        };
        Some(GuardedOpen {
            tgid,
            uid,
            comm,
            cgroup_id,
            ktime_ns,
            host_path: host_path.to_owned(),
            verdict,
            process: info,
        })
    }
}

/// `dir`, and with `recursive` every directory below it (bounded, and
/// without following symlinks).
fn collect_dirs(dir: &Path, recursive: bool, depth: usize, out: &mut Vec<PathBuf>) {
    const MAX_DIRS: usize = 10_000;
    if out.len() >= MAX_DIRS || !dir.is_dir() {
        return;
    }
    out.push(dir.to_owned());
    if !recursive || depth > 32 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), true, depth + 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_the_fixed_directories() {
        let r = |g| root_of(g).unwrap();
        assert_eq!(
            r("/etc/ssl/private/**"),
            Root {
                dir: "/etc/ssl/private".into(),
                recursive: true
            }
        );
        assert_eq!(
            r("/etc/ssl/private/*.key"),
            Root {
                dir: "/etc/ssl/private".into(),
                recursive: false
            }
        );
        assert_eq!(
            r("/srv/app/.env"),
            Root {
                dir: "/srv/app".into(),
                recursive: false
            }
        );
        assert_eq!(r("/srv/*/keys/a.pem").dir, PathBuf::from("/srv"));
        for bad in ["**/*.key", "/*.key", "relative/*.key"] {
            let e = root_of(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn block_rules_may_only_test_what_is_known_before_the_read() {
        let set = RuleSet::parse(
            "rules:\n  - id: b\n    severity: high\n    event: secret_file_open\n    match:\n      file.path: /etc/ssl/private/**\n      secret_file.holds_private_key: true\n    actions: [block]\n",
            "r.yaml",
        )
        .unwrap();
        let e = plan(&set).unwrap_err().to_string();
        assert!(
            e.contains("rule b (r.yaml:2)") && e.contains("secret_file.holds_private_key"),
            "{e}"
        );
        let set = RuleSet::parse(
            "rules:\n  - id: b\n    severity: high\n    event: secret_file_open\n    match:\n      file.path: \"**/*.key\"\n    actions: [block]\n",
            "r.yaml",
        )
        .unwrap();
        let e = format!("{:#}", plan(&set).unwrap_err());
        assert!(
            e.contains("rule b (r.yaml:2)") && e.contains("fixed directory"),
            "{e}"
        );
    }
}
