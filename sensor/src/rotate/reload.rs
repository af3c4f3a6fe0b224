//! Telling a service to load its key and certificate again.
//!
//! nginx and apache first test their configuration (`-t`, run with the
//! master's own configuration flags and environment): that loads every
//! certificate and key and fails when one does not load or match. Only
//! then is the master signalled (nginx SIGHUP, apache SIGUSR1 graceful),
//! directly by pid, so the right instance reloads even when several run
//! with different pid files. A refused test is a refused reload: nothing
//! is signalled and the caller rolls back. The reload itself is
//! asynchronous; verification (`verify`) waits for it. Any other service
//! is reloaded by a configured command, or by `systemctl reload` of the
//! system unit it runs in (when that unit has an `ExecReload`).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use super::plan::{self, Reload, Service};

/// How long a configuration test or reload command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{what} refused: {detail}")]
    Refused { what: String, detail: String },
    #[error("{0}")]
    Failed(String),
}

fn run(mut cmd: Command, what: &str) -> Result<(), ReloadError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ReloadError::Failed(format!("{what}: cannot start: {e}")))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| ReloadError::Failed(format!("{what}: {e}")))?
        {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ReloadError::Failed(format!(
                "{what}: still running after {COMMAND_TIMEOUT:?}; killed"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child
        .wait_with_output()
        .map_err(|e| ReloadError::Failed(format!("{what}: {e}")))?;
    if status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    // The last lines say why; keep the report short.
    let tail: Vec<&str> = text.lines().rev().take(4).collect();
    Err(ReloadError::Refused {
        what: what.to_owned(),
        detail: format!(
            "{status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ),
    })
}

/// Signals `pid` if it still runs `exe` (a pid reused by another program
/// is left alone).
fn signal(sv: &Service, sig: Signal) -> Result<(), ReloadError> {
    let fd = crate::pidfd::open(sv.master)
        .map_err(|e| ReloadError::Failed(format!("master pid {}: {e}", sv.master)))?
        .ok_or_else(|| ReloadError::Failed(format!("master pid {} is gone", sv.master)))?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", sv.master)).ok();
    if exe.as_deref() != Some(sv.exe.as_path()) {
        return Err(ReloadError::Failed(format!(
            "pid {} no longer runs {}",
            sv.master,
            sv.exe.display()
        )));
    }
    // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            sig as i32,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(ReloadError::Failed(format!(
            "{sig} to pid {}: {}",
            sv.master,
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The configuration test alone: does the service accept the files as
/// they are now?
pub fn test(sv: &Service) -> Result<(), ReloadError> {
    let (exe, args) = match &sv.reload {
        Reload::Nginx { exe, args } | Reload::Apache { exe, args } => (exe, args),
        Reload::Command { .. } | Reload::Systemd { .. } => return Ok(()),
    };
    let mut cmd = Command::new(exe);
    cmd.arg("-t").args(args);
    cmd.env_clear().envs(plan::environment(sv.master));
    run(cmd, &format!("{} -t", exe.display()))
}

/// Tests the configuration, then reloads.
pub fn reload(sv: &Service) -> Result<(), ReloadError> {
    test(sv)?;
    match &sv.reload {
        Reload::Nginx { .. } => signal(sv, Signal::SIGHUP),
        Reload::Apache { .. } => signal(sv, Signal::SIGUSR1),
        Reload::Command { command } => {
            let mut cmd = Command::new(&command[0]);
            cmd.args(&command[1..]);
            run(cmd, &command.join(" "))
        }
        // Waits for the unit's ExecReload to finish; a failed reload
        // fails the command.
        Reload::Systemd { unit } => {
            let mut cmd = Command::new("systemctl");
            cmd.args(["reload", "--"]).arg(unit);
            run(cmd, &format!("systemctl reload {unit}"))
        }
    }
}
