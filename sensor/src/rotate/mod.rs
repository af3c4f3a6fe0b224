//! `keywarden rotate`: replace a key where it is used, prove that the
//! service now presents the new one, and undo everything when it does not
//! (docs/rotation.md).
//!
//! plan (`plan`) → issue (`issue`, `acme`) → stage, install (`install`) →
//! reload (`reload`) → verify (`verify`) → done, or roll back: restore,
//! reload, verify the old key. Every step is announced in the journal
//! (`journal`) before it is taken; an interrupted rotation is finished or
//! rolled back by the next `keywarden rotate` (`resume`).
//!
//! One `rotate` runs at a time on a host (a lock in the journal
//! directory), so a resume never races a live rotation.

pub mod acme;
pub mod bulk;
pub mod install;
pub mod issue;
pub mod journal;
pub mod plan;
pub mod reload;
pub mod revoke;
pub mod sensor_view;
pub mod verify;

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{config::Config, keys::material};
use issue::PublicKeyData;
use journal::{FileSwap, Journal, Step};
use plan::{Plan, Role, Target};

/// What `keywarden rotate` ended with; its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rotated and verified, or nothing to do (0).
    Done,
    /// A step failed; the old key serves again (2).
    RolledBack,
    /// A step failed and so did the rollback (3).
    RollbackFailed,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::RolledBack => 2,
            Outcome::RollbackFailed => 3,
        }
    }

    fn worst(self, other: Outcome) -> Outcome {
        if self.exit_code() >= other.exit_code() {
            self
        } else {
            other
        }
    }
}

pub struct Args {
    pub key: Option<String>,
    pub dry_run: bool,
    /// Only finish or roll back interrupted rotations.
    pub resume: bool,
    pub algorithm: Option<String>,
    /// `local` or `acme`, over the configuration's `rotation.issuer`.
    pub ca: Option<String>,
    pub inventory: Option<PathBuf>,
}

/// Where the new certificate comes from.
pub enum Issuer {
    Local(Box<issue::LocalCa>),
    Acme(crate::config::AcmeConfig),
}

impl Issuer {
    fn name(&self) -> &'static str {
        match self {
            Issuer::Local(_) => "local",
            Issuer::Acme(_) => "acme",
        }
    }

    pub fn from_config(cfg: &crate::config::RotationConfig, ca: Option<&str>) -> Result<Self> {
        let which = ca
            .or(cfg.issuer.as_deref())
            .unwrap_or(match (&cfg.local_ca, &cfg.acme) {
                (Some(_), _) => "local",
                (None, Some(_)) => "acme",
                (None, None) => "",
            });
        match which {
            "local" => {
                let c = cfg
                    .local_ca
                    .as_ref()
                    .ok_or_else(|| anyhow!("rotation.local_ca is not configured"))?;
                Ok(Issuer::Local(Box::new(issue::LocalCa::load(c)?)))
            }
            "acme" => {
                Ok(Issuer::Acme(cfg.acme.clone().ok_or_else(|| {
                    anyhow!("rotation.acme is not configured")
                })?))
            }
            "" => bail!("no issuer: configure rotation.local_ca or rotation.acme"),
            other => bail!("issuer {other:?}: expected local or acme"),
        }
    }

    fn issue(
        &self,
        params: &rcgen::CertificateParams,
        key: &rcgen::KeyPair,
    ) -> Result<issue::Issued, issue::IssueError> {
        match self {
            Issuer::Local(ca) => ca.issue(params, key),
            Issuer::Acme(cfg) => acme::issue(cfg, params, key),
        }
    }
}

/// Where a rotation reports its steps, one line each: stdout for one
/// rotation, a line tagged with its key for each of a bulk run's.
pub type Say<'a> = &'a (dyn Fn(&str) + Sync);

/// `Say` to stdout. A closed stdout (the sensor that started this
/// rotation is gone) loses the line, never the rotation: `println!`
/// would panic halfway through it.
pub fn stdout(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Holds the host's rotation lock while alive.
pub struct Lock(#[allow(dead_code)] std::fs::File);

pub fn lock(dir: &Path) -> Result<Lock> {
    journal::dir(dir)?;
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another keywarden rotate or revoke is running (it holds {})",
            path.display()
        );
    }
    Ok(Lock(f))
}

use std::os::unix::fs::OpenOptionsExt;

/// `keywarden rotate`.
pub fn run(cfg: &Config, args: Args) -> Result<Outcome> {
    let dir = PathBuf::from(&cfg.rotation.journal_dir);
    let _lock = lock(&dir)?;
    let mut outcome = resume_all(cfg, &dir)?;
    if args.resume {
        return Ok(outcome);
    }
    let key = args
        .key
        .as_deref()
        .ok_or_else(|| anyhow!("--key SPKI is required (or --resume)"))?;
    let (_, inventory) = read_inventory(cfg, args.inventory.as_deref())?;
    let entry = plan::entry(inventory.keys(), key)?;
    let plan = plan::make(entry, inventory.keys(), &cfg.rotation)
        .map_err(|e| anyhow!("refused to rotate {}: {e}", entry.spki_sha256))?;
    print!("{}", plan.describe());
    let algorithm = args
        .algorithm
        .clone()
        .unwrap_or_else(|| plan.algorithm.clone());
    if args.dry_run {
        let issuer = Issuer::from_config(&cfg.rotation, args.ca.as_deref())
            .map(|i| i.name().to_owned())
            .unwrap_or_else(|e| format!("none ({e})"));
        println!("dry run: a new {algorithm} key from issuer {issuer}; nothing changed");
        return Ok(outcome);
    }
    let issuer = Issuer::from_config(&cfg.rotation, args.ca.as_deref())?;
    let one = rotate(&dir, &plan, &algorithm, &issuer, cfg, &stdout)?;
    outcome = outcome.worst(one);
    Ok(outcome)
}

/// The inventory a rotation plans from: `given` (`--inventory`), or the
/// configuration's; its path too, for messages.
pub fn read_inventory(
    cfg: &Config,
    given: Option<&Path>,
) -> Result<(PathBuf, crate::keys::inventory::Inventory)> {
    let path = given.map_or_else(|| PathBuf::from(&cfg.inventory), Path::to_owned);
    let inventory = crate::keys::inventory::Inventory::read(&path)?
        .ok_or_else(|| anyhow!("{}: no inventory (is the sensor running?)", path.display()))?;
    Ok((path, inventory))
}

/// One rotation of `plan`, journalled in a new journal in `dir`.
pub fn rotate(
    dir: &Path,
    plan: &Plan,
    algorithm: &str,
    issuer: &Issuer,
    cfg: &Config,
    say: Say<'_>,
) -> Result<Outcome> {
    // Before anything changes: a rotation verified by forged events is
    // worse than none.
    if let Some(events) = &cfg.rotation.sensor_events {
        sensor_view::check(Path::new(events)).map_err(|e| anyhow!("rotation.sensor_events {e}"))?;
    }
    let mut j = Journal::create(dir, &plan.spki_sha256)?;
    say(&format!("journal: {}", j.path.display()));
    j.record(Step::Planned {
        plan: Box::new(plan.clone()),
        issuer: issuer.name().into(),
    })?;
    let staged = (|| -> Result<(String, String, Vec<FileSwap>)> {
        let key = issue::new_key(algorithm)?;
        let old_der = pem::parse(&plan.old_certificate_pem)?.into_contents();
        let params = issue::params_like(&old_der, cfg.rotation.validity_days)?;
        let issued = issuer.issue(&params, &key.pair)?;
        let new_spki = material::KeyInfo::from_spki_der(&key.pair.subject_public_key_info())
            .map_err(|e| anyhow!("new key: {e}"))?
            .spki_sha256;
        // Never a key and a certificate that do not match.
        let certified = material::certificate_key(&issued.leaf_der)
            .map_err(|e| anyhow!("issued certificate: {e}"))?
            .spki_sha256;
        if certified != new_spki {
            bail!(
                "the issuer returned a certificate for key {certified}, not the new key {new_spki}"
            );
        }
        let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", issued.leaf_der.clone()));
        let mut swaps = Vec::new();
        for f in &plan.files {
            let body: Vec<u8> = match f.role {
                Role::Key => key.pem.as_bytes().to_vec(),
                Role::Certificate => leaf_pem.as_bytes().to_vec(),
                Role::FullChain => {
                    let mut b = leaf_pem.clone();
                    for c in &issued.chain_pem {
                        b.push_str(c);
                    }
                    b.into_bytes()
                }
            };
            let mut body = zeroize::Zeroizing::new(body);
            match install::stage(f, &body, &j.id) {
                Ok(s) => swaps.push(s),
                Err(e) => {
                    for s in &swaps {
                        let _ = std::fs::remove_file(&s.staged);
                    }
                    return Err(e.into());
                }
            }
            zeroize::Zeroize::zeroize(&mut *body);
        }
        Ok((new_spki, leaf_pem, swaps))
    })();
    let (new_spki, leaf_pem, swaps) = match staged {
        Ok(s) => s,
        Err(e) => {
            let why = format!("issue: {e:#}");
            j.record(Step::RolledBack {
                detail: vec![why.clone(), "nothing was installed".into()],
            })?;
            say(&format!("rolled back: {why}; nothing was installed"));
            return Ok(Outcome::RolledBack);
        }
    };
    say(&format!(
        "issued: new key {new_spki} ({algorithm}) from issuer {}",
        issuer.name()
    ));
    j.record(Step::Issued {
        new_spki_sha256: new_spki.clone(),
        new_certificate_pem: leaf_pem,
        files: swaps.clone(),
    })?;
    forward(&mut j, plan, &swaps, &new_spki, cfg, say)
}

fn verify_timeout(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.rotation.verify_timeout_ms)
}

/// Install, reload, verify; roll back on any failure.
fn forward(
    j: &mut Journal,
    plan: &Plan,
    swaps: &[FileSwap],
    new_spki: &str,
    cfg: &Config,
    say: Say<'_>,
) -> Result<Outcome> {
    j.record(Step::Installing)?;
    for s in swaps {
        if let Err(e) = install::install(s) {
            return rollback(j, plan, swaps, format!("install: {e}"), cfg, say);
        }
    }
    j.record(Step::Installed)?;
    say(&format!("installed: {} files", swaps.len()));
    let events = cfg.rotation.sensor_events.as_ref().map(PathBuf::from);
    let from = events.as_deref().map(sensor_view::offset).unwrap_or(0);
    let reload_ms = crate::keys::inventory::now_ms();
    j.record(Step::Reloading)?;
    for sv in &plan.services {
        if let Err(e) = reload::reload(sv) {
            return rollback(j, plan, swaps, format!("reload: {e}"), cfg, say);
        }
    }
    j.record(Step::Reloaded)?;
    say(&format!("reloaded: {} services", plan.services.len()));
    let expect: Vec<(Target, String)> = plan
        .targets
        .iter()
        .map(|t| (t.clone(), new_spki.to_owned()))
        .chain(plan.others.iter().cloned())
        .collect();
    // The workers that served before the reload: each must stop
    // listening before a handshake is sure to reach a new one.
    let old: Vec<u32> = plan
        .services
        .iter()
        .flat_map(|sv| sv.pids.iter().copied().filter(move |p| *p != sv.master))
        .collect();
    match verify::wait_for(&expect, verify_timeout(cfg), Some(&old)) {
        Ok(detail) => {
            for d in &detail {
                say(&format!("verified: {d}"));
            }
            let mut detail = detail;
            if let Some(events) = &events {
                let watch = sensor_view::Watch {
                    events,
                    from,
                    reload_ms,
                    exes: plan.services.iter().map(|s| s.exe.clone()).collect(),
                    targets: &plan.targets,
                    drain: Duration::from_millis(cfg.rotation.drain_ms),
                    timeout: verify_timeout(cfg),
                };
                match sensor_view::verify(&watch, new_spki, &plan.spki_sha256) {
                    Ok(seen) => {
                        for d in &seen {
                            say(&format!("verified: {d}"));
                        }
                        detail.extend(seen);
                    }
                    Err(e) => return rollback(j, plan, swaps, format!("verify: {e}"), cfg, say),
                }
            }
            j.record(Step::Verified { detail })?;
        }
        Err(bad) => {
            return rollback(
                j,
                plan,
                swaps,
                format!("verify: {}", bad.join("; ")),
                cfg,
                say,
            );
        }
    }
    finish(j, swaps, new_spki, say)
}

fn finish(j: &mut Journal, swaps: &[FileSwap], new_spki: &str, say: Say<'_>) -> Result<Outcome> {
    for s in swaps {
        // The rotation holds; a backup left behind is only untidy.
        if let Err(e) = install::finish(s) {
            tracing::warn!(error = %e, "backup not removed");
        }
    }
    j.record(Step::Done)?;
    say(&format!(
        "done: key {new_spki} serves; journal {}",
        j.path.display()
    ));
    Ok(Outcome::Done)
}

/// Restore the old files, reload, and verify that the old key serves.
fn rollback(
    j: &mut Journal,
    plan: &Plan,
    swaps: &[FileSwap],
    why: String,
    cfg: &Config,
    say: Say<'_>,
) -> Result<Outcome> {
    say(&format!("failed: {why}; rolling back"));
    j.record(Step::RollingBack { why: why.clone() })?;
    let mut problems = Vec::new();
    for s in swaps {
        if let Err(e) = install::restore(s) {
            problems.push(format!("restore: {e}"));
        }
    }
    for sv in &plan.services {
        match reload::reload(sv) {
            Ok(()) => {}
            // A refused configuration test signals nothing: the service
            // never loaded the new files and still serves the old ones,
            // which the verification below checks.
            Err(e @ reload::ReloadError::Refused { .. }) => {
                say(&format!("rollback: {e}; the service was not reloaded"));
            }
            Err(e) => problems.push(format!("reload: {e}")),
        }
    }
    let expect: Vec<(Target, String)> = plan
        .targets
        .iter()
        .map(|t| (t.clone(), plan.spki_sha256.clone()))
        .chain(plan.others.iter().cloned())
        .collect();
    // The workers that served the new key are not known here: the check
    // waits `verify::SETTLE` instead.
    let verified = verify::wait_for(&expect, verify_timeout(cfg), None);
    match (&verified, problems.is_empty()) {
        (Ok(detail), true) => {
            let mut detail = detail.clone();
            detail.insert(0, format!("cause: {why}"));
            for d in &detail[1..] {
                say(&format!("rolled back: {d}"));
            }
            j.record(Step::RolledBack { detail })?;
            say(&format!(
                "rolled back: the old key serves again; journal {}",
                j.path.display()
            ));
            Ok(Outcome::RolledBack)
        }
        _ => {
            if let Err(bad) = verified {
                problems.extend(bad);
            }
            let w = format!("cause: {why}; rollback: {}", problems.join("; "));
            say(&format!("ROLLBACK FAILED: {w}"));
            j.record(Step::RollbackFailed { why: w })?;
            Ok(Outcome::RollbackFailed)
        }
    }
}

/// Finishes or rolls back every rotation whose journal has no final step.
pub fn resume_all(cfg: &Config, dir: &Path) -> Result<Outcome> {
    let mut outcome = Outcome::Done;
    for path in journal::list(dir)? {
        let steps = journal::read(&path)?;
        if steps.last().is_none_or(Step::is_final) {
            continue;
        }
        println!(
            "resuming interrupted rotation {} (last step: {})",
            path.display(),
            steps.last().map(Step::name).unwrap_or("none")
        );
        outcome = outcome.worst(resume(cfg, &path, &steps)?);
    }
    Ok(outcome)
}

/// Before the files were installed, an interrupted rotation is rolled back
/// (the staged files removed: nothing else changed). From `installing` on
/// it is finished: the remaining files installed, the service reloaded and
/// verified, and rolled back if that fails. A rollback in progress is
/// completed.
fn resume(cfg: &Config, path: &Path, steps: &[Step]) -> Result<Outcome> {
    let mut j = Journal::open(path)?;
    let Some(Step::Planned { plan, .. }) = steps.first() else {
        bail!("{}: does not start with a plan", path.display());
    };
    let issued = steps.iter().find_map(|s| match s {
        Step::Issued {
            new_spki_sha256,
            files,
            ..
        } => Some((new_spki_sha256.clone(), files.clone())),
        _ => None,
    });
    let installing = steps.iter().any(|s| matches!(s, Step::Installing));
    let rolling_back = steps.iter().find_map(|s| match s {
        Step::RollingBack { why } => Some(why.clone()),
        _ => None,
    });
    let verified = steps.iter().any(|s| matches!(s, Step::Verified { .. }));
    match (issued, installing) {
        (Some((_, swaps)), _) if rolling_back.is_some() => rollback(
            &mut j,
            plan,
            &swaps,
            format!("{} (resumed)", rolling_back.unwrap_or_default()),
            cfg,
            &stdout,
        ),
        (Some((new, swaps)), true) if verified => finish(&mut j, &swaps, &new, &stdout),
        (Some((new, swaps)), true) => forward(&mut j, plan, &swaps, &new, cfg, &stdout),
        (issued, _) => {
            for f in &plan.files {
                let _ = std::fs::remove_file(install::beside(&f.path, "new", &j.id));
            }
            if let Some((_, swaps)) = issued {
                for s in &swaps {
                    let _ = std::fs::remove_file(&s.staged);
                }
            }
            j.record(Step::RolledBack {
                detail: vec!["interrupted before install: nothing was installed".into()],
            })?;
            println!("rolled back: interrupted before install; nothing was installed");
            Ok(Outcome::RolledBack)
        }
    }
}
