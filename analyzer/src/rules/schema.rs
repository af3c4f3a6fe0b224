//! The YAML shape of a rule file and its translation to `Rule`s.
//!
//! serde does the shape (unknown keys are errors); this module checks what
//! serde cannot: field names against `fields::FIELDS`, value types, and
//! which actions an event class can take. Every value keeps its location so
//! each error points at the offending token.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{
    Action, AllowEntry, Condition, Rule, RuleError, RuleErrors, Threshold, build_test, event_code,
    fields, path_glob, severity_id,
};
use crate::{baseline::Deviation, event::EventCode};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    id: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    severity: Spanned<String>,
    event: Spanned<String>,
    #[serde(default, rename = "match")]
    matches: BTreeMap<Key, Spanned<Values>>,
    #[serde(default)]
    allow: Vec<Spanned<AllowDoc>>,
    #[serde(default)]
    deviation: Vec<Spanned<String>>,
    #[serde(default)]
    threshold: Option<Spanned<ThresholdDoc>>,
    actions: Vec<Spanned<String>>,
    #[serde(default)]
    revoke_reason: Option<Spanned<String>>,
    #[serde(default)]
    remediation: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdDoc {
    count: u64,
    window_seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowDoc {
    #[serde(default)]
    exe_path: Option<Spanned<String>>,
    #[serde(default)]
    exe_sha256: Option<Spanned<String>>,
    #[serde(default)]
    uid: Option<Spanned<u32>>,
    #[serde(default)]
    container: Option<Spanned<String>>,
}

/// A map key with its location (for "unknown field" errors).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    name: String,
    line: u64,
    column: u64,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<String>::deserialize(d)?;
        Ok(Key {
            name: s.value,
            line: s.referenced.line(),
            column: s.referenced.column(),
        })
    }
}

/// A scalar or a list of scalars. Plain scalars are read back from the
/// source text (`raw_scalar`), so `0123` stays `0123` for a text field
/// instead of becoming the number 123; the field's kind decides how the text
/// is read.
enum Values {
    One(String),
    Many(Vec<Spanned<Scalar>>),
}

struct Scalar(String);

struct ScalarVisitor;

impl<'de> serde::de::Visitor<'de> for ScalarVisitor {
    type Value = String;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string, number or boolean")
    }
    fn visit_bool<E>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_str<E>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor).map(Scalar)
    }
}

struct ValuesVisitor;

impl<'de> serde::de::Visitor<'de> for ValuesVisitor {
    type Value = Values;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a value or a list of values")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Values, E> {
        Ok(Values::One(v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Values, E> {
        Ok(Values::One(v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Values, E> {
        Ok(Values::One(v.to_string()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Values, E> {
        Ok(Values::One(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Values, E> {
        Ok(Values::One(v.to_owned()))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element()? {
            out.push(s);
        }
        Ok(Values::Many(out))
    }
}

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValuesVisitor)
    }
}

/// The text of a plain (unquoted) scalar exactly as written; `None` for a
/// quoted one, whose parsed value is already that text.
fn raw_scalar(source: &str, at: &serde_saphyr::Location) -> Option<String> {
    let span = at.span();
    if span.is_empty() {
        return None;
    }
    let raw: String = source
        .chars()
        .skip(span.offset())
        .take(span.len())
        .collect();
    let raw = raw.trim();
    if raw.is_empty() || raw.starts_with(['"', '\'', '[', '{']) {
        return None;
    }
    Some(raw.to_owned())
}

impl Values {
    fn texts(&self, source: &str, at: &serde_saphyr::Location) -> Vec<String> {
        match self {
            Values::One(v) => vec![raw_scalar(source, at).unwrap_or_else(|| v.clone())],
            Values::Many(items) => items
                .iter()
                .map(|i| raw_scalar(source, &i.referenced).unwrap_or_else(|| i.value.0.clone()))
                .collect(),
        }
    }
}

struct Errors<'a> {
    file: &'a str,
    list: Vec<RuleError>,
}

impl Errors<'_> {
    fn at(&mut self, line: u64, column: u64, message: impl Into<String>) {
        self.list.push(RuleError {
            file: self.file.to_owned(),
            line,
            column,
            message: message.into(),
        });
    }
    fn span<T>(&mut self, s: &Spanned<T>, message: impl Into<String>) {
        self.at(s.referenced.line(), s.referenced.column(), message);
    }
}

pub(super) fn parse(source: &str, file: &str) -> Result<Vec<Rule>, RuleErrors> {
    let doc: FileDoc = serde_saphyr::from_str(source).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message = first_line(&e.to_string());
        let (line, column) = refine_unknown_field(source, &message, line, column);
        RuleErrors(vec![RuleError {
            file: file.to_owned(),
            line,
            column,
            message,
        }])
    })?;
    let mut errors = Errors {
        file,
        list: Vec::new(),
    };
    let mut rules = Vec::new();
    for r in doc.rules {
        if let Some(rule) = translate(r, source, &mut errors) {
            rules.push(rule);
        }
    }
    if errors.list.is_empty() {
        Ok(rules)
    } else {
        Err(RuleErrors(errors.list))
    }
}

/// serde-saphyr's message without its own "line N column M" decoration
/// and source snippet (the error's file:line:col says it once).
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    let line = line.strip_prefix("error: ").unwrap_or(line);
    let line = match line.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") => rest,
        _ => line,
    };
    match line.rfind(" at line ") {
        Some(i) => line[..i].to_owned(),
        None => line.to_owned(),
    }
}

/// serde reports an unknown key at the start of its mapping; point at the
/// key itself, the first line after that position that starts with it.
fn refine_unknown_field(source: &str, message: &str, line: u64, column: u64) -> (u64, u64) {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return (line, column);
    };
    let Some(name) = rest.split('`').next() else {
        return (line, column);
    };
    for (i, text) in source
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1) as usize)
    {
        let trimmed = text.trim_start_matches([' ', '-']);
        if let Some(after) = trimmed.strip_prefix(name)
            && after.trim_start().starts_with(':')
        {
            let col = text.len() - trimmed.len() + 1;
            return (i as u64 + 1, col as u64);
        }
    }
    (line, column)
}

fn translate(r: RuleDoc, source: &str, errors: &mut Errors<'_>) -> Option<Rule> {
    let before = errors.list.len();
    let id = r.id.value.trim().to_owned();
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        errors.span(
            &r.id,
            format!("rule id `{id}` must be letters, digits, `-`, `_` or `.`"),
        );
    }
    let severity = severity_id(&r.severity.value);
    if severity.is_none() {
        errors.span(
            &r.severity,
            format!(
                "unknown severity `{}` (expected informational, low, medium, high or critical)",
                r.severity.value
            ),
        );
    }
    let event = event_code(&r.event.value);
    if event.is_none() {
        errors.span(
            &r.event,
            format!(
                "unknown event `{}` (expected key_use or secret_file_open)",
                r.event.value
            ),
        );
    }

    let mut conditions = Vec::new();
    for (key, values) in &r.matches {
        let Some(field) = fields::lookup(&key.name) else {
            errors.at(
                key.line,
                key.column,
                format!("unknown event field `{}`", key.name),
            );
            continue;
        };
        if let Some(ev) = event
            && !field.applies_to(ev)
        {
            errors.at(
                key.line,
                key.column,
                format!("{} events have no field `{}`", r.event.value, key.name),
            );
            continue;
        }
        let texts = values.value.texts(source, &values.referenced);
        if texts.is_empty() {
            errors.span(values, format!("`{}` needs at least one value", key.name));
            continue;
        }
        match build_test(field, &texts) {
            Ok(test) => conditions.push(Condition {
                field: field.name,
                values: texts,
                test,
                visit: field.visit,
            }),
            Err(msg) => errors.span(values, msg),
        }
    }

    let mut allow = Vec::new();
    for entry in &r.allow {
        let a = &entry.value;
        let mut out = AllowEntry::default();
        if a.exe_path.is_none()
            && a.exe_sha256.is_none()
            && a.uid.is_none()
            && a.container.is_none()
        {
            errors.span(
                entry,
                "an allow entry needs exe_path, exe_sha256, uid or container",
            );
        }
        if let Some(p) = &a.exe_path {
            if !p.value.starts_with('/') {
                errors.span(p, format!("exe_path `{}` is not an absolute path", p.value));
            } else {
                match path_glob(&p.value) {
                    Ok(g) => out.exe_path = Some((p.value.clone(), g.compile_matcher())),
                    Err(e) => errors.span(p, format!("invalid exe_path glob `{}`: {e}", p.value)),
                }
            }
        }
        if let Some(h) = &a.exe_sha256 {
            let v = h.value.to_ascii_lowercase();
            if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.span(h, format!("exe_sha256 `{}` is not 64 hex digits", h.value));
            }
            out.exe_sha256 = Some(v);
        }
        out.uid = a.uid.as_ref().map(|u| u.value);
        if let Some(c) = &a.container {
            let v = c.value.to_ascii_lowercase();
            if v.len() < 12 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.span(
                    c,
                    format!(
                        "container `{}` is not a container id (12 to 64 hex digits)",
                        c.value
                    ),
                );
            }
            out.container = Some(v);
        }
        allow.push(out);
    }

    let mut deviations = Vec::new();
    for d in &r.deviation {
        match Deviation::from_name(&d.value) {
            Some(dev) if event == Some(EventCode::KeyUse) => deviations.push(dev),
            Some(_) => errors.span(
                d,
                "deviation applies to key_use rules: baselines are learned per key",
            ),
            None => {
                let known: Vec<&str> = Deviation::ALL.iter().map(|d| d.name()).collect();
                errors.span(
                    d,
                    format!(
                        "unknown deviation `{}` (expected one of {})",
                        d.value,
                        known.join(", ")
                    ),
                )
            }
        }
    }
    let threshold = match &r.threshold {
        Some(t) if t.value.count == 0 => {
            errors.span(
                t,
                "threshold count must be at least 1 (the rule fires above it)",
            );
            None
        }
        Some(t) if !(1..=3600).contains(&t.value.window_seconds) => {
            errors.span(t, "threshold window_seconds must be between 1 and 3600");
            None
        }
        Some(t) => Some(Threshold {
            count: t.value.count,
            window_ms: t.value.window_seconds as i64 * 1000,
        }),
        None => None,
    };

    let mut actions = Vec::new();
    if r.actions.is_empty() {
        errors.span(&r.id, format!("rule {id} has no actions"));
    }
    for a in &r.actions {
        let action = match a.value.as_str() {
            "alert" => Action::Alert,
            "kill" => Action::Kill,
            "block" => Action::Block,
            "rotate" => Action::Rotate,
            "revoke" => Action::Revoke,
            "deny" => {
                errors.span(
                    a,
                    "`deny` (fail the signing call, keep the process) is not available: no kernel keywarden supports lets a uprobe change registers or user memory; use kill",
                );
                continue;
            }
            other => {
                errors.span(
                    a,
                    format!(
                        "unknown action `{other}` (expected alert, kill, block, rotate or revoke)"
                    ),
                );
                continue;
            }
        };
        if actions.contains(&action) {
            errors.span(a, format!("action `{}` is listed twice", a.value));
        }
        match (action, event) {
            (Action::Block, Some(EventCode::SecretFileOpen)) => {
                if !r.matches.keys().any(|k| k.name == "file.path") {
                    errors.span(
                        a,
                        "block needs a `file.path` condition: it decides which files are guarded",
                    );
                }
            }
            (Action::Block, Some(_)) => errors.span(
                a,
                "block applies to secret_file_open rules; a key use is stopped with kill",
            ),
            _ => {}
        }
        actions.push(action);
    }
    let revoke_reason = match &r.revoke_reason {
        None => crate::remediation::DEFAULT_REVOKE_REASON,
        Some(s) if !actions.contains(&Action::Revoke) => {
            errors.span(s, "revoke_reason without a `revoke` action");
            crate::remediation::DEFAULT_REVOKE_REASON
        }
        Some(s) => match crate::remediation::revoke_reason(&s.value) {
            Some((name, _)) => name,
            None => {
                errors.span(
                    s,
                    format!(
                        "unknown revoke_reason `{}` (expected one of {})",
                        s.value,
                        crate::remediation::revoke_reason_names()
                    ),
                );
                crate::remediation::DEFAULT_REVOKE_REASON
            }
        },
    };
    let remediation = match &r.remediation {
        None => crate::remediation::Mode::Enforce,
        Some(s) if !actions.iter().any(|a| a.remediates()) => {
            errors.span(s, "remediation without a `rotate` or `revoke` action");
            crate::remediation::Mode::Enforce
        }
        Some(s) => crate::remediation::Mode::from_name(&s.value).unwrap_or_else(|| {
            errors.span(
                s,
                format!(
                    "unknown remediation `{}` (expected dry_run, approve or enforce)",
                    s.value
                ),
            );
            crate::remediation::Mode::Enforce
        }),
    };

    if errors.list.len() > before {
        return None;
    }
    Some(Rule {
        id,
        description: r.description,
        severity_id: severity?,
        event: event?,
        conditions,
        allow,
        deviations,
        threshold,
        actions,
        revoke_reason,
        remediation,
        source: format!("{}:{}", errors.file, r.id.referenced.line()),
    })
}
