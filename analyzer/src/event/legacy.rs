//! Events recorded before keywarden wrote strict OCSF 1.3.0, read again.
//!
//! Until then, keywarden's own attributes (`key`, `signature`, `cgroup`,
//! `secret_file`, `peer`, `local`) sat at the top level of an event, the
//! container beside the actor instead of in `actor.process`, a key use was
//! Module Activity 3 Invoke (which 1.3.0 does not have) and a coverage
//! warning was Module Activity 99. Those files still say
//! `"version": "1.3.0"`, so the shape tells them apart: `upgrade` moves
//! such an event's attributes to where they are now, and leaves an event
//! of the current shape alone. `keywarden analyze` reads its input through
//! it, so yesterday's recordings can still be replayed. Findings are not
//! upgraded: replay skips them.

use serde_json::{Map, Value, json};

/// Top-level attributes that moved under `unmapped`, unchanged.
const MOVED: &[&str] = &["key", "signature", "cgroup", "secret_file", "peer", "local"];

/// Rewrites `event` from the earlier shape to the current one, in place.
/// Returns whether it was of the earlier shape.
pub fn upgrade(event: &mut Value) -> bool {
    let Some(ev) = event.as_object_mut() else {
        return false;
    };
    let code = ev
        .get("metadata")
        .and_then(|m| m.get("event_code"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if code == "alert" {
        return false;
    }
    let old = MOVED.iter().any(|k| ev.contains_key(*k))
        || ev.contains_key("container")
        || ev.get("activity_id") == Some(&json!(3))
        || (code == "coverage_warning" && ev.get("class_uid") == Some(&json!(1005)));
    if !old {
        return false;
    }
    let mut unmapped = Map::new();
    for k in MOVED {
        if let Some(v) = ev.remove(*k) {
            unmapped.insert((*k).to_owned(), v);
        }
    }
    let process = ev
        .get_mut("actor")
        .and_then(|a| a.get_mut("process"))
        .and_then(Value::as_object_mut);
    if let Some(err) = process.and_then(|p| p.remove("attribution_error")) {
        unmapped.insert("attribution_error".into(), err);
    }
    // The container sat at the top level; it belongs to the process.
    if let Some(Value::Object(mut c)) = ev.remove("container") {
        let name = c.remove("pod_name");
        let namespace = c.remove("pod_namespace");
        if let (Some(name), Some(namespace)) = (name, namespace) {
            unmapped.insert("pod".into(), json!({"name": name, "namespace": namespace}));
        }
        if let Some(p) = ev
            .get_mut("actor")
            .and_then(|a| a.get_mut("process"))
            .and_then(Value::as_object_mut)
        {
            p.insert("container".into(), Value::Object(c));
        }
    }
    match code.as_str() {
        "key_use" => {
            ev.insert("activity_id".into(), json!(99));
            ev.insert("activity_name".into(), json!("Invoke"));
            ev.insert("type_uid".into(), json!(100599));
            ev.insert("type_name".into(), json!("Module Activity: Other"));
            if let Some(m) = ev.get_mut("module").and_then(Value::as_object_mut) {
                m.insert("load_type_id".into(), json!(0));
            }
        }
        "coverage_warning" => {
            ev.insert("class_uid".into(), json!(1008));
            ev.insert("class_name".into(), json!("Event Log Activity"));
            ev.insert("type_uid".into(), json!(100899));
            ev.insert("type_name".into(), json!("Event Log Activity: Other"));
            ev.insert("log_provider".into(), json!("keywarden"));
            if let Some(Value::Object(mut m)) = ev.remove("module")
                && let Some(file) = m.remove("file")
            {
                ev.insert("file".into(), file);
            }
        }
        "secret_file_open" => {
            let disposition = match ev.get("action_id").and_then(Value::as_u64) {
                Some(1) => Some((1, "Allowed")),
                Some(2) => Some((2, "Blocked")),
                _ => None,
            };
            if let Some((id, name)) = disposition {
                ev.insert("disposition_id".into(), json!(id));
                ev.insert("disposition".into(), json!(name));
                if let Some(profiles) = ev
                    .get_mut("metadata")
                    .and_then(|m| m.get_mut("profiles"))
                    .and_then(Value::as_array_mut)
                    && !profiles.contains(&json!("security_control"))
                {
                    profiles.push(json!("security_control"));
                }
            }
        }
        _ => {}
    }
    if !unmapped.is_empty() {
        ev.insert("unmapped".into(), Value::Object(unmapped));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, tests_support};

    /// An event of the current shape, written back in the earlier one.
    fn downgrade(ev: &Event) -> Value {
        let mut v = serde_json::to_value(ev).unwrap();
        let o = v.as_object_mut().unwrap();
        let mut unmapped = o.remove("unmapped").unwrap();
        let u = unmapped.as_object_mut().unwrap();
        for k in MOVED {
            if let Some(x) = u.remove(*k) {
                o.insert((*k).to_owned(), x);
            }
        }
        let process = o["actor"]["process"].as_object_mut().unwrap();
        let mut c = process.remove("container").unwrap();
        if let Some(pod) = u.remove("pod") {
            c["pod_name"] = pod["name"].clone();
            c["pod_namespace"] = pod["namespace"].clone();
        }
        if let Some(e) = u.remove("attribution_error") {
            process.insert("attribution_error".into(), e);
        }
        o.insert("container".into(), c);
        o.insert("activity_id".into(), json!(3));
        o.insert("activity_name".into(), json!("Invoke"));
        o.insert("type_uid".into(), json!(100503));
        o.insert("type_name".into(), json!("Module Activity: Invoke"));
        o["module"].as_object_mut().unwrap().remove("load_type_id");
        v
    }

    #[test]
    fn an_event_of_the_earlier_shape_reads_as_the_same_event() {
        let mut ev = tests_support::key_use_event();
        ev.unmapped.attribution_error = Some("executable hash: gone".into());
        let mut old = downgrade(&ev);
        assert!(old.get("key").is_some() && old.get("container").is_some());
        assert!(upgrade(&mut old));
        let back: Event = serde_json::from_value(old).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn an_event_of_the_current_shape_is_left_alone() {
        for ev in [
            tests_support::key_use_event(),
            tests_support::secret_open_event(),
        ] {
            let mut v = serde_json::to_value(&ev).unwrap();
            let before = v.clone();
            assert!(!upgrade(&mut v));
            assert_eq!(v, before);
        }
    }
}
