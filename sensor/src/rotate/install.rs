//! Putting the new files in place, and the old ones back.
//!
//! Each new file is first *staged* beside the one it replaces, under a
//! hidden name derived from the rotation's id: created `O_EXCL|O_NOFOLLOW`,
//! given the old file's owner and group (mode 0600 for a key, plus group
//! read if the old key had it: Debian's `ssl-cert` group), written and
//! fsynced. Installing keeps the old file as a hard link (the backup) and
//! renames the staged file over it: a reader sees the old file or the new
//! one, never a mix. Rolling back renames the backup over the file.
//! Directories are fsynced after each change.
//!
//! Every step checks digests rather than trusting where it left off, so
//! it can be repeated after a crash (`resume`).

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::{
    journal::{FileSwap, sync_dir},
    plan::{PlannedFile, Role},
};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct InstallError {
    pub path: String,
    pub why: String,
}

fn err(path: &Path, why: impl ToString) -> InstallError {
    InstallError {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The digest of the file at `path` (not following a symbolic link), or
/// `None` when there is none.
pub fn digest_of(path: &Path) -> Option<String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut std::io::BufReader::new(f), &mut buf).ok()?;
    let d = sha256_hex(&buf);
    zeroize::Zeroize::zeroize(&mut buf);
    Some(d)
}

/// `.NAME.kw-TAG-ID` beside `path`.
pub fn beside(path: &Path, tag: &str, id: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.kw-{tag}-{id}"))
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// Writes the new contents of `f` to its staged name, with its owner and
/// the narrowest mode; returns the swap record.
pub fn stage(f: &PlannedFile, body: &[u8], id: &str) -> Result<FileSwap, InstallError> {
    let staged = beside(&f.path, "new", id);
    let backup = beside(&f.path, "old", id);
    let old_sha256 = digest_of(&f.path).ok_or_else(|| err(&f.path, "cannot be read"))?;
    let mode = match f.role {
        Role::Key => 0o600 | (f.mode & 0o040),
        // Certificates are public: as they were, without write or
        // execute for others.
        Role::Certificate | Role::FullChain => f.mode & 0o7644 & !0o7000,
    };
    let _ = std::fs::remove_file(&staged);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(&staged)
        .map_err(|e| err(&staged, e))?;
    let r = (|| {
        std::os::unix::fs::fchown(&file, Some(f.uid), Some(f.gid))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(body)?;
        file.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&staged);
        return Err(err(&staged, e));
    }
    sync_dir(parent(&f.path)).map_err(|e| err(parent(&f.path), e))?;
    Ok(FileSwap {
        path: f.path.clone(),
        staged,
        backup,
        old_sha256,
        new_sha256: sha256_hex(body),
    })
}

/// Keeps the old file and renames the new one over it. Repeatable: a file
/// already swapped is left as it is.
pub fn install(s: &FileSwap) -> Result<(), InstallError> {
    let current = digest_of(&s.path);
    if current.as_deref() == Some(s.new_sha256.as_str()) {
        return Ok(());
    }
    if current.as_deref() != Some(s.old_sha256.as_str()) {
        return Err(err(
            &s.path,
            "changed by someone else since the plan: not replaced",
        ));
    }
    if digest_of(&s.backup).as_deref() != Some(s.old_sha256.as_str()) {
        let _ = std::fs::remove_file(&s.backup);
        std::fs::hard_link(&s.path, &s.backup).map_err(|e| err(&s.backup, e))?;
    }
    if digest_of(&s.staged).as_deref() != Some(s.new_sha256.as_str()) {
        return Err(err(&s.staged, "the staged new file is missing or changed"));
    }
    std::fs::rename(&s.staged, &s.path).map_err(|e| err(&s.path, e))?;
    sync_dir(parent(&s.path)).map_err(|e| err(parent(&s.path), e))
}

/// Puts the old file back. Repeatable.
pub fn restore(s: &FileSwap) -> Result<(), InstallError> {
    let _ = std::fs::remove_file(&s.staged);
    if digest_of(&s.path).as_deref() == Some(s.old_sha256.as_str()) {
        let _ = std::fs::remove_file(&s.backup);
    } else {
        if digest_of(&s.backup).as_deref() != Some(s.old_sha256.as_str()) {
            return Err(err(
                &s.backup,
                "the backup of the old file is missing or changed",
            ));
        }
        std::fs::rename(&s.backup, &s.path).map_err(|e| err(&s.path, e))?;
    }
    sync_dir(parent(&s.path)).map_err(|e| err(parent(&s.path), e))
}

/// Removes the backup (and anything staged) once the rotation holds.
pub fn finish(s: &FileSwap) -> Result<(), InstallError> {
    let _ = std::fs::remove_file(&s.staged);
    match std::fs::remove_file(&s.backup) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(&s.backup, e)),
    }
    sync_dir(parent(&s.path)).map_err(|e| err(parent(&s.path), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn stage_install_restore_keep_owner_and_narrow_the_key_mode() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k.pem");
        std::fs::write(&key, b"old").unwrap();
        // Readable by others: the new key is not.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
        std::os::unix::fs::chown(&key, Some(65534), Some(65534)).unwrap();
        let f = PlannedFile {
            path: key.clone(),
            role: Role::Key,
            uid: 65534,
            gid: 65534,
            mode: 0o604,
        };
        let s = stage(&f, b"new", "t1").unwrap();
        assert_eq!(
            std::fs::read(&key).unwrap(),
            b"old",
            "staging changes nothing"
        );
        let m = std::fs::metadata(&s.staged).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 65534, 0o600));
        install(&s).unwrap();
        install(&s).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new");
        assert_eq!(std::fs::read(&s.backup).unwrap(), b"old");
        restore(&s).unwrap();
        restore(&s).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"old");
        assert!(!s.backup.exists() && !s.staged.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_changed_by_someone_else_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let crt = d.path().join("c.crt");
        std::fs::write(&crt, b"old").unwrap();
        let f = PlannedFile {
            path: crt.clone(),
            role: Role::Certificate,
            uid: 0,
            gid: 0,
            mode: 0o644,
        };
        let s = stage(&f, b"new", "t2").unwrap();
        std::fs::write(&crt, b"theirs").unwrap();
        assert!(install(&s).unwrap_err().why.contains("changed"));
        assert_eq!(std::fs::read(&crt).unwrap(), b"theirs");
        // A symbolic link planted at the staged name is not followed.
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let s2 = beside(&crt, "new", "t3");
        std::os::unix::fs::symlink(&victim, &s2).unwrap();
        std::fs::write(&crt, b"old").unwrap();
        stage(&f, b"new", "t3").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
