//! The kernel hooks besides the signing uprobes: network peers and opens.
//! Each is served by the cheapest mechanism the running kernel allows,
//! and the one chosen, with why the better one was not, is logged at
//! start (docs/design.md, "Mechanisms per kernel").

use anyhow::{Context, Result};
use aya::{
    Btf,
    programs::{FEntry, FExit, RawTracePoint, TracePoint},
};
use tracing::info;

use crate::config::OpenHook;

/// The kernel's BTF, read once for every fentry and fexit program: it
/// takes seconds to parse under qemu. An error says why it is missing.
pub type KernelBtf = Result<Btf, String>;

pub fn kernel_btf() -> KernelBtf {
    Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))
}

fn btf_of(btf: &KernelBtf) -> Result<&Btf> {
    btf.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Peer attribution: the sock_recv_length tracepoint (Linux 6.3+), else
/// an fexit program on `tcp_recvmsg` (kernels with BTF and fentry, such as
/// Debian's 6.1); without either, signatures carry no peer, and the sensor
/// says so. Which one serves is logged.
pub fn attach_peers(ebpf: &mut aya::Ebpf, btf: &KernelBtf) -> Result<()> {
    let p: &mut RawTracePoint = ebpf
        .program_mut("sock_recv")
        .context("sock_recv")?
        .try_into()?;
    p.load()
        .context("loading raw tracepoint program sock_recv")?;
    let Err(tp) = p.attach("sock_recv_length") else {
        tracing::info!("network peers from the sock_recv_length tracepoint");
        return Ok(());
    };
    let mut fexit = || -> Result<()> {
        let btf = btf_of(btf)?;
        let p: &mut FExit = ebpf
            .program_mut("tcp_recvmsg_exit")
            .context("tcp_recvmsg_exit")?
            .try_into()?;
        p.load("tcp_recvmsg", btf)
            .context("loading fexit on tcp_recvmsg")?;
        p.attach().context("attaching fexit on tcp_recvmsg")?;
        Ok(())
    };
    match fexit() {
        Ok(()) => tracing::info!(
            "no sock_recv_length tracepoint: network peers from fexit on tcp_recvmsg"
        ),
        Err(e) => tracing::warn!(
            tracepoint = %tp,
            fexit = brief(&e),
            "no sock_recv_length tracepoint and no fexit on tcp_recvmsg: signatures carry no network peer"
        ),
    }
    Ok(())
}

/// An error for a log line: a refused program's error carries the
/// verifier's whole log, which can be megabytes (and formatting that took
/// minutes in a debug build under qemu). Its start and its end say what
/// was refused and why.
pub(crate) fn brief(e: &impl std::fmt::Display) -> String {
    const HEAD: usize = 300;
    const TAIL: usize = 700;
    // `#`: an anyhow error's whole chain of causes.
    let full = format!("{e:#}");
    let chars = full.chars().count();
    if chars <= HEAD + TAIL {
        return full;
    }
    let head: String = full.chars().take(HEAD).collect();
    let tail: String = full.chars().skip(chars - TAIL).collect();
    format!(
        "{head} [… {} characters of verifier output …] {tail}",
        chars - HEAD - TAIL
    )
}

/// The kernel function `open`, `openat`, `openat2` and `creat` share
/// (Linux 5.6 and later).
const OPEN_FUNCTION: &str = "do_sys_openat2";

/// The syscall tracepoints that serve opens where fentry cannot: (entry
/// program, system call). One exit program serves all four.
const OPEN_TRACEPOINTS: [(&str, &str); 4] = [
    ("openat_enter", "openat"),
    ("open_enter", "open"),
    ("openat2_enter", "openat2"),
    ("creat_enter", "creat"),
];

/// Opens: fentry and fexit on `do_sys_openat2` where the kernel allows
/// them (BTF and trampolines), so no other system call pays for them;
/// else the tracepoints of the four system calls, which send every system
/// call of every task through the traced path. Which one serves, and why,
/// is logged.
pub fn attach_opens(ebpf: &mut aya::Ebpf, hook: OpenHook, btf: &KernelBtf) -> Result<()> {
    let fentry = match hook {
        OpenHook::Tracepoints => Err(anyhow::anyhow!("open_hook is \"tracepoints\"")),
        OpenHook::Auto => attach_open_fentry(ebpf, btf),
    };
    let why = match fentry {
        Ok(()) => {
            info!(
                "opens from fentry and fexit on {OPEN_FUNCTION} (open, openat, openat2, creat): \
                 other system calls are not traced"
            );
            return Ok(());
        }
        Err(e) => brief(&e),
    };
    let exit: &mut TracePoint = ebpf
        .program_mut("open_exit")
        .context("open_exit")?
        .try_into()?;
    exit.load()
        .context("loading tracepoint program open_exit")?;
    let mut missing = Vec::new();
    for (call, (name, syscall)) in OPEN_TRACEPOINTS.into_iter().enumerate() {
        let (enter, leave) = (
            format!("sys_enter_{syscall}"),
            format!("sys_exit_{syscall}"),
        );
        let attached = (|| -> Result<()> {
            let p: &mut TracePoint = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()
                .with_context(|| format!("loading tracepoint program {name}"))?;
            p.attach("syscalls", &enter)
                .with_context(|| format!("attaching to tracepoint syscalls/{enter}"))?;
            let exit: &mut TracePoint = ebpf
                .program_mut("open_exit")
                .context("open_exit")?
                .try_into()?;
            exit.attach("syscalls", &leave)
                .with_context(|| format!("attaching to tracepoint syscalls/{leave}"))?;
            Ok(())
        })();
        match attached {
            Ok(()) => {}
            // openat is how nearly every program opens: without it the
            // sensor sees no library and no key file.
            Err(e) if call == 0 => return Err(e),
            // A kernel without openat2 (before 5.6) has no such call to
            // open through.
            Err(e) => {
                tracing::warn!(error = brief(&e), "opens through {syscall} are not seen");
                missing.push(syscall);
            }
        }
    }
    info!(
        fentry = %why,
        not_seen = ?missing,
        "opens from the syscall tracepoints of open, openat, openat2 and creat: every system \
         call on the host takes the kernel's traced path"
    );
    Ok(())
}

/// fentry and fexit on `do_sys_openat2`, both or neither.
fn attach_open_fentry(ebpf: &mut aya::Ebpf, btf: &KernelBtf) -> Result<()> {
    let btf = btf_of(btf)?;
    let entry: &mut FEntry = ebpf
        .program_mut("do_sys_openat2_entry")
        .context("do_sys_openat2_entry")?
        .try_into()?;
    entry
        .load(OPEN_FUNCTION, btf)
        .with_context(|| format!("loading fentry on {OPEN_FUNCTION}"))?;
    let exit: &mut FExit = ebpf
        .program_mut("do_sys_openat2_exit")
        .context("do_sys_openat2_exit")?
        .try_into()?;
    exit.load(OPEN_FUNCTION, btf)
        .with_context(|| format!("loading fexit on {OPEN_FUNCTION}"))?;
    // Exit first: an entry without its exit would leave every noted open
    // pending, and hold a library's opener with no one to release it.
    let exit: &mut FExit = ebpf
        .program_mut("do_sys_openat2_exit")
        .context("do_sys_openat2_exit")?
        .try_into()?;
    let exit_link = exit
        .attach()
        .with_context(|| format!("attaching fexit on {OPEN_FUNCTION}"))?;
    let entry: &mut FEntry = ebpf
        .program_mut("do_sys_openat2_entry")
        .context("do_sys_openat2_entry")?
        .try_into()?;
    if let Err(e) = entry.attach() {
        let exit: &mut FExit = ebpf
            .program_mut("do_sys_openat2_exit")
            .context("do_sys_openat2_exit")?
            .try_into()?;
        exit.detach(exit_link)
            .context("detaching fexit after its fentry failed")?;
        return Err(e).with_context(|| format!("attaching fentry on {OPEN_FUNCTION}"));
    }
    Ok(())
}

/// Who may open files through io_uring on this host. An
/// `IORING_OP_OPENAT` request reaches the kernel's open code without
/// `do_sys_openat2` or an open system call: only the `io_uring_complete`
/// hook sees it (`attach_uring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UringExposure {
    /// The kernel has no io_uring.
    Absent,
    /// `kernel.io_uring_disabled=2`: no one.
    Disabled,
    /// `kernel.io_uring_disabled=1`: processes with `CAP_SYS_ADMIN` or in
    /// `kernel.io_uring_group`.
    Restricted,
    /// `kernel.io_uring_disabled=0`, or a kernel before 6.6, which has no
    /// such setting: any process.
    Anyone,
}

fn uring_exposure(available: bool, disabled: Option<&str>) -> UringExposure {
    if !available {
        return UringExposure::Absent;
    }
    match disabled.map(str::trim) {
        Some("2") => UringExposure::Disabled,
        Some("1") => UringExposure::Restricted,
        _ => UringExposure::Anyone,
    }
}

/// Whether the kernel has io_uring: `io_uring_setup(0, NULL)` fails with
/// ENOSYS only where it does not (EFAULT or EINVAL where it does, EPERM
/// where it is disabled).
fn io_uring_available() -> bool {
    // SAFETY: a null parameter pointer and zero entries: the kernel
    // refuses the call before it could create anything.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            0u32,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r >= 0 {
        // SAFETY: a descriptor the call just returned, owned by no one.
        unsafe { libc::close(r as i32) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

/// io_uring's opens: a raw tracepoint on `io_uring_complete`, whose
/// program looks at each open's descriptor as an open's exit does
/// (`opens::io_uring_complete`). It needs the request's layout from BTF.
/// `Err` says why opens through io_uring are not seen.
pub fn attach_uring(ebpf: &mut aya::Ebpf) -> Result<(), String> {
    let layout = crate::enrich::kernel_layout::uring().map_err(|e| format!("{e:#}"))?;
    (|| -> Result<()> {
        let map = ebpf.map_mut("URING_LAYOUT").context("URING_LAYOUT map")?;
        aya::maps::Array::<_, keywarden_probe_types::UringLayout>::try_from(map)?
            .set(0, &layout, 0)?;
        let p: &mut RawTracePoint = ebpf
            .program_mut("io_uring_complete")
            .context("io_uring_complete")?
            .try_into()?;
        p.load()
            .context("loading raw tracepoint program io_uring_complete")?;
        p.attach("io_uring_complete")
            .context("attaching to raw tracepoint io_uring_complete")?;
        Ok(())
    })()
    .map_err(|e| brief(&e))
}

/// The log line about io_uring at start: how its opens are seen, or, when
/// they are not, who may use it and the setting that closes the gap (a
/// warning when anyone may).
fn uring_report(
    exposure: UringExposure,
    hooked: &Result<(), String>,
    setting: &str,
) -> (tracing::Level, String) {
    use tracing::Level;
    match (exposure, hooked) {
        (UringExposure::Absent, _) => (Level::DEBUG, "no io_uring on this kernel".to_owned()),
        (UringExposure::Disabled, _) => (
            Level::INFO,
            "io_uring is disabled (kernel.io_uring_disabled=2): no open escapes the open probes"
                .to_owned(),
        ),
        (_, Ok(())) => (
            Level::INFO,
            "opens through io_uring from its io_uring_complete tracepoint: key and watched \
             files by the opened file's own name; an open into a registered file slot is named, \
             not examined"
                .to_owned(),
        ),
        (UringExposure::Restricted, Err(why)) => (
            Level::INFO,
            format!(
                "opens through io_uring are not seen ({why}); only processes with CAP_SYS_ADMIN \
                 or in kernel.io_uring_group may use it (kernel.io_uring_disabled=1)"
            ),
        ),
        (UringExposure::Anyone, Err(why)) => (
            Level::WARN,
            format!(
                "opens through io_uring are not seen ({why}), and any process may use io_uring \
                 (kernel.io_uring_disabled: {setting}): set kernel.io_uring_disabled=2 (or 1, \
                 with kernel.io_uring_group) to close this"
            ),
        ),
    }
}

/// Says, at start, how opens through io_uring are seen, or that they are
/// not, and who may make them.
pub fn say_io_uring(hooked: &Result<(), String>) {
    const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
    let setting = std::fs::read_to_string(SYSCTL).ok();
    let exposure = uring_exposure(io_uring_available(), setting.as_deref());
    let shown = setting
        .as_deref()
        .map(str::trim)
        .unwrap_or("absent (Linux before 6.6)");
    match uring_report(exposure, hooked, shown) {
        (tracing::Level::WARN, line) => tracing::warn!("{line}"),
        (tracing::Level::INFO, line) => info!("{line}"),
        (_, line) => tracing::debug!("{line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::brief;

    #[test]
    fn a_verifier_log_is_cut_to_its_start_and_end() {
        let log = format!("refused: {}the reason", "x".repeat(5_000_000));
        let e = anyhow::anyhow!(log).context("loading fentry on do_sys_openat2");
        let b = brief(&e);
        assert!(b.len() < 1200, "{}", b.len());
        assert!(
            b.starts_with("loading fentry on do_sys_openat2: refused: "),
            "{b}"
        );
        assert!(b.ends_with("xthe reason"), "{b}");
        let cut = format!("{e:#}").len() - 1000;
        assert!(
            b.contains(&format!("[… {cut} characters of verifier output …]")),
            "{b}"
        );
        let short = anyhow::anyhow!("EPERM").context("loading");
        assert_eq!(brief(&short), "loading: EPERM");
    }

    #[test]
    fn io_uring_is_reported_by_hook_and_setting() {
        use super::{UringExposure::*, uring_report};
        use tracing::Level;
        let hooked = Ok(());
        let unhooked = Err("no io_uring_complete tracepoint".to_owned());
        let (level, line) = uring_report(Anyone, &hooked, "0");
        assert_eq!(level, Level::INFO);
        assert!(
            line.contains("from its io_uring_complete tracepoint"),
            "{line}"
        );
        let (level, line) = uring_report(Anyone, &unhooked, "absent (Linux before 6.6)");
        assert_eq!(level, Level::WARN);
        assert!(
            line.contains("not seen (no io_uring_complete tracepoint)"),
            "{line}"
        );
        assert!(line.contains("absent (Linux before 6.6)"), "{line}");
        assert!(line.contains("kernel.io_uring_disabled=2"), "{line}");
        let (level, line) = uring_report(Restricted, &unhooked, "1");
        assert_eq!(level, Level::INFO);
        assert!(line.contains("not seen"), "{line}");
        for hook in [&hooked, &unhooked] {
            let (level, line) = uring_report(Disabled, hook, "2");
            assert_eq!(level, Level::INFO);
            assert!(line.contains("io_uring is disabled"), "{line}");
            assert_eq!(uring_report(Absent, hook, "0").0, Level::DEBUG);
        }
    }

    #[test]
    fn io_uring_exposure_follows_the_setting() {
        use super::{UringExposure::*, uring_exposure};
        assert_eq!(uring_exposure(false, Some("0")), Absent);
        assert_eq!(uring_exposure(true, Some("2\n")), Disabled);
        assert_eq!(uring_exposure(true, Some("1\n")), Restricted);
        assert_eq!(uring_exposure(true, Some("0\n")), Anyone);
        // Linux before 6.6 has no setting: anyone may.
        assert_eq!(uring_exposure(true, None), Anyone);
    }
}
