//! Records and map types shared by the kernel probes and the sensor.
//!
//! Everything here is plain `#[repr(C)]` data with explicit padding, so the
//! same bytes mean the same thing on both sides of the ring buffer. The
//! kernel side writes these; `keywarden`'s `records` module reads them.
#![no_std]

/// Largest signature the probes copy out (RSA-4096 is 512 bytes).
pub const SIG_MAX: usize = 512;
/// Data records come in two sizes so a 32-byte digest does not reserve 4 KiB
/// of ring space.
pub const DATA_SMALL: usize = 256;
pub const DATA_BIG: usize = 4096;
/// Most bytes of to-be-signed data captured per signing operation. The sensor
/// needs the data only to verify a signature against candidate public keys
/// (see `docs/design.md`); longer messages are marked truncated.
pub const CAPTURE_MAX: u32 = 16 * 1024;
/// Bytes of a path the probes copy (the rest is cut and flagged).
pub const PATH_MAX: usize = 256;
/// The probe's path buffer: `PATH_MAX` plus room for reading a whole
/// pattern (64 bytes) starting at any path offset.
pub const PATH_SCRATCH: usize = PATH_MAX + 64;

pub mod func;

/// Ring buffer record kinds; every record starts with a `u32` kind.
pub mod kind {
    pub const SIGN: u32 = 1;
    pub const DATA_SMALL: u32 = 2;
    pub const DATA_BIG: u32 = 3;
    pub const HANDLE_FREE: u32 = 4;
    pub const EXEC: u32 = 5;
    pub const EXIT: u32 = 6;
    pub const FILE_OPEN: u32 = 7;
    /// In the event ring: "this process exec'd here", so caches keyed by
    /// its pointers are dropped in order. The full `ExecRecord` goes to the
    /// control ring.
    pub const EXEC_MARK: u32 = 8;
    /// A bare `SignRecord` for a key object in the `KNOWN` map.
    pub const SIGN_KNOWN: u32 = 9;
    /// `KilledRecord`: a condemned process was killed as it began to sign.
    pub const KILLED: u32 = 10;
    /// `OpenResultRecord`: what an open reported at entry came to.
    pub const OPEN_RESULT: u32 = 11;
    /// `SexpSignRecord`: a libgcrypt signature with its three
    /// S-expressions, the key's reduced to its public parameters.
    pub const SIGN_SEXP: u32 = 12;
}

/// Flags on a `SignRecord`.
pub mod sign_flags {
    /// `handle` is the EVP_PKEY* (seen at EVP_DigestSignInit*); otherwise it
    /// is the context pointer the signing call was made with.
    pub const HANDLE_IS_PKEY: u32 = 1 << 0;
    /// The signature bytes did not fit `SIG_MAX` or could not be read.
    pub const SIG_INCOMPLETE: u32 = 1 << 1;
    /// The digest name given to EVP_DigestSignInit_ex is in `md_name`.
    pub const HAS_MD_NAME: u32 = 1 << 2;
    /// The sensor had already judged this key object (`KNOWN` map), so the
    /// probes copied neither the signed data nor the signature.
    pub const KNOWN_HANDLE: u32 = 1 << 3;
    /// `sig` holds the bytes of ring's returned `Signature` value (length
    /// and bytes, in the compiler's layout), not the bare signature; the
    /// sensor finds the signature in it by verifying.
    pub const SIG_IN_VALUE: u32 = 1 << 4;
    /// `peer` holds the TCP connection this thread last received from.
    pub const HAS_PEER: u32 = 1 << 5;
    /// A Rust signer made this signature through a C signing call nested
    /// in it (rustls on aws-lc-rs reaches `EVP_DigestSign`): `handle` is
    /// that call's EVP_PKEY, which lives as long as the key pair and so
    /// can be cached like any C key object.
    pub const INNER_HANDLE: u32 = 1 << 6;
    /// `sig` holds the two integers of an `ECDSA_SIG` (r, s) as the
    /// library's little-endian 64-bit words, each in a fixed slot (see
    /// `BIGNUM_SLOT`), not an encoded signature; the sensor encodes them.
    pub const SIG_BIGNUMS: u32 = 1 << 7;
}

/// libgcrypt's S-expressions in memory (`gcry_sexp_t`, its `sexp.c`): a
/// byte string of tokens, each a type byte; `DATA` and `HINT` are followed
/// by a native-endian 16-bit length and that many bytes. The probes copy
/// them token by token in this same encoding, and write `WITHHELD` in
/// place of a value they must not copy (a private parameter).
pub mod sexp {
    pub const STOP: u8 = 0;
    pub const DATA: u8 = 1;
    pub const HINT: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const CLOSE: u8 = 4;
    /// Not libgcrypt's: a value left out of the copy.
    pub const WITHHELD: u8 = 5;
    /// Bytes of one copied S-expression: an RSA-4096 key's `n` or
    /// signature's `s` (512 bytes) with room for the rest.
    pub const MAX: usize = 1024;
    /// Tokens walked in one S-expression (an RSA key with its six
    /// parameters has 28).
    pub const TOKENS: u32 = 48;
    /// The three parts of a `SexpSignRecord`, in order.
    pub const KEY: usize = 0;
    pub const DATA_PART: usize = 1;
    pub const SIGNATURE: usize = 2;
    /// `SexpSignRecord::ends` bit: the copy reached the S-expression's end.
    pub const COMPLETE: u32 = 1 << 31;
}

/// A libgcrypt signature (`gcry_pk_sign(&sig, data, key)`), with the three
/// S-expressions as the probes copied them (`sexp`): the key's with only
/// its public parameters (`q` of an elliptic-curve key, `n` and `e` of an
/// RSA key) and its curve, the data's and the signature's whole. Each part
/// is `2 * sexp::MAX` bytes so the verifier can bound a write at any
/// offset below `sexp::MAX`; only `ends[i]` bytes of part `i` are used.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SexpSignRecord {
    pub head: SignRecord,
    /// Bytes used in each part, with `sexp::COMPLETE`.
    pub ends: [u32; 4],
    pub parts: [[u8; 2 * sexp::MAX]; 3],
}

/// Bytes of `sig` given to each integer of a `SIG_BIGNUMS` signature: one
/// length byte (the number of 64-bit words) and up to 9 words (P-521's
/// 66-byte integers), padded to 80.
pub const BIGNUM_SLOT: usize = 80;
/// Most 64-bit words of one integer the probes copy.
pub const BIGNUM_WORDS: usize = 9;

/// Flags on an `ExecRecord`.
pub mod exec_flags {
    /// The probe stopped the new image (SIGSTOP) before its first
    /// instruction because its path was not seen in this cgroup yet; the
    /// sensor scans the executable for signing code, attaches, and sends
    /// SIGCONT.
    pub const HELD: u32 = 1 << 0;
}

/// The TCP connection a signature was made for: the one the signing thread
/// last received from, while it is still established. A TLS handshake
/// signs right after reading the peer's message, on the same thread, in
/// both roles.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    /// IPv4 addresses use the first four bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// Byte offsets of `struct sock_common` fields (the start of every
/// `struct sock`) and of `struct sock`'s protocol, taken from the kernel's
/// BTF by the sensor: Rust eBPF programs have no CO-RE relocations, so the
/// layout comes in through a map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLayout {
    /// Non-zero once the sensor filled the offsets in.
    pub valid: u32,
    pub daddr: u32,
    pub rcv_saddr: u32,
    pub dport: u32,
    pub num: u32,
    pub family: u32,
    pub state: u32,
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
    /// `struct sock.sk_protocol` (a `u16`).
    pub protocol: u32,
}

/// Flags on a `FileOpenRecord`.
pub mod open_flags {
    /// The basename looks like a crypto library (`libcrypto.so*`).
    pub const LIBRARY: u32 = 1 << 0;
    /// The name looks like a key or certificate file.
    pub const KEY_FILE: u32 = 1 << 1;
    /// The probe stopped the process (SIGSTOP) until the sensor has attached
    /// to the library; the sensor must send SIGCONT.
    pub const HELD: u32 = 1 << 2;
    /// The path was longer than `PATH_MAX` and is cut.
    pub const TRUNCATED: u32 = 1 << 3;
    /// The path passed the kernel prefilter of the secret-file watch list;
    /// with `RESOLVED`, the opened file's own name did (a basename in
    /// `FILE_NAMES` as `name_kind::WATCHED`, or one of the configured
    /// endings and beginnings, `config::NAME_AFFIX_SLOTS`).
    pub const WATCHED: u32 = 1 << 4;
    /// The basename is that of a file holding a protected key (at entry
    /// `PROTECTED_NAMES`, at exit `name_kind::PROTECTED`); with `HELD`,
    /// the process is stopped until the sensor has decided whether it may
    /// sign with that key.
    pub const PROTECTED: u32 = 1 << 5;
    /// Reported from the open's exit, by the name of the file the kernel
    /// opened (its dentry), because the path the process gave did not
    /// look like a key file: a symlink of another name, or a path another
    /// thread rewrote between the probe's read and the kernel's copy.
    /// `path` then holds the file's path as the probe walked it up to the
    /// process's root, last component first, each followed by `/`
    /// (the sensor's `records::unwalk_path`); with `TRUNCATED`, the walk stopped before the root.
    pub const RESOLVED: u32 = 1 << 6;
    /// A file was opened that the probe could not look at: an io_uring
    /// open into a registered file slot, which gives the process no
    /// descriptor. The record has no path and no result follows.
    pub const UNEXAMINED: u32 = 1 << 7;
}

/// io_uring's opcodes for opens (`enum io_uring_op`, part of the ABI).
pub mod uring_op {
    pub const OPENAT: u8 = 18;
    pub const OPENAT2: u8 = 28;
}

/// Name endings the open probe treats as key or certificate files; the
/// sensor uses the same list for opens it learns of another way.
pub const KEY_SUFFIXES: [&[u8]; 5] = [b".pem", b".key", b".der", b".crt", b".p8"];

/// What a basename in `FILE_NAMES` is (its value, a bitmask).
pub mod name_kind {
    /// A file holding a protected key: its opener is held until the
    /// sensor has judged it (`open_flags::PROTECTED`).
    pub const PROTECTED: u8 = 1;
    /// The last component of a watch-list glob (`**/.env`, `.../token`):
    /// an open of a file so named is reported, and the sensor matches the
    /// file's path against the globs (`open_flags::WATCHED`).
    pub const WATCHED: u8 = 2;
}

/// A file-name ending or beginning of up to 7 bytes, as one `CONFIG`
/// word: the bytes little-endian in the low 56 bits, their count in bits
/// 56–58, and `NAME_AFFIX_ENDING` for an ending. 0 is an unused slot. A
/// longer one keeps its last (ending) or first (beginning) 7 bytes, which
/// only widens the kernel's test.
pub fn name_affix(bytes: &[u8], ending: bool) -> u64 {
    let n = bytes.len().min(7);
    let part = if ending {
        &bytes[bytes.len() - n..]
    } else {
        &bytes[..n]
    };
    let mut word = (n as u64) << 56;
    if ending {
        word |= NAME_AFFIX_ENDING;
    }
    let mut i = 0;
    while i < n {
        word |= (part[i] as u64) << (8 * i);
        i += 1;
    }
    word
}

/// A basename as `NAME_TAILS` keys it: its length and its last eight
/// bytes (all of a shorter one), little-endian. What the exit of an open
/// reads of every opened file's name anyway, so testing it costs one
/// lookup; a name of up to eight bytes is told exactly, a longer one is
/// then hashed whole for `FILE_NAMES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameTail {
    pub len: u64,
    pub tail: u64,
}

impl NameTail {
    pub fn new(name: &[u8]) -> Self {
        let n = name.len().min(8);
        let mut tail = 0u64;
        let mut i = 0;
        while i < n {
            tail |= (name[name.len() - n + i] as u64) << (8 * i);
            i += 1;
        }
        NameTail {
            len: name.len() as u64,
            tail,
        }
    }
}

/// The bit of a `name_affix` word that makes it an ending.
pub const NAME_AFFIX_ENDING: u64 = 1 << 63;

/// Longest basename prefix hashed for `FILE_NAMES` and `PROTECTED_NAMES`.
pub const NAME_HASH_MAX: usize = 64;

/// Hash of a basename as `FILE_NAMES` and `PROTECTED_NAMES` key it: FNV-1a over its first
/// `NAME_HASH_MAX` bytes. The kernel computes the same in place.
pub fn name_hash(name: &[u8]) -> u64 {
    let n = name.len().min(NAME_HASH_MAX);
    fnv1a(&name[..n])
}

/// The kernel side of the secret-file watch list: each glob from the
/// configuration is compiled (`sensor/src/secrets/prefilter.rs`) into one
/// literal test the probe can afford on every `openat`. The set of paths
/// passing these tests is a superset of those the globs match; the sensor
/// matches the globs exactly.
pub mod watch {
    pub const SLOTS: u32 = 16;
    pub const PATTERN_MAX: usize = 64;
    /// Unused slot.
    pub const NONE: u32 = 0;
    /// The path starts with the bytes (`/etc/ssl/private/`).
    pub const PATH_PREFIX: u32 = 1;
    /// The path ends with the bytes (`.key`, `/.env`).
    pub const PATH_SUFFIX: u32 = 2;
    /// The last path component starts with the bytes (`id_`).
    pub const BASENAME_PREFIX: u32 = 3;
    /// The path is exactly the bytes (a relative `.env`).
    pub const PATH_EXACT: u32 = 4;
    /// Words of a pattern: `PATTERN_MAX / 8`.
    pub const WORDS: usize = PATTERN_MAX / 8;
}

/// One compiled watch pattern (a slot of the `WATCH` array map). The
/// literal is stored as little-endian words with a byte mask per word, so
/// the probe compares eight words without a data-dependent loop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchPattern {
    /// `watch::*`
    pub kind: u32,
    /// Length of the literal in bytes.
    pub len: u32,
    pub words: [u64; watch::WORDS],
    /// 0xff for each byte of `words` that belongs to the literal.
    pub masks: [u64; watch::WORDS],
}

impl WatchPattern {
    pub const EMPTY: WatchPattern = WatchPattern {
        kind: watch::NONE,
        len: 0,
        words: [0; watch::WORDS],
        masks: [0; watch::WORDS],
    };

    /// Builds a pattern from a literal of at most `PATTERN_MAX` bytes.
    pub fn new(kind: u32, literal: &[u8]) -> Option<WatchPattern> {
        if literal.is_empty() || literal.len() > watch::PATTERN_MAX {
            return None;
        }
        let mut p = WatchPattern {
            kind,
            len: literal.len() as u32,
            ..Self::EMPTY
        };
        let mut i = 0;
        while i < literal.len() {
            p.words[i / 8] |= (literal[i] as u64) << (8 * (i % 8));
            p.masks[i / 8] |= 0xff << (8 * (i % 8));
            i += 1;
        }
        Some(p)
    }

    /// The literal back, for messages and tests.
    pub fn literal(&self) -> [u8; watch::PATTERN_MAX] {
        let mut out = [0u8; watch::PATTERN_MAX];
        let mut i = 0;
        while i < self.len as usize && i < watch::PATTERN_MAX {
            out[i] = (self.words[i / 8] >> (8 * (i % 8))) as u8;
            i += 1;
        }
        out
    }
}

/// Slots of the `CONFIG` array map, written by the sensor.
pub mod config {
    /// Non-zero: hold (SIGSTOP) a process that opens an unseen crypto library.
    pub const HOLD_NEW_LIBRARIES: u32 = 0;
    /// This sensor's random token: its probes hold a process only while
    /// the host-wide `HoldLease` names this token.
    pub const HOLD_TOKEN: u32 = 1;
    /// The sensor's own tgid: its opens and exec are never held or reported
    /// (it reads every library it attaches to, and would stop itself).
    pub const SENSOR_TGID: u32 = 2;
    /// Bit `min(len, 63)` is set for the length of each basename in
    /// `FILE_NAMES`: the exit of an open hashes the opened file's own name
    /// only when its length is one of them.
    pub const NAME_LENS: u32 = 3;
    /// First of `2 * NAME_AFFIXES` slots of name endings and beginnings
    /// (`name_affix`) of watch-list globs like `**/*.p12` and
    /// `**/.ssh/id_*`, tested against the opened file's name at the exit
    /// of every open (the key suffixes are built in). Packed from the
    /// first slot, beginnings first: the probe stops at the first unused
    /// slot, and reads the name's first bytes only when the first slot is
    /// a beginning.
    pub const NAME_AFFIX_SLOTS: u32 = 4;
    /// At most this many endings, and this many beginnings: globs past
    /// these are judged by the path the process gave only.
    pub const NAME_AFFIXES: u32 = 4;
    pub const SLOTS: u32 = 12;
    /// A lease whose heartbeat is older than this is void: its sensor died
    /// or stalled, holding stops, and another sensor may take the lease.
    pub const HEARTBEAT_MAX_AGE_NS: u64 = 2_000_000_000;
}

/// The right to hold (SIGSTOP) processes on this host, in a one-entry map
/// pinned in bpffs so every running sensor sees the same one.
///
/// Why one holder: a hold ends with a SIGCONT, and stops do not nest. With
/// two sensors both holding, one sensor's late SIGCONT for an exec hold can
/// end the other's library hold before either has attached, and the
/// signature is missed by both. So only the sensor whose token the lease
/// names holds; the others attach to what they see, without holding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldLease {
    /// `config::HOLD_TOKEN` of the holding sensor (0: nobody).
    pub token: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of its last heartbeat.
    pub heartbeat_ns: u64,
}

/// Slots of the per-CPU `STATS` array: events the probes could not deliver.
pub mod stats {
    pub const LOST_SIGN: u32 = 0;
    pub const LOST_DATA: u32 = 1;
    pub const LOST_OTHER: u32 = 2;
    pub const CAPTURE_TRUNCATED: u32 = 3;
    /// Signed data the probe could not read from the process (not a ring
    /// overflow: the page was not present, for instance).
    pub const DATA_UNREADABLE: u32 = 4;
    pub const SLOTS: u32 = 8;
}

/// Who was running when a probe fired.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Task {
    /// `bpf_get_current_pid_tgid()`: tgid (process id) high, tid low.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: gid high, uid low.
    pub uid_gid: u64,
    /// cgroup v2 id (the inode of the cgroup directory).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    pub comm: [u8; 16],
}

impl Task {
    pub const fn tgid(&self) -> u32 {
        (self.pid_tgid >> 32) as u32
    }
    pub const fn tid(&self) -> u32 {
        self.pid_tgid as u32
    }
    pub const fn uid(&self) -> u32 {
        self.uid_gid as u32
    }
    pub const fn gid(&self) -> u32 {
        (self.uid_gid >> 32) as u32
    }
}

/// One completed private-key signature (never a length query, never the
/// inner call of a nested API).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SignRecord {
    pub kind: u32,
    /// `func::*` of the outermost call.
    pub func: u32,
    pub task: Task,
    /// Library index from the attach cookie.
    pub library: u32,
    pub flags: u32,
    /// EVP_PKEY* if known, else the EVP_MD_CTX* / EVP_PKEY_CTX* used.
    pub handle: u64,
    /// Links this record to the `DataRecord`s captured for it.
    pub op_id: u64,
    /// Return value of the outermost call (1 = success for EVP APIs).
    pub ret: i64,
    /// `*siglen` after the call.
    pub sig_len: u64,
    /// Bytes of `sig` that hold the signature.
    pub sig_captured: u32,
    pub _pad: u32,
    /// Digest name passed to EVP_DigestSignInit_ex, NUL padded.
    pub md_name: [u8; 16],
    /// How many times the key object was freed or re-initialized before
    /// this signature (`FREE_GEN`); the sensor's `KNOWN` entry for it is
    /// only trusted at this generation.
    pub handle_gen: u64,
    /// Valid with `sign_flags::HAS_PEER`.
    pub peer: Peer,
}

/// A `SignRecord` followed by the signature, for key objects the sensor has
/// not judged yet. Known ones get the bare `SignRecord` (kind
/// `SIGN_KNOWN`): a tenth of the ring space and no copy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SignWithSigRecord {
    pub head: SignRecord,
    pub sig: [u8; SIG_MAX],
}

/// Header of a chunk of to-be-signed data (message or digest).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataHeader {
    pub kind: u32,
    pub tgid: u32,
    pub op_id: u64,
    /// Offset of this chunk within the operation's data.
    pub offset: u32,
    /// Valid bytes in this chunk.
    pub len: u32,
    /// Non-zero when data beyond `CAPTURE_MAX` was not captured.
    pub truncated: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataSmallRecord {
    pub header: DataHeader,
    pub data: [u8; DATA_SMALL],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataBigRecord {
    pub header: DataHeader,
    pub data: [u8; DATA_BIG],
}

/// A key that was used for signing may have been freed, or a context that
/// signed is being re-initialized: what the sensor learnt about that
/// pointer may no longer hold.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HandleFreeRecord {
    pub kind: u32,
    pub tgid: u32,
    pub handle: u64,
}

/// The probe killed a process that the sensor had condemned (`VERDICT`) as
/// it entered a signing function, before the signature existed.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KilledRecord {
    pub kind: u32,
    /// `func::*` it was entering.
    pub func: u32,
    pub task: Task,
    pub library: u32,
    /// The `VERDICT` value: which condemnation (the sensor's index).
    pub verdict: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecRecord {
    pub kind: u32,
    /// `exec_flags::*`
    pub flags: u32,
    pub task: Task,
    /// The file the new image runs (zero when the layout is unknown).
    pub exe: ExeId,
    /// Where its absolute paths resolve (zero when the layout is unknown).
    pub root: RootId,
    /// The path given to execve, as the process saw it.
    pub filename: [u8; PATH_MAX],
}

/// The executable a process runs, as the exec probe read it from
/// `current->mm->exe_file->f_inode`. A short-lived signer can exit before
/// the sensor opens `/proc/PID/exe`; with this the sensor can still hash
/// the exact file it ran, found by path and checked against these fields.
/// The open probe reads the same fields for the file an open returned
/// (`OpenResultRecord`, and a library's identity in `LIBRARY_SEEN`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExeId {
    /// Non-zero when the probe read the fields.
    pub valid: u32,
    pub mtime_nsec: u32,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
}

/// The root directory a process resolves absolute paths against, as the
/// exec probe read it: `current->fs->root` and the mount namespace. A
/// short-lived signer can exit before the sensor opens `/proc/PID/root`;
/// the key files it opened are then read through the root of a live
/// process (or the sensor's own) with the same namespace and root inode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootId {
    /// Non-zero when the probe read the fields.
    pub valid: u32,
    /// `mnt_namespace.ns.inum`: the inode of `/proc/PID/ns/mnt`.
    pub mnt_ns: u32,
    /// Inode number of the root directory.
    pub ino: u64,
}

/// Byte offsets of what the exec probe reads from the task, from the
/// kernel's BTF (see `SockLayout` for why they come through a map):
/// `task_struct.mm->exe_file->f_inode` (for `ExeId`), and
/// `task_struct.fs->root.dentry->d_inode` and
/// `task_struct.nsproxy->mnt_ns->ns.inum` (for `RootId`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskLayout {
    /// Non-zero once the sensor filled the offsets in.
    pub valid: u32,
    pub task_mm: u32,
    pub mm_exe_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_size: u32,
    pub inode_mtime_sec: u32,
    /// Read as a u32: `i_mtime_nsec` since 6.7, the low half of
    /// `timespec64.tv_nsec` (little-endian) before.
    pub inode_mtime_nsec: u32,
    pub task_fs: u32,
    /// `fs_struct.root` plus `path.dentry`.
    pub fs_root_dentry: u32,
    pub dentry_inode: u32,
    pub task_nsproxy: u32,
    pub nsproxy_mnt_ns: u32,
    /// `mnt_namespace.ns` plus `ns_common.inum`.
    pub mnt_ns_inum: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    /// `file.f_path` plus `path.dentry`, and plus `path.mnt`.
    pub file_dentry: u32,
    pub file_mnt: u32,
    pub file_flags: u32,
    pub dentry_parent: u32,
    /// `dentry.d_name` plus `qstr.len`, and plus `qstr.name`.
    pub dentry_name_len: u32,
    pub dentry_name_ptr: u32,
    /// Where `struct vfsmount` sits in `struct mount`, and the fields of
    /// `struct mount` a path walk crosses mounts by.
    pub mount_mnt: u32,
    pub mount_parent: u32,
    pub mount_mountpoint: u32,
    pub vfsmount_root: u32,
    /// `fs_struct.root` plus `path.mnt`.
    pub fs_root_mnt: u32,
}

/// Where an io_uring request (`struct io_kiocb`) keeps its opcode and
/// its result, and an open request (`struct io_open`, at the start of
/// the request) its registered file slot, from the kernel's BTF. Read at
/// the completion of each request (`opens::io_uring_complete`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringLayout {
    /// Non-zero once the sensor filled the offsets in.
    pub valid: u32,
    pub req_opcode: u32,
    /// `io_kiocb.cqe` plus `io_cqe.res`.
    pub req_res: u32,
    pub open_file_slot: u32,
}

/// `kind::EXIT` and `kind::EXEC_MARK`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitRecord {
    pub kind: u32,
    pub _pad: u32,
    pub task: Task,
}

/// openat's `dfd` for "relative to the working directory" (Linux ABI).
pub const AT_FDCWD: i64 = -100;

/// Bits of openat's `flags` argument the sensor looks at (Linux ABI, the
/// same on every architecture the sensor runs on).
pub mod oflags {
    pub const O_ACCMODE: u32 = 0o3;
    pub const O_WRONLY: u32 = 0o1;
    pub const O_PATH: u32 = 0o10000000;
}

impl FileOpenRecord {
    /// Whether the path can be made absolute from the process's root and
    /// working directory (not relative to some other directory descriptor).
    pub fn resolvable(&self, path: &str) -> bool {
        path.starts_with('/') || self.dfd == AT_FDCWD
    }

    /// Whether the open asked to read the file. Only such an open, once it
    /// has succeeded, shows the process could read it: an `O_PATH` open
    /// needs no permission on the file at all, a write-only one no read
    /// permission.
    pub fn reads(&self) -> bool {
        self.oflags & oflags::O_PATH == 0 && self.oflags & oflags::O_ACCMODE != oflags::O_WRONLY
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileOpenRecord {
    pub kind: u32,
    /// `open_flags::*`
    pub flags: u32,
    pub task: Task,
    /// `dfd` argument of openat (`AT_FDCWD` for cwd-relative paths).
    pub dfd: i64,
    /// The descriptor openat returned, for a library (reported when the
    /// open has succeeded); -1 for other files, which are reported at
    /// entry (so the process can be held before the open returns) and
    /// whose result follows in an `OpenResultRecord`. While the process
    /// is held, `/proc/PID/fd/N` is the very file it opened.
    pub fd: i64,
    /// The root the process resolved the path from, as the open probe
    /// read it at entry (zero when the layout is unknown, and for
    /// libraries). A process may chroot after its exec; the sensor reads
    /// the file through a root only if it is this one.
    pub root: RootId,
    /// `flags` argument of openat (`O_RDONLY`, `O_PATH`, ...).
    pub oflags: u32,
    pub _pad: u32,
    pub path: [u8; PATH_MAX],
}

/// What an open reported by a `FileOpenRecord` (not a library) came to,
/// from the `openat` exit: the same thread's next result follows its entry
/// record in the ring. The sensor reads a key file only when the process's
/// own open succeeded: a file the process may not open is none of its
/// business, and the sensor reads as root.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OpenResultRecord {
    pub kind: u32,
    /// `open_flags::*` of the entry record.
    pub flags: u32,
    /// `bpf_get_current_pid_tgid()`, as in the entry record's `task`.
    pub pid_tgid: u64,
    /// openat's return value: the descriptor, or `-errno`.
    pub ret: i64,
    /// The file the descriptor names, read from the process's descriptor
    /// table at exit (`valid` 0 for a failed open or an unknown layout):
    /// the sensor checks that what it reads is this file.
    pub file: ExeId,
}

/// Key of `MD_CTX_STATE`: which EVP_MD_CTX in which process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcPtr {
    pub tgid: u32,
    pub _pad: u32,
    pub ptr: u64,
}

/// What EVP_DigestSignInit* told us about an EVP_MD_CTX.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MdCtxState {
    pub pkey: u64,
    pub op_id: u64,
    pub captured: u32,
    pub flags: u32,
    pub md_name: [u8; 16],
}

/// A signing call in progress on one thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Inflight {
    pub func: u32,
    /// Nesting depth; only the outermost return emits a record.
    pub depth: u32,
    pub library: u32,
    pub flags: u32,
    pub handle: u64,
    pub op_id: u64,
    pub sig_ptr: u64,
    pub siglen_ptr: u64,
    /// Stack pointer at entry. A call entered at the same or a lower stack
    /// pointer is nested in this one (same: a tail call, as EVP_DigestSign
    /// makes to EVP_DigestSignFinal); a higher one means this record is
    /// stale (its call never returned: longjmp, thread cancel).
    pub sp: u64,
    /// `bpf_ktime_get_ns()` at entry; records older than
    /// `INFLIGHT_MAX_AGE_NS` are stale too.
    pub started_ns: u64,
    /// `FREE_GEN` of the handle at entry.
    pub handle_gen: u64,
    pub md_name: [u8; 16],
    pub peer: Peer,
}

/// A Go signing call between its entry and a return instruction, by
/// (tgid, goroutine).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoInflight {
    pub func: u32,
    pub library: u32,
    pub flags: u32,
    pub _pad: u32,
    /// The key argument (a Go pointer).
    pub handle: u64,
    pub op_id: u64,
    /// For `GoOutput::Into`: the buffer argument.
    pub out: u64,
    /// The goroutine's stack bounds at entry (`g.stack`, the first two
    /// words of the `g`). Go moves a growing stack and fixes the
    /// pointers it knows of, not this copy of `out`: when the bounds
    /// moved by the return, `out` is moved with them.
    pub stack_lo: u64,
    pub stack_hi: u64,
    pub peer: Peer,
}

/// Value of the `KNOWN` map: the sensor has judged (tgid, handle) already
/// (identified it, or found that no known key verifies it), at free
/// generation `generation` (see `SignRecord::handle_gen`). A free after the
/// judged signature moves the generation on and voids the entry, even if
/// the sensor writes it later.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownHandle {
    pub generation: u64,
}

/// No signature takes this long; an older in-flight record is stale.
pub const INFLIGHT_MAX_AGE_NS: u64 = 10_000_000_000;

/// Key of `LIBRARY_SEEN`: a library (or executable) path opened inside a
/// cgroup, and which file it was. The file's identity is part of the key
/// because packages are upgraded in place: after `apt upgrade libssl3` the
/// same path names a new inode (or, after a `cp` over it, the same inode
/// with a new mtime), and new processes load that one. Keyed by path
/// alone, the new file would never be reported, and never covered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LibrarySeenKey {
    pub cgroup_id: u64,
    /// FNV-1a 64 of the path bytes as passed to openat (or execve).
    pub path_hash: u64,
    /// Inode number (0 if the probe could not read it).
    pub ino: u64,
    /// mtime as `sec * 1e9 + nsec`, wrapping.
    pub mtime_ns: u64,
}

impl LibrarySeenKey {
    pub fn new(cgroup_id: u64, path: &[u8], file: &ExeId) -> Self {
        Self {
            cgroup_id,
            path_hash: fnv1a(path),
            ino: file.ino,
            mtime_ns: (file.mtime_sec as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(file.mtime_nsec as u64),
        }
    }
}

/// FNV-1a over a NUL-terminated buffer; the kernel and the sensor must agree.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0 {
            break;
        }
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // Each of these is repr(C), Copy, has no padding the kernel could
    // leave uninitialised that user space relies on, and is valid for any
    // bit pattern: what aya::Pod requires.
    // SAFETY: ProcPtr is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for ProcPtr {}
    // SAFETY: MdCtxState is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for MdCtxState {}
    // SAFETY: Inflight is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for Inflight {}
    // SAFETY: KnownHandle is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for KnownHandle {}
    // SAFETY: WatchPattern is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for WatchPattern {}
    // SAFETY: LibrarySeenKey is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for LibrarySeenKey {}
    // SAFETY: HoldLease is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for HoldLease {}
    // SAFETY: SockLayout is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for SockLayout {}
    // SAFETY: TaskLayout is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for TaskLayout {}
    // SAFETY: UringLayout is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for UringLayout {}
    // SAFETY: NameTail is repr(C) plain data, valid for any bit pattern.
    unsafe impl aya::Pod for NameTail {}
}
