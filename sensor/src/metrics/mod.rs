//! The Prometheus endpoint (`keywarden run --metrics ADDR`, or `metrics:`
//! in the configuration; off by default): what the sensor counts, in the
//! text exposition format (version 0.0.4), for `GET /metrics`. The metrics
//! are listed in `docs/metrics.md` (a test checks the list against
//! `Snapshot::render`).
//!
//! The event thread owns nearly every count, so it is the one to publish
//! them: once a turn of its loop (`run::Sensor::publish_metrics`) it copies
//! them into the `Snapshot` behind `Metrics`' mutex, and the endpoint's
//! thread (`keywarden-prom`) copies that out when scraped. Per event the
//! emitter only adds to plain integers (`Tally`): nothing on the path every
//! event takes locks or waits, and a scrape delays the event thread by at
//! most the copy of a few hundred bytes. A scrape therefore shows the counts
//! as of the last turn (`poll_interval_ms` old, at most 250 ms). The
//! resident set size is read at scrape time.
//!
//! Label values come from fixed sets (event classes, outcomes, causes,
//! queues, actions) or are rule ids, which the loaded rule sets bound (and
//! `MAX_RULES` caps). Nothing is labelled by process, path or key: those
//! an attacker could multiply without end, and each would be a series kept
//! forever by whoever scrapes. Label values and help texts are escaped all
//! the same (`escape_label`), so no value can break the format.
//!
//! The endpoint (`Endpoint`, in `endpoint`) answers one request per
//! connection, one connection at a time, within a deadline: a slow or
//! silent client never holds the sensor, whose threads never wait for it.
//!
//! This module holds the counts and their publication; the text format is
//! `render` and the HTTP side is `endpoint`, kept apart so that each reads
//! on its own (and each file stays under the project's 600 lines).

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use keywarden_analyzer::{
    event::{Event, EventCode, Outcome},
    rules::Action,
};
use keywarden_probe_types::stats;

use crate::{keys::reader::KeyReadStats, lake::LakeCounts, run::shedding::Shed};

mod endpoint;
mod render;

pub use endpoint::Endpoint;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rules counted by id, at most. A rule set is far smaller; rules reloaded
/// with new ids add series, and this bounds what reloads can add. Findings
/// of rules past it are counted under `OTHER_RULES`.
const MAX_RULES: usize = 1000;

/// The `rule` label of findings of rules past `MAX_RULES`: a value no rule
/// id can take (ids are letters, digits, `-`, `_` and `.`).
const OTHER_RULES: &str = "(other)";

/// Keys and process names counted by their own label, at most each: the
/// key-use families (`keywarden_key_uses_by_key_total`,
/// `..._by_process_total`) are the two labelled by what a process
/// controls, so each is capped; uses past the cap count under `OTHER`.
const MAX_KEY_USE_SERIES: usize = 100;

/// The label value of key uses past `MAX_KEY_USE_SERIES`: no SPKI prefix
/// (hex) and no process name (at most 15 bytes, no parentheses are ever
/// added by the kernel) can be it.
const OTHER: &str = "(other)";

/// Event classes (`metadata.event_code`), as the `class` label names them,
/// in the order `class_index` gives.
const CLASSES: [&str; 5] = [
    "key_use",
    "secret_file_open",
    "coverage_warning",
    "alert",
    "remediation",
];

/// The index of `CLASSES` of an event code. Exhaustive, so that a new kind
/// of event cannot go uncounted.
fn class_index(code: EventCode) -> usize {
    match code {
        EventCode::KeyUse => 0,
        EventCode::SecretFileOpen => 1,
        EventCode::CoverageWarning => 2,
        EventCode::Alert => 3,
        EventCode::Remediation => 4,
    }
}

/// `status_id` 0, 1 and 2, and any other (a remediation planned or
/// awaiting approval, 99).
const STATUS_SLOTS: usize = 4;

/// The `outcome` label of `status_id` slot `slot` of class `class`: the
/// event's `status` in lower case (a finding's 1 is `New`).
fn outcome_name(class: usize, slot: usize) -> &'static str {
    match slot {
        0 => "unknown",
        1 if CLASSES[class] == "alert" => "new",
        1 => "success",
        2 => "failure",
        _ => "other",
    }
}

/// The status slots each class can have, by `CLASSES` index: their series
/// are written from the start, at 0, so that a rate over them has a
/// beginning. (Another slot is written once it counts anything.)
const CLASS_OUTCOMES: [&[usize]; 5] = [&[1, 2], &[0, 1, 2], &[2], &[1], &[1, 2, 3]];

/// Rule actions, as the `action` label names them (`Action::name`).
const ACTIONS: [Action; 5] = [
    Action::Alert,
    Action::Kill,
    Action::Block,
    Action::Rotate,
    Action::Revoke,
];

/// What became of an action, as the `outcome` label names it, in the order
/// `outcome_index` gives.
const ACTION_OUTCOMES: [&str; 5] = ["done", "in_kernel", "failed", "skipped", "queued"];

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Done => 0,
        Outcome::InKernel => 1,
        Outcome::Failed => 2,
        Outcome::Skipped => 3,
        Outcome::Queued => 4,
    }
}

/// What the emitter counts per event for the endpoint. Plain integers, not
/// atomics: the event thread owns them and publishes a copy once a turn
/// (`copy_into`).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// By class (`CLASSES`) and `status_id` (`STATUS_SLOTS`).
    events: [[u64; STATUS_SLOTS]; CLASSES.len()],
    /// By action (`ACTIONS`) and outcome (`ACTION_OUTCOMES`).
    actions: [[u64; ACTION_OUTCOMES.len()]; ACTIONS.len()],
    /// Findings by rule id.
    findings: BTreeMap<String, u64>,
    /// Bumped whenever `findings` changes: a copy takes the map only then,
    /// so a turn without findings allocates nothing.
    findings_changed: u64,
    /// Key uses by key (the first 16 hex digits of its SPKI SHA-256, or
    /// `unknown`) and by process name, each capped (`MAX_KEY_USE_SERIES`).
    by_key: BTreeMap<String, u64>,
    by_process: BTreeMap<String, u64>,
    /// Bumped whenever those change (as `findings_changed`).
    key_uses_changed: u64,
}

/// Adds one to `label`'s count in `map`, or to `OTHER`'s once the map has
/// `MAX_KEY_USE_SERIES` labels.
fn count_capped(map: &mut BTreeMap<String, u64>, label: &str) {
    if let Some(n) = map.get_mut(label) {
        *n += 1;
    } else if map.len() < MAX_KEY_USE_SERIES {
        map.insert(label.to_owned(), 1);
    } else {
        *map.entry(OTHER.to_owned()).or_default() += 1;
    }
}

/// The key of a key use, as its label: through the rule field table, the
/// one place that knows where the key sits in an event.
fn key_label(ev: &Event) -> String {
    static SPKI: std::sync::LazyLock<Option<&'static keywarden_analyzer::rules::fields::Field>> =
        std::sync::LazyLock::new(|| keywarden_analyzer::rules::fields::lookup("key.spki_sha256"));
    let mut label = None;
    if let Some(f) = *SPKI {
        (f.visit)(ev, &mut |v| {
            if let keywarden_analyzer::rules::fields::Value::Str(s) = v {
                label = Some(s[..s.len().min(16)].to_owned());
            }
            true
        });
    }
    label.unwrap_or_else(|| "unknown".to_owned())
}

impl Tally {
    /// Counts an event as the emitter produced it; a finding also counts
    /// under its rule, and each of its responses under its action and
    /// outcome.
    pub fn count(&mut self, ev: &Event) {
        let class = class_index(ev.metadata.event_code);
        let slot = usize::from(ev.status_id).min(STATUS_SLOTS - 1);
        self.events[class][slot] += 1;
        if let Some(info) = &ev.finding_info {
            let rule = info.analytic.uid.as_str();
            if let Some(n) = self.findings.get_mut(rule) {
                *n += 1;
            } else if self.findings.len() < MAX_RULES {
                self.findings.insert(rule.to_owned(), 1);
            } else {
                *self.findings.entry(OTHER_RULES.to_owned()).or_default() += 1;
            }
            self.findings_changed += 1;
        }
        if ev.metadata.event_code == EventCode::KeyUse {
            count_capped(&mut self.by_key, &key_label(ev));
            count_capped(&mut self.by_process, &ev.actor.process.name);
            self.key_uses_changed += 1;
        }
        for r in &ev.unmapped.responses {
            if let Some(a) = ACTIONS.iter().position(|a| a.name() == r.action) {
                self.actions[a][outcome_index(r.outcome)] += 1;
            }
        }
    }

    /// Coverage warnings produced (every `coverage_warning` event).
    fn coverage_warnings(&self) -> u64 {
        self.events[class_index(EventCode::CoverageWarning)]
            .iter()
            .sum()
    }

    /// Copies this into `dst`, the findings map only if it changed since
    /// the copy `dst` has.
    pub fn copy_into(&self, dst: &mut Tally) {
        dst.events = self.events;
        dst.actions = self.actions;
        if dst.findings_changed != self.findings_changed {
            dst.findings.clone_from(&self.findings);
            dst.findings_changed = self.findings_changed;
        }
        if dst.key_uses_changed != self.key_uses_changed {
            dst.by_key.clone_from(&self.by_key);
            dst.by_process.clone_from(&self.by_process);
            dst.key_uses_changed = self.key_uses_changed;
        }
    }
}

/// One bounded queue: what it holds now, and at most (`None` for the
/// output backlog, which is bounded in bytes: `Snapshot::sink_backlog_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub depth: u64,
    pub capacity: Option<u64>,
}

impl Queue {
    pub fn new(depth: usize, capacity: Option<usize>) -> Self {
        Queue {
            depth: depth as u64,
            capacity: capacity.map(|c| c as u64),
        }
    }
}

/// The queues between the sensor's threads, as the `queue` label names
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queues {
    /// Events waiting for an analyzer shard (all shards).
    pub analyzer_input: Queue,
    /// Analysed events waiting for the event thread.
    pub analyzer_output: Queue,
    /// Lines waiting for the output thread.
    pub sink_backlog: Queue,
    /// Guarded opens' verdicts waiting for the event thread.
    pub guard_verdicts: Queue,
    /// The control thread's coverage warnings waiting for the event thread.
    pub warnings: Queue,
}

impl Queues {
    fn named(&self) -> [(&'static str, Queue); 5] {
        [
            ("analyzer_input", self.analyzer_input),
            ("analyzer_output", self.analyzer_output),
            ("sink_backlog", self.sink_backlog),
            ("guard_verdicts", self.guard_verdicts),
            ("warnings", self.warnings),
        ]
    }
}

/// Everything a scrape shows but the resident set size, as the event
/// thread last published it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub tally: Tally,
    /// Lines the output thread wrote.
    pub written: u64,
    pub shed: Shed,
    /// The probes' `STATS` counters, by `stats::*` slot.
    pub kernel: [u64; stats::SLOTS as usize],
    pub key_reads: KeyReadStats,
    /// Files with probes attached, and the functions probed in them.
    pub libraries: u64,
    pub functions: u64,
    /// Public-key operations (verifications, ECDSA recoveries) run to
    /// identify keys.
    pub verifications: u64,
    pub queues: Queues,
    /// Bytes of the lines in `queues.sink_backlog`.
    pub sink_backlog_bytes: u64,
    /// What the Parquet export wrote (`None`: off).
    pub parquet: Option<LakeCounts>,
}

/// The metrics, shared by the event thread, which publishes them, and the
/// endpoint, which renders them.
#[derive(Default)]
pub struct Metrics {
    snapshot: Mutex<Snapshot>,
}

impl Metrics {
    /// The event thread's publication, once a turn: `update` edits the
    /// published snapshot in place, under the lock, so it should only copy.
    pub fn publish(&self, update: impl FnOnce(&mut Snapshot)) {
        update(&mut self.lock());
    }

    /// The exposition text of a scrape now.
    pub fn render(&self) -> String {
        // Copied out first: the lock is held for a copy, not for rendering.
        let snapshot = self.lock().clone();
        snapshot.render(resident_bytes())
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A thread that panicked while publishing left whole integers: go on.
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sensor's resident set size in bytes (`VmRSS`), read at scrape time.
fn resident_bytes() -> Option<u64> {
    vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes (the file says kB).
fn vm_rss(status: &str) -> Option<u64> {
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use keywarden_analyzer::event::{Analytic, FindingInfo, Origin, Response};

    use super::*;

    fn origin() -> Origin {
        Origin {
            hostname: "h".into(),
            product_version: "0".into(),
            uid_prefix: "p".into(),
        }
    }

    fn warning() -> Event {
        Event::coverage_warning(&origin(), 0, 1, None, None, "w".into())
    }

    /// A finding of rule `rule` whose actions had `responses`.
    fn finding(rule: &str, responses: &[(&str, Outcome)]) -> Event {
        let mut f = warning();
        f.metadata.event_code = EventCode::Alert;
        f.status_id = 1;
        f.finding_info = Some(FindingInfo {
            uid: "u".into(),
            title: "t".into(),
            desc: None,
            analytic: Analytic {
                uid: rule.into(),
                name: rule.into(),
                type_id: 1,
                kind: "Rule".into(),
            },
        });
        f.unmapped.responses = responses
            .iter()
            .map(|&(action, outcome)| Response {
                action: action.into(),
                outcome,
                detail: None,
            })
            .collect();
        f
    }

    /// The samples of a rendering: series (name and labels as written) to
    /// value.
    pub(super) fn samples(text: &str) -> BTreeMap<String, u64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample line");
                (series.to_owned(), value.parse().expect("an integer"))
            })
            .collect()
    }

    #[test]
    fn events_findings_and_actions_are_counted_by_label() {
        let mut tally = Tally::default();
        tally.count(&warning());
        tally.count(&warning());
        let f = finding(
            "protect-key",
            &[("alert", Outcome::Done), ("kill", Outcome::InKernel)],
        );
        tally.count(&f);
        tally.count(&finding("protect-key", &[("kill", Outcome::Failed)]));
        tally.count(&finding("other-rule", &[]));
        let mut published = Snapshot::default();
        tally.copy_into(&mut published.tally);
        let s = samples(&published.render(Some(4096)));
        let at = |series: &str| s.get(series).copied();
        assert_eq!(
            at(r#"keywarden_events_total{class="coverage_warning",outcome="failure"}"#),
            Some(2)
        );
        assert_eq!(
            at(r#"keywarden_events_total{class="alert",outcome="new"}"#),
            Some(3)
        );
        // Expected outcomes are there at 0 from the start; others are not.
        assert_eq!(
            at(r#"keywarden_events_total{class="key_use",outcome="success"}"#),
            Some(0)
        );
        assert_eq!(
            at(r#"keywarden_events_total{class="key_use",outcome="unknown"}"#),
            None
        );
        assert_eq!(at("keywarden_coverage_warnings_total"), Some(2));
        assert_eq!(
            at(r#"keywarden_findings_total{rule="protect-key"}"#),
            Some(2)
        );
        assert_eq!(
            at(r#"keywarden_findings_total{rule="other-rule"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="alert",outcome="done"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="kill",outcome="in_kernel"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="kill",outcome="failed"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="block",outcome="done"}"#),
            Some(0)
        );
        assert_eq!(at("keywarden_resident_memory_bytes"), Some(4096));
        // A copy without new findings keeps the map it has.
        let changed = published.tally.findings_changed;
        tally.count(&warning());
        tally.copy_into(&mut published.tally);
        assert_eq!(published.tally.findings_changed, changed);
        assert_eq!(published.tally.coverage_warnings(), 3);
    }

    #[test]
    fn rules_past_the_cap_are_counted_together() {
        let mut tally = Tally::default();
        for i in 0..MAX_RULES + 5 {
            tally.count(&finding(&format!("r{i}"), &[]));
        }
        tally.count(&finding("r0", &[]));
        assert_eq!(tally.findings.len(), MAX_RULES + 1);
        assert_eq!(tally.findings[OTHER_RULES], 5);
        assert_eq!(tally.findings["r0"], 2);
    }

    /// Key uses by key and by process: labelled by what a process
    /// controls, so capped; the rest is counted, not dropped.
    #[test]
    fn key_uses_by_process_are_capped_and_the_rest_counted() {
        let mut tally = Tally::default();
        for i in 0..MAX_KEY_USE_SERIES + 5 {
            let mut ev = warning();
            ev.metadata.event_code = EventCode::KeyUse;
            ev.actor.process.name = format!("p{i}");
            tally.count(&ev);
        }
        tally.count(&warning());
        let mut published = Snapshot::default();
        tally.copy_into(&mut published.tally);
        let s = samples(&published.render(None));
        assert_eq!(
            s.get(r#"keywarden_key_uses_by_process_total{process="p0"}"#),
            Some(&1)
        );
        assert_eq!(
            s.get(r#"keywarden_key_uses_by_process_total{process="(other)"}"#),
            Some(&5)
        );
        assert_eq!(
            s.get(r#"keywarden_key_uses_by_key_total{key="unknown"}"#),
            Some(&(MAX_KEY_USE_SERIES as u64 + 5)),
            "a key use without an identified key"
        );
        let series = s
            .keys()
            .filter(|k| k.starts_with("keywarden_key_uses_by_process_total"))
            .count();
        assert_eq!(series, MAX_KEY_USE_SERIES + 1);
    }

    #[test]
    fn the_resident_set_size_is_read_in_bytes() {
        assert_eq!(
            vm_rss("Name:\tk\nVmRSS:\t   12345 kB\nVmData: 1 kB\n"),
            Some(12345 * 1024)
        );
        assert_eq!(vm_rss("Name:\tk\n"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
