//! The Go signing probes. `go_sign_entry` goes on a Go signing function
//! (`func::Role::GoSign`) just past its stack-growth check, and
//! `go_sign_return` on each of its `ret` instructions: Go code must never
//! get a return probe (see `func::GoOutput`).
//!
//! Both read arguments and results in Go's register ABI (`func::go_reg`)
//! and key the call by goroutine (`R14` holds the running `g` at every
//! function boundary), since the goroutine may resume on another thread
//! before it returns. The records are the ones C signing calls give.
use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::uprobe,
    programs::ProbeContext,
};
use keywarden_probe_types::{
    func::{Function, GO_NO_ERROR, GoOutput, Handle, Input, KeyPath, Output, Role, go_reg},
    *,
};

use super::{
    network::{goroutine_peer, peer_of},
    signing::{Signature, condemned, emit_data, emit_signature, new_op_id, pick},
};
use crate::{
    maps::{EVENTS, GO_INFLIGHT, GO_PROCS, KNOWN},
    util::{count, current_task},
};

/// Go's argument (or result) registers, in `go_reg` order, and `R14`.
#[inline(always)]
fn registers(ctx: &ProbeContext) -> ([u64; go_reg::COUNT], u64) {
    // SAFETY: a uprobe's context is the trapped task's saved `pt_regs`, valid
    // for the whole run and only read here.
    let r = unsafe { &*ctx.regs };
    (
        core::hint::black_box([r.rax, r.rbx, r.rcx, r.rdi, r.rsi, r.r8, r.r9, r.r10, r.r11]),
        r.r14,
    )
}

/// The goroutine's stack bounds (`g.stack.lo`, `g.stack.hi`).
#[inline(always)]
fn stack_of(g: u64) -> (u64, u64) {
    // SAFETY: the helper checks the user address (a fault is an error), and
    // any two words are a valid `[u64; 2]`.
    match unsafe { bpf_probe_read_user(g as *const [u64; 2]) } {
        Ok([lo, hi]) => (lo, hi),
        Err(_) => (0, 0),
    }
}

/// The probes' name for the Go key object at `key` (`Handle::GoKey`):
/// its address folded with a word of its public key. None when that
/// word cannot be read.
#[inline(always)]
fn key_name(key: u64, path: KeyPath) -> Option<u64> {
    let mut at = key;
    for i in 0..3 {
        if i >= path.len as usize {
            break;
        }
        // SAFETY: the helper checks the user address (a fault is an error);
        // any word is a valid u64.
        at = unsafe { bpf_probe_read_user((at + path.offsets[i] as u64) as *const u64) }.ok()?;
    }
    Some(key ^ at)
}

#[uprobe]
pub fn go_sign_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: passes this program's own context, as the helper requires; it
    // only reads the cookie the sensor attached to this probe.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (library, f) = func::split_cookie(cookie);
    let Some(Function {
        role: Role::GoSign(call),
        ..
    }) = func::describe(f)
    else {
        return 0;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if condemned(f, library, tgid, false) {
        return 0;
    }
    let (a, g) = registers(&ctx);
    let (stack_lo, stack_hi) = stack_of(g);
    let op_id = new_op_id();
    let mut flags = 0;
    // A key whose public word cannot be read gets a name no verdict is
    // kept for (the operation's own id): every signature is verified.
    let handle = match call.handle_is {
        Handle::GoKey(path) => key_name(pick(&a, call.handle), path),
        _ => None,
    };
    let handle = match handle {
        Some(name) => {
            let known = ProcPtr {
                tgid,
                _pad: 0,
                ptr: name,
            };
            // SAFETY: only the generation is read, at once; the sensor may
            // rewrite the entry meanwhile, which gives a stale answer.
            if unsafe { KNOWN.get(&known) }.is_some_and(|k| k.generation == 0) {
                flags |= sign_flags::KNOWN_HANDLE;
            }
            name
        }
        None => op_id | 1 << 63,
    };
    let mut inflight = GoInflight {
        func: f as u32,
        library,
        flags,
        _pad: 0,
        handle,
        op_id,
        out: match call.output {
            Output::Go(GoOutput::Into { out, .. }) => pick(&a, out),
            _ => 0,
        },
        stack_lo,
        stack_hi,
        peer: Peer::default(),
    };
    // The goroutine's own last receive (none when it received nothing:
    // the thread's may be another goroutine's); the thread's when the
    // process was not known to be Go until now (it is from here on).
    // SAFETY: only whether an entry exists is used.
    let peer = if unsafe { GO_PROCS.get(&tgid) }.is_some() {
        goroutine_peer(tgid, g)
    } else {
        let _ = GO_PROCS.insert(&tgid, &1, 0);
        peer_of(pid_tgid as u32)
    };
    if let Some(peer) = peer {
        inflight.peer = peer;
        inflight.flags |= sign_flags::HAS_PEER;
    }
    // Copied now: the input may be on the goroutine's stack, which can
    // move before the call returns. Not for a key the sensor has named.
    if flags & sign_flags::KNOWN_HANDLE == 0
        && let Input::Message { data, len } | Input::Digest { data, len } = call.input
    {
        emit_data(tgid, inflight.op_id, 0, pick(&a, data), pick(&a, len.arg));
    }
    let key = ProcPtr {
        tgid,
        _pad: 0,
        ptr: g,
    };
    let _ = GO_INFLIGHT.insert(&key, &inflight, 0);
    0
}

#[uprobe]
pub fn go_sign_return(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let (a, g) = registers(&ctx);
    let key = ProcPtr {
        tgid,
        _pad: 0,
        ptr: g,
    };
    // SAFETY: copied out at once; an entry evicted meanwhile is still map
    // memory, so the worst is a stale call (whose signature fails to verify).
    let Some(inflight) = (unsafe { GO_INFLIGHT.get(&key) }).copied() else {
        return 0;
    };
    let _ = GO_INFLIGHT.remove(&key);
    let Some(Function {
        role: Role::GoSign(call),
        ..
    }) = func::describe(inflight.func as u8)
    else {
        return 0;
    };
    let Output::Go(output) = call.output else {
        return 0;
    };
    let (failed, sig_len, source) = match output {
        GoOutput::Slice { error } => (
            error != GO_NO_ERROR && pick(&a, error) != 0,
            a[1],
            Signature::Bytes(a[0]),
        ),
        GoOutput::BigInts => (
            a[2] != 0,
            2 * BIGNUM_SLOT as u64,
            Signature::GoBigInts(a[0], a[1]),
        ),
        GoOutput::Into { len, .. } => {
            let mut out = inflight.out;
            let (_, hi) = stack_of(g);
            // A buffer on a stack that moved since entry moved with it,
            // by as much as the stack's top did.
            if out >= inflight.stack_lo && out < inflight.stack_hi && hi != inflight.stack_hi {
                out = out.wrapping_sub(inflight.stack_hi).wrapping_add(hi);
            }
            (false, len as u64, Signature::Bytes(out))
        }
    };
    let head = SignRecord {
        kind: kind::SIGN,
        func: inflight.func,
        task: current_task(),
        library: inflight.library,
        flags: inflight.flags,
        handle: inflight.handle,
        op_id: inflight.op_id,
        ret: if failed { -1 } else { 1 },
        sig_len: if failed { 0 } else { sig_len },
        sig_captured: 0,
        _pad: 0,
        md_name: [0; 16],
        handle_gen: 0,
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
    } else if failed {
        emit_signature(head, Signature::Bytes(0));
    } else {
        emit_signature(head, source);
    }
    0
}
