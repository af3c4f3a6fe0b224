//! Which TCP connection each thread last received on: `sock_recv`, a raw
//! tracepoint, keeps the socket per thread, and `peer_of` reads the
//! connection's addresses for the signing probe. Kernels before 6.3 have
//! no `sock_recv_length` tracepoint: there `tcp_recvmsg_exit`, an fexit
//! program on `tcp_recvmsg`, keeps the same.
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{fexit, raw_tracepoint},
    programs::{FExitContext, RawTracePointContext},
};
use keywarden_probe_types::*;

use crate::{
    maps::{GO_PROCS, GO_SOCK, LAST_SOCK, SOCK_LAYOUT},
    util::kernel_read,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: u8 = 1;

/// The connection this thread last received from, if it is still an
/// established TCP connection.
#[inline(always)]
pub(crate) fn peer_of(tid: u32) -> Option<Peer> {
    // SAFETY: the pointer is copied out at once (an evicted entry is still map
    // memory); a freed socket is only ever read through bpf_probe_read_kernel.
    let sk = *unsafe { LAST_SOCK.get(&tid) }?;
    peer_of_sock(sk)
}

/// The connection goroutine `g` of `tgid` last received from, if any.
#[inline(always)]
pub(crate) fn goroutine_peer(tgid: u32, g: u64) -> Option<Peer> {
    let key = ProcPtr {
        tgid,
        _pad: 0,
        ptr: g,
    };
    // SAFETY: as in `peer_of`.
    let sk = *unsafe { GO_SOCK.get(&key) }?;
    peer_of_sock(sk)
}

/// The addresses of `sk`, if it is an established TCP connection. Reads
/// kernel memory at offsets from BTF; a socket freed meanwhile reads as
/// not established.
#[inline(always)]
fn peer_of_sock(sk: u64) -> Option<Peer> {
    let l = sock_layout()?;
    let state: u8 = kernel_read(sk, l.state)?;
    if state != TCP_ESTABLISHED {
        return None;
    }
    let family: u16 = kernel_read(sk, l.family)?;
    let dport: u16 = kernel_read(sk, l.dport)?;
    let mut peer = Peer {
        family,
        local_port: kernel_read(sk, l.num)?,
        remote_port: u16::from_be(dport),
        _pad: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if family == AF_INET {
        let d: [u8; 4] = kernel_read(sk, l.daddr)?;
        let s: [u8; 4] = kernel_read(sk, l.rcv_saddr)?;
        peer.remote_addr[..4].copy_from_slice(&d);
        peer.local_addr[..4].copy_from_slice(&s);
    } else if family == AF_INET6 {
        peer.remote_addr = kernel_read(sk, l.v6_daddr)?;
        peer.local_addr = kernel_read(sk, l.v6_rcv_saddr)?;
    } else {
        return None;
    }
    Some(peer)
}

/// The socket layout, once the sensor filled it in.
#[inline(always)]
fn sock_layout() -> Option<&'static SockLayout> {
    SOCK_LAYOUT.get(0).filter(|l| l.valid != 0)
}

/// sock_recv_length fires in the receiving thread for every socket
/// receive (`read`, `recv*`) of every process: remember the TCP socket,
/// so a signature this thread makes next can name its connection.
/// A raw tracepoint: the program gets the `struct sock *` itself, and
/// the kernel does not build the tracepoint's record for it first
/// (about a third of this hook's cost per receive, in a profile of a
/// TLS client). Two reads of the socket and one map write per receive;
/// nothing for reads of files. A receive that got no data (`EAGAIN`,
/// which an event loop meets on every drained socket, or end of file)
/// names no connection the thread is working on, and returns first.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv(ctx: RawTracePointContext) -> u32 {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let ret: u64 = ctx.arg(1);
    if ret as i32 <= 0 {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    remember(sk);
    0
}

/// The same as `sock_recv`, where the tracepoint is missing (Linux 6.1):
/// `int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int
/// flags, int *addr_len)`, whose return value an fexit program finds
/// after the five arguments. IPv6 TCP receives through it too.
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit(ctx: FExitContext) -> i32 {
    let ret: u64 = ctx.arg(5);
    if ret as i32 <= 0 {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    remember(sk);
    0
}

/// Keeps `sk` as the current thread's last receive, if it is TCP.
#[inline(always)]
fn remember(sk: u64) {
    let Some(l) = sock_layout() else {
        return;
    };
    let family: u16 = kernel_read(sk, l.family).unwrap_or(0);
    let protocol: u16 = kernel_read(sk, l.protocol).unwrap_or(0);
    if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: only whether an entry exists is used.
    if unsafe { GO_PROCS.get(&tgid) }.is_some()
        && let Some(g) = user_r14()
    {
        let key = ProcPtr {
            tgid,
            _pad: 0,
            ptr: g,
        };
        let _ = GO_SOCK.insert(&key, &sk, 0);
    }
    match LAST_SOCK.get_ptr_mut(&tid) {
        // SAFETY: `p` points into LAST_SOCK's preallocated values, valid all
        // run; a slot recycled meanwhile only gets a wrong hint.
        Some(p) => unsafe {
            if *p != sk {
                *p = sk
            }
        },
        None => {
            let _ = LAST_SOCK.insert(&tid, &sk, 0);
        }
    }
}

/// Offset of `r14` in x86-64's `struct pt_regs` (after `r15`).
const PT_REGS_R14: u64 = 8;

/// The user-space `R14` of the current task, saved at its syscall entry:
/// in Go code, the running goroutine (`g`), since a receive is a system
/// call the goroutine makes itself.
#[inline(always)]
fn user_r14() -> Option<u64> {
    // SAFETY: both helpers take the current task's BTF pointer and return
    // the address of its saved user registers, read here only through
    // bpf_probe_read_kernel.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return None;
    }
    kernel_read::<u64>(regs + PT_REGS_R14, 0)
}
