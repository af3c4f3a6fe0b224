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

/// `fixtures/go-tls` built with the host's Go (Debian's `golang-go`),
/// with symbols or with `-ldflags "-s -w"`. No modules, no network.
fn go_binary(dir: &Path, stripped: bool) -> PathBuf {
    let out = dir.join(if stripped { "kw-go-stripped" } else { "kw-go" });
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/go-tls/main.go");
    let mut cmd = Command::new("go");
    cmd.arg("build");
    if stripped {
        cmd.args(["-ldflags", "-s -w"]);
    }
    cmd.arg("-o")
        .arg(&out)
        .arg(src)
        .env("GO111MODULE", "off")
        .env(
            "GOCACHE",
            std::env::temp_dir().join("keywarden-test-gocache"),
        )
        .env("GOFLAGS", "-buildvcs=false");
    run_ok(&mut cmd);
    out
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

/// One handshake (a new curl process) from `127.0.0.<host>`.
fn handshake_from(port: u16, host: u8) {
    run_ok(
        Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "--interface"])
            .arg(format!("127.0.0.{host}"))
            .arg(format!("https://127.0.0.1:{port}/")),
    );
}

/// Warnings whose module is `path`, or whose process is `pid`.
fn warnings_about<'a>(events: &'a [Event], path: &str, pid: Option<u32>) -> Vec<&'a Event> {
    coverage_warnings(events)
        .into_iter()
        .filter(|e| {
            e.module.as_ref().is_some_and(|m| m.file.path == path)
                || Some(e.actor.process.pid) == pid
        })
        .collect()
}

/// A Go TLS server started after the sensor, which has no probe for Go:
/// it says so once, naming the binary and the process, however many
/// handshakes follow; `keywarden coverage` says so too.
#[test]
fn go_tls_server_is_warned_not_silent() {
    let dir = tempfile::tempdir().unwrap();
    for stripped in [false, true] {
        let bin = go_binary(dir.path(), stripped);
        let out = keywarden().arg("coverage").arg(&bin).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            text.contains(&format!("NOT COVERED  {}", bin.display())) && text.contains("Go"),
            "{text}"
        );
    }
    let bin = go_binary(dir.path(), false);
    let key = openssl_key(dir.path(), "server", "ec");
    let crt = cert(dir.path(), &key, "localhost");
    let port = free_port();
    let sensor = Sensor::start(&[]);
    let server = go_server(&bin, &crt, &key.path, port);
    for host in 2..5 {
        handshake_from(port, host);
    }
    let events = sensor.stop();
    let pid = server.pid();
    drop(server);
    let warnings = warnings_about(&events, bin.to_str().unwrap(), Some(pid));
    assert_eq!(warnings.len(), 1, "one warning: {}", pretty(&events));
    let detail = warnings[0].status_detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("Go programs sign with Go's own code"),
        "{detail}"
    );
    assert_eq!(
        warnings[0].actor.process.pid,
        pid,
        "{}",
        pretty(warnings[0])
    );
    assert!(key_uses_of(&events, pid).is_empty(), "{}", pretty(&events));
}

/// A running Go server makes the `ready` line's `uncovered` count and
/// `keywarden coverage` name it.
#[test]
fn a_running_go_server_is_counted_uncovered_at_ready() {
    let dir = tempfile::tempdir().unwrap();
    let bin = go_binary(dir.path(), true);
    let key = openssl_key(dir.path(), "server", "ec");
    let crt = cert(dir.path(), &key, "localhost");
    let port = free_port();
    let server = go_server(&bin, &crt, &key.path, port);
    let out = keywarden().arg("coverage").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!("NOT COVERED  {}", bin.display())),
        "{text}"
    );
    let sensor = Sensor::start(&[]);
    let log = sensor.log();
    let ready = log
        .lines()
        .find(|l| l.contains("ready"))
        .unwrap_or_else(|| panic!("{log}"))
        .to_owned();
    let events = sensor.stop();
    drop(server);
    assert!(!ready.contains("uncovered=0"), "{ready}");
    assert!(ready.contains(bin.to_str().unwrap()), "{ready}");
    assert_eq!(
        warnings_about(&events, bin.to_str().unwrap(), None).len(),
        1,
        "{}",
        pretty(&events)
    );
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
    let jvm: Vec<&Event> = coverage_warnings(&events)
        .into_iter()
        .filter(|e| {
            e.module
                .as_ref()
                .is_some_and(|m| m.file.path.ends_with("/libjvm.so"))
        })
        .collect();
    assert_eq!(jvm.len(), 1, "{}", pretty(&events));
    assert_eq!(jvm[0].actor.process.pid, pid, "{}", pretty(jvm[0]));
    let about_key: Vec<&Event> = coverage_warnings(&events)
        .into_iter()
        .filter(|e| {
            e.status_detail
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
        .filter(|e| {
            e.status_detail
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

/// `gnutls-serv` started after the sensor: the libgnutls it loads is named
/// in one warning, however many handshakes follow.
#[test]
fn gnutls_serv_is_warned_not_silent() {
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_key(dir.path(), "server", "ec");
    let crt = cert(dir.path(), &key, "localhost");
    let port = free_port();
    let sensor = Sensor::start(&[]);
    let server = gnutls_serv(&crt, &key.path, port);
    for host in 2..5 {
        handshake_from(port, host);
    }
    let events = sensor.stop();
    let pid = server.pid();
    drop(server);
    let warnings: Vec<&Event> = coverage_warnings(&events)
        .into_iter()
        .filter(|e| {
            e.module
                .as_ref()
                .is_some_and(|m| m.file.path.ends_with("/libgnutls.so.30"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{}", pretty(&events));
    assert_eq!(warnings[0].actor.process.pid, pid);
    assert!(
        warnings[0]
            .status_detail
            .as_deref()
            .unwrap_or_default()
            .contains("GnuTLS")
    );
}
