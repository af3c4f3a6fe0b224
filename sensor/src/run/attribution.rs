//! Who did it: the process, container and cgroup of a probe record, as the
//! OCSF objects every event carries. Records from the probes and opens the
//! fanotify guard decided are attributed the same way.

use std::{sync::Arc, time::Duration};

use hashbrown::HashMap;
use keywarden_analyzer::event::{self, Cgroup, User, Who};
use keywarden_probe_types::Task;
use tracing::debug;

use crate::{
    clock::WallClock,
    enrich::{
        container::container_from_cgroup,
        pods::PodNames,
        process::{CgroupPaths, ProcessInfo, ProcessTable, user_name},
    },
    records::c_str,
};

/// How long the event thread waits for the control thread's snapshot of a
/// fresh exec. The control thread takes it as soon as the exec record wakes
/// it; this only bounds the stall when that record was lost. (250 ms was
/// too short in the full test suite on a 2-core VM, where a signer's
/// event sometimes lost its exec snapshot.)
const EXEC_SNAPSHOT_WAIT: Duration = Duration::from_millis(500);

pub struct Attributor {
    /// Process images, shared with the control thread (which snapshots
    /// them at exec) and the guard.
    pub procs: Arc<ProcessTable>,
    /// Processes whose exec mark was read and whose snapshot (taken by the
    /// control thread) was not waited for yet: tgid -> exec time.
    pending_exec: HashMap<u32, u64>,
    cgroups: CgroupPaths,
    /// Kubernetes names of containers, shared with the guard.
    pods: Arc<PodNames>,
    users: HashMap<u32, Option<String>>,
    /// When: probe times to wall-clock times.
    clock: WallClock,
}

impl Attributor {
    pub fn new(procs: Arc<ProcessTable>, pods: Arc<PodNames>) -> Self {
        Self {
            procs,
            pending_exec: HashMap::new(),
            cgroups: CgroupPaths::new(),
            pods,
            users: HashMap::new(),
            clock: WallClock::new(),
        }
    }

    /// The wall-clock millisecond of a probe time.
    pub fn wall_ms(&self, ktime_ns: u64) -> i64 {
        self.clock.wall_ms(ktime_ns)
    }

    /// A process exec'd at `ktime`: its next record waits for the control
    /// thread's snapshot of the new image.
    pub fn exec_marked(&mut self, tgid: u32, ktime: u64) {
        self.pending_exec.insert(tgid, ktime);
    }

    /// A process exited at `ktime`.
    pub fn exited(&mut self, tgid: u32, ktime: u64) {
        self.pending_exec.remove(&tgid);
        self.procs.remove_upto(tgid, ktime);
    }

    /// The image a process ran at `ktime`, waiting briefly for the control
    /// thread's snapshot of its latest exec (a lost control record must not
    /// stall the event ring for long).
    pub fn process_at(&mut self, tgid: u32, ktime: u64) -> Arc<ProcessInfo> {
        if let Some(&exec) = self.pending_exec.get(&tgid)
            && exec <= ktime
        {
            self.pending_exec.remove(&tgid);
            if !self.procs.wait_for_exec(tgid, exec, EXEC_SNAPSHOT_WAIT) {
                debug!(
                    pid = tgid,
                    "no exec snapshot from the control thread in time"
                );
            }
        }
        self.procs.lookup_or_snapshot(tgid, ktime)
    }

    /// The OCSF process, container and cgroup of a record.
    pub fn who(&mut self, task: &Task, info: &ProcessInfo) -> Who {
        let cgroup_path = self
            .cgroups
            .path(task.cgroup_id, info.cgroup_path.as_deref());
        let mut container = cgroup_path
            .as_deref()
            .and_then(container_from_cgroup)
            .or_else(|| info.container.clone());
        let pod = container.as_mut().and_then(|c| self.pods.fill(c));
        let uid = task.uid();
        let user_name = self
            .users
            .entry(uid)
            .or_insert_with(|| user_name(uid))
            .clone();
        // What is missing, and why: the cgroup comes from the id the probe
        // read, the hash from the file opened at exec.
        let mut missing = Vec::new();
        if cgroup_path.is_none() {
            missing.push(format!("cgroup {} not found under cgroup2", task.cgroup_id));
        }
        if let Err(e) = info.exe_hash(&self.procs) {
            missing.push(e.to_owned());
        }
        Who {
            process: event::Process {
                pid: task.tgid(),
                tid: task.tid(),
                name: c_str(&task.comm),
                cmd_line: info.cmd_line.clone(),
                file: info.file(&self.procs),
                user: User {
                    uid: uid.to_string(),
                    name: user_name,
                },
                container,
            },
            pod,
            cgroup: Some(Cgroup {
                id: task.cgroup_id,
                path: cgroup_path,
            }),
            attribution_error: (!missing.is_empty()).then(|| missing.join("; ")),
        }
    }
}
