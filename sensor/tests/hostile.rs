//! What an unprivileged local user can do to the sensor (issue: a sensor
//! a hostile host cannot stop, blind, crash or misuse). Each attack runs for
//! real as `nobody`, and each test then checks the sensor still reports a
//! normal signature.

mod support;

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
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
    still_reports_signatures_within(sensor, Duration::from_secs(10));
}

/// `still_reports_signatures`, the event due within `timeout`.
fn still_reports_signatures_within(sensor: &Sensor, timeout: Duration) {
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
    wait_for("the signature after the attack", timeout, || {
        key_uses_of(&sensor.events(), pid)
            .iter()
            .any(|e| spki_of(e) == Some(key.spki.as_str()))
    });
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
    // Escaped in the JSON, the path reads back whole, newlines and all.
    wait_for("the secret-file event", Duration::from_secs(10), || {
        sensor
            .events()
            .iter()
            .any(|e| file_path_of(e).is_some_and(|p| p.contains(forged)))
    });
    still_reports_signatures(&sensor);
    let log = sensor.log();
    let events = sensor.stop();
    assert!(
        events
            .iter()
            .any(|e| file_path_of(e).is_some_and(|p| p.contains(forged))),
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

/// Row 1: a symlink named like a key file pointing at /proc/kmsg (whose
/// read never returns). The attacker's own open fails (only root may open
/// it), so the sensor does not read it at all. Root's open of it succeeds
/// (without reading): the sensor then reaches the file through root's own
/// descriptor, refuses it as a proc file, and keeps reporting.
#[test]
fn a_key_file_symlink_to_proc_kmsg_does_not_hang_the_sensor() {
    let dir = attacker_dir();
    let sensor = Sensor::start(&[]);
    let trap = dir.path().join("trap.pem");
    let o = as_nobody("sh")
        .arg("-c")
        .arg("ln -s /proc/kmsg \"$1\"; cat \"$1\" 2>/dev/null; exit 0")
        .arg("sh")
        .arg(&trap)
        .output()
        .unwrap();
    assert!(o.status.success());
    still_reports_signatures(&sensor);
    assert!(
        !sensor.log().contains("not read: on a proc filesystem"),
        "nobody's open failed, yet the sensor tried to read the file:\n{}",
        sensor.log()
    );
    // A process that may open it holds it open a moment, never reading.
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$1\"; sleep 1")
            .arg("sh")
            .arg(&trap),
    );
    still_reports_signatures(&sensor);
    let log = sensor.log();
    sensor.stop();
    assert!(
        log.contains("not read: on a proc filesystem"),
        "the sensor says why it did not read it:\n{log}"
    );
}

/// Row 2: a FIFO named like a key file, opened by its owner without
/// blocking. A sensor that opened it to read the key would block forever.
#[test]
fn a_fifo_named_like_a_key_file_does_not_hang_the_sensor() {
    let dir = attacker_dir();
    let sensor = Sensor::start(&[]);
    let trap = dir.path().join("trap.key");
    run_ok(
        as_nobody("sh")
            .arg("-c")
            .arg("mkfifo \"$1\" && exec 3<>\"$1\"")
            .arg("sh")
            .arg(&trap),
    );
    still_reports_signatures(&sensor);
    sensor.stop();
}

/// Row 8: a process in a chroot opens `/../../<host path of a key>`. In its
/// view that path stays inside the chroot, where there is no such file: the
/// sensor must not climb out and report the host's key.
#[test]
fn a_chrooted_process_cannot_make_the_sensor_read_outside_its_root() {
    let host = tempfile::tempdir().unwrap();
    let key = openssl_key(host.path(), "host", "ec");
    let jail = host.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    let sensor = Sensor::start(&[]);
    let escape = format!("/../../../../..{}", key.path.display());
    let status = open_in_chroot(&jail, &escape);
    assert!(!status, "the open inside the jail must fail");
    still_reports_signatures(&sensor);
    let events = sensor.stop();
    let reported: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.unmapped
                .secret_file
                .as_ref()
                .is_some_and(|s| s.keys.iter().any(|k| k.contains(&key.spki)))
        })
        .collect();
    assert!(
        reported.is_empty(),
        "the host's key was reported for an open inside the jail: {}",
        pretty(&reported)
    );
}

/// Forks a child that chroots into `jail` and opens `path` there (as root,
/// like a process in a container); returns whether its open succeeded. It
/// lives on for a second, so the sensor sees its root as it is now (one
/// that chroots and exits at once: the test after this one).
fn open_in_chroot(jail: &Path, path: &str) -> bool {
    let script = format!(
        "import os, sys, time\nos.chroot({jail:?})\ntry:\n    os.open({path:?}, os.O_RDONLY)\n    ok = True\nexcept OSError:\n    ok = False\ntime.sleep(1)\nsys.exit(0 if ok else 3)\n",
        jail = jail.display().to_string(),
    );
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .status()
        .unwrap();
    st.code() == Some(0)
}

/// The events that name the key `spki` anywhere (as their key, among a
/// file's keys, in a finding's evidence), as JSON.
fn named_anywhere(events: &[Event], spki: &str) -> Vec<String> {
    events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .filter(|j| j.contains(spki))
        .collect()
}

/// Row 11: a symlink, in a directory `nobody` owns, to a key only root may
/// read. `nobody`'s `cat` of it fails (EACCES). The sensor, which reads as
/// root, must not read the key for it, nor name the key in any event. The
/// open itself is reported, as the failure it was.
#[test]
fn a_symlink_to_a_key_the_opener_may_not_read_is_not_read() {
    let dir = attacker_dir();
    let victim_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(victim_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = openssl_key(victim_dir.path(), "root-only", "ec");
    std::fs::set_permissions(&victim.path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sensor = Sensor::start(&[]);
    let link = dir.path().join("stolen.key");
    // `exec`: the shell's pid is cat's.
    let (pid, out) = run_pid(
        as_nobody("sh")
            .arg("-c")
            .arg("ln -s \"$1\" \"$2\" && exec cat \"$2\"")
            .arg("sh")
            .arg(&victim.path)
            .arg(&link),
    );
    assert!(!out.status.success(), "nobody read root's key: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    still_reports_signatures(&sensor);
    let events = sensor.stop();
    let named = named_anywhere(&events, &victim.spki);
    assert!(
        named.is_empty(),
        "root's key was read for nobody's failed open: {named:#?}"
    );
    let opens = secret_opens_of(&events, pid);
    assert_eq!(opens.len(), 1, "{}", pretty(&opens));
    let e = opens[0];
    assert_eq!(e.status_id, 2, "{}", pretty(e));
    assert_eq!(
        e.status_detail.as_deref(),
        Some("open failed: EACCES (Permission denied)"),
        "{}",
        pretty(e)
    );
    assert!(
        e.unmapped.key.is_none() && secret_of(e).keys.is_empty() && !secret_of(e).holds_private_key,
        "{}",
        pretty(e)
    );
}

/// Whether `nobody` may make a user namespace and chroot in it
/// (`unshare -r`): some hosts forbid unprivileged user namespaces
/// (`kernel.unprivileged_userns_clone=0`, Ubuntu's AppArmor restriction).
fn nobody_can_chroot() -> Result<(), String> {
    let o = as_nobody("unshare")
        .args(["-r", "chroot", "/", "true"])
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_owned())
    }
}

/// Row 12: a process that chroots after its exec opens, inside its jail,
/// an absolute path that names another key on the host (root's), and exits
/// before the sensor reads (the reader is slowed down for the test, so the
/// process is surely gone, and its descriptor with it). The root the sensor
/// kept from the exec is the host's; resolving the path there would read
/// root's key. The sensor reads only through the root the open resolved
/// from, so it never names root's key. Run as `nobody` in a user namespace
/// (`unshare -r`) where the host allows one; as root otherwise, which is
/// the same attack as far as the sensor can tell (a chroot in the same
/// mount namespace).
#[test]
fn a_process_that_chroots_after_exec_cannot_make_the_sensor_read_the_hosts_key() {
    let host = tempfile::tempdir().unwrap();
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let x = host.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let made = openssl_key(&x, "host", "ec");
    let host_key = x.join("host.key");
    std::fs::rename(&made.path, &host_key).unwrap();
    std::fs::set_permissions(&host_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The same path inside the jail holds another key, which the jailed
    // process may read.
    let jail = attacker_dir();
    let inside = jail.path().join(host_key.strip_prefix("/").unwrap());
    std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
    let jailed = openssl_key(inside.parent().unwrap(), "jailed", "ec");
    std::fs::rename(&jailed.path, &inside).unwrap();
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o644)).unwrap();

    let sensor = Sensor::start_with_env(&[], &[("KEYWARDEN_TEST_KEY_READ_DELAY_MS", "300")]);
    // Nothing is imported after the chroot; the descriptor is closed
    // before the exit.
    let script = format!(
        "import os\nos.chroot({jail:?})\ntry:\n    os.close(os.open({path:?}, os.O_RDONLY))\n    ok = True\nexcept OSError:\n    ok = False\nos._exit(0 if ok else 3)\n",
        jail = jail.path().display().to_string(),
        path = host_key.display().to_string(),
    );
    let mut cmd = match nobody_can_chroot() {
        Ok(()) => {
            let mut c = as_nobody("unshare");
            c.args(["-r", "python3", "-c", &script]);
            c
        }
        Err(why) => {
            eprintln!("nobody cannot chroot here ({why}); the jailed process runs as root");
            let mut c = Command::new("python3");
            c.args(["-c", &script]);
            c
        }
    };
    let (pid, out) = run_pid(&mut cmd);
    assert!(
        out.status.success(),
        "the open inside the jail must succeed: {out:?}"
    );
    still_reports_signatures(&sensor);
    let log = sensor.log();
    let events = sensor.stop();
    let named = named_anywhere(&events, &made.spki);
    assert!(
        named.is_empty(),
        "the host's key was read for an open inside the jail: {named:#?}"
    );
    // Refused through the root kept at exec (the host's), as it should
    // be; or, had the sensor snapshotted the process only after its
    // chroot, read through the jail's root: the jailed key, also right.
    // (Or nothing at all, had it kept no root.)
    let refused = log.contains("no longer the one it opened the file from");
    let read_jailed = !named_anywhere(&events, &jailed.spki).is_empty();
    let no_root = log.contains("its root is gone");
    assert!(
        refused || read_jailed || no_root,
        "the sensor says why it did not read the jailed file:\n{log}"
    );
    // The open is reported: it succeeded.
    let opens = secret_opens_of(&events, pid);
    assert_eq!(opens.len(), 1, "{}", pretty(&opens));
    assert_eq!(opens[0].status_id, 1, "{}", pretty(opens[0]));
}

/// A key file whose read misses its deadline (the reader is slowed down
/// past it for the test) is reported with its key unknown and why, and the
/// event thread goes on: a signature made meanwhile is still reported. (Its
/// key is unknown as well: its key file's read is late too, so this test
/// cannot show a normal signature; the two above do, with a slowed reader
/// within the deadline.)
#[test]
fn a_key_read_past_its_deadline_is_given_up_and_reported() {
    let work = tempfile::tempdir().unwrap();
    let made = openssl_key(work.path(), "slow", "ec");
    let slow = work.path().join("slow.key");
    std::fs::rename(&made.path, &slow).unwrap();
    let sensor = Sensor::start_with_env(&[], &[("KEYWARDEN_TEST_KEY_READ_DELAY_MS", "1500")]);
    let (cat_pid, _) = run_pid_ok(Command::new("cat").arg(&slow));
    let key = openssl_key(work.path(), "signer", "ec");
    let msg = work.path().join("m");
    std::fs::write(&msg, b"while the reader is slow").unwrap();
    let (pid, _) = run_pid_ok(&mut openssl_sign(
        "openssl",
        &key.path,
        &msg,
        &work.path().join("s"),
    ));
    wait_for(
        "the signature made while the reader was slow",
        Duration::from_secs(10),
        || !key_uses_of(&sensor.events(), pid).is_empty(),
    );
    let (status, events, log) = sensor.stop_status(nix::sys::signal::Signal::SIGINT);
    assert!(status.success(), "{status}\n{log}");
    let opens = secret_opens_of(&events, cat_pid);
    assert_eq!(opens.len(), 1, "{}", pretty(&opens));
    let k = key_of(opens[0]);
    assert_eq!(k.status, KeyStatus::Unknown, "{}", pretty(opens[0]));
    assert_eq!(
        k.unknown_reason.as_deref(),
        Some("the key file was not read: the read did not finish within 500 ms"),
        "{}",
        pretty(opens[0])
    );
    assert!(
        named_anywhere(&events, &made.spki).is_empty(),
        "an abandoned read's result was used"
    );
    assert!(log.contains("did not finish within 500 ms"), "{log}");
    // Every read is slowed, so the signer's own key file is abandoned too.
    let abandoned: u64 = log
        .split("key_reads_abandoned=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no key_reads_abandoned in the stop line:\n{log}"));
    assert!(abandoned >= 1, "{log}");
}

/// Row 5: a signer named like the sensor ("keywarden-x", a symlink to
/// openssl) is held and judged like any other: sensors are exempt from
/// holding by thread-group id, never by name. Every one of its signatures
/// with a protected key is stopped before it exists.
#[test]
fn a_process_named_like_the_sensor_is_not_exempt_from_kill_rules() {
    let work = attacker_dir();
    let keys = work.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key = openssl_key(&keys, "signing", "ec");
    for p in [&keys, &key.path] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let rules = kill_rule(work.path(), &key.spki, Path::new("/nowhere/openssl"));
    let config = sensor_config(work.path(), &[&keys], &[]);
    let sensor = Sensor::start(&[
        "--config",
        config.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    let data = work.path().join("data.txt");
    std::fs::write(&data, "payload").unwrap();
    let fake = work.path().join("keywarden-x");
    std::os::unix::fs::symlink("/usr/bin/openssl", &fake).unwrap();
    for i in 0..5 {
        let sig = work.path().join(format!("{i}.sig"));
        let mut cmd = as_nobody(fake.to_str().unwrap());
        cmd.args(["dgst", "-sha256", "-sign"])
            .arg(&key.path)
            .arg("-out")
            .arg(&sig)
            .arg(&data);
        let (_, out) = run_pid_deadline(&mut cmd, Duration::from_secs(20));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "signature {i}: {out:?}\n{}",
            sensor.log()
        );
        let written = std::fs::metadata(&sig).map(|m| m.len()).unwrap_or(0);
        assert_eq!(written, 0, "signature {i} was written");
    }
    still_reports_signatures(&sensor);
    sensor.stop();
}

fn system_libcrypto() -> std::path::PathBuf {
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ] {
        let p = Path::new(d).join("libcrypto.so.3");
        if p.exists() {
            return std::fs::canonicalize(p).unwrap();
        }
    }
    panic!("no libcrypto.so.3");
}

/// The sensor process is still running (not a zombie: it did not die).
fn assert_alive(sensor: &Sensor) {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", sensor.pid())).unwrap_or_default();
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    assert!(
        state.is_some_and(|s| s != 'Z' && s != 'X'),
        "the sensor died during the attack (state {state:?}):\n{}",
        sensor.log()
    );
}

/// Row 3: a library its owner truncates while the sensor reads it. The
/// attacker (`nobody`) makes a sparse copy of libcrypto, has a process load
/// it the way ld.so does (so the sensor scans it for signing code), and
/// cuts it short meanwhile. A sensor that mapped the file died of SIGBUS.
/// Now a copy over the size cap is skipped unread, with a warning that
/// says why, and one under the cap that is cut while it is read gives a
/// read error; the sensor stays up and reports the next signature.
#[test]
fn a_library_truncated_while_it_is_scanned_does_not_crash_the_sensor() {
    let dir = attacker_dir();
    let orig = system_libcrypto();
    // Loads a library as a program would (dlopen: ld.so's own open).
    let loader = dir.path().join("load.py");
    std::fs::write(
        &loader,
        "import ctypes, sys\ntry:\n    ctypes.CDLL(sys.argv[1])\nexcept OSError:\n    pass\n",
    )
    .unwrap();
    std::fs::set_permissions(&loader, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sensor = Sensor::start(&[]);

    // A 1 GiB sparse copy, loaded whole: skipped by the size cap, and said.
    let big = dir.path().join("libkw-big.so.3");
    run_ok(
        as_nobody("sh")
            .arg("-c")
            .arg("cp \"$1\" \"$2\" && truncate -s 1G \"$2\" && python3 \"$3\" \"$2\"")
            .arg("sh")
            .arg(&orig)
            .arg(&big)
            .arg(&loader),
    );
    wait_for(
        "the warning that the 1 GiB copy was not scanned",
        Duration::from_secs(10),
        || {
            coverage_warnings(&sensor.events()).iter().any(|e| {
                e.file
                    .as_ref()
                    .is_some_and(|f| f.path == big.to_str().unwrap())
                    && e.status_detail
                        .as_deref()
                        .is_some_and(|d| d.contains("not scanned: it is 1024 MiB"))
            })
        },
    );

    // The race: while loaders open it, the copy is restored, grown sparse
    // (to 1 GiB, over the cap, and to 64 MiB, under it) and cut to 4 KiB,
    // over and over.
    let script = r#"
orig=$1 dir=$2 loader=$3
for size in 1G 64M; do
    f="$dir/libkw-$size.so.3"
    flag="$dir/mutating-$size"
    cp "$orig" "$f"
    touch "$flag"
    (
        while [ -e "$flag" ]; do
            cp "$orig" "$f"
            truncate -s "$size" "$f"
            truncate -s 4096 "$f"
        done
    ) &
    mutator=$!
    for i in 1 2 3 4 5 6 7 8 9 10; do
        python3 "$loader" "$f" 2>/dev/null || true
    done
    rm -f "$flag"
    wait "$mutator"
done
exit 0
"#;
    let (_, out) = run_pid_deadline(
        as_nobody("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&orig)
            .arg(dir.path())
            .arg(&loader),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{out:?}");

    assert_alive(&sensor);
    still_reports_signatures_within(&sensor, Duration::from_secs(2));
    sensor.stop();
}

/// Opens distinct `*.key` names in a directory as fast as it can for some
/// seconds, and prints how many. None of them exists, so each open fails
/// at once, but the probe sees the attempt at syscall entry and every name
/// matches the default watch list's `**/*.key`.
const OPEN_FLOOD: &str = r#"
import os, sys, time
d, tag, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + secs
n = 0
while time.monotonic() < end:
    for _ in range(1000):
        try:
            os.close(os.open(f"{d}/{tag}-{n}.key", os.O_RDONLY))
        except OSError:
            pass
        n += 1
print(n)
"#;

/// The peak resident set of process `pid` (`VmHWM` in `/proc/PID/status`),
/// in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status:\n{status}"))
}

/// The causes a shedding warning and the `stopped:` line count, in order.
const SHED_CAUSES: [&str; 5] = [
    "ring_buffer=",
    "coalescer=",
    "analyzer_queue=",
    "guard_queue=",
    "sink_backlog=",
];

/// Row 4: two unprivileged processes open distinct `*.key` names in a
/// tight loop. Before, the sensor's memory grew from 121 MB to 1.5 GB, it
/// dropped events although its output was writable, said so only in its
/// last log line, and exited 0. Now it stays up and bounded (peak RSS
/// under 256 MiB), reports a normal signature within 2 s of the flood,
/// and, having shed events (the flood names far more files than it
/// reports), says so: a `coverage_warning` with the counts per cause, the
/// `stopped:` line, and exit status 3.
#[test]
fn a_flood_of_secret_file_opens_is_bounded_and_loud() {
    let dir = attacker_dir();
    let script = dir.path().join("flood.py");
    std::fs::write(&script, OPEN_FLOOD).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sensor = Sensor::start(&[]);
    let floods: Vec<std::process::Child> = ["a", "b"]
        .into_iter()
        .map(|tag| {
            spawn(
                as_nobody("python3")
                    .arg(&script)
                    .arg(dir.path())
                    .arg(tag)
                    .arg("5")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped()),
            )
        })
        .collect();
    let mut opens = 0u64;
    for flood in floods {
        let out = flood.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        opens += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{e}: {out:?}"));
    }

    assert_alive(&sensor);
    still_reports_signatures_within(&sensor, Duration::from_secs(2));
    let peak_kib = peak_rss_kib(sensor.pid());
    let (status, events, log) = sensor.stop_status(nix::sys::signal::Signal::SIGINT);
    assert!(
        peak_kib < 256 * 1024,
        "peak RSS {} MiB under {opens} opens:\n{log}",
        peak_kib / 1024
    );

    let stopped = log
        .lines()
        .find(|l| l.contains("stopped: probes detached"))
        .unwrap_or_else(|| panic!("no stopped: line:\n{log}"));
    let warnings: Vec<String> = coverage_warnings(&events)
        .iter()
        .filter_map(|e| e.status_detail.clone())
        .filter(|d| d.starts_with("events shed under load"))
        .collect();
    let shed = !stopped.contains("nothing was shed");
    // Two processes and five seconds: the coalescer reports at most
    // 1024 names a second per process, so past a few tens of thousands
    // of opens something was shed, in the ring buffer or after it.
    if opens > 50_000 {
        assert!(shed, "{opens} opens and nothing shed?\n{stopped}");
    }
    if shed {
        assert_eq!(
            status.code(),
            Some(3),
            "a run that shed events exits 3, not {status}:\n{log}"
        );
        assert!(stopped.contains("EVENTS WERE SHED: "), "{stopped}");
        assert!(
            !warnings.is_empty(),
            "events were shed, and no coverage warning says so:\n{stopped}"
        );
        for text in warnings.iter().map(String::as_str).chain([stopped]) {
            for cause in SHED_CAUSES {
                assert!(text.contains(cause), "no {cause} count in: {text}");
            }
        }
    } else {
        assert!(status.success(), "nothing was shed, yet {status}:\n{log}");
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}

/// A process of `nobody` that listens on `listeners` TCP ports, all but
/// the second of them tar pits (never accepted: the connection sits in the
/// backlog and nothing ever answers) and the second answering every
/// connection with 1 MiB of random bytes, then signs once with an Ed25519 key made in memory
/// (no file names it, and Ed25519 recovers nothing), so the sensor
/// searches it: its listeners are the only thing left to try. It prints
/// "signed" and waits.
const TARPIT_SIGNER: &str = r#"
import ctypes, os, socket, sys, threading, time
socks = []
for i in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    socks.append(s)
def garbage(s):
    while True:
        c, _ = s.accept()
        try:
            c.sendall(os.urandom(1 << 20))
        except OSError:
            pass
for s in socks[1:2]:
    threading.Thread(target=garbage, args=(s,), daemon=True).start()
c = ctypes.CDLL("libcrypto.so.3")
vp = ctypes.c_void_p
c.EVP_PKEY_CTX_new_from_name.restype = vp
c.EVP_PKEY_CTX_new_from_name.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p]
c.EVP_PKEY_keygen_init.argtypes = [vp]
c.EVP_PKEY_generate.argtypes = [vp, ctypes.POINTER(vp)]
c.EVP_MD_CTX_new.restype = vp
c.EVP_DigestSignInit.argtypes = [vp, vp, vp, vp, vp]
c.EVP_DigestSign.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p, ctypes.c_size_t]
ctx = c.EVP_PKEY_CTX_new_from_name(None, b"ED25519", None)
assert c.EVP_PKEY_keygen_init(ctx) == 1
pkey = vp()
assert c.EVP_PKEY_generate(ctx, ctypes.byref(pkey)) == 1
m = c.EVP_MD_CTX_new()
assert c.EVP_DigestSignInit(m, None, None, None, pkey) == 1
sig = ctypes.create_string_buffer(64)
n = ctypes.c_size_t(64)
assert c.EVP_DigestSign(m, sig, ctypes.byref(n), b"tar pit", 7) == 1
print("signed", flush=True)
time.sleep(300)
"#;

/// Searching a process costs the sensor time that process controls: a
/// listener that accepts nothing holds a handshake until its timeout. Here
/// `nobody` starts 12 signers, each with 8 listeners that are tar pits or
/// answer with garbage, so that searching them all would take the sensor's
/// search thread minutes. A server of another user, started before the
/// sensor and named only by the certificate its listener presents, must
/// still have its key named while they wait: users take turns in the
/// search queue, and one user may queue only a few searches (the rest wait
/// for their turn, and are not dropped). The garbage crashes nothing.
#[test]
fn tar_pit_listeners_of_one_user_do_not_keep_another_users_server_unnamed() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let key = openssl_key(dir, "victim", "ed25519");
    let crt = cert(dir, &key, "victim.test");
    let port = free_port();
    let server = start_server(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-key")
            .arg(&key.path)
            .arg("-cert")
            .arg(&crt)
            .stdin(std::process::Stdio::null()),
        port,
    );
    // Nothing on disk names the key once the server has loaded it.
    std::fs::remove_file(&key.path).unwrap();
    let sensor_conf = sensor_config(dir, &[], &[]);
    let sensor = Sensor::start(&["--config", sensor_conf.to_str().unwrap()]);

    let attackers: Vec<std::process::Child> = (0..12)
        .map(|_| {
            spawn(
                as_nobody("/usr/bin/python3")
                    .args(["-c", TARPIT_SIGNER, "8"])
                    .stdout(std::process::Stdio::piped()),
            )
        })
        .collect();
    let pids: Vec<u32> = attackers.iter().map(|c| c.id()).collect();
    wait_for(
        "every attacker's signature",
        Duration::from_secs(30),
        || {
            let events = sensor.events();
            pids.iter().all(|&p| !key_uses_of(&events, p).is_empty())
        },
    );

    // The server's handshakes, until one names its key. Searching all the
    // attackers first would take the search thread over 80 s (12 × 7 tar
    // pits of 1 s each); in turn, the server's search waits for one.
    let handshake = || {
        let out = run_ok(
            Command::new("openssl")
                .args(["s_client", "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-servername", "victim.test"])
                .stdin(std::process::Stdio::null()),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("victim.test"));
    };
    wait_for(
        "the server's key named while the tar pits wait",
        Duration::from_secs(40),
        || {
            handshake();
            std::thread::sleep(Duration::from_millis(500));
            key_uses_of(&sensor.events(), server.pid())
                .iter()
                .any(|e| spki_of(e) == Some(key.spki.as_str()))
        },
    );
    assert_alive(&sensor);
    still_reports_signatures(&sensor);
    let log = sensor.log();
    for mut a in attackers {
        let _ = a.kill();
        let _ = a.wait();
    }
    let events = sensor.stop();

    let named: Vec<&Event> = key_uses_of(&events, server.pid())
        .into_iter()
        .filter(|e| spki_of(e) == Some(key.spki.as_str()))
        .collect();
    // Named by its certificate; later signatures of the same key object by
    // the verdict cached for it.
    assert!(
        named
            .iter()
            .any(|e| key_of(e).identified_by == Some(IdentifiedBy::TlsCertificate))
            && named.iter().all(|e| matches!(
                key_of(e).identified_by,
                Some(IdentifiedBy::TlsCertificate | IdentifiedBy::HandleCache)
            )),
        "{}",
        pretty(&named)
    );
    // Every attacker signature is unknown, and says why: their searches
    // were still running or waiting for their user's turn.
    for &p in &pids {
        for e in key_uses_of(&events, p) {
            assert_eq!(key_of(e).status, KeyStatus::Unknown, "{}", pretty(e));
            assert!(
                key_of(e)
                    .unknown_reason
                    .as_deref()
                    .is_some_and(|r| r.contains("search")),
                "{}\n{log}",
                pretty(e)
            );
        }
    }
    // Beyond its share, a user's searches wait for their turn: none is
    // dropped.
    assert!(
        log.contains("the process waits for its turn to be searched"),
        "{log}"
    );
    assert!(!log.contains("not searching the process"), "{log}");
}

/// The last 32 bytes of `openssl pkey ARGS -in KEY -outform DER`, in hex:
/// an Ed25519 key's seed (its PKCS #8 ends with it) or, with `-pubout`,
/// its public key.
fn ed25519_raw(key: &Path, public: bool) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["pkey", "-in"]).arg(key).args(["-outform", "DER"]);
    if public {
        cmd.arg("-pubout");
    }
    let der = run_ok(&mut cmd).stdout;
    hex::encode(&der[der.len() - 32..])
}

/// libgcrypt signs with whatever key S-expression a program builds, and a
/// program run by `nobody` can pair its own private seed with the public
/// key of a key it does not have (one the sensor knows, here). The sensor
/// names a libgcrypt key by the public key in that S-expression only once
/// the signature verifies under it: the honest signature is named, the
/// forged pairing is `unknown` and never named as the other key, and a
/// key without its public point says so. The private seed is never
/// copied out of the process: the sensor's log shows the key as `(d
/// withheld)`, and the seed appears in no event and no log line.
#[test]
fn a_libgcrypt_key_cannot_borrow_another_keys_name() {
    let dir = attacker_dir();
    let own = openssl_key(dir.path(), "own", "ed25519");
    let victim = openssl_key(dir.path(), "victim", "ed25519");
    let victim_pem = std::fs::read_to_string(&victim.path).unwrap();
    std::fs::remove_file(&victim.path).unwrap();
    // The sensor knows the victim's key, as it would a server's.
    let known = tempfile::tempdir().unwrap();
    std::fs::write(known.path().join("victim.pem"), victim_pem).unwrap();
    let victim_public = ed25519_raw(&known.path().join("victim.pem"), true);
    let seed = ed25519_raw(&own.path, false);
    let config_dir = tempfile::tempdir().unwrap();
    let config = sensor_config(config_dir.path(), &[known.path()], &[]);
    let sensor = Sensor::start(&["--config", config.to_str().unwrap()]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/gcrypt/sign.py");
    let mut signer = as_nobody("python3")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = signer.id();
    let lines = format!(
        "{}:{seed}\n{victim_public}:{seed}\n:{seed}\n",
        ed25519_raw(&own.path, true)
    );
    std::io::Write::write_all(&mut signer.stdin.take().unwrap(), lines.as_bytes()).unwrap();
    let out = signer.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0\n0\n0\n",
        "libgcrypt signed all three"
    );
    wait_for(
        "three libgcrypt signatures",
        Duration::from_secs(20),
        || key_uses_of(&sensor.events(), pid).len() == 3,
    );
    let log = sensor.log();
    let events = sensor.stop();
    let uses = key_uses_of(&events, pid);
    assert_eq!(uses.len(), 3, "{}", pretty(&uses));
    assert!(uses.iter().all(|e| module_of(e).kind == "libgcrypt"));
    // Events need not come out in the order the signatures were made (a
    // key seen for the first time takes longer to name): each is found by
    // what it says, and each must be there once.
    let reason = |e: &Event| key_of(e).unknown_reason.clone().unwrap_or_default();
    let one = |what: &str, test: &dyn Fn(&Event) -> bool| -> &Event {
        let found: Vec<&&Event> = uses.iter().filter(|e| test(e)).collect();
        assert_eq!(found.len(), 1, "{what}: {}", pretty(&uses));
        found[0]
    };
    let own_use = one("named by its own key", &|e| {
        spki_of(e) == Some(own.spki.as_str())
    });
    assert_eq!(
        key_of(own_use).identified_by,
        Some(keywarden_analyzer::event::IdentifiedBy::SigningCallKey)
    );
    one("the borrowed public key", &|e| {
        spki_of(e).is_none() && reason(e).contains("does not verify")
    });
    one("no public point", &|e| {
        spki_of(e).is_none() && reason(e).contains("no public point")
    });
    assert!(
        events
            .iter()
            .all(|e| spki_of(e) != Some(victim.spki.as_str())),
        "named the victim's key"
    );
    assert!(log.contains("(d withheld)"), "{log}");
    let everything = format!("{log}{}", pretty(&events));
    assert!(
        !everything.contains(&seed),
        "the private seed left the process"
    );
}

/// An EC key at `dir/site.key`, readable by anyone (the attacker's own
/// key, in the attacker's directory): the key and its path.
fn site_key_in(dir: &Path) -> (TestKey, std::path::PathBuf) {
    let key = openssl_key(dir, "k", "ec");
    let site_key = dir.join("site.key");
    std::fs::rename(&key.path, &site_key).unwrap();
    std::fs::set_permissions(&site_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    (key, site_key)
}

/// Opens a path with the system call `argv[1]` names, never `openat`,
/// reads a byte unless the call opened for writing, and exits.
const OPEN_WITHOUT_OPENAT: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
call, path = sys.argv[1], sys.argv[2].encode()
if call == "open":
    fd = libc.syscall(ctypes.c_long(2), path, ctypes.c_long(os.O_RDONLY))
elif call == "openat2":
    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]
    how = OpenHow(os.O_RDONLY, 0, 0)
    fd = libc.syscall(ctypes.c_long(437), ctypes.c_long(-100), path, ctypes.byref(how), ctypes.c_long(24))
elif call == "creat":
    fd = libc.syscall(ctypes.c_long(85), path, ctypes.c_long(0o600))
else:
    sys.exit("unknown call " + call)
if fd < 0:
    sys.exit(f"{call}: errno {ctypes.get_errno()}")
if call != "creat":
    os.read(fd, 1)
"#;

/// `open`, `openat2` and `creat` reach a key file as `openat` does, so a
/// process that avoids `openat` is still seen, whichever mechanism serves
/// opens: fentry on the function all four share, or each call's
/// tracepoints. In the kernel matrix, `KEYWARDEN_EXPECT_OPEN_HOOK` names
/// the mechanism that kernel must have given (`cargo xtask vm-test`).
#[test]
fn a_key_file_opened_without_openat_is_still_seen() {
    let work = attacker_dir();
    let (key, site_key) = site_key_in(work.path());
    let made = work.path().join("made.key");
    let sensor = Sensor::start(&[]);
    let mut pids = Vec::new();
    for (call, path) in [
        ("open", &site_key),
        ("openat2", &site_key),
        ("creat", &made),
    ] {
        let (pid, _) = run_pid_ok(
            as_nobody("python3")
                .arg("-c")
                .arg(OPEN_WITHOUT_OPENAT)
                .arg(call)
                .arg(path),
        );
        pids.push((call, path, pid));
    }
    let log = sensor.log();
    let events = sensor.stop();
    for (call, path, pid) in pids {
        let opens = secret_opens_of(&events, pid);
        assert_eq!(opens.len(), 1, "{call}: {}", pretty(&opens));
        let e = opens[0];
        assert_eq!(
            file_path_of(e),
            Some(path.to_str().unwrap()),
            "{call}: {}",
            pretty(e)
        );
        if call == "creat" {
            assert!(!secret_of(e).holds_private_key, "{call}: {}", pretty(e));
        } else {
            assert_eq!(spki_of(e), Some(key.spki.as_str()), "{call}: {}", pretty(e));
        }
    }
    let fentry = log.contains("opens from fentry and fexit on do_sys_openat2");
    let tracepoints =
        log.contains("opens from the syscall tracepoints of open, openat, openat2 and creat");
    assert!(fentry != tracepoints, "one mechanism, logged: {log}");
    match std::env::var("KEYWARDEN_EXPECT_OPEN_HOOK").as_deref() {
        Ok("fentry") => assert!(fentry, "this kernel allows fentry: {log}"),
        Ok("tracepoints") => assert!(tracepoints, "{log}"),
        Ok(other) => panic!("KEYWARDEN_EXPECT_OPEN_HOOK={other}: fentry or tracepoints"),
        Err(_) => {}
    }
}

/// Builds `fixtures/hostile/NAME.c` into `dir`, executable by anyone,
/// with the host's C compiler (the one Rust links with).
fn build_c(name: &str, dir: &Path) -> std::path::PathBuf {
    let source =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../fixtures/hostile/{name}.c"));
    let out = dir.join(name);
    run_ok(
        Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-O2", "-pthread", "-o"])
            .arg(&out)
            .arg(&source),
    );
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
    out
}

/// A process that rewrites the path it is opening from a second thread
/// (`fixtures/hostile/path_race.c`: `site.key` and `site.kex`, flipped
/// without pause) can make the open probe read one name while the kernel
/// opens the other. Before the opened file's own name was checked at the
/// open's exit, about one run in six read the key unseen (7 of 40 on this
/// VM). Each run, as `nobody`, stops at its first successful open, reads
/// the key and exits at once; each must leave a successful open of the
/// key file, with its path and SPKI.
#[test]
fn a_key_path_rewritten_during_its_open_is_still_seen() {
    const RUNS: usize = 40;
    let work = attacker_dir();
    let racer = build_c("path_race", work.path());
    let (key, site_key) = site_key_in(work.path());
    let sensor = Sensor::start(&[]);
    let pids: Vec<u32> = (0..RUNS)
        .map(|_| run_pid_ok(as_nobody(racer.to_str().unwrap()).arg(&site_key)).0)
        .collect();
    let events = sensor.stop();
    let mut unseen = Vec::new();
    for pid in pids {
        let opened: Vec<&Event> = secret_opens_of(&events, pid)
            .into_iter()
            .filter(|e| e.status_id == 1)
            .collect();
        if opened.is_empty() {
            unseen.push(pid);
            continue;
        }
        for e in opened {
            assert_eq!(
                file_path_of(e),
                Some(site_key.to_str().unwrap()),
                "{}",
                pretty(e)
            );
            assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
        }
    }
    assert!(
        unseen.is_empty(),
        "{} of {RUNS} runs read the key with no successful open reported: {unseen:?}",
        unseen.len()
    );
}

/// Opens each file named on the command line, reads it, and keeps it
/// open until its standard input closes (so the sensor can read it
/// through the process's own descriptor, however slow the machine).
const OPEN_AND_HOLD: &str = r#"
import sys
files = [open(p, "rb") for p in sys.argv[1:]]
for f in files:
    f.read()
sys.stdin.read()
"#;

/// A directory under `base` whose path is longer than the probe copies
/// (twelve levels of 24 bytes).
fn deep_dir(base: &Path) -> PathBuf {
    let mut deep = base.to_path_buf();
    for _ in 0..12 {
        deep.push("d".repeat(24));
    }
    std::fs::create_dir_all(&deep).unwrap();
    deep
}

/// `nobody` opens and reads each of `paths`, keeping them open until the
/// sensor has reported `n` opens of its (a long path's file is read only
/// through the opener's descriptor); then the sensor stops. Returns the
/// process's secret-file opens, exactly `n`.
fn opens_held_by_nobody(sensor: Sensor, paths: &[PathBuf], n: usize) -> Vec<Event> {
    let mut opener = as_nobody("python3")
        .arg("-c")
        .arg(OPEN_AND_HOLD)
        .args(paths)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = opener.id();
    wait_for("the opens reported", Duration::from_secs(60), || {
        secret_opens_of(&sensor.events(), pid).len() >= n
    });
    drop(opener.stdin.take());
    assert!(opener.wait().unwrap().success());
    let events = sensor.stop();
    let opens: Vec<Event> = secret_opens_of(&events, pid).into_iter().cloned().collect();
    assert_eq!(opens.len(), n, "{}", pretty(&opens));
    opens
}

/// The one open among `opens` whose path `want` accepts.
fn the_open<'a>(opens: &'a [Event], want: &dyn Fn(&str) -> bool) -> &'a Event {
    let found: Vec<&Event> = opens
        .iter()
        .filter(|e| file_path_of(e).is_some_and(want))
        .collect();
    assert_eq!(found.len(), 1, "{}", pretty(&opens));
    found[0]
}

/// The open probe first judges the path the process gave. A symlink of an
/// unremarkable name (`notes.txt`) to a key file, and a key file whose
/// path is longer than the probe copies (entry sees it cut, with no
/// suffix), both escaped it. The exit now judges the opened file by its
/// own name: each open, as `nobody`, is one successful open reported with
/// the key's SPKI. The symlink's is under the file's real path; the long
/// one's is the tail of its path, marked cut (`...`).
#[test]
fn a_key_opened_under_another_name_or_a_long_path_is_seen() {
    let work = attacker_dir();
    let (key, site_key) = site_key_in(work.path());
    let link = work.path().join("notes.txt");
    std::os::unix::fs::symlink(&site_key, &link).unwrap();
    let deep_key = deep_dir(work.path()).join("deep.key");
    std::fs::copy(&site_key, &deep_key).unwrap();
    assert!(deep_key.as_os_str().len() > 300);
    let opens = opens_held_by_nobody(Sensor::start(&[]), &[link, deep_key], 2);
    let linked = the_open(&opens, &|p| p == site_key.to_str().unwrap());
    let long = the_open(&opens, &|p| {
        p.starts_with("...") && p.ends_with("/dddddddddddddddddddddddd/deep.key")
    });
    for e in [linked, long] {
        assert_eq!(e.status_id, 1, "{}", pretty(e));
        assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
    }
}

/// Watched files that hold no key (a `.env`, an SSH identity, a `*.p12`
/// a glob adds) were judged by the path the process gave only: a symlink
/// of a harmless name, or a path longer than the probe copies, hid their
/// opens. The exit of an open now tests the opened file's own name
/// against the last components of the watch list too: each open, as
/// `nobody`, is reported under the file's real path (the long one's as
/// its tail, marked cut). A file with a watched name (`token`) that no
/// glob's path matches is not reported.
#[test]
fn a_watched_file_opened_under_another_name_or_a_long_path_is_seen() {
    let work = attacker_dir();
    let dir = work.path();
    std::fs::create_dir(dir.join(".ssh")).unwrap();
    let files = [".env", ".ssh/id_test", "bundle.p12", "token"].map(|f| dir.join(f));
    for f in &files {
        std::fs::write(f, "not a secret, a test\n").unwrap();
    }
    let mut opened = Vec::new();
    for (link, target) in ["notes.txt", "readme", "data.bin", "t.txt"]
        .iter()
        .zip(&files)
    {
        std::os::unix::fs::symlink(target, dir.join(link)).unwrap();
        opened.push(dir.join(link));
    }
    let deep_env = deep_dir(dir).join(".env");
    std::fs::write(&deep_env, "not a secret either\n").unwrap();
    assert!(deep_env.as_os_str().len() > 300);
    opened.push(deep_env);
    let conf = tempfile::tempdir().unwrap();
    let config = sensor_config(
        conf.path(),
        &[],
        &[(
            "    - \"**/.ssh/id_*\"\n",
            "    - \"**/.ssh/id_*\"\n    - \"**/*.p12\"\n".into(),
        )],
    );
    let sensor = Sensor::start(&["--config", config.to_str().unwrap()]);
    let opens = opens_held_by_nobody(sensor, &opened, 4);
    for f in &files[..3] {
        let e = the_open(&opens, &|p| p == f.to_str().unwrap());
        assert_eq!(e.status_id, 1, "{}", pretty(e));
    }
    let long = the_open(&opens, &|p| {
        p.starts_with("...") && p.ends_with("/dddddddddddddddddddddddd/.env")
    });
    assert_eq!(long.status_id, 1, "{}", pretty(long));
}

/// Opens the file named by argv[1] through io_uring (`IORING_OP_OPENAT`,
/// no open system call), reads it, and exits. With argv[2] `fixed`, the
/// file goes into the ring's first registered file slot instead of a
/// descriptor, and is read through the ring (`IORING_OP_READ` on the
/// fixed file). Prints what the read returned.
const URING_OPEN: &str = r#"
import ctypes, mmap, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SETUP, ENTER, REGISTER = 425, 426, 427
class Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", ctypes.c_uint32 * 10), ("cq_off", ctypes.c_uint32 * 10)]
p = Params()
ring = libc.syscall(SETUP, 4, ctypes.byref(p))
assert ring >= 0, ctypes.get_errno()
sq = mmap.mmap(ring, p.sq_off[6] + p.sq_entries * 4, offset=0)
cq = mmap.mmap(ring, p.cq_off[5] + p.cq_entries * 16, offset=0x8000000)
sqes = mmap.mmap(ring, p.sq_entries * 64, offset=0x10000000)
fixed = len(sys.argv) > 2 and sys.argv[2] == "fixed"
if fixed:
    slots = (ctypes.c_int32 * 1)(-1)
    r = libc.syscall(REGISTER, ring, 2, slots, 1)
    assert r == 0, ctypes.get_errno()
path = ctypes.create_string_buffer(sys.argv[1].encode())
buf = ctypes.create_string_buffer(4096)

def submit(opcode, flags, fd, addr, length, op_flags, file_index):
    struct.pack_into("<BBHiQQIIQHHiQQ", sqes, 0, opcode, flags, 0, fd, 0, addr,
                     length, op_flags, 7, 0, 0, file_index, 0, 0)
    tail = struct.unpack_from("<I", sq, p.sq_off[1])[0]
    mask = struct.unpack_from("<I", sq, p.sq_off[2])[0]
    struct.pack_into("<I", sq, p.sq_off[6] + (tail & mask) * 4, 0)
    struct.pack_into("<I", sq, p.sq_off[1], tail + 1)
    n = libc.syscall(ENTER, ring, 1, 1, 1, None, 0)
    assert n == 1, ctypes.get_errno()
    head = struct.unpack_from("<I", cq, p.cq_off[0])[0]
    cmask = struct.unpack_from("<I", cq, p.cq_off[2])[0]
    _, res, _ = struct.unpack_from("<QiI", cq, p.cq_off[5] + (head & cmask) * 16)
    struct.pack_into("<I", cq, p.cq_off[0], head + 1)
    return res

# IORING_OP_OPENAT (18) at AT_FDCWD, O_RDONLY; file_index 1 is slot 0.
res = submit(18, 0, -100, ctypes.addressof(path), 0, 0, 1 if fixed else 0)
assert res >= 0, res
if fixed:
    # IORING_OP_READ (22) on fixed file 0 (IOSQE_FIXED_FILE).
    n = submit(22, 1, 0, ctypes.addressof(buf), 4096, 0, 0)
else:
    n = libc.read(res, buf, 4096)
print(n)
assert n > 0
"#;

/// A key read through io_uring: the open is an `IORING_OP_OPENAT`
/// request, which neither open mechanism sees. The completion of every
/// io_uring open that gave a descriptor is looked at as an open's exit
/// is (the opened file's own name), so it is reported like any other
/// open of the key, with its path and SPKI. An open into a registered
/// file slot gives no descriptor to look at: the sensor names it in a
/// `coverage_warning` for that process. Both run as `nobody`, where the
/// kernel lets anyone use io_uring; the host's setting is restored.
#[test]
fn a_key_opened_through_io_uring_is_seen_or_named() {
    const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
    struct Restore(Option<String>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(v) = &self.0 {
                let _ = std::fs::write(SYSCTL, v);
            }
        }
    }
    let _restore = Restore(std::fs::read_to_string(SYSCTL).ok());
    if _restore.0.is_some() {
        std::fs::write(SYSCTL, "0").unwrap();
    }
    let work = attacker_dir();
    let (key, site_key) = site_key_in(work.path());
    let sensor = Sensor::start(&[]);
    let log = sensor.log();
    let uring = |how: &str| {
        run_pid_ok(
            as_nobody("python3")
                .arg("-c")
                .arg(URING_OPEN)
                .arg(&site_key)
                .arg(how),
        )
        .0
    };
    let plain = uring("descriptor");
    let fixed = uring("fixed");
    let events = sensor.stop();
    assert!(
        log.contains("opens through io_uring from its io_uring_complete tracepoint"),
        "{log}"
    );
    let opens = secret_opens_of(&events, plain);
    assert_eq!(opens.len(), 1, "{}", pretty(&opens));
    let e = opens[0];
    assert_eq!(e.status_id, 1, "{}", pretty(e));
    assert_eq!(
        file_path_of(e),
        Some(site_key.to_str().unwrap()),
        "{}",
        pretty(e)
    );
    assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
    assert!(secret_opens_of(&events, fixed).is_empty());
    let named = of_pid(&events, EventCode::CoverageWarning, fixed);
    assert_eq!(named.len(), 1, "{}", pretty(&coverage_warnings(&events)));
    let detail = named[0].status_detail.as_deref().unwrap_or_default();
    assert!(detail.contains("registered file slot"), "{detail}");
}

/// `io_uring_setup(4, params)` as the calling user: the ring's descriptor,
/// or minus the error number.
const URING_SETUP: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
fd = libc.syscall(ctypes.c_long(425), ctypes.c_long(4), params)
print(fd if fd >= 0 else -ctypes.get_errno())
"#;

/// How opens through io_uring are seen is said at start, by setting:
/// while any process may use io_uring (checked as `nobody`), that they
/// are seen from the `io_uring_complete` tracepoint, with no warning that
/// they are not; once io_uring is disabled, that nothing escapes. The
/// host's setting is restored afterwards. (Where the tracepoint cannot be
/// attached the start warns instead: `probes::hooks` unit tests.)
#[test]
fn io_uring_opens_are_said_seen_or_disabled() {
    const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
    const HOOKED: &str = "opens through io_uring from its io_uring_complete tracepoint";
    const UNSEEN: &str = "opens through io_uring are not seen";
    let nobody_setup = || {
        let out = run_ok(as_nobody("python3").arg("-c").arg(URING_SETUP));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    let Ok(before) = std::fs::read_to_string(SYSCTL) else {
        // A kernel before 6.6: no way to restrict io_uring.
        let sensor = Sensor::start(&[]);
        let log = sensor.log();
        sensor.stop();
        assert!(log.contains(HOOKED) && !log.contains(UNSEEN), "{log}");
        return;
    };
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(SYSCTL, &self.0);
        }
    }
    let _restore = Restore(before);

    std::fs::write(SYSCTL, "0").unwrap();
    assert!(nobody_setup() >= 0, "nobody may set up an io_uring");
    let sensor = Sensor::start(&[]);
    let log = sensor.log();
    sensor.stop();
    assert!(log.contains(HOOKED) && !log.contains(UNSEEN), "{log}");

    std::fs::write(SYSCTL, "2").unwrap();
    assert_eq!(nobody_setup(), -1, "EPERM once io_uring is disabled");
    let sensor = Sensor::start(&[]);
    let log = sensor.log();
    sensor.stop();
    assert!(!log.contains(HOOKED) && !log.contains(UNSEEN), "{log}");
    assert!(log.contains("io_uring is disabled"), "{log}");
}
