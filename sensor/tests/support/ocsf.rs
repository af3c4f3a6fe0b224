//! The sensor's NDJSON checked against the official OCSF schema, with the
//! validator the analyzer's tests use (`scripts/ocsf_validate.py`, the
//! pinned PyPI `ocsf-json-schema` and `jsonschema` in target/pyvenv).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Validates every line of the NDJSON file `events` (and every finding's
/// evidence) against OCSF `version`; panics with the validator's report
/// when one is invalid. Returns its summary line.
pub fn assert_valid_ocsf(events: &Path, version: &str) -> String {
    let python = workspace().join("target/pyvenv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: scripts/bootstrap.sh creates it",
        python.display()
    );
    let out = Command::new(&python)
        .arg(workspace().join("scripts/ocsf_validate.py"))
        .arg(version)
        .arg(events)
        .output()
        .unwrap_or_else(|e| panic!("running the OCSF validator: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} is not valid OCSF {version} ({}):\n{report}",
        events.display(),
        out.status
    );
    report
}
