//! `keywarden run`: discover, attach, then turn probe records into events.
//!
//! (Over 600 lines: about 660. The wiring of every part, the loop's turn
//! and its shutdown share the `Sensor`'s fields; routing is `route.rs`.
//! The end-of-run reporting, shed counts and the `stopped:` line, is the
//! part to move out next.)
//!
//! Two threads. The control thread (`control.rs`) acts at once on execs and
//! newly opened libraries. This, the event thread, drains the bulk ring on
//! a timer (`poll_interval_ms`; signature records never wake anyone) and
//! routes each record, in order, to the part that handles it (`route`).
//!
//! The parts, each owning its own state:
//! * `attribution`: who did it (process, container, cgroup) and when;
//! * `key_uses`: signatures and the free probes of signing processes;
//! * `secret_opens`: key files (read off this thread, by the key reader)
//!   and watched secret files, each judged once its open's result is in;
//! * `enforce::decisions`: protected key files, condemnations, kills;
//! * `emitter`: numbering, the analysis pipeline, findings, the sink;
//! * `shedding`: what the bounds shed under load, counted and reported.
//!
//! A handler borrows the parts it needs and nothing else.
//!
//! Each turn of the loop is bounded (`route::RECORDS_PER_TURN`,
//! `route::TIME_PER_TURN`): a flood of records cannot keep the thread from
//! writing coalesced opens, the analyzer's results and the output, nor from
//! reporting what it shed, and what those hold between turns stays bounded.

pub mod attribution;
pub mod emitter;
mod key_openers;
pub mod key_uses;
mod route;
mod secret_opens;
pub mod shedding;
mod startup;

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use keywarden_analyzer::{
    baseline::BaselineStore,
    pipeline::{Overflow, Pipeline},
    rules::{Action, RuleSet},
};
use keywarden_probe_types::{config, stats};
use tracing::{debug, error, info, warn};

use crate::{
    config::Config,
    control::{ANOTHER_SENSOR_HOLDS, Control, Warning},
    discovery::signing_code::ScanCache,
    enforce::{
        Enforcer,
        decisions::Decisions,
        guard::{Guard, GuardedOpen},
    },
    enrich::{kernel_layout, pods::PodNames, process::ProcessTable},
    keys::inventory::{self, Inventory},
    lake::ParquetSink,
    liveness::{self, Liveness},
    metrics::{self, Metrics, Queue, Queues},
    probes::{Lease, Probes},
    remediate::Remediator,
    respond,
    secrets::watch::{WatchEntry, WatchList},
    setup,
    sink::NdjsonSink,
    watchdog::Watchdog,
};
use attribution::Attributor;
use emitter::Emitter;
use key_uses::KeyUses;
use secret_opens::SecretOpens;
use shedding::{Shed, ShedReport};

/// How a run that was not an error ended.
pub enum Outcome {
    /// Everything the sensor saw was reported.
    Complete,
    /// Events were shed on the way; the exit status says so
    /// (`shedding::EXIT_SHED`).
    Shed(Shed),
}

/// How often the kernel's ring-buffer loss counters are read while the
/// sensor runs: often enough that a loss is reported within about a
/// second, and each read is a few map lookups under the probes lock.
const RING_READ_EVERY: Duration = Duration::from_millis(250);

/// How long the sensor goes on draining the ring once it is asked to stop.
/// A flood that outlasts this would otherwise keep it from stopping; the
/// records still in the ring then are counted as shed (`ring_unread`).
const FINAL_DRAIN: Duration = Duration::from_secs(2);

/// Records counted past `FINAL_DRAIN`, at most: more than the default 8 MiB
/// ring holds, so this only bounds a flood that refills it while it is counted.
const UNREAD_COUNTED_MAX: u64 = 1 << 20;

/// How long the sensor waits at exit for the output thread to write what
/// is queued (a stalled pipe would otherwise keep it from stopping).
const SINK_FINISH: Duration = Duration::from_secs(10);

/// The event thread's state: the ring, the channels into it, and the parts.
struct Sensor {
    probes: Arc<Mutex<Probes>>,
    events: RingBuf<MapData>,
    warnings: crossbeam_channel::Receiver<Warning>,
    guarded: crossbeam_channel::Receiver<GuardedOpen>,
    attr: Attributor,
    keys: KeyUses,
    secrets: SecretOpens,
    decisions: Decisions,
    out: Emitter,
    /// The probes' `STATS` counters as last read (the ring-buffer losses,
    /// `LOST_SIGN`, `LOST_DATA`, `LOST_OTHER`, among them), and when.
    kernel_stats: [u64; stats::SLOTS as usize],
    /// Runs of each program the kernel skipped (`probes::skipped`), read
    /// with `kernel_stats`.
    kernel_skipped: Vec<(String, u64)>,
    ring_read_at: Option<Instant>,
    /// Files the probes are attached to, and the functions probed in them,
    /// read with `kernel_stats` (for the metrics endpoint).
    attached: (u64, u64),
    /// What the metrics endpoint shows, published once a turn.
    metrics: Arc<Metrics>,
    /// Records left in the ring at exit, counted but not handled.
    ring_unread: u64,
    /// Verdicts the guard enforced but could not report.
    guard_shed: Arc<AtomicU64>,
    shed_report: ShedReport,
    /// Records waiting for their process's key-file read (`route.rs`).
    deferred: route::Deferred,
    /// Stamped as this thread makes progress: it releases the openers of
    /// protected key files, so the control thread renews the hold lease
    /// only while it moves (`liveness.rs`).
    liveness: Arc<Liveness>,
    /// Processes that load a private key with code nothing probes.
    key_openers: key_openers::KeyOpeners,
    /// Rules' `rotate` and `revoke` (shared with the response stage).
    remediator: Arc<Mutex<Remediator>>,
}

/// Whether a rule of `rules` may record an action for approval (the
/// configuration's mode caps the rule's).
fn needs_approvals(rules: &RuleSet, ceiling: keywarden_analyzer::remediation::Mode) -> bool {
    rules.rules.iter().any(|r| {
        r.actions.iter().any(|a| a.remediates())
            && r.remediation.within(ceiling) == keywarden_analyzer::remediation::Mode::Approve
    })
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

/// The watch list: `secret_files.watch` plus the paths rules care about,
/// or those rules could never fire. (Guarded paths are reported by the
/// guard; watching them also teaches the sensor which keys a process
/// loaded.)
fn watch_list(cfg: &Config, rules: &RuleSet) -> Result<WatchList> {
    let mut entries = cfg.secret_files.watch.clone();
    for r in &rules.rules {
        if r.event != keywarden_analyzer::event::EventCode::SecretFileOpen {
            continue;
        }
        for glob in r.values_of("file.path").unwrap_or_default() {
            if !entries.iter().any(|e| e.glob() == glob) {
                entries.push(WatchEntry::Glob(glob.clone()));
            }
        }
    }
    WatchList::new(&entries).map_err(|e| {
        anyhow::anyhow!("{e} (the watch list is secret_files.watch plus the file.path globs of secret_file_open rules)")
    })
}

pub fn run(cfg: Config, shutdown: Arc<AtomicBool>, reload: Arc<AtomicBool>) -> Result<Outcome> {
    crate::host::preflight()?;
    raise_open_file_limit();
    // Bound before anything attaches, so that an address that cannot be
    // bound stops the sensor at once; it serves until `run` returns.
    let metrics = Arc::new(Metrics::default());
    let _endpoint = match &cfg.metrics {
        Some(addr) => Some(metrics::Endpoint::start(addr, metrics.clone())?),
        None => None,
    };
    let rules = setup::load_rules(&cfg.rules)?;
    // Refuse block rules that cannot be enforced before anything attaches.
    crate::enforce::guard::plan(&rules)?;
    let watch = watch_list(&cfg, &rules)?;
    let geo = setup::open_geo(&cfg.analyzer)?;
    let baseline_path = PathBuf::from(&cfg.analyzer.baselines);
    let baselines = BaselineStore::load(&baseline_path)?;
    // Before anything attaches: a file that cannot be read stops the sensor
    // rather than be overwritten by an inventory that forgot it.
    let inventory_path = PathBuf::from(&cfg.inventory);
    let inventory = Inventory::load(&inventory_path)?;
    let pipeline = Pipeline::start(
        rules.clone(),
        setup::pipeline_config(&cfg.analyzer, geo.clone(), baselines, Overflow::Drop),
    );
    let mut remediator = Remediator::start(&cfg.remediation, cfg.source.clone(), &cfg.inventory)?;
    // A rule that may record an action for approval needs a safe place
    // for it: checked now, not at the first finding.
    if needs_approvals(&rules, cfg.remediation.mode) {
        remediator.check_store()?;
    }
    let remediator = Arc::new(Mutex::new(remediator));
    let enforcer = Enforcer::new(rules)?;
    let sink = NdjsonSink::open(&cfg.output, cfg.format)?;
    let origin = setup::origin();
    let parquet = match &cfg.parquet.dir {
        Some(dir) => Some(ParquetSink::open(&cfg.parquet, dir, &origin.uid_prefix)?),
        None => None,
    };
    let (mut probes, rings) = Probes::load(cfg.ring_buffer_bytes()?, cfg.open_hook)?;
    // Before this sensor can hold anyone (its first heartbeat, below): a
    // child that releases whoever it holds once it exits, however it exits.
    // Ready before the lease is taken, so these probes never hold it.
    let (watchdog, watchdog_out) = Watchdog::start(probes.hold_token())?;
    probes.set_watch(&watch.kernel)?;
    probes.set_exit_names(&watch.exit)?;
    info!("{}", watch.exit.describe());
    probes.set_config(config::SENSOR_TGID, std::process::id() as u64)?;
    probes.register_sensor()?;
    let lease_at_start = probes.heartbeat()?;
    if lease_at_start == Lease::Other {
        warn!("{ANOTHER_SENSOR_HOLDS}");
    }
    let (warn_tx, warn_rx) = crossbeam_channel::bounded(1024);
    let (guard_tx, guard_rx) = crossbeam_channel::bounded(4096);
    let probes = Arc::new(Mutex::new(probes));
    let liveness = Arc::new(Liveness::new(watchdog_out));
    let procs = Arc::new(ProcessTable::default());
    let pods = Arc::new(PodNames::new(Path::new(&cfg.pods_log_root)));
    let cache = Arc::new(Mutex::new(ScanCache::default()));
    let mut s = Sensor {
        probes: probes.clone(),
        events: rings.events,
        warnings: warn_rx,
        guarded: guard_rx,
        attr: Attributor::new(procs.clone(), pods.clone()),
        keys: KeyUses::new(probes.clone(), inventory),
        secrets: SecretOpens::new(watch, Duration::from_millis(cfg.secret_files.coalesce_ms))?,
        decisions: Decisions::new(enforcer, probes.clone()),
        out: Emitter::new(
            sink,
            origin.clone(),
            pipeline,
            geo,
            baseline_path,
            Box::new(respond::Live {
                probes: probes.clone(),
                remediator: remediator.clone(),
            }),
        ),
        kernel_stats: [0; stats::SLOTS as usize],
        kernel_skipped: Vec::new(),
        ring_read_at: None,
        attached: (0, 0),
        metrics,
        ring_unread: 0,
        guard_shed: Arc::new(AtomicU64::new(0)),
        shed_report: ShedReport::default(),
        deferred: route::Deferred::default(),
        liveness: liveness.clone(),
        key_openers: key_openers::KeyOpeners::new(probes.clone(), cache.clone()),
        remediator,
    };
    s.out.parquet = parquet;
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
    crate::enforce::report_mechanisms(&s.decisions.enforcer.rules);
    let guard_stop = Arc::new(AtomicBool::new(false));
    let guard = match Guard::new(
        &s.decisions.enforcer.rules,
        procs.clone(),
        pods,
        origin,
        guard_tx,
        s.guard_shed.clone(),
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
        probes: probes.clone(),
        procs,
        cache: cache.clone(),
        warnings: warn_tx,
        shutdown: control_stop.clone(),
        lease_at_start,
        liveness,
    };
    let control = std::thread::Builder::new()
        .name("keywarden-ctl".into())
        .spawn(move || control.run())?;
    // Holding starts only now that the thread that releases is running:
    // enabled with the lease, a process exec'd while the sensor still set
    // itself up (kernel layouts, fanotify marks: seconds under emulation)
    // stayed stopped with nobody to release it.
    s.probes()
        .set_config(config::HOLD_NEW_LIBRARIES, cfg.hold_new_libraries as u64)?;

    let uncovered = startup::discover(&cfg.library_dirs, &cache, &probes, &mut s.out);
    startup::load_key_paths(&cfg.key_paths, &mut s.keys.ident, &mut s.decisions);
    startup::scan_key_locations(&cfg.key_locations, &mut s.keys.ident);
    s.decisions.warn_unprotectable();
    for missing in s.secrets.watch.missing_roots() {
        warn!("secret_files.watch entry {missing}; it watches nothing on the host itself");
    }
    s.say_ready(&uncovered, cfg.hold_new_libraries);

    // Woken at least every EVENT_TICK, so an idle thread is seen alive.
    let poll_interval =
        Duration::from_millis(cfg.poll_interval_ms.max(1)).min(liveness::EVENT_TICK);
    let mut last_housekeeping = Instant::now();
    let mut last_save = Instant::now();
    let mut inventory_writer = inventory::Writer::new(inventory_path);
    let mut last_inventory_save = Instant::now();
    let mut failure = None;
    let mut more = false;
    while !shutdown.load(Ordering::Relaxed) {
        // The first stamp puts this thread on duty (`liveness.rs`).
        s.liveness.event_progressed();
        // A turn that left records in the ring does not wait for more.
        let timeout = if more {
            nix::poll::PollTimeout::ZERO
        } else {
            nix::poll::PollTimeout::try_from(poll_interval).unwrap_or(nix::poll::PollTimeout::MAX)
        };
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
        more = s.drain();
        s.keys.poll(&mut s.out);
        s.remediations();
        s.end_turn();
        if reload.swap(false, Ordering::Relaxed) {
            s.settle();
            s.end_turn();
            s.reload_rules(&cfg);
        }
        if last_housekeeping.elapsed() >= Duration::from_secs(5) {
            s.keys.ident.expire(Duration::from_secs(30));
            s.keys.sweep_free_watches();
            s.out.refresh_geo();
            last_housekeeping = Instant::now();
        }
        if last_save.elapsed() >= Duration::from_secs(60) {
            s.out.save_baselines();
            last_save = Instant::now();
        }
        if last_inventory_save.elapsed() >= inventory::SAVE_EVERY {
            if let Some(e) = inventory_writer.save(&mut s.keys.ident.record) {
                s.out.warn(None, None, e.to_string());
            }
            last_inventory_save = Instant::now();
        }
    }

    // Stop holding processes before anything else, release any still held,
    // then deliver what is left.
    if let Err(e) = s.probes().set_config(config::HOLD_NEW_LIBRARIES, 0) {
        warn!(error = %e, "turning holds off (the control thread still releases held processes)");
    }
    control_stop.store(true, Ordering::Relaxed);
    if control.join().is_err() {
        error!("control thread panicked");
    }
    if let Err(e) = s.probes().unregister_sensor() {
        warn!(error = %e, "removing this sensor from SENSORS (the next sensor prunes it)");
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
    s.drain_at_exit();
    // Key files still being read get until their deadline; the openers
    // they hold are released when judged.
    s.finish_opens();
    // Signatures held for a key a search may still bring.
    s.keys.finish(&mut s.out);
    // Every use is recorded now.
    if let Err(e) = inventory_writer.finish(&mut s.keys.ident.record) {
        s.out.warn(None, None, e.to_string());
    }
    // Everyone held was released above; the watchdog sweeps what is left
    // (a hold whose record was still being written), then exits.
    watchdog.finish();
    s.secrets.emit_due(true, &mut s.out);
    s.out.finish_pipeline();
    // What the last findings started or recorded; a rotation under way
    // goes on in its own process, its journal has the outcome.
    s.remediations();
    s.remediator.lock().expect("remediator lock").stop();
    // The last warning, whatever the time since the one before.
    s.report_shed(true);
    // Parquet first: its last files are written while the output drains.
    if let Some(p) = &mut s.out.parquet {
        p.finish(SINK_FINISH);
    }
    let unwritten = s.out.sink.finish(SINK_FINISH);
    if unwritten > 0 {
        error!("{unwritten} events could not be written to {}", cfg.output);
    }
    let shed = s.shed();
    s.say_stopped(&shed, unwritten);
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(if shed.total() > 0 {
        Outcome::Shed(shed)
    } else {
        Outcome::Complete
    })
}

impl Sensor {
    /// Writes what the remediation stage reported since the last turn.
    fn remediations(&mut self) {
        let reports = self.remediator.lock().expect("remediator lock").poll();
        if !reports.is_empty() {
            self.out.remediations(reports);
        }
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, Probes> {
        self.probes.lock().expect("probes lock")
    }

    /// The `ready` line: what is covered, and what is not.
    fn say_ready(&mut self, uncovered: &[String], hold_new_libraries: bool) {
        let covered: Vec<String> = self
            .probes()
            .libraries()
            .iter()
            .map(|l| format!("{} ({})", l.shown_as, l.stacks().join("+")))
            .collect();
        info!(
            libraries = covered.len(),
            uncovered = uncovered.len(),
            keys_known = self.keys.ident.inventory_len(),
            inventory_keys = self.keys.ident.record.len(),
            inventory_unused = self.keys.ident.record.unused_count(),
            hold_new_libraries,
            "ready: probes attached to {}{}",
            covered.join(", "),
            if uncovered.is_empty() {
                String::new()
            } else {
                format!(
                    "; NOT covered (crypto code keywarden cannot probe, or without symbols): {}",
                    uncovered.join(", ")
                )
            }
        );
        self.out.sink.flush();
    }

    /// The end of a turn of the event loop: writes the coalesced opens
    /// whose window closed and the analyzer's results, reports what was
    /// shed, and hands the output to its writer.
    fn end_turn(&mut self) {
        self.secrets.emit_due(false, &mut self.out);
        self.out.drain_pipeline();
        self.report_shed(false);
        self.out.sink.flush();
        self.publish_metrics();
    }

    /// Publishes this turn's counts for the metrics endpoint
    /// (`metrics/`): each part's own counts and its queue, read here,
    /// then copied under the endpoint's lock.
    fn publish_metrics(&self) {
        let analyzer = self
            .out
            .pipeline()
            .map(|p| (p.input_queue(), p.output_queue()));
        let ((input, input_capacity), (output, output_capacity)) = analyzer.unwrap_or_default();
        let sink = self.out.sink.progress();
        let queues = Queues {
            analyzer_input: Queue::new(input, Some(input_capacity)),
            analyzer_output: Queue::new(output, Some(output_capacity)),
            sink_backlog: Queue::new(sink.queued_lines, None),
            guard_verdicts: Queue::new(self.guarded.len(), self.guarded.capacity()),
            warnings: Queue::new(self.warnings.len(), self.warnings.capacity()),
        };
        let shed = self.shed();
        let key_reads = self.secrets.key_read_stats();
        let (libraries, functions) = self.attached;
        let parquet = self.out.parquet.as_ref().map(|p| p.counts());
        self.metrics.publish(|m| {
            self.out.counts.tally.copy_into(&mut m.tally);
            m.written = sink.written;
            m.shed = shed;
            m.kernel = self.kernel_stats;
            m.key_reads = key_reads;
            m.libraries = libraries;
            m.functions = functions;
            m.verifications = self.keys.ident.verifications;
            m.queues = queues;
            m.sink_backlog_bytes = sink.queued_bytes as u64;
            m.parquet = parquet;
        });
    }

    /// Drains the ring once the sensor is asked to stop, for `FINAL_DRAIN`
    /// at most; what is still there then is counted as shed.
    fn drain_at_exit(&mut self) {
        let started = Instant::now();
        while self.drain() {
            if started.elapsed() >= FINAL_DRAIN {
                self.ring_unread += self.discard_ring(UNREAD_COUNTED_MAX);
                warn!(
                    unread = self.ring_unread,
                    "records still arriving {} s after the stop were not read",
                    FINAL_DRAIN.as_secs()
                );
                break;
            }
            self.end_turn();
        }
    }

    /// Everything shed so far, per cause.
    fn shed(&self) -> Shed {
        let k = &self.kernel_stats;
        let (parquet_backlog, parquet_write) = self
            .out
            .parquet
            .as_ref()
            .map(|p| p.shed())
            .unwrap_or_default();
        Shed {
            ring_sign: k[stats::LOST_SIGN as usize],
            ring_data: k[stats::LOST_DATA as usize],
            ring_other: k[stats::LOST_OTHER as usize],
            ring_unread: self.ring_unread,
            kernel_skipped: self.kernel_skipped.iter().map(|(_, n)| n).sum(),
            coalescer: self.secrets.shed(),
            analyzer: self.out.counts.unanalysed,
            guard: self.guard_shed.load(Ordering::Relaxed),
            sink: self.out.sink.shed,
            parquet_backlog,
            parquet_write,
        }
    }

    /// Reads the kernel's counters, the ring-buffer losses among them, and
    /// (for the metrics endpoint, under the same lock) what the probes are
    /// attached to: while running at most every `RING_READ_EVERY`, and only
    /// if the probes lock is free (the control thread may hold it through
    /// an attach; the next turn reads them instead); at exit always.
    fn read_ring_lost(&mut self, at_exit: bool) {
        if !at_exit
            && self
                .ring_read_at
                .is_some_and(|t| t.elapsed() < RING_READ_EVERY)
        {
            return;
        }
        let probes = if at_exit {
            self.probes.lock().ok()
        } else {
            self.probes.try_lock().ok()
        };
        let Some(probes) = probes else { return };
        match probes.lost() {
            Ok(lost) => self.kernel_stats = lost,
            Err(e) => debug!(error = %e, "reading the probes' loss counters"),
        }
        self.kernel_skipped = probes.skipped_runs();
        let libraries = probes.libraries();
        let functions: u64 = libraries.iter().map(|l| l.functions.len() as u64).sum();
        self.attached = (libraries.len() as u64, functions);
        drop(probes);
        self.ring_read_at = Some(Instant::now());
    }

    /// Shedding becomes a warning event and a log line, never silence:
    /// within about a second of a loss, at most one a second, with the
    /// counts per cause (`shedding.rs`).
    fn report_shed(&mut self, at_exit: bool) {
        self.read_ring_lost(at_exit);
        let shed = self.shed();
        if let Some(text) = self.shed_report.due(shed, Instant::now(), at_exit) {
            self.out.warn(None, None, text);
        }
    }

    /// The final summary: what was written, and what was lost.
    fn say_stopped(&self, shed: &Shed, unwritten: usize) {
        let lost = self.probes().lost().unwrap_or_default();
        let c = &self.out.counts;
        let reads = self.secrets.key_read_stats();
        info!(
            events = self.out.sink.written(),
            key_uses = c.key_uses,
            warnings = c.warnings,
            secret_file_opens = c.secret_file_opens,
            findings = c.findings,
            unanalysed = c.unanalysed,
            lost_sign = lost[stats::LOST_SIGN as usize],
            lost_data = lost[stats::LOST_DATA as usize],
            lost_other = lost[stats::LOST_OTHER as usize],
            data_unreadable = lost[stats::DATA_UNREADABLE as usize],
            data_truncated = lost[stats::CAPTURE_TRUNCATED as usize],
            unwritten,
            shed = shed.total(),
            shed_ring_buffer = shed.ring(),
            shed_kernel_skipped = shed.kernel_skipped,
            kernel_skipped_by_program = %self
                .kernel_skipped
                .iter()
                .map(|(p, n)| format!("{p}={n}"))
                .collect::<Vec<_>>()
                .join(","),
            shed_coalescer = shed.coalescer,
            shed_analyzer_queue = shed.analyzer,
            shed_guard_queue = shed.guard,
            shed_sink_backlog = shed.sink,
            shed_parquet_backlog = shed.parquet_backlog,
            shed_parquet_write = shed.parquet_write,
            parquet_files = self.out.parquet.as_ref().map_or(0, |p| p.counts().files),
            parquet_rows = self.out.parquet.as_ref().map_or(0, |p| p.counts().rows),
            key_reads_shed = reads.shed,
            key_reads_abandoned = reads.abandoned,
            verifications = self.keys.ident.verifications,
            ecdsa_recoveries = self.keys.ident.recovery.recoveries,
            processes_searched = self.keys.searches,
            inventory_keys = self.keys.ident.record.len(),
            inventory_unused = self.keys.ident.record.unused_count(),
            inventory_keys_omitted = self.keys.ident.record.keys_omitted(),
            free_watched_processes = self.keys.free_watches.watched(),
            free_probes_host_wide = self.keys.free_watches.host_wide_libraries(),
            "stopped: probes detached; {}",
            if shed.total() == 0 {
                "nothing was shed".to_owned()
            } else {
                format!("EVENTS WERE SHED: {}", shed.causes())
            }
        );
    }

    /// SIGHUP: load the rules again. A set with errors is refused whole and
    /// the running one kept; events keep flowing either way.
    fn reload_rules(&mut self, cfg: &Config) {
        let refused = |out: &mut Emitter, e: anyhow::Error| {
            out.warn(
                None,
                None,
                format!("rules not reloaded, keeping the running set: {e:#}"),
            )
        };
        let rules = match setup::load_rules(&cfg.rules) {
            Ok(r) => r,
            Err(e) => return refused(&mut self.out, e),
        };
        if let Err(e) = crate::enforce::guard::plan(&rules) {
            return refused(&mut self.out, e);
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
        if block(&rules) != block(&self.decisions.enforcer.rules) {
            warn!("block rules changed: which directories are guarded changes only at restart");
        }
        if needs_approvals(&rules, cfg.remediation.mode)
            && let Err(e) = self
                .remediator
                .lock()
                .expect("remediator lock")
                .check_store()
        {
            return refused(&mut self.out, e);
        }
        let enforcer = match Enforcer::new(rules.clone()) {
            Ok(e) => e,
            Err(e) => return refused(&mut self.out, e),
        };
        self.decisions.replace(enforcer);
        startup::load_key_paths(&cfg.key_paths, &mut self.keys.ident, &mut self.decisions);
        startup::scan_key_locations(&cfg.key_locations, &mut self.keys.ident);
        self.decisions.warn_unprotectable();
        if let Some(p) = self.out.pipeline() {
            p.reload(rules.clone());
        }
        info!(rules = rules.rules.len(), "rules reloaded");
    }
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
