//! Keys and certificates in the places servers keep them (`key_locations`:
//! /etc/ssl, /etc/pki, /etc/letsencrypt, /etc/nginx, /etc/apache2,
//! /etc/kubernetes/pki, /var/lib/kubelet/pki by default), read at start.
//!
//! A server that loaded its keys before the sensor ran left no open for the
//! probes to see; if its files sit in one of these places, their keys are
//! candidates from the first signature on. Unlike `key_paths` (directories
//! the operator named, every file of which is read and whose protected
//! keys make their files held), the scan is bounded and quiet:
//!
//! * only files named like key files (the open probe's suffixes), at most
//!   `MAX_DEPTH` levels down, `MAX_FILES` files, `MAX_FILE_BYTES` each and
//!   `MAX_BYTES` in all, `MAX_ENTRIES` directory entries looked at;
//! * trust stores are skipped (`TRUST_STORES`, also below a prefix such as
//!   the `/host` a pod mounts the node's root on, and any file holding more
//!   than `MAX_KEYS_PER_FILE` keys, a CA bundle): their keys sign nothing
//!   on this host, and every candidate costs a verification for each
//!   signature no key verifies;
//! * symbolic links to files are followed (Let's Encrypt's `live`
//!   directory is made of them), links to directories are not;
//! * files are opened like those processes name (`safe_open`: never
//!   blocking, regular files on real filesystems only).
//!
//! A key found here is a candidate only: it names a signature that
//! verifies under it.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use super::{
    material::{self, KeyFile},
    safe_open,
};

/// Directory levels below a location.
const MAX_DEPTH: usize = 6;
/// Directory entries looked at, in all.
const MAX_ENTRIES: usize = 20_000;
/// Files read, in all.
const MAX_FILES: usize = 2_000;
/// A key or certificate file is a few KiB; a full chain a few more.
const MAX_FILE_BYTES: u64 = 256 * 1024;
/// Bytes read, in all.
const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// More keys in one file make it a CA bundle.
const MAX_KEYS_PER_FILE: usize = 8;
/// CA certificates of trust stores, whose keys are not on this host. A
/// directory whose path ends with one of these is skipped: the scan also
/// runs over the node's root mounted below a prefix (`/host/etc/ssl` in
/// the Kubernetes DaemonSet, docs/deploy.md).
const TRUST_STORES: &[&str] = &["etc/ssl/certs", "etc/pki/ca-trust", "etc/pki/java"];

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Files holding at least one public key, by host path.
    pub files: Vec<(String, KeyFile)>,
    /// Files read.
    pub read: usize,
    /// Files named like key files that were not used, and why.
    pub skipped: Vec<String>,
    /// A bound stopped the scan before it saw everything.
    pub truncated: Option<&'static str>,
}

struct Walk {
    root: File,
    entries: usize,
    bytes: u64,
    out: Scan,
}

/// Scans `locations` (host paths; missing ones are skipped).
pub fn scan(locations: &[String]) -> Scan {
    let Ok(root) = File::open("/") else {
        return Scan::default();
    };
    let mut w = Walk {
        root,
        entries: 0,
        bytes: 0,
        out: Scan::default(),
    };
    for loc in locations {
        let p = Path::new(loc);
        match std::fs::metadata(p) {
            Ok(md) if md.is_dir() => w.dir(p, 0),
            Ok(md) if md.is_file() => w.file(p),
            _ => {}
        }
        if w.out.truncated.is_some() {
            break;
        }
    }
    w.out
}

impl Walk {
    fn dir(&mut self, dir: &Path, depth: usize) {
        if TRUST_STORES.iter().any(|t| dir.ends_with(t)) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut subdirs: Vec<PathBuf> = Vec::new();
        for e in entries.flatten() {
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                self.out.truncated = Some("directory entries");
                return;
            }
            let Ok(kind) = e.file_type() else { continue };
            let path = e.path();
            if kind.is_dir() {
                subdirs.push(path);
            } else if (kind.is_file()
                || (kind.is_symlink() && std::fs::metadata(&path).is_ok_and(|m| m.is_file())))
                && material::looks_like_key_file(&e.file_name().to_string_lossy())
            {
                self.file(&path);
            }
            if self.out.truncated.is_some() {
                return;
            }
        }
        if depth < MAX_DEPTH {
            for d in subdirs {
                self.dir(&d, depth + 1);
                if self.out.truncated.is_some() {
                    return;
                }
            }
        }
    }

    fn file(&mut self, path: &Path) {
        if self.out.read >= MAX_FILES {
            self.out.truncated = Some("files");
            return;
        }
        let shown = path.to_string_lossy().into_owned();
        let checked = safe_open::open_beneath(self.root.as_fd(), &shown)
            .and_then(|f| safe_open::check(&f, MAX_FILE_BYTES).map(|len| (f, len)));
        let (file, len) = match checked {
            Ok(opened) => opened,
            Err(e) => {
                self.out.skipped.push(format!("{shown}: {e}"));
                return;
            }
        };
        if self.bytes + len > MAX_BYTES {
            self.out.truncated = Some("bytes");
            return;
        }
        self.bytes += len;
        self.out.read += 1;
        match material::read_key_file_from(&file, &shown) {
            Ok(k) if k.keys.len() > MAX_KEYS_PER_FILE => self
                .out
                .skipped
                .push(format!("{shown}: {} keys, a CA bundle", k.keys.len())),
            Ok(k) if k.keys.is_empty() => self
                .out
                .skipped
                .push(format!("{shown}: encrypted private key")),
            Ok(k) => self.out.files.push((shown, k)),
            Err(e) => self.out.skipped.push(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::material::tests::openssl_key;

    /// Keys are found below a location, through a symlink to a file, but
    /// not in a trust store, a bundle or a file not named like a key.
    #[test]
    fn keys_are_found_and_bundles_and_trust_stores_skipped() {
        let (_kdir, key, spki) =
            openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let top = tempfile::tempdir().unwrap();
        let deep = top.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::copy(&key, deep.join("server.key")).unwrap();
        std::os::unix::fs::symlink(deep.join("server.key"), top.path().join("live.pem")).unwrap();
        std::fs::copy(&key, top.path().join("server.key.bak")).unwrap();
        // A bundle of nine keys.
        let mut bundle = String::new();
        for _ in 0..9 {
            let (_d, k, _) = openssl_key(&["-algorithm", "ED25519"]);
            bundle.push_str(&std::fs::read_to_string(&k).unwrap());
        }
        std::fs::write(top.path().join("bundle.pem"), bundle).unwrap();

        let got = scan(&[top.path().to_string_lossy().into_owned()]);
        let found: Vec<&str> = got.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(found.len(), 2, "{got:?}");
        assert!(
            got.files
                .iter()
                .all(|(_, k)| k.keys[0].spki_sha256 == spki && k.has_private_key)
        );
        assert!(found.iter().any(|p| p.ends_with("a/b/c/server.key")));
        assert!(found.iter().any(|p| p.ends_with("live.pem")));
        assert!(
            got.skipped.iter().any(|s| s.contains("a CA bundle")),
            "{got:?}"
        );
        assert!(got.truncated.is_none());
    }

    /// A trust store is skipped below a prefix too: the node's root as a
    /// pod mounts it (`/host/etc/ssl/certs`).
    #[test]
    fn trust_stores_below_a_prefix_are_skipped() {
        let (_kdir, key, _spki) = openssl_key(&["-algorithm", "ED25519"]);
        let host = tempfile::tempdir().unwrap();
        let ssl = host.path().join("etc/ssl");
        for dir in ["certs", "private"] {
            std::fs::create_dir_all(ssl.join(dir)).unwrap();
        }
        std::fs::copy(&key, ssl.join("certs/looks-like-a-ca.pem")).unwrap();
        std::fs::copy(&key, ssl.join("private/server.key")).unwrap();

        let got = scan(&[ssl.to_string_lossy().into_owned()]);
        let found: Vec<&str> = got.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(found.len(), 1, "{got:?}");
        assert!(found[0].ends_with("etc/ssl/private/server.key"), "{got:?}");
    }
}
