//! Does a captured signature verify under a candidate public key?
//!
//! This is how the sensor knows *exactly* which key signed: a signature that
//! verifies under a public key was made by its private key (up to a
//! forgery, which is the whole premise of the algorithm). Only public-key
//! operations run here.

use sha2::Digest;

use super::material::PublicKey;

/// What the probes captured about one signing operation.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub signature: &'a [u8],
    /// The data handed to the signing call: the message for
    /// EVP_DigestSign*/EVP_DigestSignFinal, the digest for EVP_PKEY_sign.
    /// `None` when it could not be captured whole.
    pub data: Option<&'a [u8]>,
    /// `data` is already a digest (EVP_PKEY_sign).
    pub data_is_digest: bool,
    /// The digest the caller named, if it named one (e.g. `SHA256`).
    pub digest_hint: Option<&'a str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    const ALL: [Hash; 5] = [
        Hash::Sha256,
        Hash::Sha384,
        Hash::Sha512,
        Hash::Sha1,
        Hash::Sha224,
    ];

    fn from_name(name: &str) -> Option<Hash> {
        let n: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_uppercase();
        Some(match n.as_str() {
            "SHA1" => Hash::Sha1,
            "SHA224" | "SHA2224" => Hash::Sha224,
            "SHA256" | "SHA2256" => Hash::Sha256,
            "SHA384" | "SHA2384" => Hash::Sha384,
            "SHA512" | "SHA2512" => Hash::Sha512,
            _ => return None,
        })
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha224 => 28,
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => sha1::Sha1::digest(data).to_vec(),
            Hash::Sha224 => sha2::Sha224::digest(data).to_vec(),
            Hash::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(data).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }

    /// The digest the caller named, when it names one this knows: the
    /// signing call hashed with exactly that one (`EVP_DigestSignInit`'s
    /// md), so no other is tried. Else each common one: each try is one
    /// verification, and a success proves the key whichever digest it was.
    fn candidates(hint: Option<&str>) -> Vec<Hash> {
        match hint.and_then(Hash::from_name) {
            Some(h) => vec![h],
            None => Hash::ALL.to_vec(),
        }
    }
}

/// The digests a verification could be over: hashes of the message, or the
/// captured digest itself.
fn prehashes(s: &Signed<'_>) -> Vec<(Option<Hash>, Vec<u8>)> {
    let Some(data) = s.data else {
        return Vec::new();
    };
    if s.data_is_digest {
        let h = Hash::ALL.iter().copied().find(|h| h.len() == data.len());
        return vec![(h, data.to_vec())];
    }
    Hash::candidates(s.digest_hint)
        .into_iter()
        .map(|h| (Some(h), h.digest(data)))
        .collect()
}

/// The digests an ECDSA public-key recovery is tried over (`recover`): the
/// captured digest; else the message hashed with the digest the caller
/// named; else with each common digest. A wrong digest costs one more
/// recovery and only gives points no other signature agrees on.
pub(super) fn recovery_prehashes(s: &Signed<'_>) -> Vec<Vec<u8>> {
    let Some(data) = s.data else {
        return Vec::new();
    };
    if s.data_is_digest {
        return vec![data.to_vec()];
    }
    match s.digest_hint.and_then(Hash::from_name) {
        Some(h) => vec![h.digest(data)],
        None => Hash::ALL.iter().map(|h| h.digest(data)).collect(),
    }
}

/// ECDSA over a prehash; the DER signature is what OpenSSL produces.
/// A digest shorter than the field (SHA-1 on P-384) is left-padded: ECDSA
/// reads it as an integer, and the crate wants at least half a field.
macro_rules! ecdsa_verify {
    ($curve:ident, $field_len:expr, $key:expr, $v:expr) => {{
        use $curve::ecdsa::signature::hazmat::PrehashVerifier;
        match $curve::ecdsa::Signature::from_der($v.s.signature) {
            Ok(sig) => $v.prehashes().iter().any(|(_, d)| {
                let mut padded = vec![0u8; ($field_len as usize).saturating_sub(d.len())];
                padded.extend_from_slice(d);
                $key.verify_prehash(&padded, &sig).is_ok()
            }),
            Err(_) => false,
        }
    }};
}

/// One signature checked against many keys (every candidate of a
/// process, or the host's whole inventory): its digests are computed once,
/// on the first key that needs them, not once per key.
pub struct Verifier<'s, 'a> {
    s: &'s Signed<'a>,
    prehashes: std::cell::OnceCell<Vec<(Option<Hash>, Vec<u8>)>>,
}

impl<'s, 'a> Verifier<'s, 'a> {
    pub fn new(s: &'s Signed<'a>) -> Self {
        Verifier {
            s,
            prehashes: std::cell::OnceCell::new(),
        }
    }

    fn prehashes(&self) -> &[(Option<Hash>, Vec<u8>)] {
        self.prehashes.get_or_init(|| prehashes(self.s))
    }

    /// Whether the signature verifies under `key` over the captured data.
    pub fn verifies(&self, key: &PublicKey) -> bool {
        let s = self.s;
        match key {
            PublicKey::Ed25519(k) => {
                // PureEdDSA signs the message itself, so it must be whole.
                let (Some(msg), false) = (s.data, s.data_is_digest) else {
                    return false;
                };
                let Ok(sig) = ed25519_dalek::Signature::from_slice(s.signature) else {
                    return false;
                };
                k.verify_strict(msg, &sig).is_ok()
            }
            PublicKey::P256(k) => ecdsa_verify!(p256, 32, k, self),
            PublicKey::P384(k) => ecdsa_verify!(p384, 48, k, self),
            PublicKey::P521(k) => ecdsa_verify!(p521, 66, k, self),
            PublicKey::Rsa(k) => rsa_verify(k, self),
        }
    }
}

/// Whether `s` verifies under `key` (`Verifier` checks one signature
/// against many keys).
pub fn verifies(key: &PublicKey, s: &Signed<'_>) -> bool {
    Verifier::new(s).verifies(key)
}

fn rsa_verify(k: &rsa::RsaPublicKey, v: &Verifier<'_, '_>) -> bool {
    use rsa::traits::PublicKeyParts;
    use rsa::{Pkcs1v15Sign, Pss};
    let s = v.s;
    if s.signature.len() != k.size() {
        return false;
    }
    for (hash, digest) in v.prehashes() {
        let (hash, digest) = (*hash, digest.as_slice());
        let pkcs1 = match hash {
            Some(Hash::Sha1) => Pkcs1v15Sign::new::<sha1::Sha1>(),
            Some(Hash::Sha224) => Pkcs1v15Sign::new::<sha2::Sha224>(),
            Some(Hash::Sha256) => Pkcs1v15Sign::new::<sha2::Sha256>(),
            Some(Hash::Sha384) => Pkcs1v15Sign::new::<sha2::Sha384>(),
            Some(Hash::Sha512) => Pkcs1v15Sign::new::<sha2::Sha512>(),
            None => Pkcs1v15Sign::new_unprefixed(),
        };
        if k.verify(pkcs1, digest, s.signature).is_ok() {
            return true;
        }
        // A raw EVP_PKEY_sign input (e.g. TLS 1.1's MD5+SHA1) signs unprefixed.
        if s.data_is_digest
            && k.verify(Pkcs1v15Sign::new_unprefixed(), digest, s.signature)
                .is_ok()
        {
            return true;
        }
        let Some(hash) = hash else { continue };
        // PSS: OpenSSL signs with salt = digest length (TLS) or the maximum
        // (its EVP default); rsa's verifier wants the exact length.
        let em_len = (k.n().bits() - 1).div_ceil(8);
        let max_salt = em_len.saturating_sub(hash.len() + 2);
        for salt in [hash.len(), max_salt, 0] {
            let pss = match hash {
                Hash::Sha1 => Pss::new_with_salt::<sha1::Sha1>(salt),
                Hash::Sha224 => Pss::new_with_salt::<sha2::Sha224>(salt),
                Hash::Sha256 => Pss::new_with_salt::<sha2::Sha256>(salt),
                Hash::Sha384 => Pss::new_with_salt::<sha2::Sha384>(salt),
                Hash::Sha512 => Pss::new_with_salt::<sha2::Sha512>(salt),
            };
            if k.verify(pss, digest, s.signature).is_ok() {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::material::{read_key_file, tests::openssl_key};
    use std::process::Command;

    fn sign(key: &std::path::Path, dir: &std::path::Path, args: &[&str], msg: &[u8]) -> Vec<u8> {
        let m = dir.join("msg");
        let sig = dir.join("sig");
        std::fs::write(&m, msg).unwrap();
        let st = Command::new("openssl")
            .args(args)
            .arg("-inkey")
            .arg(key)
            .arg("-in")
            .arg(&m)
            .arg("-out")
            .arg(&sig)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::fs::read(sig).unwrap()
    }

    #[test]
    fn openssl_signatures_verify_under_their_own_key_only() {
        let msg = b"keywarden test message";
        let digest = sha2::Sha256::digest(msg).to_vec();
        let (d1, ec, _) = openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let (d2, rsa, _) = openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
        let (d3, ed, _) = openssl_key(&["-algorithm", "ED25519"]);
        let keys: Vec<_> = [&ec, &rsa, &ed]
            .iter()
            .map(|p| read_key_file(p, "k").unwrap().remove(0))
            .collect();

        // pkeyutl signs a digest (EVP_PKEY_sign): data is the digest.
        let dfile = d1.path().join("digest");
        std::fs::write(&dfile, &digest).unwrap();
        for (i, (dir, key, extra)) in [
            (&d1, &ec, &[][..]),
            (&d2, &rsa, &["-pkeyopt", "digest:sha256"][..]),
            (
                &d2,
                &rsa,
                &[
                    "-pkeyopt",
                    "digest:sha256",
                    "-pkeyopt",
                    "rsa_padding_mode:pss",
                ][..],
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let mut args = vec!["pkeyutl", "-sign"];
            args.extend_from_slice(extra);
            let sig = sign(key, dir.path(), &args, &digest);
            let s = Signed {
                signature: &sig,
                data: Some(&digest),
                data_is_digest: true,
                digest_hint: None,
            };
            let owner = if i == 0 { 0 } else { 1 };
            for (j, k) in keys.iter().enumerate() {
                assert_eq!(verifies(&k.public, &s), j == owner, "case {i} key {j}");
            }
        }

        // Ed25519 signs the message itself (one-shot EVP_DigestSign).
        let sig = sign(&ed, d3.path(), &["pkeyutl", "-sign", "-rawin"], msg);
        let s = Signed {
            signature: &sig,
            data: Some(msg),
            data_is_digest: false,
            digest_hint: None,
        };
        assert!(verifies(&keys[2].public, &s));
        assert!(!verifies(&keys[0].public, &s));
        let s = Signed {
            data: Some(b"other message"),
            ..s
        };
        assert!(!verifies(&keys[2].public, &s));
        let s = Signed { data: None, ..s };
        assert!(!verifies(&keys[2].public, &s), "no data, no verification");
    }

    #[test]
    fn message_signatures_try_digest_candidates() {
        let (d, ec, _) = openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
        let key = read_key_file(&ec, "k").unwrap().remove(0);
        let msg = b"streamed through EVP_DigestSignUpdate";
        let m = d.path().join("m");
        let sig = d.path().join("s");
        std::fs::write(&m, msg).unwrap();
        for md in ["-sha384", "-sha512", "-sha1"] {
            let st = Command::new("openssl")
                .args(["dgst", md, "-sign"])
                .arg(&ec)
                .arg("-out")
                .arg(&sig)
                .arg(&m)
                .output()
                .unwrap();
            assert!(st.status.success());
            let sig = std::fs::read(&sig).unwrap();
            let s = Signed {
                signature: &sig,
                data: Some(msg),
                data_is_digest: false,
                digest_hint: None,
            };
            assert!(verifies(&key.public, &s), "{md}");
            let s = Signed {
                data: Some(b"tampered"),
                ..s
            };
            assert!(!verifies(&key.public, &s), "{md}");
        }
    }

    #[test]
    fn digest_names_are_normalized() {
        assert_eq!(Hash::from_name("SHA2-256"), Some(Hash::Sha256));
        assert_eq!(Hash::from_name("sha256"), Some(Hash::Sha256));
        assert_eq!(Hash::from_name("SHA-512"), Some(Hash::Sha512));
        assert_eq!(Hash::from_name("md5"), None);
        assert_eq!(Hash::candidates(Some("SHA384"))[0], Hash::Sha384);
        assert_eq!(Hash::candidates(None).len(), 5);
    }
}
