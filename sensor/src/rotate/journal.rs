//! The rotation journal: one file per rotation, one JSON line per step,
//! each written and fsynced before the step it announces is taken, so a
//! rotation cut short (SIGKILL, a crash, power) can be finished or undone
//! by the next `keywarden rotate` (`resume`).
//!
//! The directory is created mode 0700 and the files 0600: they name key
//! files and services. They hold no key material: certificates (public)
//! and SHA-256 digests of the files, which say which version of a file is
//! in place without holding it.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::plan::Plan;

/// The digests of one file's two versions, and where the new one is
/// staged and the old one kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSwap {
    pub path: PathBuf,
    pub staged: PathBuf,
    pub backup: PathBuf,
    pub old_sha256: String,
    pub new_sha256: String,
}

/// One step. Recorded before the step is taken, except the results
/// (`Issued`, `Installed`, `Reloaded`, `Verified`, `Done`, `RolledBack`,
/// `RollbackFailed`), recorded once they hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The plan; new files are about to be staged beside the old ones.
    Planned {
        plan: Box<Plan>,
        issuer: String,
    },
    /// The new key and certificate are staged (written, fsynced).
    Issued {
        new_spki_sha256: String,
        new_certificate_pem: String,
        files: Vec<FileSwap>,
    },
    /// About to keep the old files (hard links) and rename the new ones
    /// over them.
    Installing,
    Installed,
    Reloading,
    Reloaded,
    /// Every target presents the new key, every other target what it did.
    Verified {
        detail: Vec<String>,
    },
    /// Backups removed: the rotation is over.
    Done,
    /// About to restore the old files, reload and verify them.
    RollingBack {
        why: String,
    },
    RolledBack {
        detail: Vec<String>,
    },
    /// The old files are back (where they could be) but the old key does
    /// not serve as before: someone must look.
    RollbackFailed {
        why: String,
    },
}

impl Step {
    pub fn name(&self) -> &'static str {
        match self {
            Step::Planned { .. } => "planned",
            Step::Issued { .. } => "issued",
            Step::Installing => "installing",
            Step::Installed => "installed",
            Step::Reloading => "reloading",
            Step::Reloaded => "reloaded",
            Step::Verified { .. } => "verified",
            Step::Done => "done",
            Step::RollingBack { .. } => "rolling_back",
            Step::RolledBack { .. } => "rolled_back",
            Step::RollbackFailed { .. } => "rollback_failed",
        }
    }

    /// Nothing follows it.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Step::Done | Step::RolledBack { .. } | Step::RollbackFailed { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    at_ms: i64,
    #[serde(flatten)]
    step: Step,
}

/// An open journal, appended to.
pub struct Journal {
    pub id: String,
    pub path: PathBuf,
    file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {why}")]
    Io { path: String, why: String },
    #[error("{path}:{line}: not a journal line: {why}")]
    Parse {
        path: String,
        line: usize,
        why: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |e| JournalError::Io {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

/// The journal directory, made 0700 if missing; a symbolic link there is
/// refused (root writes in it).
pub fn dir(path: &Path) -> Result<(), JournalError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(JournalError::Io {
            path: path.display().to_string(),
            why: "not a directory (a symbolic link is refused)".into(),
        }),
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io(path)),
    }
}

/// fsync of a directory, so a rename or create in it survives a crash.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

impl Journal {
    /// A new journal in `dir` for a rotation of `spki`.
    pub fn create(dir: &Path, spki: &str) -> Result<Self, JournalError> {
        let now = crate::keys::inventory::now_ms();
        let mut r = [0u8; 4];
        super::issue::rand_bytes(&mut r);
        let id = format!("{now}-{}-{}", &spki[..12.min(spki.len())], hex::encode(r));
        let path = dir.join(format!("{id}.journal"));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        sync_dir(dir).map_err(io(dir))?;
        Ok(Journal { id, path, file })
    }

    /// Reopens an existing journal to append to it.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let file = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io(path))?;
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Journal {
            id,
            path: path.to_owned(),
            file,
        })
    }

    /// Appends `step` and waits until it is on disk.
    pub fn record(&mut self, step: Step) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(&Line {
            at_ms: crate::keys::inventory::now_ms(),
            step: step.clone(),
        })
        .map_err(|e| JournalError::Io {
            path: self.path.display().to_string(),
            why: e.to_string(),
        })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))?;
        stop_here_for_tests(step.name());
        Ok(())
    }
}

/// Every step of the journal at `path`. A last line cut short by a crash
/// (no newline) was never recorded and is ignored; any other bad line is
/// an error.
pub fn read(path: &Path) -> Result<Vec<Step>, JournalError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    let mut out = Vec::new();
    let mut lines = std::io::BufReader::new(f).split(b'\n').peekable();
    let mut n = 0;
    let bytes = std::fs::metadata(path).map_err(io(path))?.len();
    let mut consumed = 0u64;
    while let Some(l) = lines.next() {
        n += 1;
        let l = l.map_err(io(path))?;
        consumed += l.len() as u64 + 1;
        let torn = lines.peek().is_none() && consumed > bytes;
        match serde_json::from_slice::<Line>(&l) {
            Ok(line) => out.push(line.step),
            Err(_) if torn => break,
            Err(e) => {
                return Err(JournalError::Parse {
                    path: path.display().to_string(),
                    line: n,
                    why: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// The journals in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, JournalError> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "journal"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(dir)(e)),
    };
    v.sort();
    Ok(v)
}

/// Test hook, documented in docs/rotation.md: with
/// `KEYWARDEN_ROTATE_STOP_AFTER=STEP` in its environment, `rotate` stops
/// itself (SIGSTOP) right after recording STEP, so a test can SIGKILL it
/// exactly there. It changes nothing else.
fn stop_here_for_tests(step: &str) {
    if std::env::var_os("KEYWARDEN_ROTATE_STOP_AFTER").is_some_and(|s| s == step) {
        let _ = nix::sys::signal::raise(nix::sys::signal::SIGSTOP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_a_torn_last_line_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::create(d.path(), &"ab".repeat(32)).unwrap();
        j.record(Step::Installing).unwrap();
        j.record(Step::RollingBack { why: "x".into() }).unwrap();
        assert_eq!(
            read(&j.path).unwrap(),
            vec![Step::Installing, Step::RollingBack { why: "x".into() }]
        );
        // A crash in the middle of a write.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&j.path)
            .unwrap()
            .write_all(b"{\"at_ms\":1,\"step\":\"inst")
            .unwrap();
        assert_eq!(read(&j.path).unwrap().len(), 2);
        // A bad line in the middle is an error that names the line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&j.path)
            .unwrap()
            .write_all(b"\n{\"at_ms\":1,\"step\":\"done\"}\n")
            .unwrap();
        let err = read(&j.path).unwrap_err().to_string();
        assert!(err.contains(":3:"), "{err}");
        assert_eq!(list(d.path()).unwrap(), vec![j.path.clone()]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&j.path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
