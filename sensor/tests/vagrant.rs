//! vagrant/: the kernel matrix for users with a hypervisor, checked
//! offline with `vagrant validate` (Debian's `vagrant`, installed by
//! scripts/bootstrap.sh). No machine is booted: this host has no usable
//! hypervisor, and runs the same matrix through qemu instead
//! (`cargo xtask vm-test`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn vagrant_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vagrant")
}

/// `vagrant validate` in `dir`, with its state (`.vagrant`) kept out of
/// the repository.
fn validate(dir: &Path) -> Output {
    let state = tempfile::tempdir().unwrap();
    match Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(dir)
        .env("VAGRANT_DOTFILE_PATH", state.path().join(".vagrant"))
        // No check for newer Vagrant or box versions: offline.
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("VAGRANT_BOX_UPDATE_CHECK_DISABLE", "1")
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("vagrant is missing ({e}): scripts/bootstrap.sh installs it")
        }
        Err(e) => panic!("running vagrant: {e}"),
    }
}

fn described(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The machines of the matrix, with the distribution each one is.
const MATRIX: [(&str, &str); 5] = [
    ("debian12", "Debian 12"),
    ("debian13", "Debian 13"),
    ("ubuntu2204", "Ubuntu 22.04"),
    ("ubuntu2404", "Ubuntu 24.04"),
    ("alma9", "RHEL-like"),
];

#[test]
fn the_vagrantfile_validates_and_defines_the_whole_matrix() {
    let out = validate(&vagrant_dir());
    let text = described(&out);
    assert!(out.status.success(), "vagrant validate:\n{text}");
    assert!(
        text.contains("Vagrantfile validated successfully"),
        "{text}"
    );
    let file = std::fs::read_to_string(vagrant_dir().join("Vagrantfile")).unwrap();
    for (name, distribution) in MATRIX {
        // validate names every machine it checked.
        assert!(
            text.contains(&format!("==> {name}:")),
            "vagrant validate did not check {name}:\n{text}"
        );
        let line = file
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("\"{name}\" =>")))
            .unwrap_or_else(|| panic!("vagrant/Vagrantfile has no machine {name}"));
        assert!(
            line.contains(distribution),
            "{name} is not {distribution}: {line}"
        );
    }
}

/// validate is no rubber stamp: a Vagrantfile whose provisioning script is
/// missing, or that has a Ruby error, is refused.
#[test]
fn vagrant_validate_refuses_a_broken_vagrantfile() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        vagrant_dir().join("Vagrantfile"),
        dir.path().join("Vagrantfile"),
    )
    .unwrap();
    let out = validate(dir.path());
    assert!(!out.status.success(), "{}", described(&out));
    assert!(
        described(&out).contains("provision.sh"),
        "{}",
        described(&out)
    );

    std::fs::copy(
        vagrant_dir().join("provision.sh"),
        dir.path().join("provision.sh"),
    )
    .unwrap();
    let good = validate(dir.path());
    assert!(good.status.success(), "{}", described(&good));
    let broken = std::fs::read_to_string(dir.path().join("Vagrantfile"))
        .unwrap()
        .replace(
            "m.vm.box = box",
            "m.vm.box = box\n      m.vm.no_such_setting = 1",
        );
    std::fs::write(dir.path().join("Vagrantfile"), broken).unwrap();
    let out = validate(dir.path());
    assert!(!out.status.success(), "{}", described(&out));
    assert!(
        described(&out).contains("no_such_setting"),
        "{}",
        described(&out)
    );
}

/// The provisioning script is valid shell and runs the test command.
#[test]
fn the_provisioning_script_parses_and_runs_the_test_command() {
    let script = vagrant_dir().join("provision.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(out.status.success(), "bash -n: {}", described(&out));
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(
        text.contains("./x.sh test"),
        "provision.sh does not run ./x.sh test"
    );
    assert!(text.contains("cargo xtask vm-test --kernel host"));
}
