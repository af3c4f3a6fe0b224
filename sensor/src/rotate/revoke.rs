//! `keywarden revoke`: revoke every certificate of a key, at the CA that
//! issued it, and check at that CA that it took effect.
//!
//! The certificates are those the rotation journals kept (the one each
//! rotation replaced, the one it issued) and those in the key's files in
//! the inventory. A certificate the local CA signed (its signature checks
//! under the CA's key) goes into the CA's CRL, re-signed and rewritten
//! atomically at `rotation.local_ca.crl`, and the CRL is read back,
//! checked against the CA key and searched for the serial. Any other goes
//! to the ACME CA (`revokeCert` signed by the account key), and is checked
//! at `rotation.acme.revocation_status_url` when one is configured.
//!
//! A key that still serves is refused unless `--force`, or a completed
//! rotation replaced it: revoking it would break its service first.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use x509_parser::{
    certificate::X509Certificate, prelude::FromDer, revocation_list::CertificateRevocationList,
};

use super::{
    issue::LocalCa,
    journal::{self, Step},
    plan,
};
use crate::{config::Config, keys::material};

pub fn reason_code(name: &str) -> Result<u8> {
    keywarden_analyzer::remediation::revoke_reason(name)
        .map(|(_, c)| c)
        .ok_or_else(|| {
            anyhow!(
                "--reason {name:?}: expected one of {}",
                keywarden_analyzer::remediation::revoke_reason_names()
            )
        })
}

fn rcgen_reason(code: u8) -> rcgen::RevocationReason {
    use rcgen::RevocationReason as R;
    match code {
        1 => R::KeyCompromise,
        2 => R::CaCompromise,
        3 => R::AffiliationChanged,
        4 => R::Superseded,
        5 => R::CessationOfOperation,
        6 => R::CertificateHold,
        9 => R::PrivilegeWithdrawn,
        10 => R::AaCompromise,
        _ => R::Unspecified,
    }
}

fn acme_reason(code: u8) -> instant_acme::RevocationReason {
    use instant_acme::RevocationReason as R;
    match code {
        1 => R::KeyCompromise,
        2 => R::CaCompromise,
        3 => R::AffiliationChanged,
        4 => R::Superseded,
        5 => R::CessationOfOperation,
        6 => R::CertificateHold,
        9 => R::PrivilegeWithdrawn,
        10 => R::AaCompromise,
        _ => R::Unspecified,
    }
}

pub struct Args {
    pub key: String,
    pub reason: String,
    pub force: bool,
    pub inventory: Option<std::path::PathBuf>,
}

/// Every certificate (DER) of `spki` known to the journals and the
/// inventory's files; and whether a completed rotation replaced the key.
fn certificates(
    cfg: &Config,
    entry: Option<&crate::keys::inventory::KeyEntry>,
    spki: &str,
) -> Result<(Vec<Vec<u8>>, bool)> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut add = |der: Vec<u8>| {
        if material::certificate_key(&der).is_ok_and(|k| k.spki_sha256 == spki)
            && !out.contains(&der)
        {
            out.push(der);
        }
    };
    let mut rotated = false;
    for path in journal::list(Path::new(&cfg.rotation.journal_dir))? {
        let steps = journal::read(&path)?;
        let done = steps.iter().any(|s| matches!(s, Step::Done));
        for s in &steps {
            match s {
                Step::Planned { plan, .. } if plan.spki_sha256 == spki => {
                    rotated |= done;
                    if let Ok(p) = pem::parse(&plan.old_certificate_pem) {
                        add(p.into_contents());
                    }
                }
                Step::Issued {
                    new_spki_sha256,
                    new_certificate_pem,
                    ..
                } if new_spki_sha256 == spki => {
                    if let Ok(p) = pem::parse(new_certificate_pem) {
                        add(p.into_contents());
                    }
                }
                _ => {}
            }
        }
    }
    for f in entry.map(|e| e.files.as_slice()).unwrap_or_default() {
        let p = Path::new(f);
        if std::fs::symlink_metadata(p)
            .is_ok_and(|m| m.is_file() && m.len() <= material::MAX_KEY_FILE)
            && let Ok(bytes) = std::fs::read(p)
        {
            for der in plan::pem_certificates(&bytes) {
                add(der);
            }
        }
    }
    Ok((out, rotated))
}

/// `keywarden revoke`: 0 when every certificate was revoked and the
/// revocation verified.
pub fn run(cfg: &Config, args: Args) -> Result<()> {
    let code = reason_code(&args.reason)?;
    let dir = Path::new(&cfg.rotation.journal_dir);
    let _lock = super::lock(dir)?;
    for p in journal::list(dir)? {
        if journal::read(&p)?.last().is_some_and(|s| !s.is_final()) {
            bail!(
                "{}: a rotation was interrupted; run `keywarden rotate --resume` first",
                p.display()
            );
        }
    }
    let inventory_path = args
        .inventory
        .clone()
        .unwrap_or_else(|| cfg.inventory.clone().into());
    let inventory = crate::keys::inventory::Inventory::read(&inventory_path)?.unwrap_or_default();
    let key = args.key.to_ascii_lowercase();
    let entry = plan::entry(inventory.keys(), &key).ok();
    let spki = entry.map(|e| e.spki_sha256.clone()).unwrap_or(key);
    if spki.len() != 64 {
        bail!("key {spki}: not in the inventory; give its whole SPKI SHA-256");
    }
    let (certs, rotated) = certificates(cfg, entry, &spki)?;
    if certs.is_empty() {
        bail!("no certificate of key {spki} is known (journals, inventory files)");
    }
    if !args.force && !rotated {
        let Some(e) = entry else {
            bail!(
                "key {spki} is not in the inventory, so keywarden cannot tell whether it still serves: rotate it first, or give --force"
            );
        };
        let (found, _) = plan::discover(
            e,
            inventory.keys(),
            &certs[0],
            &cfg.rotation,
            &plan::Survey::default(),
        );
        if let Some(f) = found.first() {
            bail!(
                "key {spki} still serves ({} pid {} at {}): rotate it first, or give --force",
                f.exe.display(),
                f.master,
                f.ours[0]
            );
        }
    }
    let local = cfg
        .rotation
        .local_ca
        .as_ref()
        .map(|c| LocalCa::load(c).map(|ca| (ca, c)))
        .transpose()?;
    let mut failed = 0;
    for der in &certs {
        let d = material::certificate_details(der)
            .ok_or_else(|| anyhow!("a certificate of {spki} does not parse"))?;
        let by_local = local
            .as_ref()
            .is_some_and(|(ca, _)| signed_by(der, &ca.cert_der));
        let r = if let (true, Some((ca, c))) = (by_local, &local) {
            let crl = c
                .crl
                .as_deref()
                .ok_or_else(|| anyhow!("rotation.local_ca.crl is not configured"))?;
            crl_revoke(ca, Path::new(crl), der, code).map(|()| format!("listed in the CRL {crl}"))
        } else if let Some(acme) = &cfg.rotation.acme {
            super::acme::revoke(acme, der, acme_reason(code))
                .map_err(anyhow::Error::from)
                .and_then(|()| acme_status(acme, &d.serial, code))
        } else {
            Err(anyhow!(
                "issued by {}: neither the local CA nor ACME is configured for it",
                d.issuer
            ))
        };
        match r {
            Ok(how) => println!(
                "revoked: serial {} (subject {}, issuer {}), reason {}: {how}",
                d.serial, d.subject, d.issuer, args.reason
            ),
            Err(e) => {
                failed += 1;
                println!(
                    "NOT revoked: serial {} (issuer {}): {e:#}",
                    d.serial, d.issuer
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} certificates not revoked", certs.len());
    }
    Ok(())
}

/// `der`'s signature checks under the public key of `ca_der`.
fn signed_by(der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok((_, c)), Ok((_, ca))) = (
        X509Certificate::from_der(der),
        X509Certificate::from_der(ca_der),
    ) else {
        return false;
    };
    c.issuer().as_raw() == ca.subject().as_raw()
        && c.verify_signature(Some(ca.public_key())).is_ok()
}

/// Adds `der`'s serial to the CA's CRL at `path` (made if missing), then
/// reads it back: signed by the CA, the serial listed with the reason.
fn crl_revoke(ca: &LocalCa, path: &Path, der: &[u8], code: u8) -> Result<()> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| anyhow!("certificate: {e}"))?;
    let serial = cert.raw_serial().to_vec();
    let mut revoked: BTreeMap<Vec<u8>, RevokedCertParams> = BTreeMap::new();
    let mut number = 0u64;
    if path.exists() {
        let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
        let der = pem::parse(&bytes)
            .map(|p| p.into_contents())
            .unwrap_or(bytes);
        let (_, crl) = CertificateRevocationList::from_der(&der)
            .map_err(|e| anyhow!("{}: not a CRL: {e}", path.display()))?;
        number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        for r in crl.iter_revoked_certificates() {
            let reason = r.reason_code().map(|(_, rc)| rc.0).unwrap_or(0);
            revoked.insert(
                r.raw_serial().to_vec(),
                RevokedCertParams {
                    serial_number: SerialNumber::from_slice(r.raw_serial()),
                    revocation_time: time::OffsetDateTime::from_unix_timestamp(
                        r.revocation_date.timestamp(),
                    )
                    .unwrap_or_else(|_| time::OffsetDateTime::now_utc()),
                    reason_code: Some(rcgen_reason(reason)),
                    invalidity_date: None,
                },
            );
        }
    }
    let now = time::OffsetDateTime::now_utc();
    revoked.entry(serial.clone()).or_insert(RevokedCertParams {
        serial_number: SerialNumber::from_slice(&serial),
        revocation_time: now,
        reason_code: Some(rcgen_reason(code)),
        invalidity_date: None,
    });
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(7),
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked.into_values().collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca.issuer)
    .map_err(|e| anyhow!("signing the CRL: {e}"))?;
    let pem = crl.pem().map_err(|e| anyhow!("CRL: {e}"))?;
    keywarden_analyzer::atomic_file::write(path, pem.as_bytes(), 0o644)
        .with_context(|| format!("{}: cannot write", path.display()))?;

    // Read back what was published.
    let der = pem::parse(std::fs::read(path)?)?.into_contents();
    let (_, crl) = CertificateRevocationList::from_der(&der)
        .map_err(|e| anyhow!("{}: written CRL does not parse: {e}", path.display()))?;
    let (_, ca_cert) = X509Certificate::from_der(&ca.cert_der).map_err(|e| anyhow!("CA: {e}"))?;
    crl.verify_signature(ca_cert.public_key())
        .map_err(|e| anyhow!("{}: CRL signature does not verify: {e}", path.display()))?;
    let listed = crl
        .iter_revoked_certificates()
        .find(|r| r.raw_serial() == serial.as_slice());
    match listed {
        Some(r) if r.reason_code().map(|(_, c)| c.0).unwrap_or(0) == code => Ok(()),
        Some(_) => bail!(
            "{}: serial listed, with another reason (revoked before?)",
            path.display()
        ),
        None => bail!("{}: serial not listed after writing", path.display()),
    }
}

/// Asks the CA (`revocation_status_url`) whether `serial` is revoked with
/// `code`.
fn acme_status(cfg: &crate::config::AcmeConfig, serial: &str, code: u8) -> Result<String> {
    let Some(url) = &cfg.revocation_status_url else {
        return Ok(
            "ACME revokeCert accepted (no revocation_status_url to verify at the CA)".into(),
        );
    };
    let url = url.replace("{serial}", serial);
    let body = https_get(&url, cfg.root.as_deref())?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))?;
    let status = v.get("Status").and_then(|s| s.as_str()).unwrap_or("");
    let reason = v.get("Reason").and_then(|r| r.as_u64());
    if status != "Revoked" {
        bail!("{url}: status {status:?}, not Revoked");
    }
    if reason != Some(u64::from(code)) {
        bail!("{url}: revoked with reason {reason:?}, not {code}");
    }
    Ok(format!(
        "ACME revokeCert; the CA reports it Revoked, reason {code}"
    ))
}

/// A GET over HTTPS, trusting `root` (PEM) or the system's bundle.
fn https_get(url: &str, root: Option<&str>) -> Result<Vec<u8>> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("{url}: not an https URL"))?;
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => hostport,
    };
    let addr = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:443")
    };
    let mut roots = rustls::RootCertStore::empty();
    let bundle = std::fs::read(root.unwrap_or("/etc/ssl/certs/ca-certificates.crt"))
        .with_context(|| format!("trust roots {}", root.unwrap_or("(system)")))?;
    for der in plan::pem_certificates(&bundle) {
        let _ = roots.add(der.into());
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let sock = TcpStream::connect(&addr).with_context(|| format!("connect {addr}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    match tls.read_to_end(&mut resp) {
        Ok(_) => {}
        // Servers that close without close_notify.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e).context(url.to_owned()),
    }
    let split = memchr::memmem::find(&resp, b"\r\n\r\n")
        .ok_or_else(|| anyhow!("{url}: no HTTP response"))?;
    let head = String::from_utf8_lossy(&resp[..split]);
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{url}: {}", head.lines().next().unwrap_or(""));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("{url}: chunked responses are not read");
    }
    Ok(resp[split + 4..].to_vec())
}
