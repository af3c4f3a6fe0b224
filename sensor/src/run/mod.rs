//! `keywarden run`: discover, attach, then turn probe records into events.
//!
//! Two threads. The control thread (`control.rs`) acts at once on execs and
//! newly opened libraries. This, the event thread, drains the bulk ring on
//! a timer (`poll_interval_ms`; signature records never wake anyone) and
//! routes each record, in order, to the part that handles it (`route`).
//!
//! The parts, each owning its own state:
//! * `attribution`: who did it (process, container, cgroup) and when;
//! * `key_uses`: signatures and the free probes of signing processes;
//! * `secret_opens`: key files and watched secret files;
//! * `enforce::decisions`: protected key files, condemnations, kills;
//! * `emitter`: numbering, the analysis pipeline, findings, the sink.
//!
//! A handler borrows the parts it needs and nothing else.

pub mod attribution;
pub mod emitter;
pub mod key_uses;
mod route;
mod secret_opens;
mod startup;

use std::{
    os::fd::AsFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
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
use tracing::{error, info, warn};

use crate::{
    config::Config,
    control::{ANOTHER_SENSOR_HOLDS, Control, Warning},
    discovery::signing_code::ScanCache,
    enforce::{
        Enforcer,
        decisions::Decisions,
        guard::{Guard, GuardedOpen},
    },
    enrich::{kernel_layout, process::ProcessTable},
    liveness::{self, Liveness},
    probes::{Lease, Probes},
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
    lost_reported: [u64; stats::SLOTS as usize],
    /// Stamped as this thread makes progress: it releases the openers of
    /// protected key files, so the control thread renews the hold lease
    /// only while it moves (`liveness.rs`).
    liveness: Arc<Liveness>,
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

pub fn run(cfg: Config, shutdown: Arc<AtomicBool>, reload: Arc<AtomicBool>) -> Result<()> {
    crate::host::preflight()?;
    raise_open_file_limit();
    let rules = setup::load_rules(&cfg.rules)?;
    // Refuse block rules that cannot be enforced before anything attaches.
    crate::enforce::guard::plan(&rules)?;
    let watch = watch_list(&cfg, &rules)?;
    let geo = setup::open_geo(&cfg.analyzer)?;
    let baseline_path = PathBuf::from(&cfg.analyzer.baselines);
    let baselines = BaselineStore::load(&baseline_path)?;
    let pipeline = Pipeline::start(
        rules.clone(),
        setup::pipeline_config(&cfg.analyzer, geo.clone(), baselines, Overflow::Drop),
    );
    let enforcer = Enforcer::new(rules)?;
    let sink = NdjsonSink::open(&cfg.output)?;
    let (mut probes, rings) = Probes::load()?;
    // Before this sensor can hold anyone (its first heartbeat, below): a
    // child that releases whoever it holds once it exits, however it exits.
    // Ready before the lease is taken, so these probes never hold it.
    let (watchdog, watchdog_out) = Watchdog::start(probes.hold_token())?;
    probes.set_watch(&watch.kernel)?;
    probes.set_config(config::SENSOR_TGID, std::process::id() as u64)?;
    probes.register_sensor()?;
    let lease_at_start = probes.heartbeat()?;
    if lease_at_start == Lease::Other {
        warn!("{ANOTHER_SENSOR_HOLDS}");
    }
    probes.set_config(config::HOLD_NEW_LIBRARIES, cfg.hold_new_libraries as u64)?;
    let (warn_tx, warn_rx) = crossbeam_channel::bounded(1024);
    let (guard_tx, guard_rx) = crossbeam_channel::bounded(4096);
    let probes = Arc::new(Mutex::new(probes));
    let liveness = Arc::new(Liveness::new(watchdog_out));
    let procs = Arc::new(ProcessTable::default());
    let origin = setup::origin();
    let mut s = Sensor {
        probes: probes.clone(),
        events: rings.events,
        warnings: warn_rx,
        guarded: guard_rx,
        attr: Attributor::new(procs.clone()),
        keys: KeyUses::new(probes.clone()),
        secrets: SecretOpens::new(watch, Duration::from_millis(cfg.secret_files.coalesce_ms)),
        decisions: Decisions::new(enforcer, probes.clone()),
        out: Emitter::new(
            sink,
            origin.clone(),
            pipeline,
            geo,
            baseline_path,
            Box::new(respond::Live {
                probes: probes.clone(),
            }),
        ),
        lost_reported: [0; stats::SLOTS as usize],
        liveness: liveness.clone(),
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
    crate::enforce::report_mechanisms(&s.decisions.enforcer.rules);
    let guard_stop = Arc::new(AtomicBool::new(false));
    let guard = match Guard::new(
        &s.decisions.enforcer.rules,
        procs.clone(),
        origin,
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
    let cache = Arc::new(Mutex::new(ScanCache::default()));
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
    let mut failure = None;
    while !shutdown.load(Ordering::Relaxed) {
        // The first stamp puts this thread on duty (`liveness.rs`).
        s.liveness.event_progressed();
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
        s.keys.poll(&mut s.out);
        s.secrets.emit_due(false, &mut s.out);
        s.out.drain_pipeline();
        s.out.sink.flush();
        if reload.swap(false, Ordering::Relaxed) {
            s.reload_rules(&cfg);
        }
        if last_housekeeping.elapsed() >= Duration::from_secs(5) {
            s.report_lost();
            s.keys.ident.expire(Duration::from_secs(30));
            s.keys.sweep_free_watches();
            s.out.refresh_geo();
            last_housekeeping = Instant::now();
        }
        if last_save.elapsed() >= Duration::from_secs(60) {
            s.out.save_baselines();
            last_save = Instant::now();
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
    s.drain();
    // Signatures held for a key a search may still bring.
    s.keys.finish(&mut s.out);
    // Everyone held was released above; the watchdog sweeps what is left
    // (a hold whose record was still being written), then exits.
    watchdog.finish();
    s.secrets.emit_due(true, &mut s.out);
    s.out.finish_pipeline();
    s.report_lost();
    let waiting = s.out.sink.flush();
    s.say_stopped(waiting);
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
            hold_new_libraries,
            "ready: probes attached to {}{}",
            covered.join(", "),
            if uncovered.is_empty() {
                String::new()
            } else {
                format!(
                    "; NOT covered (crypto code without symbols): {}",
                    uncovered.join(", ")
                )
            }
        );
        self.out.sink.flush();
    }

    /// The final summary: what was written, and what was lost.
    fn say_stopped(&self, waiting: usize) {
        let lost = self.probes().lost().unwrap_or_default();
        let c = &self.out.counts;
        info!(
            events = self.out.sink.written,
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
            unwritten = waiting + self.out.sink.dropped as usize,
            verifications = self.keys.ident.verifications,
            ecdsa_recoveries = self.keys.ident.recovery.recoveries,
            processes_searched = self.keys.searches,
            free_watched_processes = self.keys.free_watches.watched(),
            free_probes_host_wide = self.keys.free_watches.host_wide_libraries(),
            "stopped: probes detached"
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
                self.out.warn(
                    None,
                    None,
                    format!("{new} {name} records were lost because the ring buffer was full ({total} in total)"),
                );
            }
        }
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
