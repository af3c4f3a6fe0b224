//! Who a process is: executable, its SHA-256, user, cgroup and container.
//!
//! A signer such as `openssl dgst` can exit milliseconds after it signs, long
//! before the sensor's next poll. So the sensor snapshots a process when it
//! execs (exec records wake the sensor at once) and keeps handles on its
//! root and working directory, which still resolve the paths it opened
//! after it has exited.

use std::{
    fs::File,
    io::Read,
    os::unix::fs::MetadataExt,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use hashbrown::HashMap;
use keywarden_analyzer::event::{self, Container, Fingerprint};
use sha2::{Digest, Sha256};

use super::container::container_from_cgroup;

/// What the sensor knows about one process (thread group).
#[derive(Debug)]
pub struct ProcessInfo {
    pub tgid: u32,
    /// Executable path as the process saw it.
    pub exe_path: Option<String>,
    pub exe_sha256: Option<String>,
    pub cmd_line: Option<String>,
    pub cgroup_path: Option<String>,
    pub container: Option<Container>,
    /// Why some of the above is missing.
    pub error: Option<String>,
    /// `/proc/PID/root` and `/proc/PID/cwd`, opened O_PATH.
    pub root: Option<OwnedFd>,
    pub cwd: Option<OwnedFd>,
}

impl ProcessInfo {
    pub fn file(&self) -> Option<event::File> {
        let path = self.exe_path.clone()?;
        let name = Path::new(&path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Some(event::File {
            path,
            name,
            type_id: 1,
            hashes: self.exe_sha256.iter().map(|h| Fingerprint::sha256(h.clone())).collect(),
        })
    }

    /// A path the process opened, resolved the way the process saw it:
    /// absolute paths against its root, relative ones against its cwd.
    pub fn resolve(&self, path: &str) -> Option<PathBuf> {
        let base = if path.starts_with('/') { self.root.as_ref()? } else { self.cwd.as_ref()? };
        let rel = path.trim_start_matches('/');
        Some(PathBuf::from(format!("/proc/self/fd/{}/{rel}", base.as_raw_fd())))
    }
}

/// Cache key for executable hashes: the same file is hashed once.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
    mtime_ns: i64,
    size: u64,
}

pub struct ProcessTable {
    procs: HashMap<u32, Arc<ProcessInfo>>,
    hashes: HashMap<FileId, String>,
    cgroup_root: Option<PathBuf>,
    cgroup_paths: HashMap<u64, String>,
}

fn open_path(p: &str) -> Option<OwnedFd> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    open(p, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).ok()
}

/// Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

impl ProcessTable {
    pub fn new() -> Self {
        Self { procs: HashMap::new(), hashes: HashMap::new(), cgroup_root: cgroup2_root(), cgroup_paths: HashMap::new() }
    }

    pub fn get(&self, tgid: u32) -> Option<Arc<ProcessInfo>> {
        self.procs.get(&tgid).cloned()
    }

    /// Reads `/proc/PID` now, replacing what was known (an exec changes the
    /// executable). `exec_path` is the path given to execve, when known.
    pub fn snapshot(&mut self, tgid: u32, exec_path: Option<String>) -> Arc<ProcessInfo> {
        let proc_dir = format!("/proc/{tgid}");
        let mut errors = Vec::new();
        let exe_path = exec_path.or_else(|| {
            std::fs::read_link(format!("{proc_dir}/exe")).ok().map(|p| p.to_string_lossy().into_owned())
        });
        let exe_sha256 = match self.hash_exe(&format!("{proc_dir}/exe")) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(format!("executable hash: {e}"));
                None
            }
        };
        let cmd_line = std::fs::read(format!("{proc_dir}/cmdline")).ok().map(|b| {
            let parts: Vec<String> =
                b.split(|&c| c == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
            parts.join(" ")
        });
        let cgroup_path = std::fs::read_to_string(format!("{proc_dir}/cgroup"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)));
        if cgroup_path.is_none() {
            errors.push(format!("cannot read {proc_dir}/cgroup"));
        }
        let container = cgroup_path.as_deref().and_then(container_from_cgroup);
        let info = Arc::new(ProcessInfo {
            tgid,
            exe_path,
            exe_sha256,
            cmd_line,
            cgroup_path,
            container,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
            root: open_path(&format!("{proc_dir}/root")),
            cwd: open_path(&format!("{proc_dir}/cwd")),
        });
        self.procs.insert(tgid, info.clone());
        info
    }

    /// Known, or read now (a process that existed before the sensor, or a
    /// forked child that never exec'd).
    pub fn get_or_snapshot(&mut self, tgid: u32) -> Arc<ProcessInfo> {
        match self.procs.get(&tgid) {
            Some(p) => p.clone(),
            None => self.snapshot(tgid, None),
        }
    }

    pub fn remove(&mut self, tgid: u32) {
        self.procs.remove(&tgid);
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    fn hash_exe(&mut self, exe: &str) -> std::io::Result<String> {
        let mut f = File::open(exe)?;
        let md = f.metadata()?;
        let id = FileId { dev: md.dev(), ino: md.ino(), mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(), size: md.size() };
        if let Some(h) = self.hashes.get(&id) {
            return Ok(h.clone());
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let h = hex::encode(hasher.finalize());
        if self.hashes.len() > 4096 {
            self.hashes.clear();
        }
        self.hashes.insert(id, h.clone());
        Ok(h)
    }

    /// The cgroup path for a cgroup id. The id in an event is where the
    /// process ran *then*; the path read at exec is used when its inode
    /// matches, otherwise the hierarchy is searched once and cached.
    pub fn cgroup_path(&mut self, id: u64, hint: Option<&str>) -> Option<String> {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return Some(p.clone());
        }
        let root = self.cgroup_root.clone()?;
        if let Some(h) = hint {
            let full = root.join(h.trim_start_matches('/'));
            if std::fs::metadata(&full).map(|m| m.ino() == id).unwrap_or(false) {
                self.cgroup_paths.insert(id, h.to_owned());
                return Some(h.to_owned());
            }
        }
        let found = find_inode(&root, &root, id, 0)?;
        self.cgroup_paths.insert(id, found.clone());
        Some(found)
    }
}

fn find_inode(root: &Path, dir: &Path, ino: u64, depth: usize) -> Option<String> {
    let md = std::fs::metadata(dir).ok()?;
    if md.ino() == ino {
        let rel = dir.strip_prefix(root).ok()?;
        return Some(format!("/{}", rel.display()));
    }
    if depth > 12 {
        return None;
    }
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false)
            && let Some(p) = find_inode(root, &entry.path(), ino, depth + 1)
        {
            return Some(p);
        }
    }
    None
}

/// User name for a uid, from the host's passwd database.
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_of_self_has_exe_hash_and_cgroup() {
        let mut t = ProcessTable::new();
        let me = std::process::id();
        let info = t.snapshot(me, None);
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(info.exe_sha256.as_deref(), Some(hex::encode(Sha256::digest(&exe)).as_str()));
        assert!(info.cgroup_path.as_deref().is_some_and(|p| p.starts_with('/')));
        assert!(info.error.is_none(), "{:?}", info.error);
        // Resolving through the kept root finds the same file.
        let resolved = info.resolve("/proc/self/../self/cmdline").unwrap();
        assert!(resolved.exists());
    }

    #[test]
    fn a_vanished_process_gives_an_error_not_a_panic() {
        let mut t = ProcessTable::new();
        let info = t.snapshot(u32::MAX - 1, None);
        assert!(info.exe_sha256.is_none());
        assert!(info.error.is_some());
    }
}
