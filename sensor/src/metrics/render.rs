//! The text exposition format (version 0.0.4) of a `Snapshot`: the
//! families, their help and type lines, and the escaping of label values
//! and help texts (`escape_label`), so that no value can break the format.
//!
//! Apart from `metrics` (the counts and their publication) and `endpoint`
//! (the HTTP side): this is what a scrape's body is, and nothing else.

use std::{borrow::Cow, fmt::Write as _};

use keywarden_probe_types::stats;

use super::{ACTION_OUTCOMES, ACTIONS, CLASS_OUTCOMES, CLASSES, Snapshot, outcome_name};

/// The type of a metric family.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// The text exposition format, family by family.
#[derive(Default)]
struct Text {
    out: String,
}

impl Text {
    /// A family's `# HELP` and `# TYPE` lines; its samples follow.
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value as the text format writes it: backslash, double quote and
/// line feed escaped. Rule ids cannot hold them today; the format must stay
/// whole whatever a label is given tomorrow.
fn escape_label(v: &str) -> Cow<'_, str> {
    escape(v, true)
}

/// A help text: backslash and line feed escaped (quotes are literal there).
fn escape_help(v: &str) -> Cow<'_, str> {
    escape(v, false)
}

fn escape(v: &str, quote: bool) -> Cow<'_, str> {
    if !v.contains(['\\', '\n']) && !(quote && v.contains('"')) {
        return Cow::Borrowed(v);
    }
    let mut s = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '"' if quote => s.push_str("\\\""),
            c => s.push(c),
        }
    }
    Cow::Owned(s)
}

impl Snapshot {
    /// The exposition text, with the resident set size `rss` (bytes; left
    /// out when it could not be read). The families and their order are
    /// `docs/metrics.md`'s table.
    pub(super) fn render(&self, rss: Option<u64>) -> String {
        use Kind::{Counter, Gauge};
        let mut t = Text::default();

        let name = "keywarden_events_total";
        t.family(
            name,
            Counter,
            "Events the sensor produced, by class (metadata.event_code) and outcome (status, in lower case).",
        );
        for (c, &class) in CLASSES.iter().enumerate() {
            for (slot, &n) in self.tally.events[c].iter().enumerate() {
                if n > 0 || CLASS_OUTCOMES[c].contains(&slot) {
                    let outcome = outcome_name(c, slot);
                    t.sample(name, &[("class", class), ("outcome", outcome)], n);
                }
            }
        }
        t.single(
            "keywarden_events_written_total",
            Counter,
            "Events (lines) the output thread wrote.",
            self.written,
        );

        let name = "keywarden_shed_events_total";
        t.family(
            name,
            Counter,
            "Events shed under load, by cause (docs/events.md, Loss under load).",
        );
        let s = &self.shed;
        for (cause, n) in [
            ("ring_buffer", s.ring()),
            ("kernel_skipped", s.kernel_skipped),
            ("coalescer", s.coalescer),
            ("analyzer_queue", s.analyzer),
            ("guard_queue", s.guard),
            ("sink_backlog", s.sink),
            ("parquet_backlog", s.parquet_backlog),
            ("parquet_write", s.parquet_write),
        ] {
            t.sample(name, &[("cause", cause)], n);
        }
        let name = "keywarden_ring_buffer_lost_records_total";
        t.family(
            name,
            Counter,
            "Probe records the full ring buffer refused, by record kind (unread_at_exit: still arriving when the sensor stopped reading).",
        );
        for (record, n) in [
            ("signature", s.ring_sign),
            ("signed_data", s.ring_data),
            ("process_file", s.ring_other),
            ("unread_at_exit", s.ring_unread),
        ] {
            t.sample(name, &[("record", record)], n);
        }
        let name = "keywarden_signed_data_incomplete_total";
        t.family(
            name,
            Counter,
            "Signed data the probes could not capture whole: longer than the capture (truncated) or not readable from the process (unreadable).",
        );
        for (reason, slot) in [
            ("truncated", stats::CAPTURE_TRUNCATED),
            ("unreadable", stats::DATA_UNREADABLE),
        ] {
            t.sample(name, &[("reason", reason)], self.kernel[slot as usize]);
        }
        let name = "keywarden_key_reads_lost_total";
        t.family(
            name,
            Counter,
            "Key files opened but not read: the reader's queue was full (shed) or the read passed its deadline (abandoned).",
        );
        t.sample(name, &[("reason", "shed")], self.key_reads.shed);
        t.sample(name, &[("reason", "abandoned")], self.key_reads.abandoned);

        t.single(
            "keywarden_coverage_warnings_total",
            Counter,
            "Coverage warnings: what the sensor could not cover, attribute or report, each also a coverage_warning event.",
            self.tally.coverage_warnings(),
        );
        t.single(
            "keywarden_attached_libraries",
            Gauge,
            "Files (libraries and programs) with signing code the probes are attached to.",
            self.libraries,
        );
        t.single(
            "keywarden_attached_functions",
            Gauge,
            "Functions probed in those files.",
            self.functions,
        );
        t.single(
            "keywarden_key_verifications_total",
            Counter,
            "Public-key operations (verifications, ECDSA recoveries) run to identify which key signed.",
            self.verifications,
        );

        let name = "keywarden_key_uses_by_key_total";
        t.family(
            name,
            Counter,
            "Key uses (key_use events) by key: the first 16 hex digits of its SPKI SHA-256, or unknown; at most 100 keys, the rest under (other).",
        );
        for (key, n) in &self.tally.by_key {
            t.sample(name, &[("key", key.as_str())], *n);
        }
        let name = "keywarden_key_uses_by_process_total";
        t.family(
            name,
            Counter,
            "Key uses (key_use events) by process name (comm); at most 100 names, the rest under (other).",
        );
        for (process, n) in &self.tally.by_process {
            t.sample(name, &[("process", process.as_str())], *n);
        }

        let name = "keywarden_findings_total";
        t.family(name, Counter, "Findings (alert events), by rule id.");
        for (rule, n) in &self.tally.findings {
            t.sample(name, &[("rule", rule.as_str())], *n);
        }
        let name = "keywarden_actions_total";
        t.family(
            name,
            Counter,
            "Actions of the rules that fired, by action and outcome (the responses of findings).",
        );
        for (a, action) in ACTIONS.iter().enumerate() {
            for (o, &outcome) in ACTION_OUTCOMES.iter().enumerate() {
                let n = self.tally.actions[a][o];
                t.sample(name, &[("action", action.name()), ("outcome", outcome)], n);
            }
        }

        let queues = self.queues.named();
        let name = "keywarden_queue_depth";
        t.family(
            name,
            Gauge,
            "Items waiting in each queue between the sensor's threads.",
        );
        for (queue, q) in queues {
            t.sample(name, &[("queue", queue)], q.depth);
        }
        let name = "keywarden_queue_capacity";
        t.family(
            name,
            Gauge,
            "Items each queue holds at most (the output backlog is bounded in bytes instead).",
        );
        for (queue, q) in queues {
            if let Some(capacity) = q.capacity {
                t.sample(name, &[("queue", queue)], capacity);
            }
        }
        t.single(
            "keywarden_sink_backlog_bytes",
            Gauge,
            "Bytes of output waiting for the output thread.",
            self.sink_backlog_bytes,
        );
        t.single(
            "keywarden_sink_backlog_limit_bytes",
            Gauge,
            "Bytes of output the backlog holds at most before events are shed.",
            crate::sink::BACKLOG_BYTES as u64,
        );

        let lake = self.parquet.unwrap_or_default();
        t.single(
            "keywarden_parquet_files_total",
            Counter,
            "Parquet files written (renamed into place) under --parquet DIR.",
            lake.files,
        );
        t.single(
            "keywarden_parquet_rows_total",
            Counter,
            "Events (rows) in those files.",
            lake.rows,
        );
        t.single(
            "keywarden_parquet_bytes_total",
            Counter,
            "Bytes of those files.",
            lake.bytes,
        );
        let name = "keywarden_parquet_temp_files_total";
        t.family(
            name,
            Counter,
            "Temporary Parquet files a killed sensor left, found at start: finished (complete, renamed) or discarded (cut short, removed).",
        );
        t.sample(name, &[("outcome", "finished")], lake.temp_finished);
        t.sample(name, &[("outcome", "discarded")], lake.temp_discarded);
        t.single(
            "keywarden_parquet_queue_depth",
            Gauge,
            "Events waiting for the Parquet writer (at most 8192; past it they are shed, cause parquet_backlog).",
            lake.queued,
        );

        let name = "keywarden_resident_memory_bytes";
        t.family(name, Gauge, "The sensor's resident set size.");
        if let Some(rss) = rss {
            t.sample(name, &[], rss);
        }
        t.out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{
        super::{Queue, Queues, tests::samples},
        *,
    };
    use crate::run::shedding::Shed;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("plain-rule.1"), "plain-rule.1");
        assert!(matches!(escape_label("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_help("say \"hi\"\\\n"), "say \"hi\"\\\\\\n");
        let mut t = Text::default();
        t.family("m_total", Kind::Counter, "line one\nline two");
        t.sample("m_total", &[("rule", "x\"}\n# TYPE y gauge")], 3);
        assert_eq!(
            t.out,
            "# HELP m_total line one\\nline two\n\
             # TYPE m_total counter\n\
             m_total{rule=\"x\\\"}\\n# TYPE y gauge\"} 3\n"
        );
        assert_eq!(t.out.lines().count(), 3, "no value can add a line");
    }

    #[test]
    fn a_counter_and_a_gauge_have_help_type_and_samples() {
        let mut t = Text::default();
        t.family("k_events_total", Kind::Counter, "Events.");
        t.sample("k_events_total", &[("class", "a"), ("outcome", "b")], 7);
        t.single("k_depth", Kind::Gauge, "Depth.", 0);
        assert_eq!(
            t.out,
            "# HELP k_events_total Events.\n\
             # TYPE k_events_total counter\n\
             k_events_total{class=\"a\",outcome=\"b\"} 7\n\
             # HELP k_depth Depth.\n\
             # TYPE k_depth gauge\n\
             k_depth 0\n"
        );
    }

    #[test]
    fn shed_queues_and_kernel_counts_are_rendered() {
        let mut kernel = [0u64; stats::SLOTS as usize];
        kernel[stats::CAPTURE_TRUNCATED as usize] = 4;
        let snapshot = Snapshot {
            shed: Shed {
                ring_sign: 1,
                ring_data: 2,
                coalescer: 3,
                kernel_skipped: 6,
                ..Shed::default()
            },
            kernel,
            queues: Queues {
                analyzer_input: Queue::new(5, Some(8192)),
                sink_backlog: Queue::new(9, None),
                ..Queues::default()
            },
            libraries: 2,
            functions: 19,
            ..Snapshot::default()
        };
        let s = samples(&snapshot.render(None));
        let at = |series: &str| s.get(series).copied();
        assert_eq!(
            at(r#"keywarden_shed_events_total{cause="ring_buffer"}"#),
            Some(3)
        );
        assert_eq!(
            at(r#"keywarden_shed_events_total{cause="coalescer"}"#),
            Some(3)
        );
        assert_eq!(
            at(r#"keywarden_shed_events_total{cause="kernel_skipped"}"#),
            Some(6)
        );
        assert_eq!(
            at(r#"keywarden_ring_buffer_lost_records_total{record="signed_data"}"#),
            Some(2)
        );
        assert_eq!(
            at(r#"keywarden_signed_data_incomplete_total{reason="truncated"}"#),
            Some(4)
        );
        assert_eq!(
            at(r#"keywarden_queue_depth{queue="analyzer_input"}"#),
            Some(5)
        );
        assert_eq!(
            at(r#"keywarden_queue_capacity{queue="analyzer_input"}"#),
            Some(8192)
        );
        assert_eq!(
            at(r#"keywarden_queue_depth{queue="sink_backlog"}"#),
            Some(9)
        );
        assert_eq!(
            at(r#"keywarden_queue_capacity{queue="sink_backlog"}"#),
            None
        );
        assert_eq!(at("keywarden_attached_libraries"), Some(2));
        assert_eq!(at("keywarden_attached_functions"), Some(19));
        assert_eq!(
            at("keywarden_resident_memory_bytes"),
            None,
            "unreadable: no sample"
        );
    }

    /// `docs/metrics.md` lists exactly the families a scrape has, with
    /// their types, in the same order.
    #[test]
    fn the_documented_metrics_are_the_rendered_ones() {
        let doc = include_str!("../../../docs/metrics.md");
        let documented: Vec<(String, String)> = doc
            .lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix("| `keywarden_")?.split('|');
                let name = cells.next()?.trim().trim_end_matches('`');
                let kind = cells.next()?.trim().to_owned();
                Some((format!("keywarden_{name}"), kind))
            })
            .collect();
        let rendered: Vec<(String, String)> = Snapshot::default()
            .render(Some(1))
            .lines()
            .filter_map(|l| {
                let (name, kind) = l.strip_prefix("# TYPE ")?.split_once(' ')?;
                Some((name.to_owned(), kind.to_owned()))
            })
            .collect();
        assert_eq!(documented, rendered);
        let unique: BTreeSet<&String> = rendered.iter().map(|(n, _)| n).collect();
        assert_eq!(unique.len(), rendered.len(), "a family is rendered once");
    }
}

/// The Grafana dashboard (`deploy/grafana/keywarden.json`) asks only for
/// what a scrape has: every metric its queries name is a family `render`
/// writes, and every label they group by, select on or show is one that
/// family carries (or one Prometheus adds: `instance`, `job`).
#[cfg(test)]
mod dashboard {
    use std::collections::{BTreeMap, BTreeSet};

    use super::super::Snapshot;
    use crate::run::shedding::Shed;

    /// Family name to the label names its samples carry, from a rendering
    /// in which every labelled family has samples.
    fn exported() -> BTreeMap<String, BTreeSet<String>> {
        let mut tally = super::super::Tally::default();
        let mut f = Event::coverage_warning(
            &keywarden_analyzer::event::Origin {
                hostname: "h".into(),
                product_version: "0".into(),
                uid_prefix: "p".into(),
            },
            0,
            1,
            None,
            None,
            "w".into(),
        );
        f.metadata.event_code = keywarden_analyzer::event::EventCode::KeyUse;
        tally.count(&f);
        f.metadata.event_code = keywarden_analyzer::event::EventCode::Alert;
        f.finding_info = Some(keywarden_analyzer::event::FindingInfo {
            uid: "u".into(),
            title: "t".into(),
            desc: None,
            analytic: keywarden_analyzer::event::Analytic {
                uid: "r".into(),
                name: "r".into(),
                type_id: 1,
                kind: "Rule".into(),
            },
        });
        tally.count(&f);
        let mut snapshot = Snapshot {
            shed: Shed::default(),
            ..Snapshot::default()
        };
        tally.copy_into(&mut snapshot.tally);
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in snapshot.render(Some(1)).lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                out.entry(rest.split(' ').next().unwrap().to_owned())
                    .or_default();
                continue;
            }
            let series = line.rsplit_once(' ').unwrap().0;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let set = out.entry(name.to_owned()).or_default();
            for pair in labels
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
            {
                set.insert(pair.split('=').next().unwrap().to_owned());
            }
        }
        out
    }

    use keywarden_analyzer::event::Event;

    /// Every PromQL expression in the dashboard, with where it is.
    fn queries(v: &serde_json::Value, at: String, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push((format!("{at}.{k}"), s.clone()))
                        }
                        _ => queries(x, format!("{at}.{k}"), out),
                    }
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    queries(x, format!("{at}[{i}]"), out);
                }
            }
            _ => {}
        }
    }

    fn words(s: &str) -> Vec<&str> {
        s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| !w.is_empty())
            .collect()
    }

    /// The label names inside `by (...)`, `{...}` selectors and `{{...}}`
    /// legends.
    fn labels_used(expr: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = expr;
        while let Some(i) = rest.find(" by (") {
            let inner = &rest[i + 5..];
            let end = inner.find(')').unwrap();
            out.extend(words(&inner[..end]).into_iter().map(str::to_owned));
            rest = &inner[end..];
        }
        let mut rest = expr;
        while let Some(i) = rest.find('{') {
            let inner = &rest[i + 1..];
            let end = inner.find('}').unwrap();
            for m in inner[..end].split(',') {
                let name = m
                    .split(['=', '!', '~'])
                    .next()
                    .unwrap()
                    .trim()
                    .trim_matches('{');
                if !name.is_empty() {
                    out.push(name.to_owned());
                }
            }
            rest = &inner[end..];
        }
        out
    }

    #[test]
    fn every_dashboard_query_names_exported_metrics_and_labels() {
        let text = include_str!("../../../deploy/grafana/keywarden.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("the dashboard is JSON");
        let exported = exported();
        let mut found = Vec::new();
        queries(&dash, "dashboard".into(), &mut found);
        // Legends name labels too.
        let mut legends = Vec::new();
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                legends.push((
                    t["expr"].as_str().unwrap().to_owned(),
                    t["legendFormat"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        assert!(found.len() >= 20, "{} queries", found.len());
        let mut families_used = BTreeSet::new();
        for (at, expr) in &found {
            let metrics: Vec<&str> = words(expr)
                .into_iter()
                .filter(|w| w.starts_with("keywarden_"))
                .collect();
            assert!(
                !metrics.is_empty(),
                "{at}: names no keywarden metric: {expr}"
            );
            let mut labels: BTreeSet<String> =
                ["instance", "job"].map(str::to_owned).into_iter().collect();
            for m in &metrics {
                let family = exported
                    .get(*m)
                    .unwrap_or_else(|| panic!("{at}: {m} is not exported: {expr}"));
                labels.extend(family.iter().cloned());
                families_used.insert(m.to_string());
            }
            for l in labels_used(expr) {
                assert!(
                    labels.contains(&l),
                    "{at}: no label {l} on {metrics:?}: {expr}"
                );
            }
            for (e, legend) in &legends {
                if e == expr {
                    for l in legend.split("{{").skip(1) {
                        let l = l.split("}}").next().unwrap().trim();
                        assert!(labels.contains(l), "{at}: legend label {l}: {expr}");
                    }
                }
            }
        }
        // The panels the dashboard is for.
        for needed in [
            "keywarden_key_uses_by_key_total",
            "keywarden_key_uses_by_process_total",
            "keywarden_findings_total",
            "keywarden_shed_events_total",
            "keywarden_coverage_warnings_total",
        ] {
            assert!(families_used.contains(needed), "no panel uses {needed}");
        }
    }
}
