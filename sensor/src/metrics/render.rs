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
            "Signature verifications (public-key operations) run to identify which key signed.",
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
