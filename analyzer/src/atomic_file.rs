//! Writing a file so that no reader ever sees half of it, and no one who
//! can write to its directory can redirect the write.
//!
//! The sensor runs as root and writes into directories other users may be
//! able to write (a baseline under `/var/lib`, a configured path). A fixed
//! temporary name (`file.tmp.<pid>`) lets such a user plant a symlink there
//! and have root truncate any file on the host. So the temporary file gets
//! an unpredictable name and is created with `O_EXCL | O_NOFOLLOW` (a
//! planted name fails the create instead of being followed), is written and
//! fsynced, and is then renamed over the target, which replaces a symlink
//! at the target rather than writing through it.

use std::{
    hash::{BuildHasher, Hasher},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// Attempts before giving up when random names collide (only an attacker
/// who planted that exact name could make one collide).
const ATTEMPTS: usize = 16;

/// A name beside `path` that no other process can predict.
fn temporary_name(path: &Path) -> PathBuf {
    // RandomState is seeded from the OS's random source once per process
    // and advanced per instance: good enough to be unguessable here.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{:016x}.tmp", h.finish()))
}

/// Writes `body` to `path` atomically, with permission bits `mode`.
pub fn write(path: &Path, body: &[u8], mode: u32) -> std::io::Result<()> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let tmp = temporary_name(path);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(mode)
            .open(&tmp);
        let mut f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let result = (|| {
            f.write_all(body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return result;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name could be created")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn writes_whole_file_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        write(&p, b"one", 0o600).unwrap();
        write(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("b.json");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&p).unwrap().is_symlink());
    }

    #[test]
    fn the_old_predictable_temporary_name_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("b.json");
        let planted = p.with_extension(format!("tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn temporary_names_differ_each_time() {
        let p = Path::new("/x/b.json");
        assert_ne!(temporary_name(p), temporary_name(p));
    }
}
