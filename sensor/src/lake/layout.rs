//! Where the Parquet files go: the Amazon Security Lake layout under the
//! configured directory, reached without following a symlink.
//!
//! `DIR/ext/<source>/region=<region>/accountId=<account>/eventDay=<YYYYMMDD>/`
//! holds the files of one source (one OCSF class) and one event day.
//!
//! The sensor runs as root and `DIR` may sit where others can write (a
//! path under `/tmp`, a shared volume). Each directory below `DIR`, and
//! `DIR`'s last component, is therefore created with mode 0700 and opened
//! relative to its parent's descriptor with `O_NOFOLLOW`: a symlink planted
//! anywhere in the tree fails the open instead of sending root's writes
//! elsewhere. A directory that exists already must be owned by the sensor's
//! user and writable by no one else; one that is not (someone else made it,
//! and could rename or replace the files in it) is refused with its path.
//! Files are created in those directories with `O_EXCL | O_NOFOLLOW`, mode
//! 0600.
//!
//! One sensor writes a directory at a time: it holds an exclusive `flock`
//! on `DIR/.keywarden.lock` while it runs, so the temporary files it finds
//! at start (`recover`) are no other live sensor's.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg, OFlag, openat},
    sys::stat::{Mode, fstat, mkdirat},
    unistd::geteuid,
};

/// The name of the lock file in `DIR`.
const LOCK_FILE: &str = ".keywarden.lock";

/// Security Lake's limit on a custom source's name.
#[cfg(test)]
pub const SOURCE_NAME_MAX: usize = 20;

/// The Security Lake source of an OCSF class: one per class, at most 20
/// characters. Classes the model does not have today get a name from
/// their number, so a new one is still written somewhere sensible.
pub fn source_name(class_uid: u32) -> String {
    use keywarden_analyzer::event::class;
    match class_uid {
        class::MODULE_ACTIVITY => "kw_module_activity".into(),
        class::FILE_SYSTEM_ACTIVITY => "kw_file_activity".into(),
        class::EVENT_LOG_ACTIVITY => "kw_event_log".into(),
        class::DETECTION_FINDING => "kw_detection_finding".into(),
        class::REMEDIATION_ACTIVITY => "kw_remediation".into(),
        other => format!("kw_class_{other}"),
    }
}

/// The UTC day of a time in milliseconds since the epoch, as `YYYYMMDD`.
pub fn event_day(time_ms: i64) -> String {
    let days = time_ms.div_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}")
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a
/// day count since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A value that becomes one path component (`region=...`): letters,
/// digits, `-` and `_`, 1 to 64 of them. Checked when the configuration is
/// read, so no value can climb out of the tree or hide a separator.
pub fn check_component(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "parquet.{what} {v:?}: use 1 to 64 letters, digits, '-' or '_' (it becomes a directory name)"
        ))
    }
}

/// The directory `DIR`, open, and locked for this sensor.
pub struct Root {
    pub fd: OwnedFd,
    pub path: PathBuf,
    _lock: Flock<File>,
}

impl Root {
    /// Creates `dir` if it is missing (mode 0700), opens it without
    /// following a symlink in its last component, checks who owns it and
    /// takes its lock.
    pub fn open(dir: &Path) -> io::Result<Root> {
        match nix::unistd::mkdir(dir, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(with_path(e.into(), dir, "cannot create the directory")),
        }
        let fd = nix::fcntl::open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            with_path(
                e.into(),
                dir,
                "cannot open the directory (a symlink is refused)",
            )
        })?;
        check_owned(&fd, dir)?;
        let lock = openat(
            &fd,
            LOCK_FILE,
            OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(|e| with_path(e.into(), &dir.join(LOCK_FILE), "cannot open the lock file"))?;
        let lock =
            Flock::lock(File::from(lock), FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
                with_path(
                    e.into(),
                    dir,
                    "another keywarden sensor writes Parquet files here",
                )
            })?;
        Ok(Root {
            fd,
            path: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The directory of one source, region, account and day, created as
    /// needed, each level opened relative to the one above.
    pub fn partition(
        &self,
        source: &str,
        region: &str,
        account: &str,
        day: &str,
    ) -> io::Result<(OwnedFd, PathBuf)> {
        let mut fd = subdir(&self.fd, &self.path, "ext", true)?;
        let mut path = self.path.join("ext");
        for name in [
            source.to_owned(),
            format!("region={region}"),
            format!("accountId={account}"),
            format!("eventDay={day}"),
        ] {
            path.push(&name);
            fd = subdir(&fd, &path, &name, true)?;
        }
        Ok((fd, path))
    }
}

/// `name` under `parent` (whose path is `path`'s parent), created with
/// mode 0700 when `create` and missing, opened without following a
/// symlink, and checked like `DIR`.
pub fn subdir(parent: &OwnedFd, path: &Path, name: &str, create: bool) -> io::Result<OwnedFd> {
    let path = if path.ends_with(name) {
        path.to_owned()
    } else {
        path.join(name)
    };
    if create {
        match mkdirat(parent, name, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(with_path(e.into(), &path, "cannot create the directory")),
        }
    }
    let fd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        with_path(
            e.into(),
            &path,
            "cannot open the directory (a symlink is refused)",
        )
    })?;
    check_owned(&fd, &path)?;
    Ok(fd)
}

/// A directory the sensor writes in must be its own and writable by no
/// one else: another user who could write it could rename, replace or
/// remove the files in it.
fn check_owned(fd: &impl AsFd, path: &Path) -> io::Result<()> {
    let st = fstat(fd).map_err(|e| with_path(e.into(), path, "cannot stat"))?;
    let euid = geteuid().as_raw();
    if st.st_uid != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: owned by uid {}, not by the sensor's uid {euid}: refusing to write Parquet files there",
                path.display(),
                st.st_uid
            ),
        ));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: writable by group or others (mode {:o}): refusing to write Parquet files there",
                path.display(),
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

fn with_path(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_days_are_utc_calendar_days() {
        assert_eq!(event_day(0), "19700101");
        assert_eq!(event_day(86_400_000 - 1), "19700101");
        assert_eq!(event_day(86_400_000), "19700102");
        // 2024-02-29T23:59:59.999Z and the next millisecond.
        assert_eq!(event_day(1_709_251_199_999), "20240229");
        assert_eq!(event_day(1_709_251_200_000), "20240301");
        assert_eq!(event_day(1_764_000_000_123), "20251124");
        assert_eq!(event_day(-1), "19691231");
    }

    #[test]
    fn sources_are_one_per_class_and_short() {
        use keywarden_analyzer::event::class;
        let names: Vec<String> = [
            class::MODULE_ACTIVITY,
            class::FILE_SYSTEM_ACTIVITY,
            class::EVENT_LOG_ACTIVITY,
            class::DETECTION_FINDING,
            class::REMEDIATION_ACTIVITY,
            u32::MAX,
        ]
        .into_iter()
        .map(source_name)
        .collect();
        for n in &names {
            assert!(n.len() <= SOURCE_NAME_MAX, "{n}");
            check_component("source", n).unwrap();
        }
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn path_components_cannot_climb_or_split() {
        for bad in [
            "",
            "..",
            "a/b",
            "eu-west-1/../x",
            "a b",
            "x\n",
            &"a".repeat(65),
        ] {
            assert!(check_component("region", bad).is_err(), "{bad:?}");
        }
        check_component("region", "eu-west-1").unwrap();
        check_component("account_id", "external").unwrap();
        check_component("account_id", "123456789012").unwrap();
    }

    #[test]
    fn the_tree_is_private_and_symlinks_in_it_are_refused() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("lake");
        let root = Root::open(&dir).unwrap();
        let (_, p) = root
            .partition("kw_module_activity", "eu-west-1", "external", "20251124")
            .unwrap();
        assert_eq!(
            p,
            dir.join(
                "ext/kw_module_activity/region=eu-west-1/accountId=external/eventDay=20251124"
            )
        );
        for d in [&dir, &dir.join("ext"), &p] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // A second sensor on the same directory is refused while the first
        // holds it.
        let err = Root::open(&dir).err().expect("locked").to_string();
        assert!(err.contains("another keywarden sensor"), "{err}");
        // A symlink planted where a directory goes is not followed.
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        symlink(&elsewhere, dir.join("ext/kw_file_activity")).unwrap();
        let err = root
            .partition("kw_file_activity", "eu-west-1", "external", "20251124")
            .expect_err("a symlink refused")
            .to_string();
        assert!(err.contains("kw_file_activity"), "{err}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        // A directory others can write is refused.
        let open = dir.join("ext/kw_detection_finding");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = root
            .partition("kw_detection_finding", "eu-west-1", "external", "20251124")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        // So is a DIR that is itself a symlink.
        drop(root);
        let link = t.path().join("link");
        symlink(&dir, &link).unwrap();
        assert!(Root::open(&link).is_err());
    }
}
