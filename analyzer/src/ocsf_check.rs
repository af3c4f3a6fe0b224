//! Every kind of event the model builds, and every example in the docs,
//! validates against OCSF 1.3.0: the JSON Schema of its class, with the
//! profiles it lists, built from the official schema export by the pinned
//! PyPI `ocsf-json-schema` and checked with `jsonschema`
//! (`scripts/ocsf_validate.py`; scripts/bootstrap.sh installs both into
//! target/pyvenv). The live sensor's output is checked the same way by
//! `sensor/tests/ocsf.rs`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{
    docs_check::{self, Block},
    event::{
        Event, EventCode, OCSF_VERSION, Outcome, Response, RuleRef, Verdict, severity,
        tests_support::{self, origin},
    },
    pipeline::{self, Input, Overflow, Pipeline},
    rules::RuleSet,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `NAME="value"` in scripts/bootstrap.sh, which pins the validator.
fn bootstrap_pin(name: &str) -> String {
    let text = std::fs::read_to_string(workspace().join("scripts/bootstrap.sh")).unwrap();
    let prefix = format!("{name}=\"");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str())?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("scripts/bootstrap.sh pins no {name}"))
        .to_owned()
}

/// Runs the validator on `events` (one per line). `Ok` with its summary
/// when all are valid, `Err` with its report otherwise.
pub(crate) fn validate(events: &[Value]) -> Result<String, String> {
    let python = workspace().join("target/pyvenv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: scripts/bootstrap.sh creates it",
        python.display()
    );
    let pinned = bootstrap_pin("OCSF_JSON_SCHEMA_VERSION");
    let installed = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('ocsf-json-schema'))",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&installed.stdout).trim(),
        pinned,
        "target/pyvenv has another ocsf-json-schema than scripts/bootstrap.sh pins: run it again ({})",
        String::from_utf8_lossy(&installed.stderr)
    );
    let mut child = Command::new(&python)
        .arg(workspace().join("scripts/ocsf_validate.py"))
        .arg(OCSF_VERSION)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = String::new();
    for e in events {
        input.push_str(&serde_json::to_string(e).unwrap());
        input.push('\n');
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => Ok(report),
        Some(1) => Err(report),
        _ => panic!("the validator failed ({}):\n{report}", out.status),
    }
}

/// `validate`, failing with each event's kind beside its report.
fn assert_valid(what: &str, events: &[Event]) {
    let values: Vec<Value> = events
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    if let Err(report) = validate(&values) {
        let kinds: Vec<String> = events
            .iter()
            .enumerate()
            .map(|(i, e)| format!("line {}: {:?}", i + 1, e.metadata.event_code))
            .collect();
        panic!(
            "{what}: not valid OCSF {OCSF_VERSION}:\n{report}\n{}",
            kinds.join("\n")
        );
    }
}

/// A finding of `evidence` for each set of action outcomes the sensor can
/// report: every Security Control disposition keywarden writes.
fn findings_with_every_outcome(evidence: &Event) -> Vec<Event> {
    let rule = RuleRef {
        id: "r1".into(),
        description: None,
        severity_id: severity::CRITICAL,
        source: None,
    };
    let r = |action: &str, outcome: Outcome, detail: Option<&str>| Response {
        action: action.into(),
        outcome,
        detail: detail.map(str::to_owned),
    };
    let sets = [
        vec![r("alert", Outcome::Done, None)],
        vec![
            r("alert", Outcome::Done, None),
            r("kill", Outcome::InKernel, Some("SIGKILL as it entered")),
        ],
        vec![r("kill", Outcome::Done, Some("SIGKILL after the event"))],
        vec![r("kill", Outcome::Failed, Some("SIGKILL: ESRCH"))],
        vec![r("block", Outcome::Done, Some("open refused with EPERM"))],
        vec![r("alert", Outcome::Skipped, Some("replay: not enforced"))],
        vec![
            r("rotate", Outcome::Queued, Some("action 1-1: started")),
            r("revoke", Outcome::Skipped, Some("not started: cooldown")),
        ],
        Vec::new(),
    ];
    sets.into_iter()
        .enumerate()
        .map(|(i, responses)| {
            Event::detection_finding(&origin(), 9, 200 + i as u64, &rule, evidence, responses)
        })
        .collect()
}

#[test]
fn every_kind_of_event_the_model_builds_is_valid_ocsf() {
    let mut events = Vec::new();
    events.extend(docs_check::key_use_samples());
    events.extend(docs_check::secret_file_open_samples());
    events.extend(docs_check::coverage_warning_samples());
    events.extend(docs_check::remediation_samples());
    // A warning about nothing in particular: no process, no library.
    events.push(Event::coverage_warning(
        &origin(),
        1,
        2,
        None,
        None,
        "GeoIP database not reloaded".into(),
    ));
    events.extend(docs_check::alert_samples());
    for evidence in [
        tests_support::key_use_event(),
        tests_support::secret_open_event(),
    ] {
        events.extend(findings_with_every_outcome(&evidence));
    }
    // An open the guard allowed, and its finding.
    let mut allowed = tests_support::secret_open_event();
    let mut secret = allowed.unmapped.secret_file.take().unwrap();
    secret.verdict = Some(Verdict::Allowed);
    secret.rule = Some("r1".into());
    let allowed = Event::secret_file_open(
        &origin(),
        crate::event::SecretFileOpen {
            seq: 1,
            who: allowed.who(),
            file: allowed.file.clone().unwrap(),
            key: None,
            secret,
            result: Default::default(),
        },
    );
    assert_eq!(allowed.action_id, Some(1));
    events.extend(findings_with_every_outcome(&allowed));
    events.push(allowed);
    // Outside a container, and with no cgroup: no `container` profile.
    let mut bare = tests_support::key_use();
    bare.who.process.container = None;
    bare.who.pod = None;
    bare.who.cgroup = None;
    events.push(Event::key_use(&origin(), bare));

    let codes: std::collections::BTreeSet<String> = events
        .iter()
        .map(|e| format!("{:?}", e.metadata.event_code))
        .collect();
    assert_eq!(codes.len(), 5, "{codes:?}");
    assert_valid("the model's sample events", &events);
}

/// Findings as the pipeline makes them: with the `analysis` of a
/// deviation rule and of a threshold rule.
#[test]
fn findings_from_the_pipeline_are_valid_ocsf() {
    let rules = RuleSet::parse(
        "rules:\n  - id: new-binary\n    severity: high\n    event: key_use\n    deviation: [new_binary]\n    actions: [alert, kill]\n  - id: busy\n    severity: low\n    event: key_use\n    threshold: {count: 1, window_seconds: 600}\n    actions: [alert]\n",
        "t.yaml",
    )
    .unwrap();
    let p = Pipeline::start(
        rules,
        pipeline::Config {
            shards: 1,
            queue: 16,
            learning_ms: 60_000,
            overflow: Overflow::Block,
            geo: None,
            geo_cache: 0,
            baselines: Default::default(),
        },
    );
    let mut learn = tests_support::key_use_event();
    learn.time = 0;
    let mut evil = tests_support::key_use_event();
    evil.time = 120_000;
    evil.actor.process.file.as_mut().unwrap().hashes[0].value = "ee".repeat(32);
    for event in [learn, evil] {
        p.submit(Input {
            event,
            killed_by: None,
        })
        .unwrap();
    }
    let (out, _) = p.finish();
    let mut findings = Vec::new();
    for (i, o) in out.iter().enumerate() {
        for fired in &o.fired {
            let responses = vec![Response {
                action: "alert".into(),
                outcome: Outcome::Done,
                detail: None,
            }];
            findings.push(fired.finding(&origin(), 5, i as u64, &o.event, responses));
        }
    }
    let analysed = findings
        .iter()
        .filter(|f| f.unmapped.analysis.is_some())
        .count();
    assert!(
        analysed >= 2
            && findings
                .iter()
                .all(|f| f.metadata.event_code == EventCode::Alert),
        "expected a deviation and a threshold finding, got {}",
        serde_json::to_string_pretty(&findings).unwrap()
    );
    assert_valid("the pipeline's findings", &findings);
}

#[test]
fn every_json_example_in_the_docs_is_valid_ocsf() {
    let blocks: Vec<Block> = docs_check::doc_json_blocks();
    let mut values = Vec::new();
    for b in &blocks {
        let v: Value = serde_json::from_str(&b.text)
            .unwrap_or_else(|e| panic!("{}:{}: not valid JSON: {e}", b.file, b.line));
        values.push(v);
    }
    if let Err(report) = validate(&values) {
        let lines: Vec<String> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| format!("line {}: {}:{} ({})", i + 1, b.file, b.line, b.heading))
            .collect();
        panic!(
            "the docs' examples are not valid OCSF {OCSF_VERSION}:\n{report}\n{}",
            lines.join("\n")
        );
    }
}

/// The check can fail: the attributes that made keywarden's events invalid
/// before (an unknown top-level attribute, Module Activity's Invoke, a
/// module without its load type, Security Control attributes without the
/// profile) are each refused.
#[test]
fn the_validator_refuses_what_ocsf_1_3_0_does_not_allow() {
    let good = serde_json::to_value(tests_support::key_use_event()).unwrap();
    validate(std::slice::from_ref(&good)).expect("the sample is valid");
    let finding = serde_json::to_value(Event::detection_finding(
        &origin(),
        1,
        2,
        &RuleRef {
            id: "r".into(),
            description: None,
            severity_id: 3,
            source: None,
        },
        &tests_support::key_use_event(),
        Vec::new(),
    ))
    .unwrap();
    let broken: Vec<(&str, Value)> = vec![
        ("a top-level key", {
            let mut v = good.clone();
            v["key"] = v["unmapped"]["key"].clone();
            v
        }),
        ("activity 3 Invoke", {
            let mut v = good.clone();
            v["activity_id"] = json!(3);
            v["type_uid"] = json!(100503);
            v
        }),
        ("a module without load_type_id", {
            let mut v = good.clone();
            v["module"].as_object_mut().unwrap().remove("load_type_id");
            v
        }),
        ("a container outside the process", {
            let mut v = good.clone();
            v["container"] = v["actor"]["process"]["container"].clone();
            v
        }),
        ("action without the security_control profile", {
            let mut v = finding.clone();
            v["metadata"]["profiles"] = json!(["host", "container"]);
            v
        }),
        ("an invalid evidence", {
            let mut v = finding.clone();
            v["evidences"][0]["data"]["peer"] = json!({"ip": "192.0.2.1"});
            v
        }),
    ];
    for (what, v) in broken {
        let report =
            validate(std::slice::from_ref(&v)).expect_err(&format!("{what} passed the validator"));
        assert!(report.contains("1 invalid"), "{what}: {report}");
    }
}
