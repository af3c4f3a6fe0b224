//! The analyzer behind the live sensor: a key's baseline is learned from
//! real signatures, a binary it never signed from is a deviation that a rule
//! turns into a finding and a kill, and replaying the recorded events
//! through `keywarden analyze` gives the same findings.

mod support;

use std::{
    io::Write,
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

#[test]
fn a_new_binary_signing_with_a_learned_key_is_found_killed_and_replayed_alike() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key = openssl_key(&keys, "service", "ec");
    let cert = keys.join("service.crt");
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-new",
                "-subj",
                "/CN=localhost",
                "-days",
                "1",
                "-key",
            ])
            .arg(&key.path)
            .arg("-out")
            .arg(&cert),
    );
    // A binary the key never signed from: openssl with one byte appended
    // (it still runs; its SHA-256 differs).
    let other = work.path().join("openssl-other");
    std::fs::copy("/usr/bin/openssl", &other).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .unwrap()
        .write_all(b"X")
        .unwrap();
    let rules = work.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: service-key-new-binary\n    severity: high\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    deviation: [new_binary]\n    actions: [alert, kill]\n",
            key.spki
        ),
    )
    .unwrap();
    let config = sensor_config(
        work.path(),
        &[&keys],
        &[
            ("learning_period_s: 604800", "learning_period_s: 2".into()),
            ("rules: []", format!("rules: [{}]", rules.display())),
        ],
    );

    let sensor = Sensor::start(&["--config", config.to_str().unwrap()]);
    let data = work.path().join("data");
    std::fs::write(&data, "x").unwrap();
    let sign = |bin: &std::path::Path| {
        run_pid(&mut openssl_sign(
            bin,
            &key.path,
            &data,
            &work.path().join("sig"),
        ))
    };
    // Learning: the system openssl signs.
    let (learn_pid, out) = sign("/usr/bin/openssl".as_ref());
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(2500));
    // After learning: the same binary is normal...
    let (normal_pid, out) = sign("/usr/bin/openssl".as_ref());
    assert!(out.status.success());
    // ...and a server from another binary signing in a TLS handshake is not.
    let port = free_port();
    let mut server = Command::new(&other)
        .args(["s_server", "-quiet", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-key")
        .arg(&key.path)
        .arg("-cert")
        .arg(&cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server_pid = server.id();
    wait_for("s_server to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let _ = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let mut status = None;
    wait_for("the server to be killed", Duration::from_secs(10), || {
        status = server.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.unwrap().signal(), Some(9));
    let events = sensor.stop();

    let found = findings(&events);
    assert_eq!(found.len(), 1, "{}", pretty(&found));
    let f = found[0];
    assert_eq!(f.actor.process.pid, server_pid, "{}", pretty(f));
    assert_eq!(rule_of(f), Some("service-key-new-binary"), "{}", pretty(f));
    assert_eq!(analysis_of(f).deviations, ["new_binary"], "{}", pretty(f));
    let baseline = analysis_of(f)
        .baseline
        .as_ref()
        .unwrap_or_else(|| panic!("no analysis.baseline: {}", pretty(f)));
    // Owned values compare alike whatever collection the model keeps.
    let learned: Vec<String> = baseline.binaries.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        learned,
        [sha256_file("/usr/bin/openssl".as_ref())],
        "{}",
        pretty(f)
    );
    assert_eq!(
        responses_of(f).get(1),
        Some(&("kill", Outcome::Done)),
        "{}",
        pretty(f)
    );
    // The learning and normal signatures are events, not findings.
    for pid in [learn_pid, normal_pid] {
        assert_eq!(key_uses_of(&events, pid).len(), 1);
    }

    // Replay the recorded events: the same finding for the same evidence.
    let sensor_events = work.path().join("recorded.ndjson");
    std::fs::write(
        &sensor_events,
        events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let out = run_ok(
        keywarden()
            .args(["analyze", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(&sensor_events),
    );
    let replayed = parse_events(&String::from_utf8(out.stdout).unwrap(), "keywarden analyze");
    assert_eq!(replayed.len(), 1, "{}", pretty(&replayed));
    let r = &replayed[0];
    assert_eq!(rule_of(r), rule_of(f), "{}", pretty(r));
    assert_eq!(
        evidence_of(r).metadata.uid,
        evidence_of(f).metadata.uid,
        "{}",
        pretty(r)
    );
    assert_eq!(
        analysis_of(r).deviations,
        analysis_of(f).deviations,
        "{}",
        pretty(r)
    );
    assert_eq!(
        responses_of(r).get(1).map(|&(_, outcome)| outcome),
        Some(Outcome::Skipped),
        "{}",
        pretty(r)
    );
}

#[test]
fn baselines_persist_across_restarts_and_can_be_listed_and_reset() {
    let work = tempfile::tempdir().unwrap();
    let key = openssl_key(work.path(), "k", "ec");
    let baselines = work.path().join("b.json");
    let data = work.path().join("data");
    std::fs::write(&data, "x").unwrap();
    for _ in 0..2 {
        let sensor = Sensor::start(&["--baselines", baselines.to_str().unwrap()]);
        run_ok(&mut openssl_sign(
            "openssl",
            &key.path,
            &data,
            &work.path().join("sig"),
        ));
        sensor.stop();
    }
    let list = |file: &std::path::Path| {
        String::from_utf8(run_ok(keywarden().args(["baseline", "list", "--file"]).arg(file)).stdout)
            .unwrap()
    };
    let text = list(&baselines);
    let line = text
        .lines()
        .find(|l| l.starts_with(&key.spki))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("uses=2"), "two runs, one use each: {line}");
    run_ok(
        keywarden()
            .args(["baseline", "reset", "--file"])
            .arg(&baselines)
            .args(["--key", &key.spki]),
    );
    assert!(!list(&baselines).contains(&key.spki));
    let out = keywarden()
        .args(["baseline", "reset", "--file"])
        .arg(&baselines)
        .args(["--key", &key.spki])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no baseline for key"));
}

#[test]
fn sighup_reloads_rules_and_a_bad_set_keeps_the_last_good_one() {
    let work = tempfile::tempdir().unwrap();
    let key = openssl_key(work.path(), "k", "ec");
    let rules = work.path().join("rules.yaml");
    let rule = |id: &str| {
        format!(
            "rules:\n  - id: {id}\n    severity: low\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    actions: [alert]\n",
            key.spki
        )
    };
    std::fs::write(&rules, "rules: []\n").unwrap();
    let sensor = Sensor::start(&["--rules", rules.to_str().unwrap()]);
    let data = work.path().join("data");
    std::fs::write(&data, "x").unwrap();
    let sign = || {
        run_pid(&mut openssl_sign(
            "openssl",
            &key.path,
            &data,
            &work.path().join("sig"),
        ))
        .0
    };
    let hup = |sensor: &Sensor, expect: &str| {
        let before = sensor.log().matches(expect).count();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sensor.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        wait_for(expect, Duration::from_secs(10), || {
            sensor.log().matches(expect).count() > before
        });
    };
    let before_reload = sign();
    std::fs::write(&rules, rule("first")).unwrap();
    hup(&sensor, "rules reloaded");
    let after_reload = sign();
    // A broken file is refused; the running rule stays.
    std::fs::write(
        &rules,
        rule("second").replace("severity: low", "severity: loud"),
    )
    .unwrap();
    hup(&sensor, "rules not reloaded");
    let after_bad = sign();
    let events = sensor.stop();

    let fired = |pid: u32| -> Vec<String> {
        findings_of(&events, pid)
            .into_iter()
            .map(|f| {
                rule_of(f)
                    .unwrap_or_else(|| panic!("a finding without its rule: {}", pretty(f)))
                    .to_owned()
            })
            .collect()
    };
    assert!(fired(before_reload).is_empty());
    assert_eq!(fired(after_reload), ["first"]);
    assert_eq!(fired(after_bad), ["first"], "the last good set stays");
    let warning = coverage_warnings(&events)
        .into_iter()
        .find(|e| e.message.contains("rules not reloaded"))
        .expect("a warning event for the refused reload");
    assert!(
        warning.message.contains("rules.yaml:3:15"),
        "{}",
        pretty(warning)
    );
    // Every signature is still an event: nothing was lost across reloads.
    for pid in [before_reload, after_reload, after_bad] {
        assert_eq!(key_uses_of(&events, pid).len(), 1);
    }
}

/// nginx's key, learned from clients "in Germany" (127.0.0.2, per the
/// fixture GeoIP databases), is then used for a client "in France"
/// (127.0.0.130): one finding, naming the country, the peer and the
/// baseline it broke.
#[test]
fn a_handshake_from_a_new_country_is_a_finding() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let key = openssl_key(dir, "nginx", "ec");
    let crt = cert(dir, &key, "localhost");
    let port = free_port();
    let nginx = start_nginx(dir, port, &nginx_tls_server(port, &crt, &key.path, ""));
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: tls-key-new-country\n    severity: high\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    deviation: [new_country]\n    actions: [alert]\n",
            key.spki
        ),
    )
    .unwrap();
    let geo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/geo");
    let config = sensor_config(
        dir,
        &[dir],
        &[
            ("learning_period_s: 604800", "learning_period_s: 2".into()),
            (
                "geoip_city: null",
                format!("geoip_city: {}", geo.join("city.mmdb").display()),
            ),
            (
                "geoip_asn: null",
                format!("geoip_asn: {}", geo.join("asn.mmdb").display()),
            ),
            ("rules: []", format!("rules: [{}]", rules.display())),
        ],
    );
    let sensor = Sensor::start(&["--config", config.to_str().unwrap()]);
    let from = |source: &str| {
        let out = run_ok(
            Command::new("curl")
                .args(["-sk", "--interface", source])
                .arg(format!("https://127.0.0.1:{port}/")),
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
    };
    // Learning, then the same country again after it: no finding.
    from("127.0.0.2");
    from("127.0.0.3");
    std::thread::sleep(Duration::from_millis(2500));
    from("127.0.0.4");
    // A country this key was never used from.
    from("127.0.0.130");
    let events = sensor.stop();
    drop(nginx);
    let uses: Vec<&Event> = key_uses(&events)
        .into_iter()
        .filter(|e| spki_of(e) == Some(key.spki.as_str()))
        .collect();
    assert_eq!(uses.len(), 4, "{}", pretty(&uses));
    let found = findings(&events);
    assert_eq!(found.len(), 1, "{}", pretty(&found));
    let f = found[0];
    assert_eq!(rule_of(f), Some("tls-key-new-country"), "{}", pretty(f));
    let peer = f
        .unmapped
        .peer
        .as_ref()
        .unwrap_or_else(|| panic!("no peer: {}", pretty(f)));
    assert_eq!(peer.ip, "127.0.0.130", "{}", pretty(f));
    assert_eq!(
        peer.location.as_ref().and_then(|l| l.country.as_deref()),
        Some("FR"),
        "{}",
        pretty(f)
    );
    assert_eq!(
        peer.autonomous_system.as_ref().map(|a| a.number),
        Some(64501),
        "{}",
        pretty(f)
    );
    assert_eq!(analysis_of(f).deviations, ["new_country"], "{}", pretty(f));
    let baseline = analysis_of(f)
        .baseline
        .as_ref()
        .unwrap_or_else(|| panic!("no analysis.baseline: {}", pretty(f)));
    let countries: Vec<String> = baseline.countries.iter().map(|v| v.to_string()).collect();
    assert_eq!(countries, ["DE"], "{}", pretty(f));
}
