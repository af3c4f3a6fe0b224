//! The secret-file watch list and the coalescing of repeated opens.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hashbrown::HashMap;
use keywarden_probe_types::WatchPattern;
use serde::Deserialize;

use super::prefilter::{self, PatternError};

/// One configured entry: a glob, optionally limited to files that hold a
/// private key (`**/*.pem` matches certificates too).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum WatchEntry {
    Glob(String),
    Detailed {
        glob: String,
        #[serde(default)]
        only_private_keys: bool,
    },
}

impl WatchEntry {
    pub fn glob(&self) -> &str {
        match self {
            WatchEntry::Glob(g) | WatchEntry::Detailed { glob: g, .. } => g,
        }
    }

    fn only_private_keys(&self) -> bool {
        matches!(
            self,
            WatchEntry::Detailed {
                only_private_keys: true,
                ..
            }
        )
    }
}

/// What matched a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The first matching glob.
    pub glob: String,
    /// Every matching entry wants only files that hold a private key.
    pub only_private_keys: bool,
}

pub struct WatchList {
    set: GlobSet,
    entries: Vec<WatchEntry>,
    /// What the probe filters on, one per entry.
    pub kernel: Vec<WatchPattern>,
    /// What the exit of an open tests the opened file's name against.
    pub exit: prefilter::ExitNames,
}

impl WatchList {
    pub fn new(entries: &[WatchEntry]) -> Result<Self, PatternError> {
        let globs: Vec<String> = entries.iter().map(|e| e.glob().to_owned()).collect();
        let kernel = prefilter::compile_all(&globs)?;
        let exit = prefilter::exit_names(&globs);
        let mut builder = GlobSetBuilder::new();
        for g in &globs {
            let glob = GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| PatternError {
                    glob: g.clone(),
                    why: e.kind().to_string(),
                })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| PatternError {
            glob: String::new(),
            why: e.to_string(),
        })?;
        Ok(Self {
            set,
            entries: entries.to_vec(),
            kernel,
            exit,
        })
    }

    /// Does an absolute path (as the process saw it) match the list?
    pub fn matches(&self, path: &str) -> Option<Match> {
        let hits = self.set.matches(path);
        let first = *hits.first()?;
        Some(Match {
            glob: self.entries[first].glob().to_owned(),
            only_private_keys: hits.iter().all(|&i| self.entries[i].only_private_keys()),
        })
    }

    /// Entries naming a directory that does not exist on this host, for a
    /// warning (a typo watches nothing; containers may still have it).
    pub fn missing_roots(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| e.glob())
            .filter(|g| g.starts_with('/'))
            .filter_map(|g| {
                let literal = match g.find(['*', '?', '[', '{']) {
                    None => g,
                    Some(i) => &g[..g[..i].rfind('/').unwrap_or(0).max(1)],
                };
                (!std::path::Path::new(literal).exists())
                    .then(|| format!("{g} ({literal} does not exist on this host)"))
            })
            .collect()
    }
}

/// One open window: when it opened, the first open's record, how many
/// opens, and the last one's time.
struct Window<T> {
    opened: Instant,
    first: T,
    count: u32,
    last_ms: i64,
}

/// Windows one process may have open at once. A process that opens more
/// distinct watched paths within a window than this (a flood of `*.key`
/// names, say) has the rest shed and counted: its first 1024 paths a
/// second are reported, and every other process is unaffected.
pub const PER_PROCESS: usize = 1024;

/// Windows open at once, for all processes. Past it the oldest window
/// closes early and its event is written: memory stays bounded and no
/// open is lost, the busiest files are only coalesced less. About 3 KB a
/// window (the first open's event), so 24 MiB at most.
pub const CAPACITY: usize = 8192;

/// Opens of one file by one process within the window become one event.
/// Keyed by process, then path, so a repeat is found without allocating.
///
/// Bounded: at most `PER_PROCESS` windows per process (further paths are
/// shed, counted in `shed`) and `CAPACITY` in all (the oldest is closed
/// early). Every window has the same length, so windows close in the order
/// they opened: `order` holds them oldest first, and closing them never
/// scans the rest.
pub struct Coalescer<T> {
    window: Duration,
    pending: HashMap<u32, HashMap<String, Window<T>>>,
    /// Every open window, oldest first: when it opened, process, path.
    order: VecDeque<(Instant, u32, String)>,
    per_process: usize,
    capacity: usize,
    /// Opens not reported because their process already had
    /// `per_process` windows open.
    pub shed: u64,
}

/// A closed window: the first open's record, the count, and the last
/// open's time.
pub type Closed<T> = (T, u32, i64);

impl<T> Coalescer<T> {
    pub fn new(window: Duration) -> Self {
        Self::bounded(window, PER_PROCESS, CAPACITY)
    }

    /// With other bounds than the defaults (for tests).
    pub fn bounded(window: Duration, per_process: usize, capacity: usize) -> Self {
        Self {
            window,
            pending: HashMap::new(),
            order: VecDeque::new(),
            per_process: per_process.max(1),
            capacity: capacity.max(1),
            shed: 0,
        }
    }

    /// Windows open now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }

    /// Counts an open into a window already open for (process, path).
    /// Returns false when there is none (the caller then calls `add`).
    pub fn join(&mut self, tgid: u32, path: &str, time_ms: i64) -> bool {
        match self.pending.get_mut(&tgid).and_then(|m| m.get_mut(path)) {
            Some(w) => {
                w.count += 1;
                w.last_ms = time_ms;
                true
            }
            None => false,
        }
    }

    /// Whether the process may open one more window. When it may not, the
    /// open is shed and counted: the caller reports nothing for it. Asked
    /// before the event is built, so a shed open costs no attribution.
    pub fn admit(&mut self, tgid: u32) -> bool {
        let open = self.pending.get(&tgid).map_or(0, |m| m.len());
        if open < self.per_process {
            return true;
        }
        self.shed += 1;
        false
    }

    /// Opens a window with its first open (after `join` found none). When
    /// `capacity` windows are open already, the oldest closes now and is
    /// returned, for the caller to write at once.
    pub fn add(&mut self, tgid: u32, path: &str, time_ms: i64, first: T) -> Option<Closed<T>> {
        // Callers join first; should one not, the open still counts once.
        if self.join(tgid, path, time_ms) {
            return None;
        }
        let evicted = if self.order.len() >= self.capacity {
            self.close_oldest()
        } else {
            None
        };
        let opened = Instant::now();
        let window = Window {
            opened,
            first,
            count: 1,
            last_ms: time_ms,
        };
        self.pending
            .entry(tgid)
            .or_default()
            .insert(path.to_owned(), window);
        self.order.push_back((opened, tgid, path.to_owned()));
        evicted
    }

    /// Windows that have closed (all of them with `flush`), oldest first.
    pub fn due(&mut self, flush: bool) -> Vec<Closed<T>> {
        let now = Instant::now();
        let mut out = Vec::new();
        while let Some(&(opened, _, _)) = self.order.front() {
            if !flush && now.duration_since(opened) < self.window {
                break;
            }
            if let Some((opened, tgid, path)) = self.order.pop_front() {
                out.extend(self.take(tgid, &path, opened));
            }
        }
        out
    }

    /// Closes the oldest window.
    fn close_oldest(&mut self) -> Option<Closed<T>> {
        while let Some((opened, tgid, path)) = self.order.pop_front() {
            if let Some(closed) = self.take(tgid, &path, opened) {
                return Some(closed);
            }
        }
        None
    }

    /// Removes the window of (process, path) if it is the one that opened
    /// at `opened`.
    fn take(&mut self, tgid: u32, path: &str, opened: Instant) -> Option<Closed<T>> {
        let windows = self.pending.get_mut(&tgid)?;
        if windows.get(path)?.opened != opened {
            return None;
        }
        let w = windows.remove(path)?;
        if windows.is_empty() {
            self.pending.remove(&tgid);
        }
        Some((w.first, w.count, w.last_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Vec<WatchEntry> {
        let text = "
- /etc/ssl/private/**
- '**/*.key'
- { glob: '**/*.pem', only_private_keys: true }
- '**/.env'
- '**/.aws/credentials'
- /var/run/secrets/kubernetes.io/serviceaccount/token
- '**/.ssh/id_*'
";
        serde_saphyr::from_str(text).unwrap()
    }

    #[test]
    fn default_list_matches_what_it_should() {
        let w = WatchList::new(&defaults()).unwrap();
        let m = |p: &str| w.matches(p).map(|m| (m.glob, m.only_private_keys));
        assert_eq!(
            m("/etc/ssl/private/site.key").unwrap().0,
            "/etc/ssl/private/**"
        );
        assert_eq!(
            m("/etc/ssl/private/nested/x").unwrap().0,
            "/etc/ssl/private/**"
        );
        assert_eq!(m("/home/a/app/server.key").unwrap().0, "**/*.key");
        assert_eq!(m("/srv/x/cert.pem"), Some(("**/*.pem".into(), true)));
        assert_eq!(m("/srv/app/.env").unwrap().0, "**/.env");
        assert_eq!(
            m("/root/.aws/credentials").unwrap().0,
            "**/.aws/credentials"
        );
        assert!(m("/var/run/secrets/kubernetes.io/serviceaccount/token").is_some());
        assert_eq!(m("/home/a/.ssh/id_ed25519").unwrap().0, "**/.ssh/id_*");
        for no in [
            "/srv/app/.envrc",
            "/home/a/.ssh/known_hosts",
            "/etc/passwd",
            "/srv/key.txt",
            "/home/a/id_rsa",
        ] {
            assert_eq!(m(no), None, "{no}");
        }
    }

    #[test]
    fn kernel_prefilter_is_a_superset_of_the_globs() {
        // Every path the globs match must pass the compiled kernel tests.
        let w = WatchList::new(&defaults()).unwrap();
        let passes = |path: &str| {
            w.kernel.iter().any(|p| {
                let full = p.literal();
                let lit = &full[..p.len as usize];
                let b = path.as_bytes();
                match p.kind {
                    keywarden_probe_types::watch::PATH_PREFIX => b.starts_with(lit),
                    keywarden_probe_types::watch::PATH_SUFFIX => b.ends_with(lit),
                    keywarden_probe_types::watch::BASENAME_PREFIX => {
                        path.rsplit('/').next().unwrap().as_bytes().starts_with(lit)
                    }
                    keywarden_probe_types::watch::PATH_EXACT => b == lit,
                    _ => false,
                }
            })
        };
        for p in [
            "/etc/ssl/private/a",
            "/x/y.key",
            "/x/y.pem",
            "/x/.env",
            "/r/.aws/credentials",
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "/h/.ssh/id_rsa",
        ] {
            assert!(w.matches(p).is_some(), "{p}");
            assert!(
                passes(p),
                "{p} matched by a glob but not by the kernel test"
            );
        }
        assert!(!passes("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    }

    #[test]
    fn bad_entries_and_missing_roots_are_named() {
        let bad = vec![WatchEntry::Glob("**/*".into())];
        let e = WatchList::new(&bad).err().unwrap();
        assert!(e.to_string().contains("\"**/*\""), "{e}");
        let w = WatchList::new(&[WatchEntry::Glob("/no/such/dir/**".into())]).unwrap();
        assert_eq!(
            w.missing_roots(),
            vec!["/no/such/dir/** (/no/such/dir does not exist on this host)".to_owned()]
        );
    }

    #[test]
    fn repeated_opens_coalesce_per_process_and_path() {
        let mut c: Coalescer<&str> = Coalescer::new(Duration::from_secs(60));
        assert!(!c.join(1, "/a", 10));
        c.add(1, "/a", 10, "first");
        assert!(c.join(1, "/a", 20));
        assert!(c.join(1, "/a", 30));
        assert!(!c.join(2, "/a", 40));
        c.add(2, "/a", 40, "other pid");
        assert!(c.join(2, "/a", 45));
        assert!(!c.join(3, "/a", 45), "no window for pid 3");
        assert!(c.due(false).is_empty(), "window still open");
        let mut out = c.due(true);
        out.sort();
        assert_eq!(out, vec![("first", 3, 30), ("other pid", 2, 45)]);
        let mut c: Coalescer<u8> = Coalescer::new(Duration::ZERO);
        c.add(1, "/a", 1, 1);
        assert_eq!(c.due(false), vec![(1, 1, 1)]);
    }

    /// A process flooding distinct paths keeps at most `per_process`
    /// windows; the rest are shed and counted, and other processes and
    /// repeats of its open paths are unaffected.
    #[test]
    fn a_process_flooding_distinct_paths_is_bounded_and_counted() {
        let mut c: Coalescer<u32> = Coalescer::bounded(Duration::from_secs(60), 4, 100);
        let mut admitted = 0;
        for i in 0..10_000u32 {
            let path = format!("/tmp/flood/{i}.key");
            if c.join(1, &path, i as i64) {
                continue;
            }
            if c.admit(1) {
                assert!(c.add(1, &path, i as i64, i).is_none());
                admitted += 1;
            }
        }
        assert_eq!(admitted, 4);
        assert_eq!(c.shed, 10_000 - 4);
        assert_eq!(c.len(), 4, "memory stays bounded");
        // Repeats of an open path still join its window.
        assert!(c.join(1, "/tmp/flood/0.key", 20_000));
        // Another process is not affected by the first one's flood.
        assert!(c.admit(2));
        assert!(c.add(2, "/srv/.env", 1, 99).is_none());
        assert_eq!(c.shed, 10_000 - 4);
        let mut out = c.due(true);
        out.sort();
        assert_eq!(out[0], (0, 2, 20_000));
        assert_eq!(out.len(), 5);
        // Once its windows close, the process is reported again.
        assert!(c.admit(1));
    }

    /// Past `capacity` windows in all, the oldest closes early and comes
    /// back to be written: nothing is shed, memory stays bounded.
    #[test]
    fn past_capacity_the_oldest_window_closes_early() {
        let mut c: Coalescer<u32> = Coalescer::bounded(Duration::from_secs(60), 1000, 3);
        let mut closed = Vec::new();
        for pid in 0..10u32 {
            assert!(c.admit(pid));
            closed.extend(c.add(pid, "/a.key", pid as i64, pid));
            assert!(c.len() <= 3);
        }
        assert_eq!(closed, (0..7).map(|p| (p, 1, p as i64)).collect::<Vec<_>>());
        assert_eq!(c.shed, 0);
        assert!(c.due(false).is_empty(), "the rest are still open");
        assert_eq!(c.due(true).len(), 3);
        assert_eq!(c.len(), 0);
    }
}
