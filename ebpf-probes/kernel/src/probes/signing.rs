//! The signing-path uprobes. `sign_entry` / `sign_return` are attached to
//! the signing functions of every crypto library the sensor finds,
//! `context_entry` to the calls that bind and feed digest contexts, and
//! `free_entry` to the frees of key objects. The attach cookie says which
//! function and library fired, so one program serves each role in every
//! library. They are plain perf-event uprobes (uprobe.multi links
//! measured the same; see docs/performance.md).
//!
//! Over 600 lines: every layout of the signing-function table is read
//! here, inline, because the verifier must see each bounded read where it
//! happens; the per-layout readers are what to split out next.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{
            bpf_get_attach_cookie, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_send_signal,
        },
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use keywarden_probe_types::{
    func::{Function, Handle, Input, Len, Length, Output, Role, SignCall},
    *,
};

use super::network::peer_of;
use crate::{
    maps::{EVENTS, FREE_GEN, INFLIGHT, KNOWN, MD_CTX_STATE, OP_SEQ, SIGN_HANDLES, VERDICT},
    util::{count, current_task},
};

const SIGKILL: u32 = 9;

/// Unique per CPU: (cpu << 56) | sequence.
#[inline(always)]
pub(super) fn new_op_id() -> u64 {
    // SAFETY: takes no arguments; it only reads the current CPU's number.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let seq = match OP_SEQ.get_ptr_mut(0) {
        // SAFETY: `p` is this CPU's slot of a per-CPU array: valid and aligned
        // for the whole run, as array slots are never freed.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    };
    (cpu << 56) | (seq & ((1 << 56) - 1))
}

/// All six argument registers, each read at its own constant offset:
/// the verifier refuses a context pointer LLVM would otherwise compute
/// from an argument number known only at run time.
#[inline(always)]
fn args(ctx: &ProbeContext) -> [u64; 6] {
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    core::hint::black_box([arg(0), arg(1), arg(2), arg(3), arg(4), arg(5)])
}

/// Argument `n` (a position from `func::FUNCTIONS`, of the C or the Go
/// register sequence); 0 past the last.
///
/// One bounded read from the stack copy `args` made, not a match: the
/// positions come from the function table, unknown to the verifier, and a
/// seven-way branch per argument multiplied the paths it walks. Linux
/// 6.1's verifier gave up on `sign_entry` (a million instructions,
/// `cargo xtask vm-test --kernel debian-6.1`); black_box keeps the test
/// and the index on one value.
#[inline(always)]
pub(super) fn pick<const N: usize>(a: &[u64; N], n: u8) -> u64 {
    let n = core::hint::black_box(n as usize);
    if n < a.len() { a[n] } else { 0 }
}

/// A register by its `func::reg` code (0 for any other code).
#[inline(always)]
fn register(ctx: &ProbeContext, code: u8) -> u64 {
    // SAFETY: a uprobe's context is the trapped task's saved `pt_regs`, valid
    // for the whole run and only read here.
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

/// The signing calls (`Role::Sign`). Three entry programs, not one: the
/// verifier walks each program's paths for every role it could take, and
/// one program serving all roles and layouts went past Linux 6.1's
/// million-instruction limit (`cargo xtask vm-test --kernel debian-6.1`).
/// Each program returns at once for a role that is not its own.
#[uprobe]
pub fn sign_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: passes this program's own context, as the helper requires; it
    // only reads the cookie the sensor attached to this probe.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (library, f) = func::split_cookie(cookie);
    let Some(Function {
        role: Role::Sign(call),
        ..
    }) = func::describe(f)
    else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let a = args(&ctx);
    let out = output_of(&a, *call);
    if !condemned(f, library, tgid, is_length_query(out, *call)) {
        on_sign_entry(&ctx, &a, out, f, *call, library, tgid);
    }
    0
}

/// Calls that bind a digest context to a key or stream data into it.
#[uprobe]
pub fn context_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: as in `sign_entry`.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (_, f) = func::split_cookie(cookie);
    let Some(function) = func::describe(f) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match function.role {
        Role::BindContext {
            context,
            key,
            digest_name,
        } => {
            let a = args(&ctx);
            let name = match digest_name {
                Some(n) => pick(&a, n),
                None => 0,
            };
            on_init(tgid, pick(&a, context), pick(&a, key), name)
        }
        Role::Update { context, data, len } => {
            let a = args(&ctx);
            on_update(tgid, pick(&a, context), pick(&a, data), pick(&a, len))
        }
        _ => {}
    }
    0
}

/// Frees: at a free function's entry (where the sensor found no
/// reference-count test to go past: every call counts as a free), or
/// past that test, with the object in the register the cookie names; and
/// a context rebound to a key.
#[uprobe]
pub fn free_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: as in `sign_entry`.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (_, f) = func::split_cookie(cookie);
    let Some(function) = func::describe(f) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match function.role {
        Role::Forget { object } => on_free(tgid, pick(&args(&ctx), object)),
        Role::Freed => on_free(tgid, register(&ctx, func::cookie_register(cookie))),
        _ => {}
    }
    0
}

/// Where a signing call puts its signature: (buffer or result pointer,
/// length pointer), 0 where there is none.
#[inline(always)]
fn output_of(a: &[u64; 6], call: SignCall) -> (u64, u64) {
    match call.output {
        Output::Buffer {
            out,
            len: Length::Written(len),
        } => (pick(a, out), pick(a, len.arg)),
        Output::Buffer {
            out,
            len: Length::Returned,
        } => (pick(a, out), 0),
        Output::RustVec { result } | Output::RingSignature { result } => (pick(a, result), 0),
        Output::Datum { out, .. } => (pick(a, out), 0),
        Output::Sexp { out } => (pick(a, out), 0),
        Output::Bignums | Output::Go(_) => (0, 0),
    }
}

/// The `(data, size)` of the buffer descriptor whose data pointer is at
/// `at` (a `gnutls_datum_t`, or an NSS `SECItem` past its type): a
/// pointer, then an `unsigned int` (the rest of the second word is
/// padding).
#[inline(always)]
fn datum(at: u64) -> Option<(u64, u64)> {
    // SAFETY: the helper checks the user address (a fault is an error), and
    // any two words are a valid `[u64; 2]`.
    let w = unsafe { bpf_probe_read_user(at as *const [u64; 2]) }.ok()?;
    Some((w[0], w[1] as u32 as u64))
}

/// A call with no place for the signature only asks for its length.
#[inline(always)]
fn is_length_query(out: (u64, u64), call: SignCall) -> bool {
    !matches!(call.output, Output::Bignums) && out.0 == 0
}

/// A length argument; a C `int` has only its lower half defined.
#[inline(always)]
fn pick_len(a: &[u64; 6], len: Len) -> u64 {
    let v = pick(a, len.arg);
    if len.int { v as u32 as u64 } else { v }
}

/// A process the sensor condemned is killed here, as it enters a signing
/// call and before any signature exists. The signal is delivered on the
/// way back to user space from this trap, so not one instruction of
/// the signing function runs. Length queries pass: they sign nothing.
#[inline(always)]
pub(super) fn condemned(f: u8, library: u32, tgid: u32, length_query: bool) -> bool {
    // SAFETY: the verdict is copied out at once; should the sensor delete it
    // meanwhile, the slot is still map memory: a stale value.
    let Some(verdict) = (unsafe { VERDICT.get(&tgid) }).copied() else {
        return false;
    };
    if length_query {
        return false;
    }
    // SAFETY: takes only a signal number and signals the current task; no
    // memory of ours is involved.
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
        // SAFETY: `old` points into MD_CTX_STATE's preallocated values, valid
        // all run; an eviction elsewhere can make it stale, never dangling.
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
        // SAFETY: the helper checks the user address (a fault is an error) and
        // writes at most `md_name`'s 16 bytes.
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
        // SAFETY: `p` is `existing`, the MD_CTX_STATE value pointer above,
        // still valid.
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
    // SAFETY: only this thread's programs write or remove its INFLIGHT entry,
    // and a plain hash map never evicts: it stays put while read.
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
    // SAFETY: `state` points into MD_CTX_STATE's preallocated values, valid all
    // run; an eviction elsewhere can make it stale, never dangling.
    let (op_id, captured) = unsafe { ((*state).op_id, (*state).captured) };
    let taken = emit_data(tgid, op_id, captured, data, len);
    // SAFETY: the same MD_CTX_STATE value pointer as above.
    unsafe { (*state).captured = captured.saturating_add(taken) };
}

/// Copies up to `CAPTURE_MAX - offset` bytes of `src` into data records.
/// Returns how many bytes were taken.
#[inline(always)]
pub(super) fn emit_data(tgid: u32, op_id: u64, offset: u32, src: u64, len: u64) -> u32 {
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

/// `n`, at most `cap`, bounded in the very register handed to a read
/// helper. Linux 6.1's verifier does not carry a bound checked on one copy
/// of a value to another copy spilled to the stack, and LLVM may test one
/// and pass the other: `invalid access to memory ... size=16384` at load
/// (`cargo xtask vm-test --kernel debian-6.1`). black_box makes the test
/// happen on the value as loaded, right before the call.
#[inline(always)]
fn bounded(n: usize, cap: usize) -> u32 {
    let n = core::hint::black_box(n);
    (if n > cap { cap } else { n }) as u32
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
            // SAFETY: writable ring memory sized for `$record` (integers and
            // bytes); no field is read before it is written.
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
            let n = bounded(n as usize, $cap);
            // SAFETY: `n` is at most `$cap`, the length of `data`; the helper
            // checks the user address: a fault is an error.
            let rc = unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_user(
                    r.data.as_mut_ptr().cast(),
                    n,
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

/// A C signing call nested in a Rust signer: the signer's record takes
/// the EVP_PKEY that call signs with (see `sign_flags::INNER_HANDLE`),
/// and skips copying the signature when the sensor knows that key
/// object already.
#[inline(always)]
fn adopt_inner_handle(outer: *mut Inflight, tgid: u32, md_ctx: u64) {
    // SAFETY: `outer` is this thread's INFLIGHT slot (see `on_sign_entry`),
    // which only its programs touch; a plain hash map never evicts.
    let (outer_func, outer_flags) = unsafe { ((*outer).func, (*outer).flags) };
    if !func::verified_every_time(outer_func as u8) || outer_flags & sign_flags::INNER_HANDLE != 0 {
        return;
    }
    let ctx_key = ProcPtr {
        tgid,
        _pad: 0,
        ptr: md_ctx,
    };
    // SAFETY: `pkey` is copied out at once; an entry evicted meanwhile is still
    // map memory, so the worst is a stale key.
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
    // SAFETY: copied out at once; an entry evicted or rewritten meanwhile is
    // still map memory, so the worst is a stale generation.
    let generation = unsafe { FREE_GEN.get(&known) }.copied().unwrap_or(0);
    let mut flags = outer_flags | sign_flags::INNER_HANDLE | sign_flags::HANDLE_IS_PKEY;
    // SAFETY: only the generation is read, at once; the sensor may rewrite the
    // entry meanwhile, which gives a stale answer, never a fault.
    if unsafe { KNOWN.get(&known) }.is_some_and(|k| k.generation == generation) {
        flags |= sign_flags::KNOWN_HANDLE;
    }
    // SAFETY: `outer` is this thread's INFLIGHT slot, as above.
    unsafe {
        (*outer).handle = pkey;
        (*outer).handle_gen = generation;
        (*outer).flags = flags;
    }
}

/// A signing call (`func::Role::Sign`), with arguments `a` laid out as
/// its `call` says and its output places `out` (`output_of`).
///
/// The signed data is copied from one place only, at the end: every
/// copy is a bounded loop the verifier walks once per path reaching it.
#[inline(always)]
fn on_sign_entry(
    ctx: &ProbeContext,
    a: &[u64; 6],
    out: (u64, u64),
    f: u8,
    call: SignCall,
    library: u32,
    tgid: u32,
) {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a uprobe's context is the trapped task's saved `pt_regs`, valid
    // for the whole run.
    let sp = unsafe { (*ctx.regs).rsp };
    // SAFETY: takes no arguments; it only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    // Each thread keeps its slot; depth 0 marks it empty, which saves a
    // hash insert and delete on every signature.
    let slot = INFLIGHT.get_ptr_mut(&tid);
    if let Some(outer) = slot {
        // A live outer call was entered at the same (tail call) or a
        // higher stack pointer than this one, and recently.
        // SAFETY: `outer` is this thread's INFLIGHT slot, which only its
        // programs write or remove; a plain hash map never evicts.
        let (depth, outer_sp, outer_start) =
            unsafe { ((*outer).depth, (*outer).sp, (*outer).started_ns) };
        if depth > 0 && outer_sp >= sp && now.wrapping_sub(outer_start) < INFLIGHT_MAX_AGE_NS {
            // SAFETY: the same slot, still this thread's.
            unsafe { (*outer).depth += 1 };
            if matches!(call.handle_is, Handle::DigestContext) {
                adopt_inner_handle(outer, tgid, pick(a, call.handle));
            }
            return;
        }
    }
    if is_length_query(out, call) {
        return; // length query: not a signature
    }
    let handle_ctx = pick(a, call.handle);
    let (sig, siglen_ptr) = out;
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
    let copy_input = if !call.handle_is.cached() {
        // Rust signer objects are short-lived boxes whose addresses
        // are reused for other keys, and nothing reports their frees
        // (nor those of low-level key objects): every signature is
        // captured and verified.
        inflight.op_id = new_op_id();
        true
    } else {
        if !matches!(call.handle_is, Handle::DigestContext) {
            // A key context signs the digest it is given: a new operation.
            inflight.op_id = new_op_id();
        } else {
            let key = ProcPtr {
                tgid,
                _pad: 0,
                ptr: handle_ctx,
            };
            // SAFETY: the fields are read at once; an entry evicted or
            // re-initialized meanwhile is still map memory: a stale state at worst.
            match unsafe { MD_CTX_STATE.get(&key) } {
                Some(state) => {
                    if state.pkey != 0 {
                        inflight.handle = state.pkey;
                        inflight.flags |= sign_flags::HANDLE_IS_PKEY;
                    }
                    inflight.flags |= state.flags & sign_flags::HAS_MD_NAME;
                    inflight.md_name = state.md_name;
                    // Final signs what the updates streamed under this op id.
                    inflight.op_id = if matches!(call.input, Input::Streamed) {
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
        // SAFETY: copied out at once; an entry evicted or rewritten meanwhile is
        // still map memory, so the worst is a stale generation.
        let generation = unsafe { FREE_GEN.get(&known) }.copied().unwrap_or(0);
        inflight.handle_gen = generation;
        // SAFETY: only the generation is read, at once; the sensor may rewrite the
        // entry meanwhile, which gives a stale answer, never a fault.
        if unsafe { KNOWN.get(&known) }.is_some_and(|k| k.generation == generation) {
            inflight.flags |= sign_flags::KNOWN_HANDLE;
            false
        } else {
            !matches!(call.input, Input::Streamed)
        }
    };
    if copy_input {
        let (data, data_len) = match call.input {
            Input::Message { data, len } | Input::Digest { data, len } => {
                (pick(a, data), pick_len(a, len))
            }
            Input::Datum { datum: arg, at, .. } => {
                datum(pick(a, arg).wrapping_add(at as u64)).unwrap_or((0, 0))
            }
            Input::Streamed => (0, 0),
            // Walked at the return, where the signature is too.
            Input::Sexp { data } => {
                inflight.siglen_ptr = pick(a, data);
                (0, 0)
            }
        };
        emit_data(tgid, inflight.op_id, 0, data, data_len);
    }
    match slot {
        // SAFETY: `p` is this thread's INFLIGHT slot, as above.
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
    // SAFETY: only whether an entry exists is used; the reference is dropped at
    // once, before the delete.
    let signed = unsafe { SIGN_HANDLES.get(&key) }.is_some() && SIGN_HANDLES.remove(&key).is_ok();
    // SAFETY: likewise: only whether KNOWN has the entry is used.
    let known = unsafe { KNOWN.get(&key) }.is_some() && KNOWN.remove(&key).is_ok();
    if !signed && !known {
        return;
    }
    // Voids any KNOWN entry the sensor writes later for a signature
    // made before this free.
    // SAFETY: copied out at once; an entry evicted or rewritten meanwhile is
    // still map memory, so the worst is a stale generation.
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

/// At a signing call's return: the call this thread entered, when this is
/// the outermost one's return (its slot is emptied); None for an empty
/// slot (a length query or refused call returning) or a nested call's.
#[inline(always)]
pub(super) fn take_inflight(tid: u32) -> Option<Inflight> {
    let p = INFLIGHT.get_ptr_mut(&tid)?;
    // SAFETY: `p` is this thread's INFLIGHT slot: only this thread's programs
    // write or remove it, and a plain hash map never evicts it.
    unsafe {
        match (*p).depth {
            0 => return None,
            1 => {}
            _ => {
                (*p).depth -= 1;
                return None;
            }
        }
        // Depth 0 marks the slot empty.
        (*p).depth = 0;
        Some(*p)
    }
}

/// The record of the signing call `inflight`, as it returned.
#[inline(always)]
pub(super) fn head_of(
    inflight: &Inflight,
    kind: u32,
    flags: u32,
    ret: i64,
    sig_len: u64,
) -> SignRecord {
    SignRecord {
        kind,
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
    }
}

#[uretprobe]
pub fn sign_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inflight) = take_inflight(pid_tgid as u32) else {
        return 0;
    };
    // SAFETY: a uretprobe's context is the returning task's saved `pt_regs`,
    // whose `rax` holds the return value.
    let rax = unsafe { (*ctx.regs).rax };
    let mut ret = rax as i32 as i64;
    let mut sig_len = 0u64;
    let mut sig_src = inflight.sig_ptr;
    let mut flags = inflight.flags;
    match func::sign_call(inflight.func as u8).map(|c| c.output) {
        Some(Output::RustVec { .. }) => match vec_in_result(inflight.sig_ptr) {
            Some((ptr, len)) => {
                ret = 1;
                sig_src = ptr;
                sig_len = len;
            }
            None => ret = 0,
        },
        Some(Output::RingSignature { .. }) => {
            // `Signature` keeps its bytes inline: copy the value and
            // let the sensor find the signature in it.
            ret = 1;
            sig_len = RING_VALUE_BYTES;
            flags |= sign_flags::SIG_IN_VALUE;
        }
        Some(Output::Bignums) => {
            // The returned `ECDSA_SIG *`, null on failure.
            ret = (rax != 0) as i64;
            sig_src = rax;
            sig_len = 2 * BIGNUM_SLOT as u64;
            flags |= sign_flags::SIG_BIGNUMS;
        }
        Some(Output::Datum { at, .. }) => {
            // 0 is success: the datum now holds the signature.
            ret = match (ret, datum(inflight.sig_ptr.wrapping_add(at as u64))) {
                (0, Some((ptr, len))) => {
                    sig_src = ptr;
                    sig_len = len;
                    1
                }
                (0, None) => {
                    flags |= sign_flags::SIG_INCOMPLETE;
                    1
                }
                (e, _) => e.min(-1),
            };
        }
        Some(Output::Buffer {
            len: Length::Returned,
            ..
        }) => {
            if ret > 0 {
                sig_len = ret as u64;
                ret = 1;
            }
        }
        Some(Output::Buffer {
            len: Length::Written(len),
            ..
        }) if ret == 1 => {
            sig_len = if len.int {
                // SAFETY: the helper checks the user address; a fault returns
                // an error (read as length 0), never a crash.
                unsafe { bpf_probe_read_user(inflight.siglen_ptr as *const u32) }.unwrap_or(0)
                    as u64
            } else {
                // SAFETY: as above.
                unsafe { bpf_probe_read_user(inflight.siglen_ptr as *const u64) }.unwrap_or(0)
            }
        }
        _ => {}
    }

    let head = head_of(&inflight, kind::SIGN, flags, ret, sig_len);
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
    let source = if flags & sign_flags::SIG_BIGNUMS != 0 {
        Signature::Bignums(sig_src)
    } else {
        Signature::Bytes(sig_src)
    };
    if !emit_signature(head, source) {
        return 0;
    }
    if func::verified_every_time(inflight.func as u8)
        && inflight.flags & sign_flags::INNER_HANDLE == 0
    {
        return 0;
    }
    let key = ProcPtr {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        ptr: inflight.handle,
    };
    // SAFETY: only whether an entry exists is used; the reference is dropped at
    // once.
    if unsafe { SIGN_HANDLES.get(&key) }.is_none() {
        let _ = SIGN_HANDLES.insert(&key, &1, 0);
    }
    0
}

/// Where a signature's bytes are in the signing process.
pub(super) enum Signature {
    /// `head.sig_len` bytes at this address.
    Bytes(u64),
    /// An OpenSSL-family `ECDSA_SIG *` (see `copy_bignums`).
    Bignums(u64),
    /// Go's `r, s *big.Int` (see `copy_go_bigints`).
    GoBigInts(u64, u64),
}

/// Sends `head` with the signature copied from `source`. False when the
/// ring was full (counted).
#[inline(always)]
pub(super) fn emit_signature(head: SignRecord, source: Signature) -> bool {
    let Some(mut rec) = EVENTS.reserve::<SignWithSigRecord>(0) else {
        count(stats::LOST_SIGN);
        return false;
    };
    // SAFETY: writable ring memory sized for the record (integers and bytes);
    // no field is read before it is written.
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
    let bignums = match source {
        Signature::Bignums(at) => Some(copy_bignums(&mut r.sig, at)),
        Signature::GoBigInts(r_at, s_at) => Some(copy_go_bigints(&mut r.sig, r_at, s_at)),
        Signature::Bytes(at) => {
            if n > 0 {
                let n = bounded(n as usize, SIG_MAX);
                // SAFETY: `n` is at most SIG_MAX, the length of `sig`; the
                // helper checks the user address and returns an error on a
                // fault.
                let rc = unsafe {
                    aya_ebpf::helpers::generated::bpf_probe_read_user(
                        r.sig.as_mut_ptr().cast(),
                        n,
                        at as *const core::ffi::c_void,
                    )
                };
                if rc == 0 {
                    r.head.sig_captured = n;
                } else {
                    r.head.flags |= sign_flags::SIG_INCOMPLETE;
                }
            }
            None
        }
    };
    match bignums {
        Some(true) => {
            r.head.flags |= sign_flags::SIG_BIGNUMS;
            r.head.sig_captured = 2 * BIGNUM_SLOT as u32;
        }
        Some(false) => r.head.flags |= sign_flags::SIG_BIGNUMS | sign_flags::SIG_INCOMPLETE,
        None => {}
    }
    rec.submit(BPF_RB_NO_WAKEUP as u64);
    true
}

/// Copies r and s of the `ECDSA_SIG` at `at` into their `BIGNUM_SLOT`s
/// of `sig`: the word count, then the words. `ECDSA_SIG` is two `BIGNUM *`;
/// a `BIGNUM` starts with its word array and `int top`, its number of
/// words in use (the same in OpenSSL 1.1 and 3.x, BoringSSL and AWS-LC).
#[inline(always)]
fn copy_bignums(sig: &mut [u8; SIG_MAX], at: u64) -> bool {
    // SAFETY: the helper checks the user address (a fault is an error), and
    // any two words are a valid `[u64; 2]`.
    let Ok(pair) = (unsafe { bpf_probe_read_user(at as *const [u64; 2]) }) else {
        return false;
    };
    for (i, bignum) in pair.into_iter().enumerate() {
        // SAFETY: as above.
        let Ok(head) = (unsafe { bpf_probe_read_user(bignum as *const [u64; 2]) }) else {
            return false;
        };
        let words = head[1] as u32 as usize;
        if words == 0 || words > BIGNUM_WORDS {
            return false;
        }
        let slot = i * BIGNUM_SLOT;
        sig[slot] = words as u8;
        let n = (words * 8).min(BIGNUM_WORDS * 8);
        // SAFETY: `slot + 8 + n` is at most 2 * BIGNUM_SLOT, within `sig`;
        // the helper checks the user address and fails on a fault.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                sig[slot + 8..].as_mut_ptr().cast(),
                n as u32,
                head[0] as *const core::ffi::c_void,
            )
        };
        if rc != 0 {
            return false;
        }
    }
    true
}

/// Copies Go's `r` and `s` (`*big.Int`: a sign word, then the magnitude
/// as a `[]Word` of little-endian 64-bit words, least significant first)
/// into the `BIGNUM_SLOT`s of `sig`, as `copy_bignums` does.
#[inline(always)]
fn copy_go_bigints(sig: &mut [u8; SIG_MAX], r: u64, s: u64) -> bool {
    for (i, bigint) in [r, s].into_iter().enumerate() {
        // SAFETY: the helper checks the user address (a fault is an error), and
        // any three words are a valid `[u64; 3]`.
        let Ok(head) = (unsafe { bpf_probe_read_user(bigint as *const [u64; 3]) }) else {
            return false;
        };
        let words = head[2] as usize;
        if words == 0 || words > BIGNUM_WORDS {
            return false;
        }
        let slot = i * BIGNUM_SLOT;
        sig[slot] = words as u8;
        let n = (words * 8).min(BIGNUM_WORDS * 8);
        // SAFETY: `slot + 8 + n` is at most 2 * BIGNUM_SLOT, within `sig`;
        // the helper checks the user address and fails on a fault.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                sig[slot + 8..].as_mut_ptr().cast(),
                n as u32,
                head[1] as *const core::ffi::c_void,
            )
        };
        if rc != 0 {
            return false;
        }
    }
    true
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
    // SAFETY: the helper checks the user address (a fault is an error), and any
    // four words are a valid `[u64; 4]`.
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
