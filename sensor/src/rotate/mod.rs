//! `keywarden rotate`: replace a key where it is used, prove that the
//! service now presents the new one, and undo everything when it does not
//! (docs/rotation.md).
//!
//! plan (`plan`) → issue (`issue`, `acme`) → stage, install (`install`) →
//! reload (`reload`) → verify (`verify`) → done, or roll back: restore,
//! reload, verify the old key. Every step is announced in the journal
//! (`journal`) before it is taken; an interrupted rotation is finished or
//! rolled back by the next `keywarden rotate` (`resume`). `together`
//! carries these steps out for one key, or for the keys of one service
//! at once (a bulk run, `bulk`).
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
pub mod together;
pub mod verify;

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::config::Config;
use journal::{Journal, Step};
use plan::Plan;

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

/// Where a rotation reports its steps, one line each, with the key (SPKI
/// SHA-256) the line is about: stdout for one rotation, a line tagged
/// with its key for each of a bulk run's.
pub type Say<'a> = &'a (dyn Fn(&str, &str) + Sync);

/// `Say` to stdout, untagged. A closed stdout (the sensor that started
/// this rotation is gone) loses the line, never the rotation: `println!`
/// would panic halfway through it.
pub fn stdout(_key: &str, line: &str) {
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
    let plan = plan::make(
        entry,
        inventory.keys(),
        &cfg.rotation,
        &plan::Survey::default(),
    )
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

/// `f` of each item, at most `n` at a time, in the items' order.
pub(crate) fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    n: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };
    if n <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<R>>> = Mutex::new(items.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..n.min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    out.lock().expect("results lock")[i] = Some(r);
                }
            });
        }
    });
    out.into_inner()
        .expect("results lock")
        .into_iter()
        .map(|r| r.expect("every item was taken"))
        .collect()
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
    let mut all = together::rotate(
        dir,
        std::slice::from_ref(plan),
        Some(algorithm),
        issuer,
        cfg,
        say,
        1,
    )?;
    Ok(all.pop().expect("one outcome per plan"))
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
        (Some((new, swaps)), _) if rolling_back.is_some() => {
            let mut m = [together::Member::new(j, plan, swaps, new)];
            m[0].fail(
                format!("{} (resumed)", rolling_back.unwrap_or_default()),
                &stdout,
            )?;
            Ok(together::forward(&mut m, cfg, &stdout)?[0])
        }
        (Some((new, swaps)), true) if verified => {
            together::finish(&mut j, &swaps, &new, &plan.spki_sha256, &stdout)
        }
        (Some((new, swaps)), true) => Ok(together::forward(
            &mut [together::Member::new(j, plan, swaps, new)],
            cfg,
            &stdout,
        )?[0]),
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
