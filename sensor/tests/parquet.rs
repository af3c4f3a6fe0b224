//! Parquet export (`--parquet DIR`), read back with DuckDB (PyPI `duckdb`,
//! pinned and installed into target/pyvenv by scripts/bootstrap.sh): the
//! same events as the NDJSON of the same run, nested columns a query can
//! reach into, only complete files after a SIGKILL, and a tree an
//! unprivileged user prepared refused.

mod support;

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use support::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Runs `query` in DuckDB (`?` is `dir`'s `ext` tree glob for `source`
/// substituted by the caller) and returns its rows as JSON arrays.
fn duckdb(query: &str) -> Vec<serde_json::Value> {
    let python = workspace().join("target/pyvenv/bin/python");
    let script = "import duckdb, json, sys\n\
                  rows = duckdb.sql(sys.argv[1]).fetchall()\n\
                  print(json.dumps([list(r) for r in rows], default=str))\n";
    let out = Command::new(&python)
        .args(["-c", script, query])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} (scripts/bootstrap.sh installs duckdb there): {e}",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "duckdb failed on {query}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The glob of one source's files.
fn files_of(lake: &Path, source: &str) -> String {
    format!("{}/ext/{source}/*/*/*/*.parquet", lake.display())
}

/// Every file under `dir`: (visible `.parquet` files, anything else but
/// the lock file).
fn tree(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut parquet, mut other) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            } else if name.ends_with(".parquet") && !name.starts_with('.') {
                parquet.push(p);
            } else if name != ".keywarden.lock" {
                other.push(p);
            }
        }
    }
    parquet.sort();
    (parquet, other)
}

/// A copy of the openssl binary named `name` (so its events carry that
/// process name).
fn signer(dir: &Path, name: &str) -> PathBuf {
    let bin = dir.join(name);
    std::fs::copy("/usr/bin/openssl", &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Where the Parquet rows put the key's SPKI: the same path as the NDJSON.
const SPKI_COLUMN: &str = "unmapped.key.spki_sha256";

#[test]
fn parquet_rows_match_the_ndjson_and_nested_fields_can_be_queried() {
    let work = tempfile::tempdir().unwrap();
    let lake = work.path().join("lake");
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"keywarden exports this").unwrap();
    let a = openssl_key(work.path(), "a", "ec");
    let b = openssl_key(work.path(), "b", "rsa");
    let pq_signer = signer(work.path(), "kwpqsigner");
    // A finding too, so a second source (Detection Finding) has rows.
    let rules = work.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - id: parquet-test-key\n    severity: low\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    actions: [alert]\n",
            a.spki
        ),
    )
    .unwrap();
    let sensor = Sensor::start(&[
        "--parquet",
        lake.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    let sig = work.path().join("sig");
    for _ in 0..3 {
        run_pid_ok(&mut openssl_sign(&pq_signer, &a.path, &msg, &sig));
    }
    run_pid_ok(&mut openssl_sign("openssl", &b.path, &msg, &sig));
    let events = sensor.stop();
    assert!(key_uses(&events).len() >= 4, "{}", pretty(&events));
    assert!(!findings(&events).is_empty());

    // The tree: only complete files, private.
    let (files, other) = tree(&lake);
    assert!(other.is_empty(), "left behind: {other:?}");
    assert!(!files.is_empty());
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        let rel = f.strip_prefix(&lake).unwrap().to_str().unwrap().to_owned();
        let parts: Vec<&str> = rel.split('/').collect();
        assert_eq!(parts[0], "ext", "{rel}");
        assert!(parts[1].len() <= 20, "{rel}");
        assert!(parts[2].starts_with("region="), "{rel}");
        assert_eq!(parts[3], "accountId=external", "{rel}");
        assert!(
            parts[4].starts_with("eventDay=") && parts[4].len() == 17,
            "{rel}"
        );
    }

    // Row counts per source equal the NDJSON's per class.
    let mut ndjson: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &events {
        *ndjson.entry(u64::from(e.class_uid)).or_default() += 1;
    }
    for (class_uid, source) in [
        (1005, "kw_module_activity"),
        (1001, "kw_file_activity"),
        (1008, "kw_event_log"),
        (2004, "kw_detection_finding"),
    ] {
        let want = ndjson.get(&class_uid).copied().unwrap_or(0);
        let have = if want == 0 {
            0
        } else {
            let rows = duckdb(&format!(
                "SELECT count(*), count(DISTINCT class_uid), min(class_uid) FROM read_parquet('{}')",
                files_of(&lake, source)
            ));
            assert_eq!(rows[0][1], 1, "{source}: one class per source");
            assert_eq!(rows[0][2], class_uid, "{source}");
            rows[0][0].as_u64().unwrap()
        };
        assert_eq!(have, want, "{source}: Parquet rows against NDJSON events");
    }
    let all = format!("{}/ext/*/*/*/*/*.parquet", lake.display());
    let total = duckdb(&format!("SELECT count(*) FROM read_parquet('{all}')"));
    assert_eq!(total[0][0].as_u64().unwrap(), events.len() as u64);

    // A nested query: which key did each process name sign with.
    let rows = duckdb(&format!(
        "SELECT DISTINCT {SPKI_COLUMN} FROM read_parquet('{}') \
         WHERE actor.process.name = 'kwpqsigner' AND metadata.event_code = 'key_use'",
        files_of(&lake, "kw_module_activity")
    ));
    assert_eq!(rows, vec![serde_json::json!([a.spki])]);
    let rows = duckdb(&format!(
        "SELECT count(*) FROM read_parquet('{}') \
         WHERE actor.process.name = 'openssl' AND {SPKI_COLUMN} = '{}'",
        files_of(&lake, "kw_module_activity"),
        b.spki
    ));
    assert_eq!(rows[0][0], 1);
    // Lists of structs: the executable's hash, as the NDJSON has it.
    let exe = sha256_file(&pq_signer);
    let in_ndjson = events
        .iter()
        .filter(|e| e.class_uid == 1005 && exe_hash_of(e) == Some(exe.as_str()))
        .count();
    assert!(in_ndjson >= 3, "{}", pretty(&events));
    let rows = duckdb(&format!(
        "SELECT count(*) FROM read_parquet('{}') \
         WHERE actor.process.file.hashes[1].value = '{exe}'",
        files_of(&lake, "kw_module_activity")
    ));
    assert_eq!(rows[0][0], in_ndjson);
    // A finding's evidence is JSON text a query can parse.
    let rows = duckdb(&format!(
        "SELECT json_extract_string(evidences[1].data, '$.actor.process.name'), \
         finding_info.analytic.uid FROM read_parquet('{}') LIMIT 1",
        files_of(&lake, "kw_detection_finding")
    ));
    assert_eq!(
        rows[0],
        serde_json::json!(["kwpqsigner", "parquet-test-key"])
    );
    // Records are ordered by time within each file.
    for f in &files {
        let rows = duckdb(&format!(
            "SELECT count(*) FROM (SELECT time, lag(time) OVER () AS prev FROM read_parquet('{}')) WHERE time < prev",
            f.display()
        ));
        assert_eq!(rows[0][0], 0, "{}", f.display());
    }
}

/// SIGKILL mid-run: only complete files are visible; the next start
/// finishes or removes what the killed one left (here, with a file it was
/// writing, cut short), and says so.
#[test]
fn a_sigkilled_sensor_leaves_only_complete_files_and_the_next_start_cleans_up() {
    let work = tempfile::tempdir().unwrap();
    let lake = work.path().join("lake");
    let msg = work.path().join("msg");
    std::fs::write(&msg, b"keywarden exports this").unwrap();
    let key = openssl_key(work.path(), "k", "ec");
    let config = sensor_config(
        work.path(),
        &[],
        &[("roll_seconds: 300", "roll_seconds: 1".to_owned())],
    );
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--parquet",
        lake.to_str().unwrap(),
    ];
    let mut sensor = Sensor::start(&args);
    let sig = work.path().join("sig");
    // Signatures across several roll periods, so files are closed while
    // the sensor runs.
    for _ in 0..6 {
        run_pid_ok(&mut openssl_sign("openssl", &key.path, &msg, &sig));
        std::thread::sleep(Duration::from_millis(400));
    }
    wait_for("a Parquet file written", Duration::from_secs(20), || {
        !tree(&lake).0.is_empty()
    });
    sensor.kill();
    let (files, other) = tree(&lake);
    // Whatever the moment of the kill: every visible file is whole.
    for f in &files {
        duckdb(&format!(
            "SELECT count(*) FROM read_parquet('{}')",
            f.display()
        ));
    }
    assert!(
        other.iter().all(|p| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with(".parquet.tmp")),
        "only temporary files besides the complete ones: {other:?}"
    );
    // What a kill during a close leaves: a temporary file cut short.
    let part = files[0].parent().unwrap();
    let bytes = std::fs::read(&files[0]).unwrap();
    let cut = part.join(".keywarden-killed-000001.parquet.tmp");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();

    let sensor = Sensor::start(&args);
    assert!(
        sensor.log().lines().any(|l| l
            .contains("temporary Parquet files of a sensor that was killed")
            && l.contains("discarded=")),
        "{}",
        sensor.log()
    );
    let (files, other) = tree(&lake);
    assert!(other.is_empty(), "left behind after the restart: {other:?}");
    let rows = duckdb(&format!(
        "SELECT count(*) FROM read_parquet('{}/ext/*/*/*/*/*.parquet')",
        lake.display()
    ));
    assert!(rows[0][0].as_u64().unwrap() >= 1, "{files:?}");
    sensor.stop();
}

/// An unprivileged user who can write where `DIR` goes cannot make root
/// write elsewhere: a symlink at `DIR`, or a `DIR` they made (with a
/// symlink inside where a source's directory goes), stops the sensor at
/// start with the path and the reason, and nothing is written through it.
#[test]
fn a_tree_an_unprivileged_user_prepared_is_refused() {
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let target = tempfile::tempdir().unwrap();
    let as_nobody = |args: &[&str]| {
        run_ok(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .args(args),
        )
    };
    // 1. A symlink where DIR goes.
    let link = shared.path().join("lake-link");
    as_nobody(&[
        "ln",
        "-s",
        target.path().to_str().unwrap(),
        link.to_str().unwrap(),
    ]);
    // 2. DIR made by nobody, with a symlink where a source directory goes.
    let theirs = shared.path().join("lake-theirs");
    as_nobody(&["mkdir", "-p", theirs.join("ext").to_str().unwrap()]);
    as_nobody(&[
        "ln",
        "-s",
        target.path().to_str().unwrap(),
        theirs.join("ext/kw_module_activity").to_str().unwrap(),
    ]);
    for (dir, why) in [(&link, "symlink"), (&theirs, "owned by uid 65534")] {
        let out = keywarden()
            .args(["run", "--output", "/dev/null", "--parquet"])
            .arg(dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(dir.to_str().unwrap()) && stderr.contains(why),
            "{why}: {stderr}"
        );
    }
    assert_eq!(
        std::fs::read_dir(target.path()).unwrap().count(),
        0,
        "nothing written through a symlink"
    );
}
