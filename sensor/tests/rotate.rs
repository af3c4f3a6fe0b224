//! `keywarden rotate` against a real nginx on loopback with two keys chosen
//! by SNI. The sensor runs first, sees both keys sign, and saves the
//! inventory that `rotate` plans from; nginx is then rotated for real and
//! checked by handshake (rustls in `rotate`, openssl `s_client` here).
//!
//! Fault cases are real too: a reload nginx refuses (its configuration was
//! broken after it started), a service that does not reload (its master
//! stopped), and a rotation SIGKILLed between install and reload (stopped
//! there by the documented test hook `KEYWARDEN_ROTATE_STOP_AFTER`, then
//! killed).

mod support;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use support::*;

/// The bulk test floods the host with signatures, key files and reloads
/// of nginx; a sensor of another test would see them, and the names of
/// its 50 certificates would join the other tests' plans. It runs alone
/// (`exclusive_host`); the others run side by side (`shared_host`).
static HOST: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared_host() -> std::sync::RwLockReadGuard<'static, ()> {
    HOST.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive_host() -> std::sync::RwLockWriteGuard<'static, ()> {
    HOST.write().unwrap_or_else(|e| e.into_inner())
}

struct Fixture {
    _host: std::sync::RwLockReadGuard<'static, ()>,
    work: tempfile::TempDir,
    keys_dir: PathBuf,
    nginx: Server,
    port: u16,
    a: TestKey,
    b: TestKey,
    crt_a: PathBuf,
    /// A key only `openssl s_server` uses: keywarden cannot reload it.
    c: TestKey,
    s_server: Server,
    config: PathBuf,
    journal_dir: PathBuf,
}

impl Fixture {
    fn dir(&self) -> &Path {
        self.work.path()
    }
}

/// A CA key and certificate made by openssl.
fn openssl_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = openssl_key(dir, &format!("{name}-ca"), "ec").path;
    let crt = dir.join(format!("{name}-ca.crt"));
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-new", "-days", "2", "-subj"])
            .arg(format!("/CN={name} test CA"))
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-key")
            .arg(&key)
            .arg("-out")
            .arg(&crt),
    );
    (key, crt)
}

/// nginx with a.test (default server) and b.test on one port, an
/// `openssl s_server` with a third key, a sensor that watched all three
/// sign and saved its inventory, and a configuration for `rotate`.
fn setup(edits: &[(&str, String)]) -> Fixture {
    let host = shared_host();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let keys_dir = dir.join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let a = openssl_key(&keys_dir, "a", "ec");
    let b = openssl_key(&keys_dir, "b", "ec");
    let c = openssl_key(&keys_dir, "c", "ec");
    // a and b were issued by the local CA (so it can revoke them), c is
    // self-signed.
    let (ca_key, ca_crt) = openssl_ca(dir, "local");
    let crt_a = ca_cert(&keys_dir, &a, "a.test", &ca_key, &ca_crt);
    let crt_b = ca_cert(&keys_dir, &b, "b.test", &ca_key, &ca_crt);
    let crt_c = cert(&keys_dir, &c, "c.test");
    let port = free_port();
    let server = |name: &str, crt: &Path, key: &Path| {
        format!(
            "server {{ listen 127.0.0.1:{port} ssl; server_name {name}; ssl_certificate {}; ssl_certificate_key {}; \
             ssl_session_cache off; ssl_session_tickets off; location / {{ return 200 \"{name}\\n\"; }} }}\n",
            crt.display(),
            key.display()
        )
    };
    let nginx = start_nginx(
        dir,
        port,
        &(server("a.test", &crt_a, &a.path) + &server("b.test", &crt_b, &b.path)),
    );
    let c_port = free_port();
    let s_server = start_server(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{c_port}"))
            .arg("-key")
            .arg(&c.path)
            .arg("-cert")
            .arg(&crt_c)
            .stdin(Stdio::null()),
        c_port,
    );
    let journal_dir = dir.join("journal");
    let inventory = dir.join("inventory.json");
    let mut all_edits = vec![
        (
            "inventory: /var/lib/keywarden/inventory.json",
            format!("inventory: {}", inventory.display()),
        ),
        (
            "journal_dir: /var/lib/keywarden/rotations",
            format!("journal_dir: {}", journal_dir.display()),
        ),
        (
            "  local_ca: null",
            format!(
                "  local_ca: {{ key: {}, cert: {}, crl: {} }}",
                ca_key.display(),
                ca_crt.display(),
                dir.join("local.crl").display()
            ),
        ),
    ];
    all_edits.extend(edits.iter().cloned());
    let config = sensor_config(dir, &[&keys_dir], &all_edits);

    let sensor = Sensor::start(&[
        "--config",
        config.to_str().unwrap(),
        "--inventory",
        inventory.to_str().unwrap(),
    ]);
    for name in ["a.test", "b.test"] {
        assert_eq!(served_spki(port, Some(name)), spki_of(&keys_dir, name));
    }
    let out = run_ok(
        Command::new("curl")
            .args(["-sk", &format!("https://127.0.0.1:{c_port}/")])
            .stdout(Stdio::null()),
    );
    drop(out);
    sensor.stop_allowing_shed();
    assert!(inventory.exists(), "the sensor saved no inventory");
    Fixture {
        _host: host,
        work,
        keys_dir,
        nginx,
        port,
        a,
        b,
        crt_a,
        c,
        s_server,
        config,
        journal_dir,
    }
}

/// A certificate for `name` (also 127.0.0.1) issued by the CA.
fn ca_cert(dir: &Path, key: &TestKey, name: &str, ca_key: &Path, ca_crt: &Path) -> PathBuf {
    let crt = dir.join(format!("{name}.crt"));
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-new", "-days", "2", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-addext")
            .arg(format!("subjectAltName=DNS:{name},IP:127.0.0.1"))
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-CA")
            .arg(ca_crt)
            .arg("-CAkey")
            .arg(ca_key)
            .arg("-key")
            .arg(&key.path)
            .arg("-out")
            .arg(&crt),
    );
    crt
}

fn spki_of(keys_dir: &Path, name: &str) -> String {
    spki_of_file(&keys_dir.join(format!("{}.pem", &name[..1])))
}

/// The SPKI SHA-256 of the leaf the server on `port` presents for
/// `name`, by `openssl s_client` (not keywarden's own handshake).
fn served_spki(port: u16, name: Option<&str>) -> String {
    let mut cmd = String::from("openssl s_client -connect 127.0.0.1:");
    cmd.push_str(&port.to_string());
    if let Some(n) = name {
        cmd.push_str(&format!(" -servername {n}"));
    } else {
        cmd.push_str(" -noservername");
    }
    cmd.push_str(
        " </dev/null 2>/dev/null | openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum",
    );
    let out = run_ok(Command::new("sh").arg("-c").arg(cmd));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// `keywarden SUBCOMMAND --config <the fixture's> ARGS...`, run to its end.
fn keywarden_on(f: &Fixture, subcommand: &str, args: &[&str]) -> Output {
    keywarden()
        .arg(subcommand)
        .arg("--config")
        .arg(&f.config)
        .args(args)
        .output()
        .unwrap()
}

fn rotate(f: &Fixture, args: &[&str]) -> Output {
    keywarden_on(f, "rotate", args)
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The steps recorded in the only journal of `f`.
fn journal_steps(f: &Fixture) -> Vec<String> {
    let journals: Vec<PathBuf> = std::fs::read_dir(&f.journal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .collect();
    assert_eq!(journals.len(), 1, "{journals:?}");
    let mode = std::fs::metadata(&journals[0])
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::read_to_string(&journals[0])
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Nothing but the fixture's own files in the key directory: no staged
/// file or backup left behind.
fn no_leftovers(f: &Fixture) {
    let names: Vec<String> = std::fs::read_dir(&f.keys_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".kw-"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

/// The key in `key` and the certificate in `crt` are one pair.
fn pair_matches(key: &Path, crt: &Path) -> bool {
    let out = run_ok(Command::new("sh").arg("-c").arg(format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum",
        crt.display()
    )));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        == Some(&spki_of_file(key))
}

#[test]
fn rotates_one_sni_key_with_the_local_ca_and_the_other_keeps_serving() {
    let f = setup(&[]);
    let old_key = std::fs::read(&f.a.path).unwrap();
    let old_serial = serial_of(&f.crt_a);

    // The plan, and nothing changed by a dry run.
    let out = rotate(&f, &["--key", &f.a.spki, "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains(&format!("file: {} (Key", f.a.path.display())),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("file: {} (Certificate", f.crt_a.display())),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("master pid {}", f.nginx.pid())),
        "{plan}"
    );
    assert!(plan.contains("SIGHUP"), "{plan}");
    assert!(
        plan.contains(&format!(
            "127.0.0.1:{} (server name a.test) presents the new key",
            f.port
        )),
        "{plan}"
    );
    assert!(
        plan.contains(&format!(
            "(server name b.test) still presents key {}",
            f.b.spki
        )),
        "{plan}"
    );
    assert!(plan.contains("dry run"), "{plan}");
    assert_eq!(std::fs::read(&f.a.path).unwrap(), old_key);
    assert!(!f.journal_dir.join("x").exists());

    let out = rotate(&f, &["--key", &f.a.spki]);
    assert!(out.status.success(), "{}", text(&out));
    let new_spki = spki_of_file(&f.a.path);
    assert_ne!(new_spki, f.a.spki, "the key file holds a new key");
    assert!(
        pair_matches(&f.a.path, &f.crt_a),
        "key and certificate match"
    );
    assert_eq!(served_spki(f.port, Some("a.test")), new_spki);
    assert_eq!(
        served_spki(f.port, None),
        new_spki,
        "a.test is the default server"
    );
    assert_eq!(
        served_spki(f.port, Some("b.test")),
        f.b.spki,
        "b is untouched"
    );
    let mode = std::fs::metadata(&f.a.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Same subject and names, issued by the local CA.
    let show = run_ok(
        Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-subject",
                "-issuer",
                "-ext",
                "subjectAltName",
                "-in",
            ])
            .arg(&f.crt_a),
    );
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("subject=CN = a.test"), "{show}");
    assert!(show.contains("issuer=CN = local test CA"), "{show}");
    assert_ne!(serial_of(&f.crt_a), old_serial);
    assert!(show.contains("DNS:a.test, IP Address:127.0.0.1"), "{show}");
    assert_eq!(
        journal_steps(&f),
        [
            "planned",
            "issued",
            "installing",
            "installed",
            "reloading",
            "reloaded",
            "verified",
            "done"
        ]
    );
    no_leftovers(&f);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("PRIVATE KEY"), "{stdout}");

    // b still serves and was not rotated: its revocation is refused.
    let out = revoke(&f, &["--key", &f.b.spki, "--reason", "keyCompromise"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still serves"),
        "{}",
        text(&out)
    );
    let crl = f.dir().join("local.crl");
    assert!(!crl.exists());
    // The old a was replaced by a rotation: revoked in the CA's CRL.
    let out = revoke(&f, &["--key", &f.a.spki, "--reason", "superseded"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = run_ok(
        Command::new("openssl")
            .args(["crl", "-noout", "-text", "-CAfile"])
            .arg(f.dir().join("local-ca.crt"))
            .arg("-in")
            .arg(&crl),
    );
    let all = String::from_utf8_lossy(&shown.stdout).to_string()
        + &String::from_utf8_lossy(&shown.stderr);
    assert!(all.contains("verify OK"), "{all}");
    assert!(
        all.to_ascii_lowercase()
            .contains(&format!("serial number: {old_serial}")),
        "{all}"
    );
    assert!(all.contains("Superseded"), "{all}");
    assert!(
        !all.to_ascii_lowercase()
            .contains(&format!("serial number: {}", serial_of(&f.crt_a)))
    );
}

fn revoke(f: &Fixture, args: &[&str]) -> Output {
    keywarden_on(f, "revoke", args)
}

/// The certificate's serial in lowercase hex, as `openssl crl -text` shows it.
fn serial_of(crt: &Path) -> String {
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(crt),
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase()
}

#[test]
fn a_key_keywarden_cannot_reload_is_refused_with_the_reason() {
    let f = setup(&[]);
    let before = std::fs::read(&f.c.path).unwrap();
    let out = rotate(&f, &["--key", &f.c.spki]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused to rotate"), "{err}");
    assert!(err.contains("/usr/bin/openssl"), "{err}");
    assert!(err.contains("reload_commands"), "{err}");
    assert_eq!(std::fs::read(&f.c.path).unwrap(), before);
    let _ = &f.s_server;
    // A certificate file turned into a symbolic link is refused too: the
    // rotation would write through, or replace, what another tool manages.
    let real = f.dir().join("a-real.crt");
    std::fs::rename(&f.crt_a, &real).unwrap();
    std::os::unix::fs::symlink(&real, &f.crt_a).unwrap();
    let out = rotate(&f, &["--key", &f.a.spki, "--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symbolic link"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_reload_nginx_refuses_is_rolled_back() {
    let f = setup(&[]);
    let old_key = std::fs::read(&f.a.path).unwrap();
    let old_crt = std::fs::read(&f.crt_a).unwrap();
    // Someone broke the configuration after nginx started: every reload
    // is refused from now on (`nginx -t` fails).
    let conf = f.dir().join("nginx.conf");
    let mut text_conf = std::fs::read_to_string(&conf).unwrap();
    text_conf.push_str("this is not nginx;\n");
    std::fs::write(&conf, text_conf).unwrap();

    let out = rotate(&f, &["--key", &f.a.spki]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reload: /usr/sbin/nginx -t refused"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&f.a.path).unwrap(), old_key);
    assert_eq!(std::fs::read(&f.crt_a).unwrap(), old_crt);
    assert_eq!(served_spki(f.port, Some("a.test")), f.a.spki);
    assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);
    let steps = journal_steps(&f);
    assert_eq!(steps.last().unwrap(), "rolled_back", "{steps:?}");
    assert!(steps.contains(&"rolling_back".to_owned()));
    no_leftovers(&f);
}

#[test]
fn a_service_that_does_not_reload_is_rolled_back() {
    let f = setup(&[("verify_timeout_ms: 10000", "verify_timeout_ms: 3000".into())]);
    let old_key = std::fs::read(&f.a.path).unwrap();
    // The master is stopped: the SIGHUP waits, the workers keep serving
    // the old key, and verification cannot succeed.
    let master = nix::unistd::Pid::from_raw(f.nginx.pid() as i32);
    nix::sys::signal::kill(master, nix::sys::signal::SIGSTOP).unwrap();
    let out = rotate(&f, &["--key", &f.a.spki]);
    nix::sys::signal::kill(master, nix::sys::signal::SIGCONT).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("failed: verify:"), "{stdout}");
    assert!(
        stdout.contains(&format!("presents {}, not", f.a.spki)),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&f.a.path).unwrap(), old_key);
    assert_eq!(journal_steps(&f).last().unwrap(), "rolled_back");
    // Once it runs again it reloads the restored files: still the old key.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(served_spki(f.port, Some("a.test")), f.a.spki);
    assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);
    no_leftovers(&f);
}

#[test]
fn a_rotation_killed_between_install_and_reload_is_finished_on_resume() {
    let f = setup(&[]);
    let mut child = keywarden()
        .arg("rotate")
        .arg("--config")
        .arg(&f.config)
        .args(["--key", &f.a.spki])
        .env("KEYWARDEN_ROTATE_STOP_AFTER", "installed")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "rotate to stop after install",
        Duration::from_secs(60),
        || process_state(child.id()) == 'T',
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Killed there: the new files are in place, nginx still serves the
    // old key, and the journal says where it stopped.
    let new_spki = spki_of_file(&f.a.path);
    assert_ne!(new_spki, f.a.spki);
    assert!(pair_matches(&f.a.path, &f.crt_a), "never a mismatched pair");
    assert_eq!(served_spki(f.port, Some("a.test")), f.a.spki);
    assert_eq!(journal_steps(&f).last().unwrap(), "installed");

    let out = rotate(&f, &["--resume"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resuming"),
        "{}",
        text(&out)
    );
    assert_eq!(served_spki(f.port, Some("a.test")), new_spki);
    assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);
    assert_eq!(journal_steps(&f).last().unwrap(), "done");
    no_leftovers(&f);
    // Nothing is left to resume.
    let out = rotate(&f, &["--resume"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("resuming"));
}

/// pebble, the ACME test CA, started as a user starts it: its own TLS
/// certificate (from a test root made here), a configuration file, and
/// the test settings: every challenge valid without asking the service
/// (`PEBBLE_VA_ALWAYS_VALID=1`), no artificial sleeps
/// (`PEBBLE_VA_NOSLEEP=1`), no random nonce rejections
/// (`PEBBLE_WFE_NONCEREJECT=0`).
struct Pebble {
    _server: Server,
    root: PathBuf,
    directory: String,
    management: u16,
}

fn start_pebble(dir: &Path) -> Pebble {
    let pdir = dir.join("pebble");
    std::fs::create_dir(&pdir).unwrap();
    let (ca_key, ca_crt) = openssl_ca(&pdir, "pebble-tls");
    let key = openssl_key(&pdir, "pebble-tls", "ec").path;
    let crt = pdir.join("pebble-tls.crt");
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-new", "-days", "2", "-subj", "/CN=pebble"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-CA")
            .arg(&ca_crt)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-key")
            .arg(&key)
            .arg("-out")
            .arg(&crt),
    );
    let (port, management) = (free_port(), free_port());
    let conf = pdir.join("pebble.json");
    std::fs::write(
        &conf,
        format!(
            r#"{{"pebble": {{"listenAddress": "127.0.0.1:{port}", "managementListenAddress": "127.0.0.1:{management}",
              "certificate": "{}", "privateKey": "{}", "httpPort": {}, "tlsPort": {},
              "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
            crt.display(),
            key.display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let server = start_server(
        Command::new("pebble")
            .arg("-config")
            .arg(&conf)
            .env("PEBBLE_VA_ALWAYS_VALID", "1")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0"),
        port,
    );
    Pebble {
        _server: server,
        root: ca_crt,
        directory: format!("https://127.0.0.1:{port}/dir"),
        management,
    }
}

fn acme_edit(dir: &Path, p: &Pebble) -> (&'static str, String) {
    (
        "  acme: null",
        format!(
            "  acme: {{ directory: \"{}\", root: {}, account: {}, revocation_status_url: \"https://127.0.0.1:{}/cert-status-by-serial/{{serial}}\" }}",
            p.directory,
            p.root.display(),
            dir.join("acme-account.json").display(),
            p.management
        ),
    )
}

#[test]
fn one_sni_key_through_pebble_the_other_through_the_local_ca() {
    let pdir = tempfile::tempdir().unwrap();
    let pebble = start_pebble(pdir.path());
    let f = setup(&[acme_edit(pdir.path(), &pebble)]);
    let crt_b = f.keys_dir.join("b.test.crt");

    let out = rotate(&f, &["--key", &f.b.spki, "--ca", "acme"]);
    assert!(out.status.success(), "{}", text(&out));
    let new_b = spki_of_file(&f.b.path);
    assert_ne!(new_b, f.b.spki);
    assert!(pair_matches(&f.b.path, &crt_b));
    assert_eq!(served_spki(f.port, Some("b.test")), new_b);
    assert_eq!(
        served_spki(f.port, Some("a.test")),
        f.a.spki,
        "a is untouched"
    );
    let show = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-issuer", "-ext", "subjectAltName", "-in"])
            .arg(&crt_b),
    );
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("Pebble Intermediate CA"), "{show}");
    assert!(show.contains("DNS:b.test"), "{show}");
    assert!(show.contains("IP Address:127.0.0.1"), "{show}");
    let account = mode_of(&pdir.path().join("acme-account.json"));
    assert_eq!(account, 0o600, "the ACME account key is root's only");

    // The new b (issued by pebble, not yet in the inventory) is revoked
    // at pebble, and pebble says so.
    let serial = serial_of(&crt_b);
    let out = revoke(&f, &["--key", &new_b, "--reason", "keyCompromise"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        text(&out)
    );
    let out = revoke(
        &f,
        &["--key", &new_b, "--reason", "keyCompromise", "--force"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let status = run_ok(
        Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(&pebble.root)
            .arg(format!(
                "https://127.0.0.1:{}/cert-status-by-serial/{serial}",
                pebble.management
            )),
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["Status"], "Revoked", "{status}");
    assert_eq!(status["Reason"], 1, "{status}");

    let out = rotate(&f, &["--key", &f.a.spki, "--ca", "local"]);
    assert!(out.status.success(), "{}", text(&out));
    let new_a = spki_of_file(&f.a.path);
    assert_ne!(new_a, f.a.spki);
    assert_eq!(served_spki(f.port, Some("a.test")), new_a);
    assert_eq!(served_spki(f.port, Some("b.test")), new_b);
    no_leftovers(&f);
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// With the sensor running, `rotate --sensor-events` also checks what the
/// sensor sees: nginx signing with the new key after the reload, and with
/// the old key no more after the drain period.
#[test]
fn the_sensor_sees_the_new_key_sign_and_the_old_one_stop() {
    let f = setup(&[]);
    let sensor = Sensor::start(&[
        "--config",
        f.config.to_str().unwrap(),
        "--inventory",
        f.dir().join("inventory.json").to_str().unwrap(),
    ]);
    let events = sensor.events_path.clone();
    let out = rotate(
        &f,
        &[
            "--key",
            &f.a.spki,
            "--sensor-events",
            events.to_str().unwrap(),
            "--drain-ms",
            "1000",
        ],
    );
    let log = sensor.log();
    let seen = sensor.stop_allowing_shed();
    assert!(out.status.success(), "{}\nsensor log:\n{log}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let new_spki = spki_of_file(&f.a.path);
    assert!(
        stdout.contains(&format!(
            "sensor: the service signs with the new key {new_spki}"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("sensor: no signature with the old key"),
        "{stdout}"
    );
    // The events agree: nginx signed with the new key.
    let nginx_new = key_uses(&seen)
        .into_iter()
        .filter(|e| e.actor.process.name == "nginx" && spki_of_event(e) == Some(new_spki.as_str()))
        .count();
    assert!(
        nginx_new > 0,
        "no nginx signature with the new key in the events"
    );
}

fn spki_of_event(e: &Event) -> Option<&str> {
    support::spki_of(e)
}

/// apache2 (event MPM, mod_ssl), reloaded gracefully (`apache2 -t` with
/// its own flags, then SIGUSR1): rotated through the local CA and
/// verified by handshake.
#[test]
fn apache_is_rotated_through_the_local_ca() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let keys_dir = dir.join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let key = openssl_key(&keys_dir, "w", "ec");
    let (ca_key, ca_crt) = openssl_ca(dir, "local");
    let crt = ca_cert(&keys_dir, &key, "www.test", &ca_key, &ca_crt);
    let port = free_port();
    let apache = start_apache(dir, port, "www.test", &crt, &key.path);
    let inventory = dir.join("inventory.json");
    let journal_dir = dir.join("journal");
    let config = sensor_config(
        dir,
        &[&keys_dir],
        &[
            (
                "journal_dir: /var/lib/keywarden/rotations",
                format!("journal_dir: {}", journal_dir.display()),
            ),
            (
                "  local_ca: null",
                format!(
                    "  local_ca: {{ key: {}, cert: {} }}",
                    ca_key.display(),
                    ca_crt.display()
                ),
            ),
        ],
    );
    let sensor = Sensor::start(&[
        "--config",
        config.to_str().unwrap(),
        "--inventory",
        inventory.to_str().unwrap(),
    ]);
    for _ in 0..3 {
        assert_eq!(served_spki(port, Some("www.test")), key.spki);
    }
    sensor.stop_allowing_shed();

    let out = keywarden()
        .args(["rotate", "--config"])
        .arg(&config)
        .arg("--inventory")
        .arg(&inventory)
        .args(["--key", &key.spki])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SIGUSR1"), "{stdout}");
    let new_spki = spki_of_file(&key.path);
    assert_ne!(new_spki, key.spki);
    assert!(pair_matches(&key.path, &crt));
    assert_eq!(served_spki(port, Some("www.test")), new_spki);
    assert_eq!(served_spki(port, None), new_spki);
    drop(apache);
}

/// A rule that rotates b.test's key whenever it signs.
fn rotate_rule(dir: &Path, spki: &str, extra: &str) -> PathBuf {
    let path = dir.join("rotate-rules.yaml");
    std::fs::write(
        &path,
        format!(
            "rules:\n  - id: rotate-b\n    severity: high\n    event: key_use\n    match:\n      \
             key.spki_sha256: {spki}\n    actions: [alert, rotate]\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn remediations(events: &[Event]) -> Vec<&Event> {
    of_kind(events, EventCode::Remediation)
}

/// The finding whose `metadata.uid` a remediation points at.
fn finding_of<'a>(events: &'a [Event], remediation: &Event) -> &'a Event {
    let uid = remediation
        .metadata
        .correlation_uid
        .as_deref()
        .expect("a remediation names its finding");
    findings(events)
        .into_iter()
        .find(|f| f.metadata.uid == uid)
        .unwrap_or_else(|| panic!("no finding {uid}"))
}

/// A rule fires on a live signature and takes the key out of service by
/// itself. With `remediation: dry_run` the plan is reported and nothing
/// changes; enforced, the key is rotated and verified. Either way one
/// firing starts one action: the ones after are refused by the guard
/// rails (in flight, cooldown, the host's rate limit), and say so.
#[test]
fn a_rule_rotates_a_key_from_a_live_finding_within_its_guard_rails() {
    let actions = tempfile::tempdir().unwrap();
    let f = setup(&[
        ("  mode: approve", "  mode: enforce".into()),
        ("  max_per_hour: 6", "  max_per_hour: 1".into()),
        (
            "  approvals_dir: /var/lib/keywarden/actions",
            format!("  approvals_dir: {}", actions.path().display()),
        ),
    ]);
    let inventory = f.dir().join("inventory.json");
    let start = |rules: &Path| {
        Sensor::start(&[
            "--config",
            f.config.to_str().unwrap(),
            "--inventory",
            inventory.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ])
    };

    // Dry run: the plan, and b still serves its key.
    let rules = rotate_rule(f.dir(), &f.b.spki, "    remediation: dry_run\n");
    let sensor = start(&rules);
    for _ in 0..3 {
        assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);
    }
    wait_for("the dry run's report", Duration::from_secs(60), || {
        !remediations(&sensor.events()).is_empty()
    });
    let log = sensor.log();
    let events = sensor.stop_allowing_shed();
    let done = remediations(&events);
    assert_eq!(
        done.len(),
        1,
        "one firing, one action: {}\n{log}",
        pretty(&done)
    );
    let r = done[0];
    assert_eq!(
        (r.status_id, r.status.as_str()),
        (99, "Planned"),
        "{}",
        pretty(r)
    );
    let what = r.unmapped.remediation.as_ref().unwrap();
    assert_eq!(what.spki_sha256, f.b.spki);
    assert_eq!(what.mode, keywarden_analyzer::remediation::Mode::DryRun);
    assert!(
        what.log.iter().any(|l| l.contains("dry run")),
        "the plan is in the event: {}",
        pretty(r)
    );
    let finding = finding_of(&events, r);
    assert_eq!(rule_of(finding), Some("rotate-b"));
    assert!(responses_of(finding).contains(&("rotate", Outcome::Queued)));
    // Every later firing was refused, and said why.
    let refused: Vec<String> = findings(&events)
        .into_iter()
        .filter(|f| f.metadata.uid != finding.metadata.uid)
        .flat_map(|f| f.unmapped.responses.iter())
        .filter(|r| r.action == "rotate")
        .map(|r| format!("{:?} {}", r.outcome, r.detail.as_deref().unwrap_or("")))
        .collect();
    assert!(!refused.is_empty(), "three handshakes, one finding each");
    assert!(
        refused
            .iter()
            .all(|r| r.starts_with("Skipped not started: ")),
        "{refused:?}"
    );
    assert_eq!(spki_of_file(&f.b.path), f.b.spki, "nothing changed");
    assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);

    // Enforced: b is rotated and verified live; a rule on a, loaded
    // after (SIGHUP), meets the host's limit of one per hour. (Loaded
    // after, because the sensor may handshake with nginx itself, to name
    // its keys, and make a sign before the test asks b.)
    rotate_rule(f.dir(), &f.b.spki, "");
    // The rails outlive the sensor: b was acted on (the dry run) less
    // than its cooldown ago, so a restarted sensor refuses the enforced
    // rule too (a sensor crashing in a loop never gets past them).
    let saved = actions.path().join("guard-admissions.json");
    assert_eq!(mode_of(&saved), 0o600, "the admissions are root's alone");
    let sensor = start(&rules);
    assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);
    wait_for("the refusal", Duration::from_secs(60), || {
        findings(&sensor.events())
            .iter()
            .flat_map(|f| f.unmapped.responses.iter())
            .any(|r| r.action == "rotate")
    });
    let events = sensor.stop_allowing_shed();
    let responses: Vec<String> = findings(&events)
        .into_iter()
        .flat_map(|f| f.unmapped.responses.iter())
        .filter(|r| r.action == "rotate")
        .map(|r| format!("{:?} {}", r.outcome, r.detail.as_deref().unwrap_or("")))
        .collect();
    assert!(
        responses
            .iter()
            .all(|r| r.starts_with("Skipped not started: cooldown")),
        "{responses:?}"
    );
    assert!(
        remediations(&events).is_empty(),
        "{}",
        pretty(&remediations(&events))
    );
    assert_eq!(spki_of_file(&f.b.path), f.b.spki, "nothing changed");
    // The operator lifts them by removing the file.
    std::fs::remove_file(&saved).unwrap();
    let sensor = start(&rules);
    assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);
    wait_for("the rotation's outcome", Duration::from_secs(120), || {
        remediations(&sensor.events())
            .iter()
            .any(|r| r.status_id != 99)
    });
    let ended = remediations(&sensor.events())
        .into_iter()
        .find(|r| r.status_id != 99)
        .cloned()
        .unwrap();
    assert_eq!(
        ended.status,
        "Success",
        "{}\n{}",
        pretty(&ended),
        sensor.log()
    );
    let new_b = spki_of_file(&f.b.path);
    assert_ne!(new_b, f.b.spki);
    assert_eq!(served_spki(f.port, Some("b.test")), new_b);
    assert_eq!(served_spki(f.port, Some("a.test")), f.a.spki);
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: rotate-b\n    severity: high\n    event: key_use\n    match:\n      \
             key.spki_sha256: {}\n    actions: [alert, rotate]\n  - id: rotate-a\n    \
             severity: high\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    \
             actions: [rotate]\n",
            f.b.spki, f.a.spki
        ),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sensor.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("the rules reloaded", Duration::from_secs(30), || {
        sensor.log().contains("rules reloaded")
    });
    wait_for("a finding on a", Duration::from_secs(30), || {
        served_spki(f.port, Some("a.test"));
        findings(&sensor.events())
            .iter()
            .any(|f| rule_of(f) == Some("rotate-a"))
    });
    let log = sensor.log();
    let events = sensor.stop_allowing_shed();
    let done = remediations(&events);
    assert_eq!(done.len(), 1, "{}\n{log}", pretty(&done));
    let r = done[0];
    assert_eq!(
        (r.status_id, r.status.as_str()),
        (1, "Success"),
        "{}\n{log}",
        pretty(r)
    );
    let what = r.unmapped.remediation.as_ref().unwrap();
    assert_eq!(what.new_spki_sha256.as_deref(), Some(new_b.as_str()));
    // The actor is the child that rotated, as root.
    let child = &r.actor.process;
    assert_eq!(child.user.uid, "0");
    assert!(
        child
            .cmd_line
            .as_deref()
            .is_some_and(|c| c.contains(&format!("rotate --key {}", f.b.spki))),
        "{}",
        pretty(r)
    );
    assert!(r.command_uid.is_some());
    assert_eq!(rule_of(finding_of(&events, r)), Some("rotate-b"));
    // The child read b's key file with the sensor's own executable, which
    // maps no probed library: it is the sensor's, and not warned about.
    assert!(
        !secret_opens_of(&events, child.pid).is_empty(),
        "the child's opens of the key files are seen: {}",
        pretty(r)
    );
    let about_child: Vec<&Event> = coverage_warnings(&events)
        .into_iter()
        .filter(|e| e.actor.process.pid == child.pid)
        .collect();
    assert!(about_child.is_empty(), "{}", pretty(&about_child));
    let on_a: Vec<String> = findings(&events)
        .into_iter()
        .filter(|f| rule_of(f) == Some("rotate-a"))
        .flat_map(|f| f.unmapped.responses.iter())
        .map(|r| r.detail.clone().unwrap_or_default())
        .collect();
    assert!(
        !on_a.is_empty() && on_a.iter().all(|d| d.contains("rate limit")),
        "{on_a:?}"
    );
    assert_eq!(spki_of_file(&f.a.path), f.a.spki, "a was not rotated");
    no_leftovers(&f);
}

/// `remediation: approve` (the default mode): the firing records the
/// action and changes nothing; `keywarden actions approve ID` lets the
/// running sensor carry it out. A record planted by another user is
/// never read: the directory is root's alone.
#[test]
fn an_approved_rotation_is_carried_out_by_the_running_sensor() {
    let actions = tempfile::tempdir().unwrap();
    let f = setup(&[(
        "  approvals_dir: /var/lib/keywarden/actions",
        format!("  approvals_dir: {}", actions.path().display()),
    )]);
    let inventory = f.dir().join("inventory.json");
    let rules = rotate_rule(f.dir(), &f.b.spki, "");
    let sensor = Sensor::start(&[
        "--config",
        f.config.to_str().unwrap(),
        "--inventory",
        inventory.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert_eq!(served_spki(f.port, Some("b.test")), f.b.spki);
    wait_for(
        "the record awaiting approval",
        Duration::from_secs(30),
        || !remediations(&sensor.events()).is_empty(),
    );
    let pending = remediations(&sensor.events())[0].clone();
    assert_eq!(pending.status, "Awaiting Approval", "{}", pretty(&pending));
    let id = pending.command_uid.clone().unwrap();
    let list = run_ok(
        keywarden()
            .args(["actions", "list", "--config"])
            .arg(&f.config),
    );
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains(&id) && list.contains("pending"), "{list}");
    assert_eq!(spki_of_file(&f.b.path), f.b.spki, "nothing changed yet");

    // A record that is not root's is never carried out, even approved:
    // as if a user had been able to write one there.
    let planted = actions.path().join("9-9.json");
    std::fs::write(
        &planted,
        format!(
            r#"{{"id":"9-9","created_ms":1,"state":"approved","spki":"{}","rule":"x","finding_uid":"f","steps":[{{"kind":"rotate"}}]}}"#,
            f.b.spki
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    wait_for(
        "the planted record to be refused",
        Duration::from_secs(30),
        || {
            sensor
                .log()
                .contains("9-9.json: not a regular file of uid 0's")
        },
    );
    assert_eq!(spki_of_file(&f.b.path), f.b.spki, "the planted record ran");
    std::fs::remove_file(&planted).unwrap();

    let out = run_ok(
        keywarden()
            .args(["actions", "approve", &id, "--config"])
            .arg(&f.config),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("approved"));
    wait_for("the approved rotation", Duration::from_secs(120), || {
        remediations(&sensor.events()).len() >= 2
    });
    let log = sensor.log();
    let events = sensor.stop_allowing_shed();
    let done = remediations(&events);
    let r = done.last().unwrap();
    assert_eq!(r.status, "Success", "{}\n{log}", pretty(r));
    assert_eq!(r.command_uid.as_deref(), Some(id.as_str()));
    let new_b = spki_of_file(&f.b.path);
    assert_ne!(new_b, f.b.spki);
    assert_eq!(served_spki(f.port, Some("b.test")), new_b);
    let list = run_ok(
        keywarden()
            .args(["actions", "list", "--config"])
            .arg(&f.config),
    );
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains(&id) && list.contains("done"), "{list}");
    // A second approval of the same action is refused.
    let again = keywarden()
        .args(["actions", "approve", &id, "--config"])
        .arg(&f.config)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is Done, not Pending"));
}

/// A CA incident: 50 certificates served by one nginx (one SNI name
/// each), all rotated by `keywarden rotate --keys FILE`. The keys of one
/// service go one after the other; each is verified and the others keep
/// serving. A line of the file that names no key is refused in the table
/// and stops nothing.
/// Keys of one nginx on one port, each with a certificate from one local
/// CA for `NAME.test`, seen signing by a sensor that saves the
/// inventory; the configuration rotates them through that CA.
struct Bulk {
    config: PathBuf,
    keys: Vec<(String, TestKey)>,
    port: u16,
    _nginx: Server,
}

/// `keys`: each key's name and the directory its files are in.
fn bulk_nginx(dir: &Path, keys: &[(String, PathBuf)], edits: &[(&str, String)]) -> Bulk {
    let (ca_key, ca_crt) = openssl_ca(dir, "bulk");
    let port = free_port();
    let mut servers = String::new();
    let mut made = Vec::new();
    for (name, keys_dir) in keys {
        std::fs::create_dir_all(keys_dir).unwrap();
        let key = openssl_key(keys_dir, name, "ec");
        let crt = ca_cert(keys_dir, &key, &format!("{name}.test"), &ca_key, &ca_crt);
        servers.push_str(&format!(
            "server {{ listen 127.0.0.1:{port} ssl; server_name {name}.test; ssl_certificate {}; \
             ssl_certificate_key {}; ssl_session_cache off; ssl_session_tickets off; \
             location / {{ return 200 \"{name}\\n\"; }} }}\n",
            crt.display(),
            key.path.display()
        ));
        made.push((name.clone(), key));
    }
    let nginx = start_nginx(dir, port, &servers);
    let inventory = dir.join("inventory.json");
    let mut all_edits = vec![
        (
            "inventory: /var/lib/keywarden/inventory.json",
            format!("inventory: {}", inventory.display()),
        ),
        (
            "journal_dir: /var/lib/keywarden/rotations",
            format!("journal_dir: {}", dir.join("journal").display()),
        ),
        (
            "  local_ca: null",
            format!(
                "  local_ca: {{ key: {}, cert: {}, crl: {} }}",
                ca_key.display(),
                ca_crt.display(),
                dir.join("bulk.crl").display()
            ),
        ),
    ];
    all_edits.extend(edits.iter().cloned());
    let mut dirs: Vec<&Path> = keys.iter().map(|(_, d)| d.as_path()).collect();
    dirs.dedup();
    let config = sensor_config(dir, &dirs, &all_edits);
    // The sensor sees each key sign, and saves the inventory.
    let sensor = Sensor::start(&[
        "--config",
        config.to_str().unwrap(),
        "--inventory",
        inventory.to_str().unwrap(),
    ]);
    for (name, key) in &made {
        assert_eq!(served_spki(port, Some(&format!("{name}.test"))), key.spki);
    }
    // The sensor may still be naming signatures when the last handshake
    // ends: a stop then would shed the rest (its final drain is bounded),
    // and the inventory would lack them.
    wait_for("a key use for every key", Duration::from_secs(120), || {
        let events = sensor.events();
        made.iter().all(|(_, k)| {
            key_uses(&events)
                .iter()
                .any(|e| key_of(e).spki_sha256.as_deref() == Some(k.spki.as_str()))
        })
    });
    let (status, _, log) = sensor.stop_status(nix::sys::signal::Signal::SIGINT);
    assert!(
        status.success() || status.code() == Some(3),
        "keywarden exited with {status}:\n{log}"
    );
    // Naming one of many ECDSA keys takes a few verifications and one
    // recovery, not one verification per key (up to 50 here: 1,923 for
    // the 50 handshakes when they were tried one by one).
    let verifications: u64 = log
        .lines()
        .find(|l| l.contains("stopped: probes detached"))
        .and_then(|l| l.split(" verifications=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no verification count in the stop line:\n{log}"));
    eprintln!(
        "{verifications} verifications for {} handshakes",
        made.len()
    );
    assert!(
        verifications <= 10 * made.len() as u64,
        "{verifications} verifications for {} keys",
        made.len()
    );
    Bulk {
        config,
        keys: made,
        port,
        _nginx: nginx,
    }
}

/// `keywarden rotate --keys FILE --concurrency 4` for the SPKIs in `lines`.
fn rotate_listed(dir: &Path, config: &Path, lines: &str) -> Output {
    let list = dir.join("keys.txt");
    std::fs::write(&list, lines).unwrap();
    keywarden()
        .args(["rotate", "--config"])
        .arg(config)
        .arg("--keys")
        .arg(&list)
        .args(["--concurrency", "4"])
        .output()
        .unwrap()
}

/// The row of the closing table for `key`.
fn row_of<'a>(stdout: &'a str, key: &TestKey) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(&key.spki))
        .unwrap_or_else(|| panic!("no row for {}:\n{stdout}", key.spki))
}

#[test]
fn fifty_keys_of_one_nginx_are_rotated_in_bulk_with_a_result_table() {
    const N: usize = 50;
    let _host = exclusive_host();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let names: Vec<(String, PathBuf)> = (0..N)
        .map(|i| (format!("k{i:02}"), dir.join("keys")))
        .collect();
    let bulk = bulk_nginx(dir, &names, &[]);
    let mut listing = String::from("# the incident's keys\n");
    for (_, key) in &bulk.keys {
        listing.push_str(&key.spki);
        listing.push('\n');
    }
    listing.push_str("deadbeefdeadbeef  # not a key anyone has\n");
    let out = rotate_listed(dir, &bulk.config, &listing);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // One refused line: the status says so, and nothing else failed.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stdout.contains(&format!("{} keys: {N} done, 0 rolled back", N + 1)),
        "{stdout}"
    );
    let refused: Vec<&str> = stdout.lines().filter(|l| l.contains(" refused ")).collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].starts_with("deadbeefdeadbeef"), "{refused:?}");
    // Progress, one line per key without a terminal.
    for n in 1..=N {
        assert!(
            stdout.contains(&format!("[{n}/{N}] ")),
            "no progress line {n}:\n{stdout}"
        );
    }
    // The keys of one service are rotated together: one reload.
    let reloads = stdout
        .lines()
        .filter(|l| l.contains(" reloaded: 1 services"))
        .count();
    assert_eq!(
        reloads, N,
        "one reload line per key, of the same reload:\n{stdout}"
    );
    for (name, key) in &bulk.keys {
        assert!(row_of(&stdout, key).contains(" done "), "{name}");
        let now = spki_of_file(&key.path);
        assert_ne!(now, key.spki, "{name} was not rotated");
        assert_eq!(served_spki(bulk.port, Some(&format!("{name}.test"))), now);
    }
}

/// Unmounts a bind mount when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn keys_rotated_together_that_fail_are_rolled_back_alone() {
    let _host = exclusive_host();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let keys_dir = dir.join("keys");
    let ro_dir = dir.join("read-only");
    let names = vec![
        ("clobbered".to_owned(), keys_dir.clone()),
        ("one".to_owned(), keys_dir.clone()),
        ("two".to_owned(), keys_dir.clone()),
        ("stuck".to_owned(), ro_dir.clone()),
    ];
    // nginx is reloaded by a command that, the first time, puts the old
    // files of one key back just before (as a configuration tool that
    // manages them would): that key fails its check after the reload.
    let saved = dir.join("saved");
    std::fs::create_dir(&saved).unwrap();
    let script = dir.join("reload.sh");
    let edit = (
        "  reload_commands: []",
        format!(
            "  reload_commands: [{{ exe: /usr/sbin/nginx, command: [/bin/sh, {}] }}]",
            script.display()
        ),
    );
    let bulk = bulk_nginx(
        dir,
        &names,
        &[
            edit,
            ("verify_timeout_ms: 10000", "verify_timeout_ms: 4000".into()),
        ],
    );
    for f in ["clobbered.pem", "clobbered.test.crt"] {
        std::fs::copy(keys_dir.join(f), saved.join(f)).unwrap();
    }
    std::fs::write(
        &script,
        format!(
            "if [ ! -e {d}/clobbered-once ]; then touch {d}/clobbered-once; \
             cat {d}/saved/clobbered.pem > {d}/keys/clobbered.pem; \
             cat {d}/saved/clobbered.test.crt > {d}/keys/clobbered.test.crt; fi\n\
             exec /usr/sbin/nginx -c {d}/nginx.conf -s reload\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // The files of another key cannot be staged: issuing it fails.
    run_ok(
        Command::new("mount")
            .args(["--bind"])
            .arg(&ro_dir)
            .arg(&ro_dir),
    );
    let _ro = Mounted(ro_dir.clone());
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(&ro_dir),
    );

    let listing: String = bulk
        .keys
        .iter()
        .map(|(_, k)| format!("{}\n", k.spki))
        .collect();
    let out = rotate_listed(dir, &bulk.config, &listing);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stdout.contains("4 keys: 2 done, 2 rolled back"), "{stdout}");
    assert!(
        stdout.contains("1 groups sharing a service"),
        "the four keys are one group:\n{stdout}"
    );
    let key = |n: &str| &bulk.keys.iter().find(|(name, _)| name == n).unwrap().1;
    let served = |n: &str| served_spki(bulk.port, Some(&format!("{n}.test")));
    for n in ["one", "two"] {
        assert!(row_of(&stdout, key(n)).contains(" done "), "{n}:\n{stdout}");
        let now = spki_of_file(&key(n).path);
        assert_ne!(now, key(n).spki, "{n} was not rotated");
        assert_eq!(served(n), now, "{n}");
    }
    // What each key was told, by the first 16 digits of its SPKI.
    let said = |n: &str, what: &str| {
        stdout
            .lines()
            .any(|l| l.starts_with(&key(n).spki[..16]) && l.contains(what))
    };
    assert!(row_of(&stdout, key("clobbered")).contains(" rolled back "));
    assert!(
        said("clobbered", "failed: verify: ") && said("clobbered", "server name clobbered.test"),
        "the clobbered key is blamed by its own target:\n{stdout}"
    );
    assert!(
        row_of(&stdout, key("clobbered")).contains("failed: verify: "),
        "the row says why:\n{stdout}"
    );
    assert!(row_of(&stdout, key("stuck")).contains(" rolled back "));
    assert!(
        row_of(&stdout, key("stuck")).contains("failed: issue: "),
        "the row says why:\n{stdout}"
    );
    assert!(said("stuck", "failed: issue: "), "{stdout}");
    for n in ["one", "two"] {
        assert!(!said(n, "failed:"), "{n} was blamed:\n{stdout}");
    }
    for n in ["clobbered", "stuck"] {
        assert_eq!(spki_of_file(&key(n).path), key(n).spki, "{n}: old key file");
        assert_eq!(served(n), key(n).spki, "{n}: old key served");
    }
    // Each key has its own journal, ended as its row says.
    let mut ends = Vec::new();
    for e in std::fs::read_dir(dir.join("journal")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "journal") {
            let text = std::fs::read_to_string(&p).unwrap();
            let last = text.lines().last().unwrap().to_owned();
            let step: serde_json::Value = serde_json::from_str(&last).unwrap();
            ends.push(step["step"].as_str().unwrap().to_owned());
        }
    }
    ends.sort();
    assert_eq!(
        ends,
        ["done", "done", "rolled_back", "rolled_back"],
        "{ends:?}"
    );
}
