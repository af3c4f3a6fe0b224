//! Loads the embedded eBPF object and attaches it.
//!
//! Each attach point carries a cookie (`library index << 8 | function id`),
//! so a single pair of programs serves every function of every library the
//! sensor covers. Dropping `Probes` detaches everything. The peer and
//! open hooks, chosen by what the kernel allows, are `hooks.rs`.
//!
//! Over 600 lines because loading, attaching, the free probes and the
//! map accessors share the one `Ebpf` object; the map accessors are what
//! to move out next.

use std::{
    num::NonZeroU32,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::Path,
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use hashbrown::HashMap;
use keywarden_probe_types::{
    ExeId, HoldLease, KnownHandle, LibrarySeenKey, NameTail, ProcPtr, SockLayout, TaskLayout,
    WatchPattern, config, func, name_affix, name_hash, name_kind, stats, watch,
};
use tracing::{debug, info};

use crate::{config::OpenHook, secrets::prefilter::ExitNames};

mod hooks;
mod skipped;
use crate::discovery::{
    placement,
    signing_code::{self, SigningCode, Stack, needs_return},
    targets::Candidate,
};

/// One covered ELF file (a library or a program).
#[derive(Debug, Clone)]
pub struct Library {
    pub index: u32,
    pub shown_as: String,
    /// (function id, stack) of each attached function.
    pub functions: Vec<(u8, Stack, String)>,
    pub missing: Vec<&'static str>,
    pub build_id: Option<String>,
}

impl Library {
    /// The stack a function of this file belongs to, for events.
    pub fn stack_of(&self, id: u8) -> &'static str {
        self.functions
            .iter()
            .find(|(f, _, _)| *f == id)
            .map(|(_, s, _)| s.name())
            .unwrap_or("unknown")
    }

    pub fn stacks(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for (_, s, _) in &self.functions {
            if !out.contains(&s.name()) {
                out.push(s.name());
            }
        }
        out
    }
}

pub struct Probes {
    ebpf: Ebpf,
    libraries: Vec<Arc<Library>>,
    by_inode: HashMap<(u64, u64), u32>,
    /// Each library's free functions, attached per process (`free_watch`).
    frees: HashMap<u32, FreeProbes>,
    /// This sensor's name in the host-wide hold lease (`HoldLease`).
    hold_token: u64,
    /// Links to detach, for the detaching thread (`Detacher`).
    detacher: Detacher,
    /// Why libgcrypt's return program did not load (it needs `bpf_loop`,
    /// Linux 5.17), if it did not: `gcry_pk_sign` is then not probed.
    sexp_refused: Option<String>,
}

/// Detaches uprobe links on a thread of its own. Removing a uprobe from a
/// process waits for the kernel (an RCU grace period, a third of a second
/// in a VM), and the sensor removes a process's free probes when it exits:
/// on the event thread, a user who starts and ends signing processes in a
/// loop would stall it for that long each time. A link is taken out of the
/// program and dropped here, which detaches it; until then its probes stay,
/// which only makes the probes see more.
struct Detacher {
    links: crossbeam_channel::Sender<UProbeLink>,
}

impl Detacher {
    fn start() -> Result<Detacher> {
        let (links, rx) = crossbeam_channel::unbounded::<UProbeLink>();
        std::thread::Builder::new()
            .name("keywarden-detach".into())
            .spawn(move || {
                // Dropping a link detaches it; the channel closes with the
                // sensor.
                for link in rx {
                    drop(link);
                }
            })
            .context("starting the detaching thread")?;
        Ok(Detacher { links })
    }
}

/// A library's free functions (`EVP_PKEY_free`, `EVP_PKEY_sign_init`),
/// which are attached to one process at a time rather than host-wide
/// (`crate::free_watch` says why).
struct FreeProbes {
    /// Kept open: later attaches name the file by this descriptor, so they
    /// reach the same inode even once the path it was found by (a
    /// container's root under `/proc/PID`) is gone.
    file: std::fs::File,
    /// (file offset, cookie)
    points: Vec<(u64, u64)>,
}

/// Whether an attach failed because its target process is gone or exiting.
pub fn process_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|n| n == libc::ESRCH || n == libc::ENOENT)
    })
}

/// Who holds processes on this host, as seen at a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// This sensor: its probes may hold.
    Ours,
    /// Another live sensor; this one attaches without holding.
    Other,
}

/// A random, non-zero token: two sensors in different PID namespaces can
/// share a PID, never a token.
fn new_hold_token() -> u64 {
    let mut buf = [0u8; 8];
    loop {
        // SAFETY: writes at most buf.len() bytes into buf.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        let token = u64::from_ne_bytes(buf);
        if n == buf.len() as isize && token != 0 {
            return token;
        }
    }
}

/// The functions whose calls make a cached verdict on a key object void.
fn invalidates(id: u8) -> bool {
    matches!(
        func::describe(id).map(|f| f.role),
        Some(func::Role::Forget { .. })
    )
}

/// Opens a path, checking it is still the file (device, inode) scanned.
fn open_same_file(path: &Path, (dev, ino): (u64, u64)) -> Result<std::fs::File> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let md = file.metadata()?;
    if (md.dev(), md.ino()) != (dev, ino) {
        bail!("{} was replaced since it was scanned", path.display());
    }
    Ok(file)
}

/// A file's identity as the probes read it from its inode.
pub fn file_id(md: &std::fs::Metadata) -> ExeId {
    ExeId {
        valid: 1,
        mtime_nsec: md.mtime_nsec() as u32,
        ino: md.ino(),
        size: md.size(),
        mtime_sec: md.mtime(),
    }
}

/// A map delete: an entry that is already gone is what was wanted.
pub(crate) fn removed(r: Result<(), aya::maps::MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Where maps that must outlive a sensor are pinned (bpffs).
pub const PIN_DIR: &str = "/sys/fs/bpf/keywarden";

/// The two ring buffers: bulk events (timer-drained) and control records
/// (exec, new libraries; each wakes the control thread).
pub struct Rings {
    pub events: RingBuf<MapData>,
    pub control: RingBuf<MapData>,
}

impl Probes {
    /// Loads the probes, with an event ring of `ring_bytes` (a power of
    /// two; `Config::ring_buffer_bytes`), opens served as `open_hook` says.
    pub fn load(ring_bytes: u32, open_hook: OpenHook) -> Result<(Self, Rings)> {
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keywarden-probes"));
        crate::host::ensure_pin_dir(PIN_DIR)?;
        crate::host::ensure_tracefs()?;
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(PIN_DIR)
            .map_max_entries("EVENTS", ring_bytes)
            .load(object)
            .context("loading keywarden's eBPF object")?;
        for name in [
            "sign_entry",
            "context_entry",
            "free_entry",
            "sign_return",
            "go_sign_entry",
            "go_sign_return",
        ] {
            let p: &mut UProbe = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()
                .with_context(|| format!("loading uprobe program {name}"))?;
        }
        let sexp: &mut UProbe = ebpf
            .program_mut("sexp_sign_return")
            .context("sexp_sign_return")?
            .try_into()?;
        let sexp_refused = match sexp.load() {
            Ok(()) => None,
            Err(e) => {
                let why = format!(
                    "this kernel refused the program that reads its S-expressions (it needs bpf_loop, \
                     Linux 5.17): {}",
                    hooks::brief(&e)
                );
                tracing::warn!("libgcrypt's signatures are not seen: {why}");
                Some(why)
            }
        };
        let btf = hooks::kernel_btf();
        hooks::attach_peers(&mut ebpf, &btf)?;
        hooks::attach_opens(&mut ebpf, open_hook, &btf)?;
        hooks::say_io_uring(&hooks::attach_uring(&mut ebpf));
        for (name, category, tp) in [
            ("process_exec", "sched", "sched_process_exec"),
            ("process_exit", "sched", "sched_process_exit"),
        ] {
            let p: &mut TracePoint = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()
                .with_context(|| format!("loading tracepoint program {name}"))?;
            p.attach(category, tp)
                .with_context(|| format!("attaching to tracepoint {category}/{tp}"))?;
        }
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map")?)?;
        let control = RingBuf::try_from(ebpf.take_map("CONTROL").context("CONTROL map")?)?;
        let mut probes = Self {
            ebpf,
            libraries: Vec::new(),
            by_inode: HashMap::new(),
            frees: HashMap::new(),
            hold_token: new_hold_token(),
            detacher: Detacher::start()?,
            sexp_refused,
        };
        probes.set_config(config::HOLD_TOKEN, probes.hold_token)?;
        Ok((probes, Rings { events, control }))
    }

    /// This sensor's name in the host-wide hold lease; the watchdog needs
    /// it to void the lease for a sensor that died holding it.
    pub fn hold_token(&self) -> u64 {
        self.hold_token
    }

    pub fn libraries(&self) -> &[Arc<Library>] {
        &self.libraries
    }

    /// The library a record came from; shared, so the event thread takes
    /// a reference count per event rather than a copy.
    pub fn library(&self, index: u32) -> Option<Arc<Library>> {
        self.libraries.get(index as usize).cloned()
    }

    pub fn is_covered(&self, dev: u64, ino: u64) -> bool {
        self.by_inode.contains_key(&(dev, ino))
    }

    /// Whether the file is Go code with signing probes.
    pub fn is_go(&self, dev: u64, ino: u64) -> bool {
        self.by_inode
            .get(&(dev, ino))
            .and_then(|&i| self.libraries.get(i as usize))
            .is_some_and(|l| l.functions.iter().any(|(_, stack, _)| *stack == Stack::Go))
    }

    /// Tells the probes that `tgid` runs probed Go code: its receives are
    /// then also kept per goroutine, which names the peer of each
    /// signature exactly (goroutines move between threads). The kernel
    /// drops the mark at exec and exit.
    pub fn mark_go_process(&mut self, tgid: u32) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u32, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut("GO_PROCS").context("GO_PROCS map")?)?;
        map.insert(&tgid, &1u8, 0)?;
        Ok(())
    }

    /// Attaches to the signing code found in a file, unless its inode is
    /// covered already. Returns the library when this call attached it.
    pub fn attach(&mut self, c: &Candidate, code: &SigningCode) -> Result<Option<Arc<Library>>> {
        let key = (c.dev, c.ino);
        if self.by_inode.contains_key(&key) {
            return Ok(None);
        }
        if !code.can_see_signatures() {
            bail!(
                "{}: no signing function ({}) is in its symbol table{}; signatures made through it are not seen",
                c.shown_as,
                signing_code::signing_functions(),
                if code.stripped {
                    " (the file is stripped)"
                } else {
                    ""
                }
            );
        }
        let index = self.libraries.len() as u32;
        let mut entry: Vec<UProbeAttachPoint<'static>> = Vec::new();
        let mut context: Vec<UProbeAttachPoint<'static>> = Vec::new();
        let mut ret: Vec<UProbeAttachPoint<'static>> = Vec::new();
        // libgcrypt's, whose result is S-expressions.
        let mut sexp_ret: Vec<UProbeAttachPoint<'static>> = Vec::new();
        // Go code: an entry probe past the stack check, one per `ret`.
        let mut go_entry: Vec<UProbeAttachPoint<'static>> = Vec::new();
        let mut go_ret: Vec<UProbeAttachPoint<'static>> = Vec::new();
        // (offset, cookie) of the free functions, attached per process later.
        let mut frees: Vec<(u64, u64)> = Vec::new();
        let mut functions = Vec::new();
        let refused = |id| func::returns_sexp(id) && self.sexp_refused.is_some();
        if code.points.iter().all(|p| refused(p.id)) {
            bail!(
                "{}: libgcrypt's gcry_pk_sign is not probed: {}",
                c.shown_as,
                self.sexp_refused.as_deref().unwrap_or_default()
            );
        }
        for p in code.points.iter().filter(|p| !refused(p.id)) {
            let at = |o| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(o),
                cookie: Some(func::cookie(index, p.id)),
            };
            if let Some(go) = &p.go {
                go_entry.push(at(p.offset + go.entry));
                go_ret.extend(go.returns.iter().map(|r| at(p.offset + r)));
            } else if needs_return(p.id) {
                entry.push(at(p.offset));
                if func::returns_sexp(p.id) {
                    sexp_ret.push(at(p.offset));
                } else {
                    ret.push(at(p.offset));
                }
            } else if let Some((shift, register)) = p
                .freed
                .and_then(|f| Some((f.offset, placement::register_code(f.object_in)?)))
            {
                // Only real frees trap (libssl drops references to the
                // server key several times per handshake).
                debug!(function = %p.symbol, shift, register, "free probe past the count's test");
                frees.push((
                    p.offset + shift,
                    func::cookie_with_register(index, func::PKEY_FREED, register),
                ));
            } else {
                let args = placement::argument_registers(p.id);
                let shift = placement::entry_offset(&p.code, &args);
                debug!(function = %p.symbol, shift, "entry probe placement");
                if invalidates(p.id) {
                    frees.push((p.offset + shift, func::cookie(index, p.id)));
                } else {
                    context.push(at(p.offset + shift));
                }
            }
            functions.push((p.id, p.stack, p.symbol.clone()));
        }
        for (program, points, what) in [
            ("sign_entry", entry, "entry"),
            ("context_entry", context, "context"),
            ("sign_return", ret, "return"),
            ("sexp_sign_return", sexp_ret, "S-expression return"),
            ("go_sign_entry", go_entry, "Go entry"),
            ("go_sign_return", go_ret, "Go return-instruction"),
        ] {
            if points.is_empty() {
                continue;
            }
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(program)
                .context(program)?
                .try_into()?;
            prog.attach(points, &c.open_path, UProbeScope::AllProcesses)
                .with_context(|| format!("{}: attaching {what} uprobes", c.shown_as))?;
        }
        let lib = Library {
            index,
            shown_as: c.shown_as.clone(),
            functions,
            missing: code.missing.clone(),
            build_id: code.build_id.clone(),
        };
        info!(
            library = %lib.shown_as,
            index = lib.index,
            stacks = ?lib.stacks(),
            build_id = lib.build_id.as_deref().unwrap_or("none"),
            functions = lib.functions.len(),
            missing = ?lib.missing,
            "attached"
        );
        if !frees.is_empty() {
            match open_same_file(&c.open_path, key) {
                Ok(file) => {
                    self.frees.insert(
                        index,
                        FreeProbes {
                            file,
                            points: frees,
                        },
                    );
                }
                // Without its free probes no verdict on this file's
                // signatures is cached: each one is verified.
                Err(e) => tracing::warn!(
                    library = %lib.shown_as,
                    error = %e,
                    "key objects' frees cannot be watched: every signature through it is verified"
                ),
            }
        }
        self.by_inode.insert(key, index);
        let lib = Arc::new(lib);
        self.libraries.push(lib.clone());
        Ok(Some(lib))
    }

    /// Whether a library has free functions to watch (a Rust signer with no
    /// C key object has none, and needs none: it is verified every time).
    pub fn has_free_probes(&self, library: u32) -> bool {
        self.frees.contains_key(&library)
    }

    /// Attaches a library's free functions for one process (`Some(tgid)`)
    /// or host-wide (`None`). Once this returns they trap: the kernel
    /// installs a uprobe in the matching processes' memory before the
    /// attach completes.
    pub fn attach_frees(&mut self, library: u32, tgid: Option<u32>) -> Result<UProbeLinkId> {
        let f = self
            .frees
            .get(&library)
            .with_context(|| format!("library {library} has no free functions"))?;
        let scope = match tgid.and_then(NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let points = f.points.iter().map(|&(offset, cookie)| UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(offset),
            cookie: Some(cookie),
        });
        let path = format!("/proc/self/fd/{}", f.file.as_raw_fd());
        let prog: &mut UProbe = self
            .ebpf
            .program_mut("free_entry")
            .context("free_entry")?
            .try_into()?;
        Ok(prog.attach(points, &path, scope)?)
    }

    /// Detaches free probes, on the detaching thread (`Detacher`). The
    /// link is the program's (its id is spent) once this returns; the
    /// probes go a moment later.
    pub fn detach_frees(&mut self, link: UProbeLinkId) {
        let taken = self
            .ebpf
            .program_mut("free_entry")
            .and_then(|p| <&mut UProbe>::try_from(p).ok())
            .map(|p| p.take_link(link));
        match taken {
            Some(Ok(link)) => {
                // The thread ends only with the sensor: a closed channel
                // hands the link back, and dropping it here detaches it.
                if let Err(e) = self.detacher.links.send(link) {
                    drop(e.into_inner());
                }
            }
            Some(Err(e)) => debug!(error = %e, "detaching free probes"),
            None => debug!("detaching free probes: no free_entry program"),
        }
    }

    /// Tells the probes where `struct sock` keeps its addresses (turns on
    /// peer attribution) and where a task's executable and root are (lets
    /// the sensor hash the file of a process that already exited, and read
    /// the key files it opened).
    pub fn set_kernel_layout(
        &mut self,
        sock: Option<&SockLayout>,
        task: Option<&TaskLayout>,
    ) -> Result<()> {
        if let Some(sock) = sock {
            self.array::<SockLayout>("SOCK_LAYOUT")?.set(0, sock, 0)?;
        }
        if let Some(task) = task {
            self.array::<TaskLayout>("TASK_LAYOUT")?.set(0, task, 0)?;
        }
        Ok(())
    }

    /// One of the probes' array maps, by name.
    fn array<T: aya::Pod>(&mut self, name: &str) -> Result<Array<&mut MapData, T>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("{name} map"))?;
        Ok(Array::try_from(map)?)
    }

    pub fn set_config(&mut self, slot: u32, value: u64) -> Result<()> {
        self.array::<u64>("CONFIG")?.set(slot, &value, 0)?;
        Ok(())
    }

    /// Renews this sensor's hold lease, or takes it when nobody holds it or
    /// its holder's heartbeat is stale. Holding stops by itself when
    /// heartbeats stop. Two sensors racing for a free lease may both write
    /// it; the probes obey whichever write came last, so at any moment at
    /// most one sensor holds, and the loser sees `Other` at its next beat.
    pub fn heartbeat(&mut self) -> Result<Lease> {
        let now = crate::clock::monotonic_ns();
        let token = self.hold_token;
        let mut map = self.array::<HoldLease>("HOLD_LEASE")?;
        let lease = map.get(&0, 0)?;
        let free = lease.token == 0
            || lease.heartbeat_ns == 0
            || now.saturating_sub(lease.heartbeat_ns) >= config::HEARTBEAT_MAX_AGE_NS;
        if lease.token != token && !free {
            return Ok(Lease::Other);
        }
        let renewed = HoldLease {
            token,
            heartbeat_ns: now,
        };
        map.set(0, &renewed, 0)?;
        Ok(Lease::Ours)
    }

    /// Gives the lease up at shutdown (if this sensor holds it), so another
    /// running sensor can take it at its next heartbeat rather than after
    /// the lease goes stale.
    pub fn give_up_lease(&mut self) -> Result<()> {
        let token = self.hold_token;
        let mut map = self.array::<HoldLease>("HOLD_LEASE")?;
        if map.get(&0, 0)?.token == token {
            map.set(0, &HoldLease::default(), 0)?;
        }
        Ok(())
    }

    /// Marks a library path, as the file it is now, as seen in a cgroup so
    /// opening it there again does not hold the process.
    pub fn mark_library_seen(&mut self, cgroup_id: u64, path: &str, file: &ExeId) -> Result<()> {
        let mut seen: BpfHashMap<&mut MapData, LibrarySeenKey, u8> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("LIBRARY_SEEN")
                .context("LIBRARY_SEEN map")?,
        )?;
        let key = LibrarySeenKey::new(cgroup_id, path.as_bytes(), file);
        seen.insert(&key, &1, 0)?;
        Ok(())
    }

    /// Loads the compiled secret-file watch list; unused slots are cleared.
    pub fn set_watch(&mut self, patterns: &[WatchPattern]) -> Result<()> {
        let mut arr = self.array::<WatchPattern>("WATCH")?;
        for slot in 0..watch::SLOTS {
            arr.set(
                slot,
                patterns.get(slot as usize).unwrap_or(&WatchPattern::EMPTY),
                0,
            )?;
        }
        Ok(())
    }

    /// Adds this sensor to the pinned `SENSORS` set (never held), with its
    /// start time, after pruning the entries of sensors that are gone: a
    /// pid whose process started at another time is a reused pid, never
    /// exempt. (A sensor of another build running beside this one stays.)
    pub fn register_sensor(&mut self) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u32, u64> =
            BpfHashMap::try_from(self.ebpf.map_mut("SENSORS").context("SENSORS map")?)?;
        let stale: Vec<u32> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|&(pid, started)| crate::free_watch::start_time(pid) != Some(started))
            .map(|(pid, _)| pid)
            .collect();
        for pid in stale {
            removed(map.remove(&pid))?;
        }
        let own = std::process::id();
        let started = crate::free_watch::start_time(own).context("reading /proc/self/stat")?;
        map.insert(&own, &started, 0)
            .context("adding this sensor to SENSORS")?;
        Ok(())
    }

    /// Removes this sensor from `SENSORS` at exit.
    pub fn unregister_sensor(&mut self) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u32, u64> =
            BpfHashMap::try_from(self.ebpf.map_mut("SENSORS").context("SENSORS map")?)?;
        removed(map.remove(&std::process::id()))
    }

    /// Processes still recorded as held (by this or an earlier sensor).
    pub fn held(&self) -> Result<Vec<(u32, u64)>> {
        let map: BpfHashMap<&MapData, u32, u64> =
            BpfHashMap::try_from(self.ebpf.map("HELD").context("HELD map")?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Forgets a held process (after it was released). A failure is only
    /// logged: the entry then ages out as an orphan, whose release is a
    /// harmless SIGCONT.
    pub fn forget_held(&mut self, tgid: u32) {
        let r = BpfHashMap::<&mut MapData, u32, u64>::try_from(
            self.ebpf.map_mut("HELD").expect("HELD map"),
        )
        .map_err(anyhow::Error::from)
        .and_then(|mut map| removed(map.remove(&tgid)));
        if let Err(e) = r {
            tracing::warn!(pid = tgid, error = %e, "cannot remove a released process from HELD");
        }
    }

    /// Marks (tgid, key object) as judged by the sensor, or not any more.
    pub fn set_known(&mut self, tgid: u32, handle: u64, generation: Option<u64>) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, ProcPtr, KnownHandle> =
            BpfHashMap::try_from(self.ebpf.map_mut("KNOWN").context("KNOWN map")?)?;
        let key = ProcPtr {
            tgid,
            _pad: 0,
            ptr: handle,
        };
        if let Some(generation) = generation {
            map.insert(&key, &KnownHandle { generation }, 0)?;
        } else {
            removed(map.remove(&key))?;
        }
        Ok(())
    }

    /// Condemns a process (`Some(index)`): its next signature attempt is
    /// killed in the kernel. `None` pardons it.
    pub fn set_verdict(&mut self, tgid: u32, verdict: Option<u32>) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("VERDICT").context("VERDICT map")?)?;
        match verdict {
            Some(v) => map.insert(&tgid, &v, 0)?,
            None => removed(map.remove(&tgid))?,
        }
        Ok(())
    }

    /// Adds the basename of a file holding a protected key: opening any
    /// file of that name holds the opener until the sensor has judged it.
    pub fn protect_name(&mut self, basename: &str) -> Result<()> {
        // The entry's test of the path the process gave.
        let mut map: BpfHashMap<&mut MapData, u64, u8> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("PROTECTED_NAMES")
                .context("PROTECTED_NAMES map")?,
        )?;
        map.insert(&name_hash(basename.as_bytes()), &1, 0)?;
        // The exit's test of the opened file's own name.
        self.add_file_name(basename, name_kind::PROTECTED)
    }

    /// What the exit of every open tests the opened file's own name
    /// against for the watch list (`secrets::prefilter::exit_names`).
    pub fn set_exit_names(&mut self, names: &ExitNames) -> Result<()> {
        for n in &names.names {
            self.add_file_name(n, name_kind::WATCHED)?;
        }
        // Packed, beginnings first (`config::NAME_AFFIX_SLOTS`).
        let beginnings = names
            .beginnings
            .iter()
            .map(|b| name_affix(b.as_bytes(), false));
        let endings = names.endings.iter().map(|e| name_affix(e.as_bytes(), true));
        let words: Vec<u64> = beginnings.chain(endings).collect();
        let mut slots = self.array::<u64>("CONFIG")?;
        for i in 0..2 * config::NAME_AFFIXES {
            let word = words.get(i as usize).copied().unwrap_or(0);
            slots.set(config::NAME_AFFIX_SLOTS + i, &word, 0)?;
        }
        Ok(())
    }

    /// Marks `basename` as `kind` in `FILE_NAMES` and `NAME_TAILS`, beside
    /// what it already is, and its length in `config::NAME_LENS`: the exit
    /// of every open looks the opened file's name up only when its length
    /// is one of these.
    fn add_file_name(&mut self, basename: &str, kind: u8) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, u64, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut("FILE_NAMES").context("FILE_NAMES map")?)?;
        let hash = name_hash(basename.as_bytes());
        let was = map.get(&hash, 0).unwrap_or(0);
        map.insert(&hash, &(was | kind), 0)?;
        let mut tails: BpfHashMap<&mut MapData, NameTail, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut("NAME_TAILS").context("NAME_TAILS map")?)?;
        let tail = NameTail::new(basename.as_bytes());
        let was = tails.get(&tail, 0).unwrap_or(0);
        tails.insert(&tail, &(was | kind), 0)?;
        let mut slots = self.array::<u64>("CONFIG")?;
        let lens = slots.get(&config::NAME_LENS, 0)? | 1u64 << basename.len().min(63);
        slots.set(config::NAME_LENS, &lens, 0)?;
        Ok(())
    }

    /// Each loaded program whose runs the kernel skipped, and how many
    /// (`skipped`), in load order.
    pub fn skipped_runs(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (name, program) in self.ebpf.programs() {
            let Ok(fd) = program.fd() else { continue };
            match skipped::recursion_misses(fd.as_fd()) {
                Ok(0) => {}
                Ok(n) => out.push((name.to_owned(), n)),
                Err(e) => debug!(program = name, error = %e, "reading the program's skipped runs"),
            }
        }
        out
    }

    /// Events the probes could not deliver, summed over CPUs, per
    /// `stats::*` slot. Read every 250 ms (`run::report_shed`), so it logs
    /// nothing itself: the `stopped:` line has the totals.
    pub fn lost(&self) -> Result<[u64; stats::SLOTS as usize]> {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("STATS map")?)?;
        let mut out = [0u64; stats::SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}
