//! Which ELF files may hold signing code on this host, and where to open
//! them.
//!
//! A uprobe is placed on an inode, so one attachment covers every process
//! that maps that file, in any mount namespace. Discovery therefore only
//! has to find each distinct file once: every executable mapping of every
//! running process (its program and its shared objects, resolved through
//! `/proc/PID/root`, which reaches into containers: crypto is often linked
//! statically), and the crypto libraries in the host's library directories,
//! so a program started later is covered from its first instruction.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use hashbrown::HashSet;

/// A library file found on the host or in a process.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Path as the process (or host) sees it, e.g. `/usr/lib/.../libcrypto.so.3`.
    pub shown_as: String,
    /// Path the sensor can open and attach to from its own mount namespace.
    pub open_path: PathBuf,
    /// A process that maps it, when found through a process.
    pub pid: Option<u32>,
    pub dev: u64,
    pub ino: u64,
}

/// `libcrypto.so`, `libcrypto.so.3`, `libcrypto.so.1.1`, ...,
/// `libgnutls.so.30`, `libnss3.so`, `libgcrypt.so.20`: the shared
/// libraries with probed signing functions.
pub fn is_crypto_library(path: &str) -> bool {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| {
            ["libcrypto.so", "libgnutls.so", "libnss3.so", "libgcrypt.so"]
                .iter()
                .any(|l| n.starts_with(l))
        })
}

fn candidate(shown_as: String, open_path: PathBuf, pid: Option<u32>) -> Option<Candidate> {
    let md = std::fs::metadata(&open_path).ok()?;
    md.is_file().then_some(Candidate {
        shown_as,
        open_path,
        pid,
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// Files one process maps executable: its program and shared objects.
pub fn executable_files_of(pid: u32) -> std::io::Result<Vec<Candidate>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out: Vec<Candidate> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let perms = fields.nth(1).unwrap_or_default();
        let Some(path) = fields.nth(3).map(str::trim) else {
            continue;
        };
        if !perms.contains('x') || !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        if out.iter().any(|c| c.shown_as == path) {
            continue;
        }
        let open_path = PathBuf::from(format!("/proc/{pid}/root{path}"));
        if let Some(c) = candidate(path.to_owned(), open_path, Some(pid)) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Result of a scan of all processes.
#[derive(Default)]
pub struct Scan {
    pub libraries: Vec<Candidate>,
    /// (pid, reason) for processes whose maps could not be read. Processes
    /// that exited during the scan are not listed: that is not an error.
    pub unreadable: Vec<(u32, String)>,
}

pub fn scan_processes() -> Scan {
    let mut scan = Scan::default();
    let mut seen = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return scan;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        match executable_files_of(pid) {
            Ok(libs) => {
                for c in libs {
                    if seen.insert((c.dev, c.ino)) {
                        scan.libraries.push(c);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // exited meanwhile
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => scan.unreadable.push((pid, e.to_string())),
        }
    }
    scan
}

/// Crypto libraries in the host's library directories, mapped or not, so
/// a program started later is covered from its first instruction.
pub fn scan_dirs(dirs: &[String]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !is_crypto_library(&e.path().to_string_lossy()) {
                continue;
            }
            // Name the real file, not the `libcrypto.so` development symlink.
            let Ok(path) = std::fs::canonicalize(e.path()) else {
                continue;
            };
            let shown = path.to_string_lossy().into_owned();
            if let Some(c) = candidate(shown, path, None)
                && seen.insert((c.dev, c.ino))
            {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        assert!(is_crypto_library(
            "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
        ));
        assert!(is_crypto_library("libcrypto.so.1.1"));
        assert!(is_crypto_library("/opt/x/libcrypto.so"));
        assert!(is_crypto_library("/usr/lib/libgnutls.so.30"));
        assert!(is_crypto_library("/usr/lib/x86_64-linux-gnu/libnss3.so"));
        assert!(is_crypto_library(
            "/usr/lib/x86_64-linux-gnu/libgcrypt.so.20"
        ));
        assert!(!is_crypto_library("/usr/lib/libssl.so.3"));
        assert!(!is_crypto_library("/usr/lib/libcrypto.a"));
        assert!(!is_crypto_library("/usr/lib/libcrypto.so.3/x"));
    }

    #[test]
    fn host_dirs_contain_the_system_libcrypto() {
        let found = scan_dirs(&[
            "/usr/lib/x86_64-linux-gnu".into(),
            "/lib/x86_64-linux-gnu".into(),
        ]);
        assert!(
            found.iter().any(|c| c.shown_as.ends_with("libcrypto.so.3")),
            "{found:?}"
        );
        // Same inode through two directories (/lib -> /usr/lib) counts once.
        let mut inodes: Vec<_> = found.iter().map(|c| (c.dev, c.ino)).collect();
        inodes.sort();
        inodes.dedup();
        assert_eq!(inodes.len(), found.len());
    }
}
