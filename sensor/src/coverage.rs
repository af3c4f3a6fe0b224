//! Which files on the host carry signing code, and whether the probes see
//! it: the one place that turns a candidate file into an attachment, a
//! "nothing to probe", or an *uncovered* report.
//!
//! Uncovered means the file evidently holds crypto code (see
//! `signing_code::SigningCode::markers`) but no signing function could be
//! located, typically because it is stripped. Those are reported once per
//! file as a warning event, never skipped silently.

use std::sync::{Arc, Mutex};

use crate::{
    discovery::{
        signing_code::{self, FileId, ScanCache, ScanError, SigningCode},
        targets::Candidate,
    },
    probes::Probes,
};

pub enum Coverage {
    /// Its signing code is probed (attached now or earlier).
    Covered,
    /// No crypto code in it.
    Nothing,
    /// Crypto code that cannot be probed; `first` is true the first time
    /// this file is reported.
    Uncovered { reason: String, first: bool },
    /// It could not be read or attached to.
    Failed(String),
}

/// The sensor's own executable: it carries the marker strings it looks
/// for, and never signs.
fn is_self(c: &Candidate) -> bool {
    use std::os::unix::fs::MetadataExt;
    static SELF: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *SELF.get_or_init(|| {
        std::fs::metadata("/proc/self/exe")
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }) == Some((c.dev, c.ino))
}

/// Scans a file (cached) and attaches to its signing code.
pub fn cover(cache: &Mutex<ScanCache>, probes: &Mutex<Probes>, c: &Candidate) -> Coverage {
    if is_self(c) {
        return Coverage::Nothing;
    }
    if probes.lock().expect("probes lock").is_covered(c.dev, c.ino) {
        return Coverage::Covered;
    }
    // Opened once: the identity cached is that of the file read.
    let (file, id) = match signing_code::open(&c.open_path, &c.shown_as) {
        Ok(opened) => opened,
        Err(e) => return Coverage::Failed(e.to_string()),
    };
    let code = match scan_cached(cache, id, &file, c) {
        Ok(code) => code,
        // Not an ELF file (a script, a data file mapped executable): not
        // a place signing code can be.
        Err(ScanError::Parse { .. }) => return Coverage::Nothing,
        // Too large to scan: said once per file, not at every run of it.
        Err(e @ ScanError::Capped { .. }) => {
            let first = cache.lock().expect("scan cache lock").first_report(id);
            return if first {
                Coverage::Failed(e.to_string())
            } else {
                Coverage::Nothing
            };
        }
        Err(e) => return Coverage::Failed(e.to_string()),
    };
    if let Some(why) = code.uncovered_reason() {
        let first = cache.lock().expect("scan cache lock").first_report(id);
        return Coverage::Uncovered {
            reason: format!("{}: {why}", c.shown_as),
            first,
        };
    }
    if !code.can_see_signatures() {
        return Coverage::Nothing;
    }
    match probes.lock().expect("probes lock").attach(c, &code) {
        // Probed, but some of its signing code is not: said as well.
        Ok(_) => match code.partial_reason() {
            Some(why) => {
                let first = cache.lock().expect("scan cache lock").first_report(id);
                Coverage::Uncovered {
                    reason: format!("{}: {why}", c.shown_as),
                    first,
                }
            }
            None => Coverage::Covered,
        },
        Err(e) => Coverage::Failed(format!("{e:#}")),
    }
}

/// Marks `pid` as running Go code when the file `(dev, ino)`, which it
/// runs or maps, is probed Go code (`Probes::mark_go_process`).
pub fn mark_if_go(probes: &Mutex<Probes>, (dev, ino): (u64, u64), pid: u32) {
    let mut probes = probes.lock().expect("probes lock");
    if probes.is_go(dev, ino)
        && let Err(e) = probes.mark_go_process(pid)
    {
        // The probes mark it at its first Go signature, which names the
        // peer its thread last received from.
        tracing::warn!(pid, error = %e, "cannot mark a Go process");
    }
}

fn scan_cached(
    cache: &Mutex<ScanCache>,
    id: FileId,
    file: &std::fs::File,
    c: &Candidate,
) -> Result<Arc<SigningCode>, ScanError> {
    cache
        .lock()
        .expect("scan cache lock")
        .get_or_scan(id, file, &c.shown_as)
}

/// One file of the `keywarden coverage` report.
#[derive(serde::Serialize)]
struct Line {
    path: String,
    /// "covered", "partly_covered", "not_covered" or "unreadable".
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stacks: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    functions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    build_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// `keywarden coverage`: prints what the sensor would cover. Returns
/// false when some file with crypto code is not covered.
pub fn report(
    paths: &[std::path::PathBuf],
    config: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<bool> {
    use crate::discovery::{signing_code::scan, targets};
    use std::os::unix::fs::MetadataExt;
    let candidates: Vec<Candidate> = if paths.is_empty() {
        let cfg = crate::config::Config::load(config)?;
        let mut all = targets::scan_processes().libraries;
        all.extend(targets::scan_dirs(&cfg.library_dirs));
        let mut seen = hashbrown::HashSet::new();
        all.retain(|c| seen.insert((c.dev, c.ino)));
        all
    } else {
        paths
            .iter()
            .map(|p| {
                let md = std::fs::metadata(p)
                    .map_err(|e| anyhow::anyhow!("{}: cannot stat: {e}", p.display()))?;
                Ok(Candidate {
                    shown_as: p.display().to_string(),
                    open_path: p.clone(),
                    pid: None,
                    dev: md.dev(),
                    ino: md.ino(),
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let explicit = !paths.is_empty();
    let mut all_covered = true;
    let (mut covered, mut not_covered) = (0usize, 0usize);
    for c in &candidates {
        let line = match scan(&c.open_path, &c.shown_as) {
            Ok(code) if code.can_see_signatures() => {
                covered += 1;
                let partial = code.partial_reason();
                all_covered &= partial.is_none();
                Line {
                    path: c.shown_as.clone(),
                    status: if partial.is_some() {
                        "partly_covered"
                    } else {
                        "covered"
                    },
                    stacks: code.stacks().iter().map(|s| s.name()).collect(),
                    functions: code.points.iter().map(|p| p.symbol.clone()).collect(),
                    build_id: code.build_id.clone(),
                    reason: partial,
                }
            }
            Ok(code) => match code.uncovered_reason() {
                Some(why) => {
                    not_covered += 1;
                    all_covered = false;
                    Line {
                        path: c.shown_as.clone(),
                        status: "not_covered",
                        stacks: vec![],
                        functions: vec![],
                        build_id: code.build_id.clone(),
                        reason: Some(why),
                    }
                }
                None if explicit => Line {
                    path: c.shown_as.clone(),
                    status: "no_crypto",
                    stacks: vec![],
                    functions: vec![],
                    build_id: code.build_id.clone(),
                    reason: None,
                },
                None => continue,
            },
            Err(e) if explicit => Line {
                path: c.shown_as.clone(),
                status: "unreadable",
                stacks: vec![],
                functions: vec![],
                build_id: None,
                reason: Some(e.to_string()),
            },
            Err(_) => continue,
        };
        if json {
            println!("{}", serde_json::to_string(&line)?);
        } else {
            match line.status {
                "covered" => {
                    let mut fns = line.functions.clone();
                    fns.dedup();
                    println!(
                        "covered      {} [{}] {} function(s), build-id {}",
                        line.path,
                        line.stacks.join("+"),
                        fns.len(),
                        line.build_id.as_deref().unwrap_or("none")
                    )
                }
                "not_covered" => println!(
                    "NOT COVERED  {}: {}",
                    line.path,
                    line.reason.as_deref().unwrap_or_default()
                ),
                other => println!(
                    "{other:<12} {}{}",
                    line.path,
                    line.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            }
        }
    }
    if !json {
        println!(
            "{} file(s) examined: {covered} covered, {not_covered} with crypto code NOT covered",
            candidates.len()
        );
    }
    Ok(all_covered)
}
