//! Runs of the probes the kernel skipped.
//!
//! The kernel does not run a BPF program on a CPU where one of the same
//! kind is already running (a tracepoint or kprobe program of any tool, an
//! fentry or LSM program re-entered): it counts a *recursion miss* on the
//! program instead, and what that run would have seen (a signature, an
//! open, an exit) never reaches the ring buffer. The count is in the
//! program's `bpf_prog_info` (Linux 5.12 for trampoline programs, about
//! 6.2 for raw tracepoints, 6.7 for kprobes, uprobes and tracepoints; 0
//! where the kernel does not count).
//! aya's `ProgramInfo` does not expose it, so the info is read here with
//! one `BPF_OBJ_GET_INFO_BY_FD`.

use std::os::fd::{AsRawFd, BorrowedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

/// The kernel's count of runs of the program `prog` it skipped.
pub fn recursion_misses(prog: BorrowedFd<'_>) -> std::io::Result<u64> {
    // SAFETY: a plain C struct of integers, valid all zero.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: a C union of such structs, valid all zero.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = prog.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    // SAFETY: `attr` names a buffer of `info_len` bytes that lives across
    // the call; the kernel writes at most that many (fewer on a kernel
    // whose `bpf_prog_info` is shorter, leaving the rest zero).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &attr as *const bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_long,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor that is no BPF program is refused, not read as zero.
    #[test]
    fn a_file_that_is_no_program_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd;
        assert!(recursion_misses(f.as_fd()).is_err());
    }
}
