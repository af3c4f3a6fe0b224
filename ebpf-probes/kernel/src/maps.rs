//! Every map the programs use, in one place. A map's name is its symbol
//! (`#[map]` exports the static under its own name), which is how the
//! sensor finds it, so neither names nor definitions change here lightly.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use keywarden_probe_types::*;

/// Several MiB: a 256 KiB ring dropped events at 36k signatures/s.
/// Drained on a timer; nothing here wakes the sensor. The loader sets the
/// size from the configuration (`ring_buffer_mib`, default 8 MiB).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Execs and newly opened crypto libraries: few, and each needs the
/// sensor at once (to snapshot a process before it exits, or to release
/// a held one), so every record wakes the sensor's control thread.
#[map]
pub(crate) static CONTROL: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
pub(crate) static MD_CTX_STATE: LruHashMap<ProcPtr, MdCtxState> =
    LruHashMap::with_max_entries(65536, 0);

#[map]
pub(crate) static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(65536, 0);

/// Pointers that have signed; a free of one of these is reported so the
/// sensor forgets which key it was.
#[map]
pub(crate) static SIGN_HANDLES: LruHashMap<ProcPtr, u8> = LruHashMap::with_max_entries(65536, 0);

/// (tgid, key object) pairs the sensor has judged: identified, or
/// checked against every known key without a match. Written by the
/// sensor; entries are removed here when the object is freed or
/// re-initialized, so a reused address is always checked again.
#[map]
pub(crate) static KNOWN: LruHashMap<ProcPtr, KnownHandle> = LruHashMap::with_max_entries(65536, 0);

/// Frees and re-initializations seen per (tgid, key object).
#[map]
pub(crate) static FREE_GEN: LruHashMap<ProcPtr, u64> = LruHashMap::with_max_entries(65536, 0);

#[map]
pub(crate) static LIBRARY_SEEN: LruHashMap<LibrarySeenKey, u8> =
    LruHashMap::with_max_entries(65536, 0);

/// The secret-file watch list, compiled to literal tests (see
/// `keywarden_probe_types::watch`); filled by the sensor, used in order
/// until the first empty slot.
#[map]
pub(crate) static WATCH: Array<WatchPattern> = Array::with_max_entries(watch::SLOTS, 0);

/// Processes the probe stopped and the sensor has not released yet,
/// with the time they were stopped. Pinned in bpffs, so it outlives a
/// sensor that dies mid-hold: the next sensor releases what is left.
#[map]
pub(crate) static HELD: HashMap<u32, u64> = HashMap::pinned(4096, 0);

/// Thread-group ids of running sensors, which are never held, with each
/// one's start time (`/proc/PID/stat`). Pinned and shared by every sensor
/// on the host; each adds itself at start and removes itself at exit, and a
/// starting sensor prunes entries whose pid now names another process.
#[map]
pub(crate) static SENSORS: HashMap<u32, u64> = HashMap::pinned(64, 0);

/// What `PendingOpen::what` waits for.
pub(crate) mod pending {
    /// A read-only open of a shared object: reported to the control
    /// thread once it has succeeded.
    pub(crate) const LIBRARY: u32 = 1;
    /// A key file or watched file, already reported at entry: its result
    /// follows in an `OpenResultRecord`.
    pub(crate) const REPORTED: u32 = 2;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct PendingOpen {
    /// User pointer to the path, read again at exit (libraries).
    pub(crate) filename: u64,
    pub(crate) open_flags: u64,
    pub(crate) dfd: i64,
    /// `pending::*`
    pub(crate) what: u32,
    /// `open_flags::*` of the entry record (reported opens).
    pub(crate) flags: u32,
}

/// An open waiting for its result, by thread (pid_tgid): one map for
/// both kinds, so an exit costs one lookup (every openat on the host
/// exits through it). LRU: a thread killed inside openat never reaches
/// the exit tracepoint.
#[map]
pub(crate) static PENDING_OPEN: LruHashMap<u64, PendingOpen> =
    LruHashMap::with_max_entries(16384, 0);

/// Which sensor may hold processes on this host (see `HoldLease`).
/// Pinned, so all sensors share it.
#[map]
pub(crate) static HOLD_LEASE: Array<HoldLease> = Array::pinned(1, 0);

/// Processes the sensor has condemned: they loaded a protected key that
/// their binary may not use (or used one). Any signature they begin is
/// stopped with SIGKILL before it is made. Value: the sensor's index of
/// the decision, echoed in the `KilledRecord`.
#[map]
pub(crate) static VERDICT: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Basename hashes (`name_hash`) of files that hold protected keys,
/// tested at the entry of every open of a key-named or watched path:
/// opening one holds the process until the sensor has judged it. Apart
/// from `FILE_NAMES` so the entry only asks whether a name is here:
/// reading `FILE_NAMES`' bits there took Debian 6.1's verifier past its
/// million-instruction limit for the entry programs.
#[map]
pub(crate) static PROTECTED_NAMES: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// Basename hashes (`name_hash`) the exit of an open tests the opened
/// file's own name against. Value: `name_kind` bits. A `PROTECTED` name's
/// opener is held until the sensor has judged it; a `WATCHED` one (the
/// last component of a watch-list glob) is reported for the sensor to
/// match its path.
#[map]
pub(crate) static FILE_NAMES: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// The basenames of `FILE_NAMES`, keyed by length and last eight bytes
/// (`NameTail`), with the same `name_kind` bits: the exit of every open
/// tests the opened file's name here first, at the cost of one lookup.
/// Only a longer name found here is read whole and hashed.
#[map]
pub(crate) static NAME_TAILS: HashMap<NameTail, u8> = HashMap::with_max_entries(1024, 0);

#[map]
pub(crate) static CONFIG: Array<u64> = Array::with_max_entries(config::SLOTS, 0);

/// Thread -> the TCP socket (`struct sock *`) it last received on.
#[map]
pub(crate) static LAST_SOCK: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65536, 0);

/// Where the address fields sit in `struct sock` (from BTF).
#[map]
pub(crate) static SOCK_LAYOUT: Array<SockLayout> = Array::with_max_entries(1, 0);

/// Where the executable's inode hangs off `task_struct` (from BTF).
#[map]
pub(crate) static TASK_LAYOUT: Array<TaskLayout> = Array::with_max_entries(1, 0);

/// Where an io_uring request keeps its opcode and result (from BTF).
#[map]
pub(crate) static URING_LAYOUT: Array<UringLayout> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::SLOTS, 0);

#[map]
pub(crate) static OP_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub(crate) static PATH_SCRATCH: PerCpuArray<[u8; keywarden_probe_types::PATH_SCRATCH]> =
    PerCpuArray::with_max_entries(2, 0);

/// Where the exit of an open writes the path it walks up from an opened
/// file's dentry (`opens::walk_path`): twice `PATH_MAX`, so that a name
/// of up to `PATH_MAX` bytes written at any offset below `PATH_MAX` stays
/// inside it, as the verifier must see.
#[map]
pub(crate) static WALK_SCRATCH: PerCpuArray<[u8; 2 * keywarden_probe_types::PATH_MAX]> =
    PerCpuArray::with_max_entries(1, 0);

/// Go signing calls between entry and return, by (tgid, goroutine). LRU:
/// a call that panics never reaches a return instruction.
#[map]
pub(crate) static GO_INFLIGHT: LruHashMap<ProcPtr, GoInflight> =
    LruHashMap::with_max_entries(16384, 0);

/// Processes running Go code the probes sign in (the sensor marks them as
/// it attaches; `go_sign_entry` marks any it meets first): their receives
/// are also kept by goroutine, in `GO_SOCK`. Dropped at exec and exit.
#[map]
pub(crate) static GO_PROCS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// (tgid, goroutine) -> the TCP socket that goroutine last received on.
/// Goroutines move between threads, so the thread's last receive
/// (`LAST_SOCK`) may be another goroutine's.
#[map]
pub(crate) static GO_SOCK: LruHashMap<ProcPtr, u64> = LruHashMap::with_max_entries(65536, 0);
