//! What the sensor does once, before `ready`: attach to every crypto
//! library in running processes and library directories, read the key
//! files the configuration names, and scan the places servers keep keys.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use keywarden_analyzer::event;
use tracing::{debug, info, warn};

use super::emitter::Emitter;
use crate::{
    coverage::{Coverage, cover},
    discovery::{
        signing_code::ScanCache,
        targets::{self, Candidate},
    },
    enforce::decisions::Decisions,
    enrich::process::cgroup2_root,
    keys::{
        identify::{Identifier, Source},
        material, scan,
    },
    probes::Probes,
};

/// Attaches to every crypto library in running processes and on the host.
/// Returns the files found with crypto code the probes cannot see.
pub fn discover(
    library_dirs: &[String],
    cache: &Arc<Mutex<ScanCache>>,
    probes: &Arc<Mutex<Probes>>,
    out: &mut Emitter,
) -> Vec<String> {
    let started = Instant::now();
    let scan = targets::scan_processes();
    debug!(elapsed = ?started.elapsed(), libraries = scan.libraries.len(), "scanned processes");
    for (pid, why) in &scan.unreadable {
        out.warn(
            Some(event::Process {
                pid: *pid,
                ..Default::default()
            }),
            None,
            format!("cannot read /proc/{pid}/maps: {why}; its libraries are not covered"),
        );
    }
    let mut all: Vec<Candidate> = scan.libraries;
    all.extend(targets::scan_dirs(library_dirs));
    debug!(elapsed = ?started.elapsed(), candidates = all.len(), "scanned library directories");
    let mut uncovered = Vec::new();
    for c in &all {
        match cover(cache, probes, c) {
            Coverage::Uncovered { reason, first } => {
                if first {
                    out.warn(None, Some(event::File::regular(&c.shown_as)), reason);
                }
                uncovered.push(c.shown_as.clone());
            }
            // A library named like libcrypto that cannot be covered is
            // worth a warning; any other unreadable mapping is not.
            Coverage::Failed(why) if targets::is_crypto_library(&c.shown_as) => {
                out.warn(None, Some(event::File::regular(&c.shown_as)), why);
                uncovered.push(c.shown_as.clone());
            }
            Coverage::Failed(why) => debug!("{why}"),
            _ => {}
        }
    }
    let scans = cache.lock().expect("scan cache lock").scans;
    debug!(elapsed = ?started.elapsed(), files = all.len(), scans, "attached");
    mark_seen(&all, probes);
    mark_go_processes(probes);
    uncovered
}

/// Every running process whose program is probed Go code, not only the
/// one each file was found through.
fn mark_go_processes(probes: &Mutex<Probes>) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        if let Ok(md) = std::fs::metadata(format!("/proc/{pid}/exe")) {
            crate::coverage::mark_if_go(probes, (md.dev(), md.ino()), pid);
        }
    }
}

/// Files of processes already running were looked at: opening or
/// executing them again in the same cgroup needs no hold.
fn mark_seen(all: &[Candidate], probes: &Mutex<Probes>) {
    let Some(root) = cgroup2_root() else { return };
    for c in all {
        let Some(pid) = c.pid else { continue };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            });
        if let Some(cg) = cg
            && let Ok(md) = std::fs::metadata(root.join(cg.trim_start_matches('/')))
            && let Ok(file) = std::fs::metadata(&c.open_path)
            && let Err(e) = probes.lock().expect("probes lock").mark_library_seen(
                md.ino(),
                &c.shown_as,
                &crate::probes::file_id(&file),
            )
        {
            // Only costs a hold the next time this file is opened there.
            debug!(file = %c.shown_as, error = %e, "marking a library seen");
        }
    }
}

/// Scans the places servers keep keys (`key_locations`, `keys::scan`):
/// their keys join the inventory, as candidates only, and their
/// certificates the key inventory (a directory of certificates names keys
/// whose key files are elsewhere, or nowhere the sensor looks).
pub fn scan_key_locations(locations: &[String], ident: &mut Identifier) {
    let started = Instant::now();
    let found = scan::scan(locations);
    for skipped in &found.skipped {
        debug!("key_locations: skipped {skipped}");
    }
    let mut keys = 0;
    for (path, file) in found.files {
        for key in file.keys {
            keys += 1;
            ident.add_inventory(key, &path);
        }
        ident.add_certificates(&file.certificates, &Source::File(path));
    }
    if let Some(bound) = found.truncated {
        warn!(
            "key_locations: the scan stopped at its bound on {bound}; keys in the files it did not reach are found only by other means"
        );
    }
    info!(
        files = found.read,
        keys,
        skipped = found.skipped.len(),
        elapsed = ?started.elapsed(),
        "key_locations scanned"
    );
}

/// Reads every key file under the configured `key_paths`: their keys join
/// the inventory (their certificates the key inventory), and protected ones
/// make their file names held.
pub fn load_key_paths(paths: &[String], ident: &mut Identifier, decisions: &mut Decisions) {
    fn walk(p: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if let Ok(md) = std::fs::metadata(p) {
            if md.is_file() {
                out.push(p.to_owned());
            } else if md.is_dir() && depth < 4 {
                for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                    walk(&e.path(), depth + 1, out);
                }
            }
        }
    }
    for root in paths {
        let mut files = Vec::new();
        walk(Path::new(root), 0, &mut files);
        for f in files {
            if f.metadata()
                .map(|m| m.len() > material::MAX_KEY_FILE)
                .unwrap_or(true)
            {
                continue;
            }
            let shown = f.to_string_lossy().into_owned();
            match material::read_key_file_detailed(&f, &shown) {
                Ok(k) if k.keys.is_empty() && k.has_private_key => warn!(
                    file = %shown,
                    "key_paths: encrypted private key; signatures made with it are reported as unknown"
                ),
                Ok(k) => {
                    decisions.protect_file(&shown, &k);
                    for key in k.keys {
                        ident.add_inventory(key, &shown);
                    }
                    ident.add_certificates(&k.certificates, &Source::File(shown));
                }
                // Named like a key but unusable: say why.
                Err(e) if material::looks_like_key_file(&shown) => warn!("key_paths: {e}"),
                Err(e) => debug!("key_paths: {e}"),
            }
        }
    }
}
