//! The response stage: what each action of a fired rule did, and the
//! Detection Finding that reports it.
//!
//! `keywarden run` acts for real (`Live`); `keywarden analyze` replays
//! recorded events and never acts (`Replay`). Both turn a pipeline output
//! into findings through `findings`, so a replay's findings differ from the
//! live ones only in their responses.

use std::sync::{Arc, Mutex};

use keywarden_analyzer::{
    event::{Event, Origin, Outcome, Response, Verdict},
    pipeline::Output,
    rules::{Action, Rule},
};

use crate::{probes::Probes, remediate::Remediator};

/// Carries out one action of a rule that `out` fired.
pub trait Responder {
    /// `finding_uid` is the `metadata.uid` the finding will have, so that
    /// what an action starts can point back at it.
    fn respond(
        &mut self,
        action: Action,
        rule: &Rule,
        out: &Output,
        finding_uid: &str,
    ) -> (Outcome, Option<String>);
}

/// One finding per rule `out` fired, each with the responses `responder`
/// gave. `next_seq` numbers them.
pub fn findings(
    out: &Output,
    responder: &mut dyn Responder,
    origin: &Origin,
    time_ms: i64,
    mut next_seq: impl FnMut() -> u64,
) -> Vec<Event> {
    out.fired
        .iter()
        .map(|fired| {
            let seq = next_seq();
            let uid = origin.uid(seq);
            let responses = fired
                .rule
                .actions
                .iter()
                .map(|&action| {
                    let (outcome, detail) = responder.respond(action, &fired.rule, out, &uid);
                    Response {
                        action: action.name().to_owned(),
                        outcome,
                        detail,
                    }
                })
                .collect();
            fired.finding(origin, time_ms, seq, &out.event, responses)
        })
        .collect()
}

/// Replay: nothing is enforced.
pub struct Replay;

impl Responder for Replay {
    fn respond(&mut self, _: Action, _: &Rule, _: &Output, _: &str) -> (Outcome, Option<String>) {
        (Outcome::Skipped, Some("replay: not enforced".to_owned()))
    }
}

/// The live sensor: kills through signals and the kernel's verdict map;
/// blocks were decided by the fanotify guard before the event existed;
/// rotations and revocations go to the remediation stage.
pub struct Live {
    pub probes: Arc<Mutex<Probes>>,
    pub remediator: Arc<Mutex<Remediator>>,
}

impl Responder for Live {
    fn respond(
        &mut self,
        action: Action,
        rule: &Rule,
        out: &Output,
        finding_uid: &str,
    ) -> (Outcome, Option<String>) {
        match action {
            Action::Rotate | Action::Revoke => self
                .remediator
                .lock()
                .expect("remediator lock")
                .request(rule, &out.event, finding_uid),
            Action::Alert => (Outcome::Done, None),
            Action::Kill if out.killed_by.as_deref() == Some(rule.id.as_str()) => (
                Outcome::InKernel,
                Some("SIGKILL as it entered the signing call; no signature was made".to_owned()),
            ),
            Action::Kill => self.kill_after(&out.event),
            Action::Block => match out
                .event
                .unmapped
                .secret_file
                .as_ref()
                .and_then(|s| s.verdict)
            {
                Some(Verdict::Denied) => {
                    (Outcome::Done, Some("open refused with EPERM".to_owned()))
                }
                _ => (
                    Outcome::Skipped,
                    Some("this open was not behind a fanotify mark of this rule".to_owned()),
                ),
            },
        }
    }
}

impl Live {
    /// `kill` for a use the probe could not stop in time (the key was only
    /// known once it had signed): SIGKILL now, and condemn the process in
    /// the kernel so a signature already on its way is stopped too.
    fn kill_after(&mut self, ev: &Event) -> (Outcome, Option<String>) {
        let pid = ev.actor.process.pid;
        if pid == 0 || pid == std::process::id() {
            return (Outcome::Skipped, Some("no process to kill".to_owned()));
        }
        if let Err(e) = self
            .probes
            .lock()
            .expect("probes lock")
            .set_verdict(pid, Some(0))
        {
            tracing::warn!(pid, error = %e, "cannot condemn the process in the kernel; killing it only");
        }
        // The event's time on the monotonic clock: the process to kill
        // started before it; one given the pid since is never hit.
        let age_ms = crate::clock::now_ms().saturating_sub(ev.time).max(0) as u64;
        let at_ns = crate::clock::monotonic_ns().saturating_sub(age_ms * 1_000_000);
        match crate::held::signal(pid, at_ns, libc::SIGKILL) {
            Ok(true) => (
                Outcome::Done,
                Some("SIGKILL after the event (the key was not known to be protected before it was used)".to_owned()),
            ),
            Ok(false) => (
                Outcome::Failed,
                Some("the process had exited (its pid is not signalled again)".to_owned()),
            ),
            Err(e) => (Outcome::Failed, Some(format!("SIGKILL: {e}"))),
        }
    }
}
