//! The inventory on disk: the document written and read (docs/keys.md),
//! `Inventory::read`, `load`, `to_json` and `save`, and the `Writer`.
//!
//! The event loop saves the inventory every `SAVE_EVERY` when it changed
//! (`Writer`, which writes off the event thread), and at exit, atomically
//! and mode 0600 (`atomic_file`); it is loaded at start, so the counts
//! survive restarts.
//!
//! Apart from the model (`mod.rs`): this is the only part that touches
//! the disk, and what must hold against a file someone planted.

use std::{
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{Inventory, KeyEntry, Limits};

/// How often the event loop writes the inventory, when it changed.
pub const SAVE_EVERY: Duration = Duration::from_secs(30);

/// The format written (`version`); a file of another version is refused.
pub const VERSION: u32 = 1;

/// Bytes read of an inventory file, at most: a full inventory is about
/// `Limits::bytes` of text plus its JSON.
const MAX_FILE: u64 = 256 << 20;

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: cannot read the key inventory: {why}")]
    Read { path: String, why: String },
    #[error(
        "{path}: not a key inventory keywarden can read ({why}); move it away to start a new one"
    )]
    Parse { path: String, why: String },
    #[error("{path}: cannot write the key inventory: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The file, and `keywarden keys --json`, as written (docs/keys.md).
#[derive(Serialize)]
struct DocumentOut<'a> {
    version: u32,
    saved_ms: Option<i64>,
    keys: Vec<KeyView<'a>>,
    keys_omitted: u64,
}

/// An entry as written: with whether it is unused, for whoever reads it.
#[derive(Serialize)]
struct KeyView<'a> {
    #[serde(flatten)]
    entry: &'a KeyEntry,
    unused: bool,
}

/// The file as read (`unused` is derived again from `uses`).
#[derive(Deserialize)]
struct DocumentIn {
    version: u32,
    #[serde(default)]
    saved_ms: Option<i64>,
    #[serde(default)]
    keys: Vec<KeyEntry>,
    #[serde(default)]
    keys_omitted: u64,
}

impl Inventory {
    /// The inventory at `path`, or an empty one if there is none yet.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        Ok(Self::read(path)?.unwrap_or_default())
    }

    /// The inventory at `path`; `None` if there is no file. A symbolic
    /// link at `path` is refused: the sensor runs as root, and reading
    /// through a link someone planted would load whatever it names (and
    /// write it back at the next save).
    pub fn read(path: &Path) -> Result<Option<Self>, InventoryError> {
        let shown = path.display().to_string();
        let read_err = |why: String| InventoryError::Read {
            path: shown.clone(),
            why,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            // Not blocked by a FIFO planted at the path.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path);
        let file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(read_err(
                    "it is a symbolic link, which the sensor does not follow".into(),
                ));
            }
            Err(e) => return Err(read_err(e.to_string())),
        };
        let md = file.metadata().map_err(|e| read_err(e.to_string()))?;
        if !md.is_file() {
            return Err(read_err("not a regular file".into()));
        }
        if md.len() > MAX_FILE {
            return Err(read_err(format!("larger than {MAX_FILE} bytes")));
        }
        let mut body = Vec::with_capacity(md.len() as usize);
        file.take(MAX_FILE)
            .read_to_end(&mut body)
            .map_err(|e| read_err(e.to_string()))?;
        Self::parse(&body, Limits::default())
            .map(Some)
            .map_err(|why| InventoryError::Parse { path: shown, why })
    }

    /// An inventory from its JSON, its counters worked out again.
    fn parse(body: &[u8], limits: Limits) -> Result<Self, String> {
        // serde would also read a struct from an array of its fields: the
        // file is an object or nothing.
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if !value.is_object() {
            return Err("not a JSON object".to_owned());
        }
        let doc = DocumentIn::deserialize(value).map_err(|e| e.to_string())?;
        if doc.version != VERSION {
            return Err(format!(
                "version {}, where this keywarden writes {VERSION}",
                doc.version
            ));
        }
        let mut inv = Inventory::with_limits(limits);
        inv.keys_omitted = doc.keys_omitted;
        inv.saved_ms = doc.saved_ms;
        for e in doc.keys {
            if inv.keys.contains_key(&e.spki_sha256) {
                continue;
            }
            inv.st.bytes = inv.st.bytes.saturating_add(e.cost());
            inv.st.unused += usize::from(e.unused());
            inv.keys.insert(e.spki_sha256.clone(), e);
        }
        Ok(inv)
    }

    /// The inventory as written (docs/keys.md): compact for the file,
    /// indented for people.
    pub fn to_json(&self, pretty: bool) -> serde_json::Result<Vec<u8>> {
        let doc = DocumentOut {
            version: VERSION,
            saved_ms: self.saved_ms,
            keys: self
                .keys()
                .map(|entry| KeyView {
                    entry,
                    unused: entry.unused(),
                })
                .collect(),
            keys_omitted: self.keys_omitted,
        };
        if pretty {
            serde_json::to_vec_pretty(&doc)
        } else {
            serde_json::to_vec(&doc)
        }
    }

    /// The inventory as the file will hold it, stamped with the time;
    /// from now on it counts as saved (`changed` is false) unless the
    /// write fails.
    fn snapshot(&mut self, path: &Path) -> Result<Vec<u8>, InventoryError> {
        self.saved_ms = Some(now_ms());
        let body = self.to_json(false).map_err(|e| InventoryError::Write {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        self.st.changed = false;
        Ok(body)
    }

    /// Writes the inventory to `path` (`write_file`), on this thread.
    pub fn save(&mut self, path: &Path) -> Result<(), InventoryError> {
        let body = self.snapshot(path)?;
        write_file(path, &body).inspect_err(|_| self.st.changed = true)
    }

    /// `save`, when something changed since the last one.
    pub fn save_if_changed(&mut self, path: &Path) -> Result<(), InventoryError> {
        if self.changed() {
            self.save(path)
        } else {
            Ok(())
        }
    }
}

/// Writes an inventory's JSON to `path`, atomically and readable by its
/// owner only (`atomic_file`): it names every key file and signing
/// program of the host. A symbolic link at `path` is replaced, never
/// written through.
fn write_file(path: &Path, body: &[u8]) -> Result<(), InventoryError> {
    let err = |source| InventoryError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    keywarden_analyzer::atomic_file::write(path, body, 0o600).map_err(err)
}

/// Writes the inventory off the event thread, which releases held
/// processes and must not wait for a disk: an fsync can take seconds on a
/// busy one. The event thread only turns the inventory into JSON (a few
/// KiB on most hosts); one write is under way at a time.
pub struct Writer {
    path: PathBuf,
    running: Option<JoinHandle<Result<(), InventoryError>>>,
}

impl Writer {
    pub fn new(path: PathBuf) -> Self {
        Writer {
            path,
            running: None,
        }
    }

    /// Starts writing `inv` if it changed since the last write and none is
    /// under way. Returns the error of a write that ended since the last
    /// call; the inventory then counts as changed, and the next call
    /// writes it again.
    pub fn save(&mut self, inv: &mut Inventory) -> Option<InventoryError> {
        let failed = self.collect(inv, false);
        if self.running.is_some() || !inv.changed() {
            return failed;
        }
        let body = match inv.snapshot(&self.path) {
            Ok(body) => body,
            Err(e) => return Some(e),
        };
        let path = self.path.clone();
        match std::thread::Builder::new()
            .name("keywarden-inventory".into())
            .spawn(move || write_file(&path, &body))
        {
            Ok(h) => self.running = Some(h),
            Err(e) => {
                inv.st.changed = true;
                return Some(InventoryError::Write {
                    path: self.path.display().to_string(),
                    source: e,
                });
            }
        }
        failed
    }

    /// The result of the write under way, if it ended (or, with `wait`,
    /// once it ends).
    fn collect(&mut self, inv: &mut Inventory, wait: bool) -> Option<InventoryError> {
        let h = self.running.take()?;
        if !wait && !h.is_finished() {
            self.running = Some(h);
            return None;
        }
        let failed = match h.join() {
            Ok(result) => result.err(),
            Err(_) => Some(InventoryError::Write {
                path: self.path.display().to_string(),
                source: std::io::Error::other("the thread writing it panicked"),
            }),
        };
        if failed.is_some() {
            inv.st.changed = true;
        }
        failed
    }

    /// At exit: waits for the write under way, then writes what changed
    /// since (or what it failed to write) on this thread.
    pub fn finish(&mut self, inv: &mut Inventory) -> Result<(), InventoryError> {
        // A failure here leaves the inventory changed: written again below,
        // and reported if that fails too.
        let _ = self.collect(inv, true);
        inv.save_if_changed(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::{
        super::tests::{by, cert, file, key},
        *,
    };

    /// What is written reads back the same, counters included, and says
    /// which keys are unused.
    #[test]
    fn the_inventory_round_trips_through_its_json() {
        let mut inv = Inventory::default();
        let (a, ka) = key(1);
        let (b, kb) = key(2);
        inv.learnt(ka, &file("/a.key"), 10);
        inv.learnt(kb, &file("/b.crt"), 10);
        inv.add_certificates(&[cert(&b, "CN=b")], &file("/b.crt"));
        inv.used(&by(ka, "openssl", "/usr/bin/openssl", 20));
        inv.keys_omitted = 3;
        let json = inv.to_json(false).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["version"], 1);
        assert_eq!(value["keys_omitted"], 3);
        let keys = value["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        let by_spki = |s: &str| keys.iter().find(|k| k["spki_sha256"] == s).unwrap();
        assert_eq!(by_spki(&a)["unused"], false);
        assert_eq!(by_spki(&b)["unused"], true);
        assert_eq!(by_spki(&b)["certificates"][0]["subject"], "CN=b");

        let back = Inventory::parse(&json, Limits::default()).unwrap();
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            inv.keys().collect::<Vec<_>>()
        );
        assert_eq!(back.keys_omitted(), 3);
        assert_eq!(back.unused_count(), 1);
        assert_eq!(back.st.bytes, inv.st.bytes, "the budget is counted again");
        assert!(!back.changed());
        assert_eq!(back.to_json(false).unwrap(), json);

        assert!(
            Inventory::parse(br#"{"version":2,"keys":[]}"#, Limits::default())
                .unwrap_err()
                .contains("version 2")
        );
        assert!(Inventory::parse(b"[1]", Limits::default()).is_err());
    }

    /// Saved atomically with mode 0600 and loaded again; a missing file is
    /// an empty inventory; a symbolic link at the path is refused when
    /// read and replaced, never written through, when saved.
    #[test]
    fn saves_are_private_and_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/inventory.json");
        assert!(Inventory::read(&path).unwrap().is_none());
        assert!(Inventory::load(&path).unwrap().is_empty());

        let mut inv = Inventory::default();
        let (a, ka) = key(1);
        inv.learnt(ka, &file("/a.key"), 10);
        assert!(inv.changed());
        inv.save_if_changed(&path).unwrap();
        assert!(!inv.changed());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Inventory::load(&path).unwrap();
        assert_eq!(back.get(&a), inv.get(&a));
        assert!(back.saved_ms.is_some());
        // Nothing changed: nothing written.
        std::fs::remove_file(&path).unwrap();
        inv.save_if_changed(&path).unwrap();
        assert!(!path.exists());

        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"{\"version\":1,\"keys\":[]}").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = Inventory::load(&path).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        inv.save(&path).unwrap();
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"{\"version\":1,\"keys\":[]}"
        );
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert!(Inventory::load(&path).unwrap().get(&a).is_some());

        std::fs::write(&path, b"not json").unwrap();
        let err = Inventory::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a key inventory"), "{err}");
    }

    /// The writer writes off the calling thread, one write at a time, and
    /// a failed write leaves the inventory to be written again.
    #[test]
    fn the_writer_writes_in_the_background_and_retries_failures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inventory.json");
        let mut inv = Inventory::default();
        let (a, ka) = key(1);
        inv.learnt(ka, &file("/a.key"), 10);
        let mut w = Writer::new(path.clone());
        assert!(w.save(&mut inv).is_none());
        assert!(!inv.changed(), "counted as written once handed over");
        w.finish(&mut inv).unwrap();
        assert!(Inventory::load(&path).unwrap().get(&a).is_some());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A directory in the way of the file: the write fails, is reported,
        // and is tried again.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inventory.json")).unwrap();
        let mut w = Writer::new(blocked.join("inventory.json"));
        inv.learnt(key(2).1, &file("/b.key"), 10);
        assert!(w.save(&mut inv).is_none(), "the failure is not known yet");
        let err = w.collect(&mut inv, true).expect("the write failed");
        assert!(
            err.to_string().contains("cannot write the key inventory"),
            "{err}"
        );
        assert!(inv.changed(), "to be written again");
        assert!(w.finish(&mut inv).is_err());
        assert!(inv.changed());
    }

    /// The example in docs/keys.md is an inventory this code reads and
    /// writes back unchanged: the documentation shows the format as it is.
    #[test]
    fn the_documented_example_is_the_format() {
        let doc = include_str!("../../../../docs/keys.md");
        let start = doc.find("```json\n").expect("a JSON example") + 8;
        let end = start + doc[start..].find("```").unwrap();
        let example: serde_json::Value = serde_json::from_str(&doc[start..end]).unwrap();
        let inv = Inventory::parse(&doc.as_bytes()[start..end], Limits::default()).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&inv.to_json(true).unwrap()).unwrap();
        assert_eq!(back, example);
    }
}
