//! Sensor configuration. The default is embedded in the binary
//! (`default-config.yaml`), so `keywarden run` works with no file at all.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = include_str!("../default-config.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NDJSON destination: `-` for stdout, else a file (appended to).
    pub output: String,
    /// How often the sensor drains the ring buffer. Signature records never
    /// wake the sensor (a wakeup per event halves signing throughput).
    /// Values over 250 act as 250: the control thread must see the event
    /// thread move to keep holding (`liveness.rs`).
    pub poll_interval_ms: u64,
    /// Size of the probes' event ring buffer in MiB: a power of two from
    /// 1 to 256. It absorbs signatures between drains; the kernel maps its
    /// pages twice, so it counts twice in the sensor's RSS (not its PSS).
    /// Optional in a configuration file: the embedded default applies.
    #[serde(default = "Config::embedded_ring_buffer_mib")]
    pub ring_buffer_mib: u32,
    /// Stop (SIGSTOP) a process that opens a crypto library the sensor has
    /// not seen in its cgroup, until the library is attached.
    pub hold_new_libraries: bool,
    /// Which kernel hook serves opens (`probes/hooks.rs`, `attach_opens`).
    /// Optional in a configuration file: `auto`.
    #[serde(default)]
    pub open_hook: OpenHook,
    /// Directories and files whose keys and certificates are known from
    /// the start (for processes that loaded their keys before the sensor).
    pub key_paths: Vec<String>,
    /// The places servers keep keys and certificates, scanned at start
    /// like `key_paths` but bounded and quietly, trust stores skipped
    /// (`keys/scan.rs`). Their keys are candidates only. Optional in a
    /// configuration file: the embedded default list applies.
    #[serde(default = "Config::embedded_key_locations")]
    pub key_locations: Vec<String>,
    /// The key inventory (`keys/inventory/`, `keywarden keys`): written
    /// atomically, mode 0600, every 30 s when it changed and at exit; read
    /// at start. Optional in a configuration file: the embedded default
    /// applies.
    #[serde(default = "Config::embedded_inventory")]
    pub inventory: String,
    /// Host directories searched for crypto libraries at start.
    pub library_dirs: Vec<String>,
    /// The directory holding the kubelet's `containers/` and `pods/` log
    /// directories (`/var/log` on a node), which give a container's
    /// Kubernetes names (`enrich/pods.rs`). Optional in a configuration
    /// file: the embedded default applies.
    #[serde(default = "Config::embedded_pods_log_root")]
    pub pods_log_root: String,
    /// Rule files or directories of `*.yaml` rules (docs/rules.md). Empty:
    /// events only, no findings and no enforcement.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Optional in a configuration file: the embedded default list applies.
    #[serde(default = "SecretFiles::embedded_default")]
    pub secret_files: SecretFiles,
    /// Correlation: baselines, GeoIP, the pipeline's shape.
    #[serde(default)]
    pub analyzer: AnalyzerConfig,
    /// Where the Prometheus endpoint listens (`IP:PORT`; `docs/metrics.md`),
    /// or `None`: off, the default. Optional in a configuration file, as a
    /// file written before the endpoint existed has no such key.
    #[serde(default)]
    pub metrics: Option<String>,
    /// How events are written to `output`: NDJSON (the default), one
    /// readable line each (`compact`), or not at all (`none`: Parquet
    /// only). Optional in a configuration file.
    #[serde(default)]
    pub format: crate::sink::Format,
    /// Parquet export (`lake/`), off unless `parquet.dir` is set. Optional
    /// in a configuration file.
    #[serde(default)]
    pub parquet: ParquetConfig,
    /// Key rotation and revocation (`rotate/`, docs/rotation.md). Optional
    /// in a configuration file: with none, `keywarden rotate` has no
    /// issuer and refuses.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// Guard rails of the rule actions `rotate` and `revoke`
    /// (`remediate/`). Optional in a configuration file.
    #[serde(default)]
    pub remediation: RemediationConfig,
    /// The file this configuration was read from (`None`: the embedded
    /// default); a rule's rotation runs `keywarden rotate` with it.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

/// How the sensor sees opens (libraries loading, key files, the watch
/// list). `Tracepoints` exists to compare the two on one kernel
/// (`benches/open_unwatched_guest.sh`), and as a way out should a
/// kernel's fentry misbehave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenHook {
    /// fentry and fexit on `do_sys_openat2` where the kernel allows them,
    /// else the syscall tracepoints.
    #[default]
    Auto,
    /// The syscall tracepoints of `open`, `openat`, `openat2` and `creat`.
    Tracepoints,
}

/// How far rules may go on their own with `rotate` and `revoke`, and how
/// often (docs/rotation.md, "From a rule").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemediationConfig {
    /// The most any rule may do: `dry_run` (plan only), `approve` (record
    /// it for `keywarden actions approve`, the default) or `enforce`. A
    /// rule's own `remediation` can only ask for less.
    pub mode: keywarden_analyzer::remediation::Mode,
    /// After a key was acted on, further firings on it are refused this
    /// long.
    pub cooldown_seconds: u64,
    /// Actions started on this host in any hour, at most.
    pub max_per_hour: u32,
    /// Records of actions awaiting approval: root's, writable by no one
    /// else (checked at start when a rule can need it).
    pub approvals_dir: String,
    /// A `keywarden rotate` or `revoke` started by a rule is stopped after
    /// this long.
    pub timeout_seconds: u64,
}

impl Default for RemediationConfig {
    fn default() -> Self {
        RemediationConfig {
            mode: keywarden_analyzer::remediation::Mode::Approve,
            cooldown_seconds: 3600,
            max_per_hour: 6,
            approvals_dir: "/var/lib/keywarden/actions".into(),
            timeout_seconds: 900,
        }
    }
}

/// Parquet files in the Amazon Security Lake layout (docs/deploy.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetConfig {
    /// The directory the `ext/<source>/region=.../` tree goes under; `None`
    /// is no Parquet export.
    pub dir: Option<String>,
    /// The `region=` partition: the AWS region of the Security Lake the
    /// files are shipped to.
    pub region: String,
    /// The `accountId=` partition: `external` unless set.
    pub account_id: String,
    /// A file is closed after this long open (at most 300).
    pub roll_seconds: u64,
    /// ... or once its rows take this many bytes in memory (at most 256 MiB).
    pub roll_bytes: u64,
}

impl Default for ParquetConfig {
    fn default() -> Self {
        ParquetConfig {
            dir: None,
            region: "us-east-1".into(),
            account_id: "external".into(),
            roll_seconds: 300,
            roll_bytes: 32 << 20,
        }
    }
}

/// Where new certificates come from, how a rotation is journalled,
/// reloaded and verified (docs/rotation.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// One journal per rotation, root only (`rotate/journal.rs`).
    pub journal_dir: String,
    /// `local` or `acme`; without it, whichever of the two is configured
    /// (`local` when both are). `keywarden rotate --ca` overrides it.
    pub issuer: Option<String>,
    pub local_ca: Option<LocalCaConfig>,
    pub acme: Option<AcmeConfig>,
    /// Validity of a certificate the local CA issues.
    pub validity_days: u32,
    /// How long verification by handshake keeps trying after a reload
    /// (new workers take a moment to start) before it fails.
    pub verify_timeout_ms: u64,
    /// Reload commands for services keywarden does not know how to
    /// reload itself (nginx and apache it does), by executable.
    pub reload_commands: Vec<ReloadCommand>,
    /// The running sensor's events file (its `output`): when set, a
    /// rotation is also verified by what the sensor sees sign
    /// (`rotate/sensor_view.rs`). `keywarden rotate --sensor-events`
    /// overrides it.
    pub sensor_events: Option<String>,
    /// How long old workers may go on signing with the old key after the
    /// reload (they finish their connections) before the sensor's view
    /// must show none.
    pub drain_ms: u64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            journal_dir: "/var/lib/keywarden/rotations".into(),
            issuer: None,
            local_ca: None,
            acme: None,
            validity_days: 90,
            verify_timeout_ms: 10_000,
            reload_commands: Vec::new(),
            sensor_events: None,
            drain_ms: 5000,
        }
    }
}

impl ParquetConfig {
    /// Security Lake's limits, and values that become directory names.
    pub fn check(&self) -> Result<()> {
        crate::lake::layout::check_component("region", &self.region).map_err(anyhow::Error::msg)?;
        crate::lake::layout::check_component("account_id", &self.account_id)
            .map_err(anyhow::Error::msg)?;
        if !(1..=300).contains(&self.roll_seconds) {
            anyhow::bail!(
                "parquet.roll_seconds {}: from 1 to 300 (Security Lake wants a file at least every 5 minutes)",
                self.roll_seconds
            );
        }
        if !(1 << 20..=256 << 20).contains(&self.roll_bytes) {
            anyhow::bail!(
                "parquet.roll_bytes {}: from 1 MiB to 256 MiB (Security Lake's row-group limit)",
                self.roll_bytes
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCaConfig {
    /// The CA's private key (PEM; ECDSA P-256/P-384, Ed25519 or RSA).
    pub key: String,
    /// The CA's certificate (PEM).
    pub cert: String,
    /// Where `keywarden revoke` publishes the CA's CRL (PEM), rewritten
    /// atomically with every revocation.
    pub crl: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME directory URL.
    pub directory: String,
    /// A PEM file of roots to trust for the ACME server's own TLS
    /// certificate instead of the system's (a test CA such as pebble).
    #[serde(default)]
    pub root: Option<String>,
    /// The account's credentials (JSON, root only), created on first use.
    pub account: String,
    #[serde(default)]
    pub contact: Vec<String>,
    /// Directory served at `/.well-known/acme-challenge/` for http-01
    /// challenges. Without it no challenge is answered: only a CA that
    /// validates nothing (pebble with `PEBBLE_VA_ALWAYS_VALID=1`) issues.
    #[serde(default)]
    pub http01_webroot: Option<String>,
    /// A URL that reports a certificate's revocation status, with
    /// `{serial}` for its serial in hex (pebble's management interface:
    /// `https://127.0.0.1:15000/cert-status-by-serial/{serial}`), so that
    /// `keywarden revoke` can check at the CA that it took effect.
    #[serde(default)]
    pub revocation_status_url: Option<String>,
}

/// `exe` is reloaded by running `command` (no shell).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadCommand {
    pub exe: String,
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyzerConfig {
    /// Pipeline shards (threads); a key's state lives in exactly one.
    pub shards: usize,
    /// Events each shard's queue (and the output queue) holds before new
    /// ones are written unanalysed, counted and reported as shed. Bounds
    /// the pipeline's memory: an event is ~3 KB in memory, so the default
    /// 4096 holds at most about 36 MB with two shards.
    pub queue: usize,
    /// How long after a key's first use its baseline learns silently.
    pub learning_period_s: u64,
    /// Where baselines persist (written atomically every minute and at
    /// exit).
    pub baselines: String,
    /// GeoLite2/GeoIP2 City or Country database (peer country and city).
    pub geoip_city: Option<String>,
    /// GeoLite2 ASN or GeoIP2 ISP database (peer network).
    pub geoip_asn: Option<String>,
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        AnalyzerConfig {
            shards: 2,
            queue: 4096,
            learning_period_s: 7 * 24 * 3600,
            baselines: "/var/lib/keywarden/baselines.json".into(),
            geoip_city: None,
            geoip_asn: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFiles {
    /// Globs of files whose opens are reported. They compile to at most 16
    /// kernel tests; a `**/name` entry takes two.
    pub watch: Vec<crate::secrets::watch::WatchEntry>,
    /// Opens of one file by one process within this many milliseconds
    /// become one event with a count.
    pub coalesce_ms: u64,
}

impl SecretFiles {
    fn embedded_default() -> Self {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
            .expect("embedded default configuration")
            .secret_files
    }
}

impl Config {
    fn embedded_key_locations() -> Vec<String> {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
            .expect("embedded default configuration")
            .key_locations
    }

    fn embedded_inventory() -> String {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
            .expect("embedded default configuration")
            .inventory
    }

    fn embedded_ring_buffer_mib() -> u32 {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
            .expect("embedded default configuration")
            .ring_buffer_mib
    }

    /// The event ring's size in bytes, or why the configured one is refused.
    pub fn ring_buffer_bytes(&self) -> Result<u32> {
        let mib = self.ring_buffer_mib;
        if !(1..=256).contains(&mib) || !mib.is_power_of_two() {
            anyhow::bail!(
                "ring_buffer_mib: {mib} is not a power of two from 1 to 256 (the kernel wants a power-of-two ring)"
            );
        }
        Ok(mib << 20)
    }

    fn embedded_pods_log_root() -> String {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
            .expect("embedded default configuration")
            .pods_log_root
    }

    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            None => Self::parse(DEFAULT_CONFIG, "<embedded default>"),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read", p.display()))?;
                let mut cfg = Self::parse(&text, &p.display().to_string())?;
                cfg.source = Some(p.to_owned());
                Ok(cfg)
            }
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.output, "-");
        assert!(c.poll_interval_ms > 0);
        assert_eq!(c.ring_buffer_bytes().unwrap(), 8 << 20);
        assert!(c.key_paths.iter().any(|p| p == "/etc/ssl/private"));
        assert!(c.key_locations.iter().any(|p| p == "/etc/kubernetes/pki"));
        assert_eq!(c.inventory, "/var/lib/keywarden/inventory.json");
        assert_eq!(c.pods_log_root, "/var/log");
        assert_eq!(c.secret_files.watch.len(), 7);
        assert_eq!(c.metrics, None, "the metrics endpoint is off by default");
        assert_eq!(c.format, crate::sink::Format::Ndjson);
        assert_eq!(c.parquet.dir, None, "Parquet export is off by default");
        assert_eq!(c.parquet.account_id, "external");
        c.parquet.check().unwrap();
        assert_eq!(c.rotation.journal_dir, "/var/lib/keywarden/rotations");
        assert!(c.rotation.local_ca.is_none() && c.rotation.acme.is_none());
        crate::secrets::watch::WatchList::new(&c.secret_files.watch)
            .expect("default watch list compiles");
    }

    #[test]
    fn a_file_without_secret_files_gets_the_default_list() {
        let text = "output: '-'\npoll_interval_ms: 20\nhold_new_libraries: true\nkey_paths: []\nlibrary_dirs: []\n";
        let c = Config::parse(text, "c.yaml").unwrap();
        assert_eq!(
            c.secret_files.watch.len(),
            Config::load(None).unwrap().secret_files.watch.len()
        );
        assert_eq!(c.key_locations, Config::load(None).unwrap().key_locations);
        assert_eq!(c.metrics, None);
        let c = Config::parse(&format!("{text}metrics: 127.0.0.1:9464\n"), "c.yaml").unwrap();
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(c.inventory, Config::load(None).unwrap().inventory);
        assert_eq!(c.pods_log_root, "/var/log");
        assert_eq!(c.parquet.region, ParquetConfig::default().region);
        let c = Config::parse(
            &format!("{text}format: compact\nparquet:\n  dir: /var/lib/keywarden/lake\n  region: eu-west-1\n  roll_seconds: 60\n"),
            "c.yaml",
        )
        .unwrap();
        assert_eq!(c.format, crate::sink::Format::Compact);
        assert_eq!(c.parquet.dir.as_deref(), Some("/var/lib/keywarden/lake"));
        assert_eq!(
            (c.parquet.region.as_str(), c.parquet.roll_seconds),
            ("eu-west-1", 60)
        );
        assert_eq!(c.parquet.account_id, "external");
        c.parquet.check().unwrap();
    }

    #[test]
    fn parquet_settings_out_of_security_lake_limits_are_refused() {
        let bad = [
            (
                "region",
                ParquetConfig {
                    region: "../etc".into(),
                    ..Default::default()
                },
            ),
            (
                "account_id",
                ParquetConfig {
                    account_id: "a/b".into(),
                    ..Default::default()
                },
            ),
            (
                "roll_seconds",
                ParquetConfig {
                    roll_seconds: 301,
                    ..Default::default()
                },
            ),
            (
                "roll_seconds",
                ParquetConfig {
                    roll_seconds: 0,
                    ..Default::default()
                },
            ),
            (
                "roll_bytes",
                ParquetConfig {
                    roll_bytes: 257 << 20,
                    ..Default::default()
                },
            ),
        ];
        for (what, cfg) in bad {
            let err = cfg.check().unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn a_ring_size_that_is_no_power_of_two_is_refused() {
        let base = "output: '-'\npoll_interval_ms: 20\nhold_new_libraries: true\nkey_paths: []\nlibrary_dirs: []\n";
        for (mib, ok) in [
            (1, true),
            (64, true),
            (256, true),
            (0, false),
            (3, false),
            (512, false),
        ] {
            let c = Config::parse(&format!("{base}ring_buffer_mib: {mib}\n"), "c.yaml").unwrap();
            let got = c.ring_buffer_bytes();
            assert_eq!(got.is_ok(), ok, "{mib}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().starts_with("ring_buffer_mib: "), "{e}");
            }
        }
    }

    #[test]
    fn unknown_fields_and_bad_types_name_the_place() {
        let err = Config::parse("output: '-'\npoll_interval_ms: soon\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.yaml: "), "{err}");
        assert!(err.contains("2"), "line number expected: {err}");
        let text = DEFAULT_CONFIG.to_owned() + "\nbogus: 1\n";
        let err = Config::parse(&text, "c.yaml").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
