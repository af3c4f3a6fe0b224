//! The smoke subset: one integration test per probe family and mechanism,
//! run on every kernel of the matrix, and the shell script that runs it
//! inside a guest.
//!
//! The tests are built on the host; the guest runs the test executables
//! directly (it sees the host's files read-only). Each writes its output
//! to the guest's writable directory, and one results line per test.

use std::{collections::BTreeMap, path::Path};

/// (test binary, exact test name, what it covers on a kernel)
pub const SMOKE: [(&str, &str, &str); 11] = [
    (
        "openssl_cli",
        "cli_signing_gives_one_event_per_signature_with_the_right_key",
        "uprobes and uretprobes on libcrypto (openssl CLI)",
    ),
    (
        "stacks",
        "nginx_peers_under_100_concurrent_handshakes",
        "peer attribution (sock_recv_length; fexit on tcp_recvmsg before 6.3) under 100 nginx handshakes",
    ),
    (
        "secret_files",
        "cat_of_a_key_file_names_the_key_and_its_reader",
        "secret-file opens (fentry and fexit on do_sys_openat2 where allowed, else syscall tracepoints)",
    ),
    (
        "hostile",
        "a_key_file_opened_without_openat_is_still_seen",
        "opens through open, openat2 and creat, run as nobody; the open mechanism the kernel must give",
    ),
    (
        "hostile",
        "a_key_opened_under_another_name_or_a_long_path_is_seen",
        "the exit's look at the opened file's own name (dentry), and the path walked up across mounts, run as nobody",
    ),
    (
        "hostile",
        "a_watched_file_opened_under_another_name_or_a_long_path_is_seen",
        "the exit's tests of watch-list names, endings and beginnings (FILE_NAMES, CONFIG), run as nobody",
    ),
    (
        "hostile",
        "a_key_opened_through_io_uring_is_seen_or_named",
        "opens through io_uring (raw tracepoint io_uring_complete, request layout from BTF), run as nobody",
    ),
    (
        "enforcement",
        "block_rule_denies_with_eperm_and_allows_the_listed_binary",
        "block (fanotify permission events)",
    ),
    (
        "enforcement",
        "kill_rule_stops_a_binary_that_is_not_allowed_before_it_signs",
        "kill (bpf_send_signal from a uprobe)",
    ),
    (
        "other_stacks",
        "go_peers_under_100_concurrent_handshakes",
        "Go probes (past the stack check, on each ret) and peers by goroutine (bpf_task_pt_regs in the receive hooks)",
    ),
    (
        "hostile",
        "a_libgcrypt_key_cannot_borrow_another_keys_name",
        "libgcrypt (bpf_loop walking S-expressions, private values withheld), run as nobody",
    ),
];

/// Run on the host before the guests boot: builds the Go fixtures the
/// Go smoke test runs (the guests cannot write the host's `target/`, and
/// building Go's standard library under TCG takes minutes).
pub const HOST_FIRST: (&str, &str) = ("other_stacks", "go_fixture_builds_with_each_toolchain");

/// Seconds one test may take in a guest before it is stopped as stalled
/// (the slowest smoke test takes about a minute under TCG).
pub const TEST_TIMEOUT_SECS: u64 = 420;

/// The marker the script writes last: without it the guest did not finish.
pub const END: &str = "END";

/// Single-quotes a word for the shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest script: sets the guest up the way a fresh host is (tracefs
/// mounted), then runs each test executable with its exact test name, one
/// at a time, under a timeout. `executables` maps a test binary name to
/// its path; `out` is the guest's writable directory; `open_hook` is the
/// open mechanism the kernel must give, if known (`StockKernel`).
pub fn guest_script(
    executables: &BTreeMap<String, String>,
    out: &Path,
    open_hook: Option<&str>,
) -> String {
    let out = quote(&out.display().to_string());
    let expect = open_hook
        .map(|h| format!("export KEYWARDEN_EXPECT_OPEN_HOOK={}\n", quote(h)))
        .unwrap_or_default();
    let mut s = format!(
        "#!/bin/bash\n\
         # Written by `cargo xtask vm-test`; runs inside the guest.\n\
         OUT={out}\n\
         exec >\"$OUT/guest.log\" 2>&1\n\
         set -u\n\
         echo \"kernel $(uname -r)\" >\"$OUT/results\"\n\
         mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing\n\
         {expect}\
         echo \"lsm $(cat /sys/kernel/security/lsm 2>/dev/null || echo unknown)\" >>\"$OUT/results\"\n\
         # Where a test that overran its time waits, for the report.\n\
         stacks() {{\n\
         \x20   for p in $(pgrep -x keywarden); do\n\
         \x20       for t in /proc/$p/task/*; do\n\
         \x20           echo \"== keywarden $p thread ${{t##*/}} ($(cat $t/comm)) waits in $(cat $t/wchan)\"\n\
         \x20           cat $t/stack\n\
         \x20       done\n\
         \x20   done\n\
         }}\n"
    );
    for (binary, test, _) in SMOKE {
        let exe = executables
            .get(binary)
            .map(|p| quote(p))
            .unwrap_or_else(|| quote(&format!("missing-test-binary-{binary}")));
        s += &format!(
            "start=$(date +%s)\n\
             timeout -k 10 {TEST_TIMEOUT_SECS} {exe} --exact --test-threads=1 {test} >\"$OUT/{test}.log\" 2>&1\n\
             rc=$?\n\
             if [ $rc = 124 ] || [ $rc = 137 ]; then stacks >>\"$OUT/{test}.log\" 2>&1; rc=timeout; fi\n\
             grep -q '^test result: ok. 1 passed' \"$OUT/{test}.log\" || [ $rc != 0 ] || rc=not-run\n\
             echo \"test {test} $rc $(( $(date +%s) - start ))\" >>\"$OUT/results\"\n"
        );
    }
    s += &format!("echo {END} >>\"$OUT/results\"\n");
    s
}

/// The outcome of one smoke test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub test: String,
    /// `0` passed; a number is the exit status; `timeout`, `not-run`.
    pub status: String,
    pub seconds: u64,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.status == "0"
    }
}

/// What a guest reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub kernel: Option<String>,
    pub lsm: Option<String>,
    pub outcomes: Vec<Outcome>,
    /// The script ran to its end.
    pub finished: bool,
}

impl Report {
    pub fn parse(text: &str) -> Report {
        let mut r = Report::default();
        for line in text.lines() {
            if line == END {
                r.finished = true;
            } else if let Some(k) = line.strip_prefix("kernel ") {
                r.kernel = Some(k.to_owned());
            } else if let Some(l) = line.strip_prefix("lsm ") {
                r.lsm = Some(l.to_owned());
            } else if let Some(rest) = line.strip_prefix("test ") {
                let mut w = rest.split_whitespace();
                if let (Some(test), Some(status), Some(seconds)) = (w.next(), w.next(), w.next()) {
                    r.outcomes.push(Outcome {
                        test: test.to_owned(),
                        status: status.to_owned(),
                        seconds: seconds.parse().unwrap_or(0),
                    });
                }
            }
        }
        r
    }

    /// Every smoke test ran to its end and passed.
    pub fn all_passed(&self) -> bool {
        self.finished
            && SMOKE
                .iter()
                .all(|(_, t, _)| self.outcomes.iter().any(|o| o.test == *t && o.passed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_runs_every_smoke_test_by_exact_name_under_a_timeout() {
        let exes: BTreeMap<String, String> = SMOKE
            .iter()
            .map(|(b, _, _)| (b.to_string(), format!("/t/deps/{b}-0123")))
            .collect();
        let s = guest_script(&exes, Path::new("/t/vm-test/debian-6.1"), Some("fentry"));
        assert!(
            s.contains("\nexport KEYWARDEN_EXPECT_OPEN_HOOK='fentry'\n"),
            "{s}"
        );
        for (b, t, _) in SMOKE {
            assert!(
                s.contains(&format!(
                    "timeout -k 10 {TEST_TIMEOUT_SECS} '/t/deps/{b}-0123' --exact --test-threads=1 {t} "
                )),
                "{s}"
            );
        }
        assert!(s.trim_end().ends_with("echo END >>\"$OUT/results\""));
        // A test binary the build did not produce fails loudly in the guest.
        let s = guest_script(&BTreeMap::new(), Path::new("/o"), None);
        assert!(!s.contains("KEYWARDEN_EXPECT_OPEN_HOOK"), "{s}");
        assert!(s.contains("'missing-test-binary-stacks'"));
    }

    #[test]
    fn a_report_passes_only_when_finished_with_every_test_passed() {
        let mut text = String::from("kernel 6.1.0-50-amd64\nlsm lockdown,capability,bpf\n");
        for (_, t, _) in SMOKE {
            text += &format!("test {t} 0 12\n");
        }
        let unfinished = Report::parse(&text);
        assert_eq!(unfinished.kernel.as_deref(), Some("6.1.0-50-amd64"));
        assert_eq!(unfinished.outcomes.len(), SMOKE.len());
        assert!(!unfinished.all_passed(), "no END: the guest stopped early");
        text += "END\n";
        assert!(Report::parse(&text).all_passed());
        let stalled = text.replacen(" 0 12\n", " timeout 420\n", 1);
        let r = Report::parse(&stalled);
        assert!(!r.all_passed());
        assert_eq!(r.outcomes[0].status, "timeout");
        assert_eq!(r.outcomes[0].seconds, 420);
    }
}
