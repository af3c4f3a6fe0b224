//! `keywarden run --format compact`: one readable line per event, and a
//! process whose name holds a newline or a terminal escape sequence
//! cannot forge a line or reach the terminal.

mod support;

use std::{os::unix::fs::PermissionsExt, time::Duration};

use support::*;

#[test]
fn compact_lines_name_the_key_and_escape_hostile_process_names() {
    let work = tempfile::tempdir().unwrap();
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"keywarden prints this").unwrap();
    let key = openssl_key(work.path(), "k", "ec");
    // The kernel's comm is the first 15 bytes of the file name: a newline
    // and the start of a line that would look like a key use of sshd, and
    // an escape sequence that would clear the screen.
    let hostile = work.path().join("a\nZ key_use\x1b[2J");
    std::fs::copy("/usr/bin/openssl", &hostile).unwrap();
    std::fs::set_permissions(&hostile, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sensor = Sensor::start(&["--format", "compact"]);
    let sig = work.path().join("sig");
    let (plain, _) = run_pid_ok(&mut openssl_sign("openssl", &key.path, &msg, &sig));
    let (evil, _) = run_pid_ok(&mut openssl_sign(&hostile, &key.path, &msg, &sig));
    let path = sensor.events_path.clone();
    let short = &key.spki[..16];
    wait_for("both key uses printed", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.contains(&format!("[{plain}] ")) && text.contains(&format!("[{evil}] "))
    });
    // Stopped by hand: the output is not NDJSON for `stop` to parse.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sensor.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    wait_for("the sensor to stop", Duration::from_secs(30), || {
        sensor.log().contains("stopped: ")
    });
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains('\x1b'),
        "an escape reached the output:\n{text}"
    );
    for line in text.lines() {
        let stamp = line.get(..24).unwrap_or_default();
        assert!(
            stamp.len() == 24
                && stamp.as_bytes()[4] == b'-'
                && stamp.as_bytes()[10] == b'T'
                && stamp.ends_with('Z'),
            "a line that is not an event's:\n{line}\n\n{text}"
        );
    }
    let line_of = |pid: u32| {
        text.lines()
            .find(|l| l.contains(&format!("[{pid}] ")) && l.contains(" key_use "))
            .unwrap_or_else(|| panic!("no key_use line of pid {pid}:\n{text}"))
            .to_owned()
    };
    let ok = line_of(plain);
    assert!(
        ok.contains(&format!(
            " key_use success openssl[{plain}] uid=0 key={short} ecdsa-p256 via EVP_"
        )),
        "{ok}"
    );
    let bad = line_of(evil);
    assert!(
        bad.contains(&format!(
            "a\\x0aZ key_use\\x1b[2J[{evil}] uid=0 key={short}"
        )),
        "{bad}"
    );
}
