//! pidfd system calls: a descriptor that names one process for good, so
//! that a signal or a descriptor duplication never reaches another process
//! given the same pid. One place for the raw calls, used by the holds
//! (`held`), the key reader (`keys/reader.rs`) and the search of a signing
//! process's open files (`keys/held_open.rs`).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// `pidfd_open(2)`; `None` if no such process.
pub fn open(tgid: u32) -> io::Result<Option<OwnedFd>> {
    let pid =
        libc::pid_t::try_from(tgid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags: libc::c_uint = 0;
    // SAFETY: pidfd_open takes a pid and flags, passes no memory, and
    // returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel just returned this descriptor, and nothing else
    // owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// `pidfd_getfd(2)`: descriptor `target` of the process behind `pidfd`,
/// duplicated into the sensor (close-on-exec, as the call always sets it).
pub fn get_fd(pidfd: BorrowedFd<'_>, target: RawFd) -> io::Result<File> {
    let flags: libc::c_uint = 0;
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that
    // process and flags, and returns a new descriptor or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)` without siginfo; `Ok(false)` if the process has
/// exited since the pidfd was opened.
pub fn send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<bool> {
    let flags: libc::c_uint = 0;
    // SAFETY: the descriptor is open for the whole call; a null siginfo
    // asks the kernel for a plain kill(2)-style signal; no other memory is
    // passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        _ => Err(e),
    }
}
