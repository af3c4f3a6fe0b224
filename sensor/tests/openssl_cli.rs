//! The openssl command line signs through the EVP APIs of the system
//! libcrypto; each signature must give exactly one event naming its key.

mod support;

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use support::*;

#[test]
fn cli_signing_gives_one_event_per_signature_with_the_right_key() {
    let work = tempfile::tempdir().unwrap();
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"keywarden signs this").unwrap();
    let keys = [
        ("ec", openssl_key(work.path(), "ec", "ec"), "ecdsa-p256"),
        ("rsa", openssl_key(work.path(), "rsa", "rsa"), "rsa-2048"),
        (
            "ed25519",
            openssl_key(work.path(), "ed", "ed25519"),
            "ed25519",
        ),
    ];
    let sensor = Sensor::start(&[]);
    let mut runs = Vec::new();
    for (name, key, alg) in &keys {
        let sig = work.path().join(format!("{name}.sig"));
        let mut cmd = if *name == "ed25519" {
            // OpenSSL 3.0's dgst cannot sign with Ed25519 ("Key type not
            // supported"); pkeyutl -rawin is its one-shot EVP_DigestSign path.
            let mut cmd = Command::new("openssl");
            cmd.args(["pkeyutl", "-sign", "-rawin", "-inkey"])
                .arg(&key.path)
                .arg("-in")
                .arg(&msg)
                .arg("-out")
                .arg(&sig);
            cmd
        } else {
            openssl_sign("openssl", &key.path, &msg, &sig)
        };
        let (pid, _) = run_pid_ok(&mut cmd);
        assert!(std::fs::metadata(&sig).unwrap().len() > 0);
        runs.push((pid, key.spki.clone(), *alg));
    }
    let events = sensor.stop();
    for (pid, spki, alg) in runs {
        let uses = key_uses_of(&events, pid);
        assert_eq!(
            uses.len(),
            1,
            "{alg}: expected exactly one event for pid {pid}, got {}",
            pretty(&uses)
        );
        let e = uses[0];
        let key = key_of(e);
        assert_eq!(e.status, "Success", "{}", pretty(e));
        assert_eq!(key.status, KeyStatus::Identified, "{}", pretty(e));
        assert_eq!(
            key.spki_sha256.as_deref(),
            Some(spki.as_str()),
            "{}",
            pretty(e)
        );
        assert_eq!(key.algorithm.as_deref(), Some(alg), "{}", pretty(e));
        assert_eq!(e.actor.process.name, "openssl", "{}", pretty(e));
        assert_eq!(
            exe_hash_of(e),
            Some(sha256_file("/usr/bin/openssl".as_ref()).as_str()),
            "{}",
            pretty(e)
        );
        assert_eq!(e.actor.process.user.uid, "0", "{}", pretty(e));
        assert!(
            key.source_file
                .as_deref()
                .is_some_and(|f| f.ends_with(".pem")),
            "{}",
            pretty(e)
        );
        assert_eq!(module_of(e).kind, "openssl", "{}", pretty(e));
    }
}

/// A signer can exit before the sensor's control thread reaches its exec
/// (here a test hook makes the control thread wait for the exit). Its
/// executable is then opened by
/// path and hashed only if it is the inode the exec probe saw: a file
/// replaced meanwhile is reported, never hashed as the one that ran. The
/// key file it opened, which no live process ever opened, is still read
/// (through an equivalent root) and names the key.
#[test]
fn a_signer_gone_before_the_sensor_looks_is_still_attributed_to_its_file() {
    let work = tempfile::tempdir().unwrap();
    let key = openssl_key(work.path(), "ec", "ec");
    let unseen = openssl_key(work.path(), "unseen", "ec");
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"short-lived").unwrap();
    let exe = work.path().join("signer");
    std::fs::copy("/usr/bin/openssl", &exe).unwrap();
    let original = sha256_file(&exe);
    let sensor = Sensor::start_with_env(&[], &[("KEYWARDEN_TEST_SNAPSHOT_AFTER_EXIT_MS", "5000")]);
    let sign = |key: &TestKey| {
        let (pid, _) = run_pid_ok(&mut openssl_sign(
            &exe,
            &key.path,
            &msg,
            &work.path().join("sig"),
        ));
        pid
    };
    // The first run of a new path is held until the sensor has looked;
    // the next ones are not, and exit before the snapshot.
    let held = sign(&key);
    let gone = sign(&unseen);
    wait_for(
        "the sensor to report the second run",
        Duration::from_secs(20),
        || !key_uses_of(&sensor.events(), gone).is_empty(),
    );
    // The third run waits for its input while a new file (a new inode)
    // takes its executable's path.
    let mut third = spawn(
        openssl_sign(
            &exe,
            &key.path,
            "/dev/stdin".as_ref(),
            &work.path().join("sig"),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null()),
    );
    let replaced = third.id();
    let next = work.path().join("signer.new");
    std::fs::copy("/usr/bin/openssl", &next).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&next)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"changed"))
        .unwrap();
    std::fs::rename(&next, &exe).unwrap();
    std::io::Write::write_all(&mut third.stdin.take().unwrap(), b"short-lived").unwrap();
    assert!(third.wait().unwrap().success());
    let events = sensor.stop();
    let only = |pid, key: &TestKey| {
        let uses = key_uses_of(&events, pid);
        assert_eq!(uses.len(), 1, "pid {pid}: {}", pretty(&uses));
        let e = uses[0];
        assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
        assert_eq!(
            key_of(e).source_file.as_deref(),
            Some(key.path.to_str().unwrap()),
            "{}",
            pretty(e)
        );
        e.clone()
    };
    for (pid, key) in [(held, &key), (gone, &unseen)] {
        let e = only(pid, key);
        let process = &e.actor.process;
        assert_eq!(exe_hash_of(&e), Some(original.as_str()), "{}", pretty(&e));
        assert_eq!(
            process.file.as_ref().map(|f| f.path.as_str()),
            Some(exe.to_str().unwrap()),
            "{}",
            pretty(&e)
        );
        assert!(e.unmapped.attribution_error.is_none(), "{}", pretty(&e));
    }
    // The run that was not held really was gone: /proc had no command line.
    let e = only(gone, &unseen);
    assert!(e.actor.process.cmd_line.is_none(), "{}", pretty(&e));
    let e = only(replaced, &key);
    let process = &e.actor.process;
    assert!(
        process.file.as_ref().is_none_or(|f| f.hashes.is_empty()),
        "{}",
        pretty(&e)
    );
    assert!(
        e.unmapped
            .attribution_error
            .as_deref()
            .is_some_and(|a| a.contains("is no longer the file it ran")),
        "{}",
        pretty(&e)
    );
}

#[test]
fn pkeyutl_gives_one_event_per_signature_and_marks_failures() {
    let work = tempfile::tempdir().unwrap();
    let ec = openssl_key(work.path(), "ec", "ec");
    let rsa = openssl_key(work.path(), "rsa", "rsa");
    let digest = work.path().join("digest");
    std::fs::write(&digest, [0x5a; 32]).unwrap();
    let short = work.path().join("short");
    std::fs::write(&short, [0x5a; 5]).unwrap();
    let sensor = Sensor::start(&[]);
    let mut ok_pids = Vec::new();
    for i in 0..3 {
        let key = if i % 2 == 0 { &ec } else { &rsa };
        let mut cmd = Command::new("openssl");
        cmd.args(["pkeyutl", "-sign", "-inkey"])
            .arg(&key.path)
            .arg("-in")
            .arg(&digest);
        if i % 2 == 1 {
            cmd.args(["-pkeyopt", "digest:sha256"]);
        }
        cmd.arg("-out").arg(work.path().join(format!("sig{i}")));
        let (pid, _) = run_pid_ok(&mut cmd);
        ok_pids.push((pid, key.spki.clone()));
    }
    // A 5-byte input is not a SHA-256 digest: EVP_PKEY_sign fails.
    let mut cmd = Command::new("openssl");
    cmd.args(["pkeyutl", "-sign", "-inkey"])
        .arg(&rsa.path)
        .arg("-in")
        .arg(&short);
    cmd.args(["-pkeyopt", "digest:sha256", "-out"])
        .arg(work.path().join("bad.sig"));
    let (bad_pid, out) = run_pid(&mut cmd);
    assert!(
        !out.status.success(),
        "the bad signature was expected to fail"
    );
    let events = sensor.stop();
    for (pid, spki) in ok_pids {
        let uses = key_uses_of(&events, pid);
        assert_eq!(uses.len(), 1, "pid {pid}: {}", pretty(&uses));
        let e = uses[0];
        assert_eq!(module_of(e).function_name, "EVP_PKEY_sign", "{}", pretty(e));
        assert_eq!(spki_of(e), Some(spki.as_str()), "{}", pretty(e));
    }
    let bad = key_uses_of(&events, bad_pid);
    assert_eq!(
        bad.len(),
        1,
        "the failed signature is one event: {}",
        pretty(&bad)
    );
    let e = bad[0];
    assert_eq!(e.status, "Failure", "{}", pretty(e));
    assert_eq!(
        e.unmapped.signature.as_ref().map(|s| s.length),
        Some(0),
        "{}",
        pretty(e)
    );
}

/// A key that never touches a file the sensor sees (it arrives on stdin)
/// cannot be named: the event says `unknown` and why, and carries no
/// identity at all rather than a guess.
#[test]
fn a_key_the_sensor_cannot_know_is_unknown_with_a_reason() {
    let work = tempfile::tempdir().unwrap();
    let key = openssl_key(work.path(), "hidden", "ec");
    let pem = std::fs::read(&key.path).unwrap();
    std::fs::remove_file(&key.path).unwrap();
    let digest = work.path().join("digest");
    std::fs::write(&digest, [7u8; 32]).unwrap();
    let sensor = Sensor::start(&[]);
    let mut child = Command::new("openssl")
        .args(["pkeyutl", "-sign", "-inkey", "/dev/stdin", "-in"])
        .arg(&digest)
        .arg("-out")
        .arg(work.path().join("sig"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&pem).unwrap();
    assert!(child.wait().unwrap().success());
    let events = sensor.stop();
    let uses = key_uses_of(&events, pid);
    assert_eq!(uses.len(), 1, "{}", pretty(&uses));
    let k = key_of(uses[0]);
    assert_eq!(k.status, KeyStatus::Unknown, "{}", pretty(k));
    assert!(
        k.unknown_reason
            .as_deref()
            .is_some_and(|r| r.contains("verifies this signature")),
        "{}",
        pretty(k)
    );
    // `None` is a field absent from the JSON: `read_events` checks that
    // each event writes back exactly as the sensor wrote it.
    for (field, absent) in [
        ("spki_sha256", k.spki_sha256.is_none()),
        ("fingerprint", k.fingerprint.is_none()),
        ("algorithm", k.algorithm.is_none()),
        ("source_file", k.source_file.is_none()),
    ] {
        assert!(absent, "{field} must be absent: {}", pretty(k));
    }
    // Nothing in the output names the key.
    assert!(!serde_json::to_string(&events).unwrap().contains(&key.spki));
}

#[test]
fn sigterm_detaches_and_exits_zero() {
    let sensor = Sensor::start(&[]);
    let pid = sensor.pid();
    let loaded = || {
        let out = run_ok(Command::new("bpftool").args(["-j", "prog", "show"]));
        // bpftool's JSON, not a keywarden event: no model to read it into.
        let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        progs
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "sign_entry")
            .count()
    };
    assert!(
        loaded() >= 1,
        "the sensor's programs should be loaded while it runs"
    );
    let events = sensor.stop_with(nix::sys::signal::Signal::SIGTERM);
    assert!(key_uses_of(&events, pid).is_empty());
    // Detached and unloaded: nothing of ours stays in the kernel.
    wait_for(
        "programs to unload",
        std::time::Duration::from_secs(10),
        || loaded() == 0,
    );
}

#[test]
fn not_root_is_one_clear_error() {
    let out = keywarden()
        .args(["run"])
        .env("NO_COLOR", "1")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
}

#[test]
fn version_and_help() {
    let out = run_ok(keywarden().arg("--version"));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("keywarden "));
    let out = run_ok(keywarden().arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run"), "{help}");
    let out = run_ok(keywarden().args(["run", "--help"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--output"));
}
