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

use std::{os::unix::fs::MetadataExt, path::Path, sync::Arc};

use hashbrown::{HashMap, HashSet};
use keywarden_probe_types::func;
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use super::placement;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not an ELF file keywarden can parse: {source}")]
    Parse { path: String, source: object::Error },
}

/// Bytes of each function kept for instruction decoding.
pub const CODE_PREFIX: usize = 128;

/// The library family a probed function belongs to; events name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stack {
    Openssl,
    Boringssl,
    AwsLc,
    Rustls,
    Ring,
}

impl Stack {
    /// A stack with the OpenSSL-style C API.
    pub fn is_c(self) -> bool {
        matches!(self, Stack::Openssl | Stack::Boringssl | Stack::AwsLc)
    }

    pub fn name(self) -> &'static str {
        match self {
            Stack::Openssl => "openssl",
            Stack::Boringssl => "boringssl",
            Stack::AwsLc => "aws-lc",
            Stack::Rustls => "rustls",
            Stack::Ring => "ring",
        }
    }
}

/// How a symbol names a probed function (`func::FUNCTIONS` says what
/// the function does; this says how to find it in a file).
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// A C function, by its exact name, also under AWS-LC's version
    /// prefix. The stack is told apart by the prefix (and BoringSSL by
    /// its own markers).
    C(&'static str),
    /// Any implementation of a Rust trait method: the demangled path
    /// ends with this (`<T as Trait>::method`), so it also covers
    /// implementations outside the crate (an HSM or KMS signer).
    TraitMethod(&'static str, Stack),
    /// One Rust function, by its demangled path without the hash.
    Path(&'static str, Stack),
}

impl Pattern {
    /// The crate a Rust pattern lives in: its name appears verbatim in
    /// both manglings (`$LT$rustls..` or `6rustls`), a cheap filter
    /// before demangling.
    fn rust_crate(&self) -> Option<&'static str> {
        let path = match self {
            Pattern::C(_) => return None,
            Pattern::TraitMethod(p, _) => p.trim_start_matches(" as "),
            Pattern::Path(p, _) => p,
        };
        path.split("::").next()
    }
}

/// A symbol pattern and the function id it finds.
#[derive(Clone, Copy, Debug)]
pub struct Symbol {
    pub pattern: Pattern,
    pub id: u8,
}

const fn c(name: &'static str, id: u8) -> Symbol {
    Symbol {
        pattern: Pattern::C(name),
        id,
    }
}

/// Every symbol the sensor attaches to. OpenSSL 1.1 and 3.x, BoringSSL
/// and AWS-LC share the C names and argument orders (BoringSSL and
/// AWS-LC lack the `_ex` variants).
pub const SYMBOLS: [Symbol; 12] = [
    c("EVP_DigestSignInit", func::DIGEST_SIGN_INIT),
    c("EVP_DigestSignInit_ex", func::DIGEST_SIGN_INIT_EX),
    c("EVP_DigestSignUpdate", func::DIGEST_SIGN_UPDATE),
    c("EVP_DigestSign", func::DIGEST_SIGN),
    c("EVP_DigestSignFinal", func::DIGEST_SIGN_FINAL),
    c("EVP_PKEY_sign", func::PKEY_SIGN),
    c("EVP_PKEY_free", func::PKEY_FREE),
    c("EVP_PKEY_sign_init", func::PKEY_SIGN_INIT),
    c("EVP_PKEY_sign_init_ex", func::PKEY_SIGN_INIT),
    Symbol {
        pattern: Pattern::TraitMethod(" as rustls::crypto::signer::Signer>::sign", Stack::Rustls),
        id: func::RUST_SIGNER_SIGN,
    },
    Symbol {
        pattern: Pattern::Path(
            "ring::ec::suite_b::ecdsa::signing::EcdsaKeyPair::sign",
            Stack::Ring,
        ),
        id: func::RING_ECDSA_SIGN,
    },
    Symbol {
        pattern: Pattern::Path(
            "ring::ec::curve25519::ed25519::signing::Ed25519KeyPair::sign",
            Stack::Ring,
        ),
        id: func::RING_ED25519_SIGN,
    },
];

/// The C names in [`SYMBOLS`].
pub fn c_symbols() -> impl Iterator<Item = &'static str> {
    SYMBOLS.iter().filter_map(|s| match s.pattern {
        Pattern::C(name) => Some(name),
        _ => None,
    })
}

/// The signing functions, as a reader would look for them (for messages
/// about files where none was found).
pub fn signing_functions() -> String {
    SYMBOLS
        .iter()
        .filter(|s| needs_return(s.id))
        .map(|s| match s.pattern {
            Pattern::C(name) => name.to_owned(),
            Pattern::TraitMethod(suffix, _) => format!("<_{suffix}"),
            Pattern::Path(path, _) => path.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The name an event gives a function id.
pub fn function_name(id: u8) -> &'static str {
    func::describe(id).map_or("unknown", |f| f.name)
}

/// Whether the function needs a return probe (it produces the signature).
pub fn needs_return(id: u8) -> bool {
    func::sign_call(id).is_some()
}

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

    /// Why this file's signatures cannot be seen, when it evidently holds
    /// crypto code but no signing function was found.
    pub fn uncovered_reason(&self) -> Option<String> {
        if self.can_see_signatures() || self.markers.is_empty() {
            return None;
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
/// paths for panics. Each names code that signs, not a mere mention (a
/// libcurl version string says "OpenSSL" too).
const MARKERS: [(&[u8], &str); 5] = [
    (b"crypto/evp/m_sigver.c", "OpenSSL EVP signing"),
    (b"crypto/fipsmodule/ecdsa/", "BoringSSL or AWS-LC ECDSA"),
    (b"/rustls-0.", "rustls"),
    (b"/ring-0.17", "ring"),
    (b"/aws-lc-rs-", "aws-lc-rs"),
];

/// `aws_lc_0_47_0_EVP_DigestSign` -> `EVP_DigestSign`.
fn strip_aws_lc_prefix(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("aws_lc_")?;
    let mut parts = rest.splitn(4, '_');
    for _ in 0..3 {
        let n = parts.next()?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    parts.next()
}

/// Which probe point a raw symbol name is, if any.
fn classify(raw: &str) -> Option<(u8, Stack, String)> {
    let c_name = |name: &str| {
        SYMBOLS
            .iter()
            .find(|s| matches!(s.pattern, Pattern::C(n) if n == name))
            .map(|s| s.id)
    };
    if let Some(id) = c_name(raw) {
        return Some((id, Stack::Openssl, raw.to_owned()));
    }
    if let Some(name) = strip_aws_lc_prefix(raw)
        && let Some(id) = c_name(name)
    {
        return Some((id, Stack::AwsLc, name.to_owned()));
    }
    if !(raw.starts_with("_ZN") || raw.starts_with("_R"))
        || !SYMBOLS
            .iter()
            .filter_map(|s| s.pattern.rust_crate())
            .any(|krate| raw.contains(krate))
    {
        return None;
    }
    let demangled = format!("{:#}", rustc_demangle::try_demangle(raw).ok()?);
    // An inherent method demangles as `Type::method` from legacy names and
    // `<Type>::method` from v0 names.
    let plain = match demangled
        .strip_prefix('<')
        .and_then(|r| r.split_once(">::"))
    {
        Some((ty, method)) if !ty.contains(" as ") => Some(format!("{ty}::{method}")),
        _ => None,
    };
    SYMBOLS.iter().find_map(|s| match s.pattern {
        Pattern::TraitMethod(suffix, stack)
            if demangled.starts_with('<') && demangled.ends_with(suffix) =>
        {
            Some((s.id, stack, demangled.clone()))
        }
        Pattern::Path(path, stack) if plain.as_deref().unwrap_or(&demangled) == path => {
            Some((s.id, stack, path.to_owned()))
        }
        _ => None,
    })
}

/// Reads the ELF file at `path` (shown in messages as `shown_as`).
pub fn scan(path: &Path, shown_as: &str) -> Result<SigningCode, ScanError> {
    let read_err = |source| ScanError::Read {
        path: shown_as.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    // SAFETY: the map is read-only and private; a file truncated while
    // mapped could fault, which is why only regular files are passed here
    // and the map lives only for this call.
    let data = unsafe { memmap2::Mmap::map(&f) }.map_err(read_err)?;
    let file = object::File::parse(&*data).map_err(|source| ScanError::Parse {
        path: shown_as.to_owned(),
        source,
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
    let mut boringssl = false;
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
        let Some((id, stack, symbol)) = classify(raw) else {
            continue;
        };
        let addr = sym.address();
        let Some((seg_addr, _, seg_off)) = segments
            .iter()
            .find(|(a, size, _)| addr >= *a && addr < a + size)
        else {
            continue;
        };
        let offset = addr - seg_addr + seg_off;
        // The same function in .dynsym and .symtab, or aliases.
        if !seen.insert((id, offset)) {
            continue;
        }
        let len = (sym.size().max(1) as usize).min(CODE_PREFIX);
        let code = data
            .get(offset as usize..(offset as usize + len).min(data.len()))
            .unwrap_or_default()
            .to_vec();
        out.points.push(ProbePoint {
            id,
            stack,
            symbol,
            offset,
            address: addr,
            code,
            freed: None,
        });
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
        out.markers = MARKERS
            .iter()
            .filter(|(needle, _)| memchr::memmem::find(&data, needle).is_some())
            .map(|(_, what)| *what)
            .collect();
    }
    Ok(out)
}

/// Identity of a file's contents for the cache: an ELF file is rescanned
/// only when one of these changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i64,
    pub size: u64,
}

impl FileId {
    pub fn of(md: &std::fs::Metadata) -> FileId {
        FileId {
            dev: md.dev(),
            ino: md.ino(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            size: md.size(),
        }
    }
}

/// Scan results per file (device, inode, mtime, size; the build-id is kept
/// in the result). A host execs the same binaries all day: each is read
/// once, and a replaced binary (new inode or mtime) is read again.
#[derive(Default)]
pub struct ScanCache {
    files: HashMap<FileId, Arc<SigningCode>>,
    /// Files already reported as uncovered, so a stripped binary run in a
    /// loop gives one warning.
    reported: HashSet<FileId>,
    pub scans: u64,
}

/// Entries kept before the cache starts over (a host has a few thousand
/// distinct executables and libraries at most).
const CACHE_MAX: usize = 16_384;

impl ScanCache {
    pub fn get_or_scan(
        &mut self,
        id: FileId,
        path: &Path,
        shown_as: &str,
    ) -> Result<Arc<SigningCode>, ScanError> {
        if let Some(hit) = self.files.get(&id) {
            return Ok(hit.clone());
        }
        let code = Arc::new(scan(path, shown_as)?);
        self.scans += 1;
        if self.files.len() >= CACHE_MAX {
            self.files.clear();
        }
        self.files.insert(id, code.clone());
        Ok(code)
    }

    /// True the first time a file is reported.
    pub fn first_report(&mut self, id: FileId) -> bool {
        self.reported.insert(id)
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

    #[test]
    fn every_function_has_a_symbol_and_every_symbol_a_function() {
        for f in &func::FUNCTIONS {
            let found = SYMBOLS.iter().any(|s| s.id == f.id);
            // `Freed` is placed inside the free function the sensor found.
            assert_eq!(found, f.role != func::Role::Freed, "{f:?}");
        }
        for s in &SYMBOLS {
            assert!(func::describe(s.id).is_some(), "{s:?}");
        }
        assert!(signing_functions().contains("EVP_DigestSignFinal"));
        assert_eq!(function_name(func::PKEY_SIGN), "EVP_PKEY_sign");
        assert_eq!(function_name(0), "unknown");
    }

    #[test]
    fn names_of_every_stack_are_recognised() {
        assert_eq!(
            strip_aws_lc_prefix("aws_lc_0_47_0_EVP_DigestSign"),
            Some("EVP_DigestSign")
        );
        assert_eq!(strip_aws_lc_prefix("aws_lc_x_1_2_EVP_DigestSign"), None);
        assert_eq!(strip_aws_lc_prefix("aws_lc_rs_thing"), None);
        let (id, stack, _) = classify("aws_lc_0_47_0_EVP_PKEY_sign").unwrap();
        assert_eq!((id, stack), (func::PKEY_SIGN, Stack::AwsLc));
        // Legacy mangling, as rustc emits it for rustls 0.23 (the hash
        // changes per build).
        let legacy = "_ZN90_$LT$rustls..crypto..ring..sign..EcdsaSigner$u20$as$u20$rustls..crypto..signer..Signer$GT$4sign17h0123456789abcdefE";
        let (id, stack, name) = classify(legacy).unwrap();
        assert_eq!((id, stack), (func::RUST_SIGNER_SIGN, Stack::Rustls));
        assert_eq!(
            name,
            "<rustls::crypto::ring::sign::EcdsaSigner as rustls::crypto::signer::Signer>::sign"
        );
        // v0 mangling of the same impl (crate disambiguators are hidden in
        // the alternate form).
        let v0 = "_RNvXNtNtNtCs5KWBQ7Jsx4m_6rustls6crypto4ring4signNtB2_11EcdsaSignerNtNtB6_6signer6Signer4sign";
        let (id, _, name) = classify(v0).unwrap();
        assert_eq!(id, func::RUST_SIGNER_SIGN, "{name}");
        let ring = "_ZN4ring2ec7suite_b5ecdsa7signing12EcdsaKeyPair4sign17hfedcba9876543210E";
        assert_eq!(classify(ring).unwrap().0, func::RING_ECDSA_SIGN);
        // The same method in v0 (rustc 1.99's default), which demangles as
        // `<ring::…::EcdsaKeyPair>::sign`.
        let ring_v0 =
            "_RNvMs1_NtNtNtNtCs9sBilay3yjM_4ring2ec7suite_b5ecdsa7signingNtB5_12EcdsaKeyPair4sign";
        let (id, _, name) = classify(ring_v0).unwrap();
        assert_eq!(id, func::RING_ECDSA_SIGN);
        assert_eq!(name, function_name(func::RING_ECDSA_SIGN));
        // Near misses stay out: closures, other methods, other traits.
        assert!(
            classify("_ZN4ring2ec7suite_b5ecdsa7signing12EcdsaKeyPair3new17hfedcba9876543210E")
                .is_none()
        );
        assert!(classify("EVP_DigestSignInit_exx").is_none());
        assert!(classify("memcpy").is_none());
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

    #[test]
    fn unrelated_files_have_nothing_and_are_not_uncovered() {
        let code = scan(Path::new("/bin/ls"), "/bin/ls").unwrap();
        assert!(code.points.is_empty());
        assert!(code.uncovered_reason().is_none(), "{:?}", code.markers);
    }
}
