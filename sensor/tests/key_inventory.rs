//! The key inventory (`keywarden keys`, docs/keys.md): every key the
//! sensor saw, with the files and certificates that hold it and the
//! processes that signed with it, written at exit and read back at start.

mod support;

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use serde_json::Value;
use support::*;

/// `keywarden keys --json --inventory FILE`, parsed.
fn inventory_json(file: &Path) -> Value {
    let out = run_ok(
        keywarden()
            .args(["keys", "--json", "--inventory"])
            .arg(file),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keywarden keys --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The entry of key `spki`.
fn entry<'a>(inv: &'a Value, spki: &str) -> &'a Value {
    inv["keys"]
        .as_array()
        .expect("keys is an array")
        .iter()
        .find(|k| k["spki_sha256"] == spki)
        .unwrap_or_else(|| panic!("no entry for {spki}:\n{inv:#}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

/// Signatures by the `openssl` processes recorded for a key, and the
/// executable hashes they were recorded with.
fn openssl_uses(e: &Value) -> (u64, Vec<&str>) {
    let mut uses = 0;
    let mut hashes = Vec::new();
    for p in e["processes"].as_array().unwrap() {
        assert_eq!(p["name"], "openssl", "{e:#}");
        uses += p["uses"].as_u64().unwrap();
        hashes.extend(p["exe_sha256"].as_str());
        assert!(
            p["first_use_ms"].as_i64() <= p["last_use_ms"].as_i64(),
            "{e:#}"
        );
    }
    (uses, hashes)
}

fn serial_of(crt: &Path) -> String {
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(crt),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .trim_start_matches("serial=")
        .to_lowercase()
}

/// Two keys sign (one of them also has a certificate in a scanned
/// directory), a third has only a certificate there and is never used.
/// The inventory names each with its files, certificates and users, marks
/// the third unused, is private, and keeps its counts across a restart.
#[test]
fn the_inventory_names_files_certificates_users_and_unused_keys() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    let certs = work.path().join("certs");
    std::fs::create_dir(&keys).unwrap();
    std::fs::create_dir(&certs).unwrap();
    let ec = openssl_key(&keys, "ec", "ec");
    let rsa = openssl_key(&keys, "rsa", "rsa");
    // Its key file is in no place the sensor looks: only its certificate is.
    let idle = openssl_key(work.path(), "idle", "ec");
    let ec_crt = cert(&certs, &ec, "ec.example.test");
    let idle_crt = cert(&certs, &idle, "idle.example.test");
    let config = sensor_config(
        work.path(),
        &[],
        &[(
            "key_locations:\n",
            format!("key_locations:\n  - {}\n", certs.display()),
        )],
    );
    let inventory = work.path().join("inv.json");
    let data = work.path().join("data");
    std::fs::write(&data, b"keywarden counts this").unwrap();
    let sign = |key: &TestKey| {
        run_pid_ok(&mut openssl_sign(
            "openssl",
            &key.path,
            &data,
            &work.path().join("sig"),
        ));
    };
    let start = || {
        Sensor::start(&[
            "--config",
            config.to_str().unwrap(),
            "--inventory",
            inventory.to_str().unwrap(),
        ])
    };

    let sensor = start();
    sign(&ec);
    sign(&ec);
    sign(&rsa);
    let events = sensor.stop();
    let named = |spki: &str| {
        of_kind(&events, EventCode::KeyUse)
            .iter()
            .filter(|e| key_of(e).spki_sha256.as_deref() == Some(spki))
            .count()
    };
    assert_eq!((named(&ec.spki), named(&rsa.spki)), (2, 1));

    let mode = std::fs::metadata(&inventory).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the inventory is root's only");
    let inv = inventory_json(&inventory);
    assert_eq!(inv["version"], 1, "{inv:#}");
    let openssl_sha = sha256_file("/usr/bin/openssl".as_ref());

    let e = entry(&inv, &ec.spki);
    assert_eq!(e["algorithm"], "ecdsa-p256", "{e:#}");
    assert_eq!(e["bits"], 256, "{e:#}");
    assert_eq!(e["uses"], 2, "{e:#}");
    assert_eq!(e["unused"], false, "{e:#}");
    assert!(
        e["first_use_ms"].as_i64() <= e["last_use_ms"].as_i64(),
        "{e:#}"
    );
    assert!(e["first_use_ms"].is_i64(), "{e:#}");
    let (uses, hashes) = openssl_uses(e);
    assert_eq!(uses, 2, "{e:#}");
    assert!(hashes.contains(&openssl_sha.as_str()), "{e:#}");
    let files = strings(&e["files"]);
    assert!(files.contains(&ec.path.to_str().unwrap()), "{e:#}");
    assert!(files.contains(&ec_crt.to_str().unwrap()), "{e:#}");
    let c = &e["certificates"][0];
    assert_eq!(e["certificates"].as_array().unwrap().len(), 1, "{e:#}");
    assert_eq!(c["subject"], "CN=ec.example.test", "{e:#}");
    assert_eq!(c["issuer"], "CN=ec.example.test", "self-signed: {e:#}");
    assert_eq!(c["serial"], serial_of(&ec_crt).as_str(), "{e:#}");
    assert_eq!(
        strings(&c["sans"]),
        ["DNS:ec.example.test", "IP:127.0.0.1"],
        "{e:#}"
    );
    let validity = c["not_after_ms"].as_i64().unwrap() - c["not_before_ms"].as_i64().unwrap();
    assert_eq!(
        validity,
        2 * 86_400_000,
        "the certificate is for two days: {e:#}"
    );
    assert_eq!(strings(&c["found_in"]), [ec_crt.to_str().unwrap()], "{e:#}");

    let r = entry(&inv, &rsa.spki);
    assert_eq!(r["algorithm"], "rsa-2048", "{r:#}");
    assert_eq!(r["bits"], 2048, "{r:#}");
    assert_eq!(r["uses"], 1, "{r:#}");
    assert_eq!(openssl_uses(r).0, 1, "{r:#}");
    assert_eq!(strings(&r["files"]), [rsa.path.to_str().unwrap()], "{r:#}");
    assert!(r["certificates"].as_array().unwrap().is_empty(), "{r:#}");

    let i = entry(&inv, &idle.spki);
    assert_eq!(i["unused"], true, "{i:#}");
    assert_eq!(i["uses"], 0, "{i:#}");
    assert!(
        i["first_use_ms"].is_null() && i["last_use_ms"].is_null(),
        "{i:#}"
    );
    assert!(i["processes"].as_array().unwrap().is_empty(), "{i:#}");
    assert_eq!(strings(&i["files"]), [idle_crt.to_str().unwrap()], "{i:#}");
    let c = &i["certificates"][0];
    assert_eq!(c["subject"], "CN=idle.example.test", "{i:#}");
    assert_eq!(c["serial"], serial_of(&idle_crt).as_str(), "{i:#}");
    assert_eq!(
        strings(&c["sans"]),
        ["DNS:idle.example.test", "IP:127.0.0.1"],
        "{i:#}"
    );
    assert!(
        c["not_after_ms"].as_i64() > c["not_before_ms"].as_i64(),
        "{i:#}"
    );
    // The private key beside it was never read: its file is not listed.
    assert!(!serde_json::to_string(&inv).unwrap().contains("idle.pem"));

    // The table says the same, the unused key as unused.
    let table =
        String::from_utf8(run_ok(keywarden().args(["keys", "--inventory"]).arg(&inventory)).stdout)
            .unwrap();
    let line = |spki: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&spki[..16]))
            .unwrap_or_else(|| panic!("no line for {spki}:\n{table}"))
            .to_owned()
    };
    assert!(line(&idle.spki).contains(" unused "), "{table}");
    assert!(
        line(&idle.spki).contains("CN=idle.example.test (until "),
        "{table}"
    );
    assert!(
        line(&ec.spki).contains(" 2 ") && line(&ec.spki).contains("openssl"),
        "{table}"
    );

    // Counts survive a restart: the next run goes on from them.
    let sensor = start();
    sign(&rsa);
    sensor.stop();
    let inv = inventory_json(&inventory);
    assert_eq!(entry(&inv, &rsa.spki)["uses"], 2, "{inv:#}");
    assert_eq!(entry(&inv, &ec.spki)["uses"], 2, "{inv:#}");
    assert_eq!(entry(&inv, &idle.spki)["unused"], true, "{inv:#}");

    // A missing inventory is an error that names it.
    let out = keywarden()
        .args(["keys", "--inventory"])
        .arg(work.path().join("none.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no key inventory there"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
