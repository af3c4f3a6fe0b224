//! Opening files that other processes name, as root, without being used.
//!
//! A path comes from an untrusted process: it may be a symlink to
//! `/proc/kmsg` (a read that never returns), a FIFO (an open that never
//! returns), a path in a chroot that climbs out with `..` or an absolute
//! symlink, or a huge file. Every open here:
//! * resolves inside the process's own root (`openat2` with
//!   `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`), so `..` and symlinks stay
//!   in the process's view of the filesystem and `/proc/*/fd` links are
//!   refused;
//! * never blocks (`O_NONBLOCK | O_NOCTTY`) and refuses anything but a
//!   regular file within the size cap (`fstat` on the descriptor);
//! * refuses pseudo-filesystems whose files can block, have no real size
//!   or are served by a user process (procfs, sysfs, tracefs, debugfs,
//!   securityfs, bpffs, cgroupfs, FUSE), by `fstatfs` on the descriptor;
//! * then reads only from that descriptor, with positioned reads.
//!
//! The same checks and reads serve a descriptor duplicated from the process
//! itself (`pidfd_getfd`, `keys/reader.rs`): positioned reads leave the
//! file offset it shares with the process where the process left it.

use std::{
    fs::File,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd},
        unix::fs::FileExt,
    },
};

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("on a {0} filesystem, which the sensor never reads")]
    PseudoFs(&'static str),
    #[error("cannot read: {0}")]
    Read(std::io::Error),
}

/// `f_type` values of filesystems never read, with their names. (The casts
/// are no-ops on 64-bit targets, not on 32-bit ones.)
#[allow(clippy::unnecessary_cast)]
const REFUSED_FILESYSTEMS: &[(i64, &str)] = &[
    (libc::PROC_SUPER_MAGIC as i64, "proc"),
    (libc::SYSFS_MAGIC as i64, "sysfs"),
    (0x7472_6163, "tracefs"),
    (libc::DEBUGFS_MAGIC as i64, "debugfs"),
    (libc::SECURITYFS_MAGIC as i64, "securityfs"),
    (libc::BPF_FS_MAGIC as i64, "bpf"),
    (libc::CGROUP2_SUPER_MAGIC as i64, "cgroup2"),
    (libc::FUSE_SUPER_MAGIC as i64, "fuse"),
];

/// Opens `path` inside the tree rooted at `root` (a directory descriptor:
/// the process's root or working directory), never leaving it.
pub fn open_beneath(root: BorrowedFd<'_>, path: &str) -> Result<File, Refused> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    let c = std::ffi::CString::new(rel)
        .map_err(|_| Refused::Open(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: open_how is plain data; zeroed is its valid default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the path is NUL-terminated and `how` outlives the call; the
    // kernel copies both.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(Refused::Open(std::io::Error::last_os_error()));
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// Checks an opened file is a regular file of at most `max` bytes on a
/// filesystem the sensor reads; returns its size.
pub fn check(file: &File, max: u64) -> Result<u64, Refused> {
    let md = file.metadata().map_err(Refused::Read)?;
    if !md.file_type().is_file() {
        return Err(Refused::NotRegular);
    }
    if md.len() > max {
        return Err(Refused::TooLarge { max });
    }
    // SAFETY: statfs is plain data, filled by the kernel.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a statfs we own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(Refused::Read(std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // see REFUSED_FILESYSTEMS
    if let Some((_, name)) = REFUSED_FILESYSTEMS
        .iter()
        .find(|(magic, _)| *magic == st.f_type as i64)
    {
        return Err(Refused::PseudoFs(name));
    }
    Ok(md.len())
}

/// Reads a checked file from its start, at most `max` bytes and no more
/// than `fstat` gave (a file that grows meanwhile is not read further).
/// Positioned reads: the descriptor's offset never moves, so one shared
/// with another process reads the same for it afterwards.
pub fn read_checked(file: &File, max: u64, into: &mut Vec<u8>) -> Result<(), Refused> {
    let len = check(file, max)? as usize;
    let start = into.len();
    // Sized once: a buffer that grew by reallocation would leave copies
    // of what it held (a private key) behind, unzeroed.
    into.resize(start + len, 0);
    let mut got = 0;
    while got < len {
        match file.read_at(&mut into[start + got..], got as u64) {
            Ok(0) => break, // cut short meanwhile
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                into.truncate(start + got);
                return Err(Refused::Read(e));
            }
        }
    }
    into.truncate(start + got);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn dir_fd(p: &std::path::Path) -> File {
        File::open(p).unwrap()
    }

    #[test]
    fn dotdot_and_absolute_symlinks_stay_inside_the_root() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("host.key"), b"host secret").unwrap();
        let jail = host.path().join("jail");
        std::fs::create_dir(&jail).unwrap();
        std::fs::write(jail.join("host.key"), b"jail key").unwrap();
        let abs = host.path().join("host.key");
        std::os::unix::fs::symlink(&abs, jail.join("link.pem")).unwrap();
        let root = dir_fd(&jail);
        let mut buf = Vec::new();
        let f = open_beneath(root.as_fd(), "/../../host.key").unwrap();
        read_checked(&f, 1024, &mut buf).unwrap();
        assert_eq!(buf, b"jail key", "`..` is clamped at the root");
        // The absolute symlink resolves inside the jail, where its target
        // does not exist.
        assert!(matches!(
            open_beneath(root.as_fd(), "/link.pem"),
            Err(Refused::Open(_))
        ));
    }

    #[test]
    fn a_fifo_is_opened_without_blocking_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("trap.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        let root = dir_fd(dir.path());
        let f = open_beneath(root.as_fd(), "trap.pem").unwrap();
        assert!(matches!(check(&f, 1024), Err(Refused::NotRegular)));
    }

    #[test]
    fn procfs_and_magic_links_are_refused() {
        let root = dir_fd(std::path::Path::new("/"));
        let f = open_beneath(root.as_fd(), "/proc/self/status").unwrap();
        assert!(matches!(check(&f, 1 << 20), Err(Refused::PseudoFs("proc"))));
        assert!(matches!(
            open_beneath(root.as_fd(), "/proc/self/fd/0"),
            Err(Refused::Open(_))
        ));
    }

    /// A descriptor shared with its opener (as `pidfd_getfd` gives) is read
    /// whole from the start, and its offset stays where the opener left it.
    #[test]
    fn reads_leave_a_shared_offset_alone() {
        use std::io::{Read, Seek, SeekFrom};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        std::fs::write(&p, b"0123456789").unwrap();
        let mut theirs = File::open(&p).unwrap();
        theirs.seek(SeekFrom::Start(4)).unwrap();
        let ours = theirs.try_clone().unwrap(); // the same open file description
        let mut buf = Vec::new();
        read_checked(&ours, 1024, &mut buf).unwrap();
        assert_eq!(buf, b"0123456789");
        let mut rest = String::new();
        theirs.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "456789", "the opener reads on from where it was");
    }

    #[test]
    fn files_over_the_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big.pem"), vec![b'x'; 2048]).unwrap();
        let root = dir_fd(dir.path());
        let f = open_beneath(root.as_fd(), "big.pem").unwrap();
        assert!(matches!(
            check(&f, 1024),
            Err(Refused::TooLarge { max: 1024 })
        ));
    }
}
