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
//! and leaves the argument registers the probe reads untouched. Otherwise
//! the probe stays on the first instruction: slower, never wrong.

use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register};

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
        if insn.flow_control() != FlowControl::Next {
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
        // test %rdi,%rdi; je ...; push %rbx: the branch stops the search.
        assert_eq!(
            entry_offset(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x53], &[RDI]),
            0
        );
        assert_eq!(entry_offset(&[], &[RDI]), 0);
    }
}
