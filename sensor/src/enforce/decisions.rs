//! The live sensor's enforcement decisions, taken on the event thread:
//! which key files are protected (their openers are held until judged),
//! which processes are condemned (killed in the kernel if they try to
//! sign), and the report of a kill the probe carried out.

use std::sync::{Arc, Mutex, MutexGuard};

use keywarden_analyzer::event::{self, Event, IdentifiedBy, KeyUse, Signature};
use keywarden_probe_types::{KilledRecord, Task};
use tracing::{debug, error, info, warn};

use super::{Condemnation, Enforcer};
use crate::{
    discovery::signing_code::function_name,
    enrich::process::ProcessInfo,
    keys::{identify::identity_of, material::KeyFile},
    probes::Probes,
    run::{attribution::Attributor, emitter::Emitter, key_uses::library_of},
};

pub struct Decisions {
    pub enforcer: Enforcer,
    probes: Arc<Mutex<Probes>>,
    /// Basenames already in the kernel's `PROTECTED_NAMES`.
    protected_names: hashbrown::HashSet<String>,
    /// Protected keys found in a file (so their openers can be held).
    protected_found: hashbrown::HashSet<String>,
}

impl Decisions {
    pub fn new(enforcer: Enforcer, probes: Arc<Mutex<Probes>>) -> Self {
        Self {
            enforcer,
            probes,
            protected_names: hashbrown::HashSet::new(),
            protected_found: hashbrown::HashSet::new(),
        }
    }

    fn probes(&self) -> MutexGuard<'_, Probes> {
        self.probes.lock().expect("probes lock")
    }

    /// New rules (SIGHUP): what was found protected under the old ones is
    /// looked for again.
    pub fn replace(&mut self, enforcer: Enforcer) {
        self.enforcer = enforcer;
        self.protected_found.clear();
    }

    /// Lets a process held by the open probe at `held_at_ns` go on.
    pub fn release(&mut self, tgid: u32, held_at_ns: u64) {
        if let Err(e) = crate::held::signal(tgid, held_at_ns, libc::SIGCONT) {
            debug!(pid = tgid, error = %e, "SIGCONT");
        }
        self.probes().forget_held(tgid);
    }

    /// A file holding a protected private key: opening any file of its name
    /// holds the opener until judged (`judge_key_load`).
    pub fn protect_file(&mut self, path: &str, k: &KeyFile) {
        if !k.has_private_key
            || !k
                .keys
                .iter()
                .any(|key| self.enforcer.protecting(&key.spki_sha256).next().is_some())
        {
            return;
        }
        for key in &k.keys {
            if self.enforcer.protecting(&key.spki_sha256).next().is_some() {
                self.protected_found.insert(key.spki_sha256.clone());
            }
        }
        let name = path.rsplit('/').next().unwrap_or(path).to_owned();
        if self.protected_names.contains(&name) {
            return;
        }
        match self.probes().protect_name(&name) {
            Ok(()) => info!(file = %path, "protected key file: openers are held until judged"),
            Err(e) => warn!(file = %path, error = %e, "cannot protect key file"),
        }
        self.protected_names.insert(name);
    }

    /// Kill rules whose key no `key_paths` file holds cannot stop the first
    /// signature; say so at start.
    pub fn warn_unprotectable(&self) {
        for spki in self
            .enforcer
            .protected_spkis()
            .filter(|s| !self.protected_found.contains(*s))
        {
            let rules: Vec<&str> = self
                .enforcer
                .protecting(spki)
                .map(|r| r.id.as_str())
                .collect();
            warn!(
                key = %spki,
                rules = %rules.join(","),
                "no file under key_paths holds this protected key: a process is held and judged when it opens a file holding it, otherwise stopped right after its first signature"
            );
        }
    }

    /// A process opened a file holding a private key. If a kill rule
    /// protects that key and does not allow this process, condemn it: its
    /// next signature attempt is killed in the kernel.
    pub fn judge_key_load(
        &mut self,
        task: &Task,
        info: &ProcessInfo,
        k: &KeyFile,
        path: &str,
        attr: &mut Attributor,
        origin: &event::Origin,
    ) {
        let tgid = task.tgid();
        if self.enforcer.is_condemned(tgid) {
            return;
        }
        for key in &k.keys {
            if self.enforcer.protecting(&key.spki_sha256).next().is_none() {
                continue;
            }
            // The use the rule would see, less what only a signature tells.
            let who = attr.who(task, info);
            let probe = Event::key_use(
                origin,
                KeyUse {
                    time_ms: attr.wall_ms(task.ktime_ns),
                    seq: 0,
                    who,
                    library: event::File::default(),
                    library_kind: String::new(),
                    function: String::new(),
                    success: true,
                    key: identity_of(key, path, IdentifiedBy::KeyFile),
                    signature: Signature {
                        length: 0,
                        digest: None,
                    },
                    peer: None,
                    local: None,
                },
            );
            let rule = self
                .enforcer
                .protecting(&key.spki_sha256)
                .find(|r| r.matches(&probe))
                .map(|r| r.id.clone());
            if let Some(rule) = rule {
                let verdict = self.enforcer.condemn(Condemnation {
                    tgid,
                    rule: rule.clone(),
                    key: key.clone(),
                    file: path.to_owned(),
                });
                match self.probes().set_verdict(tgid, Some(verdict)) {
                    Ok(()) => {
                        info!(pid = tgid, rule = %rule, file = %path, "process may not sign with this key: it is killed if it tries")
                    }
                    Err(e) => error!(pid = tgid, error = %e, "cannot condemn process"),
                }
                return;
            }
        }
    }

    /// The probe killed a condemned process as it began to sign: a failed
    /// Key Use that says why.
    pub fn on_killed(&mut self, k: &KilledRecord, attr: &mut Attributor, out: &mut Emitter) {
        let tgid = k.task.tgid();
        let Some(c) = self.enforcer.condemnation(k.verdict).cloned() else {
            // Condemned after a use (`respond::Live`): already reported.
            return;
        };
        let info = attr.process_at(tgid, k.task.ktime_ns);
        let who = attr.who(&k.task, &info);
        let (library, library_kind) = library_of(&self.probes(), k.library, k.func as u8);
        let u = KeyUse {
            time_ms: attr.wall_ms(k.task.ktime_ns),
            seq: out.next_seq(),
            who,
            library,
            library_kind,
            function: function_name(k.func as u8).to_owned(),
            success: false,
            key: identity_of(&c.key, &c.file, IdentifiedBy::KeyFile),
            signature: Signature {
                length: 0,
                digest: None,
            },
            peer: None,
            local: None,
        };
        let mut ev = Event::key_use(&out.origin, u);
        ev.status_detail = Some(format!(
            "killed (SIGKILL) before signing: rule {} does not allow this process to use the key it loaded from {}",
            c.rule, c.file
        ));
        ev.message = format!(
            "{} (pid {}) was killed before signing with {} key {} (rule {})",
            ev.actor.process.name,
            tgid,
            c.key.algorithm,
            &c.key.spki_sha256[..16],
            c.rule
        );
        out.emit(ev, Some(&c.rule));
    }
}
