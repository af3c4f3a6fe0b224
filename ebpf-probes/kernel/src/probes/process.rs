//! Process lifetimes: `process_exec` reports every exec to the control
//! thread at once (and may hold an image not seen before in its cgroup),
//! `process_exit` reports the exit of a whole process.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task, bpf_send_signal},
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use keywarden_probe_types::*;

use crate::{
    maps::{CONTROL, EVENTS, GO_PROCS, HELD, INFLIGHT, LIBRARY_SEEN, VERDICT},
    util::{
        SIGSTOP, config, count, current_root, current_task, file_id, kernel_ptr, sensor_alive,
        task_layout,
    },
};

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    let task = current_task();
    let _ = INFLIGHT.remove(&task.tid());
    // A new image is judged afresh (and marked Go again if it is).
    let _ = VERDICT.remove(&task.tgid());
    let _ = GO_PROCS.remove(&task.tgid());
    let mark = ExitRecord {
        kind: kind::EXEC_MARK,
        _pad: 0,
        task,
    };
    if EVENTS.output(&mark, BPF_RB_NO_WAKEUP as u64).is_err() {
        count(stats::LOST_OTHER);
    }
    let Some(mut rec) = CONTROL.reserve::<ExecRecord>(0) else {
        count(stats::LOST_OTHER);
        return 0;
    };
    // SAFETY: writable ring memory sized for an `ExecRecord` (integers and
    // bytes); no field is read before it is written.
    let r = unsafe { rec.assume_init_mut() };
    r.kind = kind::EXEC;
    r.flags = 0;
    r.task = task;
    r.exe = current_exe().unwrap_or_default();
    r.root = current_root().unwrap_or_default();
    r.filename[0] = 0;
    // __data_loc char[] filename at offset 8: low 16 bits are the offset.
    // SAFETY: read_at goes through bpf_probe_read, which checks the address;
    // offset 8 is inside sched_process_exec's record.
    if let Ok(loc) = unsafe { ctx.read_at::<u32>(8) } {
        let off = (loc & 0xffff) as usize;
        // SAFETY: the kernel's `__data_loc` offset points inside this very
        // record, so the pointer stays in bounds; it is never dereferenced.
        let src = unsafe { (ctx.as_ptr() as *const u8).add(off) };
        // SAFETY: the helper checks `src` (a fault is an error) and writes at
        // most `filename`'s PATH_MAX bytes.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, &mut r.filename) };
    }
    // An image not seen in this cgroup yet may carry its own signing
    // code (a static binary): stop it before its first instruction
    // until the sensor has looked. The sensor marks the path seen.
    let seen = LibrarySeenKey::new(task.cgroup_id, &r.filename, &r.exe);
    if config(config::HOLD_NEW_LIBRARIES) != 0
        // SAFETY: only whether an entry exists is used; the reference is
        // dropped at once.
        && unsafe { LIBRARY_SEEN.get(&seen) }.is_none()
        && sensor_alive(&task)
        // SAFETY: takes only a signal number and signals the current task; no
        // memory of ours is involved.
        && unsafe { bpf_send_signal(SIGSTOP) } == 0
    {
        r.flags |= exec_flags::HELD;
        let _ = HELD.insert(&task.tgid(), &task.ktime_ns, 0);
    }
    rec.submit(BPF_RB_FORCE_WAKEUP as u64);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let _ = INFLIGHT.remove(&(pid_tgid as u32));
    if (pid_tgid >> 32) as u32 != pid_tgid as u32 {
        return 0; // a thread, not the process
    }
    let _ = VERDICT.remove(&(pid_tgid as u32));
    let _ = GO_PROCS.remove(&(pid_tgid as u32));
    let rec = ExitRecord {
        kind: kind::EXIT,
        _pad: 0,
        task: current_task(),
    };
    if EVENTS.output(&rec, BPF_RB_NO_WAKEUP as u64).is_err() {
        count(stats::LOST_OTHER);
    }
    0
}

/// The file the current task runs: `current->mm->exe_file->f_inode`.
#[inline(always)]
fn current_exe() -> Option<ExeId> {
    let l = task_layout()?;
    // SAFETY: takes no arguments; the task pointer it returns is only read
    // through bpf_probe_read_kernel (`kernel_ptr`, `kernel_read`).
    let task = unsafe { bpf_get_current_task() };
    let mm = kernel_ptr(task, l.task_mm)?;
    file_id(l, kernel_ptr(mm, l.mm_exe_file)?)
}
