//! Acting on rules: findings, `kill` and `block`.
//!
//! `kill` has two paths. When a process opens a file holding a key that a
//! kill rule protects, and the rule does not allow it, the sensor
//! *condemns* it: the `VERDICT` map makes the signing uprobe SIGKILL it as it
//! enters a signing call, before a signature exists. To win the race with a
//! fast signer, opening any file whose name is that of a protected key file
//! holds (SIGSTOPs) the opener until the sensor has judged it. A key the
//! sensor first meets in a signature (loaded from memory, an environment
//! variable, a pipe) is identified only after it signed: that process is
//! killed from user space right after, and condemned so it signs no more.
//!
//! `block` is `guard.rs` (fanotify). A `deny` that fails the signing call
//! but keeps the process was investigated and is not possible on the kernels
//! keywarden targets: see docs/design.md.

pub mod decisions;
pub mod guard;

use anyhow::Result;
use globset::{GlobSet, GlobSetBuilder};
use hashbrown::HashMap;
use keywarden_analyzer::rules::{Action, Rule, RuleSet, path_glob};

use crate::keys::material::KeyInfo;

/// Why a process may not sign: the rule, and the key file it loaded.
#[derive(Clone)]
pub struct Condemnation {
    pub tgid: u32,
    pub rule: String,
    pub key: KeyInfo,
    pub file: String,
}

pub struct Enforcer {
    pub rules: RuleSet,
    /// SPKI → indices of kill rules that name it in `key.spki_sha256`.
    protected: HashMap<String, Vec<usize>>,
    /// Host paths block rules guard: their opens are reported by the guard,
    /// with a verdict, instead of by the open probe.
    guarded: GlobSet,
    condemned: HashMap<u32, Condemnation>,
    next_verdict: u32,
}

impl Enforcer {
    pub fn new(rules: RuleSet) -> Result<Self> {
        let mut protected: HashMap<String, Vec<usize>> = HashMap::new();
        // Only rules decidable from the key load alone kill before the
        // signature; deviation and threshold rules need the use itself.
        for (i, r) in rules.rules.iter().enumerate() {
            if r.has(Action::Kill) && r.is_stateless() {
                for spki in r.values_of("key.spki_sha256").unwrap_or_default() {
                    protected.entry(spki.clone()).or_default().push(i);
                }
            }
        }
        let mut b = GlobSetBuilder::new();
        for r in rules.with_action(Action::Block) {
            for g in r.values_of("file.path").unwrap_or_default() {
                b.add(path_glob(g)?);
            }
        }
        Ok(Enforcer {
            rules,
            protected,
            guarded: b.build()?,
            condemned: HashMap::new(),
            next_verdict: 1,
        })
    }

    pub fn protects_any(&self) -> bool {
        !self.protected.is_empty()
    }

    pub fn protected_spkis(&self) -> impl Iterator<Item = &str> {
        self.protected.keys().map(String::as_str)
    }

    /// Kill rules protecting this key.
    pub fn protecting(&self, spki: &str) -> impl Iterator<Item = &Rule> {
        self.protected
            .get(spki)
            .into_iter()
            .flatten()
            .map(|&i| &self.rules.rules[i])
    }

    pub fn is_guarded(&self, host_path: &str) -> bool {
        !self.guarded.is_empty() && self.guarded.is_match(host_path)
    }

    /// Records a condemnation; returns its `VERDICT` value.
    pub fn condemn(&mut self, c: Condemnation) -> u32 {
        let v = self.next_verdict;
        self.next_verdict = self.next_verdict.wrapping_add(1).max(1);
        self.condemned.insert(v, c);
        v
    }

    pub fn condemnation(&self, verdict: u32) -> Option<&Condemnation> {
        self.condemned.get(&verdict)
    }

    pub fn is_condemned(&self, tgid: u32) -> bool {
        self.condemned.values().any(|c| c.tgid == tgid)
    }

    /// The process exited (or exec'd): its condemnations are void.
    pub fn forget(&mut self, tgid: u32) {
        self.condemned.retain(|_, c| c.tgid != tgid);
    }
}

/// Which enforcement mechanisms this kernel allows, said once at start.
pub fn report_mechanisms(rules: &RuleSet) {
    use tracing::info;
    let lsm = match aya::sys::is_program_supported(aya::programs::ProgramType::Lsm(
        aya::programs::LsmAttachType::Mac,
    )) {
        Ok(true) => "allowed by this kernel, not used yet (fanotify covers block)".to_owned(),
        Ok(false) => "refused by this kernel".to_owned(),
        Err(e) => format!("refused by this kernel ({e})"),
    };
    let kills = rules.with_action(Action::Kill).count();
    let blocks = rules.with_action(Action::Block).count();
    info!(
        rules = rules.rules.len(),
        kill_rules = kills,
        block_rules = blocks,
        "enforcement: kill = bpf_send_signal(SIGKILL) in the signing uprobes; block = fanotify permission events; BPF LSM {lsm}; deny (fail the call, keep the process) unavailable"
    );
}
