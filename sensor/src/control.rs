//! The control thread: acts on records that cannot wait for the next poll.
//!
//! * An exec: snapshot the process now (executable hash, root and cwd
//!   handles), because a short-lived signer may be gone by the time the
//!   event thread reaches its signature.
//!   Then look for signing code in the new image (a static binary carries
//!   its own OpenSSL, BoringSSL or rustls) and attach to it; a process the
//!   probe held at exec, because its path was new in its cgroup, is
//!   released after that, so even a signer that signs in its first
//!   millisecond is seen.
//! * A shared object opened in a cgroup for the first time: the same, for
//!   the library.
//!
//! It also sends the heartbeat that lets the probes hold processes at all,
//! so if this thread stops, holding stops with it; and it sends it only
//! while the event thread, which releases the openers of protected key
//! files, shows progress too (`liveness.rs`).

use std::{
    os::fd::AsFd,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use keywarden_analyzer::event;
use keywarden_probe_types::{ExecRecord, FileOpenRecord, exec_flags, open_flags};
use tracing::{debug, info, warn};

use crate::{
    coverage::{Coverage, cover},
    discovery::{signing_code::ScanCache, targets::Candidate},
    enrich::process::ProcessTable,
    liveness::Liveness,
    probes::{Lease, Probes},
    records::{Record, c_str, decode},
};

/// Real-time priority for this thread. A signer like `cat` or `openssl`
/// can exec, open its key and exit within a millisecond; on a busy host an
/// ordinary thread may wake later than that, and then the process's root,
/// working directory and executable are gone. The thread sleeps in `poll`;
/// per exec it only opens handles and reads a few /proc files (hashing the
/// executable is left to the event thread). Attaching to a new library
/// (reading its symbols) is the longest thing it does, once per library.
fn raise_priority() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), "control thread keeps normal priority");
    }
}

/// Something the control thread could not do, for the event thread to
/// turn into a coverage-warning event.
pub struct Warning {
    pub process: Option<event::Process>,
    pub module: Option<event::File>,
    pub detail: String,
}

pub struct Control {
    pub ring: RingBuf<MapData>,
    pub probes: Arc<Mutex<Probes>>,
    pub procs: Arc<ProcessTable>,
    pub cache: Arc<Mutex<ScanCache>>,
    pub warnings: crossbeam_channel::Sender<Warning>,
    pub shutdown: Arc<AtomicBool>,
    pub lease_at_start: Lease,
    /// Whether the other releasing thread is alive (`liveness.rs`).
    pub liveness: Arc<Liveness>,
}

/// Logged when another keywarden holds the host's lease (`HoldLease`).
pub const ANOTHER_SENSOR_HOLDS: &str = "another keywarden on this host holds new processes until it has attached; \
this sensor attaches to what it sees without holding, so it may miss the first signatures of a new program \
(two sensors holding at once would end each other's holds early)";

impl Control {
    pub fn run(mut self) {
        raise_priority();
        let mut last_heartbeat = Instant::now() - Duration::from_secs(1);
        // What the start-up heartbeat found (run.rs said so if it was Other).
        let mut lease = self.lease_at_start;
        // Why holding is paused, while it is.
        let mut paused = None;
        while !self.shutdown.load(Ordering::Relaxed) {
            if last_heartbeat.elapsed() >= Duration::from_millis(500) {
                self.beat(&mut lease, &mut paused);
                self.release_orphans();
                last_heartbeat = Instant::now();
            }
            let mut fds = [nix::poll::PollFd::new(
                self.ring.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            self.drain();
        }
        // A last pass so no held process is left stopped.
        self.drain();
    }

    /// Renews the hold lease, which is what lets the probes hold anyone,
    /// while every thread that releases held processes is alive; otherwise
    /// gives it up at once, so nobody new is held until they are. This
    /// thread is one of them: when it stops, so do the renewals, and the
    /// lease goes stale by itself.
    fn beat(&mut self, lease: &mut Lease, paused: &mut Option<&'static str>) {
        let stalled = self.liveness.stalled();
        if stalled != *paused {
            match stalled {
                Some(why) => warn!("holding paused, nobody new is held: {why}"),
                None => info!("holding resumed: every thread that releases held processes runs"),
            }
            *paused = stalled;
        }
        let mut probes = self.probes.lock().expect("probes lock");
        if stalled.is_some() {
            if let Err(e) = probes.give_up_lease() {
                warn!(error = %e, "giving up the hold lease (it goes stale in 2 s anyway)");
            }
            return;
        }
        match probes.heartbeat() {
            Ok(now) if now != *lease => {
                match now {
                    Lease::Ours => {
                        info!("this sensor holds new processes again: the other keywarden stopped")
                    }
                    Lease::Other => warn!("{ANOTHER_SENSOR_HOLDS}"),
                }
                *lease = now;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "heartbeat"),
        }
    }

    fn drain(&mut self) {
        loop {
            let rec = match self.ring.next() {
                Some(item) => decode(&item),
                None => break,
            };
            match rec {
                Record::Exec(e) => self.on_exec(&e),
                Record::FileOpen(f) => self.on_library(&f),
                Record::Malformed { kind, len } => warn!(kind, len, "malformed control record"),
                _ => {}
            }
        }
    }

    /// Releases processes held longer than a live sensor ever holds one:
    /// they were held by a sensor that died before releasing them (the
    /// `HELD` map is pinned, so it outlives that sensor). Through a pidfd,
    /// and only a process that is still stopped and started before its
    /// hold (`held::resume`): the entry may be old enough for its pid to
    /// name another process now.
    fn release_orphans(&mut self) {
        let now = crate::clock::monotonic_ns();
        let held = self
            .probes
            .lock()
            .expect("probes lock")
            .held()
            .unwrap_or_default();
        for (tgid, since) in held {
            if now.saturating_sub(since) < keywarden_probe_types::config::HEARTBEAT_MAX_AGE_NS {
                continue;
            }
            match crate::held::resume(tgid, since) {
                Ok(true) => warn!(
                    pid = tgid,
                    "released a process held by a sensor that stopped before releasing it"
                ),
                Ok(false) => {}
                Err(e) => debug!(pid = tgid, error = %e, "SIGCONT to an orphaned hold"),
            }
            self.probes.lock().expect("probes lock").forget_held(tgid);
        }
    }

    fn on_exec(&mut self, e: &ExecRecord) {
        let path = c_str(&e.filename);
        let tgid = e.task.tgid();
        if let Some(limit) = test_delay("KEYWARDEN_TEST_SNAPSHOT_AFTER_EXIT_MS")
            && e.flags & exec_flags::HELD == 0
        {
            // Test hook: a control thread too slow to see a short-lived
            // process alive (sensor/tests/openssl_cli.rs). It waits until
            // the process has let go of its root directory, which exit
            // does after its image (it may not be reaped yet).
            let start = std::time::Instant::now();
            while std::fs::read_link(format!("/proc/{tgid}/root")).is_ok()
                && start.elapsed() < limit
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let info = self.procs.snapshot_exec(tgid, &path, &e.exe, &e.root);
        let shown_as = info.exe_path.clone().unwrap_or_else(|| path.clone());
        self.procs.record(tgid, e.task.ktime_ns, info);
        // /proc/PID/exe reaches the image itself, in any mount namespace.
        let open_path = PathBuf::from(format!("/proc/{tgid}/exe"));
        if let Ok(md) = std::fs::metadata(&open_path) {
            if e.exe.valid != 0 && !crate::enrich::process::is_image(&md, &e.exe) {
                // It exec'd again (`sh -c 'exec prog'`) since this record:
                // /proc/PID/exe is the next image, which its own record
                // covers under its own name.
                debug!(pid = tgid, file = %path, "exec'd again before its image was scanned");
            } else {
                let c = Candidate {
                    shown_as,
                    open_path,
                    pid: Some(tgid),
                    dev: md.dev(),
                    ino: md.ino(),
                };
                self.cover(&c);
            }
        }
        if e.flags & exec_flags::HELD != 0 {
            let mut probes = self.probes.lock().expect("probes lock");
            if let Err(err) = probes.mark_library_seen(e.task.cgroup_id, &path, &e.exe) {
                // Only costs a hold the next time this file is opened there.
                debug!(file = %path, error = %err, "marking a library seen");
            }
            drop(probes);
            self.release(tgid, e.task.ktime_ns, &path);
        }
    }

    /// Attaches to the signing code in a file; what cannot be covered is
    /// reported (once per file).
    fn cover(&mut self, c: &Candidate) {
        let coverage = cover(&self.cache, &self.probes, c);
        if let (Coverage::Covered | Coverage::Uncovered { .. }, Some(pid)) = (&coverage, c.pid) {
            crate::coverage::mark_if_go(&self.probes, (c.dev, c.ino), pid);
        }
        let detail = match coverage {
            Coverage::Uncovered {
                reason,
                first: true,
            } => reason,
            Coverage::Failed(why) => why,
            _ => return,
        };
        let _ = self.warnings.send(Warning {
            process: c.pid.map(|pid| event::Process {
                pid,
                ..Default::default()
            }),
            module: Some(event::File::regular(&c.shown_as)),
            detail,
        });
    }

    /// Resumes `tgid`, held by the probe at `held_at_ns`.
    fn release(&mut self, tgid: u32, held_at_ns: u64, what: &str) {
        if let Some(ms) = test_delay("KEYWARDEN_TEST_RELEASE_DELAY_MS") {
            // Test hook: widens the window in which a sensor can die
            // holding a process (sensor/tests/discovery.rs).
            std::thread::sleep(ms);
        }
        debug!(pid = tgid, %what, "releasing held process");
        if let Err(e) = crate::held::signal(tgid, held_at_ns, libc::SIGCONT) {
            debug!(pid = tgid, error = %e, "SIGCONT");
        }
        self.probes.lock().expect("probes lock").forget_held(tgid);
    }

    fn on_library(&mut self, f: &FileOpenRecord) {
        let tgid = f.task.tgid();
        let path = c_str(&f.path);
        let info = self.procs.lookup_or_snapshot(tgid, f.task.ktime_ns);
        // While the process is held, the descriptor it got is the very
        // file, in whatever mount namespace. Not held, it may be closed,
        // or reused for another file, by now.
        let held = f.flags & open_flags::HELD != 0;
        let open_path = if held && f.fd >= 0 {
            Some(PathBuf::from(format!("/proc/{tgid}/fd/{}", f.fd)))
        } else if f.resolvable(&path) {
            info.resolve(&path)
        } else {
            None
        }
        .unwrap_or_else(|| PathBuf::from(format!("/proc/{tgid}/root{path}")));
        if let Ok(md) = std::fs::metadata(&open_path)
            && md.is_file()
        {
            let c = Candidate {
                shown_as: info.absolute(&path),
                open_path,
                pid: Some(tgid),
                dev: md.dev(),
                ino: md.ino(),
            };
            self.cover(&c);
        }
        if held {
            self.release(tgid, f.task.ktime_ns, &path);
        }
    }
}

/// A delay a test asks for through the environment (milliseconds).
pub(crate) fn test_delay(var: &str) -> Option<Duration> {
    let ms = std::env::var(var).ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}
