//! Where inside a function an entry-only uprobe goes.
//!
//! A uprobe replaces one instruction with a breakpoint. x86 kernels emulate
//! a few instructions (`push reg`, `nop`, relative branches) after the
//! trap; any other one is single-stepped out of line, a second trap. On the
//! measured 6.18 VM an empty probe on `EVP_DigestSignInit` (which starts
//! with `sub $8,%rsp`) cost 22% of `openssl speed ed25519`, and one on
//! `EVP_DigestSign` (`push %r12`) 2-3% (docs/performance.md).
//!
//! So for probes that only read arguments (no return probe, no stack
//! pointer), the sensor moves the probe forward to the first instruction the
//! kernel emulates, as long as every instruction before it falls through
//! and leaves the argument registers the probe reads untouched. One branch
//! may be passed: a NULL check of an argument the probe reads (`test %rdi,
//! %rdi; je`), since a call with NULL there means nothing to the probe
//! (`EVP_PKEY_free(NULL)`). Otherwise the probe stays on the first
//! instruction: slower, never wrong.
//!
//! `freed_path` finds, in a free function, the point past its
//! reference-count test that only a real free reaches.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

/// How far to look: the wrappers this is for set up a frame in a few
/// instructions.
const MAX_INSTRUCTIONS: usize = 8;

/// Instructions x86 uprobes emulate without single-stepping: `push r64`
/// (including r8-r15 via REX.B) and the one-byte `nop`.
fn kernel_emulates(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] | [0x90, ..]
    )
}

/// Offset from the function start at which to place an entry probe that
/// reads `args` (64-bit argument registers).
pub fn entry_offset(code: &[u8], args: &[Register]) -> u64 {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    // The register the previous instruction compared with zero.
    let mut null_tested = None;
    for _ in 0..MAX_INSTRUCTIONS {
        let Some(insn) = next(&mut decoder) else {
            break;
        };
        let start = insn.ip() as usize;
        let bytes = &code[start..(start + insn.len()).min(code.len())];
        if kernel_emulates(bytes) {
            return insn.ip();
        }
        let passes_null_check =
            insn.mnemonic() == Mnemonic::Je && null_tested.is_some_and(|r| args.contains(&r));
        null_tested = null_test(&insn);
        if insn.flow_control() != FlowControl::Next && !passes_null_check {
            break;
        }
        if args.iter().any(|&a| writes(&mut info, &insn, a)) {
            break;
        }
    }
    0
}

/// `test %reg,%reg`: the register checked against zero.
fn null_test(insn: &Instruction) -> Option<Register> {
    (insn.mnemonic() == Mnemonic::Test
        && insn.op_count() == 2
        && insn.op0_kind() == OpKind::Register
        && insn.op1_kind() == OpKind::Register
        && insn.op0_register() == insn.op1_register())
    .then(|| insn.op0_register().full_register())
}

/// Where a free function's "last reference gone" path starts, as a probe
/// point: `offset` from the function's start, and the register holding the
/// object there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedAt {
    pub offset: u64,
    pub object_in: Register,
}

/// How the reference count is dropped.
enum Decrement {
    /// `lock xadd %r,(obj)` with `%r = -1`: `%r` then holds the old count.
    Xadd(Register),
    /// A call to the library's `CRYPTO_refcount_dec_and_test_zero`: `%eax`
    /// is non-zero when the count reached zero.
    Call,
}

/// Where to probe a free function (`EVP_PKEY_free`) so that it fires only
/// when the object is really freed, not when a reference is dropped.
///
/// libssl drops references to the server key several times per handshake,
/// and every process with libcrypto loaded frees short-lived keys;
/// probing the function's entry made each of those a trap (about 20 per
/// nginx handshake, counting client and server). Past the count's test,
/// only the real frees trap (about 7), and no count has to be read
/// (reading it at entry raced with a concurrent drop: two threads could
/// both see 2 and neither report the free).
///
/// The shapes recognised, from the function's start:
/// - a NULL check of `%rdi`, copies of `%rdi` into other registers;
/// - the decrement: OpenSSL's `mov $-1,%eax; lock xadd %eax,N(%rdi)`
///   followed by `sub $1,%eax; test %eax,%eax` or `cmp $1,%eax`, or
///   BoringSSL's and AWS-LC's `call CRYPTO_refcount_dec_and_test_zero`
///   followed by `test %eax,%eax`;
/// - then `je` or `jne`, whose zero-count side is followed to its first
///   instruction the kernel emulates (`call`, `jmp`, `jcc`, `push`, `nop`)
///   while a register still holds the object.
///
/// Anything else gives `None`, and the caller probes the entry, where every
/// free counts: slower, never wrong. `address` is the function's address,
/// which branch targets are relative to.
pub fn freed_path(
    code: &[u8],
    address: u64,
    is_refcount_call: impl Fn(u64) -> bool,
) -> Option<FreedAt> {
    let at = |ip: u64| code.get(usize::try_from(ip.checked_sub(address)?).ok()?..);
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut holders = vec![Register::RDI];
    let mut minus_one = None;
    let mut null_tested = None;
    let mut decrement = None;
    for _ in 0..MAX_INSTRUCTIONS * 2 {
        let insn = next(&mut decoder)?;
        if insn.has_lock_prefix() {
            let counter = insn.op1_register().full_register();
            let plain = insn.mnemonic() == Mnemonic::Xadd
                && holders.contains(&insn.memory_base())
                && insn.memory_index() == Register::None
                && insn.memory_size().size() == 4
                && insn.op1_kind() == OpKind::Register
                && minus_one == Some(counter);
            decrement = plain.then_some(Decrement::Xadd(counter));
            break;
        }
        if insn.flow_control() == FlowControl::Call {
            let ours = insn.op0_kind() == OpKind::NearBranch64
                && is_refcount_call(insn.near_branch64())
                && holders.contains(&Register::RDI);
            holders.retain(|r| !CALLER_SAVED.contains(r));
            decrement = ours.then_some(Decrement::Call);
            break;
        }
        let passes_null_check =
            insn.mnemonic() == Mnemonic::Je && null_tested.is_some_and(|r| holders.contains(&r));
        null_tested = null_test(&insn);
        if insn.flow_control() != FlowControl::Next && !passes_null_check {
            return None;
        }
        minus_one = match (insn.mnemonic(), insn.op0_kind(), insn.op1_kind()) {
            (Mnemonic::Mov, OpKind::Register, OpKind::Immediate32)
                if insn.immediate32() == u32::MAX =>
            {
                Some(insn.op0_register().full_register())
            }
            _ if minus_one.is_some_and(|r| writes(&mut info, &insn, r)) => None,
            _ => minus_one,
        };
        track(&mut info, &insn, &mut holders);
    }
    // After the decrement: which value of ZF means "the count reached
    // zero", then the branch on it.
    let mut zero_means_freed = None;
    let mut decremented = false;
    let branch = loop {
        let insn = next(&mut decoder)?;
        let reg0 = (insn.op0_kind() == OpKind::Register).then(|| insn.op0_register());
        let imm1 = matches!(
            insn.op1_kind(),
            OpKind::Immediate8to32 | OpKind::Immediate32 | OpKind::Immediate8
        )
        .then(|| insn.immediate(1));
        let self_test = null_test(&insn);
        zero_means_freed = match (&decrement, insn.mnemonic()) {
            (Some(Decrement::Xadd(r)), Mnemonic::Sub)
                if !decremented
                    && reg0.map(|x| x.full_register()) == Some(*r)
                    && imm1 == Some(1) =>
            {
                decremented = true;
                Some(true)
            }
            (Some(Decrement::Xadd(r)), Mnemonic::Test) if decremented && self_test == Some(*r) => {
                Some(true)
            }
            (Some(Decrement::Xadd(r)), Mnemonic::Cmp)
                if !decremented
                    && reg0.map(|x| x.full_register()) == Some(*r)
                    && imm1 == Some(1) =>
            {
                Some(true)
            }
            (Some(Decrement::Call), Mnemonic::Test) if self_test == Some(Register::RAX) => {
                Some(false)
            }
            (_, Mnemonic::Je | Mnemonic::Jne) => break insn,
            _ => return None,
        };
    };
    let taken_if_zero = branch.mnemonic() == Mnemonic::Je;
    let zero_path = if zero_means_freed? == taken_if_zero {
        branch.near_branch64()
    } else {
        branch.next_ip()
    };
    let mut decoder = Decoder::with_ip(64, at(zero_path)?, zero_path, DecoderOptions::NONE);
    for _ in 0..MAX_INSTRUCTIONS {
        let insn = next(&mut decoder)?;
        let bytes = &at(insn.ip())?[..insn.len()];
        if kernel_emulates(bytes) || kernel_emulates_branch(bytes) {
            // %rdi if it holds the object, else any register the probe
            // can be told to read.
            let object_in = holders
                .iter()
                .copied()
                .filter(|&r| register_code(r).is_some())
                .min_by_key(|&r| r != Register::RDI)?;
            return Some(FreedAt {
                offset: insn.ip() - address,
                object_in,
            });
        }
        if insn.flow_control() != FlowControl::Next {
            return None;
        }
        track(&mut info, &insn, &mut holders);
    }
    None
}

/// The System V registers of a function's first six arguments.
const ARGUMENT_REGISTERS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// The registers an entry program reads for function `id`, as its
/// `func::FUNCTIONS` role says (none for a signing call: those are probed
/// on their first instruction, because they read the stack pointer).
pub fn argument_registers(id: u8) -> Vec<Register> {
    use keywarden_probe_types::func::{Role, describe};
    let positions = match describe(id).map(|f| f.role) {
        Some(Role::BindContext {
            context,
            key,
            digest_name,
        }) => vec![Some(context), Some(key), digest_name],
        Some(Role::Update { context, data, len }) => vec![Some(context), Some(data), Some(len)],
        Some(Role::Forget { object }) => vec![Some(object)],
        Some(Role::Sign(_) | Role::GoSign(_) | Role::Freed) | None => vec![],
    };
    positions
        .into_iter()
        .flatten()
        .filter_map(|n| ARGUMENT_REGISTERS.get(n as usize).copied())
        .collect()
}

/// The probes' code (`func::reg`) for a register an entry probe can read
/// a pointer from; `None` for the others.
pub fn register_code(r: Register) -> Option<u8> {
    use keywarden_probe_types::func::reg;
    Some(match r {
        Register::RDI => reg::RDI,
        Register::RSI => reg::RSI,
        Register::RBX => reg::RBX,
        Register::RBP => reg::RBP,
        Register::R12 => reg::R12,
        Register::R13 => reg::R13,
        Register::R14 => reg::R14,
        Register::R15 => reg::R15,
        _ => return None,
    })
}

/// Registers a call may overwrite (System V x86-64).
const CALLER_SAVED: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

/// Relative `call`, `jmp` and conditional jumps without prefixes: the
/// kernel emulates them too (arch/x86/kernel/uprobes.c).
fn kernel_emulates_branch(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        [0xe8 | 0xe9 | 0xeb, ..] | [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..]
    )
}

fn next(decoder: &mut Decoder) -> Option<Instruction> {
    if !decoder.can_decode() {
        return None;
    }
    let insn = decoder.decode();
    (!insn.is_invalid()).then_some(insn)
}

/// Whether `insn` writes (any part of) the 64-bit register `reg`.
fn writes(info: &mut InstructionInfoFactory, insn: &Instruction, reg: Register) -> bool {
    info.info(insn).used_registers().iter().any(|r| {
        !matches!(
            r.access(),
            OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
        ) && r.register().full_register() == reg
    })
}

/// Keeps `holders` (registers holding the object) up to date across one
/// instruction: `mov %holder,%r` adds `%r`; any other write removes it.
fn track(info: &mut InstructionInfoFactory, insn: &Instruction, holders: &mut Vec<Register>) {
    let copy_from = (insn.mnemonic() == Mnemonic::Mov
        && insn.op0_kind() == OpKind::Register
        && insn.op1_kind() == OpKind::Register
        && insn.op0_register().size() == 8)
        .then(|| insn.op1_register());
    holders.retain(|r| !writes(info, insn, *r));
    if let Some(from) = copy_from {
        let to = insn.op0_register();
        if holders.contains(&from) && !holders.contains(&to) {
            holders.push(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Register::*;

    #[test]
    fn entry_programs_read_the_registers_the_table_names() {
        use keywarden_probe_types::func;
        assert_eq!(argument_registers(func::DIGEST_SIGN_INIT), [RDI, R8]);
        assert_eq!(
            argument_registers(func::DIGEST_SIGN_INIT_EX),
            [RDI, R9, RDX]
        );
        assert_eq!(
            argument_registers(func::DIGEST_SIGN_UPDATE),
            [RDI, RSI, RDX]
        );
        assert_eq!(argument_registers(func::PKEY_FREE), [RDI]);
        assert!(argument_registers(func::DIGEST_SIGN).is_empty());
        assert!(argument_registers(0).is_empty());
    }

    // Bytes of OpenSSL 3.0.19's EVP_DigestSignInit (Debian build).
    const DIGEST_SIGN_INIT: &[u8] = &[
        0x48, 0x83, 0xec, 0x08, // sub $0x8,%rsp
        0x45, 0x31, 0xc9, // xor %r9d,%r9d
        0x6a, 0x00, // push $0x0
        0x6a, 0x00, // push $0x0
        0x41, 0x50, // push %r8
        0x45, 0x31, 0xc0, // xor %r8d,%r8d
    ];

    #[test]
    fn moves_past_frame_setup_to_an_emulated_push() {
        // Reads ctx (rdi) and pkey (r8): r9 may be clobbered, r8 is intact
        // until after the push at +0x0b.
        assert_eq!(entry_offset(DIGEST_SIGN_INIT, &[RDI, R8]), 0x0b);
    }

    #[test]
    fn stays_at_entry_when_a_needed_register_is_written_first() {
        // Something that needs r9 cannot go past `xor %r9d,%r9d`.
        assert_eq!(entry_offset(DIGEST_SIGN_INIT, &[RDI, R9]), 0);
    }

    #[test]
    fn stays_at_entry_when_it_is_already_emulated_or_control_flow_comes_first() {
        assert_eq!(entry_offset(&[0x53, 0x48, 0x83, 0xec, 0x20], &[RDI]), 0); // push %rbx
        assert_eq!(entry_offset(&[0x41, 0x54, 0x49, 0x89, 0xd4], &[RDI]), 0); // push %r12
        // A conditional branch that is not a NULL check of an argument
        // stops the search: cmp $1,%rdi; je ...; push %rbx.
        assert_eq!(
            entry_offset(&[0x48, 0x83, 0xff, 0x01, 0x74, 0x10, 0x53], &[RDI]),
            0
        );
        // test %rsi,%rsi; je: rsi is not an argument the probe reads.
        assert_eq!(
            entry_offset(&[0x48, 0x85, 0xf6, 0x74, 0x10, 0x53], &[RDI]),
            0
        );
        assert_eq!(entry_offset(&[], &[RDI]), 0);
    }

    // OpenSSL 3.0.19's EVP_PKEY_free (Debian build), to its first call on
    // the free path.
    const PKEY_FREE: &[u8] = &[
        0x48, 0x85, 0xff, // 0x00 test %rdi,%rdi
        0x0f, 0x84, 0xa7, 0x00, 0x00, 0x00, // 0x03 je +0xa7
        0x53, // 0x09 push %rbx
        0xb8, 0xff, 0xff, 0xff, 0xff, // 0x0a mov $-1,%eax
        0x48, 0x89, 0xfb, // 0x0f mov %rdi,%rbx
        0xf0, 0x0f, 0xc1, 0x47, 0x30, // 0x12 lock xadd %eax,0x30(%rdi)
        0x83, 0xe8, 0x01, // 0x17 sub $1,%eax
        0x85, 0xc0, // 0x1a test %eax,%eax
        0x74, 0x12, // 0x1c je 0x30
        0x7e, 0x10, // 0x1e jle 0x30
        0x5b, // 0x20 pop %rbx
        0x31, 0xc0, // 0x21 xor %eax,%eax
        0x31, 0xd2, // 0x23 xor %edx,%edx
        0x31, 0xf6, // 0x25 xor %esi,%esi
        0x31, 0xff, // 0x27 xor %edi,%edi
        0xc3, // 0x29 ret
        0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, // 0x2a nopw
        0xbe, 0x01, 0x00, 0x00, 0x00, // 0x30 mov $1,%esi
        0x48, 0x89, 0xdf, // 0x35 mov %rbx,%rdi
        0xe8, 0xb3, 0x83, 0xff, 0xff, // 0x38 call
    ];

    #[test]
    fn passes_a_null_check_of_the_argument_it_reads() {
        assert_eq!(entry_offset(PKEY_FREE, &[RDI]), 9);
    }

    // AWS-LC's EVP_PKEY_free (aws-lc-rs 1.15, kw-rustls), at 0x266ac0.
    const AWS_LC_PKEY_FREE: &[u8] = &[
        0x48, 0x85, 0xff, // 0x00 test %rdi,%rdi
        0x74, 0x4b, // 0x03 je 0x50
        0x53, // 0x05 push %rbx
        0x48, 0x89, 0xfb, // 0x06 mov %rdi,%rbx
        0xe8, 0xd2, 0xa9, 0x03,
        0x00, // 0x09 call 0x2a14a0 (CRYPTO_refcount_dec_and_test_zero)
        0x85, 0xc0, // 0x0e test %eax,%eax
        0x74, 0x36, // 0x10 je 0x48
        0x48, 0x8b, 0x43, 0x10, // 0x12 mov 0x10(%rbx),%rax
        0x48, 0x85, 0xc0, // 0x16 test %rax,%rax
        0x74, 0x11, // 0x19 je 0x2c
    ];

    const AWS_LC_AT: u64 = 0x266ac0;
    const AWS_LC_REFCOUNT: u64 = 0x2a14a0;

    #[test]
    fn finds_where_only_a_real_free_goes() {
        let none = |_| false;
        // OpenSSL: the je's target, up to its call, with the object
        // copied back into %rdi.
        let freed = |object_in, offset| Some(FreedAt { offset, object_in });
        assert_eq!(freed_path(PKEY_FREE, 0x1000, none), freed(RDI, 0x38));
        // AWS-LC: the fall-through of `je` after a zero result, at the next
        // conditional jump, with the object in %rbx.
        let refcount = |t| t == AWS_LC_REFCOUNT;
        assert_eq!(
            freed_path(AWS_LC_PKEY_FREE, AWS_LC_AT, refcount),
            freed(RBX, 0x19)
        );
        // BoringSSL's shape: `jne` to the free path (cmp/branch reversed).
        let mut jne = AWS_LC_PKEY_FREE.to_vec();
        jne[0x10] = 0x75; // jne 0x48, where the same instructions sit
        jne.resize(0x48, 0x90);
        jne.extend_from_slice(&[0x48, 0x8b, 0x43, 0x10, 0x74, 0x00]);
        assert_eq!(freed_path(&jne, AWS_LC_AT, refcount), freed(RBX, 0x4c));
    }

    #[test]
    fn any_other_shape_keeps_the_probe_at_the_entry() {
        let none = |_| false;
        // mov %rsi,%rdi first: the object is no longer in %rdi.
        let mut moved = vec![0x48, 0x89, 0xf7];
        moved.extend_from_slice(PKEY_FREE);
        assert!(freed_path(&moved, 0, none).is_none());
        // An increment (`mov $1,%eax` before the xadd) is no free.
        let mut up = PKEY_FREE.to_vec();
        up[0x0b..0x0f].copy_from_slice(&[1, 0, 0, 0]);
        assert!(freed_path(&up, 0, none).is_none());
        // Something else between the decrement and the branch.
        let mut other = PKEY_FREE.to_vec();
        other[0x1a..0x1c].copy_from_slice(&[0x85, 0xdb]); // test %ebx,%ebx
        assert!(freed_path(&other, 0, none).is_none());
        // A call to anything but the refcount function ends the search.
        assert!(freed_path(AWS_LC_PKEY_FREE, AWS_LC_AT, none).is_none());
        // Code cut short before the free path's probe point.
        assert!(freed_path(&PKEY_FREE[..0x38], 0, none).is_none());
    }
}
