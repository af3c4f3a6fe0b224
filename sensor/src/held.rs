//! Resuming a process the probes held, when the sensor that held it can no
//! longer be trusted to: a dead sensor's leftovers in the pinned `HELD` map,
//! released by the next sensor's control thread (`control.rs`) or by the
//! dead sensor's own watchdog (`watchdog.rs`).
//!
//! Such an entry may be seconds old, and a pid is only a number: the held
//! process may have been killed and reaped since, and its pid given to
//! another process, perhaps one stopped on purpose (a shell job, a
//! debugger's inferior). So the signal goes through a pidfd, which names one
//! process for good, and only after `/proc` said that process is stopped and
//! started before the hold. The sensor's prompt releases, milliseconds after
//! the hold, and its kills go through a pidfd too (`signal`), checked
//! against the time of the record they answer.

use std::os::fd::AsFd;

/// Sends SIGCONT to the process the probes held at `held_at_ns`
/// (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) as `tgid`, if it is still that
/// process and still stopped. `Ok(false)`: gone, not stopped, or the pid
/// now names a process that started after the hold.
pub fn resume(tgid: u32, held_at_ns: u64) -> std::io::Result<bool> {
    let Some(pidfd) = crate::pidfd::open(tgid)? else {
        return Ok(false);
    };
    // From here on the pidfd pins the process: while it lives, /proc/PID
    // is that process, and if it dies (and the pid is reused) the signal
    // below reaches nobody rather than the newcomer.
    let Some((state, start_ticks)) = stat(tgid) else {
        return Ok(false);
    };
    if state != 'T' || !started_before(start_ticks, held_at_ns) {
        return Ok(false);
    }
    crate::pidfd::send_signal(pidfd.as_fd(), libc::SIGCONT)
}

/// Sends `signal` to the process a record was about: `tgid` as it was at
/// `at_ns` (CLOCK_MONOTONIC), through a pidfd, and only if the process
/// holding that pid now started no later than that. `Ok(false)`: gone, or
/// the pid names a process started since (it was reused), which is never
/// signalled. The sensor's releases and kills all go through here.
pub fn signal(tgid: u32, at_ns: u64, signal: libc::c_int) -> std::io::Result<bool> {
    let Some(pidfd) = crate::pidfd::open(tgid)? else {
        return Ok(false);
    };
    // The pidfd pins the process: /proc/PID is it while it lives.
    let Some((_, start_ticks)) = stat(tgid) else {
        return Ok(false);
    };
    if !started_before(start_ticks, at_ns) {
        return Ok(false);
    }
    crate::pidfd::send_signal(pidfd.as_fd(), signal)
}

/// Whether a process with this pid exists right now.
pub fn is_alive(tgid: u32) -> bool {
    stat(tgid).is_some()
}

/// Whether a process is stopped (state `T`) right now.
pub fn is_stopped(tgid: u32) -> bool {
    stat(tgid).is_some_and(|(state, _)| state == 'T')
}

/// State letter (field 3) and start time in clock ticks since boot
/// (field 22) of `/proc/PID/stat`.
fn stat(tgid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Did a process that started `start_ticks` after boot (CLOCK_BOOTTIME,
/// as `/proc` counts) start no later than a hold at `held_at_ns`
/// (CLOCK_MONOTONIC, as the probes count)? The two clocks differ by the
/// time the host spent suspended, which only grows; adding today's
/// difference to the hold time can only make the test more lenient, never
/// fail the process that was really held. Start ticks are rounded down.
fn started_before(start_ticks: u64, held_at_ns: u64) -> bool {
    let hz = clock_ticks_per_second();
    let start_ns = (start_ticks as u128 * 1_000_000_000 / hz as u128) as u64;
    let suspended = crate::clock::boottime_ns().saturating_sub(crate::clock::monotonic_ns());
    start_ns <= held_at_ns.saturating_add(suspended)
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/PID/stat` times (100 on
/// every Linux architecture in practice).
fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the C library; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as u64 } else { 100 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_started_after_the_hold_is_not_the_held_one() {
        let me = std::process::id();
        let (state, start) = stat(me).expect("our own stat");
        assert_ne!(state, 'T');
        let now = crate::clock::monotonic_ns();
        assert!(started_before(start, now), "we started before now");
        let an_hour_ago = now.saturating_sub(3_600_000_000_000);
        assert!(
            !started_before(start, an_hour_ago),
            "a hold an hour ago cannot be of a process started since"
        );
    }

    /// A signal for a record older than the process holding the pid now
    /// (the pid was reused) reaches nobody; one for a later record kills.
    #[test]
    fn a_signal_reaches_only_a_process_as_old_as_its_record() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let an_hour_ago = crate::clock::monotonic_ns().saturating_sub(3_600_000_000_000);
        assert!(!signal(pid, an_hour_ago, libc::SIGKILL).unwrap());
        assert!(child.try_wait().unwrap().is_none(), "still running");
        assert!(signal(pid, crate::clock::monotonic_ns(), libc::SIGKILL).unwrap());
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(!signal(u32::MAX >> 1, crate::clock::monotonic_ns(), libc::SIGKILL).unwrap());
    }

    #[test]
    fn a_running_or_missing_process_is_not_resumed() {
        let now = crate::clock::monotonic_ns();
        assert!(!resume(std::process::id(), now).unwrap(), "not stopped");
        assert!(!resume(u32::MAX >> 1, now).unwrap(), "no such process");
    }

    #[test]
    fn a_stopped_process_is_resumed_only_if_it_started_before_the_hold() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let p = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(p, nix::sys::signal::SIGSTOP).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while stat(pid).map(|(s, _)| s) != Some('T') {
            assert!(std::time::Instant::now() < deadline, "sleep never stopped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let an_hour_ago = crate::clock::monotonic_ns().saturating_sub(3_600_000_000_000);
        assert!(
            !resume(pid, an_hour_ago).unwrap(),
            "a hold before the process started is some other process's"
        );
        assert_eq!(stat(pid).map(|(s, _)| s), Some('T'));
        assert!(resume(pid, crate::clock::monotonic_ns()).unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while stat(pid).map(|(s, _)| s) == Some('T') {
            assert!(std::time::Instant::now() < deadline, "sleep never resumed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
