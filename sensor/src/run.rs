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
use aya::{
    maps::{MapData, RingBuf},
    programs::uprobe::UProbeLinkId,
};
use hashbrown::HashMap;
use keywarden_analyzer::event::{
    self, Cgroup, Event, KeyUse, Origin, SecretFile, SecretFileOpen, Signature, User,
};
use keywarden_analyzer::{
    baseline::BaselineStore,
    event::Response,
    geo::Geo,
    pipeline::{self, Input, Output, Overflow, Pipeline},
    rules::{Action, RuleSet},
};
use keywarden_probe_types::{
    FileOpenRecord, KilledRecord, SignRecord, Task, config, open_flags, sign_flags, stats,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::Config,
    control::{ANOTHER_SENSOR_HOLDS, Control, Warning},
    coverage::{Coverage, cover},
    discovery::{
        signing_code::{ScanCache, function_name},
        targets::{self, Candidate},
    },
    enforce::{
        Condemnation, Enforcer,
        guard::{Guard, GuardedOpen},
    },
    enrich::{
        container::container_from_cgroup,
        kernel_layout,
        process::{CgroupPaths, ProcessInfo, ProcessTable, cgroup2_root, user_name},
    },
    free_watch::{self, FreeWatches},
    keys::{
        identify::{Identifier, identity_of},
        material::{self, KeyFile, KeyInfo},
    },
    probes::{Lease, Probes},
    records::{Record, c_str, decode},
    secrets::watch::{Coalescer, WatchList},
    sink::NdjsonSink,
};

/// How long the event thread waits for the control thread's snapshot of a
/// fresh exec. The control thread takes it as soon as the exec record wakes
/// it; this only bounds the stall when that record was lost.
const EXEC_SNAPSHOT_WAIT: Duration = Duration::from_millis(250);

/// Parsed key files, by file identity, so a file opened on every request is
/// parsed once. Failures are cached too (most `.pem` files are not keys).
type KeyFileCache = HashMap<(u64, u64, i64, u64), Arc<Result<KeyFile, String>>>;

struct Sensor {
    probes: Arc<Mutex<Probes>>,
    events: RingBuf<MapData>,
    procs: Arc<ProcessTable>,
    /// Processes whose exec mark was read and whose snapshot (taken by the
    /// control thread) was not waited for yet: tgid -> exec time.
    pending_exec: HashMap<u32, u64>,
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
    /// key uses, warnings, secret-file opens
    events_by_kind: [u64; 3],
    watch: WatchList,
    secret_opens: Coalescer<SecretFileOpen>,
    enforcer: Enforcer,
    guarded: crossbeam_channel::Receiver<GuardedOpen>,
    /// Basenames already in the kernel's `PROTECTED_NAMES`.
    protected_names: hashbrown::HashSet<String>,
    /// Protected keys found in a file (so their openers can be held).
    protected_found: hashbrown::HashSet<String>,
    /// Detection Findings written.
    findings: u64,
    /// The correlation pipeline (taken at shutdown).
    pipeline: Option<Pipeline>,
    geo: Option<Arc<Geo>>,
    baseline_path: PathBuf,
    /// Events written without analysis because the pipeline was full.
    unanalysed: u64,
    /// Signing-code scans per file, shared with the control thread.
    cache: Arc<Mutex<ScanCache>>,
    /// Files found at start with crypto code the probes cannot see.
    uncovered_at_start: Vec<String>,
    /// Processes whose key-object frees the probes see (attached when a
    /// process first signs).
    free_watches: FreeWatches<UProbeLinkId>,
}

fn clock_ns(id: nix::time::ClockId) -> i64 {
    nix::time::clock_gettime(id)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

pub(crate) fn origin() -> Origin {
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

/// Raises the soft limit on open files to the hard one. Every uprobe attach
/// point holds a perf event descriptor (about twenty per covered library),
/// and the free probes add two or three per signing process
/// (`free_watch`): the usual soft limit of 1024 runs out on a busy host.
/// What fails for want of descriptors is reported where it fails.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(soft, hard, error = %e, "raising the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "reading the open-file limit"),
    }
}

pub fn run(cfg: Config, shutdown: Arc<AtomicBool>, reload: Arc<AtomicBool>) -> Result<()> {
    crate::probes::preflight()?;
    raise_open_file_limit();
    let rules = crate::analyze::load_rules(&cfg.rules)?;
    // Refuse block rules that cannot be enforced before anything attaches.
    crate::enforce::guard::plan(&rules)?;
    // Paths rules care about are watched too, or they could never fire.
    // (Guarded paths are reported by the guard; watching them also teaches
    // the sensor which keys a process loaded.)
    let mut watch_entries = cfg.secret_files.watch.clone();
    for r in &rules.rules {
        if r.event != keywarden_analyzer::event::EventCode::SecretFileOpen {
            continue;
        }
        for glob in r.values_of("file.path").unwrap_or_default() {
            if !watch_entries.iter().any(|e| e.glob() == glob) {
                watch_entries.push(crate::secrets::watch::WatchEntry::Glob(glob.clone()));
            }
        }
    }
    let watch = WatchList::new(&watch_entries).map_err(|e| {
        anyhow::anyhow!("{e} (the watch list is secret_files.watch plus the file.path globs of secret_file_open rules)")
    })?;
    let geo = crate::analyze::open_geo(&cfg.analyzer)?;
    let baseline_path = PathBuf::from(&cfg.analyzer.baselines);
    let baselines = BaselineStore::load(&baseline_path)?;
    let pipeline = Pipeline::start(
        rules.clone(),
        pipeline::Config {
            shards: cfg.analyzer.shards,
            queue: cfg.analyzer.queue,
            learning_ms: cfg.analyzer.learning_period_s as i64 * 1000,
            overflow: Overflow::Drop,
            geo: geo.clone(),
            geo_cache: pipeline::GEO_CACHE_ENTRIES,
            baselines,
        },
    );
    let enforcer = Enforcer::new(rules)?;
    let sink = NdjsonSink::open(&cfg.output)?;
    let (mut probes, rings) = Probes::load()?;
    probes.set_watch(&watch.kernel)?;
    probes.set_config(config::SENSOR_TGID, std::process::id() as u64)?;
    let lease_at_start = probes.heartbeat()?;
    if lease_at_start == Lease::Other {
        warn!("{ANOTHER_SENSOR_HOLDS}");
    }
    probes.set_config(config::HOLD_NEW_LIBRARIES, cfg.hold_new_libraries as u64)?;
    let realtime_offset_ns = clock_ns(nix::time::ClockId::CLOCK_REALTIME)
        - clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
    let (warn_tx, warn_rx) = crossbeam_channel::bounded(1024);
    let (guard_tx, guard_rx) = crossbeam_channel::bounded(4096);
    let mut s = Sensor {
        probes: Arc::new(Mutex::new(probes)),
        events: rings.events,
        procs: Arc::new(ProcessTable::default()),
        pending_exec: HashMap::new(),
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
        events_by_kind: [0; 3],
        watch,
        secret_opens: Coalescer::new(Duration::from_millis(cfg.secret_files.coalesce_ms)),
        enforcer,
        guarded: guard_rx,
        protected_names: hashbrown::HashSet::new(),
        protected_found: hashbrown::HashSet::new(),
        findings: 0,
        pipeline: Some(pipeline),
        geo,
        baseline_path,
        unanalysed: 0,
        cache: Arc::new(Mutex::new(ScanCache::default())),
        uncovered_at_start: Vec::new(),
        free_watches: FreeWatches::new(free_watch::MAX_WATCHED_PROCESSES),
    };
    let sock = kernel_layout::sock()
        .inspect_err(|e| warn!("signatures carry no network peer: {e:#}"))
        .ok();
    let task = kernel_layout::task()
        .inspect_err(|e| {
            warn!(
                "a process that exits before the sensor looks at it has no executable hash, \
                 and the key files it opened are not read: {e:#}"
            )
        })
        .ok();
    s.probes().set_kernel_layout(sock.as_ref(), task.as_ref())?;
    crate::enforce::report_mechanisms(&s.enforcer.rules);
    let guard_stop = Arc::new(AtomicBool::new(false));
    let guard = match Guard::new(
        &s.enforcer.rules,
        s.procs.clone(),
        s.origin.clone(),
        guard_tx,
        guard_stop.clone(),
    )? {
        Some(g) => Some(
            std::thread::Builder::new()
                .name("keywarden-guard".into())
                .spawn(move || g.run())?,
        ),
        None => None,
    };
    // The control thread starts first: processes exec'd during discovery
    // are snapshotted, and held ones released.
    let control_stop = Arc::new(AtomicBool::new(false));
    let control = Control {
        ring: rings.control,
        probes: s.probes.clone(),
        procs: s.procs.clone(),
        cache: s.cache.clone(),
        warnings: warn_tx,
        shutdown: control_stop.clone(),
        lease_at_start,
    };
    let control = std::thread::Builder::new()
        .name("keywarden-ctl".into())
        .spawn(move || control.run())?;

    s.discover(&cfg);
    s.load_key_paths(&cfg.key_paths);
    s.warn_unprotectable();
    for missing in s.watch.missing_roots() {
        warn!("secret_files.watch entry {missing}; it watches nothing on the host itself");
    }
    let covered: Vec<String> = s
        .probes()
        .libraries()
        .iter()
        .map(|l| format!("{} ({})", l.shown_as, l.stacks().join("+")))
        .collect();
    info!(
        libraries = covered.len(),
        uncovered = s.uncovered_at_start.len(),
        keys_known = s.ident.inventory_len(),
        hold_new_libraries = cfg.hold_new_libraries,
        "ready: probes attached to {}{}",
        covered.join(", "),
        if s.uncovered_at_start.is_empty() {
            String::new()
        } else {
            format!(
                "; NOT covered (crypto code without symbols): {}",
                s.uncovered_at_start.join(", ")
            )
        }
    );
    s.sink.flush();

    let poll_interval = Duration::from_millis(cfg.poll_interval_ms.max(1));
    let mut last_housekeeping = Instant::now();
    let mut last_save = Instant::now();
    let mut failure = None;
    while !shutdown.load(Ordering::Relaxed) {
        let timeout =
            nix::poll::PollTimeout::try_from(poll_interval).unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(
            s.events.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                // Leave through the same door as a signal: nobody stays held.
                failure = Some(anyhow::anyhow!("polling the ring buffer: {e}"));
                break;
            }
        }
        s.drain();
        s.emit_secret_opens(false);
        s.drain_pipeline();
        s.sink.flush();
        if reload.swap(false, Ordering::Relaxed) {
            s.reload_rules(&cfg);
        }
        if last_housekeeping.elapsed() >= Duration::from_secs(5) {
            s.report_lost();
            s.ident.expire(Duration::from_secs(30));
            s.sweep_free_watches();
            s.refresh_geo();
            last_housekeeping = Instant::now();
        }
        if last_save.elapsed() >= Duration::from_secs(60) {
            s.save_baselines();
            last_save = Instant::now();
        }
    }

    // Stop holding processes before anything else, release any still held,
    // then deliver what is left.
    let _ = s.probes().set_config(config::HOLD_NEW_LIBRARIES, 0);
    control_stop.store(true, Ordering::Relaxed);
    if control.join().is_err() {
        error!("control thread panicked");
    }
    if let Err(e) = s.probes().give_up_lease() {
        warn!(error = %e, "giving up the hold lease (another sensor takes it once it is stale)");
    }
    guard_stop.store(true, Ordering::Relaxed);
    if let Some(g) = guard
        && g.join().is_err()
    {
        error!("guard thread panicked");
    }
    s.drain();
    s.emit_secret_opens(true);
    s.finish_pipeline();
    s.report_lost();
    let waiting = s.sink.flush();
    let lost = s.probes().lost().unwrap_or_default();
    info!(
        events = s.sink.written,
        key_uses = s.events_by_kind[0],
        warnings = s.events_by_kind[1],
        secret_file_opens = s.events_by_kind[2],
        findings = s.findings,
        unanalysed = s.unanalysed,
        lost_sign = lost[stats::LOST_SIGN as usize],
        lost_data = lost[stats::LOST_DATA as usize],
        lost_other = lost[stats::LOST_OTHER as usize],
        data_unreadable = lost[stats::DATA_UNREADABLE as usize],
        data_truncated = lost[stats::CAPTURE_TRUNCATED as usize],
        unwritten = waiting + s.sink.dropped as usize,
        verifications = s.ident.verifications,
        free_watched_processes = s.free_watches.watched(),
        free_probes_host_wide = s.free_watches.host_wide_libraries(),
        "stopped: probes detached"
    );
    if let Some(e) = failure {
        return Err(e);
    }
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
        let mut uncovered = Vec::new();
        for c in &all {
            match cover(&self.cache, &self.probes, c) {
                Coverage::Uncovered { reason, first } => {
                    if first {
                        self.warn_event(None, Some(event::File::regular(&c.shown_as)), reason);
                    }
                    uncovered.push(c.shown_as.clone());
                }
                // A library named like libcrypto that cannot be covered is
                // worth a warning; any other unreadable mapping is not.
                Coverage::Failed(why) if targets::is_crypto_library(&c.shown_as) => {
                    self.warn_event(None, Some(event::File::regular(&c.shown_as)), why);
                    uncovered.push(c.shown_as.clone());
                }
                Coverage::Failed(why) => debug!("{why}"),
                _ => {}
            }
        }
        let scans = self.cache.lock().expect("scan cache lock").scans;
        debug!(elapsed = ?started.elapsed(), files = all.len(), scans, "attached");
        self.uncovered_at_start = uncovered;
        // Files of processes already running were looked at: opening or
        // executing them again in the same cgroup needs no hold.
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
                && let Ok(file) = std::fs::metadata(&c.open_path)
            {
                let _ = self.probes().mark_library_seen(
                    md.ino(),
                    &c.shown_as,
                    &crate::probes::file_id(&file),
                );
            }
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
                match material::read_key_file_detailed(&f, &shown) {
                    Ok(k) if k.keys.is_empty() && k.has_private_key => warn!(
                        "key_paths: {shown}: encrypted private key; signatures made with it are reported as unknown"
                    ),
                    Ok(k) => {
                        self.protect_file(&shown, &k);
                        for key in k.keys {
                            self.ident.add_inventory(key, &shown);
                        }
                    }
                    // Named like a key but unusable: say why.
                    Err(e) if material::looks_like_key_file(&shown) => warn!("key_paths: {e}"),
                    Err(e) => debug!("key_paths: {e}"),
                }
            }
        }
    }

    fn drain(&mut self) {
        while let Ok(w) = self.warnings.try_recv() {
            self.warn_event(w.process, w.module, w.detail);
        }
        while let Ok(g) = self.guarded.try_recv() {
            self.on_guarded(g);
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
                self.pending_exec.insert(x.task.tgid(), x.task.ktime_ns);
                self.enforcer.forget(x.task.tgid());
                self.ident.forget_process(x.task.tgid());
                self.unwatch_frees(x.task.tgid());
                self.sync_known();
            }
            Record::Exit(x) => {
                self.pending_exec.remove(&x.task.tgid());
                self.enforcer.forget(x.task.tgid());
                self.ident.forget_process(x.task.tgid());
                self.unwatch_frees(x.task.tgid());
                self.sync_known();
                self.procs.remove_upto(x.task.tgid(), x.task.ktime_ns);
            }
            Record::Exec(_) => {}
            Record::FileOpen(f) => {
                self.on_open(&f);
                // A process held because it opened a protected key file
                // goes on once judged, whatever the outcome.
                if f.flags & open_flags::HELD != 0 {
                    self.release(f.task.tgid());
                }
            }
            Record::Killed(k) => self.on_killed(&k),
            Record::Malformed { kind, len } => {
                error!(kind, len, "malformed record from the probes")
            }
        }
    }

    /// A possible key file or a watched secret file was opened. Key files
    /// teach the sensor this process's public keys; watched files become
    /// (coalesced) File System Activity events. (Library opens go to the
    /// control thread.)
    fn on_open(&mut self, f: &FileOpenRecord) {
        let tgid = f.task.tgid();
        let path = c_str(&f.path);
        if f.flags & open_flags::TRUNCATED != 0 {
            debug!(pid = tgid, "path longer than the probe copies; not matched");
            return;
        }
        let info = self.process_at(tgid, f.task.ktime_ns);
        // A path relative to a directory descriptor cannot be made absolute
        // here; it is matched as it is (`**/name` globs still apply).
        let absolute = if f.dfd == -100 || path.starts_with('/') {
            info.absolute(&path)
        } else {
            path.clone()
        };
        let time_ms = self.wall_ms(f.task.ktime_ns);
        let host_path = info.host_path(tgid, &absolute);
        // Opens of guarded files are reported by the guard, with a verdict.
        let guarded = self
            .enforcer
            .is_guarded(host_path.as_deref().unwrap_or(&absolute));
        if !guarded
            && f.flags & open_flags::KEY_FILE == 0
            && self.secret_opens.join(tgid, &absolute, time_ms)
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
            self.key_file(&info, &path, f.dfd)
        } else {
            None
        };
        if let Some(Ok(k)) = key_file.as_deref() {
            if is_key_file {
                self.ident.add_process_keys(tgid, k.keys.clone(), &absolute);
            }
            if self.enforcer.protects_any() && k.has_private_key {
                self.protect_file(&absolute, k);
                self.judge_key_load(&f.task, &info, k, &absolute);
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
        if self.secret_opens.join(tgid, &absolute, time_ms) {
            return;
        }
        let keys = match key_file.as_deref() {
            Some(Ok(k)) => Some(k),
            _ => None,
        };
        self.start_secret_open(
            &f.task,
            &info,
            &absolute,
            keys,
            host_path,
            m.glob.clone(),
            None,
        );
    }

    /// The first open of a secret file by a process in its coalescing
    /// window (later ones `join` it): seen by the probes, or answered by
    /// the fanotify guard (`verdict`: allowed or not, and by which rule).
    #[allow(clippy::too_many_arguments)] // each is one field of the event
    fn start_secret_open(
        &mut self,
        task: &Task,
        info: &ProcessInfo,
        path: &str,
        key_file: Option<&KeyFile>,
        host_path: Option<String>,
        matched: String,
        verdict: Option<(bool, String)>,
    ) {
        let time_ms = self.wall_ms(task.ktime_ns);
        let keys: &[KeyInfo] = key_file.map_or(&[], |k| &k.keys);
        let (process, container, cgroup) = self.attribution(task, info);
        let seq = self.next_seq();
        self.secret_opens.add(
            task.tgid(),
            path,
            time_ms,
            SecretFileOpen {
                seq,
                process,
                container,
                cgroup,
                file: event::File::regular(path),
                key: (keys.len() == 1).then(|| identity_of(&keys[0], path, "key_file")),
                secret: SecretFile {
                    host_path,
                    matched,
                    count: 1,
                    first_time: time_ms,
                    last_time: time_ms,
                    keys: keys.iter().map(|k| k.spki_sha256.clone()).collect(),
                    holds_private_key: key_file.is_some_and(|k| k.has_private_key),
                    verdict: verdict
                        .as_ref()
                        .map(|(allowed, _)| if *allowed { "allowed" } else { "denied" }.to_owned()),
                    rule: verdict.map(|(_, rule)| rule),
                },
            },
        );
    }

    /// Emits coalesced secret-file opens whose window has closed (all with
    /// `flush`).
    fn emit_secret_opens(&mut self, flush: bool) {
        for (mut open, count, last) in self.secret_opens.due(flush) {
            open.secret.count = count;
            open.secret.last_time = last;
            self.events_by_kind[2] += 1;
            let ev = Event::secret_file_open(&self.origin, open);
            self.emit(ev, None);
        }
    }

    /// Parses a key or certificate file the process opened, once per file
    /// version. `None` when the path cannot be resolved or is not a file.
    fn key_file(
        &mut self,
        info: &ProcessInfo,
        path: &str,
        dfd: i64,
    ) -> Option<Arc<Result<KeyFile, String>>> {
        let resolved = if path.starts_with('/') || dfd == -100 {
            info.resolve(path)
        } else {
            None
        };
        let Some(p) = resolved else {
            debug!(path = %path, "cannot resolve opened file");
            return None;
        };
        let md = std::fs::metadata(&p).ok().filter(|m| m.is_file())?;
        let id = (
            md.dev(),
            md.ino(),
            md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            md.size(),
        );
        if let Some(r) = self.key_files.get(&id) {
            return Some(r.clone());
        }
        let r = Arc::new(material::read_key_file_detailed(&p, path).map_err(|e| e.to_string()));
        if let Err(e) = &*r {
            debug!("{e}");
        }
        if self.key_files.len() > 10_000 {
            self.key_files.clear();
        }
        self.key_files.insert(id, r.clone());
        Some(r)
    }

    fn wall_ms(&self, ktime_ns: u64) -> i64 {
        (ktime_ns as i64 + self.realtime_offset_ns) / 1_000_000
    }

    /// Who did it: the OCSF process, container and cgroup of a record.
    fn attribution(
        &mut self,
        task: &Task,
        info: &ProcessInfo,
    ) -> (event::Process, Option<event::Container>, Cgroup) {
        let cgroup_path = self
            .cgroups
            .path(task.cgroup_id, info.cgroup_path.as_deref());
        let container = cgroup_path
            .as_deref()
            .and_then(container_from_cgroup)
            .or_else(|| info.container.clone());
        let uid = task.uid();
        let user_name = self
            .users
            .entry(uid)
            .or_insert_with(|| user_name(uid))
            .clone();
        // What is missing, and why: the cgroup comes from the id the probe
        // read, the hash from the file opened at exec.
        let mut missing = Vec::new();
        if cgroup_path.is_none() {
            missing.push(format!("cgroup {} not found under cgroup2", task.cgroup_id));
        }
        if let Err(e) = info.exe_hash(&self.procs) {
            missing.push(e.to_owned());
        }
        let process = event::Process {
            pid: task.tgid(),
            tid: task.tid(),
            name: c_str(&task.comm),
            cmd_line: info.cmd_line.clone(),
            file: info.file(&self.procs),
            user: User {
                uid: uid.to_string(),
                name: user_name,
            },
            attribution_error: (!missing.is_empty()).then(|| missing.join("; ")),
        };
        (
            process,
            container,
            Cgroup {
                id: task.cgroup_id,
                path: cgroup_path,
            },
        )
    }

    /// The image a process ran at `ktime`, waiting briefly for the control
    /// thread's snapshot of its latest exec (a lost control record must not
    /// stall the event ring for long).
    fn process_at(&mut self, tgid: u32, ktime: u64) -> Arc<ProcessInfo> {
        if let Some(&exec) = self.pending_exec.get(&tgid)
            && exec <= ktime
        {
            self.pending_exec.remove(&tgid);
            if !self.procs.wait_for_exec(tgid, exec, EXEC_SNAPSHOT_WAIT) {
                debug!(
                    pid = tgid,
                    "no exec snapshot from the control thread in time"
                );
            }
        }
        self.procs.lookup_or_snapshot(tgid, ktime)
    }

    fn on_sign(&mut self, r: &SignRecord, sig: &[u8]) {
        let tgid = r.task.tgid();
        let cacheable = self.free_watches.covers(tgid, r.library, r.task.ktime_ns);
        let key = self.ident.identify(r, sig, cacheable);
        if !cacheable && Identifier::caches_by_handle(r) {
            self.watch_frees(tgid, r.library);
        }
        self.sync_known();
        let info = self.process_at(tgid, r.task.ktime_ns);
        let (process, container, cgroup) = self.attribution(&r.task, &info);
        let (lib_file, library_kind) = self.library_of(r.library, r.func as u8);
        let (peer, local) = endpoints(r);
        let md_name = (r.flags & sign_flags::HAS_MD_NAME != 0)
            .then(|| c_str(&r.md_name))
            .filter(|s| !s.is_empty());
        let u = KeyUse {
            time_ms: self.wall_ms(r.task.ktime_ns),
            seq: self.next_seq(),
            process,
            container,
            cgroup,
            library: lib_file,
            library_kind,
            function: function_name(r.func as u8).to_owned(),
            success: r.ret == 1,
            key,
            signature: Signature {
                length: if r.ret == 1 { r.sig_len } else { 0 },
                digest: md_name,
            },
            peer,
            local,
        };
        self.events_by_kind[0] += 1;
        let ev = Event::key_use(&self.origin, u);
        self.emit(ev, None);
    }

    /// Attaches a library's free probes to a process that signed through
    /// it, so its later verdicts can be cached (`free_watch`). Past the
    /// per-process limit, or when a per-process attach fails for another
    /// reason than the process going away, they go host-wide instead.
    fn watch_frees(&mut self, tgid: u32, library: u32) {
        let mut step = self.free_watches.next_step(tgid, library);
        if step == free_watch::Step::Nothing {
            return;
        }
        let mut probes = self.probes.lock().expect("probes lock");
        if !probes.has_free_probes(library) {
            return;
        }
        if step == free_watch::Step::AttachProcess {
            match probes.attach_frees(library, Some(tgid)) {
                Ok(link) => {
                    let since = clock_ns(nix::time::ClockId::CLOCK_MONOTONIC) as u64;
                    // Gone already (0): the next sweep detaches it.
                    let started = free_watch::start_time(tgid).unwrap_or(0);
                    debug!(pid = tgid, library, "watching key-object frees");
                    if let Some(old) = self
                        .free_watches
                        .attached(tgid, library, link, since, started)
                    {
                        probes.detach_frees(old);
                    }
                    return;
                }
                Err(e) if crate::probes::process_gone(&e) => {
                    self.free_watches.unwatchable(tgid, library);
                    return;
                }
                Err(e) => {
                    warn!(pid = tgid, library, error = %format!("{e:#}"), "attaching free probes to one process; attaching them host-wide");
                    step = free_watch::Step::AttachHostWide;
                }
            }
        }
        if step == free_watch::Step::AttachHostWide {
            let since = match probes.attach_frees(library, None) {
                Ok(_) => {
                    info!(
                        library,
                        watched = self.free_watches.watched(),
                        "free probes for this library are host-wide from now on"
                    );
                    Some(clock_ns(nix::time::ClockId::CLOCK_MONOTONIC) as u64)
                }
                Err(e) => {
                    warn!(library, error = %format!("{e:#}"), "free probes cannot be attached: every signature through this library is verified");
                    None
                }
            };
            for old in self.free_watches.host_wide(library, since) {
                probes.detach_frees(old);
            }
        }
    }

    /// Watched processes whose exit record was lost: forgotten like any
    /// exited process, so a reused pid is not taken as watched.
    fn sweep_free_watches(&mut self) {
        self.free_watches.retry_unwatchable();
        let gone = self
            .free_watches
            .gone(|tgid, started| free_watch::start_time(tgid) == Some(started));
        for tgid in gone {
            debug!(pid = tgid, "watched process gone without an exit record");
            self.ident.forget_process(tgid);
            self.unwatch_frees(tgid);
        }
        self.sync_known();
    }

    /// A process exited or exec'd: its free probes go.
    fn unwatch_frees(&mut self, tgid: u32) {
        let links = self.free_watches.forget(tgid);
        if links.is_empty() {
            return;
        }
        let mut probes = self.probes();
        for link in links {
            probes.detach_frees(link);
        }
    }

    /// The library a probe record names, as an OCSF file, and the stack
    /// the probed function belongs to.
    fn library_of(&self, index: u32, func: u8) -> (event::File, String) {
        let library = self.probes().library(index);
        let file = event::File::regular(library.as_ref().map_or("", |l| &l.shown_as));
        (
            file,
            library
                .map(|l| l.stack_of(func))
                .unwrap_or("unknown")
                .to_owned(),
        )
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
        for (tgid, handle, generation) in learned {
            if let Err(e) = probes.set_known(tgid, handle, Some(generation)) {
                debug!(error = %e, "KNOWN insert");
            }
        }
        for (tgid, handle) in retract {
            let _ = probes.set_known(tgid, handle, None);
        }
    }

    /// Hands an event to the pipeline, which writes it (enriched) and acts
    /// on the rules it fires once it comes out (`drain_pipeline`).
    /// `killed_by` names the rule whose kill the probe already carried out.
    /// If the pipeline is full the event is written at once, unanalysed, and
    /// counted: never lost, never waited for.
    fn emit(&mut self, ev: Event, killed_by: Option<&str>) {
        let input = Input {
            event: ev,
            killed_by: killed_by.map(str::to_owned),
        };
        let back = match &self.pipeline {
            Some(p) => p.submit(input).err().map(|o| o.event),
            None => Some(input.event),
        };
        if let Some(back) = back {
            self.unanalysed += 1;
            if self.unanalysed.is_power_of_two() {
                warn!(
                    total = self.unanalysed,
                    "analyzer queue full: events written without correlation"
                );
            }
            self.sink.push(&back);
        }
    }

    fn drain_pipeline(&mut self) {
        let ready: Vec<Box<Output>> = match &self.pipeline {
            Some(p) => p.try_drain().collect(),
            None => return,
        };
        for o in ready {
            self.handle_output(o);
        }
    }

    /// Writes an analysed event, then acts on every rule it fired and
    /// writes a finding for each.
    fn handle_output(&mut self, o: Box<Output>) {
        let ev = &o.event;
        self.sink.push(ev);
        for fired in &o.fired {
            let rule = fired.rule.clone();
            let mut responses = Vec::new();
            for action in &rule.actions {
                let (outcome, detail) = match action {
                    Action::Alert => ("done", None),
                    Action::Kill if o.killed_by.as_deref() == Some(rule.id.as_str()) => (
                        "in_kernel",
                        Some(
                            "SIGKILL as it entered the signing call; no signature was made"
                                .to_owned(),
                        ),
                    ),
                    Action::Kill => self.kill_after(ev),
                    Action::Block => {
                        match ev.secret_file.as_ref().and_then(|s| s.verdict.as_deref()) {
                            Some("denied") => ("done", Some("open refused with EPERM".to_owned())),
                            _ => (
                                "skipped",
                                Some(
                                    "this open was not behind a fanotify mark of this rule"
                                        .to_owned(),
                                ),
                            ),
                        }
                    }
                };
                responses.push(Response {
                    action: action.name().to_owned(),
                    outcome: outcome.to_owned(),
                    detail,
                });
            }
            warn!(rule = %rule.id, pid = ev.actor.process.pid, "rule fired: {}", ev.message);
            let seq = self.next_seq();
            let finding = fired.finding(&self.origin, self.now_ms(), seq, ev, responses);
            self.findings += 1;
            self.sink.push(&finding);
        }
    }

    /// Stops the pipeline, writes what it still held, saves baselines.
    fn finish_pipeline(&mut self) {
        let Some(p) = self.pipeline.take() else {
            return;
        };
        for (shard, st) in p.stats.iter().enumerate() {
            let st = st.snapshot();
            info!(
                shard,
                received = st.received,
                dropped = st.dropped,
                processed = st.processed,
                mean_latency_us = st.mean_latency_ns() / 1000,
                max_latency_us_sampled = st.latency_ns_max / 1000,
                "analyzer shard"
            );
        }
        let (rest, store) = p.finish();
        for o in rest {
            self.handle_output(o);
        }
        if let Err(e) = store.save(&self.baseline_path) {
            error!("{e}");
        }
    }

    fn save_baselines(&mut self) {
        let Some(p) = &self.pipeline else { return };
        let (store, outputs) = p.baselines();
        for o in outputs {
            self.handle_output(o);
        }
        if let Err(e) = store.save(&self.baseline_path) {
            self.warn_event(None, None, e.to_string());
        }
    }

    /// Picks up replaced GeoIP databases; a bad file keeps the old data.
    fn refresh_geo(&mut self) {
        let Some(geo) = self.geo.clone() else { return };
        for r in geo.refresh() {
            match r {
                Ok(true) => info!("GeoIP database reloaded"),
                Ok(false) => {}
                Err(e) => self.warn_event(
                    None,
                    None,
                    format!("GeoIP database not reloaded, previous data kept: {e}"),
                ),
            }
        }
    }

    /// SIGHUP: load the rules again. A set with errors is refused whole and
    /// the running one kept; events keep flowing either way.
    fn reload_rules(&mut self, cfg: &Config) {
        let rules = match crate::analyze::load_rules(&cfg.rules) {
            Ok(r) => r,
            Err(e) => {
                self.warn_event(
                    None,
                    None,
                    format!("rules not reloaded, keeping the running set: {e:#}"),
                );
                return;
            }
        };
        if let Err(e) = crate::enforce::guard::plan(&rules) {
            self.warn_event(
                None,
                None,
                format!("rules not reloaded, keeping the running set: {e:#}"),
            );
            return;
        }
        let block = |set: &RuleSet| -> Vec<(String, Vec<String>)> {
            set.with_action(Action::Block)
                .map(|r| {
                    (
                        r.id.clone(),
                        r.values_of("file.path").unwrap_or_default().to_vec(),
                    )
                })
                .collect()
        };
        if block(&rules) != block(&self.enforcer.rules) {
            warn!("block rules changed: which directories are guarded changes only at restart");
        }
        let enforcer = match Enforcer::new(rules.clone()) {
            Ok(e) => e,
            Err(e) => {
                self.warn_event(None, None, format!("rules not reloaded: {e:#}"));
                return;
            }
        };
        self.enforcer = enforcer;
        self.protected_found.clear();
        self.load_key_paths(&cfg.key_paths);
        self.warn_unprotectable();
        if let Some(p) = &self.pipeline {
            p.reload(rules.clone());
        }
        info!(rules = rules.rules.len(), "rules reloaded");
    }

    /// `kill` for a use the probe could not stop in time (the key was only
    /// known once it had signed): SIGKILL now, and condemn the process in
    /// the kernel so a signature already on its way is stopped too.
    fn kill_after(&mut self, ev: &Event) -> (&'static str, Option<String>) {
        let pid = ev.actor.process.pid;
        if pid == 0 || pid == std::process::id() {
            return ("skipped", Some("no process to kill".to_owned()));
        }
        let _ = self.probes().set_verdict(pid, Some(0));
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        ) {
            Ok(()) => (
                "done",
                Some("SIGKILL after the event (the key was not known to be protected before it was used)".to_owned()),
            ),
            Err(e) => ("failed", Some(format!("SIGKILL: {e}"))),
        }
    }

    /// Lets a process held by the open probe go on.
    fn release(&mut self, tgid: u32) {
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(tgid as i32),
            nix::sys::signal::SIGCONT,
        ) {
            debug!(pid = tgid, error = %e, "SIGCONT");
        }
        self.probes().forget_held(tgid);
    }

    /// A file holding a protected private key: opening any file of its name
    /// holds the opener until judged (`judge_key_load`).
    fn protect_file(&mut self, path: &str, k: &KeyFile) {
        if !k.has_private_key
            || !k
                .keys
                .iter()
                .any(|key| self.enforcer.protecting(&key.spki_sha256).next().is_some())
        {
            return;
        }
        for key in &k.keys {
            if self.enforcer.protecting(&key.spki_sha256).next().is_some() {
                self.protected_found.insert(key.spki_sha256.clone());
            }
        }
        let name = path.rsplit('/').next().unwrap_or(path).to_owned();
        if self.protected_names.contains(&name) {
            return;
        }
        match self.probes().protect_name(&name) {
            Ok(()) => info!(file = %path, "protected key file: openers are held until judged"),
            Err(e) => warn!(file = %path, error = %e, "cannot protect key file"),
        }
        self.protected_names.insert(name);
    }

    /// Kill rules whose key no `key_paths` file holds cannot stop the first
    /// signature; say so at start.
    fn warn_unprotectable(&mut self) {
        let known: Vec<String> = self
            .enforcer
            .protected_spkis()
            .filter(|s| !self.protected_found.contains(*s))
            .map(str::to_owned)
            .collect();
        for spki in known {
            let rules: Vec<String> = self
                .enforcer
                .protecting(&spki)
                .map(|r| r.id.clone())
                .collect();
            warn!(
                key = %spki,
                rules = %rules.join(","),
                "no file under key_paths holds this protected key: a process is held and judged when it opens a file holding it, otherwise stopped right after its first signature"
            );
        }
    }

    /// A process opened a file holding a private key. If a kill rule
    /// protects that key and does not allow this process, condemn it: its
    /// next signature attempt is killed in the kernel.
    fn judge_key_load(&mut self, task: &Task, info: &ProcessInfo, k: &KeyFile, path: &str) {
        let tgid = task.tgid();
        if self.enforcer.is_condemned(tgid) {
            return;
        }
        for key in &k.keys {
            if self.enforcer.protecting(&key.spki_sha256).next().is_none() {
                continue;
            }
            // The use the rule would see, less what only a signature tells.
            let (process, container, cgroup) = self.attribution(task, info);
            let probe = Event::key_use(
                &self.origin,
                KeyUse {
                    time_ms: self.wall_ms(task.ktime_ns),
                    seq: 0,
                    process,
                    container,
                    cgroup,
                    library: event::File::default(),
                    library_kind: String::new(),
                    function: String::new(),
                    success: true,
                    key: identity_of(key, path, "key_file"),
                    signature: Signature {
                        length: 0,
                        digest: None,
                    },
                    peer: None,
                    local: None,
                },
            );
            let rule = self
                .enforcer
                .protecting(&key.spki_sha256)
                .find(|r| r.matches(&probe))
                .map(|r| r.id.clone());
            if let Some(rule) = rule {
                let verdict = self.enforcer.condemn(Condemnation {
                    tgid,
                    rule: rule.clone(),
                    key: key.clone(),
                    file: path.to_owned(),
                });
                match self.probes().set_verdict(tgid, Some(verdict)) {
                    Ok(()) => {
                        info!(pid = tgid, rule = %rule, file = %path, "process may not sign with this key: it is killed if it tries")
                    }
                    Err(e) => error!(pid = tgid, error = %e, "cannot condemn process"),
                }
                return;
            }
        }
    }

    /// The probe killed a condemned process as it began to sign.
    fn on_killed(&mut self, k: &KilledRecord) {
        let tgid = k.task.tgid();
        let Some(c) = self.enforcer.condemnation(k.verdict).cloned() else {
            // Condemned after a use (`kill_after`): already reported.
            return;
        };
        let info = self.process_at(tgid, k.task.ktime_ns);
        let (process, container, cgroup) = self.attribution(&k.task, &info);
        let (library, library_kind) = self.library_of(k.library, k.func as u8);
        let u = KeyUse {
            time_ms: self.wall_ms(k.task.ktime_ns),
            seq: self.next_seq(),
            process,
            container,
            cgroup,
            library,
            library_kind,
            function: function_name(k.func as u8).to_owned(),
            success: false,
            key: identity_of(&c.key, &c.file, "key_file"),
            signature: Signature {
                length: 0,
                digest: None,
            },
            peer: None,
            local: None,
        };
        self.events_by_kind[0] += 1;
        let mut ev = Event::key_use(&self.origin, u);
        ev.status_detail = Some(format!(
            "killed (SIGKILL) before signing: rule {} does not allow this process to use the key it loaded from {}",
            c.rule, c.file
        ));
        ev.message = format!(
            "{} (pid {}) was killed before signing with {} key {} (rule {})",
            ev.actor.process.name,
            tgid,
            c.key.algorithm,
            &c.key.spki_sha256[..16],
            c.rule
        );
        self.emit(ev, Some(&c.rule));
    }

    /// An open the guard decided: reported like any secret-file open, with
    /// its verdict.
    fn on_guarded(&mut self, g: GuardedOpen) {
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
        let info = g.process.clone();
        let time_ms = self.wall_ms(g.ktime_ns);
        if self.secret_opens.join(g.tgid, &g.host_path, time_ms) {
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
            material::read_key_file_detailed(std::path::Path::new(&g.host_path), &g.host_path).ok()
        } else {
            None
        };
        let matched = match (&watched, &g.verdict) {
            (Some(m), _) => m.glob.clone(),
            (None, Some((_, rule))) => format!("rule:{rule}"),
            (None, None) => String::new(),
        };
        self.start_secret_open(
            &task,
            &info,
            &g.host_path,
            key_file.as_ref(),
            Some(g.host_path.clone()),
            matched,
            g.verdict,
        );
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

/// The remote and local ends of the connection a signature was made for.
fn endpoints(
    r: &SignRecord,
) -> (
    Option<event::NetworkEndpoint>,
    Option<event::NetworkEndpoint>,
) {
    if r.flags & sign_flags::HAS_PEER == 0 {
        return (None, None);
    }
    let p = &r.peer;
    let ip = |b: &[u8; 16]| -> Option<std::net::IpAddr> {
        match p.family {
            2 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()),
            10 => {
                let v6 = std::net::Ipv6Addr::from(*b);
                // A v4 client on a dual-stack socket: name it as v4.
                Some(v6.to_ipv4_mapped().map_or(v6.into(), Into::into))
            }
            _ => None,
        }
    };
    let end = |addr: &[u8; 16], port: u16| {
        ip(addr).map(|ip| event::NetworkEndpoint {
            ip: ip.to_string(),
            port: Some(port),
            ..Default::default()
        })
    };
    (
        end(&p.remote_addr, p.remote_port),
        end(&p.local_addr, p.local_port),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = hard.min(4096) - 1;
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        super::raise_open_file_limit();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }
}
