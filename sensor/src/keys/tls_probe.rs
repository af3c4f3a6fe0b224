//! The certificates a process's TLS listeners present (part of the search
//! of a process, `search`).
//!
//! A TLS server shows its certificate, and so its public key, to anyone who
//! connects. The sensor finds the TCP sockets the signing process listens
//! on (its socket descriptors, matched with the LISTEN entries of the TCP
//! tables of its network namespace), connects to each from this host, and
//! makes a TLS handshake with rustls, whose certificate verifier here
//! accepts anything and keeps the leaf certificate. A certificate proves
//! nothing by itself: its key only names a signature that verifies under
//! it.
//!
//! One handshake is one connection and one signature by the server, like
//! any client's; the server may log it. The caller bounds how many it
//! makes.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::enrich::sockets;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

/// A TCP socket a process listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// The socket's inode: the same listener when processes share it (the
    /// workers of one server).
    pub inode: u64,
    /// The address it is bound to.
    pub local: SocketAddr,
}

/// The TCP sockets process `tgid` listens on (`enrich::sockets` reads the
/// tables).
pub fn listeners(tgid: u32) -> io::Result<Vec<Listener>> {
    let fd_dir = std::path::PathBuf::from(format!("/proc/{tgid}/fd"));
    // A process gone or unreadable is an error, not "no listeners".
    std::fs::read_dir(&fd_dir)?;
    let inodes = sockets::socket_inodes(&fd_dir).unwrap_or_default();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        // A kernel without IPv6 has no tcp6 table.
        let Ok(file) = std::fs::File::open(format!("/proc/{tgid}/net/{table}")) else {
            continue;
        };
        let lines = io::BufRead::lines(io::BufReader::new(file)).map_while(Result::ok);
        for (local, inode) in sockets::listening(lines) {
            let l = Listener { inode, local };
            if inodes.contains(&inode) && !out.contains(&l) {
                out.push(l);
            }
        }
    }
    Ok(out)
}

/// Where the sensor connects for a listener: its own address, or loopback
/// for a wildcard one (an IPv6 wildcard may also serve IPv4: the second
/// address, tried when the first does not connect).
pub fn connect_addrs(local: SocketAddr) -> Vec<SocketAddr> {
    let port = local.port();
    let v4 = |ip: Ipv4Addr| {
        SocketAddr::new(
            if ip.is_unspecified() {
                Ipv4Addr::LOCALHOST
            } else {
                ip
            }
            .into(),
            port,
        )
    };
    match local.ip() {
        IpAddr::V4(ip) => vec![v4(ip)],
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip4) => vec![v4(ip4)],
            None if ip.is_unspecified() => vec![
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            ],
            None => vec![local],
        },
    }
}

/// Why a handshake gave no certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// No connection, or it broke or timed out: nothing more to try there.
    Unreachable(String),
    /// The listener does not speak TLS: nothing more to try there.
    NotTls(String),
    /// A TLS error (an alert, say for a server name it does not know):
    /// another server name may still work.
    Tls(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Unreachable(e) => write!(f, "unreachable: {e}"),
            Failed::NotTls(e) => write!(f, "not TLS: {e}"),
            Failed::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

/// One handshake with the TLS server at `addr`, sending `server_name` as
/// SNI (none without one). Returns the leaf certificate it presented
/// (DER). Every step is bounded by `timeout`, and the whole by twice it.
pub fn fetch_certificate(
    addr: SocketAddr,
    server_name: Option<&str>,
    timeout: Duration,
) -> Result<Vec<u8>, Failed> {
    let deadline = Instant::now() + 2 * timeout;
    let recorder = Arc::new(Recorder::default());
    // rustls sends no SNI for an address.
    let name: ServerName<'static> = match server_name {
        Some(n) => ServerName::try_from(n.to_owned())
            .map_err(|e| Failed::Tls(format!("server name {n:?}: {e}")))?,
        None => ServerName::from(addr.ip()),
    };
    let mut conn = ClientConnection::new(config(recorder.clone())?, name)
        .map_err(|e| Failed::Tls(e.to_string()))?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| Failed::Unreachable(format!("connect to {addr}: {e}")))?;
    let _ = sock.set_nodelay(true);
    sock.set_read_timeout(Some(timeout))
        .and_then(|()| sock.set_write_timeout(Some(timeout)))
        .map_err(|e| Failed::Unreachable(e.to_string()))?;
    let mut failure = None;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            failure = Some(Failed::Unreachable(format!(
                "handshake not done within {:?}",
                2 * timeout
            )));
            break;
        }
        if let Err(e) = conn.complete_io(&mut sock) {
            failure = Some(classify(&e));
            break;
        }
    }
    if failure.is_none() {
        // A clean end, so the server logs no broken handshake.
        conn.send_close_notify();
        let _ = conn.write_tls(&mut sock);
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
    let leaf = recorder
        .leaf
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match (leaf, failure) {
        // The certificate came before whatever went wrong after it.
        (Some(leaf), _) => Ok(leaf),
        (None, Some(f)) => Err(f),
        (None, None) => Err(Failed::Tls("no certificate presented".into())),
    }
}

/// Sorts a handshake error: rustls's own errors come inside `InvalidData`.
fn classify(e: &io::Error) -> Failed {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(
            err @ (rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }),
        ) => Failed::NotTls(err.to_string()),
        Some(err) => Failed::Tls(err.to_string()),
        None => Failed::Unreachable(e.to_string()),
    }
}

/// A client configuration whose verifier records the certificate. A new
/// one per handshake: no session is resumed (a resumed session shows no
/// certificate).
fn config(recorder: Arc<Recorder>) -> Result<Arc<ClientConfig>, Failed> {
    // ring's provider lacks post-quantum key exchange, hence deprecated;
    // this handshake only fetches a certificate, so the key exchange
    // protects nothing, and ring needs no C toolchain (aws-lc-rs does).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| Failed::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(recorder)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts any certificate and keeps the leaf: the sensor trusts nothing
/// it is shown, it only checks captured signatures against the key in it.
#[derive(Debug, Default)]
struct Recorder {
    leaf: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.leaf.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(end_entity.as_ref().to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    /// Every scheme a server key may sign with, whether or not ring could
    /// verify it: a server whose key fits none of the offered schemes
    /// refuses the handshake, and this verifier verifies nothing.
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP521_SHA512,
            SignatureScheme::ED25519,
            SignatureScheme::ED448,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PKCS1_SHA256,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA1,
            SignatureScheme::ECDSA_SHA1_Legacy,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::material::{self, tests::openssl_key};
    use std::process::{Command, Stdio};

    fn listening(table: &str) -> Vec<Listener> {
        sockets::listening(table.lines().map(str::to_owned))
            .into_iter()
            .map(|(local, inode)| Listener { inode, local })
            .collect()
    }

    #[test]
    fn listen_entries_are_parsed_in_native_word_order() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 35231 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:A1B2 0100007F:20FB 01 00000000:00000000 00:00000000 00000000     0        0 35300 1 0000000000000000 100 0 0 10 0\n";
        let got = listening(v4);
        assert_eq!(
            got,
            vec![Listener {
                inode: 35231,
                local: "127.0.0.1:8443".parse().unwrap()
            }],
            "established connections are not listeners, and end the listeners"
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41000 1 0000000000000000 100 0 0 10 0\n   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41001 1 0000000000000000 100 0 0 10 0\n";
        let got = listening(v6);
        if cfg!(target_endian = "little") {
            assert_eq!(got[0].local, "[::1]:443".parse().unwrap());
        }
        assert_eq!(got[1].local, "[::]:80".parse().unwrap());
        assert_eq!(
            connect_addrs(got[1].local),
            vec!["[::1]:80".parse().unwrap(), "127.0.0.1:80".parse().unwrap()]
        );
        assert_eq!(
            connect_addrs("0.0.0.0:443".parse().unwrap()),
            vec!["127.0.0.1:443".parse().unwrap()]
        );
        assert_eq!(
            connect_addrs("192.0.2.7:443".parse().unwrap()),
            vec!["192.0.2.7:443".parse().unwrap()]
        );
    }

    /// `openssl s_server` with an Ed25519 key: this process finds its
    /// listener, and a handshake gets the certificate of that key.
    #[test]
    fn a_listener_presents_its_certificate() {
        let (dir, key, spki) = openssl_key(&["-algorithm", "ED25519"]);
        let crt = dir.path().join("c.crt");
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-new",
                "-days",
                "1",
                "-subj",
                "/CN=probe.test",
            ])
            .args(["-addext", "subjectAltName=DNS:probe.test"])
            .arg("-key")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .status()
            .unwrap();
        assert!(st.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-key")
            .arg(&key)
            .arg("-cert")
            .arg(&crt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "s_server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let found = listeners(server.id()).unwrap();
        assert!(found.iter().any(|l| l.local == addr), "{found:?}");
        for name in [None, Some("probe.test")] {
            let leaf = fetch_certificate(addr, name, Duration::from_secs(2)).unwrap();
            assert_eq!(material::certificate_key(&leaf).unwrap().spki_sha256, spki);
            assert_eq!(material::certificate_names(&leaf), vec!["probe.test"]);
        }
        let _ = server.kill();
        let _ = server.wait();
        // Nothing listens there any more.
        assert!(matches!(
            fetch_certificate(addr, None, Duration::from_millis(500)),
            Err(Failed::Unreachable(_))
        ));
    }
}
