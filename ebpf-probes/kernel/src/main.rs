//! keywarden's kernel programs, one file per family:
//!
//! * `probes::signing`: `sign_entry` / `sign_return` on the signing
//!   functions of every crypto library the sensor finds, `context_entry`
//!   on the calls that bind or feed a digest context, `free_entry` on
//!   the frees of key objects.
//! * `probes::go`: `go_sign_entry` / `go_sign_return` on the signing
//!   functions of Go programs, at entry and at each return instruction.
//! * `probes::network`: `sock_recv`, a raw tracepoint (or
//!   `tcp_recvmsg_exit`, fexit, before Linux 6.3) that remembers the TCP
//!   socket each thread last received on, to name a signature's peer.
//! * `probes::process`: `process_exec` / `process_exit`, process lifetimes.
//! * `probes::opens`: fentry/fexit on `do_sys_openat2`, or the
//!   tracepoints of `open`, `openat`, `openat2` and `creat`: crypto
//!   libraries being loaded, key files being opened, and opens that pass
//!   the secret-file watch list.
//! * `maps`: every map; `util`: helpers more than one family uses.
//!
//! Cost matters more than anything here: a uprobe trap already costs several
//! microseconds in a VM, so records go out with `BPF_RB_NO_WAKEUP` and the
//! sensor polls on a timer. Only records the sensor must act on at once
//! (exec, an unseen library) force a wakeup.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod probes;
#[cfg(target_arch = "bpf")]
mod util;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
