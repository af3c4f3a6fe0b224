//! Finds functions in an ELF file and turns their addresses into the file
//! offsets uprobes attach to.
//!
//! Both `.dynsym` and `.symtab` are read: a shared libcrypto exports its API
//! in `.dynsym` (names carry a version like `@@OPENSSL_3.0.0`, which the
//! `object` crate keeps apart from the name), while static builds keep
//! local symbols only in `.symtab`.

use std::path::Path;

use hashbrown::HashMap;
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not an ELF file keywarden can parse: {source}")]
    Parse { path: String, source: object::Error },
}

/// Bytes of each function kept for instruction decoding.
pub const CODE_PREFIX: usize = 64;

/// What one ELF file holds, for the names asked about.
#[derive(Debug, Default)]
pub struct ElfSymbols {
    /// name -> file offset of the function's first instruction.
    pub offsets: HashMap<String, u64>,
    /// name -> the function's first bytes (up to `CODE_PREFIX`), for probe
    /// placement.
    pub code: HashMap<String, Vec<u8>>,
    /// The file has no `.symtab` and no `.dynsym` entries at all.
    pub stripped: bool,
    /// GNU build-id as hex, when the file has one.
    pub build_id: Option<String>,
}

/// Looks up `wanted` function names. Names not present are simply absent
/// from the result; the caller decides what a missing name means.
pub fn resolve(path: &Path, shown_as: &str, wanted: &[&str]) -> Result<ElfSymbols, SymbolError> {
    let data = std::fs::read(path).map_err(|source| SymbolError::Read {
        path: shown_as.to_owned(),
        source,
    })?;
    let file = object::File::parse(&*data).map_err(|source| SymbolError::Parse {
        path: shown_as.to_owned(),
        source,
    })?;
    let mut out = ElfSymbols {
        build_id: file.build_id().ok().flatten().map(hex::encode),
        ..Default::default()
    };
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .filter_map(|s| {
            let (off, size) = s.file_range();
            (size > 0).then_some((s.address(), size, off))
        })
        .collect();
    let mut any = false;
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        any = true;
        if sym.kind() != SymbolKind::Text || !sym.is_definition() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if !wanted.contains(&name) || out.offsets.contains_key(name) {
            continue;
        }
        let addr = sym.address();
        if let Some((seg_addr, _, seg_off)) = segments
            .iter()
            .find(|(a, size, _)| addr >= *a && addr < a + size)
        {
            let off = addr - seg_addr + seg_off;
            let len = (sym.size().max(1) as usize).min(CODE_PREFIX);
            if let Some(code) = data.get(off as usize..(off as usize + len).min(data.len())) {
                out.code.insert(name.to_owned(), code.to_vec());
            }
            out.offsets.insert(name.to_owned(), off);
        }
    }
    out.stripped = !any;
    Ok(out)
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
        let syms = resolve(
            &lib,
            "libcrypto",
            &["EVP_DigestSign", "EVP_PKEY_sign", "no_such_fn"],
        )
        .unwrap();
        assert!(syms.offsets.contains_key("EVP_DigestSign"));
        assert!(syms.offsets.contains_key("EVP_PKEY_sign"));
        assert!(!syms.offsets.contains_key("no_such_fn"));
        assert!(!syms.stripped);
        // The offset points into the file, where the bytes of code are.
        let len = std::fs::metadata(&lib).unwrap().len();
        assert!(syms.offsets.values().all(|&o| o > 0 && o < len));
    }

    #[test]
    fn non_elf_input_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.so");
        std::fs::write(&p, b"not an elf").unwrap();
        let err = resolve(&p, "x.so", &["f"]).unwrap_err();
        assert!(err.to_string().starts_with("x.so: not an ELF"), "{err}");
        let err = resolve(&dir.path().join("missing"), "missing", &["f"]).unwrap_err();
        assert!(err.to_string().starts_with("missing: cannot read"), "{err}");
    }
}
