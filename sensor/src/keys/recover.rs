//! ECDSA public-key recovery (SEC 1 §4.1.6): the public keys one captured
//! signature could have been made with.
//!
//! A signature (r, s) over a digest e fixes the nonce point R up to the
//! sign of its y coordinate (and, with a chance near 2⁻³², whether its x
//! was r or r + n), and each such R gives one public key
//! Q = r⁻¹(s·R − e·G) under which the signature verifies. So one signature
//! names no key: it narrows the choice to two (rarely four) points per
//! digest it could be over. A second, distinct signature by the same key
//! recovers the same true point, while its other points depend on its own
//! digest and nonce (the mirror of Q is −Q − (2e/r)·G). A point two
//! distinct signatures agree on is therefore the key that made both, up to
//! a chance of the order of the curve's security level. `Pools` keeps the
//! points of the host's recent unnamed signatures, and `identify` names a
//! key only on such an agreement (a point that is a key known otherwise is
//! found first, by verification).
//!
//! The same recovery makes naming a signature cheap among many known
//! keys: the keys a signature verifies under are exactly those recovered
//! from it, so past a few ECDSA keys of one curve `verify::Verifier`
//! recovers once and compares points instead of verifying under each.
//!
//! Only public data is used: the signature, the signed data, and the
//! curve. P-256 and P-384, the curves TLS servers use; a P-521 key is found
//! by the other means only.

use std::collections::VecDeque;

use hashbrown::HashMap;
use spki::EncodePublicKey;

use super::material::{KeyInfo, PublicKey};

/// Recovers every point from `sig` over each digest in `prehashes`. A
/// digest shorter than the field is left-padded, as `verify` does: ECDSA
/// reads it as an integer, and the crate wants at least half a field.
macro_rules! recover_on {
    ($curve:ident, $field_len:expr, $sig:expr, $prehashes:expr) => {{
        let mut out: Vec<KeyInfo> = Vec::new();
        for d in $prehashes {
            let mut padded = vec![0u8; ($field_len as usize).saturating_sub(d.len())];
            padded.extend_from_slice(d);
            for id in 0..=ecdsa::RecoveryId::MAX {
                let Some(id) = ecdsa::RecoveryId::from_byte(id) else {
                    continue;
                };
                // The crate checks the recovered key verifies the signature.
                let Ok(vk) = $curve::ecdsa::VerifyingKey::recover_from_prehash(&padded, &$sig, id)
                else {
                    continue;
                };
                let Ok(der) = $curve::PublicKey::from(&vk).to_public_key_der() else {
                    continue;
                };
                if let Ok(info) = KeyInfo::from_spki_der(der.as_bytes())
                    && !out.iter().any(|k| k.spki_sha256 == info.spki_sha256)
                {
                    out.push(info);
                }
            }
        }
        out
    }};
}

/// The curves recovery works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    P256 = 0,
    P384 = 1,
}

/// Every public key on `curve` under which the DER ECDSA `signature`
/// verifies over one of `prehashes` (the crate checks each recovered key
/// verifies, and every key it verifies under is recovered). `None` when it
/// does not parse as a signature on `curve`: it then verifies under no key
/// of that curve.
pub fn possible_on(curve: Curve, signature: &[u8], prehashes: &[&[u8]]) -> Option<Vec<KeyInfo>> {
    Some(match curve {
        Curve::P256 => recover_on!(
            p256,
            32,
            p256::ecdsa::Signature::from_der(signature).ok()?,
            prehashes
        ),
        Curve::P384 => recover_on!(
            p384,
            48,
            p384::ecdsa::Signature::from_der(signature).ok()?,
            prehashes
        ),
    })
}

/// Whether `key` is among `keys` (recovered on its curve). Points are
/// compared, not SPKI hashes: a certificate may encode the same point
/// otherwise.
pub fn contains(keys: &[KeyInfo], key: &PublicKey) -> bool {
    keys.iter().any(|k| match (&k.public, key) {
        (PublicKey::P256(a), PublicKey::P256(b)) => a == b,
        (PublicKey::P384(a), PublicKey::P384(b)) => a == b,
        _ => false,
    })
}

/// Signatures of one key object that go through recovery before its
/// verdict may be cached: the first two of a key agree, so more means the
/// key changes or the data is not what was signed.
const TRIES_PER_OBJECT: u8 = 4;
/// Recoveries per process (each costs a few point multiplications): a
/// process signing with a new key every time recovers nothing for ever.
const PER_PROCESS: u16 = 64;
/// Unnamed signatures whose possible keys are kept, host-wide, for a later
/// signature to agree with.
const POOL: usize = 64;

/// One unnamed signature's possible keys.
struct Recovering {
    /// The signature, so that the same one seen twice is not taken for a
    /// second signature that agrees.
    sig: Vec<u8>,
    keys: Vec<KeyInfo>,
}

/// What recovering one signature came to.
pub enum Recovery {
    /// Not an ECDSA signature on a curve this module handles, or the
    /// budget is spent.
    Nothing,
    /// This signature's possible keys (this many) wait for a second
    /// signature.
    Waiting(usize),
    /// A second, distinct signature agreed: this is the key (boxed: a
    /// key is large, and most results are the other two).
    Named(Box<KeyInfo>),
}

/// The possible keys of the host's recent unnamed ECDSA signatures, and
/// what recovery has cost each process.
#[derive(Default)]
pub struct Pools {
    /// Oldest first. Kept when their process exits or execs: a signature
    /// stays evidence of its key (a server that forks a process per
    /// connection signs once in each).
    pool: VecDeque<Recovering>,
    tries: HashMap<(u32, u64), u8>,
    spent: HashMap<u32, u16>,
    /// Signatures whose possible keys were recovered.
    pub recoveries: u64,
}

impl Pools {
    /// The key object may be freed and its address reused: its tries
    /// start again.
    pub fn on_free(&mut self, tgid: u32, handle: u64) {
        self.tries.remove(&(tgid, handle));
    }

    /// The process exec'd or exited: its budgets go (its signatures stay
    /// in the pool).
    pub fn forget(&mut self, tgid: u32) {
        self.tries.retain(|(t, _), _| *t != tgid);
        self.spent.remove(&tgid);
    }

    /// Recovers one unnamed signature of key object `handle` in process
    /// `tgid` (each plausible reading of it: `found` gives each reading and
    /// its possible keys, computed only within budget): names a key when an
    /// earlier, distinct signature recovered the same one, else keeps its
    /// possible keys for the next. Compared with every signature kept, not
    /// only those of the same key object or process: the agreement of two
    /// distinct signatures is what makes the answer exact, whoever made
    /// them, and a Rust signer's objects live for one signature, a forking
    /// server's processes for one connection.
    pub fn recover(
        &mut self,
        tgid: u32,
        handle: u64,
        found: impl FnOnce() -> Vec<(Vec<u8>, Vec<KeyInfo>)>,
    ) -> Recovery {
        let tries = self.tries.get(&(tgid, handle)).copied().unwrap_or(0);
        let spent = self.spent.get(&tgid).copied().unwrap_or(0);
        if tries >= TRIES_PER_OBJECT || spent >= PER_PROCESS {
            return Recovery::Nothing;
        }
        let found: Vec<(Vec<u8>, Vec<KeyInfo>)> = found()
            .into_iter()
            .filter(|(_, keys)| !keys.is_empty())
            .collect();
        if found.is_empty() {
            return Recovery::Nothing;
        }
        self.recoveries += 1;
        self.tries.insert((tgid, handle), tries + 1);
        self.spent.insert(tgid, spent + 1);
        let pool = &mut self.pool;
        let mut agreed: Vec<&KeyInfo> = Vec::new();
        for (sig, keys) in &found {
            for earlier in pool.iter().filter(|e| e.sig != *sig) {
                for k in keys {
                    if earlier.keys.iter().any(|e| e.spki_sha256 == k.spki_sha256)
                        && !agreed.iter().any(|a| a.spki_sha256 == k.spki_sha256)
                    {
                        agreed.push(k);
                    }
                }
            }
        }
        match agreed.as_slice() {
            [one] => {
                let key = (*one).clone();
                // Its signatures are named by verification from now on.
                pool.retain(|e| !e.keys.iter().any(|k| k.spki_sha256 == key.spki_sha256));
                return Recovery::Named(Box::new(key));
            }
            [] => {}
            more => {
                // Two keys agreed on by distinct signatures cannot happen
                // short of a collision; name neither.
                tracing::warn!(
                    pid = tgid,
                    keys = more.len(),
                    "ECDSA recovery: several keys agree; naming none"
                );
            }
        }
        let possible = found[0].1.len();
        for (sig, keys) in found {
            if !pool.iter().any(|e| e.sig == sig) {
                pool.push_back(Recovering { sig, keys });
            }
        }
        while pool.len() > POOL {
            pool.pop_front();
        }
        Recovery::Waiting(possible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{
        material::{read_key_file, tests::openssl_key},
        verify::{Signed, Verifier},
    };
    use sha2::Digest;
    use std::process::Command;

    fn pkeyutl_sign(dir: &std::path::Path, key: &std::path::Path, digest: &[u8]) -> Vec<u8> {
        let (d, s) = (dir.join("d"), dir.join("s"));
        std::fs::write(&d, digest).unwrap();
        let st = Command::new("openssl")
            .args(["pkeyutl", "-sign", "-inkey"])
            .arg(key)
            .arg("-in")
            .arg(&d)
            .arg("-out")
            .arg(&s)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(s).unwrap()
    }

    /// Every key `s` could have been made with.
    fn candidates(s: &Signed<'_>) -> Vec<KeyInfo> {
        Verifier::new(s).possible_keys()
    }

    fn spkis(keys: &[KeyInfo]) -> Vec<String> {
        keys.iter().map(|k| k.spki_sha256.clone()).collect()
    }

    /// One signature gives its key among others; two distinct signatures
    /// by the same key agree on that key alone.
    #[test]
    fn two_signatures_agree_on_their_key_only() {
        for curve in ["P-256", "P-384"] {
            let digest_of = |m: &[u8]| {
                if curve == "P-256" {
                    sha2::Sha256::digest(m).to_vec()
                } else {
                    sha2::Sha384::digest(m).to_vec()
                }
            };
            let (d, k, spki) = openssl_key(&[
                "-algorithm",
                "EC",
                "-pkeyopt",
                &format!("ec_paramgen_curve:{curve}"),
            ]);
            let (d1, d2) = (digest_of(b"first"), digest_of(b"second"));
            let (s1, s2) = (
                pkeyutl_sign(d.path(), &k, &d1),
                pkeyutl_sign(d.path(), &k, &d2),
            );
            let recovered = |sig: &[u8], digest: &[u8]| {
                spkis(&candidates(&Signed {
                    signature: sig,
                    data: Some(digest),
                    data_is_digest: true,
                    digest_hint: None,
                }))
            };
            let (c1, c2) = (recovered(&s1, &d1), recovered(&s2, &d2));
            assert!(c1.contains(&spki) && c1.len() >= 2, "{curve}: {c1:?}");
            assert!(c2.contains(&spki), "{curve}");
            let common: Vec<&String> = c1.iter().filter(|c| c2.contains(c)).collect();
            assert_eq!(common, vec![&spki], "{curve}");
            // The recovered key is the file's key, as the sensor reads it.
            let file_key = read_key_file(&k, "k").unwrap().remove(0);
            assert_eq!(file_key.spki_sha256, spki);
        }
    }

    /// A message signature with a named digest recovers over that digest
    /// only; without a name, over each common one, still finding the key.
    #[test]
    fn message_signatures_recover_over_the_named_or_each_digest() {
        let (d, k, spki) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let m = d.path().join("m");
        let out = d.path().join("s");
        std::fs::write(&m, b"a TLS handshake transcript, say").unwrap();
        let st = Command::new("openssl")
            .args(["dgst", "-sha384", "-sign"])
            .arg(&k)
            .arg("-out")
            .arg(&out)
            .arg(&m)
            .status()
            .unwrap();
        assert!(st.success());
        let sig = std::fs::read(&out).unwrap();
        let msg = std::fs::read(&m).unwrap();
        for hint in [Some("SHA2-384"), None] {
            let s = Signed {
                signature: &sig,
                data: Some(&msg),
                data_is_digest: false,
                digest_hint: hint,
            };
            assert!(spkis(&candidates(&s)).contains(&spki), "{hint:?}");
        }
        let wrong = Signed {
            signature: &sig,
            data: Some(&msg),
            data_is_digest: false,
            digest_hint: Some("SHA256"),
        };
        assert!(!spkis(&candidates(&wrong)).contains(&spki));
    }

    #[test]
    fn other_signatures_recover_nothing() {
        let s = Signed {
            signature: &[7u8; 64],
            data: Some(b"m"),
            data_is_digest: false,
            digest_hint: None,
        };
        assert!(candidates(&s).is_empty());
        let no_data = Signed { data: None, ..s };
        assert!(candidates(&no_data).is_empty());
    }
}
