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
