//! What the host must offer before anything loads: root, uprobes, kernel
//! BTF, and the bpffs and tracefs mounts (made here when missing).

use std::path::Path;

use anyhow::{Context, Result, bail};

/// Mounts a pseudo-filesystem of type `fstype` on `target` unless one is
/// already mounted there. A freshly booted host has neither bpffs nor
/// tracefs mounted (systemd mounts them on demand, minimal images never do),
/// and the sensor must start there without an operator's help.
fn ensure_mounted(fstype: &str, target: &str, why: &str) -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| is_mount_of(l, fstype, target));
    if !mounted {
        nix::mount::mount(
            Some(fstype),
            target,
            Some(fstype),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("mounting {fstype} on {target} (needed {why})"))?;
        tracing::info!(fstype, target, "mounted, since nothing was mounted there");
    }
    Ok(())
}

/// Whether one `/proc/self/mountinfo` line is a mount of `fstype` on
/// `target` (field 5 is the mount point; the type follows the " - ").
fn is_mount_of(line: &str, fstype: &str, target: &str) -> bool {
    line.split_whitespace().nth(4) == Some(target)
        && line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some(fstype)
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there, and creates the
/// pin directory.
pub fn ensure_pin_dir(pin_dir: &str) -> Result<()> {
    ensure_mounted("bpf", "/sys/fs/bpf", "to keep the list of held processes")?;
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {pin_dir}"))?;
    Ok(())
}

/// Tracepoints are attached through perf events whose ids are read from
/// tracefs; mount it where aya looks first when it is missing.
pub fn ensure_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    ensure_mounted("tracefs", "/sys/kernel/tracing", "to attach tracepoints")
}

/// Checks that make a clear one-line error instead of an EPERM deep inside
/// a BPF call.
pub fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "keywarden must run as root (it loads eBPF programs and reads /proc of every process)"
        );
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        bail!(
            "this kernel has no uprobe support (CONFIG_UPROBE_EVENTS): /sys/bus/event_source/devices/uprobe is missing"
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "kernel BTF is missing (/sys/kernel/btf/vmlinux); keywarden needs a kernel built with CONFIG_DEBUG_INFO_BTF"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_mount_of;

    #[test]
    fn mountinfo_lines_are_matched_by_mount_point_and_type() {
        let tracefs = "35 24 0:12 / /sys/kernel/tracing rw,nosuid,nodev,noexec,relatime shared:13 - tracefs tracefs rw";
        assert!(is_mount_of(tracefs, "tracefs", "/sys/kernel/tracing"));
        assert!(!is_mount_of(tracefs, "bpf", "/sys/kernel/tracing"));
        assert!(!is_mount_of(tracefs, "tracefs", "/sys/fs/bpf"));
        // A mount point whose name mentions the type is not that type.
        let tmpfs = "40 24 0:40 / /sys/fs/bpf rw,relatime - tmpfs bpf rw";
        assert!(!is_mount_of(tmpfs, "bpf", "/sys/fs/bpf"));
    }
}
