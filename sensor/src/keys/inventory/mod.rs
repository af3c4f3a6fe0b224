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
//! named). Saving and loading it are `file`'s, the `keywarden keys` table
//! `print`'s.
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

use std::{borrow::Cow, collections::BTreeMap};

use keywarden_analyzer::event::{KeyStatus, KeyUse};
use serde::{Deserialize, Serialize};

use super::{
    identify::Source,
    material::{Certificate, KeyInfo, clip},
};

mod file;
mod print;
#[cfg(test)]
mod tests;

pub use file::{SAVE_EVERY, Writer, now_ms};
pub use print::print;

/// Bytes kept of one text (a path, a listener, a process name): a path is
/// at most this long on Linux.
pub const MAX_TEXT: usize = 4096;

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
        let exe = u.who.process.file.as_ref();
        Some(Use {
            key: KeyRef {
                spki_sha256: u.key.spki_sha256.as_deref()?,
                algorithm: u.key.algorithm.as_deref().unwrap_or_default(),
                bits: u.key.bits.unwrap_or_default(),
            },
            process: &u.who.process.name,
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
}
