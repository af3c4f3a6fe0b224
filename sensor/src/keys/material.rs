//! Reads key and certificate files into *public* keys.
//!
//! The sensor reads a private key file only to derive its public key; the
//! private half lives in zeroizing buffers for the length of one function
//! call and is never logged, stored or exported. Certificates and public-key
//! files give the same identity without touching secrets at all.
//!
//! (Over 600 lines only with its tests, about 430 lines of real keys and
//! certificates in every encoding; the parsing is about 560.)

use std::path::Path;

use pkcs8::{DecodePrivateKey, ObjectIdentifier};
use rsa::pkcs1::DecodeRsaPrivateKey;
use sha2::{Digest, Sha256};
use spki::{DecodePublicKey, EncodePublicKey};
use zeroize::Zeroizing;

/// A public key the sensor can verify signatures with.
#[derive(Clone)]
pub enum PublicKey {
    Rsa(rsa::RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// A key's identity: its SPKI hash, what kind of key it is, and the public
/// key itself for verification.
#[derive(Clone)]
pub struct KeyInfo {
    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: String,
    /// `rsa-2048`, `ecdsa-p256`, `ed25519`, ...
    pub algorithm: String,
    pub bits: u32,
    pub public: PublicKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: private key is encrypted; keywarden identifies it through its certificate instead"
    )]
    #[cfg(test)]
    Encrypted { path: String },
    #[error("{path}: no key or certificate keywarden can use ({detail})")]
    Unsupported { path: String, detail: String },
    #[error("{path}: file is larger than {max} bytes; not a key file")]
    TooLarge { path: String, max: u64 },
    #[error("{path}: not read: {why}")]
    Refused {
        path: String,
        why: super::safe_open::Refused,
    },
}

/// Key files are small; anything bigger is not one (and is not read whole).
pub const MAX_KEY_FILE: u64 = 1 << 20;

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");

impl KeyInfo {
    /// Builds the identity from a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, String> {
        let spki =
            spki::SubjectPublicKeyInfoRef::try_from(der).map_err(|e| format!("SPKI: {e}"))?;
        let oid = spki.algorithm.oid;
        let (public, algorithm, bits) = if oid == OID_RSA {
            let k = rsa::RsaPublicKey::from_public_key_der(der).map_err(|e| format!("RSA: {e}"))?;
            let bits = rsa::traits::PublicKeyParts::n(&k).bits() as u32;
            (PublicKey::Rsa(k), format!("rsa-{bits}"), bits)
        } else if oid == OID_EC {
            let curve: ObjectIdentifier = spki
                .algorithm
                .parameters_oid()
                .map_err(|e| format!("EC parameters: {e}"))?;
            if curve == OID_P256 {
                let k = p256::ecdsa::VerifyingKey::from_public_key_der(der)
                    .map_err(|e| e.to_string())?;
                (PublicKey::P256(k), "ecdsa-p256".into(), 256)
            } else if curve == OID_P384 {
                let k = p384::ecdsa::VerifyingKey::from_public_key_der(der)
                    .map_err(|e| e.to_string())?;
                (PublicKey::P384(k), "ecdsa-p384".into(), 384)
            } else if curve == OID_P521 {
                let k =
                    p521::ecdsa::VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes())
                        .map_err(|e| e.to_string())?;
                (PublicKey::P521(k), "ecdsa-p521".into(), 521)
            } else {
                return Err(format!("unsupported EC curve {curve}"));
            }
        } else if oid == OID_ED25519 {
            let k =
                ed25519_dalek::VerifyingKey::from_public_key_der(der).map_err(|e| e.to_string())?;
            (PublicKey::Ed25519(k), "ed25519".into(), 256)
        } else {
            return Err(format!("unsupported key algorithm {oid}"));
        };
        Ok(KeyInfo {
            spki_sha256: hex::encode(Sha256::digest(der)),
            algorithm,
            bits,
            public,
        })
    }
}

impl std::fmt::Debug for KeyInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.algorithm, self.spki_sha256)
    }
}

/// SPKI DER of the public half of a PKCS#8 private key.
fn spki_from_pkcs8(der: &[u8]) -> Result<Vec<u8>, String> {
    let info = pkcs8::PrivateKeyInfo::try_from(der).map_err(|e| format!("PKCS#8: {e}"))?;
    let oid = info.algorithm.oid;
    let doc = if oid == OID_RSA {
        rsa::RsaPrivateKey::from_pkcs8_der(der)
            .map_err(|e| e.to_string())?
            .to_public_key()
            .to_public_key_der()
    } else if oid == OID_EC {
        let curve: ObjectIdentifier = info
            .algorithm
            .parameters_oid()
            .map_err(|e| format!("EC parameters: {e}"))?;
        if curve == OID_P256 {
            p256::SecretKey::from_pkcs8_der(der)
                .map_err(|e| e.to_string())?
                .public_key()
                .to_public_key_der()
        } else if curve == OID_P384 {
            p384::SecretKey::from_pkcs8_der(der)
                .map_err(|e| e.to_string())?
                .public_key()
                .to_public_key_der()
        } else if curve == OID_P521 {
            p521::SecretKey::from_pkcs8_der(der)
                .map_err(|e| e.to_string())?
                .public_key()
                .to_public_key_der()
        } else {
            return Err(format!("unsupported EC curve {curve}"));
        }
    } else if oid == OID_ED25519 {
        ed25519_dalek::SigningKey::from_pkcs8_der(der)
            .map_err(|e| e.to_string())?
            .verifying_key()
            .to_public_key_der()
    } else {
        return Err(format!("unsupported private key algorithm {oid}"));
    };
    doc.map(|d| d.as_bytes().to_vec())
        .map_err(|e| e.to_string())
}

/// SPKI DER of the public half of a SEC1 `EC PRIVATE KEY`.
fn spki_from_sec1(der: &[u8]) -> Result<Vec<u8>, String> {
    let ec = sec1::EcPrivateKey::try_from(der).map_err(|e| format!("SEC1: {e}"))?;
    let curve = ec
        .parameters
        .and_then(|p| p.named_curve())
        .ok_or_else(|| "SEC1 key without a named curve".to_owned())?;
    let doc = if curve == OID_P256 {
        p256::SecretKey::from_sec1_der(der)
            .map_err(|e| e.to_string())?
            .public_key()
            .to_public_key_der()
    } else if curve == OID_P384 {
        p384::SecretKey::from_sec1_der(der)
            .map_err(|e| e.to_string())?
            .public_key()
            .to_public_key_der()
    } else if curve == OID_P521 {
        p521::SecretKey::from_sec1_der(der)
            .map_err(|e| e.to_string())?
            .public_key()
            .to_public_key_der()
    } else {
        return Err(format!("unsupported EC curve {curve}"));
    };
    doc.map(|d| d.as_bytes().to_vec())
        .map_err(|e| e.to_string())
}

fn spki_from_pkcs1(der: &[u8]) -> Result<Vec<u8>, String> {
    rsa::RsaPrivateKey::from_pkcs1_der(der)
        .map_err(|e| e.to_string())?
        .to_public_key()
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| e.to_string())
}

fn spki_from_certificate(der: &[u8]) -> Result<Vec<u8>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("X.509: {e}"))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// subjectAltName entries kept per certificate. A server certificate has a
/// handful; one with thousands is someone's attempt to fill memory.
pub const MAX_SANS: usize = 32;
/// Bytes kept of one text taken from a certificate (a name, a SAN).
pub const MAX_CERT_TEXT: usize = 1024;

/// What a certificate says of the key it certifies, for the key
/// inventory (`inventory`): public data only. Any user can write a
/// certificate file the sensor reads, so its texts are cut at
/// `MAX_CERT_TEXT` bytes and at most `MAX_SANS` names are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    /// The SPKI SHA-256 of the certified key.
    pub spki_sha256: String,
    /// The subject's attributes, `CN=www.example.com, O=Example`.
    pub subject: String,
    pub issuer: String,
    /// The serial number in lowercase hex without leading zero bytes:
    /// what `openssl x509 -serial` prints, in lowercase.
    pub serial: String,
    /// subjectAltName entries: `DNS:…`, `IP:…`, `email:…`, `URI:…`.
    pub sans: Vec<String>,
    /// Entries past `MAX_SANS`, not kept.
    pub sans_omitted: usize,
    /// Validity, in milliseconds since the epoch.
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// `s` cut to at most `max` bytes (at a character boundary), with `…`
/// when something was cut.
pub fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// One subjectAltName entry as OpenSSL's text output writes it.
fn san_text(name: &x509_parser::extensions::GeneralName<'_>) -> String {
    use x509_parser::extensions::GeneralName;
    match name {
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::IPAddress(b) => {
            if let Ok(a) = <[u8; 4]>::try_from(*b) {
                format!("IP:{}", std::net::Ipv4Addr::from(a))
            } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                format!("IP:{}", std::net::Ipv6Addr::from(a))
            } else {
                format!("IP:{}", hex::encode(b))
            }
        }
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DirectoryName(n) => format!("DirName:{n}"),
        other => other.to_string(),
    }
}

/// The SPKI DER of a DER certificate, and what it says of the key.
fn certificate_in(der: &[u8]) -> Result<(Vec<u8>, Certificate), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("X.509: {e}"))?;
    let spki = cert.tbs_certificate.subject_pki.raw.to_vec();
    let mut sans = Vec::new();
    let mut sans_omitted = 0;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if sans.len() < MAX_SANS {
                sans.push(clip(san_text(n), MAX_CERT_TEXT));
            } else {
                sans_omitted += 1;
            }
        }
    }
    // DER gives a positive serial a leading zero byte; openssl prints none.
    let raw = cert.raw_serial();
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    let validity = cert.validity();
    let details = Certificate {
        spki_sha256: hex::encode(Sha256::digest(&spki)),
        subject: clip(cert.subject().to_string(), MAX_CERT_TEXT),
        issuer: clip(cert.issuer().to_string(), MAX_CERT_TEXT),
        serial: clip(hex::encode(&raw[first..]), MAX_CERT_TEXT),
        sans,
        sans_omitted,
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
        not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
    };
    Ok((spki, details))
}

/// What a DER certificate (a listener's leaf) says of its key, if it parses.
pub fn certificate_details(der: &[u8]) -> Option<Certificate> {
    certificate_in(der).ok().map(|(_, c)| c)
}

/// The public key of a DER certificate.
pub fn certificate_key(der: &[u8]) -> Result<KeyInfo, String> {
    KeyInfo::from_spki_der(&spki_from_certificate(der)?)
}

/// The DNS names a DER certificate is for, to send as TLS server names:
/// its subjectAltName DNS entries, else its subject's common names.
/// Wildcards are left out (no one name to send for them).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_owned),
        );
    }
    names.retain(|n| !n.is_empty() && !n.contains('*'));
    let mut seen = Vec::new();
    names.retain(|n| {
        let new = !seen.contains(n);
        seen.push(n.clone());
        new
    });
    names
}

/// What a key file holds.
#[derive(Clone, Debug)]
pub struct KeyFile {
    /// Every public key found (from private keys, public keys, certificates).
    pub keys: Vec<KeyInfo>,
    /// The certificates among them, each for one of `keys`: the key
    /// inventory records who each key was issued to.
    pub certificates: Vec<Certificate>,
    /// At least one block was a private key.
    pub has_private_key: bool,
}

/// Whether a file name has a suffix the open probe treats as a key or
/// certificate file.
pub fn looks_like_key_file(name: &str) -> bool {
    keywarden_probe_types::KEY_SUFFIXES
        .iter()
        .any(|s| name.as_bytes().ends_with(s))
}

/// PEM blocks read from one file, at most. A key with its chain has a
/// handful; a CA bundle about 150, whose certificates no process here signs
/// with. A file any user can write is read, so the work per file is bounded:
/// blocks past this are not decoded.
pub const MAX_PEM_BLOCKS: usize = 64;

/// The PEM blocks of a file, each distinct one once.
struct PemBlocks {
    /// Distinct blocks, in file order.
    blocks: Vec<pem::Pem>,
    /// Framed blocks that did not decode.
    errors: Vec<String>,
    /// Blocks whose DER repeated an earlier block's, skipped undecoded.
    duplicates: usize,
    /// More than `MAX_PEM_BLOCKS` blocks: the rest were not read.
    unread: bool,
}

/// The `-----BEGIN ...-----` to `-----END ...-----` frames of `bytes`, in
/// order, found without decoding anything.
fn pem_frames(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    use memchr::memmem::find;
    let mut rest = bytes;
    std::iter::from_fn(move || {
        let begin = find(rest, b"-----BEGIN ")?;
        let block = &rest[begin..];
        let end = find(&block[11..], b"-----END ")? + 11;
        let close = find(&block[end + 9..], b"-----")? + end + 9 + 5;
        rest = &block[close..];
        Some(&block[..close])
    })
}

/// The first `MAX_PEM_BLOCKS` PEM blocks of `bytes`, with duplicates (same
/// DER, by SHA-256) dropped before their keys are decoded: a 1 MiB file of
/// one key repeated costs one key parse, not thousands.
fn pem_blocks(bytes: &[u8]) -> PemBlocks {
    let mut out = PemBlocks {
        blocks: Vec::new(),
        errors: Vec::new(),
        duplicates: 0,
        unread: false,
    };
    let mut seen = hashbrown::HashSet::new();
    for (i, frame) in pem_frames(bytes).enumerate() {
        if i == MAX_PEM_BLOCKS {
            out.unread = true;
            break;
        }
        match pem::parse(frame) {
            Ok(block) => {
                if seen.insert(Sha256::digest(block.contents())) {
                    out.blocks.push(block);
                } else {
                    out.duplicates += 1;
                    // Its contents may be a private key: zeroed, not just freed.
                    drop(Zeroizing::new(block.into_contents()));
                }
            }
            Err(e) => out.errors.push(format!("PEM: {e}")),
        }
    }
    out
}

/// Every public key found in `bytes` (a PEM bundle may hold a key and a
/// chain of certificates), and whether it holds a private key. `path` is
/// only used in error messages. Reads at most `MAX_PEM_BLOCKS` PEM blocks,
/// and decodes a key repeated in the file once.
pub fn key_file_in(path: &str, bytes: &[u8]) -> Result<KeyFile, KeyFileError> {
    let unsupported = |detail: String| KeyFileError::Unsupported {
        path: path.to_owned(),
        detail,
    };
    let mut spkis: Vec<Vec<u8>> = Vec::new();
    let mut certificates: Vec<Certificate> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut encrypted = false;
    let mut private = false;

    if memchr::memmem::find(bytes, b"-----BEGIN ").is_some() {
        let found = pem_blocks(bytes);
        problems.extend(found.errors);
        if found.unread {
            problems.push(format!(
                "only the first {MAX_PEM_BLOCKS} PEM blocks were read"
            ));
        }
        for block in found.blocks {
            let tag = block.tag().to_owned();
            let encrypted_header = block
                .headers()
                .get("Proc-Type")
                .is_some_and(|v| v.contains("ENCRYPTED"));
            let der = Zeroizing::new(block.into_contents());
            let got = match tag.as_str() {
                "PRIVATE KEY" => spki_from_pkcs8(&der),
                "RSA PRIVATE KEY" if encrypted_header => {
                    encrypted = true;
                    continue;
                }
                "EC PRIVATE KEY" if encrypted_header => {
                    encrypted = true;
                    continue;
                }
                "RSA PRIVATE KEY" => spki_from_pkcs1(&der),
                "EC PRIVATE KEY" => spki_from_sec1(&der),
                "ENCRYPTED PRIVATE KEY" => {
                    encrypted = true;
                    continue;
                }
                "PUBLIC KEY" => Ok(der.to_vec()),
                "CERTIFICATE" | "TRUSTED CERTIFICATE" => {
                    certificate_in(&der).map(|(spki, cert)| {
                        certificates.push(cert);
                        spki
                    })
                }
                _ => continue, // EC PARAMETERS, DH PARAMETERS, CRLs, ...
            };
            match got {
                Ok(spki) => {
                    private |= tag.ends_with("PRIVATE KEY");
                    spkis.push(spki);
                }
                Err(e) => problems.push(format!("{tag}: {e}")),
            }
        }
    } else {
        // DER: try the shapes a key file can have, most specific first.
        let private_der = spki_from_pkcs8(bytes)
            .or_else(|_| spki_from_sec1(bytes))
            .or_else(|_| spki_from_pkcs1(bytes));
        private = private_der.is_ok();
        let got = private_der
            .or_else(|_| {
                certificate_in(bytes).map(|(spki, cert)| {
                    certificates.push(cert);
                    spki
                })
            })
            .or_else(|_| KeyInfo::from_spki_der(bytes).map(|_| bytes.to_vec()));
        match got {
            Ok(spki) => spkis.push(spki),
            Err(e) => problems.push(e),
        }
    }

    let mut keys = Vec::new();
    for spki in spkis {
        match KeyInfo::from_spki_der(&spki) {
            Ok(k) => {
                if !keys
                    .iter()
                    .any(|x: &KeyInfo| x.spki_sha256 == k.spki_sha256)
                {
                    keys.push(k);
                }
            }
            Err(e) => problems.push(e),
        }
    }
    // A certificate for a key of an algorithm the sensor does not know
    // names no key it can identify.
    certificates.retain(|c| keys.iter().any(|k| k.spki_sha256 == c.spki_sha256));
    if keys.is_empty() {
        if encrypted {
            // A private key, but not one whose public half can be read.
            return Ok(KeyFile {
                keys,
                certificates,
                has_private_key: true,
            });
        }
        let detail = if problems.is_empty() {
            "no key blocks".to_owned()
        } else {
            problems.join("; ")
        };
        return Err(unsupported(detail));
    }
    Ok(KeyFile {
        keys,
        certificates,
        has_private_key: private,
    })
}

/// Reads and parses a key or certificate file. Reads at most
/// `MAX_KEY_FILE` bytes, into a buffer that is zeroed when dropped.
#[cfg(test)]
pub fn read_key_file(path: &Path, shown_as: &str) -> Result<Vec<KeyInfo>, KeyFileError> {
    let f = read_key_file_detailed(path, shown_as)?;
    if f.keys.is_empty() {
        // Only encrypted private keys: nothing to identify signatures with.
        return Err(KeyFileError::Encrypted {
            path: shown_as.to_owned(),
        });
    }
    Ok(f.keys)
}

/// Like `read_key_file`, also telling whether the file holds a private key.
/// A file with only encrypted private keys gives no keys and
/// `has_private_key: true`.
pub fn read_key_file_detailed(path: &Path, shown_as: &str) -> Result<KeyFile, KeyFileError> {
    use std::io::Read;
    let read_err = |source| KeyFileError::Read {
        path: shown_as.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge {
            path: shown_as.to_owned(),
            max: MAX_KEY_FILE,
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(len as usize));
    file.take(MAX_KEY_FILE)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    key_file_in(shown_as, &bytes)
}

/// Reads and parses a key file from a descriptor `safe_open` opened, or
/// one duplicated from the process that opened it: a regular file within
/// `MAX_KEY_FILE`, on a filesystem the sensor reads, read with positioned
/// reads into a buffer zeroed when dropped.
pub fn read_key_file_from(file: &std::fs::File, shown_as: &str) -> Result<KeyFile, KeyFileError> {
    use super::safe_open::{Refused, read_checked};
    let mut bytes = Zeroizing::new(Vec::new());
    match read_checked(file, MAX_KEY_FILE, &mut bytes) {
        Ok(()) => key_file_in(shown_as, &bytes),
        Err(Refused::TooLarge { max }) => Err(KeyFileError::TooLarge {
            path: shown_as.to_owned(),
            max,
        }),
        Err(why) => Err(KeyFileError::Refused {
            path: shown_as.to_owned(),
            why,
        }),
    }
}

/// Reads a key file named by an untrusted process, resolved inside `root`
/// (see `safe_open`).
pub fn read_key_file_in_root(
    root: std::os::fd::BorrowedFd<'_>,
    path: &str,
    shown_as: &str,
) -> Result<KeyFile, KeyFileError> {
    let file = super::safe_open::open_beneath(root, path).map_err(|why| KeyFileError::Refused {
        path: shown_as.to_owned(),
        why,
    })?;
    read_key_file_from(&file, shown_as)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// Generates a key with the system openssl and returns (dir, key path,
    /// the SPKI SHA-256 that `openssl pkey -pubout -outform DER | sha256sum`
    /// prints). openssl is the independent oracle for our computation.
    pub(crate) fn openssl_key(args: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let st = Command::new("openssl")
            .args(["genpkey", "-out"])
            .arg(&key)
            .args(args)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl pkey -in {} -pubout -outform DER | sha256sum",
                key.display()
            ))
            .output()
            .unwrap();
        let spki = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        (dir, key, spki)
    }

    #[test]
    fn spki_matches_openssl_for_each_algorithm() {
        for (args, alg) in [
            (
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
                "ecdsa-p256",
            ),
            (
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"][..],
                "ecdsa-p384",
            ),
            (
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"][..],
                "ecdsa-p521",
            ),
            (
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
                "rsa-2048",
            ),
            (&["-algorithm", "ED25519"][..], "ed25519"),
        ] {
            let (_dir, key, expected) = openssl_key(args);
            let keys = read_key_file(&key, "key.pem").unwrap();
            assert_eq!(keys.len(), 1, "{alg}");
            assert_eq!(keys[0].spki_sha256, expected, "{alg}");
            assert_eq!(keys[0].algorithm, alg);
        }
    }

    #[test]
    fn traditional_formats_and_certificates_give_the_same_spki() {
        let (dir, key, expected) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let sec1 = dir.path().join("sec1.pem");
        let cert = dir.path().join("cert.pem");
        let der = dir.path().join("key.der");
        let run = |args: &[&str]| {
            let st = Command::new("openssl").args(args).output().unwrap();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
        };
        run(&[
            "ec",
            "-in",
            key.to_str().unwrap(),
            "-out",
            sec1.to_str().unwrap(),
        ]);
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/CN=t",
            "-days",
            "1",
            "-out",
            cert.to_str().unwrap(),
        ]);
        run(&[
            "pkey",
            "-in",
            key.to_str().unwrap(),
            "-outform",
            "DER",
            "-out",
            der.to_str().unwrap(),
        ]);
        for (p, private) in [(&sec1, true), (&cert, false), (&der, true)] {
            let f = read_key_file_detailed(p, "k").unwrap();
            assert_eq!(f.keys[0].spki_sha256, expected, "{}", p.display());
            assert_eq!(f.has_private_key, private, "{}", p.display());
        }
        let (dir2, rsa_key, rsa_expected) =
            openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
        let pkcs1 = dir2.path().join("pkcs1.pem");
        run(&[
            "rsa",
            "-in",
            rsa_key.to_str().unwrap(),
            "-traditional",
            "-out",
            pkcs1.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read_to_string(&pkcs1)
                .unwrap()
                .contains("BEGIN RSA PRIVATE KEY")
        );
        assert_eq!(
            read_key_file(&pkcs1, "k").unwrap()[0].spki_sha256,
            rsa_expected
        );
    }

    /// A certificate's subject, issuer, serial, names and validity are
    /// read as openssl writes them, from PEM and from DER, and a file with
    /// the key beside it lists the certificate once, for that key.
    #[test]
    fn certificates_are_described_as_openssl_describes_them() {
        let (dir, key, expected) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let (pem_cert, der_cert) = (dir.path().join("c.pem"), dir.path().join("c.der"));
        let run = |args: &[&std::ffi::OsStr]| {
            let st = Command::new("openssl").args(args).output().unwrap();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
            String::from_utf8(st.stdout).unwrap()
        };
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        run(&[
            os("req"),
            os("-x509"),
            os("-new"),
            os("-key"),
            key.as_os_str(),
            os("-subj"),
            os("/O=Example/CN=www.example.test"),
            os("-days"),
            os("30"),
            os("-addext"),
            os("subjectAltName=DNS:www.example.test,IP:127.0.0.1,email:ops@example.test"),
            os("-out"),
            pem_cert.as_os_str(),
        ]);
        run(&[
            os("x509"),
            os("-in"),
            pem_cert.as_os_str(),
            os("-outform"),
            os("DER"),
            os("-out"),
            der_cert.as_os_str(),
        ]);
        let serial = run(&[
            os("x509"),
            os("-noout"),
            os("-serial"),
            os("-in"),
            pem_cert.as_os_str(),
        ]);
        let serial = serial.trim().trim_start_matches("serial=").to_lowercase();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for p in [&pem_cert, &der_cert] {
            let f = read_key_file_detailed(p, "c").unwrap();
            assert_eq!(f.certificates.len(), 1, "{}", p.display());
            let c = &f.certificates[0];
            assert_eq!(c.spki_sha256, expected);
            assert_eq!(c.subject, "O=Example, CN=www.example.test");
            assert_eq!(c.issuer, c.subject, "self-signed");
            assert_eq!(c.serial, serial);
            assert_eq!(
                c.sans,
                [
                    "DNS:www.example.test",
                    "IP:127.0.0.1",
                    "email:ops@example.test"
                ]
            );
            assert_eq!(c.sans_omitted, 0);
            assert!((c.not_before_ms - now_ms).abs() < 600_000, "{c:?}");
            assert_eq!(c.not_after_ms - c.not_before_ms, 30 * 86_400_000);
        }
        let mut bundle = std::fs::read(&key).unwrap();
        bundle.extend(std::fs::read(&pem_cert).unwrap());
        bundle.extend(std::fs::read(&pem_cert).unwrap());
        let f = key_file_in("bundle.pem", &bundle).unwrap();
        assert_eq!((f.keys.len(), f.certificates.len()), (1, 1));
        assert!(f.has_private_key);
        // A key file alone has no certificate.
        assert!(
            read_key_file_detailed(&key, "k")
                .unwrap()
                .certificates
                .is_empty()
        );
    }

    #[test]
    fn clipped_text_ends_at_a_character_boundary() {
        assert_eq!(clip("abc".into(), 3), "abc");
        assert_eq!(clip("abcd".into(), 3), "abc…");
        assert_eq!(clip("aé".into(), 2), "a…");
    }

    /// Ed25519 keys made from a seed, without openssl: cheap in numbers.
    fn ed25519(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    /// A file of one private key repeated to 1 MiB decodes one block: the
    /// rest are dropped by the SHA-256 of their DER, and those past
    /// `MAX_PEM_BLOCKS` are not even decoded.
    #[test]
    fn a_key_repeated_to_fill_the_file_is_decoded_once() {
        use pkcs8::{EncodePrivateKey, LineEnding};
        let key = ed25519(7);
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let mut file = Vec::new();
        while file.len() < MAX_KEY_FILE as usize - pem.len() {
            file.extend_from_slice(pem.as_bytes());
        }
        let found = pem_blocks(&file);
        assert_eq!(found.blocks.len(), 1, "one distinct block");
        assert_eq!(found.duplicates, MAX_PEM_BLOCKS - 1);
        assert!(found.unread, "blocks past the cap are not read");
        assert!(found.errors.is_empty(), "{:?}", found.errors);
        let f = key_file_in("repeated.pem", &file).unwrap();
        assert_eq!(f.keys.len(), 1);
        assert!(f.has_private_key);
        let expected = hex::encode(Sha256::digest(
            key.verifying_key().to_public_key_der().unwrap().as_bytes(),
        ));
        assert_eq!(f.keys[0].spki_sha256, expected);
    }

    /// 100 distinct public keys in one file: only the first
    /// `MAX_PEM_BLOCKS` are read, in order.
    #[test]
    fn pem_blocks_per_file_are_capped() {
        let der = |seed: u8| {
            ed25519(seed)
                .verifying_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        let blocks: Vec<pem::Pem> = (0..100u8)
            .map(|i| pem::Pem::new("PUBLIC KEY", der(i)))
            .collect();
        let file = pem::encode_many(&blocks);
        let found = pem_blocks(file.as_bytes());
        assert_eq!(found.blocks.len(), MAX_PEM_BLOCKS);
        assert_eq!(found.duplicates, 0);
        assert!(found.unread);
        let f = key_file_in("bundle.pem", file.as_bytes()).unwrap();
        assert_eq!(f.keys.len(), MAX_PEM_BLOCKS);
        assert!(!f.has_private_key);
        for (i, k) in f.keys.iter().enumerate() {
            assert_eq!(
                k.spki_sha256,
                hex::encode(Sha256::digest(der(i as u8))),
                "key {i} in file order"
            );
        }
        // Under the cap, nothing is left out.
        let few = pem::encode_many(&blocks[..3]);
        let found = pem_blocks(few.as_bytes());
        assert_eq!((found.blocks.len(), found.unread), (3, false));
    }

    /// A malformed block does not hide the good ones around it.
    #[test]
    fn a_malformed_block_is_skipped_not_fatal() {
        let good = pem::encode(&pem::Pem::new(
            "PUBLIC KEY",
            ed25519(1)
                .verifying_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec(),
        ));
        let file = format!("-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n{good}");
        let found = pem_blocks(file.as_bytes());
        assert_eq!((found.blocks.len(), found.errors.len()), (1, 1));
        assert_eq!(key_file_in("x.pem", file.as_bytes()).unwrap().keys.len(), 1);
    }

    #[test]
    fn encrypted_and_garbage_files_give_clear_errors() {
        let (dir, key, _) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let enc = dir.path().join("enc.pem");
        let st = Command::new("openssl")
            .args([
                "pkey",
                "-in",
                key.to_str().unwrap(),
                "-aes256",
                "-passout",
                "pass:x",
                "-out",
            ])
            .arg(&enc)
            .output()
            .unwrap();
        assert!(st.status.success());
        let err = read_key_file(&enc, "enc.pem").unwrap_err();
        assert!(matches!(err, KeyFileError::Encrypted { .. }), "{err}");
        assert!(err.to_string().starts_with("enc.pem: "));
        let f = read_key_file_detailed(&enc, "enc.pem").unwrap();
        assert!(
            f.keys.is_empty() && f.has_private_key,
            "an encrypted key is still a private key"
        );

        let garbage = dir.path().join("g.pem");
        std::fs::write(&garbage, b"hello").unwrap();
        let err = read_key_file(&garbage, "g.pem").unwrap_err();
        assert!(err.to_string().contains("g.pem"), "{err}");

        let err = read_key_file(&dir.path().join("missing.pem"), "missing.pem").unwrap_err();
        assert!(matches!(err, KeyFileError::Read { .. }));
    }
}
