//! Verification through the sensor's own view: a running `keywarden run`
//! writes every signature it sees as a `key_use` event to its output file;
//! after the reload, that file must show the service's executable signing
//! with the new key, and, once the drain period is over (old workers
//! finish their connections), no signature with the old key by it, while
//! the new key is still seen signing (so the sensor was watching).
//!
//! Handshakes to the targets are made while waiting, so the service has
//! something to sign. Only events appended after the reload are read.

use std::{
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use keywarden_analyzer::event::{Event, EventCode, KeyStatus};

use super::plan::{self, Target};

/// One `key_use` signature from the events file.
struct Use {
    time_ms: i64,
    exe: String,
    spki: String,
}

/// The size of the events file now: where to start reading after the
/// reload.
pub fn offset(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Opens the events file, refusing one that anyone but its reader could
/// have written: whoever can write it could forge the signatures that
/// decide whether a rotation holds. Not through a symbolic link, a
/// regular file, owned by this user (root), writable by no one else.
fn open_trusted(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let m = f.metadata()?;
    let euid = nix::unistd::geteuid().as_raw();
    if !m.is_file() || m.uid() != euid || m.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "not a regular file of uid {euid}'s that only it can write (uid {}, mode {:o}): \
             whoever can write it could forge what the sensor saw",
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(f)
}

/// Checks before a rotation starts that the events file can be trusted
/// (`open_trusted`).
pub fn check(path: &Path) -> Result<(), String> {
    open_trusted(path)
        .map(drop)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The successful, identified `key_use` events in `path` from `from` on
/// (complete lines only).
fn uses_since(path: &Path, from: u64) -> std::io::Result<Vec<Use>> {
    let mut f = open_trusted(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    // Bounded: a rotation reads seconds of events, not a whole log.
    f.take(256 << 20).read_to_end(&mut buf)?;
    let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok(buf[..end]
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Event>(l).ok())
        .filter(|e| e.metadata.event_code == EventCode::KeyUse && e.status_id == 1)
        .filter_map(|e| {
            let key = e.unmapped.key.as_ref()?;
            if key.status != KeyStatus::Identified {
                return None;
            }
            Some(Use {
                time_ms: e.time,
                exe: e.actor.process.file.as_ref()?.path.clone(),
                spki: key.spki_sha256.clone()?,
            })
        })
        .collect())
}

pub struct Watch<'a> {
    pub events: &'a Path,
    /// `offset` before the reload.
    pub from: u64,
    /// When the reload was sent (ms since the epoch).
    pub reload_ms: i64,
    pub exes: Vec<PathBuf>,
    pub targets: &'a [Target],
    pub drain: Duration,
    pub timeout: Duration,
}

/// For each `(new, old)` key pair: waits for the sensor to see the new
/// key sign in the service, then for the drain period, then checks that
/// the old key no longer signs there. One watch for keys rotated
/// together: they share the reload and the drain. One result per pair.
pub fn verify(w: &Watch<'_>, pairs: &[(&str, &str)]) -> Vec<Result<Vec<String>, String>> {
    let ours = |u: &&Use| w.exes.iter().any(|e| Path::new(&u.exe) == e);
    let handshake = Duration::from_millis(1000);
    let signed_since = |uses: &[Use], new: &str, after_ms: i64| {
        uses.iter()
            .filter(ours)
            .any(|u| u.spki == new && u.time_ms >= after_ms)
    };
    // The events since the reload once every new key has signed after
    // `after_ms`, or at the deadline; each pair is judged on them.
    let wait = |after_ms: i64| -> Result<Vec<Use>, String> {
        let deadline = Instant::now() + w.timeout;
        loop {
            plan::presented(w.targets, handshake);
            let uses =
                uses_since(w.events, w.from).map_err(|e| format!("{}: {e}", w.events.display()))?;
            if pairs
                .iter()
                .all(|(new, _)| signed_since(&uses, new, after_ms))
                || Instant::now() >= deadline
            {
                return Ok(uses);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let unseen = |new: &str, what: &str| {
        format!(
            "the sensor ({}) saw no signature with the new key {new} by the service {what} within {:?}",
            w.events.display(),
            w.timeout
        )
    };
    let after_reload = match wait(w.reload_ms) {
        Ok(u) => u,
        Err(e) => return pairs.iter().map(|_| Err(e.clone())).collect(),
    };
    std::thread::sleep(w.drain);
    let drained_ms = w.reload_ms + w.drain.as_millis() as i64;
    let after_drain = match wait(drained_ms) {
        Ok(u) => u,
        Err(e) => return pairs.iter().map(|_| Err(e.clone())).collect(),
    };
    pairs
        .iter()
        .map(|&(new, old)| {
            if !signed_since(&after_reload, new, w.reload_ms) {
                return Err(unseen(new, "after the reload"));
            }
            if !signed_since(&after_drain, new, drained_ms) {
                return Err(unseen(new, "after the drain period"));
            }
            let late_old: Vec<&Use> = after_drain
                .iter()
                .filter(ours)
                .filter(|u| u.spki == old && u.time_ms >= drained_ms)
                .collect();
            if let Some(u) = late_old.first() {
                return Err(format!(
                    "sensor: {} still signed with the old key {old} {} ms after the reload ({} such signatures after the drain period)",
                    u.exe,
                    u.time_ms - w.reload_ms,
                    late_old.len()
                ));
            }
            Ok(vec![
                format!("sensor: the service signs with the new key {new}"),
                format!(
                    "sensor: no signature with the old key {old} by the service after the drain period ({:?})",
                    w.drain
                ),
            ])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn an_events_file_others_could_write_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let good = d.path().join("events.ndjson");
        std::fs::write(&good, b"").unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(check(&good), Ok(()));
        let open = d.path().join("open.ndjson");
        std::fs::write(&open, b"").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check(&open).unwrap_err();
        assert!(e.contains("could forge"), "{e}");
        let link = d.path().join("link.ndjson");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(check(&link).is_err(), "a link is not followed");
        let nobody = d.path().join("nobody.ndjson");
        std::fs::write(&nobody, b"").unwrap();
        std::os::unix::fs::chown(&nobody, Some(65534), Some(65534)).unwrap();
        assert!(check(&nobody).unwrap_err().contains("uid 65534"));
    }
}
