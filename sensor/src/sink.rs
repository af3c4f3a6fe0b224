//! NDJSON output, written by a thread of its own (`keywarden-out`).
//!
//! The event thread only serialises each event into a line and queues it;
//! the writer thread writes. A slow or stalled output (a disk under load, a
//! pipe whose reader stopped, a full disk) therefore never stops the event
//! thread, which must keep draining the ring buffer and releasing the
//! processes it holds.
//!
//! The queue, the backlog, is bounded in bytes (`BACKLOG_BYTES`). When it
//! is full the event thread waits for the writer to make room, at most
//! `ROOM_WAIT` per turn of its loop in all, and not at all while writes
//! fail; past that it sheds the new line and counts it (`shed`). So a
//! writable but slow output slows the event thread down a little
//! (backpressure) before anything is shed, and a stalled one costs at
//! most `ROOM_WAIT` per turn. A write that fails (a full disk, a closed
//! pipe) is retried every `RETRY` until it succeeds: nothing already
//! queued is dropped for it.

use std::{
    collections::VecDeque,
    fs::OpenOptions,
    io::{BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use keywarden_analyzer::event::Event;
use tracing::{error, warn};

/// How events are written to the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line (OCSF), for machines.
    #[default]
    Ndjson,
    /// One readable line per event, for a person at a terminal
    /// (`compact.rs`).
    Compact,
    /// Nothing (with `--parquet`: Parquet only).
    None,
}

/// The backlog's bound: lines queued and not yet written. About 16,000
/// events of 2 KB; at a turn's worth of events (at most
/// `route::RECORDS_PER_TURN` records, plus what the analyzer hands back)
/// it is never reached while the output keeps up.
pub const BACKLOG_BYTES: usize = 32 << 20;

/// How long the event thread may wait for room in a full backlog, per turn
/// of its loop (`flush` gives the next turn its own). Short against the
/// time a busy host takes to fill the 8 MiB ring buffer (about 25,000
/// open records), so the wait alone does not make it overflow.
pub const ROOM_WAIT: Duration = Duration::from_millis(50);

/// How often a failing write is tried again.
const RETRY: Duration = Duration::from_millis(100);

/// The lines the writer has yet to write, and what it has done.
struct Backlog {
    lines: VecDeque<Vec<u8>>,
    /// Bytes of `lines` and of the lines the writer took and has not
    /// written yet: what the bound applies to.
    bytes: usize,
    /// Lines the writer took and has not written yet.
    in_hand: usize,
    written: u64,
    /// The last write failed, and none succeeded since.
    failing: bool,
    /// `finish`: write what is queued, then stop (or stop at the first
    /// failure).
    closing: bool,
}

struct Shared {
    backlog: Mutex<Backlog>,
    /// Lines to write, or the sink closes.
    work: Condvar,
    /// Lines written (room in the backlog), or writes began to fail.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Backlog> {
        // The other side panicked: the counts are still whole, go on.
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What `NdjsonSink::progress` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Lines queued or in the writer's hands, not written yet.
    pub queued_lines: usize,
    /// Their bytes: what `BACKLOG_BYTES` bounds.
    pub queued_bytes: usize,
    /// Lines written so far.
    pub written: u64,
}

pub struct NdjsonSink {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    name: String,
    /// `BACKLOG_BYTES`, or less in tests.
    limit: usize,
    /// The longest line so far (up to 16 KiB): each line is serialised into a buffer of
    /// that size, not grown from empty through a chain of reallocations
    /// (a key-use event is ~2 KB of JSON).
    line_capacity: usize,
    /// What is left of this turn's `ROOM_WAIT`.
    wait_left: Duration,
    format: Format,
    /// Lines shed: no room in the backlog, not serialisable, or still
    /// unwritten when the sensor stopped.
    pub shed: u64,
}

impl NdjsonSink {
    pub fn open(target: &str, format: Format) -> Result<Self> {
        if format == Format::None {
            let mut sink = Self::start(Box::new(std::io::sink()), "nowhere".into(), BACKLOG_BYTES)?;
            sink.format = format;
            return Ok(sink);
        }
        let (out, name): (Box<dyn Write + Send>, String) = if target == "-" {
            (Box::new(std::io::stdout()), "stdout".into())
        } else {
            // Never through a symlink (someone who can write the directory
            // could point it at any root-owned file), and readable by root
            // only: events hold command lines and paths.
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .mode(0o600)
                .open(target)
                .with_context(|| {
                    format!("{target}: cannot open output file (a symlink there is refused)")
                })?;
            (
                Box::new(BufWriter::with_capacity(1 << 16, f)),
                target.to_owned(),
            )
        };
        let mut sink = Self::start(out, name, BACKLOG_BYTES)?;
        sink.format = format;
        Ok(sink)
    }

    /// A sink writing to `out` on a thread of its own, with a backlog of
    /// `limit` bytes.
    pub fn start(out: Box<dyn Write + Send>, name: String, limit: usize) -> Result<Self> {
        let shared = Arc::new(Shared {
            backlog: Mutex::new(Backlog {
                lines: VecDeque::new(),
                bytes: 0,
                in_hand: 0,
                written: 0,
                failing: false,
                closing: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
        });
        let writer = {
            let shared = shared.clone();
            let name = name.clone();
            // Named like every sensor thread: the probes never hold one.
            std::thread::Builder::new()
                .name("keywarden-out".into())
                .spawn(move || write_queued(&shared, out, &name))
                .context("starting the output thread")?
        };
        Ok(Self {
            shared,
            writer: Some(writer),
            name,
            limit,
            line_capacity: 1024,
            wait_left: ROOM_WAIT,
            format: Format::Ndjson,
            shed: 0,
        })
    }

    /// Queues an event for the writer. With the backlog full, waits for
    /// room (what is left of this turn's `ROOM_WAIT`), then sheds it.
    pub fn push(&mut self, ev: &Event) {
        let line = match self.format {
            Format::None => return,
            Format::Compact => crate::compact::line(ev),
            Format::Ndjson => {
                let mut line = Vec::with_capacity(self.line_capacity);
                if let Err(e) = serde_json::to_writer(&mut line, ev) {
                    error!(error = %e, "event could not be serialized");
                    self.shed += 1;
                    return;
                }
                line.push(b'\n');
                line
            }
        };
        // Capped: one huge finding must not make every line allocate big.
        self.line_capacity = self.line_capacity.max(line.len().min(16 * 1024));
        let mut b = self.shared.lock();
        // An empty backlog takes any line, however long.
        while b.bytes > 0 && b.bytes + line.len() > self.limit {
            if b.failing || self.wait_left.is_zero() {
                drop(b);
                self.shed_one();
                return;
            }
            // The writer may be waiting for the end of the turn.
            self.shared.work.notify_one();
            let started = Instant::now();
            b = self
                .shared
                .room
                .wait_timeout(b, self.wait_left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            self.wait_left = self.wait_left.saturating_sub(started.elapsed());
        }
        b.bytes += line.len();
        b.lines.push_back(line);
    }

    fn shed_one(&mut self) {
        self.shed += 1;
        if self.shed.is_power_of_two() {
            warn!(output = %self.name, shed = self.shed,
                "output backlog full ({} MiB): events shed", self.limit >> 20);
        }
    }

    /// The end of a turn: wakes the writer for what the turn queued, and
    /// gives the next turn its `ROOM_WAIT`. Returns the lines not written
    /// yet.
    pub fn flush(&mut self) -> usize {
        self.wait_left = ROOM_WAIT;
        let waiting = {
            let b = self.shared.lock();
            b.lines.len() + b.in_hand
        };
        self.shared.work.notify_one();
        waiting
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.shared.lock().written
    }

    /// The backlog now and the lines written so far, in one look, for the
    /// metrics endpoint: a backlog that grows while `written` stands still
    /// is an output that stalled.
    pub fn progress(&self) -> Progress {
        let b = self.shared.lock();
        Progress {
            queued_lines: b.lines.len() + b.in_hand,
            queued_bytes: b.bytes,
            written: b.written,
        }
    }

    /// Bytes queued and not written yet.
    #[cfg(test)]
    fn backlog_bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// Stops the writer once it has written everything queued, or at its
    /// first failed write, or after `within` (a write that blocks: a pipe
    /// nobody reads). Returns the lines left unwritten, which count as
    /// shed.
    pub fn finish(&mut self, within: Duration) -> usize {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        if let Some(w) = self.writer.take() {
            let end = Instant::now() + within;
            while !w.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            // One still blocked in a write ends with the process.
            if w.is_finished() && w.join().is_err() {
                error!(output = %self.name, "the output thread panicked");
            }
        }
        let left = {
            let b = self.shared.lock();
            b.lines.len() + b.in_hand
        };
        self.shed += left as u64;
        left
    }
}

impl Drop for NdjsonSink {
    /// A sink dropped on an error path still writes what it holds.
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.finish(Duration::from_secs(1));
        }
    }
}

/// The writer thread: takes everything queued, writes it, flushes, and
/// waits for more; returns once the sink closes and all is written, or at
/// a failure after it closed.
fn write_queued(shared: &Shared, mut out: Box<dyn Write + Send>, name: &str) {
    loop {
        let mut batch = {
            let mut b = shared.lock();
            while b.lines.is_empty() && !b.closing {
                b = shared.work.wait(b).unwrap_or_else(PoisonError::into_inner);
            }
            if b.lines.is_empty() {
                return; // closing, and everything was written and flushed
            }
            let batch = std::mem::take(&mut b.lines);
            b.in_hand = batch.len();
            batch
        };
        while let Some(line) = batch.front() {
            match out.write_all(line) {
                Ok(()) => {
                    let n = line.len();
                    batch.pop_front();
                    let mut b = shared.lock();
                    b.bytes -= n;
                    b.in_hand -= 1;
                    b.written += 1;
                    if b.failing {
                        b.failing = false;
                        warn!(output = %name, "output writable again; writing the backlog");
                    }
                    drop(b);
                    shared.room.notify_all();
                }
                Err(e) => {
                    if !retry_later(shared, e, name) {
                        return;
                    }
                }
            }
        }
        // Out of the buffer before waiting for more.
        while let Err(e) = out.flush() {
            if !retry_later(shared, e, name) {
                return;
            }
        }
    }
}

/// After a failed write: reports it (once per outage), waits `RETRY`, and
/// says whether to try again: not once the sink is closing, so a stopping
/// sensor does not wait on a full disk.
fn retry_later(shared: &Shared, e: std::io::Error, name: &str) -> bool {
    let mut b = shared.lock();
    if !b.failing {
        error!(output = %name, error = %e, backlog = b.lines.len() + b.in_hand,
            "cannot write events; keeping them in memory (up to {} MiB) and retrying",
            BACKLOG_BYTES >> 20);
        b.failing = true;
        // Whoever waits for room stops waiting: none comes soon.
        shared.room.notify_all();
    }
    if b.closing {
        return false;
    }
    let (b, _) = shared
        .work
        .wait_timeout(b, RETRY)
        .unwrap_or_else(PoisonError::into_inner);
    drop(b);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywarden_analyzer::event::Origin;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A writer that fails while `full` is set, like a disk without space,
    /// blocks while `stalled` is set, like a pipe nobody reads, and takes
    /// `delay` per write, like a slow disk.
    #[derive(Clone, Default)]
    struct Disk {
        data: Arc<Mutex<Vec<u8>>>,
        full: Arc<AtomicBool>,
        stalled: Arc<AtomicBool>,
        delay: Duration,
    }
    impl Write for Disk {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            while self.stalled.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.full.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            std::thread::sleep(self.delay);
            self.data.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn event(seq: u64) -> Event {
        let o = Origin {
            hostname: "h".into(),
            product_version: "0".into(),
            uid_prefix: "p".into(),
        };
        Event::coverage_warning(&o, 0, seq, None, None, format!("e{seq}"))
    }

    fn line_len() -> usize {
        serde_json::to_vec(&event(0)).unwrap().len() + 1
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn full_disk_keeps_events_until_space_returns() {
        let disk = Disk::default();
        disk.full.store(true, Ordering::SeqCst);
        let mut sink = NdjsonSink::start(Box::new(disk.clone()), "disk".into(), 1 << 20).unwrap();
        for i in 0..3 {
            sink.push(&event(i));
        }
        sink.flush();
        wait_until("the writer to fail", || sink.shared.lock().failing);
        assert_eq!(sink.flush(), 3);
        assert!(disk.data.lock().unwrap().is_empty());
        let stalled = sink.progress();
        assert_eq!(
            (stalled.queued_lines, stalled.queued_bytes, stalled.written),
            (3, 3 * line_len(), 0)
        );
        disk.full.store(false, Ordering::SeqCst);
        wait_until("the backlog to be written", || sink.written() == 3);
        assert_eq!(
            sink.progress(),
            Progress {
                queued_lines: 0,
                queued_bytes: 0,
                written: 3
            }
        );
        assert_eq!(sink.finish(Duration::from_secs(5)), 0);
        let text = String::from_utf8(disk.data.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for (i, l) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["metadata"]["uid"], format!("p-{i}"));
        }
        assert_eq!((sink.written(), sink.shed), (3, 0));
    }

    /// An output that stops taking lines: the backlog stays within its
    /// bound, every line past it is shed and counted, and the event thread
    /// waits at most `ROOM_WAIT` per turn.
    #[test]
    fn a_stalled_output_sheds_past_the_bound_and_counts() {
        let disk = Disk::default();
        disk.stalled.store(true, Ordering::SeqCst);
        let limit = 10 * line_len();
        let mut sink = NdjsonSink::start(Box::new(disk.clone()), "pipe".into(), limit).unwrap();
        let started = Instant::now();
        for i in 0..10_000 {
            sink.push(&event(i));
            assert!(
                sink.backlog_bytes() <= limit,
                "the backlog outgrew its bound"
            );
        }
        assert!(
            started.elapsed() < ROOM_WAIT * 20,
            "waited {:?} for room in one turn",
            started.elapsed()
        );
        let queued = sink.flush() as u64;
        assert!(queued <= 10, "{queued} lines queued");
        assert_eq!(sink.shed, 10_000 - queued);
        disk.stalled.store(false, Ordering::SeqCst);
        assert_eq!(sink.finish(Duration::from_secs(10)), 0);
        assert_eq!(sink.written(), queued);
        assert_eq!(
            sink.shed + sink.written(),
            10_000,
            "every line written or counted"
        );
    }

    /// A writable but slow output: the event thread waits for room
    /// instead of shedding (each turn's wait is enough for a few lines).
    #[test]
    fn a_slow_output_slows_the_producer_instead_of_shedding() {
        let disk = Disk {
            delay: Duration::from_millis(1),
            ..Disk::default()
        };
        let limit = 3 * line_len();
        let mut sink = NdjsonSink::start(Box::new(disk.clone()), "slow".into(), limit).unwrap();
        for i in 0..200 {
            sink.push(&event(i));
            sink.flush();
        }
        assert_eq!(sink.finish(Duration::from_secs(10)), 0);
        assert_eq!((sink.written(), sink.shed), (200, 0));
        assert_eq!(
            String::from_utf8(disk.data.lock().unwrap().clone())
                .unwrap()
                .lines()
                .count(),
            200
        );
    }

    /// A full disk at exit: the sensor does not wait for space, and what is
    /// left counts as shed.
    #[test]
    fn lines_left_when_the_sink_finishes_on_a_full_disk_are_counted() {
        let disk = Disk::default();
        disk.full.store(true, Ordering::SeqCst);
        let mut sink = NdjsonSink::start(Box::new(disk.clone()), "disk".into(), 1 << 20).unwrap();
        for i in 0..5 {
            sink.push(&event(i));
        }
        let started = Instant::now();
        assert_eq!(sink.finish(Duration::from_secs(10)), 5);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!((sink.written(), sink.shed), (0, 5));
    }
}
