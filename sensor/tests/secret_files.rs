//! Secret files: every open of a watched file is seen, attributed, and
//! named by the key inside, and its contents never leave the host.

mod support;

use std::process::Command;

use support::*;

fn secret_opens_of(events: &[serde_json::Value], pid: u32) -> Vec<&serde_json::Value> {
    events
        .iter()
        .filter(|e| {
            e["metadata"]["event_code"] == "secret_file_open" && e["actor"]["process"]["pid"] == pid
        })
        .collect()
}

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
    assert_eq!(opens.len(), 1, "{opens:#?}");
    let e = opens[0];
    assert_eq!(e["class_uid"], 1001);
    assert_eq!(e["activity_id"], 14);
    assert_eq!(e["file"]["path"], site_key.to_str().unwrap());
    // cat may exit before the sensor can look at its root: then the host
    // path is absent, never wrong.
    let host = &e["secret_file"]["host_path"];
    assert!(
        host.is_null() || host == site_key.to_str().unwrap(),
        "{host}"
    );
    assert_eq!(e["secret_file"]["matched"], "**/*.key");
    assert_eq!(e["secret_file"]["holds_private_key"], true);
    assert_eq!(e["key"]["spki_sha256"], key.spki.as_str());
    assert_eq!(e["actor"]["process"]["name"], "cat");
    assert_eq!(
        e["actor"]["process"]["file"]["hashes"][0]["value"],
        sha256_file("/usr/bin/cat".as_ref())
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
    assert_eq!(opens.len(), 1, "five opens, one event: {opens:#?}");
    assert_eq!(opens[0]["secret_file"]["count"], 5);
    assert_eq!(opens[0]["secret_file"]["matched"], "**/.env");
    assert!(opens[0].get("key").is_none());
    assert!(
        secret_opens_of(&events, cat_pid).is_empty(),
        "certificate without a private key"
    );
    let text = serde_json::to_string(&events).unwrap()
        + &std::fs::read_to_string(work.path().join("x")).unwrap_or_default();
    assert!(!text.contains(marker), "secret contents leaked into events");
}
