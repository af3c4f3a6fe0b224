//! The sensor's NDJSON output read as the analyzer's event model, and the
//! lookups the tests share. Every line must parse as an `Event` and write
//! back as the same JSON, so each test also checks the output against the
//! model (`docs/events.md`): a missing or mistyped field, or one the model
//! does not have, fails the test that read it.
//!
//! Accessors that a test needs to be there (`key_of`, `module_of`, ...)
//! panic with the whole event when it is not; those that return an
//! `Option` are for filters and comparisons.

use std::{io::Read, path::Path};

use serde::{Deserialize, Serialize};
use serde_json::Value;

// Each test uses some of these; an unused one is no mistake.
#[allow(unused_imports)]
pub use keywarden_analyzer::event::{
    Analysis, Event, EventCode, IdentifiedBy, KeyIdentity, KeyStatus, Module, NetworkEndpoint,
    Outcome, SecretFile, Verdict,
};

/// The events in the NDJSON file at `path` (none if it does not exist).
/// Every line must be whole: for a sensor that has stopped.
pub fn read_events(path: &Path) -> Vec<Event> {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        f.read_to_string(&mut text).unwrap();
    }
    parse_events(&text, &path.display().to_string())
}

/// The events a running sensor has written to `path` so far. Its output
/// is buffered, so a line may be half written when the file is read (seen
/// once, in `tar_pit_listeners_of_one_user_do_not_keep_another_users_server_unnamed`):
/// everything after the last newline is left for the next read.
pub fn read_events_so_far(path: &Path) -> Vec<Event> {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        f.read_to_string(&mut text).unwrap();
    }
    text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    parse_events(&text, &path.display().to_string())
}

/// NDJSON from `source` (a file, a command) as events.
pub fn parse_events(text: &str, source: &str) -> Vec<Event> {
    text.lines()
        .enumerate()
        .map(|(n, l)| {
            let value: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}"));
            event_from(value, &format!("{source}, line {}", n + 1))
        })
        .collect()
}

/// One exported event (`what` names it in failures) as an `Event`, checked
/// to write back as exactly the JSON it was read from.
pub fn event_from(value: Value, what: &str) -> Event {
    let event = Event::deserialize(&value)
        .unwrap_or_else(|e| panic!("{what} is not an Event: {e}\n{value:#}"));
    let back = serde_json::to_value(&event).expect("an Event serializes");
    if back != value {
        panic!(
            "{what} does not write back unchanged as an Event (a field the model \
             lacks, or one it fills that the sensor left out)\nread: {value:#}\n\
             written back: {back:#}"
        );
    }
    event
}

/// `v` as indented JSON, for failure messages.
pub fn pretty<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("<not serializable: {e}>"))
}

/// The events of one kind (`metadata.event_code`).
pub fn of_kind(events: &[Event], code: EventCode) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.metadata.event_code == code)
        .collect()
}

/// The events of one kind whose actor is process `pid`.
pub fn of_pid(events: &[Event], code: EventCode, pid: u32) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.metadata.event_code == code && e.actor.process.pid == pid)
        .collect()
}

pub fn key_uses(events: &[Event]) -> Vec<&Event> {
    of_kind(events, EventCode::KeyUse)
}

pub fn key_uses_of(events: &[Event], pid: u32) -> Vec<&Event> {
    of_pid(events, EventCode::KeyUse, pid)
}

/// Detection Findings (`alert`).
pub fn findings(events: &[Event]) -> Vec<&Event> {
    of_kind(events, EventCode::Alert)
}

pub fn findings_of(events: &[Event], pid: u32) -> Vec<&Event> {
    of_pid(events, EventCode::Alert, pid)
}

pub fn coverage_warnings(events: &[Event]) -> Vec<&Event> {
    of_kind(events, EventCode::CoverageWarning)
}

pub fn secret_opens_of(events: &[Event], pid: u32) -> Vec<&Event> {
    of_pid(events, EventCode::SecretFileOpen, pid)
}

/// The key an event names (`key`).
pub fn key_of(e: &Event) -> &KeyIdentity {
    e.unmapped
        .key
        .as_ref()
        .unwrap_or_else(|| panic!("no key: {}", pretty(e)))
}

/// `key.spki_sha256`, if the event has one.
pub fn spki_of(e: &Event) -> Option<&str> {
    e.unmapped
        .key
        .as_ref()
        .and_then(|k| k.spki_sha256.as_deref())
}

/// The library whose function was invoked (`module`).
pub fn module_of(e: &Event) -> &Module {
    e.module
        .as_ref()
        .unwrap_or_else(|| panic!("no module: {}", pretty(e)))
}

/// The details of a secret-file open (`secret_file`).
pub fn secret_of(e: &Event) -> &SecretFile {
    e.unmapped
        .secret_file
        .as_ref()
        .unwrap_or_else(|| panic!("no secret_file: {}", pretty(e)))
}

/// `file.path`: the file acted on, as the process saw it.
pub fn file_path_of(e: &Event) -> Option<&str> {
    e.file.as_ref().map(|f| f.path.as_str())
}

/// The first hash of the actor's executable
/// (`actor.process.file.hashes[0].value`, its SHA-256).
pub fn exe_hash_of(e: &Event) -> Option<&str> {
    e.actor
        .process
        .file
        .as_ref()
        .and_then(|f| f.hashes.first())
        .map(|h| h.value.as_str())
}

/// The other end of the connection: address and port.
pub fn peer_of(e: &Event) -> (&str, u16) {
    endpoint(e.unmapped.peer.as_ref(), "peer", e)
}

/// This host's end of the connection: address and port.
pub fn local_of(e: &Event) -> (&str, u16) {
    endpoint(e.unmapped.local.as_ref(), "local", e)
}

fn endpoint<'a>(end: Option<&'a NetworkEndpoint>, name: &str, e: &Event) -> (&'a str, u16) {
    let end = end.unwrap_or_else(|| panic!("no {name}: {}", pretty(e)));
    let port = end
        .port
        .unwrap_or_else(|| panic!("no {name} port: {}", pretty(e)));
    (end.ip.as_str(), port)
}

/// The id of the rule a finding names (`finding_info.analytic.uid`).
pub fn rule_of(f: &Event) -> Option<&str> {
    f.finding_info.as_ref().map(|i| i.analytic.uid.as_str())
}

/// Why a deviation or threshold rule fired (`analysis`).
pub fn analysis_of(f: &Event) -> &Analysis {
    f.unmapped
        .analysis
        .as_ref()
        .unwrap_or_else(|| panic!("no analysis: {}", pretty(f)))
}

/// What a finding's actions came to: `(action, outcome)` in order.
pub fn responses_of(f: &Event) -> Vec<(&str, Outcome)> {
    f.unmapped
        .responses
        .iter()
        .map(|r| (r.action.as_str(), r.outcome))
        .collect()
}

/// The event a finding matched (its first evidence), itself read and
/// checked as an `Event`.
pub fn evidence_of(f: &Event) -> Event {
    let first = f
        .evidences
        .first()
        .unwrap_or_else(|| panic!("no evidence: {}", pretty(f)));
    event_from(first.data.clone(), "the finding's evidence")
}
