//! Opens: `on_enter` classifies every opened path (a shared object
//! being loaded, a possible key file, a path on the secret-file watch
//! list) and returns at once for anything else; `on_exit` reports a
//! library once its open has succeeded, holding the opener if needed, and
//! what a key or watched file's open, reported at entry, came to.
//!
//! Two mechanisms call them, and the sensor attaches one
//! (`sensor/src/probes/hooks.rs`):
//! * fentry and fexit on `do_sys_openat2`, which `open`, `openat`,
//!   `openat2` and `creat` all reach, where the kernel allows fentry (BTF
//!   and trampolines: Debian's stock kernels). No other system call pays
//!   anything.
//! * else the entry and exit tracepoints of those four system calls.
//!   Enabling any syscall tracepoint sends every system call of every
//!   task through the kernel's slower traced path (docs/performance.md).
//!
//! Both see the path as the process gave it, with its directory
//! descriptor and flags, so the classification is the same. That path is
//! read before the kernel copies it: a symlink of another name, or
//! another thread rewriting the buffer in between, can show entry one
//! name while the kernel opens another file. So `on_exit` also looks at
//! the name of the file the kernel opened (its dentry), and reports a key
//! file entry missed, with its path walked up from the dentry.
use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel_buf, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{bpf_get_current_task, bpf_send_signal},
    },
    macros::{fentry, fexit, raw_tracepoint, tracepoint},
    programs::{FEntryContext, FExitContext, RawTracePointContext, TracePointContext},
};

use keywarden_probe_types::*;

use crate::{
    maps::{
        CONTROL, EVENTS, FILE_NAMES, HELD, LIBRARY_SEEN, NAME_TAILS, PATH_SCRATCH, PENDING_OPEN,
        PROTECTED_NAMES, PendingOpen, URING_LAYOUT, WALK_SCRATCH, WATCH, pending,
    },
    util::{
        SIGSTOP, config, count, current_root, current_task, file_id, kernel_ptr, kernel_read,
        sensor_alive, task_layout,
    },
};

/// The per-CPU path buffers (`PATH_SCRATCH`): one for entries, one for
/// exits, so an exit never writes over an entry's path.
mod scratch {
    pub const ENTRY: u32 = 0;
    pub const EXIT: u32 = 1;
}

/// Classifies an opened path: a shared object being loaded (any of them
/// may carry its own crypto: Python's `cryptography` links OpenSSL into
/// `_rust.abi3.so`), or a file that may hold a key. Everything else
/// returns at once. A library open is only noted here and handled when
/// it has succeeded (`on_exit`). A key or watched file is reported
/// here, at entry, so that the opener of a protected key can be held
/// before the open returns; its result follows from `on_exit`.
///
/// `dfd` and `sys_flags` are read only for opens of interest: this runs
/// on every open on the host.
#[inline(always)]
fn on_enter(filename: u64, dfd: impl Fn() -> i64, sys_flags: impl Fn() -> u64) {
    let Some((scratch, len)) = read_path(filename, scratch::ENTRY) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) == config(config::SENSOR_TGID) {
        return;
    }
    let buf = path_of(scratch);
    let mut flags = 0u32;
    // The last path component, found once for every test below.
    let basename = basename_start(buf, len);
    if is_shared_object(buf, len, basename) {
        // Writing a library (an install, `cp`, a build) is not loading
        // it, and the file may still be partial. A load that fails (the
        // loader tries every directory of its search path) loads
        // nothing. Either, marked seen, would hide a later real load.
        let sys_flags = sys_flags();
        if sys_flags & O_ACCMODE == O_RDONLY {
            let pending = PendingOpen {
                filename,
                open_flags: sys_flags,
                dfd: dfd(),
                what: pending::LIBRARY,
                flags: 0,
            };
            let _ = PENDING_OPEN.insert(&pid_tgid, &pending, 0);
        }
        return;
    }
    if has_key_suffix(buf, len) {
        flags |= open_flags::KEY_FILE;
    }
    if is_watched(scratch, len, basename) {
        flags |= open_flags::WATCHED;
    }
    if flags == 0 {
        return;
    }
    let name = basename_hash(buf, basename, len);
    // SAFETY: only whether an entry exists is used; the reference is dropped at
    // once.
    if unsafe { PROTECTED_NAMES.get(&name) }.is_some() {
        flags |= open_flags::PROTECTED;
    }
    let sys_flags = sys_flags();
    let task = current_task();
    let root = current_root().unwrap_or_default();
    // Reserve first: a process is only ever held when the record that
    // makes the sensor release it is sure to be delivered.
    let Some(mut rec) = EVENTS.reserve::<FileOpenRecord>(0) else {
        count(stats::LOST_OTHER);
        return;
    };
    if flags & open_flags::PROTECTED != 0 && sensor_alive(&task) {
        hold(&task, &mut flags);
    }
    let dfd = dfd();
    let args = OpenArgs {
        dfd,
        fd: -1,
        oflags: sys_flags as u32,
        root,
    };
    fill_open(&mut rec, flags, len, task, args, buf);
    rec.submit(if flags & open_flags::HELD != 0 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64);
    // Its result, from the exit: the sensor reads the file only if the
    // process's own open succeeded.
    let pending = PendingOpen {
        filename,
        open_flags: sys_flags,
        dfd,
        what: pending::REPORTED,
        flags,
    };
    let _ = PENDING_OPEN.insert(&pid_tgid, &pending, 0);
}

/// The exit of every open. First, for an open that returned a
/// descriptor, the name of the file the kernel opened (`opened_file`):
/// the path the process gave was read at entry, before the kernel's own
/// copy, and may have been a symlink of another name, or rewritten by
/// another thread in between. Then what entry noted: a library opened
/// read-only for the first time in this cgroup goes to the control thread,
/// holding the opener (see `should_hold`) until it has attached; a
/// reported open gets its result, with what the file's own name added.
/// An open entry did not report whose file is named like a key is
/// reported here (`report_resolved`).
#[inline(always)]
fn on_exit(ret: impl Fn() -> Option<i64>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the entry is copied out at once; only this thread writes its key,
    // and one evicted meanwhile is still map memory: stale at worst.
    let pending = (unsafe { PENDING_OPEN.get(&pid_tgid) }).copied();
    if pending.is_some() {
        let _ = PENDING_OPEN.remove(&pid_tgid);
    }
    let Some(ret) = ret() else {
        return;
    };
    let opened = if ret >= 0 { opened_file(ret) } else { None };
    let named = opened.as_ref().map_or(0, |o| o.flags);
    if let Some(p) = &pending
        && p.what == pending::REPORTED
    {
        let mut flags = p.flags | named;
        if named & !p.flags & open_flags::PROTECTED != 0 && p.flags & open_flags::HELD == 0 {
            let task = current_task();
            if sensor_alive(&task) {
                hold(&task, &mut flags);
            }
        }
        report_result(flags, pid_tgid, ret, opened.as_ref().map(|o| o.file));
        return;
    }
    if let Some(o) = &opened
        && named != 0
        && (pid_tgid >> 32) != config(config::SENSOR_TGID)
    {
        report_resolved(o, ret);
    }
    if let Some(p) = pending {
        library_opened(&p, ret);
    }
}

/// A library's open noted at entry (`pending::LIBRARY`), once it has
/// returned `fd`.
#[inline(always)]
fn library_opened(pending: &PendingOpen, fd: i64) {
    if fd < 0 {
        return;
    }
    let Some((scratch, len)) = read_path(pending.filename, scratch::EXIT) else {
        return;
    };
    let buf = path_of(scratch);
    let task = current_task();
    let file = current_fd_file(fd).unwrap_or_default();
    let key = LibrarySeenKey::new(task.cgroup_id, &buf[..], &file);
    // SAFETY: only whether an entry exists is used; the reference is dropped at
    // once.
    if unsafe { LIBRARY_SEEN.get(&key) }.is_some() {
        return;
    }
    let _ = LIBRARY_SEEN.insert(&key, &1, 0);
    let Some(mut rec) = CONTROL.reserve::<FileOpenRecord>(0) else {
        count(stats::LOST_OTHER);
        return;
    };
    let mut flags = open_flags::LIBRARY;
    if should_hold(pending.open_flags, &task) {
        hold(&task, &mut flags);
    }
    let args = OpenArgs {
        dfd: pending.dfd,
        fd,
        oflags: pending.open_flags as u32,
        root: RootId::default(),
    };
    fill_open(&mut rec, flags, len, task, args, buf);
    rec.submit(BPF_RB_FORCE_WAKEUP as u64);
}

/// What a reported open came to: the return value and, for a descriptor,
/// the file it names. Wakes the sensor when the opener is held, as the
/// entry record did: the sensor releases it once it knows the result.
/// `flags` are the entry's, with what the opened file's name added;
/// `file` the `struct file` `opened_file` found for a descriptor.
#[inline(always)]
fn report_result(flags: u32, pid_tgid: u64, ret: i64, file: Option<u64>) {
    let file = file
        .zip(task_layout())
        .and_then(|(f, l)| file_id(l, f))
        .unwrap_or_default();
    let Some(mut rec) = EVENTS.reserve::<OpenResultRecord>(0) else {
        count(stats::LOST_OTHER);
        return;
    };
    // SAFETY: writable ring memory sized for an `OpenResultRecord` (integers
    // only); every field is written before the record is submitted.
    let r = unsafe { rec.assume_init_mut() };
    r.kind = kind::OPEN_RESULT;
    r.flags = flags;
    r.pid_tgid = pid_tgid;
    r.ret = ret;
    r.file = file;
    rec.submit(if flags & open_flags::HELD != 0 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64);
}

/// The file behind a descriptor an open just returned, and what its own
/// name says: `KEY_FILE` for a key file's suffix, `PROTECTED` for a
/// protected key's basename, `WATCHED` for a name a watch-list glob ends
/// with (a basename, an ending or a beginning).
struct OpenedFile {
    file: u64,
    dentry: u64,
    flags: u32,
}

/// Runs at the exit of every open that returned a descriptor, so it reads
/// as little as it can: the descriptor's file, its dentry, the name's
/// length and last eight bytes (and its first eight, when a watch-list
/// glob names a beginning). The name is hashed for `FILE_NAMES` only when
/// a basename there has its length.
#[inline(always)]
fn opened_file(fd: i64) -> Option<OpenedFile> {
    let l = task_layout()?;
    let file = current_fd(l, fd)?;
    let dentry = kernel_ptr(file, l.file_dentry)?;
    let len: u32 = kernel_read(dentry, l.dentry_name_len)?;
    let name = kernel_ptr(dentry, l.dentry_name_ptr)?;
    let mut flags = 0u32;
    // The name's last eight bytes (or all of a shorter one, then followed
    // by its NUL and whatever is next: only the first `len` are looked at).
    // As one word, its bytes taken by shifts: an index into a stack
    // array would make LLVM address it with an `|` the verifier refuses.
    let (tail, end) = if len >= 8 {
        (kernel_read::<u64>(name + len as u64 - 8, 0)?, 8usize)
    } else {
        (kernel_read::<u64>(name, 0)?, len as usize)
    };
    for suffix in KEY_SUFFIXES {
        let n = suffix.len();
        if end < n {
            continue;
        }
        let mut ok = true;
        let mut j = 0usize;
        while j < n {
            if (tail >> (((end - n + j) & 7) * 8)) as u8 != suffix[j] {
                ok = false;
                break;
            }
            j += 1;
        }
        if ok {
            flags |= open_flags::KEY_FILE;
            break;
        }
    }
    let first = config(config::NAME_AFFIX_SLOTS);
    if first != 0 {
        // Beginnings come first: with none, the first slot is an ending.
        let head = if first & NAME_AFFIX_ENDING != 0 {
            0
        } else if len <= 8 {
            tail
        } else {
            kernel_read::<u64>(name, 0).unwrap_or(0)
        };
        if name_affix_matches(tail, end as u64, head, len.min(8) as u64) {
            flags |= open_flags::WATCHED;
        }
    }
    let lens = config(config::NAME_LENS);
    if lens & (1u64 << (len.min(63) as u64)) != 0 {
        let kind = name_kind_of(name, len, tail);
        if kind & name_kind::PROTECTED != 0 {
            flags |= open_flags::PROTECTED;
        }
        if kind & name_kind::WATCHED != 0 {
            flags |= open_flags::WATCHED;
        }
    }
    Some(OpenedFile {
        file,
        dentry,
        flags,
    })
}

/// State for `affix_slot`: the name's last and first bytes as words, how
/// many of each are the name's, and whether a slot matched.
#[repr(C)]
struct AffixScan {
    tail: u64,
    tail_have: u64,
    head: u64,
    head_have: u64,
    hit: u64,
}

/// Whether one of the configured endings or beginnings (`name_affix`,
/// `config::NAME_AFFIX_SLOTS`) matches the name. A `bpf_loop`, like the watch
/// list at entry: the verifier checks its callback once instead of eight
/// unrolled copies, and these programs are near Debian 6.1's verifier
/// limit (docs/design.md, "Mechanisms per kernel").
#[inline(always)]
fn name_affix_matches(tail: u64, tail_have: u64, head: u64, head_have: u64) -> bool {
    let mut scan = AffixScan {
        tail,
        tail_have,
        head,
        head_have,
        hit: 0,
    };
    // SAFETY: `affix_slot` has the callback signature bpf_loop expects, and
    // `scan` outlives the call, which runs every callback before returning.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            2 * config::NAME_AFFIXES,
            affix_slot as *mut core::ffi::c_void,
            (&mut scan as *mut AffixScan).cast(),
            0,
        );
    }
    scan.hit != 0
}

/// One `bpf_loop` step over the affix slots: 0 to go on, 1 on a match or
/// at the first unused slot (they are packed).
extern "C" fn affix_slot(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `&mut scan` name_affix_matches passed to
    // bpf_loop: live for the whole loop, and nothing else touches it.
    let scan = unsafe { &mut *(ctx as *mut AffixScan) };
    let affix = config(config::NAME_AFFIX_SLOTS + (index as u32 & 7));
    if affix == 0 {
        return 1;
    }
    let n = (affix >> 56) & 7;
    let ending = affix & NAME_AFFIX_ENDING != 0;
    let (word, have) = if ending {
        (scan.tail, scan.tail_have)
    } else {
        (scan.head, scan.head_have)
    };
    if n == 0 || n > have {
        return 0;
    }
    let at = if ending { (have - n) & 7 } else { 0 };
    let mask = (1u64 << ((n * 8) & 63)) - 1;
    if (word >> (at * 8)) & mask == affix & mask {
        scan.hit = 1;
        return 1;
    }
    0
}

/// What a dentry's name (a kernel string of `len` bytes, `tail` its last
/// eight or its first eight) is in `FILE_NAMES` (`name_kind`), 0 if it is
/// not there. `NAME_TAILS` answers first, from what was read already: a
/// name of up to eight bytes exactly, a longer one only when its tail
/// matches, after which it is read and hashed whole.
#[inline(always)]
fn name_kind_of(name: u64, len: u32, tail: u64) -> u8 {
    let tail = if len >= 8 {
        tail
    } else {
        tail & ((1u64 << ((len as u64 * 8) & 63)) - 1)
    };
    let key = NameTail {
        len: len as u64,
        tail,
    };
    // SAFETY: the value is copied out at once.
    let Some(kind) = (unsafe { NAME_TAILS.get(&key) }).copied() else {
        return 0;
    };
    if len <= 8 {
        return kind;
    }
    let Some(scratch) = PATH_SCRATCH.get_ptr_mut(scratch::EXIT) else {
        return 0;
    };
    // SAFETY: this CPU's EXIT slot, used only by the exit programs, which do
    // not nest on a CPU (see `read_path`); PATH_SCRATCH >= PATH_MAX.
    let buf: &mut [u8; PATH_MAX] = unsafe { &mut *(scratch as *mut [u8; PATH_MAX]) };
    // SAFETY: the helper checks the kernel address and writes at most
    // `buf`'s PATH_MAX bytes.
    let Ok(read) = (unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, buf) }) else {
        return 0;
    };
    let len = read.len();
    // SAFETY: the same slot, its mutable borrow over.
    let buf: &[u8; PATH_MAX] = unsafe { &*(scratch as *const [u8; PATH_MAX]) };
    let hash = basename_hash(buf, 0, len);
    // SAFETY: the value is copied out at once.
    unsafe { FILE_NAMES.get(&hash) }.copied().unwrap_or(0)
}

/// Reports an open entry did not: the file the kernel opened is named
/// like a key file, a protected key or a watched file, the path the
/// process gave was not.
/// Its path is walked up from the file's dentry (`walk_path`); its result
/// follows at once. A protected key's opener is held, as at entry.
#[inline(always)]
fn report_resolved(o: &OpenedFile, fd: i64) {
    let Some(l) = task_layout() else {
        return;
    };
    let task = current_task();
    let Some(mut rec) = EVENTS.reserve::<FileOpenRecord>(0) else {
        count(stats::LOST_OTHER);
        return;
    };
    let mut flags = o.flags | open_flags::RESOLVED;
    if flags & open_flags::PROTECTED != 0 && sensor_alive(&task) {
        hold(&task, &mut flags);
    }
    // SAFETY: writable ring memory sized for a `FileOpenRecord` (integers and
    // bytes); no field is read before it is written.
    let r = unsafe { rec.assume_init_mut() };
    if !walk_path(l, o, &mut r.path) {
        flags |= open_flags::TRUNCATED;
    }
    r.kind = kind::FILE_OPEN;
    r.flags = flags;
    r.task = task;
    // Not AT_FDCWD: the walked path is made absolute by the walk or not at
    // all.
    r.dfd = -1;
    r.fd = fd;
    r.root = current_root().unwrap_or_default();
    r.oflags = kernel_read(o.file, l.file_flags).unwrap_or(0);
    r._pad = 0;
    rec.submit(if flags & open_flags::HELD != 0 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64);
    report_result(flags, task.pid_tgid, fd, Some(o.file));
}

/// State for `walk_step`, which `bpf_loop` calls once per path component
/// or mount crossed.
#[repr(C)]
struct Walk {
    buf: *mut [u8; 2 * PATH_MAX],
    layout: *const TaskLayout,
    dentry: u64,
    /// The `struct mount` the dentry is in.
    mount: u64,
    root_dentry: u64,
    root_mnt: u64,
    /// Bytes written to `buf`.
    at: u64,
    /// 1 once the walk reached the process's root (or the namespace's).
    done: u64,
}

/// Writes the opened file's path into `out`, leaf first
/// (`name/dir/…/`), as `d_path` would find it: up the dentries, across
/// each mount to where it is mounted, until the process's root. False if
/// the path did not fit or the walk did not reach the root.
#[inline(always)]
fn walk_path(l: &TaskLayout, o: &OpenedFile, out: &mut [u8; PATH_MAX]) -> bool {
    out[0] = 0;
    let Some(buf) = WALK_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: takes no arguments; the task pointer it returns is only read
    // through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let (Some(mnt), Some(fs)) = (kernel_ptr(o.file, l.file_mnt), kernel_ptr(task, l.task_fs))
    else {
        return false;
    };
    let mut walk = Walk {
        buf,
        layout: l,
        dentry: o.dentry,
        mount: mnt - l.mount_mnt as u64,
        root_dentry: kernel_ptr(fs, l.fs_root_dentry).unwrap_or(0),
        root_mnt: kernel_ptr(fs, l.fs_root_mnt).unwrap_or(0),
        at: 0,
        done: 0,
    };
    // SAFETY: `walk_step` has the callback signature bpf_loop expects, and
    // `walk` outlives the call, which runs every callback before returning.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            WALK_STEPS,
            walk_step as *mut core::ffi::c_void,
            (&mut walk as *mut Walk).cast(),
            0,
        );
    }
    // SAFETY: this CPU's WALK_SCRATCH slot; its first PATH_MAX bytes are
    // copied whole, with the NUL after the walked part written first.
    unsafe {
        let at = walk.at as usize & (PATH_MAX - 1);
        (*buf)[at] = 0;
        if bpf_probe_read_kernel_buf((*buf).as_ptr(), out).is_err() {
            out[0] = 0;
            return false;
        }
    }
    walk.done != 0
}

/// Most components and mounts a walk crosses.
const WALK_STEPS: u32 = 64;

/// One `bpf_loop` step of `walk_path`: 0 to go on, 1 to stop.
extern "C" fn walk_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `&mut walk` walk_path passed to bpf_loop: live for
    // the whole loop, and nothing else touches it meanwhile.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    // SAFETY: the layout is a map value, valid for the whole program.
    let l = unsafe { &*w.layout };
    let vfsmount = w.mount + l.mount_mnt as u64;
    if w.dentry == w.root_dentry && vfsmount == w.root_mnt {
        w.done = 1;
        return 1;
    }
    let (Some(mnt_root), Some(parent)) = (
        kernel_ptr(vfsmount, l.vfsmount_root),
        kernel_ptr(w.dentry, l.dentry_parent),
    ) else {
        return 1;
    };
    if w.dentry == mnt_root || w.dentry == parent {
        // The top of this mount: on to where it is mounted, unless it is
        // the namespace's root (its own parent).
        let Some(up) = kernel_ptr(w.mount, l.mount_parent) else {
            return 1;
        };
        if up == w.mount {
            w.done = 1;
            return 1;
        }
        let Some(point) = kernel_ptr(w.mount, l.mount_mountpoint) else {
            return 1;
        };
        w.dentry = point;
        w.mount = up;
        return 0;
    }
    let (Some(len), Some(name)) = (
        kernel_read::<u32>(w.dentry, l.dentry_name_len),
        kernel_ptr(w.dentry, l.dentry_name_ptr),
    ) else {
        return 1;
    };
    let len = len as u64;
    if w.at + len + 1 > PATH_MAX as u64 - 1 {
        return 1;
    }
    let at = w.at as usize & (PATH_MAX - 1);
    let n = len as u32 & (PATH_MAX as u32 - 1);
    // SAFETY: `w.buf` is this CPU's WALK_SCRATCH slot, 2 * PATH_MAX bytes:
    // `at` and `n` are each below PATH_MAX, so the name and the `/` after
    // it stay inside; the helper checks the kernel address.
    unsafe {
        let buf = &mut *w.buf;
        if aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            buf.as_mut_ptr().add(at).cast(),
            n,
            name as *const core::ffi::c_void,
        ) != 0
        {
            return 1;
        }
        buf[(at + n as usize) & (2 * PATH_MAX - 1)] = b'/';
    }
    w.at += len + 1;
    w.dentry = parent;
    0
}

/// `AT_FDCWD`: the directory of `open` and `creat`.
const AT_FDCWD: i64 = -100;
/// The flags `creat` opens with: `O_CREAT | O_WRONLY | O_TRUNC`.
const CREAT_FLAGS: u64 = 0o1101;

// The syscall tracepoints. Offsets are those of each event's record
// (`/sys/kernel/tracing/events/syscalls/*/format`): after the common
// header and `__syscall_nr`, the arguments from offset 16, 8 bytes each.
// SAFETY (every `read_at` below): it goes through bpf_probe_read, which
// checks the address, at an offset inside the named event's record.

/// `openat(dfd, filename, flags, mode)`.
#[tracepoint(category = "syscalls", name = "sys_enter_openat")]
pub fn openat_enter(ctx: TracePointContext) -> u32 {
    if let Ok(filename) = unsafe { ctx.read_at::<u64>(24) } {
        on_enter(
            filename,
            || unsafe { ctx.read_at::<i64>(16) }.unwrap_or(AT_FDCWD) as i32 as i64,
            || unsafe { ctx.read_at::<u64>(32) }.unwrap_or(0),
        );
    }
    0
}

/// `open(filename, flags, mode)`: what `openat` does at `AT_FDCWD`.
#[tracepoint(category = "syscalls", name = "sys_enter_open")]
pub fn open_enter(ctx: TracePointContext) -> u32 {
    if let Ok(filename) = unsafe { ctx.read_at::<u64>(16) } {
        on_enter(
            filename,
            || AT_FDCWD,
            || unsafe { ctx.read_at::<u64>(24) }.unwrap_or(0),
        );
    }
    0
}

/// `creat(pathname, mode)`.
#[tracepoint(category = "syscalls", name = "sys_enter_creat")]
pub fn creat_enter(ctx: TracePointContext) -> u32 {
    if let Ok(filename) = unsafe { ctx.read_at::<u64>(16) } {
        on_enter(filename, || AT_FDCWD, || CREAT_FLAGS);
    }
    0
}

/// `openat2(dfd, filename, how, size)`: the flags are the first field of
/// the caller's `struct open_how`.
#[tracepoint(category = "syscalls", name = "sys_enter_openat2")]
pub fn openat2_enter(ctx: TracePointContext) -> u32 {
    if let Ok(filename) = unsafe { ctx.read_at::<u64>(24) } {
        on_enter(
            filename,
            || unsafe { ctx.read_at::<i64>(16) }.unwrap_or(AT_FDCWD) as i32 as i64,
            || {
                let how = unsafe { ctx.read_at::<u64>(32) }.unwrap_or(0);
                // SAFETY: the helper checks the user address; a fault is an
                // error, read as no flags.
                unsafe { bpf_probe_read_user(how as *const u64) }.unwrap_or(0)
            },
        );
    }
    0
}

/// The exit of all four: `ret` is at offset 16 in each record.
#[tracepoint(category = "syscalls", name = "sys_exit_openat")]
pub fn open_exit(ctx: TracePointContext) -> u32 {
    on_exit(|| unsafe { ctx.read_at::<i64>(16) }.ok());
    0
}

/// `long do_sys_openat2(int dfd, const char __user *filename, struct
/// open_how *how)`, where `open`, `openat`, `openat2` and `creat` meet;
/// `how` is the kernel's copy.
#[fentry(function = "do_sys_openat2")]
pub fn do_sys_openat2_entry(ctx: FEntryContext) -> i32 {
    let filename: u64 = ctx.arg(1);
    on_enter(
        filename,
        || ctx.arg::<u64>(0) as i32 as i64,
        || kernel_read::<u64>(ctx.arg::<u64>(2), 0).unwrap_or(0),
    );
    0
}

/// The return of `do_sys_openat2`: a descriptor or an error, after its
/// three arguments.
#[fexit(function = "do_sys_openat2")]
pub fn do_sys_openat2_exit(ctx: FExitContext) -> i32 {
    on_exit(|| Some(ctx.arg::<u64>(3) as i64));
    0
}

/// `io_uring_complete(ctx, req, …)`: a request's completion is posted.
/// An open through io_uring (`IORING_OP_OPENAT`, `OPENAT2`) runs no open
/// system call and not `do_sys_openat2`; its descriptor is installed by
/// the time its completion is posted, by a thread of the process (the
/// submitter, or an io-wq worker sharing its descriptor table). So it is
/// looked at as an open's exit is: by the opened file's own name. An open
/// into a registered file slot gives no descriptor: it is named
/// (`open_flags::UNEXAMINED`). The arguments after `req` differ between
/// kernels (the result, or a `struct io_uring_cqe *`); the request's own
/// copy of its result (`req->cqe.res`) is the same in all.
#[raw_tracepoint(tracepoint = "io_uring_complete")]
pub fn io_uring_complete(ctx: RawTracePointContext) -> i32 {
    // The second argument is the request, only read through
    // bpf_probe_read_kernel.
    let req: u64 = ctx.arg(1);
    uring_open_done(req);
    0
}

#[inline(always)]
fn uring_open_done(req: u64) -> Option<()> {
    let l = URING_LAYOUT.get(0).filter(|l| l.valid != 0)?;
    let op: u8 = kernel_read(req, l.req_opcode)?;
    if op != uring_op::OPENAT && op != uring_op::OPENAT2 {
        return None;
    }
    let res: i32 = kernel_read(req, l.req_res)?;
    if res < 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) == config(config::SENSOR_TGID) {
        return None;
    }
    let slot: u32 = kernel_read(req, l.open_file_slot)?;
    if slot != 0 {
        let Some(mut rec) = EVENTS.reserve::<FileOpenRecord>(0) else {
            count(stats::LOST_OTHER);
            return None;
        };
        // SAFETY: writable ring memory sized for a `FileOpenRecord`; every
        // field is written before it is submitted.
        let r = unsafe { rec.assume_init_mut() };
        r.kind = kind::FILE_OPEN;
        r.flags = open_flags::UNEXAMINED;
        r.task = current_task();
        r.dfd = -1;
        r.fd = -1;
        r.root = RootId::default();
        r.oflags = 0;
        r._pad = 0;
        r.path[0] = 0;
        rec.submit(BPF_RB_NO_WAKEUP as u64);
        return None;
    }
    let o = opened_file(res as i64)?;
    if o.flags != 0 {
        report_resolved(&o, res as i64);
    }
    Some(())
}

/// Reads a NUL-terminated user path into the per-CPU scratch buffer:
/// the buffer and the path's length, or None if it is unreadable or
/// too short to be of interest.
#[inline(always)]
fn read_path(
    filename: u64,
    slot: u32,
) -> Option<(&'static [u8; keywarden_probe_types::PATH_SCRATCH], usize)> {
    let scratch = PATH_SCRATCH.get_ptr_mut(slot)?;
    // The path goes into the first PATH_MAX bytes; the rest is slack
    // for word reads past the end of a short path.
    // SAFETY: `scratch` is this CPU's PATH_SCRATCH slot: valid all run, and its
    // PATH_SCRATCH bytes hold the PATH_MAX this borrow covers.
    let buf: &mut [u8; PATH_MAX] = unsafe { &mut *(scratch as *mut [u8; PATH_MAX]) };
    // SAFETY: the helper checks the user address (a fault is an error) and
    // writes at most `buf`'s PATH_MAX bytes.
    let len = unsafe { bpf_probe_read_user_str_bytes(filename as *const u8, buf) }
        .ok()?
        .len();
    if len < 4 {
        return None;
    }
    // SAFETY: the same slot, its mutable borrow over. Only the entry
    // programs use slot ENTRY, and only the exit programs slot EXIT. A
    // program does not run nested on one CPU (tracepoints run with
    // preemption off; the kernel skips an fentry program already running
    // on the CPU), so only a preempted fentry could see its slot change,
    // and only under `preempt=full`: a wrong path, never a fault.
    Some((unsafe { &*scratch }, len))
}

/// The path part of the scratch buffer (see `read_path`).
#[inline(always)]
fn path_of(scratch: &[u8; keywarden_probe_types::PATH_SCRATCH]) -> &[u8; PATH_MAX] {
    // SAFETY: PATH_SCRATCH >= PATH_MAX, so the first PATH_MAX bytes of
    // `scratch` are a valid `[u8; PATH_MAX]` for the same borrow.
    unsafe { &*(scratch.as_ptr() as *const [u8; PATH_MAX]) }
}

/// Stops the current process until the sensor sends SIGCONT, and
/// records it in `HELD` so a later sensor can release it if this one
/// dies first.
#[inline(always)]
fn hold(task: &Task, flags: &mut u32) {
    // SAFETY: takes only a signal number and signals the current task; no
    // memory of ours is involved.
    if unsafe { bpf_send_signal(SIGSTOP) } == 0 {
        *flags |= open_flags::HELD;
        let _ = HELD.insert(&task.tgid(), &task.ktime_ns, 0);
    }
}

/// What a `FileOpenRecord` says about the open besides who, which path
/// and the probe's flags.
struct OpenArgs {
    dfd: i64,
    fd: i64,
    oflags: u32,
    root: RootId,
}

#[inline(always)]
fn fill_open(
    rec: &mut aya_ebpf::maps::ring_buf::RingBufEntry<FileOpenRecord>,
    mut flags: u32,
    len: usize,
    task: Task,
    args: OpenArgs,
    buf: &[u8; PATH_MAX],
) {
    // The helper reads at most PATH_MAX - 1 bytes: a path that long may
    // be cut, and the sensor must not match it as if it were whole.
    if len >= PATH_MAX - 1 {
        flags |= open_flags::TRUNCATED;
    }
    // SAFETY: writable ring memory sized for a `FileOpenRecord` (integers and
    // bytes); no field is read before it is written.
    let r = unsafe { rec.assume_init_mut() };
    r.kind = kind::FILE_OPEN;
    r.flags = flags;
    r.task = task;
    r.dfd = args.dfd;
    r.fd = args.fd;
    r.root = args.root;
    r.oflags = args.oflags;
    r._pad = 0;
    // One helper call, not `r.path = *buf`: the compiler makes that a
    // byte loop of PATH_MAX steps, which the verifier walks for every state
    // reaching it (Linux 6.1's gave up at its million-instruction limit).
    // SAFETY: both are PATH_MAX bytes: `buf` the scratch buffer, `r.path`
    // inside the reserved record.
    if unsafe { bpf_probe_read_kernel_buf(buf.as_ptr(), &mut r.path) }.is_err() {
        r.path[0] = 0;
    }
}

/// Inode, size and mtime of the file behind one of the current task's
/// descriptors.
#[inline(always)]
fn current_fd_file(fd: i64) -> Option<ExeId> {
    let l = task_layout()?;
    file_id(l, current_fd(l, fd)?)
}

/// The `struct file` behind a descriptor an open just returned:
/// `current->files->fdt->fd[fd]`. No check against `max_fds`: the open
/// just installed `fd`, and a descriptor table is only ever replaced by a
/// larger one. A stale read is a wrong file at worst
/// (bpf_probe_read_kernel cannot fault).
#[inline(always)]
fn current_fd(l: &TaskLayout, fd: i64) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    // SAFETY: takes no arguments; the task pointer it returns is only read
    // through bpf_probe_read_kernel (`kernel_ptr`).
    let task = unsafe { bpf_get_current_task() };
    let files = kernel_ptr(task, l.task_files)?;
    let fdt = kernel_ptr(files, l.files_fdt)?;
    let fds = kernel_ptr(fdt, l.fdtable_fd)?;
    kernel_ptr(fds, (fd as u32) << 3)
}

const O_ACCMODE: u64 = 0o3;
const O_RDONLY: u64 = 0;
const O_CLOEXEC: u64 = 0o2000000;

/// Hold (SIGSTOP) the opener of an unseen crypto library until the
/// sensor has attached? Only when holding is on, this sensor holds the
/// host's lease with a fresh heartbeat, the open looks like the dynamic
/// loader's (read-only, which `on_enter` checked, and close-on-exec:
/// `sha256sum` of a library is never held), and
/// the opener is not a keywarden thread (two sensors holding each other
/// would both stay stopped; every sensor thread's name starts with
/// "keywarden").
#[inline(always)]
fn should_hold(open_flags: u64, task: &Task) -> bool {
    config(config::HOLD_NEW_LIBRARIES) != 0 && open_flags & O_CLOEXEC != 0 && sensor_alive(task)
}

/// `name_hash` of the last path component, computed in place.
#[inline(always)]
fn basename_hash(buf: &[u8; PATH_MAX], start: usize, len: usize) -> u64 {
    let mut scan = PathScan {
        buf,
        len: len as u64,
        at: start as u64,
        out: 0xcbf2_9ce4_8422_2325,
    };
    path_loop(NAME_HASH_MAX as u32, hash_step, &mut scan);
    scan.out
}

/// One byte of `basename_hash` (FNV-1a): 0 to go on, 1 at the path's end.
extern "C" fn hash_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `&mut scan` path_loop passed to bpf_loop: live
    // for the whole loop, and nothing else touches it meanwhile.
    let scan = unsafe { &mut *(ctx as *mut PathScan) };
    let idx = scan.at + i;
    if idx >= scan.len {
        return 1;
    }
    // SAFETY: `scan.buf` is the caller's borrow of the scratch buffer,
    // which lasts the whole loop.
    let buf = unsafe { &*scan.buf };
    scan.out ^= buf[idx as usize & (PATH_MAX - 1)] as u64;
    scan.out = scan.out.wrapping_mul(0x0000_0100_0000_01b3);
    0
}

/// State for the loops over a path's bytes (`path_loop`).
#[repr(C)]
struct PathScan {
    buf: *const [u8; PATH_MAX],
    len: u64,
    /// Where the loop starts.
    at: u64,
    /// What it found or computed.
    out: u64,
}

/// Runs `step` up to `n` times over `scan` with `bpf_loop`, so that the
/// verifier checks one step once instead of every iteration of a loop
/// whose exits multiply the states after it. For loops off the common
/// path only (a key or watched file's name): each step is an indirect
/// call.
#[inline(always)]
fn path_loop(n: u32, step: extern "C" fn(u64, *mut core::ffi::c_void) -> i64, scan: &mut PathScan) {
    // SAFETY: `step` has the callback signature bpf_loop expects, and
    // `scan` outlives the call, which runs every callback before returning.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            n,
            step as *mut core::ffi::c_void,
            (scan as *mut PathScan).cast(),
            0,
        );
    }
}

/// The basename ends in `.so`, or in `.so.` and a version of digits
/// and dots (`libcrypto.so.3`, `_rust.abi3.so`): how the dynamic
/// loader names what it opens. Looks at most 16 bytes back.
#[inline(always)]
fn is_shared_object(buf: &[u8; PATH_MAX], len: usize, start: usize) -> bool {
    let at = |i: usize| buf[i & (PATH_MAX - 1)];
    let mut end = len;
    let mut i = 0usize;
    while i < 16 {
        if end <= start {
            break;
        }
        let c = at(end - 1);
        if !(c.is_ascii_digit() || c == b'.') {
            break;
        }
        end -= 1;
        i += 1;
    }
    // `end` is past the last letter; a version must start with '.'.
    end >= start + 3
        && at(end - 3) == b'.'
        && at(end - 2) == b's'
        && at(end - 1) == b'o'
        && (end == len || at(end) == b'.')
}

/// Index of the first byte of the last path component.
#[inline(always)]
fn basename_start(buf: &[u8; PATH_MAX], len: usize) -> usize {
    // A plain loop, not `path_loop`: this runs on every open on the host,
    // and a bpf_loop callback per byte costs an indirect call each. Once
    // the path copy stopped being a byte loop (`fill_open`), Linux 6.1's
    // verifier accepts it.
    let mut i = 0usize;
    while i < 128 {
        if i >= len {
            break;
        }
        let idx = (len - 1 - i) & (PATH_MAX - 1);
        if buf[idx] == b'/' {
            return idx + 1;
        }
        i += 1;
    }
    0
}

/// State for `watch_slot`, which `bpf_loop` calls once per slot.
#[repr(C)]
struct WatchScan {
    scratch: *const [u8; keywarden_probe_types::PATH_SCRATCH],
    len: u64,
    basename: u64,
    hit: u64,
}

/// Does the path pass any compiled watch pattern? The slots are walked
/// with `bpf_loop`, so the verifier checks one slot once; each slot is a
/// branch-free comparison of eight words, exiting after the first word
/// when it already differs (most unrelated paths).
#[inline(always)]
fn is_watched(
    scratch: &[u8; keywarden_probe_types::PATH_SCRATCH],
    len: usize,
    basename: usize,
) -> bool {
    let mut scan = WatchScan {
        scratch,
        len: len as u64,
        basename: basename as u64,
        hit: 0,
    };
    // SAFETY: `watch_slot` has the callback signature bpf_loop expects, and
    // `scan` outlives the call, which runs every callback before returning.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            watch::SLOTS,
            watch_slot as *mut core::ffi::c_void,
            (&mut scan as *mut WatchScan).cast(),
            0,
        );
    }
    scan.hit != 0
}

/// One `bpf_loop` step: 0 to go on, 1 to stop (a hit, or the end).
extern "C" fn watch_slot(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `&mut scan` that is_watched passed to bpf_loop: live
    // for the whole loop, and nothing else touches it meanwhile.
    let scan = unsafe { &mut *(ctx as *mut WatchScan) };
    let Some(p) = WATCH.get(index as u32) else {
        return 1;
    };
    let plen = p.len as usize;
    if p.kind == watch::NONE || plen == 0 || plen > watch::PATTERN_MAX {
        return 1;
    }
    let len = (scan.len as usize) & (PATH_MAX - 1);
    let basename = (scan.basename as usize) & (PATH_MAX - 1);
    let at = match p.kind {
        watch::PATH_PREFIX if plen <= len => Some(0),
        watch::PATH_EXACT if plen == len => Some(0),
        watch::PATH_SUFFIX if plen <= len => Some(len - plen),
        watch::BASENAME_PREFIX if basename + plen <= len => Some(basename),
        _ => None,
    };
    // SAFETY: `scan.scratch` comes from is_watched's borrow of the per-CPU
    // scratch buffer, which lasts the whole loop.
    let scratch = unsafe { &*scan.scratch };
    if let Some(at) = at
        && words_equal(scratch, at, p)
    {
        scan.hit = 1;
        return 1;
    }
    0
}

#[inline(always)]
fn word_at(scratch: &[u8; keywarden_probe_types::PATH_SCRATCH], off: usize) -> u64 {
    // off <= 255 + 56, and the buffer has 64 bytes of slack past 256.
    let off = off & 0x1ff;
    if off + 8 > keywarden_probe_types::PATH_SCRATCH {
        return 0;
    }
    // SAFETY: `off + 8 <= PATH_SCRATCH` was checked just above, so the eight
    // bytes lie inside `scratch`; read_unaligned needs no alignment.
    unsafe { core::ptr::read_unaligned(scratch.as_ptr().add(off) as *const u64) }
}

/// `path[at..at + len] == literal`, as eight masked word compares.
#[inline(always)]
fn words_equal(
    scratch: &[u8; keywarden_probe_types::PATH_SCRATCH],
    at: usize,
    p: &WatchPattern,
) -> bool {
    // The verifier cannot see that `len - plen` is not negative; LLVM
    // can, and would drop a plain mask. black_box keeps it.
    let at = core::hint::black_box(at) & (PATH_MAX - 1);
    if (word_at(scratch, at) ^ p.words[0]) & p.masks[0] != 0 {
        return false;
    }
    let mut diff = 0u64;
    let mut w = 1usize;
    while w < watch::WORDS {
        diff |= (word_at(scratch, at + w * 8) ^ p.words[w]) & p.masks[w];
        w += 1;
    }
    diff == 0
}

#[inline(always)]
fn has_key_suffix(buf: &[u8; PATH_MAX], len: usize) -> bool {
    for suffix in KEY_SUFFIXES {
        let n = suffix.len();
        if len < n {
            continue;
        }
        let mut ok = true;
        let mut j = 0usize;
        while j < n {
            if buf[(len - n + j) & (PATH_MAX - 1)] != suffix[j] {
                ok = false;
                break;
            }
            j += 1;
        }
        if ok {
            return true;
        }
    }
    false
}
