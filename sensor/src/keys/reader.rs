//! Reading the key files processes open, off the event thread.
//!
//! A key file is read when a process's own open of it has succeeded
//! (`run/secret_opens.rs`). The read and the parse happen here, on a
//! worker thread fed through a bounded queue, so a slow file or a costly
//! parse never stalls the event thread, which drains the ring and releases
//! held processes. The event thread gives each read a deadline and treats
//! a late one as abandoned (`secret_opens.rs`); a full queue sheds the read.
//! Both are counted (`KeyReadStats`).
//!
//! Which file is read, as root, is the point:
//! * first the process's own descriptor, duplicated with `pidfd_open` and
//!   `pidfd_getfd`: the very file it opened, with no path to race;
//! * else (the process has exited, or closed the descriptor) the path,
//!   resolved inside the process's root (`safe_open`), but only through a
//!   root that is the one the open resolved from (`RootId` from the entry
//!   probe): a process that chroots after its exec and exits must not make
//!   the sensor resolve its path from the root it had at exec;
//! * either way, only if the file is the one the open returned (inode,
//!   size and mtime from the exit probe): a path swapped for a symlink to
//!   another user's key after the open is refused.
//!
//! Then the `safe_open` checks (regular, within the size cap, no
//! pseudo-filesystem) and positioned reads, which leave the offset the
//! duplicated descriptor shares with the process alone.

use std::{
    fs::File,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use hashbrown::HashMap;
use keywarden_probe_types::{ExeId, RootId};
use tracing::{debug, warn};

use super::{
    material::{self, KeyFile},
    safe_open,
};

/// Reads waiting for the worker, at most; more are shed. Key files are
/// opened a few at a time (a server starting, a CLI signing); a flood of
/// opens is what this bound is for.
pub const QUEUE: usize = 64;

/// How long a read may take, queueing included, before the event thread
/// gives up on it. Reading a 1 MiB file and parsing at most 64 PEM blocks
/// takes milliseconds; a held process waits for this at worst.
pub const DEADLINE: Duration = Duration::from_millis(500);

/// A read still unanswered this long means the worker hangs (a network
/// filesystem that stopped answering): a new worker takes over.
const STUCK: Duration = Duration::from_secs(5);

/// Hung workers given up on, at most; past this, reads are shed until
/// one of them returns. Each is a thread blocked in the kernel.
const MAX_HUNG_WORKERS: usize = 4;

/// Parsed key files kept per worker, by file version.
const CACHE_MAX: usize = 10_000;

/// One key file to read: a process's successful open of it.
pub struct Job {
    pub tgid: u32,
    /// The descriptor the open returned.
    pub fd: i32,
    /// The file it names, as the exit probe read it; `None` when the probe
    /// could not (unknown kernel layout).
    pub opened: Option<ExeId>,
    /// The path as the process passed it.
    pub path: String,
    /// The path made absolute, for messages.
    pub shown_as: String,
    /// The process's root (for an absolute path) or working directory (a
    /// relative one) as the control thread kept it at exec.
    pub kept_base: Option<OwnedFd>,
    /// The mount namespace of the kept root, when known.
    pub kept_mnt_ns: Option<u64>,
    /// The root the open resolved from, as the entry probe read it.
    pub root: Option<RootId>,
    /// The path resolves from the root or working directory (not from
    /// another directory descriptor, which the sensor cannot reach).
    pub resolvable: bool,
}

/// How the file was reached (for the debug log only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The process's own descriptor, through `pidfd_getfd`.
    OwnDescriptor,
    /// The path, inside the process's root or working directory.
    PathInRoot,
}

/// A read's answer.
pub struct Done {
    pub id: u64,
    pub result: Arc<Result<KeyFile, String>>,
    /// `None` when no file was reached.
    pub via: Option<Via>,
}

/// What was not read, since the start. The emitter's loss report can read
/// these (`SecretOpens::key_read_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyReadStats {
    /// Reads refused because the queue was full (or every worker hung).
    pub shed: u64,
    /// Reads given up at their deadline.
    pub abandoned: u64,
}

/// The event thread's handle on the worker.
pub struct KeyReader {
    jobs: Sender<(u64, Job)>,
    done: Receiver<Done>,
    next_id: u64,
    /// Jobs sent to the current worker and not answered, with when.
    outstanding: HashMap<u64, Instant>,
    hung_workers: usize,
    pub stats: KeyReadStats,
}

impl KeyReader {
    pub fn start() -> std::io::Result<Self> {
        let (jobs, done) = spawn_worker()?;
        Ok(Self {
            jobs,
            done,
            next_id: 0,
            outstanding: HashMap::new(),
            hung_workers: 0,
            stats: KeyReadStats::default(),
        })
    }

    /// Queues a read; its id, or `None` when it was shed (counted).
    pub fn submit(&mut self, job: Job) -> Option<u64> {
        self.replace_if_hung();
        self.next_id += 1;
        let id = self.next_id;
        match self.jobs.try_send((id, job)) {
            Ok(()) => {
                self.outstanding.insert(id, Instant::now());
                Some(id)
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.shed += 1;
                if self.stats.shed.is_power_of_two() {
                    warn!(
                        shed = self.stats.shed,
                        "key files not read: the reader's queue is full"
                    );
                }
                None
            }
        }
    }

    /// An answer, if one is ready.
    pub fn try_done(&mut self) -> Option<Done> {
        match self.done.try_recv() {
            Ok(d) => {
                self.outstanding.remove(&d.id);
                Some(d)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    /// An answer, waiting at most `timeout` (at shutdown only).
    pub fn wait_done(&mut self, timeout: Duration) -> Option<Done> {
        let d = self.done.recv_timeout(timeout).ok()?;
        self.outstanding.remove(&d.id);
        Some(d)
    }

    /// A read that has not answered for `STUCK` means the worker hangs
    /// in the kernel: start another one, and let the old thread end when
    /// (if) its read returns and it finds its channels closed. Its reads
    /// are lost; the event thread abandons them at their deadlines.
    fn replace_if_hung(&mut self) {
        let hung = self.outstanding.values().any(|t| t.elapsed() > STUCK);
        if !hung || self.hung_workers >= MAX_HUNG_WORKERS {
            return;
        }
        match spawn_worker() {
            Ok((jobs, done)) => {
                self.hung_workers += 1;
                warn!(
                    hung = self.hung_workers,
                    "a key-file read has not returned in {} s; a new reader takes over",
                    STUCK.as_secs()
                );
                self.jobs = jobs;
                self.done = done;
                self.outstanding.clear();
            }
            Err(e) => warn!(error = %e, "cannot start a new key-file reader"),
        }
    }
}

/// A worker's ends: jobs in (with their sequence numbers), answers out.
type WorkerEnds = (Sender<(u64, Job)>, Receiver<Done>);

fn spawn_worker() -> std::io::Result<WorkerEnds> {
    let (job_tx, job_rx) = crossbeam_channel::bounded::<(u64, Job)>(QUEUE);
    // At most QUEUE answers plus the one being read can be waiting.
    let (done_tx, done_rx) = crossbeam_channel::bounded::<Done>(QUEUE + 1);
    let delay = crate::control::test_delay("KEYWARDEN_TEST_KEY_READ_DELAY_MS");
    std::thread::Builder::new()
        .name("keywarden-keys".into())
        .spawn(move || work(job_rx, done_tx, delay))?;
    Ok((job_tx, done_rx))
}

/// Parsed files, by (device, inode, mtime in ns, size), so a file opened
/// on every request is parsed once. Failures are cached too (most `.pem`
/// files are not keys).
type Cache = HashMap<(u64, u64, i64, u64), Arc<Result<KeyFile, String>>>;

fn work(jobs: Receiver<(u64, Job)>, done: Sender<Done>, delay: Option<Duration>) {
    let mut cache = Cache::new();
    for (id, job) in jobs {
        let (result, via) = read(&mut cache, &job, delay);
        if done.send(Done { id, result, via }).is_err() {
            return; // replaced, or the sensor is stopping
        }
    }
}

/// Reads and parses the job's file, or takes it from the cache. `delay`
/// (tests only) makes each read that is not cached that much slower.
fn read(
    cache: &mut Cache,
    job: &Job,
    delay: Option<Duration>,
) -> (Arc<Result<KeyFile, String>>, Option<Via>) {
    let (file, via) = match open(job) {
        Ok(f) => f,
        Err(why) => {
            let why = format!("{}: not read: {why}", job.shown_as);
            debug!("{why}");
            return (Arc::new(Err(why)), None);
        }
    };
    let md = match file.metadata() {
        Ok(md) => md,
        Err(e) => return (Arc::new(Err(format!("{}: {e}", job.shown_as))), Some(via)),
    };
    let id = (
        md.dev(),
        md.ino(),
        md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        md.size(),
    );
    if let Some(r) = cache.get(&id) {
        return (r.clone(), Some(via));
    }
    if let Some(d) = delay {
        std::thread::sleep(d);
    }
    let r = Arc::new(material::read_key_file_from(&file, &job.shown_as).map_err(|e| e.to_string()));
    if let Err(e) = &*r {
        debug!("{e}");
    }
    if cache.len() >= CACHE_MAX {
        cache.clear();
    }
    cache.insert(id, r.clone());
    (r, Some(via))
}

/// The file the process opened: its own descriptor when that can be had
/// (it is alive and has not closed it), else by path.
fn open(job: &Job) -> Result<(File, Via), String> {
    // Without the probe's identity of the file, a descriptor number of a
    // pid that was reused could name anything: only the path is tried.
    let own = match &job.opened {
        Some(id) => own_descriptor(job.tgid, job.fd, id),
        None => Err("the probe did not identify the opened file".to_owned()),
    };
    match own {
        Ok(f) => return Ok((f, Via::OwnDescriptor)),
        Err(why) => debug!(
            pid = job.tgid,
            path = %job.shown_as,
            %why,
            "not read through the process's own descriptor"
        ),
    }
    let file = by_path(job)?;
    Ok((file, Via::PathInRoot))
}

/// The process's descriptor `fd`, duplicated into the sensor, if it still
/// names the file its open returned.
fn own_descriptor(tgid: u32, fd: i32, opened: &ExeId) -> Result<File, String> {
    let pidfd = match crate::pidfd::open(tgid) {
        Ok(Some(p)) => p,
        Ok(None) => return Err("pidfd_open: the process is gone".to_owned()),
        Err(e) => return Err(format!("pidfd_open: {e}")),
    };
    let file = crate::pidfd::get_fd(pidfd.as_fd(), fd)
        .map_err(|e| format!("pidfd_getfd of descriptor {fd}: {e}"))?;
    same_file(&file, opened).map_err(|why| format!("descriptor {fd} {why}"))?;
    // An O_PATH or write-only descriptor cannot be read from; the path
    // can (for a protected key the sensor must judge all the same).
    let fl = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| format!("descriptor {fd}: F_GETFL: {e}"))?;
    if fl & libc::O_PATH != 0 || fl & libc::O_ACCMODE == libc::O_WRONLY {
        return Err(format!("descriptor {fd} is not open for reading"));
    }
    Ok(file)
}

/// The file `path` names now, resolved where the process resolved it, if
/// it is the file its open returned.
fn by_path(job: &Job) -> Result<File, String> {
    if !job.resolvable {
        return Err(
            "the path cannot be resolved: it is relative to a directory descriptor, \
             or longer than the probe copies"
                .to_owned(),
        );
    }
    let base = base_dir(job)?;
    let file = safe_open::open_beneath(base.as_fd(), &job.path).map_err(|e| e.to_string())?;
    if let Some(id) = &job.opened {
        same_file(&file, id).map_err(|why| format!("the path {why}"))?;
    }
    Ok(file)
}

/// Where the process's path resolves: its root (absolute path) or working
/// directory (relative) now, or as the control thread kept it at exec.
/// For an absolute path, only a root that is the one the open resolved
/// from (the same directory inode in the same mount namespace).
fn base_dir(job: &Job) -> Result<OwnedFd, String> {
    let absolute = job.path.starts_with('/');
    let kept = job
        .kept_base
        .as_ref()
        .and_then(|fd| fd.try_clone().ok())
        .map(|fd| (fd, job.kept_mnt_ns));
    let mut candidates = live_base(job.tgid, absolute).into_iter().chain(kept);
    let (Some(root), true) = (&job.root, absolute) else {
        // A relative path stays beneath the working directory; with no
        // root from the probe (unknown layout), the root as before.
        return candidates.next().map(|(fd, _)| fd).ok_or_else(|| {
            format!(
                "its {} is gone",
                if absolute {
                    "root"
                } else {
                    "working directory"
                }
            )
        });
    };
    let mut any = false;
    for (fd, mnt_ns) in candidates {
        any = true;
        if is_root(&fd, mnt_ns, root) {
            return Ok(fd);
        }
    }
    Err(if any {
        "the process's root is no longer the one it opened the file from".to_owned()
    } else {
        "its root is gone".to_owned()
    })
}

/// `/proc/PID/root` (or `cwd`) and the mount namespace, read through one
/// handle on `/proc/PID` so both are the same process's.
fn live_base(tgid: u32, absolute: bool) -> Option<(OwnedFd, Option<u64>)> {
    use nix::{
        fcntl::{OFlag, openat},
        sys::stat::{Mode, fstatat},
    };
    let dir = File::open(format!("/proc/{tgid}")).ok()?;
    let which = if absolute { "root" } else { "cwd" };
    let base = openat(&dir, which, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
    let mnt_ns = fstatat(&dir, "ns/mnt", nix::fcntl::AtFlags::empty())
        .ok()
        .map(|st| st.st_ino);
    Some((base, mnt_ns))
}

/// Whether `fd` is the root directory `root` names.
fn is_root(fd: &OwnedFd, mnt_ns: Option<u64>, root: &RootId) -> bool {
    mnt_ns == Some(u64::from(root.mnt_ns))
        && nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_ino == root.ino)
}

/// `Ok` when `file` is the one the exit probe saw the open return: same
/// inode, size and mtime.
fn same_file(file: &File, opened: &ExeId) -> Result<(), String> {
    let md = file.metadata().map_err(|e| e.to_string())?;
    if crate::enrich::process::is_image(&md, opened) {
        Ok(())
    } else {
        Err("is no longer the file the process opened".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn stamp(f: &File) -> ExeId {
        crate::probes::file_id(&f.metadata().unwrap())
    }

    fn our_root() -> RootId {
        RootId {
            valid: 1,
            mnt_ns: std::fs::metadata("/proc/self/ns/mnt").unwrap().ino() as u32,
            ino: std::fs::metadata("/").unwrap().ino(),
        }
    }

    fn job(path: &std::path::Path, opened: Option<ExeId>, fd: i32) -> Job {
        Job {
            tgid: std::process::id(),
            fd,
            opened,
            path: path.to_str().unwrap().to_owned(),
            shown_as: path.to_str().unwrap().to_owned(),
            kept_base: None,
            kept_mnt_ns: None,
            root: Some(our_root()),
            resolvable: true,
        }
    }

    /// Our own descriptor, duplicated through a pidfd, is the file; one that
    /// now names another file is refused.
    #[test]
    fn the_process_descriptor_is_used_when_it_names_the_opened_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.pem");
        let b = dir.path().join("b.pem");
        std::fs::write(&a, b"aaaa").unwrap();
        std::fs::write(&b, b"bbbbbb").unwrap();
        let fa = File::open(&a).unwrap();
        let fb = File::open(&b).unwrap();
        let (f, via) = open(&job(&a, Some(stamp(&fa)), fa.as_raw_fd())).unwrap();
        assert_eq!(via, Via::OwnDescriptor);
        assert_eq!(f.metadata().unwrap().ino(), fa.metadata().unwrap().ino());
        // The number now names b (a closed, the number reused): not b, and
        // the path, a, is what the open returned.
        let (f, via) = open(&job(&a, Some(stamp(&fa)), fb.as_raw_fd())).unwrap();
        assert_eq!(via, Via::PathInRoot);
        assert_eq!(f.metadata().unwrap().ino(), fa.metadata().unwrap().ino());
    }

    /// A path that names another file than the open returned (swapped for
    /// a symlink to someone else's key, say) is not read.
    #[test]
    fn a_path_swapped_after_the_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("mine.pem");
        let theirs = dir.path().join("theirs.pem");
        std::fs::write(&mine, b"mine").unwrap();
        std::fs::write(&theirs, b"their key").unwrap();
        let opened = stamp(&File::open(&mine).unwrap());
        std::fs::remove_file(&mine).unwrap();
        std::os::unix::fs::symlink(&theirs, &mine).unwrap();
        // No live descriptor (-1): by path only.
        let err = open(&job(&mine, Some(opened), -1)).unwrap_err();
        assert!(err.contains("no longer the file"), "{err}");
    }

    /// An absolute path resolves only through the root the open resolved
    /// from: a root with another inode (the process chrooted after its
    /// exec, and this is the root it had then) is refused.
    #[test]
    fn only_the_root_of_the_open_resolves_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, b"k").unwrap();
        let mut j = job(&key, None, -1);
        j.tgid = u32::MAX - 1; // gone: only the kept root is left
        j.kept_base = Some(File::open("/").unwrap().into());
        j.kept_mnt_ns = Some(u64::from(our_root().mnt_ns));
        assert!(base_dir(&j).is_ok(), "the kept root is the open's");
        j.root = Some(RootId {
            ino: our_root().ino + 12345,
            ..our_root()
        });
        let err = base_dir(&j).unwrap_err();
        assert!(err.contains("no longer the one"), "{err}");
        j.kept_mnt_ns = None;
        j.root = Some(our_root());
        assert!(base_dir(&j).is_err(), "a root of unknown namespace");
    }

    /// The worker answers, and a full queue sheds (counted) instead of
    /// blocking the event thread.
    #[test]
    fn reads_are_answered_and_a_full_queue_sheds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-a-key.pem");
        std::fs::write(&p, b"hello").unwrap();
        let mut r = KeyReader::start().unwrap();
        let id = r.submit(job(&p, None, -1)).unwrap();
        let d = r.wait_done(Duration::from_secs(10)).unwrap();
        assert_eq!(d.id, id);
        assert_eq!(d.via, Some(Via::PathInRoot));
        assert!(d.result.is_err(), "no key in it");

        // A reader whose worker never reads: the queue fills, then sheds.
        let (jobs, _keep) = crossbeam_channel::bounded(QUEUE);
        let (_done_tx, done) = crossbeam_channel::bounded(1);
        let mut stalled = KeyReader {
            jobs,
            done,
            next_id: 0,
            outstanding: HashMap::new(),
            hung_workers: MAX_HUNG_WORKERS,
            stats: KeyReadStats::default(),
        };
        for _ in 0..QUEUE {
            assert!(stalled.submit(job(&p, None, -1)).is_some());
        }
        assert!(stalled.submit(job(&p, None, -1)).is_none());
        assert_eq!(stalled.stats.shed, 1);
    }
}
