//! The crypto stacks besides OpenSSL and its forks: Go's own crypto,
//! GnuTLS, NSS, libgcrypt, and a JVM. Each is either covered (one event
//! per signature) or named in a `coverage_warning`, never silent.

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

/// A Go toolchain the tests build `fixtures/go-tls` with: the host's
/// (Debian's `golang-go`, Go 1.19), and Go 1.21, 1.23 and 1.24, which
/// `cargo xtask test` unpacks under `target/go` from Debian's
/// `golang-1.N-go` (xtask/src/go.rs). The newest comes last.
struct Go {
    go: PathBuf,
    /// What events name the ECDSA and Ed25519 signing functions.
    ecdsa: &'static str,
    ed25519: &'static str,
}

fn toolchains() -> Vec<Go> {
    let mut all = vec![Go {
        go: "go".into(),
        ecdsa: "crypto/ecdsa.Sign",
        ed25519: "crypto/ed25519.sign",
    }];
    // Go 1.20 made `SignASN1` the ECDSA signer; 1.24 moved Ed25519 into
    // the FIPS 140 module.
    for minor in [21, 23, 24] {
        let go = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "../target/go/go1.{minor}/usr/lib/go-1.{minor}/bin/go"
        ));
        assert!(
            go.exists(),
            "{} is missing: `cargo xtask test` unpacks it (xtask/src/go.rs)",
            go.display()
        );
        all.push(Go {
            go,
            ecdsa: "crypto/ecdsa.SignASN1",
            ed25519: if minor < 24 {
                "crypto/ed25519.sign"
            } else {
                "crypto/internal/fips140/ed25519.signWithDom"
            },
        });
    }
    all
}

/// `fixtures/go-tls` built with `go`, with symbols or with `-ldflags
/// "-s -w"`, under `target/go-fixtures/RELEASE/`. No modules, no network.
/// Built once per change of the source: the kernel matrix's guests see
/// the host's files read-only and run what the host built (`cargo xtask
/// vm-test` runs `go_fixture_builds_with_each_toolchain` first).
fn go_binary(go: &Path, stripped: bool) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/go-tls/main.go");
    let version = run_ok(Command::new(go).arg("version")).stdout;
    let release = String::from_utf8_lossy(&version)
        .split(' ')
        .nth(2)
        .unwrap_or("go")
        .to_owned();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/go-fixtures")
        .join(&release);
    std::fs::create_dir_all(&dir).unwrap();
    // As the sensor names it (no `..`), for the tests that compare paths.
    let dir = dir.canonicalize().unwrap();
    let out = dir.join(if stripped { "kw-go-stripped" } else { "kw-go" });
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&out).is_some_and(|built| Some(built) >= modified(&src)) {
        return out;
    }
    // Built beside its place and renamed: a test never runs half a file.
    let partial = dir.join(format!("partial-{}", std::process::id()));
    let mut cmd = Command::new(go);
    cmd.arg("build");
    if stripped {
        cmd.args(["-ldflags", "-s -w"]);
    }
    cmd.arg("-o")
        .arg(&partial)
        .arg(src)
        .env("GO111MODULE", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", dir.join("cache"))
        .env("GOFLAGS", "-buildvcs=false");
    run_ok(&mut cmd);
    std::fs::rename(&partial, &out).unwrap();
    out
}

/// Every fixture variant builds with each toolchain, and runs (a usage
/// error without arguments). `cargo xtask vm-test` runs this on the host
/// first, so its guests find the binaries built.
#[test]
fn go_fixture_builds_with_each_toolchain() {
    for go in toolchains() {
        for stripped in [false, true] {
            let bin = go_binary(&go.go, stripped);
            let out = Command::new(&bin).output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{}", bin.display());
            assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
        }
    }
}

fn go_server(bin: &Path, crt: &Path, key: &Path, port: u16) -> Server {
    start_server(
        Command::new(bin)
            .args(["server", "--cert"])
            .arg(crt)
            .arg("--key")
            .arg(key)
            .args(["--listen", &format!("127.0.0.1:{port}")]),
        port,
    )
}

fn gnutls_serv(crt: &Path, key: &Path, port: u16) -> Server {
    start_server(
        Command::new("gnutls-serv")
            .args(["--http", "--x509certfile"])
            .arg(crt)
            .arg("--x509keyfile")
            .arg(key)
            .args(["-p", &port.to_string()]),
        port,
    )
}

/// One TLS 1.2 handshake (from 127.0.0.1) that allows only RSA
/// PKCS #1 v1.5 signatures: Go signs with PSS wherever a client allows.
fn handshake_rsa_pkcs1(port: u16) {
    run_ok(
        Command::new("openssl")
            .args(["s_client", "-tls1_2", "-sigalgs", "RSA+SHA256", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null()),
    );
}

/// One handshake (a new curl process) from `127.0.0.<host>`.
fn handshake_from(port: u16, host: u8) {
    run_ok(
        Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "--interface"])
            .arg(format!("127.0.0.{host}"))
            .arg(format!("https://127.0.0.1:{port}/")),
    );
}

/// Warnings about a file (a library or executable) whose path `file`
/// accepts, or whose process is one of `pids`.
fn warnings_about<'a>(
    events: &'a [Event],
    file: impl Fn(&str) -> bool,
    pids: &[u32],
) -> Vec<&'a Event> {
    coverage_warnings(events)
        .into_iter()
        .filter(|e| {
            e.file.as_ref().is_some_and(|f| file(&f.path)) || pids.contains(&e.actor.process.pid)
        })
        .collect()
}

/// One direct signature by the Go fixture (`sign` mode: `SignASN1` or
/// `ed25519.Sign`), which must succeed; returns its pid.
fn go_sign(bin: &Path, key: &Path, data: &Path, out: &Path) -> u32 {
    let (pid, _) = run_pid_ok(
        Command::new(bin)
            .args(["sign", "--key"])
            .arg(key)
            .arg("--input")
            .arg(data)
            .arg("--output")
            .arg(out),
    );
    pid
}

/// Go TLS servers started after the sensor, built by each toolchain,
/// with symbols and stripped, with ECDSA, RSA and Ed25519 keys: one event
/// per handshake, naming the key, the function of that Go release and the
/// client; no coverage warning. RSA is also signed once with TLS 1.2 and
/// PKCS #1 v1.5 (Go uses PSS wherever the client allows it).
#[test]
fn go_tls_servers_name_every_handshake() {
    for go in toolchains() {
        let dir = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        for alg in ["ec", "rsa", "ed25519"] {
            let key = openssl_key(dir.path(), &format!("server-{alg}"), alg);
            let crt = cert(dir.path(), &key, &format!("localhost-{alg}"));
            for stripped in [false, true] {
                let bin = go_binary(&go.go, stripped);
                servers.push((alg, stripped, key.clone(), crt.clone(), bin, free_port()));
            }
        }
        let sensor = Sensor::start(&[]);
        let mut running = Vec::new();
        for (alg, stripped, key, crt, bin, port) in &servers {
            let server = go_server(bin, crt, &key.path, *port);
            for host in 2..5 {
                handshake_from(*port, host);
            }
            if *alg == "rsa" {
                handshake_rsa_pkcs1(*port);
            }
            running.push((
                server,
                *alg,
                *stripped,
                key.spki.clone(),
                *port,
                bin.clone(),
            ));
        }
        let events = sensor.stop();
        for (server, alg, stripped, spki, port, bin) in running {
            let pid = server.pid();
            drop(server);
            let what = format!("{} {alg} stripped={stripped}", go.go.display());
            let uses = key_uses_of(&events, pid);
            let mut peers = Vec::new();
            for e in &uses {
                assert_eq!(e.status, "Success", "{what}: {}", pretty(e));
                assert_eq!(spki_of(e), Some(spki.as_str()), "{what}: {}", pretty(e));
                assert_eq!(module_of(e).kind, "go", "{what}: {}", pretty(e));
                assert_eq!(local_of(e), ("127.0.0.1", port), "{what}: {}", pretty(e));
                peers.push((peer_of(e).0.to_owned(), module_of(e).function_name.clone()));
            }
            peers.sort();
            let mut expected: Vec<(String, String)> = match alg {
                "ec" => (2..5)
                    .map(|h| (format!("127.0.0.{h}"), go.ecdsa.to_owned()))
                    .collect(),
                "rsa" => (2..5)
                    .map(|h| (format!("127.0.0.{h}"), "crypto/rsa.SignPSS".to_owned()))
                    .chain([("127.0.0.1".to_owned(), "crypto/rsa.SignPKCS1v15".to_owned())])
                    .collect(),
                _ => (2..5)
                    .map(|h| (format!("127.0.0.{h}"), go.ed25519.to_owned()))
                    .collect(),
            };
            expected.sort();
            assert_eq!(peers, expected, "{what}: {}", pretty(&uses));
            let warnings = warnings_about(&events, |p| p == bin.to_str().unwrap(), &[pid]);
            assert!(warnings.is_empty(), "{what}: {}", pretty(&warnings));
        }
    }
}

/// A Go mTLS client signs its CertificateVerify, and a Go program that
/// calls `ecdsa.SignASN1` (Ed25519: the key's `Sign`) outside TLS: each
/// one event, naming the key.
#[test]
fn go_clients_and_direct_signatures_are_events() {
    for go in toolchains() {
        let dir = tempfile::tempdir().unwrap();
        let bin = go_binary(&go.go, true);
        let server_key = openssl_key(dir.path(), "server", "ec");
        let server_crt = cert(dir.path(), &server_key, "localhost");
        let client_key = openssl_key(dir.path(), "client", "ec");
        let client_crt = cert(dir.path(), &client_key, "client");
        let ed_key = openssl_key(dir.path(), "direct-ed", "ed25519");
        let data = dir.path().join("data");
        std::fs::write(&data, b"signed outside TLS").unwrap();
        let port = free_port();
        let sensor = Sensor::start(&[]);
        let server = go_server(&bin, &server_crt, &server_key.path, port);
        let client = Command::new(&bin)
            .args(["client", "--cert"])
            .arg(&client_crt)
            .arg("--key")
            .arg(&client_key.path)
            .args(["--connect", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let client_pid = client.id();
        let out = client.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
        let mut signers = Vec::new();
        for key in [&client_key, &ed_key] {
            let pid = go_sign(&bin, &key.path, &data, &dir.path().join("sig"));
            signers.push((pid, key.spki.clone()));
        }
        let events = sensor.stop();
        drop(server);
        let what = go.go.display();
        let client_uses = key_uses_of(&events, client_pid);
        assert_eq!(client_uses.len(), 1, "{what}: {}", pretty(&events));
        assert_eq!(spki_of(client_uses[0]), Some(client_key.spki.as_str()));
        assert_eq!(
            peer_of(client_uses[0]).1,
            port,
            "{}",
            pretty(client_uses[0])
        );
        for (pid, spki) in signers {
            let uses = key_uses_of(&events, pid);
            assert_eq!(uses.len(), 1, "{what}: {}", pretty(&events));
            assert_eq!(spki_of(uses[0]), Some(spki.as_str()), "{}", pretty(uses[0]));
            assert_eq!(module_of(uses[0]).kind, "go");
        }
    }
}

/// One Go process signing with two ECDSA keys in turn through one key
/// object, overwritten with each key (what a freed key's address reused
/// for another key amounts to): every event names the key that signed.
/// Verdicts are kept by key object (`func::Handle::GoKey`), named with
/// the public key, not the address alone.
#[test]
fn go_keys_at_reused_addresses_are_told_apart() {
    let go = toolchains().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = go_binary(&go.go, false);
    let a = openssl_key(dir.path(), "a", "ec");
    let b = openssl_key(dir.path(), "b", "ec");
    let data = dir.path().join("data");
    std::fs::write(&data, b"two keys").unwrap();
    let sensor = Sensor::start(&[]);
    let child = Command::new(&bin)
        .args(["sign-many", "--rounds", "6", "--keys"])
        .arg(format!("{},{}", a.path.display(), b.path.display()))
        .arg("--input")
        .arg(&data)
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    let events = sensor.stop();
    let named: Vec<&str> = key_uses_of(&events, pid)
        .iter()
        .map(|e| spki_of(e).unwrap_or("none"))
        .collect();
    let expected: Vec<&str> = (0..6)
        .flat_map(|_| [a.spki.as_str(), b.spki.as_str()])
        .collect();
    assert_eq!(named, expected, "{}", pretty(&events));
}

/// A Go release keywarden cannot read the functions of is named, not
/// silently passed over: a binary whose build information does not give
/// its release (as Go 1.17 and older write it) is warned about.
#[test]
fn go_binary_of_unknown_release_is_warned() {
    let dir = tempfile::tempdir().unwrap();
    let bin = go_binary(Path::new("go"), false);
    // Overwrite the release string's prefix in `.go.buildinfo`: what an
    // older Go's pointer-format header gives the scan, an unknown release.
    let mut bytes = std::fs::read(&bin).unwrap();
    let at = bytes
        .windows(14)
        .position(|w| w == b"\xff Go buildinf:")
        .expect("build information");
    bytes[at + 15] &= !2;
    let old = dir.path().join("kw-go-old");
    std::fs::write(&old, &bytes).unwrap();
    let out = keywarden().arg("coverage").arg(&old).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!("NOT COVERED  {}", old.display()))
            && text.contains("Go 1.18 or later"),
        "{text}"
    );
}

/// 100 concurrent handshakes to a Go server (Go 1.24), each from its own
/// loopback address: every event names a real connection, and each
/// address exactly once, as for nginx. Goroutines, not threads, serve
/// the connections here, and any of them may run on any thread.
#[test]
fn go_peers_under_100_concurrent_handshakes() {
    let go = toolchains().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = go_binary(&go.go, false);
    let key = openssl_key(dir.path(), "server", "ec");
    let crt = cert(dir.path(), &key, "localhost");
    let port = free_port();
    let sensor = Sensor::start(&[]);
    let server = go_server(&bin, &crt, &key.path, port);
    let clients = hundred_concurrent_handshakes(port);
    let events = sensor.stop();
    let pid = server.pid();
    drop(server);
    let uses = key_uses_of(&events, pid);
    let mut per_ip: std::collections::BTreeMap<String, usize> = Default::default();
    for &e in &uses {
        assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
        let (ip, p) = peer_of(e);
        assert!(
            clients.contains(&(ip.to_owned(), p)),
            "{ip}:{p} is not one of the connections: {}",
            pretty(e)
        );
        *per_ip.entry(ip.to_owned()).or_default() += 1;
    }
    let expected: std::collections::BTreeMap<String, usize> =
        (2..102).map(|i| (format!("127.0.0.{i}"), 1)).collect();
    assert_eq!(per_ip, expected);
}

/// 1,000 handshakes to a Go server under the sensor: every one
/// succeeds (the return-instruction probes leave Go's stacks alone) and
/// every one is an event.
#[test]
fn go_server_serves_a_thousand_handshakes() {
    let go = toolchains().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = go_binary(&go.go, false);
    let key = openssl_key(dir.path(), "server", "ec");
    let crt = cert(dir.path(), &key, "localhost");
    let port = free_port();
    let sensor = Sensor::start(&[]);
    let server = go_server(&bin, &crt, &key.path, port);
    let script = format!(
        "import socket, ssl\n\
         ctx = ssl.create_default_context()\n\
         ctx.check_hostname = False\n\
         ctx.verify_mode = ssl.CERT_NONE\n\
         ok = 0\n\
         for _ in range(1000):\n\
         \x20   with socket.create_connection(('127.0.0.1', {port})) as s:\n\
         \x20       with ctx.wrap_socket(s) as t:\n\
         \x20           t.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         \x20           ok += t.recv(4096).startswith(b'HTTP/1.0 200')\n\
         print(ok)\n"
    );
    let out = run_ok(Command::new("python3").arg("-c").arg(script));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000");
    let mut server = server;
    assert!(server.is_running(), "the Go server died under the probes");
    let events = sensor.stop();
    let pid = server.pid();
    drop(server);
    let uses = key_uses_of(&events, pid);
    assert_eq!(uses.len(), 1000, "{}", pretty(&events.len()));
    assert!(uses.iter().all(|e| spki_of(e) == Some(key.spki.as_str())));
}

/// A Go server started before the sensor (stripped, so found through
/// `.gopclntab`) is covered: `keywarden coverage` says so, the `ready`
/// line does not count it uncovered, and its handshakes are events.
#[test]
fn a_running_go_server_is_covered_from_ready() {
    let dir = tempfile::tempdir().unwrap();
    let bin = go_binary(Path::new("go"), true);
    let key = openssl_key(dir.path(), "server", "ec");
    let crt = cert(dir.path(), &key, "localhost");
    let port = free_port();
    let server = go_server(&bin, &crt, &key.path, port);
    let out = keywarden().arg("coverage").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("covered      {} [go]", bin.display())),
        "{text}"
    );
    let sensor = Sensor::start(&[]);
    let log = sensor.log();
    let ready = log
        .lines()
        .find(|l| l.contains("ready"))
        .unwrap_or_else(|| panic!("{log}"))
        .to_owned();
    for host in 2..4 {
        handshake_from(port, host);
    }
    let events = sensor.stop();
    let pid = server.pid();
    drop(server);
    let (attached, not_covered) = ready.split_once("NOT covered").unwrap_or((&ready, ""));
    assert!(
        attached.contains(&format!("{} (go)", bin.display()))
            && !not_covered.contains(bin.to_str().unwrap()),
        "{ready}"
    );
    // The sensor's own handshakes (from 127.0.0.1), which learn what the
    // listener presents, are signatures too.
    let uses = key_uses_of(&events, pid);
    let mut peers: Vec<&str> = uses
        .iter()
        .map(|e| peer_of(e).0)
        .filter(|ip| *ip != "127.0.0.1")
        .collect();
    peers.sort();
    assert_eq!(peers, ["127.0.0.2", "127.0.0.3"], "{}", pretty(&uses));
    assert!(
        uses.iter().all(|e| spki_of(e) == Some(key.spki.as_str())),
        "{}",
        pretty(&uses)
    );
    assert!(warnings_about(&events, |p| p == bin.to_str().unwrap(), &[pid]).is_empty());
}

/// A JVM signs in JIT-compiled code: the `libjvm.so` it maps is named in
/// one warning, and its later open of a key file adds none.
#[test]
fn a_jvm_is_warned() {
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_key(dir.path(), "k", "ec");
    // PKCS#8 DER, which Java reads without help.
    let der = dir.path().join("k.der");
    run_ok(
        Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&key.path)
            .arg("-out")
            .arg(&der),
    );
    let src = dir.path().join("Sign.java");
    std::fs::write(
        &src,
        "import java.nio.file.*; import java.security.*; import java.security.spec.*;\n\
         public class Sign { public static void main(String[] a) throws Exception {\n\
         byte[] k = Files.readAllBytes(Path.of(a[0]));\n\
         PrivateKey p = KeyFactory.getInstance(\"EC\").generatePrivate(new PKCS8EncodedKeySpec(k));\n\
         Signature s = Signature.getInstance(\"SHA256withECDSA\"); s.initSign(p); s.update(k);\n\
         System.out.println(s.sign().length); System.in.read(); } }\n",
    )
    .unwrap();
    let sensor = Sensor::start(&[]);
    let mut java = Command::new("java")
        .arg(&src)
        .arg(&der)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = java.id();
    // It signed once it prints the length.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(java.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.trim().parse::<u32>().is_ok(), "{line:?}");
    wait_for("the JVM warning", Duration::from_secs(20), || {
        coverage_warnings(&sensor.events()).iter().any(|e| {
            e.status_detail
                .as_deref()
                .unwrap_or_default()
                .contains("Java")
        })
    });
    drop(java.stdin.take());
    java.wait().unwrap();
    let events = sensor.stop();
    let jvm = warnings_about(&events, |p| p.ends_with("/libjvm.so"), &[]);
    assert_eq!(jvm.len(), 1, "{}", pretty(&events));
    assert_eq!(jvm[0].actor.process.pid, pid, "{}", pretty(jvm[0]));
    let about_key: Vec<&Event> = coverage_warnings(&events)
        .into_iter()
        // Only this test's process: sensors of the tests beside it read
        // key files as they start, and are warned about too.
        .filter(|e| {
            e.actor.process.pid == pid
                && e.status_detail
                    .as_deref()
                    .unwrap_or_default()
                    .contains("private key file")
        })
        .collect();
    assert!(about_key.is_empty(), "{}", pretty(&about_key));
}

/// A program that reads a private key and maps nothing the probes see
/// (here a Python interpreter without any crypto module) is warned about
/// once, naming the key file; one that maps libcrypto is not.
#[test]
fn a_key_opener_without_covered_code_is_warned() {
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_key(dir.path(), "k", "ec");
    let sensor = Sensor::start(&[]);
    let script =
        "import sys; open(sys.argv[1], 'rb').read(); print('read', flush=True); sys.stdin.read()";
    let opener = |import: &str| {
        let mut child = Command::new("python3")
            .args(["-c", &format!("{import}{script}")])
            .arg(&key.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "read");
        child
    };
    // With libcrypto mapped (through hashlib) first: no warning.
    let mut covered = opener("import hashlib; ");
    let covered_pid = covered.id();
    wait_for("its open to be reported", Duration::from_secs(20), || {
        !secret_opens_of(&sensor.events(), covered_pid).is_empty()
    });
    drop(covered.stdin.take());
    covered.wait().unwrap();
    let mut bare = opener("");
    let pid = bare.id();
    wait_for("the warning", Duration::from_secs(20), || {
        coverage_warnings(&sensor.events())
            .iter()
            .any(|e| e.actor.process.pid == pid)
    });
    drop(bare.stdin.take());
    bare.wait().unwrap();
    let events = sensor.stop();
    let about_key: Vec<&Event> = coverage_warnings(&events)
        .into_iter()
        // Only this test's processes: sensors of the tests beside it read
        // key files as they start, and are warned about too.
        .filter(|e| {
            [pid, covered_pid].contains(&e.actor.process.pid)
                && e.status_detail
                    .as_deref()
                    .unwrap_or_default()
                    .contains("private key file")
        })
        .collect();
    assert_eq!(about_key.len(), 1, "{}", pretty(&about_key));
    assert_eq!(about_key[0].actor.process.pid, pid);
    let detail = about_key[0].status_detail.as_deref().unwrap();
    assert!(detail.contains(key.path.to_str().unwrap()), "{detail}");
}

/// `gnutls-serv` started after the sensor, with an ECDSA and then an RSA
/// key, answering handshakes from distinct loopback addresses: exactly
/// one event per handshake (GnuTLS signs each with
/// `gnutls_privkey_sign_data2`), naming the key and the connection, one
/// more when it loads the key, and no coverage warning for libgnutls.
#[test]
fn gnutls_serv_names_every_handshake() {
    for alg in ["ec", "rsa"] {
        let dir = tempfile::tempdir().unwrap();
        let key = openssl_key(dir.path(), "server", alg);
        let crt = cert(dir.path(), &key, "localhost");
        let port = free_port();
        let sensor = Sensor::start(&[]);
        let server = gnutls_serv(&crt, &key.path, port);
        let hosts: Vec<u8> = (2..6).collect();
        for &host in &hosts {
            handshake_from(port, host);
        }
        // TLS 1.2 signs the ServerKeyExchange instead: still one.
        run_ok(
            Command::new("curl")
                .args([
                    "-sk",
                    "-o",
                    "/dev/null",
                    "--tls-max",
                    "1.2",
                    "--interface",
                    "127.0.0.9",
                ])
                .arg(format!("https://127.0.0.1:{port}/")),
        );
        let events = sensor.stop();
        let pid = server.pid();
        drop(server);
        let all = key_uses_of(&events, pid);
        // GnuTLS signs once when it loads the key, to check that key and
        // certificate match: a real signature, outside any connection.
        let (uses, at_load): (Vec<&Event>, Vec<&Event>) =
            all.iter().partition(|e| e.unmapped.peer.is_some());
        assert_eq!(at_load.len(), 1, "{alg}: {}", pretty(&all));
        assert_eq!(spki_of(at_load[0]), Some(key.spki.as_str()));
        assert_eq!(uses.len(), hosts.len() + 1, "{alg}: {}", pretty(&all));
        let mut peers: Vec<String> = Vec::new();
        for &e in &uses {
            assert_eq!(e.status, "Success", "{}", pretty(e));
            assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
            assert_eq!(module_of(e).kind, "gnutls", "{}", pretty(e));
            assert_eq!(
                module_of(e).function_name,
                "gnutls_privkey_sign_data2",
                "{}",
                pretty(e)
            );
            assert_eq!(local_of(e), ("127.0.0.1", port), "{}", pretty(e));
            peers.push(peer_of(e).0.to_owned());
        }
        peers.sort();
        assert_eq!(
            peers,
            [
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.4",
                "127.0.0.5",
                "127.0.0.9"
            ],
            "{alg}"
        );
        let gnutls_warnings = warnings_about(&events, |p| p.contains("libgnutls"), &[pid]);
        assert!(gnutls_warnings.is_empty(), "{}", pretty(&gnutls_warnings));
    }
}

/// GnuTLS key objects freed and reallocated at the same address, each
/// time with another key (`fixtures/gnutls/sign.py`, Python's ctypes):
/// every event names the key that signed. Once the sensor watches the
/// process's frees (after its first signature), a key object's second
/// signature comes from the sensor's cache (`handle_cache`); the next
/// object at that address, another key, is verified again, because
/// `gnutls_privkey_deinit` voided the verdict. (Objects of a third key
/// after the pause settle the heap, so that the last three share one
/// address, which the test checks. Where an object lands depends on the
/// whole heap's history, even on the size of the environment, so the
/// script runs with PATH alone.)
#[test]
fn gnutls_keys_at_reused_addresses_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let a = openssl_key(dir.path(), "a", "ec");
    let b = openssl_key(dir.path(), "b", "ec");
    let c = openssl_key(dir.path(), "c", "ec");
    let sensor = Sensor::start(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/gnutls/sign.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let jobs = format!(
        "{c} 1 wait\n{c} 1\n{c} 1\n{a} 2\n{b} 2\n{a} 1\n\n",
        a = a.path.display(),
        b = b.path.display(),
        c = c.path.display()
    );
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, jobs.as_bytes()).unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "waiting\n");
    sensor.wait_for_free_watch(pid);
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    // Worth something only if the last three objects shared an address.
    let addresses: Vec<&str> = rest.lines().collect();
    assert_eq!(addresses.len(), 6, "{rest}");
    assert!(
        addresses[3..].iter().all(|x| *x == addresses[3]),
        "not reused: {rest}"
    );
    wait_for("eight signatures", Duration::from_secs(20), || {
        key_uses_of(&sensor.events(), pid).len() >= 8
    });
    let events = sensor.stop();
    let uses = key_uses_of(&events, pid);
    let named: Vec<&str> = uses.iter().map(|e| spki_of(e).unwrap_or("none")).collect();
    let (a, b, c) = (a.spki.as_str(), b.spki.as_str(), c.spki.as_str());
    assert_eq!(named, [c, c, c, a, a, b, b, a], "{}", pretty(&uses));
    use keywarden_analyzer::event::IdentifiedBy::{HandleCache, SignatureVerified};
    let by: Vec<_> = uses[3..].iter().map(|e| key_of(e).identified_by).collect();
    assert_eq!(
        by,
        [
            Some(SignatureVerified),
            Some(HandleCache),
            Some(SignatureVerified),
            Some(HandleCache),
            Some(SignatureVerified),
        ],
        "{}",
        pretty(&uses)
    );
}

/// The SPKI SHA-256 of a GnuPG key, computed without the sensor: GnuPG
/// exports it as an OpenSSH public key, whose blob ends with the key
/// (Ed25519), or which `ssh-keygen` turns into a PKCS #8 public key.
fn gpg_key_spki(gpg: &dyn Fn(&[&str]) -> std::process::Output) -> String {
    let listing = String::from_utf8(gpg(&["--list-keys", "--with-colons"]).stdout).unwrap();
    let fpr = listing
        .lines()
        .find_map(|l| l.strip_prefix("fpr:::::::::"))
        .and_then(|l| l.split(':').next())
        .expect("a fingerprint")
        .to_owned();
    let ssh = String::from_utf8(gpg(&["--export-ssh-key", &format!("{fpr}!")]).stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.pub");
    let der = if ssh.starts_with("ssh-ed25519 ") {
        // ssh-keygen does not export Ed25519 as PKCS #8; the blob ends
        // with the 32-byte key.
        std::fs::write(&file, ssh.split(' ').nth(1).unwrap()).unwrap();
        let blob = run_ok(Command::new("base64").arg("-d").arg(&file)).stdout;
        let mut der = hex::decode("302a300506032b6570032100").unwrap();
        der.extend_from_slice(&blob[blob.len() - 32..]);
        der
    } else {
        std::fs::write(&file, &ssh).unwrap();
        let pem = run_ok(
            Command::new("ssh-keygen")
                .args(["-e", "-m", "PKCS8", "-f"])
                .arg(&file),
        );
        std::fs::write(&file, &pem.stdout).unwrap();
        run_ok(
            Command::new("openssl")
                .args(["pkey", "-pubin", "-outform", "DER", "-in"])
                .arg(&file),
        )
        .stdout
    };
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der))
}

/// `gpg --sign` with Ed25519, ECDSA P-256 and RSA keys: gpg-agent signs
/// with libgcrypt's `gcry_pk_sign`. The key is made before the sensor
/// starts, so its gpg-agent was running already; three signatures after
/// `ready` give exactly three events, each naming the key by its SPKI
/// (computed here from GnuPG's own export), through the public key of
/// the key S-expression (`signing_call_key`). libgcrypt is not warned
/// about.
#[test]
fn gpg_signatures_name_their_key() {
    for alg in ["ed25519", "nistp256", "rsa2048"] {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("gnupg");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let data = dir.path().join("data");
        std::fs::write(&data, b"signed by gpg").unwrap();
        let gpg = |args: &[&str]| {
            run_ok(
                Command::new("gpg")
                    .arg("--homedir")
                    .arg(&home)
                    .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                    .args(args),
            )
        };
        gpg(&[
            "--quick-gen-key",
            "kw-test@example.invalid",
            alg,
            "sign",
            "1d",
        ]);
        let spki = gpg_key_spki(&gpg);
        let sensor = Sensor::start(&[]);
        for i in 0..3 {
            let out = dir.path().join(format!("data{i}.gpg"));
            gpg(&[
                "--output",
                out.to_str().unwrap(),
                "--sign",
                data.to_str().unwrap(),
            ]);
        }
        let agent = |events: &[Event]| -> Vec<Event> {
            key_uses(events)
                .into_iter()
                .filter(|e| e.actor.process.name == "gpg-agent")
                .filter(|e| {
                    let cmd = e.actor.process.cmd_line.as_deref().unwrap_or_default();
                    cmd.contains(home.to_str().unwrap())
                })
                .cloned()
                .collect()
        };
        wait_for(
            "three gpg-agent signatures",
            Duration::from_secs(20),
            || agent(&sensor.events()).len() >= 3,
        );
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&home)
            .args(["--kill", "gpg-agent"])
            .status();
        let events = sensor.stop();
        let uses = agent(&events);
        assert_eq!(uses.len(), 3, "{alg}: {}", pretty(&uses));
        for e in &uses {
            assert_eq!(spki_of(e), Some(spki.as_str()), "{alg}: {}", pretty(e));
            assert_eq!(module_of(e).function_name, "gcry_pk_sign");
            assert_eq!(module_of(e).kind, "libgcrypt");
            assert_eq!(
                key_of(e).identified_by,
                Some(keywarden_analyzer::event::IdentifiedBy::SigningCallKey),
                "{alg}"
            );
        }
        let warned = warnings_about(&events, |p| p.contains("libgcrypt.so"), &[]);
        assert!(warned.is_empty(), "{}", pretty(&warned));
    }
}

/// NSS's `certutil`, run after the sensor, signs a certificate request
/// with an ECDSA and with an RSA key of its database: one event per
/// signature, through `PK11_SignWithMechanism` (`PK11_Sign` tail-calls
/// it), naming the key. NSS keeps keys in its database, not in key files:
/// the sensor knows each public key from its certificate, exported to a
/// directory it watches. libnss3 is not warned about.
#[test]
fn nss_certutil_signatures_are_events() {
    let dir = tempfile::tempdir().unwrap();
    let nssdb = dir.path().join("nssdb");
    std::fs::create_dir(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    let noise = dir.path().join("noise");
    std::fs::write(
        &noise,
        (0..256u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let certutil = |args: &[&str]| {
        let mut cmd = Command::new("certutil");
        cmd.args(args).arg("-d").arg(&db);
        cmd
    };
    run_ok(&mut certutil(&["-N", "--empty-password"]));
    // Keys made before the sensor starts, each with a self-signed
    // certificate, exported where the sensor looks.
    // (Nicknames that are not key types: `-k` takes either.)
    let keys = [
        ("eckey", ["-k", "ec", "-q", "nistp256"]),
        ("rsakey", ["-k", "rsa", "-g", "2048"]),
    ];
    let mut spkis = Vec::new();
    for (nick, kind) in &keys {
        let subject = format!("CN={nick}");
        let mut args = vec!["-S", "-n", nick, "-s", &subject, "-x", "-t", "C,,", "-z"];
        let noise = noise.to_str().unwrap();
        args.push(noise);
        args.extend(kind);
        run_ok(&mut certutil(&args));
        let pem = run_ok(&mut certutil(&["-L", "-n", nick, "-a"])).stdout;
        let crt = certs.join(format!("{nick}.crt"));
        std::fs::write(&crt, pem).unwrap();
        let out = run_ok(Command::new("sh").arg("-c").arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum",
            crt.display()
        )));
        let spki = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        spkis.push(spki);
    }
    let config = sensor_config(dir.path(), &[&certs], &[]);
    let sensor = Sensor::start(&["--config", config.to_str().unwrap()]);
    let mut pids = Vec::new();
    for (nick, _) in &keys {
        let req = dir.path().join(format!("{nick}.req"));
        let subject = format!("CN={nick} request");
        let child = certutil(&[
            "-R",
            "-k",
            nick,
            "-s",
            &subject,
            "-z",
            noise.to_str().unwrap(),
            "-o",
            req.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "certutil -R {nick}: {out:?}");
        pids.push(pid);
    }
    let events = sensor.stop();
    for (((nick, _), pid), spki) in keys.iter().zip(&pids).zip(&spkis) {
        let uses = key_uses_of(&events, *pid);
        assert_eq!(uses.len(), 1, "{nick}: one signature: {}", pretty(&uses));
        let e = uses[0];
        assert_eq!(e.status, "Success", "{}", pretty(e));
        assert_eq!(module_of(e).kind, "nss", "{}", pretty(e));
        assert_eq!(
            module_of(e).function_name,
            "PK11_SignWithMechanism",
            "{}",
            pretty(e)
        );
        assert_eq!(spki_of(e), Some(spki.as_str()), "{nick}: {}", pretty(e));
    }
    let nss_warnings = warnings_about(&events, |p| p.contains("libnss3"), &pids);
    assert!(nss_warnings.is_empty(), "{}", pretty(&nss_warnings));
}

/// A Go program whose `.gopclntab` is hostile, run by `nobody`: copies of
/// the stripped fixture with the table's function count, or the offset
/// of its function table, set far past its end. The sensor scans each
/// when it is exec'd, names each in a `coverage_warning` that says what
/// is wrong with its table, and goes on: a Go signature made afterwards
/// is still an event. (What the copies do once released does not
/// matter: they are run without the arguments they need.)
#[test]
fn a_go_binary_with_a_hostile_pclntab_is_named_not_fatal() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    let go = toolchains().pop().unwrap();
    let stripped = go_binary(&go.go, true);
    let bytes = std::fs::read(&stripped).unwrap();
    let table = {
        use object::{Object, ObjectSection};
        let file = object::File::parse(bytes.as_slice()).unwrap();
        let (offset, _) = file
            .section_by_name(".gopclntab")
            .and_then(|s| s.file_range())
            .expect("the fixture has a .gopclntab");
        offset as usize
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // (name, byte offset in the table's header, value): the function
    // count, and the offset of the function table.
    let hostile = [
        ("kw-go-nfunc", 8, u64::MAX / 2),
        ("kw-go-pcln", 64, u64::MAX - 7),
    ];
    let sensor = Sensor::start(&[]);
    let mut paths = Vec::new();
    for (name, at, value) in hostile {
        let mut copy = bytes.clone();
        copy[table + at..table + at + 8].copy_from_slice(&value.to_le_bytes());
        let path = dir.path().join(name);
        std::fs::write(&path, &copy).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Command::new(&path)
            .arg("sign")
            .uid(65534)
            .gid(65534)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        paths.push(path.to_str().unwrap().to_owned());
    }
    wait_for("a warning for each copy", Duration::from_secs(20), || {
        let events = sensor.events();
        paths
            .iter()
            .all(|p| !warnings_about(&events, |f| f == p.as_str(), &[]).is_empty())
    });
    // Still watching Go: a real Go signature after the attack.
    let key = openssl_key(dir.path(), "after", "ec");
    let data = dir.path().join("data");
    std::fs::write(&data, b"after the hostile tables").unwrap();
    let pid = go_sign(&stripped, &key.path, &data, &dir.path().join("sig"));
    wait_for(
        "the Go signature after them",
        Duration::from_secs(20),
        || {
            key_uses_of(&sensor.events(), pid)
                .iter()
                .any(|e| spki_of(e) == Some(key.spki.as_str()))
        },
    );
    let events = sensor.stop();
    for p in &paths {
        let warned = warnings_about(&events, |f| f == p.as_str(), &[]);
        assert_eq!(warned.len(), 1, "{p}: {}", pretty(&warned));
        let detail = warned[0].status_detail.as_deref().unwrap_or_default();
        assert!(detail.contains(".gopclntab"), "{detail}");
    }
}
