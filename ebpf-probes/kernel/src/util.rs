//! Helpers that more than one family of programs uses: statistics, the
//! sensor's configuration, the current task, reads of kernel memory at
//! offsets from BTF, and whether a sensor is alive to release a process
//! held with `SIGSTOP`.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
    generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns},
};
use keywarden_probe_types::*;

use crate::maps::{CONFIG, HOLD_LEASE, SENSORS, STATS, TASK_LAYOUT};

pub(crate) const SIGSTOP: u32 = 19;

#[inline(always)]
pub(crate) fn count(slot: u32) {
    if let Some(p) = STATS.get_ptr_mut(slot) {
        // SAFETY: `p` is this CPU's slot of a per-CPU array: valid and aligned
        // for the whole run, as array slots are never freed.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub(crate) fn config(slot: u32) -> u64 {
    CONFIG.get(slot).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn current_task() -> Task {
    Task {
        pid_tgid: bpf_get_current_pid_tgid(),
        uid_gid: bpf_get_current_uid_gid(),
        // SAFETY: takes no arguments; it only reads the current task.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: takes no arguments; it only reads the clock.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// The task layout, once the sensor filled it in.
#[inline(always)]
pub(crate) fn task_layout() -> Option<&'static TaskLayout> {
    TASK_LAYOUT.get(0).filter(|l| l.valid != 0)
}

/// A `T` at `base + off` in kernel memory.
#[inline(always)]
pub(crate) fn kernel_read<T>(base: u64, off: u32) -> Option<T> {
    // SAFETY: the helper checks the address (a bad one is an error); each `T`
    // read here is an integer or byte array, valid for any bytes.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.ok()
}

/// A non-NULL pointer at `base + off` in kernel memory.
#[inline(always)]
pub(crate) fn kernel_ptr(base: u64, off: u32) -> Option<u64> {
    kernel_read::<u64>(base, off).filter(|&p| p != 0)
}

/// Inode number, size and mtime of a `struct file`.
#[inline(always)]
pub(crate) fn file_id(l: &TaskLayout, file: u64) -> Option<ExeId> {
    let inode = kernel_ptr(file, l.file_inode)?;
    Some(ExeId {
        valid: 1,
        mtime_nsec: kernel_read(inode, l.inode_mtime_nsec)?,
        ino: kernel_read(inode, l.inode_ino)?,
        size: kernel_read(inode, l.inode_size)?,
        mtime_sec: kernel_read(inode, l.inode_mtime_sec)?,
    })
}

/// Where the current task's absolute paths resolve:
/// `current->fs->root.dentry->d_inode->i_ino` and
/// `current->nsproxy->mnt_ns->ns.inum`. Read at exec (`ExecRecord`) and
/// at each reported open (`FileOpenRecord`): a process may chroot between.
#[inline(always)]
pub(crate) fn current_root() -> Option<RootId> {
    let l = task_layout()?;
    // SAFETY: takes no arguments; the task pointer it returns is only read
    // through bpf_probe_read_kernel (`kernel_ptr`, `kernel_read`).
    let task = unsafe { bpf_get_current_task() };
    let fs = kernel_ptr(task, l.task_fs)?;
    let dentry = kernel_ptr(fs, l.fs_root_dentry)?;
    let inode = kernel_ptr(dentry, l.dentry_inode)?;
    let nsproxy = kernel_ptr(task, l.task_nsproxy)?;
    let mnt_ns = kernel_ptr(nsproxy, l.nsproxy_mnt_ns)?;
    Some(RootId {
        valid: 1,
        mnt_ns: kernel_read(mnt_ns, l.mnt_ns_inum)?,
        ino: kernel_read(inode, l.inode_ino)?,
    })
}

/// Holding anyone needs a sensor to release them: this sensor holds
/// the host's lease, its heartbeat is fresh, and the opener is not a
/// sensor. Sensors are known by thread-group id (`SENSORS`), never by
/// name: anyone can name a process "keywarden-x".
#[inline(always)]
pub(crate) fn sensor_alive(task: &Task) -> bool {
    let token = config(config::HOLD_TOKEN);
    let Some(lease) = HOLD_LEASE.get(0) else {
        return false;
    };
    token != 0
        && lease.token == token
        && lease.heartbeat_ns != 0
        && task.ktime_ns.wrapping_sub(lease.heartbeat_ns) < config::HEARTBEAT_MAX_AGE_NS
        && !is_sensor(task.tgid())
}

/// The task belongs to a running sensor (this one or another): two sensors
/// holding each other would both stay stopped.
#[inline(always)]
pub(crate) fn is_sensor(tgid: u32) -> bool {
    // SAFETY: only the presence of the entry is used, never its memory.
    unsafe { SENSORS.get(&tgid) }.is_some()
}
