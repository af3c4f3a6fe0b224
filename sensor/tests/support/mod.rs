//! Shared pieces of the integration tests: start the real `keywarden`
//! binary, wait for `ready`, stop it with a signal, read its NDJSON as
//! typed events (`events`).
//! These tests need root; `cargo xtask test` runs them one at a time.
#![allow(dead_code)]

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

mod events;
mod ocsf;

pub use events::*;
// Only some tests validate against OCSF.
#[allow(unused_imports)]
pub use ocsf::*;

pub struct Sensor {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub events_path: PathBuf,
    pub log_path: PathBuf,
}

pub fn keywarden() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keywarden"))
}

impl Sensor {
    /// Starts the sensor with extra `run` arguments and waits for `ready`.
    pub fn start(extra: &[&str]) -> Sensor {
        Self::start_with_env(extra, &[])
    }

    /// Kills the sensor outright (SIGKILL), as a crash would, and reaps
    /// it. Its hold watchdog lives on; its log stays readable.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The sensor's hold watchdog (`keywarden __watchdog`): its only child
    /// process.
    pub fn watchdog_pid(&self) -> u32 {
        let parent = format!("PPid:\t{}", self.pid());
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .is_ok_and(|s| s.lines().any(|l| l == parent))
            })
            .unwrap_or_else(|| panic!("the sensor has no watchdog:\n{}", self.log()))
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Sensor {
        let dir = tempfile::tempdir().unwrap();
        let events_path = dir.path().join("events.ndjson");
        let log_path = dir.path().join("sensor.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = keywarden()
            .args(["--log", "info,keywarden=debug", "run", "--output"])
            .arg(&events_path)
            // Each sensor learns on its own: no test sees another's baselines
            // or key inventory (a test's own `--inventory` wins).
            .arg("--baselines")
            .arg(dir.path().join("baselines.json"))
            .arg("--inventory")
            .arg(dir.path().join("inventory.json"))
            .args(extra)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keywarden");
        let mut s = Sensor {
            child: Some(child),
            dir,
            events_path,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if s.log().contains(" ready: ") {
                break;
            }
            if let Some(status) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keywarden exited with {status} before ready:\n{}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "keywarden STALLED: not ready after 60 s; where its threads wait:\n{}\nits log:\n{}",
                thread_stacks(s.pid()),
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until the sensor watches the key-object frees of `pid`, which
    /// it starts when the process first signs. Signatures the process makes
    /// from then on may be answered from the sensor's cache.
    pub fn wait_for_free_watch(&self, pid: u32) {
        let line = format!("pid={pid} ");
        wait_for(
            &format!("the sensor to watch pid {pid}'s frees"),
            Duration::from_secs(20),
            || {
                self.log()
                    .lines()
                    .any(|l| l.contains("watching key-object frees") && l.contains(&line))
            },
        );
    }

    /// The events written so far (the sensor flushes on every poll; a
    /// full buffer may write part of a line before).
    pub fn events(&self) -> Vec<Event> {
        read_events_so_far(&self.events_path)
    }

    /// Sends `signal`, waits for a clean exit (status 0) and returns events.
    pub fn stop_with(self, signal: nix::sys::signal::Signal) -> Vec<Event> {
        let (status, events, log) = self.stop_status(signal);
        assert!(
            status.success(),
            "keywarden exited with {status} after {signal}:\n{log}"
        );
        events
    }

    /// Sends `signal`, waits for the sensor to exit, whatever its status
    /// (3: it shed events), and returns the status, the events and the log.
    pub fn stop_status(
        mut self,
        signal: nix::sys::signal::Signal,
    ) -> (ExitStatus, Vec<Event>, String) {
        // Give the sensor one poll interval plus margin to see the last records.
        std::thread::sleep(Duration::from_millis(300));
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "keywarden did not exit after {signal}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, read_events(&self.events_path), self.log())
    }

    pub fn stop(self) -> Vec<Event> {
        self.stop_with(nix::sys::signal::Signal::SIGINT)
    }

    /// Like `stop`, but a run that shed records (exit status 3; the log
    /// says which) passes too: for tests that need what the sensor
    /// learnt (its inventory, the events it wrote), not a complete record
    /// of the host. A test beside it in the same binary keeps the host
    /// busy, and records still arriving when the sensor stops are
    /// counted and shed, as they should be.
    pub fn stop_allowing_shed(self) -> Vec<Event> {
        let (status, events, log) = self.stop_status(nix::sys::signal::Signal::SIGINT);
        assert!(
            status.success() || status.code() == Some(3),
            "keywarden exited with {status}:\n{log}"
        );
        events
    }

    /// Like `stop`, and the NDJSON exactly as the sensor wrote it (the
    /// file goes with the sensor's directory).
    pub fn stop_with_output(mut self) -> (Vec<Event>, String) {
        let path = self.events_path.clone();
        // Kept past `self`, which `stop_status` consumes.
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let (status, events, log) = self.stop_status(nix::sys::signal::Signal::SIGINT);
        assert!(status.success(), "keywarden exited with {status}:\n{log}");
        let raw = std::fs::read_to_string(&path).unwrap();
        drop(dir);
        (events, raw)
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where each thread of `pid` waits: its name, `wchan` and kernel stack
/// (`/proc/PID/task/TID/stack`, root only), for the message of a stall.
pub fn thread_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(pid {pid} is gone)");
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        out += &format!(
            "thread {} ({}) waits in {}:\n{}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        );
    }
    out
}

/// Whether this kernel has a tracepoint (tracefs must be mounted, as it is
/// once a sensor has started).
pub fn kernel_has_tracepoint(category: &str, name: &str) -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|t| Path::new(&format!("{t}/events/{category}/{name}")).is_dir())
}

/// A process's state letter in `/proc/PID/stat` (`T`: stopped), `?` if it
/// is gone.
pub fn process_state(pid: u32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, r)| r.chars().next().unwrap_or('?'))
        })
        .unwrap_or('?')
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Spawns a command. A test that just copied the executable can see
/// "Text file busy": another test thread forked while the copy's write
/// descriptor was open, and the child holds it until it execs. That
/// passes within milliseconds, so it is retried.
pub fn spawn(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        }
    }
}

/// Runs a command and returns its pid with its output.
pub fn run_pid(cmd: &mut Command) -> (u32, Output) {
    let child = spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

/// `run_pid`, for a command that must succeed (fails the test with its
/// stderr otherwise).
pub fn run_pid_ok(cmd: &mut Command) -> (u32, Output) {
    let (pid, out) = run_pid(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, out)
}

/// Runs a command with a deadline. A process still running then (stopped
/// and never released, say) is continued, killed, and the test fails.
pub fn run_pid_deadline(cmd: &mut Command, deadline: Duration) -> (u32, Output) {
    let mut child = spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let pid = child.id();
    let end = Instant::now() + deadline;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let state = state
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_owned();
            let p = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(p, nix::sys::signal::SIGCONT);
            let _ = child.kill();
            panic!("{cmd:?} still running after {deadline:?} ({state})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (pid, child.wait_with_output().unwrap())
}

/// `run_pid_deadline` for a command that must succeed: its pid.
pub fn run_pid_deadline_ok(cmd: &mut Command, deadline: Duration) -> u32 {
    let (pid, out) = run_pid_deadline(cmd, deadline);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

/// A fresh key made by openssl, and its SPKI SHA-256 as openssl computes it.
#[derive(Clone)]
pub struct TestKey {
    pub path: PathBuf,
    pub spki: String,
}

pub fn openssl_key(dir: &Path, name: &str, alg: &str) -> TestKey {
    let path = dir.join(format!("{name}.pem"));
    let mut cmd = Command::new("openssl");
    cmd.args(["genpkey", "-out"]).arg(&path);
    match alg {
        "ec" => cmd.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        "rsa" => cmd.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        "ed25519" => cmd.args(["-algorithm", "ED25519"]),
        other => panic!("unknown algorithm {other}"),
    };
    run_ok(&mut cmd);
    TestKey {
        spki: spki_of_file(&path),
        path,
    }
}

/// `openssl pkey -in KEY -pubout -outform DER | sha256sum`
/// `BIN dgst -sha256 -sign KEY -out OUT DATA`: one EVP_DigestSign
/// signature with `key` by the openssl command line at `bin`.
pub fn openssl_sign(
    bin: impl AsRef<std::ffi::OsStr>,
    key: &Path,
    data: &Path,
    out: &Path,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg("-out")
        .arg(out)
        .arg(data);
    cmd
}

pub fn spki_of_file(key: &Path) -> String {
    let out = run_ok(Command::new("sh").arg("-c").arg(format!(
        "openssl pkey -in '{}' -pubout -outform DER | sha256sum",
        key.display()
    )));
    first_word(&out.stdout)
}

pub fn sha256_file(p: &Path) -> String {
    first_word(&run_ok(Command::new("sha256sum").arg(p)).stdout)
}

/// The hash that `sha256sum` prints before the file name.
fn first_word(stdout: &[u8]) -> String {
    String::from_utf8_lossy(stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Mount point of cgroup v2.
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mounts.lines() {
        let (left, right) = l.split_once(" - ").unwrap();
        if right.split_whitespace().next() == Some("cgroup2") {
            return PathBuf::from(left.split_whitespace().nth(4).unwrap());
        }
    }
    panic!("no cgroup2 mount");
}

/// A server process started by a test, stopped when dropped.
pub struct Server(pub Child);

impl Server {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        // nginx leaves gracefully on SIGQUIT; the fixtures die on anything.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGQUIT);
        std::thread::sleep(Duration::from_millis(200));
        // Then the whole process group (`start_server` gives the server
        // its own): apache2 dies of SIGQUIT without stopping its workers,
        // which were left running after the suite, holding its files.
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server and waits until `port` on 127.0.0.1 accepts.
pub fn start_server(cmd: &mut Command, port: u16) -> Server {
    let server = Server(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that `drop` stops its workers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}")),
    );
    wait_for(
        &format!("{cmd:?} to listen"),
        Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    server
}

/// A self-signed certificate for `name` (also valid for 127.0.0.1), which
/// doubles as its own CA for clients that verify.
pub fn cert(dir: &Path, key: &TestKey, name: &str) -> PathBuf {
    let crt = dir.join(format!("{name}.crt"));
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-new", "-days", "2", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-addext")
            .arg(format!("subjectAltName=DNS:{name},IP:127.0.0.1"))
            // An end-entity certificate (rustls refuses a CA as a peer).
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-key")
            .arg(&key.path)
            .arg("-out")
            .arg(&crt),
    );
    crt
}

/// nginx with one worker and `servers` (server blocks) in `dir`.
/// apache2 (mpm_event, mod_ssl) serving `crt` and `key` for `name` on
/// 127.0.0.1:`port`, with its configuration and runtime files in `dir`
/// and no TLS session reuse (every handshake signs).
pub fn start_apache(dir: &Path, port: u16, name: &str, crt: &Path, key: &Path) -> Server {
    let modules = "/usr/lib/apache2/modules";
    let conf = dir.join("apache2.conf");
    std::fs::write(
        &conf,
        format!(
            "ServerRoot {dir}\n\
             LoadModule mpm_event_module {modules}/mod_mpm_event.so\n\
             LoadModule authz_core_module {modules}/mod_authz_core.so\n\
             LoadModule socache_shmcb_module {modules}/mod_socache_shmcb.so\n\
             LoadModule ssl_module {modules}/mod_ssl.so\n\
             ServerName {name}\n\
             Listen 127.0.0.1:{port}\n\
             PidFile {dir}/apache2.pid\n\
             DefaultRuntimeDir {dir}\n\
             ErrorLog {dir}/error.log\n\
             User www-data\nGroup www-data\n\
             SSLSessionCache none\nSSLSessionTickets off\n\
             <VirtualHost 127.0.0.1:{port}>\n\
             SSLEngine on\n\
             SSLCertificateFile {crt}\n\
             SSLCertificateKeyFile {key}\n\
             </VirtualHost>\n",
            dir = dir.display(),
            crt = crt.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    start_server(
        Command::new("/usr/sbin/apache2")
            .arg("-f")
            .arg(&conf)
            .arg("-DFOREGROUND")
            .stdin(Stdio::null()),
        port,
    )
}

pub fn start_nginx(dir: &Path, port: u16, servers: &str) -> Server {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 512; }}\nhttp {{\naccess_log off;\nclient_body_temp_path {d};\n\
             proxy_temp_path {d};\nfastcgi_temp_path {d};\nuwsgi_temp_path {d};\nscgi_temp_path {d};\n{servers}}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    start_server(Command::new("/usr/sbin/nginx").arg("-c").arg(&conf), port)
}

/// The pid of nginx's single worker.
pub fn nginx_worker(master: &Server) -> u32 {
    let out = run_ok(Command::new("pgrep").args(["-P", &master.pid().to_string()]));
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .expect("one nginx worker")
}

/// A TLS fixture program (`fixtures/tls-programs`), built by the test
/// command before the tests run.
pub fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/tls-programs/target/release")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: `cargo xtask test` builds the TLS fixtures first",
        p.display()
    );
    p
}

/// The embedded default configuration with `key_paths` set and each
/// `(from, to)` replacement applied (each must match), written to
/// `dir/keywarden.yaml`.
pub fn sensor_config(dir: &Path, key_paths: &[&Path], edits: &[(&str, String)]) -> PathBuf {
    let default = String::from_utf8(run_ok(keywarden().arg("config")).stdout).unwrap();
    let list: String = key_paths
        .iter()
        .map(|p| format!("  - {}\n", p.display()))
        .collect();
    let mut text = default.replace("key_paths:\n", &format!("key_paths:\n{list}"));
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "the default configuration has no {from:?}"
        );
        text = text.replace(from, to);
    }
    let file = dir.join("keywarden.yaml");
    std::fs::write(&file, text).unwrap();
    file
}

/// An nginx `server` block: TLS on 127.0.0.1:`port` with a full handshake
/// per connection (no session cache or tickets), answering `ok`. `extra`
/// goes inside the block (client certificates, a server name).
pub fn nginx_tls_server(port: u16, crt: &Path, key: &Path, extra: &str) -> String {
    format!(
        "server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {}; \
         ssl_session_cache off; ssl_session_tickets off; {extra} \
         location / {{ return 200 \"ok\"; }} }}\n",
        crt.display(),
        key.display()
    )
}

/// Writes `DIR/rules.yaml` with one rule, `protect-signing-key`: only the
/// executable at `allowed` may sign with the key `spki`; anyone else is
/// alerted on and killed.
pub fn kill_rule(dir: &Path, spki: &str, allowed: &Path) -> PathBuf {
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: protect-signing-key\n    severity: critical\n    event: key_use\n    match:\n      key.spki_sha256: {spki}\n    allow:\n      - exe_path: {}\n    actions: [alert, kill]\n",
            allowed.display()
        ),
    )
    .unwrap();
    rules
}

/// 100 TLS clients connecting to 127.0.0.1:`port` at once (a barrier),
/// each from its own loopback address 127.0.0.2-101, each sending one
/// request and expecting `ok` in the answer. Returns the (address, port)
/// each connected from.
pub fn hundred_concurrent_handshakes(port: u16) -> std::collections::BTreeSet<(String, u16)> {
    let script = format!(
        "import socket, ssl, threading\n\
         ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE\n\
         n = 100; barrier = threading.Barrier(n); out = [None] * n\n\
         def run(i):\n\
         \x20   s = socket.socket(); s.bind(('127.0.0.%d' % (i + 2), 0)); barrier.wait()\n\
         \x20   s.connect(('127.0.0.1', {port})); t = ctx.wrap_socket(s)\n\
         \x20   t.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); body = t.recv(4096)\n\
         \x20   out[i] = '%s %d' % t.getsockname() if b'ok' in body else 'FAIL'; t.close()\n\
         ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n\
         print('\\n'.join(out))\n"
    );
    let out = run_ok(Command::new("python3").arg("-c").arg(&script));
    let clients: std::collections::BTreeSet<(String, u16)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (ip, port) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("client failed: {l}"));
            (ip.to_owned(), port.parse().unwrap())
        })
        .collect();
    assert_eq!(clients.len(), 100);
    clients
}
