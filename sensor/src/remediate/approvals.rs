//! Actions waiting for an operator (`remediation: approve`): one JSON
//! record per action in `remediation.approvals_dir`, which
//! `keywarden actions list|approve|reject` reads and changes, and the
//! running sensor watches for approved records to carry out.
//!
//! A record decides that a key is replaced on this host, so only root may
//! have written it: the directory must belong to root and be writable by
//! no one else, and a record must be a regular file of root's (never a
//! symbolic link) or it is ignored, with a warning. Records are written
//! atomically (`atomic_file`), mode 0600.

use std::{
    io::Read,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::Step;

/// Where an action is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    /// Approved by an operator; the sensor carries it out.
    Approved,
    Running,
    Done,
    Failed,
    Rejected,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub created_ms: i64,
    pub state: State,
    pub spki: String,
    pub rule: String,
    pub finding_uid: String,
    pub steps: Vec<Step>,
    /// What the last step said, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The guard rails' admissions file (`guard.rs`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Admissions {
    admitted: Vec<(String, i64)>,
}

/// Largest record read: a record is a few hundred bytes.
const RECORD_MAX: u64 = 64 * 1024;
/// Largest admissions file read: an hour's and a cooldown's admissions,
/// about 90 bytes each.
const ADMISSIONS_MAX: u64 = 8 << 20;

/// An id is safe as a file name: digits, lower-case hex and `-`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store at `dir`, created (0700) if missing; refused if anyone
    /// but root could write there.
    pub fn open(dir: &Path) -> Result<Self> {
        match std::fs::symlink_metadata(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("remediation.approvals_dir {}", dir.display()))?;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("remediation.approvals_dir {}", dir.display()));
            }
        }
        let m = std::fs::symlink_metadata(dir)
            .with_context(|| format!("remediation.approvals_dir {}", dir.display()))?;
        let euid = nix::unistd::geteuid().as_raw();
        if !m.is_dir() {
            bail!(
                "remediation.approvals_dir {}: not a directory (a symbolic link is refused)",
                dir.display()
            );
        }
        if m.uid() != euid || m.mode() & 0o022 != 0 {
            bail!(
                "remediation.approvals_dir {}: owned by uid {} with mode {:o}; it must be owned by \
                 uid {euid} and writable by no one else, since a record there replaces keys",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            );
        }
        Ok(Store {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn write(&self, r: &Record) -> Result<()> {
        if !valid_id(&r.id) {
            bail!("action id {:?} is not valid", r.id);
        }
        let body = serde_json::to_vec_pretty(r)?;
        keywarden_analyzer::atomic_file::write(&self.path(&r.id), &body, 0o600)
            .with_context(|| format!("{}: cannot write", self.path(&r.id).display()))
    }

    /// `path`, read without following a link, and only if root wrote it.
    fn read_ours(path: &Path, max: u64) -> Result<Vec<u8>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let m = f.metadata()?;
        let euid = nix::unistd::geteuid().as_raw();
        if !m.is_file() || m.uid() != euid || m.nlink() != 1 || m.mode() & 0o022 != 0 {
            bail!(
                "{}: not a regular file of uid {euid}'s, or writable by others: ignored",
                path.display()
            );
        }
        let mut body = Vec::new();
        f.take(max).read_to_end(&mut body)?;
        Ok(body)
    }

    /// The record `id`, read without following a link, and only if root
    /// wrote it.
    pub fn read(&self, id: &str) -> Result<Record> {
        if !valid_id(id) {
            bail!("{id:?} is not an action id (digits, a-f and -)");
        }
        let path = self.path(id);
        let body = Self::read_ours(&path, RECORD_MAX)?;
        let r: Record = serde_json::from_slice(&body)
            .with_context(|| format!("{}: not an action record", path.display()))?;
        if r.id != id {
            bail!("{}: holds action {:?}", path.display(), r.id);
        }
        if r.steps.is_empty() {
            bail!("{}: an action with no step", path.display());
        }
        Ok(r)
    }

    /// Where the guard rails' admissions are kept (not a record: its
    /// name is not an id).
    fn admissions_path(&self) -> PathBuf {
        self.dir.join("guard-admissions.json")
    }

    /// Saves the guard rails' admissions: (key, ms since the epoch).
    pub fn save_admissions(&self, admitted: &[(String, i64)]) -> Result<()> {
        let body = serde_json::to_vec(&Admissions {
            admitted: admitted.to_vec(),
        })?;
        let path = self.admissions_path();
        keywarden_analyzer::atomic_file::write(&path, &body, 0o600)
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    /// The admissions an earlier run saved; none when there is no file.
    pub fn load_admissions(&self) -> Result<Vec<(String, i64)>> {
        let path = self.admissions_path();
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(Vec::new());
        }
        let body = Self::read_ours(&path, ADMISSIONS_MAX)?;
        let a: Admissions = serde_json::from_slice(&body)
            .with_context(|| format!("{}: not the guard rails' admissions", path.display()))?;
        Ok(a.admitted)
    }

    /// Every record, oldest first; what cannot be read is returned as an
    /// error beside the others.
    pub fn list(&self) -> Result<(Vec<Record>, Vec<String>)> {
        let mut records = Vec::new();
        let mut errors = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("{}: cannot list", self.dir.display()))?
        {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !valid_id(id) {
                continue;
            }
            match self.read(id) {
                Ok(r) => records.push(r),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        records.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok((records, errors))
    }

    /// Moves `id` from `from` to `to`; says what it is when it is not in
    /// `from`.
    pub fn transition(&self, id: &str, from: State, to: State) -> Result<Record> {
        let mut r = self.read(id)?;
        if r.state != from {
            return Err(anyhow!("action {id} is {:?}, not {:?}", r.state, from));
        }
        r.state = to;
        self.write(&r)?;
        Ok(r)
    }
}

/// `keywarden actions list`.
pub fn print_list(store: &Store) -> Result<()> {
    let (records, errors) = store.list()?;
    for e in errors {
        eprintln!("keywarden: {e}");
    }
    if records.is_empty() {
        println!("no actions");
    }
    for r in records {
        let steps: Vec<&str> = r.steps.iter().map(|s| s.kind.name()).collect();
        println!(
            "{}  {:<9} {}  key {}  rule {}  finding {}{}",
            r.id,
            format!("{:?}", r.state).to_lowercase(),
            steps.join("+"),
            r.spki,
            r.rule,
            r.finding_uid,
            r.detail.map(|d| format!("  ({d})")).unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::remediate::StepKind;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            created_ms: 1,
            state: State::Pending,
            spki: "ab".repeat(32),
            rule: "r".into(),
            finding_uid: "f-1".into(),
            steps: vec![Step {
                kind: StepKind::Rotate,
                reason: None,
            }],
            detail: None,
        }
    }

    #[test]
    fn records_round_trip_and_move_only_from_the_state_named() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("actions");
        let s = Store::open(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        s.write(&record("1-ab")).unwrap();
        let mode = std::fs::metadata(dir.join("1-ab.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(s.read("1-ab").unwrap(), record("1-ab"));
        let r = s
            .transition("1-ab", State::Pending, State::Approved)
            .unwrap();
        assert_eq!(r.state, State::Approved);
        let e = s
            .transition("1-ab", State::Pending, State::Approved)
            .unwrap_err();
        assert!(e.to_string().contains("is Approved, not Pending"), "{e}");
        let (all, errors) = s.list().unwrap();
        assert_eq!((all.len(), errors.len()), (1, 0));
    }

    #[test]
    fn ids_that_are_not_file_names_of_ours_are_refused() {
        for bad in ["", "../x", "a/b", "ABC", "1.json", &"1".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(s.read("../../etc/passwd").is_err());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Store::open(d.path()).err().expect("refused");
        assert!(e.to_string().contains("writable by no one else"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink("/", &link).unwrap();
        let e = Store::open(&link).err().expect("refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_record_that_is_a_link_or_names_another_id_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.write(&record("1-aa")).unwrap();
        std::os::unix::fs::symlink(d.path().join("1-aa.json"), d.path().join("2-bb.json")).unwrap();
        assert!(s.read("2-bb").is_err());
        std::fs::copy(d.path().join("1-aa.json"), d.path().join("3-cc.json")).unwrap();
        let e = s.read("3-cc").unwrap_err();
        assert!(e.to_string().contains("holds action"), "{e}");
        let (all, errors) = s.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    /// The guard rails' admissions round-trip, and a file another user
    /// owns, or a link, is refused, never taken as the rails' state (an
    /// empty one would lift them). Not listed as a record either.
    #[test]
    fn admissions_round_trip_and_others_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.load_admissions().unwrap(), vec![]);
        let saved = vec![("aa".to_owned(), 1_000), ("bb".to_owned(), 2_000)];
        s.save_admissions(&saved).unwrap();
        assert_eq!(s.load_admissions().unwrap(), saved);
        let path = d.path().join("guard-admissions.json");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(s.list().unwrap(), (vec![], vec![]));
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let e = s.load_admissions().unwrap_err();
        assert!(e.to_string().contains("not a regular file of uid"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let elsewhere = d.path().join("elsewhere.json");
        std::fs::write(&elsewhere, br#"{"admitted":[]}"#).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(s.load_admissions().is_err(), "a link is not followed");
    }
}
