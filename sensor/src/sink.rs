//! NDJSON output.
//!
//! A write that fails (a full disk, a closed pipe) does not lose events:
//! they stay in a bounded backlog that is retried on every flush. Only past
//! the bound are events dropped, and those are counted and reported.

use std::{
    collections::VecDeque,
    fs::OpenOptions,
    io::{BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
};

use anyhow::{Context, Result};
use keywarden_analyzer::event::Event;
use tracing::{error, warn};

pub const BACKLOG_MAX: usize = 100_000;

pub struct NdjsonSink {
    out: Box<dyn Write + Send>,
    name: String,
    backlog: VecDeque<Vec<u8>>,
    /// The longest line so far (up to 16 KiB): each line is serialised into a buffer of
    /// that size, not grown from empty through a chain of reallocations
    /// (a key-use event is ~2 KB of JSON).
    line_capacity: usize,
    pub written: u64,
    pub dropped: u64,
    failing: bool,
}

impl NdjsonSink {
    pub fn open(target: &str) -> Result<Self> {
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
        Ok(Self::new(out, name))
    }

    pub fn new(out: Box<dyn Write + Send>, name: String) -> Self {
        Self {
            out,
            name,
            backlog: VecDeque::new(),
            line_capacity: 1024,
            written: 0,
            dropped: 0,
            failing: false,
        }
    }

    pub fn push(&mut self, ev: &Event) {
        let mut line = Vec::with_capacity(self.line_capacity);
        if let Err(e) = serde_json::to_writer(&mut line, ev) {
            error!(error = %e, "event could not be serialized");
            self.dropped += 1;
            return;
        }
        line.push(b'\n');
        // Capped: one huge finding must not make every line allocate big.
        self.line_capacity = self.line_capacity.max(line.len().min(16 * 1024));
        if self.backlog.len() >= BACKLOG_MAX {
            self.backlog.pop_front();
            self.dropped += 1;
        }
        self.backlog.push_back(line);
    }

    /// Writes what it can. Returns the number of events still waiting.
    pub fn flush(&mut self) -> usize {
        while let Some(line) = self.backlog.front() {
            if let Err(e) = self.out.write_all(line) {
                self.report(e);
                return self.backlog.len();
            }
            self.backlog.pop_front();
            self.written += 1;
        }
        if let Err(e) = self.out.flush() {
            self.report(e);
            return self.backlog.len();
        }
        if self.failing {
            warn!(output = %self.name, "output writable again; backlog written");
            self.failing = false;
        }
        0
    }

    fn report(&mut self, e: std::io::Error) {
        if !self.failing {
            error!(output = %self.name, error = %e, backlog = self.backlog.len(),
                "cannot write events; keeping them in memory (up to {BACKLOG_MAX}) and retrying");
            self.failing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywarden_analyzer::event::Origin;
    use std::sync::{Arc, Mutex};

    /// A writer that fails while `full` is set, like a disk without space.
    #[derive(Clone)]
    struct Disk {
        data: Arc<Mutex<Vec<u8>>>,
        full: Arc<Mutex<bool>>,
    }
    impl Write for Disk {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if *self.full.lock().unwrap() {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
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

    #[test]
    fn full_disk_keeps_events_until_space_returns() {
        let disk = Disk {
            data: Default::default(),
            full: Arc::new(Mutex::new(true)),
        };
        let mut sink = NdjsonSink::new(Box::new(disk.clone()), "disk".into());
        for i in 0..3 {
            sink.push(&event(i));
        }
        assert_eq!(sink.flush(), 3);
        assert!(disk.data.lock().unwrap().is_empty());
        *disk.full.lock().unwrap() = false;
        assert_eq!(sink.flush(), 0);
        let text = String::from_utf8(disk.data.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for (i, l) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["metadata"]["uid"], format!("p-{i}"));
        }
        assert_eq!((sink.written, sink.dropped), (3, 0));
    }
}
