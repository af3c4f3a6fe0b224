//! The deployment files (`deploy/`, docs/deploy.md), checked offline:
//!
//! * the Kubernetes manifests validate against the API schemas of a pinned
//!   Kubernetes version, with `kubernetes-validate` (pinned too;
//!   scripts/bootstrap.sh pins both and installs it into target/pyvenv);
//! * the ConfigMap carries the repository's rules unchanged, and a
//!   configuration that is the embedded default with the paths the sensor
//!   reads itself moved under /host, which the sensor accepts; the
//!   DaemonSet mounts it where that configuration says;
//! * the systemd unit passes `systemd-analyze verify` without a warning.
//!
//! None of these loads a probe.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde::Deserialize;
use serde_json::{Value, json};
use support::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(workspace().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `NAME="value"` in scripts/bootstrap.sh, which pins the tools.
fn bootstrap_pin(name: &str) -> String {
    let prefix = format!("{name}=\"");
    read("scripts/bootstrap.sh")
        .lines()
        .find_map(|l| {
            l.strip_prefix(prefix.as_str())?
                .strip_suffix('"')
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("scripts/bootstrap.sh sets no {name}"))
}

fn described(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn kubernetes_manifests_validate_against_the_pinned_kubernetes_version() {
    let tool = workspace().join("target/pyvenv/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "{} is missing: scripts/bootstrap.sh installs it (./x.sh test runs bootstrap first)",
        tool.display()
    );
    let pinned = bootstrap_pin("KUBERNETES_VALIDATE_VERSION");
    let installed = run_ok(Command::new(&tool).arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&installed.stdout).trim(),
        pinned,
        "target/pyvenv has another kubernetes-validate than scripts/bootstrap.sh pins: run it again"
    );
    let kubernetes = bootstrap_pin("KUBERNETES_VERSION");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(workspace().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 4, "{manifests:?}");
    let out = Command::new(&tool)
        .args(["--kubernetes-version", kubernetes.as_str(), "--strict"])
        .args(&manifests)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    assert!(
        out.status.success(),
        "kubernetes-validate refused the manifests (Kubernetes {kubernetes}):\n{}",
        described(&out)
    );
    // A kind it has no schema for passes with a warning: every file must
    // have a resource that passed, and nothing but passes be said.
    let stdout = String::from_utf8_lossy(&out.stdout);
    for m in &manifests {
        let name = m.display().to_string();
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("INFO ") && l.contains(&name) && l.contains(" passed ")),
            "no resource of {name} passed:\n{}",
            described(&out)
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout
            .lines()
            .chain(stderr.lines())
            .all(|l| l.starts_with("INFO ")),
        "kubernetes-validate warned:\n{}",
        described(&out)
    );
}

#[derive(Deserialize)]
struct ConfigMap {
    kind: String,
    data: BTreeMap<String, String>,
}

fn configmap() -> ConfigMap {
    let cm: ConfigMap = serde_saphyr::from_str(&read("deploy/kubernetes/configmap.yaml"))
        .unwrap_or_else(|e| panic!("deploy/kubernetes/configmap.yaml: {e}"));
    assert_eq!(cm.kind, "ConfigMap");
    cm
}

/// The repository's rule files (`rules/*.yaml`): name -> contents.
fn repository_rules() -> BTreeMap<String, String> {
    let mut rules = BTreeMap::new();
    for e in std::fs::read_dir(workspace().join("rules")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            rules.insert(name, std::fs::read_to_string(&p).unwrap());
        }
    }
    assert!(!rules.is_empty(), "no rules/*.yaml");
    rules
}

#[test]
fn the_configmap_carries_the_repository_rules_unchanged() {
    let cm = configmap();
    let rules = repository_rules();
    for (name, text) in &rules {
        assert!(
            cm.data.get(name) == Some(text),
            "deploy/kubernetes/configmap.yaml: {name} is not rules/{name} as the repository has it"
        );
    }
    let expected: BTreeSet<&str> = rules
        .keys()
        .map(String::as_str)
        .chain(["config.yaml"])
        .collect();
    let got: BTreeSet<&str> = cm.data.keys().map(String::as_str).collect();
    assert_eq!(got, expected, "deploy/kubernetes/configmap.yaml: its keys");
}

/// Keys of the configuration naming paths the sensor reads itself at
/// start, which the DaemonSet's configuration has under /host (the node's
/// root as the pod mounts it).
const UNDER_HOST: &[&str] = &[
    "key_paths",
    "key_locations",
    "library_dirs",
    "pods_log_root",
];

fn under_host(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(format!("/host{s}")),
        Value::Array(items) => Value::Array(items.iter().map(under_host).collect()),
        other => panic!("not a path or a list of paths: {other}"),
    }
}

/// So the ConfigMap follows the embedded default when that changes.
#[test]
fn the_configmap_configuration_is_the_default_with_host_paths_under_host() {
    let cm = configmap();
    let ours: Value = serde_saphyr::from_str(&cm.data["config.yaml"])
        .unwrap_or_else(|e| panic!("config.yaml in deploy/kubernetes/configmap.yaml: {e}"));
    let default = String::from_utf8(run_ok(keywarden().arg("config")).stdout).unwrap();
    let default: Value = serde_saphyr::from_str(&default).unwrap();
    let (Value::Object(ours), Value::Object(default)) = (ours, default) else {
        panic!("a configuration is a mapping");
    };
    assert_eq!(
        ours.keys().collect::<BTreeSet<_>>(),
        default.keys().collect::<BTreeSet<_>>(),
        "config.yaml in deploy/kubernetes/configmap.yaml and the embedded default set different keys"
    );
    for (key, value) in &default {
        let expected = match key.as_str() {
            k if UNDER_HOST.contains(&k) => under_host(value),
            // Where the DaemonSet mounts the ConfigMap's rules.
            "rules" => json!(["/etc/keywarden/rules"]),
            // In a pod, a rule's rotation can only plan (the comment in
            // configmap.yaml).
            "remediation" => {
                let mut v = value.clone();
                v["mode"] = json!("dry_run");
                v
            }
            _ => value.clone(),
        };
        assert_eq!(
            ours[key], expected,
            "config.yaml in deploy/kubernetes/configmap.yaml: {key}"
        );
    }
}

/// `keywarden analyze` reads a configuration and its rules as `run` does,
/// without root or probes.
#[test]
fn the_sensor_accepts_the_configmap_configuration_and_rules() {
    let cm = configmap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    for (name, text) in &cm.data {
        if name != "config.yaml" {
            std::fs::write(rules.join(name), text).unwrap();
        }
    }
    // The rules where the DaemonSet mounts them, here.
    let original = &cm.data["config.yaml"];
    let config = original.replace("/etc/keywarden/rules", rules.to_str().unwrap());
    assert_ne!(
        &config, original,
        "config.yaml names no /etc/keywarden/rules"
    );
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, config).unwrap();
    run_ok(
        keywarden()
            .args(["analyze", "--input", "/dev/null", "--config"])
            .arg(&file),
    );
    run_ok(keywarden().args(["rules", "check"]).arg(&rules));
}

#[derive(Deserialize)]
struct DaemonSet {
    spec: DaemonSetSpec,
}

#[derive(Deserialize)]
struct DaemonSetSpec {
    template: PodTemplate,
}

#[derive(Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(Deserialize)]
struct PodSpec {
    containers: Vec<PodContainer>,
    volumes: Vec<Volume>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodContainer {
    args: Vec<String>,
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: String,
    config_map: Option<ConfigMapVolume>,
}

#[derive(Deserialize)]
struct ConfigMapVolume {
    name: String,
    items: Vec<KeyToPath>,
}

#[derive(Deserialize)]
struct KeyToPath {
    key: String,
    path: String,
}

/// Every ConfigMap entry reaches the pod: the configuration at
/// /etc/keywarden/config.yaml, which the sensor is started with, and each
/// rule file in /etc/keywarden/rules, which the configuration names.
#[test]
fn the_daemonset_mounts_the_configmap_where_the_configuration_says() {
    let ds: DaemonSet = serde_saphyr::from_str(&read("deploy/kubernetes/daemonset.yaml"))
        .unwrap_or_else(|e| panic!("deploy/kubernetes/daemonset.yaml: {e}"));
    let pod = ds.spec.template.spec;
    let volume = pod
        .volumes
        .iter()
        .find(|v| v.config_map.as_ref().is_some_and(|c| c.name == "keywarden"))
        .expect("a volume of the keywarden ConfigMap");
    let items: BTreeMap<String, String> = volume
        .config_map
        .as_ref()
        .expect("a ConfigMap volume")
        .items
        .iter()
        .map(|i| (i.key.clone(), i.path.clone()))
        .collect();
    let mut expected: BTreeMap<String, String> = repository_rules()
        .into_keys()
        .map(|name| {
            let path = format!("rules/{name}");
            (name, path)
        })
        .collect();
    expected.insert("config.yaml".into(), "config.yaml".into());
    assert_eq!(items, expected, "the ConfigMap volume's items");
    let [container] = pod.containers.as_slice() else {
        panic!("the pod has one container");
    };
    let mount = container
        .volume_mounts
        .iter()
        .find(|m| m.name == volume.name)
        .expect("the ConfigMap volume is mounted");
    assert_eq!(mount.mount_path, "/etc/keywarden");
    assert!(
        container
            .args
            .windows(2)
            .any(|w| w == ["--config", "/etc/keywarden/config.yaml"]),
        "{:?}",
        container.args
    );
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = read("deploy/systemd/keywarden.service");
    let installed = "/usr/local/bin/keywarden";
    assert!(
        unit.contains(&format!("\nExecStart={installed} run")),
        "deploy/systemd/keywarden.service: ExecStart is not {installed} run"
    );
    // `verify` checks that ExecStart's program exists: the binary under
    // test stands in for the installed one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keywarden.service");
    std::fs::write(
        &file,
        unit.replace(installed, env!("CARGO_BIN_EXE_keywarden")),
    )
    .unwrap();
    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&file)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "systemd-analyze is missing ({e}): scripts/bootstrap.sh installs the systemd package"
        ),
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    // It reports unknown keys and values it cannot parse, and exits 0 all
    // the same: anything it says fails the test.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify deploy/systemd/keywarden.service:\n{}",
        described(&out)
    );
}
