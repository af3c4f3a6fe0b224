//! Developer tasks. `./x.sh` installs the toolchain and calls these.
//!
//! * `cargo xtask build`  release build (the eBPF object is built by
//!   `sensor/build.rs` and embedded)
//! * `cargo xtask run`    build, then run the sensor in the foreground
//! * `cargo xtask test`   rustfmt and clippy (`-D warnings`), then every
//!   test: unit tests, then the root-only integration tests that load real
//!   probes and drive real programs, then the smoke subset on each stock
//!   kernel of the matrix (`vm-test`)
//! * `cargo xtask bench`  the benchmarks in `benches/` (scripts, then the
//!   criterion pipeline benchmark)
//! * `cargo xtask vm-test --kernel NAME`   the smoke subset of the
//!   integration tests on a kernel of the matrix: `host`, or a stock
//!   Debian kernel booted under qemu (`vm`)
//! * `cargo xtask fuzz [TARGET] [--seconds N]`   the fuzz targets (rule
//!   parser, key and certificate parser, ELF symbol and marker reader),
//!   each seeded and run for N seconds in turn (`FUZZ_TARGETS`)

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod go;
mod vm;

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
    /// Run the smoke subset of the integration tests on kernels of the
    /// matrix (needs root): `host`, `debian-6.1`, `debian-6.12`, or `all`.
    VmTest {
        /// A kernel name; repeat for several.
        #[arg(long = "kernel", required = true)]
        kernels: Vec<String>,
    },
    /// Run a benchmark from benches/ (default: all).
    Bench { name: Option<String> },
    /// Fuzz the parsers of untrusted input (installs cargo-fuzz if
    /// missing): `rules_parse`, `key_material`, `elf_scan`.
    Fuzz {
        /// Only this target (default: each in turn).
        target: Option<String>,
        /// How long to run each target.
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

/// A cargo-fuzz target: where it lives, how its corpus is seeded, and the
/// libFuzzer options it runs with.
struct FuzzTarget {
    name: &'static str,
    /// Its cargo-fuzz crate, relative to the workspace root.
    dir: &'static str,
    /// Largest input tried (`-max_len`), above the largest seed.
    max_len: u32,
    /// A libFuzzer dictionary in `dir`.
    dict: Option<&'static str>,
    /// Writes seed inputs into the corpus directory.
    seed: fn(&Path) -> Result<()>,
}

static FUZZ_TARGETS: [FuzzTarget; 3] = [
    // Rule files: any UTF-8 input gives rules or located errors.
    FuzzTarget {
        name: "rules_parse",
        dir: "analyzer/fuzz",
        max_len: 4096,
        dict: None,
        seed: seed_rules,
    },
    // Key and certificate files (sensor/src/keys/material.rs).
    FuzzTarget {
        name: "key_material",
        dir: "sensor/fuzz",
        max_len: 8192,
        dict: Some("key_material.dict"),
        seed: seed_keys,
    },
    // ELF symbols and markers (sensor/src/discovery/signing_code.rs).
    FuzzTarget {
        name: "elf_scan",
        dir: "sensor/fuzz",
        max_len: 64 << 10,
        dict: Some("elf_scan.dict"),
        seed: seed_elf,
    },
];

/// The example rules.
fn seed_rules(corpus: &Path) -> Result<()> {
    for e in std::fs::read_dir(root().join("rules"))?.flatten() {
        std::fs::copy(e.path(), corpus.join(e.file_name()))?;
    }
    Ok(())
}

/// Runs `openssl ARGS -out OUT` in `dir`, unless `OUT` is there already
/// (keys are generated once; later runs keep them).
fn openssl_seed(dir: &Path, out: &str, args: &[&str]) -> Result<()> {
    if dir.join(out).exists() {
        return Ok(());
    }
    let mut cmd = Command::new("openssl");
    cmd.args(args)
        .args(["-out", out])
        .current_dir(dir)
        .stdin(Stdio::null());
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .status()
        .context("running openssl (it writes the key_material seeds)")?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Every shape of key file the sensor reads, PEM and DER, from keys
/// `openssl` generates: PKCS#8 private keys (EC P-256, P-384, P-521, RSA,
/// Ed25519), SEC1 and traditional RSA private keys, SPKI public keys,
/// self-signed certificates, encrypted private keys, and PEM bundles.
fn seed_keys(corpus: &Path) -> Result<()> {
    const KEYS: [(&str, &[&str]); 5] = [
        (
            "p256",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        ),
        (
            "p384",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        ),
        (
            "p521",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
        ),
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        ),
        ("ed25519", &["-algorithm", "ED25519"]),
    ];
    let seed = |out: &str, args: &[&str]| openssl_seed(corpus, out, args);
    for (name, algorithm) in KEYS {
        let f = |kind: &str| format!("{name}.{kind}");
        let key = f("pk8.pem");
        let key = key.as_str();
        seed(key, &[&["genpkey"][..], algorithm].concat())?;
        seed(&f("pk8.der"), &["pkey", "-in", key, "-outform", "DER"])?;
        seed(&f("spki.pem"), &["pkey", "-in", key, "-pubout"])?;
        seed(
            &f("spki.der"),
            &["pkey", "-in", key, "-pubout", "-outform", "DER"],
        )?;
        let subject = format!("/CN=keywarden fuzz seed {name}");
        let crt = f("crt.pem");
        seed(
            &crt,
            &[
                "req",
                "-x509",
                "-key",
                key,
                "-subj",
                subject.as_str(),
                "-days",
                "1",
            ],
        )?;
        seed(
            &f("crt.der"),
            &["x509", "-in", crt.as_str(), "-outform", "DER"],
        )?;
        seed(
            &f("pk8-enc.pem"),
            &["pkey", "-in", key, "-aes128", "-passout", "pass:fuzz"],
        )?;
        if name.starts_with('p') {
            // SEC1 `EC PRIVATE KEY` (`openssl ec` writes nothing else).
            seed(&f("sec1.pem"), &["ec", "-in", key])?;
            seed(&f("sec1.der"), &["ec", "-in", key, "-outform", "DER"])?;
        }
        if name == "rsa" {
            // PKCS#1 `RSA PRIVATE KEY` (OpenSSL 3 writes PKCS#8 unless told).
            seed(&f("pkcs1.pem"), &["rsa", "-in", key, "-traditional"])?;
            seed(
                &f("pkcs1.der"),
                &["rsa", "-in", key, "-traditional", "-outform", "DER"],
            )?;
            // With `Proc-Type: 4,ENCRYPTED` headers.
            seed(
                &f("pkcs1-enc.pem"),
                &[
                    "rsa",
                    "-in",
                    key,
                    "-traditional",
                    "-aes128",
                    "-passout",
                    "pass:fuzz",
                ],
            )?;
        }
        // A key and its certificate in one file, as servers keep them.
        let bundle = corpus.join(f("bundle.pem"));
        if !bundle.exists() {
            let mut both = std::fs::read(corpus.join(key))?;
            both.extend(std::fs::read(corpus.join(crt.as_str()))?);
            std::fs::write(bundle, both)?;
        }
    }
    // Blocks the parser skips, then keys of three kinds.
    seed(
        "ec-params.pem",
        &[
            "genpkey",
            "-genparam",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
    )?;
    let mixed = corpus.join("mixed.pem");
    if !mixed.exists() {
        let mut all = Vec::new();
        for part in [
            "ec-params.pem",
            "p384.sec1.pem",
            "rsa.crt.pem",
            "ed25519.spki.pem",
        ] {
            all.extend(std::fs::read(corpus.join(part))?);
        }
        std::fs::write(mixed, all)?;
    }
    Ok(())
}

/// Small ELF files of this host (`/usr/bin/true`, the smallest shared
/// objects in the library directory), and `sensor/fuzz/seeds/signing.c`
/// built twice: with the symbols the scan looks for, and stripped with
/// hidden symbols, so that only its marker strings are left.
fn seed_elf(corpus: &Path) -> Result<()> {
    const LARGEST: u64 = 64 << 10;
    let is_elf = |p: &Path| {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(p)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|()| magic == *b"\x7fELF")
    };
    for p in ["/usr/bin/true", "/bin/true"] {
        let p = Path::new(p);
        if is_elf(p) {
            std::fs::copy(p, corpus.join("true"))?;
            break;
        }
    }
    let libdir = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
        .into_iter()
        .map(Path::new)
        .find(|d| d.is_dir());
    let mut libs: Vec<(u64, PathBuf)> = Vec::new();
    for e in libdir
        .map(std::fs::read_dir)
        .transpose()?
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path();
        // Regular files only (not the symlinks to them), named like
        // libraries, small enough to fuzz whole.
        let Ok(md) = e.metadata() else { continue };
        if md.is_file()
            && md.len() <= LARGEST
            && e.file_name().to_string_lossy().contains(".so")
            && is_elf(&p)
        {
            libs.push((md.len(), p));
        }
    }
    libs.sort();
    for (_, p) in libs.iter().take(3) {
        if let Some(name) = p.file_name() {
            std::fs::copy(p, corpus.join(name))?;
        }
    }
    let source = root().join("sensor/fuzz/seeds/signing.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    for (out, extra) in [
        ("signing.so", &[][..]),
        ("signing-stripped.so", &["-fvisibility=hidden", "-s"][..]),
    ] {
        let mut cmd = Command::new(&cc);
        cmd.args(["-shared", "-fPIC", "-O1"])
            .args(extra)
            .arg("-o")
            .arg(corpus.join(out))
            .arg(&source);
        eprintln!("xtask: {cmd:?}");
        // Without a C compiler the other seeds still do.
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("xtask: warning: {cc} failed ({s}); no {out} seed"),
            Err(e) => eprintln!("xtask: warning: cannot run {cc} ({e}); no {out} seed"),
        }
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
            // A second Go release for the Go tests (the host has 1.19).
            go::ensure(&root())?;
            // The TLS fixtures (static rustls, ring, AWS-LC, BoringSSL) are
            // their own workspace, built once and then kept up to date.
            run(cargo()
                .args(["build", "--release", "-j2", "--manifest-path"])
                .arg(root().join("fixtures/tls-programs/Cargo.toml")))?;
            // One invocation, so everything builds once. Tests run one at a
            // time: each integration test starts its own sensor, and event
            // counts must be that test's own.
            let mut cmd = cargo();
            // --no-fail-fast: one failing test binary does not hide the
            // results of the others.
            cmd.args([
                "test",
                "--workspace",
                "--lib",
                "--bins",
                "--tests",
                "--no-fail-fast",
            ])
            .args(&filter)
            .args(["--", "--test-threads=1"]);
            run_tests(&mut cmd)?;
            // The kernel matrix: the smoke subset on each stock kernel
            // (about 2.5 minutes each under TCG; this host's kernel ran the
            // whole suite above). Skipped for a filtered run, or with
            // KEYWARDEN_VM_TEST=0 on a machine that cannot boot guests.
            if filter.is_empty() && std::env::var("KEYWARDEN_VM_TEST").as_deref() != Ok("0") {
                let stock: Vec<String> = vm::kernels::STOCK
                    .iter()
                    .map(|k| k.name.to_owned())
                    .collect();
                vm::vm_test(&stock)?;
            }
            Ok(())
        }
        Task::VmTest { kernels } => {
            if !is_root() {
                bail!("vm-test loads eBPF programs and boots kernels: it must run as root");
            }
            vm::vm_test(&kernels)
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
        Task::Fuzz { target, seconds } => {
            let targets: Vec<&FuzzTarget> = match &target {
                None => FUZZ_TARGETS.iter().collect(),
                Some(name) => match FUZZ_TARGETS.iter().find(|t| t.name == name) {
                    Some(t) => vec![t],
                    None => {
                        let names: Vec<&str> = FUZZ_TARGETS.iter().map(|t| t.name).collect();
                        bail!("no fuzz target {name}; there are: {}", names.join(", "));
                    }
                },
            };
            let have = Command::new("cargo")
                .args(["fuzz", "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !have {
                run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
            }
            for t in targets {
                let dir = root().join(t.dir);
                // A fuzz crate without a lock file starts from the
                // workspace's, so it fuzzes the dependency versions the
                // sensor and analyzer are built with (cargo drops what the
                // fuzz crate does not use and adds libFuzzer).
                let lock = dir.join("Cargo.lock");
                if !lock.exists() {
                    std::fs::copy(root().join("Cargo.lock"), lock)?;
                }
                let corpus = dir.join("corpus").join(t.name);
                std::fs::create_dir_all(&corpus)?;
                (t.seed)(&corpus).with_context(|| format!("seeding {}", t.name))?;
                // cargo-fuzz needs nightly flags (-Zsanitizer); the pinned
                // stable toolchain accepts them with RUSTC_BOOTSTRAP.
                let mut cmd = Command::new("cargo");
                cmd.env("RUSTC_BOOTSTRAP", "1")
                    .args(["fuzz", "run", "--fuzz-dir", t.dir, t.name])
                    .arg(&corpus)
                    .arg("--")
                    .arg(format!("-max_total_time={seconds}"))
                    .arg(format!("-max_len={}", t.max_len))
                    // Runs, coverage and corpus size, for docs/performance.md.
                    .arg("-print_final_stats=1");
                if let Some(dict) = t.dict {
                    cmd.arg(format!("-dict={}", dir.join(dict).display()));
                }
                run(&mut cmd)?;
            }
            Ok(())
        }
    }
}
