//! A freshly booted host has neither tracefs nor bpffs mounted. The sensor
//! must mount what it needs itself and then see signatures as usual.

mod support;

use std::process::Command;

use support::*;

/// Lazily unmounts everything mounted on `target` (stacked mounts too).
fn unmount_all(target: &str) {
    while std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(target))
    {
        let st = Command::new("umount")
            .args(["-l", target])
            .status()
            .unwrap();
        assert!(st.success(), "umount -l {target} failed");
    }
}

fn is_mounted(target: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(4) == Some(target)
                && l.split_once(" - ")
                    .map(|(_, r)| r.starts_with(&format!("{fstype} ")))
                    == Some(true)
        })
}

#[test]
fn a_host_without_tracefs_or_bpffs_is_set_up_by_the_sensor() {
    // Any sensor left by an earlier test must not keep its pins: this test
    // starts from an empty /sys/fs/bpf, as after a boot.
    for t in [
        "/sys/kernel/debug/tracing",
        "/sys/kernel/tracing",
        "/sys/fs/bpf",
    ] {
        unmount_all(t);
    }
    assert!(!std::path::Path::new("/sys/kernel/tracing/events").exists());

    let work = tempfile::tempdir().unwrap();
    let key = openssl_key(work.path(), "ec", "ec");
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"fresh host").unwrap();
    let sensor = Sensor::start(&[]);
    assert!(
        is_mounted("/sys/kernel/tracing", "tracefs"),
        "{}",
        sensor.log()
    );
    assert!(is_mounted("/sys/fs/bpf", "bpf"), "{}", sensor.log());
    let (pid, _) = run_pid_ok(&mut openssl_sign(
        "openssl",
        &key.path,
        &msg,
        &work.path().join("sig"),
    ));
    let events = sensor.stop();
    let uses = key_uses_of(&events, pid);
    assert_eq!(uses.len(), 1, "{}", pretty(&uses));
    assert_eq!(
        spki_of(uses[0]),
        Some(key.spki.as_str()),
        "{}",
        pretty(uses[0])
    );
}
