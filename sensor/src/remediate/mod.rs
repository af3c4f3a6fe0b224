//! The kill switch in rules: a finding whose rule says `rotate` or
//! `revoke` takes the key out of service by itself, within guard rails
//! (docs/rotation.md, "From a rule").
//!
//! The event thread asks (`Remediator::request`, through the response
//! stage); the guard (`guard`) admits at most one action per key in
//! flight, a cooldown per key and a rate limit per host; the mode (the
//! more cautious of the rule's `remediation` and the configuration's)
//! decides what follows:
//! - `dry_run`: the worker runs `keywarden rotate --dry-run` (the plan,
//!   nothing changed);
//! - `approve`: a record for `keywarden actions approve ID` (`approvals`);
//!   once approved, the sensor carries it out;
//! - `enforce`: the worker (`worker`) runs `keywarden rotate` and then,
//!   if the rule also says so, `keywarden revoke`.
//!
//! Each of these is a Remediation Activity event linked to the finding
//! (`metadata.correlation_uid`); the finding's own response says
//! `queued` with the action's id, or why it was refused.

pub mod approvals;
pub mod guard;
pub mod worker;

use std::{
    collections::HashMap,
    path::PathBuf,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use keywarden_analyzer::{
    event::{Event, KeyStatus, Origin, Outcome, Process, Remediation, RemediationStatus, User},
    remediation::Mode,
    rules::{Action, Rule},
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::RemediationConfig;
use approvals::{Record, State, Store};
use guard::Guard;
use worker::{Finished, Runner};

/// What one step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Rotate,
    Revoke,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Rotate => "rotate",
            StepKind::Revoke => "revoke",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub kind: StepKind,
    /// `revoke`: the RFC 5280 reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One admitted action: its steps, run in order.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub spki: String,
    pub rule: String,
    pub finding_uid: String,
    pub steps: Vec<Step>,
    pub mode: Mode,
    /// Carried out for an approved record, which gets its outcome.
    pub approved: bool,
}

/// Jobs waiting for the worker, at most (the rate limit keeps it far
/// below).
const QUEUE: usize = 64;
/// How often the approvals directory is looked at.
const APPROVALS_EVERY: Duration = Duration::from_secs(1);

/// A Remediation Activity to write, without the run's numbering.
pub struct Report {
    id: String,
    finding_uid: String,
    status: RemediationStatus,
    detail: String,
    who: Process,
    what: Remediation,
}

impl Report {
    pub fn event(self, origin: &Origin, time_ms: i64, seq: u64) -> Event {
        Event::remediation(
            origin,
            time_ms,
            seq,
            &self.id,
            &self.finding_uid,
            self.status,
            self.detail,
            self.who,
            self.what,
        )
    }
}

pub struct Remediator {
    ceiling: Mode,
    guard: Guard,
    jobs: Option<Sender<Job>>,
    done: Receiver<Finished>,
    _worker: JoinHandle<()>,
    approvals_dir: PathBuf,
    store: Option<Store>,
    /// Records awaiting approval, by id: their key stays in flight until
    /// they end.
    awaiting: HashMap<String, String>,
    last_look: Option<Instant>,
    /// Whether the approvals directory was looked at once (records of an
    /// earlier run taken up).
    looked: bool,
    seq: u64,
    /// Reports made on the event thread (records awaiting approval),
    /// written at the next `poll`.
    outbox: Vec<Report>,
    /// The finding whose rotate-and-revoke rule was answered last, and
    /// the answer, for the second of its two actions.
    last_combined: Option<(String, (Outcome, Option<String>))>,
}

impl Remediator {
    /// Starts the worker. `config` is the file the sensor was started
    /// with; the children read the same one.
    pub fn start(
        cfg: &RemediationConfig,
        config: Option<PathBuf>,
        inventory: &str,
    ) -> anyhow::Result<Self> {
        let runner = Runner {
            exe: std::env::current_exe()?,
            config,
            inventory: inventory.to_owned(),
            timeout: Duration::from_secs(cfg.timeout_seconds),
        };
        let (jobs, jobs_rx) = crossbeam_channel::bounded(QUEUE);
        let (done_tx, done) = crossbeam_channel::unbounded();
        let worker = std::thread::Builder::new()
            .name("keywarden-remedy".into())
            .spawn(move || runner.run(&jobs_rx, &done_tx))?;
        let mut r = Remediator {
            ceiling: cfg.mode,
            guard: Guard::new(Duration::from_secs(cfg.cooldown_seconds), cfg.max_per_hour),
            jobs: Some(jobs),
            done,
            _worker: worker,
            approvals_dir: PathBuf::from(&cfg.approvals_dir),
            store: None,
            awaiting: HashMap::new(),
            last_look: None,
            looked: false,
            seq: 0,
            outbox: Vec::new(),
            last_combined: None,
        };
        r.restore_admissions();
        // Records an earlier run left are taken up before any finding
        // of this run can add a second one for the same key.
        r.look_at_approvals();
        Ok(r)
    }

    /// Opens the approvals store now: a sensor whose rules may need it
    /// refuses to start when the directory is unsafe.
    pub fn check_store(&mut self) -> anyhow::Result<()> {
        self.store()?;
        Ok(())
    }

    fn store(&mut self) -> anyhow::Result<&Store> {
        if self.store.is_none() {
            self.store = Some(Store::open(&self.approvals_dir)?);
        }
        Ok(self.store.as_ref().expect("just opened"))
    }

    /// Takes back the guard rails' admissions an earlier run saved. With
    /// no store yet (nothing was ever admitted here), there are none.
    fn restore_admissions(&mut self) {
        if !self.approvals_dir.exists() {
            return;
        }
        match self.store().and_then(|s| s.load_admissions()) {
            Ok(saved) => {
                let (now, now_ms) = (Instant::now(), crate::clock::now_ms());
                // A time ahead of the clock (it was set back) counts as now.
                let at = |ms: i64| {
                    now.checked_sub(Duration::from_millis(
                        now_ms.saturating_sub(ms).max(0) as u64
                    ))
                    .unwrap_or(now)
                };
                self.guard
                    .restore(saved.into_iter().map(|(k, ms)| (k, at(ms))), now);
            }
            Err(e) => warn!("remediation guard rails: {e:#}; starting with none saved"),
        }
    }

    /// Saves the guard rails' admissions after one more. A failure is
    /// warned about: the rails still hold while this sensor runs.
    fn save_admissions(&mut self) {
        let (now, now_ms) = (Instant::now(), crate::clock::now_ms());
        let list: Vec<(String, i64)> = self
            .guard
            .admissions(now)
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    now_ms - now.saturating_duration_since(t).as_millis() as i64,
                )
            })
            .collect();
        if let Err(e) = self.store().and_then(|s| s.save_admissions(&list)) {
            warn!("remediation guard rails: {e:#}; a restart would forget them");
        }
    }

    fn new_id(&mut self) -> String {
        self.seq += 1;
        format!("{}-{}", crate::clock::now_ms(), self.seq)
    }

    /// The response to one `rotate` or `revoke` of `rule`, fired by
    /// `event` in the finding `finding_uid`.
    pub fn request(
        &mut self,
        rule: &Rule,
        event: &Event,
        finding_uid: &str,
    ) -> (Outcome, Option<String>) {
        // A rule with both actions starts one action of two steps: the
        // first of the two to be answered admits it, the other gets the
        // same answer (rules list actions in any order).
        let combined =
            rule.actions.contains(&Action::Rotate) && rule.actions.contains(&Action::Revoke);
        if combined
            && let Some((uid, answer)) = &self.last_combined
            && uid == finding_uid
        {
            let (outcome, detail) = answer.clone();
            return (
                outcome,
                detail.map(|d| format!("{d} (one action, rotate then revoke)")),
            );
        }
        let answer = self.admit(rule, event, finding_uid);
        if combined {
            self.last_combined = Some((finding_uid.to_owned(), answer.clone()));
        }
        answer
    }

    /// Admits the action of `rule` on the key `event` names and starts it
    /// (or records it, or plans it), or says why not.
    fn admit(
        &mut self,
        rule: &Rule,
        event: &Event,
        finding_uid: &str,
    ) -> (Outcome, Option<String>) {
        let Some(spki) = event
            .unmapped
            .key
            .as_ref()
            .filter(|k| k.status == KeyStatus::Identified)
            .and_then(|k| k.spki_sha256.clone())
        else {
            return (
                Outcome::Skipped,
                Some("the event names no identified key".into()),
            );
        };
        let mut steps = Vec::new();
        if rule.actions.contains(&Action::Rotate) {
            steps.push(Step {
                kind: StepKind::Rotate,
                reason: None,
            });
        }
        if rule.actions.contains(&Action::Revoke) {
            steps.push(Step {
                kind: StepKind::Revoke,
                reason: Some(rule.revoke_reason.to_owned()),
            });
        }
        let mode = rule.remediation.within(self.ceiling);
        if let Err(refused) = self.guard.admit(&spki, Instant::now()) {
            return (Outcome::Skipped, Some(format!("not started: {refused}")));
        }
        self.save_admissions();
        let job = Job {
            id: self.new_id(),
            spki,
            rule: rule.id.clone(),
            finding_uid: finding_uid.to_owned(),
            steps,
            mode,
            approved: false,
        };
        match mode {
            Mode::Approve => self.record_for_approval(job),
            Mode::DryRun | Mode::Enforce => self.send(job),
        }
    }

    fn send(&mut self, job: Job) -> (Outcome, Option<String>) {
        let id = job.id.clone();
        let spki = job.spki.clone();
        let dry = job.mode == Mode::DryRun;
        let Some(jobs) = &self.jobs else {
            self.guard.finished(&spki);
            return (Outcome::Failed, Some("the sensor is stopping".into()));
        };
        match jobs.try_send(job) {
            Ok(()) => (
                Outcome::Queued,
                Some(if dry {
                    format!("action {id}: dry run, the plan only")
                } else {
                    format!("action {id}: started")
                }),
            ),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.guard.finished(&spki);
                (
                    Outcome::Failed,
                    Some(format!("action {id}: the remediation queue is full")),
                )
            }
        }
    }

    fn record_for_approval(&mut self, job: Job) -> (Outcome, Option<String>) {
        let record = Record {
            id: job.id.clone(),
            created_ms: crate::clock::now_ms(),
            state: State::Pending,
            spki: job.spki.clone(),
            rule: job.rule.clone(),
            finding_uid: job.finding_uid.clone(),
            steps: job.steps.clone(),
            detail: None,
        };
        let written = self.store().and_then(|s| s.write(&record));
        if let Err(e) = written {
            self.guard.finished(&job.spki);
            return (
                Outcome::Failed,
                Some(format!(
                    "action {}: cannot record it for approval: {e:#}",
                    job.id
                )),
            );
        }
        self.awaiting.insert(job.id.clone(), job.spki.clone());
        let detail = format!("awaiting approval: keywarden actions approve {}", job.id);
        self.outbox.push(report_of(
            &job,
            &job.steps[0],
            RemediationStatus::AwaitingApproval,
            detail.clone(),
            Ran::default(),
        ));
        (Outcome::Queued, Some(detail))
    }

    /// Called each turn of the event thread: the steps that ended, and
    /// approved records to carry out. Returns the events to write.
    pub fn poll(&mut self) -> Vec<Report> {
        let mut reports = std::mem::take(&mut self.outbox);
        while let Ok(f) = self.done.try_recv() {
            let last = f.job.steps.last() == Some(&f.step);
            if last {
                self.guard.finished(&f.job.spki);
                if f.job.approved {
                    let state = if f.status == RemediationStatus::Done {
                        State::Done
                    } else {
                        State::Failed
                    };
                    self.finish_record(&f.job.id, state, &f.detail);
                }
            }
            reports.push(report_of(
                &f.job,
                &f.step,
                f.status,
                f.detail,
                Ran {
                    new_spki: f.new_spki,
                    log: f.log,
                    pid: f.pid,
                    command: f.command,
                },
            ));
        }
        if self
            .last_look
            .is_none_or(|t| t.elapsed() >= APPROVALS_EVERY)
        {
            self.last_look = Some(Instant::now());
            self.look_at_approvals();
        }
        reports
    }

    fn finish_record(&mut self, id: &str, state: State, detail: &str) {
        let Ok(store) = self.store() else { return };
        match store.read(id) {
            Ok(mut r) => {
                r.state = state;
                r.detail = Some(detail.to_owned());
                if let Err(e) = store.write(&r) {
                    warn!("action {id}: {e:#}");
                }
            }
            Err(e) => warn!("action {id}: {e:#}"),
        }
    }

    /// Approved records are carried out; rejected ones free their key.
    /// The first look takes up what an earlier run left: records still
    /// pending hold their key, and a record that was running when that
    /// sensor stopped is failed (the rotation's journal has its outcome).
    /// After that, only while a record awaits approval.
    fn look_at_approvals(&mut self) {
        let first = !self.looked;
        self.looked = true;
        if !first && self.awaiting.is_empty() {
            return;
        }
        if self.store.is_none() && !self.approvals_dir.exists() {
            return;
        }
        let (records, errors) = match self.store().and_then(|s| s.list()) {
            Ok(l) => l,
            Err(e) => {
                warn!("remediation approvals: {e:#}");
                return;
            }
        };
        for e in errors {
            warn!("remediation approvals: {e}");
        }
        for r in records {
            match r.state {
                State::Approved => {
                    self.awaiting.remove(&r.id);
                    self.guard.resume(&r.spki);
                    // An approval carries the action out unless the
                    // configuration was lowered to `dry_run` since:
                    // that stops approved actions too.
                    let mode = if self.ceiling == Mode::DryRun {
                        Mode::DryRun
                    } else {
                        Mode::Enforce
                    };
                    let store = self.store.as_ref().expect("listed");
                    let next = if mode == Mode::Enforce {
                        store.transition(&r.id, State::Approved, State::Running)
                    } else {
                        store
                            .transition(&r.id, State::Approved, State::Failed)
                            .and_then(|_| {
                                Err(anyhow::anyhow!(
                                    "not carried out: remediation.mode is now dry_run"
                                ))
                            })
                    };
                    if let Err(e) = next {
                        warn!("action {}: {e:#}", r.id);
                        self.guard.finished(&r.spki);
                        continue;
                    }
                    let job = Job {
                        id: r.id,
                        spki: r.spki,
                        rule: r.rule,
                        finding_uid: r.finding_uid,
                        steps: r.steps,
                        mode,
                        approved: true,
                    };
                    let (outcome, detail) = self.send(job.clone());
                    if outcome == Outcome::Failed {
                        let detail = detail.unwrap_or_default();
                        self.finish_record(&job.id, State::Failed, &detail);
                    }
                }
                State::Rejected | State::Done | State::Failed => {
                    if let Some(spki) = self.awaiting.remove(&r.id) {
                        self.guard.finished(&spki);
                    }
                }
                State::Pending if first => {
                    if self.guard.resume(&r.spki) {
                        self.awaiting.insert(r.id, r.spki);
                    } else {
                        self.finish_record(
                            &r.id,
                            State::Failed,
                            "dropped: another action on this key was pending",
                        );
                    }
                }
                State::Running if first => self.finish_record(
                    &r.id,
                    State::Failed,
                    "the sensor stopped while it ran: its rotation journal has the outcome \
                     (keywarden rotate --resume finishes or rolls it back)",
                ),
                State::Pending | State::Running => {}
            }
        }
    }

    /// No new jobs; one under way goes on in its own process (its journal
    /// has its outcome).
    pub fn stop(&mut self) {
        self.jobs = None;
    }
}

/// What a child that carried out a step left (nothing, when none ran).
#[derive(Default)]
struct Ran {
    new_spki: Option<String>,
    log: Vec<String>,
    /// 0: no child ran; the sensor itself is the actor.
    pid: u32,
    command: String,
}

/// The report of `step` of `job`.
fn report_of(
    job: &Job,
    step: &Step,
    status: RemediationStatus,
    detail: String,
    ran: Ran,
) -> Report {
    let Ran {
        new_spki,
        log,
        pid,
        command,
    } = ran;
    Report {
        id: job.id.clone(),
        finding_uid: job.finding_uid.clone(),
        status,
        detail,
        who: Process {
            pid: if pid == 0 { std::process::id() } else { pid },
            name: "keywarden".into(),
            cmd_line: (!command.is_empty()).then_some(command),
            // The children run as the sensor does (root).
            user: User {
                uid: nix::unistd::geteuid().as_raw().to_string(),
                name: None,
            },
            ..Process::default()
        },
        what: Remediation {
            action: step.kind.name().to_owned(),
            spki_sha256: job.spki.clone(),
            new_spki_sha256: new_spki,
            reason: step.reason.clone(),
            rule: job.rule.clone(),
            mode: job.mode,
            log,
        },
    }
}
