//! libgcrypt's signatures: the three S-expressions `gcry_pk_sign` was
//! given and returned, as the probes copied them (`probe_types::sexp`),
//! read into the public key, the signed data and the signature.
//!
//! The key is named by the public key in the very S-expression the call
//! signed with, but only once the signature verifies under it: a program
//! that hands libgcrypt another key's public parameters beside its own
//! private key gets `unknown`, not the other key's name.

use keywarden_probe_types::sexp;
use spki::EncodePublicKey;
use spki::der::{
    Encode,
    asn1::{AnyRef, BitStringRef, ObjectIdentifier},
};

use super::material::KeyInfo;

/// Deepest nesting read (libgcrypt's own keys nest three deep).
const MAX_DEPTH: usize = 8;

/// One node of a copied S-expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    List(Vec<Node>),
    Atom(Vec<u8>),
    /// A value the probes did not copy (a private parameter).
    Withheld,
}

/// Reads the probes' copy of one S-expression: one outer list.
pub fn parse(bytes: &[u8]) -> Result<Node, String> {
    let mut stack: Vec<Vec<Node>> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let t = bytes[i];
        i += 1;
        let node = match t {
            sexp::OPEN => {
                if stack.len() == MAX_DEPTH {
                    return Err(format!("nested deeper than {MAX_DEPTH} lists"));
                }
                stack.push(Vec::new());
                continue;
            }
            sexp::CLOSE => {
                let list = stack.pop().ok_or("a list closed that was not open")?;
                Node::List(list)
            }
            sexp::DATA => {
                let len = bytes
                    .get(i..i + 2)
                    .map(|l| u16::from_ne_bytes([l[0], l[1]]) as usize)
                    .ok_or("a value's length is cut")?;
                let value = bytes.get(i + 2..i + 2 + len).ok_or("a value is cut")?;
                i += 2 + len;
                Node::Atom(value.to_vec())
            }
            sexp::WITHHELD => Node::Withheld,
            other => return Err(format!("token type {other} at byte {}", i - 1)),
        };
        match stack.last_mut() {
            Some(parent) => parent.push(node),
            None if i == bytes.len() => return Ok(node),
            None => return Err("bytes after the outer list".into()),
        }
    }
    Err("the outer list does not close".into())
}

impl Node {
    fn list(&self) -> Option<&[Node]> {
        match self {
            Node::List(l) => Some(l),
            _ => None,
        }
    }

    /// A list's name: its first element.
    fn name(&self) -> Option<&[u8]> {
        match self.list()?.first()? {
            Node::Atom(a) => Some(a),
            _ => None,
        }
    }

    /// The first child list named `name`.
    fn child(&self, name: &str) -> Option<&Node> {
        self.list()?
            .iter()
            .skip(1)
            .find(|n| n.name() == Some(name.as_bytes()))
    }

    /// The `i`th value of the child list named `name` (after its name).
    fn value(&self, name: &str, i: usize) -> Option<&[u8]> {
        match self.child(name)?.list()?.get(1 + i)? {
            Node::Atom(a) => Some(a),
            _ => None,
        }
    }

    /// Every value of the child list `name` (a `flags` list).
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.child(name)
            .and_then(Node::list)
            .map(|l| {
                l.iter()
                    .skip(1)
                    .filter_map(|n| match n {
                        Node::Atom(a) => Some(a.as_slice()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The shape of an S-expression for logs: lists by name, values by
/// length only (`(private-key (ecc (curve 7 bytes) (q 33 bytes) (d
/// withheld)))`). Nothing a value holds is shown.
impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::List(items) => {
                f.write_str("(")?;
                for (i, n) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    match n {
                        Node::Atom(a) if i == 0 => f.write_str(&text(a))?,
                        n => write!(f, "{n}")?,
                    }
                }
                f.write_str(")")
            }
            Node::Atom(a) => write!(f, "{} bytes", a.len()),
            Node::Withheld => f.write_str("withheld"),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().take(40).collect()
}

/// The curves libgcrypt names, by any of its names for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    Ed25519,
    P256,
    P384,
    P521,
}

/// libgcrypt's names of each curve (its `ecc-curves.c` aliases).
const CURVES: [(&str, Curve); 17] = [
    ("Ed25519", Curve::Ed25519),
    ("ed25519", Curve::Ed25519),
    ("1.3.6.1.4.1.11591.15.1", Curve::Ed25519),
    ("1.3.101.112", Curve::Ed25519),
    ("NIST P-256", Curve::P256),
    ("nistp256", Curve::P256),
    ("prime256v1", Curve::P256),
    ("secp256r1", Curve::P256),
    ("1.2.840.10045.3.1.7", Curve::P256),
    ("NIST P-384", Curve::P384),
    ("nistp384", Curve::P384),
    ("secp384r1", Curve::P384),
    ("1.3.132.0.34", Curve::P384),
    ("NIST P-521", Curve::P521),
    ("nistp521", Curve::P521),
    ("secp521r1", Curve::P521),
    ("1.3.132.0.35", Curve::P521),
];

impl Curve {
    fn oid(self) -> ObjectIdentifier {
        ObjectIdentifier::new_unwrap(match self {
            Curve::Ed25519 => "1.3.101.112",
            Curve::P256 => "1.2.840.10045.3.1.7",
            Curve::P384 => "1.3.132.0.34",
            Curve::P521 => "1.3.132.0.35",
        })
    }
}

const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");

/// What a libgcrypt signature is, read from its three S-expressions.
pub struct SexpSignature {
    pub key: KeyInfo,
    /// Encoded as `verify` takes it: DER for ECDSA, `R || S` for EdDSA,
    /// the modulus' length for RSA.
    pub signature: Vec<u8>,
    pub data: Vec<u8>,
    pub data_is_digest: bool,
    /// The hash the data S-expression names.
    pub digest: Option<String>,
}

/// Reads the key, data and signature S-expressions of one call. An error
/// says what is missing or not supported.
pub fn read(key: &[u8], data: &[u8], sig: &[u8]) -> Result<SexpSignature, String> {
    let key = parse(key).map_err(|e| format!("key S-expression: {e}"))?;
    tracing::debug!(key = %key, "libgcrypt signing key");
    let data = parse(data).map_err(|e| format!("data S-expression: {e}"))?;
    let sig = parse(sig).map_err(|e| format!("signature S-expression: {e}"))?;
    if key.name() != Some(b"private-key") {
        return Err("the key S-expression is not a (private-key …)".into());
    }
    let algorithm = key
        .list()
        .and_then(|l| l.get(1))
        .ok_or("the key S-expression names no algorithm")?;
    let alg = algorithm.name().map(text).unwrap_or_default();
    let signed = signed_data(&data)?;
    let values = sig
        .list()
        .and_then(|l| l.get(1))
        .filter(|_| sig.name() == Some(b"sig-val"))
        .ok_or("the signature S-expression is not a (sig-val …)")?;
    let integer = |name: &str| {
        values
            .value(name, 0)
            .ok_or(format!("the signature has no {name}"))
    };
    match alg.as_str() {
        "ecc" | "ecdsa" | "eddsa" => {
            let curve_name = algorithm
                .value("curve", 0)
                .ok_or("the key names no curve")?;
            let curve = CURVES
                .iter()
                .find(|(n, _)| n.as_bytes() == curve_name)
                .map(|(_, c)| *c)
                .ok_or_else(|| {
                    format!(
                        "curve {}: keywarden names keys on Ed25519, P-256, P-384 and P-521",
                        text(curve_name)
                    )
                })?;
            let q = algorithm
                .value("q", 0)
                .ok_or("the key has no public point q")?;
            let (r, s) = (integer("r")?, integer("s")?);
            let (key, signature) = if curve == Curve::Ed25519 {
                // libgcrypt may prefix the point with 0x40 (its "native"
                // compressed form).
                let point = match q {
                    [0x40, rest @ ..] if rest.len() == 32 => rest,
                    _ => q,
                };
                if point.len() != 32 || r.len() > 32 || s.len() > 32 {
                    return Err("an Ed25519 point or signature half is not 32 bytes".into());
                }
                let spki = spki_der(curve.oid(), None, point)?;
                let mut sig = vec![0u8; 64];
                sig[32 - r.len()..32].copy_from_slice(r);
                sig[64 - s.len()..].copy_from_slice(s);
                (spki, sig)
            } else {
                (spki_der(OID_EC, Some(curve.oid()), q)?, ecdsa_der(r, s)?)
            };
            finish(&key, signature, signed)
        }
        "rsa" => {
            let n = algorithm.value("n", 0).ok_or("the key has no modulus n")?;
            let e = algorithm.value("e", 0).ok_or("the key has no exponent e")?;
            let public = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(n),
                rsa::BigUint::from_bytes_be(e),
            )
            .map_err(|e| format!("RSA public key: {e}"))?;
            let der = public
                .to_public_key_der()
                .map_err(|e| format!("RSA public key: {e}"))?;
            let s = integer("s")?;
            let size = rsa::traits::PublicKeyParts::size(&public);
            let s = s
                .iter()
                .skip_while(|b| **b == 0)
                .copied()
                .collect::<Vec<_>>();
            if s.len() > size {
                return Err("the RSA signature is longer than the modulus".into());
            }
            let mut signature = vec![0u8; size - s.len()];
            signature.extend_from_slice(&s);
            finish(der.as_bytes(), signature, signed)
        }
        other => Err(format!(
            "algorithm {other}: keywarden names libgcrypt's ECDSA, EdDSA and RSA keys"
        )),
    }
}

/// The data a signature is over: (bytes, is a digest, hash name).
fn signed_data(data: &Node) -> Result<(Vec<u8>, bool, Option<String>), String> {
    // `(data (flags …) (hash ALGO DIGEST))`, `(data (flags …) (value V))`,
    // or a bare `(hash ALGO DIGEST)`.
    let top_hash = data.name() == Some(b"hash");
    if !top_hash && data.name() != Some(b"data") {
        return Err("the data S-expression is neither (data …) nor (hash …)".into());
    }
    let flags = data.values("flags");
    if flags.iter().any(|f| *f == b"prehash") {
        return Err("pre-hashed EdDSA (flags prehash) is not verified".into());
    }
    let hash = if top_hash {
        data.list().and_then(|l| match (l.get(1), l.get(2)) {
            (Some(Node::Atom(a)), Some(Node::Atom(d))) => Some((a.as_slice(), d.as_slice())),
            _ => None,
        })
    } else {
        data.value("hash", 0).zip(data.value("hash", 1))
    };
    if let Some((algo, digest)) = hash {
        return Ok((digest.to_vec(), true, Some(text(algo))));
    }
    let value = data
        .value("value", 0)
        .ok_or("the data S-expression holds no hash nor value")?;
    // EdDSA signs the value itself; ECDSA's `(flags raw)` value is the
    // digest.
    let eddsa = flags.iter().any(|f| *f == b"eddsa");
    let algo = data.value("hash-algo", 0).map(text);
    Ok((value.to_vec(), !eddsa, if eddsa { None } else { algo }))
}

fn finish(
    spki: &[u8],
    signature: Vec<u8>,
    (data, data_is_digest, digest): (Vec<u8>, bool, Option<String>),
) -> Result<SexpSignature, String> {
    Ok(SexpSignature {
        key: KeyInfo::from_spki_der(spki)?,
        signature,
        data,
        data_is_digest,
        digest,
    })
}

/// A SubjectPublicKeyInfo: the algorithm, its parameter (a curve), the key.
fn spki_der(
    oid: ObjectIdentifier,
    parameter: Option<ObjectIdentifier>,
    key: &[u8],
) -> Result<Vec<u8>, String> {
    let info = spki::SubjectPublicKeyInfo::<AnyRef<'_>, BitStringRef<'_>> {
        algorithm: spki::AlgorithmIdentifier {
            oid,
            parameters: parameter.as_ref().map(AnyRef::from),
        },
        subject_public_key: BitStringRef::from_bytes(key).map_err(|e| e.to_string())?,
    };
    info.to_der().map_err(|e| e.to_string())
}

/// An ECDSA signature in DER, from libgcrypt's unsigned big-endian r and s.
fn ecdsa_der(r: &[u8], s: &[u8]) -> Result<Vec<u8>, String> {
    let uint = |b: &[u8]| {
        spki::der::asn1::UintRef::new(b)
            .and_then(|u| u.to_der())
            .map_err(|e| e.to_string())
    };
    let body = [uint(r)?, uint(s)?].concat();
    let mut der = vec![0x30];
    if body.len() < 0x80 {
        der.push(body.len() as u8);
    } else {
        der.extend([0x81, body.len() as u8]);
    }
    der.extend(body);
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probes' encoding of an S-expression written as text: `(`, `)`,
    /// `#hex#` values, `?` for a withheld one, words for names.
    fn encode(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let data = |out: &mut Vec<u8>, v: &[u8]| {
            out.push(sexp::DATA);
            out.extend((v.len() as u16).to_ne_bytes());
            out.extend(v);
        };
        let spaced = text.replace('(', " ( ").replace(')', " ) ");
        for tok in spaced.split_whitespace() {
            match tok {
                "(" => out.push(sexp::OPEN),
                ")" => out.push(sexp::CLOSE),
                "?" => out.push(sexp::WITHHELD),
                t if t.starts_with('#') => {
                    data(&mut out, &hex::decode(t.trim_matches('#')).unwrap())
                }
                t => data(&mut out, t.replace('_', " ").as_bytes()),
            }
        }
        out
    }

    #[test]
    fn parses_the_probes_encoding() {
        let n = parse(&encode(
            "(private-key (ecc (curve Ed25519) (q #0102#) (d ?)))",
        ))
        .unwrap();
        let ecc = &n.list().unwrap()[1];
        assert_eq!(ecc.value("curve", 0), Some(&b"Ed25519"[..]));
        assert_eq!(ecc.value("q", 0), Some(&[1u8, 2][..]));
        assert_eq!(ecc.child("d").unwrap().list().unwrap()[1], Node::Withheld);
        assert_eq!(ecc.value("d", 0), None);
        assert_eq!(
            n.to_string(),
            "(private-key (ecc (curve 7 bytes) (q 2 bytes) (d withheld)))"
        );
    }

    /// Cut, unbalanced, trailing, unknown and too deep input is an error
    /// that says what is wrong, never a panic.
    #[test]
    fn malformed_copies_are_errors() {
        let good = encode("(data (value #00112233#))");
        for cut in 0..good.len() {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(sexp::OPEN);
        assert!(parse(&trailing).is_err());
        assert!(parse(&[sexp::CLOSE]).is_err());
        assert!(
            parse(&[sexp::OPEN, 9, sexp::CLOSE])
                .unwrap_err()
                .contains("token type 9")
        );
        let deep = encode(&format!("{}x{}", "(".repeat(9), ")".repeat(9)));
        assert!(parse(&deep).unwrap_err().contains("deeper"));
        assert!(parse(&encode(&format!("{}x{}", "(".repeat(8), ")".repeat(8)))).is_ok());
    }

    /// A key whose curve, algorithm or shape keywarden does not read is
    /// refused with the reason; nothing private is needed or read.
    #[test]
    fn unsupported_keys_say_why() {
        let data = encode("(data (flags raw) (value #00#))");
        let sig = encode("(sig-val (ecdsa (r #01#) (s #01#)))");
        let err = |key: &str| read(&encode(key), &data, &sig).err().unwrap();
        assert!(
            err("(private-key (ecc (curve brainpoolP256r1) (q #04#)))").contains("brainpoolP256r1")
        );
        assert!(err("(private-key (dsa (p #01#)))").contains("algorithm dsa"));
        assert!(err("(public-key (ecc (curve Ed25519)))").contains("private-key"));
        assert!(err("(private-key (ecc (curve Ed25519) (q ?)))").contains("no public point"));
    }
}
