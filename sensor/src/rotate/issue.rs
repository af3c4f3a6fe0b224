//! A new key, and a certificate for it with the subject and names of the
//! one it replaces, from the local CA (here) or an ACME CA (`acme`).
//!
//! Keys are made in memory and leave it only as the staged key file
//! (`install`); nothing here logs them.

use std::path::Path;

pub use rcgen::PublicKeyData;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};
use zeroize::Zeroizing;

use crate::config::LocalCaConfig;

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(
        "algorithm {0:?}: keywarden makes ecdsa-p256, ecdsa-p384, ed25519 and rsa-2048..rsa-8192 keys"
    )]
    Algorithm(String),
    #[error("key generation: {0}")]
    Generate(String),
    #[error("old certificate: {0}")]
    OldCertificate(String),
    #[error("local CA: {0}")]
    LocalCa(String),
    #[error("ACME: {0}")]
    Acme(String),
}

/// A new key pair. Its PEM is the only copy of the private key, zeroed
/// when dropped.
pub struct NewKey {
    pub pair: KeyPair,
    pub pem: Zeroizing<String>,
}

/// What an issuer returns: the leaf and the chain above it (PEM blocks).
pub struct Issued {
    pub leaf_der: Vec<u8>,
    pub chain_pem: Vec<String>,
}

/// A key of `algorithm` (`ecdsa-p256`, `rsa-3072`, ... as the inventory
/// names them).
pub fn new_key(algorithm: &str) -> Result<NewKey, IssueError> {
    let make = |alg| KeyPair::generate_for(alg).map_err(|e| IssueError::Generate(e.to_string()));
    let pair = match algorithm {
        "ecdsa-p256" => make(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        "ecdsa-p384" => make(&rcgen::PKCS_ECDSA_P384_SHA384)?,
        "ed25519" => make(&rcgen::PKCS_ED25519)?,
        a => {
            let bits: usize = a
                .strip_prefix("rsa-")
                .and_then(|b| b.parse().ok())
                .filter(|b| (2048..=8192).contains(b))
                .ok_or_else(|| IssueError::Algorithm(a.to_owned()))?;
            // ring cannot make RSA keys; the rsa crate (already here for
            // verification) can.
            use rsa::pkcs8::EncodePrivateKey;
            let k = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                .map_err(|e| IssueError::Generate(e.to_string()))?;
            let der = k
                .to_pkcs8_der()
                .map_err(|e| IssueError::Generate(e.to_string()))?;
            KeyPair::from_pkcs8_der_and_sign_algo(&der.as_bytes().into(), &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| IssueError::Generate(e.to_string()))?
        }
    };
    let pem = Zeroizing::new(pair.serialize_pem());
    Ok(NewKey { pair, pem })
}

/// Parameters for the new certificate: the old one's subject and
/// subjectAltNames, a random serial, `validity_days` from now, an
/// end-entity certificate for TLS servers (and clients, if the old one
/// was).
pub fn params_like(old_der: &[u8], validity_days: u32) -> Result<CertificateParams, IssueError> {
    let bad = |e: String| IssueError::OldCertificate(e);
    let (_, cert) = X509Certificate::from_der(old_der).map_err(|e| bad(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        for attr in rdn.iter() {
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .ok_or_else(|| bad("subject attribute OID too large".into()))?
                .collect();
            let value = attr.as_str().map_err(|_| {
                bad(format!(
                    "subject attribute {} is not text",
                    attr.attr_type()
                ))
            })?;
            dn.push(
                DnType::from_oid(&oid),
                DnValue::Utf8String(value.to_owned()),
            );
        }
    }
    params.distinguished_name = dn;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            let s = match n {
                GeneralName::DNSName(d) => SanType::DnsName(
                    (*d).try_into()
                        .map_err(|e: rcgen::Error| bad(e.to_string()))?,
                ),
                GeneralName::RFC822Name(m) => SanType::Rfc822Name(
                    (*m).try_into()
                        .map_err(|e: rcgen::Error| bad(e.to_string()))?,
                ),
                GeneralName::URI(u) => SanType::URI(
                    (*u).try_into()
                        .map_err(|e: rcgen::Error| bad(e.to_string()))?,
                ),
                GeneralName::IPAddress(b) => SanType::IpAddress(match b.len() {
                    4 => <[u8; 4]>::try_from(*b).map(std::net::IpAddr::from).unwrap(),
                    16 => <[u8; 16]>::try_from(*b)
                        .map(std::net::IpAddr::from)
                        .unwrap(),
                    _ => return Err(bad("subjectAltName IP address of odd length".into())),
                }),
                other => return Err(bad(format!("subjectAltName {other:?} is not copied"))),
            };
            params.subject_alt_names.push(s);
        }
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(validity_days));
    let mut serial = [0u8; 16];
    rand_bytes(&mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if let Ok(Some(eku)) = cert.extended_key_usage()
        && eku.value.client_auth
    {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Random bytes from the kernel.
pub fn rand_bytes(buf: &mut [u8]) {
    use rsa::rand_core::RngCore;
    rsa::rand_core::OsRng.fill_bytes(buf);
}

/// The local CA: its key and certificate, read from the configured files.
pub struct LocalCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
}

impl LocalCa {
    pub fn load(cfg: &LocalCaConfig) -> Result<Self, IssueError> {
        let err = |p: &str, e: String| IssueError::LocalCa(format!("{p}: {e}"));
        let key_pem = Zeroizing::new(read_text(Path::new(&cfg.key)).map_err(|e| err(&cfg.key, e))?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| err(&cfg.key, e.to_string()))?;
        let cert_pem = read_text(Path::new(&cfg.cert)).map_err(|e| err(&cfg.cert, e))?;
        let cert_der = pem::parse(&cert_pem)
            .map_err(|e| err(&cfg.cert, e.to_string()))?
            .into_contents();
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| err(&cfg.cert, e.to_string()))?;
        Ok(LocalCa {
            issuer,
            cert_pem: pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.clone())),
            cert_der,
        })
    }

    /// A certificate for `key` with `params`, signed by the CA.
    pub fn issue(&self, params: &CertificateParams, key: &KeyPair) -> Result<Issued, IssueError> {
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| IssueError::LocalCa(e.to_string()))?;
        Ok(Issued {
            leaf_der: cert.der().to_vec(),
            chain_pem: vec![self.cert_pem.clone()],
        })
    }
}

/// A small text file (key, certificate), read whole.
pub fn read_text(p: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if meta.len() > crate::keys::material::MAX_KEY_FILE {
        return Err("too large".into());
    }
    std::fs::read_to_string(p).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::material;

    fn ca() -> (tempfile::TempDir, LocalCaConfig) {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "Test CA");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        let cfg = LocalCaConfig {
            key: dir.path().join("ca.key").display().to_string(),
            cert: dir.path().join("ca.crt").display().to_string(),
            crl: None,
        };
        std::fs::write(&cfg.key, key.serialize_pem()).unwrap();
        std::fs::write(&cfg.cert, cert.pem()).unwrap();
        (dir, cfg)
    }

    #[test]
    fn the_new_certificate_copies_subject_and_names_and_certifies_the_new_key() {
        let (_d, cfg) = ca();
        let ca = LocalCa::load(&cfg).unwrap();
        let old_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p =
            CertificateParams::new(vec!["www.test".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        p.distinguished_name
            .push(DnType::OrganizationName, "Example");
        p.distinguished_name.push(DnType::CommonName, "www.test");
        let old = p.self_signed(&old_key).unwrap();

        for alg in ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"] {
            let new = new_key(alg).unwrap();
            let params = params_like(old.der(), 30).unwrap();
            let issued = ca.issue(&params, &new.pair).unwrap();
            let got = material::certificate_key(&issued.leaf_der).unwrap();
            assert_eq!(got.algorithm, alg);
            let new_spki = material::KeyInfo::from_spki_der(&new.pair.subject_public_key_info())
                .unwrap()
                .spki_sha256;
            assert_eq!(got.spki_sha256, new_spki);
            let was = material::certificate_details(old.der()).unwrap();
            let is = material::certificate_details(&issued.leaf_der).unwrap();
            assert_eq!(is.subject, was.subject);
            assert_eq!(is.sans, was.sans);
            assert_eq!(is.issuer, "CN=Test CA");
            assert_ne!(is.serial, was.serial);
            assert!(new.pem.contains("PRIVATE KEY"));
        }
        assert!(matches!(new_key("rsa-1024"), Err(IssueError::Algorithm(_))));
        assert!(matches!(
            new_key("ecdsa-p521"),
            Err(IssueError::Algorithm(_))
        ));
    }
}
