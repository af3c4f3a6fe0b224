//! OpenSSH signs with libcrypto's low-level calls (`ECDSA_do_sign`,
//! `RSA_sign`), not EVP. Each signature must still give exactly one event
//! naming its key: `RSA_sign` reaches `RSA_private_encrypt` inside, and
//! that nested call is no second signature.

mod support;

use std::process::Command;

use support::*;

#[test]
fn ssh_keygen_signatures_name_their_keys() {
    let work = tempfile::tempdir().unwrap();
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"keywarden signs this").unwrap();
    let keys = [
        ("ECDSA_do_sign", openssl_key(work.path(), "ec", "ec")),
        ("RSA_sign", openssl_key(work.path(), "rsa", "rsa")),
    ];
    // `ssh-keygen -Y sign` wants the public key beside the private one.
    for (_, key) in &keys {
        let out = run_ok(
            Command::new("ssh-keygen")
                .arg("-y")
                .arg("-f")
                .arg(&key.path),
        );
        std::fs::write(key.path.with_extension("pem.pub"), &out.stdout).unwrap();
    }
    let sensor = Sensor::start(&[]);
    let mut signed = Vec::new();
    for (function, key) in &keys {
        let _ = std::fs::remove_file(msg.with_extension("sig"));
        let (pid, _) = run_pid_ok(
            Command::new("ssh-keygen")
                .args(["-Y", "sign", "-n", "file", "-f"])
                .arg(&key.path)
                .arg(&msg),
        );
        signed.push((pid, *function, key));
    }
    let events = sensor.stop();
    for (pid, function, key) in signed {
        let uses = key_uses_of(&events, pid);
        assert_eq!(uses.len(), 1, "{function}: {}", pretty(&uses));
        let e = uses[0];
        assert_eq!(module_of(e).function_name, function, "{}", pretty(e));
        assert_eq!(spki_of(e), Some(key.spki.as_str()), "{}", pretty(e));
    }
}

/// sshd proves its host key with a signature on every connection. Each
/// proof must name the host key the client asked for, and carry the
/// client's address: the signature is made by sshd's privileged monitor,
/// which holds the client's connection but does not read from it, so the
/// peer comes from that process's only TCP connection.
#[test]
fn sshd_host_key_proofs_name_the_key_and_the_client() {
    let work = tempfile::tempdir().unwrap();
    let ecdsa = openssl_key(work.path(), "host_ecdsa", "ec");
    let rsa = openssl_key(work.path(), "host_rsa", "rsa");
    // Named `.key`, which the default configuration watches as key files.
    let mut host_keys = Vec::new();
    for key in [&ecdsa, &rsa] {
        let path = key.path.with_extension("key");
        std::fs::rename(&key.path, &path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        host_keys.push(path);
    }
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = free_port();
    let config = work.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nHostKey {}\n\
             PidFile {}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n",
            host_keys[0].display(),
            host_keys[1].display(),
            work.path().join("sshd.pid").display(),
        ),
    )
    .unwrap();
    let sensor = Sensor::start(&[]);
    let _sshd = start_server(
        Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&config),
        port,
    );
    let connect = |algorithm: &str| {
        // Authentication fails (no key is offered); the host key has
        // proved itself by then.
        let out = Command::new("ssh")
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                &format!("HostKeyAlgorithms={algorithm}"),
                "-p",
                &port.to_string(),
                "nobody@127.0.0.1",
                "true",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let ecdsa_log = connect("ecdsa-sha2-nistp256");
    let rsa_log = connect("rsa-sha2-512");
    let events = sensor.stop();
    let proofs: Vec<&Event> = key_uses(&events)
        .into_iter()
        .filter(|e| e.actor.process.name == "sshd")
        .collect();
    for (key, log) in [(&ecdsa, &ecdsa_log), (&rsa, &rsa_log)] {
        let mine: Vec<&&Event> = proofs
            .iter()
            .filter(|e| spki_of(e) == Some(key.spki.as_str()))
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "one proof by {}; ssh said {log}; proofs: {}",
            key.spki,
            pretty(&proofs)
        );
        let e = mine[0];
        assert_eq!(peer_of(e).0, "127.0.0.1", "{}", pretty(e));
        assert_eq!(local_of(e), ("127.0.0.1", port), "{}", pretty(e));
    }
    assert_eq!(proofs.len(), 2, "{}", pretty(&proofs));
}
