//! What an unprivileged local user can do to the sensor (issue: a sensor
//! a hostile host cannot stop, blind, crash or misuse). Each attack runs for
//! real as `nobody`, and each test then checks the sensor still reports a
//! normal signature.

mod support;

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::Command,
    time::Duration,
};

use support::*;

/// A command run as `nobody` (uid and gid 65534), like an attacker with a
/// shell on the host.
fn as_nobody(program: &str) -> Command {
    let mut cmd = Command::new(program);
    // As root, std also drops the supplementary groups when it sets the uid.
    cmd.uid(65534).gid(65534);
    cmd
}

/// A directory `nobody` may write in.
fn attacker_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// The sensor still sees a normal signature, attributed and identified.
fn still_reports_signatures(sensor: &Sensor) {
    let work = tempfile::tempdir().unwrap();
    let key = openssl_key(work.path(), "after", "ec");
    let msg = work.path().join("m");
    std::fs::write(&msg, b"after the attack").unwrap();
    let (pid, _) = run_pid_ok(&mut openssl_sign(
        "openssl",
        &key.path,
        &msg,
        &work.path().join("s"),
    ));
    wait_for(
        "the signature after the attack",
        Duration::from_secs(10),
        || {
            key_uses_of(&sensor.events(), pid)
                .iter()
                .any(|e| e["key"]["spki_sha256"] == key.spki.as_str())
        },
    );
}

/// A path with a newline and a forged log line in it is logged escaped:
/// no line of the sensor's log starts with the forged text.
#[test]
fn a_file_name_cannot_forge_a_log_line() {
    let dir = attacker_dir();
    let sensor = Sensor::start(&[]);
    let forged = "WARN rule fired: sshd is stealing keys";
    let name = dir.path().join(format!("x\n{forged}\n.key"));
    run_ok(
        as_nobody("sh")
            .arg("-c")
            .arg("touch \"$1\"; cat \"$1\"")
            .arg("sh")
            .arg(&name),
    );
    wait_for("the secret-file event", Duration::from_secs(10), || {
        sensor.events().iter().any(|e| {
            e["file"]["path"]
                .as_str()
                .is_some_and(|p| p.contains(forged))
        })
    });
    still_reports_signatures(&sensor);
    let log = sensor.log();
    let events = sensor.stop();
    assert!(
        events.iter().any(|e| e["file"]["path"]
            .as_str()
            .is_some_and(|p| p.contains(forged))),
        "the open is still reported, path intact in the event"
    );
    for line in log.lines() {
        assert!(!line.starts_with(forged), "forged log line:\n{log}");
    }
    assert!(
        log.contains("\\x0a"),
        "the newline is shown escaped:\n{log}"
    );
}

/// A symlink planted at the output path is refused: the sensor does not
/// append events (command lines, paths) to whatever it points at.
#[test]
fn a_symlink_at_the_output_path_is_refused() {
    let dir = attacker_dir();
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("root-only");
    std::fs::write(&victim, b"root's file\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = dir.path().join("events.ndjson");
    run_ok(as_nobody("ln").arg("-s").arg(&victim).arg(&out));
    let o = keywarden()
        .args(["run", "--output"])
        .arg(&out)
        .arg("--baselines")
        .arg(dir.path().join("b.json"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!o.status.success(), "sensor started through a symlink");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("cannot open output file"), "{stderr}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file\n");
}

/// A new output file is readable by root only: events hold command lines.
#[test]
fn a_new_output_file_is_private() {
    let sensor = Sensor::start(&[]);
    let mode = std::fs::metadata(&sensor.events_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    still_reports_signatures(&sensor);
    sensor.stop();
    assert_eq!(mode, 0o600);
}

/// Baselines are written through a temporary name no one can predict, so a
/// symlink planted at the old `<baseline>.tmp.<pid>` name is never followed.
#[test]
fn a_planted_baseline_temporary_is_not_followed() {
    let dir = attacker_dir();
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("root-only");
    std::fs::write(&victim, b"root's file\n").unwrap();
    let baselines = dir.path().join("baselines.json");
    let sensor = Sensor::start(&["--baselines", baselines.to_str().unwrap()]);
    // The pid is public; plant the name a fixed scheme would use.
    let planted = Path::new(&baselines).with_extension(format!("tmp.{}", sensor.pid()));
    run_ok(as_nobody("ln").arg("-s").arg(&victim).arg(&planted));
    still_reports_signatures(&sensor);
    sensor.stop(); // saves the baselines
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file\n");
    let saved = std::fs::read_to_string(&baselines).unwrap();
    assert!(saved.contains("\"keys\""), "{saved}");
}
