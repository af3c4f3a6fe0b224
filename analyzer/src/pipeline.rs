//! The correlation pipeline: events in, events (enriched) and rule firings
//! out, across shards that each own the state of their keys.
//!
//! ```text
//! submit ─▶ [bounded queue, shard = hash(key) % N] ─▶ shard: geo → baseline → rules ─▶ [bounded queue] ─▶ drain
//! ```
//!
//! A key's events always go to the same shard, so its baseline and
//! threshold counters have exactly one owner and need no lock. Queues are
//! crossbeam bounded channels (lock-free in the common case).
//!
//! Full-queue policy, per stage:
//! * **input** (`submit`): with `Overflow::Drop`, the event is counted in
//!   `dropped` and not analysed; the caller (the sensor's ring reader) never
//!   waits. `Overflow::Block` waits instead (replaying a file loses nothing).
//! * **output**: a shard waits for the drain. That backs up into the input
//!   queue, where the input policy applies; the ring reader still never
//!   blocks.

// Results stay `Box<Output>` in vectors too: unboxing would move each
// ~2 KB event again (see `Output`).
#![allow(clippy::vec_box)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use hashbrown::HashMap;

use crate::{
    baseline::{BaselineStore, Deviation, KeyBaseline, Observation},
    event::Event,
    geo::{Geo, GeoCache, GeoView},
    rules::{RuleSet, Thresholds, Windows},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    Drop,
    Block,
}

pub struct Config {
    pub shards: usize,
    /// Capacity of each shard's input queue and of the output queue.
    pub queue: usize,
    /// How long after its first use a key's baseline learns silently.
    pub learning_ms: i64,
    pub overflow: Overflow,
    pub geo: Option<Arc<Geo>>,
    /// GeoIP answers each shard keeps (`GeoCache`); 0 turns the cache off.
    pub geo_cache: usize,
    pub baselines: BaselineStore,
}

/// A shard's GeoIP cache size: 65,536 answers of ~100 bytes, a few MB.
pub const GEO_CACHE_ENTRIES: usize = 65_536;

/// One event to analyse. `killed_by` names the rule whose kill the probe
/// already carried out (so nobody kills again).
#[derive(Debug)]
pub struct Input {
    pub event: Event,
    pub killed_by: Option<String>,
}

/// One rule firing, owned (rules may be reloaded while it is in flight).
#[derive(Clone, Debug)]
pub struct Fired {
    pub rule: Arc<crate::rules::Rule>,
    pub deviations: Vec<Deviation>,
    pub count: Option<u64>,
    /// The key's baseline before this event, for deviation rules: shared
    /// by every rule the event fired.
    pub baseline: Option<Arc<KeyBaseline>>,
}

impl Fired {
    /// The Detection Finding for this firing of `evidence`.
    pub fn finding(
        &self,
        origin: &crate::event::Origin,
        time_ms: i64,
        seq: u64,
        evidence: &Event,
        responses: Vec<crate::event::Response>,
    ) -> Event {
        let mut f = Event::detection_finding(
            origin,
            time_ms,
            seq,
            &self.rule.reference(),
            evidence,
            responses,
        );
        if !self.deviations.is_empty() || self.count.is_some() {
            f.unmapped.analysis = Some(crate::event::Analysis {
                deviations: self
                    .deviations
                    .iter()
                    .map(|d| d.name().to_owned())
                    .collect(),
                baseline: self
                    .baseline
                    .as_deref()
                    .map(crate::event::BaselineSnapshot::from),
                count: self.count,
                window_seconds: self.rule.threshold.map(|t| (t.window_ms / 1000) as u64),
            });
        }
        f
    }
}

/// An analysed event and the rules it fired. The pipeline boxes each event
/// once, at `submit`, and the shard enriches and answers in that same box:
/// an `Event` is about 2 KB, and moving it by value through a submit, a
/// shard and a drain cost a quarter of a shard's time in `memmove`.
#[derive(Debug)]
pub struct Output {
    pub event: Event,
    pub killed_by: Option<String>,
    pub fired: Vec<Fired>,
}

/// Counters of one stage, readable while it runs.
#[derive(Default)]
pub struct StageStats {
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    pub processed: AtomicU64,
    /// Events whose analysis was timed (one in `TIMED_EVERY`), and their
    /// total and longest time.
    pub timed: AtomicU64,
    pub latency_ns_total: AtomicU64,
    pub latency_ns_max: AtomicU64,
}

/// One event in this many is timed. Reading the clock twice per event was
/// 5% of a shard's time; a sample gives the same mean.
pub const TIMED_EVERY: u64 = 16;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageSnapshot {
    pub received: u64,
    pub dropped: u64,
    pub processed: u64,
    pub timed: u64,
    pub latency_ns_total: u64,
    pub latency_ns_max: u64,
}

impl StageSnapshot {
    /// Mean analysis time per event (of the timed sample), ns.
    pub fn mean_latency_ns(&self) -> u64 {
        self.latency_ns_total / self.timed.max(1)
    }
}

impl StageStats {
    pub fn snapshot(&self) -> StageSnapshot {
        StageSnapshot {
            received: self.received.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            processed: self.processed.load(Ordering::Relaxed),
            timed: self.timed.load(Ordering::Relaxed),
            latency_ns_total: self.latency_ns_total.load(Ordering::Relaxed),
            latency_ns_max: self.latency_ns_max.load(Ordering::Relaxed),
        }
    }
}

enum Msg {
    /// Boxed once at submit; `fired` is filled in place.
    Event(Box<Output>),
    /// Send a copy of the shard's baselines.
    Snapshot(Sender<BaselineStore>),
    /// Forget one key's baseline (or all with `None`).
    Reset(Option<String>),
}

/// Rules shared with the shards; replaced whole on reload.
struct SharedRules {
    generation: AtomicU64,
    current: Mutex<Arc<RuleSetShared>>,
}

/// A rule set with each rule behind an `Arc`, so firings can own them.
struct RuleSetShared {
    set: RuleSet,
    arcs: Vec<Arc<crate::rules::Rule>>,
    /// Some rule has a `deviation`, so findings carry the baseline.
    wants_baseline: bool,
}

impl RuleSetShared {
    fn new(set: RuleSet) -> Self {
        let arcs = set.rules.iter().cloned().map(Arc::new).collect();
        let wants_baseline = set.rules.iter().any(|r| !r.deviations.is_empty());
        RuleSetShared {
            set,
            arcs,
            wants_baseline,
        }
    }
}

pub struct Pipeline {
    inputs: Vec<Sender<Msg>>,
    /// Boxed for the same reason as inputs.
    output: Receiver<Box<Output>>,
    workers: Vec<JoinHandle<()>>,
    rules: Arc<SharedRules>,
    overflow: Overflow,
    /// One per shard.
    pub stats: Vec<Arc<StageStats>>,
}

/// Which shard owns an event: by key, else by file, else by process.
fn shard_of(event: &Event, shards: usize) -> usize {
    match event
        .unmapped
        .key
        .as_ref()
        .and_then(|k| k.spki_sha256.as_deref())
    {
        Some(spki) => shard_for(spki, shards),
        None => match &event.file {
            Some(f) => shard_for(&f.path, shards),
            None => event.actor.process.pid as usize % shards,
        },
    }
}

fn shard_for<T: std::hash::Hash + ?Sized>(v: &T, shards: usize) -> usize {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

impl Pipeline {
    pub fn start(rules: RuleSet, cfg: Config) -> Self {
        let shards = cfg.shards.max(1);
        let shared = Arc::new(SharedRules {
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(RuleSetShared::new(rules))),
        });
        let (out_tx, out_rx) = bounded(cfg.queue.max(1));
        // Hand each shard the baselines of its keys.
        let mut stores: Vec<HashMap<String, KeyState>> =
            (0..shards).map(|_| HashMap::new()).collect();
        for (spki, baseline) in cfg.baselines.keys {
            stores[shard_for(spki.as_str(), shards)].insert(
                spki,
                KeyState {
                    baseline,
                    windows: Windows::default(),
                },
            );
        }
        let mut inputs = Vec::new();
        let mut workers = Vec::new();
        let mut stats = Vec::new();
        for (i, store) in stores.into_iter().enumerate() {
            let (tx, rx) = bounded(cfg.queue.max(1));
            let st = Arc::new(StageStats::default());
            let shard = Shard {
                rx,
                out: out_tx.clone(),
                rules: shared.clone(),
                seen_generation: u64::MAX,
                current: None,
                thresholds: Thresholds::default(),
                keys: store,
                learning_ms: cfg.learning_ms,
                geo: cfg.geo.clone(),
                geo_view: None,
                geo_cache: GeoCache::new(cfg.geo_cache),
                stats: st.clone(),
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("keywarden-shard-{i}"))
                    .spawn(move || shard.run())
                    .expect("spawn pipeline shard"),
            );
            inputs.push(tx);
            stats.push(st);
        }
        Pipeline {
            inputs,
            output: out_rx,
            workers,
            rules: shared,
            overflow: cfg.overflow,
            stats,
        }
    }

    /// Hands an event to its shard. Under `Overflow::Drop` a full queue
    /// gives the event back (counted in `dropped`), so the caller can still
    /// write it unanalysed: nothing is lost, only not correlated.
    pub fn submit(&self, input: Input) -> Result<(), Box<Output>> {
        let i = shard_of(&input.event, self.inputs.len());
        self.stats[i].received.fetch_add(1, Ordering::Relaxed);
        let msg = Msg::Event(Box::new(Output {
            event: input.event,
            killed_by: input.killed_by,
            fired: Vec::new(),
        }));
        let unsent = match self.overflow {
            Overflow::Block => self.inputs[i].send(msg).err().map(|e| e.0),
            Overflow::Drop => match self.inputs[i].try_send(msg) {
                Ok(()) => None,
                Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Some(m),
            },
        };
        match unsent {
            None => Ok(()),
            Some(Msg::Event(input)) => {
                self.stats[i].dropped.fetch_add(1, Ordering::Relaxed);
                Err(input)
            }
            Some(_) => unreachable!("only events are submitted"),
        }
    }

    /// Events in the queues now (every shard's input and the output): at
    /// most `(shards + 1) * queue`, whatever comes in.
    pub fn queued(&self) -> usize {
        self.inputs.iter().map(|q| q.len()).sum::<usize>() + self.output.len()
    }

    /// The shards' input queues together: events waiting in them now, and
    /// how many they hold at most. Apart from `output_queue`, because the
    /// two fill for different reasons: full inputs mean the shards are
    /// slow, a full output that nobody drains them (the sensor's metrics
    /// show both).
    pub fn input_queue(&self) -> (usize, usize) {
        let waiting = self.inputs.iter().map(|q| q.len()).sum();
        let capacity = self.inputs.iter().filter_map(|q| q.capacity()).sum();
        (waiting, capacity)
    }

    /// The output queue: results not drained yet, and how many it holds at
    /// most.
    pub fn output_queue(&self) -> (usize, usize) {
        (self.output.len(), self.output.capacity().unwrap_or(0))
    }

    /// Results ready now (never waits).
    pub fn try_drain(&self) -> impl Iterator<Item = Box<Output>> + '_ {
        self.output.try_iter()
    }

    /// Waits up to `timeout` for a result, then takes whatever else is ready.
    pub fn drain_timeout(&self, timeout: std::time::Duration) -> Vec<Box<Output>> {
        let mut out: Vec<Box<Output>> = self.output.recv_timeout(timeout).into_iter().collect();
        out.extend(self.try_drain());
        out
    }

    /// Replaces the rules; shards pick them up before their next event.
    /// Threshold counters start afresh; baselines are kept.
    pub fn reload(&self, rules: RuleSet) {
        *self.rules.current.lock().expect("rules lock") = Arc::new(RuleSetShared::new(rules));
        self.rules.generation.fetch_add(1, Ordering::Release);
    }

    /// Sends a control message to shard `i`, taking results meanwhile: a
    /// shard waits on a full output queue, so waiting for its input queue
    /// without draining could wait forever.
    fn send_draining(&self, i: usize, mut msg: Msg, outputs: &mut Vec<Box<Output>>) -> bool {
        loop {
            match self.inputs[i].try_send(msg) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    outputs.extend(self.try_drain());
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Waits for a shard's reply, taking results meanwhile.
    fn await_draining<T>(&self, rx: &Receiver<T>, outputs: &mut Vec<Box<Output>>) -> Option<T> {
        loop {
            outputs.extend(self.try_drain());
            match rx.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(v) => return Some(v),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// A copy of every shard's baselines, once each shard has reached the
    /// request in its queue. Results taken while waiting are returned for
    /// the caller to handle.
    pub fn baselines(&self) -> (BaselineStore, Vec<Box<Output>>) {
        let mut all = BaselineStore::default();
        let mut outputs = Vec::new();
        for i in 0..self.inputs.len() {
            let (reply_tx, reply_rx) = bounded(1);
            if self.send_draining(i, Msg::Snapshot(reply_tx), &mut outputs)
                && let Some(s) = self.await_draining(&reply_rx, &mut outputs)
            {
                all.merge(s);
            }
        }
        outputs.extend(self.try_drain());
        (all, outputs)
    }

    /// Forgets one key's baseline, or every baseline. Returns results taken
    /// while queueing the request.
    pub fn reset_baseline(&self, spki: Option<&str>) -> Vec<Box<Output>> {
        let mut outputs = Vec::new();
        for i in 0..self.inputs.len() {
            self.send_draining(i, Msg::Reset(spki.map(str::to_owned)), &mut outputs);
        }
        outputs
    }

    /// Stops accepting events, lets the shards finish, and returns what
    /// they produced that nobody drained yet, with the final baselines.
    pub fn finish(self) -> (Vec<Box<Output>>, BaselineStore) {
        let (store, mut rest) = self.baselines();
        drop(self.inputs);
        for w in self.workers {
            while !w.is_finished() {
                rest.extend(self.output.try_iter());
                std::thread::yield_now();
            }
            let _ = w.join();
        }
        rest.extend(self.output.try_iter());
        (rest, store)
    }
}

/// A shard's state for one key: what is normal for it, and its threshold
/// counts. Kept together so an event looks its key up once.
struct KeyState {
    baseline: KeyBaseline,
    windows: Windows,
}

struct Shard {
    rx: Receiver<Msg>,
    out: Sender<Box<Output>>,
    rules: Arc<SharedRules>,
    seen_generation: u64,
    current: Option<Arc<RuleSetShared>>,
    /// Counts of threshold rules for events without a key state below.
    thresholds: Thresholds,
    /// What the shard knows of each of its keys.
    keys: HashMap<String, KeyState>,
    learning_ms: i64,
    geo: Option<Arc<Geo>>,
    geo_view: Option<GeoView>,
    geo_cache: GeoCache,
    stats: Arc<StageStats>,
}

impl Shard {
    fn run(mut self) {
        let mut processed = 0u64;
        while let Ok(msg) = self.rx.recv() {
            match msg {
                Msg::Event(mut work) => {
                    if processed.is_multiple_of(TIMED_EVERY) {
                        let started = Instant::now();
                        self.process(&mut work);
                        let ns = started.elapsed().as_nanos() as u64;
                        self.stats.timed.fetch_add(1, Ordering::Relaxed);
                        self.stats.latency_ns_total.fetch_add(ns, Ordering::Relaxed);
                        self.stats.latency_ns_max.fetch_max(ns, Ordering::Relaxed);
                    } else {
                        self.process(&mut work);
                    }
                    processed += 1;
                    self.stats.processed.fetch_add(1, Ordering::Relaxed);
                    if self.out.send(work).is_err() {
                        return;
                    }
                }
                Msg::Snapshot(reply) => {
                    let _ = reply.send(BaselineStore {
                        keys: self
                            .keys
                            .iter()
                            .filter(|(_, k)| k.baseline.uses > 0)
                            .map(|(spki, k)| (spki.clone(), k.baseline.clone()))
                            .collect(),
                    });
                }
                // A reset forgets what was learned; threshold counts go on.
                Msg::Reset(None) => {
                    for k in self.keys.values_mut() {
                        k.baseline = KeyBaseline::fresh(&k.baseline.spki_sha256);
                    }
                }
                Msg::Reset(Some(spki)) => {
                    if let Some(k) = self.keys.get_mut(&spki) {
                        k.baseline = KeyBaseline::fresh(&spki);
                    }
                }
            }
        }
    }

    fn rules(&mut self) -> Arc<RuleSetShared> {
        let generation = self.rules.generation.load(Ordering::Acquire);
        if generation != self.seen_generation || self.current.is_none() {
            self.current = Some(self.rules.current.lock().expect("rules lock").clone());
            self.seen_generation = generation;
            // Counts belong to rules by position: new rules count afresh.
            self.thresholds = Thresholds::default();
            for k in self.keys.values_mut() {
                k.windows.clear();
            }
        }
        self.current.clone().expect("rules loaded")
    }

    /// Enriches the event in place and fills in the rules it fired.
    fn process(&mut self, work: &mut Output) {
        let event = &mut work.event;
        if let Some(geo) = &self.geo {
            geo.refresh_view(&mut self.geo_view);
            if let Some(view) = &self.geo_view {
                view.enrich_cached(event, &mut self.geo_cache);
            }
        }
        let rules = self.rules();
        let mut deviations = Vec::new();
        let mut before = None;
        let mut key_windows = None;
        if event.metadata.event_code == crate::event::EventCode::KeyUse
            && let Some(spki) = event
                .unmapped
                .key
                .as_ref()
                .and_then(|k| k.spki_sha256.as_deref())
        {
            let key = self.keys.entry_ref(spki).or_insert_with(|| KeyState {
                baseline: KeyBaseline::fresh(spki),
                windows: Windows::default(),
            });
            // The finding shows the baseline as it was (when a rule can
            // ask for it).
            let kept;
            (deviations, kept) = key.baseline.observe_keeping(
                &Observation::of(event),
                self.learning_ms,
                rules.wants_baseline,
            );
            before = kept.map(Arc::new);
            key_windows = Some(&mut key.windows);
        }
        work.fired = rules
            .set
            .evaluate(event, &deviations, &mut self.thresholds, key_windows)
            .into_iter()
            .map(|f| Fired {
                rule: rules.arcs[f.index].clone(),
                baseline: if f.deviations.is_empty() {
                    None
                } else {
                    before.clone()
                },
                deviations: f.deviations,
                count: f.count,
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests_support::key_use_event;

    fn rules(src: &str) -> RuleSet {
        RuleSet::parse(src, "t.yaml").unwrap()
    }

    fn cfg(shards: usize, queue: usize, overflow: Overflow) -> Config {
        Config {
            shards,
            queue,
            learning_ms: 60_000,
            overflow,
            geo: None,
            geo_cache: GEO_CACHE_ENTRIES,
            baselines: BaselineStore::default(),
        }
    }

    fn event_for(key: u8, time: i64, binary: &str) -> Event {
        let mut e = key_use_event();
        e.unmapped.key.as_mut().unwrap().spki_sha256 = Some(format!("{key:02x}").repeat(32));
        e.time = time;
        e.actor.process.file.as_mut().unwrap().hashes[0].value = binary.into();
        e
    }

    #[test]
    fn baselines_per_key_survive_sharding_and_deviations_fire_rules() {
        let p = Pipeline::start(
            rules(
                "rules:\n  - id: new-binary\n    severity: high\n    event: key_use\n    deviation: [new_binary]\n    actions: [alert]\n",
            ),
            cfg(4, 64, Overflow::Block),
        );
        // 20 keys learn "nginx"; after learning, key 7 is used by "evil".
        for k in 0..20u8 {
            p.submit(Input {
                event: event_for(k, 0, "nginx"),
                killed_by: None,
            })
            .unwrap();
        }
        for k in 0..20u8 {
            let b = if k == 7 { "evil" } else { "nginx" };
            p.submit(Input {
                event: event_for(k, 120_000, b),
                killed_by: None,
            })
            .unwrap();
        }
        let (out, store) = p.finish();
        assert_eq!(out.len(), 40);
        let fired: Vec<&Output> = out
            .iter()
            .map(|o| &**o)
            .filter(|o| !o.fired.is_empty())
            .collect();
        assert_eq!(fired.len(), 1);
        let f = &fired[0].fired[0];
        assert_eq!(f.rule.id, "new-binary");
        assert_eq!(f.deviations, [Deviation::NewBinary]);
        let before = f.baseline.as_ref().unwrap();
        assert_eq!(before.binaries.iter().collect::<Vec<_>>(), ["nginx"]);
        assert_eq!(store.keys.len(), 20);
        assert_eq!(store.keys[&"07".repeat(32)].binaries.len(), 2);
    }

    #[test]
    fn a_full_input_queue_drops_and_counts_instead_of_waiting() {
        let p = Pipeline::start(RuleSet::default(), cfg(1, 2, Overflow::Drop));
        // Nobody drains: the output queue (2) fills, then the shard blocks,
        // then the input queue (2) fills; the rest must be dropped at once.
        let mut accepted = 0;
        for i in 0..100 {
            match p.submit(Input {
                event: event_for(1, i, "n"),
                killed_by: None,
            }) {
                Ok(()) => accepted += 1,
                Err(back) => assert_eq!(back.event.time, i, "the dropped event comes back"),
            }
        }
        let s = p.stats[0].snapshot();
        assert_eq!(s.received, 100);
        assert_eq!(s.dropped, 100 - accepted);
        assert!(accepted <= 5, "accepted {accepted}");
        let (out, _) = p.finish();
        assert_eq!(out.len() as u64, accepted);
    }

    /// A flood past every queue's bound: what the queues hold stays within
    /// `(shards + 1) * queue`, and each event is either queued or handed
    /// back and counted in `dropped`.
    #[test]
    fn a_flood_keeps_the_queues_within_their_bound() {
        let (shards, queue) = (2, 8);
        let p = Pipeline::start(RuleSet::default(), cfg(shards, queue, Overflow::Drop));
        let mut back = 0u64;
        for i in 0..10_000 {
            if p.submit(Input {
                event: event_for((i % 7) as u8, i, "n"),
                killed_by: None,
            })
            .is_err()
            {
                back += 1;
            }
            assert!(p.queued() <= (shards + 1) * queue, "{} queued", p.queued());
        }
        let dropped: u64 = p.stats.iter().map(|s| s.snapshot().dropped).sum();
        assert_eq!(dropped, back, "every event handed back is counted");
        // The depths the sensor's metrics show, each within its capacity.
        let (input, input_capacity) = p.input_queue();
        let (output, output_capacity) = p.output_queue();
        assert_eq!((input_capacity, output_capacity), (shards * queue, queue));
        assert!(input <= input_capacity && output <= output_capacity);
        // Shards block on the full output queue, so nearly all came back;
        // those accepted are still in the pipeline, in a shard's hands at
        // most one each.
        let (out, _) = p.finish();
        assert_eq!(out.len() as u64 + back, 10_000);
        assert!(out.len() <= (shards + 1) * queue + shards, "{}", out.len());
    }

    #[test]
    fn reload_swaps_rules_between_events() {
        let p = Pipeline::start(RuleSet::default(), cfg(2, 16, Overflow::Block));
        p.submit(Input {
            event: event_for(1, 0, "n"),
            killed_by: None,
        })
        .unwrap();
        // Drain before reloading so the first event is processed under the
        // old (empty) rules.
        let mut out = Vec::new();
        while out.is_empty() {
            out.extend(p.try_drain());
        }
        p.reload(rules(
            "rules:\n  - id: any\n    severity: low\n    event: key_use\n    actions: [alert]\n",
        ));
        p.submit(Input {
            event: event_for(1, 1, "n"),
            killed_by: None,
        })
        .unwrap();
        let (rest, _) = p.finish();
        assert!(out[0].fired.is_empty());
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].fired[0].rule.id, "any");
    }

    #[test]
    fn baselines_can_be_listed_and_reset_while_running() {
        let mut seed = BaselineStore::default();
        seed.observe(
            &"aa".repeat(32),
            &Observation {
                time_ms: 0,
                ..Default::default()
            },
            1,
        );
        let mut c = cfg(3, 16, Overflow::Block);
        c.baselines = seed;
        let p = Pipeline::start(RuleSet::default(), c);
        p.submit(Input {
            event: event_for(0xbb, 0, "n"),
            killed_by: None,
        })
        .unwrap();
        let (all, outputs) = p.baselines();
        assert_eq!(all.keys.len(), 2);
        assert_eq!(
            outputs.len(),
            1,
            "the event went through before the snapshot"
        );
        assert!(p.reset_baseline(Some(&"aa".repeat(32))).is_empty());
        let (all, _) = p.baselines();
        assert_eq!(all.keys.len(), 1);
        assert!(all.keys.contains_key(&"bb".repeat(32)));
        let (_, store) = p.finish();
        assert_eq!(store.keys.len(), 1);
    }

    /// Threshold counts are per key and live with the key's state in its
    /// shard; reloaded rules count afresh.
    #[test]
    fn thresholds_count_per_key_and_restart_with_new_rules() {
        let busy = "rules:\n  - id: busy\n    severity: low\n    event: key_use\n    threshold: {count: 3, window_seconds: 60}\n    actions: [alert]\n";
        let p = Pipeline::start(rules(busy), cfg(2, 64, Overflow::Block));
        let send = |key: u8, t: i64| {
            p.submit(Input {
                event: event_for(key, t, "n"),
                killed_by: None,
            })
            .unwrap()
        };
        let fired_on = |outs: Vec<Box<Output>>| -> Vec<(String, i64)> {
            let mut v: Vec<(String, i64)> = outs
                .iter()
                .filter(|o| !o.fired.is_empty())
                .map(|o| {
                    (
                        o.event
                            .unmapped
                            .key
                            .as_ref()
                            .unwrap()
                            .spki_sha256
                            .clone()
                            .unwrap(),
                        o.event.time,
                    )
                })
                .collect();
            v.sort();
            v
        };
        let drain_all = |n: usize| {
            let mut out = Vec::new();
            while out.len() < n {
                out.extend(p.try_drain());
                std::thread::yield_now();
            }
            out
        };
        // Key 1: four uses, the fourth is over 3. Key 2: three, not over.
        for t in 0..4 {
            send(1, t * 1000);
        }
        for t in 0..3 {
            send(2, t * 1000);
        }
        assert_eq!(fired_on(drain_all(7)), [("01".repeat(32), 3000)]);
        // Same rules, reloaded: counting starts again, so three more uses
        // of key 2 stay under the threshold (six would be over it).
        p.reload(rules(busy));
        for t in 3..6 {
            send(2, t * 1000);
        }
        assert!(fired_on(drain_all(3)).is_empty());
        send(2, 6000);
        let (rest, _) = p.finish();
        assert_eq!(fired_on(rest), [("02".repeat(32), 6000)]);
    }

    /// A baseline reset forgets what was learned, not how busy the key
    /// is: its threshold counts go on.
    #[test]
    fn a_baseline_reset_keeps_threshold_counts() {
        let p = Pipeline::start(
            rules(
                "rules:\n  - id: busy\n    severity: low\n    event: key_use\n    threshold: {count: 3, window_seconds: 60}\n    actions: [alert]\n",
            ),
            cfg(1, 64, Overflow::Block),
        );
        let send = |t: i64| {
            p.submit(Input {
                event: event_for(1, t, "n"),
                killed_by: None,
            })
            .unwrap()
        };
        for t in 0..3 {
            send(t * 1000);
        }
        let mut outs = p.reset_baseline(None);
        send(3000);
        let (all, rest) = p.baselines();
        outs.extend(rest);
        let (more, _) = p.finish();
        outs.extend(more);
        assert_eq!(outs.len(), 4);
        let fired: Vec<i64> = outs
            .iter()
            .filter(|o| !o.fired.is_empty())
            .map(|o| o.event.time)
            .collect();
        assert_eq!(fired, [3000], "the fourth use is over 3, reset or not");
        assert_eq!(all.keys[&"01".repeat(32)].uses, 1, "learning started again");
    }
}
