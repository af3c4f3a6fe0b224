//! The event fields a rule may name, typed, with the event classes that
//! carry them.
//!
//! Names are short and stable (`key.spki_sha256`, `container.uid`): the
//! dotted JSON paths of the events before they were strict OCSF, which
//! existing rules use. Each entry also says where the field is in the
//! exported event now (`unmapped.key.spki_sha256`,
//! `actor.process.container.uid`, `docs/events.md`). The table is the
//! single place a rule touches the event structs: a rule naming a field
//! that is not here is rejected when it is loaded, a test checks every
//! entry's path against a serialized event, and another that
//! docs/rules.md shows the same names and paths.

use crate::event::{Event, EventCode};

/// How a rule value is compared with the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Exact string equality.
    Text,
    /// A path: rule values are globs (`**` crosses directories).
    Path,
    /// Lowercase hex SHA-256; rule values must be 64 hex digits.
    Sha256,
    /// An unsigned integer.
    Number,
    /// `true` or `false`.
    Bool,
}

/// One value read from an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Str(&'a str),
    Num(u64),
    Bool(bool),
}

/// Calls `f` on each value of the field (none when absent, several for a
/// list) until it returns true; returns whether any did.
pub type Visit = fn(&Event, &mut dyn FnMut(Value<'_>) -> bool) -> bool;

pub struct Field {
    /// The name a rule uses: short and stable, whatever the event's shape.
    pub name: &'static str,
    /// Where the field is in the exported event (dotted JSON path; a list
    /// is walked into). docs/rules.md shows the same table.
    pub path: &'static str,
    pub kind: Kind,
    /// Event classes that carry the field; empty means every class.
    pub events: &'static [EventCode],
    pub visit: Visit,
}

const KEY_USE: &[EventCode] = &[EventCode::KeyUse];
const SECRET: &[EventCode] = &[EventCode::SecretFileOpen];
const KEYED: &[EventCode] = &[EventCode::KeyUse, EventCode::SecretFileOpen];
const ALL: &[EventCode] = &[];

fn one<'a>(v: Option<Value<'a>>, f: &mut dyn FnMut(Value<'_>) -> bool) -> bool {
    v.is_some_and(f)
}

macro_rules! field {
    ($name:literal, $path:literal, $kind:ident, $events:expr, |$e:ident| $get:expr) => {
        Field {
            name: $name,
            path: $path,
            kind: Kind::$kind,
            events: $events,
            visit: |$e, f| one($get, f),
        }
    };
}

/// Every field a rule can match.
pub static FIELDS: &[Field] = &[
    field!("actor.process.pid", "actor.process.pid", Number, ALL, |e| {
        Some(Value::Num(e.actor.process.pid as u64))
    }),
    field!("actor.process.name", "actor.process.name", Text, ALL, |e| {
        Some(Value::Str(&e.actor.process.name))
    }),
    field!(
        "actor.process.cmd_line",
        "actor.process.cmd_line",
        Text,
        ALL,
        |e| e.actor.process.cmd_line.as_deref().map(Value::Str)
    ),
    field!(
        "actor.process.file.path",
        "actor.process.file.path",
        Path,
        ALL,
        |e| e.actor.process.file.as_ref().map(|f| Value::Str(&f.path))
    ),
    field!(
        "actor.process.file.name",
        "actor.process.file.name",
        Text,
        ALL,
        |e| e.actor.process.file.as_ref().map(|f| Value::Str(&f.name))
    ),
    field!(
        "actor.process.file.hashes.value",
        "actor.process.file.hashes.value",
        Sha256,
        ALL,
        |e| e
            .actor
            .process
            .file
            .as_ref()
            .and_then(|f| f.hashes.first())
            .map(|h| Value::Str(&h.value))
    ),
    field!(
        "actor.process.user.uid",
        "actor.process.user.uid",
        Number,
        ALL,
        |e| e.actor.process.user.uid.parse().ok().map(Value::Num)
    ),
    field!(
        "actor.process.user.name",
        "actor.process.user.name",
        Text,
        ALL,
        |e| e.actor.process.user.name.as_deref().map(Value::Str)
    ),
    field!(
        "container.uid",
        "actor.process.container.uid",
        Text,
        ALL,
        |e| e
            .actor
            .process
            .container
            .as_ref()
            .map(|c| Value::Str(&c.uid))
    ),
    field!(
        "container.runtime",
        "actor.process.container.runtime",
        Text,
        ALL,
        |e| e
            .actor
            .process
            .container
            .as_ref()
            .map(|c| Value::Str(&c.runtime))
    ),
    field!(
        "container.pod_uuid",
        "actor.process.container.pod_uuid",
        Text,
        ALL,
        |e| e
            .actor
            .process
            .container
            .as_ref()
            .and_then(|c| c.pod_uuid.as_deref())
            .map(Value::Str)
    ),
    field!(
        "container.name",
        "actor.process.container.name",
        Text,
        ALL,
        |e| e
            .actor
            .process
            .container
            .as_ref()
            .and_then(|c| c.name.as_deref())
            .map(Value::Str)
    ),
    field!("container.pod_name", "unmapped.pod.name", Text, ALL, |e| e
        .unmapped
        .pod
        .as_ref()
        .map(|p| Value::Str(&p.name))),
    field!(
        "container.pod_namespace",
        "unmapped.pod.namespace",
        Text,
        ALL,
        |e| e.unmapped.pod.as_ref().map(|p| Value::Str(&p.namespace))
    ),
    field!("cgroup.path", "unmapped.cgroup.path", Path, ALL, |e| e
        .unmapped
        .cgroup
        .as_ref()
        .and_then(|c| c.path.as_deref())
        .map(Value::Str)),
    field!("device.hostname", "device.hostname", Text, ALL, |e| Some(
        Value::Str(&e.device.hostname)
    )),
    field!("status", "status", Text, ALL, |e| Some(Value::Str(
        &e.status
    ))),
    field!("key.status", "unmapped.key.status", Text, KEYED, |e| e
        .unmapped
        .key
        .as_ref()
        .map(|k| {
            Value::Str(match k.status {
                crate::event::KeyStatus::Identified => "identified",
                crate::event::KeyStatus::Unknown => "unknown",
            })
        })),
    field!(
        "key.spki_sha256",
        "unmapped.key.spki_sha256",
        Sha256,
        KEYED,
        |e| e
            .unmapped
            .key
            .as_ref()
            .and_then(|k| k.spki_sha256.as_deref())
            .map(Value::Str)
    ),
    field!(
        "key.algorithm",
        "unmapped.key.algorithm",
        Text,
        KEYED,
        |e| e
            .unmapped
            .key
            .as_ref()
            .and_then(|k| k.algorithm.as_deref())
            .map(Value::Str)
    ),
    field!("key.bits", "unmapped.key.bits", Number, KEYED, |e| e
        .unmapped
        .key
        .as_ref()
        .and_then(|k| k.bits)
        .map(|b| Value::Num(b as u64))),
    field!(
        "key.source_file",
        "unmapped.key.source_file",
        Path,
        KEYED,
        |e| e
            .unmapped
            .key
            .as_ref()
            .and_then(|k| k.source_file.as_deref())
            .map(Value::Str)
    ),
    field!("module.file.path", "module.file.path", Path, KEY_USE, |e| e
        .module
        .as_ref()
        .map(|m| Value::Str(&m.file.path))),
    field!(
        "module.function_name",
        "module.function_name",
        Text,
        KEY_USE,
        |e| e.module.as_ref().map(|m| Value::Str(&m.function_name))
    ),
    field!("module.type", "module.type", Text, KEY_USE, |e| e
        .module
        .as_ref()
        .map(|m| Value::Str(&m.kind))),
    field!(
        "signature.digest",
        "unmapped.signature.digest",
        Text,
        KEY_USE,
        |e| e
            .unmapped
            .signature
            .as_ref()
            .and_then(|s| s.digest.as_deref())
            .map(Value::Str)
    ),
    field!(
        "signature.length",
        "unmapped.signature.length",
        Number,
        KEY_USE,
        |e| e.unmapped.signature.as_ref().map(|s| Value::Num(s.length))
    ),
    field!("peer.ip", "unmapped.peer.ip", Text, KEY_USE, |e| e
        .unmapped
        .peer
        .as_ref()
        .map(|p| Value::Str(&p.ip))),
    field!("peer.port", "unmapped.peer.port", Number, KEY_USE, |e| e
        .unmapped
        .peer
        .as_ref()
        .and_then(|p| p.port)
        .map(|p| Value::Num(p as u64))),
    field!("local.ip", "unmapped.local.ip", Text, KEY_USE, |e| e
        .unmapped
        .local
        .as_ref()
        .map(|p| Value::Str(&p.ip))),
    field!("local.port", "unmapped.local.port", Number, KEY_USE, |e| e
        .unmapped
        .local
        .as_ref()
        .and_then(|p| p.port)
        .map(|p| Value::Num(p as u64))),
    field!(
        "peer.location.country",
        "unmapped.peer.location.country",
        Text,
        KEY_USE,
        |e| e
            .unmapped
            .peer
            .as_ref()
            .and_then(|p| p.location.as_ref())
            .and_then(|l| l.country.as_deref())
            .map(Value::Str)
    ),
    field!(
        "peer.location.city",
        "unmapped.peer.location.city",
        Text,
        KEY_USE,
        |e| e
            .unmapped
            .peer
            .as_ref()
            .and_then(|p| p.location.as_ref())
            .and_then(|l| l.city.as_deref())
            .map(Value::Str)
    ),
    field!(
        "peer.autonomous_system.number",
        "unmapped.peer.autonomous_system.number",
        Number,
        KEY_USE,
        |e| e
            .unmapped
            .peer
            .as_ref()
            .and_then(|p| p.autonomous_system.as_ref())
            .map(|a| Value::Num(a.number as u64))
    ),
    field!(
        "peer.autonomous_system.name",
        "unmapped.peer.autonomous_system.name",
        Text,
        KEY_USE,
        |e| e
            .unmapped
            .peer
            .as_ref()
            .and_then(|p| p.autonomous_system.as_ref())
            .and_then(|a| a.name.as_deref())
            .map(Value::Str)
    ),
    field!("file.path", "file.path", Path, SECRET, |e| e
        .file
        .as_ref()
        .map(|f| Value::Str(&f.path))),
    field!("file.name", "file.name", Text, SECRET, |e| e
        .file
        .as_ref()
        .map(|f| Value::Str(&f.name))),
    field!(
        "secret_file.host_path",
        "unmapped.secret_file.host_path",
        Path,
        SECRET,
        |e| e
            .unmapped
            .secret_file
            .as_ref()
            .and_then(|s| s.host_path.as_deref())
            .map(Value::Str)
    ),
    field!(
        "secret_file.matched",
        "unmapped.secret_file.matched",
        Text,
        SECRET,
        |e| e
            .unmapped
            .secret_file
            .as_ref()
            .map(|s| Value::Str(&s.matched))
    ),
    field!(
        "secret_file.holds_private_key",
        "unmapped.secret_file.holds_private_key",
        Bool,
        SECRET,
        |e| e
            .unmapped
            .secret_file
            .as_ref()
            .map(|s| Value::Bool(s.holds_private_key))
    ),
    Field {
        name: "secret_file.keys",
        path: "unmapped.secret_file.keys",
        kind: Kind::Sha256,
        events: SECRET,
        visit: |e, f| {
            e.unmapped
                .secret_file
                .as_ref()
                .is_some_and(|s| s.keys.iter().any(|k| f(Value::Str(k))))
        },
    },
];

pub fn lookup(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

impl Field {
    pub fn applies_to(&self, event: EventCode) -> bool {
        self.events.is_empty() || self.events.contains(&event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests_support::{key_use_event, secret_open_event};

    /// Walks a dotted path through JSON, descending into arrays.
    fn present(v: &serde_json::Value, path: &[&str]) -> bool {
        match (v, path.split_first()) {
            (_, None) => !v.is_null(),
            (serde_json::Value::Array(items), Some(_)) => items.iter().any(|i| present(i, path)),
            (serde_json::Value::Object(m), Some((head, rest))) => {
                m.get(*head).is_some_and(|x| present(x, rest))
            }
            _ => false,
        }
    }

    #[test]
    fn every_field_exists_in_the_events_that_carry_it_and_reads_the_same_value() {
        let samples = [key_use_event(), secret_open_event()];
        for field in FIELDS {
            let mut checked = false;
            for ev in &samples {
                if !field.applies_to(ev.metadata.event_code) {
                    continue;
                }
                let json = serde_json::to_value(ev).unwrap();
                let path: Vec<&str> = field.path.split('.').collect();
                assert!(
                    present(&json, &path),
                    "{} ({}) missing from {:?}",
                    field.name,
                    field.path,
                    ev.metadata.event_code
                );
                // The accessor sees a value too (the samples fill every field).
                assert!(
                    (field.visit)(ev, &mut |_| true),
                    "{} reads nothing",
                    field.name
                );
                checked = true;
            }
            assert!(checked, "{} applies to no sample event", field.name);
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in FIELDS.iter().enumerate() {
            assert!(
                FIELDS[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
    }
}
