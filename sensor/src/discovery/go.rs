//! Go programs: which Go release built a binary, where its signing
//! functions are (from `.symtab`, or from `.gopclntab` when it was built
//! with `-ldflags "-s -w"`), and where to probe inside each.
//!
//! Go signs with its own code, and each release routes its signing paths
//! through different functions. [`GO_SYMBOLS`] names, per release range,
//! the one function every signing path of an algorithm goes through (so
//! each signature gives one event), and the function table
//! (`func::FUNCTIONS`) says how to read its arguments and results.
//!
//! Go code gets no return probe (see `func::GoOutput`): the entry probe
//! goes just past the function's stack-growth check, and one probe goes
//! on each `ret` instruction ([`place`]).

use std::{fs::File, os::unix::fs::FileExt};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};
use keywarden_probe_types::func;

/// A Go release, `go1.MINOR[.PATCH]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoVersion {
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for GoVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "go1.{}.{}", self.minor, self.patch)
    }
}

/// The oldest release probed: Go 1.18 is the first whose build
/// information holds its version inline and whose `.gopclntab` has the
/// layout [`pclntab_functions`] reads; the register ABI the probes read
/// arguments in is Go 1.17's.
pub const OLDEST_MINOR: u32 = 18;

/// The newest release the table was checked against (by its tests, on
/// Go 1.19, 1.21, 1.23 and 1.24). Newer ones are probed by the newest entries; a
/// family whose signer exists but whose probed function does not is
/// warned about (`missing_families`).
pub const NEWEST_CHECKED_MINOR: u32 = 24;

/// A Go signing function and the releases that sign through it.
pub struct GoSymbol {
    pub name: &'static str,
    pub id: u8,
    pub minors: std::ops::RangeInclusive<u32>,
    pub family: Family,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ecdsa,
    Rsa,
    Ed25519,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Ecdsa => "crypto/ecdsa",
            Family::Rsa => "crypto/rsa",
            Family::Ed25519 => "crypto/ed25519",
        }
    }

    /// Functions whose presence means the program can sign with this
    /// family (the linker drops what nothing calls).
    fn signers(self) -> &'static [&'static str] {
        match self {
            Family::Ecdsa => &[
                "crypto/ecdsa.(*PrivateKey).Sign",
                "crypto/ecdsa.Sign",
                "crypto/ecdsa.SignASN1",
            ],
            Family::Rsa => &[
                "crypto/rsa.(*PrivateKey).Sign",
                "crypto/rsa.SignPKCS1v15",
                "crypto/rsa.SignPSS",
            ],
            Family::Ed25519 => &["crypto/ed25519.PrivateKey.Sign", "crypto/ed25519.Sign"],
        }
    }
}

const ALL: u32 = u32::MAX;

/// Where each release signs. Go 1.18-1.19 made ECDSA signatures as
/// integers in `ecdsa.Sign` (what `SignASN1` and the key's `Sign` call);
/// 1.20 turned that around. Ed25519 moved under the FIPS 140 module in
/// 1.24.
pub const GO_SYMBOLS: [GoSymbol; 6] = [
    GoSymbol {
        name: "crypto/ecdsa.Sign",
        id: func::GO_ECDSA_SIGN,
        minors: OLDEST_MINOR..=19,
        family: Family::Ecdsa,
    },
    GoSymbol {
        name: "crypto/ecdsa.SignASN1",
        id: func::GO_ECDSA_SIGN_ASN1,
        minors: 20..=ALL,
        family: Family::Ecdsa,
    },
    GoSymbol {
        name: "crypto/rsa.SignPKCS1v15",
        id: func::GO_RSA_SIGN_PKCS1V15,
        minors: OLDEST_MINOR..=ALL,
        family: Family::Rsa,
    },
    GoSymbol {
        name: "crypto/rsa.SignPSS",
        id: func::GO_RSA_SIGN_PSS,
        minors: OLDEST_MINOR..=ALL,
        family: Family::Rsa,
    },
    GoSymbol {
        name: "crypto/ed25519.sign",
        id: func::GO_ED25519_SIGN,
        minors: OLDEST_MINOR..=23,
        family: Family::Ed25519,
    },
    GoSymbol {
        name: "crypto/internal/fips140/ed25519.signWithDom",
        id: func::GO_ED25519_SIGN_WITH_DOM,
        minors: 24..=ALL,
        family: Family::Ed25519,
    },
];

/// The probed function a Go symbol name is in this release, if any.
pub fn classify(name: &str, version: GoVersion) -> Option<u8> {
    GO_SYMBOLS
        .iter()
        .find(|s| s.name == name && s.minors.contains(&version.minor))
        .map(|s| s.id)
}

/// Families the program can sign with (`present` holds the names found of
/// `Family::signers`) but whose probed function was not found (`probed`
/// holds the ids found): a newer release that moved its signing code.
pub fn missing_families(present: &[&str], probed: &[u8]) -> Vec<Family> {
    let mut out = Vec::new();
    for family in [Family::Ecdsa, Family::Rsa, Family::Ed25519] {
        let signs = family.signers().iter().any(|n| present.contains(n));
        let seen = GO_SYMBOLS
            .iter()
            .any(|s| s.family == family && probed.contains(&s.id));
        if signs && !seen {
            out.push(family);
        }
    }
    out
}

/// Every name `missing_families` looks for.
pub fn signer_names() -> impl Iterator<Item = &'static str> {
    [Family::Ecdsa, Family::Rsa, Family::Ed25519]
        .into_iter()
        .flat_map(|f| f.signers().iter().copied())
}

/// The release recorded in a `.go.buildinfo` section's first bytes (Go
/// 1.18 and later write it inline: a 16-byte magic with pointer size and
/// flags, padding to 32, then a varint length and the string).
pub fn version_from_buildinfo(head: &[u8]) -> Option<GoVersion> {
    if head.len() < 33 || !head.starts_with(b"\xff Go buildinf:") || head[15] & 2 == 0 {
        return None;
    }
    let len = head[32] as usize;
    if len >= 0x80 {
        return None; // a multi-byte varint: no release string is that long
    }
    let s = std::str::from_utf8(head.get(33..33 + len)?).ok()?;
    parse_version(s)
}

/// `go1.19.8` -> 1.19.8; `go1.24` -> 1.24.0; anything else (a `devel`
/// build) -> None.
pub fn parse_version(s: &str) -> Option<GoVersion> {
    let rest = s.strip_prefix("go1.")?;
    let rest = rest.split([' ', '-', '+']).next()?;
    let mut parts = rest.split('.');
    let minor = parts.next()?.parse().ok()?;
    // `go1.21rc2`: the release candidate of 1.21.0.
    let patch = match parts.next() {
        Some(p) => p.parse().ok()?,
        None => 0,
    };
    Some(GoVersion { minor, patch })
}

/// Bytes of `.gopclntab` read at most: kubelet's is 20 MB.
pub const MAX_PCLNTAB: u64 = 64 << 20;

/// A function found in `.gopclntab`: its name's index in `wanted`, its
/// address and its size (up to the next function).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub wanted: usize,
    pub address: u64,
    pub size: u64,
}

/// Finds the functions named `wanted` in the `.gopclntab` section at
/// `offset` (`size` bytes) of `f`. `text` is the `.text` section's
/// address, used when the table leaves its text start to a relocation
/// (position-independent builds).
///
/// The layout (Go 1.18 and later, `runtime/symtab.go`'s `pcHeader`): a
/// magic, then 8-byte words: the function count, the file count, the
/// text start, and the offsets of the function name table, the
/// compilation unit table, the file table, the pc tables and the
/// function table. The function table holds (entry offset, `_func`
/// offset) pairs of 32-bit words; a `_func` starts with its entry offset
/// and the offset of its name.
pub fn pclntab_functions(
    f: &File,
    offset: u64,
    size: u64,
    text: u64,
    wanted: &[&str],
) -> Result<Vec<Found>, String> {
    if size > MAX_PCLNTAB {
        return Err(format!(
            "its .gopclntab is {} bytes, more than the {MAX_PCLNTAB} keywarden reads",
            size
        ));
    }
    let mut table = vec![0u8; size as usize];
    f.read_exact_at(&mut table, offset)
        .map_err(|e| format!("cannot read .gopclntab: {e}"))?;
    functions_in(&table, text, wanted)
}

fn functions_in(table: &[u8], text: u64, wanted: &[&str]) -> Result<Vec<Found>, String> {
    let word = |at: u64| -> Result<u64, String> {
        let at = usize::try_from(at).map_err(|_| "offset out of range".to_owned())?;
        table
            .get(at..at.checked_add(8).ok_or("offset out of range")?)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| format!(".gopclntab is cut short at byte {at}"))
    };
    let half = |at: u64| -> Result<u32, String> {
        let at = usize::try_from(at).map_err(|_| "offset out of range".to_owned())?;
        table
            .get(at..at.checked_add(4).ok_or("offset out of range")?)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| format!(".gopclntab is cut short at byte {at}"))
    };
    let magic = half(0)?;
    if magic != 0xffff_fff0 && magic != 0xffff_fff1 {
        return Err(format!(
            ".gopclntab has magic {magic:#x}, not that of Go 1.18 or later"
        ));
    }
    if table.get(7) != Some(&8) {
        return Err(".gopclntab is not for 64-bit pointers".into());
    }
    let nfunc = word(8)?;
    let text_start = match word(24)? {
        0 => text,
        t => t,
    };
    let names_at = word(32)?;
    let names_end = word(40)?;
    let functab = word(64)?;
    let names = usize::try_from(names_at)
        .ok()
        .zip(usize::try_from(names_end).ok())
        .and_then(|(a, b)| table.get(a..b))
        .ok_or(".gopclntab's name table lies outside it")?;
    // Each wanted name's offsets in the name table (a name is a C string).
    let mut offsets: Vec<(usize, u32)> = Vec::new();
    for (i, name) in wanted.iter().enumerate() {
        let needle = [name.as_bytes(), b"\0"].concat();
        for at in memchr::memmem::find_iter(names, &needle) {
            if at == 0 || names[at - 1] == 0 {
                offsets.push((i, at as u32));
            }
        }
    }
    if offsets.is_empty() {
        return Ok(Vec::new());
    }
    if nfunc > (table.len() as u64) / 8 {
        return Err(format!(
            ".gopclntab claims {nfunc} functions, more than fit in it"
        ));
    }
    let past = |a: u64, b: u64| a.checked_add(b).ok_or(".gopclntab offset out of range");
    let mut out = Vec::new();
    for i in 0..nfunc {
        let pair = past(functab, i * 8)?;
        let entry = half(pair)?;
        let func_at = past(functab, half(past(pair, 4)?)? as u64)?;
        let name_off = half(past(func_at, 4)?)?;
        let Some(&(wanted, _)) = offsets.iter().find(|(_, o)| *o == name_off) else {
            continue;
        };
        // The table ends with the end of the text: entry i + 1 exists.
        let next = half(past(pair, 8)?)?;
        let Some(size) = next.checked_sub(entry).filter(|s| *s > 0) else {
            continue;
        };
        out.push(Found {
            wanted,
            address: text_start.wrapping_add(entry as u64),
            size: size as u64,
        });
    }
    Ok(out)
}

/// Where to probe a Go function: the entry probe's offset from its start,
/// and the offset of each `ret`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoPlacement {
    pub entry: u64,
    pub returns: Vec<u64>,
}

/// Most `ret` instructions probed in one function; a signing function has
/// one or two.
const MAX_RETURNS: usize = 16;

/// Instructions searched for the stack-growth check.
const PROLOGUE_INSTRUCTIONS: usize = 6;

/// Where to probe `code`, a whole Go function. The entry probe goes past
/// the stack-growth check (`cmp rsp/r12, [r14+16]; jbe`): when the stack
/// must grow, the runtime copies it and starts the function again from its
/// first instruction, so a probe there would see one call twice. The
/// instructions before it must leave the argument registers alone (they
/// touch only `rsp`-relative scratch in `r12`). None when the function
/// has no `ret` to read results at, or its code does not decode.
pub fn place(code: &[u8]) -> Option<GoPlacement> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut entry = 0;
    let mut returns = Vec::new();
    let mut checked_g = false;
    let mut n = 0usize;
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        n += 1;
        if n <= PROLOGUE_INSTRUCTIONS && entry == 0 {
            // `cmp reg, [r14+16]`: the stack bound, g.stackguard0.
            if insn.mnemonic() == Mnemonic::Cmp
                && insn.op_count() == 2
                && insn.op1_kind() == OpKind::Memory
                && insn.memory_base() == Register::R14
            {
                checked_g = true;
            } else if checked_g && insn.mnemonic() == Mnemonic::Jbe {
                entry = insn.next_ip();
            } else if !checked_g && !only_scratch(&insn) {
                // Something else first: no check to go past.
                n = PROLOGUE_INSTRUCTIONS;
            }
        }
        if insn.mnemonic() == Mnemonic::Ret {
            if returns.len() == MAX_RETURNS {
                return None;
            }
            returns.push(insn.ip());
        }
        if insn.flow_control() == FlowControl::Interrupt && insn.mnemonic() == Mnemonic::Int3 {
            break; // padding after the function
        }
    }
    (!returns.is_empty()).then_some(GoPlacement { entry, returns })
}

/// The prologue's own instructions before the check: `lea r12, [rsp-N]`
/// or `mov r12, rsp; sub r12, N` (a large frame), which write no
/// argument register.
fn only_scratch(insn: &iced_x86::Instruction) -> bool {
    matches!(
        insn.mnemonic(),
        Mnemonic::Lea | Mnemonic::Mov | Mnemonic::Sub
    ) && insn.op0_kind() == OpKind::Register
        && insn.op0_register().full_register() == Register::R12
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("go1.19.8"),
            Some(GoVersion {
                minor: 19,
                patch: 8
            })
        );
        assert_eq!(
            parse_version("go1.24"),
            Some(GoVersion {
                minor: 24,
                patch: 0
            })
        );
        assert_eq!(parse_version("devel go1.25-abc"), None);
        let mut head = b"\xff Go buildinf:\x08\x02".to_vec();
        head.resize(32, 0);
        head.push(8);
        head.extend_from_slice(b"go1.24.4");
        assert_eq!(version_from_buildinfo(&head).unwrap().minor, 24);
        // Pointer-format build information (Go 1.17 and older) is not read.
        head[15] = 0;
        assert_eq!(version_from_buildinfo(&head), None);
        // A length past the end is not read.
        head[15] = 2;
        head[32] = 40;
        assert_eq!(version_from_buildinfo(&head), None);
    }

    #[test]
    fn each_release_signs_through_one_function_per_family() {
        for minor in OLDEST_MINOR..=NEWEST_CHECKED_MINOR + 2 {
            for family in [Family::Ecdsa, Family::Ed25519] {
                let n = GO_SYMBOLS
                    .iter()
                    .filter(|s| s.family == family && s.minors.contains(&minor))
                    .count();
                assert_eq!(n, 1, "go1.{minor} {family:?}");
            }
        }
        // Every Go function id has exactly one symbol.
        for f in func::FUNCTIONS.iter().filter(|f| func::is_go(f.id)) {
            let names: Vec<_> = GO_SYMBOLS.iter().filter(|s| s.id == f.id).collect();
            assert_eq!(names.len(), 1, "{}", f.name);
            assert_eq!(names[0].name, f.name);
        }
        let v = GoVersion {
            minor: 19,
            patch: 8,
        };
        assert_eq!(classify("crypto/ecdsa.Sign", v), Some(func::GO_ECDSA_SIGN));
        assert_eq!(classify("crypto/ecdsa.SignASN1", v), None);
    }

    #[test]
    fn a_family_that_signs_but_is_not_probed_is_named() {
        let present = [
            "crypto/ecdsa.(*PrivateKey).Sign",
            "crypto/ed25519.PrivateKey.Sign",
        ];
        assert_eq!(
            missing_families(&present, &[func::GO_ECDSA_SIGN_ASN1]),
            vec![Family::Ed25519]
        );
        assert!(
            missing_families(&present, &[func::GO_ECDSA_SIGN, func::GO_ED25519_SIGN]).is_empty()
        );
    }

    #[test]
    fn entry_goes_past_the_stack_check_and_every_ret_is_found() {
        // cmp rsp,[r14+0x10]; jbe +0x10; push rbp; mov rbp,rsp; ...; pop rbp; ret;
        // ...; ret; call morestack; jmp start; int3
        let code = [
            0x49, 0x3b, 0x66, 0x10, // cmp rsp,[r14+0x10]
            0x76, 0x0a, // jbe +10
            0x55, // push rbp
            0x48, 0x89, 0xe5, // mov rbp,rsp
            0x85, 0xc0, // test eax,eax
            0x74, 0x02, // je +2
            0x5d, // pop rbp
            0xc3, // ret
            0x5d, // pop rbp
            0xc3, // ret
            0xe8, 0, 0, 0, 0, // call
            0xeb, 0xe6, // jmp start
            0xcc, 0xcc,
        ];
        let p = place(&code).unwrap();
        assert_eq!(p.entry, 6);
        assert_eq!(p.returns, vec![15, 17]);
        // A large frame: lea r12,[rsp-0x1000]; cmp r12,[r14+0x10]; jbe.
        let big = [
            0x4c, 0x8d, 0xa4, 0x24, 0x00, 0xf0, 0xff, 0xff, // lea r12,[rsp-0x1000]
            0x4d, 0x3b, 0x66, 0x10, // cmp r12,[r14+0x10]
            0x76, 0x01, // jbe
            0x55, // push rbp
            0xc3,
        ];
        assert_eq!(place(&big).unwrap().entry, 14);
        // No check (a small leaf): probe the first instruction.
        assert_eq!(place(&[0x48, 0x89, 0xc1, 0xc3]).unwrap().entry, 0);
        // No ret: nowhere to read the result.
        assert_eq!(place(&[0x55, 0xeb, 0xfe]), None);
    }

    #[test]
    fn a_hostile_pclntab_is_an_error_not_a_panic() {
        assert!(functions_in(&[], 0, &["x"]).is_err());
        let mut t = vec![0u8; 72];
        t[..4].copy_from_slice(&0xffff_fff1u32.to_le_bytes());
        t[7] = 8;
        // Name table past the end.
        t[32..40].copy_from_slice(&1000u64.to_le_bytes());
        t[40..48].copy_from_slice(&2000u64.to_le_bytes());
        assert!(functions_in(&t, 0, &["x"]).is_err());
        // A name found, but a function count larger than the table.
        let mut t2 = t.clone();
        t2.extend_from_slice(b"\0x\0");
        t2[32..40].copy_from_slice(&72u64.to_le_bytes());
        t2[40..48].copy_from_slice(&75u64.to_le_bytes());
        t2[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(functions_in(&t2, 0, &["x"]).is_err());
        // A function table pointing outside.
        t2[8..16].copy_from_slice(&2u64.to_le_bytes());
        t2[64..72].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(functions_in(&t2, 0, &["x"]).is_err());
    }
}
