//! The hold watchdog: holds never outlive the sensor.
//!
//! The probes stop (SIGSTOP) processes that only this sensor will resume.
//! A sensor that is SIGKILLed, or crashes, mid-hold would leave them
//! stopped (state `T`) until another sensor starts and sweeps the pinned
//! `HELD` map, and none may start. So `keywarden run` starts, before it can
//! hold anyone, a small child process, `keywarden __watchdog`, that waits
//! for the sensor to exit, however it exits, and then:
//!
//! 1. voids the host's hold lease (`HOLD_LEASE`) if it still names this
//!    sensor, so its probes, which the kernel detaches as it closes the dead
//!    sensor's descriptors, hold nobody new meanwhile;
//! 2. resumes every process in `HELD` that this sensor may have held,
//!    through a pidfd and only if it is still the stopped process that was
//!    held (`held::resume`), and removes its entry; then once more a moment
//!    later, for a probe that was already past its lease check;
//! 3. removes the dead sensor from `SENSORS`, where its pid would otherwise
//!    keep exempting whatever process is given that pid next.
//!
//! After a clean stop the sensor has released everyone itself; the
//! watchdog's sweep then finds nothing (or a hold whose record the last
//! drain could not read yet) and it exits.
//!
//! Which entries are this sensor's: `HELD` does not record the holder,
//! but only the sensor named by the lease holds, and the lease changes
//! hands only once its heartbeat is over 2 s old. So if the lease names
//! this sensor, or nobody, or a holder whose heartbeat is stale, every
//! entry is this sensor's or an orphan of a sensor that is gone or stuck,
//! and is released. If another live sensor holds the lease, entries under
//! 2 s old may be its own, still being attached to or judged: they are
//! left to it. (Those of this sensor among them are released by that
//! sensor's sweep of holds over 2 s old, so they too are bounded.)
//!
//! How the watchdog learns of the exit: a pipe, the lifeline, whose read
//! end is its stdin and whose only write end stays in the sensor
//! (close-on-exec, so no other child inherits it). The kernel closes it
//! when the sensor's process ends for any reason, and the read returns
//! end-of-file; if the sensor is already gone when the watchdog starts
//! reading, it returns end-of-file at once, so there is no race to check
//! for with `getppid`. `PR_SET_PDEATHSIG` was not used: it fires when the
//! *thread* that spawned the child ends, not the process, and would make
//! the watchdog act in a signal handler.
//!
//! Why a re-exec of the sensor's own binary (`/proc/self/exe`) and not a
//! bare `fork`: the sensor is multi-threaded, and a forked child of a
//! multi-threaded process may only make async-signal-safe calls (no
//! allocation, no locks), which the map access below is not.
//!
//! The sensor takes the hold lease only once the watchdog said it is ready,
//! so its own probes never stop the watchdog as it starts, and the control
//! thread stops renewing the lease if the watchdog exits (`liveness.rs`):
//! without it, a sensor holds nobody. What it cannot survive: a SIGKILL of
//! both at once (a supervisor's final kill of the whole cgroup), or the
//! death of a sensor that is PID 1 of its PID namespace (a container
//! without an init: the kernel then kills the whole namespace); then the
//! next sensor's sweep releases them, as before.

use std::{
    ffi::CStr,
    io::{Read, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use keywarden_probe_types::{HoldLease, config::HEARTBEAT_MAX_AGE_NS};
use tracing::{debug, info, level_filters::LevelFilter, warn};

use crate::probes::{PIN_DIR, removed};

/// The hidden subcommand that runs the watchdog (`main.rs`).
pub const COMMAND: &str = "__watchdog";

/// What the watchdog writes to its stdout once it is ready.
const READY: [u8; 1] = *b"R";

/// How long `keywarden run` waits for the watchdog to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often, while waiting, the sensor checks that the watchdog is not
/// stopped.
const READY_CHECK: Duration = Duration::from_millis(250);

/// Between the watchdog's two sweeps: a probe that read the lease just
/// before it was voided has long finished its hold by then.
const STRAGGLERS: Duration = Duration::from_millis(100);

/// The sensor's side: the watchdog process and the lifeline's write end.
pub struct Watchdog {
    child: Child,
    /// The only write end of the watchdog's stdin. Never written after the
    /// token; closed when this process ends, however it ends.
    lifeline: Option<std::io::PipeWriter>,
}

impl Watchdog {
    /// Starts the watchdog for the sensor whose hold token is `token` and
    /// waits until it is ready. Also returns the read end of the
    /// watchdog's stdout, which reports a hangup once it has exited
    /// (`Liveness`).
    pub fn start(token: u64) -> Result<(Watchdog, OwnedFd)> {
        if std::process::id() == 1 {
            warn!(
                "keywarden is PID 1 of its PID namespace: when it dies the kernel kills the hold watchdog with it, \
                 and processes it held stay stopped until another sensor starts; run it under an init \
                 (docker run --init, tini) or in the host's PID namespace"
            );
        }
        let (lifeline_read, mut lifeline) =
            std::io::pipe().context("creating the hold watchdog's lifeline")?;
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg0("keywarden")
            .arg("--log")
            // The sensor's verbosity, at most info: the watchdog's few
            // lines, without its libraries' debugging.
            .arg(LevelFilter::current().min(LevelFilter::INFO).to_string())
            .arg(COMMAND)
            .stdin(lifeline_read)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the hold watchdog (/proc/self/exe)")?;
        match handshake(&mut child, &mut lifeline, token) {
            Ok(out) => {
                info!(pid = child.id(), "hold watchdog started");
                Ok((
                    Watchdog {
                        child,
                        lifeline: Some(lifeline),
                    },
                    OwnedFd::from(out),
                ))
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(
                    "the hold watchdog, which releases held processes if the sensor dies, did not start",
                ))
            }
        }
    }

    /// At a clean stop, once the sensor has released everyone itself:
    /// closes the lifeline, so the watchdog sweeps what is left (normally
    /// nothing) and exits, and reaps it.
    pub fn finish(mut self) {
        drop(self.lifeline.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return,
                Ok(Some(status)) => {
                    warn!(%status, "the hold watchdog failed at its last sweep");
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    warn!("the hold watchdog is still sweeping; it finishes on its own");
                    return;
                }
                Err(e) => {
                    debug!(error = %e, "waiting for the hold watchdog");
                    return;
                }
            }
        }
    }
}

/// Gives the watchdog the token and waits until it is ready; returns the
/// read end of its stdout.
fn handshake(
    child: &mut Child,
    lifeline: &mut std::io::PipeWriter,
    token: u64,
) -> Result<ChildStdout> {
    lifeline
        .write_all(&token.to_ne_bytes())
        .context("giving the hold watchdog its token")?;
    let mut out = child.stdout.take().context("the hold watchdog's stdout")?;
    wait_ready(child.id(), &mut out)?;
    Ok(out)
}

/// Waits for the watchdog's ready byte. Another sensor holding the host's
/// lease may stop the watchdog at its exec (a path new in this cgroup)
/// until it has looked at the binary, and a stuck sensor would never let
/// it go: the watchdog is this sensor's own binary, with no signing code
/// for anyone to attach to first, so a stopped watchdog is resumed here.
/// (It is this process's unreaped child: its pid cannot name another.)
fn wait_ready(pid: u32, out: &mut ChildStdout) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("it was not ready within {} s", READY_TIMEOUT.as_secs());
        }
        let timeout = nix::poll::PollTimeout::try_from(left.min(READY_CHECK))
            .unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(
            out.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => {
                if crate::held::is_stopped(pid) {
                    debug!(pid, "resuming the hold watchdog, stopped as it started");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::SIGCONT,
                    );
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => break,
            Err(e) => return Err(e).context("waiting for the hold watchdog"),
        }
    }
    let mut byte = [0u8; 1];
    let n = out
        .read(&mut byte)
        .context("reading from the hold watchdog")?;
    if n != 1 || byte != READY {
        bail!("it exited as it started");
    }
    Ok(())
}

/// `keywarden __watchdog`: the watchdog itself. Its stdin is the lifeline:
/// the sensor's hold token (8 bytes), then nothing until end-of-file.
pub fn run() -> Result<()> {
    // Signals meant for the sensor's whole process group or cgroup (Ctrl-C
    // in a terminal, a supervisor's SIGTERM) must not end the watchdog
    // before the sensor: its work starts when the sensor has exited.
    // SIGKILL still ends it.
    let mut stop = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGQUIT,
    ] {
        stop.add(s);
    }
    if let Err(e) = stop.thread_block() {
        warn!(error = %e, "the hold watchdog cannot block stop signals");
    }
    let name: &CStr = c"keywarden-wd";
    let _ = nix::sys::prctl::set_name(name);
    let sensor = nix::unistd::getppid().as_raw() as u32;
    // Read now, while the pid is surely the sensor's.
    let sensor_started = crate::free_watch::start_time(sensor);
    let mut lifeline = std::io::stdin().lock();
    let mut token = [0u8; 8];
    // Short: the sensor died before it said its token.
    let token = lifeline
        .read_exact(&mut token)
        .ok()
        .map(|()| u64::from_ne_bytes(token));
    if token.is_some() {
        let mut out = std::io::stdout().lock();
        // Nobody to tell if the sensor is gone already: the sweep below
        // is what matters.
        let _ = out.write_all(&READY).and_then(|()| out.flush());
    }
    let mut buf = [0u8; 64];
    loop {
        match lifeline.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Without its lifeline the watchdog cannot tell when to act;
            // it exits, and the sensor, seeing it gone, stops holding.
            Err(e) => return Err(e).context("reading the hold watchdog's lifeline"),
        }
    }
    let mut resumed = sweep(token).context("releasing held processes")?;
    std::thread::sleep(STRAGGLERS);
    resumed += sweep(token).context("releasing held processes")?;
    // With a token the sensor was alive after this process started, so
    // the parent read above was the sensor.
    if let (Some(_), Some(started)) = (token, sensor_started) {
        forget_sensor(sensor, started);
    }
    if resumed > 0 {
        warn!(
            sensor,
            resumed, "hold watchdog: the sensor exited holding processes; they were released"
        );
    } else {
        debug!(sensor, "hold watchdog: the sensor exited holding nobody");
    }
    Ok(())
}

/// A map pinned by the probes.
fn pinned(name: &str) -> Result<Map> {
    let path = Path::new(PIN_DIR).join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("the pinned map {}", path.display()))
}

/// One pass over `HELD` (see the module comment); returns how many
/// processes it resumed.
fn sweep(token: Option<u64>) -> Result<usize> {
    let mut lease: Array<MapData, HoldLease> = Array::try_from(pinned("HOLD_LEASE")?)?;
    let current = lease.get(&0, 0)?;
    if token.is_some_and(|t| t != 0 && current.token == t) {
        // Both fields zero: a probe reading the update half-done sees a
        // zero token or heartbeat, which voids the lease either way.
        lease.set(0, &HoldLease::default(), 0)?;
    }
    let after = lease.get(&0, 0)?;
    let mut held: BpfHashMap<MapData, u32, u64> = BpfHashMap::try_from(pinned("HELD")?)?;
    let entries: Vec<(u32, u64)> = held.iter().filter_map(Result::ok).collect();
    let now = crate::clock::monotonic_ns();
    let mut resumed = 0;
    for (tgid, since) in entries {
        if !releasable(&after, token, now, since) {
            continue;
        }
        match crate::held::resume(tgid, since) {
            Ok(true) => {
                resumed += 1;
                info!(
                    pid = tgid,
                    "hold watchdog: released a process the sensor held when it exited"
                );
            }
            // Not stopped yet: its SIGSTOP may still be pending. The entry
            // stays for the next sweep, unless the process is gone.
            Ok(false) if crate::held::is_alive(tgid) && !crate::held::is_stopped(tgid) => {
                continue;
            }
            Ok(false) => {}
            Err(e) => warn!(pid = tgid, error = %e, "hold watchdog: SIGCONT"),
        }
        if let Err(e) = removed(held.remove(&tgid)) {
            debug!(pid = tgid, error = %e, "hold watchdog: removing a HELD entry");
        }
    }
    Ok(resumed)
}

/// Whether the dead sensor's watchdog releases a `HELD` entry made at
/// `since`, given the lease as it is once the dead sensor's was voided:
/// all of them, unless another sensor holds a live lease, whose holds
/// under 2 s old are its own to release.
fn releasable(lease: &HoldLease, token: Option<u64>, now: u64, since: u64) -> bool {
    let another_holds = lease.token != 0
        && Some(lease.token) != token
        && lease.heartbeat_ns != 0
        && now.saturating_sub(lease.heartbeat_ns) < HEARTBEAT_MAX_AGE_NS;
    !another_holds || now.saturating_sub(since) >= HEARTBEAT_MAX_AGE_NS
}

/// Removes the dead sensor from `SENSORS`, if the entry is still its own.
fn forget_sensor(sensor: u32, started: u64) {
    let r = pinned("SENSORS").and_then(|map| {
        let mut sensors: BpfHashMap<MapData, u32, u64> = BpfHashMap::try_from(map)?;
        if sensors.get(&sensor, 0).ok() == Some(started) {
            removed(sensors.remove(&sensor))?;
        }
        Ok(())
    });
    if let Err(e) = r {
        debug!(sensor, error = %e, "hold watchdog: removing the sensor from SENSORS (the next sensor prunes it)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const OURS: u64 = 7;

    fn lease(token: u64, heartbeat_ns: u64) -> HoldLease {
        HoldLease {
            token,
            heartbeat_ns,
        }
    }

    #[test]
    fn with_nobody_holding_every_entry_is_released() {
        let now = 100 * S;
        for l in [lease(0, 0), HoldLease::default(), lease(OURS, now - S)] {
            assert!(releasable(&l, Some(OURS), now, now - S / 10), "{l:?}");
        }
        assert!(releasable(&lease(0, 0), None, now, now));
    }

    #[test]
    fn a_stale_holder_does_not_keep_its_entries() {
        let now = 100 * S;
        let stale = lease(99, now - 3 * S);
        assert!(releasable(&stale, Some(OURS), now, now - S / 10));
    }

    #[test]
    fn a_live_holder_keeps_its_young_entries() {
        let now = 100 * S;
        let live = lease(99, now - S / 2);
        assert!(!releasable(&live, Some(OURS), now, now - S / 10));
        assert!(!releasable(&live, None, now, now - S / 10));
        assert!(
            releasable(&live, Some(OURS), now, now - 3 * S),
            "older than any live hold: an orphan"
        );
    }
}
