//! `cargo xtask vm-test --kernel NAME`: the smoke subset of the
//! integration tests (`smoke::SMOKE`) on a kernel of the matrix.
//!
//! * `host`: this machine's own kernel, directly (the normal test run).
//! * `debian-6.1`, `debian-6.12`: Debian's stock kernels (`kernels::STOCK`),
//!   booted under qemu with TCG (KVM cannot run a stock guest on this kind
//!   of VM) through virtme-ng, with this host's root filesystem read-only
//!   and `target/vm-test/NAME` writable.
//!
//! It installs what it needs, idempotently: qemu, kmod and busybox-static
//! (virtme-ng's initramfs) from the host's apt sources, virtme-ng (pinned)
//! in a venv under `target/`, and the kernels under `target/kernels/`.
//! qemu takes both cores of a small machine: on a shared machine run it
//! under the build lock.

pub mod kernels;
pub mod smoke;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cargo, root};

use crate::run;

/// virtme-ng from PyPI, pinned.
const VIRTME_NG_VERSION: &str = "1.42";
/// Debian packages the guests need.
const APT_PACKAGES: [&str; 3] = ["qemu-system-x86", "kmod", "busybox-static"];
/// Seconds a guest may take to boot and shut down, beyond its tests.
const BOOT_ALLOWANCE_SECS: u64 = 300;

/// Every kernel name `--kernel` takes (`all` is each in turn).
pub fn names() -> Vec<&'static str> {
    let mut v = vec!["host"];
    v.extend(kernels::STOCK.iter().map(|k| k.name));
    v
}

/// Installs the Debian packages the guests need, if any is missing.
fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["-qq", "update"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `vng` of the pinned virtme-ng, installed into `target/vng-venv` when
/// missing or another version.
fn ensure_vng() -> Result<PathBuf> {
    let venv = root().join("target/vng-venv");
    let vng = venv.join("bin/vng");
    let wanted = format!("virtme-ng {VIRTME_NG_VERSION}");
    let have = Command::new(&vng)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == wanted);
    if !have {
        eprintln!(
            "xtask: installing virtme-ng {VIRTME_NG_VERSION} into {}",
            venv.display()
        );
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")))?;
    }
    Ok(vng)
}

/// Builds the integration tests on the host and returns each test
/// binary's executable by name.
fn build_tests() -> Result<BTreeMap<String, String>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "keywarden",
        "--tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(root())
    .stdout(Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd.spawn().context("spawning cargo")?;
    let mut exes = BTreeMap::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let v: serde_json::Value = match serde_json::from_str(&line?) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            exes.insert(name.to_owned(), exe.to_owned());
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the integration tests failed with {status}");
    }
    Ok(exes)
}

/// Runs `cmd` in its own process group; past `limit`, kills the group.
/// Returns whether it finished in time.
fn run_limited(cmd: &mut Command, limit: Duration) -> Result<bool> {
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            // The group is vng, qemu and what they started: all ours.
            kill_group(child.id());
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILL to the process group `pid` leads.
fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
}

/// The outcome of the smoke run on one kernel.
pub struct KernelRun {
    pub name: String,
    pub report: smoke::Report,
    pub wall: Duration,
}

/// Runs the smoke subset on each named kernel, prints a table, and fails
/// unless every test passed on every kernel.
pub fn vm_test(requested: &[String]) -> Result<()> {
    let mut wanted: Vec<&str> = Vec::new();
    for n in requested {
        match n.as_str() {
            "all" => wanted.extend(names()),
            n if names().contains(&n) => {
                wanted.push(names().into_iter().find(|k| *k == n).unwrap())
            }
            n => bail!("no kernel {n}; there are: all, {}", names().join(", ")),
        }
    }
    wanted.dedup();
    let needs_guest = wanted.iter().any(|n| *n != "host");
    let vng = if needs_guest {
        ensure_apt_packages()?;
        Some(ensure_vng()?)
    } else {
        None
    };
    let mut images = BTreeMap::new();
    for n in &wanted {
        if let Some(k) = kernels::stock(n) {
            let unpacked = k
                .ensure(
                    &root().join("target/kernels"),
                    &root().join("xtask/kernels.sources"),
                )
                .with_context(|| format!("getting kernel {n}"))?;
            images.insert(*n, unpacked);
        }
    }
    let exes = build_tests()?;
    let mut runs = Vec::new();
    for n in wanted {
        let out = root().join("target/vm-test").join(n);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out)?;
        let script = out.join("guest.sh");
        std::fs::write(&script, smoke::guest_script(&exes, &out))?;
        let limit = Duration::from_secs(
            BOOT_ALLOWANCE_SECS + smoke::TEST_TIMEOUT_SECS * smoke::SMOKE.len() as u64,
        );
        let started = Instant::now();
        let finished = match images.get(n) {
            None => run_limited(Command::new("bash").arg(&script), limit)?,
            Some(k) => {
                let vng = vng.as_ref().expect("installed for guests");
                let mut cmd = guest_command(vng, &k.vmlinuz, &out, &script);
                cmd.stdout(std::fs::File::create(out.join("vng.log"))?)
                    .stderr(std::fs::File::create(out.join("vng.err"))?);
                run_limited(&mut cmd, limit)?
            }
        };
        let wall = started.elapsed();
        let report =
            smoke::Report::parse(&std::fs::read_to_string(out.join("results")).unwrap_or_default());
        if !finished {
            eprintln!(
                "xtask: {n}: STALLED: the run did not finish within {} s and was killed; see {}",
                limit.as_secs(),
                out.display()
            );
        }
        print_run(n, &report, wall, &out);
        runs.push(KernelRun {
            name: n.to_owned(),
            report,
            wall,
        });
    }
    println!("vm-test summary:");
    for r in &runs {
        let passed = r.report.outcomes.iter().filter(|o| o.passed()).count();
        println!(
            "  {:<12} {:<5} {passed}/{} passed in {:.0} s ({})",
            r.name,
            if r.report.all_passed() {
                "PASS"
            } else {
                "FAIL"
            },
            smoke::SMOKE.len(),
            r.wall.as_secs_f64(),
            r.report.kernel.as_deref().unwrap_or("kernel unknown"),
        );
    }
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.report.all_passed())
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the smoke tests failed on: {}", failed.join(", "));
    }
    Ok(())
}

fn print_run(name: &str, r: &smoke::Report, wall: Duration, out: &Path) {
    println!(
        "vm-test {name}: kernel {} in {:.0} s (logs in {})",
        r.kernel.as_deref().unwrap_or("unknown"),
        wall.as_secs_f64(),
        out.display()
    );
    for (_, test, covers) in smoke::SMOKE {
        let line = match r.outcomes.iter().find(|o| o.test == test) {
            Some(o) if o.passed() => format!("ok      {:>4} s", o.seconds),
            Some(o) if o.status == "timeout" => {
                format!("STALLED {:>4} s (stacks in its log)", o.seconds)
            }
            Some(o) => format!("FAILED  {:>4} s (status {})", o.seconds, o.status),
            None => "NOT RUN".to_owned(),
        };
        println!("  {line}  {test}  [{covers}]");
    }
    if !r.finished {
        println!(
            "  the guest did not finish: see {}/guest.log",
            out.display()
        );
    }
}

/// The virtme-ng command that boots `vmlinuz` with this host's root
/// filesystem and runs `script` in a clean environment (nothing of the
/// host shell's environment reaches the tests).
fn guest_command(vng: &Path, vmlinuz: &Path, out: &Path, script: &Path) -> Command {
    let mut cmd = Command::new(vng);
    cmd.arg("-r")
        .arg(vmlinuz)
        // 9p rather than virtiofs: virtiofsd is not needed.
        .args(["--force-9p", "--disable-kvm", "-m", "2G", "-p", "2"])
        .arg("--rwdir")
        .arg(out)
        .arg("--exec")
        .arg(format!(
            "env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
             /bin/bash --noprofile --norc {}",
            script.display()
        ))
        .stdin(Stdio::null())
        .current_dir(root());
    cmd
}
