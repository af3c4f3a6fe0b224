//! The key inventory: every key the sensor has seen, kept in memory and on
//! disk, so that whoever must rotate or revoke a key can see where it lives
//! and who depends on it (`keywarden keys`, docs/keys.md).
//!
//! For each key, by SPKI SHA-256: its algorithm and size; the files it was
//! loaded from or found in, the listeners that present it, and whether it
//! was recovered from signatures; the certificates with that SPKI (as the
//! files say: no signature on them is checked); the processes that signed
//! with it (name, executable, the executable's SHA-256), each with its
//! count and first and last use; and the key's own count and first and last
//! use. A key no one has signed with since the inventory began is *unused*:
//! a certificate or key on disk names it, and nothing uses it.
//!
//! It is fed by `identify` (every key learnt, from wherever: files,
//! listeners, recovery, the start-up scans), by the callers that read
//! certificates (`run::startup`, `run::secret_opens`, `run::key_uses` for
//! what a search found) and by `run::key_uses` (each signature whose key is
//! named). The event loop saves it every `SAVE_EVERY` when it changed
//! (`Writer`, which writes off the event thread), and at exit, atomically
//! and mode 0600 (`atomic_file`); it is loaded at start, so the counts
//! survive restarts.
//!
//! Every list is fed by what processes do on the host, and a hostile one
//! can mint keys, files, certificates and executables at will. So:
//! * at most `Limits::keys` keys, of which at most `Limits::unused` unused:
//!   keys merely learnt (a file opened) cannot crowd out keys that sign;
//! * per key, bounded lists of files, listeners, certificates (and the
//!   places each was found) and processes;
//! * each text cut at `MAX_TEXT` bytes, and all the texts kept at most
//!   `Limits::bytes` (about: each item also counts a fixed overhead).
//!
//! What a bound turns away is counted (`keys_omitted`, `*_omitted`) each
//! time it is turned away, never dropped silently.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::Duration,
};

use keywarden_analyzer::event::{KeyStatus, KeyUse};
use serde::{Deserialize, Serialize};

use super::{
    identify::Source,
    material::{Certificate, KeyInfo, clip},
};

/// How often the event loop writes the inventory, when it changed.
pub const SAVE_EVERY: Duration = Duration::from_secs(30);

/// The format written (`version`); a file of another version is refused.
pub const VERSION: u32 = 1;

/// Bytes kept of one text (a path, a listener, a process name): a path is
/// at most this long on Linux.
pub const MAX_TEXT: usize = 4096;

/// Bytes read of an inventory file, at most: a full inventory is about
/// `Limits::bytes` of text plus its JSON.
const MAX_FILE: u64 = 256 << 20;

/// The bytes an entry, a certificate and a list item count beside their
/// texts: the memory they take, roughly.
const ENTRY_COST: usize = 256;
const CERTIFICATE_COST: usize = 128;
const ITEM_COST: usize = 32;

/// The bounds of one inventory. The defaults are for a host; tests use
/// small ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub keys: usize,
    /// Keys no signature was seen with.
    pub unused: usize,
    pub files: usize,
    pub listeners: usize,
    pub certificates: usize,
    /// Places (files, listeners) listed per certificate.
    pub places: usize,
    pub processes: usize,
    /// Text bytes in all (`ENTRY_COST` and the like included).
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            keys: 100_000,
            unused: 50_000,
            files: 64,
            listeners: 16,
            certificates: 16,
            places: 16,
            processes: 64,
            bytes: 64 << 20,
        }
    }
}

/// One key of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: String,
    /// `rsa-2048`, `ecdsa-p256`, `ed25519`, ...
    pub algorithm: String,
    pub bits: u32,
    /// When the sensor first learnt of the key or saw it sign (ms since the
    /// epoch).
    pub first_seen_ms: i64,
    /// Signatures made with it (successful calls whose key was named).
    #[serde(default)]
    pub uses: u64,
    #[serde(default)]
    pub first_use_ms: Option<i64>,
    #[serde(default)]
    pub last_use_ms: Option<i64>,
    /// Who signed with it, one entry per process name and executable.
    #[serde(default)]
    pub processes: Vec<ProcessEntry>,
    /// Signatures by processes past `Limits::processes`, not listed.
    #[serde(default)]
    pub processes_omitted: u64,
    /// Files that gave the key (private keys, public keys, certificates):
    /// the path as the process that opened it saw it, or the host path of
    /// a `key_paths` or `key_locations` file.
    #[serde(default)]
    pub files: Vec<String>,
    /// Sightings of files past `Limits::files` (a file seen twice counts
    /// twice).
    #[serde(default)]
    pub files_omitted: u64,
    /// TLS listeners that presented a certificate for it to the sensor's
    /// own handshake: `ADDRESS:PORT`, and `(server name NAME)` when the
    /// handshake sent one.
    #[serde(default)]
    pub listeners: Vec<String>,
    #[serde(default)]
    pub listeners_omitted: u64,
    /// Recovered from two of a process's ECDSA signatures.
    #[serde(default)]
    pub recovered: bool,
    #[serde(default)]
    pub certificates: Vec<CertificateEntry>,
    /// Sightings of certificates past `Limits::certificates`.
    #[serde(default)]
    pub certificates_omitted: u64,
}

/// A process that signed with a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    /// The kernel's `comm` (at most 15 bytes).
    pub name: String,
    /// Its executable, as the process saw it, when the sensor knew it.
    pub exe: Option<String>,
    /// The executable's SHA-256, when the sensor could hash it.
    pub exe_sha256: Option<String>,
    pub uses: u64,
    pub first_use_ms: i64,
    pub last_use_ms: i64,
}

/// A certificate for a key, as its file or listener presented it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateEntry {
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex, no leading zero bytes.
    pub serial: String,
    /// subjectAltName entries: `DNS:…`, `IP:…`, `email:…`, `URI:…`.
    #[serde(default)]
    pub sans: Vec<String>,
    #[serde(default)]
    pub sans_omitted: u64,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    /// Where it was found: files and listeners, written like the key's.
    #[serde(default)]
    pub found_in: Vec<String>,
    #[serde(default)]
    pub found_in_omitted: u64,
}

impl CertificateEntry {
    /// The same certificate, by everything read from it. (Not by issuer
    /// and serial alone: the sensor checks no signature, and anyone can
    /// write a certificate that copies those of a real one.)
    fn describes(&self, c: &Certificate) -> bool {
        self.serial == c.serial
            && self.issuer == c.issuer
            && self.subject == c.subject
            && self.not_before_ms == c.not_before_ms
            && self.not_after_ms == c.not_after_ms
            && self.sans == c.sans
            && self.sans_omitted == c.sans_omitted as u64
    }

    fn cost(&self) -> usize {
        CERTIFICATE_COST
            + self.subject.len()
            + self.issuer.len()
            + self.serial.len()
            + self.sans.iter().map(|s| ITEM_COST + s.len()).sum::<usize>()
            + self
                .found_in
                .iter()
                .map(|s| ITEM_COST + s.len())
                .sum::<usize>()
    }
}

impl KeyEntry {
    fn new(key: KeyRef<'_>, now_ms: i64) -> Self {
        KeyEntry {
            spki_sha256: key.spki_sha256.to_owned(),
            algorithm: clip(key.algorithm.to_owned(), MAX_TEXT),
            bits: key.bits,
            first_seen_ms: now_ms,
            uses: 0,
            first_use_ms: None,
            last_use_ms: None,
            processes: Vec::new(),
            processes_omitted: 0,
            files: Vec::new(),
            files_omitted: 0,
            listeners: Vec::new(),
            listeners_omitted: 0,
            recovered: false,
            certificates: Vec::new(),
            certificates_omitted: 0,
        }
    }

    /// No signature was seen with it.
    pub fn unused(&self) -> bool {
        self.uses == 0
    }

    /// What it counts against `Limits::bytes`.
    fn cost(&self) -> usize {
        let texts = |l: &[String]| l.iter().map(|s| ITEM_COST + s.len()).sum::<usize>();
        ENTRY_COST
            + self.spki_sha256.len()
            + self.algorithm.len()
            + texts(&self.files)
            + texts(&self.listeners)
            + self.processes.iter().map(ProcessEntry::cost).sum::<usize>()
            + self
                .certificates
                .iter()
                .map(CertificateEntry::cost)
                .sum::<usize>()
    }
}

impl ProcessEntry {
    fn cost(&self) -> usize {
        ITEM_COST
            + self.name.len()
            + self.exe.as_ref().map_or(0, String::len)
            + self.exe_sha256.as_ref().map_or(0, String::len)
    }
}

/// A key as the inventory names it: no public key, only what identifies it.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    pub spki_sha256: &'a str,
    pub algorithm: &'a str,
    pub bits: u32,
}

impl<'a> From<&'a KeyInfo> for KeyRef<'a> {
    fn from(k: &'a KeyInfo) -> Self {
        KeyRef {
            spki_sha256: &k.spki_sha256,
            algorithm: &k.algorithm,
            bits: k.bits,
        }
    }
}

/// A signature whose key was named, as the inventory records it.
#[derive(Debug, Clone, Copy)]
pub struct Use<'a> {
    pub key: KeyRef<'a>,
    pub process: &'a str,
    pub exe: Option<&'a str>,
    pub exe_sha256: Option<&'a str>,
    pub time_ms: i64,
}

impl<'a> Use<'a> {
    /// The use a Key Use event records: none for a failed call or a key
    /// the sensor could not name.
    pub fn of(u: &'a KeyUse) -> Option<Self> {
        if !u.success || u.key.status != KeyStatus::Identified {
            return None;
        }
        let exe = u.process.file.as_ref();
        Some(Use {
            key: KeyRef {
                spki_sha256: u.key.spki_sha256.as_deref()?,
                algorithm: u.key.algorithm.as_deref().unwrap_or_default(),
                bits: u.key.bits.unwrap_or_default(),
            },
            process: &u.process.name,
            exe: exe.map(|f| f.path.as_str()).filter(|p| !p.is_empty()),
            exe_sha256: exe
                .and_then(|f| f.hashes.iter().find(|h| h.algorithm_id == 3))
                .map(|h| h.value.as_str()),
            time_ms: u.time_ms,
        })
    }
}

/// The inventory's counters beside its keys.
#[derive(Debug, Default)]
struct State {
    limits: Limits,
    /// Entries with no use.
    unused: usize,
    /// What the entries count against `Limits::bytes`.
    bytes: usize,
    /// Something changed since the last save.
    changed: bool,
}

impl State {
    /// Takes `cost` bytes of the budget, if they are left.
    fn take(&mut self, cost: usize) -> bool {
        if self.bytes.saturating_add(cost) > self.limits.bytes {
            return false;
        }
        self.bytes += cost;
        true
    }

    /// Adds `text` to a bounded list unless it is there already; one past
    /// the bound (or the budget) is counted in `omitted` instead.
    fn add_text(&mut self, list: &mut Vec<String>, omitted: &mut u64, text: &str, max: usize) {
        let text = clipped(text);
        if list.iter().any(|x| *x == *text) {
            return;
        }
        self.changed = true;
        if list.len() >= max || !self.take(ITEM_COST + text.len()) {
            *omitted += 1;
            return;
        }
        list.push(text.into_owned());
    }
}

/// `text` cut at `MAX_TEXT` bytes, copied only when it is cut.
fn clipped(text: &str) -> Cow<'_, str> {
    if text.len() > MAX_TEXT {
        Cow::Owned(clip(text.to_owned(), MAX_TEXT))
    } else {
        Cow::Borrowed(text)
    }
}

/// Where a source says a key or certificate was: a file's path, a
/// listener's address (none for a recovered key).
fn place(source: &Source) -> Option<String> {
    match source {
        Source::File(path) => Some(path.clone()),
        Source::Listener {
            endpoint,
            server_name: None,
        } => Some(endpoint.clone()),
        Source::Listener {
            endpoint,
            server_name: Some(name),
        } => Some(format!("{endpoint} (server name {name})")),
        Source::Recovered => None,
    }
}

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

/// Every key seen, by SPKI SHA-256, within its `Limits`.
#[derive(Debug, Default)]
pub struct Inventory {
    keys: BTreeMap<String, KeyEntry>,
    /// Keys turned away by a bound, counted each time one was.
    keys_omitted: u64,
    /// When it was last written (or, when read, last written by the sensor).
    saved_ms: Option<i64>,
    st: State,
}

/// The entry of `key`, made if the bounds allow: a key about to be used
/// needs only room for a key, one merely learnt also room for an unused one.
fn entry<'a>(
    keys: &'a mut BTreeMap<String, KeyEntry>,
    keys_omitted: &mut u64,
    st: &mut State,
    key: KeyRef<'_>,
    now_ms: i64,
    for_use: bool,
) -> Option<&'a mut KeyEntry> {
    if !keys.contains_key(key.spki_sha256) {
        st.changed = true;
        let full = keys.len() >= st.limits.keys || (!for_use && st.unused >= st.limits.unused);
        let e = KeyEntry::new(key, now_ms);
        if full || !st.take(e.cost()) {
            *keys_omitted += 1;
            return None;
        }
        st.unused += 1;
        keys.insert(e.spki_sha256.clone(), e);
    }
    keys.get_mut(key.spki_sha256)
}

impl Inventory {
    /// An empty inventory with these bounds.
    pub fn with_limits(limits: Limits) -> Self {
        Inventory {
            st: State {
                limits,
                ..State::default()
            },
            ..Inventory::default()
        }
    }

    /// The key with this SPKI SHA-256.
    #[cfg(test)]
    pub fn get(&self, spki_sha256: &str) -> Option<&KeyEntry> {
        self.keys.get(spki_sha256)
    }

    /// Every key, by SPKI SHA-256.
    pub fn keys(&self) -> impl Iterator<Item = &KeyEntry> {
        self.keys.values()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys turned away because the inventory was full.
    pub fn keys_omitted(&self) -> u64 {
        self.keys_omitted
    }

    /// Keys no signature was seen with.
    pub fn unused_count(&self) -> usize {
        self.st.unused
    }

    /// Something changed since it was loaded or last saved.
    pub fn changed(&self) -> bool {
        self.st.changed
    }

    /// The sensor learnt `key` from `source` (`identify`).
    pub fn learnt(&mut self, key: KeyRef<'_>, source: &Source, now_ms: i64) {
        let Some(e) = entry(
            &mut self.keys,
            &mut self.keys_omitted,
            &mut self.st,
            key,
            now_ms,
            false,
        ) else {
            return;
        };
        let limits = self.st.limits;
        match (source, place(source)) {
            (Source::File(_), Some(path)) => {
                self.st
                    .add_text(&mut e.files, &mut e.files_omitted, &path, limits.files)
            }
            (Source::Listener { .. }, Some(at)) => self.st.add_text(
                &mut e.listeners,
                &mut e.listeners_omitted,
                &at,
                limits.listeners,
            ),
            (Source::Recovered, _) if !e.recovered => {
                e.recovered = true;
                self.st.changed = true;
            }
            _ => {}
        }
    }

    /// Certificates found at `source` (a file, a listener). Each joins the
    /// entry of the key it certifies, which must be learnt first: a
    /// certificate whose key the inventory has no room for is not kept
    /// either.
    pub fn add_certificates(&mut self, certs: &[Certificate], source: &Source) {
        let limits = self.st.limits;
        let at = place(source);
        for c in certs {
            let Some(e) = self.keys.get_mut(&c.spki_sha256) else {
                continue;
            };
            let i = match e.certificates.iter().position(|x| x.describes(c)) {
                Some(i) => i,
                None => {
                    self.st.changed = true;
                    let new = CertificateEntry {
                        subject: c.subject.clone(),
                        issuer: c.issuer.clone(),
                        serial: c.serial.clone(),
                        sans: c.sans.clone(),
                        sans_omitted: c.sans_omitted as u64,
                        not_before_ms: c.not_before_ms,
                        not_after_ms: c.not_after_ms,
                        found_in: Vec::new(),
                        found_in_omitted: 0,
                    };
                    if e.certificates.len() >= limits.certificates || !self.st.take(new.cost()) {
                        e.certificates_omitted += 1;
                        continue;
                    }
                    e.certificates.push(new);
                    e.certificates.len() - 1
                }
            };
            if let Some(at) = &at {
                let cert = &mut e.certificates[i];
                self.st.add_text(
                    &mut cert.found_in,
                    &mut cert.found_in_omitted,
                    at,
                    limits.places,
                );
            }
        }
    }

    /// A signature named its key (`run::key_uses`).
    pub fn used(&mut self, u: &Use<'_>) {
        let Some(e) = entry(
            &mut self.keys,
            &mut self.keys_omitted,
            &mut self.st,
            u.key,
            u.time_ms,
            true,
        ) else {
            return;
        };
        let st = &mut self.st;
        st.changed = true;
        if e.uses == 0 {
            st.unused = st.unused.saturating_sub(1);
        }
        e.uses += 1;
        e.first_use_ms = Some(e.first_use_ms.map_or(u.time_ms, |t| t.min(u.time_ms)));
        e.last_use_ms = Some(e.last_use_ms.map_or(u.time_ms, |t| t.max(u.time_ms)));
        e.first_seen_ms = e.first_seen_ms.min(u.time_ms);

        let name = clipped(u.process);
        let exe = u.exe.map(clipped);
        let hash = u.exe_sha256.map(clipped);
        // One entry per name and executable; a use without the hash (the
        // executable could not be hashed) counts for the entry with one.
        let same = |p: &ProcessEntry| {
            p.name == *name
                && p.exe.as_deref() == exe.as_deref()
                && (p.exe_sha256.is_none()
                    || hash.is_none()
                    || p.exe_sha256.as_deref() == hash.as_deref())
        };
        match e.processes.iter_mut().find(|p| same(p)) {
            Some(p) => {
                p.uses += 1;
                p.first_use_ms = p.first_use_ms.min(u.time_ms);
                p.last_use_ms = p.last_use_ms.max(u.time_ms);
                if p.exe_sha256.is_none()
                    && let Some(h) = &hash
                    && st.take(h.len())
                {
                    p.exe_sha256 = Some(h.to_string());
                }
            }
            None => {
                let p = ProcessEntry {
                    name: name.into_owned(),
                    exe: exe.map(Cow::into_owned),
                    exe_sha256: hash.map(Cow::into_owned),
                    uses: 1,
                    first_use_ms: u.time_ms,
                    last_use_ms: u.time_ms,
                };
                if e.processes.len() >= st.limits.processes || !st.take(p.cost()) {
                    e.processes_omitted += 1;
                } else {
                    e.processes.push(p);
                }
            }
        }
    }

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

    /// The inventory as a table, one key a line, used keys first (the
    /// latest use first), then the unused ones.
    pub fn table(&self) -> String {
        if self.is_empty() && self.keys_omitted == 0 {
            return "no keys yet\n".into();
        }
        let mut entries: Vec<&KeyEntry> = self.keys().collect();
        entries.sort_by(|a, b| {
            b.last_use_ms
                .cmp(&a.last_use_ms)
                .then_with(|| a.spki_sha256.cmp(&b.spki_sha256))
        });
        let mut rows: Vec<[String; 7]> = vec![[
            "SPKI SHA-256".into(),
            "ALGORITHM".into(),
            "USES".into(),
            "LAST USE".into(),
            "PROCESSES".into(),
            "CERTIFICATE".into(),
            "FILES".into(),
        ]];
        for e in entries {
            rows.push([
                format!("{}…", e.spki_sha256.chars().take(16).collect::<String>()),
                e.algorithm.clone(),
                if e.unused() {
                    "unused".into()
                } else {
                    e.uses.to_string()
                },
                e.last_use_ms.map_or_else(|| "-".into(), utc),
                list_cell(
                    e.processes.iter().map(|p| p.name.as_str()),
                    e.processes_omitted,
                ),
                match e.certificates.first() {
                    None => "-".into(),
                    Some(c) => {
                        let more = e.certificates.len() - 1 + e.certificates_omitted as usize;
                        let mut cell = format!("{} (until {})", c.subject, day(c.not_after_ms));
                        if more > 0 {
                            cell.push_str(&format!(" +{more}"));
                        }
                        cell
                    }
                },
                {
                    let mut places: Vec<String> = e.files.clone();
                    places.extend(e.listeners.iter().map(|l| format!("tls {l}")));
                    if e.recovered {
                        places.push("recovered from signatures".into());
                    }
                    list_cell(
                        places.iter().map(String::as_str),
                        e.files_omitted + e.listeners_omitted,
                    )
                },
            ]);
        }
        let mut widths = [0usize; 7];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            // Names and paths come from anyone on the host: a control
            // character in one cannot rewrite the terminal.
            let line = crate::logging::escape_line(line.trim_end().as_bytes()).into_owned();
            out.push_str(&String::from_utf8_lossy(&line));
            out.push('\n');
        }
        out.push_str(&format!(
            "{} key(s), {} unused{}{}\n",
            self.keys.len(),
            self.st.unused,
            if self.keys_omitted > 0 {
                format!(
                    "; {} more turned away, the inventory being full",
                    self.keys_omitted
                )
            } else {
                String::new()
            },
            self.saved_ms
                .map_or_else(String::new, |t| format!("; saved {}", utc(t))),
        ));
        out
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

/// Items joined with commas, `+N` for those not listed, `-` for none.
fn list_cell<'a>(items: impl Iterator<Item = &'a str>, omitted: u64) -> String {
    let mut cell = items.collect::<Vec<_>>().join(",");
    if omitted > 0 {
        cell.push_str(&format!(" +{omitted}"));
    }
    if cell.is_empty() { "-".into() } else { cell }
}

/// `ms` since the epoch as a UTC date and time, `2025-01-31T23:59:59Z`.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `ms` since the epoch as a UTC date, `2025-01-31`.
fn day(ms: i64) -> String {
    let (y, m, d) = civil(ms.div_euclid(1000).div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `keywarden keys`: the inventory at `path`, as a table or as JSON.
pub fn print(path: &Path, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let inv = Inventory::read(path)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no key inventory there (the sensor writes it every {} s while it runs, and at exit)",
            path.display(),
            SAVE_EVERY.as_secs()
        )
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        out.write_all(&inv.to_json(true)?)?;
        out.write_all(b"\n")?;
    } else {
        out.write_all(inv.table().as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const DAY: i64 = 86_400_000;

    fn key(n: u32) -> (String, KeyRef<'static>) {
        // Distinct in their first 16 digits, as the table shows them.
        let spki = format!("{n:016x}{}", "0".repeat(48));
        let leaked: &'static str = Box::leak(spki.clone().into_boxed_str());
        (
            spki,
            KeyRef {
                spki_sha256: leaked,
                algorithm: "ecdsa-p256",
                bits: 256,
            },
        )
    }

    fn file(p: &str) -> Source {
        Source::File(p.into())
    }

    fn by(k: KeyRef<'static>, process: &'static str, exe: &'static str, t: i64) -> Use<'static> {
        Use {
            key: k,
            process,
            exe: Some(exe),
            exe_sha256: Some("ab"),
            time_ms: t,
        }
    }

    fn cert(spki: &str, subject: &str) -> Certificate {
        Certificate {
            spki_sha256: spki.into(),
            subject: subject.into(),
            issuer: "CN=Test CA".into(),
            serial: "01".into(),
            sans: vec!["DNS:www.example.test".into()],
            sans_omitted: 0,
            not_before_ms: 0,
            not_after_ms: 30 * DAY,
        }
    }

    /// Files, listeners, recovery and certificates from every source
    /// join one entry per key, each once; uses count per process.
    #[test]
    fn sources_and_uses_merge_into_one_entry_per_key() {
        let mut inv = Inventory::default();
        let (spki, k) = key(1);
        inv.learnt(k, &file("/etc/ssl/a.key"), 1000);
        inv.learnt(k, &file("/etc/ssl/a.key"), 2000);
        inv.learnt(k, &file("/etc/ssl/a.crt"), 2000);
        let listener = Source::Listener {
            endpoint: "127.0.0.1:443".into(),
            server_name: Some("www.example.test".into()),
        };
        inv.learnt(k, &listener, 3000);
        inv.learnt(k, &Source::Recovered, 3000);
        let c = cert(&spki, "CN=www.example.test");
        inv.add_certificates(std::slice::from_ref(&c), &file("/etc/ssl/a.crt"));
        inv.add_certificates(std::slice::from_ref(&c), &listener);
        inv.add_certificates(&[c], &file("/etc/ssl/a.crt"));
        // A certificate of a key the inventory does not have is not kept.
        inv.add_certificates(&[cert(&key(2).0, "CN=other")], &file("/x.crt"));
        assert_eq!(inv.len(), 1);
        assert_eq!(inv.unused_count(), 1);

        let e = inv.get(&spki).unwrap();
        assert!(e.unused());
        assert_eq!(e.first_seen_ms, 1000);
        assert_eq!(e.files, ["/etc/ssl/a.key", "/etc/ssl/a.crt"]);
        assert_eq!(
            e.listeners,
            ["127.0.0.1:443 (server name www.example.test)"]
        );
        assert!(e.recovered);
        assert_eq!(e.certificates.len(), 1);
        assert_eq!(
            e.certificates[0].found_in,
            [
                "/etc/ssl/a.crt",
                "127.0.0.1:443 (server name www.example.test)"
            ]
        );

        inv.used(&by(k, "nginx", "/usr/sbin/nginx", 5000));
        inv.used(&by(k, "nginx", "/usr/sbin/nginx", 4000));
        // Unhashed: counted for the entry with the hash.
        inv.used(&Use {
            exe_sha256: None,
            ..by(k, "nginx", "/usr/sbin/nginx", 6000)
        });
        inv.used(&by(k, "openssl", "/usr/bin/openssl", 7000));
        let e = inv.get(&spki).unwrap();
        assert!(!e.unused());
        assert_eq!(inv.unused_count(), 0);
        assert_eq!(e.uses, 4);
        assert_eq!((e.first_use_ms, e.last_use_ms), (Some(4000), Some(7000)));
        assert_eq!(e.processes.len(), 2);
        let nginx = &e.processes[0];
        assert_eq!(
            (
                nginx.name.as_str(),
                nginx.uses,
                nginx.first_use_ms,
                nginx.last_use_ms
            ),
            ("nginx", 3, 4000, 6000)
        );
        assert_eq!(nginx.exe_sha256.as_deref(), Some("ab"));

        // A key first seen signing (no file gave it) gets an entry too.
        let (other, k2) = key(3);
        inv.used(&by(k2, "signer", "/usr/bin/signer", 9000));
        let e = inv.get(&other).unwrap();
        assert_eq!((e.uses, e.first_seen_ms), (1, 9000));
        assert!(e.files.is_empty());
    }

    /// A Key Use event is recorded only when it names its key and the
    /// call signed.
    #[test]
    fn only_named_successful_signatures_are_uses() {
        use keywarden_analyzer::event::{self, Fingerprint, IdentifiedBy, KeyIdentity};
        let (spki, _) = key(1);
        let mut u = KeyUse {
            time_ms: 5,
            seq: 0,
            process: event::Process {
                name: "openssl".into(),
                file: Some(event::File {
                    path: "/usr/bin/openssl".into(),
                    name: "openssl".into(),
                    type_id: 1,
                    hashes: vec![Fingerprint::sha256("cd")],
                }),
                ..Default::default()
            },
            container: None,
            cgroup: event::Cgroup { id: 0, path: None },
            library: event::File::default(),
            library_kind: String::new(),
            function: String::new(),
            success: true,
            key: KeyIdentity {
                status: KeyStatus::Identified,
                spki_sha256: Some(spki.clone()),
                fingerprint: None,
                algorithm: Some("ed25519".into()),
                bits: Some(256),
                source_file: None,
                identified_by: Some(IdentifiedBy::SignatureVerified),
                unknown_reason: None,
            },
            signature: event::Signature {
                length: 64,
                digest: None,
            },
            peer: None,
            local: None,
        };
        let got = Use::of(&u).unwrap();
        assert_eq!(got.key.spki_sha256, spki);
        assert_eq!(got.key.algorithm, "ed25519");
        assert_eq!(
            (got.process, got.exe, got.exe_sha256),
            ("openssl", Some("/usr/bin/openssl"), Some("cd"))
        );
        u.success = false;
        assert!(Use::of(&u).is_none());
        u.success = true;
        u.key = KeyIdentity::unknown("no key");
        assert!(Use::of(&u).is_none());
    }

    /// Past each bound, items are counted, not kept, and keys merely
    /// learnt cannot take the room of keys that sign.
    #[test]
    fn every_list_is_bounded_and_counts_the_rest() {
        let mut inv = Inventory::with_limits(Limits {
            keys: 4,
            unused: 2,
            files: 2,
            listeners: 1,
            certificates: 1,
            places: 1,
            processes: 2,
            bytes: 1 << 20,
        });
        let (spki, k) = key(1);
        for i in 0..5 {
            inv.learnt(k, &file(&format!("/f{i}")), 0);
        }
        inv.learnt(k, &file("/f0"), 0);
        for i in 0..3 {
            let l = Source::Listener {
                endpoint: format!("127.0.0.1:{i}"),
                server_name: None,
            };
            inv.learnt(k, &l, 0);
        }
        inv.add_certificates(&[cert(&spki, "CN=a"), cert(&spki, "CN=b")], &file("/c1"));
        inv.add_certificates(&[cert(&spki, "CN=a")], &file("/c2"));
        for p in ["a", "b", "c", "c"] {
            inv.used(&by(k, p, "/bin/x", 1));
        }
        let e = inv.get(&spki).unwrap();
        assert_eq!(
            (e.files.len(), e.files_omitted),
            (2, 3),
            "a listed file is not counted"
        );
        assert_eq!((e.listeners.len(), e.listeners_omitted), (1, 2));
        assert_eq!((e.certificates.len(), e.certificates_omitted), (1, 1));
        assert_eq!(
            (
                e.certificates[0].found_in.len(),
                e.certificates[0].found_in_omitted
            ),
            (1, 1)
        );
        assert_eq!((e.processes.len(), e.processes_omitted, e.uses), (2, 2, 4));

        // Key 1 is used; two unused keys fill the room for unused ones.
        inv.learnt(key(2).1, &file("/k2"), 0);
        inv.learnt(key(3).1, &file("/k3"), 0);
        inv.learnt(key(4).1, &file("/k4"), 0);
        assert_eq!((inv.len(), inv.keys_omitted()), (3, 1));
        // A key that signs still gets in, up to the bound on keys.
        inv.used(&by(key(5).1, "s", "/bin/s", 1));
        inv.used(&by(key(6).1, "s", "/bin/s", 1));
        assert_eq!((inv.len(), inv.keys_omitted()), (4, 2));
        assert!(inv.get(&key(5).0).is_some() && inv.get(&key(6).0).is_none());

        // A long text is cut, and the byte budget bounds the rest.
        let mut small = Inventory::with_limits(Limits {
            bytes: ENTRY_COST + 64 + 10 + ITEM_COST + MAX_TEXT + 8,
            ..Limits::default()
        });
        let long = format!("/{}", "d".repeat(2 * MAX_TEXT));
        small.learnt(k, &file(&long), 0);
        small.learnt(k, &file(&long), 0);
        let e = small.get(&spki).unwrap();
        assert_eq!(e.files.len(), 1);
        assert!(e.files[0].len() <= MAX_TEXT + '…'.len_utf8());
        assert_eq!(e.files_omitted, 0, "the same long path is the same file");
        small.learnt(k, &file("/another"), 0);
        assert_eq!(small.get(&spki).unwrap().files_omitted, 1, "budget spent");
        small.learnt(key(2).1, &file("/k2"), 0);
        assert_eq!((small.len(), small.keys_omitted()), (1, 1));
    }

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

    /// The table names each key once, says "unused" for a key nothing
    /// signed with, and escapes control characters.
    #[test]
    fn the_table_marks_unused_keys() {
        let mut inv = Inventory::default();
        let (a, ka) = key(1);
        let (b, kb) = key(2);
        inv.learnt(ka, &file("/a.key"), 0);
        inv.learnt(kb, &file("/b\x1b[2J.crt"), 0);
        inv.add_certificates(&[cert(&b, "CN=www.example.test")], &file("/b.crt"));
        inv.used(&by(ka, "openssl", "/usr/bin/openssl", DAY + 1000));
        let t = inv.table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("SPKI SHA-256"));
        assert!(lines[1].starts_with(&a[..16]), "used first: {t}");
        assert!(lines[1].contains("1970-01-02T00:00:01Z") && lines[1].contains("openssl"));
        assert!(lines[2].starts_with(&b[..16]));
        assert!(lines[2].contains(" unused "), "{t}");
        assert!(
            lines[2].contains("CN=www.example.test (until 1970-01-31)"),
            "{t}"
        );
        assert!(lines[2].contains("/b\\x1b[2J.crt"), "{t}");
        assert!(!t.contains('\x1b'));
        assert!(lines[3].starts_with("2 key(s), 1 unused"), "{t}");
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(2_147_483_648_000 + 999), "2038-01-19T03:14:08Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(day(951_782_400_000 + DAY), "2000-03-01");
    }

    /// The example in docs/keys.md is an inventory this code reads and
    /// writes back unchanged: the documentation shows the format as it is.
    #[test]
    fn the_documented_example_is_the_format() {
        let doc = include_str!("../../../docs/keys.md");
        let start = doc.find("```json\n").expect("a JSON example") + 8;
        let end = start + doc[start..].find("```").unwrap();
        let example: serde_json::Value = serde_json::from_str(&doc[start..end]).unwrap();
        let inv = Inventory::parse(&doc.as_bytes()[start..end], Limits::default()).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&inv.to_json(true).unwrap()).unwrap();
        assert_eq!(back, example);
    }
}
