//! Key and certificate files are named by untrusted processes (an `open`
//! of `*.pem`, `*.key`, ...), and the sensor parses what it reads there:
//! PEM bundles, DER, PKCS#8, SEC1 and traditional (PKCS#1) RSA private
//! keys, SubjectPublicKeyInfo public keys and X.509 certificates. Whatever
//! the bytes, parsing must give public keys or an error naming the file,
//! never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The sensor is a binary crate: its key parser is compiled here from its
// own source. `material` reaches `safe_open` as `super::safe_open`, so both
// sit at the crate root, as siblings.
#[allow(dead_code)]
#[path = "../../src/keys/safe_open.rs"]
mod safe_open;

#[allow(dead_code)]
#[path = "../../src/keys/material.rs"]
mod material;

fuzz_target!(|data: &[u8]| {
    match material::key_file_in("fuzz.pem", data) {
        Ok(file) => {
            // No key is only right for a file of encrypted private keys.
            assert!(!file.keys.is_empty() || file.has_private_key);
            for (i, key) in file.keys.iter().enumerate() {
                assert_eq!(key.spki_sha256.len(), 64, "{key:?}");
                assert!(!key.algorithm.is_empty(), "{key:?}");
                // Each key once, however often the bundle repeats it.
                assert!(
                    file.keys[..i]
                        .iter()
                        .all(|other| other.spki_sha256 != key.spki_sha256),
                    "{key:?} twice"
                );
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("fuzz.pem: "), "{message}");
        }
    }
});
