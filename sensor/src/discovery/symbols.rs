//! How a symbol names a probed function.
//!
//! `func::FUNCTIONS` (in the shared crate) says what each probed function
//! does, for the kernel and the sensor alike; this module says how to find
//! it in a file: an exact C name (also under AWS-LC's version prefix), a
//! Rust trait method, or a Rust path, matched after demangling (legacy
//! `_ZN…17h<hash>E` and v0 `_R…`), because the hash changes with every
//! build and only the path is stable.

use keywarden_probe_types::func;

/// The library family a probed function belongs to; events name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stack {
    Openssl,
    Boringssl,
    AwsLc,
    Rustls,
    Ring,
    Gnutls,
    Nss,
    Go,
    Libgcrypt,
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
            Stack::Gnutls => "gnutls",
            Stack::Nss => "nss",
            Stack::Go => "go",
            Stack::Libgcrypt => "libgcrypt",
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
    /// A C function of a library outside the OpenSSL family, by its
    /// exact name (GnuTLS, NSS and libgcrypt export their APIs under version nodes,
    /// which the `object` crate keeps apart from the name).
    Exported(&'static str, Stack),
}

impl Pattern {
    /// The crate a Rust pattern lives in: its name appears verbatim in
    /// both manglings (`$LT$rustls..` or `6rustls`), a cheap filter
    /// before demangling.
    fn rust_crate(&self) -> Option<&'static str> {
        let path = match self {
            Pattern::C(_) | Pattern::Exported(..) => return None,
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
pub const SYMBOLS: [Symbol; 23] = [
    c("EVP_DigestSignInit", func::DIGEST_SIGN_INIT),
    c("EVP_DigestSignInit_ex", func::DIGEST_SIGN_INIT_EX),
    c("EVP_DigestSignUpdate", func::DIGEST_SIGN_UPDATE),
    c("EVP_DigestSign", func::DIGEST_SIGN),
    c("EVP_DigestSignFinal", func::DIGEST_SIGN_FINAL),
    c("EVP_PKEY_sign", func::PKEY_SIGN),
    c("EVP_PKEY_free", func::PKEY_FREE),
    c("EVP_PKEY_sign_init", func::PKEY_SIGN_INIT),
    c("EVP_PKEY_sign_init_ex", func::PKEY_SIGN_INIT),
    c("ECDSA_do_sign", func::ECDSA_DO_SIGN),
    c("ECDSA_sign", func::ECDSA_SIGN),
    c("RSA_sign", func::RSA_SIGN),
    c("RSA_private_encrypt", func::RSA_PRIVATE_ENCRYPT),
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
    gnutls("gnutls_privkey_sign_data2", func::GNUTLS_SIGN_DATA2),
    gnutls("gnutls_privkey_sign_hash2", func::GNUTLS_SIGN_HASH2),
    gnutls("gnutls_privkey_sign_data", func::GNUTLS_SIGN_DATA),
    gnutls("gnutls_privkey_sign_hash", func::GNUTLS_SIGN_HASH),
    gnutls("gnutls_privkey_deinit", func::GNUTLS_PRIVKEY_DEINIT),
    Symbol {
        pattern: Pattern::Exported("PK11_SignWithMechanism", Stack::Nss),
        id: func::NSS_SIGN_WITH_MECHANISM,
    },
    Symbol {
        pattern: Pattern::Exported("gcry_pk_sign", Stack::Libgcrypt),
        id: func::GCRY_PK_SIGN,
    },
];

const fn gnutls(name: &'static str, id: u8) -> Symbol {
    Symbol {
        pattern: Pattern::Exported(name, Stack::Gnutls),
        id,
    }
}

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
            Pattern::C(name) | Pattern::Exported(name, _) => name.to_owned(),
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
pub(super) fn classify(raw: &str) -> Option<(u8, Stack, String)> {
    let c_name = |name: &str| {
        SYMBOLS
            .iter()
            .find(|s| matches!(s.pattern, Pattern::C(n) if n == name))
            .map(|s| s.id)
    };
    if let Some(id) = c_name(raw) {
        return Some((id, Stack::Openssl, raw.to_owned()));
    }
    if let Some((id, stack)) = SYMBOLS.iter().find_map(|s| match s.pattern {
        Pattern::Exported(name, stack) if name == raw => Some((s.id, stack)),
        _ => None,
    }) {
        return Some((id, stack, raw.to_owned()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_function_has_a_symbol_and_every_symbol_a_function() {
        for f in &func::FUNCTIONS {
            let found = SYMBOLS.iter().any(|s| s.id == f.id)
                || super::super::go::GO_SYMBOLS.iter().any(|s| s.id == f.id);
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
}
