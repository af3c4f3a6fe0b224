//! Who a process is: executable, its SHA-256, user, cgroup and container.
//!
//! (Over 600 lines only with its tests; the snapshot logic is about 500.)
//!
//! A signer such as `openssl dgst` can exit milliseconds after it signs, long
//! before the sensor's next poll. So the sensor snapshots a process when it
//! execs (exec records wake the sensor at once) and keeps handles on its
//! root and working directory, which still resolve the paths it opened
//! after it has exited.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hashbrown::HashMap;
use keywarden_analyzer::event::{self, Container, Fingerprint};
use keywarden_probe_types::{ExeId, RootId};
use sha2::{Digest, Sha256};

use super::container::container_from_cgroup;
use crate::discovery::signing_code::FileId;

/// What the sensor knows about one process (thread group).
#[derive(Debug)]
pub struct ProcessInfo {
    /// Executable path as the process saw it.
    pub exe_path: Option<String>,
    /// The executable, opened at snapshot time (valid after the process
    /// exits); hashed on first use by the event thread, off the control
    /// thread's real-time priority.
    exe: Result<File, String>,
    exe_sha256: std::sync::OnceLock<Result<String, String>>,
    pub cmd_line: Option<String>,
    /// Working directory at exec, to make relative paths absolute.
    pub cwd_path: Option<String>,
    /// Whether the paths this process opens are host paths: its root
    /// directory is the sensor's, and its mount namespace the sensor's or
    /// init's (`is_host_mount_ns`). `None` when it exited before the sensor
    /// could look.
    pub host_root: Option<bool>,
    pub cgroup_path: Option<String>,
    pub container: Option<Container>,
    /// `/proc/PID/root` and `/proc/PID/cwd`, opened O_PATH.
    pub root: Option<OwnedFd>,
    pub cwd: Option<OwnedFd>,
    /// Inode of the mount namespace `root` belongs to, read with it: with
    /// the root's inode, what identifies where the process's absolute
    /// paths resolved (`RootId`).
    pub mnt_ns: Option<u64>,
}

/// The parent of `pid`, from `PROC/PID/stat` (after the last `)`: the
/// name may hold anything).
pub fn parent_of(proc_root: &Path, pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

impl ProcessInfo {
    pub fn file(&self, table: &ProcessTable) -> Option<event::File> {
        let path = self.exe_path.clone()?;
        let name = Path::new(&path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Some(event::File {
            path,
            name,
            type_id: 1,
            hashes: self
                .exe_hash(table)
                .ok()
                .map(Fingerprint::sha256)
                .into_iter()
                .collect(),
        })
    }

    /// SHA-256 of the executable, computed once (cached per file version
    /// across processes by `table`).
    /// (device, inode) of the executable opened at snapshot time.
    pub fn exe_inode(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let md = self.exe.as_ref().ok()?.metadata().ok()?;
        Some((md.dev(), md.ino()))
    }

    pub fn exe_hash(&self, table: &ProcessTable) -> Result<&str, &str> {
        self.exe_sha256
            .get_or_init(|| match &self.exe {
                Ok(f) => table.hash(f).map_err(|e| format!("executable hash: {e}")),
                Err(why) => Err(format!("executable hash: {why}")),
            })
            .as_deref()
            .map_err(String::as_str)
    }

    /// `path` as the process saw it, made absolute with its working directory.
    pub fn absolute(&self, path: &str) -> String {
        match (&self.cwd_path, path.starts_with('/')) {
            (Some(cwd), false) => format!("{}/{}", cwd.trim_end_matches('/'), path),
            _ => path.to_owned(),
        }
    }

    /// The path as the host sees it (see `SecretFile::host_path`).
    pub fn host_path(&self, tgid: u32, absolute: &str) -> Option<String> {
        if !absolute.starts_with('/') {
            return None;
        }
        self.host_root.map(|host| {
            if host {
                absolute.to_owned()
            } else {
                format!("/proc/{tgid}/root{absolute}")
            }
        })
    }

    /// A path the process opened, resolved the way the process saw it:
    /// absolute paths against its root, relative ones against its cwd.
    pub fn resolve(&self, path: &str) -> Option<PathBuf> {
        let base = if path.starts_with('/') {
            self.root.as_ref()?
        } else {
            self.cwd.as_ref()?
        };
        let rel = path.trim_start_matches('/');
        Some(PathBuf::from(format!(
            "/proc/self/fd/{}/{rel}",
            base.as_raw_fd()
        )))
    }
}

/// Largest executable hashed: 256 MiB. Programs are smaller (node is 98
/// MB, a browser about 250 MB, a debug build of this sensor's tests 200
/// MB). Hashing runs on the event thread: SHA-256 of 512 MiB took it 0.3
/// to 1 s, close to the 1 s stall that pauses holding (`liveness`), so a
/// user running fresh sparse binaries could pause it; 256 MiB is half
/// that. A larger file gets no hash and `attribution_error` says why.
pub const MAX_HASHED_SIZE: u64 = 256 << 20;

/// Bytes hashed per read.
const HASH_CHUNK: usize = 1 << 16;

/// Hashes kept before the cache starts over.
const HASHES_MAX: usize = 4096;

/// Snapshots per process, versioned by exec time: a signature made before
/// a process re-exec'd is attributed to the image that made it. Shared by
/// the control thread (which snapshots at exec) and the event thread
/// (which reads), hence the locks; hashing happens outside them.
/// Snapshots of one process, oldest first, each with its exec time.
type Versions = Vec<(u64, Arc<ProcessInfo>)>;

#[derive(Default)]
pub struct ProcessTable {
    procs: Mutex<HashMap<u32, Versions>>,
    /// Signalled on every `record`.
    recorded: Condvar,
    /// Executable hashes per file version (`FileId`: device, inode, size,
    /// mtime and change time), so a file run again is not read again.
    hashes: Mutex<HashMap<FileId, String>>,
    /// Hashes computed, not taken from `hashes`.
    computed: AtomicU64,
}

/// Versions kept per process (a process rarely execs more than twice
/// between two polls of the event ring).
const VERSIONS: usize = 4;

/// Is mount namespace `ino` one where the host's paths name the host's
/// files: the sensor's own, or init's (PID 1)? The two differ when the
/// sensor runs as a systemd service with file-system protections
/// (`ProtectSystem=`, `ReadWritePaths=`: deploy/systemd/keywarden.service),
/// which give it a private copy of init's namespace, read-only in places
/// but with the same files at the same paths.
fn is_host_mount_ns(ino: u64) -> bool {
    ["/proc/self/ns/mnt", "/proc/1/ns/mnt"]
        .iter()
        .any(|ns| std::fs::metadata(ns).is_ok_and(|m| m.ino() == ino))
}

/// Is the process in a host mount namespace (`is_host_mount_ns`)? `None`
/// when it cannot be read (the process is gone).
fn in_host_mount_ns(tgid: u32) -> Option<bool> {
    let theirs = std::fs::metadata(format!("/proc/{tgid}/ns/mnt"))
        .ok()?
        .ino();
    Some(is_host_mount_ns(theirs))
}

/// Is this root directory (held open since exec, so it answers even after
/// the process exited) the sensor's own `/`?
fn same_root_as_host(root: &OwnedFd) -> bool {
    let Ok(theirs) = nix::sys::stat::fstat(root) else {
        return false;
    };
    let Ok(ours) = nix::sys::stat::stat("/") else {
        return false;
    };
    (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
}

/// Why a snapshot has no executable, most of the time.
const GONE: &str = "the process was gone before the sensor saw it";

/// `path` opened, if it is the file the exec probe saw.
/// Whether `md` is the file the exec probe saw run (`exe`).
pub fn is_image(md: &std::fs::Metadata, exe: &ExeId) -> bool {
    (md.ino(), md.size(), md.mtime(), md.mtime_nsec() as u32)
        == (exe.ino, exe.size, exe.mtime_sec, exe.mtime_nsec)
}

fn same_file(path: &str, exe: &ExeId) -> Result<File, String> {
    let f = File::open(path).map_err(|e| format!("{GONE}, and {path}: {e}"))?;
    let md = f
        .metadata()
        .map_err(|e| format!("{GONE}, and {path}: {e}"))?;
    if is_image(&md, exe) {
        Ok(f)
    } else {
        tracing::debug!(
            path,
            probe = ?exe,
            file = ?(md.ino(), md.size(), md.mtime(), md.mtime_nsec()),
            "executable changed since exec"
        );
        Err(format!("{GONE}, and {path} is no longer the file it ran"))
    }
}

/// A root directory where a gone process's absolute paths resolve as they
/// did for it: one with the same mount namespace and root inode, the
/// sensor's own or a live process's. (Bind mounts aside, the same
/// directory inode in the same namespace is the same directory.) Not
/// cached: namespace and inode numbers are reused once freed, and this is
/// the rare path (the control thread runs at real-time priority).
fn equivalent_root(id: &RootId) -> Option<OwnedFd> {
    let matches = |ns: &str, root: &OwnedFd| {
        std::fs::metadata(ns).is_ok_and(|m| m.ino() == u64::from(id.mnt_ns))
            && nix::sys::stat::fstat(root).is_ok_and(|st| st.st_ino == id.ino)
    };
    if let Some(ours) = open_path("/")
        && matches("/proc/self/ns/mnt", &ours)
    {
        return Some(ours);
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let root = open_path(&format!("/proc/{pid}/root"))?;
        matches(&format!("/proc/{pid}/ns/mnt"), &root).then_some(root)
    })
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
    /// Reads `/proc/PID` now. The executable, root and cwd are opened first,
    /// while the process surely exists; hashing reads the opened file.
    pub fn snapshot(&self, tgid: u32) -> ProcessInfo {
        self.snapshot_with(tgid, None, true)
    }

    /// The snapshot of a process that just exec'd `exec_path` (the path
    /// given to execve), with the identity of the file it runs and of its
    /// root directory as the exec probe read them. A signer can be gone
    /// before the sensor gets here:
    /// - its executable is then opened by path, and used only if it is
    ///   still the same file (inode, size, mtime);
    /// - the absolute paths it opened (its key files) resolve against an
    ///   equivalent root. Relative ones cannot: its working directory is
    ///   gone with it.
    pub fn snapshot_exec(
        &self,
        tgid: u32,
        exec_path: &str,
        exe: &ExeId,
        root: &RootId,
    ) -> ProcessInfo {
        let mut info = self.snapshot_with(
            tgid,
            (!exec_path.is_empty()).then(|| exec_path.to_owned()),
            true,
        );
        // A process that exec'd again before the sensor got here (`sh -c
        // 'exec prog'`) runs the next image now; this exec's image is the
        // one its path still names, if it does.
        if exe.valid != 0
            && let Ok(f) = &info.exe
            && !f.metadata().is_ok_and(|md| is_image(&md, exe))
        {
            info.exe =
                Err("the process had exec'd again before the sensor saw this image".to_owned());
        }
        if info.exe.is_err() && exe.valid != 0 && exec_path.starts_with('/') {
            info.exe = same_file(exec_path, exe);
        }
        if info.root.is_none() && root.valid != 0 {
            match equivalent_root(root) {
                Some(fd) => {
                    info.host_root =
                        Some(same_root_as_host(&fd) && is_host_mount_ns(u64::from(root.mnt_ns)));
                    info.root = Some(fd);
                    info.mnt_ns = Some(u64::from(root.mnt_ns));
                }
                None => tracing::debug!(pid = tgid, ?root, "no live root matches a gone process's"),
            }
        }
        info
    }

    /// A snapshot that never opens the executable for reading: for the
    /// fanotify guard, whose own open of a guarded file would wait for an
    /// answer only it can give. The hash is then unknown.
    pub fn snapshot_without_exe(&self, tgid: u32) -> ProcessInfo {
        self.snapshot_with(tgid, None, false)
    }

    fn snapshot_with(&self, tgid: u32, exec_path: Option<String>, open_exe: bool) -> ProcessInfo {
        let proc_dir = format!("/proc/{tgid}");
        // Root and cwd first: they are what resolves the files it opens.
        let root = open_path(&format!("{proc_dir}/root"));
        let mnt_ns = root.as_ref().and_then(|_| {
            std::fs::metadata(format!("{proc_dir}/ns/mnt"))
                .ok()
                .map(|m| m.ino())
        });
        let cwd = open_path(&format!("{proc_dir}/cwd"));
        let exe = if open_exe {
            File::open(format!("{proc_dir}/exe")).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => GONE.to_owned(),
                _ => format!("{proc_dir}/exe: {e}"),
            })
        } else {
            Err("not read while a guarded open waits".to_owned())
        };
        let cwd_path = std::fs::read_link(format!("{proc_dir}/cwd"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let cmd_line = std::fs::read(format!("{proc_dir}/cmdline")).ok().map(|b| {
            let parts: Vec<String> = b
                .split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            parts.join(" ")
        });
        let cgroup_path = std::fs::read_to_string(format!("{proc_dir}/cgroup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            });
        // The path given to execve when it is absolute (for a script, the
        // script); else the kernel's link, which is always absolute (allow
        // lists compare absolute paths).
        let exe_path = exec_path.filter(|p| p.starts_with('/')).or_else(|| {
            std::fs::read_link(format!("{proc_dir}/exe"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
        });
        let container = cgroup_path.as_deref().and_then(container_from_cgroup);
        ProcessInfo {
            exe_path,
            exe,
            exe_sha256: std::sync::OnceLock::new(),
            cmd_line: cmd_line.filter(|c| !c.is_empty()),
            cwd_path,
            host_root: match (root.as_ref().map(same_root_as_host), in_host_mount_ns(tgid)) {
                (Some(true), Some(true)) => Some(true),
                (Some(false), _) | (_, Some(false)) => Some(false),
                _ => None,
            },
            cgroup_path,
            container,
            root,
            cwd,
            mnt_ns,
        }
    }

    /// Stores a snapshot taken at `exec_ktime` (0: taken when first seen).
    pub fn record(&self, tgid: u32, exec_ktime: u64, info: ProcessInfo) -> Arc<ProcessInfo> {
        let info = Arc::new(info);
        let mut procs = self.procs.lock().expect("process table lock");
        let versions = procs.entry(tgid).or_default();
        versions.push((exec_ktime, info.clone()));
        versions.sort_by_key(|(t, _)| *t);
        if versions.len() > VERSIONS {
            versions.remove(0);
        }
        drop(procs);
        self.recorded.notify_all();
        info
    }

    /// Waits, at most `timeout`, until the snapshot of the exec at
    /// `exec_ktime` is recorded. The exec mark precedes a process's records
    /// in the event ring, but the control thread takes the snapshot; an
    /// event thread that did not wait would snapshot a process that may be
    /// gone by then. False on timeout.
    pub fn wait_for_exec(&self, tgid: u32, exec_ktime: u64, timeout: Duration) -> bool {
        let procs = self.procs.lock().expect("process table lock");
        let (_procs, waited) = self
            .recorded
            .wait_timeout_while(procs, timeout, |p| {
                !p.get(&tgid)
                    .is_some_and(|v| v.iter().any(|(t, _)| *t >= exec_ktime))
            })
            .expect("process table lock");
        !waited.timed_out()
    }

    /// The image that was running at `ktime`.
    pub fn lookup(&self, tgid: u32, ktime: u64) -> Option<Arc<ProcessInfo>> {
        let procs = self.procs.lock().expect("process table lock");
        procs
            .get(&tgid)?
            .iter()
            .rev()
            .find(|(t, _)| *t <= ktime)
            .map(|(_, i)| i.clone())
    }

    /// Known, or read now (a process that existed before the sensor, or a
    /// forked child that never exec'd).
    pub fn lookup_or_snapshot(&self, tgid: u32, ktime: u64) -> Arc<ProcessInfo> {
        if let Some(i) = self.lookup(tgid, ktime) {
            return i;
        }
        let info = self.snapshot(tgid);
        self.record(tgid, 0, info)
    }

    /// The process exited at `ktime`: forget what ran before it.
    pub fn remove_upto(&self, tgid: u32, ktime: u64) {
        let mut procs = self.procs.lock().expect("process table lock");
        if let Some(v) = procs.get_mut(&tgid) {
            v.retain(|(t, _)| *t > ktime);
            if v.is_empty() {
                procs.remove(&tgid);
            }
        }
    }

    /// SHA-256 of an opened executable, or why there is none. Read with
    /// positioned reads (the descriptor's offset is never moved, so a
    /// shared descriptor can be hashed again), up to the size `fstat` gave:
    /// a file that grows meanwhile is not read further, one cut short gives
    /// an error. Files over `MAX_HASHED_SIZE` are not read at all.
    pub fn hash(&self, f: &File) -> Result<String, String> {
        let md = f.metadata().map_err(|e| e.to_string())?;
        let id = FileId::of(&md);
        if let Some(h) = self.hashes.lock().expect("hash cache lock").get(&id) {
            return Ok(h.clone());
        }
        if !md.is_file() {
            return Err("not a regular file".to_owned());
        }
        if id.size > MAX_HASHED_SIZE {
            return Err(format!(
                "not computed: the executable is {} MiB, more than the {} MiB keywarden hashes",
                id.size.div_ceil(1 << 20),
                MAX_HASHED_SIZE >> 20
            ));
        }
        const CHANGED: &str = "the executable changed while it was hashed";
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; HASH_CHUNK];
        let mut pos = 0u64;
        while pos < id.size {
            let want = (id.size - pos).min(HASH_CHUNK as u64) as usize;
            let n = match f.read_at(&mut buf[..want], pos) {
                Ok(0) => return Err(CHANGED.to_owned()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        // Written meanwhile: what was read may mix two versions.
        if f.metadata().map(|md| FileId::of(&md)).ok() != Some(id) {
            return Err(CHANGED.to_owned());
        }
        let h = hex::encode(hasher.finalize());
        self.computed.fetch_add(1, Ordering::Relaxed);
        let mut hashes = self.hashes.lock().expect("hash cache lock");
        if hashes.len() >= HASHES_MAX {
            hashes.clear();
        }
        hashes.insert(id, h.clone());
        Ok(h)
    }
}

/// cgroup id -> path, for the event thread.
pub struct CgroupPaths {
    root: Option<PathBuf>,
    cache: HashMap<u64, String>,
}

impl CgroupPaths {
    pub fn new() -> Self {
        Self {
            root: cgroup2_root(),
            cache: HashMap::new(),
        }
    }

    /// The cgroup path for a cgroup id. The id in an event is where the
    /// process ran *then*; the path read at exec is used when its inode
    /// matches, otherwise the hierarchy is searched once and cached.
    pub fn path(&mut self, id: u64, hint: Option<&str>) -> Option<String> {
        if let Some(p) = self.cache.get(&id) {
            return Some(p.clone());
        }
        let root = self.root.clone()?;
        if let Some(h) = hint {
            let full = root.join(h.trim_start_matches('/'));
            if std::fs::metadata(&full)
                .map(|m| m.ino() == id)
                .unwrap_or(false)
            {
                self.cache.insert(id, h.to_owned());
                return Some(h.to_owned());
            }
        }
        let found = find_inode(&root, &root, id, 0)?;
        self.cache.insert(id, found.clone());
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
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_name_with_parentheses_and_spaces() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id();
        let proc_root = Path::new("/proc");
        assert_eq!(parent_of(proc_root, me), Some(parent));
        // A child named to confuse a naive parser of /proc/PID/stat: its
        // name is the base name of the path it was started by.
        let dir = tempfile::tempdir().unwrap();
        let trap = dir.path().join("x) S 1 1");
        std::os::unix::fs::symlink("/bin/sleep", &trap).unwrap();
        let mut child = std::process::Command::new(&trap).arg("5").spawn().unwrap();
        let pid = child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(stat.contains("(x) S 1 1)"), "{stat}");
        assert_eq!(parent_of(proc_root, pid), Some(me));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(parent_of(proc_root, u32::MAX), None);
    }

    #[test]
    fn snapshot_of_a_process_has_exe_hash_and_cgroup() {
        // A small child, not this test binary: with its dependencies'
        // debug info the binary outgrows the hashing cap (`MAX_HASHED_SIZE`).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let t = ProcessTable::default();
        let info = t.snapshot(child.id());
        let exe_path = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
        let exe = std::fs::read(&exe_path).unwrap();
        let hashed = info.exe_hash(&t).ok().map(str::to_owned);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(hashed, Some(hex::encode(Sha256::digest(&exe))));
        assert!(
            info.cgroup_path
                .as_deref()
                .is_some_and(|p| p.starts_with('/'))
        );
        // Resolving through the kept root finds the same file.
        let resolved = info.resolve("/proc/self/../self/cmdline").unwrap();
        assert!(resolved.exists());
    }

    /// The same file version is hashed once; a new version (here rewritten
    /// in place, same size, mtime put back: only the change time differs)
    /// is hashed again; a file over the cap is not read.
    #[test]
    fn executable_hashes_are_cached_per_file_version_and_capped() {
        let t = ProcessTable::default();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exe");
        std::fs::write(&p, b"version one").unwrap();
        let f = File::open(&p).unwrap();
        let one = hex::encode(Sha256::digest(b"version one"));
        assert_eq!(t.hash(&f).unwrap(), one);
        assert_eq!(t.hash(&File::open(&p).unwrap()).unwrap(), one);
        assert_eq!(
            t.computed.load(Ordering::Relaxed),
            1,
            "cached the second time"
        );

        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        // File times tick with the kernel's coarse clock (up to 10 ms).
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(&p, b"version two").unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let two = hex::encode(Sha256::digest(b"version two"));
        assert_eq!(t.hash(&f).unwrap(), two);
        assert_eq!(t.computed.load(Ordering::Relaxed), 2);
        assert_eq!(t.hash(&f).unwrap(), two);
        assert_eq!(t.computed.load(Ordering::Relaxed), 2);

        let big = dir.path().join("big");
        File::create(&big)
            .unwrap()
            .set_len(MAX_HASHED_SIZE + 1)
            .unwrap();
        let err = t.hash(&File::open(&big).unwrap()).unwrap_err();
        assert_eq!(
            err,
            "not computed: the executable is 257 MiB, more than the 256 MiB keywarden hashes"
        );
        assert_eq!(t.computed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_vanished_process_gives_an_error_not_a_panic() {
        let t = ProcessTable::default();
        let info = t.snapshot(u32::MAX - 1);
        assert!(info.exe_hash(&t).is_err());
    }

    /// A process gone before the snapshot still resolves its absolute
    /// paths, through a root with its namespace and root inode; a root
    /// that matches none is not guessed.
    #[test]
    fn a_gone_process_resolves_paths_through_an_equivalent_root() {
        let t = ProcessTable::default();
        let gone = u32::MAX - 1;
        let ours = RootId {
            valid: 1,
            mnt_ns: std::fs::metadata("/proc/self/ns/mnt").unwrap().ino() as u32,
            ino: std::fs::metadata("/").unwrap().ino(),
        };
        let info = t.snapshot_exec(gone, "/bin/x", &ExeId::default(), &ours);
        assert_eq!(info.host_root, Some(true));
        assert!(info.resolve("/proc/self/cmdline").unwrap().exists());
        assert!(
            info.resolve("relative").is_none(),
            "no cwd for a gone process"
        );

        let elsewhere = RootId {
            ino: ours.ino + 12345,
            ..ours
        };
        let info = t.snapshot_exec(gone, "/bin/x", &ExeId::default(), &elsewhere);
        assert!(info.root.is_none() && info.host_root.is_none());
        let unread = t.snapshot_exec(gone, "/bin/x", &ExeId::default(), &RootId::default());
        assert!(unread.root.is_none());
    }

    #[test]
    fn versions_follow_exec_time() {
        let t = ProcessTable::default();
        let mut a = t.snapshot_exec(
            std::process::id(),
            "/bin/a",
            &ExeId::default(),
            &RootId::default(),
        );
        a.root = None;
        t.record(7, 100, a);
        t.record(
            7,
            200,
            t.snapshot_exec(
                std::process::id(),
                "/bin/b",
                &ExeId::default(),
                &RootId::default(),
            ),
        );
        assert!(t.lookup(7, 50).is_none());
        assert_eq!(
            t.lookup(7, 150).unwrap().exe_path.as_deref(),
            Some("/bin/a")
        );
        assert_eq!(
            t.lookup(7, 250).unwrap().exe_path.as_deref(),
            Some("/bin/b")
        );
        t.remove_upto(7, 150);
        assert!(t.lookup(7, 150).is_none());
        assert_eq!(
            t.lookup(7, 250).unwrap().exe_path.as_deref(),
            Some("/bin/b")
        );
        t.remove_upto(7, 300);
        assert!(t.lookup(7, 400).is_none());
    }
}
