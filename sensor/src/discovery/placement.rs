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
//! `refcount_field` reads, from the same bytes, which field a free
//! function decrements; see `sensor/src/probes.rs` for why.

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
        if !decoder.can_decode() {
            break;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
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
        let writes_arg = info.info(&insn).used_registers().iter().any(|r| {
            !matches!(
                r.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
            ) && args.contains(&r.register().full_register())
        });
        if writes_arg {
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

/// The reference count a free function decrements, and where (offset from
/// the function's start) it does so:
/// - its first locked read-modify-write of a 32-bit field of the object in
///   `%rdi` (OpenSSL's `lock xadd %eax,0x30(%rdi)` in `EVP_PKEY_free`);
/// - or a call, with `%rdi` untouched, to a function `is_refcount_call`
///   accepts (BoringSSL and AWS-LC call
///   `CRYPTO_refcount_dec_and_test_zero(&pkey->references)`, their first
///   field): offset 0.
///
/// `None` when the first instructions do not show it plainly: the argument
/// register overwritten, another call or a jump, or nothing locked. Then
/// the caller keeps treating every free as one. `address` is the
/// function's address, which call targets are relative to.
pub fn refcount_field(
    code: &[u8],
    address: u64,
    is_refcount_call: impl Fn(u64) -> bool,
) -> Option<(u32, u64)> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    for _ in 0..MAX_INSTRUCTIONS * 2 {
        if !decoder.can_decode() {
            return None;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        if insn.has_lock_prefix() {
            let plain_field = insn.memory_base() == Register::RDI
                && insn.memory_index() == Register::None
                && matches!(
                    insn.mnemonic(),
                    Mnemonic::Xadd | Mnemonic::Sub | Mnemonic::Add | Mnemonic::Dec
                )
                && insn.memory_size().size() == 4;
            let disp = u32::try_from(insn.memory_displacement64()).ok()?;
            return plain_field.then_some((disp, insn.ip() - address));
        }
        if insn.flow_control() == FlowControl::Call {
            let direct = insn.op0_kind() == OpKind::NearBranch64;
            return (direct && is_refcount_call(insn.near_branch64()))
                .then_some((0, insn.ip() - address));
        }
        if !matches!(
            insn.flow_control(),
            FlowControl::Next | FlowControl::ConditionalBranch
        ) {
            return None;
        }
        let writes_rdi = info.info(&insn).used_registers().iter().any(|r| {
            !matches!(
                r.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
            ) && r.register().full_register() == Register::RDI
        });
        if writes_rdi {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use Register::*;

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

    // OpenSSL 3.0.19's EVP_PKEY_free (Debian build), first instructions.
    const PKEY_FREE: &[u8] = &[
        0x48, 0x85, 0xff, // test %rdi,%rdi
        0x0f, 0x84, 0xa7, 0x00, 0x00, 0x00, // je +0xa7
        0x53, // push %rbx
        0xb8, 0xff, 0xff, 0xff, 0xff, // mov $-1,%eax
        0x48, 0x89, 0xfb, // mov %rdi,%rbx
        0xf0, 0x0f, 0xc1, 0x47, 0x30, // lock xadd %eax,0x30(%rdi)
        0x83, 0xe8, 0x01, // sub $1,%eax
    ];

    #[test]
    fn passes_a_null_check_of_the_argument_it_reads() {
        assert_eq!(entry_offset(PKEY_FREE, &[RDI]), 9);
    }

    // AWS-LC 1.x's EVP_PKEY_free (aws-lc-rs 1.15, kw-rustls), at 0x2663b0.
    const AWS_LC_PKEY_FREE: &[u8] = &[
        0x48, 0x85, 0xff, // test %rdi,%rdi
        0x74, 0x5b, // je +0x5b
        0x53, // push %rbx
        0x48, 0x89, 0xfb, // mov %rdi,%rbx
        0xe8, 0xd2, 0xa9, 0x03, 0x00, // call 0x2a0d90 (CRYPTO_refcount_dec_and_test_zero)
        0x85, 0xc0, // test %eax,%eax
    ];

    #[test]
    fn finds_the_reference_count_a_free_decrements() {
        let none = |_| false;
        assert_eq!(refcount_field(PKEY_FREE, 0x1000, none), Some((0x30, 18)));
        // mov %rsi,%rdi first: the object is no longer in %rdi.
        let mut moved = vec![0x48, 0x89, 0xf7];
        moved.extend_from_slice(PKEY_FREE);
        assert!(refcount_field(&moved, 0, none).is_none());
        // A locked 64-bit add is not a 32-bit reference count.
        assert!(refcount_field(&[0xf0, 0x48, 0x01, 0x47, 0x30], 0, none).is_none());
    }

    #[test]
    fn a_call_to_the_refcount_function_means_the_first_field() {
        let at = 0x2663b0;
        let refcount = |t| t == 0x2a0d90;
        assert_eq!(refcount_field(AWS_LC_PKEY_FREE, at, refcount), Some((0, 9)));
        // Any other call ends the search.
        assert!(refcount_field(AWS_LC_PKEY_FREE, at, |_| false).is_none());
    }
}
