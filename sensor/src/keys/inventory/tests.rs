//! The model's unit tests (`Inventory`'s bounds, learnt and used
//! updates), and the helpers `file` and `print` tests share: apart from
//! `mod.rs` so that it stays under the project's 600 lines.

use super::*;

pub(super) const DAY: i64 = 86_400_000;

pub(super) fn key(n: u32) -> (String, KeyRef<'static>) {
    // Distinct in their first 16 digits, as the table shows them.
    let spki = format!("{n:016x}{}", "0".repeat(48));
    let leaked: &'static str = Box::leak(spki.clone().into_boxed_str());
    (
        spki,
        KeyRef {
            spki_sha256: leaked,
            algorithm: "ecdsa-p256",
            bits: 256,
        },
    )
}

pub(super) fn file(p: &str) -> Source {
    Source::File(p.into())
}

pub(super) fn by(
    k: KeyRef<'static>,
    process: &'static str,
    exe: &'static str,
    t: i64,
) -> Use<'static> {
    Use {
        key: k,
        process,
        exe: Some(exe),
        exe_sha256: Some("ab"),
        time_ms: t,
    }
}

pub(super) fn cert(spki: &str, subject: &str) -> Certificate {
    Certificate {
        spki_sha256: spki.into(),
        subject: subject.into(),
        issuer: "CN=Test CA".into(),
        serial: "01".into(),
        sans: vec!["DNS:www.example.test".into()],
        sans_omitted: 0,
        not_before_ms: 0,
        not_after_ms: 30 * DAY,
    }
}

/// Files, listeners, recovery and certificates from every source
/// join one entry per key, each once; uses count per process.
#[test]
fn sources_and_uses_merge_into_one_entry_per_key() {
    let mut inv = Inventory::default();
    let (spki, k) = key(1);
    inv.learnt(k, &file("/etc/ssl/a.key"), 1000);
    inv.learnt(k, &file("/etc/ssl/a.key"), 2000);
    inv.learnt(k, &file("/etc/ssl/a.crt"), 2000);
    let listener = Source::Listener {
        endpoint: "127.0.0.1:443".into(),
        server_name: Some("www.example.test".into()),
    };
    inv.learnt(k, &listener, 3000);
    inv.learnt(k, &Source::Recovered, 3000);
    let c = cert(&spki, "CN=www.example.test");
    inv.add_certificates(std::slice::from_ref(&c), &file("/etc/ssl/a.crt"));
    inv.add_certificates(std::slice::from_ref(&c), &listener);
    inv.add_certificates(&[c], &file("/etc/ssl/a.crt"));
    // A certificate of a key the inventory does not have is not kept.
    inv.add_certificates(&[cert(&key(2).0, "CN=other")], &file("/x.crt"));
    assert_eq!(inv.len(), 1);
    assert_eq!(inv.unused_count(), 1);

    let e = inv.get(&spki).unwrap();
    assert!(e.unused());
    assert_eq!(e.first_seen_ms, 1000);
    assert_eq!(e.files, ["/etc/ssl/a.key", "/etc/ssl/a.crt"]);
    assert_eq!(
        e.listeners,
        ["127.0.0.1:443 (server name www.example.test)"]
    );
    assert!(e.recovered);
    assert_eq!(e.certificates.len(), 1);
    assert_eq!(
        e.certificates[0].found_in,
        [
            "/etc/ssl/a.crt",
            "127.0.0.1:443 (server name www.example.test)"
        ]
    );

    inv.used(&by(k, "nginx", "/usr/sbin/nginx", 5000));
    inv.used(&by(k, "nginx", "/usr/sbin/nginx", 4000));
    // Unhashed: counted for the entry with the hash.
    inv.used(&Use {
        exe_sha256: None,
        ..by(k, "nginx", "/usr/sbin/nginx", 6000)
    });
    inv.used(&by(k, "openssl", "/usr/bin/openssl", 7000));
    let e = inv.get(&spki).unwrap();
    assert!(!e.unused());
    assert_eq!(inv.unused_count(), 0);
    assert_eq!(e.uses, 4);
    assert_eq!((e.first_use_ms, e.last_use_ms), (Some(4000), Some(7000)));
    assert_eq!(e.processes.len(), 2);
    let nginx = &e.processes[0];
    assert_eq!(
        (
            nginx.name.as_str(),
            nginx.uses,
            nginx.first_use_ms,
            nginx.last_use_ms
        ),
        ("nginx", 3, 4000, 6000)
    );
    assert_eq!(nginx.exe_sha256.as_deref(), Some("ab"));

    // A key first seen signing (no file gave it) gets an entry too.
    let (other, k2) = key(3);
    inv.used(&by(k2, "signer", "/usr/bin/signer", 9000));
    let e = inv.get(&other).unwrap();
    assert_eq!((e.uses, e.first_seen_ms), (1, 9000));
    assert!(e.files.is_empty());
}

/// A Key Use event is recorded only when it names its key and the
/// call signed.
#[test]
fn only_named_successful_signatures_are_uses() {
    use keywarden_analyzer::event::{self, Fingerprint, IdentifiedBy, KeyIdentity};
    let (spki, _) = key(1);
    let mut u = KeyUse {
        time_ms: 5,
        seq: 0,
        who: event::Who {
            process: event::Process {
                name: "openssl".into(),
                file: Some(event::File {
                    path: "/usr/bin/openssl".into(),
                    name: "openssl".into(),
                    type_id: 1,
                    hashes: vec![Fingerprint::sha256("cd")],
                }),
                ..Default::default()
            },
            ..Default::default()
        },
        library: event::File::default(),
        library_kind: String::new(),
        function: String::new(),
        success: true,
        key: KeyIdentity {
            status: KeyStatus::Identified,
            spki_sha256: Some(spki.clone()),
            fingerprint: None,
            algorithm: Some("ed25519".into()),
            bits: Some(256),
            source_file: None,
            identified_by: Some(IdentifiedBy::SignatureVerified),
            unknown_reason: None,
        },
        signature: event::Signature {
            length: 64,
            digest: None,
        },
        peer: None,
        local: None,
    };
    let got = Use::of(&u).unwrap();
    assert_eq!(got.key.spki_sha256, spki);
    assert_eq!(got.key.algorithm, "ed25519");
    assert_eq!(
        (got.process, got.exe, got.exe_sha256),
        ("openssl", Some("/usr/bin/openssl"), Some("cd"))
    );
    u.success = false;
    assert!(Use::of(&u).is_none());
    u.success = true;
    u.key = KeyIdentity::unknown("no key");
    assert!(Use::of(&u).is_none());
}

/// Past each bound, items are counted, not kept, and keys merely
/// learnt cannot take the room of keys that sign.
#[test]
fn every_list_is_bounded_and_counts_the_rest() {
    let mut inv = Inventory::with_limits(Limits {
        keys: 4,
        unused: 2,
        files: 2,
        listeners: 1,
        certificates: 1,
        places: 1,
        processes: 2,
        bytes: 1 << 20,
    });
    let (spki, k) = key(1);
    for i in 0..5 {
        inv.learnt(k, &file(&format!("/f{i}")), 0);
    }
    inv.learnt(k, &file("/f0"), 0);
    for i in 0..3 {
        let l = Source::Listener {
            endpoint: format!("127.0.0.1:{i}"),
            server_name: None,
        };
        inv.learnt(k, &l, 0);
    }
    inv.add_certificates(&[cert(&spki, "CN=a"), cert(&spki, "CN=b")], &file("/c1"));
    inv.add_certificates(&[cert(&spki, "CN=a")], &file("/c2"));
    for p in ["a", "b", "c", "c"] {
        inv.used(&by(k, p, "/bin/x", 1));
    }
    let e = inv.get(&spki).unwrap();
    assert_eq!(
        (e.files.len(), e.files_omitted),
        (2, 3),
        "a listed file is not counted"
    );
    assert_eq!((e.listeners.len(), e.listeners_omitted), (1, 2));
    assert_eq!((e.certificates.len(), e.certificates_omitted), (1, 1));
    assert_eq!(
        (
            e.certificates[0].found_in.len(),
            e.certificates[0].found_in_omitted
        ),
        (1, 1)
    );
    assert_eq!((e.processes.len(), e.processes_omitted, e.uses), (2, 2, 4));

    // Key 1 is used; two unused keys fill the room for unused ones.
    inv.learnt(key(2).1, &file("/k2"), 0);
    inv.learnt(key(3).1, &file("/k3"), 0);
    inv.learnt(key(4).1, &file("/k4"), 0);
    assert_eq!((inv.len(), inv.keys_omitted()), (3, 1));
    // A key that signs still gets in, up to the bound on keys.
    inv.used(&by(key(5).1, "s", "/bin/s", 1));
    inv.used(&by(key(6).1, "s", "/bin/s", 1));
    assert_eq!((inv.len(), inv.keys_omitted()), (4, 2));
    assert!(inv.get(&key(5).0).is_some() && inv.get(&key(6).0).is_none());

    // A long text is cut, and the byte budget bounds the rest.
    let mut small = Inventory::with_limits(Limits {
        bytes: ENTRY_COST + 64 + 10 + ITEM_COST + MAX_TEXT + 8,
        ..Limits::default()
    });
    let long = format!("/{}", "d".repeat(2 * MAX_TEXT));
    small.learnt(k, &file(&long), 0);
    small.learnt(k, &file(&long), 0);
    let e = small.get(&spki).unwrap();
    assert_eq!(e.files.len(), 1);
    assert!(e.files[0].len() <= MAX_TEXT + '…'.len_utf8());
    assert_eq!(e.files_omitted, 0, "the same long path is the same file");
    small.learnt(k, &file("/another"), 0);
    assert_eq!(small.get(&spki).unwrap().files_omitted, 1, "budget spent");
    small.learnt(key(2).1, &file("/k2"), 0);
    assert_eq!((small.len(), small.keys_omitted()), (1, 1));
}
