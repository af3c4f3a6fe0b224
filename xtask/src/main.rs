//! Developer tasks. `./x.sh` installs the toolchain and calls these.
//!
//! * `cargo xtask build`  release build (the eBPF object is built by
//!   `sensor/build.rs` and embedded)
//! * `cargo xtask run`    build, then run the sensor in the foreground
//! * `cargo xtask test`   rustfmt and clippy (`-D warnings`), then every
//!   test: unit tests, then the root-only integration tests that load real
//!   probes and drive real programs
//! * `cargo xtask bench`  the benchmarks in `benches/` (scripts, then the
//!   criterion pipeline benchmark)
//! * `cargo xtask fuzz`   the rule-parser fuzz target, seeded from `rules/`

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Release build of the `keywarden` binary.
    Build,
    /// Build and run `keywarden run` (arguments are passed on).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite (needs root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Run a benchmark from benches/ (default: all).
    Bench { name: Option<String> },
    /// Fuzz the rule parser (installs cargo-fuzz if missing).
    Fuzz {
        /// How long to run.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one line
/// totalling every test binary ("N passed, M failed"), so the outcome is
/// on the last line whichever binary ran last.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match label {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Build => run(cargo().args(["build", "--release", "-p", "keywarden"])),
        Task::Run { args } => {
            run(cargo().args(["build", "--release", "-p", "keywarden"]))?;
            run(Command::new(root().join("target/release/keywarden"))
                .arg("run")
                .args(args))
        }
        Task::Test { filter } => {
            if !is_root() {
                bail!("the test suite loads eBPF programs and must run as root");
            }
            // The guard rails first: a formatting slip or a lint fails the
            // run before the long integration tests start.
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            let filter: Vec<String> = filter.into_iter().collect();
            // The TLS fixtures (static rustls, ring, AWS-LC, BoringSSL) are
            // their own workspace, built once and then kept up to date.
            run(cargo()
                .args(["build", "--release", "-j2", "--manifest-path"])
                .arg(root().join("fixtures/tls-programs/Cargo.toml")))?;
            // One invocation, so everything builds once. Tests run one at a
            // time: each integration test starts its own sensor, and event
            // counts must be that test's own.
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--lib", "--bins", "--tests"])
                .args(&filter)
                .args(["--", "--test-threads=1"]);
            run_tests(&mut cmd)
        }
        Task::Bench { name } => {
            run(cargo().args(["build", "--release", "-p", "keywarden"]))?;
            let mut scripts: Vec<PathBuf> = std::fs::read_dir(root().join("benches"))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sh"))
                .filter(|p| {
                    name.as_ref()
                        .is_none_or(|n| p.to_string_lossy().contains(n.as_str()))
                })
                .collect();
            scripts.sort();
            for s in scripts {
                run(Command::new("bash").arg(s))?;
            }
            if name
                .as_ref()
                .is_none_or(|n| "pipeline_throughput".contains(n.as_str()))
            {
                run(cargo().args([
                    "bench",
                    "-p",
                    "keywarden-analyzer",
                    "--bench",
                    "pipeline_throughput",
                ]))?;
            }
            Ok(())
        }
        Task::Fuzz { seconds } => {
            let have = Command::new("cargo")
                .args(["fuzz", "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !have {
                run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
            }
            let fuzz = root().join("analyzer/fuzz");
            let corpus = fuzz.join("corpus/rules_parse");
            std::fs::create_dir_all(&corpus)?;
            for e in std::fs::read_dir(root().join("rules"))?.flatten() {
                std::fs::copy(e.path(), corpus.join(e.file_name()))?;
            }
            // cargo-fuzz needs nightly flags (-Zsanitizer); the pinned
            // stable toolchain accepts them with RUSTC_BOOTSTRAP.
            run(Command::new("cargo")
                .env("RUSTC_BOOTSTRAP", "1")
                .args(["fuzz", "run", "--fuzz-dir", "analyzer/fuzz", "rules_parse"])
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-max_len=4096"))
        }
    }
}
