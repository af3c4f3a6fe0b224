//! The plan of a rotation, from the key inventory and the live host: which
//! files hold the key and its certificates, which service uses it and how
//! to reload it, and which listening addresses and server names present it
//! (those are what verification checks afterwards).
//!
//! The inventory (`keys/inventory/`) is read from the file the running
//! sensor saves: it names the files and the executables that signed with
//! the key. What it cannot know (which processes run now, what they
//! listen on) is looked up here: processes are found by executable, their
//! listeners in /proc, and each listener is asked by handshake, for every
//! server name of the key's certificates, which certificate it presents.
//! A service whose listeners do not present the key is not a user of it.
//!
//! Over 600 lines with its tests; finding the processes and listeners
//! (`discover`) is what to move out next.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    net::SocketAddr,
    os::unix::{ffi::OsStringExt, fs::MetadataExt},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::RotationConfig,
    keys::{
        inventory::KeyEntry,
        material::{self, KeyFile},
        tls_probe,
    },
};

/// A file the rotation rewrites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFile {
    pub path: PathBuf,
    pub role: Role,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The private key alone.
    Key,
    /// The leaf certificate alone (a chain, if any, is in another file
    /// that the rotation leaves alone).
    Certificate,
    /// The leaf followed by its chain: the new leaf is written followed by
    /// the new issuer's chain.
    FullChain,
}

/// How a service is told to load its files again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Reload {
    /// `EXE -t ARGS` (the master's own -c/-p/-g), then SIGHUP to the master.
    Nginx { exe: PathBuf, args: Vec<String> },
    /// `EXE -t ARGS` (the master's own -f/-d/-C/-c/-D), then SIGUSR1
    /// (graceful) to the master.
    Apache { exe: PathBuf, args: Vec<String> },
    /// A command from the configuration (`rotation.reload_commands`).
    Command { command: Vec<String> },
    /// `systemctl reload UNIT`: the master runs in that system unit's
    /// cgroup and the unit can reload (`CanReload=yes`).
    Systemd { unit: String },
}

/// One service (a master and its workers) that presents the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub master: u32,
    pub exe: PathBuf,
    pub pids: Vec<u32>,
    pub reload: Reload,
}

/// A listening address and server name (none: no SNI) to verify.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    pub addr: SocketAddr,
    pub server_name: Option<String>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.server_name {
            Some(n) => write!(f, "{} (server name {n})", self.addr),
            None => write!(f, "{} (no server name)", self.addr),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub spki_sha256: String,
    pub algorithm: String,
    pub bits: u32,
    pub files: Vec<PlannedFile>,
    /// The certificate being replaced (PEM): its subject and names are
    /// copied, and `revoke` revokes it later.
    pub old_certificate_pem: String,
    pub services: Vec<Service>,
    /// Where the key is presented now: each must present the new key.
    pub targets: Vec<Target>,
    /// Where the same services present other keys (by SPKI): each must
    /// still present them afterwards.
    pub others: Vec<(Target, String)>,
    /// Processes that signed with the key and no longer run.
    pub gone: Vec<String>,
}

/// Why there is no plan.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("key {0} is not in the inventory (`keywarden keys`)")]
    Unknown(String),
    #[error("{0} keys in the inventory start with {1}: give more of the SPKI")]
    Ambiguous(usize, String),
    #[error("{0}")]
    Why(String),
}

fn why(s: impl Into<String>) -> Refused {
    Refused::Why(s.into())
}

/// Finds the inventory entry of `key` (its SPKI SHA-256, or an unambiguous
/// prefix of at least 8 hex digits).
pub fn entry<'a>(
    keys: impl Iterator<Item = &'a KeyEntry>,
    key: &str,
) -> Result<&'a KeyEntry, Refused> {
    let key = key.to_ascii_lowercase();
    if key.len() < 8 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(why(format!(
            "--key {key:?}: expected the SPKI SHA-256 in hex (at least 8 digits)"
        )));
    }
    let found: Vec<_> = keys.filter(|k| k.spki_sha256.starts_with(&key)).collect();
    match found.len() {
        0 => Err(Refused::Unknown(key)),
        1 => Ok(found[0]),
        n => Err(Refused::Ambiguous(n, key)),
    }
}

/// Reads a key or certificate file without following a symbolic link at
/// its path: the rotation writes there as root.
fn read_file(path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), Refused> {
    let meta =
        std::fs::symlink_metadata(path).map_err(|e| why(format!("{}: {e}", path.display())))?;
    if meta.file_type().is_symlink() {
        return Err(why(format!(
            "{}: a symbolic link (another tool, such as certbot, manages these files); keywarden only replaces regular files",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(why(format!("{}: not a regular file", path.display())));
    }
    if meta.len() > material::MAX_KEY_FILE {
        return Err(why(format!("{}: too large for a key file", path.display())));
    }
    let bytes = std::fs::read(path).map_err(|e| why(format!("{}: {e}", path.display())))?;
    Ok((bytes, meta))
}

/// Certificates (DER) in a PEM file, in order.
pub fn pem_certificates(bytes: &[u8]) -> Vec<Vec<u8>> {
    pem::parse_many(bytes)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

/// The files of `entry` that the rotation rewrites, and the current leaf
/// certificate (DER).
fn files(entry: &KeyEntry) -> Result<(Vec<PlannedFile>, Vec<u8>), Refused> {
    let mut out = Vec::new();
    let mut leaf: Option<Vec<u8>> = None;
    let spki = &entry.spki_sha256;
    let mut seen = BTreeSet::new();
    for f in &entry.files {
        let path = PathBuf::from(f);
        if !path.is_absolute() || !seen.insert(path.clone()) {
            continue;
        }
        let (bytes, meta) = match read_file(&path) {
            Ok(r) => r,
            // A file the inventory saw that is gone now is nothing to
            // replace; any other problem stops the plan.
            Err(_) if !path.exists() && std::fs::symlink_metadata(&path).is_err() => continue,
            Err(e) => return Err(e),
        };
        let parsed: KeyFile = match material::key_file_in(f, &bytes) {
            Ok(k) => k,
            Err(e) => return Err(why(e.to_string())),
        };
        if !parsed.keys.iter().any(|k| &k.spki_sha256 == spki) {
            // Rewritten since the inventory saw it.
            continue;
        }
        let certs = pem_certificates(&bytes);
        let first_is_ours = certs
            .first()
            .is_some_and(|c| material::certificate_key(c).is_ok_and(|k| &k.spki_sha256 == spki));
        let role = match (parsed.has_private_key, certs.len(), first_is_ours) {
            (true, 0, _) => Role::Key,
            (true, _, _) => {
                return Err(why(format!(
                    "{f}: holds the private key and certificates in one file; keywarden does not rotate that layout yet"
                )));
            }
            (false, 1, true) => Role::Certificate,
            (false, n, true) if n > 1 => Role::FullChain,
            // A chain or bundle that merely contains the certificate, or a
            // public key file: not the service's certificate.
            _ => continue,
        };
        if role != Role::Key && leaf.is_none() {
            leaf = certs.into_iter().next();
        }
        out.push(PlannedFile {
            path,
            role,
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        });
    }
    if !out.iter().any(|f| f.role == Role::Key) {
        return Err(why(format!(
            "the inventory names no private key file of {spki} that still holds it (files: {:?})",
            entry.files
        )));
    }
    let Some(leaf) = leaf else {
        return Err(why(format!(
            "the inventory names no certificate file of {spki} whose first certificate is for it"
        )));
    };
    Ok((out, leaf))
}

/// The executable of a process, its parent and its command line.
struct Proc {
    pid: u32,
    ppid: u32,
    exe: PathBuf,
    cmdline: Vec<String>,
}

fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let ppid = crate::enrich::process::parent_of(Path::new("/proc"), pid)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()?
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some(Proc {
            pid,
            ppid,
            exe,
            cmdline,
        })
    })
    .collect()
}

/// The arguments of a master's command line that name its configuration,
/// for `-t` and reload: those flags and their values, nothing else.
fn config_args(cmdline: &[String], flags: &[&str]) -> Vec<String> {
    // nginx rewrites its title into one argument: `nginx: master process
    // /usr/sbin/nginx -c /etc/nginx/nginx.conf`, its arguments joined by
    // spaces (so a path with a space in it cannot be told apart).
    let split: Vec<String>;
    let cmdline = match cmdline
        .first()
        .and_then(|a| a.strip_prefix("nginx: master process "))
    {
        Some(rest) => {
            split = rest.split(' ').map(str::to_owned).collect();
            &split[..]
        }
        None => cmdline,
    };
    let mut out = Vec::new();
    let mut it = cmdline.iter().skip(1);
    while let Some(a) = it.next() {
        if let Some(f) = flags.iter().find(|f| a.as_str() == **f) {
            if let Some(v) = it.next() {
                out.push((*f).to_owned());
                out.push(v.clone());
            }
        } else if let Some(f) = flags
            .iter()
            .find(|f| a.starts_with(**f) && a.len() > f.len())
        {
            // `-cFILE`
            out.push((*f).to_owned());
            out.push(a[f.len()..].to_owned());
        }
    }
    out
}

/// The system unit whose cgroup a process is in, from its
/// `/proc/PID/cgroup` (v2: `0::/system.slice/nginx.service`): the
/// innermost `.service` of the path. None for a process in no service, or
/// in a user's service manager (`user@UID.service`), which `systemctl`
/// as root does not reload; nor for a name `systemctl` could take for an
/// option.
pub fn systemd_unit(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| p.starts_with("user@")) {
        return None;
    }
    let unit = parts.iter().rev().find(|p| p.ends_with(".service"))?;
    let safe = unit
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@\\".contains(&b));
    (safe && !unit.starts_with('-')).then(|| (*unit).to_owned())
}

/// Whether systemd says `unit` can reload, or why it cannot tell.
fn systemd_can_reload(unit: &str) -> Result<(), String> {
    let out = std::process::Command::new("systemctl")
        .args(["show", "--property=CanReload", "--value", "--"])
        .arg(unit)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            format!("it runs in the systemd unit {unit}, and systemctl cannot start: {e}")
        })?;
    let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match (out.status.success(), value.as_str()) {
        (true, "yes") => Ok(()),
        (true, _) => Err(format!(
            "it runs in the systemd unit {unit}, which has no ExecReload (CanReload={value})"
        )),
        (false, _) => Err(format!(
            "it runs in the systemd unit {unit}, and systemctl cannot tell whether it reloads: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// How keywarden reloads a master running `exe` with `cmdline`, in the
/// cgroup `cgroup` (`/proc/PID/cgroup`): a command configured for the
/// executable first, then nginx and apache by signal (under systemd too:
/// their units reload the same way), then the master's systemd unit,
/// when it can reload.
fn reload_for(
    exe: &Path,
    cmdline: &[String],
    cgroup: &str,
    cfg: &RotationConfig,
) -> Result<Reload, String> {
    if let Some(c) = cfg
        .reload_commands
        .iter()
        .find(|c| Path::new(&c.exe) == exe)
    {
        if c.command.is_empty() {
            return Err(format!(
                "reload_commands: the command for {} is empty",
                c.exe
            ));
        }
        return Ok(Reload::Command {
            command: c.command.clone(),
        });
    }
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name {
        "nginx" => Ok(Reload::Nginx {
            exe: exe.to_owned(),
            args: config_args(cmdline, &["-c", "-p", "-g"]),
        }),
        "apache2" | "httpd" => Ok(Reload::Apache {
            exe: exe.to_owned(),
            args: config_args(cmdline, &["-f", "-d", "-C", "-c", "-D"]),
        }),
        _ => match systemd_unit(cgroup) {
            Some(unit) => {
                systemd_can_reload(&unit)
                    .map_err(|e| format!("{e}: add it to rotation.reload_commands"))?;
                Ok(Reload::Systemd { unit })
            }
            None => Err(format!(
                "keywarden cannot reload {} (it reloads nginx, apache and systemd units that can reload, and this runs in none): add it to rotation.reload_commands",
                exe.display()
            )),
        },
    }
}

/// Server names to try on a listener: the DNS names of the certificate
/// (wildcards cannot be sent), and those the inventory saw on listeners.
/// At most this many server names are tried per listener (each is a
/// handshake).
const MAX_NAMES: usize = 64;

/// Server names to try on a listener: the DNS names of the certificate
/// (wildcards cannot be sent), those of the certificates of keys the same
/// programs use (so that the other names a service answers to are checked
/// too), and those the inventory saw on listeners.
fn server_names(leaf: &[u8], related: &[&KeyEntry]) -> Vec<Option<String>> {
    let usable = |n: &str| !n.contains('*') && n.parse::<std::net::IpAddr>().is_err();
    let mut names: BTreeSet<String> = material::certificate_names(leaf)
        .into_iter()
        .filter(|n| usable(n))
        .collect();
    let others = related.iter().flat_map(|e| {
        e.certificates
            .iter()
            .flat_map(|c| c.sans.iter().filter_map(|s| s.strip_prefix("DNS:")))
    });
    for n in others {
        if names.len() >= MAX_NAMES {
            break;
        }
        if usable(n) {
            names.insert(n.to_owned());
        }
    }
    let inventory_listeners = related.iter().flat_map(|e| e.listeners.iter());
    for l in inventory_listeners {
        if let Some(n) = l
            .split_once("(server name ")
            .and_then(|(_, r)| r.strip_suffix(')'))
        {
            names.insert(n.to_owned());
        }
    }
    std::iter::once(None)
        .chain(names.into_iter().map(Some))
        .collect()
}

/// Handshakes `presented` makes at once: a service with a hundred names
/// is asked a hundred times, at plan and at every round of verification.
const PARALLEL_HANDSHAKES: usize = 8;

/// What each (address, server name) of `targets` presents: SPKI SHA-256
/// of the leaf.
pub fn presented(
    targets: &[Target],
    timeout: Duration,
) -> BTreeMap<Target, Result<String, String>> {
    let asked = super::in_parallel(targets, PARALLEL_HANDSHAKES, |t| {
        tls_probe::fetch_certificate(t.addr, t.server_name.as_deref(), timeout)
            .map_err(|e| e.to_string())
            .and_then(|leaf| {
                material::certificate_key(&leaf)
                    .map(|k| k.spki_sha256)
                    .map_err(|e| format!("leaf certificate: {e}"))
            })
    });
    targets.iter().cloned().zip(asked).collect()
}

/// What listeners presented, remembered while the keys of one bulk run
/// are planned: a hundred keys of one service each ask the same names of
/// the same listeners, and nothing is rotated meanwhile. A new survey
/// for every set of plans that must see the host as it is now.
#[derive(Default)]
pub struct Survey(std::sync::Mutex<BTreeMap<Target, Result<String, String>>>);

impl Survey {
    fn presented(
        &self,
        targets: &[Target],
        timeout: Duration,
    ) -> BTreeMap<Target, Result<String, String>> {
        let missing: Vec<Target> = {
            let known = self.0.lock().expect("survey lock");
            targets
                .iter()
                .filter(|t| !known.contains_key(*t))
                .cloned()
                .collect()
        };
        let fresh = presented(&missing, timeout);
        let mut known = self.0.lock().expect("survey lock");
        known.extend(fresh);
        targets
            .iter()
            .filter_map(|t| Some((t.clone(), known.get(t)?.clone())))
            .collect()
    }
}

/// A running service (a master and its workers) that presents a key.
pub struct Found {
    pub master: u32,
    pub exe: PathBuf,
    cmdline: Vec<String>,
    pub pids: Vec<u32>,
    /// Where it presents the key.
    pub ours: Vec<Target>,
    /// Where it presents other keys, and which.
    pub others: Vec<(Target, String)>,
}

/// The running services that present `entry`'s key on a TLS listener,
/// found by the executables that signed with it; `leaf` is a certificate
/// of the key (its names are the server names tried), `all` the whole
/// inventory. Also returns the processes that signed with it and no
/// longer run. Handshakes already in `survey` are not made again.
pub fn discover<'a>(
    entry: &'a KeyEntry,
    all: impl Iterator<Item = &'a KeyEntry>,
    leaf: &[u8],
    cfg: &RotationConfig,
    survey: &Survey,
) -> (Vec<Found>, Vec<String>) {
    let exes: BTreeSet<PathBuf> = entry
        .processes
        .iter()
        .filter_map(|p| p.exe.as_deref().map(PathBuf::from))
        .collect();
    let procs = processes();
    let by_pid: BTreeMap<u32, &Proc> = procs.iter().map(|p| (p.pid, p)).collect();
    // Group the running processes of those executables by master: the
    // furthest ancestor running the same executable.
    let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in procs.iter().filter(|p| exes.contains(&p.exe)) {
        let mut top = p;
        while let Some(parent) = by_pid.get(&top.ppid).filter(|q| q.exe == p.exe) {
            top = parent;
        }
        groups.entry(top.pid).or_default().push(p.pid);
    }
    let running: BTreeSet<&Path> = groups
        .keys()
        .filter_map(|m| by_pid.get(m).map(|p| p.exe.as_path()))
        .collect();
    let gone = entry
        .processes
        .iter()
        .filter(|p| {
            !p.exe
                .as_deref()
                .is_some_and(|e| running.contains(Path::new(e)))
        })
        .map(|p| {
            format!(
                "{} ({})",
                p.name,
                p.exe.as_deref().unwrap_or("executable unknown")
            )
        })
        .collect();
    let related: Vec<&KeyEntry> = std::iter::once(entry)
        .chain(all.filter(|e| {
            e.spki_sha256 != entry.spki_sha256
                && e.processes.iter().any(|p| {
                    p.exe
                        .as_deref()
                        .is_some_and(|x| exes.contains(Path::new(x)))
                })
        }))
        .collect();
    let names = server_names(leaf, &related);
    let timeout = Duration::from_millis(cfg.verify_timeout_ms.clamp(500, 5000));
    let mut found = Vec::new();
    for (master, pids) in groups {
        let m = by_pid[&master];
        let mut addrs = BTreeSet::new();
        for pid in &pids {
            for l in tls_probe::listeners(*pid).unwrap_or_default() {
                // A wildcard listener is asked on loopback; one address
                // of the two an IPv6 wildcard may serve is enough.
                if let Some(a) = tls_probe::connect_addrs(l.local).into_iter().next() {
                    addrs.insert(a);
                }
            }
        }
        let candidates: Vec<Target> = addrs
            .iter()
            .flat_map(|a| {
                names.iter().map(|n| Target {
                    addr: *a,
                    server_name: n.clone(),
                })
            })
            .collect();
        let seen = survey.presented(&candidates, timeout);
        let ours: Vec<Target> = seen
            .iter()
            .filter(|(_, r)| r.as_deref() == Ok(entry.spki_sha256.as_str()))
            .map(|(t, _)| t.clone())
            .collect();
        if ours.is_empty() {
            // Signed with it perhaps, but presents it nowhere: another
            // instance of the same program.
            continue;
        }
        let others = seen
            .into_iter()
            .filter_map(|(t, r)| r.ok().filter(|s| *s != entry.spki_sha256).map(|s| (t, s)))
            .collect();
        found.push(Found {
            master,
            exe: m.exe.clone(),
            cmdline: m.cmdline.clone(),
            pids,
            ours,
            others,
        });
    }
    (found, gone)
}

/// Makes the plan for rotating `entry`, or says why there is none. `all`
/// is the whole inventory; `survey`, what listeners presented to the
/// plans made just before.
pub fn make<'a>(
    entry: &'a KeyEntry,
    all: impl Iterator<Item = &'a KeyEntry>,
    cfg: &RotationConfig,
    survey: &Survey,
) -> Result<Plan, Refused> {
    let (files, leaf) = files(entry)?;
    let (found, gone) = discover(entry, all, &leaf, cfg, survey);
    let mut services = Vec::new();
    let mut targets = Vec::new();
    let mut others = Vec::new();
    for f in found {
        let cgroup =
            std::fs::read_to_string(format!("/proc/{}/cgroup", f.master)).unwrap_or_default();
        let reload = reload_for(&f.exe, &f.cmdline, &cgroup, cfg).map_err(|e| {
            why(format!(
                "{} (pid {}) presents the key, and {e}",
                f.exe.display(),
                f.master
            ))
        })?;
        targets.extend(f.ours);
        others.extend(f.others);
        services.push(Service {
            master: f.master,
            exe: f.exe,
            pids: f.pids,
            reload,
        });
    }
    if services.is_empty() {
        return Err(why(format!(
            "no running process presents key {} on a TLS listener, so a rotation could not be verified (processes that signed with it: {})",
            entry.spki_sha256,
            entry
                .processes
                .iter()
                .map(|p| format!("{} ({})", p.name, p.exe.as_deref().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(Plan {
        spki_sha256: entry.spki_sha256.clone(),
        algorithm: entry.algorithm.clone(),
        bits: entry.bits,
        files,
        old_certificate_pem: pem::encode(&pem::Pem::new("CERTIFICATE", leaf)),
        services,
        targets,
        others,
        gone,
    })
}

/// The environment of a running process (`/proc/PID/environ`), for the
/// configuration test of its master: Debian's apache configuration names
/// `${APACHE_RUN_DIR}` and the like, which only its environment defines.
pub fn environment(pid: u32) -> Vec<(OsString, OsString)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let i = kv.iter().position(|&b| b == b'=')?;
            Some((
                OsString::from_vec(kv[..i].to_vec()),
                OsString::from_vec(kv[i + 1..].to_vec()),
            ))
        })
        .collect()
}

impl Plan {
    /// The plan, for a person, before anything is done.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "rotation plan for key {} ({}, {} bits)",
            self.spki_sha256, self.algorithm, self.bits
        );
        let cert = material::certificate_details(
            &pem::parse(&self.old_certificate_pem)
                .map(|p| p.into_contents())
                .unwrap_or_default(),
        );
        if let Some(c) = cert {
            let _ = writeln!(
                s,
                "  certificate: subject {}; issuer {}; serial {}; names {}",
                c.subject,
                c.issuer,
                c.serial,
                c.sans.join(", ")
            );
        }
        for f in &self.files {
            let _ = writeln!(
                s,
                "  file: {} ({:?}, owner {}:{}, mode {:o})",
                f.path.display(),
                f.role,
                f.uid,
                f.gid,
                f.mode
            );
        }
        for sv in &self.services {
            let how = match &sv.reload {
                Reload::Nginx { exe, args } => {
                    format!(
                        "{} -t {} then SIGHUP to the master",
                        exe.display(),
                        args.join(" ")
                    )
                }
                Reload::Apache { exe, args } => format!(
                    "{} -t {} then SIGUSR1 (graceful) to the master",
                    exe.display(),
                    args.join(" ")
                ),
                Reload::Command { command } => format!("run {}", command.join(" ")),
                Reload::Systemd { unit } => format!("systemctl reload {unit}"),
            };
            let _ = writeln!(
                s,
                "  service: {} master pid {}, processes {:?}; reload: {how}",
                sv.exe.display(),
                sv.master,
                sv.pids
            );
        }
        for t in &self.targets {
            let _ = writeln!(s, "  verify: {t} presents the new key");
        }
        for (t, k) in &self.others {
            let _ = writeln!(s, "  verify: {t} still presents key {k}");
        }
        for g in &self.gone {
            let _ = writeln!(s, "  not running (signed with it before): {g}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_args_keep_only_the_configuration_flags() {
        let cmd: Vec<String> = [
            "nginx",
            "-c",
            "/x/n.conf",
            "-g",
            "daemon off;",
            "-q",
            "-p/pre",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            config_args(&cmd, &["-c", "-p", "-g"]),
            ["-c", "/x/n.conf", "-g", "daemon off;", "-p", "/pre"]
        );
        let title = ["nginx: master process /usr/sbin/nginx -c /x/n.conf".to_owned()];
        assert_eq!(
            config_args(&title, &["-c", "-p", "-g"]),
            ["-c", "/x/n.conf"]
        );
    }

    #[test]
    fn nginx_apache_a_configured_command_or_a_unit_reload() {
        let cfg = RotationConfig::default();
        // nginx is signalled itself, in a unit or not.
        let in_unit = "0::/system.slice/nginx.service\n";
        assert!(matches!(
            reload_for(Path::new("/usr/sbin/nginx"), &[], in_unit, &cfg),
            Ok(Reload::Nginx { .. })
        ));
        assert!(matches!(
            reload_for(Path::new("/usr/sbin/apache2"), &[], "0::/\n", &cfg),
            Ok(Reload::Apache { .. })
        ));
        let err = reload_for(Path::new("/usr/bin/openssl"), &[], "0::/\n", &cfg).unwrap_err();
        assert!(err.contains("reload_commands"), "{err}");
        assert!(err.contains("runs in none"), "{err}");
        let mut cfg = cfg;
        cfg.reload_commands.push(crate::config::ReloadCommand {
            exe: "/usr/bin/openssl".into(),
            command: vec!["/bin/true".into()],
        });
        assert!(matches!(
            reload_for(Path::new("/usr/bin/openssl"), &[], in_unit, &cfg),
            Ok(Reload::Command { .. })
        ));
    }

    #[test]
    fn the_systemd_unit_is_the_innermost_system_service_of_the_cgroup() {
        let unit = |c: &str| systemd_unit(c);
        assert_eq!(
            unit("0::/system.slice/myserver.service\n").as_deref(),
            Some("myserver.service")
        );
        assert_eq!(
            unit("0::/system.slice/app@blue.service/worker\n").as_deref(),
            Some("app@blue.service")
        );
        assert_eq!(
            unit("0::/custom.slice/outer.service/inner.service\n").as_deref(),
            Some("inner.service")
        );
        // cgroup v1 lines are ignored; v2's is found among them.
        assert_eq!(
            unit("1:name=systemd:/system.slice/x.service\n0::/system.slice/y.service\n").as_deref(),
            Some("y.service")
        );
        for none in [
            "0::/\n",
            "0::/init.scope\n",
            "1:name=systemd:/system.slice/x.service\n",
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/web.service\n",
            "0::/system.slice/--help.service\n",
            "0::/system.slice/x y.service\n",
            "",
        ] {
            assert_eq!(unit(none), None, "{none:?}");
        }
    }

    #[test]
    fn a_key_is_named_by_an_unambiguous_prefix() {
        let mk = |s: &str| KeyEntry {
            spki_sha256: s.into(),
            algorithm: "ed25519".into(),
            bits: 256,
            first_seen_ms: 0,
            uses: 0,
            first_use_ms: None,
            last_use_ms: None,
            processes: vec![],
            processes_omitted: 0,
            files: vec![],
            files_omitted: 0,
            listeners: vec![],
            listeners_omitted: 0,
            recovered: false,
            certificates: vec![],
            certificates_omitted: 0,
        };
        let keys = [
            mk(&"ab".repeat(32)),
            mk(&format!("abababab{}", "cd".repeat(28))),
        ];
        assert!(matches!(
            entry(keys.iter(), "abababab"),
            Err(Refused::Ambiguous(2, _))
        ));
        assert_eq!(
            entry(keys.iter(), "ABABABABCD").unwrap().spki_sha256,
            keys[1].spki_sha256
        );
        assert!(matches!(
            entry(keys.iter(), "ffffffff"),
            Err(Refused::Unknown(_))
        ));
        assert!(matches!(entry(keys.iter(), "abc"), Err(Refused::Why(_))));
    }
}
