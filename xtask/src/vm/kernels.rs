//! Stock distribution kernels for `cargo xtask vm-test`: which package
//! each one is, and how it is fetched and unpacked under `target/kernels/`.
//!
//! apt runs with its own sources (`xtask/kernels.sources`, the only file
//! that names an archive), lists and cache, all under `target/kernels/apt`,
//! so the host's package sources and lists are never touched. A kernel is
//! downloaded once: its stamp file names the package and the image, and a
//! later run with the stamp present does no network access at all.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// A kernel of the matrix that is booted in a guest.
pub struct StockKernel {
    /// Its name on the command line (`--kernel debian-6.1`).
    pub name: &'static str,
    /// The mechanism the sensor must choose for opens on it (the smoke
    /// tests check, through `KEYWARDEN_EXPECT_OPEN_HOOK`): `fentry` where
    /// the kernel allows BTF trampolines, as Debian's do.
    pub open_hook: &'static str,
    /// Binary package names are `prefix` + a number + `suffix`; the highest
    /// number available is taken (flavours such as `-cloud` or `-rt` do
    /// not match, since their middle is not a number).
    prefix: &'static str,
    suffix: &'static str,
}

pub const STOCK: [StockKernel; 2] = [
    // Debian 12 (bookworm): the LTS kernel most distributions still ship.
    StockKernel {
        name: "debian-6.1",
        open_hook: "fentry",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    // Debian 13 (trixie).
    StockKernel {
        name: "debian-6.12",
        open_hook: "fentry",
        prefix: "linux-image-6.12.",
        suffix: "+deb13-amd64-unsigned",
    },
];

pub fn stock(name: &str) -> Option<&'static StockKernel> {
    STOCK.iter().find(|k| k.name == name)
}

/// An unpacked kernel, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub package: String,
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
}

impl StockKernel {
    /// The number in the middle of a package name of this kernel, if the
    /// name is one.
    fn number(&self, package: &str) -> Option<u64> {
        let middle = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        middle.parse().ok()
    }

    /// The newest package of this kernel among `apt-cache search` lines
    /// (`NAME - DESCRIPTION`).
    pub fn newest(&self, search_output: &str) -> Option<String> {
        search_output
            .lines()
            .filter_map(|l| l.split_once(" - ").map(|(n, _)| n.trim()))
            .filter_map(|n| Some((self.number(n)?, n)))
            .max_by_key(|(number, _)| *number)
            .map(|(_, n)| n.to_owned())
    }

    fn dir(&self, kernels: &Path) -> PathBuf {
        kernels.join(self.name)
    }

    /// The kernel, unpacked under `kernels` (`target/kernels`): from the
    /// cache when its stamp is there, else downloaded and unpacked now.
    pub fn ensure(&self, kernels: &Path, sources: &Path) -> Result<Unpacked> {
        let dir = self.dir(kernels);
        let stamp = dir.join("stamp");
        if let Ok(text) = std::fs::read_to_string(&stamp) {
            let k = parse_stamp(&text, &dir)
                .with_context(|| format!("{}: a bad stamp; delete {}", self.name, dir.display()))?;
            if k.vmlinuz.is_file() {
                return Ok(k);
            }
        }
        let apt = Apt::new(kernels, sources)?;
        apt.update()?;
        let search = apt.output(
            "apt-cache",
            &[
                "search",
                "--names-only",
                &format!("^{}", self.prefix.replace('.', "\\.")),
            ],
        )?;
        let Some(package) = self.newest(&search) else {
            bail!(
                "{}: no package {}N{} in the archive of xtask/kernels.sources",
                self.name,
                self.prefix,
                self.suffix
            );
        };
        let download = dir.join("download");
        let _ = std::fs::remove_dir_all(&download);
        std::fs::create_dir_all(&download)?;
        eprintln!("xtask: {}: downloading {package}", self.name);
        apt.run_in(&download, "apt-get", &["-qq", "download", &package])?;
        let deb = std::fs::read_dir(&download)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
        // Unpacked beside its final place, renamed when complete: an
        // interrupted run leaves no half kernel behind the stamp.
        let partial = dir.join("root.partial");
        let root = dir.join("root");
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_dir_all(&root);
        super::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        let (release, modules_base) = modules_of(&partial)?;
        // virtme-ng reads modules.dep to load the modules it needs (9p,
        // virtio); a .deb does not ship it.
        super::run(
            Command::new("depmod")
                .arg("-b")
                .arg(&modules_base)
                .arg(&release),
        )?;
        std::fs::rename(&partial, &root)?;
        std::fs::remove_dir_all(&download)?;
        let k = Unpacked {
            package,
            vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
            release,
        };
        if !k.vmlinuz.is_file() {
            bail!("{} has no {}", k.package, k.vmlinuz.display());
        }
        let tmp = dir.join("stamp.tmp");
        std::fs::write(&tmp, stamp_text(&k))?;
        std::fs::rename(&tmp, &stamp)?;
        Ok(k)
    }
}

/// The kernel release of an unpacked package and the directory `depmod -b`
/// takes: Debian 12 packages keep modules in `lib/modules`, Debian 13 in
/// `usr/lib/modules`.
fn modules_of(root: &Path) -> Result<(String, PathBuf)> {
    for base in [root.to_owned(), root.join("usr")] {
        let Ok(entries) = std::fs::read_dir(base.join("lib/modules")) else {
            continue;
        };
        if let Some(e) = entries.flatten().next() {
            return Ok((e.file_name().to_string_lossy().into_owned(), base));
        }
    }
    bail!("{}: no lib/modules/RELEASE in the package", root.display())
}

fn stamp_text(k: &Unpacked) -> String {
    format!("package {}\nrelease {}\n", k.package, k.release)
}

fn parse_stamp(text: &str, dir: &Path) -> Result<Unpacked> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_owned)
            .with_context(|| format!("no `{name}` line"))
    };
    let release = field("release")?;
    Ok(Unpacked {
        package: field("package")?,
        vmlinuz: dir.join(format!("root/boot/vmlinuz-{release}")),
        release,
    })
}

/// Downloads `packages` through the private apt (`Apt`) and unpacks them
/// all into `dest`, which is replaced only once every one is unpacked.
/// For packages of another Debian release than the host's (Go 1.24, from
/// trixie, for the Go tests).
pub fn unpack_packages(
    kernels: &Path,
    sources: &Path,
    packages: &[&str],
    dest: &Path,
) -> Result<()> {
    let apt = Apt::new(kernels, sources)?;
    apt.update()?;
    let beside = |suffix: &str| PathBuf::from(format!("{}.{suffix}", dest.display()));
    let (partial, download) = (beside("partial"), beside("download"));
    for d in [&partial, &download] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d)?;
    }
    let mut args = vec!["-qq", "download"];
    args.extend_from_slice(packages);
    apt.run_in(&download, "apt-get", &args)?;
    for deb in std::fs::read_dir(&download)?.flatten().map(|e| e.path()) {
        super::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    }
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&partial, dest)?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}

/// apt with a private configuration: sources from `xtask/kernels.sources`,
/// lists and cache under `target/kernels/apt`, and no dpkg status (nothing
/// is installed, only downloaded).
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn new(kernels: &Path, sources: &Path) -> Result<Self> {
        let base = kernels.join("apt");
        let parts = base.join("sources.list.d");
        for d in [
            parts.clone(),
            base.join("lists/partial"),
            base.join("cache/archives/partial"),
        ] {
            std::fs::create_dir_all(&d)?;
        }
        std::fs::copy(sources, parts.join("kernels.sources"))
            .with_context(|| format!("copying {}", sources.display()))?;
        let p = |p: PathBuf| p.display().to_string();
        let options = [
            ("Dir::Etc::SourceList", "/dev/null".to_owned()),
            ("Dir::Etc::SourceParts", p(parts)),
            ("Dir::State::Lists", p(base.join("lists"))),
            ("Dir::Cache", p(base.join("cache"))),
            ("Dir::State::status", "/dev/null".to_owned()),
            // Files land in target/, which apt's unprivileged download
            // user may not be able to write.
            ("APT::Sandbox::User", "root".to_owned()),
        ]
        .into_iter()
        .flat_map(|(k, v)| ["-o".to_owned(), format!("{k}={v}")])
        .collect();
        Ok(Self { options })
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(&self.options).args(args);
        c
    }

    fn update(&self) -> Result<()> {
        super::run(&mut self.command("apt-get", &["-qq", "update"]))
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut c = self.command(program, args);
        let out = c.output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{c:?} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs in `dir` (`apt-get download` writes there). Not through
    /// `run`, which runs everything in the workspace root.
    fn run_in(&self, dir: &Path, program: &str, args: &[&str]) -> Result<()> {
        let mut cmd = self.command(program, args);
        cmd.current_dir(dir);
        eprintln!("xtask: {cmd:?}");
        let status = cmd.status().with_context(|| format!("running {program}"))?;
        if !status.success() {
            bail!("{cmd:?} failed with {status}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: &str = "\
linux-image-6.1.0-47-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-47-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-50-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-50-rt-amd64-unsigned - Linux 6.1 for 64-bit PCs, PREEMPT_RT
linux-image-6.1.0-9-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.12.107+deb13-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb13-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb13-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.120+bpo-amd64-unsigned - Linux 6.12 for 64-bit PCs
";

    #[test]
    fn the_newest_plain_flavour_is_chosen_by_number_not_by_text() {
        let k61 = stock("debian-6.1").unwrap();
        assert_eq!(
            k61.newest(SEARCH).as_deref(),
            Some("linux-image-6.1.0-50-amd64-unsigned")
        );
        let k612 = stock("debian-6.12").unwrap();
        assert_eq!(
            k612.newest(SEARCH).as_deref(),
            Some("linux-image-6.12.117+deb13-amd64-unsigned")
        );
        assert_eq!(k61.newest("nothing - here\n"), None);
    }

    #[test]
    fn a_stamp_round_trips_and_a_broken_one_is_an_error() {
        let dir = Path::new("/k/debian-6.12");
        let k = Unpacked {
            package: "linux-image-6.12.117+deb13-amd64-unsigned".into(),
            release: "6.12.117+deb13-amd64".into(),
            vmlinuz: dir.join("root/boot/vmlinuz-6.12.117+deb13-amd64"),
        };
        assert_eq!(parse_stamp(&stamp_text(&k), dir).unwrap(), k);
        let err = parse_stamp("package x\n", dir).unwrap_err();
        assert!(err.to_string().contains("release"), "{err}");
    }

    #[test]
    fn modules_are_found_in_lib_or_usr_lib() {
        let d = std::env::temp_dir().join(format!("xtask-mods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("a/lib/modules/6.1.0-50-amd64")).unwrap();
        std::fs::create_dir_all(d.join("b/usr/lib/modules/6.12.117+deb13-amd64")).unwrap();
        std::fs::create_dir_all(d.join("c/boot")).unwrap();
        assert_eq!(
            modules_of(&d.join("a")).unwrap(),
            ("6.1.0-50-amd64".to_owned(), d.join("a"))
        );
        assert_eq!(
            modules_of(&d.join("b")).unwrap(),
            ("6.12.117+deb13-amd64".to_owned(), d.join("b/usr"))
        );
        assert!(modules_of(&d.join("c")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
