//! Finds signing code in any ELF file: a shared `libcrypto`, a static
//! binary carrying OpenSSL, BoringSSL or AWS-LC, a Rust program with rustls
//! or ring, an extension module with its own OpenSSL. The result is the
//! file offsets uprobes attach to.
//!
//! Both `.dynsym` and `.symtab` are read: a shared libcrypto exports its API
//! in `.dynsym` (names carry a version like `@@OPENSSL_3.0.0`, which the
//! `object` crate keeps apart from the name); static builds keep *local*
//! symbols in `.symtab` only (BoringSSL inside Envoy or the `boring`
//! crate). AWS-LC prefixes every symbol with its version
//! (`aws_lc_0_47_0_EVP_DigestSign`). Rust symbols are demangled (legacy
//! `_ZN…17h<hash>E` and v0 `_R…`), because the hash changes with every
//! build and only the path is stable.
//!
//! A file that holds crypto code but no symbols (stripped) cannot be
//! probed; `SigningCode::markers` says what was recognised in it, so the
//! sensor can report it instead of missing it silently.
//!
//! Files are read through `elf_read` (bounded reads, never a mapping);
//! which symbol is which function is `symbols`. (Over 600 lines only with
//! its tests, which read real libraries and hostile files; the scan is
//! about 520.)

use std::{
    fs::File,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::Path,
    sync::Arc,
};

use hashbrown::{HashMap, HashSet};
use keywarden_probe_types::func;
use object::{
    Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadRef, SectionKind, SymbolKind,
};

pub use super::symbols::{Stack, function_name, needs_return, signing_functions};
use super::symbols::{c_symbols, classify};
use super::{
    elf_read::{ElfReader, metadata_capped},
    go, placement,
};

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not an ELF file keywarden can parse: {source}")]
    Parse { path: String, source: object::Error },
    /// A bound was reached (`MAX_FILE_SIZE`, `MAX_METADATA`,
    /// `MAX_MARKER_SEARCH`): the file is skipped rather than read further.
    #[error("{path}: not scanned: {why}")]
    Capped { path: String, why: String },
}

/// Bytes of each function kept for instruction decoding.
pub const CODE_PREFIX: usize = 128;

/// One place to attach.
#[derive(Clone, Debug)]
pub struct ProbePoint {
    pub id: u8,
    pub stack: Stack,
    /// As in the file (the C name without prefix or version, or the
    /// demangled Rust path without hash).
    pub symbol: String,
    /// File offset of the function's first instruction.
    pub offset: u64,
    /// Its virtual address (what its calls are relative to).
    pub address: u64,
    /// The function's first bytes (up to `CODE_PREFIX`), for placement.
    pub code: Vec<u8>,
    /// For `EVP_PKEY_free`: where in it only a real free (the last
    /// reference dropped) goes (`placement::freed_path`). Per point: one
    /// file can link two libraries (OpenSSL and AWS-LC in one Rust binary).
    pub freed: Option<placement::FreedAt>,
    /// For Go code: where its entry probe and return-instruction probes go.
    pub go: Option<go::GoPlacement>,
}

/// What one ELF file holds.
#[derive(Clone, Debug, Default)]
pub struct SigningCode {
    pub points: Vec<ProbePoint>,
    /// C API functions a file with the C API lacks (informational: the
    /// `_ex` variants do not exist in BoringSSL or OpenSSL 1.1).
    pub missing: Vec<&'static str>,
    /// No `.symtab` section: local functions cannot be found.
    pub stripped: bool,
    /// GNU build-id as hex, when the file has one.
    pub build_id: Option<String>,
    /// Crypto code recognised by its strings, reported only when no probe
    /// point was found (what a stripped binary still shows).
    pub markers: Vec<&'static str>,
    /// The Go release that built the file, for Go programs.
    pub go_version: Option<go::GoVersion>,
    /// Go signing code that is present but not probed, and why (a family
    /// whose probed function this release does not have).
    pub go_gaps: Vec<String>,
}

impl SigningCode {
    pub fn stacks(&self) -> Vec<Stack> {
        let mut out: Vec<Stack> = Vec::new();
        for p in &self.points {
            if !out.contains(&p.stack) {
                out.push(p.stack);
            }
        }
        out
    }

    /// At least one function that produces signatures.
    pub fn can_see_signatures(&self) -> bool {
        self.points.iter().any(|p| needs_return(p.id))
    }

    /// Why some of this file's signatures are not seen although others
    /// are: Go signing code the probes do not know.
    pub fn partial_reason(&self) -> Option<String> {
        if self.go_gaps.is_empty() || !self.can_see_signatures() {
            return None;
        }
        Some(format!(
            "signs with code keywarden cannot probe ({}); signatures made by it are not seen \
             (build-id {})",
            self.go_gaps.join("; "),
            self.build_id.as_deref().unwrap_or("none"),
        ))
    }

    /// Why this file's signatures cannot be seen, when it evidently holds
    /// crypto code but no signing function was found.
    pub fn uncovered_reason(&self) -> Option<String> {
        if self.can_see_signatures() || self.markers.is_empty() {
            return None;
        }
        let why_unprobed: Vec<&str> = self
            .markers
            .iter()
            .filter_map(|m| UNPROBED.iter().find(|(what, _)| what == m))
            .map(|(_, why)| *why)
            .collect();
        if why_unprobed.len() == self.markers.len() {
            return Some(format!(
                "signs with code keywarden cannot probe ({}): {}; signatures made by it are not seen \
                 (build-id {})",
                self.markers.join(", "),
                why_unprobed.join("; "),
                self.build_id.as_deref().unwrap_or("none"),
            ));
        }
        let wanted = signing_functions();
        Some(format!(
            "holds crypto code ({}) but {}: none of its signing functions ({wanted}) can be located, \
             so signatures made by it are not seen (build-id {})",
            self.markers.join(", "),
            if self.stripped {
                "is stripped (no .symtab)"
            } else {
                "its symbol table names no signing function"
            },
            self.build_id.as_deref().unwrap_or("none"),
        ))
    }
}

/// Strings that betray crypto code even without symbols: OpenSSL-style
/// libraries record source file names for errors, Rust crates their
/// paths for panics, Go binaries every function name in `.gopclntab`
/// (kept by `-ldflags "-s -w"` too). Each names code that signs, not a
/// mere mention (a libcurl version string says "OpenSSL" too).
const MARKERS: [(&[u8], &str); 12] = [
    (b"crypto/evp/m_sigver.c", "OpenSSL EVP signing"),
    (b"crypto/fipsmodule/ecdsa/", "BoringSSL or AWS-LC ECDSA"),
    (b"/rustls-0.", "rustls"),
    (b"/ring-0.17", "ring"),
    (b"/aws-lc-rs-", "aws-lc-rs"),
    // OpenSSH's own Ed25519 (ssh, sshd, ssh-keygen, ssh-agent), named in
    // its error messages; its ECDSA and RSA go through libcrypto.
    (b"crypto_sign_ed25519", OPENSSH_ED25519),
    // Go's signers (what `crypto/tls` calls through `crypto.Signer`) and
    // the package functions programs call directly. The linker drops
    // functions nothing calls, so these are only in programs that can
    // sign.
    (b"crypto/ecdsa.(*PrivateKey).Sign", GO_CRYPTO),
    (b"crypto/ecdsa.Sign", GO_CRYPTO),
    (b"crypto/rsa.(*PrivateKey).Sign", GO_CRYPTO),
    (b"crypto/rsa.SignP", GO_CRYPTO),
    (b"crypto/ed25519.PrivateKey.Sign", GO_CRYPTO),
    (b"crypto/ed25519.Sign", GO_CRYPTO),
];

const OPENSSH_ED25519: &str = "OpenSSH's built-in Ed25519";
pub(crate) const GO_CRYPTO: &str = "Go's crypto/ecdsa, crypto/rsa or crypto/ed25519";
pub(crate) const NSS: &str = "NSS";
pub(crate) const JVM: &str = "a Java virtual machine";

/// Exported functions that name a crypto runtime keywarden does not probe
/// (yet): a library defining one is that runtime. Told by symbol, not by
/// string, since these libraries keep their exports. (An NSS that also
/// exports `PK11_SignWithMechanism` is probed, and not warned about.)
const RUNTIME_SYMBOLS: [(&str, &str); 2] = [
    ("PK11_Sign", NSS),
    // libjvm.so, which every JVM maps.
    ("JNI_CreateJavaVM", JVM),
];

/// Signing code keywarden has no probe for even where symbols name it,
/// and why: a warning about it says so instead of blaming missing symbols.
const UNPROBED: [(&str, &str); 4] = [
    (
        OPENSSH_ED25519,
        "OpenSSH signs Ed25519 with its own code, not libcrypto's, and keywarden has no probe for it",
    ),
    (
        GO_CRYPTO,
        "keywarden probes Go programs built by Go 1.18 or later, and this one's release \
         (from its build information) is older or could not be read",
    ),
    (
        NSS,
        "keywarden probes NSS's PK11_SignWithMechanism (NSS 3.22 and later), which this build does not export",
    ),
    (
        JVM,
        "Java's own security providers sign in JIT-compiled code, which has no file for a uprobe",
    ),
];

/// Largest file scanned: 512 MiB. Files with signing code are far
/// smaller (libcrypto is 5 MB, node with its OpenSSL 98 MB, libLLVM 117
/// MB, librustc_driver 154 MB); a bigger one is skipped with a warning
/// instead of read, so a sparse file of any size costs the sensor one
/// `fstat`.
pub const MAX_FILE_SIZE: u64 = 512 << 20;

/// Bytes of read-only data searched for `MARKERS` (only in files with no
/// probe point): the `.rodata` of libcrypto is 370 KB, of libLLVM 35 MB.
/// A file with more is skipped with an error rather than searched in part.
const MAX_MARKER_SEARCH: u64 = 64 << 20;

/// Bytes read at a time by the marker search.
const MARKER_CHUNK: usize = 1 << 20;

pub(super) fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// Opens a file to scan: read-only, without blocking (a FIFO named like a
/// library would otherwise stop the control thread), and only if it is a
/// regular file. Its identity comes from the descriptor, so it is the
/// identity of what is read.
pub fn open(path: &Path, shown_as: &str) -> Result<(File, FileId), ScanError> {
    let read_err = |source| ScanError::Read {
        path: shown_as.to_owned(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let md = f.metadata().map_err(read_err)?;
    if !md.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    Ok((f, FileId::of(&md)))
}

/// Reads the ELF file at `path` (shown in messages as `shown_as`).
pub fn scan(path: &Path, shown_as: &str) -> Result<SigningCode, ScanError> {
    let (f, id) = open(path, shown_as)?;
    scan_file(&f, id, shown_as)
}

/// Reads an opened ELF file whose `fstat` gave `id`.
///
/// The file is never mapped: any user can truncate a file they own while
/// the sensor reads it (a library they load, a program they run), and a
/// mapped page past the new end kills the reader with SIGBUS. Every read
/// here copies a bounded number of bytes at a known offset (`read(2)`, not
/// a page fault), so a truncated file gives a short read, that is an
/// error. A file that changed while it was read
/// is an error too: what was read may not belong together.
pub fn scan_file(f: &File, id: FileId, shown_as: &str) -> Result<SigningCode, ScanError> {
    if id.size > MAX_FILE_SIZE {
        return Err(ScanError::Capped {
            path: shown_as.to_owned(),
            why: format!(
                "it is {}, more than the {} keywarden reads of an ELF file",
                mib(id.size),
                mib(MAX_FILE_SIZE)
            ),
        });
    }
    let result = scan_elf(f, id.size, shown_as);
    match f.metadata() {
        Ok(md) if FileId::of(&md) == id => result,
        Ok(_) => Err(ScanError::Read {
            path: shown_as.to_owned(),
            source: std::io::Error::other("the file changed while it was read"),
        }),
        Err(source) => Err(ScanError::Read {
            path: shown_as.to_owned(),
            source,
        }),
    }
}

fn scan_elf(f: &File, len: u64, shown_as: &str) -> Result<SigningCode, ScanError> {
    let data = ElfReader::new(f, len, shown_as)?;
    let file = object::File::parse(&data).map_err(|source| {
        if data.exhausted() {
            metadata_capped(shown_as)
        } else {
            ScanError::Parse {
                path: shown_as.to_owned(),
                source,
            }
        }
    })?;
    let mut out = SigningCode {
        build_id: file.build_id().ok().flatten().map(hex::encode),
        stripped: file.section_by_name(".symtab").is_none(),
        ..Default::default()
    };
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .filter_map(|s| {
            let (off, size) = s.file_range();
            (size > 0).then_some((s.address(), size, off))
        })
        .collect();
    out.go_version = go_version(f, &file, len);
    // Go programs probed: their release is known and new enough.
    let go = out.go_version.filter(|v| v.minor >= go::OLDEST_MINOR);
    let mut go_signers: Vec<&'static str> = Vec::new();
    let mut boringssl = false;
    let mut runtimes: Vec<&'static str> = Vec::new();
    let mut seen: HashSet<(u8, u64)> = HashSet::new();
    let mut refcount_fns: HashSet<u64> = HashSet::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        let Ok(raw) = sym.name() else { continue };
        if raw.starts_with("_ZN4bssl") {
            boringssl = true; // BoringSSL's C++ namespace
        }
        // Plain, AWS-LC-prefixed, or BoringSSL's C++
        // `bssl::CRYPTO_refcount_dec_and_test_zero(std::atomic<uint32_t>*)`.
        if sym.is_definition() && raw.contains("CRYPTO_refcount_dec_and_test_zero") {
            refcount_fns.insert(sym.address());
        }
        if sym.kind() != SymbolKind::Text || !sym.is_definition() || sym.address() == 0 {
            continue;
        }
        if let Some((_, what)) = RUNTIME_SYMBOLS.iter().find(|(name, _)| *name == raw)
            && !runtimes.contains(what)
        {
            runtimes.push(what);
        }
        if let Some(v) = go {
            if let Some(name) = go::signer_names().find(|n| *n == raw) {
                go_signers.push(name);
            }
            if let Some(id) = go::classify(raw, v) {
                add_go_point(&mut out, &data, &segments, id, sym.address(), sym.size());
                continue;
            }
        }
        let Some((id, stack, symbol)) = classify(raw) else {
            continue;
        };
        let addr = sym.address();
        // Checked arithmetic: a hostile file's segments may wrap around.
        let Some(offset) = segments
            .iter()
            .find(|(a, size, _)| addr >= *a && addr - a < *size)
            .and_then(|(a, _, off)| (addr - a).checked_add(*off))
        else {
            continue;
        };
        // The same function in .dynsym and .symtab, or aliases.
        if !seen.insert((id, offset)) {
            continue;
        }
        let code = data.code_at(offset, (sym.size().max(1) as usize).min(CODE_PREFIX));
        out.points.push(ProbePoint {
            id,
            stack,
            symbol,
            offset,
            address: addr,
            code,
            freed: None,
            go: None,
        });
    }
    if let Some(v) = go {
        if out.stripped {
            go_from_pclntab(
                f,
                &file,
                &data,
                &segments,
                v,
                &mut out,
                &mut go_signers,
                shown_as,
            )?;
        }
        let probed: Vec<u8> = out.points.iter().map(|p| p.id).collect();
        for family in go::missing_families(&go_signers, &probed) {
            out.go_gaps.push(format!(
                "{v} signs with {} through a function keywarden does not know \
                 (its Go functions are checked up to go1.{})",
                family.name(),
                go::NEWEST_CHECKED_MINOR
            ));
        }
    }
    // Symbol names that could not be read were skipped above: when the
    // budget ran out, the list is incomplete, and the file is skipped.
    if data.exhausted() {
        return Err(metadata_capped(shown_as));
    }
    for p in out.points.iter_mut().filter(|p| p.id == func::PKEY_FREE) {
        p.freed = placement::freed_path(&p.code, p.address, |t| refcount_fns.contains(&t));
    }
    if boringssl {
        for p in &mut out.points {
            if p.stack == Stack::Openssl {
                p.stack = Stack::Boringssl;
            }
        }
    }
    if out.points.iter().any(|p| p.stack.is_c()) {
        out.missing = c_symbols()
            .filter(|name| !out.points.iter().any(|p| p.symbol == *name))
            .collect();
    }
    if !out.can_see_signatures() {
        out.markers = runtimes;
        // Go's function names in a program that is not Go (a test or a
        // tool quoting them) are not Go's crypto.
        let go_file = file.section_by_name(".gopclntab").is_some()
            || file.section_by_name(".go.buildinfo").is_some()
            || file.sections().next().is_none();
        for m in search_markers(f, &marker_ranges(&file, len), shown_as)? {
            if m == GO_CRYPTO && !go_file {
                continue;
            }
            if !out.markers.contains(&m) {
                out.markers.push(m);
            }
        }
    }
    Ok(out)
}

/// Bytes of a Go function read to place its probes: the signing
/// functions are under 2 KiB.
const MAX_GO_FUNCTION: u64 = 16 << 10;

/// The file offset of virtual address `addr`, through the loaded
/// segments (checked: a hostile file's segments may wrap around).
fn file_offset(segments: &[(u64, u64, u64)], addr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|(a, size, _)| addr >= *a && addr - a < *size)
        .and_then(|(a, _, off)| (addr - a).checked_add(*off))
}

/// Adds the Go function `id` at `address` (`size` bytes), if its probes
/// can be placed.
fn add_go_point(
    out: &mut SigningCode,
    data: &ElfReader<'_>,
    segments: &[(u64, u64, u64)],
    id: u8,
    address: u64,
    size: u64,
) {
    let Some(offset) = file_offset(segments, address) else {
        return;
    };
    if size == 0 || size > MAX_GO_FUNCTION || out.points.iter().any(|p| p.id == id) {
        return;
    }
    let code = data.code_at(offset, size as usize);
    let Some(placement) = go::place(&code) else {
        tracing::debug!(function = function_name(id), "no return instruction found");
        return;
    };
    out.points.push(ProbePoint {
        id,
        stack: Stack::Go,
        symbol: function_name(id).to_owned(),
        offset,
        address,
        code: code[..code.len().min(CODE_PREFIX)].to_vec(),
        freed: None,
        go: Some(placement),
    });
}

/// The Go release recorded in the file's `.go.buildinfo`.
fn go_version<'a, R: ReadRef<'a>>(
    f: &File,
    file: &object::File<'a, R>,
    len: u64,
) -> Option<go::GoVersion> {
    let (offset, size) = file.section_by_name(".go.buildinfo")?.file_range()?;
    let n = size.min(64);
    if offset.checked_add(n)? > len {
        return None;
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact_at(&mut head, offset).ok()?;
    go::version_from_buildinfo(&head)
}

/// A stripped Go program: its signing functions from `.gopclntab`, which
/// the runtime needs and so no build drops.
#[allow(clippy::too_many_arguments)]
fn go_from_pclntab<'a, R: ReadRef<'a>>(
    f: &File,
    file: &object::File<'a, R>,
    data: &ElfReader<'_>,
    segments: &[(u64, u64, u64)],
    version: go::GoVersion,
    out: &mut SigningCode,
    signers: &mut Vec<&'static str>,
    shown_as: &str,
) -> Result<(), ScanError> {
    let Some((offset, size)) = file
        .section_by_name(".gopclntab")
        .and_then(|s| s.file_range())
    else {
        return Ok(()); // markers then say it is Go code not probed
    };
    let text = file.section_by_name(".text").map_or(0, |s| s.address());
    let probed: Vec<&go::GoSymbol> = go::GO_SYMBOLS
        .iter()
        .filter(|s| s.minors.contains(&version.minor))
        .collect();
    let names: Vec<&str> = probed
        .iter()
        .map(|s| s.name)
        .chain(go::signer_names())
        .collect();
    let found =
        go::pclntab_functions(f, offset, size, text, &names).map_err(|why| ScanError::Capped {
            path: shown_as.to_owned(),
            why,
        })?;
    for hit in found {
        let name = names[hit.wanted];
        if go::signer_names().any(|n| n == name) && !signers.contains(&name) {
            signers.push(name);
        }
        if let Some(s) = probed.iter().find(|s| s.name == name) {
            add_go_point(out, data, segments, s.id, hit.address, hit.size);
        }
    }
    Ok(())
}

/// Where the marker strings can be: the read-only data sections
/// (`.rodata`, where C file names and Rust panic locations go), or, in a
/// file without section headers, its loaded segments. `(offset, size)`,
/// within the first `len` bytes.
fn marker_ranges<'a, R: ReadRef<'a>>(file: &object::File<'a, R>, len: u64) -> Vec<(u64, u64)> {
    let clip = |(off, size): (u64, u64)| {
        let end = off.saturating_add(size).min(len);
        // Not `then_some`: `end - off` must not be computed when off >= end.
        if off < end {
            Some((off, end - off))
        } else {
            None
        }
    };
    if file.sections().next().is_none() {
        return file
            .segments()
            .filter_map(|s| clip(s.file_range()))
            .collect();
    }
    file.sections()
        .filter(|s| {
            matches!(
                s.kind(),
                SectionKind::ReadOnlyData | SectionKind::ReadOnlyString
            )
        })
        .filter_map(|s| s.file_range().and_then(clip))
        .collect()
}

/// Which `MARKERS` occur in `ranges` of the file, read `MARKER_CHUNK`
/// bytes at a time (each chunk keeps the end of the one before, so a
/// marker across two chunks is found).
fn search_markers(
    f: &File,
    ranges: &[(u64, u64)],
    shown_as: &str,
) -> Result<Vec<&'static str>, ScanError> {
    let total = ranges
        .iter()
        .fold(0u64, |sum, (_, size)| sum.saturating_add(*size));
    if total > MAX_MARKER_SEARCH {
        return Err(ScanError::Capped {
            path: shown_as.to_owned(),
            why: format!(
                "it has no signing function keywarden knows, and its {} of read-only data, \
                 more than the {} searched for signs of crypto code, were not searched",
                mib(total),
                mib(MAX_MARKER_SEARCH)
            ),
        });
    }
    let keep_max = MARKERS.iter().map(|(n, _)| n.len()).max().unwrap_or(1) - 1;
    let mut found = [false; MARKERS.len()];
    let mut buf = vec![0u8; MARKER_CHUNK + keep_max];
    for &(start, size) in ranges {
        let end = start + size;
        let (mut pos, mut kept) = (start, 0usize);
        while pos < end && !found.iter().all(|hit| *hit) {
            let want = (end - pos).min(MARKER_CHUNK as u64) as usize;
            f.read_exact_at(&mut buf[kept..kept + want], pos)
                .map_err(|source| ScanError::Read {
                    path: shown_as.to_owned(),
                    source,
                })?;
            let filled = kept + want;
            for (hit, (needle, _)) in found.iter_mut().zip(MARKERS.iter()) {
                *hit = *hit || memchr::memmem::find(&buf[..filled], needle).is_some();
            }
            pos += want as u64;
            kept = filled.min(keep_max);
            buf.copy_within(filled - kept..filled, 0);
        }
    }
    let mut out: Vec<&'static str> = Vec::new();
    for ((_, what), hit) in MARKERS.iter().zip(found) {
        if hit && !out.contains(what) {
            out.push(what);
        }
    }
    Ok(out)
}

/// Identity of a file's contents for the caches: a file is read again only
/// when one of these changes. The change time is in it because, unlike the
/// modification time, no user can set it back: rewriting a file and
/// restoring its mtime still gives a new identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// (seconds, nanoseconds); kept apart, as any user can set an mtime
    /// whose nanosecond count overflows an i64.
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileId {
    pub fn of(md: &std::fs::Metadata) -> FileId {
        FileId {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// Scan results per file (its `FileId`; the build-id is kept in the
/// result). A host execs the same binaries all day: each is read once,
/// and a replaced binary (new inode or mtime) is read again.
#[derive(Default)]
pub struct ScanCache {
    files: HashMap<FileId, Arc<SigningCode>>,
    /// Files skipped because a cap was hit, and why: a file too large to
    /// scan costs one lookup when it is run or loaded again.
    skipped: HashMap<FileId, String>,
    /// Files already reported as uncovered, so a stripped binary run in a
    /// loop gives one warning.
    reported: HashSet<FileId>,
    /// The same files by inode, for asking whether a process's mapping
    /// was reported (`was_reported`).
    reported_inodes: HashSet<(u64, u64)>,
    pub scans: u64,
}

/// Entries kept before the cache starts over (a host has a few thousand
/// distinct executables and libraries at most).
const CACHE_MAX: usize = 16_384;

impl ScanCache {
    /// The scan of the opened file `f`, whose `fstat` gave `id`.
    pub fn get_or_scan(
        &mut self,
        id: FileId,
        f: &File,
        shown_as: &str,
    ) -> Result<Arc<SigningCode>, ScanError> {
        if let Some(hit) = self.files.get(&id) {
            return Ok(hit.clone());
        }
        if let Some(why) = self.skipped.get(&id) {
            return Err(ScanError::Capped {
                path: shown_as.to_owned(),
                why: why.clone(),
            });
        }
        if self.files.len() + self.skipped.len() >= CACHE_MAX {
            self.files.clear();
            self.skipped.clear();
        }
        match scan_file(f, id, shown_as) {
            Ok(code) => {
                let code = Arc::new(code);
                self.scans += 1;
                self.files.insert(id, code.clone());
                Ok(code)
            }
            Err(ScanError::Capped { path, why }) => {
                self.skipped.insert(id, why.clone());
                Err(ScanError::Capped { path, why })
            }
            Err(e) => Err(e),
        }
    }

    /// True the first time a file is reported (bounded like the scans: a
    /// user who makes new files in a loop cannot grow it without end).
    pub fn first_report(&mut self, id: FileId) -> bool {
        if self.reported.len() >= CACHE_MAX {
            self.reported.clear();
            self.reported_inodes.clear();
        }
        self.reported_inodes.insert((id.dev, id.ino));
        self.reported.insert(id)
    }

    /// Whether the file with this inode was reported as uncovered.
    pub fn was_reported(&self, dev: u64, ino: u64) -> bool {
        self.reported_inodes.contains(&(dev, ino))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_libcrypto() -> std::path::PathBuf {
        for dir in [
            "/usr/lib/x86_64-linux-gnu",
            "/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
        ] {
            let p = Path::new(dir).join("libcrypto.so.3");
            if p.exists() {
                return p;
            }
        }
        panic!("libcrypto.so.3 not found; the test command installs openssl");
    }

    #[test]
    fn finds_versioned_exports_of_libcrypto() {
        let lib = system_libcrypto();
        let code = scan(&lib, "libcrypto").unwrap();
        let names: Vec<&str> = code.points.iter().map(|p| p.symbol.as_str()).collect();
        for name in c_symbols() {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(code.points.iter().all(|p| p.stack == Stack::Openssl));
        assert!(code.missing.is_empty());
        assert!(
            code.markers.is_empty(),
            "only looked for when nothing is found"
        );
        // The offset points into the file, where the bytes of code are.
        let len = std::fs::metadata(&lib).unwrap().len();
        assert!(code.points.iter().all(|p| p.offset > 0 && p.offset < len));
        // EVP_PKEY_free's free path is found, past the count's test.
        let freed = code
            .points
            .iter()
            .find_map(|p| p.freed)
            .expect("EVP_PKEY_free's free path");
        assert!(freed.offset > 0x10, "{freed:?}");
    }

    /// The TLS fixtures (built by the test command before unit tests run)
    /// carry AWS-LC and BoringSSL, whose EVP_PKEY_free calls
    /// CRYPTO_refcount_dec_and_test_zero; the object is then in a
    /// callee-saved register.
    #[test]
    fn finds_the_free_path_of_aws_lc_and_boringssl_keys() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tls-programs/target/release");
        for name in ["kw-rustls", "kw-boring"] {
            let path = dir.join(name);
            let code = scan(&path, name)
                .unwrap_or_else(|e| panic!("{name}: {e} (build the fixtures: cargo xtask test)"));
            let freed = code
                .points
                .iter()
                .find_map(|p| p.freed)
                .unwrap_or_else(|| panic!("{name}"));
            assert_eq!(freed.object_in, iced_x86::Register::RBX, "{name}");
        }
    }

    /// OpenSSH's own Ed25519 is code keywarden cannot probe: a program
    /// carrying it is named, with that reason.
    #[test]
    fn openssh_ed25519_is_named_as_unprobed() {
        let code = scan(Path::new("/usr/bin/ssh-keygen"), "ssh-keygen").unwrap();
        assert!(!code.can_see_signatures());
        assert_eq!(code.markers, [OPENSSH_ED25519]);
        let reason = code.uncovered_reason().unwrap();
        assert!(
            reason
                .starts_with("signs with code keywarden cannot probe (OpenSSH's built-in Ed25519)"),
            "{reason}"
        );
    }

    /// libgcrypt's one signing function is found under its version node,
    /// and the library is not called uncovered.
    #[test]
    fn finds_the_signing_function_of_libgcrypt() {
        let lib = system_libcrypto().parent().unwrap().join("libgcrypt.so.20");
        let code = scan(&lib, "libgcrypt").unwrap();
        let names: Vec<&str> = code.points.iter().map(|p| p.symbol.as_str()).collect();
        assert_eq!(names, ["gcry_pk_sign"]);
        assert!(code.points.iter().all(|p| p.stack == Stack::Libgcrypt));
        assert!(code.can_see_signatures() && code.markers.is_empty());
        assert_eq!(code.uncovered_reason(), None);
    }

    /// NSS's signing entry point is found under its version node; the
    /// library still exports `PK11_Sign` (which calls it), and is not
    /// called uncovered for it.
    #[test]
    fn finds_the_signing_function_of_nss() {
        let lib = system_libcrypto().parent().unwrap().join("libnss3.so");
        let code = scan(&lib, "libnss3").unwrap();
        let names: Vec<&str> = code.points.iter().map(|p| p.symbol.as_str()).collect();
        assert_eq!(names, ["PK11_SignWithMechanism"]);
        assert!(code.points.iter().all(|p| p.stack == Stack::Nss));
        assert!(code.can_see_signatures());
        assert_eq!(code.uncovered_reason(), None);
    }

    /// GnuTLS's signing entry points are found under their version nodes.
    #[test]
    fn finds_the_signing_functions_of_gnutls() {
        let lib = system_libcrypto().parent().unwrap().join("libgnutls.so.30");
        let code = scan(&lib, "libgnutls").unwrap();
        let mut names: Vec<&str> = code.points.iter().map(|p| p.symbol.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "gnutls_privkey_deinit",
                "gnutls_privkey_sign_data",
                "gnutls_privkey_sign_data2",
                "gnutls_privkey_sign_hash",
                "gnutls_privkey_sign_hash2"
            ]
        );
        assert!(code.points.iter().all(|p| p.stack == Stack::Gnutls));
        assert!(code.can_see_signatures() && code.missing.is_empty());
        assert!(code.uncovered_reason().is_none());
    }

    #[test]
    fn non_elf_input_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.so");
        std::fs::write(&p, b"not an elf").unwrap();
        let err = scan(&p, "x.so").unwrap_err();
        assert!(err.to_string().starts_with("x.so: not an ELF"), "{err}");
        let err = scan(&dir.path().join("missing"), "missing").unwrap_err();
        assert!(err.to_string().starts_with("missing: cannot read"), "{err}");
    }

    /// A private copy of the system libcrypto, to truncate or extend.
    fn libcrypto_copy(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("libcrypto.so.3");
        std::fs::copy(system_libcrypto(), &p).unwrap();
        p
    }

    /// A truncated library is an error, never a signal: cut before its
    /// section headers, inside its symbol table, or after its header.
    #[test]
    fn a_truncated_elf_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = libcrypto_copy(dir.path());
        let full = std::fs::metadata(&p).unwrap().len();
        for len in [full - 1, full / 2, 64 * 1024, 100, 0] {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len)
                .unwrap();
            let got = scan(&p, "cut");
            assert!(got.is_err(), "truncated to {len}: {got:?}");
        }
    }

    /// The attack: the file is opened at one size and cut before it is
    /// read (here deterministically, between `open` and `scan_file`).
    /// Reads past the new end fail, and the scan says the file changed.
    #[test]
    fn a_file_truncated_while_it_is_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = libcrypto_copy(dir.path());
        let (f, id) = open(&p, "cut").unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = scan_file(&f, id, "cut").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cut: cannot read: the file changed while it was read"),
            "{err}"
        );
        // Not cached: the file is read again once it is whole.
        std::fs::copy(system_libcrypto(), &p).unwrap();
        let mut cache = ScanCache::default();
        let (f, id) = open(&p, "whole").unwrap();
        assert!(
            cache
                .get_or_scan(id, &f, "whole")
                .unwrap()
                .can_see_signatures()
        );
    }

    /// A sparse copy extended past `MAX_FILE_SIZE` is skipped unread, with
    /// the reason, and the decision is cached; one just under the cap is
    /// scanned as usual without reading its hole.
    #[test]
    fn the_file_size_cap_skips_a_huge_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = libcrypto_copy(dir.path());
        let grow = |len: u64| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len)
                .unwrap()
        };
        grow(MAX_FILE_SIZE - 4096);
        let code = scan(&p, "big").unwrap();
        assert!(code.can_see_signatures());

        grow(MAX_FILE_SIZE + 1);
        let err = scan(&p, "huge").unwrap_err();
        assert!(matches!(err, ScanError::Capped { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "huge: not scanned: it is 513 MiB, more than the 512 MiB keywarden reads of an ELF file"
        );
        let mut cache = ScanCache::default();
        let (f, id) = open(&p, "huge").unwrap();
        for _ in 0..2 {
            let err = cache.get_or_scan(id, &f, "huge").unwrap_err();
            assert!(matches!(err, ScanError::Capped { .. }), "{err}");
        }
        assert_eq!(cache.skipped.len(), 1);
        assert_eq!(cache.scans, 0);
    }

    /// The marker search reads in chunks and still finds a marker that
    /// straddles two; more read-only data than `MAX_MARKER_SEARCH` is an
    /// error, decided before anything is read.
    #[test]
    fn markers_are_found_across_chunks_and_the_search_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        let mut bytes = vec![b'x'; 3 * MARKER_CHUNK];
        let needle = MARKERS[2].0;
        let at = MARKER_CHUNK - 3;
        bytes[at..at + needle.len()].copy_from_slice(needle);
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        let all = [(0, bytes.len() as u64)];
        assert_eq!(search_markers(&f, &all, "d").unwrap(), [MARKERS[2].1]);
        let after = [((at + 1) as u64, MARKER_CHUNK as u64)];
        assert!(search_markers(&f, &after, "d").unwrap().is_empty());
        let huge = [(0, MAX_MARKER_SEARCH), (0, 1)];
        let err = search_markers(&f, &huge, "d").unwrap_err();
        assert!(matches!(err, ScanError::Capped { .. }), "{err}");
    }

    /// A FIFO named like a library is refused at once, not opened to wait
    /// for a writer.
    #[test]
    fn a_fifo_is_not_scanned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("libcrypto.so.3");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = scan(&p, "fifo").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("fifo: cannot read: not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn unrelated_files_have_nothing_and_are_not_uncovered() {
        let code = scan(Path::new("/bin/ls"), "/bin/ls").unwrap();
        assert!(code.points.is_empty());
        assert!(code.uncovered_reason().is_none(), "{:?}", code.markers);
    }
}
