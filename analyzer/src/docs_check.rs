//! The documentation's view of the schema, checked against the code:
//!
//! * every JSON example in `docs/events.md` and the README is an event the
//!   model reads and writes back unchanged;
//! * the field tables of `docs/events.md` list exactly the fields the model
//!   writes, for each event kind;
//! * the field table of `docs/rules.md` lists exactly the fields a rule may
//!   match (`rules/fields.rs`), with their types and events.
//!
//! The code is the source of truth: when one of these fails, fix the docs
//! (or, for a field no sample writes, the samples here).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::{
    event::{
        Analysis, BaselineSnapshot, Event, EventCode, File, IdentifiedBy, KeyIdentity, OpenResult,
        Process, Remediation, RemediationStatus, Response, RuleRef, SecretFile, SecretFileOpen,
        User, severity,
        tests_support::{self, origin},
    },
    remediation::Mode,
    rules::fields::{FIELDS, Kind},
};

const EVENTS_MD: &str = include_str!("../../docs/events.md");
const README_MD: &str = include_str!("../../README.md");
const RULES_MD: &str = include_str!("../../docs/rules.md");

// ---------------------------------------------------------------------------
// Reading the Markdown

/// A fenced ```json block.
pub(crate) struct Block {
    pub file: &'static str,
    /// 1-based line of the opening fence.
    pub line: usize,
    /// The nearest heading above it.
    pub heading: String,
    pub text: String,
}

/// Every ```json block of docs/events.md, then of the README.
pub(crate) fn doc_json_blocks() -> Vec<Block> {
    let mut blocks = json_blocks("docs/events.md", EVENTS_MD);
    blocks.extend(json_blocks("README.md", README_MD));
    blocks
}

/// Every ```json block of `doc`. Other fenced blocks are skipped whole (a
/// `#` in them is not a heading).
fn json_blocks(file: &'static str, doc: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut in_fence = false;
    let mut open: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        if in_fence {
            if fence {
                in_fence = false;
                blocks.extend(open.take());
            } else if let Some(b) = open.as_mut() {
                b.text.push_str(line);
                b.text.push('\n');
            }
        } else if fence {
            in_fence = true;
            if line.trim() == "```json" {
                open = Some(Block {
                    file,
                    line: i + 1,
                    heading: heading.clone(),
                    text: String::new(),
                });
            }
        } else if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_owned();
        }
    }
    assert!(!in_fence, "{file}: a fenced block is not closed");
    blocks
}

/// The lines after the line `heading`, up to the next `## ` heading.
fn section<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = doc.lines().skip_while(|l| l.trim_end() != heading);
    assert!(
        lines.next().is_some(),
        "docs/events.md has no heading {heading:?}"
    );
    lines.take_while(|l| !l.starts_with("## ")).collect()
}

/// The trimmed cells of a table row (none for a line that is not one).
/// Cells are split at every `|`: right for the first cells, which is all
/// the tests read (a `\|` only occurs in the last).
fn cells(line: &str) -> Vec<&str> {
    let line = line.trim();
    if !line.starts_with('|') {
        return Vec::new();
    }
    line.trim_matches('|').split('|').map(str::trim).collect()
}

/// The body rows of the first table in `lines` whose header's first cell
/// is `first_header` (its `|---|` row left out).
fn table<'a>(lines: &[&'a str], first_header: &str) -> Vec<Vec<&'a str>> {
    let start = lines
        .iter()
        .position(|l| cells(l).first() == Some(&first_header))
        .unwrap_or_else(|| panic!("no table with a {first_header:?} column"));
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|l| cells(l))
        .filter(|row| {
            !row.iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        })
        .collect()
}

/// The field paths a first cell names: its `code` spans, leaving out
/// those in parentheses (value examples, as in "`key.status` (`identified`
/// or `unknown`)").
fn named_fields(cell: &str) -> Vec<String> {
    let mut outside = String::new();
    let mut depth = 0u32;
    for c in cell.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => outside.push(c),
            _ => {}
        }
    }
    outside
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// One row of a field table of `docs/events.md`.
struct Row {
    fields: Vec<String>,
    /// The second cell (a type, or for `coverage_warning` the value).
    second: String,
}

/// The rows of the field table under `heading` in `docs/events.md`.
fn field_rows(heading: &str) -> Vec<Row> {
    let lines = section(EVENTS_MD, heading);
    table(&lines, "Field")
        .into_iter()
        .map(|cells| Row {
            fields: named_fields(cells[0]),
            second: cells.get(1).copied().unwrap_or_default().to_owned(),
        })
        .collect()
}

fn paths_of(rows: &[Row]) -> BTreeSet<String> {
    rows.iter().flat_map(|r| r.fields.iter().cloned()).collect()
}

/// `path` is `field` or inside it.
fn is_within(path: &str, field: &str) -> bool {
    path.strip_prefix(field)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

// ---------------------------------------------------------------------------
// 1. The JSON examples

/// Where `doc` (an example) and `model` (the example after a trip through
/// `Event`) differ.
fn diff(path: &str, doc: &Value, model: &Value, out: &mut Vec<String>) {
    match (doc, model) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = join(path, k);
                match b.get(k) {
                    Some(vb) => diff(&p, va, vb, out),
                    None => out.push(format!(
                        "{p}: in the example, dropped by the model (no such field, or one \
                         the model omits when it has this value)"
                    )),
                }
            }
            for k in b.keys() {
                if !a.contains_key(k) {
                    out.push(format!(
                        "{}: written by the model, missing from the example",
                        join(path, k)
                    ));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if doc != model => out.push(format!(
            "{path}: the example has {doc}, the model writes {model}"
        )),
        _ => {}
    }
}

/// `original` read as an `Event` and written back, unchanged.
fn round_trip(what: &str, original: &Value) -> Result<Event, String> {
    let event: Event = serde_json::from_value(original.clone())
        .map_err(|e| format!("{what}: not an Event: {e}"))?;
    let back = serde_json::to_value(&event).expect("an Event serializes");
    let mut diffs = Vec::new();
    diff("", original, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(event)
    } else {
        Err(format!(
            "{what}: the model does not write the example back unchanged:\n  {}",
            diffs.join("\n  ")
        ))
    }
}

#[test]
fn every_json_example_in_the_docs_is_an_event_the_model_writes_back_unchanged() {
    let mut blocks = json_blocks("docs/events.md", EVENTS_MD);
    let in_events_md = blocks.len();
    blocks.extend(json_blocks("README.md", README_MD));
    assert!(
        in_events_md >= 4,
        "docs/events.md: {in_events_md} json blocks, expected an example per event kind"
    );
    assert!(blocks.len() > in_events_md, "README.md: no json block");

    let mut failures = Vec::new();
    let mut kinds = BTreeSet::new();
    for b in &blocks {
        let what = format!("{}:{} (json block under \"{}\")", b.file, b.line, b.heading);
        let original: Value = match serde_json::from_str(&b.text) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!(
                    "{what}: not valid JSON ({e}; lines counted from the line after the fence)"
                ));
                continue;
            }
        };
        match round_trip(&what, &original) {
            Ok(ev) => {
                kinds.insert(format!("{:?}", ev.metadata.event_code));
                // An alert's evidence is a whole event too.
                for (i, evidence) in ev.evidences.iter().enumerate() {
                    let what = format!("{what}, evidences[{i}].data");
                    if let Err(e) = round_trip(&what, &evidence.data) {
                        failures.push(e);
                    }
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(
        kinds.len(),
        4,
        "the examples should show every event kind; they show {kinds:?}"
    );
}

// ---------------------------------------------------------------------------
// 2. The field tables of docs/events.md

const KEY_USE_TABLE: &str = "## `key_use` fields";
const COVERAGE_WARNING_TABLE: &str = "## `coverage_warning` events";
const SECRET_FILE_OPEN_TABLE: &str = "## `secret_file_open` events";
const ALERT_TABLE: &str = "## `alert` events";
const REMEDIATION_TABLE: &str = "## `remediation` events";

/// Fields whose value is arbitrary data rather than schema, so paths stop
/// there. An alert's `evidences[].data` is the event the rule fired on,
/// "whole, exactly as it was written" (docs/events.md); its fields are
/// those of its own kind, checked through the samples of that kind.
const OPAQUE: &[&str] = &["evidences[].data"];

/// The JSON paths in `v`: objects add `.key`, arrays of objects add `[]`
/// (arrays of scalars are the path itself).
fn json_paths(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = join(prefix, k);
                if !OPAQUE.contains(&p.as_str()) {
                    json_paths(&p, x, out);
                }
                out.insert(p);
            }
        }
        Value::Array(items) => {
            for x in items.iter().filter(|x| x.is_object()) {
                json_paths(&format!("{prefix}[]"), x, out);
            }
        }
        _ => {}
    }
}

/// The paths the model writes for `events`, all of kind `kind`.
fn event_paths(kind: EventCode, events: &[Event]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ev in events {
        assert_eq!(ev.metadata.event_code, kind, "a sample of the wrong kind");
        json_paths("", &serde_json::to_value(ev).unwrap(), &mut out);
    }
    out
}

/// `key_use` events that between them fill every field.
pub(crate) fn key_use_samples() -> Vec<Event> {
    let full = tests_support::key_use_event();
    // A process a kill rule stopped before it signed: the sensor sets
    // `status_detail` on the event `Event::key_use` made.
    let mut killed = full.clone();
    killed.status_detail = Some(
        "killed (SIGKILL) before signing: rule r1 does not allow this process to use \
         the key it loaded from /etc/ssl/private/a.key"
            .into(),
    );
    // A failed call, whose key is unknown, by a process whose executable
    // could not be hashed.
    let mut u = tests_support::key_use();
    u.success = false;
    u.key = KeyIdentity::unknown("the signing call failed, so there is no signature to check");
    u.who.attribution_error = Some("executable hash: No such file or directory".into());
    let unknown = Event::key_use(&origin(), u);
    vec![full, killed, unknown]
}

/// `secret_file_open` events that between them fill every field.
pub(crate) fn secret_file_open_samples() -> Vec<Event> {
    let full = tests_support::secret_open_event();
    // An open a `block` rule denied, by a process whose cgroup path was not
    // found. The verdict goes in through JSON, as it is exported, so this
    // does not depend on how the model types it.
    let mut secret = serde_json::to_value(full.unmapped.secret_file.as_ref().unwrap()).unwrap();
    secret["verdict"] = json!("denied");
    secret["rule"] = json!("guarded-env");
    let secret: SecretFile = serde_json::from_value(secret).unwrap();
    let mut who = full.who();
    who.attribution_error = Some("cgroup 99 not found under cgroup2".into());
    let denied = Event::secret_file_open(
        &origin(),
        SecretFileOpen {
            seq: 9,
            who,
            file: full.file.clone().unwrap(),
            key: full.unmapped.key.clone(),
            secret,
            result: OpenResult::Unknown,
        },
    );
    assert!(denied.action.is_some(), "a verdict sets `action`");
    // A key file whose read missed its deadline: its key is unknown, with
    // the reason.
    let mut secret = full.unmapped.secret_file.clone().unwrap();
    secret.keys.clear();
    secret.holds_private_key = false;
    let late = Event::secret_file_open(
        &origin(),
        SecretFileOpen {
            seq: 10,
            who: full.who(),
            file: full.file.clone().unwrap(),
            key: Some(KeyIdentity::unknown(
                "the key file was not read: the read did not finish within 500 ms",
            )),
            secret,
            result: OpenResult::Succeeded,
        },
    );
    vec![full, denied, late]
}

/// A rotation done by a child process (everything a remediation carries)
/// and a revocation awaiting approval (nothing ran).
pub(crate) fn remediation_samples() -> Vec<Event> {
    let user = User {
        uid: "0".into(),
        name: None,
    };
    let done = Event::remediation(
        &origin(),
        1_764_000_009_000,
        20,
        "1764000008000-1",
        "3c9a1f2e-1763999400512-101",
        RemediationStatus::Done,
        "rotated and verified live".into(),
        Process {
            pid: 7101,
            name: "keywarden".into(),
            cmd_line: Some("/usr/bin/keywarden rotate --key 0eab35...".into()),
            user: user.clone(),
            ..Default::default()
        },
        Remediation {
            action: "rotate".into(),
            spki_sha256: "0eab356819ea6df95972a074d5a7bcb18cf75ef9124a4f89cb2e6f7d722bfd3f".into(),
            new_spki_sha256: Some(
                "5d2c4b1a0f3e6d7c8b9a0e1f2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a".into(),
            ),
            reason: None,
            rule: "rotate-on-new-binary".into(),
            mode: Mode::Enforce,
            log: vec!["verified: 127.0.0.1:443 presents the new key".into()],
        },
    );
    let pending = Event::remediation(
        &origin(),
        1_764_000_009_500,
        21,
        "1764000009400-2",
        "3c9a1f2e-1763999400512-102",
        RemediationStatus::AwaitingApproval,
        "awaiting approval: keywarden actions approve 1764000009400-2".into(),
        Process {
            pid: 4182,
            name: "keywarden".into(),
            user,
            ..Default::default()
        },
        Remediation {
            action: "revoke".into(),
            spki_sha256: "0eab356819ea6df95972a074d5a7bcb18cf75ef9124a4f89cb2e6f7d722bfd3f".into(),
            new_spki_sha256: None,
            reason: Some("keyCompromise".into()),
            rule: "revoke-on-new-country".into(),
            mode: Mode::Approve,
            log: Vec::new(),
        },
    );
    vec![done, pending]
}

/// A coverage warning about a library a process loaded: the most a
/// warning carries.
pub(crate) fn coverage_warning_samples() -> Vec<Event> {
    vec![Event::coverage_warning(
        &origin(),
        1_764_000_004_211,
        3,
        Some(Process {
            pid: 51007,
            ..Default::default()
        }),
        Some(File::regular("/opt/app/lib/libcrypto.so.3")),
        "/opt/app/lib/libcrypto.so.3: holds crypto code but is stripped".into(),
    )]
}

/// One finding per `key_use` and `secret_file_open` sample, with every
/// response field and an `analysis`.
pub(crate) fn alert_samples() -> Vec<Event> {
    let rule = RuleRef {
        id: "r1".into(),
        description: Some("Only nginx uses the TLS key".into()),
        severity_id: severity::HIGH,
        source: Some("/etc/keywarden/rules/r.yaml:2".into()),
    };
    // Through JSON, as exported, whatever type the model gives `outcome`.
    let responses = || -> Vec<Response> {
        serde_json::from_value(json!([
            {"action": "alert", "outcome": "done"},
            {"action": "kill", "outcome": "failed", "detail": "SIGKILL: ESRCH"}
        ]))
        .unwrap()
    };
    let evidences: Vec<Event> = key_use_samples()
        .into_iter()
        .chain(secret_file_open_samples())
        .collect();
    let mut findings = Vec::new();
    for (i, evidence) in evidences.iter().enumerate() {
        let mut finding =
            Event::detection_finding(&origin(), 5, 100 + i as u64, &rule, evidence, responses());
        finding.unmapped.analysis = Some(Analysis {
            deviations: vec!["new_country".into()],
            baseline: Some(BaselineSnapshot {
                spki_sha256: "ab".repeat(32),
                ..Default::default()
            }),
            count: Some(601),
            window_seconds: Some(60),
        });
        findings.push(finding);
    }
    findings
}

/// What differs between the documented and the written paths of `kind`.
fn compare(
    kind: &str,
    documented: &BTreeSet<String>,
    written: &BTreeSet<String>,
) -> Option<String> {
    let undocumented: Vec<&String> = written.difference(documented).collect();
    let unwritten: Vec<&String> = documented.difference(written).collect();
    if undocumented.is_empty() && unwritten.is_empty() {
        return None;
    }
    Some(format!(
        "{kind}:\n  written by the model, missing from its table in docs/events.md: \
         {undocumented:?}\n  in the table, written by no sample event: {unwritten:?}"
    ))
}

#[test]
fn the_field_tables_of_docs_events_md_list_exactly_the_fields_the_model_writes() {
    let key_use = paths_of(&field_rows(KEY_USE_TABLE));
    let secret_file_open = paths_of(&field_rows(SECRET_FILE_OPEN_TABLE));

    // "It shares the `key_use` fields above, with these differences": the
    // table adds and redefines fields, and its rows whose value starts with
    // "Absent" name fields a warning never has, nor anything inside them.
    let rows = field_rows(COVERAGE_WARNING_TABLE);
    let absent: Vec<String> = rows
        .iter()
        .filter(|r| r.second.starts_with("Absent"))
        .flat_map(|r| r.fields.iter().cloned())
        .collect();
    let mut coverage_warning: BTreeSet<String> = key_use.union(&paths_of(&rows)).cloned().collect();
    coverage_warning.retain(|p| !absent.iter().any(|a| is_within(p, a)));

    // "the objects copied from the evidence (`actor`, `unmapped.key`,
    // `unmapped.cgroup`, `unmapped.pod`, `unmapped.peer`, `unmapped.local`)
    // have the sub-fields described for the evidence's kind, as does
    // `evidences[].file` (the evidence's `file`), and `metadata` and
    // `device` those described for `key_use`".
    const COPIED: &[&str] = &[
        "actor",
        "unmapped.key",
        "unmapped.cgroup",
        "unmapped.pod",
        "unmapped.peer",
        "unmapped.local",
    ];
    let mut alert = paths_of(&field_rows(ALERT_TABLE));
    for p in key_use.iter().chain(&secret_file_open) {
        if COPIED.iter().any(|o| is_within(p, o)) {
            alert.insert(p.clone());
        }
    }
    for p in &secret_file_open {
        if is_within(p, "file") {
            alert.insert(format!("evidences[].{p}"));
        }
    }
    for p in &key_use {
        if is_within(p, "metadata") || is_within(p, "device") {
            alert.insert(p.clone());
        }
    }

    // The same form as a coverage warning's table.
    let rows = field_rows(REMEDIATION_TABLE);
    let absent: Vec<String> = rows
        .iter()
        .filter(|r| r.second.starts_with("Absent"))
        .flat_map(|r| r.fields.iter().cloned())
        .collect();
    let mut remediation: BTreeSet<String> = key_use.union(&paths_of(&rows)).cloned().collect();
    remediation.retain(|p| !absent.iter().any(|a| is_within(p, a)));

    let checks = [
        (
            "remediation",
            &remediation,
            event_paths(EventCode::Remediation, &remediation_samples()),
        ),
        (
            "key_use",
            &key_use,
            event_paths(EventCode::KeyUse, &key_use_samples()),
        ),
        (
            "coverage_warning",
            &coverage_warning,
            event_paths(EventCode::CoverageWarning, &coverage_warning_samples()),
        ),
        (
            "secret_file_open",
            &secret_file_open,
            event_paths(EventCode::SecretFileOpen, &secret_file_open_samples()),
        ),
        (
            "alert",
            &alert,
            event_paths(EventCode::Alert, &alert_samples()),
        ),
    ];
    let failures: Vec<String> = checks
        .iter()
        .filter_map(|(kind, documented, written)| compare(kind, documented, written))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The lines after the line `heading`, up to the next heading of any
/// level (a `###` section inside a `##` one).
fn subsection<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = doc.lines().skip_while(|l| l.trim_end() != heading);
    assert!(
        lines.next().is_some(),
        "docs/events.md has no heading {heading:?}"
    );
    lines.take_while(|l| !l.starts_with('#')).collect()
}

/// A reader who meets a `key.identified_by` value in an event finds it
/// explained: the table lists every value the model can write, in the
/// order of `IdentifiedBy::ALL`, and nothing else.
#[test]
fn the_identified_by_table_lists_exactly_the_values_the_model_writes() {
    // A new variant stops this match compiling: add it to `ALL` (and so to
    // the table) before making it compile again.
    for v in IdentifiedBy::ALL {
        match v {
            IdentifiedBy::SignatureVerified
            | IdentifiedBy::HandleCache
            | IdentifiedBy::KeyFile
            | IdentifiedBy::TlsCertificate
            | IdentifiedBy::EcdsaRecovered
            | IdentifiedBy::SigningCallKey => {}
        }
    }
    let documented: Vec<String> = table(&subsection(EVENTS_MD, "### `key.identified_by`"), "Value")
        .iter()
        .map(|row| row[0].trim_matches('`').to_owned())
        .collect();
    let written: Vec<String> = IdentifiedBy::ALL
        .iter()
        .map(|v| {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .expect("IdentifiedBy writes a string")
                .to_owned()
        })
        .collect();
    assert_eq!(
        documented, written,
        "the `key.identified_by` table of docs/events.md against IdentifiedBy::ALL"
    );
}

// ---------------------------------------------------------------------------
// 3. The field table of docs/rules.md

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "text",
        Kind::Path => "path",
        Kind::Sha256 => "sha256",
        Kind::Number => "number",
        Kind::Bool => "bool",
    }
}

/// As docs/rules.md writes a field's events: `all`, or their codes.
fn events_name(events: &[EventCode]) -> String {
    if events.is_empty() {
        return "all".to_owned();
    }
    events
        .iter()
        .map(|e| {
            serde_json::to_value(e)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn the_field_table_of_docs_rules_md_lists_exactly_the_fields_a_rule_can_match() {
    let lines: Vec<&str> = RULES_MD.lines().collect();
    let mut documented: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    for row in table(&lines, "field") {
        let kind = row.get(1).copied().unwrap_or_default();
        let events = row.get(2).copied().unwrap_or_default();
        let path = row.get(3).copied().unwrap_or_default().trim_matches('`');
        for name in named_fields(row[0]) {
            let twice = documented.insert(
                name.clone(),
                (kind.to_owned(), events.to_owned(), path.to_owned()),
            );
            assert!(twice.is_none(), "docs/rules.md lists {name} twice");
        }
    }
    let code: BTreeMap<String, (String, String, String)> = FIELDS
        .iter()
        .map(|f| {
            (
                f.name.to_owned(),
                (
                    kind_name(f.kind).to_owned(),
                    events_name(f.events),
                    f.path.to_owned(),
                ),
            )
        })
        .collect();

    let undocumented: Vec<&String> = code
        .keys()
        .filter(|n| !documented.contains_key(*n))
        .collect();
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|n| !code.contains_key(*n))
        .collect();
    let differ: Vec<String> = code
        .iter()
        .filter_map(|(name, c)| {
            let d = documented.get(name)?;
            (d != c).then(|| {
                format!(
                    "{name}: docs/rules.md says {} for {} at {}, rules/fields.rs {} for {} at {}",
                    d.0, d.1, d.2, c.0, c.1, c.2
                )
            })
        })
        .collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty() && differ.is_empty(),
        "the field table of docs/rules.md and rules/fields.rs differ:\n  \
         in rules/fields.rs, not in the table: {undocumented:?}\n  \
         in the table, not in rules/fields.rs: {unknown:?}\n  \
         type, events or path differ: {differ:?}"
    );
}
