//! Signatures: each probe record becomes one Key Use event naming the key,
//! and the processes that sign get their key-object frees watched so later
//! verdicts can be cached (`free_watch`).

use std::sync::{Arc, Mutex, MutexGuard};

use aya::programs::uprobe::UProbeLinkId;
use keywarden_analyzer::event::{self, Event, KeyUse, Signature};
use keywarden_probe_types::{SignRecord, sign_flags};
use tracing::{debug, info, warn};

use super::{attribution::Attributor, emitter::Emitter};
use crate::{
    clock,
    discovery::signing_code::function_name,
    free_watch::{self, FreeWatches},
    keys::identify::Identifier,
    probes::Probes,
    records::c_str,
};

pub struct KeyUses {
    pub ident: Identifier,
    /// Processes whose key-object frees the probes see (attached when a
    /// process first signs).
    pub free_watches: FreeWatches<UProbeLinkId>,
    probes: Arc<Mutex<Probes>>,
}

impl KeyUses {
    pub fn new(probes: Arc<Mutex<Probes>>) -> Self {
        Self {
            ident: Identifier::default(),
            free_watches: FreeWatches::new(free_watch::MAX_WATCHED_PROCESSES),
            probes,
        }
    }

    fn probes(&self) -> MutexGuard<'_, Probes> {
        self.probes.lock().expect("probes lock")
    }

    /// One signature record: identify the key, attribute it, emit it.
    pub fn on_sign(
        &mut self,
        r: &SignRecord,
        sig: &[u8],
        attr: &mut Attributor,
        out: &mut Emitter,
    ) {
        let tgid = r.task.tgid();
        let cacheable = self.free_watches.covers(tgid, r.library, r.task.ktime_ns);
        let key = self.ident.identify(r, sig, cacheable);
        if !cacheable && Identifier::caches_by_handle(r) {
            self.watch_frees(tgid, r.library);
        }
        self.sync_known();
        let info = attr.process_at(tgid, r.task.ktime_ns);
        let who = attr.who(&r.task, &info);
        let (lib_file, library_kind) = library_of(&self.probes(), r.library, r.func as u8);
        let (peer, local) = match endpoints(r) {
            (None, None) if r.ret == 1 => sole_connection_of(tgid),
            known => known,
        };
        let md_name = (r.flags & sign_flags::HAS_MD_NAME != 0)
            .then(|| c_str(&r.md_name))
            .filter(|s| !s.is_empty());
        let u = KeyUse {
            time_ms: attr.wall_ms(r.task.ktime_ns),
            seq: out.next_seq(),
            process: who.process,
            container: who.container,
            cgroup: who.cgroup,
            library: lib_file,
            library_kind,
            function: function_name(r.func as u8).to_owned(),
            success: r.ret == 1,
            key,
            signature: Signature {
                length: if r.ret == 1 { r.sig_len } else { 0 },
                digest: md_name,
            },
            peer,
            local,
        };
        let ev = Event::key_use(&out.origin, u);
        out.emit(ev, None);
    }

    /// A process exec'd or exited: what was known of its key objects goes,
    /// and so do its free probes.
    pub fn forget_process(&mut self, tgid: u32) {
        self.ident.forget_process(tgid);
        self.unwatch_frees(tgid);
        self.sync_known();
    }

    /// Attaches a library's free probes to a process that signed through
    /// it, so its later verdicts can be cached (`free_watch`). Past the
    /// per-process limit, or when a per-process attach fails for another
    /// reason than the process going away, they go host-wide instead.
    fn watch_frees(&mut self, tgid: u32, library: u32) {
        let mut step = self.free_watches.next_step(tgid, library);
        if step == free_watch::Step::Nothing {
            return;
        }
        let mut probes = self.probes.lock().expect("probes lock");
        if !probes.has_free_probes(library) {
            return;
        }
        if step == free_watch::Step::AttachProcess {
            match probes.attach_frees(library, Some(tgid)) {
                Ok(link) => {
                    let since = clock::monotonic_ns();
                    // Gone already (0): the next sweep detaches it.
                    let started = free_watch::start_time(tgid).unwrap_or(0);
                    debug!(pid = tgid, library, "watching key-object frees");
                    if let Some(old) = self
                        .free_watches
                        .attached(tgid, library, link, since, started)
                    {
                        probes.detach_frees(old);
                    }
                    return;
                }
                Err(e) if crate::probes::process_gone(&e) => {
                    self.free_watches.unwatchable(tgid, library);
                    return;
                }
                Err(e) => {
                    warn!(pid = tgid, library, error = %format!("{e:#}"), "attaching free probes to one process; attaching them host-wide");
                    step = free_watch::Step::AttachHostWide;
                }
            }
        }
        if step == free_watch::Step::AttachHostWide {
            let since = match probes.attach_frees(library, None) {
                Ok(_) => {
                    info!(
                        library,
                        watched = self.free_watches.watched(),
                        "free probes for this library are host-wide from now on"
                    );
                    Some(clock::monotonic_ns())
                }
                Err(e) => {
                    warn!(library, error = %format!("{e:#}"), "free probes cannot be attached: every signature through this library is verified");
                    None
                }
            };
            for old in self.free_watches.host_wide(library, since) {
                probes.detach_frees(old);
            }
        }
    }

    /// Watched processes whose exit record was lost: forgotten like any
    /// exited process, so a reused pid is not taken as watched.
    pub fn sweep_free_watches(&mut self) {
        self.free_watches.retry_unwatchable();
        let gone = self
            .free_watches
            .gone(|tgid, started| free_watch::start_time(tgid) == Some(started));
        for tgid in gone {
            debug!(pid = tgid, "watched process gone without an exit record");
            self.ident.forget_process(tgid);
            self.unwatch_frees(tgid);
        }
        self.sync_known();
    }

    /// A process exited or exec'd: its free probes go.
    fn unwatch_frees(&mut self, tgid: u32) {
        let links = self.free_watches.forget(tgid);
        if links.is_empty() {
            return;
        }
        let mut probes = self.probes();
        for link in links {
            probes.detach_frees(link);
        }
    }

    /// Tells the probes which key objects the sensor has judged (they stop
    /// copying data for those) and which verdicts no longer hold.
    fn sync_known(&mut self) {
        if self.ident.learned.is_empty() && self.ident.retract.is_empty() {
            return;
        }
        let learned = std::mem::take(&mut self.ident.learned);
        let retract = std::mem::take(&mut self.ident.retract);
        let mut probes = self.probes();
        for (tgid, handle, generation) in learned {
            if let Err(e) = probes.set_known(tgid, handle, Some(generation)) {
                debug!(error = %e, "KNOWN insert");
            }
        }
        for (tgid, handle) in retract {
            // A failed delete only leaves the probes copying data for a
            // handle the sensor verifies anyway.
            if let Err(e) = probes.set_known(tgid, handle, None) {
                debug!(error = %e, "KNOWN delete");
            }
        }
    }
}

/// The library a probe record names, as an OCSF file, and the stack the
/// probed function belongs to.
pub fn library_of(probes: &Probes, index: u32, func: u8) -> (event::File, String) {
    let library = probes.library(index);
    let file = event::File::regular(library.as_ref().map_or("", |l| &l.shown_as));
    (
        file,
        library
            .map(|l| l.stack_of(func))
            .unwrap_or("unknown")
            .to_owned(),
    )
}

/// The remote and local ends of the connection a signature was made for.
/// The peer of a signature the probes could not name: the signing
/// process's only TCP connection, if it has exactly one
/// (`enrich::sockets`).
fn sole_connection_of(
    tgid: u32,
) -> (
    Option<event::NetworkEndpoint>,
    Option<event::NetworkEndpoint>,
) {
    let end = |a: std::net::SocketAddr| event::NetworkEndpoint {
        ip: a.ip().to_string(),
        port: Some(a.port()),
        ..Default::default()
    };
    match crate::enrich::sockets::sole_connection(std::path::Path::new("/proc"), tgid) {
        Some((remote, local)) => (Some(end(remote)), Some(end(local))),
        None => (None, None),
    }
}

fn endpoints(
    r: &SignRecord,
) -> (
    Option<event::NetworkEndpoint>,
    Option<event::NetworkEndpoint>,
) {
    if r.flags & sign_flags::HAS_PEER == 0 {
        return (None, None);
    }
    let p = &r.peer;
    let ip = |b: &[u8; 16]| -> Option<std::net::IpAddr> {
        match p.family {
            2 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()),
            10 => {
                let v6 = std::net::Ipv6Addr::from(*b);
                // A v4 client on a dual-stack socket: name it as v4.
                Some(v6.to_ipv4_mapped().map_or(v6.into(), Into::into))
            }
            _ => None,
        }
    };
    let end = |addr: &[u8; 16], port: u16| {
        ip(addr).map(|ip| event::NetworkEndpoint {
            ip: ip.to_string(),
            port: Some(port),
            ..Default::default()
        })
    };
    (
        end(&p.remote_addr, p.remote_port),
        end(&p.local_addr, p.local_port),
    )
}
