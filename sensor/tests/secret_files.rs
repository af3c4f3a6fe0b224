//! Secret files: every open of a watched file is seen, attributed, and
//! named by the key inside, and its contents never leave the host.

mod support;

use std::process::Command;

use support::*;

#[test]
fn cat_of_a_key_file_names_the_key_and_its_reader() {
    let work = tempfile::tempdir().unwrap();
    let key = openssl_key(work.path(), "k", "ec");
    let site_key = work.path().join("site.key");
    std::fs::rename(&key.path, &site_key).unwrap();
    let sensor = Sensor::start(&[]);
    let (pid, _) = run_pid_ok(Command::new("cat").arg(&site_key));
    let events = sensor.stop();
    let opens = secret_opens_of(&events, pid);
    assert_eq!(opens.len(), 1, "{}", pretty(&opens));
    let e = opens[0];
    assert_eq!(e.class_uid, 1001, "{}", pretty(e));
    assert_eq!(e.activity_id, 14, "{}", pretty(e));
    assert_eq!(
        file_path_of(e),
        Some(site_key.to_str().unwrap()),
        "{}",
        pretty(e)
    );
    // cat may exit before the sensor can look at its root: then the host
    // path is absent, never wrong.
    let secret = secret_of(e);
    assert!(
        secret
            .host_path
            .as_deref()
            .is_none_or(|h| h == site_key.to_str().unwrap()),
        "{}",
        pretty(e)
    );
    assert_eq!(secret.matched, "**/*.key", "{}", pretty(e));
    assert!(secret.holds_private_key, "{}", pretty(e));
    assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
    assert_eq!(e.actor.process.name, "cat", "{}", pretty(e));
    assert_eq!(
        exe_hash_of(e),
        Some(sha256_file("/usr/bin/cat".as_ref()).as_str()),
        "{}",
        pretty(e)
    );
    // The private key's PEM body is nowhere in the output.
    let pem = std::fs::read_to_string(&site_key).unwrap();
    let body = pem.lines().nth(1).unwrap();
    assert!(!serde_json::to_string(&events).unwrap().contains(body));
}

#[test]
fn files_created_after_start_are_covered_and_opens_coalesce() {
    let work = tempfile::tempdir().unwrap();
    let sensor = Sensor::start(&[]);
    let env = work.path().join(".env");
    let marker = "KEYWARDEN_TEST_SECRET_7f3a9c";
    std::fs::write(&env, format!("API_TOKEN={marker}\n")).unwrap();
    // One shell process opens it five times.
    let (pid, out) = run_pid(Command::new("sh").arg("-c").arg(format!(
        "for i in 1 2 3 4 5; do read x < '{}'; done",
        env.display()
    )));
    assert!(out.status.success());
    // A certificate-only .pem is not a secret (only_private_keys).
    let key = openssl_key(work.path(), "c", "ec");
    let crt = work.path().join("c.pem.crt.pem");
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-new", "-days", "1", "-subj", "/CN=c", "-key",
            ])
            .arg(&key.path)
            .arg("-out")
            .arg(&crt),
    );
    let (cat_pid, _) = run_pid(Command::new("cat").arg(&crt));
    let events = sensor.stop();
    let opens = secret_opens_of(&events, pid);
    assert_eq!(opens.len(), 1, "five opens, one event: {}", pretty(&opens));
    let e = opens[0];
    assert_eq!(secret_of(e).count, 5, "{}", pretty(e));
    assert_eq!(secret_of(e).matched, "**/.env", "{}", pretty(e));
    assert!(e.unmapped.key.is_none(), "{}", pretty(e));
    let cert_opens = secret_opens_of(&events, cat_pid);
    assert!(
        cert_opens.is_empty(),
        "certificate without a private key: {}",
        pretty(&cert_opens)
    );
    let text = serde_json::to_string(&events).unwrap()
        + &std::fs::read_to_string(work.path().join("x")).unwrap_or_default();
    assert!(!text.contains(marker), "secret contents leaked into events");
}
