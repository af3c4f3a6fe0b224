//! Decides which key made each signature.
//!
//! (Over 600 lines: about 800 of logic, the handle cache, verification
//! against each process's candidates and the held signatures a search may
//! still name, which share one state; then its tests, which drive that
//! cache through frees, address reuse, re-initialisation and recovery with
//! real keys. The held signatures are the part to move out next. ECDSA
//! recovery itself is `recover`; the search of a process is `search`.)
//!
//! The probes report the key *object* a signature was made with (the
//! EVP_PKEY* seen at EVP_DigestSignInit*, else the context pointer), the
//! signature, and the data that was signed. The sensor knows candidate
//! public keys: those in key and certificate files the process opened or
//! holds open, those in the configured key directories and the standard
//! key locations, and the certificates its TLS listeners present
//! (`search`). A candidate under which the signature verifies is the key,
//! exactly. The answer is cached per (process, key object) so the hot path
//! does no public-key work. When the probes see the object freed by
//! EVP_PKEY_free (a mere reference drop, which libssl makes on every
//! handshake, is filtered out in the probe), the entry becomes *suspect*
//! and the next signature is checked against the cached key once more; an
//! exec or exit forgets the process entirely. Frees are only seen in
//! processes the free probes were attached to (`crate::free_watch`), so a
//! verdict is cached only for a signature made once they were; before that
//! an entry is kept as suspect, a hint of which key to check first.
//!
//! Rust signers (rustls `Signer::sign`, ring) are different: their signer
//! objects are short-lived boxes whose frees nothing reports. When one
//! signs through a nested C call (rustls on aws-lc-rs), the probes report
//! that call's EVP_PKEY (`sign_flags::INNER_HANDLE`) and it is cached like
//! a C key object. Otherwise every such signature is verified, starting
//! with the key that signed last in that process (one verification per
//! handshake in the usual case).
//!
//! When no candidate verifies, the sensor looks further, for keys no file
//! it saw gave: it asks for the process to be searched once (the files it
//! holds open, the certificates its listeners present: `search`, run off
//! this thread by `run::key_uses`), and it recovers the possible public
//! keys of an ECDSA signature (`recover`), naming one only when a second,
//! distinct signature recovers the same key. Until then the
//! answer is `unknown` with the reason, and the captured signature is
//! handed back so that a key learnt a moment later can still name it. The
//! sensor never guesses.

use std::{sync::Arc, time::Instant};

use hashbrown::HashMap;
use keywarden_analyzer::event::{Fingerprint, IdentifiedBy, KeyIdentity, KeyStatus};
use keywarden_probe_types::{BIGNUM_SLOT, BIGNUM_WORDS, DataHeader, SignRecord, func, sign_flags};
use sha2::Digest;

use super::{
    inventory::{self, Inventory},
    material::{Certificate, KeyInfo},
    recover,
    verify::{Signed, Verifier, verifies},
};
use crate::records::{SexpCopy, c_str};

/// Where the sensor learnt a public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A key or certificate file: the path as the process saw it (a file
    /// it opened or holds open), or the host path (`key_paths`,
    /// `key_locations`).
    File(String),
    /// The leaf certificate a TCP listener presented to the sensor's own
    /// TLS handshake (`tls_probe`): the address the sensor connected to,
    /// and the server name it sent, if any.
    Listener {
        endpoint: String,
        server_name: Option<String>,
    },
    /// Recovered from two of a process's ECDSA signatures (`recover`).
    Recovered,
}

impl Source {
    /// Where the key was learnt, for the log.
    pub fn describe(&self) -> String {
        match self {
            Source::File(path) => format!("file {path}"),
            Source::Listener {
                endpoint,
                server_name: Some(name),
            } => format!("the certificate {endpoint} presents for {name}"),
            Source::Listener {
                endpoint,
                server_name: None,
            } => format!("the certificate {endpoint} presents"),
            Source::Recovered => "recovery from two signatures".into(),
        }
    }
}

/// A public key and where the sensor found it.
#[derive(Debug)]
pub struct KnownKey {
    pub info: KeyInfo,
    pub source: Source,
}

impl KnownKey {
    /// The file the key came from, when a file gave it.
    pub fn source_file(&self) -> Option<&str> {
        match &self.source {
            Source::File(path) => Some(path),
            Source::Listener { .. } | Source::Recovered => None,
        }
    }

    /// What a signature that verifies under this key says about how the
    /// key was known.
    pub fn verified_as(&self) -> IdentifiedBy {
        match self.source {
            Source::File(_) => IdentifiedBy::SignatureVerified,
            Source::Listener { .. } => IdentifiedBy::TlsCertificate,
            Source::Recovered => IdentifiedBy::EcdsaRecovered,
        }
    }
}

/// The text for "no candidate at all".
const NO_KEY: &str = "no public key is known for this process or host: the key was not read from a \
                      file the sensor saw opened, nor found under key_paths or key_locations";

/// What the sensor's search of a process for its keys (`search`) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Searched {
    /// Asked for, not finished: verdicts of this process are not cached.
    Running,
    /// Finished; what was searched, for the unknown reason.
    Done(String),
    /// Not done, and why.
    NotDone(String),
}

/// A request to search process `tgid` (`run::key_uses` starts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchRequest {
    pub tgid: u32,
    /// The user it signed as: searches are shared fairly between users, so
    /// one user's processes cannot keep another's from being searched.
    pub uid: u32,
    /// The local port of the connection the signature was made for (a
    /// server's listening port), when the probes saw one.
    pub local_port: Option<u16>,
}

/// A signature no known key verified, kept so that a key learnt later can
/// still be checked against it. Public data only: the signature and the
/// data that was signed, and neither is ever logged (`Debug` shows their
/// lengths).
#[derive(Clone)]
pub struct Captured {
    pub tgid: u32,
    sig: Vec<u8>,
    /// `sig` is ring's returned value (`sign_flags::SIG_IN_VALUE`).
    in_value: bool,
    data: Vec<u8>,
    data_is_digest: bool,
    digest_hint: Option<String>,
    /// How many keys ECDSA recovery found possible for it, while it waits
    /// for a second signature to agree.
    pub recovering: Option<usize>,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captured")
            .field("tgid", &self.tgid)
            .field("sig_len", &self.sig.len())
            .field("data_len", &self.data.len())
            .field("recovering", &self.recovering)
            .finish_non_exhaustive()
    }
}

impl Captured {
    /// The first of `keys` the signature verifies under, and the
    /// public-key operations that took (`Verifier`: a few per ECDSA curve,
    /// however many keys of it there are).
    fn first_verifying<'k>(&self, keys: &'k [Arc<KnownKey>]) -> (Option<&'k Arc<KnownKey>>, u64) {
        let readings = if self.in_value {
            ring_signature_readings(&self.sig)
        } else {
            [Some(self.sig.as_slice()), None, None, None]
        };
        let signeds: Vec<Signed<'_>> = readings
            .iter()
            .flatten()
            .map(|reading| Signed {
                signature: reading,
                data: Some(&self.data),
                data_is_digest: self.data_is_digest,
                digest_hint: self.digest_hint.as_deref(),
            })
            .collect();
        let verifiers: Vec<Verifier<'_, '_>> = signeds.iter().map(Verifier::new).collect();
        let found = keys
            .iter()
            .find(|k| verifiers.iter().any(|v| v.verifies(&k.info.public)));
        (found, verifiers.iter().map(Verifier::operations).sum())
    }
}

/// What `judge` made of a signature.
#[derive(Debug)]
pub struct Judged {
    pub key: KeyIdentity,
    /// For an unknown key whose signature and data were captured whole:
    /// what a key learnt later needs to be checked against.
    pub retry: Option<Captured>,
}

impl Judged {
    pub fn done(key: KeyIdentity) -> Self {
        Judged { key, retry: None }
    }
}

struct OpData {
    bytes: Vec<u8>,
    truncated: bool,
    /// A chunk is missing (lost, or out of order): the data is unusable.
    gap: bool,
    seen: Instant,
}

/// `Identifier::handles` entries past which Go keys are not cached: as
/// many as the probes' `KNOWN` map holds.
const MAX_GO_HANDLES: usize = 65536;

struct GoHandlesCap(usize);

impl Default for GoHandlesCap {
    fn default() -> Self {
        GoHandlesCap(MAX_GO_HANDLES)
    }
}

#[derive(Default)]
pub struct Identifier {
    ops: HashMap<(u32, u64), OpData>,
    /// (process, key object) -> (key, suspect since a free).
    handles: HashMap<(u32, u64), (Arc<KnownKey>, bool)>,
    /// Entries of `handles` past which no Go key is added (see
    /// `keep_verdict`).
    go_handles_cap: GoHandlesCap,
    /// (process, key object) that no known key verified, with the key-set
    /// generation it was checked against and why. Checked again once the
    /// generation moves (a new key became known).
    unidentified: HashMap<(u32, u64), (u64, String)>,
    /// Bumped whenever a new public key becomes known.
    generation: u64,
    per_process: HashMap<u32, Vec<Arc<KnownKey>>>,
    /// The key a Rust signer of this process used last.
    last_rust_key: HashMap<u32, Arc<KnownKey>>,
    inventory: HashMap<String, Arc<KnownKey>>,
    /// The key inventory kept across restarts (`inventory`): every key
    /// learnt here is recorded there with where it was learnt, and
    /// `run::key_uses` records each use.
    pub record: Inventory,
    /// The search of each process that signed with a key nothing verified.
    searches: HashMap<u32, Searched>,
    /// Searches asked for, for `run::key_uses` to start.
    pub search_requests: Vec<SearchRequest>,
    /// The possible keys of recent unnamed ECDSA signatures.
    pub recovery: recover::Pools,
    /// Keys new to the host or to a process, for signatures held unknown
    /// to be checked against (`take_fresh`).
    fresh: Vec<Arc<KnownKey>>,
    /// Verifications run (each is one public-key operation).
    pub verifications: u64,
    /// (tgid, handle, free generation) newly judged (identified, or
    /// unidentified with complete data): the sensor tells the probes, which
    /// then stop copying data and signatures for them while the generation
    /// holds.
    pub learned: Vec<(u32, u64, u64)>,
    /// (tgid, handle) the probes must stop treating as known.
    pub retract: Vec<(u32, u64)>,
}

/// Removes every entry of process `tgid` and returns their keys.
fn take_process<V>(map: &mut HashMap<(u32, u64), V>, tgid: u32) -> Vec<(u32, u64)> {
    let keys: Vec<(u32, u64)> = map.keys().filter(|(t, _)| *t == tgid).copied().collect();
    for k in &keys {
        map.remove(k);
    }
    keys
}

/// The event's view of a known key, identified by `by`.
pub fn identified(k: &KnownKey, by: IdentifiedBy) -> KeyIdentity {
    identity(&k.info, k.source_file(), by)
}

/// The event's view of a known key: identity, where it came from, and how
/// it was established. Never anything private.
pub fn identity_of(info: &KeyInfo, source_file: &str, by: IdentifiedBy) -> KeyIdentity {
    identity(info, Some(source_file), by)
}

fn identity(info: &KeyInfo, source_file: Option<&str>, by: IdentifiedBy) -> KeyIdentity {
    KeyIdentity {
        status: KeyStatus::Identified,
        spki_sha256: Some(info.spki_sha256.clone()),
        fingerprint: Some(Fingerprint::sha256(info.spki_sha256.clone())),
        algorithm: Some(info.algorithm.clone()),
        bits: Some(info.bits),
        source_file: source_file.map(str::to_owned),
        identified_by: Some(by),
        unknown_reason: None,
    }
}

impl Identifier {
    pub fn on_data(&mut self, h: &DataHeader, bytes: &[u8]) {
        let op = self.ops.entry((h.tgid, h.op_id)).or_insert_with(|| OpData {
            bytes: Vec::new(),
            truncated: false,
            gap: false,
            seen: Instant::now(),
        });
        if h.offset as usize != op.bytes.len() {
            op.gap = true;
        }
        op.bytes.extend_from_slice(bytes);
        op.truncated |= h.truncated != 0;
        op.seen = Instant::now();
    }

    /// The probes saw this key object (or context) passed to a free
    /// function. It may be gone, and its address reused for another key.
    pub fn on_free(&mut self, tgid: u32, handle: u64) {
        if let Some(entry) = self.handles.get_mut(&(tgid, handle)) {
            entry.1 = true;
        }
        self.unidentified.remove(&(tgid, handle));
        self.recovery.on_free(tgid, handle);
    }

    /// The process exec'd a new image or exited: its pointers mean nothing now.
    pub fn forget_process(&mut self, tgid: u32) {
        let mut gone = take_process(&mut self.handles, tgid);
        gone.extend(take_process(&mut self.unidentified, tgid));
        self.retract.extend(gone);
        self.per_process.remove(&tgid);
        self.last_rust_key.remove(&tgid);
        self.ops.retain(|(t, _), _| *t != tgid);
        self.searches.remove(&tgid);
        self.search_requests.retain(|s| s.tgid != tgid);
        self.recovery.forget(tgid);
    }

    /// Keys from a file this process opened. The process's entry names
    /// that file, even when the key was known from elsewhere first.
    pub fn add_process_keys(&mut self, tgid: u32, keys: Vec<KeyInfo>, source_file: &str) {
        self.add_process_keys_from(tgid, keys, &Source::File(source_file.to_owned()));
    }

    /// Keys this process is known to hold (a file it opened or holds open,
    /// a certificate its listener presented, a recovered key). Returns the
    /// process's entry for each.
    pub fn add_process_keys_from(
        &mut self,
        tgid: u32,
        keys: Vec<KeyInfo>,
        source: &Source,
    ) -> Vec<Arc<KnownKey>> {
        let mut entries = Vec::new();
        for info in keys {
            self.add_inventory_from(info.clone(), source);
            let list = self.per_process.entry(tgid).or_default();
            if let Some(k) = list.iter().find(|x| x.info.spki_sha256 == info.spki_sha256) {
                entries.push(k.clone());
                continue;
            }
            let k = Arc::new(KnownKey {
                info,
                source: source.clone(),
            });
            list.push(k.clone());
            entries.push(k.clone());
            self.fresh.push(k);
            // Known on the host already, but new for this process.
            let stale: Vec<(u32, u64)> = self
                .unidentified
                .keys()
                .filter(|(t, _)| *t == tgid)
                .copied()
                .collect();
            for key in stale {
                self.unidentified.remove(&key);
                self.retract.push(key);
            }
        }
        entries
    }

    /// A key known on the host; the first file it was seen in is kept.
    pub fn add_inventory(&mut self, info: KeyInfo, source_file: &str) -> Arc<KnownKey> {
        self.add_inventory_from(info, &Source::File(source_file.to_owned()))
    }

    /// A key known on the host; the first place it was learnt from is kept
    /// (the key inventory, `record`, keeps every place).
    pub fn add_inventory_from(&mut self, info: KeyInfo, source: &Source) -> Arc<KnownKey> {
        self.record
            .learnt((&info).into(), source, inventory::now_ms());
        if let Some(k) = self.inventory.get(&info.spki_sha256) {
            return k.clone();
        }
        self.new_key_known();
        let k = Arc::new(KnownKey {
            info,
            source: source.clone(),
        });
        self.inventory.insert(k.info.spki_sha256.clone(), k.clone());
        self.fresh.push(k.clone());
        k
    }

    /// Certificates found at `source` with keys added just before: they
    /// join the key inventory beside their keys. (Only their keys matter
    /// for identification.)
    pub fn add_certificates(&mut self, certs: &[Certificate], source: &Source) {
        self.record.add_certificates(certs, source);
    }

    /// A new candidate exists: every "unidentified" verdict is void.
    fn new_key_known(&mut self) {
        self.generation += 1;
        let stale: Vec<(u32, u64)> = self.unidentified.drain().map(|(k, _)| k).collect();
        self.retract.extend(stale);
    }

    pub fn inventory_len(&self) -> usize {
        self.inventory.len()
    }

    /// Keys that became known since the last call: signatures held unknown
    /// are checked against them.
    pub fn take_fresh(&mut self) -> Vec<Arc<KnownKey>> {
        std::mem::take(&mut self.fresh)
    }

    /// The first of `keys` (learnt since it was judged) a held signature
    /// verifies under.
    pub fn name_held<'k>(
        &mut self,
        held: &Captured,
        keys: &'k [Arc<KnownKey>],
    ) -> Option<&'k Arc<KnownKey>> {
        let (found, operations) = held.first_verifying(keys);
        self.verifications += operations;
        found
    }

    /// Whether `k` is process `tgid`'s own entry of a key (one it opened,
    /// holds open, or presents, or one recovered from its signatures).
    pub fn holds(&self, tgid: u32, k: &Arc<KnownKey>) -> bool {
        self.per_process
            .get(&tgid)
            .is_some_and(|own| own.iter().any(|x| Arc::ptr_eq(x, k)))
    }

    /// The search of process `tgid`, if one was asked for.
    pub fn search_state(&self, tgid: u32) -> Option<&Searched> {
        self.searches.get(&tgid)
    }

    /// How the search of process `tgid` stands. Ignored for a process
    /// forgotten since it was asked for (it exec'd or exited: its keys
    /// still join the host's).
    pub fn set_search(&mut self, tgid: u32, state: Searched) {
        if let Some(s) = self.searches.get_mut(&tgid) {
            *s = state;
        }
    }

    /// The number of distinct candidates for a signature of `tgid`.
    pub fn candidate_count(&self, tgid: u32) -> usize {
        let own = self.per_process.get(&tgid).map_or(&[][..], Vec::as_slice);
        own.len()
            + self
                .inventory
                .keys()
                .filter(|spki| !own.iter().any(|k| &k.info.spki_sha256 == *spki))
                .count()
    }

    /// Why the key of a held signature of `tgid` is still unknown, as it
    /// stands now.
    pub fn held_reason(&self, held: &Captured) -> String {
        let n = self.candidate_count(held.tgid);
        let base = if n == 0 {
            NO_KEY.to_owned()
        } else {
            format!("none of the {n} known public key(s) verifies this signature")
        };
        self.explain(held.tgid, base, held.recovering)
    }

    /// `reason`, followed by what else was tried for process `tgid`: the
    /// search of the process, and ECDSA recovery when it waits for a
    /// second signature. (The texts are listed in docs/events.md.)
    fn explain(&self, tgid: u32, mut reason: String, recovering: Option<usize>) -> String {
        match self.searches.get(&tgid) {
            Some(Searched::Running) => reason.push_str(
                "; the search of the files this process holds open and of its TLS listeners had not finished",
            ),
            Some(Searched::Done(summary)) => {
                reason.push_str("; searched ");
                reason.push_str(summary);
            }
            Some(Searched::NotDone(why)) => {
                reason.push_str("; this process was not searched: ");
                reason.push_str(why);
            }
            None => {}
        }
        if let Some(k) = recovering {
            reason.push_str(&format!(
                "; ECDSA recovery: {k} public key(s) could have made this signature, and no other \
                 signature has agreed on one"
            ));
        }
        reason
    }

    /// Asks, once per process, for it to be searched for keys no file gave.
    fn request_search(&mut self, r: &SignRecord) {
        let tgid = r.task.tgid();
        if self.searches.contains_key(&tgid) {
            return;
        }
        self.searches.insert(tgid, Searched::Running);
        let local_port = (r.flags & sign_flags::HAS_PEER != 0).then_some(r.peer.local_port);
        self.search_requests.push(SearchRequest {
            tgid,
            uid: r.task.uid(),
            local_port,
        });
    }

    fn search_running(&self, tgid: u32) -> bool {
        self.searches.get(&tgid) == Some(&Searched::Running)
    }

    /// Drops captured data nobody signed with (failed calls, abandoned
    /// contexts) after a while.
    pub fn expire(&mut self, max_age: std::time::Duration) {
        let now = Instant::now();
        self.ops
            .retain(|_, op| now.duration_since(op.seen) < max_age);
    }

    /// Whether verdicts on signatures like `r` are cached by key object. A
    /// Rust signer whose nested C call showed its key object is, like a C
    /// signature; one with no C key object is verified every time.
    pub fn caches_by_handle(r: &SignRecord) -> bool {
        !func::verified_every_time(r.func as u8) || r.flags & sign_flags::INNER_HANDLE != 0
    }

    /// Which key made the signature in `r` (see `judge`).
    #[cfg(test)]
    pub fn identify(&mut self, r: &SignRecord, sig: &[u8], cacheable: bool) -> KeyIdentity {
        self.judge(r, sig, cacheable).key
    }

    /// Which key made the signature in `r`; `sig` is the signature the
    /// probes copied (empty for a key object they knew). `cacheable`: the
    /// probes see every later free of the key object in this process
    /// (`crate::free_watch`), so a verdict may be kept for it. An unknown
    /// verdict comes with the captured signature when a key learnt later
    /// could still name it.
    pub fn judge(&mut self, r: &SignRecord, sig: &[u8], cacheable: bool) -> Judged {
        let tgid = r.task.tgid();
        let data = self.ops.remove(&(tgid, r.op_id));
        let cache_key = (tgid, r.handle);
        let rust = !Self::caches_by_handle(r);
        let suspect = match self.handles.get(&cache_key) {
            _ if rust => self.last_rust_key.get(&tgid).cloned(),
            Some((k, false)) => return Judged::done(identified(k, IdentifiedBy::HandleCache)),
            Some((k, true)) => Some(k.clone()),
            None => None,
        };
        if !rust
            && let Some((generation, reason)) = self.unidentified.get(&cache_key)
            && *generation == self.generation
        {
            return Judged::done(KeyIdentity::unknown(reason.clone()));
        }
        if r.flags & sign_flags::KNOWN_HANDLE != 0 {
            // The probes skipped the copy, but the cache no longer vouches
            // for this object (exec, or a free racing the cache update).
            self.retract.push(cache_key);
            return Judged::done(KeyIdentity::unknown(
                "the probes skipped capturing this signature because the key object had been checked \
                 before, but that verdict no longer holds; the next signature is captured and checked",
            ));
        }
        if r.ret != 1 {
            return Judged::done(KeyIdentity::unknown(
                "the signing call failed, so there is no signature to check",
            ));
        }
        if r.flags & sign_flags::SIG_INCOMPLETE != 0 || sig.is_empty() {
            return Judged::done(KeyIdentity::unknown(format!(
                "the signature ({} bytes) could not be read whole from the process",
                r.sig_len
            )));
        }
        let data = data.filter(|d| !d.gap);
        let complete = data
            .as_ref()
            .filter(|d| !d.truncated)
            .map(|d| d.bytes.as_slice());
        let md_name = (r.flags & sign_flags::HAS_MD_NAME != 0).then(|| c_str(&r.md_name));
        // `ECDSA_do_sign` returns integers, not an encoding.
        let encoded;
        let sig = if r.flags & sign_flags::SIG_BIGNUMS != 0 {
            match bignums_to_der(sig) {
                Some(der) => {
                    encoded = der;
                    encoded.as_slice()
                }
                None => {
                    return Judged::done(KeyIdentity::unknown(
                        "the probes copied no valid ECDSA_SIG (r and s) from the signing call",
                    ));
                }
            }
        } else {
            sig
        };
        let data_is_digest = func::sign_call(r.func as u8).is_some_and(|c| c.input.is_digest());
        // ring returns its signature inside a value whose layout Rust does
        // not fix: each plausible reading is tried, and only one verifies.
        let in_value = r.flags & sign_flags::SIG_IN_VALUE != 0;
        // NSS returns an ECDSA signature as a raw `r || s`, and an Ed25519
        // one is 64 bytes too: both readings are tried, DER first (what
        // recovery reads).
        let pair_der = (r.func as u8 == func::NSS_SIGN_WITH_MECHANISM)
            .then(|| raw_pair_to_der(sig))
            .flatten();
        let readings = if in_value {
            ring_signature_readings(sig)
        } else if let Some(der) = &pair_der {
            [Some(der.as_slice()), Some(sig), None, None]
        } else {
            [Some(sig), None, None, None]
        };
        let signed_as = |signature| Signed {
            signature,
            data: complete,
            data_is_digest,
            digest_hint: md_name.as_deref(),
        };
        let signed = signed_as(
            readings
                .iter()
                .flatten()
                .next()
                .copied()
                .unwrap_or_default(),
        );

        // The key this object had before (if suspect), then the process's
        // own keys, then the rest of the host's.
        let mut candidates: Vec<Arc<KnownKey>> = suspect.into_iter().collect();
        for k in self.per_process.get(&tgid).into_iter().flatten() {
            if !candidates
                .iter()
                .any(|c| c.info.spki_sha256 == k.info.spki_sha256)
            {
                candidates.push(k.clone());
            }
        }
        // The inventory holds each key once (up to 100k): only the few
        // before it can repeat one.
        let own = candidates.len();
        for k in self.inventory.values() {
            if !candidates[..own]
                .iter()
                .any(|c| c.info.spki_sha256 == k.info.spki_sha256)
            {
                candidates.push(k.clone());
            }
        }
        // Each reading's digests are computed once for all candidates, and
        // past a few ECDSA keys its possible keys are recovered once and
        // the rest of the keys looked up (`Verifier`).
        let signeds: Vec<Signed<'_>> = readings.iter().flatten().map(|r| signed_as(r)).collect();
        let verifiers: Vec<Verifier<'_, '_>> = signeds.iter().map(Verifier::new).collect();
        let found = candidates
            .iter()
            .find(|k| verifiers.iter().any(|v| v.verifies(&k.info.public)));
        let operations = |vs: &[Verifier<'_, '_>]| vs.iter().map(Verifier::operations).sum::<u64>();
        let counted = operations(&verifiers);
        self.verifications += counted;
        if let Some(k) = found {
            tracing::debug!(
                pid = tgid,
                candidates = candidates.len(),
                operations = counted,
                spki_sha256 = %k.info.spki_sha256,
                "signature named by verification"
            );
            self.keep_verdict(r, k, cacheable);
            return Judged::done(identified(k, k.verified_as()));
        }
        let n = candidates.len();
        tracing::debug!(
            pid = tgid,
            sig_len = signed.signature.len(),
            readings = readings.iter().flatten().count(),
            sig_sha256 = %hex::encode(sha2::Sha256::digest(signed.signature)),
            data_len = signed.data.map(<[u8]>::len),
            data_sha256 = %signed.data.map(|d| hex::encode(sha2::Sha256::digest(d))).unwrap_or_default(),
            candidates = n,
            "no candidate verified"
        );
        // Nothing known verifies it: have the process searched for keys
        // no file gave.
        self.request_search(r);
        if !rust {
            self.handles.remove(&cache_key);
        }
        let Some(bytes) = complete else {
            let base = if n == 0 {
                NO_KEY.to_owned()
            } else if rust {
                format!(
                    "the signed data was not captured whole, so the signature could not be checked against the {n} known key(s)"
                )
            } else {
                let why = match &data {
                    None => "was not captured".to_owned(),
                    Some(d) if d.truncated => format!(
                        "is longer than the {} KiB capture limit",
                        keywarden_probe_types::CAPTURE_MAX / 1024
                    ),
                    Some(_) => "arrived incomplete".to_owned(),
                };
                format!(
                    "the signed data {why}, so the signature could not be checked against the {n} known key(s)"
                )
            };
            return Judged::done(KeyIdentity::unknown(self.explain(tgid, base, None)));
        };
        let possible = || {
            verifiers
                .iter()
                .map(|v| (v.signature().to_vec(), v.possible_keys()))
                .collect()
        };
        let recovery = self.recovery.recover(tgid, r.handle, possible);
        self.verifications += operations(&verifiers) - counted;
        let recovering = match recovery {
            recover::Recovery::Named(info) => {
                let k = self
                    .add_process_keys_from(tgid, vec![*info], &Source::Recovered)
                    .remove(0);
                self.keep_verdict(r, &k, cacheable);
                return Judged::done(identified(&k, k.verified_as()));
            }
            recover::Recovery::Waiting(possible) => Some(possible),
            recover::Recovery::Nothing => None,
        };
        let base = if n == 0 {
            NO_KEY.to_owned()
        } else {
            format!("none of the {n} known public key(s) verifies this signature")
        };
        let reason = self.explain(tgid, base, recovering);
        // Complete data and no key verifies: remember that for this key
        // object, so its next signatures cost nothing until a key is added.
        // Not while something may still name it: its next signature is
        // what ECDSA recovery needs, and a search may bring its key.
        if !rust && n > 0 && cacheable && recovering.is_none() && !self.search_running(tgid) {
            self.unidentified
                .insert(cache_key, (self.generation, reason.clone()));
            self.learned.push((cache_key.0, cache_key.1, r.handle_gen));
        }
        Judged {
            key: KeyIdentity::unknown(reason),
            retry: Some(Captured {
                tgid,
                sig: sig.to_vec(),
                in_value,
                data: bytes.to_vec(),
                data_is_digest,
                digest_hint: md_name.clone(),
                recovering,
            }),
        }
    }

    /// A libgcrypt signature (`super::sexp`): which key made it, and the
    /// signature's length. The key is the public key of the S-expression
    /// the call signed with, once the signature verifies under it. Nothing
    /// is cached: callers build a key S-expression per call.
    pub fn judge_sexp(&mut self, r: &SignRecord, copy: &SexpCopy) -> (KeyIdentity, u64) {
        if r.ret != 1 {
            return (
                KeyIdentity::unknown("the signing call failed, so there is no signature to check"),
                0,
            );
        }
        const PARTS: [&str; 3] = ["key", "data", "signature"];
        if let Some(i) = copy.complete.iter().position(|c| !c) {
            return (
                KeyIdentity::unknown(format!(
                    "the {} S-expression could not be copied whole from the process (unreadable, \
                     or more than {} bytes or {} tokens)",
                    PARTS[i],
                    keywarden_probe_types::sexp::MAX,
                    keywarden_probe_types::sexp::TOKENS
                )),
                0,
            );
        }
        let s = match super::sexp::read(&copy.parts[0], &copy.parts[1], &copy.parts[2]) {
            Ok(s) => s,
            Err(why) => {
                return (
                    KeyIdentity::unknown(format!("libgcrypt's S-expressions were not read: {why}")),
                    0,
                );
            }
        };
        self.verifications += 1;
        let signed = Signed {
            signature: &s.signature,
            data: Some(&s.data),
            data_is_digest: s.data_is_digest,
            digest_hint: s.digest.as_deref(),
        };
        let key = if verifies(&s.key.public, &signed) {
            identity(&s.key, None, IdentifiedBy::SigningCallKey)
        } else {
            KeyIdentity::unknown(
                "the signature does not verify under the public key of the key S-expression the \
                 call signed with",
            )
        };
        (key, s.signature.len() as u64)
    }

    /// Keeps the verdict that `k` made the signature in `r`: cached for the
    /// key object when its frees are watched (the probes stop copying),
    /// else as a hint for its next signature; for a Rust signer, as the
    /// process's last key.
    fn keep_verdict(&mut self, r: &SignRecord, k: &Arc<KnownKey>, cacheable: bool) {
        let tgid = r.task.tgid();
        let cache_key = (tgid, r.handle);
        if !Self::caches_by_handle(r) {
            self.last_rust_key.insert(tgid, k.clone());
        } else if func::is_go(r.func as u8)
            && !self.handles.contains_key(&cache_key)
            && self.handles.len() >= self.go_handles_cap.0
        {
            // Go keys are never seen freed, so their names only leave the
            // cache with their process: a program that loads a new key
            // object per request would grow it without end. Past the cap,
            // new Go keys are verified at every signature instead.
        } else if cacheable {
            self.handles.insert(cache_key, (k.clone(), false));
            self.learned.push((cache_key.0, cache_key.1, r.handle_gen));
        } else {
            // Its next signature is checked against this key first.
            self.handles.insert(cache_key, (k.clone(), true));
        }
    }
}

/// The r and s the probes copied from an `ECDSA_SIG` (`SIG_BIGNUMS`: per
/// integer a word count, then little-endian 64-bit words), DER-encoded as
/// `ECDSA_sign` would have returned them.
fn bignums_to_der(sig: &[u8]) -> Option<Vec<u8>> {
    let integer = |slot: usize| -> Option<Vec<u8>> {
        let words = *sig.get(slot)? as usize;
        if words > BIGNUM_WORDS {
            return None;
        }
        let le = sig.get(slot + 8..slot + 8 + words * 8)?;
        Some(le.iter().rev().copied().collect())
    };
    der_pair(&integer(0)?, &integer(BIGNUM_SLOT)?)
}

/// A raw ECDSA `r || s` of P-256, P-384 or P-521 (two field sizes, as
/// PKCS #11 and so NSS's `PK11_SignWithMechanism` return it; NSS encodes
/// DER only later, in `SGN_End`), DER-encoded. None for other lengths.
fn raw_pair_to_der(sig: &[u8]) -> Option<Vec<u8>> {
    if ![64, 96, 132].contains(&sig.len()) {
        return None;
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    der_pair(r, s)
}

/// The DER `SEQUENCE { INTEGER r, INTEGER s }` of two big-endian
/// unsigned integers; None when either is zero (never a valid r or s).
fn der_pair(r: &[u8], s: &[u8]) -> Option<Vec<u8>> {
    let integer = |be: &[u8]| -> Option<Vec<u8>> {
        let mut be: Vec<u8> = be.iter().copied().skip_while(|&b| b == 0).collect();
        if be.is_empty() {
            return None;
        }
        if be[0] & 0x80 != 0 {
            be.insert(0, 0); // DER integers are signed
        }
        let mut out = vec![0x02, be.len() as u8];
        out.extend(be);
        Some(out)
    };
    let body = [integer(r)?, integer(s)?].concat();
    let mut der = vec![0x30];
    if body.len() > 0x7f {
        der.push(0x81);
    }
    der.push(body.len() as u8);
    der.extend(body);
    Some(der)
}

/// Where the signature can sit in the bytes of ring's returned value
/// (`Signature { value: [u8; 105], len: usize }`, maybe inside a `Result`
/// with its tag first): the length word first, or after the bytes.
fn ring_signature_readings(value: &[u8]) -> [Option<&[u8]>; 4] {
    const MAX_LEN: usize = 105;
    let word = |at: usize| {
        value
            .get(at..at + 8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()) as usize)
    };
    // (offset of the length word, offset of the bytes)
    [(0, 8), (8, 16), (112, 0), (120, 8)].map(|(len_at, bytes_at)| {
        word(len_at)
            .filter(|len| (1..=MAX_LEN).contains(len))
            .and_then(|len| value.get(bytes_at..bytes_at + len))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::material::{read_key_file, tests::openssl_key};
    use keywarden_probe_types::{Task, kind};
    use sha2::Digest;

    fn record(tgid: u32, handle: u64, op_id: u64, sig: &[u8]) -> (SignRecord, Vec<u8>) {
        let r = SignRecord {
            kind: kind::SIGN,
            func: func::PKEY_SIGN as u32,
            task: Task {
                pid_tgid: (tgid as u64) << 32 | tgid as u64,
                uid_gid: 0,
                cgroup_id: 1,
                ktime_ns: 0,
                comm: [0; 16],
            },
            library: 0,
            flags: 0,
            handle,
            op_id,
            ret: 1,
            sig_len: sig.len() as u64,
            sig_captured: sig.len() as u32,
            _pad: 0,
            md_name: [0; 16],
            handle_gen: 0,
            peer: Default::default(),
        };
        (r, sig.to_vec())
    }

    fn identify(id: &mut Identifier, (r, sig): (SignRecord, Vec<u8>)) -> KeyIdentity {
        id.identify(&r, &sig, true)
    }

    /// `openssl pkeyutl -sign` of `digest` with `key`, in `dir`.
    fn pkeyutl_sign(dir: &std::path::Path, key: &std::path::Path, digest: &[u8]) -> Vec<u8> {
        let (dfile, sfile) = (dir.join("d"), dir.join("s"));
        std::fs::write(&dfile, digest).unwrap();
        let st = std::process::Command::new("openssl")
            .args(["pkeyutl", "-sign", "-inkey"])
            .arg(key)
            .arg("-in")
            .arg(&dfile)
            .arg("-out")
            .arg(&sfile)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(sfile).unwrap()
    }

    fn data(tgid: u32, op_id: u64, bytes: &[u8]) -> DataHeader {
        DataHeader {
            kind: kind::DATA_SMALL,
            tgid,
            op_id,
            offset: 0,
            len: bytes.len() as u32,
            truncated: 0,
            _pad: 0,
        }
    }

    /// Two keys in one process: each signature is attributed to its own key,
    /// the cache answers repeat uses, and a freed handle is verified afresh.
    #[test]
    fn two_keys_one_process_are_told_apart() {
        let (d1, k1, spki1) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let (_d2, k2, spki2) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let digest = sha2::Sha256::digest(b"m").to_vec();
        let sign = |key: &std::path::Path| pkeyutl_sign(d1.path(), key, &digest);
        let mut id = Identifier::default();
        id.add_process_keys(10, read_key_file(&k1, "k1").unwrap(), "/k1.pem");
        id.add_process_keys(10, read_key_file(&k2, "k2").unwrap(), "/k2.pem");

        let s2 = sign(&k2);
        id.on_data(&data(10, 1, &digest), &digest);
        let got = identify(&mut id, record(10, 0xb, 1, &s2));
        assert_eq!(got.spki_sha256.as_deref(), Some(spki2.as_str()));
        assert_eq!(got.source_file.as_deref(), Some("/k2.pem"));
        assert_eq!(got.identified_by, Some(IdentifiedBy::SignatureVerified));

        let s1 = sign(&k1);
        id.on_data(&data(10, 2, &digest), &digest);
        let got = identify(&mut id, record(10, 0xa, 2, &s1));
        assert_eq!(got.spki_sha256.as_deref(), Some(spki1.as_str()));

        // Same handle again: answered from the cache, no verification.
        let before = id.verifications;
        let got = identify(&mut id, record(10, 0xa, 3, &s1));
        assert_eq!(got.identified_by, Some(IdentifiedBy::HandleCache));
        assert_eq!(id.verifications, before);

        // A free that was only a reference drop: confirmed with one
        // verification against the cached key, then cached again.
        id.on_free(10, 0xa);
        id.on_data(&data(10, 4, &digest), &digest);
        let before = id.verifications;
        let got = identify(&mut id, record(10, 0xa, 4, &s1));
        assert_eq!(got.spki_sha256.as_deref(), Some(spki1.as_str()));
        assert_eq!(got.identified_by, Some(IdentifiedBy::SignatureVerified));
        assert_eq!(id.verifications, before + 1);
        assert_eq!(
            identify(&mut id, record(10, 0xa, 5, &s1)).identified_by,
            Some(IdentifiedBy::HandleCache)
        );

        // Handle 0xa freed and its address reused for key 2: the cached key
        // no longer verifies, so the other candidates are searched.
        id.on_free(10, 0xa);
        id.on_data(&data(10, 6, &digest), &digest);
        let got = identify(&mut id, record(10, 0xa, 6, &s2));
        assert_eq!(got.spki_sha256.as_deref(), Some(spki2.as_str()));
        assert_eq!(got.identified_by, Some(IdentifiedBy::SignatureVerified));
        assert_eq!(
            identify(&mut id, record(10, 0xa, 7, &s2))
                .spki_sha256
                .as_deref(),
            Some(spki2.as_str())
        );
        assert!(id.learned.contains(&(10, 0xa, 0)) && id.learned.contains(&(10, 0xb, 0)));

        // A record the probes sent without data for an object the sensor no
        // longer vouches for: unknown, and the probes are told to capture again.
        id.forget_process(10);
        assert!(id.retract.contains(&(10, 0xa)));
        id.retract.clear();
        let (mut lite, _) = record(10, 0xa, 8, &s2);
        lite.flags |= sign_flags::KNOWN_HANDLE;
        let got = id.identify(&lite, &[], true);
        assert_eq!(got.status, KeyStatus::Unknown);
        assert_eq!(id.retract, vec![(10, 0xa)]);
    }

    /// Go keys are never seen freed: past the cap, a new Go key is not
    /// cached (each of its signatures is verified), so a program that
    /// loads a key object per request cannot grow the cache without end.
    #[test]
    fn go_keys_are_cached_up_to_a_cap() {
        let (d, k, spki) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let digest = sha2::Sha256::digest(b"m").to_vec();
        let sig = pkeyutl_sign(d.path(), &k, &digest);
        let mut id = Identifier {
            go_handles_cap: GoHandlesCap(2),
            ..Default::default()
        };
        id.add_process_keys(10, read_key_file(&k, "k").unwrap(), "/k.pem");
        for (op, handle) in [(1, 0xa1), (2, 0xa2), (3, 0xa3), (4, 0xa3)] {
            id.on_data(&data(10, op, &digest), &digest);
            let (mut r, s) = record(10, handle, op, &sig);
            r.func = func::GO_ECDSA_SIGN_ASN1 as u32;
            let got = id.identify(&r, &s, true);
            assert_eq!(got.spki_sha256.as_deref(), Some(spki.as_str()));
            // The third key object, past the cap, is verified again.
            assert_eq!(
                got.identified_by,
                Some(IdentifiedBy::SignatureVerified),
                "{handle:x}"
            );
        }
        assert_eq!(id.handles.len(), 2);
        assert!(!id.learned.iter().any(|(_, h, _)| *h == 0xa3));
        // Those cached are answered from the cache.
        let (mut r, s) = record(10, 0xa1, 5, &sig);
        r.func = func::GO_ECDSA_SIGN_ASN1 as u32;
        assert_eq!(
            id.identify(&r, &s, true).identified_by,
            Some(IdentifiedBy::HandleCache)
        );
    }

    /// Until the process's frees are watched, no verdict is kept: each
    /// signature is verified (the key that verified last is tried first)
    /// and the probes are not told to stop copying. The first signature
    /// made once they are watched is kept.
    #[test]
    fn verdicts_are_kept_only_once_frees_are_watched() {
        let (d, k, spki) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let digest = sha2::Sha256::digest(b"m").to_vec();
        let sig = pkeyutl_sign(d.path(), &k, &digest);
        let mut id = Identifier::default();
        // Another key first, so only a remembered hint checks ours first.
        let (_d2, other, _) = openssl_key(&["-algorithm", "ED25519"]);
        id.add_process_keys(10, read_key_file(&other, "o").unwrap(), "/o.pem");
        id.add_process_keys(10, read_key_file(&k, "k").unwrap(), "/k.pem");

        for op in 1..=2 {
            id.on_data(&data(10, op, &digest), &digest);
            let before = id.verifications;
            let (r, s) = record(10, 0xa, op, &sig);
            let got = id.identify(&r, &s, false);
            assert_eq!(got.spki_sha256.as_deref(), Some(spki.as_str()));
            assert_eq!(got.identified_by, Some(IdentifiedBy::SignatureVerified));
            assert!(id.learned.is_empty(), "the probes keep copying");
            if op == 2 {
                assert_eq!(id.verifications, before + 1, "the hint is tried first");
            }
        }
        id.on_data(&data(10, 3, &digest), &digest);
        let (r, s) = record(10, 0xa, 3, &sig);
        assert_eq!(
            id.identify(&r, &s, true).identified_by,
            Some(IdentifiedBy::SignatureVerified)
        );
        assert_eq!(id.learned, vec![(10, 0xa, 0)]);
        let (r, s) = record(10, 0xa, 4, &sig);
        assert_eq!(
            id.identify(&r, &s, true).identified_by,
            Some(IdentifiedBy::HandleCache)
        );

        // An unknown key is not remembered as unknown either.
        let mut id = Identifier::default();
        id.add_process_keys(10, read_key_file(&other, "o").unwrap(), "/o.pem");
        id.on_data(&data(10, 5, &digest), &digest);
        let (r, s) = record(10, 0xb, 5, &sig);
        assert_eq!(id.identify(&r, &s, false).status, KeyStatus::Unknown);
        assert!(id.learned.is_empty());
        id.on_data(&data(10, 6, &digest), &digest);
        let before = id.verifications;
        let (r, s) = record(10, 0xb, 6, &sig);
        assert_eq!(id.identify(&r, &s, false).status, KeyStatus::Unknown);
        assert!(id.verifications > before, "checked again");
    }

    /// r and s as `ECDSA_do_sign` returns them, copied word by word,
    /// encode as the DER `ECDSA_sign` gives: a high bit gains a zero byte,
    /// leading zeros are dropped.
    /// NSS's raw `r || s` becomes the DER OpenSSL would have written for
    /// the same integers; other lengths are no pair.
    #[test]
    fn a_raw_ecdsa_pair_encodes_as_openssls_der() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        let data = dir.path().join("d");
        std::fs::write(&data, [7u8; 32]).unwrap();
        for curve in ["P-256", "P-384", "P-521"] {
            let ok = std::process::Command::new("openssl")
                .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
                .arg(format!("ec_paramgen_curve:{curve}"))
                .arg("-out")
                .arg(&key)
                .status()
                .unwrap();
            assert!(ok.success());
            for _ in 0..8 {
                let der = std::process::Command::new("openssl")
                    .args(["pkeyutl", "-sign", "-inkey"])
                    .arg(&key)
                    .arg("-in")
                    .arg(&data)
                    .output()
                    .unwrap()
                    .stdout;
                let field = match curve {
                    "P-256" => 32,
                    "P-384" => 48,
                    _ => 66,
                };
                let raw: Vec<u8> = {
                    // The two INTEGERs of the DER, each left-padded.
                    let parsed = asn1_pair(&der);
                    parsed
                        .iter()
                        .flat_map(|i| {
                            let mut v = vec![0u8; field - i.len()];
                            v.extend_from_slice(i);
                            v
                        })
                        .collect()
                };
                assert_eq!(
                    raw_pair_to_der(&raw).as_deref(),
                    Some(der.as_slice()),
                    "{curve}"
                );
            }
        }
        assert_eq!(raw_pair_to_der(&[1u8; 63]), None);
        assert_eq!(raw_pair_to_der(&[0u8; 64]), None, "r = 0 is no signature");
    }

    /// The unsigned integers of a DER ECDSA signature.
    fn asn1_pair(der: &[u8]) -> Vec<Vec<u8>> {
        let mut at = if der[1] == 0x81 { 3 } else { 2 };
        let mut out = Vec::new();
        while at < der.len() {
            assert_eq!(der[at], 0x02);
            let len = der[at + 1] as usize;
            let mut int = der[at + 2..at + 2 + len].to_vec();
            if int[0] == 0 {
                int.remove(0);
            }
            out.push(int);
            at += 2 + len;
        }
        out
    }

    #[test]
    fn ecdsa_sig_integers_encode_as_der() {
        let mut r = [0x11u8; 32];
        r[0] = 0x9c; // high bit set
        let mut s = [0x22u8; 32];
        s[..3].fill(0); // leading zeros
        let mut copied = vec![0u8; 2 * BIGNUM_SLOT];
        for (slot, be) in [(0, &r), (BIGNUM_SLOT, &s)] {
            copied[slot] = 4;
            let le: Vec<u8> = be.iter().rev().copied().collect();
            copied[slot + 8..slot + 40].copy_from_slice(&le);
        }
        let want = p256::ecdsa::Signature::from_scalars(r, s).unwrap().to_der();
        assert_eq!(bignums_to_der(&copied).unwrap(), want.as_bytes());
        copied[0] = 0;
        assert!(bignums_to_der(&copied).is_none(), "r = 0 is no signature");
        copied[0] = BIGNUM_WORDS as u8 + 1;
        assert!(bignums_to_der(&copied).is_none());
    }

    /// ring's `Signature`, alone or after a `Result` tag, or with the
    /// length after the bytes: the signature is among the readings.
    #[test]
    fn ring_signature_value_layouts_are_all_read() {
        let sig: Vec<u8> = (1..=70).collect();
        let mut len_first = (sig.len() as u64).to_le_bytes().to_vec();
        len_first.extend_from_slice(&sig);
        len_first.resize(160, 0);
        let mut tagged = vec![0u8; 8];
        tagged.extend_from_slice(&len_first[..152]);
        let mut len_after = sig.clone();
        len_after.resize(112, 0);
        len_after.extend_from_slice(&(sig.len() as u64).to_le_bytes());
        len_after.resize(160, 0);
        for value in [&len_first, &tagged, &len_after] {
            let readings = ring_signature_readings(value);
            assert!(readings.iter().flatten().any(|r| *r == sig.as_slice()));
        }
        assert!(
            ring_signature_readings(&[0u8; 160])
                .iter()
                .all(Option::is_none)
        );
    }

    #[test]
    fn unknown_is_explained_never_guessed() {
        let (_d, k1, _) = openssl_key(&["-algorithm", "ED25519"]);
        let mut id = Identifier::default();
        let sig = [7u8; 64];
        let got = identify(&mut id, record(5, 1, 1, &sig));
        assert_eq!(got.status, KeyStatus::Unknown);
        assert!(
            got.unknown_reason
                .unwrap()
                .contains("no public key is known")
        );

        id.add_inventory(read_key_file(&k1, "k1").unwrap().remove(0), "/k1.pem");
        let got = identify(&mut id, record(5, 1, 2, &sig));
        assert!(
            got.unknown_reason.unwrap().contains("not captured"),
            "no data, no check"
        );
        // The process was searched once, whatever came of it.
        assert_eq!(id.search_requests.len(), 1);
        assert_eq!(id.search_state(5), Some(&Searched::Running));
        id.set_search(5, Searched::Done("0 key files it holds open".into()));

        id.on_data(&data(5, 3, b"msg"), b"msg");
        let got = identify(&mut id, record(5, 1, 3, &sig));
        let reason = got.unknown_reason.unwrap();
        assert!(reason.contains("none of the 1 known"), "{reason}");
        assert!(
            reason.ends_with("; searched 0 key files it holds open"),
            "{reason}"
        );
        assert!(got.spki_sha256.is_none());
        // Remembered: the probes stop copying, and no verification runs...
        assert!(id.learned.contains(&(5, 1, 0)));
        let before = id.verifications;
        let (mut lite, _) = record(5, 1, 9, &[]);
        lite.flags |= sign_flags::KNOWN_HANDLE;
        assert!(
            id.identify(&lite, &[], true)
                .unknown_reason
                .unwrap()
                .contains("none of the 1 known")
        );
        assert_eq!(id.verifications, before);
        // ...until a new key becomes known, which retracts the verdict.
        id.retract.clear();
        let (_d2, k2, _) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        id.add_inventory(read_key_file(&k2, "k2").unwrap().remove(0), "/k2.pem");
        assert_eq!(id.retract, vec![(5, 1)]);

        let (mut failed, s) = record(5, 1, 4, &sig);
        failed.ret = 0;
        assert!(
            id.identify(&failed, &s, true)
                .unknown_reason
                .unwrap()
                .contains("failed")
        );
    }

    /// An ECDSA key in no file: one signature names nothing, a second,
    /// distinct one by the same key names it, and the first can then be
    /// checked against it.
    #[test]
    fn two_ecdsa_signatures_name_their_key_by_recovery() {
        let (d, k, spki) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let (d1, d2, d3) = (
            sha2::Sha256::digest(b"1").to_vec(),
            sha2::Sha256::digest(b"2").to_vec(),
            sha2::Sha256::digest(b"3").to_vec(),
        );
        let (s1, s2, s3) = (
            pkeyutl_sign(d.path(), &k, &d1),
            pkeyutl_sign(d.path(), &k, &d2),
            pkeyutl_sign(d.path(), &k, &d3),
        );
        let mut id = Identifier::default();

        id.on_data(&data(10, 1, &d1), &d1);
        let (r, s) = record(10, 0xa, 1, &s1);
        let first = id.judge(&r, &s, true);
        assert_eq!(first.key.status, KeyStatus::Unknown);
        let reason = first.key.unknown_reason.clone().unwrap();
        assert!(reason.contains("ECDSA recovery"), "{reason}");
        let held = first.retry.expect("the signature is kept for a later key");
        assert!(held.recovering.is_some_and(|n| n >= 2));
        assert!(id.learned.is_empty(), "the probes keep copying");
        id.take_fresh();

        // The same signature again agrees with nothing: it is not a second one.
        id.on_data(&data(10, 2, &d1), &d1);
        let (r, s) = record(10, 0xa, 2, &s1);
        assert_eq!(id.judge(&r, &s, true).key.status, KeyStatus::Unknown);

        // A second signature, another key object of the same process.
        id.on_data(&data(10, 3, &d2), &d2);
        let (r, s) = record(10, 0xb, 3, &s2);
        let got = id.judge(&r, &s, true).key;
        assert_eq!(got.spki_sha256.as_deref(), Some(spki.as_str()));
        assert_eq!(got.identified_by, Some(IdentifiedBy::EcdsaRecovered));
        assert_eq!(got.source_file, None);

        // The key is fresh: the held first signature verifies under it.
        let fresh = id.take_fresh();
        let key = fresh
            .iter()
            .find(|k| k.info.spki_sha256 == spki)
            .expect("the recovered key is fresh");
        assert!(id.name_held(&held, std::slice::from_ref(key)).is_some());

        // Later signatures verify under the recovered key.
        id.on_data(&data(10, 4, &d3), &d3);
        let (r, s) = record(10, 0xa, 4, &s3);
        let got = id.judge(&r, &s, true).key;
        assert_eq!(got.spki_sha256.as_deref(), Some(spki.as_str()));
        assert_eq!(got.identified_by, Some(IdentifiedBy::EcdsaRecovered));
    }

    /// One process with many ECDSA keys (a server with a certificate per
    /// site): a key object's first signature is named after a few
    /// verifications and one recovery, not one verification per key; an
    /// unknown key's signature costs the same, and the recovery pool reuses
    /// what was recovered.
    #[test]
    fn one_of_many_keys_is_named_by_a_few_operations() {
        let files: Vec<_> = (0..24)
            .map(|_| openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]))
            .collect();
        let mut id = Identifier::default();
        for (i, (_, path, _)) in files[..23].iter().enumerate() {
            let keys = read_key_file(path, "k").unwrap();
            id.add_process_keys(10, keys, &format!("/site{i}.key"));
        }
        let digest = sha2::Sha256::digest(b"transcript").to_vec();
        for (op, signer) in [(1, 22), (2, 5), (3, 23)] {
            let sig = pkeyutl_sign(files[0].0.path(), &files[signer].1, &digest);
            id.on_data(&data(10, op, &digest), &digest);
            let before = id.verifications;
            let got = identify(&mut id, record(10, 0x100 + op, op, &sig));
            // 4 verifications, then one recovery over one digest (2).
            assert!(
                id.verifications - before <= 6,
                "signer {signer}: {}",
                id.verifications - before
            );
            if signer < 23 {
                assert_eq!(got.spki_sha256.as_deref(), Some(files[signer].2.as_str()));
                assert_eq!(got.identified_by, Some(IdentifiedBy::SignatureVerified));
            } else {
                assert_eq!(got.status, KeyStatus::Unknown);
                assert_eq!(id.recovery.recoveries, 1, "pooled, from the same recovery");
            }
        }
    }

    /// A key learnt from a listener names a held signature, and later
    /// signatures say how it was learnt.
    #[test]
    fn a_key_from_a_listener_names_held_and_later_signatures() {
        let (d, k, spki) = openssl_key(&["-algorithm", "ED25519"]);
        let sign = |msg: &[u8]| {
            let (m, out) = (d.path().join("m"), d.path().join("s"));
            std::fs::write(&m, msg).unwrap();
            let st = std::process::Command::new("openssl")
                .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
                .arg(&k)
                .arg("-in")
                .arg(&m)
                .arg("-out")
                .arg(&out)
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::read(out).unwrap()
        };
        let digest_sign = |tgid: u32, handle: u64, op: u64, sig: &[u8]| {
            let (mut r, s) = record(tgid, handle, op, sig);
            r.func = func::DIGEST_SIGN as u32;
            (r, s)
        };
        let mut id = Identifier::default();
        let s1 = sign(b"one");
        id.on_data(&data(20, 1, b"one"), b"one");
        let (r, s) = digest_sign(20, 0xa, 1, &s1);
        let judged = id.judge(&r, &s, true);
        assert_eq!(judged.key.status, KeyStatus::Unknown);
        let held = judged.retry.unwrap();
        assert_eq!(held.recovering, None, "Ed25519 recovers nothing");
        assert_eq!(
            id.search_requests,
            vec![SearchRequest {
                tgid: 20,
                uid: 0,
                local_port: None
            }]
        );
        assert!(id.learned.is_empty(), "not cached while the search runs");

        let info = read_key_file(&k, "k").unwrap().remove(0);
        let source = Source::Listener {
            endpoint: "127.0.0.1:8443".into(),
            server_name: None,
        };
        id.add_process_keys_from(20, vec![info], &source);
        let fresh = id.take_fresh();
        assert!(!fresh.is_empty() && fresh.iter().all(|k| k.source == source));
        assert!(id.name_held(&held, &fresh[..1]).is_some());
        let named = identified(&fresh[0], fresh[0].verified_as());
        assert_eq!(named.identified_by, Some(IdentifiedBy::TlsCertificate));
        assert_eq!(named.source_file, None);

        let s2 = sign(b"two");
        id.on_data(&data(20, 2, b"two"), b"two");
        let (r, s) = digest_sign(20, 0xa, 2, &s2);
        let got = id.judge(&r, &s, true).key;
        assert_eq!(got.spki_sha256.as_deref(), Some(spki.as_str()));
        assert_eq!(got.identified_by, Some(IdentifiedBy::TlsCertificate));
    }
}
