//! Key and certificate files a process still holds open (part of the
//! search of a process, `search`).
//!
//! A server that loaded its keys before the sensor started left no open
//! for the probes to see, but some keep the file open. Its descriptors are
//! listed in /proc/PID/fd, each link naming the path as the process sees
//! it; a descriptor whose path looks like a key file
//! (`material::looks_like_key_file`, the suffixes the open probe knows) is
//! duplicated into the sensor with pidfd_getfd(2) and read there. The
//! duplicate reaches the very file the process holds, even one deleted or
//! outside the sensor's view of the filesystem, without opening anything
//! by name.
//!
//! A duplicate shares the process's file offset, so it is read with pread
//! (explicit offsets), which leaves the offset alone: the process never
//! notices. The file is checked like any file a process names
//! (`safe_open::check`: a regular file within the size cap, on a
//! filesystem the sensor reads) before a byte is read. Private key blocks
//! are parsed in zeroizing buffers only to derive the public key.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, RawFd},
};

use zeroize::Zeroizing;

use super::{
    material::{self, KeyFile, MAX_KEY_FILE},
    safe_open,
};

/// Descriptors looked at per process: a server with many connections has
/// many, and key files are opened early, so they come first.
const MAX_DESCRIPTORS: usize = 4096;
/// Key files read per process.
const MAX_FILES: usize = 16;

/// What a process holds open.
#[derive(Debug, Default)]
pub struct HeldFiles {
    /// Descriptors whose path looks like a key or certificate file.
    pub key_like: usize,
    /// The files read, by the path the process sees, with their keys.
    pub files: Vec<(String, KeyFile)>,
    /// Files that looked like key files but could not be read, and why.
    pub problems: Vec<String>,
}

/// The key and certificate files process `tgid` holds open. `started` is
/// its start time (`/proc/PID/stat` field 22) when the search was asked
/// for: a process with another start time is another process that reused
/// the pid, and is not read.
pub fn key_files(tgid: u32, started: u64) -> io::Result<HeldFiles> {
    let Some(pidfd) = crate::pidfd::open(tgid)? else {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    };
    // After pidfd_open: the descriptor now pins this process, so a check
    // that passes here holds for every read below (a reused pid would make
    // pidfd_getfd fail with ESRCH, not reach another process).
    if crate::free_watch::start_time(tgid) != Some(started) {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    let mut out = HeldFiles::default();
    for entry in std::fs::read_dir(format!("/proc/{tgid}/fd"))?.take(MAX_DESCRIPTORS) {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        // Sockets, pipes and anonymous inodes have no path.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(target) = target.to_str() else {
            continue;
        };
        let path = target.strip_suffix(" (deleted)").unwrap_or(target);
        let name = path.rsplit('/').next().unwrap_or_default();
        if !path.starts_with('/') || !material::looks_like_key_file(name) {
            continue;
        }
        out.key_like += 1;
        if out.files.len() + out.problems.len() >= MAX_FILES
            || out.files.iter().any(|(p, _)| p == path)
        {
            continue;
        }
        match read_held(pidfd.as_fd(), fd, path) {
            Ok(k) => out.files.push((path.to_owned(), k)),
            Err(e) => out.problems.push(e),
        }
    }
    Ok(out)
}

/// Reads one held file through a duplicate of its descriptor, by pread.
fn read_held(pidfd: BorrowedFd<'_>, fd: RawFd, path: &str) -> Result<KeyFile, String> {
    let file = crate::pidfd::get_fd(pidfd, fd)
        .map_err(|e| format!("{path}: cannot duplicate its descriptor: {e}"))?;
    let mut bytes = Zeroizing::new(Vec::new());
    safe_open::read_checked(&file, MAX_KEY_FILE, &mut bytes)
        .map_err(|e| format!("{path}: not read: {e}"))?;
    material::key_file_in(path, &bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::material::tests::openssl_key;
    use std::io::Read;

    /// A child that holds a key file open (and a file that is no key) is
    /// searched: the key is found, by the path the child sees, and the
    /// child's file offset has not moved.
    #[test]
    fn a_key_file_a_process_holds_open_is_read_without_moving_its_offset() {
        let (dir, key, spki) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, b"not a key").unwrap();
        // Holds both open for a while, then prints descriptor 3's offset.
        let script = format!(
            "exec 3<'{}' 4<'{}'; sleep 2; grep '^pos' /proc/$$/fdinfo/3",
            key.display(),
            other.display()
        );
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let started = crate::free_watch::start_time(pid).unwrap();
        let held = key_files(pid, started).unwrap();
        assert_eq!(held.key_like, 1, "{held:?}");
        assert_eq!(held.files.len(), 1, "{held:?}");
        let (path, keys) = &held.files[0];
        assert_eq!(path, key.to_str().unwrap());
        assert_eq!(keys.keys[0].spki_sha256, spki);
        assert!(keys.has_private_key);

        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child.wait().unwrap();
        assert_eq!(out.trim(), "pos:\t0", "the process's offset moved");

        // Another start time is another process.
        assert!(key_files(std::process::id(), started + 1).is_err());
    }
}
