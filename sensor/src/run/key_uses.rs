//! Signatures: each probe record becomes one Key Use event naming the key,
//! and the processes that sign get their key-object frees watched so later
//! verdicts can be cached (`free_watch`).
//!
//! A signature whose key is unknown while something may still name it (the
//! search of its process is under way, or ECDSA recovery waits for a second
//! signature) is held back, at most `HOLD`, and checked against every key
//! learnt meanwhile: a server that was running before the sensor gets its
//! first events named, not only its later ones. A held event keeps the
//! time of its signature and is numbered when it is written, so it can
//! come after events of later signatures.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::programs::uprobe::UProbeLinkId;
use hashbrown::HashMap;
use keywarden_analyzer::event::{self, Event, KeyIdentity, KeyUse, Signature};
use keywarden_probe_types::{SignRecord, func, sign_flags};
use tracing::{debug, info, warn};

use super::{attribution::Attributor, emitter::Emitter};
use crate::{
    clock,
    discovery::signing_code::function_name,
    free_watch::{self, FreeWatches},
    keys::{
        identify::SearchRequest,
        identify::{Captured, Identifier, Judged, KnownKey, Searched, identified},
        inventory::{Inventory, Use},
        search::{Found, Job, Refused, Searcher},
    },
    probes::Probes,
    records::{SexpCopy, c_str},
};

/// How long an unknown signature is held for a key that may still come.
/// A search of a local server takes milliseconds, and a busy server signs
/// again well within this; an idle one is reported unknown, and its next
/// signature named.
const HOLD: Duration = Duration::from_secs(2);
/// Events held at once; beyond, the oldest is written as it stands.
const MAX_HELD: usize = 256;
/// Searches waiting for their user's turn in the search queue; beyond,
/// a search is refused and its process's signatures say so.
const MAX_WAITING_SEARCHES: usize = 4096;

/// A signature's event, held while its key may still be learnt.
struct Held {
    event: KeyUse,
    captured: Captured,
    until: Instant,
}

pub struct KeyUses {
    pub ident: Identifier,
    /// Processes whose key-object frees the probes see (attached when a
    /// process first signs).
    pub free_watches: FreeWatches<UProbeLinkId>,
    probes: Arc<Mutex<Probes>>,
    /// The search thread; `None` if it could not be started (then no
    /// process is searched, and the unknown reasons say so).
    searcher: Option<Searcher>,
    /// The search under way or done for each process (its job id).
    search_ids: HashMap<u32, u64>,
    next_search_id: u64,
    /// Searches started.
    pub searches: u64,
    /// Searches beyond their user's share of the search queue (the
    /// workers of a server started before the sensor, all signing at
    /// once), asked for again each turn, in order. Their processes stay
    /// `Searched::Running`: their keys may still come.
    waiting_searches: VecDeque<SearchRequest>,
    held: VecDeque<Held>,
    /// Processes found with no sole TCP connection, and until when that
    /// answer stands: the `/proc` lookup (a directory walk and the TCP
    /// tables) is not repeated for every signature of a process that signs
    /// without a connection (a signing loop), at most once a second.
    no_sole_connection: HashMap<u32, Instant>,
    /// Sole-connection lookups made this second, host-wide: each reads
    /// `/proc` (the signer's descriptors, the TCP table, its children),
    /// and many processes that sign without a receiving thread must not
    /// hold up every event.
    sole_lookups: LookupBudget,
}

/// Sole-connection lookups allowed a second. Past them a signature gets
/// no peer (the sensor does not guess), instead of waiting.
const SOLE_LOOKUPS_PER_SECOND: u32 = 20;

/// A count of lookups per one-second window.
#[derive(Default)]
struct LookupBudget {
    window: Option<Instant>,
    used: u32,
}

impl LookupBudget {
    /// Takes one lookup at `now`, if this second has one left.
    fn take(&mut self, now: Instant) -> bool {
        match self.window {
            Some(w) if now.duration_since(w) < Duration::from_secs(1) => {}
            _ => (self.window, self.used) = (Some(now), 0),
        }
        if self.used >= SOLE_LOOKUPS_PER_SECOND {
            return false;
        }
        self.used += 1;
        true
    }
}

/// How long "no sole connection" stands for a process (`KeyUses::peer`).
/// Only the absence is remembered: a peer found is never reused, so a
/// connection that changes cannot be named for a later signature.
const NO_SOLE_CONNECTION_FOR: Duration = Duration::from_secs(1);

impl KeyUses {
    /// `inventory`: the key inventory as the last run left it, which this
    /// run goes on recording into.
    pub fn new(probes: Arc<Mutex<Probes>>, inventory: Inventory) -> Self {
        let searcher = Searcher::start()
            .inspect_err(|e| {
                warn!(error = %e, "cannot start the search thread: keys of processes that loaded them before the sensor are found only in files")
            })
            .ok();
        let mut ident = Identifier::default();
        ident.record = inventory;
        Self {
            ident,
            free_watches: FreeWatches::new(free_watch::MAX_WATCHED_PROCESSES),
            probes,
            searcher,
            search_ids: HashMap::new(),
            waiting_searches: VecDeque::new(),
            next_search_id: 0,
            searches: 0,
            held: VecDeque::new(),
            no_sole_connection: HashMap::new(),
            sole_lookups: LookupBudget::default(),
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
        // Go keys are named by their public key, not watched for frees
        // (`func::Handle::GoKey`).
        let cacheable =
            func::is_go(r.func as u8) || self.free_watches.covers(tgid, r.library, r.task.ktime_ns);
        let judged = self.ident.judge(r, sig, cacheable);
        if !cacheable && Identifier::caches_by_handle(r) {
            self.watch_frees(tgid, r.library);
        }
        self.start_searches();
        self.sync_known();
        self.report(r, judged, r.sig_len, attr, out);
    }

    /// A libgcrypt signature: named by the public key of the S-expression
    /// it was made with, once it verifies under it (`keys::sexp`).
    pub fn on_sexp_sign(
        &mut self,
        r: &SignRecord,
        copy: &SexpCopy,
        attr: &mut Attributor,
        out: &mut Emitter,
    ) {
        let (key, sig_len) = self.ident.judge_sexp(r, copy);
        self.report(r, Judged::done(key), sig_len, attr, out);
    }

    /// Attributes a judged signature and sends its event (or holds it,
    /// while its key may still be found).
    fn report(
        &mut self,
        r: &SignRecord,
        judged: Judged,
        sig_len: u64,
        attr: &mut Attributor,
        out: &mut Emitter,
    ) {
        let tgid = r.task.tgid();
        let info = attr.process_at(tgid, r.task.ktime_ns);
        let who = attr.who(&r.task, &info);
        let (lib_file, library_kind) = library_of(&self.probes(), r.library, r.func as u8);
        let (peer, local) = match endpoints(r) {
            (None, None) if r.ret == 1 => self.sole_connection(tgid),
            known => known,
        };
        let md_name = (r.flags & sign_flags::HAS_MD_NAME != 0)
            .then(|| c_str(&r.md_name))
            .filter(|s| !s.is_empty());
        let u = KeyUse {
            time_ms: attr.wall_ms(r.task.ktime_ns),
            // Numbered when written (`emit`).
            seq: 0,
            who,
            library: lib_file,
            library_kind,
            function: function_name(r.func as u8).to_owned(),
            success: r.ret == 1,
            key: judged.key,
            signature: Signature {
                length: if r.ret == 1 { sig_len } else { 0 },
                digest: md_name,
            },
            peer,
            local,
        };
        match judged.retry {
            Some(captured) if self.may_still_be_named(&captured) => self.hold(u, captured, out),
            Some(captured) => {
                // Judged before its search was started or refused: the
                // reason as it stands now (a refused search says why).
                let mut u = u;
                u.key = KeyIdentity::unknown(self.ident.held_reason(&captured));
                record_use(&mut self.ident.record, &u);
                emit(u, out);
            }
            None => {
                record_use(&mut self.ident.record, &u);
                emit(u, out);
            }
        }
    }

    /// Whether a key may still come for a signature judged unknown: the
    /// search of its process is under way, or recovery waits for a second
    /// signature.
    fn may_still_be_named(&self, captured: &Captured) -> bool {
        captured.recovering.is_some()
            || self.ident.search_state(captured.tgid) == Some(&Searched::Running)
    }

    fn hold(&mut self, event: KeyUse, captured: Captured, out: &mut Emitter) {
        if self.held.len() >= MAX_HELD
            && let Some(oldest) = self.held.pop_front()
        {
            self.emit_unknown(oldest, out);
        }
        self.held.push_back(Held {
            event,
            captured,
            until: Instant::now() + HOLD,
        });
    }

    /// Writes a held event whose key did not come, with the reason as it
    /// stands now.
    fn emit_unknown(&self, mut h: Held, out: &mut Emitter) {
        h.event.key = KeyIdentity::unknown(self.ident.held_reason(&h.captured));
        emit(h.event, out);
    }

    /// Starts the searches `identify` asked for. A user with searches
    /// waiting for their turn keeps their order: theirs wait behind.
    fn start_searches(&mut self) {
        for req in std::mem::take(&mut self.ident.search_requests) {
            if self.waiting_searches.iter().any(|w| w.uid == req.uid) {
                self.wait_for_turn(req);
            } else {
                self.ask_search(req);
            }
        }
    }

    /// Asks the search thread for one search; false when it waits for its
    /// user's turn (`waiting_searches`).
    fn ask_search(&mut self, req: SearchRequest) -> bool {
        let outcome = match (&self.searcher, free_watch::start_time(req.tgid)) {
            (None, _) => Err(Refused::Other("the search thread is not running".into())),
            (_, None) => Err(Refused::Other("it had exited".into())),
            (Some(searcher), Some(started)) => {
                self.next_search_id += 1;
                let job = Job {
                    id: self.next_search_id,
                    tgid: req.tgid,
                    uid: req.uid,
                    started,
                    local_port: req.local_port,
                };
                searcher.ask(job).map(|()| job.id)
            }
        };
        match outcome {
            Ok(id) => {
                debug!(pid = req.tgid, "searching the process for its keys");
                self.searches += 1;
                self.search_ids.insert(req.tgid, id);
                true
            }
            Err(Refused::UserShare(why)) => {
                debug!(
                    pid = req.tgid,
                    why, "the process waits for its turn to be searched"
                );
                self.wait_for_turn(req);
                false
            }
            Err(Refused::Other(why)) => {
                debug!(pid = req.tgid, why, "not searching the process");
                self.ident.set_search(req.tgid, Searched::NotDone(why));
                true
            }
        }
    }

    fn wait_for_turn(&mut self, req: SearchRequest) {
        if self.waiting_searches.len() >= MAX_WAITING_SEARCHES {
            let why = format!(
                "{MAX_WAITING_SEARCHES} other processes were waiting for their turn to be searched"
            );
            self.ident.set_search(req.tgid, Searched::NotDone(why));
        } else {
            self.waiting_searches.push_back(req);
        }
    }

    /// Asks again for the searches waiting for their user's turn, once per
    /// turn of the event loop; a user still over their share keeps the
    /// rest of theirs waiting, in order.
    fn retry_waiting_searches(&mut self) {
        let mut blocked: Vec<u32> = Vec::new();
        for _ in 0..self.waiting_searches.len() {
            let Some(req) = self.waiting_searches.pop_front() else {
                break;
            };
            if blocked.contains(&req.uid) {
                self.waiting_searches.push_back(req);
            } else if !self.ask_search(req) {
                blocked.push(req.uid);
            }
        }
    }

    /// Takes in what searches found, checks held signatures against every
    /// key learnt since, and writes held events that are due. Called on
    /// every turn of the event loop.
    pub fn poll(&mut self, out: &mut Emitter) {
        let found = self
            .searcher
            .as_ref()
            .map(Searcher::try_found)
            .unwrap_or_default();
        for f in found {
            self.on_found(f);
        }
        self.retry_waiting_searches();
        self.sync_known();
        self.resolve_held(out);
        // Due, or nothing more to wait for (the search is over and found
        // nothing that verifies, and no recovery waits).
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            let h = &self.held[i];
            if h.until <= now || !self.may_still_be_named(&h.captured) {
                if let Some(h) = self.held.remove(i) {
                    self.emit_unknown(h, out);
                }
            } else {
                i += 1;
            }
        }
    }

    /// At exit: waits, at most until the last held event is due, for the
    /// searches its events wait on, then writes every held event.
    pub fn finish(&mut self, out: &mut Emitter) {
        while let Some(last) = self.held.iter().map(|h| h.until).max() {
            let waiting_on_search = self
                .held
                .iter()
                .any(|h| self.ident.search_state(h.captured.tgid) == Some(&Searched::Running));
            let now = Instant::now();
            if !waiting_on_search || now >= last {
                break;
            }
            let found = match &self.searcher {
                Some(s) => s.wait_found(last - now),
                None => None,
            };
            match found {
                Some(f) => {
                    self.on_found(f);
                    self.sync_known();
                    self.resolve_held(out);
                }
                None => break,
            }
        }
        while let Some(h) = self.held.pop_front() {
            self.emit_unknown(h, out);
        }
    }

    /// A search's result. Keys found for a process image since replaced
    /// (an exec) or gone still join the host's keys.
    fn on_found(&mut self, found: Found) {
        match found {
            Found::Keys {
                id,
                tgid,
                keys,
                certificates,
                source,
            } => {
                if self.search_ids.get(&tgid) == Some(&id) {
                    self.ident.add_process_keys_from(tgid, keys, &source);
                } else {
                    for k in keys {
                        self.ident.add_inventory_from(k, &source);
                    }
                }
                self.ident.add_certificates(&certificates, &source);
            }
            Found::Done { id, tgid, outcome } => {
                if self.search_ids.get(&tgid) == Some(&id) {
                    self.ident.set_search(tgid, outcome);
                }
            }
        }
    }

    /// Checks each held signature against the keys learnt since the last
    /// call; one that verifies is written, named.
    fn resolve_held(&mut self, out: &mut Emitter) {
        let fresh = self.ident.take_fresh();
        if fresh.is_empty() || self.held.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.held.len() {
            let tgid = self.held[i].captured.tgid;
            // The process's own entry of a key first: it says where this
            // process's key came from.
            let own = |k: &&Arc<KnownKey>| self.ident.holds(tgid, k);
            let mut seen = std::collections::HashSet::with_capacity(fresh.len());
            let ordered: Vec<Arc<KnownKey>> = fresh
                .iter()
                .filter(own)
                .chain(fresh.iter().filter(|k| !own(k)))
                .filter(|k| seen.insert(k.info.spki_sha256.as_str()))
                .cloned()
                .collect();
            let named = self
                .ident
                .name_held(&self.held[i].captured, &ordered)
                .cloned();
            match named {
                Some(k) => {
                    if let Some(mut h) = self.held.remove(i) {
                        debug!(pid = tgid, spki_sha256 = %k.info.spki_sha256, from = %k.source.describe(), "a held signature is named");
                        h.event.key = identified(&k, k.verified_as());
                        record_use(&mut self.ident.record, &h.event);
                        emit(h.event, out);
                    }
                }
                None => i += 1,
            }
        }
    }

    /// A process exec'd or exited: what was known of its key objects goes,
    /// and so do its free probes.
    pub fn forget_process(&mut self, tgid: u32) {
        self.no_sole_connection.remove(&tgid);
        self.ident.forget_process(tgid);
        self.search_ids.remove(&tgid);
        self.waiting_searches.retain(|w| w.tgid != tgid);
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
            self.search_ids.remove(&tgid);
            self.waiting_searches.retain(|w| w.tgid != tgid);
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

/// A signature's use of its key, for the key inventory, when the event
/// names the key. (An event written unknown is no use of any key the
/// inventory could name.)
fn record_use(inventory: &mut Inventory, u: &KeyUse) {
    if let Some(used) = Use::of(u) {
        inventory.used(&used);
    }
}

/// Numbers a Key Use and hands it to the pipeline.
fn emit(mut u: KeyUse, out: &mut Emitter) {
    u.seq = out.next_seq();
    let ev = Event::key_use(&out.origin, u);
    out.emit(ev, None);
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
impl KeyUses {
    /// The peer of a signature the probes could not name
    /// (`sole_connection_of`), unless the process was just found to have
    /// none.
    fn sole_connection(&mut self, tgid: u32) -> Endpoints {
        let now = Instant::now();
        if self
            .no_sole_connection
            .get(&tgid)
            .is_some_and(|&until| now < until)
        {
            return (None, None);
        }
        if !self.sole_lookups.take(now) {
            return (None, None);
        }
        let found = sole_connection_of(tgid);
        if found.0.is_none() {
            self.no_sole_connection
                .insert(tgid, now + NO_SOLE_CONNECTION_FOR);
        } else {
            self.no_sole_connection.remove(&tgid);
        }
        found
    }
}

/// A signature's (peer, local) ends.
type Endpoints = (
    Option<event::NetworkEndpoint>,
    Option<event::NetworkEndpoint>,
);

fn sole_connection_of(tgid: u32) -> Endpoints {
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

fn endpoints(r: &SignRecord) -> Endpoints {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sole_connection_lookups_are_bounded_per_second() {
        let t0 = Instant::now();
        let mut b = LookupBudget::default();
        for _ in 0..SOLE_LOOKUPS_PER_SECOND {
            assert!(b.take(t0));
        }
        assert!(
            !b.take(t0 + Duration::from_millis(999)),
            "this second is spent"
        );
        assert!(
            b.take(t0 + Duration::from_secs(1)),
            "the next second has its own"
        );
    }
}
