//! keywarden's rule language: YAML, typed, and checked like code.
//!
//! A rule names one event class, conditions on that class's fields
//! (`fields.rs`), an optional allow list of actors, a severity and actions.
//! Everything is validated when the file is loaded: an unknown key, an
//! unknown field, a field the event class does not carry, a value of the
//! wrong type, or an action the event cannot take is an error that names
//! `file:line:column`. `docs/rules.md` documents the language.

pub mod fields;
mod index;
mod schema;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use hashbrown::HashMap;

use crate::{
    baseline::Deviation,
    event::{Event, EventCode, RuleRef, severity},
};
use fields::{Field, Kind, Value};

/// One problem in a rule file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in a load (loading does not stop at the first).
#[derive(Debug, thiserror::Error)]
pub struct RuleErrors(pub Vec<RuleError>);

impl std::fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// What a rule asks the sensor to do when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Write a Detection Finding.
    Alert,
    /// SIGKILL the process; for key uses of protected keys, in the kernel
    /// before the signature is produced.
    Kill,
    /// Refuse the open with EPERM (fanotify permission events, or BPF LSM
    /// where the kernel allows it).
    Block,
    /// Replace the key where it serves (`keywarden rotate`), within the
    /// guard rails of `remediation` in the configuration.
    Rotate,
    /// Revoke the key's certificates (`keywarden revoke`, never with
    /// `--force`: after a `rotate` of the same rule, or refused while the
    /// key still serves).
    Revoke,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Kill => "kill",
            Action::Block => "block",
            Action::Rotate => "rotate",
            Action::Revoke => "revoke",
        }
    }

    /// Whether the action takes the key out of service (run by the
    /// remediation worker, not on the event thread).
    pub fn remediates(self) -> bool {
        matches!(self, Action::Rotate | Action::Revoke)
    }
}

/// Who did something, as allow lists see it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Actor<'a> {
    pub exe_path: Option<&'a str>,
    pub exe_sha256: Option<&'a str>,
    pub uid: Option<u32>,
    pub container: Option<&'a str>,
}

impl<'a> Actor<'a> {
    pub fn of(event: &'a Event) -> Self {
        let p = &event.actor.process;
        Actor {
            exe_path: p.file.as_ref().map(|f| f.path.as_str()),
            exe_sha256: p
                .file
                .as_ref()
                .and_then(|f| f.hashes.first())
                .map(|h| h.value.as_str()),
            uid: p.user.uid.parse().ok(),
            container: event.container().map(|c| c.uid.as_str()),
        }
    }
}

/// One allow-list entry: every field it sets must hold.
#[derive(Clone, Debug, Default)]
pub struct AllowEntry {
    pub exe_path: Option<(String, GlobMatcher)>,
    pub exe_sha256: Option<String>,
    pub uid: Option<u32>,
    /// A container id or a prefix of one (at least 12 hex digits).
    pub container: Option<String>,
}

impl AllowEntry {
    pub fn allows(&self, a: &Actor<'_>) -> bool {
        self.exe_path
            .as_ref()
            .is_none_or(|(_, m)| a.exe_path.is_some_and(|p| m.is_match(p)))
            && self
                .exe_sha256
                .as_ref()
                .is_none_or(|h| a.exe_sha256 == Some(h.as_str()))
            && self.uid.is_none_or(|u| a.uid == Some(u))
            && self
                .container
                .as_ref()
                .is_none_or(|c| a.container.is_some_and(|id| id.starts_with(c.as_str())))
    }
}

#[derive(Clone, Debug)]
enum Test {
    /// Any of these strings (Text and Sha256 fields).
    Text(Vec<String>),
    /// Any of these globs (Path fields).
    Glob(GlobSet),
    Number(Vec<u64>),
    Bool(bool),
}

#[derive(Clone, Debug)]
pub struct Condition {
    pub field: &'static str,
    /// The values as written (globs for paths).
    pub values: Vec<String>,
    test: Test,
    visit: fields::Visit,
}

impl Condition {
    fn holds(&self, event: &Event) -> bool {
        (self.visit)(event, &mut |v| match (&self.test, v) {
            (Test::Text(want), Value::Str(s)) => want.iter().any(|w| w == s),
            (Test::Glob(set), Value::Str(s)) => set.is_match(s),
            (Test::Number(want), Value::Num(n)) => want.contains(&n),
            (Test::Bool(want), Value::Bool(b)) => *want == b,
            _ => false,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub id: String,
    pub description: Option<String>,
    pub severity_id: u8,
    pub event: EventCode,
    pub conditions: Vec<Condition>,
    /// Empty: the rule applies to every actor. Otherwise it applies to
    /// actors no entry allows.
    pub allow: Vec<AllowEntry>,
    /// The use must deviate from its key's baseline in one of these ways
    /// (empty: no baseline condition).
    pub deviations: Vec<Deviation>,
    /// Fire only when more than `count` matching events for one key fall
    /// in the window.
    pub threshold: Option<Threshold>,
    pub actions: Vec<Action>,
    /// `revoke`'s RFC 5280 reason (`revoke_reason`, by default
    /// keyCompromise).
    pub revoke_reason: &'static str,
    /// How far `rotate` and `revoke` may go (`remediation`; the
    /// configuration's mode caps it). `Enforce` when the rule says nothing.
    pub remediation: crate::remediation::Mode,
    /// `file:line` of the rule.
    pub source: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub count: u64,
    pub window_ms: i64,
}

/// A rule that fired on an event, and why.
#[derive(Clone, Debug)]
pub struct Firing<'r> {
    pub rule: &'r Rule,
    /// The rule's position in its set.
    pub index: usize,
    /// The deviations of the event the rule asked for.
    pub deviations: Vec<Deviation>,
    /// For threshold rules: matching events in the window.
    pub count: Option<u64>,
}

/// Per (group, rule) sliding counts for threshold rules. One owner (a
/// pipeline shard) holds them.
#[derive(Default)]
pub struct Thresholds {
    /// group key → its windows, for groups whose windows nobody else keeps
    /// (a file, a process, or a key when the caller passes none).
    windows: HashMap<String, Windows>,
    /// The candidate-rule list, reused from event to event.
    candidates: Vec<usize>,
}

/// One group's threshold windows (a key's, a file's or a process's): per
/// threshold rule that counted it, its window. Grouped by the key first:
/// an event's rules then share one lookup, where a map per rule cost a
/// cache miss per rule. A pipeline shard keeps a key's windows beside the
/// key's baseline, so one lookup serves both.
#[derive(Debug, Default)]
pub struct Windows(Vec<(usize, Sliding)>);

impl Windows {
    /// Forgets every count (the rules they belonged to were replaced).
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

#[derive(Debug, Default)]
struct Sliding {
    /// (second, events in it), oldest first.
    buckets: VecDeque<(i64, u64)>,
    total: u64,
    /// Fired and not re-armed yet (re-armed when the count falls back).
    fired: bool,
}

impl Sliding {
    fn add(&mut self, time_ms: i64, window_ms: i64) -> u64 {
        let sec = time_ms.div_euclid(1000);
        match self.buckets.back_mut() {
            // Events from different CPUs arrive slightly out of order: a
            // late one counts in the newest second, so buckets stay in
            // order and the window still drops them.
            Some((s, n)) if *s >= sec => *n += 1,
            _ => self.buckets.push_back((sec, 1)),
        }
        self.total += 1;
        while let Some(&(s, n)) = self.buckets.front() {
            if (s + 1) * 1000 <= time_ms - window_ms {
                self.buckets.pop_front();
                self.total -= n;
            } else {
                break;
            }
        }
        self.total
    }
}

impl Thresholds {
    /// The windows of one group key.
    fn of(&mut self, key: &str) -> &mut Windows {
        self.windows.entry_ref(key).or_default()
    }
}

/// Counts the event in `rule`'s window among a key's; true once each time
/// the count goes above the threshold.
fn crossed(windows: &mut Windows, rule: usize, t: Threshold, time_ms: i64) -> (bool, u64) {
    let windows = &mut windows.0;
    let at = match windows.iter().position(|(r, _)| *r == rule) {
        Some(at) => at,
        None => {
            windows.push((rule, Sliding::default()));
            windows.len() - 1
        }
    };
    let w = &mut windows[at].1;
    let n = w.add(time_ms, t.window_ms);
    if n > t.count {
        let first = !w.fired;
        w.fired = true;
        (first, n)
    } else {
        w.fired = false;
        (false, n)
    }
}

/// What threshold rules count by: the key, else the file, else the process.
fn group_key(event: &Event) -> std::borrow::Cow<'_, str> {
    if let Some(spki) = event
        .unmapped
        .key
        .as_ref()
        .and_then(|k| k.spki_sha256.as_deref())
    {
        return spki.into();
    }
    if let Some(f) = &event.file {
        return f.path.as_str().into();
    }
    format!("pid:{}", event.actor.process.pid).into()
}

impl Rule {
    /// Whether the event is of this rule's class and every condition holds,
    /// regardless of the allow list.
    pub fn selects(&self, event: &Event) -> bool {
        event.metadata.event_code == self.event && self.conditions.iter().all(|c| c.holds(event))
    }

    pub fn allows(&self, actor: &Actor<'_>) -> bool {
        self.allow.iter().any(|e| e.allows(actor))
    }

    /// The rule fires: selected, and the actor is not allowed.
    pub fn matches(&self, event: &Event) -> bool {
        self.selects(event) && !self.allows(&Actor::of(event))
    }

    /// Decidable from one event alone: no baseline, no counting. Only such
    /// rules are enforced before the fact (condemning a key load, answering
    /// a guarded open).
    pub fn is_stateless(&self) -> bool {
        self.deviations.is_empty() && self.threshold.is_none()
    }

    pub fn has(&self, action: Action) -> bool {
        self.actions.contains(&action)
    }

    /// The values of this rule's condition on `field`, if it has one.
    pub fn values_of(&self, field: &str) -> Option<&[String]> {
        self.conditions
            .iter()
            .find(|c| c.field == field)
            .map(|c| c.values.as_slice())
    }

    pub fn reference(&self) -> RuleRef {
        RuleRef {
            id: self.id.clone(),
            description: self.description.clone(),
            severity_id: self.severity_id,
            source: Some(self.source.clone()),
        }
    }
}

/// A validated set of rules, in load order.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    /// Not to be changed once the set has evaluated an event: the index is
    /// built then.
    pub rules: Vec<Rule>,
    /// The files they came from.
    pub files: Vec<PathBuf>,
    index: std::sync::OnceLock<index::RuleIndex>,
}

impl RuleSet {
    /// Parses one YAML document. `name` is what errors call the file.
    pub fn parse(source: &str, name: &str) -> Result<Self, RuleErrors> {
        let rules = schema::parse(source, name)?;
        let set = RuleSet {
            rules,
            ..RuleSet::default()
        };
        set.check_unique()?;
        Ok(set)
    }

    /// Loads rule files: each path is a file, or a directory whose `*.yaml`
    /// and `*.yml` files load in name order. All errors are collected.
    pub fn load(paths: &[PathBuf]) -> Result<Self, RuleErrors> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for p in paths {
            if p.is_dir() {
                let mut found: Vec<PathBuf> = match std::fs::read_dir(p) {
                    Ok(rd) => rd
                        .flatten()
                        .map(|e| e.path())
                        .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                        .collect(),
                    Err(e) => {
                        errors.push(io_error(p, &e));
                        continue;
                    }
                };
                found.sort();
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        let mut set = RuleSet::default();
        for f in &files {
            let name = f.display().to_string();
            match std::fs::read_to_string(f) {
                Ok(text) => match schema::parse(&text, &name) {
                    Ok(rules) => set.rules.extend(rules),
                    Err(RuleErrors(es)) => errors.extend(es),
                },
                Err(e) => errors.push(io_error(f, &e)),
            }
        }
        set.files = files;
        if let Err(RuleErrors(es)) = set.check_unique() {
            errors.extend(es);
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(RuleErrors(errors))
        }
    }

    fn check_unique(&self) -> Result<(), RuleErrors> {
        let mut errors = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            if let Some(first) = self.rules[..i].iter().find(|o| o.id == r.id) {
                let (file, line) = split_source(&r.source);
                errors.push(RuleError {
                    file,
                    line,
                    column: 1,
                    message: format!("rule id `{}` is already used at {}", r.id, first.source),
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuleErrors(errors))
        }
    }

    /// Rules that fire on this event, in order. `deviations` are how the
    /// event differs from its key's baseline; `thresholds` is the caller's
    /// counting state for threshold rules. `key_windows` are the event's
    /// own threshold windows when the caller keeps them (beside the key's
    /// baseline); otherwise they are looked up in `thresholds`.
    pub fn evaluate<'a>(
        &'a self,
        event: &Event,
        deviations: &[Deviation],
        thresholds: &mut Thresholds,
        key_windows: Option<&mut Windows>,
    ) -> Vec<Firing<'a>> {
        let mut actor = None;
        let mut out = Vec::new();
        let index = self
            .index
            .get_or_init(|| index::RuleIndex::build(&self.rules));
        let mut candidates = std::mem::take(&mut thresholds.candidates);
        index.candidates(event, &mut candidates);
        // One lookup of the event's threshold windows serves all its rules.
        let mut windows = match key_windows {
            Some(w) => Some(w),
            None => candidates
                .iter()
                .any(|&i| self.rules[i].threshold.is_some())
                .then(|| thresholds.of(&group_key(event))),
        };
        for &i in &candidates {
            let r = &self.rules[i];
            // A deviation rule needs one of its deviations: the cheapest
            // test, and most uses deviate in nothing.
            let wanted = |d: &Deviation| r.deviations.contains(d);
            if !r.deviations.is_empty() && !deviations.iter().any(wanted) {
                continue;
            }
            // The condition the index found it by holds already.
            let met = index.indexed_condition[i];
            let selects = event.metadata.event_code == r.event
                && r.conditions
                    .iter()
                    .enumerate()
                    .all(|(at, c)| Some(at) == met || c.holds(event));
            if !selects
                || (!r.allow.is_empty() && r.allows(actor.get_or_insert_with(|| Actor::of(event))))
            {
                continue;
            }
            let devs: Vec<Deviation> = deviations.iter().copied().filter(wanted).collect();
            let count = match r.threshold {
                Some(t) => {
                    let windows = windows
                        .as_deref_mut()
                        .expect("looked up for threshold rules");
                    let (crossed, n) = crossed(windows, i, t, event.time);
                    if !crossed {
                        continue;
                    }
                    Some(n)
                }
                None => None,
            };
            out.push(Firing {
                rule: r,
                index: i,
                deviations: devs,
                count,
            });
        }
        thresholds.candidates = candidates;
        out
    }

    pub fn with_action(&self, action: Action) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(move |r| r.has(action))
    }
}

fn io_error(p: &Path, e: &std::io::Error) -> RuleError {
    RuleError {
        file: p.display().to_string(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    }
}

fn split_source(s: &str) -> (String, u64) {
    match s.rsplit_once(':') {
        Some((f, l)) => (f.to_owned(), l.parse().unwrap_or(0)),
        None => (s.to_owned(), 0),
    }
}

/// Compiles a path glob the way every keywarden path glob works: `*`
/// stays within one path component, `**` crosses them.
pub fn path_glob(glob: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(glob).literal_separator(true).build()
}

fn severity_id(name: &str) -> Option<u8> {
    Some(match name {
        "informational" | "info" => severity::INFORMATIONAL,
        "low" => severity::LOW,
        "medium" => severity::MEDIUM,
        "high" => severity::HIGH,
        "critical" => severity::CRITICAL,
        _ => return None,
    })
}

fn event_code(name: &str) -> Option<EventCode> {
    Some(match name {
        "key_use" => EventCode::KeyUse,
        "secret_file_open" => EventCode::SecretFileOpen,
        _ => return None,
    })
}

fn build_test(field: &Field, values: &[String]) -> Result<Test, String> {
    match field.kind {
        Kind::Text => Ok(Test::Text(values.to_vec())),
        Kind::Sha256 => {
            for v in values {
                if v.len() != 64
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(format!(
                        "`{v}` is not a SHA-256: {} takes 64 lowercase hex digits",
                        field.name
                    ));
                }
            }
            Ok(Test::Text(values.to_vec()))
        }
        Kind::Path => {
            let mut b = GlobSetBuilder::new();
            for v in values {
                b.add(path_glob(v).map_err(|e| format!("invalid glob `{v}`: {e}"))?);
            }
            b.build()
                .map(Test::Glob)
                .map_err(|e| format!("invalid globs: {e}"))
        }
        Kind::Number => values
            .iter()
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("`{v}` is not a number, and {} is one", field.name))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Test::Number),
        Kind::Bool => match values {
            [v] if v == "true" => Ok(Test::Bool(true)),
            [v] if v == "false" => Ok(Test::Bool(false)),
            _ => Err(format!("{} takes true or false", field.name)),
        },
    }
}

#[cfg(test)]
mod tests;
