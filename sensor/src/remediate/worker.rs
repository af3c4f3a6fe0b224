//! The remediation thread (`keywarden-remedy`): carries out one job at a
//! time, each step as a child `keywarden rotate` or `keywarden revoke`.
//!
//! A child, not a call: a rotation takes seconds to minutes (an ACME
//! order, a reload, the drain period), prints its plan and every step,
//! and keeps its journal and host lock exactly as when an operator runs
//! it. The sensor's event thread never waits for it, a crash in it cannot
//! take the sensor down, and its exit status is the documented one
//! (`rotate::Outcome`).

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use keywarden_analyzer::event::{REMEDIATION_LOG_LINES, RemediationStatus};
use tracing::{info, warn};

use super::{Job, Step, StepKind};

/// What one step came to.
#[derive(Debug, Clone)]
pub struct Finished {
    pub job: Job,
    pub step: Step,
    pub status: RemediationStatus,
    pub detail: String,
    pub new_spki: Option<String>,
    pub log: Vec<String>,
    /// The child that carried it out (0: none ran).
    pub pid: u32,
    pub command: String,
}

/// How to start the children.
#[derive(Debug, Clone)]
pub struct Runner {
    pub exe: PathBuf,
    /// `--config`, when the sensor was started with one.
    pub config: Option<PathBuf>,
    pub inventory: String,
    pub timeout: Duration,
}

/// Longest line kept from a child's output.
const LINE_MAX: usize = 512;

impl Runner {
    /// Runs jobs until the sending side closes; reports each step.
    pub fn run(&self, jobs: &Receiver<Job>, done: &Sender<Finished>) {
        for job in jobs {
            let mut rotated = false;
            for step in job.steps.clone() {
                let f = self.step(&job, &step, rotated);
                rotated |= step.kind == StepKind::Rotate && f.status == RemediationStatus::Done;
                let failed = f.status == RemediationStatus::Failed;
                if done.send(f).is_err() {
                    return;
                }
                // A revoke after a rotation that failed would be refused
                // (the key still serves); it is reported as not tried.
                if failed && step.kind == StepKind::Rotate {
                    for rest in job.steps.iter().filter(|s| s.kind != StepKind::Rotate) {
                        let _ = done.send(Finished {
                            job: job.clone(),
                            step: rest.clone(),
                            status: RemediationStatus::Failed,
                            detail: "not tried: the rotation before it failed".into(),
                            new_spki: None,
                            log: Vec::new(),
                            pid: 0,
                            command: String::new(),
                        });
                    }
                    break;
                }
            }
        }
    }

    fn step(&self, job: &Job, step: &Step, after_rotation: bool) -> Finished {
        let dry = job.mode == keywarden_analyzer::remediation::Mode::DryRun;
        let mut cmd = Command::new(&self.exe);
        let mut args: Vec<String> = match step.kind {
            StepKind::Rotate => vec!["rotate".into(), "--key".into(), job.spki.clone()],
            StepKind::Revoke => vec![
                "revoke".into(),
                "--key".into(),
                job.spki.clone(),
                "--reason".into(),
                step.reason.clone().unwrap_or_default(),
            ],
        };
        if dry && step.kind == StepKind::Revoke {
            return Finished {
                job: job.clone(),
                step: step.clone(),
                status: RemediationStatus::Planned,
                detail: format!(
                    "dry run: would revoke every certificate of the key with reason {}{}",
                    step.reason.as_deref().unwrap_or("?"),
                    if job.steps.iter().any(|s| s.kind == StepKind::Rotate) {
                        ", once the rotation replaced it"
                    } else {
                        ""
                    }
                ),
                new_spki: None,
                log: Vec::new(),
                pid: 0,
                command: String::new(),
            };
        }
        if dry {
            args.push("--dry-run".into());
        }
        args.push("--inventory".into());
        args.push(self.inventory.clone());
        if let Some(c) = &self.config {
            args.push("--config".into());
            args.push(c.display().to_string());
        }
        cmd.args(&args).stdin(Stdio::null());
        let command = format!("{} {}", self.exe.display(), args.join(" "));
        let mut finished = Finished {
            job: job.clone(),
            step: step.clone(),
            status: RemediationStatus::Failed,
            detail: String::new(),
            new_spki: None,
            log: Vec::new(),
            pid: 0,
            command,
        };
        let (reader, writer) = match std::io::pipe() {
            Ok(p) => p,
            Err(e) => {
                finished.detail = format!("cannot start: pipe: {e}");
                return finished;
            }
        };
        let out = match writer.try_clone() {
            Ok(w) => w,
            Err(e) => {
                finished.detail = format!("cannot start: pipe: {e}");
                return finished;
            }
        };
        cmd.stdout(out).stderr(writer);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                finished.detail = format!("cannot start {}: {e}", self.exe.display());
                return finished;
            }
        };
        // The command holds the pipe's write ends: dropped with it, so the
        // reader sees the end once the child (and anything it started that
        // kept them) exits.
        drop(cmd);
        finished.pid = child.id();
        info!(id = %job.id, key = %job.spki, step = step.kind.name(), pid = finished.pid, "remediation started");
        let lines = std::thread::spawn(move || tail(reader, "issued: new key "));
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if started.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => {
                    warn!(error = %e, "waiting for the remediation");
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let (log, issued) = lines.join().unwrap_or_default();
        finished.log = log;
        finished.new_spki = issued
            .as_deref()
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned);
        let last = finished.log.last().cloned().unwrap_or_default();
        (finished.status, finished.detail) = match status.and_then(|s| s.code()) {
            None => (
                RemediationStatus::Failed,
                format!(
                    "stopped after {} s (remediation.timeout_seconds) or by a signal",
                    self.timeout.as_secs()
                ),
            ),
            Some(0) if dry => (
                RemediationStatus::Planned,
                if last.starts_with("dry run") {
                    last
                } else {
                    format!("dry run: {last}")
                },
            ),
            Some(0) => (
                RemediationStatus::Done,
                match step.kind {
                    StepKind::Rotate => "rotated and verified live".into(),
                    StepKind::Revoke if after_rotation => {
                        "revoked after the rotation, and verified at the CA".into()
                    }
                    StepKind::Revoke => "revoked, and verified at the CA".into(),
                },
            ),
            Some(2) => (
                RemediationStatus::Failed,
                format!("rolled back, the old key serves again: {last}"),
            ),
            Some(3) => (
                RemediationStatus::Failed,
                format!("rolled back, and the rollback failed: {last}"),
            ),
            Some(c) => (
                RemediationStatus::Failed,
                format!("exit status {c}: {last}"),
            ),
        };
        info!(id = %job.id, step = step.kind.name(), status = ?finished.status, detail = %finished.detail, "remediation ended");
        finished
    }
}

/// The last `REMEDIATION_LOG_LINES` lines of `r`, each cut to `LINE_MAX`
/// bytes (on a character boundary), and what follows `marker` on the
/// first line that starts with it, wherever it was (the new key's line
/// comes before a long list of checks). The child prints no key
/// material: SPKI hashes, paths and steps only.
fn tail(r: impl std::io::Read, marker: &str) -> (Vec<String>, Option<String>) {
    let mut found = None;
    let mut kept = VecDeque::with_capacity(REMEDIATION_LOG_LINES);
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded per line: a child that prints without newlines cannot
        // make the sensor buffer it all.
        match r.by_ref().take(64 * 1024).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let mut line = line.trim_end().to_owned();
        if found.is_none() {
            found = line.strip_prefix(marker).map(str::to_owned);
        }
        if line.len() > LINE_MAX {
            let mut end = LINE_MAX;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        if kept.len() == REMEDIATION_LOG_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }
    (kept.into(), found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_last_lines_each_bounded() {
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str(&"é".repeat(1000));
        let text = format!("issued: new key abc (ecdsa-p256)\n{text}");
        let (kept, issued) = tail(text.as_bytes(), "issued: new key ");
        assert_eq!(
            issued.as_deref(),
            Some("abc (ecdsa-p256)"),
            "found past the tail"
        );
        assert_eq!(kept.len(), REMEDIATION_LOG_LINES);
        assert_eq!(kept[0], format!("line {}", 101 - REMEDIATION_LOG_LINES));
        let last = kept.last().unwrap();
        assert!(last.len() <= LINE_MAX && last.starts_with('é'), "{last}");
    }
}
