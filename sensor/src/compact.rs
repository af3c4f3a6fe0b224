//! `--format compact`: one readable line per event, for a person at a
//! terminal (what `tetra getevents -o compact` and Falco's default output
//! are to theirs). NDJSON stays the format for machines.
//!
//! ```text
//! 2025-11-24T16:00:00.123Z key_use success nginx[48211] uid=101 key=0eab356819ea6df9 ecdsa-p256 via EVP_DigestSign peer=198.51.100.23:53122 DE
//! 2025-11-24T16:00:01.002Z alert high rule=tls-key-readers cat[5120] uid=1000 key=0eab356819ea6df9 file=/etc/ssl/private/tls.key
//! ```
//!
//! Time (UTC), kind, outcome (severity for findings, and the rule), the
//! process, the key (the first 16 hex digits of its SPKI SHA-256), the peer,
//! the file. Fields are read through the rule language's field table
//! (`rules::fields`), the one place that knows where each sits in the event,
//! so the line follows the event model wherever it moves them.
//!
//! A process controls its name, its path and the files it opens: the
//! line is escaped as log lines are (`logging::escape_line`), so a name
//! holding a newline or a terminal escape sequence cannot start a forged
//! line or rewrite the screen.

use std::fmt::Write as _;

use keywarden_analyzer::{
    event::{Event, EventCode},
    rules::fields::{self, Value},
};

/// The first value of rule field `name` in `ev`, as text.
fn field(ev: &Event, name: &str) -> Option<String> {
    let f = fields::lookup(name)?;
    let mut out = None;
    (f.visit)(ev, &mut |v| {
        out = Some(match v {
            Value::Str(s) => s.to_owned(),
            Value::Num(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
        });
        true
    });
    out
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of milliseconds since the epoch.
fn utc(ms: i64) -> String {
    let day = ms.div_euclid(86_400_000);
    let (y, m, d) = crate::lake::layout::civil_from_days(day);
    let in_day = ms.rem_euclid(86_400_000);
    let (h, min, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// The event as one line, newline included, escaped.
pub fn line(ev: &Event) -> Vec<u8> {
    let mut s = utc(ev.time);
    let code = ev.metadata.event_code;
    let kind = serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = write!(s, " {kind}");
    if code == EventCode::Alert {
        let _ = write!(s, " {}", ev.severity.to_ascii_lowercase());
        if let Some(info) = &ev.finding_info {
            let _ = write!(s, " rule={}", info.analytic.uid);
        }
    } else {
        // "Awaiting Approval" is one word here.
        let _ = write!(s, " {}", ev.status.to_ascii_lowercase().replace(' ', "_"));
    }
    let p = &ev.actor.process;
    if p.pid != 0 || !p.name.is_empty() {
        let _ = write!(s, " {}[{}]", p.name, p.pid);
        if !p.user.uid.is_empty() {
            let _ = write!(s, " uid={}", p.user.uid);
        }
    }
    if let Some(r) = &ev.unmapped.remediation {
        let spki = &r.spki_sha256;
        let _ = write!(s, " {} key={}", r.action, &spki[..spki.len().min(16)]);
    }
    if let Some(spki) = field(ev, "key.spki_sha256") {
        let _ = write!(s, " key={}", &spki[..spki.len().min(16)]);
        if let Some(alg) = field(ev, "key.algorithm") {
            let _ = write!(s, " {alg}");
        }
    } else if field(ev, "key.status").as_deref() == Some("unknown") {
        s.push_str(" key=unknown");
    }
    if code == EventCode::KeyUse
        && let Some(func) = field(ev, "module.function_name")
    {
        let _ = write!(s, " via {func}");
    }
    if let Some(ip) = field(ev, "peer.ip") {
        let ip = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        match field(ev, "peer.port") {
            Some(port) => {
                let _ = write!(s, " peer={ip}:{port}");
            }
            None => {
                let _ = write!(s, " peer={ip}");
            }
        }
        if let Some(c) = field(ev, "peer.location.country") {
            let _ = write!(s, " {c}");
        }
    }
    if let Some(path) = field(ev, "file.path") {
        let _ = write!(s, " file={path}");
    }
    if code == EventCode::CoverageWarning {
        let _ = write!(
            s,
            ": {}",
            ev.status_detail.as_deref().unwrap_or(&ev.message)
        );
    }
    s.push('\n');
    crate::logging::escape_line(s.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywarden_analyzer::event::{Origin, Process, User};

    fn origin() -> Origin {
        Origin {
            hostname: "h".into(),
            product_version: "0".into(),
            uid_prefix: "p".into(),
        }
    }

    #[test]
    fn times_are_utc_with_milliseconds() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(utc(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }

    #[test]
    fn a_warning_is_one_line_whatever_its_process_is_called() {
        let process = Process {
            pid: 7,
            tid: 7,
            name: "evil\n2025-11-24T16:00:00.000Z key_use success sshd[1]\x1b[2J".into(),
            user: User {
                uid: "65534".into(),
                name: None,
            },
            ..Process::default()
        };
        let ev = Event::coverage_warning(
            &origin(),
            1_764_000_000_123,
            1,
            Some(process),
            None,
            "cannot read /proc/7/maps\r".into(),
        );
        let text = String::from_utf8(line(&ev)).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(text.ends_with('\n'));
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text:?}");
        assert_eq!(
            text,
            "2025-11-24T16:00:00.123Z coverage_warning failure \
             evil\\x0a2025-11-24T16:00:00.000Z key_use success sshd[1]\\x1b[2J[7] uid=65534: \
             cannot read /proc/7/maps\\x0d\n"
        );
    }
}
