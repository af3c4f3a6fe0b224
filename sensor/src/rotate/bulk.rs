//! Bulk rotation for a CA incident: `keywarden rotate --keys FILE`,
//! `--issuer DN` or `--all-expiring-before DATE`.
//!
//! The keys are planned first; keys that share a service (its master
//! process) form a group, rotated together (`together::rotate`): every
//! key of the group issued and installed, the service reloaded once, all
//! verified at once, and a key that fails rolled back alone while the
//! rest stay. A reload and a check per key would make a hundred keys of
//! one nginx a hundred reloads. Groups run side by side, `--concurrency`
//! at a time, which also bounds the keys issued at once in a group. Each
//! key keeps its own journal. A progress bar (or, without a terminal, one
//! line per key) shows how far it is; a table of every key ends the run.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::{Issuer, Outcome, plan};
use crate::{config::Config, keys::inventory::KeyEntry};

/// Which keys a bulk run rotates.
#[derive(Debug, Clone)]
pub enum Selection {
    /// One SPKI SHA-256 (or unambiguous prefix) per line; `#` starts a
    /// comment.
    Keys(PathBuf),
    /// Keys with a certificate from this issuer, as `keywarden keys`
    /// prints it.
    Issuer(String),
    /// Keys with a certificate that expires before this time (ms since
    /// the epoch).
    ExpiringBefore(i64),
}

pub struct Args {
    pub selection: Selection,
    pub concurrency: usize,
    pub dry_run: bool,
    pub algorithm: Option<String>,
    pub ca: Option<String>,
    pub inventory: Option<PathBuf>,
}

/// What became of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Result1 {
    Done,
    RolledBack,
    RollbackFailed,
    /// No plan: the key is unknown, serves nowhere, or cannot be reloaded.
    Refused,
    /// The rotation stopped on an error of its own (its journal says where).
    Error,
    /// `--dry-run`: planned only.
    Planned,
}

impl Result1 {
    fn name(&self) -> &'static str {
        match self {
            Result1::Done => "done",
            Result1::RolledBack => "rolled back",
            Result1::RollbackFailed => "ROLLBACK FAILED",
            Result1::Refused => "refused",
            Result1::Error => "error",
            Result1::Planned => "planned",
        }
    }

    /// The exit status it would give alone: 0 done, 1 refused or error,
    /// 2 rolled back, 3 rollback failed.
    fn exit_code(&self) -> u8 {
        match self {
            Result1::Done | Result1::Planned => 0,
            Result1::Refused | Result1::Error => 1,
            Result1::RolledBack => 2,
            Result1::RollbackFailed => 3,
        }
    }
}

/// One row of the closing table.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: String,
    pub result: Result1,
    pub seconds: f64,
    pub services: String,
    pub detail: String,
}

/// Midnight UTC of `YYYY-MM-DD`, in ms since the epoch.
pub fn parse_date(s: &str) -> Result<i64> {
    let bad = || anyhow!("{s:?}: expected a date as YYYY-MM-DD");
    let mut it = s.split('-');
    let (Some(y), Some(m), Some(d), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    if ![y, m, d]
        .iter()
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let (y, m, d): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=12).contains(&m) || !(1..=days_in_month).contains(&d) || !(1970..=9999).contains(&y) {
        return Err(bad());
    }
    // Days from 1970-01-01 (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400_000)
}

/// Largest `--keys` file read.
const KEYS_FILE_MAX: u64 = 1 << 20;

/// The keys `selection` names, in inventory order, and a refused row for
/// each line of a `--keys` file that names none.
pub fn select<'a>(
    keys: &'a [KeyEntry],
    selection: &Selection,
) -> Result<(Vec<&'a KeyEntry>, Vec<Row>)> {
    let mut refused = Vec::new();
    let mut chosen: Vec<&KeyEntry> = Vec::new();
    match selection {
        Selection::Keys(path) => {
            use std::io::Read;
            let mut text = String::new();
            std::fs::File::open(path)
                .map_err(|e| anyhow!("--keys {}: {e}", path.display()))?
                .take(KEYS_FILE_MAX)
                .read_to_string(&mut text)
                .map_err(|e| anyhow!("--keys {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                match plan::entry(keys.iter(), line) {
                    Ok(e) if !chosen.iter().any(|c| c.spki_sha256 == e.spki_sha256) => {
                        chosen.push(e)
                    }
                    Ok(_) => {}
                    Err(e) => refused.push(Row {
                        key: line.chars().take(64).collect(),
                        result: Result1::Refused,
                        seconds: 0.0,
                        services: String::new(),
                        detail: format!("{}:{}: {e}", path.display(), n + 1),
                    }),
                }
            }
        }
        Selection::Issuer(dn) => {
            chosen = keys
                .iter()
                .filter(|k| k.certificates.iter().any(|c| &c.issuer == dn))
                .collect();
        }
        Selection::ExpiringBefore(ms) => {
            chosen = keys
                .iter()
                .filter(|k| k.certificates.iter().any(|c| c.not_after_ms < *ms))
                .collect();
        }
    }
    Ok((chosen, refused))
}

/// Joins keys into groups that share a service: a group is rotated
/// together, groups side by side.
fn groups(plans: Vec<plan::Plan>) -> Vec<Vec<plan::Plan>> {
    let mut out: Vec<(Vec<u32>, Vec<plan::Plan>)> = Vec::new();
    for p in plans {
        let masters: Vec<u32> = p.services.iter().map(|s| s.master).collect();
        let hits: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, (m, _))| m.iter().any(|x| masters.contains(x)))
            .map(|(i, _)| i)
            .collect();
        let mut merged = (masters, vec![p]);
        for i in hits.into_iter().rev() {
            let (m, ps) = out.remove(i);
            merged.0.extend(m);
            let mut ps = ps;
            ps.append(&mut merged.1);
            merged.1 = ps;
        }
        out.push(merged);
    }
    out.into_iter().map(|(_, ps)| ps).collect()
}

fn services_of(p: &plan::Plan) -> String {
    let names: Vec<String> = p
        .services
        .iter()
        .map(|s| {
            format!(
                "{} (pid {})",
                s.exe.file_name().unwrap_or_default().to_string_lossy(),
                s.master
            )
        })
        .collect();
    format!("{}, {} listeners", names.join(" "), p.targets.len())
}

/// `keywarden rotate --keys|--issuer|--all-expiring-before`. Returns the
/// exit status: the worst of the keys'.
pub fn run(cfg: &Config, args: Args) -> Result<u8> {
    let dir = PathBuf::from(&cfg.rotation.journal_dir);
    let _lock = super::lock(&dir)?;
    let resumed = super::resume_all(cfg, &dir)?;
    let (inventory_path, inventory) = super::read_inventory(cfg, args.inventory.as_deref())?;
    let all: Vec<KeyEntry> = inventory.keys().cloned().collect();
    let (chosen, mut rows) = select(&all, &args.selection)?;
    if chosen.is_empty() && rows.is_empty() {
        bail!(
            "no key in {} matches the selection",
            inventory_path.display()
        );
    }
    let mut plans = Vec::new();
    let survey = plan::Survey::default();
    for e in chosen {
        match plan::make(e, all.iter(), &cfg.rotation, &survey) {
            Ok(p) => plans.push(p),
            Err(why) => rows.push(Row {
                key: e.spki_sha256.clone(),
                result: Result1::Refused,
                seconds: 0.0,
                services: String::new(),
                detail: why.to_string(),
            }),
        }
    }
    let groups = groups(plans);
    let total: usize = groups.iter().map(Vec::len).sum();
    println!(
        "{total} keys to rotate in {} groups sharing a service, {} at a time ({} refused)",
        groups.len(),
        args.concurrency,
        rows.len()
    );
    if args.dry_run {
        for p in groups.iter().flatten() {
            rows.push(Row {
                key: p.spki_sha256.clone(),
                result: Result1::Planned,
                seconds: 0.0,
                services: services_of(p),
                detail: format!("{} files", p.files.len()),
            });
        }
        print_table(&rows, Duration::ZERO, args.concurrency);
        return Ok(worst(&rows).max(resumed.exit_code()));
    }
    let issuer = Issuer::from_config(&cfg.rotation, args.ca.as_deref())?;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let ctx = Ctx {
        dir: &dir,
        cfg,
        issuer: &issuer,
        algorithm: args.algorithm.as_deref(),
        all: &all,
        bar: &bar,
        total,
        finished: Mutex::new(0),
        parallel: args.concurrency.clamp(1, 64),
    };
    let done = super::in_parallel(&groups, ctx.parallel, |g| ctx.group(g));
    bar.finish_and_clear();
    rows.extend(done.into_iter().flatten());
    print_table(&rows, started.elapsed(), args.concurrency);
    Ok(worst(&rows).max(resumed.exit_code()))
}

fn worst(rows: &[Row]) -> u8 {
    rows.iter().map(|r| r.result.exit_code()).max().unwrap_or(0)
}

/// What every rotation of a bulk run shares.
struct Ctx<'a> {
    dir: &'a Path,
    cfg: &'a Config,
    issuer: &'a Issuer,
    algorithm: Option<&'a str>,
    all: &'a [KeyEntry],
    bar: &'a ProgressBar,
    total: usize,
    finished: Mutex<usize>,
    /// Keys issued at once within a group.
    parallel: usize,
}

impl Ctx<'_> {
    /// A line above the bar, or on stdout when there is no bar (no
    /// terminal).
    fn line(&self, l: String) {
        if self.bar.is_hidden() {
            println!("{l}");
        } else {
            self.bar.println(l);
        }
    }

    /// Plans the keys of `group` again (the host may have changed while
    /// other groups ran), then rotates them together.
    fn group(&self, group: &[plan::Plan]) -> Vec<Row> {
        let t = Instant::now();
        let survey = plan::Survey::default();
        let mut rows = Vec::new();
        let mut plans = Vec::new();
        for first in group {
            let fresh = plan::entry(self.all.iter(), &first.spki_sha256)
                .and_then(|e| plan::make(e, self.all.iter(), &self.cfg.rotation, &survey));
            match fresh {
                Ok(p) => plans.push(p),
                Err(why) => rows.push(Row {
                    key: first.spki_sha256.clone(),
                    result: Result1::Refused,
                    seconds: t.elapsed().as_secs_f64(),
                    services: services_of(first),
                    detail: why.to_string(),
                }),
            }
        }
        // Why each failed key failed (its `failed:` line), else the last
        // line said of it: a row that is not done shows that.
        let last: Mutex<std::collections::BTreeMap<String, String>> = Mutex::default();
        let say = |key: &str, l: &str| {
            let mut last = last.lock().expect("line lock");
            let cause_known = last.get(key).is_some_and(|w| w.starts_with("failed: "));
            if !cause_known {
                last.insert(key.to_owned(), l.to_owned());
            }
            drop(last);
            let short: String = key.chars().take(16).collect();
            self.line(format!("{short} {l}"));
        };
        let r = super::together::rotate(
            self.dir,
            &plans,
            self.algorithm,
            self.issuer,
            self.cfg,
            &say,
            self.parallel,
        );
        let last = last.into_inner().expect("line lock");
        let seconds = t.elapsed().as_secs_f64();
        for (i, p) in plans.iter().enumerate() {
            let detail = || last.get(&p.spki_sha256).cloned().unwrap_or_default();
            let (result, detail) = match &r {
                Ok(outcomes) => match outcomes[i] {
                    Outcome::Done => (Result1::Done, String::new()),
                    Outcome::RolledBack => (Result1::RolledBack, detail()),
                    Outcome::RollbackFailed => (Result1::RollbackFailed, detail()),
                },
                Err(e) => (Result1::Error, format!("{e:#}")),
            };
            rows.push(Row {
                key: p.spki_sha256.clone(),
                result,
                seconds,
                services: services_of(p),
                detail,
            });
        }
        for row in &rows {
            self.finished(row);
        }
        rows
    }

    /// Counts a key's row and shows it.
    fn finished(&self, row: &Row) {
        let short: String = row.key.chars().take(16).collect();
        let n = {
            let mut f = self.finished.lock().expect("count lock");
            *f += 1;
            *f
        };
        self.bar.inc(1);
        self.bar
            .set_message(format!("{short} {}", row.result.name()));
        if self.bar.is_hidden() {
            println!(
                "[{n}/{}] {short} {} in {:.1} s",
                self.total,
                row.result.name(),
                row.seconds
            );
        }
    }
}

fn print_table(rows: &[Row], took: Duration, concurrency: usize) {
    println!();
    println!(
        "{:<64}  {:<15}  {:>7}  {:<40}  detail",
        "key", "result", "seconds", "service"
    );
    for r in rows {
        println!(
            "{:<64}  {:<15}  {:>7.1}  {:<40}  {}",
            r.key,
            r.result.name(),
            r.seconds,
            r.services,
            r.detail
        );
    }
    let count = |x: Result1| rows.iter().filter(|r| r.result == x).count();
    println!(
        "{} keys: {} done, {} rolled back, {} rollback failed, {} refused, {} errors, {} planned; \
         {:.1} s at concurrency {concurrency}",
        rows.len(),
        count(Result1::Done),
        count(Result1::RolledBack),
        count(Result1::RollbackFailed),
        count(Result1::Refused),
        count(Result1::Error),
        count(Result1::Planned),
        took.as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_midnight_utc_and_bad_ones_say_the_form() {
        assert_eq!(parse_date("1970-01-01").unwrap(), 0);
        assert_eq!(parse_date("2000-03-01").unwrap(), 951_868_800_000);
        assert_eq!(parse_date("2026-12-07").unwrap(), 1_796_601_600_000);
        assert_eq!(parse_date("2024-02-29").unwrap(), 1_709_164_800_000);
        for bad in [
            "2026-13-01",
            "2026-12",
            "26-12-07x",
            "2026-12-07-1",
            "",
            "2026-02-29",
            "2026-02-31",
            "+2026-12-07",
        ] {
            let e = parse_date(bad).unwrap_err();
            assert!(e.to_string().contains("YYYY-MM-DD"), "{bad}: {e}");
        }
    }
}
