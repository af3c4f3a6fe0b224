//! Where the kernel keeps what the probes read directly, from the running
//! kernel's BTF.
//!
//! Rust eBPF programs have no CO-RE relocations, so field offsets come from
//! `/sys/kernel/btf/vmlinux` at start and reach the probes through maps:
//! - `SockLayout`: a connection's addresses, in `struct sock_common` (the
//!   first member of every `struct sock`, partly inside anonymous unions),
//!   and `struct sock`'s protocol. The probes name the peer of a signature
//!   by reading the socket the signing thread last received on.
//! - `TaskLayout`: `task_struct.mm->exe_file->f_inode`, whose inode number,
//!   size and mtime let the sensor hash the file a process ran even after
//!   the process has exited; and the process's root directory and mount
//!   namespace, which let it read the key files such a process opened;
//!   and an opened file's name and path (`struct file` to its dentry and
//!   mount, up to the process's root), which let the exit of an open see
//!   the file the kernel opened whatever name the process gave.

use anyhow::{Context, Result, anyhow};
use btf_rs::{Btf, Type};
use hashbrown::HashMap;
use keywarden_probe_types::{SockLayout, TaskLayout, UringLayout};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets of every named field, descending into anonymous members.
fn fields(btf: &Btf, s: &btf_rs::Struct, base_bits: u32, out: &mut HashMap<String, u32>) {
    for m in &s.members {
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        if !name.is_empty() {
            out.entry(name).or_insert(bits / 8);
            continue;
        }
        // Anonymous: follow typedefs and qualifiers to the struct or union.
        let mut ty = btf.resolve_chained_type(m).ok();
        for _ in 0..8 {
            match ty {
                Some(Type::Struct(ref inner)) | Some(Type::Union(ref inner)) => {
                    fields(btf, inner, bits, out);
                    break;
                }
                Some(ref t @ (Type::Typedef(_) | Type::Const(_) | Type::Volatile(_))) => {
                    ty = t
                        .as_btf_type()
                        .and_then(|b| btf.resolve_chained_type(b).ok());
                }
                _ => break,
            }
        }
    }
}

/// Byte offsets of the named fields of `struct name`, anonymous members
/// flattened.
fn struct_fields(btf: &Btf, name: &str) -> Result<HashMap<String, u32>> {
    let s = btf
        .resolve_types_by_name(name)
        .map_err(|e| anyhow!("{VMLINUX}: struct {name}: {e}"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .with_context(|| format!("struct {name} is not a struct in the kernel's BTF"))?;
    let mut f = HashMap::new();
    fields(btf, &s, 0, &mut f);
    Ok(f)
}

fn field(fields: &HashMap<String, u32>, strukt: &str, name: &str) -> Result<u32> {
    fields
        .get(name)
        .copied()
        .with_context(|| format!("struct {strukt} has no field {name} in the kernel's BTF"))
}

fn vmlinux() -> Result<Btf> {
    Btf::from_file(VMLINUX).map_err(|e| anyhow!("{VMLINUX}: {e}"))
}

pub fn sock() -> Result<SockLayout> {
    let btf = vmlinux()?;
    let f = struct_fields(&btf, "sock_common")?;
    let get = |name| field(&f, "sock_common", name);
    let sock = struct_fields(&btf, "sock")?;
    Ok(SockLayout {
        valid: 1,
        daddr: get("skc_daddr")?,
        rcv_saddr: get("skc_rcv_saddr")?,
        dport: get("skc_dport")?,
        num: get("skc_num")?,
        family: get("skc_family")?,
        state: get("skc_state")?,
        v6_daddr: get("skc_v6_daddr")?,
        v6_rcv_saddr: get("skc_v6_rcv_saddr")?,
        protocol: field(&sock, "sock", "sk_protocol")?,
    })
}

pub fn task() -> Result<TaskLayout> {
    let btf = vmlinux()?;
    let task = struct_fields(&btf, "task_struct")?;
    let mm = struct_fields(&btf, "mm_struct")?;
    let file = struct_fields(&btf, "file")?;
    let inode = struct_fields(&btf, "inode")?;
    let fs = struct_fields(&btf, "fs_struct")?;
    let path = struct_fields(&btf, "path")?;
    let dentry = struct_fields(&btf, "dentry")?;
    let nsproxy = struct_fields(&btf, "nsproxy")?;
    let mnt_namespace = struct_fields(&btf, "mnt_namespace")?;
    let ns_common = struct_fields(&btf, "ns_common")?;
    let files = struct_fields(&btf, "files_struct")?;
    let fdtable = struct_fields(&btf, "fdtable")?;
    let qstr = struct_fields(&btf, "qstr")?;
    let mount = struct_fields(&btf, "mount")?;
    let vfsmount = struct_fields(&btf, "vfsmount")?;
    let path_dentry = field(&path, "path", "dentry")?;
    let path_mnt = field(&path, "path", "mnt")?;
    let f_path = field(&file, "file", "f_path")?;
    let d_name = field(&dentry, "dentry", "d_name")?;
    // Linux 6.7 split the mtime into i_mtime_sec and i_mtime_nsec; before
    // it was a timespec64 (i_mtime, or __i_mtime in 6.6): tv_sec, tv_nsec.
    let (mtime_sec, mtime_nsec) = match (inode.get("i_mtime_sec"), inode.get("i_mtime_nsec")) {
        (Some(&s), Some(&n)) => (s, n),
        _ => {
            let ts = field(&inode, "inode", "i_mtime")
                .or_else(|_| field(&inode, "inode", "__i_mtime"))?;
            (ts, ts + 8)
        }
    };
    Ok(TaskLayout {
        valid: 1,
        task_mm: field(&task, "task_struct", "mm")?,
        mm_exe_file: field(&mm, "mm_struct", "exe_file")?,
        file_inode: field(&file, "file", "f_inode")?,
        inode_ino: field(&inode, "inode", "i_ino")?,
        inode_size: field(&inode, "inode", "i_size")?,
        inode_mtime_sec: mtime_sec,
        inode_mtime_nsec: mtime_nsec,
        task_fs: field(&task, "task_struct", "fs")?,
        fs_root_dentry: field(&fs, "fs_struct", "root")? + path_dentry,
        dentry_inode: field(&dentry, "dentry", "d_inode")?,
        task_nsproxy: field(&task, "task_struct", "nsproxy")?,
        nsproxy_mnt_ns: field(&nsproxy, "nsproxy", "mnt_ns")?,
        mnt_ns_inum: field(&mnt_namespace, "mnt_namespace", "ns")?
            + field(&ns_common, "ns_common", "inum")?,
        task_files: field(&task, "task_struct", "files")?,
        files_fdt: field(&files, "files_struct", "fdt")?,
        fdtable_fd: field(&fdtable, "fdtable", "fd")?,
        file_dentry: f_path + path_dentry,
        file_mnt: f_path + path_mnt,
        file_flags: field(&file, "file", "f_flags")?,
        dentry_parent: field(&dentry, "dentry", "d_parent")?,
        dentry_name_len: d_name + field(&qstr, "qstr", "len")?,
        dentry_name_ptr: d_name + field(&qstr, "qstr", "name")?,
        mount_mnt: field(&mount, "mount", "mnt")?,
        mount_parent: field(&mount, "mount", "mnt_parent")?,
        mount_mountpoint: field(&mount, "mount", "mnt_mountpoint")?,
        vfsmount_root: field(&vfsmount, "vfsmount", "mnt_root")?,
        fs_root_mnt: field(&fs, "fs_struct", "root")? + path_mnt,
    })
}

/// Where an io_uring request keeps its opcode and result, and an open
/// request its registered file slot. Absent on kernels without io_uring.
pub fn uring() -> Result<UringLayout> {
    let btf = vmlinux()?;
    let req = struct_fields(&btf, "io_kiocb")?;
    let cqe = struct_fields(&btf, "io_cqe")?;
    let open = struct_fields(&btf, "io_open")?;
    Ok(UringLayout {
        valid: 1,
        req_opcode: field(&req, "io_kiocb", "opcode")?,
        req_res: field(&req, "io_kiocb", "cqe")? + field(&cqe, "io_cqe", "res")?,
        // `struct io_open` is the request's command data, at its start.
        open_file_slot: field(&open, "io_open", "file_slot")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of sock_common has been stable for years; the point of
    /// reading BTF is kernels where it is not, but here the known offsets
    /// check the walk through the anonymous unions.
    #[test]
    fn reads_sock_common_from_this_kernel() {
        let l = sock().unwrap();
        assert_eq!((l.daddr, l.rcv_saddr), (0, 4));
        assert_eq!((l.dport, l.num, l.family, l.state), (12, 14, 16, 18));
        assert!(
            l.v6_daddr >= 24 && l.v6_rcv_saddr == l.v6_daddr + 16,
            "{l:?}"
        );
    }

    /// `struct io_kiocb` starts with the command data an open request's
    /// `struct io_open` fills (its file pointer, then `dfd`, then the slot).
    #[test]
    fn reads_the_io_uring_request_from_this_kernel() {
        let l = uring().unwrap();
        assert_eq!(l.open_file_slot, 12, "{l:?}");
        assert!(l.req_opcode >= 8 && l.req_res > l.req_opcode, "{l:?}");
    }

    /// Offsets differ between kernel builds; what holds everywhere is that
    /// each was found and that the inode fields are in plausible order.
    #[test]
    fn reads_the_exe_inode_path_from_this_kernel() {
        let l = task().unwrap();
        assert_eq!(l.valid, 1);
        assert!(
            l.task_mm > 0 && l.mm_exe_file > 0 && l.file_inode > 0,
            "{l:?}"
        );
        assert!(l.inode_ino < l.inode_size, "{l:?}");
        assert!(l.inode_mtime_sec != l.inode_mtime_nsec, "{l:?}");
        // `struct path` is { mnt, dentry }: the dentry is 8 bytes into it.
        assert!(l.task_fs > 0 && l.fs_root_dentry.is_multiple_of(8), "{l:?}");
        assert!(l.task_nsproxy > 0 && l.nsproxy_mnt_ns > 0, "{l:?}");
        // `struct qstr` is { hash_len (hash, len), name }; `struct path` is
        // { mnt, dentry }, in `file` and in `fs_struct`.
        assert_eq!(l.dentry_name_ptr, l.dentry_name_len + 4, "{l:?}");
        assert_eq!(l.file_dentry, l.file_mnt + 8, "{l:?}");
        assert_eq!(l.fs_root_dentry, l.fs_root_mnt + 8, "{l:?}");
        assert!(l.mount_mnt > 0 && l.mount_parent > 0, "{l:?}");
    }
}
