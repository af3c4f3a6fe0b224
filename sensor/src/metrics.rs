//! The Prometheus endpoint (`keywarden run --metrics ADDR`, or `metrics:`
//! in the configuration; off by default): what the sensor counts, in the
//! text exposition format (version 0.0.4), for `GET /metrics`. The metrics
//! are listed in `docs/metrics.md` (a test checks the list against
//! `Snapshot::render`).
//!
//! The event thread owns nearly every count, so it is the one to publish
//! them: once a turn of its loop (`run::Sensor::publish_metrics`) it copies
//! them into the `Snapshot` behind `Metrics`' mutex, and the endpoint's
//! thread (`keywarden-prom`) copies that out when scraped. Per event the
//! emitter only adds to plain integers (`Tally`): nothing on the path every
//! event takes locks or waits, and a scrape delays the event thread by at
//! most the copy of a few hundred bytes. A scrape therefore shows the counts
//! as of the last turn (`poll_interval_ms` old, at most 250 ms). The
//! resident set size is read at scrape time.
//!
//! Label values come from fixed sets (event classes, outcomes, causes,
//! queues, actions) or are rule ids, which the loaded rule sets bound (and
//! `MAX_RULES` caps). Nothing is labelled by process, path or key: those
//! an attacker could multiply without end, and each would be a series kept
//! forever by whoever scrapes. Label values and help texts are escaped all
//! the same (`escape_label`), so no value can break the format.
//!
//! The endpoint answers one request per connection, one connection at a
//! time, within `EXCHANGE_DEADLINE` from accept to last byte and reading at
//! most `REQUEST_MAX` bytes: a slow or silent client holds it that long at
//! most, and never holds the sensor, whose threads never wait for it.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt::Write as _,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use keywarden_analyzer::{
    event::{Event, EventCode, Outcome},
    rules::Action,
};
use keywarden_probe_types::stats;
use tracing::{debug, info};

use crate::{keys::reader::KeyReadStats, run::shedding::Shed};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long one connection may take, from accept to its last byte written.
/// A scraper on the same host answers in microseconds; a client that
/// trickles its request or stops reading is cut off here.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(2);

/// The most of a request that is read: a request line and the headers a
/// scraper sends fit many times over.
const REQUEST_MAX: usize = 8 * 1024;

/// How long the listener waits for a connection before it looks at its
/// stop flag again: the longest the sensor waits for it at exit, with a
/// connection's `EXCHANGE_DEADLINE`.
const ACCEPT_WAIT_MS: u16 = 200;

/// Rules counted by id, at most. A rule set is far smaller; rules reloaded
/// with new ids add series, and this bounds what reloads can add. Findings
/// of rules past it are counted under `OTHER_RULES`.
const MAX_RULES: usize = 1000;

/// The `rule` label of findings of rules past `MAX_RULES`: a value no rule
/// id can take (ids are letters, digits, `-`, `_` and `.`).
const OTHER_RULES: &str = "(other)";

/// Event classes (`metadata.event_code`), as the `class` label names them,
/// in the order `class_index` gives.
const CLASSES: [&str; 4] = ["key_use", "secret_file_open", "coverage_warning", "alert"];

/// The index of `CLASSES` of an event code. Exhaustive, so that a new kind
/// of event cannot go uncounted.
fn class_index(code: EventCode) -> usize {
    match code {
        EventCode::KeyUse => 0,
        EventCode::SecretFileOpen => 1,
        EventCode::CoverageWarning => 2,
        EventCode::Alert => 3,
    }
}

/// `status_id` 0, 1 and 2, and any other (which no event has today).
const STATUS_SLOTS: usize = 4;

/// The `outcome` label of `status_id` slot `slot` of class `class`: the
/// event's `status` in lower case (a finding's 1 is `New`).
fn outcome_name(class: usize, slot: usize) -> &'static str {
    match slot {
        0 => "unknown",
        1 if CLASSES[class] == "alert" => "new",
        1 => "success",
        2 => "failure",
        _ => "other",
    }
}

/// The status slots each class can have, by `CLASSES` index: their series
/// are written from the start, at 0, so that a rate over them has a
/// beginning. (Another slot is written once it counts anything.)
const CLASS_OUTCOMES: [&[usize]; 4] = [&[1, 2], &[0, 1, 2], &[2], &[1]];

/// Rule actions, as the `action` label names them (`Action::name`).
const ACTIONS: [Action; 3] = [Action::Alert, Action::Kill, Action::Block];

/// What became of an action, as the `outcome` label names it, in the order
/// `outcome_index` gives.
const ACTION_OUTCOMES: [&str; 4] = ["done", "in_kernel", "failed", "skipped"];

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Done => 0,
        Outcome::InKernel => 1,
        Outcome::Failed => 2,
        Outcome::Skipped => 3,
    }
}

/// What the emitter counts per event for the endpoint. Plain integers, not
/// atomics: the event thread owns them and publishes a copy once a turn
/// (`copy_into`).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// By class (`CLASSES`) and `status_id` (`STATUS_SLOTS`).
    events: [[u64; STATUS_SLOTS]; CLASSES.len()],
    /// By action (`ACTIONS`) and outcome (`ACTION_OUTCOMES`).
    actions: [[u64; ACTION_OUTCOMES.len()]; ACTIONS.len()],
    /// Findings by rule id.
    findings: BTreeMap<String, u64>,
    /// Bumped whenever `findings` changes: a copy takes the map only then,
    /// so a turn without findings allocates nothing.
    findings_changed: u64,
}

impl Tally {
    /// Counts an event as the emitter produced it; a finding also counts
    /// under its rule, and each of its responses under its action and
    /// outcome.
    pub fn count(&mut self, ev: &Event) {
        let class = class_index(ev.metadata.event_code);
        let slot = usize::from(ev.status_id).min(STATUS_SLOTS - 1);
        self.events[class][slot] += 1;
        if let Some(info) = &ev.finding_info {
            let rule = info.analytic.uid.as_str();
            if let Some(n) = self.findings.get_mut(rule) {
                *n += 1;
            } else if self.findings.len() < MAX_RULES {
                self.findings.insert(rule.to_owned(), 1);
            } else {
                *self.findings.entry(OTHER_RULES.to_owned()).or_default() += 1;
            }
            self.findings_changed += 1;
        }
        for r in &ev.responses {
            if let Some(a) = ACTIONS.iter().position(|a| a.name() == r.action) {
                self.actions[a][outcome_index(r.outcome)] += 1;
            }
        }
    }

    /// Coverage warnings produced (every `coverage_warning` event).
    fn coverage_warnings(&self) -> u64 {
        self.events[class_index(EventCode::CoverageWarning)]
            .iter()
            .sum()
    }

    /// Copies this into `dst`, the findings map only if it changed since
    /// the copy `dst` has.
    pub fn copy_into(&self, dst: &mut Tally) {
        dst.events = self.events;
        dst.actions = self.actions;
        if dst.findings_changed != self.findings_changed {
            dst.findings.clone_from(&self.findings);
            dst.findings_changed = self.findings_changed;
        }
    }
}

/// One bounded queue: what it holds now, and at most (`None` for the
/// output backlog, which is bounded in bytes: `Snapshot::sink_backlog_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub depth: u64,
    pub capacity: Option<u64>,
}

impl Queue {
    pub fn new(depth: usize, capacity: Option<usize>) -> Self {
        Queue {
            depth: depth as u64,
            capacity: capacity.map(|c| c as u64),
        }
    }
}

/// The queues between the sensor's threads, as the `queue` label names
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queues {
    /// Events waiting for an analyzer shard (all shards).
    pub analyzer_input: Queue,
    /// Analysed events waiting for the event thread.
    pub analyzer_output: Queue,
    /// Lines waiting for the output thread.
    pub sink_backlog: Queue,
    /// Guarded opens' verdicts waiting for the event thread.
    pub guard_verdicts: Queue,
    /// The control thread's coverage warnings waiting for the event thread.
    pub warnings: Queue,
}

impl Queues {
    fn named(&self) -> [(&'static str, Queue); 5] {
        [
            ("analyzer_input", self.analyzer_input),
            ("analyzer_output", self.analyzer_output),
            ("sink_backlog", self.sink_backlog),
            ("guard_verdicts", self.guard_verdicts),
            ("warnings", self.warnings),
        ]
    }
}

/// Everything a scrape shows but the resident set size, as the event
/// thread last published it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub tally: Tally,
    /// Lines the output thread wrote.
    pub written: u64,
    pub shed: Shed,
    /// The probes' `STATS` counters, by `stats::*` slot.
    pub kernel: [u64; stats::SLOTS as usize],
    pub key_reads: KeyReadStats,
    /// Files with probes attached, and the functions probed in them.
    pub libraries: u64,
    pub functions: u64,
    /// Signature verifications (public-key operations) run to identify keys.
    pub verifications: u64,
    pub queues: Queues,
    /// Bytes of the lines in `queues.sink_backlog`.
    pub sink_backlog_bytes: u64,
}

/// The metrics, shared by the event thread, which publishes them, and the
/// endpoint, which renders them.
#[derive(Default)]
pub struct Metrics {
    snapshot: Mutex<Snapshot>,
}

impl Metrics {
    /// The event thread's publication, once a turn: `update` edits the
    /// published snapshot in place, under the lock, so it should only copy.
    pub fn publish(&self, update: impl FnOnce(&mut Snapshot)) {
        update(&mut self.lock());
    }

    /// The exposition text of a scrape now.
    pub fn render(&self) -> String {
        // Copied out first: the lock is held for a copy, not for rendering.
        let snapshot = self.lock().clone();
        snapshot.render(resident_bytes())
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A thread that panicked while publishing left whole integers: go on.
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

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
    fn render(&self, rss: Option<u64>) -> String {
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

        let name = "keywarden_resident_memory_bytes";
        t.family(name, Gauge, "The sensor's resident set size.");
        if let Some(rss) = rss {
            t.sample(name, &[], rss);
        }
        t.out
    }
}

/// The sensor's resident set size in bytes (`VmRSS`), read at scrape time.
fn resident_bytes() -> Option<u64> {
    vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes (the file says kB).
fn vm_rss(status: &str) -> Option<u64> {
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// The endpoint: a listener on a thread of its own, stopped when dropped.
pub struct Endpoint {
    /// Where it listens (the port the system chose, for port 0).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Listens on `addr` (an IP address and port) and answers scrapes on
    /// the `keywarden-prom` thread. Called before the sensor attaches
    /// anything: an address that is not one, or cannot be bound, stops the
    /// sensor with an error that names it.
    pub fn start(addr: &str, metrics: Arc<Metrics>) -> Result<Self> {
        let at: SocketAddr = addr.parse().map_err(|e| {
            anyhow::anyhow!(
                "metrics endpoint {addr:?}: not an IP address and port such as 127.0.0.1:9464 ({e})"
            )
        })?;
        let listener = TcpListener::bind(at)
            .with_context(|| format!("metrics endpoint {at}: cannot listen"))?;
        // Accepts wait in `poll` with a timeout, so the stop flag is seen.
        listener
            .set_nonblocking(true)
            .with_context(|| format!("metrics endpoint {at}"))?;
        let addr = listener.local_addr().unwrap_or(at);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("keywarden-prom".into())
                .spawn(move || serve(&listener, &metrics, &stop))
                .context("starting the metrics endpoint's thread")?
        };
        let endpoint = Endpoint {
            addr,
            stop,
            thread: Some(thread),
        };
        info!(address = %endpoint.addr, "metrics endpoint: GET http://{}/metrics", endpoint.addr);
        Ok(endpoint)
    }
}

impl Drop for Endpoint {
    /// Stops listening: at most `ACCEPT_WAIT_MS`, or what is left of a
    /// connection's `EXCHANGE_DEADLINE`.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the metrics endpoint's thread panicked");
        }
    }
}

/// The listener's loop: one connection at a time, each answered or cut off
/// within `EXCHANGE_DEADLINE`.
fn serve(listener: &TcpListener, metrics: &Metrics, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                if let Err(e) = answer(conn, metrics) {
                    debug!(%peer, error = %e, "metrics request not answered");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ACCEPT_WAIT_MS));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                debug!(error = %e, "metrics endpoint: accept failed");
                std::thread::sleep(Duration::from_millis(u64::from(ACCEPT_WAIT_MS)));
            }
        }
    }
}

/// One connection: reads the request head, answers, closes.
fn answer(mut conn: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let deadline = Instant::now() + EXCHANGE_DEADLINE;
    // Reads and writes wait with timeouts (set before each), which need a
    // blocking socket; Linux does not pass the listener's O_NONBLOCK on,
    // but that is not for this code to rely on.
    conn.set_nonblocking(false)?;
    let response = match read_head(&mut conn, deadline)? {
        Some(head) => respond(&head, metrics),
        None => response(
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n",
        ),
    };
    write_within(&mut conn, &response, deadline)?;
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
}

/// What is left until `deadline`, or `TimedOut` once it has passed.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "the exchange took too long",
        ));
    }
    Ok(left)
}

/// The request's head (up to the blank line after its headers), or `None`
/// when it is longer than `REQUEST_MAX` or the client stopped sending
/// before its end.
fn read_head(conn: &mut TcpStream, deadline: Instant) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() >= REQUEST_MAX {
            return Ok(None);
        }
        conn.set_read_timeout(Some(left(deadline)?))?;
        let want = chunk.len().min(REQUEST_MAX - head.len());
        match conn.read(&mut chunk[..want]) {
            Ok(0) => return Ok(None),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Where a request's head ends: the blank line after the headers, `\r\n\r\n`
/// (or `\n\n` from a client that leaves out the carriage returns).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    crlf.or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

/// The response to a request head: the metrics for `GET /metrics` (a query
/// string is ignored), 404 for anything else.
fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.trim_end_matches('\r').split(' ');
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    if method == "GET" && path == "/metrics" {
        response("200 OK", CONTENT_TYPE, &metrics.render())
    } else {
        response(
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at GET /metrics\n",
        )
    }
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// Writes `bytes` by `deadline`, however slowly the client reads.
fn write_within(conn: &mut TcpStream, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        conn.set_write_timeout(Some(left(deadline)?))?;
        match conn.write(rest) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use keywarden_analyzer::event::{Analytic, FindingInfo, Origin, Response};

    use super::*;

    fn origin() -> Origin {
        Origin {
            hostname: "h".into(),
            product_version: "0".into(),
            uid_prefix: "p".into(),
        }
    }

    fn warning() -> Event {
        Event::coverage_warning(&origin(), 0, 1, None, None, "w".into())
    }

    /// A finding of rule `rule` whose actions had `responses`.
    fn finding(rule: &str, responses: &[(&str, Outcome)]) -> Event {
        let mut f = warning();
        f.metadata.event_code = EventCode::Alert;
        f.status_id = 1;
        f.finding_info = Some(FindingInfo {
            uid: "u".into(),
            title: "t".into(),
            desc: None,
            analytic: Analytic {
                uid: rule.into(),
                name: rule.into(),
                type_id: 1,
                kind: "Rule".into(),
                source: None,
            },
        });
        f.responses = responses
            .iter()
            .map(|&(action, outcome)| Response {
                action: action.into(),
                outcome,
                detail: None,
            })
            .collect();
        f
    }

    /// The samples of a rendering: series (name and labels as written) to
    /// value.
    fn samples(text: &str) -> BTreeMap<String, u64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample line");
                (series.to_owned(), value.parse().expect("an integer"))
            })
            .collect()
    }

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
    fn events_findings_and_actions_are_counted_by_label() {
        let mut tally = Tally::default();
        tally.count(&warning());
        tally.count(&warning());
        let f = finding(
            "protect-key",
            &[("alert", Outcome::Done), ("kill", Outcome::InKernel)],
        );
        tally.count(&f);
        tally.count(&finding("protect-key", &[("kill", Outcome::Failed)]));
        tally.count(&finding("other-rule", &[]));
        let mut published = Snapshot::default();
        tally.copy_into(&mut published.tally);
        let s = samples(&published.render(Some(4096)));
        let at = |series: &str| s.get(series).copied();
        assert_eq!(
            at(r#"keywarden_events_total{class="coverage_warning",outcome="failure"}"#),
            Some(2)
        );
        assert_eq!(
            at(r#"keywarden_events_total{class="alert",outcome="new"}"#),
            Some(3)
        );
        // Expected outcomes are there at 0 from the start; others are not.
        assert_eq!(
            at(r#"keywarden_events_total{class="key_use",outcome="success"}"#),
            Some(0)
        );
        assert_eq!(
            at(r#"keywarden_events_total{class="key_use",outcome="unknown"}"#),
            None
        );
        assert_eq!(at("keywarden_coverage_warnings_total"), Some(2));
        assert_eq!(
            at(r#"keywarden_findings_total{rule="protect-key"}"#),
            Some(2)
        );
        assert_eq!(
            at(r#"keywarden_findings_total{rule="other-rule"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="alert",outcome="done"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="kill",outcome="in_kernel"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="kill",outcome="failed"}"#),
            Some(1)
        );
        assert_eq!(
            at(r#"keywarden_actions_total{action="block",outcome="done"}"#),
            Some(0)
        );
        assert_eq!(at("keywarden_resident_memory_bytes"), Some(4096));
        // A copy without new findings keeps the map it has.
        let changed = published.tally.findings_changed;
        tally.count(&warning());
        tally.copy_into(&mut published.tally);
        assert_eq!(published.tally.findings_changed, changed);
        assert_eq!(published.tally.coverage_warnings(), 3);
    }

    #[test]
    fn rules_past_the_cap_are_counted_together() {
        let mut tally = Tally::default();
        for i in 0..MAX_RULES + 5 {
            tally.count(&finding(&format!("r{i}"), &[]));
        }
        tally.count(&finding("r0", &[]));
        assert_eq!(tally.findings.len(), MAX_RULES + 1);
        assert_eq!(tally.findings[OTHER_RULES], 5);
        assert_eq!(tally.findings["r0"], 2);
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

    #[test]
    fn the_resident_set_size_is_read_in_bytes() {
        assert_eq!(
            vm_rss("Name:\tk\nVmRSS:\t   12345 kB\nVmData: 1 kB\n"),
            Some(12345 * 1024)
        );
        assert_eq!(vm_rss("Name:\tk\n"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }

    /// `docs/metrics.md` lists exactly the families a scrape has, with
    /// their types, in the same order.
    #[test]
    fn the_documented_metrics_are_the_rendered_ones() {
        let doc = include_str!("../../docs/metrics.md");
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

    /// One HTTP/1.1 exchange with the endpoint: the response's head and
    /// body.
    fn exchange(addr: SocketAddr, request: &[u8]) -> (String, String) {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request).unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn the_endpoint_answers_get_metrics_and_nothing_else() {
        let metrics = Arc::new(Metrics::default());
        metrics.publish(|m| m.libraries = 3);
        let e = Endpoint::start("127.0.0.1:0", metrics).unwrap();
        let (head, body) = exchange(
            e.addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains("\nkeywarden_attached_libraries 3\n"),
            "{body}"
        );
        let others: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /metricsx HTTP/1.0\r\n\r\n",
        ];
        for request in others {
            let (head, _) = exchange(e.addr, request);
            assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        }
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        // Exactly the most that is read: nothing is left unread, which
        // would make the close a reset that can beat the answer.
        huge.resize(REQUEST_MAX, b'a');
        let (head, _) = exchange(e.addr, &huge);
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    }

    /// A client that connects and sends nothing holds the endpoint for
    /// `EXCHANGE_DEADLINE` at most: the next scrape is answered after it.
    #[test]
    fn a_silent_client_delays_the_next_scrape_by_the_deadline_at_most() {
        let e = Endpoint::start("127.0.0.1:0", Arc::new(Metrics::default())).unwrap();
        let silent = TcpStream::connect(e.addr).unwrap();
        let mut trickle = TcpStream::connect(e.addr).unwrap();
        trickle.write_all(b"GET /met").unwrap();
        let started = Instant::now();
        let (head, _) = exchange(e.addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            started.elapsed() < 2 * EXCHANGE_DEADLINE + Duration::from_secs(1),
            "answered after {:?}",
            started.elapsed()
        );
        drop((silent, trickle));
    }

    #[test]
    fn an_address_that_is_not_one_or_is_taken_is_named() {
        let m = Arc::new(Metrics::default());
        let err = Endpoint::start("localhost", m.clone()).err().unwrap();
        assert!(format!("{err:#}").contains("\"localhost\""), "{err:#}");
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = Endpoint::start(&addr, m).err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains(&addr) && text.contains("cannot listen"),
            "{text}"
        );
    }
}
