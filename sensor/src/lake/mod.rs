//! Parquet export in the Amazon Security Lake layout (`--parquet DIR`, or
//! `parquet.dir` in the configuration), beside or instead of NDJSON.
//!
//! A thread of its own (`keywarden-pq`) turns events into Arrow rows and
//! writes the files; the event thread only hands it a copy of each event
//! through a bounded queue (`QUEUE_EVENTS`). So a slow disk never stops the
//! event thread: with the queue full, an event is shed for Parquet
//! (`parquet_backlog`), and an event whose file could not be written (a
//! full disk, a directory someone replaced) is shed too (`parquet_write`).
//! Both are counted with the other causes (`run/shedding.rs`) and never
//! silent. NDJSON, when on, still has every event.
//!
//! The layout is `layout`, the schema `schema` (derived from the event
//! model), one file's writing and the recovery of a killed sensor's
//! temporary files `files`.
//!
//! Files are rolled: a file is closed when its rows reach `roll_bytes` in
//! memory or when it has been open `roll_seconds` (at most 300: Security
//! Lake wants a file at least every 5 minutes), and at exit. Each covers
//! one source (OCSF class) and one event day (UTC, from the event's time).

pub mod files;
pub mod layout;
pub mod schema;

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::{FieldRef, Schema};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use keywarden_analyzer::event::Event;
use serde_arrow::ArrayBuilder;
use tracing::{error, info, warn};

use crate::config::ParquetConfig;
use layout::Root;

/// Events waiting for the Parquet thread, at most: about a second of a
/// heavy flood, a few tens of MB of events.
pub const QUEUE_EVENTS: usize = 8192;

/// Rows gathered in the Arrow builder before they become a batch (whose
/// memory is then counted toward `roll_bytes`).
const BATCH_ROWS: usize = 1024;

/// What the Parquet thread did, for the metrics endpoint and the
/// `stopped:` line.
#[derive(Debug, Default)]
pub struct Stats {
    pub files: AtomicU64,
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    /// Events not written: their file failed, or they could not be made
    /// into a row, or they were still queued or in memory at exit.
    pub shed_write: AtomicU64,
    /// Temporary files of a killed sensor finished or removed at start.
    pub temp_finished: AtomicU64,
    pub temp_discarded: AtomicU64,
}

/// A copy of `Stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LakeCounts {
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    pub temp_finished: u64,
    pub temp_discarded: u64,
    pub queued: u64,
}

pub struct ParquetSink {
    tx: Option<Sender<Event>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
    dir: String,
    /// Events the full queue refused (`parquet_backlog`).
    pub shed_backlog: u64,
}

impl ParquetSink {
    /// Checks the settings, opens and locks `DIR`, finishes what a killed
    /// sensor left there, and starts the writer. `file_prefix` makes this
    /// run's file names unique (`Origin::uid_prefix`).
    pub fn open(cfg: &ParquetConfig, dir: &str, file_prefix: &str) -> Result<Self> {
        cfg.check()?;
        let schema = Arc::new(schema::trace::<Event>().context("the Parquet schema")?);
        let root = Root::open(Path::new(dir)).with_context(|| format!("parquet.dir {dir}"))?;
        let stats = Arc::new(Stats::default());
        let recovered = files::recover(&root);
        stats
            .temp_finished
            .store(recovered.finished, Ordering::Relaxed);
        stats
            .temp_discarded
            .store(recovered.discarded, Ordering::Relaxed);
        if recovered != files::Recovered::default() {
            warn!(
                finished = recovered.finished,
                discarded = recovered.discarded,
                "{dir}: temporary Parquet files of a sensor that was killed: complete ones \
                 renamed, cut-short ones removed (their events, and those it held in memory, \
                 are not in any Parquet file)"
            );
        }
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_EVENTS);
        let mut w = Writer {
            root,
            fields: schema.fields().iter().cloned().collect(),
            schema,
            region: cfg.region.clone(),
            account: cfg.account_id.clone(),
            roll: Duration::from_secs(cfg.roll_seconds),
            roll_bytes: cfg.roll_bytes as usize,
            prefix: file_prefix
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect(),
            seq: 0,
            open: HashMap::new(),
            stats: stats.clone(),
            failing: false,
        };
        let writer = std::thread::Builder::new()
            .name("keywarden-pq".into())
            .spawn(move || w.run(&rx))
            .context("starting the Parquet thread")?;
        info!(
            dir,
            region = %cfg.region,
            account_id = %cfg.account_id,
            roll_seconds = cfg.roll_seconds,
            roll_bytes = cfg.roll_bytes,
            "Parquet export on (Security Lake layout)"
        );
        Ok(Self {
            tx: Some(tx),
            writer: Some(writer),
            stats,
            dir: dir.to_owned(),
            shed_backlog: 0,
        })
    }

    /// Hands a copy of `ev` to the writer; sheds it if the queue is full.
    pub fn push(&mut self, ev: &Event) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(ev.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.shed_backlog += 1;
                if self.shed_backlog.is_power_of_two() {
                    warn!(dir = %self.dir, shed = self.shed_backlog,
                        "Parquet writer behind ({QUEUE_EVENTS} events queued): events shed for Parquet");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.shed_write.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events shed for Parquet so far, by cause: (backlog, write).
    pub fn shed(&self) -> (u64, u64) {
        (
            self.shed_backlog,
            self.stats.shed_write.load(Ordering::Relaxed),
        )
    }

    pub fn counts(&self) -> LakeCounts {
        let s = &self.stats;
        LakeCounts {
            files: s.files.load(Ordering::Relaxed),
            rows: s.rows.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            temp_finished: s.temp_finished.load(Ordering::Relaxed),
            temp_discarded: s.temp_discarded.load(Ordering::Relaxed),
            queued: self.tx.as_ref().map_or(0, |t| t.len() as u64),
        }
    }

    /// Closes the queue; the writer writes every file it holds, then stops.
    /// Waits `within` at most (a disk that hangs); what is not written by
    /// then counts as shed.
    pub fn finish(&mut self, within: Duration) {
        let Some(tx) = self.tx.take() else { return };
        let queued = tx.len() as u64;
        drop(tx);
        if let Some(w) = self.writer.take() {
            let end = Instant::now() + within;
            while !w.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !w.is_finished() {
                error!(dir = %self.dir, "the Parquet writer did not finish in time");
                self.stats.shed_write.fetch_add(queued, Ordering::Relaxed);
            } else if w.join().is_err() {
                error!(dir = %self.dir, "the Parquet thread panicked");
            }
        }
    }
}

impl Drop for ParquetSink {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(5));
    }
}

/// The rows of one file in the making.
struct Pending {
    builder: ArrayBuilder,
    in_builder: usize,
    batches: Vec<RecordBatch>,
    rows: u64,
    bytes: usize,
    opened: Instant,
}

/// The Parquet thread's state.
struct Writer {
    root: Root,
    schema: Arc<Schema>,
    fields: Vec<FieldRef>,
    region: String,
    account: String,
    roll: Duration,
    roll_bytes: usize,
    prefix: String,
    seq: u64,
    /// Files in the making, by (source, event day).
    open: HashMap<(String, String), Pending>,
    stats: Arc<Stats>,
    /// The last write failed and none succeeded since (logged once).
    failing: bool,
}

impl Writer {
    fn run(&mut self, rx: &Receiver<Event>) {
        loop {
            match rx.recv_timeout(self.until_next_roll()) {
                Ok(ev) => self.add(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.roll_due(false);
        }
        self.roll_due(true);
    }

    /// How long until the oldest open file is due (at most a second).
    fn until_next_roll(&self) -> Duration {
        self.open
            .values()
            .map(|p| self.roll.saturating_sub(p.opened.elapsed()))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1))
    }

    fn add(&mut self, mut ev: Event) {
        // OCSF types `data` as json: the one column of JSON text.
        for e in &mut ev.evidences {
            if !e.data.is_string() {
                e.data = serde_json::Value::String(e.data.to_string());
            }
        }
        let key = (
            layout::source_name(ev.class_uid),
            layout::event_day(ev.time),
        );
        if !self.open.contains_key(&key) {
            let builder = match ArrayBuilder::from_arrow(&self.fields) {
                Ok(b) => b,
                Err(e) => {
                    self.shed_rows(1, &format!("cannot build Arrow arrays: {e}"));
                    return;
                }
            };
            self.open.insert(
                key.clone(),
                Pending {
                    builder,
                    in_builder: 0,
                    batches: Vec::new(),
                    rows: 0,
                    bytes: 0,
                    opened: Instant::now(),
                },
            );
        }
        let p = self.open.get_mut(&key).expect("inserted above");
        if let Err(e) = p.builder.push(&ev) {
            let uid = ev.metadata.uid.clone();
            self.shed_rows(1, &format!("event {uid} has no row in the schema: {e}"));
            return;
        }
        p.in_builder += 1;
        p.rows += 1;
        if p.in_builder >= BATCH_ROWS {
            let r = take_batch(p);
            if let Err(e) = r {
                let n = p.rows;
                self.open.remove(&key);
                self.shed_rows(n, &e);
                return;
            }
        }
        if p.bytes >= self.roll_bytes {
            self.close(&key);
        }
    }

    /// Closes the files that are due (`all`: every one).
    fn roll_due(&mut self, all: bool) {
        let due: Vec<(String, String)> = self
            .open
            .iter()
            .filter(|(_, p)| all || p.opened.elapsed() >= self.roll)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.close(&key);
        }
    }

    fn close(&mut self, key: &(String, String)) {
        let Some(mut p) = self.open.remove(key) else {
            return;
        };
        let rows = p.rows;
        match self.write(key, &mut p) {
            Ok(bytes) => {
                self.stats.files.fetch_add(1, Ordering::Relaxed);
                self.stats.rows.fetch_add(rows, Ordering::Relaxed);
                self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    warn!(dir = %self.root.path.display(), "Parquet files are written again");
                }
            }
            Err(e) => self.shed_rows(rows, &e),
        }
    }

    fn write(&mut self, (source, day): &(String, String), p: &mut Pending) -> Result<u64, String> {
        if p.in_builder > 0 {
            take_batch(p)?;
        }
        let batch = arrow_select::concat::concat_batches(&self.schema_of(p), &p.batches)
            .map_err(|e| e.to_string())?;
        let batch = files::sort_by_time(&batch)?;
        let (fd, dir) = self
            .root
            .partition(source, &self.region, &self.account, day)
            .map_err(|e| e.to_string())?;
        self.seq += 1;
        let name = format!("keywarden-{}-{:06}.parquet", self.prefix, self.seq);
        files::write(&fd, &dir, &name, &batch).map_err(|e| e.to_string())
    }

    /// The batches' schema: the traced one, with the field metadata the
    /// builder carries.
    fn schema_of(&self, p: &Pending) -> Arc<Schema> {
        p.batches
            .first()
            .map_or_else(|| self.schema.clone(), RecordBatch::schema)
    }

    fn shed_rows(&mut self, n: u64, why: &str) {
        self.stats.shed_write.fetch_add(n, Ordering::Relaxed);
        if !self.failing {
            self.failing = true;
            error!(dir = %self.root.path.display(), events = n,
                "Parquet export: events not written (shed as parquet_write): {why}");
        }
    }
}

/// The builder's rows as a batch, counted toward the file's size.
fn take_batch(p: &mut Pending) -> Result<(), String> {
    let batch = p
        .builder
        .to_record_batch()
        .map_err(|e| format!("building an Arrow batch: {e}"))?;
    p.bytes += batch.get_array_memory_size();
    p.batches.push(batch);
    p.in_builder = 0;
    Ok(())
}

#[cfg(test)]
mod tests;
