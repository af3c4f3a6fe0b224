//! Rules that act: `kill` stops a signer in the kernel before its signature
//! exists, `block` refuses an open with EPERM, and every firing is a
//! Detection Finding. Real probes, real fanotify, real openssl.

mod support;

use std::{os::unix::process::ExitStatusExt, path::Path, process::Command};

use support::*;

#[test]
fn kill_rule_stops_a_binary_that_is_not_allowed_before_it_signs() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key = openssl_key(&keys, "signing", "ec");
    let allowed_dir = work.path().join("allowed");
    std::fs::create_dir(&allowed_dir).unwrap();
    let allowed = allowed_dir.join("openssl");
    std::fs::copy("/usr/bin/openssl", &allowed).unwrap();
    let rules = kill_rule(work.path(), &key.spki, &allowed);
    let data = work.path().join("data.txt");
    std::fs::write(&data, "payload").unwrap();
    let config = sensor_config(work.path(), &[&keys], &[]);
    let sensor = Sensor::start(&[
        "--config",
        config.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert!(
        sensor.log().contains("protected key file"),
        "{}",
        sensor.log()
    );

    let denied_sig = work.path().join("denied.sig");
    let (denied_pid, out) = run_pid_deadline(
        &mut openssl_sign("/usr/bin/openssl", &key.path, &data, &denied_sig),
        std::time::Duration::from_secs(20),
    );
    assert_eq!(out.status.signal(), Some(9), "{out:?}");
    let written = std::fs::metadata(&denied_sig).map(|m| m.len()).unwrap_or(0);
    assert_eq!(written, 0, "the signature file must stay empty");

    let allowed_sig = work.path().join("allowed.sig");
    let (allowed_pid, out) = run_pid_deadline(
        &mut openssl_sign(&allowed, &key.path, &data, &allowed_sig),
        std::time::Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::metadata(&allowed_sig).unwrap().len() > 0);

    let events = sensor.stop();
    // The denied process: a failed key use naming the key, and a finding
    // saying the kill happened in the kernel.
    let uses = key_uses_of(&events, denied_pid);
    assert_eq!(uses.len(), 1, "{}", pretty(&uses));
    let e = uses[0];
    assert_eq!(e.status_id, 2, "{}", pretty(e));
    assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
    assert!(
        e.status_detail
            .as_deref()
            .is_some_and(|d| d.contains("killed")),
        "{}",
        pretty(e)
    );
    let findings = findings_of(&events, denied_pid);
    assert_eq!(findings.len(), 1, "{}", pretty(&findings));
    let f = findings[0];
    assert_eq!(f.class_uid, 2004, "{}", pretty(f));
    assert_eq!(rule_of(f), Some("protect-signing-key"), "{}", pretty(f));
    assert_eq!(f.severity_id, 5, "{}", pretty(f));
    assert_eq!(
        responses_of(f),
        [("alert", Outcome::Done), ("kill", Outcome::InKernel)],
        "{}",
        pretty(f)
    );
    assert_eq!(
        evidence_of(f).metadata.event_code,
        EventCode::KeyUse,
        "{}",
        pretty(f)
    );

    // The allowed binary: one successful signature with the same key, and
    // no finding.
    let uses = key_uses_of(&events, allowed_pid);
    assert_eq!(uses.len(), 1, "{}", pretty(&uses));
    let e = uses[0];
    assert_eq!(e.status_id, 1, "{}", pretty(e));
    assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
    let alerts = findings_of(&events, allowed_pid);
    assert!(alerts.is_empty(), "{}", pretty(&alerts));
}

#[test]
fn block_rule_denies_with_eperm_and_allows_the_listed_binary() {
    let work = tempfile::tempdir().unwrap();
    let guarded = work.path().join("guarded");
    std::fs::create_dir(&guarded).unwrap();
    let before = guarded.join("app.env");
    std::fs::write(&before, "DB_PASSWORD=hunter2-before\n").unwrap();
    let rules = work.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: guarded-env\n    severity: high\n    event: secret_file_open\n    match:\n      file.path: {}/**\n      file.name: [app.env, token]\n    allow:\n      - exe_path: /usr/bin/head\n    actions: [alert, block]\n",
            guarded.display()
        ),
    )
    .unwrap();
    // Each report of a guarded open reaches the event thread after its
    // process has exited (and was forgotten): it must still be attributed
    // as the guard judged it.
    let sensor = Sensor::start_with_env(
        &["--rules", rules.to_str().unwrap()],
        &[("KEYWARDEN_TEST_GUARD_REPORT_DELAY_MS", "300")],
    );
    assert!(sensor.log().contains("fanotify"), "{}", sensor.log());

    let (cat_pid, out) = run_pid(Command::new("cat").arg(&before));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    // A watched file under the guarded directory that the rule does not
    // select: allowed, and still reported (without a verdict).
    let dotenv = guarded.join(".env");
    std::fs::write(&dotenv, "API_KEY=hunter2-dotenv\n").unwrap();
    let (dotenv_pid, _) = run_pid_ok(Command::new("cat").arg(&dotenv));
    let (head_pid, out) = run_pid_ok(Command::new("head").arg(&before));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "DB_PASSWORD=hunter2-before\n"
    );

    // A file created after start, in a directory created after start.
    let sub = guarded.join("later");
    std::fs::create_dir(&sub).unwrap();
    let after = sub.join("token");
    std::fs::write(&after, "hunter2-after").unwrap();
    // New directories are marked by a periodic rescan.
    wait_for(
        "the new directory to be guarded",
        std::time::Duration::from_secs(10),
        || {
            !Command::new("cat")
                .arg(&after)
                .output()
                .unwrap()
                .status
                .success()
        },
    );
    let (late_pid, out) = run_pid(Command::new("cat").arg(&after));
    assert!(!out.status.success(), "{out:?}");

    let events = sensor.stop();
    let denied = secret_opens_of(&events, cat_pid);
    assert_eq!(denied.len(), 1, "{}", pretty(&denied));
    let d = denied[0];
    assert_eq!(secret_of(d).verdict, Some(Verdict::Denied), "{}", pretty(d));
    assert_eq!(
        secret_of(d).rule.as_deref(),
        Some("guarded-env"),
        "{}",
        pretty(d)
    );
    assert_eq!(secret_of(d).count, 1, "{}", pretty(d));
    assert_eq!(d.status_id, 2, "{}", pretty(d));
    assert_eq!(d.action_id, Some(2), "{}", pretty(d));
    assert_eq!(
        file_path_of(d),
        Some(before.to_str().unwrap()),
        "{}",
        pretty(d)
    );
    assert_eq!(d.actor.process.name, "cat", "{}", pretty(d));
    let finding = findings_of(&events, cat_pid);
    assert_eq!(finding.len(), 1, "{}", pretty(&finding));
    assert_eq!(
        responses_of(finding[0]),
        [("alert", Outcome::Done), ("block", Outcome::Done)],
        "{}",
        pretty(finding[0])
    );

    let allowed = secret_opens_of(&events, head_pid);
    assert_eq!(allowed.len(), 1, "{}", pretty(&allowed));
    let a = allowed[0];
    assert_eq!(
        secret_of(a).verdict,
        Some(Verdict::Allowed),
        "{}",
        pretty(a)
    );
    assert_eq!(a.status_id, 1, "{}", pretty(a));
    assert_eq!(a.action_id, Some(1), "{}", pretty(a));
    let head_alerts = findings_of(&events, head_pid);
    assert!(head_alerts.is_empty(), "{}", pretty(&head_alerts));

    let unselected = secret_opens_of(&events, dotenv_pid);
    assert_eq!(unselected.len(), 1, "{}", pretty(&unselected));
    let u = unselected[0];
    assert!(secret_of(u).verdict.is_none(), "{}", pretty(u));
    assert_eq!(secret_of(u).matched, "**/.env", "{}", pretty(u));
    assert_eq!(u.status_id, 0, "{}", pretty(u));
    let dotenv_alerts = findings_of(&events, dotenv_pid);
    assert!(dotenv_alerts.is_empty(), "{}", pretty(&dotenv_alerts));

    let late = secret_opens_of(&events, late_pid);
    assert_eq!(late.len(), 1, "{}", pretty(&late));
    assert_eq!(
        secret_of(late[0]).verdict,
        Some(Verdict::Denied),
        "{}",
        pretty(late[0])
    );

    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains("hunter2"), "secret contents leaked");
}

#[test]
fn bad_rules_are_refused_with_their_place() {
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "rules:\n  - id: a\n    severity: high\n    event: key_use\n    match:\n      key.spki: abc\n    actions: [alert]\n",
    )
    .unwrap();
    let out = keywarden()
        .args(["rules", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:6:7: unknown event field `key.spki`",
            bad.display()
        )),
        "{err}"
    );
    // The sensor refuses to start on them, before attaching anything.
    let out = keywarden()
        .args(["run", "--output", "/dev/null", "--rules"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(":6:7:"));
    // A block rule that would hold every open on the host names itself.
    let wide = work.path().join("wide.yaml");
    std::fs::write(
        &wide,
        "rules:\n  - id: wide\n    severity: high\n    event: secret_file_open\n    match:\n      file.path: \"**/*.key\"\n    actions: [block]\n",
    )
    .unwrap();
    let out = keywarden()
        .args(["run", "--output", "/dev/null", "--rules"])
        .arg(&wide)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rule wide") && err.contains("fixed directory"),
        "{err}"
    );

    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let out = keywarden()
        .args(["rules", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn a_rule_on_a_path_outside_the_watch_list_watches_it() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("app-config.yaml");
    std::fs::write(&config, "password: hunter2\n").unwrap();
    let rules = work.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: app-config-read\n    severity: medium\n    event: secret_file_open\n    match:\n      file.path: {}\n    actions: [alert]\n",
            config.display()
        ),
    )
    .unwrap();
    let sensor = Sensor::start(&["--rules", rules.to_str().unwrap()]);
    let (pid, _) = run_pid_ok(Command::new("cat").arg(&config));
    let events = sensor.stop();
    let opens = secret_opens_of(&events, pid);
    assert_eq!(opens.len(), 1, "{}", pretty(&opens));
    assert_eq!(
        secret_of(opens[0]).matched,
        config.to_str().unwrap(),
        "{}",
        pretty(opens[0])
    );
    let findings = findings_of(&events, pid);
    assert_eq!(findings.len(), 1, "{}", pretty(&findings));
    let f = findings[0];
    assert_eq!(rule_of(f), Some("app-config-read"), "{}", pretty(f));
    assert_eq!(responses_of(f), [("alert", Outcome::Done)], "{}", pretty(f));
    assert!(!serde_json::to_string(&events).unwrap().contains("hunter2"));
}

/// A process that predates the sensor, whose executable lives in a guarded
/// directory, opens a guarded file: the guard must judge it without opening
/// that executable itself (an open it would have to answer).
#[test]
fn a_guarded_executable_started_before_the_sensor_is_judged_without_deadlock() {
    let work = tempfile::tempdir().unwrap();
    let guarded = work.path().join("g");
    std::fs::create_dir(&guarded).unwrap();
    let shell = guarded.join("sh");
    std::fs::copy("/bin/dash", &shell).unwrap();
    let secret = guarded.join("secret");
    std::fs::write(&secret, "s=hunter2\n").unwrap();
    let go = work.path().join("go");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; read x < {secret} && echo read-ok",
        go = go.display(),
        secret = secret.display()
    );
    let child = spawn(
        Command::new(&shell)
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let pid = child.id();
    let rules = work.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: g\n    severity: high\n    event: secret_file_open\n    match:\n      file.path: {}/**\n      file.name: secret\n    allow:\n      - exe_path: /usr/bin/head\n    actions: [block]\n",
            guarded.display()
        ),
    )
    .unwrap();
    let sensor = Sensor::start(&["--rules", rules.to_str().unwrap()]);
    std::fs::write(&go, "").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the opener is stuck");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    let events = sensor.stop();
    let denied = secret_opens_of(&events, pid);
    assert_eq!(denied.len(), 1, "{}", pretty(&denied));
    assert_eq!(
        secret_of(denied[0]).verdict,
        Some(Verdict::Denied),
        "{}",
        pretty(denied[0])
    );
}
