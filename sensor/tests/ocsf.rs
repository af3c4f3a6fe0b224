//! A live sensor's output is strict OCSF 1.3.0: every line it writes, of
//! every kind (key uses, a coverage warning, secret-file opens with and
//! without a rule's verdict, and the Detection Findings of rules that
//! alert, kill in the kernel, kill after the fact and block), validates
//! against the official schema of its class (`scripts/ocsf_validate.py`),
//! finding evidences included. Real probes, real fanotify, real openssl.

mod support;

use std::{
    os::unix::process::ExitStatusExt,
    process::Command,
    time::{Duration, Instant},
};

use support::*;

#[test]
fn every_event_a_live_sensor_writes_is_valid_ocsf_1_3_0() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key = openssl_key(&keys, "signing", "ec");
    // A key no rule protects, read by a process a rule kills afterwards.
    let other_dir = work.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = openssl_key(&other_dir, "other", "ec");
    let allowed_dir = work.path().join("allowed");
    std::fs::create_dir(&allowed_dir).unwrap();
    let allowed = allowed_dir.join("openssl");
    std::fs::copy("/usr/bin/openssl", &allowed).unwrap();
    let guarded = work.path().join("guarded");
    std::fs::create_dir(&guarded).unwrap();
    let env_file = guarded.join("app.env");
    std::fs::write(&env_file, "DB_PASSWORD=hunter2\n").unwrap();
    let rules = work.path().join("rules.yaml");
    let rules_text = format!(
        "rules:\n\
         \x20 - id: protect-signing-key\n    severity: critical\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    allow:\n      - exe_path: {}\n    actions: [alert, kill]\n\
         \x20 - id: guarded-env\n    severity: high\n    event: secret_file_open\n    match:\n      file.path: {}/**\n    allow:\n      - exe_path: /usr/bin/head\n    actions: [alert, block]\n\
         \x20 - id: other-key-read\n    description: The other key was read\n    severity: medium\n    event: secret_file_open\n    match:\n      key.spki_sha256: {}\n    actions: [alert, kill]\n",
        key.spki,
        allowed.display(),
        guarded.display(),
        other.spki,
    );
    std::fs::write(&rules, &rules_text).unwrap();
    let config = sensor_config(work.path(), &[&keys], &[]);
    let sensor = Sensor::start(&[
        "--config",
        config.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);

    let data = work.path().join("data.txt");
    std::fs::write(&data, "payload").unwrap();
    // Killed in the kernel as it enters the signing call.
    let (denied_pid, out) = run_pid_deadline(
        &mut openssl_sign(
            "/usr/bin/openssl",
            &key.path,
            &data,
            &work.path().join("d.sig"),
        ),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.signal(), Some(9), "{out:?}");
    // Allowed to sign.
    let allowed_pid = run_pid_deadline_ok(
        &mut openssl_sign(&allowed, &key.path, &data, &work.path().join("a.sig")),
        Duration::from_secs(20),
    );
    // Denied and allowed by the guard.
    let (cat_pid, out) = run_pid(Command::new("cat").arg(&env_file));
    assert!(!out.status.success(), "{out:?}");
    let (head_pid, _) = run_pid_ok(Command::new("head").arg(&env_file));
    // Reads the other key and waits: the rule's kill comes after the event.
    let mut reader = spawn(
        Command::new("python3")
            .arg("-c")
            .arg("import sys, time; open(sys.argv[1]).read(); time.sleep(60)")
            .arg(&other.path),
    );
    let reader_pid = reader.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = reader.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the reader of the other key was not killed:\n{}",
            sensor.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.signal(), Some(9), "{status:?}");
    // A rule set that does not load: a coverage warning.
    std::fs::write(
        &rules,
        rules_text.replace("severity: medium", "severity: loud"),
    )
    .unwrap();
    let before = sensor.log().matches("rules not reloaded").count();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sensor.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("the refused reload", Duration::from_secs(10), || {
        sensor.log().matches("rules not reloaded").count() > before
    });
    let (events, raw) = sensor.stop_with_output();

    // Every line, whatever its kind, is valid OCSF 1.3.0.
    let written = work.path().join("events.ndjson");
    std::fs::write(&written, &raw).unwrap();
    assert_eq!(raw.lines().count(), events.len());
    let summary = assert_valid_ocsf(&written, "1.3.0");
    assert!(summary.contains(" 0 invalid"), "{summary}");

    // And the run wrote every kind, with every outcome it is about.
    assert!(
        key_uses_of(&events, denied_pid)
            .iter()
            .any(|e| e.status_id == 2)
            && key_uses_of(&events, allowed_pid)
                .iter()
                .any(|e| e.status_id == 1),
        "{}",
        pretty(&events)
    );
    let warning = coverage_warnings(&events)
        .into_iter()
        .find(|e| e.message.contains("rules not reloaded"))
        .unwrap_or_else(|| panic!("no warning for the refused reload: {}", pretty(&events)));
    assert_eq!(warning.class_uid, 1008, "{}", pretty(warning));
    let opens = [cat_pid, head_pid, reader_pid].map(|pid| {
        let o = secret_opens_of(&events, pid);
        assert_eq!(o.len(), 1, "{}", pretty(&o));
        o[0]
    });
    assert_eq!(
        opens.map(|o| o.action.as_deref()),
        [Some("Denied"), Some("Allowed"), None],
        "{}",
        pretty(&opens)
    );
    assert_eq!(
        spki_of(opens[2]),
        Some(other.spki.as_str()),
        "{}",
        pretty(opens[2])
    );
    let finding = |pid: u32| {
        let f = findings_of(&events, pid);
        assert_eq!(f.len(), 1, "{}", pretty(&f));
        f[0]
    };
    let cases = [
        (denied_pid, ("kill", Outcome::InKernel), "Blocked"),
        (cat_pid, ("block", Outcome::Done), "Blocked"),
        (reader_pid, ("kill", Outcome::Done), "Custom Action"),
    ];
    for (pid, response, disposition) in cases {
        let f = finding(pid);
        assert_eq!(
            responses_of(f),
            [("alert", Outcome::Done), response],
            "{}",
            pretty(f)
        );
        assert_eq!(f.disposition.as_deref(), Some(disposition), "{}", pretty(f));
        assert!(
            f.metadata.profiles.iter().any(|p| p == "security_control"),
            "{}",
            pretty(f)
        );
    }
    assert!(findings_of(&events, allowed_pid).is_empty());
    assert!(findings_of(&events, head_pid).is_empty());
}
