//! An ACME CA (RFC 8555) as issuer, and ACME revocation (§7.6), with the
//! `instant-acme` crate.
//!
//! instant-acme is async; the rest of keywarden is not. Each call here
//! builds a current-thread tokio runtime, runs the ACME exchange on it and
//! drops it: no runtime lives beyond the call, and no thread is started.
//!
//! The account's credentials (its private key) are kept in the configured
//! file, written atomically mode 0600, and created on first use.
//! Challenges: http-01, answered by writing the key authorization under
//! the configured webroot (`/.well-known/acme-challenge/TOKEN`), which the
//! service must serve on port 80. With no webroot, the challenge is only
//! declared ready: a CA that validates nothing (pebble with
//! `PEBBLE_VA_ALWAYS_VALID=1`) issues anyway; a real one refuses.
//!
//! The CA chooses the certificate's subject: ACME requests name only the
//! identifiers (the old certificate's DNS and IP subjectAltNames).

use std::{path::Path, time::Duration};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy, RevocationReason, RevocationRequest,
};
use rcgen::{CertificateParams, KeyPair, SanType};

use super::issue::{IssueError, Issued};
use crate::config::AcmeConfig;

fn acme_err(e: impl std::fmt::Display) -> IssueError {
    IssueError::Acme(e.to_string())
}

/// Runs `f` to completion on a current-thread runtime made for it.
fn block_on<T>(
    f: impl std::future::Future<Output = Result<T, IssueError>>,
) -> Result<T, IssueError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| IssueError::Acme(format!("runtime: {e}")))?
        .block_on(f)
}

/// The configured account, created (and its credentials saved) when the
/// file does not exist yet.
async fn account(cfg: &AcmeConfig) -> Result<Account, IssueError> {
    let builder = || match &cfg.root {
        Some(root) => Account::builder_with_root(root)
            .map_err(|e| IssueError::Acme(format!("root {root}: {e}"))),
        None => Account::builder().map_err(acme_err),
    };
    let path = Path::new(&cfg.account);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(IssueError::Acme(format!(
            "{}: a symbolic link; refused",
            cfg.account
        ))),
        Ok(_) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| IssueError::Acme(format!("{}: {e}", cfg.account)))?,
            );
            let creds: AccountCredentials = serde_json::from_str(&text).map_err(|e| {
                IssueError::Acme(format!("{}: not ACME credentials: {e}", cfg.account))
            })?;
            builder()?.from_credentials(creds).await.map_err(acme_err)
        }
        Err(_) => {
            let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
            let (account, creds) = builder()?
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    cfg.directory.clone(),
                    None,
                )
                .await
                .map_err(acme_err)?;
            let json = zeroize::Zeroizing::new(serde_json::to_vec(&creds).map_err(acme_err)?);
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            keywarden_analyzer::atomic_file::write(path, &json, 0o600)
                .map_err(|e| IssueError::Acme(format!("{}: {e}", cfg.account)))?;
            tracing::info!(account = %account.id(), file = %cfg.account, "ACME account created");
            Ok(account)
        }
    }
}

/// A certificate for `key` with the names of `params`, from the ACME CA.
pub fn issue(
    cfg: &AcmeConfig,
    params: &CertificateParams,
    key: &KeyPair,
) -> Result<Issued, IssueError> {
    let ids: Vec<Identifier> = params
        .subject_alt_names
        .iter()
        .map(|s| match s {
            SanType::DnsName(d) => Ok(Identifier::Dns(d.as_str().to_owned())),
            SanType::IpAddress(ip) => Ok(Identifier::Ip(*ip)),
            other => Err(IssueError::Acme(format!(
                "subjectAltName {other:?} cannot be requested from an ACME CA"
            ))),
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(IssueError::Acme(
            "the old certificate names no DNS name or IP address to request".into(),
        ));
    }
    // A CSR carries names only: rcgen refuses the certificate-only
    // parameters (serial, validity, usages) in one.
    let mut req = CertificateParams::default();
    req.distinguished_name = params.distinguished_name.clone();
    req.subject_alt_names = params.subject_alt_names.clone();
    let csr = req.serialize_request(key).map_err(acme_err)?;
    let mut written: Vec<std::path::PathBuf> = Vec::new();
    let result = block_on(async {
        let account = account(cfg).await?;
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(acme_err)?;
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(acme_err)?;
            if a.status != AuthorizationStatus::Pending {
                continue;
            }
            let mut ch = a
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| IssueError::Acme("the CA offers no http-01 challenge".into()))?;
            if let Some(root) = &cfg.http01_webroot {
                let dir = Path::new(root).join(".well-known/acme-challenge");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| IssueError::Acme(format!("{}: {e}", dir.display())))?;
                let file = dir.join(&ch.token);
                keywarden_analyzer::atomic_file::write(
                    &file,
                    ch.key_authorization().as_str().as_bytes(),
                    0o644,
                )
                .map_err(|e| IssueError::Acme(format!("{}: {e}", file.display())))?;
                written.push(file);
            }
            ch.set_ready().await.map_err(acme_err)?;
        }
        // instant-acme waits its first delay before every poll, the
        // first one included: 250 ms by default, twice per order. A CA
        // usually answers within a moment, so start at 50 ms and back
        // off from there (a CA's Retry-After still wins).
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(50))
            .timeout(Duration::from_secs(60));
        let status = order.poll_ready(&retry).await.map_err(acme_err)?;
        if status != OrderStatus::Ready {
            return Err(IssueError::Acme(format!("order not ready: {status:?}")));
        }
        order.finalize_csr(csr.der()).await.map_err(acme_err)?;
        order.poll_certificate(&retry).await.map_err(acme_err)
    });
    for f in written {
        let _ = std::fs::remove_file(f);
    }
    let chain = result?;
    let mut certs = pem::parse_many(chain.as_bytes())
        .map_err(acme_err)?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE");
    let leaf = certs
        .next()
        .ok_or_else(|| IssueError::Acme("the CA returned no certificate".into()))?;
    Ok(Issued {
        leaf_der: leaf.into_contents(),
        chain_pem: certs.map(|p| pem::encode(&p)).collect(),
    })
}

/// Revokes the certificate `der` with `reason` (RFC 5280 reason code),
/// signed by the account key (the account that ordered it may revoke it).
pub fn revoke(cfg: &AcmeConfig, der: &[u8], reason: RevocationReason) -> Result<(), IssueError> {
    block_on(async {
        let account = account(cfg).await?;
        let cert = rustls::pki_types::CertificateDer::from(der);
        account
            .revoke(&RevocationRequest {
                certificate: &cert,
                reason: Some(reason),
            })
            .await
            .map_err(acme_err)
    })
}
