//! Container identity from a cgroup v2 path.
//!
//! Runtimes name the cgroup of a container after its id, in a handful of
//! layouts (cgroupfs and systemd drivers). Parsing the path needs no API
//! server and works for every process, including short-lived ones. The
//! Kubernetes names of a container (namespace, pod, container name) come
//! from the kubelet's files on the node, by that id (`pods`).

use keywarden_analyzer::event::Container;

/// A full container id: 64 lowercase hex digits (Docker, containerd,
/// CRI-O).
pub(crate) fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// `(prefix, runtime)` of systemd-driver scope names: `<prefix><id>.scope`.
const SCOPE_PREFIXES: [(&str, &str); 5] = [
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("docker-", "docker"),
    ("libpod-", "podman"),
    ("containerd-", "containerd"),
];

/// The container a cgroup path belongs to, if any. The innermost matching
/// component wins, so nested layouts resolve to the real container.
pub fn container_from_cgroup(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let kubernetes = parts.iter().any(|p| p.starts_with("kubepods"));
    let pod_uuid = parts.iter().rev().find_map(|p| pod_uid(p));
    for (i, part) in parts.iter().enumerate().rev() {
        let name = part.strip_suffix(".scope").unwrap_or(part);
        for (prefix, runtime) in SCOPE_PREFIXES {
            if let Some(id) = name.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some(Container {
                    uid: id.to_owned(),
                    runtime: runtime.to_owned(),
                    pod_uuid,
                    name: None,
                });
            }
        }
        // cgroupfs driver: a bare id below /docker/ or a kubepods pod.
        if is_container_id(part) {
            let parent = if i > 0 { parts[i - 1] } else { "" };
            let runtime = if parent == "docker" {
                "docker"
            } else if kubernetes {
                "kubernetes"
            } else {
                "unknown"
            };
            return Some(Container {
                uid: (*part).to_owned(),
                runtime: runtime.to_owned(),
                pod_uuid,
                name: None,
            });
        }
    }
    None
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice`.
fn pod_uid(part: &str) -> Option<String> {
    let name = part.strip_suffix(".slice").unwrap_or(part);
    let idx = name.rfind("pod")?;
    if idx > 0 && !name[..idx].ends_with('-') {
        return None;
    }
    let uid = name[idx + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2a7e9b0d4c8e6a5f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a";
    const POD: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    fn parse(p: &str) -> Option<(String, String, Option<String>)> {
        container_from_cgroup(p).map(|c| (c.uid, c.runtime, c.pod_uuid))
    }

    #[test]
    fn kubernetes_layouts() {
        let pod_us = POD.replace('-', "_");
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_us}.slice/cri-containerd-{ID}.scope"
            )),
            Some((ID.into(), "containerd".into(), Some(POD.into())))
        );
        assert_eq!(
            parse(&format!(
                "/kubepods/besteffort/pod{POD}/cri-containerd-{ID}.scope"
            )),
            Some((ID.into(), "containerd".into(), Some(POD.into())))
        );
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{POD}/{ID}")),
            Some((ID.into(), "kubernetes".into(), Some(POD.into())))
        );
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-pod{pod_us}.slice/crio-{ID}.scope"
            )),
            Some((ID.into(), "cri-o".into(), Some(POD.into())))
        );
    }

    #[test]
    fn docker_and_podman_layouts() {
        assert_eq!(
            parse(&format!("/docker/{ID}")),
            Some((ID.into(), "docker".into(), None))
        );
        assert_eq!(
            parse(&format!("/system.slice/docker-{ID}.scope")),
            Some((ID.into(), "docker".into(), None))
        );
        assert_eq!(
            parse(&format!("/machine.slice/libpod-{ID}.scope/container")),
            Some((ID.into(), "podman".into(), None))
        );
    }

    #[test]
    fn non_containers_and_near_misses() {
        assert_eq!(parse("/"), None);
        assert_eq!(parse("/system.slice/nginx.service"), None);
        assert_eq!(parse("/user.slice/user-0.slice/session-3.scope"), None);
        // 63 hex chars, uppercase, and conmon scopes are not container ids.
        assert_eq!(parse(&format!("/docker/{}", &ID[1..])), None);
        assert_eq!(parse(&format!("/docker/{}", ID.to_uppercase())), None);
        assert_eq!(
            parse(&format!("/system.slice/crio-conmon-{ID}.scope")),
            None
        );
    }
}
