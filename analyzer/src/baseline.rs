//! What is normal for each key, learned from its uses.
//!
//! A key's baseline is the set of binaries (exe SHA-256), containers, users,
//! peer countries and ASNs it has been used from, and its busiest minute.
//! During the learning period (counted from the key's first use) everything
//! is learned silently. After it, a use from something new is a
//! *deviation*; the new value is then learned, so each change is reported
//! once. Rules decide which deviations matter (`deviation:` in a rule).
//!
//! Baselines persist as one JSON file written atomically (temporary file,
//! fsync, rename), so a crash leaves the old file or the new one, never half
//! of one.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::event::{BaselineSnapshot, Event, RateSnapshot};

/// Most distinct values remembered per attribute: a key used from
/// everywhere stops growing its baseline (and stops deviating on it).
pub const MAX_VALUES: usize = 1024;

/// How a use differs from its key's baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deviation {
    NewBinary,
    NewContainer,
    NewUser,
    NewCountry,
    NewAsn,
    /// More uses in the current minute than twice the busiest minute
    /// learned (and at least 10).
    RateAboveBaseline,
}

impl Deviation {
    pub const ALL: [Deviation; 6] = [
        Deviation::NewBinary,
        Deviation::NewContainer,
        Deviation::NewUser,
        Deviation::NewCountry,
        Deviation::NewAsn,
        Deviation::RateAboveBaseline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Deviation::NewBinary => "new_binary",
            Deviation::NewContainer => "new_container",
            Deviation::NewUser => "new_user",
            Deviation::NewCountry => "new_country",
            Deviation::NewAsn => "new_asn",
            Deviation::RateAboveBaseline => "rate_above_baseline",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }
}

/// The attributes of one use that baselines track, borrowed from its event
/// (a value is copied only when a baseline learns it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observation<'a> {
    pub time_ms: i64,
    /// exe SHA-256, or the exe path when the hash is unknown.
    pub binary: Option<&'a str>,
    /// Container id, or `host`.
    pub container: &'a str,
    pub user: Option<&'a str>,
    pub country: Option<&'a str>,
    pub asn: Option<u32>,
}

impl<'a> Observation<'a> {
    pub fn of(event: &'a Event) -> Self {
        let file = event.actor.process.file.as_ref();
        let peer = event.unmapped.peer.as_ref();
        Observation {
            time_ms: event.time,
            binary: file.map(|f| {
                f.hashes
                    .first()
                    .map_or(f.path.as_str(), |h| h.value.as_str())
            }),
            container: event.container().map_or("host", |c| c.uid.as_str()),
            user: Some(event.actor.process.user.uid.as_str()).filter(|u| !u.is_empty()),
            country: peer
                .and_then(|p| p.location.as_ref())
                .and_then(|l| l.country.as_deref()),
            asn: peer
                .and_then(|p| p.autonomous_system.as_ref())
                .map(|a| a.number),
        }
    }
}

/// The values a baseline learned for one attribute (binaries, containers,
/// users, countries).
///
/// A lookup reads one small array of hashes, then compares the one string
/// whose hash matches, so answers are exact. A `BTreeSet<String>` compared
/// the searched value with every string it visited, each in its own heap
/// block, and those cache misses were most of a baseline's cost per event.
/// Serialised as a sorted list of strings, as a `BTreeSet` was, so
/// baseline files are unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValueSet {
    /// Sorted by (hash, value); `values[i]` hashes to `hashes[i]`.
    hashes: Vec<u64>,
    values: Vec<String>,
}

impl ValueSet {
    /// Only compared within this process, never stored: any fixed seed
    /// does (values are compared whole on a match, so collisions cost a
    /// comparison, never a wrong answer).
    fn hash(v: &str) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x6b65_7977_6172_6465).hash_one(v)
    }

    /// Where `v` is, or where it would go.
    fn find(&self, v: &str) -> (u64, Result<usize, usize>) {
        let h = Self::hash(v);
        (h, self.locate(h, v))
    }

    /// Where `v`, whose hash is `h`, is or would go: values that share a
    /// hash sit together, in value order.
    fn locate(&self, h: u64, v: &str) -> Result<usize, usize> {
        let mut i = self.hashes.partition_point(|&x| x < h);
        while self.hashes.get(i) == Some(&h) {
            match self.values[i].as_str().cmp(v) {
                std::cmp::Ordering::Equal => return Ok(i),
                std::cmp::Ordering::Greater => break,
                std::cmp::Ordering::Less => i += 1,
            }
        }
        Err(i)
    }

    pub fn contains(&self, v: &str) -> bool {
        self.find(v).1.is_ok()
    }

    /// Adds `v`; false if it was there already.
    pub fn insert(&mut self, v: &str) -> bool {
        match self.find(v) {
            (_, Ok(_)) => false,
            (h, Err(at)) => {
                self.hashes.insert(at, h);
                self.values.insert(at, v.to_owned());
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values in sorted order (for people and files; lookups don't
    /// need it).
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let mut sorted: Vec<&str> = self.values.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.into_iter()
    }
}

impl<S: AsRef<str>> FromIterator<S> for ValueSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut set = ValueSet::default();
        for v in iter {
            set.insert(v.as_ref());
        }
        set
    }
}

impl Serialize for ValueSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for ValueSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<String>::deserialize(d)?.into_iter().collect())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateProfile {
    /// Start of the minute being counted (ms since the epoch, floored).
    pub minute_ms: i64,
    pub this_minute: u64,
    /// The busiest complete or current minute seen while learning.
    pub max_per_minute: u64,
}

/// What is normal for one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBaseline {
    pub spki_sha256: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub uses: u64,
    pub binaries: ValueSet,
    pub containers: ValueSet,
    pub users: ValueSet,
    pub countries: ValueSet,
    pub asns: BTreeSet<u32>,
    pub rate: RateProfile,
}

impl KeyBaseline {
    /// The baseline of a key nothing has been learned about yet.
    pub fn fresh(spki: &str) -> Self {
        KeyBaseline {
            spki_sha256: spki.to_owned(),
            ..Default::default()
        }
    }

    /// Folds one use in; returns how it deviates (nothing while learning).
    pub fn observe(&mut self, o: &Observation, learning_ms: i64) -> Vec<Deviation> {
        self.observe_keeping(o, learning_ms, false).0
    }

    /// `observe`, and with `keep_before` a copy of the baseline as it was
    /// when this use deviates from it (findings show what was normal).
    /// What is new is found once, and the copy made only then: most uses
    /// of a learned key change nothing but counters.
    pub fn observe_keeping(
        &mut self,
        o: &Observation,
        learning_ms: i64,
        keep_before: bool,
    ) -> (Vec<Deviation>, Option<KeyBaseline>) {
        let first = self.uses == 0;
        let first_seen_ms = if first { o.time_ms } else { self.first_seen_ms };
        let learning = o.time_ms - first_seen_ms < learning_ms;
        let new = |set: &ValueSet, v: Option<&'_ str>| {
            v.filter(|v| set.len() < MAX_VALUES && !set.contains(v))
                .is_some()
        };
        let new_binary = new(&self.binaries, o.binary);
        let new_container = new(&self.containers, Some(o.container));
        let new_user = new(&self.users, o.user);
        let new_country = new(&self.countries, o.country);
        let new_asn = o
            .asn
            .is_some_and(|a| self.asns.len() < MAX_VALUES && !self.asns.contains(&a));
        let minute = o.time_ms.div_euclid(60_000) * 60_000;
        let this_minute = if minute == self.rate.minute_ms {
            self.rate.this_minute + 1
        } else {
            1
        };
        // Once per minute: when the count first passes the limit.
        let rate_above = !learning && this_minute == (self.rate.max_per_minute * 2).max(10) + 1;
        let news = [
            (new_binary, Deviation::NewBinary),
            (new_container, Deviation::NewContainer),
            (new_user, Deviation::NewUser),
            (new_country, Deviation::NewCountry),
            (new_asn, Deviation::NewAsn),
        ];
        let deviates = !learning && (rate_above || news.iter().any(|(n, _)| *n));
        let before = (keep_before && deviates && !first).then(|| self.clone());

        self.first_seen_ms = first_seen_ms;
        self.uses += 1;
        self.last_seen_ms = self.last_seen_ms.max(o.time_ms);
        let learn = |set: &mut ValueSet, new: bool, v: Option<&str>| {
            if let (true, Some(v)) = (new, v) {
                set.insert(v);
            }
        };
        learn(&mut self.binaries, new_binary, o.binary);
        learn(&mut self.containers, new_container, Some(o.container));
        learn(&mut self.users, new_user, o.user);
        learn(&mut self.countries, new_country, o.country);
        if let (true, Some(a)) = (new_asn, o.asn) {
            self.asns.insert(a);
        }
        self.rate.minute_ms = minute;
        self.rate.this_minute = this_minute;
        if learning {
            self.rate.max_per_minute = self.rate.max_per_minute.max(this_minute);
        }
        let mut out: Vec<Deviation> = if learning {
            Vec::new()
        } else {
            news.iter().filter(|(n, _)| *n).map(|(_, d)| *d).collect()
        };
        if rate_above {
            out.push(Deviation::RateAboveBaseline);
        }
        (out, before)
    }
}

/// What a finding shows of a baseline. Spelt out field by field, so that a
/// change to what is stored does not reach the alert format unnoticed.
impl From<&KeyBaseline> for BaselineSnapshot {
    fn from(b: &KeyBaseline) -> Self {
        let values = |set: &ValueSet| -> Vec<String> { set.iter().map(str::to_owned).collect() };
        BaselineSnapshot {
            spki_sha256: b.spki_sha256.clone(),
            first_seen_ms: b.first_seen_ms,
            last_seen_ms: b.last_seen_ms,
            uses: b.uses,
            binaries: values(&b.binaries),
            containers: values(&b.containers),
            users: values(&b.users),
            countries: values(&b.countries),
            asns: b.asns.iter().copied().collect(),
            rate: RateSnapshot {
                minute_ms: b.rate.minute_ms,
                this_minute: b.rate.this_minute,
                max_per_minute: b.rate.max_per_minute,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("{path}: cannot read baselines: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: baselines are not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: cannot write baselines: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Baselines of many keys, as one owner holds them (a pipeline shard).
#[derive(Clone, Debug, Default)]
pub struct BaselineStore {
    pub keys: HashMap<String, KeyBaseline>,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    keys: Vec<KeyBaseline>,
}

impl BaselineStore {
    pub fn observe(&mut self, spki: &str, o: &Observation, learning_ms: i64) -> Vec<Deviation> {
        self.of(spki).observe(o, learning_ms)
    }

    /// The baseline of one key, new if it had none.
    pub fn of(&mut self, spki: &str) -> &mut KeyBaseline {
        self.keys
            .entry_ref(spki)
            .or_insert_with(|| KeyBaseline::fresh(spki))
    }

    pub fn merge(&mut self, other: BaselineStore) {
        self.keys.extend(other.keys);
    }

    /// Loads `path`; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self, BaselineError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(BaselineError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let f: FileFormat = serde_json::from_str(&text).map_err(|source| BaselineError::Parse {
            path: path.to_owned(),
            source,
        })?;
        Ok(BaselineStore {
            keys: f
                .keys
                .into_iter()
                .map(|k| (k.spki_sha256.clone(), k))
                .collect(),
        })
    }

    /// Writes atomically and mode 0600 (`atomic_file`): a temporary file
    /// with an unpredictable name, fsync'd, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<(), BaselineError> {
        let err = |source| BaselineError::Write {
            path: path.to_owned(),
            source,
        };
        let mut keys: Vec<&KeyBaseline> = self.keys.values().collect();
        keys.sort_by(|a, b| a.spki_sha256.cmp(&b.spki_sha256));
        let body = serde_json::to_vec(&serde_json::json!({ "version": 1, "keys": keys }))
            .map_err(|e| err(std::io::Error::other(e)))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        crate::atomic_file::write(path, &body, 0o600).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn obs(t: i64, binary: &str) -> Observation<'_> {
        Observation {
            time_ms: t,
            binary: Some(binary),
            container: "host",
            user: Some("33"),
            country: Some("DE"),
            asn: Some(64500),
        }
    }

    #[test]
    fn learns_silently_then_reports_each_change_once() {
        let mut b = KeyBaseline::default();
        let learning = 10 * MIN;
        assert!(b.observe(&obs(0, "nginx"), learning).is_empty());
        assert!(
            b.observe(&obs(MIN, "curl"), learning).is_empty(),
            "still learning"
        );
        assert_eq!(b.binaries.len(), 2);
        let later = 11 * MIN;
        assert!(b.observe(&obs(later, "nginx"), learning).is_empty());
        assert_eq!(
            b.observe(&obs(later, "evil"), learning),
            [Deviation::NewBinary]
        );
        assert!(
            b.observe(&obs(later + 1, "evil"), learning).is_empty(),
            "learned now"
        );
        let container = "c".repeat(64);
        let mut o = obs(later + 2, "nginx");
        o.country = Some("FR");
        o.asn = Some(64501);
        o.container = &container;
        o.user = Some("0");
        assert_eq!(
            b.observe(&o, learning),
            [
                Deviation::NewContainer,
                Deviation::NewUser,
                Deviation::NewCountry,
                Deviation::NewAsn
            ]
        );
        assert_eq!(b.uses, 6);
    }

    #[test]
    fn rate_above_twice_the_busiest_learned_minute_is_reported_once_a_minute() {
        let mut b = KeyBaseline::default();
        for i in 0..20 {
            b.observe(&obs(i, "n"), MIN);
        }
        assert_eq!(b.rate.max_per_minute, 20);
        let t = 5 * MIN;
        let mut devs = Vec::new();
        for i in 0..100 {
            devs.extend(b.observe(&obs(t + i, "n"), MIN));
        }
        assert_eq!(
            devs,
            [Deviation::RateAboveBaseline],
            "once, at the 41st use"
        );
        let mut devs = Vec::new();
        for i in 0..40 {
            devs.extend(b.observe(&obs(t + MIN + i, "n"), MIN));
        }
        assert!(devs.is_empty(), "40 in a new minute is within 2x20");
    }

    /// The copy for a finding is the baseline before the deviating use,
    /// and none is made for uses that change nothing (or while learning).
    #[test]
    fn a_deviating_use_keeps_the_baseline_it_deviated_from() {
        let mut b = KeyBaseline::default();
        let learning = 1000;
        let (d, before) = b.observe_keeping(&obs(0, "nginx"), learning, true);
        assert!(d.is_empty() && before.is_none());
        let (d, before) = b.observe_keeping(&obs(5000, "nginx"), learning, true);
        assert!(d.is_empty() && before.is_none(), "nothing new");
        let (d, before) = b.observe_keeping(&obs(6000, "evil"), learning, true);
        assert_eq!(d, [Deviation::NewBinary]);
        let before = before.unwrap();
        assert_eq!(before.uses, 2);
        assert!(!before.binaries.contains("evil") && b.binaries.contains("evil"));
        let (d, before) = b.observe_keeping(&obs(7000, "other"), learning, false);
        assert_eq!(d, [Deviation::NewBinary]);
        assert!(before.is_none(), "not asked for");
    }

    /// A finding's snapshot writes a baseline as the store writes it
    /// today, byte for byte: the two may part ways, but not by accident.
    #[test]
    fn a_snapshot_writes_the_baseline_as_it_is_stored() {
        let mut b = KeyBaseline::fresh(&"ab".repeat(32));
        b.observe(&obs(0, "nginx"), MIN);
        let mut o = obs(1, "curl");
        o.country = Some("AT");
        o.asn = Some(64400);
        b.observe(&o, MIN);
        let snapshot = BaselineSnapshot::from(&b);
        assert_eq!(snapshot.binaries, ["curl", "nginx"]);
        assert_eq!(
            serde_json::to_string(&snapshot).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        let fresh = KeyBaseline::fresh("cd");
        assert_eq!(
            serde_json::to_string(&BaselineSnapshot::from(&fresh)).unwrap(),
            serde_json::to_string(&fresh).unwrap()
        );
    }

    #[test]
    fn attribute_sets_are_bounded() {
        let mut b = KeyBaseline::default();
        for i in 0..(MAX_VALUES as i64 + 10) {
            b.observe(&obs(i, &format!("b{i}")), 1);
        }
        assert_eq!(b.binaries.len(), MAX_VALUES);
    }

    #[test]
    fn store_round_trips_atomically_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kw-baseline-{}", std::process::id()));
        let path = dir.join("baselines.json");
        let mut s = BaselineStore::default();
        s.observe(&"ab".repeat(32), &obs(1, "nginx"), MIN);
        s.observe(&"cd".repeat(32), &obs(2, "curl"), MIN);
        s.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = BaselineStore::load(&path).unwrap();
        assert_eq!(back.keys, s.keys);
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 1,
            "no temporary file left"
        );
        std::fs::write(&path, "{not json").unwrap();
        let e = BaselineStore::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("baselines.json") && e.contains("not valid"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(BaselineStore::load(&path).unwrap().keys.is_empty());
    }

    #[test]
    fn value_sets_answer_exactly_and_store_like_sorted_sets() {
        let words = ["nginx", "curl", "", "python3", "nginx2", "a"];
        let mut set = ValueSet::default();
        for w in words {
            assert!(set.insert(w), "{w} is new");
            assert!(!set.insert(w), "{w} is there now");
        }
        assert_eq!(set.len(), words.len());
        for w in words {
            assert!(set.contains(w));
        }
        assert!(!set.contains("ngin") && !set.contains("nginx3"));
        let sorted: BTreeSet<&str> = words.into_iter().collect();
        assert_eq!(
            serde_json::to_string(&set).unwrap(),
            serde_json::to_string(&sorted).unwrap()
        );
        let back: ValueSet = serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
        assert_eq!(back, set);
        assert!(set.iter().eq(sorted.into_iter()));
    }

    #[test]
    fn value_sets_tell_apart_values_that_share_a_hash() {
        // Three values filed under one hash, as a collision would file them.
        let set = ValueSet {
            hashes: vec![1, 7, 7, 7, 9],
            values: ["z", "b", "d", "f", "a"].map(String::from).to_vec(),
        };
        assert_eq!(set.locate(7, "d"), Ok(2));
        assert_eq!(set.locate(7, "f"), Ok(3));
        assert_eq!(set.locate(7, "c"), Err(2), "between b and d");
        assert_eq!(set.locate(7, "g"), Err(4), "after f, before hash 9");
        assert_eq!(set.locate(7, "a"), Err(1), "a is only under hash 9");
    }
}
