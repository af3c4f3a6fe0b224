//! keywarden's kernel programs.
//!
//! * `sign_entry` / `sign_return` are uprobes attached to the signing
//!   functions of every crypto library the sensor finds. The attach cookie
//!   says which function and library fired, so one program serves them all.
//!   They are plain perf-event uprobes (uprobe.multi links measured the
//!   same; see docs/performance.md).
//! * `process_exec`, `process_exit` and `openat_enter` are tracepoints that
//!   give the sensor process lifetimes, crypto libraries being loaded, key
//!   files being opened, and opens that pass the secret-file watch list.
//!
//! Cost matters more than anything here: a uprobe trap already costs several
//! microseconds in a VM, so records go out with `BPF_RB_NO_WAKEUP` and the
//! sensor polls on a timer. Only records the sensor must act on at once
//! (exec, an unseen library) force a wakeup.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod probes {
    use aya_ebpf::{
        EbpfContext,
        bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
            bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, bpf_probe_read_user,
            bpf_probe_read_user_str_bytes,
            generated::{
                bpf_get_attach_cookie, bpf_get_current_cgroup_id, bpf_get_current_task,
                bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_send_signal,
            },
        },
        macros::{map, raw_tracepoint, tracepoint, uprobe, uretprobe},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
        programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
    };
    use keywarden_probe_types::*;

    /// Several MiB: a 256 KiB ring dropped events at 36k signatures/s.
    /// Drained on a timer; nothing here wakes the sensor.
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

    /// Execs and newly opened crypto libraries: few, and each needs the
    /// sensor at once (to snapshot a process before it exits, or to release
    /// a held one), so every record wakes the sensor's control thread.
    #[map]
    static CONTROL: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

    #[map]
    static MD_CTX_STATE: LruHashMap<ProcPtr, MdCtxState> = LruHashMap::with_max_entries(65536, 0);

    #[map]
    static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(65536, 0);

    /// Pointers that have signed; a free of one of these is reported so the
    /// sensor forgets which key it was.
    #[map]
    static SIGN_HANDLES: LruHashMap<ProcPtr, u8> = LruHashMap::with_max_entries(65536, 0);

    /// (tgid, key object) pairs the sensor has judged: identified, or
    /// checked against every known key without a match. Written by the
    /// sensor; entries are removed here when the object is freed or
    /// re-initialized, so a reused address is always checked again.
    #[map]
    static KNOWN: LruHashMap<ProcPtr, KnownHandle> = LruHashMap::with_max_entries(65536, 0);

    /// Frees and re-initializations seen per (tgid, key object).
    #[map]
    static FREE_GEN: LruHashMap<ProcPtr, u64> = LruHashMap::with_max_entries(65536, 0);

    #[map]
    static LIBRARY_SEEN: LruHashMap<LibrarySeenKey, u8> = LruHashMap::with_max_entries(65536, 0);

    /// The secret-file watch list, compiled to literal tests (see
    /// `keywarden_probe_types::watch`); filled by the sensor, used in order
    /// until the first empty slot.
    #[map]
    static WATCH: Array<WatchPattern> = Array::with_max_entries(watch::SLOTS, 0);

    /// Processes the probe stopped and the sensor has not released yet,
    /// with the time they were stopped. Pinned in bpffs, so it outlives a
    /// sensor that dies mid-hold: the next sensor releases what is left.
    #[map]
    static HELD: HashMap<u32, u64> = HashMap::pinned(4096, 0);

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct PendingLibrary {
        /// User pointer to the path, read again at exit.
        filename: u64,
        open_flags: u64,
        dfd: i64,
    }

    /// A read-only open of a shared object, by thread (pid_tgid), waiting
    /// for its result. LRU: a thread killed inside openat never reaches
    /// the exit tracepoint.
    #[map]
    static PENDING_LIBRARY: LruHashMap<u64, PendingLibrary> =
        LruHashMap::with_max_entries(16384, 0);

    /// Which sensor may hold processes on this host (see `HoldLease`).
    /// Pinned, so all sensors share it.
    #[map]
    static HOLD_LEASE: Array<HoldLease> = Array::pinned(1, 0);

    /// Processes the sensor has condemned: they loaded a protected key that
    /// their binary may not use (or used one). Any signature they begin is
    /// stopped with SIGKILL before it is made. Value: the sensor's index of
    /// the decision, echoed in the `KilledRecord`.
    #[map]
    static VERDICT: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

    /// Basename hashes (`protected_name_hash`) of files that hold protected
    /// keys: opening one holds the process until the sensor has judged it.
    #[map]
    static PROTECTED_NAMES: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

    #[map]
    static CONFIG: Array<u64> = Array::with_max_entries(config::SLOTS, 0);

    /// Thread -> the TCP socket (`struct sock *`) it last received on.
    #[map]
    static LAST_SOCK: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65536, 0);

    /// Where the address fields sit in `struct sock` (from BTF).
    #[map]
    static SOCK_LAYOUT: Array<SockLayout> = Array::with_max_entries(1, 0);

    /// Where the executable's inode hangs off `task_struct` (from BTF).
    #[map]
    static TASK_LAYOUT: Array<TaskLayout> = Array::with_max_entries(1, 0);

    #[map]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::SLOTS, 0);

    #[map]
    static OP_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static PATH_SCRATCH: PerCpuArray<[u8; keywarden_probe_types::PATH_SCRATCH]> =
        PerCpuArray::with_max_entries(1, 0);

    const SIGSTOP: u32 = 19;
    const SIGKILL: u32 = 9;

    #[inline(always)]
    fn count(slot: u32) {
        if let Some(p) = STATS.get_ptr_mut(slot) {
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    fn config(slot: u32) -> u64 {
        CONFIG.get(slot).copied().unwrap_or(0)
    }

    /// Unique per CPU: (cpu << 56) | sequence.
    #[inline(always)]
    fn new_op_id() -> u64 {
        let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
        let seq = match OP_SEQ.get_ptr_mut(0) {
            Some(p) => unsafe {
                *p += 1;
                *p
            },
            None => 0,
        };
        (cpu << 56) | (seq & ((1 << 56) - 1))
    }

    #[inline(always)]
    fn current_task() -> Task {
        Task {
            pid_tgid: bpf_get_current_pid_tgid(),
            uid_gid: bpf_get_current_uid_gid(),
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        }
    }

    #[inline(always)]
    fn arg(ctx: &ProbeContext, n: usize) -> u64 {
        ctx.arg::<u64>(n).unwrap_or(0)
    }

    /// A register by its `func::reg` code (0 for any other code).
    #[inline(always)]
    fn register(ctx: &ProbeContext, code: u8) -> u64 {
        let regs = unsafe { &*ctx.regs };
        match code {
            func::reg::RDI => regs.rdi,
            func::reg::RSI => regs.rsi,
            func::reg::RBX => regs.rbx,
            func::reg::RBP => regs.rbp,
            func::reg::R12 => regs.r12,
            func::reg::R13 => regs.r13,
            func::reg::R14 => regs.r14,
            func::reg::R15 => regs.r15,
            _ => 0,
        }
    }

    // ---------------------------------------------------------------- uprobes

    #[uprobe]
    pub fn sign_entry(ctx: ProbeContext) -> u32 {
        let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
        let (library, f) = func::split_cookie(cookie);
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        match f {
            func::DIGEST_SIGN_INIT => on_init(tgid, arg(&ctx, 0), arg(&ctx, 4), 0),
            func::DIGEST_SIGN_INIT_EX => on_init(tgid, arg(&ctx, 0), arg(&ctx, 5), arg(&ctx, 2)),
            func::DIGEST_SIGN_UPDATE => on_update(tgid, arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2)),
            func::DIGEST_SIGN | func::DIGEST_SIGN_FINAL | func::PKEY_SIGN => {
                if !condemned(&ctx, f, library, tgid) {
                    on_sign_entry(&ctx, f, library, tgid)
                }
            }
            func::RUST_SIGNER_SIGN | func::RING_ECDSA_SIGN | func::RING_ED25519_SIGN => {
                if !condemned(&ctx, f, library, tgid) {
                    on_sign_entry(&ctx, f, library, tgid)
                }
            }
            // EVP_PKEY_free at its entry (where the sensor found no
            // reference-count test to go past: every call counts as a
            // free), or a context rebound to a key.
            func::PKEY_FREE | func::PKEY_SIGN_INIT => on_free(tgid, arg(&ctx, 0)),
            func::PKEY_FREED => on_free(tgid, register(&ctx, func::cookie_register(cookie))),
            _ => {}
        }
        0
    }

    /// A process the sensor condemned is killed here, as it enters a signing
    /// call and before any signature exists. The signal is delivered on the
    /// way back to user space from this trap, so not one instruction of
    /// the signing function runs. Length queries pass: they sign nothing.
    #[inline(always)]
    fn condemned(ctx: &ProbeContext, f: u8, library: u32, tgid: u32) -> bool {
        let Some(verdict) = (unsafe { VERDICT.get(&tgid) }).copied() else {
            return false;
        };
        if arg(ctx, 1) == 0 {
            return false;
        }
        if unsafe { bpf_send_signal(SIGKILL) } != 0 {
            return false;
        }
        let rec = KilledRecord {
            kind: kind::KILLED,
            func: f as u32,
            task: current_task(),
            library,
            verdict,
        };
        if EVENTS.output(&rec, BPF_RB_FORCE_WAKEUP as u64).is_err() {
            count(stats::LOST_OTHER);
        }
        true
    }

    /// EVP_DigestSignInit(ctx, pctx, type, e, pkey) and
    /// EVP_DigestSignInit_ex(ctx, pctx, mdname, libctx, props, pkey, params):
    /// remember which key this EVP_MD_CTX will sign with.
    #[inline(always)]
    fn on_init(tgid: u32, md_ctx: u64, pkey: u64, md_name_ptr: u64) {
        if md_ctx == 0 {
            return;
        }
        let key = ProcPtr {
            tgid,
            _pad: 0,
            ptr: md_ctx,
        };
        let existing = MD_CTX_STATE.get_ptr_mut(&key);
        // A re-init with pkey=NULL keeps the key the context already has.
        let pkey = match (pkey, existing) {
            (0, Some(old)) => unsafe { (*old).pkey },
            _ => pkey,
        };
        let mut state = MdCtxState {
            pkey,
            op_id: new_op_id(),
            captured: 0,
            flags: 0,
            md_name: [0; 16],
        };
        if md_name_ptr != 0
            && unsafe {
                bpf_probe_read_user_str_bytes(md_name_ptr as *const u8, &mut state.md_name)
            }
            .is_ok()
        {
            state.flags |= sign_flags::HAS_MD_NAME;
        }
        // Contexts are re-initialized per signature (TLS, openssl speed):
        // overwrite in place rather than pay an LRU insert each time.
        match existing {
            Some(p) => unsafe { *p = state },
            None => {
                let _ = MD_CTX_STATE.insert(&key, &state, 0);
            }
        }
    }

    /// EVP_DigestSignUpdate(ctx, data, len): capture streamed data so the
    /// sensor can verify the final signature. Skipped inside a one-shot
    /// EVP_DigestSign, which captured its whole input already.
    #[inline(always)]
    fn on_update(tgid: u32, md_ctx: u64, data: u64, len: u64) {
        let tid = bpf_get_current_pid_tgid() as u32;
        if unsafe { INFLIGHT.get(&tid) }.is_some_and(|i| i.depth > 0) {
            return;
        }
        let key = ProcPtr {
            tgid,
            _pad: 0,
            ptr: md_ctx,
        };
        let Some(state) = MD_CTX_STATE.get_ptr_mut(&key) else {
            return;
        };
        let (op_id, captured) = unsafe { ((*state).op_id, (*state).captured) };
        let taken = emit_data(tgid, op_id, captured, data, len);
        unsafe { (*state).captured = captured.saturating_add(taken) };
    }

    /// Copies up to `CAPTURE_MAX - offset` bytes of `src` into data records.
    /// Returns how many bytes were taken.
    #[inline(always)]
    fn emit_data(tgid: u32, op_id: u64, offset: u32, src: u64, len: u64) -> u32 {
        if src == 0 || len == 0 {
            return 0;
        }
        if offset >= CAPTURE_MAX {
            count(stats::CAPTURE_TRUNCATED);
            return 0;
        }
        let room = (CAPTURE_MAX - offset) as u64;
        let total = if len < room { len } else { room };
        let truncated = (len > room) as u32;
        if truncated != 0 {
            count(stats::CAPTURE_TRUNCATED);
        }
        if total <= DATA_SMALL as u64 {
            emit_small(tgid, op_id, offset, src, total as u32, truncated);
            return total as u32;
        }
        let mut done: u32 = 0;
        for _ in 0..(CAPTURE_MAX as usize / DATA_BIG) {
            let left = total as u32 - done;
            if left == 0 {
                break;
            }
            let n = if left > DATA_BIG as u32 {
                DATA_BIG as u32
            } else {
                left
            };
            let last = done + n == total as u32;
            emit_big(
                tgid,
                op_id,
                offset + done,
                src + done as u64,
                n,
                if last { truncated } else { 0 },
            );
            done += n;
        }
        done
    }

    /// Defines an emitter for one size of data record. The two sizes are
    /// distinct types because a ring reservation must have a constant size.
    macro_rules! data_emitter {
        ($name:ident, $record:ty, $kind:expr, $cap:expr) => {
            #[inline(always)]
            fn $name(tgid: u32, op_id: u64, offset: u32, src: u64, n: u32, truncated: u32) {
                let Some(mut rec) = EVENTS.reserve::<$record>(0) else {
                    count(stats::LOST_DATA);
                    return;
                };
                let r = unsafe { rec.assume_init_mut() };
                r.header = DataHeader {
                    kind: $kind,
                    tgid,
                    op_id,
                    offset,
                    len: n,
                    truncated,
                    _pad: 0,
                };
                let n = (n as usize).min($cap);
                let rc = unsafe {
                    aya_ebpf::helpers::generated::bpf_probe_read_user(
                        r.data.as_mut_ptr().cast(),
                        n as u32,
                        src as *const core::ffi::c_void,
                    )
                };
                if rc == 0 {
                    rec.submit(BPF_RB_NO_WAKEUP as u64);
                } else {
                    rec.discard(BPF_RB_NO_WAKEUP as u64);
                    count(stats::DATA_UNREADABLE);
                }
            }
        };
    }
    data_emitter!(emit_small, DataSmallRecord, kind::DATA_SMALL, DATA_SMALL);
    data_emitter!(emit_big, DataBigRecord, kind::DATA_BIG, DATA_BIG);

    /// The connection this thread last received from, if it is still an
    /// established TCP connection. Reads kernel memory at offsets from BTF;
    /// a socket freed meanwhile reads as not established.
    #[inline(always)]
    fn peer_of(tid: u32) -> Option<Peer> {
        let sk = *unsafe { LAST_SOCK.get(&tid) }?;
        let l = sock_layout()?;
        let state: u8 = kernel_read(sk, l.state)?;
        if state != TCP_ESTABLISHED {
            return None;
        }
        let family: u16 = kernel_read(sk, l.family)?;
        let dport: u16 = kernel_read(sk, l.dport)?;
        let mut peer = Peer {
            family,
            local_port: kernel_read(sk, l.num)?,
            remote_port: u16::from_be(dport),
            _pad: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
        };
        if family == AF_INET {
            let d: [u8; 4] = kernel_read(sk, l.daddr)?;
            let s: [u8; 4] = kernel_read(sk, l.rcv_saddr)?;
            peer.remote_addr[..4].copy_from_slice(&d);
            peer.local_addr[..4].copy_from_slice(&s);
        } else if family == AF_INET6 {
            peer.remote_addr = kernel_read(sk, l.v6_daddr)?;
            peer.local_addr = kernel_read(sk, l.v6_rcv_saddr)?;
        } else {
            return None;
        }
        Some(peer)
    }

    /// The socket layout, once the sensor filled it in.
    #[inline(always)]
    fn sock_layout() -> Option<&'static SockLayout> {
        SOCK_LAYOUT.get(0).filter(|l| l.valid != 0)
    }

    /// The task layout, once the sensor filled it in.
    #[inline(always)]
    fn task_layout() -> Option<&'static TaskLayout> {
        TASK_LAYOUT.get(0).filter(|l| l.valid != 0)
    }

    /// A `T` at `base + off` in kernel memory.
    #[inline(always)]
    fn kernel_read<T>(base: u64, off: u32) -> Option<T> {
        unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.ok()
    }

    /// A non-NULL pointer at `base + off` in kernel memory.
    #[inline(always)]
    fn kernel_ptr(base: u64, off: u32) -> Option<u64> {
        kernel_read::<u64>(base, off).filter(|&p| p != 0)
    }

    /// The file the current task runs: `current->mm->exe_file->f_inode`.
    #[inline(always)]
    fn current_exe() -> Option<ExeId> {
        let l = task_layout()?;
        let task = unsafe { bpf_get_current_task() };
        let mm = kernel_ptr(task, l.task_mm)?;
        file_id(l, kernel_ptr(mm, l.mm_exe_file)?)
    }

    /// The file behind one of the current task's descriptors:
    /// `current->files->fdt->fd[fd]`.
    #[inline(always)]
    fn current_fd_file(fd: i64) -> Option<ExeId> {
        let l = task_layout()?;
        let task = unsafe { bpf_get_current_task() };
        let files = kernel_ptr(task, l.task_files)?;
        let fdt = kernel_ptr(files, l.files_fdt)?;
        let max: u32 = kernel_read(fdt, l.fdtable_max_fds)?;
        if fd < 0 || fd >= max as i64 {
            return None;
        }
        let fds = kernel_ptr(fdt, l.fdtable_fd)?;
        file_id(l, kernel_ptr(fds, fd as u32 * 8)?)
    }

    /// Inode number, size and mtime of a `struct file`.
    #[inline(always)]
    fn file_id(l: &TaskLayout, file: u64) -> Option<ExeId> {
        let inode = kernel_ptr(file, l.file_inode)?;
        Some(ExeId {
            valid: 1,
            mtime_nsec: kernel_read(inode, l.inode_mtime_nsec)?,
            ino: kernel_read(inode, l.inode_ino)?,
            size: kernel_read(inode, l.inode_size)?,
            mtime_sec: kernel_read(inode, l.inode_mtime_sec)?,
        })
    }

    /// Where the current task's absolute paths resolve:
    /// `current->fs->root.dentry->d_inode->i_ino` and
    /// `current->nsproxy->mnt_ns->ns.inum`.
    #[inline(always)]
    fn current_root() -> Option<RootId> {
        let l = task_layout()?;
        let task = unsafe { bpf_get_current_task() };
        let fs = kernel_ptr(task, l.task_fs)?;
        let dentry = kernel_ptr(fs, l.fs_root_dentry)?;
        let inode = kernel_ptr(dentry, l.dentry_inode)?;
        let nsproxy = kernel_ptr(task, l.task_nsproxy)?;
        let mnt_ns = kernel_ptr(nsproxy, l.nsproxy_mnt_ns)?;
        Some(RootId {
            valid: 1,
            mnt_ns: kernel_read(mnt_ns, l.mnt_ns_inum)?,
            ino: kernel_read(inode, l.inode_ino)?,
        })
    }

    /// A C signing call nested in a Rust signer: the signer's record takes
    /// the EVP_PKEY that call signs with (see `sign_flags::INNER_HANDLE`),
    /// and skips copying the signature when the sensor knows that key
    /// object already.
    #[inline(always)]
    fn adopt_inner_handle(outer: *mut Inflight, tgid: u32, md_ctx: u64) {
        let (outer_func, outer_flags) = unsafe { ((*outer).func, (*outer).flags) };
        if !func::returns_rust_value(outer_func as u8)
            || outer_flags & sign_flags::INNER_HANDLE != 0
        {
            return;
        }
        let ctx_key = ProcPtr {
            tgid,
            _pad: 0,
            ptr: md_ctx,
        };
        let Some(pkey) = (unsafe { MD_CTX_STATE.get(&ctx_key) }).map(|s| s.pkey) else {
            return;
        };
        if pkey == 0 {
            return;
        }
        let known = ProcPtr {
            tgid,
            _pad: 0,
            ptr: pkey,
        };
        let generation = unsafe { FREE_GEN.get(&known) }.copied().unwrap_or(0);
        let mut flags = outer_flags | sign_flags::INNER_HANDLE | sign_flags::HANDLE_IS_PKEY;
        if unsafe { KNOWN.get(&known) }.is_some_and(|k| k.generation == generation) {
            flags |= sign_flags::KNOWN_HANDLE;
        }
        unsafe {
            (*outer).handle = pkey;
            (*outer).handle_gen = generation;
            (*outer).flags = flags;
        }
    }

    /// EVP_DigestSign(ctx, sig, siglen, tbs, tbslen),
    /// EVP_DigestSignFinal(ctx, sig, siglen),
    /// EVP_PKEY_sign(pctx, sig, siglen, tbs, tbslen),
    /// and the Rust signers (`func::returns_rust_value`), whose first
    /// argument is where the result goes.
    #[inline(always)]
    fn on_sign_entry(ctx: &ProbeContext, f: u8, library: u32, tgid: u32) {
        let tid = bpf_get_current_pid_tgid() as u32;
        let sp = unsafe { (*ctx.regs).rsp };
        let now = unsafe { bpf_ktime_get_ns() };
        // Each thread keeps its slot; depth 0 marks it empty, which saves a
        // hash insert and delete on every signature.
        let slot = INFLIGHT.get_ptr_mut(&tid);
        if let Some(outer) = slot {
            // A live outer call was entered at the same (tail call) or a
            // higher stack pointer than this one, and recently.
            let (depth, outer_sp, outer_start) =
                unsafe { ((*outer).depth, (*outer).sp, (*outer).started_ns) };
            if depth > 0 && outer_sp >= sp && now.wrapping_sub(outer_start) < INFLIGHT_MAX_AGE_NS {
                unsafe { (*outer).depth += 1 };
                if f == func::DIGEST_SIGN || f == func::DIGEST_SIGN_FINAL {
                    adopt_inner_handle(outer, tgid, arg(ctx, 0));
                }
                return;
            }
        }
        // All six argument registers, each read at its own constant
        // offset: the verifier refuses a context pointer LLVM would
        // otherwise compute from `f`.
        let a: [u64; 6] = core::hint::black_box([
            arg(ctx, 0),
            arg(ctx, 1),
            arg(ctx, 2),
            arg(ctx, 3),
            arg(ctx, 4),
            arg(ctx, 5),
        ]);
        // (key object or context, output, output length, data, data length)
        let (handle_ctx, sig, siglen_ptr, data, data_len) = match f {
            func::RUST_SIGNER_SIGN | func::RING_ED25519_SIGN => (a[1], a[0], 0, a[2], a[3]),
            func::RING_ECDSA_SIGN => (a[1], a[0], 0, a[4], a[5]),
            _ => (a[0], a[1], a[2], a[3], a[4]),
        };
        if sig == 0 {
            return; // length query: not a signature
        }
        let mut inflight = Inflight {
            func: f as u32,
            depth: 1,
            library,
            flags: 0,
            handle: handle_ctx,
            op_id: 0,
            sig_ptr: sig,
            siglen_ptr,
            sp,
            started_ns: now,
            handle_gen: 0,
            md_name: [0; 16],
            peer: Peer::default(),
        };
        if let Some(peer) = peer_of(tid) {
            inflight.peer = peer;
            inflight.flags |= sign_flags::HAS_PEER;
        }
        if func::returns_rust_value(f) {
            // Rust signer objects are short-lived boxes whose addresses
            // are reused for other keys, and nothing reports their frees:
            // every signature is captured and verified.
            inflight.op_id = new_op_id();
            emit_data(tgid, inflight.op_id, 0, data, data_len);
            match slot {
                Some(p) => unsafe { *p = inflight },
                None => {
                    let _ = INFLIGHT.insert(&tid, &inflight, 0);
                }
            }
            return;
        }
        if f == func::PKEY_SIGN {
            inflight.op_id = new_op_id();
        } else {
            let key = ProcPtr {
                tgid,
                _pad: 0,
                ptr: handle_ctx,
            };
            match unsafe { MD_CTX_STATE.get(&key) } {
                Some(state) => {
                    if state.pkey != 0 {
                        inflight.handle = state.pkey;
                        inflight.flags |= sign_flags::HANDLE_IS_PKEY;
                    }
                    inflight.flags |= state.flags & sign_flags::HAS_MD_NAME;
                    inflight.md_name = state.md_name;
                    // Final signs what the updates streamed under this op id.
                    inflight.op_id = if f == func::DIGEST_SIGN_FINAL {
                        state.op_id
                    } else {
                        new_op_id()
                    };
                }
                None => inflight.op_id = new_op_id(),
            }
        }
        let known = ProcPtr {
            tgid,
            _pad: 0,
            ptr: inflight.handle,
        };
        let generation = unsafe { FREE_GEN.get(&known) }.copied().unwrap_or(0);
        inflight.handle_gen = generation;
        if unsafe { KNOWN.get(&known) }.is_some_and(|k| k.generation == generation) {
            inflight.flags |= sign_flags::KNOWN_HANDLE;
        } else if f != func::DIGEST_SIGN_FINAL {
            emit_data(tgid, inflight.op_id, 0, data, data_len);
        }
        match slot {
            Some(p) => unsafe { *p = inflight },
            None => {
                let _ = INFLIGHT.insert(&tid, &inflight, 0);
            }
        }
    }

    #[inline(always)]
    fn on_free(tgid: u32, ptr: u64) {
        let key = ProcPtr { tgid, _pad: 0, ptr };
        // Most objects freed never signed (a TLS client frees five per
        // handshake): a lock-free lookup first spares them the LRU maps'
        // locked delete. Each answer is a plain bool at once (combining
        // two map-value pointers is something the verifier refuses).
        let signed =
            unsafe { SIGN_HANDLES.get(&key) }.is_some() && SIGN_HANDLES.remove(&key).is_ok();
        let known = unsafe { KNOWN.get(&key) }.is_some() && KNOWN.remove(&key).is_ok();
        if !signed && !known {
            return;
        }
        // Voids any KNOWN entry the sensor writes later for a signature
        // made before this free.
        let generation = unsafe { FREE_GEN.get(&key) }.copied().unwrap_or(0);
        let _ = FREE_GEN.insert(&key, &(generation + 1), 0);
        let rec = HandleFreeRecord {
            kind: kind::HANDLE_FREE,
            tgid,
            handle: ptr,
        };
        if EVENTS.output(&rec, BPF_RB_NO_WAKEUP as u64).is_err() {
            count(stats::LOST_OTHER);
        }
    }

    #[uretprobe]
    pub fn sign_return(ctx: RetProbeContext) -> u32 {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tid = pid_tgid as u32;
        let Some(p) = INFLIGHT.get_ptr_mut(&tid) else {
            return 0;
        };
        unsafe {
            match (*p).depth {
                0 => return 0, // empty slot: a length query returning
                1 => {}
                _ => {
                    (*p).depth -= 1;
                    return 0;
                }
            }
        }
        let inflight = unsafe { *p };
        unsafe { (*p).depth = 0 };
        let mut ret = unsafe { (*ctx.regs).rax } as i32 as i64;
        let mut sig_len = 0u64;
        let mut sig_src = inflight.sig_ptr;
        let mut flags = inflight.flags;
        match inflight.func as u8 {
            func::RUST_SIGNER_SIGN => match vec_in_result(inflight.sig_ptr) {
                Some((ptr, len)) => {
                    ret = 1;
                    sig_src = ptr;
                    sig_len = len;
                }
                None => ret = 0,
            },
            func::RING_ECDSA_SIGN | func::RING_ED25519_SIGN => {
                // `Signature` keeps its bytes inline: copy the value and
                // let the sensor find the signature in it.
                ret = 1;
                sig_len = RING_VALUE_BYTES;
                flags |= sign_flags::SIG_IN_VALUE;
            }
            _ if ret == 1 => {
                sig_len =
                    unsafe { bpf_probe_read_user(inflight.siglen_ptr as *const u64) }.unwrap_or(0)
            }
            _ => {}
        }

        let head = SignRecord {
            kind: kind::SIGN,
            func: inflight.func,
            task: current_task(),
            library: inflight.library,
            flags,
            handle: inflight.handle,
            op_id: inflight.op_id,
            ret,
            sig_len,
            sig_captured: 0,
            _pad: 0,
            md_name: inflight.md_name,
            handle_gen: inflight.handle_gen,
            peer: inflight.peer,
        };
        if inflight.flags & sign_flags::KNOWN_HANDLE != 0 {
            let rec = SignRecord {
                kind: kind::SIGN_KNOWN,
                ..head
            };
            if EVENTS.output(&rec, BPF_RB_NO_WAKEUP as u64).is_err() {
                count(stats::LOST_SIGN);
            }
            return 0;
        }
        let Some(mut rec) = EVENTS.reserve::<SignWithSigRecord>(0) else {
            count(stats::LOST_SIGN);
            return 0;
        };
        let r = unsafe { rec.assume_init_mut() };
        r.head = head;
        let len = head.sig_len;
        let n = if len > SIG_MAX as u64 {
            SIG_MAX as u32
        } else {
            len as u32
        };
        if len > SIG_MAX as u64 {
            r.head.flags |= sign_flags::SIG_INCOMPLETE;
        }
        if n > 0 {
            let n = (n as usize).min(SIG_MAX);
            let rc = unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_user(
                    r.sig.as_mut_ptr().cast(),
                    n as u32,
                    sig_src as *const core::ffi::c_void,
                )
            };
            if rc == 0 {
                r.head.sig_captured = n as u32;
            } else {
                r.head.flags |= sign_flags::SIG_INCOMPLETE;
            }
        }
        rec.submit(BPF_RB_NO_WAKEUP as u64);
        if func::returns_rust_value(inflight.func as u8)
            && inflight.flags & sign_flags::INNER_HANDLE == 0
        {
            return 0;
        }
        let key = ProcPtr {
            tgid: (pid_tgid >> 32) as u32,
            _pad: 0,
            ptr: inflight.handle,
        };
        if unsafe { SIGN_HANDLES.get(&key) }.is_none() {
            let _ = SIGN_HANDLES.insert(&key, &1, 0);
        }
        0
    }

    /// Bytes of ring's returned `Signature` value copied: its largest
    /// signature (ECDSA P-384, DER) is 104 bytes, plus the length word and
    /// the `Result` tag.
    const RING_VALUE_BYTES: u64 = 160;

    /// `Result<Vec<u8>, rustls::Error>` as `Signer::sign` returns it. A
    /// `Vec<u8>` is three words, capacity, pointer, length, in rustc's
    /// current order; the `Result` puts its tag before them (rustc 1.99
    /// with rustls 0.23) or folds it into the capacity. Rust promises none
    /// of this, so the probe looks for the shape (capacity >= length > 0,
    /// a user-space pointer between them) at either position, and the
    /// sensor only trusts what verifies. Returns (pointer, length).
    #[inline(always)]
    fn vec_in_result(at: u64) -> Option<(u64, u64)> {
        let w: [u64; 4] = unsafe { bpf_probe_read_user(at as *const [u64; 4]) }.ok()?;
        for s in 0..2 {
            let (cap, ptr, len) = (w[s], w[s + 1], w[s + 2]);
            if (0x10000..(1u64 << 47)).contains(&ptr)
                && len > 0
                && len <= SIG_MAX as u64
                && cap >= len
                && cap < 1 << 32
            {
                return Some((ptr, len));
            }
        }
        None
    }

    // ------------------------------------------------------------ tracepoints

    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    const IPPROTO_TCP: u16 = 6;
    const TCP_ESTABLISHED: u8 = 1;

    /// sock_recv_length fires in the receiving thread for every socket
    /// receive (`read`, `recv*`) of every process: remember the TCP socket,
    /// so a signature this thread makes next can name its connection.
    /// A raw tracepoint: the program gets the `struct sock *` itself, and
    /// the kernel does not build the tracepoint's record for it first
    /// (about a third of this hook's cost per receive, in a profile of a
    /// TLS client). Two reads of the socket and one map write per receive;
    /// nothing for reads of files. A receive that got no data (`EAGAIN`,
    /// which an event loop meets on every drained socket, or end of file)
    /// names no connection the thread is working on, and returns first.
    #[raw_tracepoint(tracepoint = "sock_recv_length")]
    pub fn sock_recv(ctx: RawTracePointContext) -> u32 {
        // TP_PROTO(struct sock *sk, int ret, int flags)
        let ret: u64 = ctx.arg(1);
        if ret as i32 <= 0 {
            return 0;
        }
        let sk: u64 = ctx.arg(0);
        let Some(l) = sock_layout() else {
            return 0;
        };
        let family: u16 = kernel_read(sk, l.family).unwrap_or(0);
        let protocol: u16 = kernel_read(sk, l.protocol).unwrap_or(0);
        if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
            return 0;
        }
        let tid = bpf_get_current_pid_tgid() as u32;
        match LAST_SOCK.get_ptr_mut(&tid) {
            Some(p) => unsafe {
                if *p != sk {
                    *p = sk
                }
            },
            None => {
                let _ = LAST_SOCK.insert(&tid, &sk, 0);
            }
        }
        0
    }

    #[tracepoint(category = "sched", name = "sched_process_exec")]
    pub fn process_exec(ctx: TracePointContext) -> u32 {
        let task = current_task();
        let _ = INFLIGHT.remove(&task.tid());
        // A new image is judged afresh.
        let _ = VERDICT.remove(&task.tgid());
        let mark = ExitRecord {
            kind: kind::EXEC_MARK,
            _pad: 0,
            task,
        };
        if EVENTS.output(&mark, BPF_RB_NO_WAKEUP as u64).is_err() {
            count(stats::LOST_OTHER);
        }
        let Some(mut rec) = CONTROL.reserve::<ExecRecord>(0) else {
            count(stats::LOST_OTHER);
            return 0;
        };
        let r = unsafe { rec.assume_init_mut() };
        r.kind = kind::EXEC;
        r.flags = 0;
        r.task = task;
        r.exe = current_exe().unwrap_or_default();
        r.root = current_root().unwrap_or_default();
        r.filename[0] = 0;
        // __data_loc char[] filename at offset 8: low 16 bits are the offset.
        if let Ok(loc) = unsafe { ctx.read_at::<u32>(8) } {
            let off = (loc & 0xffff) as usize;
            let src = unsafe { (ctx.as_ptr() as *const u8).add(off) };
            let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, &mut r.filename) };
        }
        // An image not seen in this cgroup yet may carry its own signing
        // code (a static binary): stop it before its first instruction
        // until the sensor has looked. The sensor marks the path seen.
        let seen = LibrarySeenKey::new(task.cgroup_id, &r.filename, &r.exe);
        if config(config::HOLD_NEW_LIBRARIES) != 0
            && unsafe { LIBRARY_SEEN.get(&seen) }.is_none()
            && sensor_alive(&task)
            && unsafe { bpf_send_signal(SIGSTOP) } == 0
        {
            r.flags |= exec_flags::HELD;
            let _ = HELD.insert(&task.tgid(), &task.ktime_ns, 0);
        }
        rec.submit(BPF_RB_FORCE_WAKEUP as u64);
        0
    }

    #[tracepoint(category = "sched", name = "sched_process_exit")]
    pub fn process_exit(_ctx: TracePointContext) -> u32 {
        let pid_tgid = bpf_get_current_pid_tgid();
        let _ = INFLIGHT.remove(&(pid_tgid as u32));
        if (pid_tgid >> 32) as u32 != pid_tgid as u32 {
            return 0; // a thread, not the process
        }
        let _ = VERDICT.remove(&(pid_tgid as u32));
        let rec = ExitRecord {
            kind: kind::EXIT,
            _pad: 0,
            task: current_task(),
        };
        if EVENTS.output(&rec, BPF_RB_NO_WAKEUP as u64).is_err() {
            count(stats::LOST_OTHER);
        }
        0
    }

    /// Classifies an openat path: a shared object being loaded (any of them
    /// may carry its own crypto: Python's `cryptography` links OpenSSL into
    /// `_rust.abi3.so`), or a file that may hold a key. Everything else
    /// returns at once. A library open is only noted here and handled when
    /// it has succeeded (`openat_exit`).
    #[tracepoint(category = "syscalls", name = "sys_enter_openat")]
    pub fn openat_enter(ctx: TracePointContext) -> u32 {
        let Ok(filename) = (unsafe { ctx.read_at::<u64>(24) }) else {
            return 0;
        };
        let Some((scratch, len)) = read_path(filename) else {
            return 0;
        };
        let pid_tgid = bpf_get_current_pid_tgid();
        if (pid_tgid >> 32) == config(config::SENSOR_TGID) {
            return 0;
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
            let open_flags = unsafe { ctx.read_at::<u64>(32) }.unwrap_or(0);
            if open_flags & O_ACCMODE == O_RDONLY {
                let pending = PendingLibrary {
                    filename,
                    open_flags,
                    dfd: open_dfd(&ctx),
                };
                let _ = PENDING_LIBRARY.insert(&pid_tgid, &pending, 0);
            }
            return 0;
        }
        if has_key_suffix(buf, len) {
            flags |= open_flags::KEY_FILE;
        }
        if is_watched(scratch, len, basename) {
            flags |= open_flags::WATCHED;
        }
        if flags == 0 {
            return 0;
        }
        let name = basename_hash(buf, basename, len);
        if unsafe { PROTECTED_NAMES.get(&name) }.is_some() {
            flags |= open_flags::PROTECTED;
        }
        let task = current_task();
        // Reserve first: a process is only ever held when the record that
        // makes the sensor release it is sure to be delivered.
        let Some(mut rec) = EVENTS.reserve::<FileOpenRecord>(0) else {
            count(stats::LOST_OTHER);
            return 0;
        };
        if flags & open_flags::PROTECTED != 0 && sensor_alive(&task) {
            hold(&task, &mut flags);
        }
        fill_open(&mut rec, flags, len, task, open_dfd(&ctx), -1, buf);
        rec.submit(if flags & open_flags::HELD != 0 {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        } as u64);
        0
    }

    /// A library opened read-only for the first time in this cgroup: tell
    /// the control thread, holding the opener (see `should_hold`) until it
    /// has attached.
    #[tracepoint(category = "syscalls", name = "sys_exit_openat")]
    pub fn openat_exit(ctx: TracePointContext) -> u32 {
        let pid_tgid = bpf_get_current_pid_tgid();
        let Some(pending) = (unsafe { PENDING_LIBRARY.get(&pid_tgid) }).copied() else {
            return 0;
        };
        let _ = PENDING_LIBRARY.remove(&pid_tgid);
        let fd = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1);
        if fd < 0 {
            return 0;
        }
        let Some((scratch, len)) = read_path(pending.filename) else {
            return 0;
        };
        let buf = path_of(scratch);
        let task = current_task();
        let file = current_fd_file(fd).unwrap_or_default();
        let key = LibrarySeenKey::new(task.cgroup_id, &buf[..], &file);
        if unsafe { LIBRARY_SEEN.get(&key) }.is_some() {
            return 0;
        }
        let _ = LIBRARY_SEEN.insert(&key, &1, 0);
        let Some(mut rec) = CONTROL.reserve::<FileOpenRecord>(0) else {
            count(stats::LOST_OTHER);
            return 0;
        };
        let mut flags = open_flags::LIBRARY;
        if should_hold(pending.open_flags, &task) {
            hold(&task, &mut flags);
        }
        fill_open(&mut rec, flags, len, task, pending.dfd, fd, buf);
        rec.submit(BPF_RB_FORCE_WAKEUP as u64);
        0
    }

    /// The `dfd` argument of openat.
    #[inline(always)]
    fn open_dfd(ctx: &TracePointContext) -> i64 {
        unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-100) as i32 as i64
    }

    /// Reads a NUL-terminated user path into the per-CPU scratch buffer:
    /// the buffer and the path's length, or None if it is unreadable or
    /// too short to be of interest.
    #[inline(always)]
    fn read_path(
        filename: u64,
    ) -> Option<(&'static [u8; keywarden_probe_types::PATH_SCRATCH], usize)> {
        let scratch = PATH_SCRATCH.get_ptr_mut(0)?;
        // The path goes into the first PATH_MAX bytes; the rest is slack
        // for word reads past the end of a short path.
        let buf: &mut [u8; PATH_MAX] = unsafe { &mut *(scratch as *mut [u8; PATH_MAX]) };
        let len = unsafe { bpf_probe_read_user_str_bytes(filename as *const u8, buf) }
            .ok()?
            .len();
        if len < 4 {
            return None;
        }
        Some((unsafe { &*scratch }, len))
    }

    /// The path part of the scratch buffer (see `read_path`).
    #[inline(always)]
    fn path_of(scratch: &[u8; keywarden_probe_types::PATH_SCRATCH]) -> &[u8; PATH_MAX] {
        unsafe { &*(scratch.as_ptr() as *const [u8; PATH_MAX]) }
    }

    /// Stops the current process until the sensor sends SIGCONT, and
    /// records it in `HELD` so a later sensor can release it if this one
    /// dies first.
    #[inline(always)]
    fn hold(task: &Task, flags: &mut u32) {
        if unsafe { bpf_send_signal(SIGSTOP) } == 0 {
            *flags |= open_flags::HELD;
            let _ = HELD.insert(&task.tgid(), &task.ktime_ns, 0);
        }
    }

    #[inline(always)]
    fn fill_open(
        rec: &mut aya_ebpf::maps::ring_buf::RingBufEntry<FileOpenRecord>,
        mut flags: u32,
        len: usize,
        task: Task,
        dfd: i64,
        fd: i64,
        buf: &[u8; PATH_MAX],
    ) {
        // The helper reads at most PATH_MAX - 1 bytes: a path that long may
        // be cut, and the sensor must not match it as if it were whole.
        if len >= PATH_MAX - 1 {
            flags |= open_flags::TRUNCATED;
        }
        let r = unsafe { rec.assume_init_mut() };
        r.kind = kind::FILE_OPEN;
        r.flags = flags;
        r.task = task;
        r.dfd = dfd;
        r.fd = fd;
        r.path = *buf;
    }

    const O_ACCMODE: u64 = 0o3;
    const O_RDONLY: u64 = 0;
    const O_CLOEXEC: u64 = 0o2000000;

    /// Hold (SIGSTOP) the opener of an unseen crypto library until the
    /// sensor has attached? Only when holding is on, this sensor holds the
    /// host's lease with a fresh heartbeat, the open looks like the dynamic
    /// loader's (read-only, which `openat_enter` checked, and close-on-exec:
    /// `sha256sum` of a library is never held), and
    /// the opener is not a keywarden thread (two sensors holding each other
    /// would both stay stopped; every sensor thread's name starts with
    /// "keywarden").
    #[inline(always)]
    fn should_hold(open_flags: u64, task: &Task) -> bool {
        config(config::HOLD_NEW_LIBRARIES) != 0 && open_flags & O_CLOEXEC != 0 && sensor_alive(task)
    }

    /// Holding anyone needs a sensor to release them: this sensor holds
    /// the host's lease, its heartbeat is fresh, and the opener is not a
    /// keywarden thread.
    #[inline(always)]
    fn sensor_alive(task: &Task) -> bool {
        let token = config(config::HOLD_TOKEN);
        let Some(lease) = HOLD_LEASE.get(0) else {
            return false;
        };
        token != 0
            && lease.token == token
            && lease.heartbeat_ns != 0
            && task.ktime_ns.wrapping_sub(lease.heartbeat_ns) < config::HEARTBEAT_MAX_AGE_NS
            && !task.comm.starts_with(b"keywarden")
    }

    /// `protected_name_hash` of the last path component, computed in place.
    #[inline(always)]
    fn basename_hash(buf: &[u8; PATH_MAX], start: usize, len: usize) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0usize;
        while i < PROTECTED_NAME_MAX {
            let idx = start + i;
            if idx >= len {
                break;
            }
            h ^= buf[idx & (PATH_MAX - 1)] as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        h
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

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
