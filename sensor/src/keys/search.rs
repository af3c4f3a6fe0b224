//! The search of a signing process for keys that no file the sensor saw
//! gave, on its own thread (`keywarden-search`).
//!
//! A server started before the sensor loaded its keys unseen, perhaps from
//! a directory nobody configured, and closed the files long ago. When such
//! a process signs with a key nothing verifies, `identify` asks for it to
//! be searched, once, and the event thread hands the job here, so that a
//! slow or hostile process never stalls events:
//!
//! 1. the key and certificate files it still holds open (`held_open`);
//! 2. the certificates its TLS listeners present (`tls_probe`): first a
//!    handshake without a server name (the default certificate; "localhost"
//!    when that fails), then one per DNS name of the certificates seen, so
//!    each certificate a server chooses by SNI among names it shows is
//!    found.
//!
//! Each key found is sent back as soon as it is found; the event thread
//! checks the signatures it holds against it. A key found here is only a
//! candidate: it names a signature that verifies under it, nothing else.
//!
//! Bounds: one search per process image; at most `MAX_LISTENERS` listeners
//! (those on the port the signature's connection came in on, when the
//! probes saw it) and `MAX_NAMES` server names per process; each handshake
//! at most 2 × `HANDSHAKE_TIMEOUT`; a search at most `SEARCH_DEADLINE`. A
//! listener that does not connect or does not speak TLS gets no second
//! handshake, and a listener several processes share (the workers of one
//! server) is asked once per name every `CACHE_FOR`.
//!
//! Fairness: a search costs the sensor time the process controls (a
//! listener that accepts and never answers holds a handshake until its
//! timeout), and any user can start processes that sign. So the queue is
//! kept per user: at most `QUEUE_PER_USER` searches wait for one user, and
//! the thread takes them in turn, one user after another. A user who
//! floods the queue with tar pits delays only their own searches; another
//! user's waits at most one search behind each other user's. A search
//! beyond a user's share is not dropped: the event thread asks again
//! once that user's searches move (`run::key_uses`).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use tracing::{debug, info};

use super::{
    held_open,
    identify::{Searched, Source},
    material::{self, Certificate, KeyInfo},
    tls_probe::{self, Failed, Listener},
};

/// Listeners handshaken with per process.
const MAX_LISTENERS: usize = 8;
/// Server names tried per process, beyond the handshake without one.
const MAX_NAMES: usize = 8;
/// Connect, read and write timeout of one handshake (the whole handshake
/// takes at most twice this).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// No new handshake starts after this long in one search.
const SEARCH_DEADLINE: Duration = Duration::from_secs(10);
/// How long a listener's certificate for a name is reused for another
/// process sharing it (a reload may change it).
const CACHE_FOR: Duration = Duration::from_secs(60);
/// Searches waiting; beyond, a search is refused, not queued.
const QUEUE: usize = 64;
/// Searches waiting for one user; beyond, that user's are refused.
const QUEUE_PER_USER: usize = 8;

/// A process to search.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// Names this search: a result for an older one of the same process
    /// (before an exec) is told apart.
    pub id: u64,
    pub tgid: u32,
    /// The user it signed as, whose turn in the queue it takes.
    pub uid: u32,
    /// Its start time (`/proc/PID/stat` field 22), so that a reused pid is
    /// not searched in its place.
    pub started: u64,
    /// The local port of the connection its signature was made for.
    pub local_port: Option<u16>,
}

/// What a search sends back.
#[derive(Debug)]
pub enum Found {
    /// Keys the process holds, the certificates found with them (for the
    /// key inventory), and where they were found.
    Keys {
        id: u64,
        tgid: u32,
        keys: Vec<KeyInfo>,
        certificates: Vec<Certificate>,
        source: Source,
    },
    /// The search is over: what was searched, or why nothing was.
    Done {
        id: u64,
        tgid: u32,
        outcome: Searched,
    },
}

/// Why a search was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The user's share of the queue is full: ask again once it moves.
    UserShare(String),
    /// The whole queue is full, or the thread is gone.
    Other(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::UserShare(why) | Refused::Other(why) => f.write_str(why),
        }
    }
}

/// Searches waiting, one queue per user, taken in turn.
#[derive(Default)]
struct Waiting {
    by_user: HashMap<u32, VecDeque<Job>>,
    /// Users with searches waiting, in the order their turns come.
    turns: VecDeque<u32>,
    total: usize,
    /// No more searches come: the thread ends once the queue is empty.
    closed: bool,
}

impl Waiting {
    fn push(&mut self, job: Job) -> Result<(), Refused> {
        if self.total >= QUEUE {
            return Err(Refused::Other(format!(
                "{QUEUE} other processes were waiting to be searched"
            )));
        }
        let mine = self.by_user.entry(job.uid).or_default();
        if mine.len() >= QUEUE_PER_USER {
            return Err(Refused::UserShare(format!(
                "{QUEUE_PER_USER} other processes of user {} were waiting to be searched",
                job.uid
            )));
        }
        if mine.is_empty() {
            self.turns.push_back(job.uid);
        }
        mine.push_back(job);
        self.total += 1;
        Ok(())
    }

    /// The next user's oldest search; that user goes to the back.
    fn pop(&mut self) -> Option<Job> {
        let uid = self.turns.pop_front()?;
        let mine = self.by_user.get_mut(&uid)?;
        let job = mine.pop_front()?;
        if mine.is_empty() {
            self.by_user.remove(&uid);
        } else {
            self.turns.push_back(uid);
        }
        self.total -= 1;
        Some(job)
    }
}

/// The queue the event thread fills and the search thread drains.
#[derive(Default)]
struct Queue {
    waiting: Mutex<Waiting>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until a search waits (`None`: closed and empty).
    fn next(&self) -> Option<Job> {
        let mut w = self.lock();
        loop {
            if let Some(job) = w.pop() {
                return Some(job);
            }
            if w.closed {
                return None;
            }
            w = self.ready.wait(w).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The search thread's two ends.
pub struct Searcher {
    jobs: Arc<Queue>,
    found: Receiver<Found>,
}

impl Drop for Searcher {
    fn drop(&mut self) {
        self.jobs.lock().closed = true;
        self.jobs.ready.notify_all();
    }
}

impl Searcher {
    /// Starts the search thread. It ends when the `Searcher` is dropped (a
    /// search under way finishes first; the process exiting ends it too).
    pub fn start() -> std::io::Result<Searcher> {
        let jobs = Arc::new(Queue::default());
        let (found_tx, found) = crossbeam_channel::unbounded();
        let queue = jobs.clone();
        std::thread::Builder::new()
            .name("keywarden-search".into())
            .spawn(move || {
                let mut worker = Worker::default();
                while let Some(job) = queue.next() {
                    worker.search(&job, &found_tx);
                }
            })?;
        Ok(Searcher { jobs, found })
    }

    /// Queues a search; refused (with the reason) when the queue, or this
    /// user's share of it, is full.
    pub fn ask(&self, job: Job) -> Result<(), Refused> {
        self.jobs.lock().push(job)?;
        self.jobs.ready.notify_one();
        Ok(())
    }

    /// What searches have sent back so far.
    pub fn try_found(&self) -> Vec<Found> {
        self.found.try_iter().collect()
    }

    /// Waits up to `timeout` for something to come back.
    pub fn wait_found(&self, timeout: Duration) -> Option<Found> {
        self.found.recv_timeout(timeout).ok()
    }
}

/// A handshake's result, kept for processes sharing the listener.
struct Cached {
    at: Instant,
    leaf: Result<Vec<u8>, Failed>,
}

#[derive(Default)]
struct Worker {
    /// (listener inode, server name) -> the leaf certificate it presented.
    handshakes: HashMap<(u64, Option<String>), Cached>,
}

/// What the listener part of a search came to, for the summary.
#[derive(Default)]
struct Tally {
    listeners: usize,
    handshakes: usize,
    certificates: usize,
}

impl Worker {
    fn search(&mut self, job: &Job, out: &Sender<Found>) {
        let started = Instant::now();
        if crate::free_watch::start_time(job.tgid) != Some(job.started) {
            let _ = out.send(Found::Done {
                id: job.id,
                tgid: job.tgid,
                outcome: Searched::NotDone("it had exited".into()),
            });
            return;
        }
        let send_keys = |keys: Vec<KeyInfo>, certificates: Vec<Certificate>, source: Source| {
            // The event thread outlives this one; a closed channel only
            // means the sensor is stopping.
            let _ = out.send(Found::Keys {
                id: job.id,
                tgid: job.tgid,
                keys,
                certificates,
                source,
            });
        };
        let files = match held_open::key_files(job.tgid, job.started) {
            Ok(held) => {
                for problem in &held.problems {
                    debug!(pid = job.tgid, "held open: {problem}");
                }
                for (path, file) in held.files {
                    if !file.keys.is_empty() {
                        info!(pid = job.tgid, file = %path, keys = file.keys.len(), "search: keys in a file the process holds open");
                        send_keys(file.keys, file.certificates, Source::File(path));
                    }
                }
                format!("{} key file(s) it holds open", held.key_like)
            }
            Err(e) => format!("none of the files it holds open (they could not be read: {e})"),
        };
        let listeners = match tls_probe::listeners(job.tgid) {
            Err(e) => format!("none of its TCP listeners (they could not be listed: {e})"),
            Ok(all) => {
                let chosen = choose(&all, job.local_port);
                match in_netns_of(job.tgid, || {
                    self.handshakes_with(job, &chosen, started, &send_keys)
                }) {
                    Ok(t) => format!(
                        "{} TCP listener(s) of it ({} of {} TLS handshake(s) gave a certificate)",
                        t.listeners, t.certificates, t.handshakes
                    ),
                    Err(e) => format!(
                        "none of its TCP listeners (its network namespace could not be entered: {e})"
                    ),
                }
            }
        };
        let summary = format!("{files} and {listeners}");
        debug!(pid = job.tgid, elapsed = ?started.elapsed(), "search done: {summary}");
        let _ = out.send(Found::Done {
            id: job.id,
            tgid: job.tgid,
            outcome: Searched::Done(summary),
        });
    }

    /// Handshakes with each chosen listener, without a server name first,
    /// then with each name the certificates show.
    fn handshakes_with(
        &mut self,
        job: &Job,
        chosen: &[Listener],
        started: Instant,
        send_keys: &dyn Fn(Vec<KeyInfo>, Vec<Certificate>, Source),
    ) -> Tally {
        self.handshakes.retain(|_, c| c.at.elapsed() < CACHE_FOR);
        // A leaf is a few KiB: at most a few MiB in all.
        if self.handshakes.len() > 1024 {
            self.handshakes.clear();
        }
        let mut tally = Tally {
            listeners: chosen.len(),
            ..Tally::default()
        };
        let mut names: Vec<Option<String>> = vec![None];
        let mut dead: Vec<u64> = Vec::new();
        let mut sent: Vec<String> = Vec::new();
        let mut i = 0;
        while i < names.len() {
            let name = names[i].clone();
            i += 1;
            for l in chosen {
                if dead.contains(&l.inode) {
                    continue;
                }
                if started.elapsed() > SEARCH_DEADLINE {
                    debug!(pid = job.tgid, "search: deadline reached");
                    return tally;
                }
                let (addr, leaf) = self.handshake(l, name.as_deref());
                tally.handshakes += 1;
                let leaf = match leaf {
                    Ok(leaf) => leaf,
                    Err(e) => {
                        debug!(pid = job.tgid, listener = %l.local, server_name = ?name, "search: handshake: {e}");
                        match e {
                            Failed::Unreachable(_) | Failed::NotTls(_) => dead.push(l.inode),
                            Failed::Tls(_) => {}
                        }
                        // A server that wants a name: the one every host has.
                        if name.is_none()
                            && !names.iter().any(|n| n.as_deref() == Some("localhost"))
                        {
                            names.push(Some("localhost".into()));
                        }
                        continue;
                    }
                };
                tally.certificates += 1;
                match material::certificate_key(&leaf) {
                    Ok(info) if !sent.contains(&info.spki_sha256) => {
                        info!(pid = job.tgid, listener = %addr, server_name = ?name, spki_sha256 = %info.spki_sha256, "search: key of a certificate the process's listener presents");
                        sent.push(info.spki_sha256.clone());
                        send_keys(
                            vec![info],
                            material::certificate_details(&leaf).into_iter().collect(),
                            Source::Listener {
                                endpoint: addr.to_string(),
                                server_name: name.clone(),
                            },
                        );
                    }
                    Ok(_) => {}
                    Err(e) => debug!(pid = job.tgid, listener = %addr, "search: certificate: {e}"),
                }
                for n in material::certificate_names(&leaf) {
                    if names.len() <= MAX_NAMES
                        && !names.iter().any(|x| x.as_deref() == Some(n.as_str()))
                    {
                        names.push(Some(n));
                    }
                }
            }
        }
        tally
    }

    /// One handshake with listener `l` (its first address that connects),
    /// or the result of the same one made lately for another process.
    fn handshake(
        &mut self,
        l: &Listener,
        name: Option<&str>,
    ) -> (SocketAddr, Result<Vec<u8>, Failed>) {
        let addrs = tls_probe::connect_addrs(l.local);
        let key = (l.inode, name.map(str::to_owned));
        if let Some(c) = self.handshakes.get(&key) {
            return (addrs[0], c.leaf.clone());
        }
        let mut got = (addrs[0], Err(Failed::Unreachable("no address".into())));
        for addr in addrs {
            got = (
                addr,
                tls_probe::fetch_certificate(addr, name, HANDSHAKE_TIMEOUT),
            );
            if !matches!(got.1, Err(Failed::Unreachable(_))) {
                break;
            }
        }
        self.handshakes.insert(
            key,
            Cached {
                at: Instant::now(),
                leaf: got.1.clone(),
            },
        );
        got
    }
}

/// The listeners to handshake with: those on the port the signature's
/// connection came in on when there are any (a server signs for the
/// clients of that port), else all, at most `MAX_LISTENERS`.
fn choose(all: &[Listener], local_port: Option<u16>) -> Vec<Listener> {
    let on_port: Vec<Listener> = all
        .iter()
        .filter(|l| Some(l.local.port()) == local_port)
        .copied()
        .collect();
    let mut chosen = if on_port.is_empty() {
        all.to_vec()
    } else {
        on_port
    };
    chosen.truncate(MAX_LISTENERS);
    chosen
}

/// Runs `f` in the network namespace of process `tgid`: here when it is
/// this thread's, else on a thread of its own that enters it and ends
/// with `f` (a network namespace is per thread, so nothing else the
/// sensor does runs in it).
fn in_netns_of<T: Send>(tgid: u32, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let theirs = format!("/proc/{tgid}/ns/net");
    let ino = |p: &str| {
        std::fs::metadata(p)
            .map(|m| m.ino())
            .map_err(|e| format!("{p}: {e}"))
    };
    if ino(&theirs)? == ino("/proc/thread-self/ns/net")? {
        return Ok(f());
    }
    let ns = std::fs::File::open(&theirs).map_err(|e| format!("{theirs}: {e}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns with a namespace descriptor this thread owns;
            // it changes only this thread's network namespace, and the
            // thread ends when `f` returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err("the search thread in its namespace panicked".into()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_on_the_signing_port_are_chosen_first() {
        let l = |inode, addr: &str| Listener {
            inode,
            local: addr.parse().unwrap(),
        };
        let all = vec![l(1, "0.0.0.0:80"), l(2, "0.0.0.0:443"), l(3, "[::]:443")];
        let chosen = choose(&all, Some(443));
        assert_eq!(
            chosen.iter().map(|l| l.inode).collect::<Vec<u64>>(),
            vec![2, 3]
        );
        assert_eq!(choose(&all, Some(8443)).len(), 3, "no listener there: all");
        assert_eq!(choose(&all, None).len(), 3);
        let many: Vec<Listener> = (0..20).map(|i| l(i, "127.0.0.1:1")).collect();
        assert_eq!(choose(&many, None).len(), MAX_LISTENERS);
    }

    fn job(id: u64, uid: u32) -> Job {
        Job {
            id,
            tgid: id as u32,
            uid,
            started: 0,
            local_port: None,
        }
    }

    #[test]
    fn users_take_turns_and_one_user_cannot_fill_the_queue() {
        let mut w = Waiting::default();
        // User 65534 queues as many as it may, and is refused beyond.
        for i in 0..QUEUE_PER_USER as u64 {
            w.push(job(i, 65534)).unwrap();
        }
        let refused = w.push(job(99, 65534)).unwrap_err();
        assert!(
            matches!(&refused, Refused::UserShare(why) if why.contains("user 65534")),
            "{refused:?}"
        );
        // Another user's search comes second, not after all of them.
        w.push(job(100, 33)).unwrap();
        w.push(job(101, 33)).unwrap();
        let order: Vec<u64> = std::iter::from_fn(|| w.pop()).map(|j| j.id).collect();
        assert_eq!(order[..4], [0, 100, 1, 101]);
        assert_eq!(order.len(), QUEUE_PER_USER + 2);
        assert_eq!(w.total, 0);
        assert!(w.by_user.is_empty() && w.turns.is_empty());
    }

    #[test]
    fn the_whole_queue_is_bounded_across_users() {
        let mut w = Waiting::default();
        let mut refused = 0;
        for i in 0..(QUEUE as u64 + 10) {
            if let Err(e) = w.push(job(i, i as u32)) {
                assert!(matches!(e, Refused::Other(_)), "{e:?}");
                refused += 1;
            }
        }
        assert_eq!(w.total, QUEUE);
        assert_eq!(refused, 10);
    }

    #[test]
    fn this_process_runs_in_its_own_namespace_directly() {
        let here = std::thread::current().id();
        let ran = in_netns_of(std::process::id(), || std::thread::current().id()).unwrap();
        assert_eq!(ran, here);
    }
}
