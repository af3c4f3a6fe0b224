//! libgcrypt's signing call, `gcry_pk_sign(&sig, data, key)`, whose three
//! arguments are S-expressions (`keywarden_probe_types::sexp`). The call's
//! entry is `sign_entry`'s (`func::Handle::KeySexp`); `sexp_sign_return`
//! copies the three S-expressions when the call succeeds.
//!
//! The key's S-expression holds the private key (`d` of an elliptic-curve
//! key; `d`, `p`, `q`, `u` of an RSA key), so it is walked token by token
//! here, in the kernel, and only what is public leaves the process: the
//! lists' names, the curve, the flags, and `q` (elliptic curves) or `n`
//! and `e` (RSA), under `(private-key (ALGORITHM …))`. Every other value is
//! replaced by `sexp::WITHHELD`. The sensor names the key by that public
//! key, and only once the copied signature verifies under it.
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_loop, bpf_probe_read_user as read_into},
    },
    macros::uretprobe,
    programs::RetProbeContext,
};
use core::ffi::c_void;
use keywarden_probe_types::{sexp, *};

use super::signing::{Signature, emit_signature, head_of, take_inflight};
use crate::{maps::EVENTS, util::count};

/// `Walk::bits`.
const NAME_NEXT: u32 = 1; // the next token names the list just opened
const KEEP: u32 = 2; // this list's values are copied
const SECRET: u32 = 4; // a key: copy public values only
const PRIVATE_KEY: u32 = 8; // the outer list is `(private-key …)`

/// `Walk::algorithm`.
const ELLIPTIC: u32 = 1;
const RSA: u32 = 2;

/// A list name of up to fifteen bytes as two little-endian words, zero
/// padded, with its length in the last byte (so `q` and `q\0` differ).
/// Longer names are never compared.
const fn name(bytes: &[u8]) -> (u64, u64) {
    let mut w = [0u64, (bytes.len() as u64) << 56];
    let mut i = 0;
    while i < bytes.len() {
        w[i / 8] |= (bytes[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    (w[0], w[1])
}

/// One S-expression walk, on the stack of `sexp_sign_return`; `bpf_loop`
/// hands it to `step` once per token, so the verifier checks one token's
/// code, not a loop's every path.
#[repr(C)]
struct Walk {
    /// The S-expression in the signing process.
    src: u64,
    /// The record's part for it (`2 * sexp::MAX` bytes).
    out: *mut u8,
    /// Read and write positions.
    pos: u32,
    at: u32,
    depth: u32,
    bits: u32,
    algorithm: u32,
    /// `sexp::COMPLETE` once the outer list closed.
    end: u32,
}

/// Writes one byte; false when the part is full.
#[inline(always)]
fn put(w: &mut Walk, byte: u8) -> bool {
    if w.at as usize >= sexp::MAX {
        return false;
    }
    // The verifier needs the mask, which LLVM would drop as implied by
    // the test above: black_box keeps it.
    let at = core::hint::black_box(w.at as usize) & (2 * sexp::MAX - 1);
    // SAFETY: `out` is the start of a `2 * sexp::MAX`-byte part of a reserved
    // ring record, and the mask keeps the offset inside it.
    unsafe { *w.out.add(at) = byte };
    w.at += 1;
    true
}

/// Copies a data token (type, 16-bit length, bytes) at `body`; false when
/// it does not fit or cannot be read.
#[inline(always)]
fn copy_data(w: &mut Walk, body: u64, len: u32) -> bool {
    if w.at as usize + 3 + len as usize > sexp::MAX {
        return false;
    }
    let l = (len as u16).to_ne_bytes();
    if !(put(w, sexp::DATA) && put(w, l[0]) && put(w, l[1])) {
        return false;
    }
    let n = core::hint::black_box(len as usize);
    let n = if n > sexp::MAX { sexp::MAX } else { n } as u32;
    let at = core::hint::black_box(w.at as usize) & (sexp::MAX - 1);
    // SAFETY: the destination is `at` (below sexp::MAX) bytes into a
    // `2 * sexp::MAX`-byte part and `n` is at most sexp::MAX; the helper
    // checks the user address and fails on a fault.
    let rc = unsafe { read_into(w.out.add(at).cast(), n, body as *const c_void) };
    w.at += n;
    rc == 0
}

/// Whether the values of the list named `name`, at `w.depth`, may leave a
/// key S-expression, and what the name says of the lists around it.
#[inline(always)]
fn judge_name(w: &mut Walk, n: (u64, u64)) -> bool {
    match w.depth {
        1 => {
            if n == name(b"private-key") {
                w.bits |= PRIVATE_KEY;
            }
            false
        }
        2 => {
            w.algorithm = if n == name(b"ecc") || n == name(b"ecdsa") || n == name(b"eddsa") {
                ELLIPTIC
            } else if n == name(b"rsa") {
                RSA
            } else {
                0
            };
            false
        }
        3 => {
            w.bits & PRIVATE_KEY != 0
                && (n == name(b"curve")
                    || n == name(b"flags")
                    || (n == name(b"q") && w.algorithm == ELLIPTIC)
                    || ((n == name(b"n") || n == name(b"e")) && w.algorithm == RSA))
        }
        _ => false,
    }
}

/// One token of the walk. Returns 1 to stop (the end, a full part, an
/// unreadable or malformed token), 0 to go on.
extern "C" fn step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` that `walk` passed to `bpf_loop`, on its
    // caller's stack for the whole loop.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    let token = w.src + w.pos as u64;
    // SAFETY: the helper checks the user address (a fault is an error).
    let Ok(kind) = (unsafe { bpf_probe_read_user(token as *const u8) }) else {
        return 1;
    };
    match kind {
        sexp::OPEN => {
            if !put(w, sexp::OPEN) {
                return 1;
            }
            w.depth += 1;
            w.bits = (w.bits | NAME_NEXT) & !KEEP;
            w.pos += 1;
        }
        sexp::CLOSE => {
            if w.depth == 0 || !put(w, sexp::CLOSE) {
                return 1;
            }
            w.depth -= 1;
            w.bits &= !(NAME_NEXT | KEEP);
            w.pos += 1;
            if w.depth == 0 {
                w.end = sexp::COMPLETE;
                return 1;
            }
        }
        sexp::DATA | sexp::HINT => {
            // SAFETY: as above; any two bytes are a valid `[u8; 2]`.
            let Ok(l) = (unsafe { bpf_probe_read_user((token + 1) as *const [u8; 2]) }) else {
                return 1;
            };
            let len = u16::from_ne_bytes(l) as u32;
            let body = token + 3;
            w.pos += 3 + len;
            if kind == sexp::HINT {
                return 0; // a display hint: not copied
            }
            let keep = if w.bits & NAME_NEXT != 0 {
                w.bits &= !NAME_NEXT;
                if w.bits & SECRET != 0 {
                    let mut bytes = [0u64; 2];
                    let n = core::hint::black_box(len as usize);
                    if n <= 15 {
                        // SAFETY: at most 15 of the 16 bytes of `bytes`; the
                        // helper checks the user address and fails on a
                        // fault (which leaves a name that matches nothing).
                        let _ = unsafe {
                            read_into(bytes.as_mut_ptr().cast(), n as u32, body as *const c_void)
                        };
                        bytes[1] |= (n as u64) << 56;
                    }
                    if judge_name(w, (u64::from_le(bytes[0]), u64::from_le(bytes[1]))) {
                        w.bits |= KEEP;
                    }
                } else {
                    w.bits |= KEEP;
                }
                true // a list's name is never secret
            } else {
                w.bits & KEEP != 0
            };
            let ok = if keep {
                copy_data(w, body, len)
            } else {
                put(w, sexp::WITHHELD)
            };
            if !ok {
                return 1;
            }
        }
        // `STOP` before the outer list closed, or not a token.
        _ => return 1,
    }
    0
}

/// Copies the S-expression at `src` into `out`; returns the bytes used,
/// with `sexp::COMPLETE` when the copy reached its end.
#[inline(always)]
fn walk(src: u64, out: *mut u8, secret: bool) -> u32 {
    let mut w = Walk {
        src,
        out,
        pos: 0,
        at: 0,
        depth: 0,
        bits: if secret { SECRET } else { 0 },
        algorithm: 0,
        end: 0,
    };
    if src != 0 {
        // SAFETY: `step` is a function of this object (a BPF subprogram) and
        // `w` outlives the loop, which the kernel runs to completion before
        // it returns.
        unsafe {
            bpf_loop(
                sexp::TOKENS,
                step as *mut c_void,
                (&mut w as *mut Walk).cast(),
                0,
            )
        };
    }
    w.at | w.end
}

#[uretprobe]
pub fn sexp_sign_return(ctx: RetProbeContext) -> u32 {
    // libgcrypt does not nest its signing calls.
    let Some(inflight) = take_inflight(bpf_get_current_pid_tgid() as u32) else {
        return 0;
    };
    // SAFETY: a uretprobe's context is the returning task's saved `pt_regs`,
    // whose `rax` holds the return value (a `gcry_error_t`, 0 on success).
    let error = unsafe { (*ctx.regs).rax } as u32;
    let ret = if error == 0 { 1 } else { -(error as i64) };
    let head = head_of(&inflight, kind::SIGN_SEXP, inflight.flags, ret, 0);
    if error != 0 {
        // A failed call: the plain record says so.
        emit_signature(
            SignRecord {
                kind: kind::SIGN,
                ..head
            },
            Signature::Bytes(0),
        );
        return 0;
    }
    let Some(mut rec) = EVENTS.reserve::<SexpSignRecord>(0) else {
        count(stats::LOST_SIGN);
        return 0;
    };
    // SAFETY: writable ring memory sized for the record (integers and bytes);
    // each field is written before the record is submitted.
    let r = unsafe { rec.assume_init_mut() };
    r.head = head;
    // SAFETY: the helper checks the user address; `*result` is the
    // signature's S-expression, which the call just set.
    let signature = unsafe { bpf_probe_read_user(inflight.sig_ptr as *const u64) }.unwrap_or(0);
    r.ends[sexp::KEY] = walk(inflight.handle, r.parts[sexp::KEY].as_mut_ptr(), true);
    r.ends[sexp::DATA_PART] = walk(
        inflight.siglen_ptr,
        r.parts[sexp::DATA_PART].as_mut_ptr(),
        false,
    );
    r.ends[sexp::SIGNATURE] = walk(signature, r.parts[sexp::SIGNATURE].as_mut_ptr(), false);
    r.ends[3] = 0;
    rec.submit(BPF_RB_NO_WAKEUP as u64);
    0
}
