//! nginx with two server names and two keys, chosen by SNI. nginx starts
//! before the sensor, so its keys were loaded before anything watched; the
//! sensor knows them only from `key_paths`, and must still name the right
//! key for every handshake.

mod support;

use std::process::Command;

use support::*;

#[test]
fn handshakes_are_attributed_to_the_key_chosen_by_sni() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let keys_dir = dir.join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let key_a = openssl_key(&keys_dir, "a", "ec");
    let key_b = openssl_key(&keys_dir, "b", "rsa");
    let crt_a = cert(&keys_dir, &key_a, "a.test");
    let crt_b = cert(&keys_dir, &key_b, "b.test");
    let port = free_port();
    let server = |name: &str, crt: &std::path::Path, key: &std::path::Path| {
        format!(
            "server {{ listen 127.0.0.1:{port} ssl; server_name {name}; ssl_certificate {}; ssl_certificate_key {}; \
             location / {{ return 200 \"{name}\\n\"; }} }}\n",
            crt.display(),
            key.display()
        )
    };
    let nginx = start_nginx(
        dir,
        port,
        &(server("a.test", &crt_a, &key_a.path) + &server("b.test", &crt_b, &key_b.path)),
    );
    let worker = nginx_worker(&nginx);

    let sensor_conf = sensor_config(dir, &[&keys_dir], &[]);
    let sensor = Sensor::start(&["--config", sensor_conf.to_str().unwrap()]);

    let (n_a, n_b) = (7, 5);
    for (name, n) in [("a.test", n_a), ("b.test", n_b)] {
        for _ in 0..n {
            let out = run_ok(
                Command::new("curl")
                    .args(["-sk", "--resolve", &format!("{name}:{port}:127.0.0.1")])
                    .arg(format!("https://{name}:{port}/")),
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
        }
    }
    let events = sensor.stop();
    drop(nginx);

    let uses = key_uses_of(&events, worker);
    let count = |spki: &str| uses.iter().filter(|e| spki_of(e) == Some(spki)).count();
    assert_eq!(
        count(&key_a.spki),
        n_a,
        "events for key A: {}",
        pretty(&uses)
    );
    assert_eq!(
        count(&key_b.spki),
        n_b,
        "events for key B: {}",
        pretty(&uses)
    );
    assert_eq!(
        uses.len(),
        n_a + n_b,
        "every worker signature is one of the two keys"
    );
    let nginx_sha = sha256_file("/usr/sbin/nginx".as_ref());
    for &e in &uses {
        assert_eq!(e.status, "Success", "{}", pretty(e));
        assert_eq!(exe_hash_of(e), Some(nginx_sha.as_str()), "{}", pretty(e));
        assert_eq!(e.actor.process.name, "nginx", "{}", pretty(e));
        assert!(
            key_of(e)
                .source_file
                .as_deref()
                .is_some_and(|f| f.starts_with(keys_dir.to_str().unwrap())),
            "{}",
            pretty(e)
        );
    }
    for &e in &uses {
        assert!(
            matches!(
                key_of(e).identified_by,
                Some(IdentifiedBy::SignatureVerified | IdentifiedBy::HandleCache)
            ),
            "{}",
            pretty(e)
        );
    }
    // curl made no signature (no client certificate).
    let curl: Vec<&Event> = key_uses(&events)
        .into_iter()
        .filter(|e| e.actor.process.name == "curl")
        .collect();
    assert!(curl.is_empty(), "{}", pretty(&curl));
}
