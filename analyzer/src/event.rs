//! keywarden's event model.
//!
//! The structs mirror OCSF 1.3.0 objects one to one, so an event serializes
//! to OCSF JSON (NDJSON output) and, through serde, to nested Parquet
//! columns without a second model. Every event validates against the
//! OCSF 1.3.0 JSON Schema of its class with the profiles it lists (a test
//! runs the official schema export on every kind, on the docs' examples and
//! on a live sensor's output). keywarden's own data that OCSF 1.3.0 has no
//! attribute for goes under OCSF's `unmapped` object, typed here as
//! `Unmapped`; `docs/events.md` documents every field.
//!
//! OCSF leaves out attributes that have no value, so every schema struct
//! with `Option` fields carries `serde_with::skip_serializing_none`: a
//! field added later cannot write `null` where `docs/events.md` promises
//! absence (a missing field still reads as `None`). Every event is built
//! from `Event::base`, which alone spells out all of an event's fields.
//!
//! Long because it is the one source of the schema: every OCSF object the
//! events use is here, with the doc comments `docs/events.md` is checked
//! against.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

pub mod legacy;

/// OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.3.0";

pub mod class {
    /// Module Activity: a function exported from a module was invoked.
    pub const MODULE_ACTIVITY: u32 = 1005;
    /// File System Activity (secret-file opens).
    pub const FILE_SYSTEM_ACTIVITY: u32 = 1001;
    /// Event Log Activity (coverage warnings: gaps in the sensor's own
    /// record).
    pub const EVENT_LOG_ACTIVITY: u32 = 1008;
    /// Detection Finding (alerts).
    pub const DETECTION_FINDING: u32 = 2004;
    /// Remediation Activity: a key rotated or revoked by a rule.
    pub const REMEDIATION_ACTIVITY: u32 = 7001;
}

pub mod activity {
    /// Detection Finding: Create.
    pub const CREATE: u32 = 1;
    /// Remediation Activity: Evict (the key is taken out of service).
    pub const EVICT: u32 = 2;
    /// File System Activity: Open.
    pub const OPEN: u32 = 14;
    /// Other, with keywarden's own `activity_name`: Module Activity 1.3.0
    /// has only Load and Unload (Invoke, 3, came in 1.7.0), and Event Log
    /// Activity has no activity for a gap in coverage.
    pub const OTHER: u32 = 99;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventCode {
    /// A private key produced (or failed to produce) a signature.
    KeyUse,
    /// The sensor could not cover or attribute something and says so.
    CoverageWarning,
    /// A process opened a file on the secret-file watch list.
    SecretFileOpen,
    /// A rule matched an event (Detection Finding).
    Alert,
    /// A rule's `rotate` or `revoke`: planned, awaiting approval, done or
    /// failed (Remediation Activity).
    Remediation,
}

/// One keywarden event, OCSF base attributes first.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event time, milliseconds since the Unix epoch (OCSF `timestamp_t`).
    pub time: i64,
    pub class_uid: u32,
    pub class_name: String,
    pub category_uid: u32,
    pub category_name: String,
    pub activity_id: u32,
    pub activity_name: String,
    /// `class_uid * 100 + activity_id`.
    pub type_uid: u64,
    pub type_name: String,
    pub severity_id: u8,
    pub severity: String,
    /// 0 Unknown (secret-file opens: the attempt is seen, not its result),
    /// 1 Success, 2 Failure; a finding's 1 is New.
    pub status_id: u8,
    pub status: String,
    pub status_detail: Option<String>,
    pub message: String,
    pub metadata: Metadata,
    pub device: Device,
    pub actor: Actor,
    /// Module Activity: the library whose signing function was called.
    pub module: Option<Module>,
    /// File System Activity: the file opened. Event Log Activity: the
    /// library a coverage warning is about.
    pub file: Option<File>,
    /// Event Log Activity: the log the activity concerns, `keywarden`
    /// (OCSF requires one of its log attributes).
    pub log_provider: Option<String>,
    /// OCSF Security Control profile: `Allowed` or `Denied`, on an open a
    /// rule decided and on every finding.
    pub action: Option<String>,
    /// 1 Allowed, 2 Denied.
    pub action_id: Option<u8>,
    /// Security Control profile: what the control did, as OCSF names it.
    pub disposition: Option<String>,
    /// 1 Allowed, 2 Blocked, 7 Custom Action, 15 Detected, 19 Alert.
    pub disposition_id: Option<u8>,
    /// Detection Finding: which rule matched.
    pub finding_info: Option<FindingInfo>,
    /// Detection Finding: the event the rule matched, as exported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidences: Vec<Evidence>,
    /// Remediation Activity: the action's id, as `keywarden actions`
    /// names it.
    pub command_uid: Option<String>,
    /// Remediation Activity: the MITRE D3FEND technique carried out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countermeasures: Vec<Countermeasure>,
    /// keywarden's attributes that OCSF 1.3.0 has no place for.
    #[serde(default, skip_serializing_if = "Unmapped::is_empty")]
    pub unmapped: Unmapped,
}

/// OCSF `unmapped`: keywarden's own attributes, typed. OCSF lets a
/// producer put anything here, so a strict consumer accepts them, and
/// `docs/events.md` documents each.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Unmapped {
    /// Which private key signed, or which key a secret file holds.
    pub key: Option<KeyIdentity>,
    /// The signature that was produced.
    pub signature: Option<Signature>,
    /// The cgroup v2 the process ran in.
    pub cgroup: Option<Cgroup>,
    /// The Kubernetes pod of `actor.process.container` (OCSF 1.3.0's
    /// `container` has only the pod's UID).
    pub pod: Option<Pod>,
    /// Why `actor.process.file` (or its hash) or the cgroup path is
    /// missing, when one is.
    pub attribution_error: Option<String>,
    /// Details of a watched secret file's opens.
    pub secret_file: Option<SecretFile>,
    /// The other end of the connection a signature was made for (OCSF
    /// `network_endpoint`; Module Activity has no endpoint attribute),
    /// with its geography and network when the GeoIP databases know them.
    pub peer: Option<NetworkEndpoint>,
    /// This host's end of that connection.
    pub local: Option<NetworkEndpoint>,
    /// Findings: where the rule was written, `file:line`.
    pub rule_source: Option<String>,
    /// Findings: what the sensor did, one entry per action of the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub responses: Vec<Response>,
    /// Findings: why a baseline or threshold rule fired.
    pub analysis: Option<Analysis>,
    /// Remediation Activity: what was done to which key, for which rule.
    pub remediation: Option<Remediation>,
}

/// OCSF `d3fend`: a MITRE D3FEND tactic and technique, by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Countermeasure {
    pub d3f_tactic: D3fName,
    pub d3f_technique: D3fName,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct D3fName {
    pub name: String,
}

/// A rule's `rotate` or `revoke`, as carried out (`unmapped.remediation`).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Remediation {
    /// `rotate` or `revoke`.
    pub action: String,
    /// The key taken out of service.
    pub spki_sha256: String,
    /// After a rotation: the key that replaced it.
    pub new_spki_sha256: Option<String>,
    /// `revoke`: the RFC 5280 reason.
    pub reason: Option<String>,
    /// The rule that asked for it.
    pub rule: String,
    /// `dry_run`, `approve` or `enforce`: how far it was allowed to go.
    pub mode: crate::remediation::Mode,
    /// The last lines `keywarden rotate` or `revoke` printed (the plan,
    /// each step, the journal), at most `REMEDIATION_LOG_LINES`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

/// Lines of a remediation's own output kept in its event.
pub const REMEDIATION_LOG_LINES: usize = 40;

impl Unmapped {
    pub fn is_empty(&self) -> bool {
        *self == Unmapped::default()
    }
}

/// A Kubernetes pod, by the names the node's own files give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
}

/// Who did something, as the sensor attributes it: the OCSF process (its
/// container inside it) and what keywarden adds in `unmapped`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Who {
    pub process: Process,
    pub pod: Option<Pod>,
    pub cgroup: Option<Cgroup>,
    /// Why part of the attribution is missing.
    pub attribution_error: Option<String>,
}

/// The state behind a finding of a deviation or threshold rule.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// How the evidence deviated from its key's baseline (`new_country`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deviations: Vec<String>,
    /// The key's baseline before the evidence: what was normal.
    pub baseline: Option<BaselineSnapshot>,
    /// Matching events for the key within the rule's window.
    pub count: Option<u64>,
    pub window_seconds: Option<u64>,
}

/// A key's baseline as a finding shows it.
///
/// A type of the event model, not the baseline store's own
/// (`baseline::KeyBaseline`): the store's file format can then change
/// without changing the alert format, and the model needs nothing from
/// `baseline`, which builds this (`From<&KeyBaseline>`). It writes the same
/// JSON as a stored baseline today (a test in `baseline.rs` says so).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineSnapshot {
    /// The key, as `key.spki_sha256`.
    pub spki_sha256: String,
    /// The key's first and latest use, ms since the epoch.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub uses: u64,
    /// The values learned for each attribute, sorted.
    pub binaries: Vec<String>,
    pub containers: Vec<String>,
    pub users: Vec<String>,
    pub countries: Vec<String>,
    /// Ascending.
    pub asns: Vec<u32>,
    pub rate: RateSnapshot,
}

/// How fast a key was used, as a finding shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateSnapshot {
    /// Start of the latest minute counted (ms since the epoch).
    pub minute_ms: i64,
    /// Uses in that minute.
    pub this_minute: u64,
    /// The busiest minute seen while learning.
    pub max_per_minute: u64,
}

/// OCSF `network_endpoint`, reduced to what keywarden fills.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkEndpoint {
    pub ip: String,
    pub port: Option<u16>,
    pub location: Option<Location>,
    pub autonomous_system: Option<AutonomousSystem>,
}

/// OCSF `location`. Its strings are `CompactString`s: GeoIP fills them
/// in for every event from a cached answer, and names this short are then
/// copied inline instead of allocated on the analysis thread and freed on
/// another (a tenth of the pipeline's time as `String`s).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// ISO 3166-1 alpha-2.
    pub country: Option<CompactString>,
    pub city: Option<CompactString>,
}

/// OCSF `autonomous_system` (a `CompactString` name, as in `Location`).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutonomousSystem {
    pub number: u32,
    pub name: Option<CompactString>,
}

/// OCSF `finding_info`.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FindingInfo {
    /// Unique per finding (the event's `metadata.uid`).
    pub uid: String,
    pub title: String,
    pub desc: Option<String>,
    pub analytic: Analytic,
}

/// OCSF `analytic`: the rule.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Analytic {
    /// The rule id.
    pub uid: String,
    pub name: String,
    /// 1 Rule.
    pub type_id: u8,
    #[serde(rename = "type")]
    pub kind: String,
}

/// OCSF `evidences[]` entry: the matched event, whole, under `data` (OCSF
/// types it as JSON), and the file it acted on, where OCSF lets a finding
/// name one.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub file: Option<File>,
    pub data: serde_json::Value,
}

/// What became of one action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Carried out after the event.
    Done,
    /// The probe acted in the kernel before the event existed (a kill as
    /// the process entered the signing call).
    InKernel,
    /// Tried, and the system refused (`detail` says why).
    Failed,
    /// Not tried: replay, nothing to act on, or not this action's case.
    Skipped,
    /// Handed to the remediation worker or recorded for approval (`rotate`,
    /// `revoke`): the Remediation Activity events whose
    /// `metadata.correlation_uid` is this finding's say how it ended.
    Queued,
}

/// The decision a blocking rule made on an open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    /// Refused with EPERM.
    Denied,
}

/// How a key's identity was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentifiedBy {
    /// This signature verified under the key.
    SignatureVerified,
    /// The same key object in the same process was verified before and
    /// not freed or re-initialized since.
    HandleCache,
    /// Read from the key file the process opened (secret-file opens, and
    /// kills decided at key load, when no signature exists).
    KeyFile,
    /// This signature verified under the public key of the certificate a
    /// TLS listener of the signing process presented to the sensor's own
    /// handshake: no file held the key, but the server shows it to anyone.
    TlsCertificate,
    /// This signature verified under a public key recovered from the
    /// process's ECDSA signatures: two distinct signatures recovered the
    /// same point, which only the key that made both can give.
    EcdsaRecovered,
    /// This signature verified under the public key of the key the
    /// signing call was given (libgcrypt's key S-expression, of which the
    /// probes copy only the public parameters).
    SigningCallKey,
}

impl IdentifiedBy {
    /// Every value, in the order `docs/events.md` lists them (its table is
    /// checked against this list).
    pub const ALL: [IdentifiedBy; 6] = [
        IdentifiedBy::SignatureVerified,
        IdentifiedBy::HandleCache,
        IdentifiedBy::KeyFile,
        IdentifiedBy::TlsCertificate,
        IdentifiedBy::EcdsaRecovered,
        IdentifiedBy::SigningCallKey,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// The key is known exactly (see `identified_by`).
    Identified,
    /// The sensor cannot know which key signed; `unknown_reason` says why.
    Unknown,
}

/// One action a rule asked for and what became of it.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// `alert`, `kill`, `block`.
    pub action: String,
    pub outcome: Outcome,
    pub detail: Option<String>,
}

/// What was opened, how often, and which keys it holds. Never its contents.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecretFile {
    /// The path as the host sees it: the same as `file.path` for a process
    /// with the host's root and mount namespace, else
    /// `/proc/<pid>/root/<path>` (reachable from the host while the process
    /// lives). Absent when the process exited before the sensor could tell.
    pub host_path: Option<String>,
    /// The watch-list glob that matched.
    pub matched: String,
    /// Opens by this process within the coalescing window (at least 1).
    pub count: u32,
    /// Time of the first and last open in the window (ms since the epoch).
    pub first_time: i64,
    pub last_time: i64,
    /// SPKI SHA-256 of every key (private key or certificate) in the file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// The file holds a private key (not only certificates or public keys).
    pub holds_private_key: bool,
    /// Set when a blocking rule decided these opens (then the status is
    /// known: Success, or Failure with EPERM).
    pub verdict: Option<Verdict>,
    /// The rule that decided the verdict.
    pub rule: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub version: String,
    pub product: Product,
    /// Unique per sensor run: `<boot id prefix>-<sensor start>-<sequence>`.
    pub uid: String,
    /// Remediation Activity: the `uid` of the finding whose rule asked
    /// for it.
    pub correlation_uid: Option<String>,
    pub event_code: EventCode,
    pub profiles: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub name: String,
    pub vendor_name: String,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub hostname: String,
    /// OCSF device type: 1 Server.
    pub type_id: u8,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    pub process: Process,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    /// The kernel's `comm` (at most 15 bytes).
    pub name: String,
    pub cmd_line: Option<String>,
    pub file: Option<File>,
    pub user: User,
    /// The container the process runs in (OCSF Container profile).
    pub container: Option<Container>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Numeric uid, as a string like OCSF's `user.uid`.
    pub uid: String,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct File {
    /// Path as the process saw it (inside its mount namespace).
    pub path: String,
    pub name: String,
    /// OCSF file type: 1 Regular File.
    pub type_id: u8,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hashes: Vec<Fingerprint>,
}

/// OCSF `fingerprint`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// 3 = SHA-256.
    pub algorithm_id: u8,
    pub algorithm: String,
    pub value: String,
}

/// OCSF `container` (Container profile).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// Full container id (64 hex for Docker, containerd and CRI-O).
    pub uid: String,
    /// docker, containerd, cri-o, podman, kubernetes (a kubepods cgroup
    /// whose runtime the path does not tell) or unknown.
    pub runtime: String,
    /// Kubernetes pod UID, when the cgroup path carries it.
    pub pod_uuid: Option<String>,
    /// The container's name in its pod (Kubernetes), from the kubelet's
    /// log links on the node. Its pod's name and namespace, which OCSF
    /// 1.3.0's `container` has no place for, are `unmapped.pod`.
    pub name: Option<String>,
}

/// OCSF `module`: the library whose function was invoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Module {
    pub file: File,
    /// OCSF requires how the module was loaded; the sensor does not see
    /// that, so always 0 Unknown.
    pub load_type_id: u8,
    pub function_name: String,
    /// The crypto stack of the probed function: `openssl`, `boringssl`,
    /// `aws-lc`, `rustls`, `ring`, `gnutls`, `nss`, `go` or `libgcrypt`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Which private key made a signature. Never carries private material.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyIdentity {
    pub status: KeyStatus,
    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: Option<String>,
    /// The same value as an OCSF fingerprint.
    pub fingerprint: Option<Fingerprint>,
    /// `rsa-2048`, `ecdsa-p256`, `ed25519`, ...
    pub algorithm: Option<String>,
    pub bits: Option<u32>,
    /// File the sensor learnt this public key from: a key or certificate
    /// file this process opened or holds open (path as the process saw it)
    /// when there is one, else the first file on the host it was found in
    /// (a `key_paths` or `key_locations` entry, or a file another process
    /// opened). Absent for a key no file gave (`tls_certificate`,
    /// `ecdsa_recovered`).
    pub source_file: Option<String>,
    /// How the identity was established.
    pub identified_by: Option<IdentifiedBy>,
    pub unknown_reason: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// Bytes of signature produced (0 when the call failed).
    pub length: u64,
    /// Digest named by the caller (EVP_DigestSignInit_ex), when it named one.
    pub digest: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    /// cgroup v2 id (inode of the cgroup directory).
    pub id: u64,
    /// Path below the cgroup v2 root, e.g. `/system.slice/nginx.service`.
    pub path: Option<String>,
}

impl File {
    /// A regular file known by its path only (no hashes).
    pub fn regular(path: &str) -> File {
        File {
            path: path.to_owned(),
            name: path.rsplit('/').next().unwrap_or_default().to_owned(),
            type_id: 1,
            hashes: Vec::new(),
        }
    }
}

impl Fingerprint {
    pub fn sha256(value: impl Into<String>) -> Self {
        Self {
            algorithm_id: 3,
            algorithm: "SHA-256".into(),
            value: value.into(),
        }
    }
}

impl KeyIdentity {
    /// A key the sensor cannot name, and why: never a guess.
    pub fn unknown(reason: impl Into<String>) -> Self {
        Self {
            status: KeyStatus::Unknown,
            spki_sha256: None,
            fingerprint: None,
            algorithm: None,
            bits: None,
            source_file: None,
            identified_by: None,
            unknown_reason: Some(reason.into()),
        }
    }
}

/// OCSF severity ids.
pub mod severity {
    pub const INFORMATIONAL: u8 = 1;
    pub const LOW: u8 = 2;
    pub const MEDIUM: u8 = 3;
    pub const HIGH: u8 = 4;
    pub const CRITICAL: u8 = 5;

    pub fn name(id: u8) -> &'static str {
        match id {
            1 => "Informational",
            2 => "Low",
            3 => "Medium",
            4 => "High",
            5 => "Critical",
            6 => "Fatal",
            _ => "Unknown",
        }
    }
}

/// Fields every event shares; the sensor fills one per run.
#[derive(Clone, Debug)]
pub struct Origin {
    pub hostname: String,
    pub product_version: String,
    pub uid_prefix: String,
}

impl Origin {
    /// The `metadata.uid` of this run's event number `seq`.
    pub fn uid(&self, seq: u64) -> String {
        format!("{}-{seq}", self.uid_prefix)
    }

    fn metadata(&self, seq: u64, event_code: EventCode, profiles: Vec<String>) -> Metadata {
        Metadata {
            version: OCSF_VERSION.into(),
            product: Product {
                name: "keywarden".into(),
                vendor_name: "keywarden".into(),
                version: self.product_version.clone(),
            },
            uid: self.uid(seq),
            correlation_uid: None,
            event_code,
            profiles,
        }
    }

    fn device(&self) -> Device {
        Device {
            hostname: self.hostname.clone(),
            type_id: 1,
        }
    }
}

/// One (coalesced) open of a watched secret file, before it becomes an
/// `Event`.
#[derive(Clone, Debug)]
pub struct SecretFileOpen {
    pub seq: u64,
    pub who: Who,
    pub file: File,
    /// The key in the file, when it holds exactly one; `unknown`, with the
    /// reason, when the sensor meant to read it and could not in time.
    pub key: Option<KeyIdentity>,
    pub secret: SecretFile,
    /// What the first open of the window came to.
    pub result: OpenResult,
}

/// What an open came to, as the probe saw the system call return.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum OpenResult {
    /// Not observed: the probe's report of the result was lost, or the
    /// open was decided by the guard (whose verdict then says).
    #[default]
    Unknown,
    Succeeded,
    /// The error, as `EACCES (Permission denied)`.
    Failed(String),
}

/// Everything that describes one signature, before it becomes an `Event`.
#[derive(Clone, Debug)]
pub struct KeyUse {
    pub time_ms: i64,
    pub seq: u64,
    pub who: Who,
    pub library: File,
    pub library_kind: String,
    pub function: String,
    pub success: bool,
    pub key: KeyIdentity,
    pub signature: Signature,
    /// The connection the signature was made for, when it was made during
    /// one (a TLS handshake): remote end, then local end.
    pub peer: Option<NetworkEndpoint>,
    pub local: Option<NetworkEndpoint>,
}

/// Where a kind of event sits in OCSF.
struct OcsfType {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    /// `activity_name`: OCSF's name for the activity, unless keywarden has
    /// a more precise one.
    activity_name: &'static str,
    /// OCSF's name for the activity, as `type_name` spells it.
    ocsf_activity: &'static str,
}

impl EventCode {
    /// The OCSF class and activity of each kind of event, named here only.
    fn ocsf_type(self) -> OcsfType {
        match self {
            // Module Activity 1.3.0 knows Load and Unload only: a call of a
            // signing function is Other, named Invoke as OCSF 1.7.0 does.
            EventCode::KeyUse => OcsfType {
                class_uid: class::MODULE_ACTIVITY,
                class_name: "Module Activity",
                category_uid: 1,
                category_name: "System Activity",
                activity_id: activity::OTHER,
                activity_name: "Invoke",
                ocsf_activity: "Other",
            },
            // A gap in what the sensor records: an activity of the event
            // log it is (Event Log Activity needs no module, no actor).
            EventCode::CoverageWarning => OcsfType {
                class_uid: class::EVENT_LOG_ACTIVITY,
                class_name: "Event Log Activity",
                category_uid: 1,
                category_name: "System Activity",
                activity_id: activity::OTHER,
                activity_name: "Coverage Warning",
                ocsf_activity: "Other",
            },
            EventCode::SecretFileOpen => OcsfType {
                class_uid: class::FILE_SYSTEM_ACTIVITY,
                class_name: "File System Activity",
                category_uid: 1,
                category_name: "System Activity",
                activity_id: activity::OPEN,
                activity_name: "Open",
                ocsf_activity: "Open",
            },
            EventCode::Alert => OcsfType {
                class_uid: class::DETECTION_FINDING,
                class_name: "Detection Finding",
                category_uid: 2,
                category_name: "Findings",
                activity_id: activity::CREATE,
                activity_name: "Create",
                ocsf_activity: "Create",
            },
            // Rotating or revoking a key evicts it: D3FEND files both
            // under credential eviction.
            EventCode::Remediation => OcsfType {
                class_uid: class::REMEDIATION_ACTIVITY,
                class_name: "Remediation Activity",
                category_uid: 7,
                category_name: "Remediation",
                activity_id: activity::EVICT,
                activity_name: "Evict",
                ocsf_activity: "Evict",
            },
        }
    }
}

/// OCSF Security Control attributes: what a control did about the
/// activity. Setting them lists the `security_control` profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// 1 Allowed, 2 Denied.
    pub action_id: u8,
    /// `disposition::*`.
    pub disposition_id: u8,
}

/// OCSF `disposition_id` values keywarden writes.
pub mod disposition {
    pub const ALLOWED: u8 = 1;
    pub const BLOCKED: u8 = 2;
    pub const CUSTOM_ACTION: u8 = 7;
    pub const DETECTED: u8 = 15;
    pub const ALERT: u8 = 19;

    pub fn name(id: u8) -> &'static str {
        match id {
            ALLOWED => "Allowed",
            BLOCKED => "Blocked",
            CUSTOM_ACTION => "Custom Action",
            DETECTED => "Detected",
            ALERT => "Alert",
            _ => "Other",
        }
    }
}

impl Control {
    pub const ALLOWED: Control = Control {
        action_id: 1,
        disposition_id: disposition::ALLOWED,
    };
    pub const DENIED: Control = Control {
        action_id: 2,
        disposition_id: disposition::BLOCKED,
    };

    fn action(self) -> &'static str {
        match self.action_id {
            1 => "Allowed",
            2 => "Denied",
            _ => "Unknown",
        }
    }

    /// What a finding's rule came to. The activity was denied when the
    /// guard refused the open or the probe killed the process before it
    /// signed; otherwise it happened, and the disposition says what
    /// followed: a kill after the fact, an alert, or nothing (a replay).
    fn of_finding(evidence: &Event, responses: &[Response]) -> Control {
        let did = |action: &str, outcome: Outcome| {
            responses
                .iter()
                .any(|r| r.action == action && r.outcome == outcome)
        };
        if evidence.action_id == Some(2)
            || did("kill", Outcome::InKernel)
            || did("block", Outcome::Done)
        {
            return Control::DENIED;
        }
        let disposition_id = if did("kill", Outcome::Done) {
            disposition::CUSTOM_ACTION
        } else if did("alert", Outcome::Done) {
            disposition::ALERT
        } else {
            disposition::DETECTED
        };
        Control {
            action_id: 1,
            disposition_id,
        }
    }
}

/// What every event states, whatever its kind.
///
/// Named fields rather than arguments of `Event::base`: several are
/// integers of the same type (time and sequence, severity and status),
/// which positional arguments would let a caller swap unnoticed.
struct Common<'a> {
    origin: &'a Origin,
    code: EventCode,
    time_ms: i64,
    seq: u64,
    severity_id: u8,
    status_id: u8,
    /// The OCSF name of `status_id` in the event's class (`New` is a
    /// finding's 1, `Success` an activity's).
    status: &'static str,
    message: String,
    /// Its process's container also decides the `container` profile: it
    /// is listed exactly when there is one.
    who: Who,
    /// Sets the Security Control attributes and lists its profile.
    control: Option<Control>,
}

impl Event {
    /// The one place an event is spelt out whole: `common`, the OCSF names
    /// and numbers its kind implies, the profiles its attributes need, and
    /// every optional attribute empty. Each kind's constructor starts here
    /// (`..Event::base(...)`) and sets only what is its own, so a new
    /// attribute is added here once.
    fn base(common: Common<'_>) -> Self {
        let t = common.code.ocsf_type();
        let mut profiles = vec!["host".to_owned()];
        if common.who.process.container.is_some() {
            profiles.push("container".to_owned());
        }
        if common.control.is_some() {
            profiles.push("security_control".to_owned());
        }
        Event {
            time: common.time_ms,
            class_uid: t.class_uid,
            class_name: t.class_name.into(),
            category_uid: t.category_uid,
            category_name: t.category_name.into(),
            activity_id: t.activity_id,
            activity_name: t.activity_name.into(),
            type_uid: u64::from(t.class_uid) * 100 + u64::from(t.activity_id),
            type_name: format!("{}: {}", t.class_name, t.ocsf_activity),
            severity_id: common.severity_id,
            severity: severity::name(common.severity_id).into(),
            status_id: common.status_id,
            status: common.status.into(),
            status_detail: None,
            message: common.message,
            metadata: common.origin.metadata(common.seq, common.code, profiles),
            device: common.origin.device(),
            actor: Actor {
                process: common.who.process,
            },
            module: None,
            file: None,
            log_provider: None,
            action: common.control.map(|c| c.action().to_owned()),
            action_id: common.control.map(|c| c.action_id),
            disposition: common
                .control
                .map(|c| disposition::name(c.disposition_id).to_owned()),
            disposition_id: common.control.map(|c| c.disposition_id),
            finding_info: None,
            evidences: Vec::new(),
            command_uid: None,
            countermeasures: Vec::new(),
            unmapped: Unmapped {
                key: None,
                signature: None,
                cgroup: common.who.cgroup,
                pod: common.who.pod,
                attribution_error: common.who.attribution_error,
                secret_file: None,
                peer: None,
                local: None,
                rule_source: None,
                responses: Vec::new(),
                analysis: None,
                remediation: None,
            },
        }
    }

    /// Who the event's actor is, as `Who` gave it.
    pub fn who(&self) -> Who {
        Who {
            process: self.actor.process.clone(),
            pod: self.unmapped.pod.clone(),
            cgroup: self.unmapped.cgroup.clone(),
            attribution_error: self.unmapped.attribution_error.clone(),
        }
    }

    /// The actor's container (`actor.process.container`).
    pub fn container(&self) -> Option<&Container> {
        self.actor.process.container.as_ref()
    }

    /// Module Activity 1005 / Other (Invoke): a private key signed.
    pub fn key_use(origin: &Origin, u: KeyUse) -> Self {
        let who = &u.who.process.name;
        let which = match (&u.key.algorithm, &u.key.spki_sha256) {
            (Some(alg), Some(spki)) => format!("{alg} key {}", &spki[..spki.len().min(16)]),
            _ => "an unidentified key".to_owned(),
        };
        let message = if u.success {
            format!(
                "{who} (pid {}) signed with {which} via {}",
                u.who.process.pid, u.function
            )
        } else {
            format!(
                "{who} (pid {}) failed to sign with {which} via {}",
                u.who.process.pid, u.function
            )
        };
        let base = Event::base(Common {
            origin,
            code: EventCode::KeyUse,
            time_ms: u.time_ms,
            seq: u.seq,
            severity_id: severity::INFORMATIONAL,
            status_id: if u.success { 1 } else { 2 },
            status: if u.success { "Success" } else { "Failure" },
            message,
            who: u.who,
            control: None,
        });
        Event {
            module: Some(Module {
                file: u.library,
                load_type_id: 0,
                function_name: u.function,
                kind: u.library_kind,
            }),
            unmapped: Unmapped {
                key: Some(u.key),
                signature: Some(u.signature),
                peer: u.peer,
                local: u.local,
                ..base.unmapped
            },
            ..base
        }
    }

    /// File System Activity 1001 / Open: a watched secret file was opened
    /// (`count` times by this process within the coalescing window). The
    /// status is the first open's result, as the probe saw the call return
    /// (Unknown when that was not observed); a blocking rule's verdict,
    /// when there is one, decides it instead.
    pub fn secret_file_open(origin: &Origin, o: SecretFileOpen) -> Self {
        let count = o.secret.count;
        let time_ms = o.secret.first_time;
        let denied = o.secret.verdict == Some(Verdict::Denied);
        let failed = matches!(o.result, OpenResult::Failed(_)) && o.secret.verdict.is_none();
        // A rule's verdict makes the result known (and the event a
        // Security Control one); otherwise the probe's result says.
        let rule = o.secret.rule.as_deref().unwrap_or("?");
        let (status_id, status, status_detail, control) = match (o.secret.verdict, &o.result) {
            (None, OpenResult::Unknown) => (
                0,
                "Unknown",
                "open attempted; its result is not observed".to_owned(),
                None,
            ),
            (None, OpenResult::Succeeded) => (1, "Success", "opened".to_owned(), None),
            (None, OpenResult::Failed(e)) => (2, "Failure", format!("open failed: {e}"), None),
            (Some(Verdict::Denied), _) => (
                2,
                "Failure",
                format!("denied with EPERM by rule {rule}"),
                Some(Control::DENIED),
            ),
            (Some(Verdict::Allowed), _) => (
                1,
                "Success",
                format!("allowed by rule {rule}"),
                Some(Control::ALLOWED),
            ),
        };
        let message = format!(
            "{} (pid {}) {} {}{}",
            o.who.process.name,
            o.who.process.pid,
            if denied {
                "was denied opening"
            } else if failed {
                "failed to open"
            } else {
                "opened"
            },
            o.file.path,
            if count > 1 {
                format!(" {count} times")
            } else {
                String::new()
            }
        );
        let base = Event::base(Common {
            origin,
            code: EventCode::SecretFileOpen,
            time_ms,
            seq: o.seq,
            severity_id: severity::INFORMATIONAL,
            status_id,
            status,
            message,
            who: o.who,
            control,
        });
        Event {
            status_detail: Some(status_detail),
            file: Some(o.file),
            unmapped: Unmapped {
                key: o.key,
                secret_file: Some(o.secret),
                ..base.unmapped
            },
            ..base
        }
    }

    /// Event Log Activity 1008 / Other (Coverage Warning): something the
    /// sensor could not cover or attribute. It is an event, not only a log
    /// line, so that gaps in coverage reach the same SIEM as the coverage.
    /// `library`, when the gap is a library, is the event's `file`.
    pub fn coverage_warning(
        origin: &Origin,
        time_ms: i64,
        seq: u64,
        process: Option<Process>,
        library: Option<File>,
        detail: String,
    ) -> Self {
        Event {
            status_detail: Some(detail.clone()),
            file: library,
            log_provider: Some("keywarden".into()),
            ..Event::base(Common {
                origin,
                code: EventCode::CoverageWarning,
                time_ms,
                seq,
                severity_id: severity::LOW,
                status_id: 2,
                status: "Failure",
                message: detail,
                who: Who {
                    process: process.unwrap_or_default(),
                    ..Who::default()
                },
                control: None,
            })
        }
    }
}

/// What became of a rule's `rotate` or `revoke`, for its Remediation
/// Activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemediationStatus {
    /// Done and verified: the status is Success.
    Done,
    /// Tried, and undone or refused: Failure, `status_detail` says why.
    Failed,
    /// `dry_run`: planned only. Other ("Planned").
    Planned,
    /// `approve`: recorded for `keywarden actions approve`. Other
    /// ("Awaiting Approval").
    AwaitingApproval,
}

impl Event {
    /// Remediation Activity 7001 / Evict: a rule's `rotate` or `revoke`,
    /// linked to the finding that asked for it (`metadata.correlation_uid`).
    /// The actor is the process that carried it out (keywarden).
    #[allow(clippy::too_many_arguments)]
    pub fn remediation(
        origin: &Origin,
        time_ms: i64,
        seq: u64,
        id: &str,
        finding_uid: &str,
        status: RemediationStatus,
        detail: String,
        who: Process,
        what: Remediation,
    ) -> Self {
        let (status_id, status_name) = match status {
            RemediationStatus::Done => (1, "Success"),
            RemediationStatus::Failed => (2, "Failure"),
            RemediationStatus::Planned => (99, "Planned"),
            RemediationStatus::AwaitingApproval => (99, "Awaiting Approval"),
        };
        let severity_id = match status {
            RemediationStatus::Failed => severity::HIGH,
            _ => severity::INFORMATIONAL,
        };
        let technique = match what.action.as_str() {
            "revoke" => "Credential Revoking",
            _ => "Credential Rotation",
        };
        let message = format!(
            "{} of key {}: {detail}",
            what.action,
            what.spki_sha256.get(..16).unwrap_or(&what.spki_sha256)
        );
        let mut ev = Event {
            status_detail: Some(detail),
            command_uid: Some(id.to_owned()),
            countermeasures: vec![Countermeasure {
                d3f_tactic: D3fName {
                    name: "Evict".into(),
                },
                d3f_technique: D3fName {
                    name: technique.into(),
                },
            }],
            ..Event::base(Common {
                origin,
                code: EventCode::Remediation,
                time_ms,
                seq,
                severity_id,
                status_id,
                status: status_name,
                message,
                who: Who {
                    process: who,
                    ..Who::default()
                },
                control: None,
            })
        };
        ev.metadata.correlation_uid = Some(finding_uid.to_owned());
        ev.unmapped.remediation = Some(what);
        ev
    }
}

/// What a matched rule says about itself, for its finding.
#[derive(Clone, Debug)]
pub struct RuleRef {
    pub id: String,
    pub description: Option<String>,
    pub severity_id: u8,
    pub source: Option<String>,
}

impl Event {
    /// Detection Finding 2004 / Create: a rule matched `evidence`. The
    /// actor (with its container) and keywarden's attributes of the
    /// evidence (key, cgroup, pod, peer, local) are copied from it so a
    /// SIEM can pivot without opening it; the file it acted on is
    /// `evidences[0].file`.
    pub fn detection_finding(
        origin: &Origin,
        time_ms: i64,
        seq: u64,
        rule: &RuleRef,
        evidence: &Event,
        responses: Vec<Response>,
    ) -> Self {
        let base = Event::base(Common {
            origin,
            code: EventCode::Alert,
            time_ms,
            seq,
            severity_id: rule.severity_id,
            status_id: 1,
            status: "New",
            message: format!("rule {} matched: {}", rule.id, evidence.message),
            who: evidence.who(),
            control: Some(Control::of_finding(evidence, &responses)),
        });
        Event {
            finding_info: Some(FindingInfo {
                uid: base.metadata.uid.clone(),
                title: rule
                    .description
                    .clone()
                    .unwrap_or_else(|| format!("keywarden rule {}", rule.id)),
                desc: Some(evidence.message.clone()),
                analytic: Analytic {
                    uid: rule.id.clone(),
                    name: rule.id.clone(),
                    type_id: 1,
                    kind: "Rule".into(),
                },
            }),
            evidences: vec![Evidence {
                file: evidence.file.clone(),
                data: serde_json::to_value(evidence).unwrap_or_default(),
            }],
            unmapped: Unmapped {
                key: evidence.unmapped.key.clone(),
                peer: evidence.unmapped.peer.clone(),
                local: evidence.unmapped.local.clone(),
                rule_source: rule.source.clone(),
                responses,
                ..base.unmapped
            },
            ..base
        }
    }
}

/// Fully populated sample events for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn origin() -> Origin {
        Origin {
            hostname: "h1".into(),
            product_version: "0.1.0".into(),
            uid_prefix: "abc".into(),
        }
    }

    pub fn process() -> Process {
        Process {
            pid: 42,
            tid: 43,
            name: "nginx".into(),
            cmd_line: Some("nginx: worker process".into()),
            file: Some(File {
                path: "/usr/sbin/nginx".into(),
                name: "nginx".into(),
                type_id: 1,
                hashes: vec![Fingerprint::sha256("00".repeat(32))],
            }),
            user: User {
                uid: "33".into(),
                name: Some("www-data".into()),
            },
            container: Some(container()),
        }
    }

    /// The sample process, in its container and pod.
    pub fn who() -> Who {
        Who {
            process: process(),
            pod: Some(Pod {
                name: "web-7d9c5b6f4-x2kqp".into(),
                namespace: "shop".into(),
            }),
            cgroup: Some(cgroup()),
            attribution_error: None,
        }
    }

    pub fn container() -> Container {
        Container {
            uid: "a".repeat(64),
            runtime: "containerd".into(),
            pod_uuid: Some("0f0e0d0c-0000-4000-8000-000000000001".into()),
            name: Some("nginx".into()),
        }
    }

    pub fn cgroup() -> Cgroup {
        Cgroup {
            id: 99,
            path: Some("/kubepods/x".into()),
        }
    }

    pub fn key() -> KeyIdentity {
        KeyIdentity {
            status: KeyStatus::Identified,
            spki_sha256: Some("ab".repeat(32)),
            fingerprint: Some(Fingerprint::sha256("ab".repeat(32))),
            algorithm: Some("ecdsa-p256".into()),
            bits: Some(256),
            source_file: Some("/etc/ssl/private/a.key".into()),
            identified_by: Some(IdentifiedBy::SignatureVerified),
            unknown_reason: None,
        }
    }

    pub fn key_use_event() -> Event {
        let mut ev = key_use_event_without_peer();
        ev.unmapped.peer = Some(NetworkEndpoint {
            ip: "192.0.2.10".into(),
            port: Some(51000),
            location: Some(Location {
                country: Some("DE".into()),
                city: Some("Berlin".into()),
            }),
            autonomous_system: Some(AutonomousSystem {
                number: 64500,
                name: Some("Example Net".into()),
            }),
        });
        ev.unmapped.local = Some(NetworkEndpoint {
            ip: "203.0.113.5".into(),
            port: Some(443),
            ..Default::default()
        });
        ev
    }

    /// The signature every sample event describes.
    pub fn key_use() -> KeyUse {
        KeyUse {
            time_ms: 1_764_000_000_123,
            seq: 7,
            who: who(),
            library: File::regular("/usr/lib/libcrypto.so.3"),
            library_kind: "openssl".into(),
            function: "EVP_DigestSign".into(),
            success: true,
            key: key(),
            signature: Signature {
                length: 71,
                digest: Some("SHA256".into()),
            },
            peer: None,
            local: None,
        }
    }

    fn key_use_event_without_peer() -> Event {
        Event::key_use(&origin(), key_use())
    }

    pub fn secret_open_event() -> Event {
        Event::secret_file_open(
            &origin(),
            SecretFileOpen {
                seq: 8,
                who: who(),
                file: File::regular("/etc/ssl/private/a.key"),
                key: Some(key()),
                secret: SecretFile {
                    host_path: Some("/etc/ssl/private/a.key".into()),
                    matched: "/etc/ssl/private/**".into(),
                    count: 1,
                    first_time: 1,
                    last_time: 1,
                    keys: vec!["ab".repeat(32)],
                    holds_private_key: true,
                    verdict: None,
                    rule: None,
                },
                result: OpenResult::Unknown,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tests_support::{key_use as sample, origin};

    #[test]
    fn key_use_has_ocsf_module_activity_shape() {
        let ev = Event::key_use(&origin(), sample());
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["class_uid"], 1005);
        assert_eq!(v["activity_id"], 99);
        assert_eq!(v["activity_name"], "Invoke");
        assert_eq!(v["type_uid"], 100599);
        assert_eq!(v["module"]["load_type_id"], 0);
        assert_eq!(v["category_uid"], 1);
        assert_eq!(v["status_id"], 1);
        assert_eq!(v["metadata"]["version"], OCSF_VERSION);
        assert_eq!(v["metadata"]["event_code"], "key_use");
        assert_eq!(v["metadata"]["uid"], "abc-7");
        assert_eq!(
            v["metadata"]["profiles"],
            serde_json::json!(["host", "container"])
        );
        assert_eq!(v["actor"]["process"]["pid"], 42);
        assert_eq!(v["actor"]["process"]["user"]["uid"], "33");
        assert_eq!(
            v["actor"]["process"]["file"]["hashes"][0]["algorithm_id"],
            3
        );
        assert_eq!(v["module"]["function_name"], "EVP_DigestSign");
        assert_eq!(v["module"]["type"], "openssl");
        assert_eq!(v["unmapped"]["key"]["spki_sha256"], "ab".repeat(32));
        assert_eq!(v["unmapped"]["key"]["status"], "identified");
        assert_eq!(v["actor"]["process"]["container"]["uid"], "a".repeat(64));
        assert_eq!(v["unmapped"]["pod"]["namespace"], "shop");
        assert_eq!(v["unmapped"]["cgroup"]["id"], 99);
        // The key object has only public identity fields.
        let fields: Vec<&str> = v["unmapped"]["key"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let allowed = [
            "status",
            "spki_sha256",
            "fingerprint",
            "algorithm",
            "bits",
            "source_file",
            "identified_by",
            "unknown_reason",
        ];
        assert!(fields.iter().all(|f| allowed.contains(f)), "{fields:?}");
    }

    #[test]
    fn failed_signature_is_failure_status() {
        let mut u = sample();
        u.success = false;
        let ev = Event::key_use(&origin(), u);
        assert_eq!(ev.status_id, 2);
        assert_eq!(ev.status, "Failure");
        assert!(ev.message.contains("failed"));
    }

    #[test]
    fn events_round_trip_through_json() {
        let ev = Event::key_use(&origin(), sample());
        let text = serde_json::to_string(&ev).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, ev);
        let mut u = sample();
        u.key = KeyIdentity::unknown("no candidate key verified the signature");
        let ev = Event::key_use(&origin(), u);
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["unmapped"]["key"]["status"], "unknown");
        assert!(v["unmapped"]["key"].get("spki_sha256").is_none());
        assert!(ev.message.contains("unidentified"));
    }

    #[test]
    fn secret_file_open_is_file_system_activity_open() {
        let u = sample();
        let o = SecretFileOpen {
            seq: 9,
            who: Who {
                process: Process {
                    container: None,
                    ..u.who.process
                },
                ..u.who
            },
            file: File::regular("/srv/app/.env"),
            key: None,
            secret: SecretFile {
                host_path: Some("/srv/app/.env".into()),
                matched: "**/.env".into(),
                count: 3,
                first_time: 10,
                last_time: 20,
                keys: vec![],
                holds_private_key: false,
                verdict: None,
                rule: None,
            },
            result: OpenResult::Unknown,
        };
        let v = serde_json::to_value(Event::secret_file_open(&origin(), o.clone())).unwrap();
        assert_eq!(v["class_uid"], 1001);
        assert_eq!(v["activity_id"], 14);
        assert_eq!(v["type_uid"], 100114);
        assert_eq!(v["metadata"]["event_code"], "secret_file_open");
        assert_eq!(v["file"]["path"], "/srv/app/.env");
        assert_eq!(v["unmapped"]["secret_file"]["count"], 3);
        assert_eq!(v["status_id"], 0);
        assert!(v["message"].as_str().unwrap().ends_with("3 times"));
        assert!(v.get("module").is_none() && v["unmapped"].get("signature").is_none());

        // The result the probe saw makes the status.
        let ok = Event::secret_file_open(
            &origin(),
            SecretFileOpen {
                result: OpenResult::Succeeded,
                ..o.clone()
            },
        );
        assert_eq!((ok.status_id, ok.status.as_str()), (1, "Success"));
        assert_eq!(ok.status_detail.as_deref(), Some("opened"));
        assert!(
            ok.message.contains(" opened /srv/app/.env"),
            "{}",
            ok.message
        );
        let failed = Event::secret_file_open(
            &origin(),
            SecretFileOpen {
                result: OpenResult::Failed("EACCES (Permission denied)".into()),
                ..o
            },
        );
        assert_eq!((failed.status_id, failed.status.as_str()), (2, "Failure"));
        assert_eq!(
            failed.status_detail.as_deref(),
            Some("open failed: EACCES (Permission denied)")
        );
        assert!(
            failed.message.contains("failed to open"),
            "{}",
            failed.message
        );
        assert!(failed.action.is_none(), "no rule decided it");
    }

    #[test]
    fn coverage_warning_is_event_log_activity_other() {
        let ev = Event::coverage_warning(
            &origin(),
            1,
            2,
            None,
            None,
            "cannot read /proc/9/maps".into(),
        );
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["class_uid"], 1008);
        assert_eq!(v["activity_id"], 99);
        assert_eq!(v["type_uid"], 100899);
        assert_eq!(v["metadata"]["event_code"], "coverage_warning");
        assert_eq!(v["status_detail"], "cannot read /proc/9/maps");
    }

    #[test]
    fn detection_finding_carries_rule_evidence_and_responses() {
        let evidence = tests_support::secret_open_event();
        let rule = RuleRef {
            id: "tls-key-readers".into(),
            description: Some("Only nginx reads the TLS key".into()),
            severity_id: severity::HIGH,
            source: Some("rules/x.yaml:3".into()),
        };
        let responses = vec![Response {
            action: "block".into(),
            outcome: Outcome::Done,
            detail: None,
        }];
        let ev = Event::detection_finding(&origin(), 5, 11, &rule, &evidence, responses);
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["class_uid"], 2004);
        assert_eq!(v["type_uid"], 200401);
        assert_eq!(v["category_uid"], 2);
        assert_eq!(v["severity_id"], 4);
        assert_eq!(v["metadata"]["event_code"], "alert");
        assert_eq!(v["finding_info"]["analytic"]["uid"], "tls-key-readers");
        assert_eq!(v["finding_info"]["uid"], v["metadata"]["uid"]);
        assert_eq!(v["evidences"][0]["data"]["class_uid"], 1001);
        assert_eq!(v["actor"]["process"]["pid"], 42);
        assert_eq!(v["unmapped"]["responses"][0]["action"], "block");
        assert_eq!(v["unmapped"]["rule_source"], "rules/x.yaml:3");
        assert_eq!(v["evidences"][0]["file"]["path"], "/etc/ssl/private/a.key");
        assert!(v.get("file").is_none(), "a finding has no top-level file");
        // The block was done: the open was denied.
        assert_eq!(
            (v["action_id"].as_u64(), v["disposition_id"].as_u64()),
            (Some(2), Some(2))
        );
        assert!(
            v["metadata"]["profiles"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("security_control"))
        );
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev);
    }

    /// The OCSF names every kind writes, now derived in one place
    /// (`EventCode::ocsf_type`, `Event::base`) rather than written in each
    /// constructor.
    #[test]
    fn each_kind_writes_its_ocsf_names_and_profiles() {
        let rule = RuleRef {
            id: "r1".into(),
            description: None,
            severity_id: severity::MEDIUM,
            source: None,
        };
        let evidence = tests_support::key_use_event();
        let cases = [
            (
                evidence.clone(),
                ("Module Activity", "System Activity", "Invoke"),
                ("Module Activity: Other", 100599_u64, "Informational"),
            ),
            (
                tests_support::secret_open_event(),
                ("File System Activity", "System Activity", "Open"),
                ("File System Activity: Open", 100114, "Informational"),
            ),
            (
                Event::coverage_warning(&origin(), 1, 2, None, None, "x".into()),
                ("Event Log Activity", "System Activity", "Coverage Warning"),
                ("Event Log Activity: Other", 100899, "Low"),
            ),
            (
                Event::detection_finding(&origin(), 5, 11, &rule, &evidence, Vec::new()),
                ("Detection Finding", "Findings", "Create"),
                ("Detection Finding: Create", 200401, "Medium"),
            ),
        ];
        for (ev, names, type_and_severity) in cases {
            assert_eq!(
                (
                    ev.class_name.as_str(),
                    ev.category_name.as_str(),
                    ev.activity_name.as_str()
                ),
                names
            );
            assert_eq!(
                (ev.type_name.as_str(), ev.type_uid, ev.severity.as_str()),
                type_and_severity
            );
            assert_eq!(
                ev.metadata.profiles.iter().any(|p| p == "container"),
                ev.container().is_some(),
                "the container profile is listed exactly when there is a container"
            );
        }
    }

    #[test]
    fn a_verdict_makes_the_open_status_known() {
        let mut e = tests_support::secret_open_event();
        assert_eq!(e.status_id, 0);
        let mut o = e.unmapped.secret_file.take().unwrap();
        o.verdict = Some(Verdict::Denied);
        o.rule = Some("r1".into());
        let ev = Event::secret_file_open(
            &origin(),
            SecretFileOpen {
                seq: 1,
                who: e.who(),
                file: e.file.clone().unwrap(),
                key: None,
                secret: o,
                result: OpenResult::Succeeded,
            },
        );
        assert_eq!(ev.status_id, 2, "the verdict decides, not the result");
        assert_eq!(ev.action_id, Some(2));
        assert_eq!(ev.action.as_deref(), Some("Denied"));
        assert!(ev.metadata.profiles.iter().any(|p| p == "security_control"));
        assert!(ev.status_detail.unwrap().contains("EPERM by rule r1"));
        assert!(ev.message.contains("was denied opening"));
    }
}
