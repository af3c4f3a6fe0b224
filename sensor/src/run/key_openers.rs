//! Programs that load a private key with code the probes cannot see.
//!
//! A file is reported as uncovered when it evidently holds crypto code
//! (`coverage.rs`). Crypto code nothing recognises (a runtime keywarden
//! does not know, a stripped static binary with no telltale strings, a
//! script that hands the key to a helper the probes do not cover) leaves
//! one trace: the program reads a private key. So a process that opens a
//! key file holding a private key, and maps no file the probes are
//! attached to, gets a coverage warning, once per executable: its
//! signatures would not be seen.
//!
//! The sensor itself, and the children it starts with its own executable
//! (a rule's `keywarden rotate`, `revoke`), read key files by design and
//! are not warned about. No other process can pass for one: a process
//! cannot choose its parent.
//!
//! Limits: the check reads `/proc/PID/maps` when the open is judged. A
//! process that has exited by then (`cat key.pem`) cannot be checked and
//! is skipped. One that loads its crypto library only after reading the
//! key is warned about although its signatures are seen.

use std::sync::{Arc, Mutex};

use hashbrown::HashSet;
use keywarden_analyzer::event;

use super::emitter::Emitter;
use crate::{
    discovery::{signing_code::ScanCache, targets},
    enrich::process::{ProcessInfo, parent_of},
    probes::Probes,
};

/// Executables warned about, at most, before the set starts over (a warning
/// may then be repeated once).
const CHECKED_MAX: usize = 16_384;

pub struct KeyOpeners {
    probes: Arc<Mutex<Probes>>,
    cache: Arc<Mutex<ScanCache>>,
    /// Executables (device, inode) already warned about. Covered ones are
    /// checked at each open: one interpreter maps a crypto library in one
    /// process and none in the next.
    checked: HashSet<(u64, u64)>,
    /// The sensor's own executable (device, inode).
    own_exe: Option<(u64, u64)>,
}

/// What a process maps, as far as the probes are concerned.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// One of its files carries probes.
    Covered,
    /// One of its files was reported uncovered already: that warning
    /// names it.
    Reported,
    /// None of its files is probed or reported.
    Unseen,
}

impl KeyOpeners {
    pub fn new(probes: Arc<Mutex<Probes>>, cache: Arc<Mutex<ScanCache>>) -> Self {
        use std::os::unix::fs::MetadataExt;
        KeyOpeners {
            probes,
            cache,
            checked: HashSet::new(),
            own_exe: std::fs::metadata("/proc/self/exe")
                .ok()
                .map(|m| (m.dev(), m.ino())),
        }
    }

    /// The sensor, or a child it started running its own executable.
    fn is_own(&self, tgid: u32, info: &ProcessInfo) -> bool {
        let me = std::process::id();
        tgid == me
            || (self.own_exe.is_some()
                && info.exe_inode() == self.own_exe
                && parent_of(std::path::Path::new("/proc"), tgid) == Some(me))
    }

    /// `tgid` opened `key_path`, which holds a private key.
    pub fn opened_private_key(
        &mut self,
        tgid: u32,
        info: &ProcessInfo,
        key_path: &str,
        out: &mut Emitter,
    ) {
        let Some(exe) = info.exe_inode() else { return };
        if self.checked.contains(&exe) || self.is_own(tgid, info) {
            return;
        }
        // Gone already (or unreadable): nothing to say about it.
        let Ok(files) = targets::executable_files_of(tgid) else {
            return;
        };
        if files.is_empty() {
            return;
        }
        if self.seen(files.iter().map(|c| (c.dev, c.ino))) != Seen::Unseen {
            return;
        }
        if self.checked.len() >= CHECKED_MAX {
            self.checked.clear();
        }
        self.checked.insert(exe);
        let program = info
            .exe_path
            .clone()
            .unwrap_or_else(|| format!("pid {tgid}"));
        out.warn(
            Some(event::Process {
                pid: tgid,
                ..Default::default()
            }),
            info.exe_path.as_deref().map(event::File::regular),
            format!(
                "{program} (pid {tgid}) opened the private key file {key_path} but maps no library \
                 keywarden probes ({} file(s) mapped, none with signing code it can see): signatures \
                 it makes are not seen",
                files.len()
            ),
        );
    }

    fn seen(&self, files: impl Iterator<Item = (u64, u64)>) -> Seen {
        let probes = self.probes.lock().expect("probes lock");
        let cache = self.cache.lock().expect("scan cache lock");
        let mut seen = Seen::Unseen;
        for (dev, ino) in files {
            if probes.is_covered(dev, ino) {
                return Seen::Covered;
            }
            if cache.was_reported(dev, ino) {
                seen = Seen::Reported;
            }
        }
        seen
    }
}
