//! Kubernetes names of a container (its pod's namespace and name, and its
//! own name in the pod), read from the node's own files: no API server, no
//! credentials, no network.
//!
//! The kubelet writes every container's log to
//! `/var/log/pods/<namespace>_<pod>_<pod uid>/<container>/<restart>.log`
//! and links it as
//! `/var/log/containers/<pod>_<namespace>_<container>-<container id>.log`,
//! the name log shippers read. The link's name alone names the container
//! whose id the cgroup path gave (`container`): no link is followed and no
//! file is read. A container with no link (the kubelet makes it right
//! after the container starts) is named from its pod's directory in
//! `/var/log/pods` when its cgroup gave the pod UID: namespace and pod,
//! without the container's name. Otherwise it keeps its id alone.
//!
//! The work is bounded: a directory is listed again only when a lookup
//! misses and the directory changed since it was last listed (its
//! modification time moved: an entry was added or removed), at most every
//! `RELIST_UNSETTLED` while it keeps changing, and at most `MAX_ENTRIES`
//! of its entries are read. A listing replaces what the last one found, so
//! the cache never holds more than the directory (at most `MAX_ENTRIES`).
//! A container outside Kubernetes costs one `stat` per lookup.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use hashbrown::HashMap;
use keywarden_analyzer::event::{Container, Pod};
use tracing::{debug, warn};

use super::container::is_container_id;

/// Entries of one directory read per listing.
const MAX_ENTRIES: usize = 16_384;

/// A directory modified less than this long before it was listed may have
/// changed again within the same timestamp (file systems stamp with a
/// coarse clock): a later miss lists it again even if its time is the same.
const SETTLE: Duration = Duration::from_secs(1);

/// How often such an unsettled directory is listed again, at most.
const RELIST_UNSETTLED: Duration = Duration::from_millis(50);

/// A container's names, as the kubelet's files give them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    /// The container's name in the pod; `None` when only the pod's
    /// directory named it.
    pub container: Option<String>,
}

/// Kubernetes names by container id (and pod UID), cached. Shared by the
/// event thread and the guard.
pub struct PodNames {
    /// `<root>/containers`: container id -> names.
    containers: Mutex<Listing>,
    /// `<root>/pods`: pod UID -> namespace and pod.
    pods: Mutex<Listing>,
}

impl PodNames {
    /// Names from the kubelet's directories under `root` (`/var/log` on a
    /// node: `pods_log_root` in the configuration).
    pub fn new(root: &Path) -> Self {
        Self {
            containers: Mutex::new(Listing::new(root.join("containers"), parse_container_link)),
            pods: Mutex::new(Listing::new(root.join("pods"), parse_pod_dir)),
        }
    }

    /// The names of container `id`, whose pod has UID `pod_uid` when its
    /// cgroup said so.
    pub fn lookup(&self, id: &str, pod_uid: Option<&str>) -> Option<PodRef> {
        let by_link = lock(&self.containers).get(id);
        if by_link.is_some() {
            return by_link;
        }
        lock(&self.pods).get(pod_uid?)
    }

    /// Fills `c`'s name in its pod and returns its pod when the node's
    /// files give them (OCSF 1.3.0's `container` has no place for the
    /// pod's names: they go to `unmapped.pod`); leaves `c` as it is
    /// otherwise.
    pub fn fill(&self, c: &mut Container) -> Option<Pod> {
        let names = self.lookup(&c.uid, c.pod_uuid.as_deref())?;
        if names.container.is_some() {
            c.name = names.container;
        }
        Some(Pod {
            name: names.pod,
            namespace: names.namespace,
        })
    }
}

fn lock(m: &Mutex<Listing>) -> std::sync::MutexGuard<'_, Listing> {
    // A panic mid-listing leaves a partial listing, still a sound one.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One directory's entries, parsed, as of its modification time.
struct Listing {
    dir: PathBuf,
    /// An entry's name to (key, names); `None` for other entries.
    parse: fn(&str) -> Option<(String, PodRef)>,
    /// The directory's modification time at the last listing (`None`:
    /// never listed, or missing then).
    listed_mtime: Option<SystemTime>,
    /// When it was last listed.
    listed_at: Option<Instant>,
    /// The directory may have changed since, within the same timestamp.
    unsettled: bool,
    found: HashMap<String, PodRef>,
    /// A listing stopped at `MAX_ENTRIES` (said once).
    said_truncated: bool,
}

impl Listing {
    fn new(dir: PathBuf, parse: fn(&str) -> Option<(String, PodRef)>) -> Self {
        Self {
            dir,
            parse,
            listed_mtime: None,
            listed_at: None,
            unsettled: false,
            found: HashMap::new(),
            said_truncated: false,
        }
    }

    fn get(&mut self, key: &str) -> Option<PodRef> {
        if let Some(names) = self.found.get(key) {
            return Some(names.clone());
        }
        if self.relist_if_changed() {
            return self.found.get(key).cloned();
        }
        None
    }

    /// Lists the directory again if it may have changed since the last
    /// listing; whether it did.
    fn relist_if_changed(&mut self) -> bool {
        let mtime = std::fs::metadata(&self.dir)
            .ok()
            .and_then(|m| m.modified().ok());
        if mtime == self.listed_mtime {
            let recent = self
                .listed_at
                .is_some_and(|at| at.elapsed() < RELIST_UNSETTLED);
            if !self.unsettled || recent {
                return false;
            }
        }
        let Some(mtime) = mtime else {
            // Gone (or never there): nothing to name.
            self.listed_mtime = None;
            self.unsettled = false;
            self.found.clear();
            return false;
        };
        self.list();
        self.listed_mtime = Some(mtime);
        self.listed_at = Some(Instant::now());
        self.unsettled = match SystemTime::now().duration_since(mtime) {
            Ok(age) => age < SETTLE,
            // Stamped in the future (the clock was stepped back): not
            // to be relied on.
            Err(_) => true,
        };
        true
    }

    fn list(&mut self) {
        self.found.clear();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                debug!(dir = %self.dir.display(), error = %e, "cannot list");
                return;
            }
        };
        for (n, entry) in entries.enumerate() {
            if n >= MAX_ENTRIES {
                if !self.said_truncated {
                    warn!(
                        dir = %self.dir.display(),
                        "more than {MAX_ENTRIES} entries: only the first are read, so some containers have no Kubernetes names"
                    );
                    self.said_truncated = true;
                }
                break;
            }
            let Ok(entry) = entry else { continue };
            if let Some(name) = entry.file_name().to_str()
                && let Some((key, names)) = (self.parse)(name)
            {
                self.found.insert(key, names);
            }
        }
    }
}

/// A Kubernetes object name: what DNS subdomains and labels allow
/// (lowercase letters, digits, `-` and `.`), at most 253 bytes. None has
/// `_`, which separates the names in the kubelet's file names.
fn is_kubernetes_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// `<pod>_<namespace>_<container>-<container id>.log`, a link in
/// `/var/log/containers`: (container id, names).
fn parse_container_link(name: &str) -> Option<(String, PodRef)> {
    let stem = name.strip_suffix(".log")?;
    let (names, id) = stem.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    let mut parts = names.split('_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || ![pod, namespace, container]
            .into_iter()
            .all(is_kubernetes_name)
    {
        return None;
    }
    Some((
        id.to_owned(),
        PodRef {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: Some(container.to_owned()),
        },
    ))
}

/// `<namespace>_<pod>_<pod uid>`, a directory in `/var/log/pods`: (pod
/// UID, names without the container's).
fn parse_pod_dir(name: &str) -> Option<(String, PodRef)> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let uid_ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if parts.next().is_some()
        || !uid_ok
        || !is_kubernetes_name(namespace)
        || !is_kubernetes_name(pod)
    {
        return None;
    }
    Some((
        uid.to_owned(),
        PodRef {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2a7e9b0d4c8e6a5f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a";
    const OTHER: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const POD_UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    fn names(ns: &str, pod: &str, container: Option<&str>) -> PodRef {
        PodRef {
            namespace: ns.into(),
            pod: pod.into(),
            container: container.map(Into::into),
        }
    }

    fn container(id: &str, pod_uid: Option<&str>) -> Container {
        Container {
            uid: id.into(),
            runtime: "containerd".into(),
            pod_uuid: pod_uid.map(Into::into),
            name: None,
        }
    }

    /// The kubelet's layout under `root`: the pod's log directory, its
    /// container's directory and log, and the link to it.
    fn kubelet_layout(root: &Path, ns: &str, pod: &str, uid: &str, name: &str, id: &str) {
        let dir = root.join(format!("pods/{ns}_{pod}_{uid}/{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0.log"), b"").unwrap();
        std::fs::create_dir_all(root.join("containers")).unwrap();
        std::os::unix::fs::symlink(
            dir.join("0.log"),
            root.join(format!("containers/{pod}_{ns}_{name}-{id}.log")),
        )
        .unwrap();
    }

    #[test]
    fn container_links_are_parsed() {
        assert_eq!(
            parse_container_link(&format!("web-6f8d9c7b5-q2xkz_shop_nginx-{ID}.log")),
            Some((
                ID.into(),
                names("shop", "web-6f8d9c7b5-q2xkz", Some("nginx"))
            ))
        );
        // Dots in pod names, dashes in every name.
        assert_eq!(
            parse_container_link(&format!(
                "etcd-node-1.example_kube-system_etcd-main-{ID}.log"
            )),
            Some((
                ID.into(),
                names("kube-system", "etcd-node-1.example", Some("etcd-main"))
            ))
        );
    }

    #[test]
    fn near_miss_links_are_ignored() {
        for name in [
            // Not a log, a short or uppercase id, a missing or extra part.
            format!("web_shop_nginx-{ID}"),
            format!("web_shop_nginx-{}.log", &ID[1..]),
            format!("web_shop_nginx-{}.log", ID.to_uppercase()),
            format!("web_shop-{ID}.log"),
            format!("web_shop_nginx_x-{ID}.log"),
            format!("web__nginx-{ID}.log"),
            // Characters no Kubernetes name has.
            format!("Web_shop_nginx-{ID}.log"),
            format!("web_shop_ng inx-{ID}.log"),
            format!("web_shop_nginx\n-{ID}.log"),
            "web_shop_nginx.log".to_owned(),
        ] {
            assert_eq!(parse_container_link(&name), None, "{name:?}");
        }
    }

    #[test]
    fn pod_directories_are_parsed() {
        assert_eq!(
            parse_pod_dir(&format!("shop_web-6f8d9c7b5-q2xkz_{POD_UID}")),
            Some((POD_UID.into(), names("shop", "web-6f8d9c7b5-q2xkz", None)))
        );
        // A static pod's UID is a hash without dashes.
        assert_eq!(
            parse_pod_dir("kube-system_etcd-node-1_5d3f9a0c1b2e4f6a8b9c0d1e2f3a4b5c"),
            Some((
                "5d3f9a0c1b2e4f6a8b9c0d1e2f3a4b5c".into(),
                names("kube-system", "etcd-node-1", None)
            ))
        );
        for name in [
            "shop_web",
            "shop_web_",
            "shop_web_uid-x",
            "shop_web_ab_cd",
            "Shop_web_ab",
        ] {
            assert_eq!(parse_pod_dir(name), None, "{name:?}");
        }
    }

    #[test]
    fn a_container_is_named_by_its_link() {
        let root = tempfile::tempdir().unwrap();
        kubelet_layout(root.path(), "shop", "web-1", POD_UID, "nginx", ID);
        let pods = PodNames::new(root.path());
        let mut c = container(ID, Some(POD_UID));
        let pod = pods.fill(&mut c).expect("named by its link");
        assert_eq!(c.name.as_deref(), Some("nginx"));
        assert_eq!(
            (pod.name.as_str(), pod.namespace.as_str()),
            ("web-1", "shop")
        );
        assert_eq!((c.uid.as_str(), c.pod_uuid.as_deref()), (ID, Some(POD_UID)));
    }

    #[test]
    fn without_a_link_the_pod_directory_names_namespace_and_pod() {
        let root = tempfile::tempdir().unwrap();
        kubelet_layout(root.path(), "shop", "web-1", POD_UID, "nginx", ID);
        let pods = PodNames::new(root.path());
        // Another container of the pod, not linked yet.
        assert_eq!(
            pods.lookup(OTHER, Some(POD_UID)),
            Some(names("shop", "web-1", None))
        );
        // No pod UID from the cgroup: nothing to go by.
        assert_eq!(pods.lookup(OTHER, None), None);
        let mut c = container(OTHER, None);
        pods.fill(&mut c);
        assert_eq!(c, container(OTHER, None));
    }

    #[test]
    fn no_kubelet_directories_no_names() {
        let root = tempfile::tempdir().unwrap();
        let pods = PodNames::new(&root.path().join("missing"));
        assert_eq!(pods.lookup(ID, Some(POD_UID)), None);
        assert_eq!(pods.lookup(ID, Some(POD_UID)), None);
    }

    /// A container linked after a lookup missed is found: its link changed
    /// the directory.
    #[test]
    fn a_link_made_after_a_miss_is_found() {
        let root = tempfile::tempdir().unwrap();
        kubelet_layout(root.path(), "shop", "web-1", POD_UID, "nginx", ID);
        let pods = PodNames::new(root.path());
        assert!(pods.lookup(ID, None).is_some());
        assert_eq!(pods.lookup(OTHER, None), None);
        kubelet_layout(root.path(), "shop", "web-1", POD_UID, "sidecar", OTHER);
        // Within RELIST_UNSETTLED of the last listing a change in the same
        // timestamp may wait; past it the link is seen.
        std::thread::sleep(RELIST_UNSETTLED + Duration::from_millis(20));
        assert_eq!(
            pods.lookup(OTHER, None),
            Some(names("shop", "web-1", Some("sidecar")))
        );
        // A removed link is forgotten at the next listing.
        std::fs::remove_file(
            root.path()
                .join(format!("containers/web-1_shop_nginx-{ID}.log")),
        )
        .unwrap();
        std::thread::sleep(RELIST_UNSETTLED + Duration::from_millis(20));
        let third = "0000000000000000000000000000000000000000000000000000000000000003";
        assert_eq!(pods.lookup(third, None), None);
        assert_eq!(pods.lookup(ID, None), None);
    }

    /// A directory that does not change is not listed again, however many
    /// lookups miss.
    #[test]
    fn a_settled_directory_is_listed_once() {
        let root = tempfile::tempdir().unwrap();
        kubelet_layout(root.path(), "shop", "web-1", POD_UID, "nginx", ID);
        let containers = root.path().join("containers");
        // Settled: last changed well before it is listed.
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::open(&containers)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let mut listing = Listing::new(containers, parse_container_link);
        assert!(listing.get(ID).is_some());
        let listed_at = listing.listed_at;
        std::thread::sleep(RELIST_UNSETTLED + Duration::from_millis(20));
        for _ in 0..100 {
            assert_eq!(listing.get(OTHER), None);
        }
        assert_eq!(listing.listed_at, listed_at, "listed again");
        assert!(!listing.unsettled);
    }
}
