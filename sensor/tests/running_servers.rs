//! Servers started before the sensor, from key files in a directory the
//! sensor is not told about and closed long before it starts, still have
//! their keys named: by the certificates their listeners present to the
//! sensor's own TLS handshakes, and for ECDSA keys by public-key recovery
//! from two signatures (docs/design.md, "Keys no file the sensor saw
//! gave"). Every handshake after the sensor is ready is a `key_use` event
//! naming the right key, none of them `unknown`, none from a file.

mod support;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::*;

/// A P-384 key (the shared helper makes P-256 ones).
fn p384_key(dir: &Path, name: &str) -> TestKey {
    let path = dir.join(format!("{name}.pem"));
    run_ok(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
            .arg("ec_paramgen_curve:P-384")
            .arg("-out")
            .arg(&path),
    );
    TestKey {
        spki: spki_of_file(&path),
        path,
    }
}

/// One full handshake with `openssl s_client`, sending `server_name` as
/// SNI when given; returns what it printed (the certificate chain).
fn handshake(port: u16, server_name: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"));
    if let Some(name) = server_name {
        cmd.args(["-servername", name]);
    }
    let out = run_ok(cmd.stdin(Stdio::null()));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The events among `uses` that name none of `keys`.
fn others<'a>(uses: &[&'a Event], keys: &[&str]) -> Vec<&'a Event> {
    uses.iter()
        .copied()
        .filter(|e| !spki_of(e).is_some_and(|s| keys.contains(&s)))
        .collect()
}

/// The sensor knew none of these keys from a file: each event says how
/// else it was known, and names no file.
fn assert_known_without_a_file(uses: &[&Event]) {
    for &e in uses {
        let k = key_of(e);
        assert_eq!(k.status, KeyStatus::Identified, "{}", pretty(e));
        assert!(
            matches!(
                k.identified_by,
                Some(
                    IdentifiedBy::TlsCertificate
                        | IdentifiedBy::EcdsaRecovered
                        | IdentifiedBy::HandleCache
                )
            ),
            "{}",
            pretty(e)
        );
        assert_eq!(k.source_file, None, "{}", pretty(e));
        assert_eq!(e.status, "Success", "{}", pretty(e));
    }
}

/// nginx chooses between an RSA key (the default server) and an ECDSA
/// P-256 key by SNI. It was started and served both names before the
/// sensor ran, from a directory outside `key_paths` and `key_locations`.
/// The RSA key is named by the certificate nginx presents to the sensor's
/// handshake without a server name (and then, by its name, again); the
/// ECDSA key, whose name no presented certificate carries, by recovery
/// from its first two signatures. The first event of each is named too:
/// it is held until the key is known.
#[test]
fn nginx_started_before_the_sensor_has_both_sni_keys_named() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let keys_dir = dir.join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let key_a = openssl_key(&keys_dir, "a", "ec");
    let key_b = openssl_key(&keys_dir, "b", "rsa");
    let crt_a = cert(&keys_dir, &key_a, "a.test");
    let crt_b = cert(&keys_dir, &key_b, "b.test");
    let port = free_port();
    let server = |name: &str, crt: &Path, key: &Path, default: &str| {
        format!(
            "server {{ listen 127.0.0.1:{port} ssl{default}; server_name {name}; \
             ssl_certificate {}; ssl_certificate_key {}; \
             ssl_session_cache off; ssl_session_tickets off; \
             location / {{ return 200 \"{name}\\n\"; }} }}\n",
            crt.display(),
            key.display()
        )
    };
    let nginx = start_nginx(
        dir,
        port,
        &(server("b.test", &crt_b, &key_b.path, " default_server")
            + &server("a.test", &crt_a, &key_a.path, "")),
    );
    let worker = nginx_worker(&nginx);
    // Warm: both keys have signed before the sensor starts.
    for name in ["a.test", "b.test"] {
        assert!(handshake(port, Some(name)).contains(name));
    }

    // No key_paths; key_locations are the standard places, not `dir`.
    let sensor_conf = sensor_config(dir, &[], &[]);
    let sensor = Sensor::start(&["--config", sensor_conf.to_str().unwrap()]);

    // The default key first: its first event is named as soon as the
    // sensor's handshake has fetched the certificate. How long that takes
    // is printed, not asserted (no timing thresholds in tests): it is
    // measured in docs/performance.md.
    let named_within = |spki: &str, what: &str| {
        let since = Instant::now();
        wait_for(what, Duration::from_secs(20), || {
            key_uses_of(&sensor.events(), worker)
                .iter()
                .any(|e| spki_of(e) == Some(spki))
        });
        eprintln!("{what} after {:?}", since.elapsed());
    };
    let (n_a, n_b) = (4, 3);
    assert!(handshake(port, Some("b.test")).contains("b.test"));
    named_within(&key_b.spki, "the RSA key named");
    for _ in 1..n_b {
        assert!(handshake(port, Some("b.test")).contains("b.test"));
    }
    // ECDSA: recovery needs the second signature.
    for _ in 0..2 {
        assert!(handshake(port, Some("a.test")).contains("a.test"));
    }
    named_within(&key_a.spki, "the ECDSA key named");
    for _ in 2..n_a {
        assert!(handshake(port, Some("a.test")).contains("a.test"));
    }
    let log = sensor.log();
    let events = sensor.stop();
    drop(nginx);

    let uses = key_uses_of(&events, worker);
    let count = |spki: &str| uses.iter().filter(|e| spki_of(e) == Some(spki)).count();
    let stray = others(&uses, &[key_a.spki.as_str(), key_b.spki.as_str()]);
    assert!(
        stray.is_empty(),
        "events naming neither key: {}\n{log}",
        pretty(&stray)
    );
    assert_eq!(count(&key_a.spki), n_a, "{}", pretty(&uses));
    // The sensor's own handshakes are signatures by key B too.
    assert!(count(&key_b.spki) >= n_b, "{}", pretty(&uses));
    assert_known_without_a_file(&uses);
    let by = |spki: &str, how: IdentifiedBy| {
        uses.iter()
            .any(|e| spki_of(e) == Some(spki) && key_of(e).identified_by == Some(how))
    };
    assert!(
        by(&key_a.spki, IdentifiedBy::EcdsaRecovered),
        "{}",
        pretty(&uses)
    );
    assert!(
        by(&key_b.spki, IdentifiedBy::TlsCertificate),
        "{}",
        pretty(&uses)
    );
}

/// `openssl s_server` with an Ed25519 key, and another with a P-384 key,
/// both started (and each used once) before the sensor. Ed25519 keys
/// cannot be recovered from signatures: the certificate the listener
/// presents names it. The P-384 key is named by whichever comes first,
/// its certificate or its recovery.
#[test]
fn s_server_started_before_the_sensor_has_its_ed25519_and_p384_keys_named() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let ed = openssl_key(dir, "ed", "ed25519");
    let p384 = p384_key(dir, "p384");
    let mut servers = Vec::new();
    for (key, name) in [(&ed, "ed.test"), (&p384, "p384.test")] {
        let crt = cert(dir, key, name);
        let port = free_port();
        let server = start_server(
            Command::new("openssl")
                .args(["s_server", "-quiet", "-www", "-accept"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-key")
                .arg(&key.path)
                .arg("-cert")
                .arg(&crt)
                .stdin(Stdio::null()),
            port,
        );
        assert!(handshake(port, None).contains(name));
        servers.push((server, port, key, name));
    }

    let sensor_conf = sensor_config(dir, &[], &[]);
    let sensor = Sensor::start(&["--config", sensor_conf.to_str().unwrap()]);
    let n = 3;
    for (_, port, _, name) in &servers {
        for _ in 0..n {
            assert!(handshake(*port, Some(*name)).contains(*name));
        }
    }
    let log = sensor.log();
    let events = sensor.stop();

    for (server, _, key, name) in &servers {
        let uses = key_uses_of(&events, server.pid());
        let stray = others(&uses, &[key.spki.as_str()]);
        assert!(
            stray.is_empty(),
            "{name}: events not naming its key: {}\n{log}",
            pretty(&stray)
        );
        assert!(uses.len() >= n, "{name}: {}", pretty(&uses));
        assert_known_without_a_file(&uses);
    }
    let (_, _, ed_key, _) = &servers[0];
    let ed_uses = key_uses_of(&events, servers[0].0.pid());
    assert!(
        ed_uses
            .iter()
            .all(|e| spki_of(e) == Some(ed_key.spki.as_str())
                && key_of(e).identified_by != Some(IdentifiedBy::EcdsaRecovered)),
        "{}",
        pretty(&ed_uses)
    );
    assert!(
        ed_uses
            .iter()
            .any(|e| key_of(e).identified_by == Some(IdentifiedBy::TlsCertificate)),
        "{}",
        pretty(&ed_uses)
    );
}

/// apache2 (event MPM, mod_ssl) with an RSA key, started and
/// used before the sensor, from a directory the sensor is not told about.
/// Its workers sign; each of their handshakes after the sensor is ready
/// names the key, known from the certificate the listener presents.
#[test]
fn apache_started_before_the_sensor_has_its_key_named() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let key = openssl_key(dir, "apache", "rsa");
    let crt = cert(dir, &key, "apache.test");
    let port = free_port();
    let apache = start_apache(dir, port, "apache.test", &crt, &key.path);
    assert!(handshake(port, None).contains("apache.test"));

    let sensor_conf = sensor_config(dir, &[], &[]);
    let sensor = Sensor::start(&["--config", sensor_conf.to_str().unwrap()]);
    let n = 3;
    for _ in 0..n {
        assert!(handshake(port, Some("apache.test")).contains("apache.test"));
    }
    let log = sensor.log();
    let events = sensor.stop();
    drop(apache);

    let uses: Vec<&Event> = key_uses(&events)
        .into_iter()
        .filter(|e| e.actor.process.name == "apache2")
        .collect();
    assert!(uses.len() >= n, "{}\n{log}", pretty(&uses));
    let stray = others(&uses, &[key.spki.as_str()]);
    assert!(
        stray.is_empty(),
        "events not naming its key: {}\n{log}",
        pretty(&stray)
    );
    assert_known_without_a_file(&uses);
}

/// A process that holds its Ed25519 key file open, loaded from memory (so
/// the sensor, started later, saw no open), prints "ready", and signs once
/// on each SIGUSR1.
const HELD_OPEN_SIGNER: &str = r#"
import ctypes, signal, sys
c = ctypes.CDLL("libcrypto.so.3")
vp = ctypes.c_void_p
c.BIO_new_mem_buf.restype = vp
c.BIO_new_mem_buf.argtypes = [ctypes.c_char_p, ctypes.c_int]
c.PEM_read_bio_PrivateKey.restype = vp
c.PEM_read_bio_PrivateKey.argtypes = [vp, vp, vp, vp]
c.EVP_MD_CTX_new.restype = vp
c.EVP_DigestSignInit.argtypes = [vp, vp, vp, vp, vp]
c.EVP_DigestSign.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p, ctypes.c_size_t]
held = open(sys.argv[1], "rb")
data = held.read()
pkey = c.PEM_read_bio_PrivateKey(c.BIO_new_mem_buf(data, len(data)), None, None, None)
assert pkey
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
print("ready", flush=True)
while True:
    signal.sigwait([signal.SIGUSR1])
    m = c.EVP_MD_CTX_new()
    assert c.EVP_DigestSignInit(m, None, None, None, pkey) == 1
    sig = ctypes.create_string_buffer(64)
    n = ctypes.c_size_t(64)
    assert c.EVP_DigestSign(m, sig, ctypes.byref(n), b"held open", 9) == 1
"#;

/// Twenty processes of one user, started before the sensor, each holding
/// its own key file open, sign at the same moment (like the workers of a
/// server). More than one user's share of the search queue: the rest wait
/// for their turn, and every process has its key named from the file it
/// holds open.
#[test]
fn many_processes_of_one_user_signing_at_once_all_have_their_keys_named() {
    use std::io::BufRead;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let n = 20;
    let mut signers = Vec::new();
    for i in 0..n {
        let key = openssl_key(dir, &format!("held{i}"), "ed25519");
        let mut child = spawn(
            Command::new("python3")
                .args(["-c", HELD_OPEN_SIGNER])
                .arg(&key.path)
                .stdout(Stdio::piped()),
        );
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        signers.push((child, key));
    }
    let sensor_conf = sensor_config(dir, &[], &[]);
    let sensor = Sensor::start(&["--config", sensor_conf.to_str().unwrap()]);
    for (c, _) in &signers {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
    }
    // A process whose first signature was written unknown signs again
    // until each is named.
    wait_for("every signer's key named", Duration::from_secs(60), || {
        let events = sensor.events();
        let mut all = true;
        for (c, key) in &signers {
            let named = key_uses_of(&events, c.id())
                .iter()
                .any(|e| spki_of(e) == Some(key.spki.as_str()));
            if !named {
                all = false;
                if key_uses_of(&events, c.id()).is_empty() {
                    continue; // its first event is still held
                }
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGUSR1,
                )
                .unwrap();
            }
        }
        if !all {
            std::thread::sleep(Duration::from_millis(500));
        }
        all
    });
    let log = sensor.log();
    let events = sensor.stop();
    for (mut c, key) in signers {
        let uses = key_uses_of(&events, c.id());
        let _ = c.kill();
        let _ = c.wait();
        let stray = others(&uses, &[key.spki.as_str()]);
        // Unknown only while its search waited; never another key.
        assert!(
            stray.iter().all(|e| key_of(e).status == KeyStatus::Unknown),
            "{}",
            pretty(&stray)
        );
        assert!(
            uses.iter()
                .filter(|e| spki_of(e) == Some(key.spki.as_str()))
                .all(|e| key_of(e).source_file.is_none()
                    || key_of(e).source_file.as_deref() == key.path.to_str()),
            "{}",
            pretty(&uses)
        );
    }
    assert!(
        !log.contains("not searching the process"),
        "a search was dropped:\n{log}"
    );
}
