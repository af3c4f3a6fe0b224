//! `keywarden run`: discover, attach, then turn probe records into events.
//!
//! Two threads. The control thread (`control.rs`) acts at once on execs and
//! newly opened libraries. This, the event thread, drains the bulk ring on
//! a timer (`poll_interval_ms`; signature records never wake anyone) and
//! handles each record in order, which is what makes the identity caches
//! sound: a free or an exec is always processed before any signature that
//! follows it.

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

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use hashbrown::HashMap;
use keywarden_analyzer::event::{self, Cgroup, Event, KeyUse, Origin, Signature, User};
use keywarden_probe_types::{FileOpenRecord, SignRecord, config, sign_flags, stats};
use tracing::{debug, error, info, warn};

use crate::{
    config::Config,
    control::{Control, Warning},
    discovery::targets::{self, Candidate},
    enrich::{
        container::container_from_cgroup,
        process::{CgroupPaths, ProcessTable, cgroup2_root, user_name},
    },
    keys::{
        identify::Identifier,
        material::{self, KeyInfo},
    },
    probes::{self, Probes},
    records::{Record, c_str, decode},
    sink::NdjsonSink,
};

/// Parsed key files, by file identity, so a file opened on every request is
/// parsed once. Failures are cached too (most `.pem` files are not keys).
type KeyFileCache = HashMap<(u64, u64, i64, u64), Arc<Result<Vec<KeyInfo>, String>>>;

struct Sensor {
    probes: Arc<Mutex<Probes>>,
    events: RingBuf<MapData>,
    procs: Arc<ProcessTable>,
    cgroups: CgroupPaths,
    warnings: crossbeam_channel::Receiver<Warning>,
    ident: Identifier,
    sink: NdjsonSink,
    origin: Origin,
    seq: u64,
    realtime_offset_ns: i64,
    key_files: KeyFileCache,
    users: HashMap<u32, Option<String>>,
    lost_reported: [u64; stats::SLOTS as usize],
    events_by_kind: [u64; 2],
}

fn clock_ns(id: nix::time::ClockId) -> i64 {
    nix::time::clock_gettime(id)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

fn origin() -> Origin {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let start_ms = clock_ns(nix::time::ClockId::CLOCK_REALTIME) / 1_000_000;
    Origin {
        hostname,
        product_version: env!("CARGO_PKG_VERSION").into(),
        uid_prefix: format!("{}-{start_ms}", boot.trim().get(..8).unwrap_or("0")),
    }
}

pub fn run(cfg: Config, shutdown: Arc<AtomicBool>) -> Result<()> {
    probes::preflight()?;
    let sink = NdjsonSink::open(&cfg.output)?;
    let (mut probes, rings) = Probes::load()?;
    probes.set_config(config::SENSOR_TGID, std::process::id() as u64)?;
    probes.heartbeat()?;
    probes.set_config(config::HOLD_NEW_LIBRARIES, cfg.hold_new_libraries as u64)?;
    let realtime_offset_ns = clock_ns(nix::time::ClockId::CLOCK_REALTIME)
        - clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
    let (warn_tx, warn_rx) = crossbeam_channel::bounded(1024);
    let mut s = Sensor {
        probes: Arc::new(Mutex::new(probes)),
        events: rings.events,
        procs: Arc::new(ProcessTable::default()),
        cgroups: CgroupPaths::new(),
        warnings: warn_rx,
        ident: Identifier::default(),
        sink,
        origin: origin(),
        seq: 0,
        realtime_offset_ns,
        key_files: HashMap::new(),
        users: HashMap::new(),
        lost_reported: [0; stats::SLOTS as usize],
        events_by_kind: [0; 2],
    };
    // The control thread starts first: processes exec'd during discovery
    // are snapshotted, and held ones released.
    let control_stop = Arc::new(AtomicBool::new(false));
    let control = Control {
        ring: rings.control,
        probes: s.probes.clone(),
        procs: s.procs.clone(),
        warnings: warn_tx,
        shutdown: control_stop.clone(),
    };
    let control = std::thread::Builder::new()
        .name("keywarden-ctl".into())
        .spawn(move || control.run())?;

    s.discover(&cfg);
    s.load_key_paths(&cfg.key_paths);
    let covered: Vec<String> = s
        .probes()
        .libraries()
        .iter()
        .map(|l| l.shown_as.clone())
        .collect();
    info!(
        libraries = covered.len(),
        keys_known = s.ident.inventory_len(),
        hold_new_libraries = cfg.hold_new_libraries,
        "ready: probes attached to {}",
        covered.join(", ")
    );
    s.sink.flush();

    let poll_interval = Duration::from_millis(cfg.poll_interval_ms.max(1));
    let mut last_housekeeping = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        let timeout =
            nix::poll::PollTimeout::try_from(poll_interval).unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(
            s.events.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(anyhow::anyhow!("polling the ring buffer: {e}")),
        }
        s.drain();
        s.sink.flush();
        if last_housekeeping.elapsed() >= Duration::from_secs(5) {
            s.report_lost();
            s.ident.expire(Duration::from_secs(30));
            last_housekeeping = Instant::now();
        }
    }

    // Stop holding processes before anything else, release any still held,
    // then deliver what is left.
    let _ = s.probes().set_config(config::HOLD_NEW_LIBRARIES, 0);
    control_stop.store(true, Ordering::Relaxed);
    if control.join().is_err() {
        error!("control thread panicked");
    }
    s.drain();
    s.report_lost();
    let waiting = s.sink.flush();
    let lost = s.probes().lost().unwrap_or_default();
    info!(
        events = s.sink.written,
        key_uses = s.events_by_kind[0],
        warnings = s.events_by_kind[1],
        lost_sign = lost[stats::LOST_SIGN as usize],
        lost_data = lost[stats::LOST_DATA as usize],
        lost_other = lost[stats::LOST_OTHER as usize],
        data_unreadable = lost[stats::DATA_UNREADABLE as usize],
        data_truncated = lost[stats::CAPTURE_TRUNCATED as usize],
        unwritten = waiting + s.sink.dropped as usize,
        verifications = s.ident.verifications,
        "stopped: probes detached"
    );
    if waiting > 0 {
        anyhow::bail!("{waiting} events could not be written to {}", cfg.output);
    }
    Ok(())
}

impl Sensor {
    fn probes(&self) -> std::sync::MutexGuard<'_, Probes> {
        self.probes.lock().expect("probes lock")
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn now_ms(&self) -> i64 {
        clock_ns(nix::time::ClockId::CLOCK_REALTIME) / 1_000_000
    }

    fn warn_event(
        &mut self,
        process: Option<event::Process>,
        module: Option<event::File>,
        detail: String,
    ) {
        warn!("{detail}");
        let seq = self.next_seq();
        let ev = Event::coverage_warning(&self.origin, self.now_ms(), seq, process, module, detail);
        self.events_by_kind[1] += 1;
        self.sink.push(&ev);
    }

    /// Attach to every crypto library in running processes and on the host.
    fn discover(&mut self, cfg: &Config) {
        let started = Instant::now();
        let scan = targets::scan_processes();
        debug!(elapsed = ?started.elapsed(), libraries = scan.libraries.len(), "scanned processes");
        for (pid, why) in &scan.unreadable {
            self.warn_event(
                Some(event::Process {
                    pid: *pid,
                    ..Default::default()
                }),
                None,
                format!("cannot read /proc/{pid}/maps: {why}; its libraries are not covered"),
            );
        }
        let cgroup_root = cgroup2_root();
        let mut all: Vec<Candidate> = scan.libraries;
        all.extend(targets::scan_dirs(&cfg.library_dirs));
        debug!(elapsed = ?started.elapsed(), candidates = all.len(), "scanned library directories");
        for c in &all {
            self.attach(c);
        }
        debug!(elapsed = ?started.elapsed(), "attached");
        // Processes already running with a covered library need no hold.
        for c in all.iter().filter(|c| c.pid.is_some()) {
            let pid = c.pid.unwrap_or_default();
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
                });
            if let (Some(root), Some(cg)) = (&cgroup_root, cg)
                && let Ok(md) = std::fs::metadata(root.join(cg.trim_start_matches('/')))
            {
                let _ = self.probes().mark_library_seen(md.ino(), &c.shown_as);
            }
        }
    }

    fn attach(&mut self, c: &Candidate) {
        let result = self.probes().attach_library(c);
        if let Err(e) = result {
            let module = event::File {
                path: c.shown_as.clone(),
                name: c.shown_as.rsplit('/').next().unwrap_or_default().to_owned(),
                type_id: 1,
                hashes: vec![],
            };
            self.warn_event(None, Some(module), format!("{e:#}"));
        }
    }

    fn load_key_paths(&mut self, paths: &[String]) {
        fn walk(p: &std::path::Path, depth: usize, out: &mut Vec<PathBuf>) {
            if let Ok(md) = std::fs::metadata(p) {
                if md.is_file() {
                    out.push(p.to_owned());
                } else if md.is_dir() && depth < 4 {
                    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                        walk(&e.path(), depth + 1, out);
                    }
                }
            }
        }
        for root in paths {
            let mut files = Vec::new();
            walk(std::path::Path::new(root), 0, &mut files);
            for f in files {
                if f.metadata()
                    .map(|m| m.len() > material::MAX_KEY_FILE)
                    .unwrap_or(true)
                {
                    continue;
                }
                let shown = f.to_string_lossy().into_owned();
                if let Ok(keys) = material::read_key_file(&f, &shown) {
                    for k in keys {
                        self.ident.add_inventory(k, &shown);
                    }
                }
            }
        }
    }

    fn drain(&mut self) {
        while let Ok(w) = self.warnings.try_recv() {
            self.warn_event(w.process, w.module, w.detail);
        }
        loop {
            let rec = match self.events.next() {
                Some(item) => decode(&item),
                None => break,
            };
            self.handle(rec);
        }
    }

    fn handle(&mut self, rec: Record) {
        match rec {
            Record::Sign(r, sig) => self.on_sign(&r, &sig),
            Record::Data { header, bytes } => self.ident.on_data(&header, &bytes),
            Record::HandleFree(f) => self.ident.on_free(f.tgid, f.handle),
            // The control thread snapshotted the new image; here the old
            // image's pointers stop meaning anything.
            Record::ExecMark(x) => {
                self.ident.forget_process(x.task.tgid());
                self.sync_known();
            }
            Record::Exit(x) => {
                self.ident.forget_process(x.task.tgid());
                self.sync_known();
                self.procs.remove_upto(x.task.tgid(), x.task.ktime_ns);
            }
            Record::Exec(_) => {}
            Record::FileOpen(f) => self.on_open(&f),
            Record::Malformed { kind, len } => {
                error!(kind, len, "malformed record from the probes")
            }
        }
    }

    /// A file that may hold a key was opened: learn its public key for
    /// this process. (Library opens go to the control thread.)
    fn on_open(&mut self, f: &FileOpenRecord) {
        let tgid = f.task.tgid();
        let path = c_str(&f.path);
        let info = self.procs.lookup_or_snapshot(tgid, f.task.ktime_ns);
        let resolved = if path.starts_with('/') || f.dfd == -100 {
            info.resolve(&path)
        } else {
            None
        };
        // A file that may hold a key: learn its public key for this process.
        let Some(p) = resolved else {
            debug!(pid = tgid, path = %path, "cannot resolve opened file");
            return;
        };
        let Ok(md) = std::fs::metadata(&p) else {
            return;
        };
        if !md.is_file() {
            return;
        }
        let id = (
            md.dev(),
            md.ino(),
            md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            md.size(),
        );
        let parsed = match self.key_files.get(&id) {
            Some(r) => r.clone(),
            None => {
                let r = Arc::new(material::read_key_file(&p, &path).map_err(|e| e.to_string()));
                if self.key_files.len() > 10_000 {
                    self.key_files.clear();
                }
                self.key_files.insert(id, r.clone());
                r
            }
        };
        match &*parsed {
            Ok(keys) => self
                .ident
                .add_process_keys(tgid, keys.clone(), &info.absolute(&path)),
            Err(e) => debug!(pid = tgid, "{e}"),
        }
    }

    fn on_sign(&mut self, r: &SignRecord, sig: &[u8]) {
        let tgid = r.task.tgid();
        let key = self.ident.identify(r, sig);
        self.sync_known();
        let info = self.procs.lookup_or_snapshot(tgid, r.task.ktime_ns);
        let cgroup_path = self
            .cgroups
            .path(r.task.cgroup_id, info.cgroup_path.as_deref());
        let container = cgroup_path
            .as_deref()
            .and_then(container_from_cgroup)
            .or_else(|| info.container.clone());
        let uid = r.task.uid();
        let user_name = self
            .users
            .entry(uid)
            .or_insert_with(|| user_name(uid))
            .clone();
        let library = self.probes().library(r.library).cloned();
        let lib_file = event::File {
            path: library
                .as_ref()
                .map(|l| l.shown_as.clone())
                .unwrap_or_default(),
            name: library
                .as_ref()
                .and_then(|l| l.shown_as.rsplit('/').next().map(str::to_owned))
                .unwrap_or_default(),
            type_id: 1,
            hashes: vec![],
        };
        let md_name = (r.flags & sign_flags::HAS_MD_NAME != 0)
            .then(|| c_str(&r.md_name))
            .filter(|s| !s.is_empty());
        let u = KeyUse {
            time_ms: (r.task.ktime_ns as i64 + self.realtime_offset_ns) / 1_000_000,
            seq: self.next_seq(),
            process: event::Process {
                pid: tgid,
                tid: r.task.tid(),
                name: c_str(&r.task.comm),
                cmd_line: info.cmd_line.clone(),
                file: info.file(),
                user: User {
                    uid: uid.to_string(),
                    name: user_name,
                },
                attribution_error: info.error.clone(),
            },
            container,
            cgroup: Cgroup {
                id: r.task.cgroup_id,
                path: cgroup_path,
            },
            library: lib_file,
            library_kind: library.map(|l| l.kind).unwrap_or("unknown").to_owned(),
            function: probes::function_name(r.func as u8).to_owned(),
            success: r.ret == 1,
            key,
            signature: Signature {
                length: if r.ret == 1 { r.sig_len } else { 0 },
                digest: md_name,
            },
        };
        self.events_by_kind[0] += 1;
        let ev = Event::key_use(&self.origin, u);
        self.sink.push(&ev);
    }

    /// Tells the probes which key objects the sensor has judged (they stop
    /// copying data for those) and which verdicts no longer hold.
    fn sync_known(&mut self) {
        if self.ident.learned.is_empty() && self.ident.retract.is_empty() {
            return;
        }
        let learned = std::mem::take(&mut self.ident.learned);
        let retract = std::mem::take(&mut self.ident.retract);
        let mut probes = self.probes();
        for (tgid, handle) in learned {
            if let Err(e) = probes.set_known(tgid, handle, true) {
                debug!(error = %e, "KNOWN insert");
            }
        }
        for (tgid, handle) in retract {
            let _ = probes.set_known(tgid, handle, false);
        }
    }

    /// Lost records become a warning event and a log line, never silence.
    fn report_lost(&mut self) {
        let Ok(lost) = self.probes().lost() else {
            return;
        };
        let names = ["signature", "signed-data", "process/file"];
        for (slot, name) in [stats::LOST_SIGN, stats::LOST_DATA, stats::LOST_OTHER]
            .into_iter()
            .zip(names)
        {
            let i = slot as usize;
            let new = lost[i] - self.lost_reported[i];
            if new > 0 {
                self.lost_reported[i] = lost[i];
                let total = lost[i];
                self.warn_event(
                    None,
                    None,
                    format!("{new} {name} records were lost because the ring buffer was full ({total} in total)"),
                );
            }
        }
    }
}
