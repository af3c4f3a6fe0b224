//! The Prometheus endpoint of a running sensor: a scrape after a signature
//! counts it, its finding and the finding's action, shows the sensor's
//! memory, and is a text `promtool check metrics` (Debian's `prometheus`
//! package, installed by `scripts/bootstrap.sh`) accepts.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

/// One plain HTTP/1.1 GET: the response's head and body.
fn get(port: u16, path: &str) -> (String, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (head.to_owned(), body.to_owned())
}

/// The value of `series` (the name and labels as the endpoint writes
/// them) in a scrape, if it has that sample.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `promtool check metrics` on a scrape: its complaints, if any.
fn promtool_check(body: &str) -> Result<(), String> {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool (Debian package prometheus; scripts/bootstrap.sh installs it): {e}")
        });
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn a_scrape_counts_a_signature_its_finding_and_passes_promtool() {
    let work = tempfile::tempdir().unwrap();
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"keywarden counts this").unwrap();
    let key = openssl_key(work.path(), "metrics", "ec");
    let rules = work.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: metrics-test-key\n    severity: low\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    actions: [alert]\n",
            key.spki
        ),
    )
    .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let sensor = Sensor::start(&["--metrics", &addr, "--rules", rules.to_str().unwrap()]);
    assert!(
        sensor.log().contains(&format!("GET http://{addr}/metrics")),
        "the endpoint is announced:\n{}",
        sensor.log()
    );

    let (pid, _) = run_pid_ok(&mut openssl_sign(
        "openssl",
        &key.path,
        &msg,
        &work.path().join("msg.sig"),
    ));
    // The counts are published once a turn of the event loop; the finding
    // comes back from the analyzer a turn or two later, and the output
    // thread writes both lines on its own time.
    let finding = r#"keywarden_findings_total{rule="metrics-test-key"}"#;
    wait_for(
        "the signature's finding, written, in a scrape",
        Duration::from_secs(20),
        || {
            let body = get(port, "/metrics").1;
            value(&body, finding).is_some_and(|n| n >= 1.0)
                && value(&body, "keywarden_events_written_total").is_some_and(|n| n >= 2.0)
        },
    );
    let (head, body) = get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\ncontent-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let at_least_one = [
        r#"keywarden_events_total{class="key_use",outcome="success"}"#,
        r#"keywarden_events_total{class="alert",outcome="new"}"#,
        r#"keywarden_actions_total{action="alert",outcome="done"}"#,
        "keywarden_events_written_total",
        "keywarden_attached_libraries",
        "keywarden_attached_functions",
        "keywarden_key_verifications_total",
        finding,
    ];
    for series in at_least_one {
        assert!(
            value(&body, series).is_some_and(|n| n >= 1.0),
            "{series} at least 1 expected:\n{body}"
        );
    }
    assert!(
        value(&body, "keywarden_resident_memory_bytes").is_some_and(|n| n > 0.0),
        "{body}"
    );
    for cause in ["ring_buffer", "kernel_skipped"] {
        assert_eq!(
            value(
                &body,
                &format!(r#"keywarden_shed_events_total{{cause="{cause}"}}"#)
            ),
            Some(0.0),
            "{body}"
        );
    }
    assert!(
        value(&body, r#"keywarden_queue_capacity{queue="analyzer_input"}"#)
            .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    if let Err(e) = promtool_check(&body) {
        panic!("promtool check metrics: {e}\n{body}");
    }

    // Anything but GET /metrics is not found.
    for path in ["/", "/metrics/", "/favicon.ico"] {
        let (head, _) = get(port, path);
        assert!(head.starts_with("HTTP/1.1 404 "), "{path}: {head}");
    }

    let events = sensor.stop();
    assert_eq!(key_uses_of(&events, pid).len(), 1, "{}", pretty(&events));
    assert_eq!(findings_of(&events, pid).len(), 1, "{}", pretty(&events));
}

/// An address that is taken, or is not an address, stops the sensor at
/// start with an error naming it.
#[test]
fn a_metrics_address_that_cannot_be_bound_is_a_startup_error() {
    let work = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    for addr in [taken.as_str(), "localhost:9464"] {
        let out = keywarden()
            .args(["run", "--output"])
            .arg(work.path().join("events.ndjson"))
            .arg("--baselines")
            .arg(work.path().join("baselines.json"))
            .args(["--metrics", addr])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{addr}: {stderr}");
        assert!(
            stderr.contains("keywarden: error: metrics endpoint") && stderr.contains(addr),
            "{addr}: {stderr}"
        );
    }
}
