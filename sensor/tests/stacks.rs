//! Every signing stack a host runs, with the network peer of each
//! signature: the rustls fixture on aws-lc-rs and on ring (server and mTLS
//! client), a BoringSSL server, Python's `cryptography` wheel and Node
//! (both carry their own OpenSSL), curl with a client certificate, nginx
//! under 100 concurrent handshakes from distinct addresses, a stripped
//! binary (reported, not missed), and a static signer exec'd 100 times.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
};

use support::*;

/// Key uses of one process, checked to be exactly `n`, all successful,
/// all with `spki`.
fn uses_of<'a>(events: &'a [Event], pid: u32, spki: &str, n: usize) -> Vec<&'a Event> {
    let uses = key_uses_of(events, pid);
    assert_eq!(uses.len(), n, "key uses of pid {pid}: {}", pretty(&uses));
    for &e in &uses {
        assert_eq!(e.status, "Success", "{}", pretty(e));
        assert_eq!(spki_of(e), Some(spki), "{}", pretty(e));
    }
    uses
}

/// A client run with a fixed source port, so the test knows the peer the
/// server's events must name.
fn curl_from(port: u16, local_port: u16) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sk", "--local-port", &local_port.to_string()])
        .arg(format!("https://127.0.0.1:{port}/"));
    c
}

/// Distinct source ports for `n` curl runs.
fn source_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

fn rustls_server(
    provider: &str,
    crt: &Path,
    key: &Path,
    port: u16,
    client_ca: Option<&Path>,
) -> Server {
    let mut cmd = Command::new(fixture("kw-rustls"));
    cmd.args(["server", "--provider", provider, "--cert"])
        .arg(crt)
        .arg("--key")
        .arg(key)
        .args(["--listen", &format!("127.0.0.1:{port}")]);
    if let Some(ca) = client_ca {
        cmd.arg("--client-ca").arg(ca);
    }
    start_server(&mut cmd, port)
}

/// How the sensor knows the key once it has seen the first handshake.
#[derive(PartialEq)]
enum Later {
    /// The key object is cached: a C signing call (or one nested in a Rust
    /// signer) with an EVP_PKEY whose reference drops are not frees. The
    /// cache holds from the first signature made after the sensor saw the
    /// process's first: the second is checked once more (its free probes
    /// were not in place when the first was made).
    Cached,
    /// Every signature is verified (a Rust signer with no C key object).
    Verified,
}

/// A TLS server fixture started after the sensor (so it is covered from
/// exec), answering curl from known source ports: exactly one event per
/// handshake, the server's key, the right stack and function, and each
/// connection's peer and local addresses.
fn server_names_every_handshake(
    start: impl FnOnce(&Path, &Path, u16) -> Server,
    stack: &str,
    function: &str,
    later: Later,
) {
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_key(dir.path(), "server", "ec");
    let crt = cert(dir.path(), &key, "localhost");
    let port = free_port();
    let sensor = Sensor::start(&[]);
    let server = start(&key.path, &crt, port);
    let ports = source_ports(4);
    for (i, p) in ports.iter().enumerate() {
        let out = run_ok(&mut curl_from(port, *p));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
        if i == 0 && later == Later::Cached {
            sensor.wait_for_free_watch(server.pid());
        }
    }
    let events = sensor.stop();
    let uses = uses_of(&events, server.pid(), &key.spki, ports.len());
    drop(server);
    let mut seen = BTreeSet::new();
    for (i, &e) in uses.iter().enumerate() {
        assert_eq!(module_of(e).kind, stack, "{}", pretty(e));
        assert_eq!(module_of(e).function_name, function, "{}", pretty(e));
        let by = if i > 1 && later == Later::Cached {
            IdentifiedBy::HandleCache
        } else {
            IdentifiedBy::SignatureVerified
        };
        assert_eq!(
            key_of(e).identified_by,
            Some(by),
            "handshake {i}: {}",
            pretty(e)
        );
        assert_eq!(local_of(e), ("127.0.0.1", port), "{}", pretty(e));
        let (ip, p) = peer_of(e);
        assert_eq!(ip, "127.0.0.1", "{}", pretty(e));
        seen.insert(p);
    }
    assert_eq!(
        seen,
        ports.iter().copied().collect(),
        "one event per connection, each naming it"
    );
}

#[test]
fn rustls_server_on_aws_lc_rs() {
    server_names_every_handshake(
        |key, crt, port| rustls_server("aws-lc-rs", crt, key, port, None),
        "rustls",
        "rustls::crypto::signer::Signer::sign",
        Later::Cached,
    );
}

#[test]
fn rustls_server_on_ring() {
    server_names_every_handshake(
        |key, crt, port| rustls_server("ring", crt, key, port, None),
        "rustls",
        "rustls::crypto::signer::Signer::sign",
        Later::Verified,
    );
}

#[test]
fn boringssl_server() {
    server_names_every_handshake(
        |key, crt, port| {
            start_server(
                Command::new(fixture("kw-boring"))
                    .arg("--cert")
                    .arg(crt)
                    .arg("--key")
                    .arg(key)
                    .args(["--listen", &format!("127.0.0.1:{port}")]),
                port,
            )
        },
        "boringssl",
        "EVP_DigestSign",
        Later::Cached,
    );
}

/// mTLS with the rustls client on both providers: the client's signatures
/// name its own key and the server as peer; the server's name its key.
#[test]
fn rustls_mtls_client_signs_with_its_certificate_key() {
    let dir = tempfile::tempdir().unwrap();
    let skey = openssl_key(dir.path(), "server", "ec");
    let scrt = cert(dir.path(), &skey, "localhost");
    let ckey = openssl_key(dir.path(), "client", "ec");
    let ccrt = cert(dir.path(), &ckey, "client");
    for provider in ["aws-lc-rs", "ring"] {
        let port = free_port();
        let sensor = Sensor::start(&[]);
        let server = rustls_server(provider, &scrt, &skey.path, port, Some(&ccrt));
        let n = 3;
        let (client, out) = run_pid(
            Command::new(fixture("kw-rustls"))
                .args(["client", "--provider", provider, "--ca"])
                .arg(&scrt)
                .arg("--cert")
                .arg(&ccrt)
                .arg("--key")
                .arg(&ckey.path)
                .args(["--connect", &format!("127.0.0.1:{port}")])
                .args(["--server-name", "localhost", "--count", &n.to_string()]),
        );
        assert!(out.status.success(), "{provider} client: {out:?}");
        let events = sensor.stop();
        for e in uses_of(&events, client, &ckey.spki, n) {
            assert_eq!(module_of(e).kind, "rustls", "{}", pretty(e));
            assert_eq!(peer_of(e), ("127.0.0.1", port), "{}", pretty(e));
        }
        uses_of(&events, server.pid(), &skey.spki, n);
    }
}

/// curl with `--cert` against nginx requiring client certificates: curl's
/// signatures (system libcrypto) name the client key and nginx as peer.
#[test]
fn curl_client_certificate_is_attributed() {
    let dir = tempfile::tempdir().unwrap();
    let skey = openssl_key(dir.path(), "server", "ec");
    let scrt = cert(dir.path(), &skey, "localhost");
    let ckey = openssl_key(dir.path(), "client", "rsa");
    let ccrt = cert(dir.path(), &ckey, "client");
    let port = free_port();
    let nginx = start_nginx(
        dir.path(),
        port,
        &nginx_tls_server(
            port,
            &scrt,
            &skey.path,
            &format!(
                "ssl_client_certificate {}; ssl_verify_client on;",
                ccrt.display()
            ),
        ),
    );
    let sensor = Sensor::start(&[]);
    let mut pids = Vec::new();
    for _ in 0..3 {
        let (pid, out) = run_pid(
            Command::new("curl")
                .args(["-sk", "--cert"])
                .arg(&ccrt)
                .arg("--key")
                .arg(&ckey.path)
                .arg(format!("https://127.0.0.1:{port}/")),
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{out:?}");
        pids.push(pid);
    }
    let events = sensor.stop();
    drop(nginx);
    for pid in pids {
        for e in uses_of(&events, pid, &ckey.spki, 1) {
            assert_eq!(peer_of(e), ("127.0.0.1", port), "{}", pretty(e));
            assert_eq!(module_of(e).kind, "openssl", "{}", pretty(e));
        }
    }
}

/// Python's `cryptography` wheel links its own OpenSSL (local symbols in
/// `_rust.abi3.so`); Node links OpenSSL into its executable. Neither
/// touches the system libcrypto.
#[test]
fn python_cryptography_and_node_carry_their_own_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let ec = openssl_key(dir.path(), "ec", "ec");
    let ed = openssl_key(dir.path(), "ed", "ed25519");
    let rsa = openssl_key(dir.path(), "rsa", "rsa");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python");
    assert!(
        python.exists(),
        "{} missing: the test command creates it",
        python.display()
    );
    let n = 3;
    let sensor = Sensor::start(&[]);
    let mut expect = Vec::new();
    for key in [&ec, &ed, &rsa] {
        let script = format!(
            "from cryptography.hazmat.primitives import hashes, serialization\n\
             from cryptography.hazmat.primitives.asymmetric import ec, padding, ed25519\n\
             k = serialization.load_pem_private_key(open('{}', 'rb').read(), None)\n\
             for i in range({n}):\n\
             \x20   m = b'message %d' % i\n\
             \x20   if isinstance(k, ec.EllipticCurvePrivateKey): k.sign(m, ec.ECDSA(hashes.SHA256()))\n\
             \x20   elif isinstance(k, ed25519.Ed25519PrivateKey): k.sign(m)\n\
             \x20   else: k.sign(m, padding.PKCS1v15(), hashes.SHA256())\n",
            key.path.display()
        );
        let (pid, _) = run_pid_ok(Command::new(&python).arg("-c").arg(&script));
        expect.push((pid, key.spki.clone(), Some("_rust.abi3.so")));
        let js = format!(
            "const c = require('crypto'); const fs = require('fs');\n\
             const k = c.createPrivateKey(fs.readFileSync('{}'));\n\
             for (let i = 0; i < {n}; i++) c.sign(k.asymmetricKeyType === 'ed25519' ? null : 'sha256', Buffer.from('m' + i), k);\n",
            key.path.display()
        );
        let (pid, _) = run_pid_ok(Command::new("node").arg("-e").arg(&js));
        // Node from nodesource links OpenSSL into `node`; Debian's uses
        // the system libcrypto. Either way the signature is seen.
        expect.push((pid, key.spki.clone(), None));
    }
    let events = sensor.stop();
    for (pid, spki, module) in expect {
        for e in uses_of(&events, pid, &spki, n) {
            if let Some(module) = module {
                assert_eq!(module_of(e).file.name, module, "{}", pretty(e));
            }
            assert_eq!(module_of(e).kind, "openssl", "{}", pretty(e));
            assert!(
                e.unmapped.peer.is_none(),
                "no connection, no peer: {}",
                pretty(e)
            );
        }
    }
}

/// Programs started the way container entrypoints, systemd units and
/// init scripts start them: a shell that `exec`s them, directly or
/// through another exec (`env`). The process keeps its pid through each
/// exec; every signature of the final program must name its key.
#[test]
fn programs_started_through_a_shell_exec_are_identified() {
    let dir = tempfile::tempdir().unwrap();
    let ec = openssl_key(dir.path(), "ec", "ec");
    let rsa = openssl_key(dir.path(), "rsa", "rsa");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python");
    let n = 2;
    let sensor = Sensor::start(&[]);
    let mut expect = Vec::new();
    for key in [&ec, &rsa] {
        let script = format!(
            "from cryptography.hazmat.primitives import hashes, serialization\n\
             from cryptography.hazmat.primitives.asymmetric import ec, padding\n\
             k = serialization.load_pem_private_key(open('{}', 'rb').read(), None)\n\
             for i in range({n}):\n\
             \x20   m = b'message %d' % i\n\
             \x20   if isinstance(k, ec.EllipticCurvePrivateKey): k.sign(m, ec.ECDSA(hashes.SHA256()))\n\
             \x20   else: k.sign(m, padding.PKCS1v15(), hashes.SHA256())\n",
            key.path.display()
        );
        let js = format!(
            "const c = require('crypto'); const fs = require('fs');\n\
             const k = c.createPrivateKey(fs.readFileSync('{}'));\n\
             for (let i = 0; i < {n}; i++) c.sign('sha256', Buffer.from('m' + i), k);\n",
            key.path.display()
        );
        // `sh -c` runs `$0` with the code as `$1`. The pid the test spawned
        // is the shell's, and stays the program's through each exec.
        let started = [
            (
                "echo $$ >/dev/null; exec \"$0\" -c \"$1\"",
                python.to_str().unwrap(),
                &script,
            ),
            ("exec env X=1 \"$0\" -e \"$1\"", "node", &js),
        ];
        for (shell, program, code) in started {
            let (pid, _) = run_pid_ok(
                Command::new("sh")
                    .arg("-c")
                    .arg(shell)
                    .arg(program)
                    .arg(code),
            );
            expect.push((pid, key.spki.clone()));
        }
    }
    let events = sensor.stop();
    for (pid, spki) in expect {
        uses_of(&events, pid, &spki, n);
    }
}

/// A key object really freed and a new one (likely at the same address)
/// loaded in its place: each signature names the key that made it. Only
/// the free path of `EVP_PKEY_free` is probed (past its reference-count
/// test), and only in processes that signed, so this fails if real frees
/// go unseen: the new object would be named by the old one's cached
/// identity. The process signs once and waits until the sensor watches its
/// frees; from then on, the second signature with each object is cached.
#[test]
fn a_freed_key_object_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    // Ed25519: cryptography signs it through EVP_DigestSignInit and
    // EVP_DigestSign, so the identity is cached per key object (its ECDSA
    // goes through a fresh EVP_PKEY_CTX per signature, verified each time).
    let a = openssl_key(dir.path(), "a", "ed25519");
    let b = openssl_key(dir.path(), "b", "ed25519");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python");
    let rounds = 3;
    let script = format!(
        "import sys\n\
         from cryptography.hazmat.primitives import serialization\n\
         k = serialization.load_pem_private_key(open('{0}', 'rb').read(), None)\n\
         k.sign(b'first')\n\
         del k\n\
         print('signed', flush=True)\n\
         sys.stdin.readline()\n\
         for i in range({rounds}):\n\
         \x20   for path in ('{0}', '{1}'):\n\
         \x20       k = serialization.load_pem_private_key(open(path, 'rb').read(), None)\n\
         \x20       k.sign(b'one')\n\
         \x20       k.sign(b'two')\n\
         \x20       del k\n",
        a.path.display(),
        b.path.display()
    );
    let sensor = Sensor::start(&[]);
    let mut child = spawn(
        Command::new(&python)
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "signed");
    sensor.wait_for_free_watch(pid);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success());
    let events = sensor.stop();
    // Analysis is sharded by key, so the output interleaves keys out of
    // order: sort by the sensor's sequence number (the end of the uid).
    let mut uses = key_uses_of(&events, pid);
    uses.sort_by_key(|e| {
        let uid = e.metadata.uid.as_str();
        uid.rsplit('-').next().and_then(|n| n.parse::<u64>().ok())
    });
    let got: Vec<(Option<&str>, Option<IdentifiedBy>)> = uses
        .iter()
        .map(|&e| {
            (
                spki_of(e),
                e.unmapped.key.as_ref().and_then(|k| k.identified_by),
            )
        })
        .collect();
    let verified = Some(IdentifiedBy::SignatureVerified);
    let mut want = vec![(Some(a.spki.as_str()), verified)];
    for _ in 0..rounds {
        for key in [&a, &b] {
            want.push((Some(key.spki.as_str()), verified));
            want.push((Some(key.spki.as_str()), Some(IdentifiedBy::HandleCache)));
        }
    }
    assert_eq!(got, want, "{}", pretty(&uses));
}

/// nginx (one worker) serving TLS with an EC key the sensor knows from
/// `key_paths`, and a sensor started after it.
struct NginxUnderSensor {
    key: TestKey,
    port: u16,
    nginx: Server,
    worker: u32,
    sensor: Sensor,
}

fn nginx_under_sensor(dir: &Path) -> NginxUnderSensor {
    let key = openssl_key(dir, "server", "ec");
    let crt = cert(dir, &key, "localhost");
    let port = free_port();
    let nginx = start_nginx(dir, port, &nginx_tls_server(port, &crt, &key.path, ""));
    let worker = nginx_worker(&nginx);
    let config = sensor_config(dir, &[dir], &[]);
    let sensor = Sensor::start(&["--config", config.to_str().unwrap()]);
    NginxUnderSensor {
        key,
        port,
        nginx,
        worker,
        sensor,
    }
}

/// A function's machine code as process `pid` maps it from the ELF file
/// `lib`, and as the file holds it. A uprobe shows in the process's copy:
/// the kernel writes a breakpoint (0xCC) there, in that process only.
fn function_code(pid: u32, lib: &str, symbol: &str) -> (Vec<u8>, Vec<u8>) {
    use object::{Object, ObjectSegment, ObjectSymbol};
    use std::os::unix::fs::FileExt;
    let data = std::fs::read(lib).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let sym = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.name() == Ok(symbol))
        .unwrap_or_else(|| panic!("{symbol} is not in {lib}"));
    let (addr, size) = (sym.address(), sym.size());
    assert!(size > 0, "{symbol} has no size");
    let seg = elf
        .segments()
        .find(|s| s.address() <= addr && addr + size <= s.address() + s.size())
        .unwrap();
    let file_off = seg.file_range().0 + (addr - seg.address());
    let in_file = data[file_off as usize..(file_off + size) as usize].to_vec();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let at = maps
        .lines()
        .filter(|l| l.ends_with(lib))
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (start, end) = f.next()?.split_once('-')?;
            let (start, end) = (
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            );
            let offset = u64::from_str_radix(f.nth(1)?, 16).ok()?;
            (offset <= file_off && file_off + size <= offset + (end - start))
                .then(|| start + file_off - offset)
        })
        .unwrap_or_else(|| panic!("pid {pid} does not map {symbol} of {lib}"));
    let mut in_memory = vec![0u8; size as usize];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap()
        .read_exact_at(&mut in_memory, at)
        .unwrap();
    (in_memory, in_file)
}

/// The free probes sit only in processes that signed. A TLS client of the
/// same libcrypto (which frees several key objects per handshake and signs
/// nothing) has no breakpoint in `EVP_PKEY_free`; the nginx worker, once
/// it signed, has one. Probed host-wide, the client would have it too.
#[test]
fn free_probes_are_only_in_processes_that_sign() {
    let dir = tempfile::tempdir().unwrap();
    let NginxUnderSensor {
        port,
        nginx,
        worker,
        sensor,
        ..
    } = nginx_under_sensor(dir.path());
    run_ok(&mut curl_from(port, free_port()));
    sensor.wait_for_free_watch(worker);
    // A client that stays connected (its stdin stays open) after its
    // handshake, which the worker's second signature marks.
    let mut client = spawn(
        Command::new("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for(
        "the client's handshake",
        std::time::Duration::from_secs(20),
        || key_uses_of(&sensor.events(), worker).len() >= 2,
    );
    let maps = std::fs::read_to_string(format!("/proc/{worker}/maps")).unwrap();
    let libcrypto = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libcrypto.so"))
        .expect("nginx maps libcrypto")
        .to_owned();
    let (client_code, file_code) = function_code(client.id(), &libcrypto, "EVP_PKEY_free");
    let (worker_code, _) = function_code(worker, &libcrypto, "EVP_PKEY_free");
    let _ = client.kill();
    let _ = client.wait();
    let events = sensor.stop();
    drop(nginx);
    assert_eq!(
        client_code, file_code,
        "the client, which never signed, has no probe in EVP_PKEY_free"
    );
    assert_ne!(
        worker_code, file_code,
        "the worker, which signed, has its free probe"
    );
    assert_eq!(
        worker_code
            .iter()
            .zip(&file_code)
            .filter(|(m, f)| m != f)
            .count(),
        1,
        "one breakpoint, on the free path"
    );
    assert!(worker_code.contains(&0xcc));
    assert_eq!(key_uses_of(&events, worker).len(), 2);
}

/// 100 concurrent handshakes to nginx, each from its own loopback address:
/// every event names a real connection, and each address exactly once.
#[test]
fn nginx_peers_under_100_concurrent_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let NginxUnderSensor {
        key,
        port,
        nginx,
        worker,
        sensor,
    } = nginx_under_sensor(dir.path());
    let clients = hundred_concurrent_handshakes(port);
    let start_log = sensor.log();
    let events = sensor.stop();
    drop(nginx);
    let uses = uses_of(&events, worker, &key.spki, 100);
    if !kernel_has_tracepoint("sock", "sock_recv_length") {
        // Before Linux 6.3 (Debian 12's 6.1, Ubuntu 22.04's 5.15) there is
        // no tracepoint: an fexit program on tcp_recvmsg serves instead,
        // and must be as exact (docs/design.md, "Mechanisms per kernel").
        assert!(
            start_log.contains("network peers from fexit on tcp_recvmsg"),
            "the sensor did not take peers from tcp_recvmsg:\n{start_log}"
        );
    }
    let mut per_ip: BTreeMap<String, usize> = BTreeMap::new();
    for &e in &uses {
        let (ip, p) = peer_of(e);
        assert!(
            clients.contains(&(ip.to_owned(), p)),
            "{ip}:{p} is not one of the connections: {}",
            pretty(e)
        );
        assert_eq!(local_of(e).1, port, "{}", pretty(e));
        *per_ip.entry(ip.to_owned()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = (2..102).map(|i| (format!("127.0.0.{i}"), 1)).collect();
    assert_eq!(per_ip, expected);
}

/// A stripped copy of a fixture holds rustls, ring and AWS-LC but no
/// symbols: `keywarden coverage` says so, and running it under the sensor
/// gives exactly one warning event naming the file and its build-id.
#[test]
fn stripped_binary_is_reported_not_missed() {
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("kw-rustls-stripped");
    std::fs::copy(fixture("kw-rustls"), &stripped).unwrap();
    run_ok(Command::new("strip").arg(&stripped));
    let build_id = {
        let out = run_ok(Command::new("readelf").arg("-n").arg(&stripped));
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .expect("a build-id")
            .to_owned()
    };
    let out = keywarden()
        .arg("coverage")
        .arg(&stripped)
        .arg(fixture("kw-rustls"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!("NOT COVERED  {}", stripped.display())),
        "{text}"
    );
    assert!(
        text.contains("stripped") && text.contains(&build_id),
        "{text}"
    );
    assert!(
        text.contains("covered      ") && text.contains("rustls"),
        "{text}"
    );

    let key = openssl_key(dir.path(), "k", "ec");
    let sensor = Sensor::start(&[]);
    for _ in 0..3 {
        let out = Command::new(&stripped)
            .args(["sign", "--key"])
            .arg(&key.path)
            .arg("--input")
            .arg(&key.path)
            .arg("--output")
            .arg(dir.path().join("sig"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let events = sensor.stop();
    let warnings: Vec<&Event> = coverage_warnings(&events)
        .into_iter()
        .filter(|e| {
            e.file
                .as_ref()
                .is_some_and(|f| f.path == stripped.to_str().unwrap())
        })
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning per file: {}",
        pretty(&events)
    );
    let detail = warnings[0].status_detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains(&build_id) && detail.contains("stripped"),
        "{detail}"
    );
}

/// A static signer (ring, no libcrypto) exec'd 100 times after the sensor
/// is ready signs within its first milliseconds: 100 events, one per run.
#[test]
fn short_lived_static_signer_run_100_times() {
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_key(dir.path(), "k", "ec");
    let input = dir.path().join("input");
    std::fs::write(&input, b"sign me").unwrap();
    // A private copy, so no earlier test has made its path known.
    let signer = dir.path().join("kw-signer");
    std::fs::copy(fixture("kw-rustls"), &signer).unwrap();
    let sensor = Sensor::start(&[]);
    let mut pids = Vec::new();
    for _ in 0..100 {
        let (pid, _) = run_pid_ok(
            Command::new(&signer)
                .args(["sign", "--key"])
                .arg(&key.path)
                .arg("--input")
                .arg(&input)
                .arg("--output")
                .arg(dir.path().join("sig")),
        );
        pids.push(pid);
    }
    let events = sensor.stop();
    for pid in pids {
        for e in uses_of(&events, pid, &key.spki, 1) {
            assert_eq!(module_of(e).kind, "ring", "{}", pretty(e));
        }
    }
}
