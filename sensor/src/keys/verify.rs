//! Does a captured signature verify under a candidate public key?
//!
//! This is how the sensor knows *exactly* which key signed: a signature that
//! verifies under a public key was made by its private key (up to a
//! forgery, which is the whole premise of the algorithm). Only public-key
//! operations run here.

use sha2::Digest;

use super::{
    material::{KeyInfo, PublicKey},
    recover::{self, Curve},
};

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

/// ECDSA over a prehash; the DER signature is what OpenSSL produces.
/// A digest shorter than the field (SHA-1 on P-384) is left-padded: ECDSA
/// reads it as an integer, and the crate wants at least half a field.
macro_rules! ecdsa_verify {
    ($curve:ident, $field_len:expr, $key:expr, $v:expr) => {{
        use $curve::ecdsa::signature::hazmat::PrehashVerifier;
        match $curve::ecdsa::Signature::from_der($v.s.signature) {
            Ok(sig) => {
                $v.count()
                    && $v.prehashes().iter().any(|(_, d)| {
                        let mut padded = vec![0u8; ($field_len as usize).saturating_sub(d.len())];
                        padded.extend_from_slice(d);
                        $key.verify_prehash(&padded, &sig).is_ok()
                    })
            }
            Err(_) => false,
        }
    }};
}

/// Direct ECDSA verifications of one signature, per curve, before the
/// rest of that curve's keys are answered by recovery: recovering its
/// possible keys costs about four verifications per digest (two nonce
/// points, each a multiplication and the crate's own check), after which
/// every further key of that curve costs a comparison.
const DIRECT_BEFORE_RECOVERY: u32 = 4;

/// One signature checked against many keys (every candidate of a
/// process, or the host's whole inventory): its digests are computed once,
/// on the first key that needs them, not once per key. Past a few ECDSA
/// keys of one curve, the signature's possible keys are recovered once
/// (`super::recover`) and each further key is a lookup: naming one of
/// 50 keys, or of an inventory of thousands, costs a handful of
/// public-key operations instead of one per key.
pub struct Verifier<'s, 'a> {
    s: &'s Signed<'a>,
    prehashes: std::cell::OnceCell<Vec<(Option<Hash>, Vec<u8>)>>,
    /// The curve size the signature's integers fit (`ecdsa_bits`).
    ecdsa_bits: std::cell::OnceCell<Option<u32>>,
    /// Direct verifications so far under P-256 and P-384 keys.
    direct: std::cell::Cell<[u32; 2]>,
    /// The signature's possible keys on P-256 and P-384 (`None`: it is
    /// no signature on that curve).
    recovered: [std::cell::OnceCell<Option<Vec<KeyInfo>>>; 2],
    /// Public-key operations run: a key checked is one (whatever digests
    /// and paddings that tries), recovering over one digest two; a key
    /// rejected by the signature's size or encoding, none.
    operations: std::cell::Cell<u64>,
}

impl<'s, 'a> Verifier<'s, 'a> {
    pub fn new(s: &'s Signed<'a>) -> Self {
        Verifier {
            s,
            prehashes: std::cell::OnceCell::new(),
            ecdsa_bits: std::cell::OnceCell::new(),
            direct: std::cell::Cell::new([0; 2]),
            recovered: Default::default(),
            operations: std::cell::Cell::new(0),
        }
    }

    fn prehashes(&self) -> &[(Option<Hash>, Vec<u8>)] {
        self.prehashes.get_or_init(|| prehashes(self.s))
    }

    /// Counts one verification: one key checked past the cheap
    /// rejections (a signature of another size or encoding). Returns true,
    /// to chain before the check.
    fn count(&self) -> bool {
        self.operations.set(self.operations.get() + 1);
        true
    }

    /// Public-key operations run so far, for the sensor's count.
    pub fn operations(&self) -> u64 {
        self.operations.get()
    }

    /// Whether the signature verifies under `key` over the captured data.
    pub fn verifies(&self, key: &PublicKey) -> bool {
        let (curve, bits) = match key {
            PublicKey::P256(_) => (Some(Curve::P256), 256),
            PublicKey::P384(_) => (Some(Curve::P384), 384),
            PublicKey::P521(_) => (None, 521),
            _ => (None, 0),
        };
        if bits != 0 && *self.ecdsa_bits.get_or_init(|| ecdsa_bits(self.s.signature)) != Some(bits)
        {
            return false;
        }
        if let Some(curve) = curve
            && let Some(answer) = self.by_recovery(curve, key)
        {
            return answer;
        }
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
                self.count();
                k.verify_strict(msg, &sig).is_ok()
            }
            PublicKey::P256(k) => ecdsa_verify!(p256, 32, k, self),
            PublicKey::P384(k) => ecdsa_verify!(p384, 48, k, self),
            PublicKey::P521(k) => ecdsa_verify!(p521, 66, k, self),
            PublicKey::Rsa(k) => rsa_verify(k, self),
        }
    }

    /// The signature's possible keys on `curve`, recovered on first use
    /// over each digest it could be over: a wrong digest costs one more
    /// recovery and gives only keys no other signature agrees on.
    fn recovered(&self, curve: Curve) -> Option<&[KeyInfo]> {
        self.recovered[curve as usize]
            .get_or_init(|| {
                let digests: Vec<&[u8]> =
                    self.prehashes().iter().map(|(_, d)| d.as_slice()).collect();
                let keys = recover::possible_on(curve, self.s.signature, &digests);
                if keys.is_some() {
                    self.operations
                        .set(self.operations.get() + 2 * digests.len() as u64);
                }
                keys
            })
            .as_deref()
    }

    /// Every key the signature could have been made with, for the
    /// recovery pool once no known key verified it (recovered once, whether
    /// the known keys already needed it or not), on the curve its size
    /// tells (`ecdsa_bits`).
    pub fn possible_keys(&self) -> Vec<KeyInfo> {
        let curve = match self.ecdsa_bits.get_or_init(|| ecdsa_bits(self.s.signature)) {
            Some(256) => Curve::P256,
            Some(384) => Curve::P384,
            _ => return Vec::new(),
        };
        self.recovered(curve)
            .map(<[KeyInfo]>::to_vec)
            .unwrap_or_default()
    }

    /// The signature this checks.
    pub fn signature(&self) -> &'a [u8] {
        self.s.signature
    }

    /// The answer for an ECDSA key from the signature's recovered keys,
    /// once enough keys of its curve were asked about; `None`: verify it.
    fn by_recovery(&self, curve: Curve, key: &PublicKey) -> Option<bool> {
        if self.recovered[curve as usize].get().is_none() {
            let mut direct = self.direct.get();
            let n = &mut direct[curve as usize];
            if *n < DIRECT_BEFORE_RECOVERY {
                *n += 1;
                self.direct.set(direct);
                return None;
            }
        }
        Some(
            self.recovered(curve)
                .is_some_and(|keys| recover::contains(keys, key)),
        )
    }
}

/// The size in bits of the smallest curve (P-256, P-384, P-521) whose
/// order the DER ECDSA signature's integers fit under; `None` if it is no
/// DER ECDSA signature. A signature is checked only under keys of that
/// curve: one made on a larger curve has both integers that small with a
/// chance of 2⁻²⁵⁶ or less, and it would verify under no smaller curve's
/// key. So a P-256 signature costs nothing against an inventory's P-384
/// keys.
fn ecdsa_bits(signature: &[u8]) -> Option<u32> {
    if p256::ecdsa::Signature::from_der(signature).is_ok() {
        Some(256)
    } else if p384::ecdsa::Signature::from_der(signature).is_ok() {
        Some(384)
    } else if p521::ecdsa::Signature::from_der(signature).is_ok() {
        Some(521)
    } else {
        None
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
    v.count();
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

    /// Past a few keys of a curve, keys are answered from the signature's
    /// recovered keys: exactly what verifying each would answer, for keys
    /// of both curves and others, over a digest and over a message whose
    /// digest is not named, at a fraction of the operations.
    #[test]
    fn recovered_keys_answer_exactly_as_verification() {
        let ec = |curve: &str| {
            openssl_key(&[
                "-algorithm",
                "EC",
                "-pkeyopt",
                &format!("ec_paramgen_curve:{curve}"),
            ])
        };
        let mut files: Vec<_> = (0..12).map(|_| ec("P-256")).collect();
        files.extend((0..6).map(|_| ec("P-384")));
        files.push(openssl_key(&["-algorithm", "ED25519"]));
        files.push(openssl_key(&[
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ]));
        // P-384 keys first among the P-256 ones too: every curve switches
        // on its own count.
        files.swap(1, 13);
        let keys: Vec<KeyInfo> = files
            .iter()
            .map(|(_, p, _)| read_key_file(p, "k").unwrap().remove(0))
            .collect();
        let dir = files[0].0.path();
        let msg = b"a handshake transcript";
        let d256 = sha2::Sha256::digest(msg).to_vec();
        let d384 = sha2::Sha384::digest(msg).to_vec();
        // (signer, signature, what was captured)
        let mut cases = Vec::new();
        for signer in [10, 15, 19] {
            let key = &files[signer].1;
            let digest = if signer == 10 { &d256 } else { &d384 };
            let sig = sign(key, dir, &["pkeyutl", "-sign"], digest);
            cases.push((signer, sig, digest.clone(), true));
        }
        let sig = sign(
            &files[11].1,
            dir,
            &["pkeyutl", "-sign", "-rawin", "-digest", "sha512"],
            msg,
        );
        cases.push((11, sig, msg.to_vec(), false));
        for (signer, sig, data, is_digest) in &cases {
            let s = Signed {
                signature: sig,
                data: Some(data),
                data_is_digest: *is_digest,
                digest_hint: None,
            };
            let shared = Verifier::new(&s);
            for (j, k) in keys.iter().enumerate() {
                let direct = verifies(&k.public, &s);
                assert_eq!(
                    shared.verifies(&k.public),
                    direct,
                    "signer {signer} key {j}"
                );
                assert_eq!(direct, j == *signer, "signer {signer} key {j}");
            }
            // On the signature's curve, 4 verifications and 2 per digest
            // recovered (the other curve's keys cost nothing); the other
            // keys only where their size matches (RSA 2048: 256 bytes;
            // Ed25519: 64, over a message).
            let digests = shared.prehashes().len() as u64;
            let recovered: Vec<bool> = shared
                .recovered
                .iter()
                .map(|r| r.get().is_some_and(Option::is_some))
                .collect();
            let ecdsa = *signer != 19;
            assert_eq!(recovered, [signer == &10 || signer == &11, *signer == 15]);
            let rsa = (sig.len() == 256) as u64;
            let ed = (sig.len() == 64 && !is_digest) as u64;
            assert_eq!(
                shared.operations(),
                (4 + 2 * digests) * ecdsa as u64 + rsa + ed,
                "signer {signer}"
            );
        }
        // A signature on neither curve: no ECDSA key verifies it.
        let s = Signed {
            signature: &[0x30, 0x03, 0x02, 0x01, 0x01],
            data: Some(&d256),
            data_is_digest: true,
            digest_hint: None,
        };
        let shared = Verifier::new(&s);
        assert!(keys.iter().all(|k| !shared.verifies(&k.public)));
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
