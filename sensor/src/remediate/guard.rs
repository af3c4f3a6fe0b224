//! The guard rails a rule's `rotate` and `revoke` pass before anything
//! runs: at most one remediation per key in flight, a cooldown per key,
//! and a rate limit over the whole host. A rule that fires on every
//! handshake asks for a rotation thousands of times a minute; the guard
//! turns that into one, and says why it refused each of the others.
//!
//! What was admitted is saved (`admissions`, `restore`; the file is the
//! approvals store's, `approvals::Store::save_admissions`), so a sensor
//! that restarts, or crashes in a loop under `Restart=always`, keeps its
//! cooldowns and its hour's count.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

/// Why a remediation was not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// One for this key is still running (or awaiting approval).
    InFlight,
    /// One for this key started less than the cooldown ago.
    Cooldown { left: Duration },
    /// The host's limit per hour is reached.
    RateLimit { per_hour: u32 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::InFlight => write!(f, "one is already in flight for this key"),
            Refusal::Cooldown { left } => write!(
                f,
                "cooldown: this key was acted on less than remediation.cooldown_seconds ago ({} s left)",
                left.as_secs()
            ),
            Refusal::RateLimit { per_hour } => write!(
                f,
                "rate limit: {per_hour} remediations in the last hour (remediation.max_per_hour)"
            ),
        }
    }
}

pub struct Guard {
    cooldown: Duration,
    per_hour: u32,
    /// When each key was last admitted. Entries older than the cooldown
    /// are dropped as others are admitted, so this stays as small as the
    /// rate limit allows.
    last: HashMap<String, Instant>,
    in_flight: HashSet<String>,
    /// Admissions in the last hour, oldest first.
    recent: VecDeque<(Instant, String)>,
}

const HOUR: Duration = Duration::from_secs(3600);

impl Guard {
    pub fn new(cooldown: Duration, per_hour: u32) -> Self {
        Guard {
            cooldown,
            per_hour,
            last: HashMap::new(),
            in_flight: HashSet::new(),
            recent: VecDeque::new(),
        }
    }

    /// Admits a remediation of `spki` at `now`, or says why not. An
    /// admitted key is in flight until `finished`.
    pub fn admit(&mut self, spki: &str, now: Instant) -> Result<(), Refusal> {
        if self.in_flight.contains(spki) {
            return Err(Refusal::InFlight);
        }
        if let Some(&at) = self.last.get(spki) {
            let since = now.saturating_duration_since(at);
            if since < self.cooldown {
                return Err(Refusal::Cooldown {
                    left: self.cooldown - since,
                });
            }
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= HOUR)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.per_hour as usize {
            return Err(Refusal::RateLimit {
                per_hour: self.per_hour,
            });
        }
        let cooldown = self.cooldown;
        self.last
            .retain(|_, &mut t| now.saturating_duration_since(t) < cooldown);
        self.last.insert(spki.to_owned(), now);
        self.in_flight.insert(spki.to_owned());
        self.recent.push_back((now, spki.to_owned()));
        Ok(())
    }

    /// Every admission that still counts at `now` (for a cooldown or the
    /// hour), oldest first: what `restore` takes back.
    pub fn admissions(&self, now: Instant) -> Vec<(String, Instant)> {
        let mut out: Vec<(String, Instant)> = self
            .recent
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) < HOUR)
            .map(|(t, k)| (k.clone(), *t))
            .collect();
        for (k, &t) in &self.last {
            if now.saturating_duration_since(t) < self.cooldown && !out.contains(&(k.clone(), t)) {
                out.push((k.clone(), t));
            }
        }
        out.sort_by_key(|(_, t)| *t);
        out
    }

    /// Takes back admissions an earlier run saved: their cooldowns and
    /// their place in the hour, not their being in flight.
    pub fn restore(
        &mut self,
        admissions: impl IntoIterator<Item = (String, Instant)>,
        now: Instant,
    ) {
        let mut all: Vec<(String, Instant)> = admissions.into_iter().collect();
        all.sort_by_key(|(_, t)| *t);
        for (k, t) in all {
            if now.saturating_duration_since(t) < HOUR {
                self.recent.push_back((t, k.clone()));
            }
            if now.saturating_duration_since(t) < self.cooldown {
                let last = self.last.entry(k).or_insert(t);
                *last = (*last).max(t);
            }
        }
        self.recent.make_contiguous().sort_by_key(|(t, _)| *t);
    }

    /// The remediation of `spki` ended (done, failed, or rejected by the
    /// operator). Its cooldown still runs from when it was admitted.
    pub fn finished(&mut self, spki: &str) {
        self.in_flight.remove(spki);
    }

    /// Marks `spki` in flight without counting it (an approved action
    /// carried out after a restart: it was admitted when recorded).
    pub fn resume(&mut self, spki: &str) -> bool {
        self.in_flight.insert(spki.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aa";
    const B: &str = "bb";

    #[test]
    fn one_per_key_in_flight_then_the_cooldown() {
        let t0 = Instant::now();
        let mut g = Guard::new(Duration::from_secs(600), 100);
        assert_eq!(g.admit(A, t0), Ok(()));
        assert_eq!(
            g.admit(A, t0 + Duration::from_secs(1)),
            Err(Refusal::InFlight)
        );
        // Another key is not held back by the first.
        assert_eq!(g.admit(B, t0 + Duration::from_secs(1)), Ok(()));
        g.finished(A);
        assert_eq!(
            g.admit(A, t0 + Duration::from_secs(100)),
            Err(Refusal::Cooldown {
                left: Duration::from_secs(500)
            })
        );
        assert_eq!(g.admit(A, t0 + Duration::from_secs(600)), Ok(()));
    }

    #[test]
    fn the_rate_limit_counts_every_key_over_a_sliding_hour() {
        let t0 = Instant::now();
        let mut g = Guard::new(Duration::ZERO, 2);
        let min = |m: u64| t0 + Duration::from_secs(60 * m);
        assert_eq!(g.admit("k1", min(0)), Ok(()));
        assert_eq!(g.admit("k2", min(10)), Ok(()));
        assert_eq!(
            g.admit("k3", min(59)),
            Err(Refusal::RateLimit { per_hour: 2 })
        );
        // The first admission leaves the window.
        assert_eq!(g.admit("k3", min(60)), Ok(()));
        assert_eq!(
            g.admit("k4", min(61)),
            Err(Refusal::RateLimit { per_hour: 2 })
        );
        // A refusal is not counted against the limit.
        assert_eq!(g.admit("k4", min(70)), Ok(()));
    }

    #[test]
    fn admissions_restored_by_another_guard_keep_their_cooldown_and_hour() {
        let t0 = Instant::now();
        let min = |m: u64| t0 + Duration::from_secs(60 * m);
        let mut g = Guard::new(Duration::from_secs(600), 2);
        g.admit(A, min(0)).unwrap();
        g.admit(B, min(20)).unwrap();
        let saved = g.admissions(min(21));
        assert_eq!(saved, vec![(A.to_owned(), min(0)), (B.to_owned(), min(20))]);
        // A new run: nothing in flight, but the hour is full and B cools.
        let mut g = Guard::new(Duration::from_secs(600), 2);
        g.restore(saved.clone(), min(21));
        assert_eq!(
            g.admit("cc", min(21)),
            Err(Refusal::RateLimit { per_hour: 2 })
        );
        assert_eq!(
            g.admit(B, min(25)),
            Err(Refusal::Cooldown {
                left: Duration::from_secs(300)
            })
        );
        // A's admission leaves the hour; B's cooldown is over.
        assert_eq!(g.admit(B, min(60)), Ok(()));
        // What is past both windows is not saved again.
        let mut g = Guard::new(Duration::from_secs(600), 2);
        g.restore(saved, min(90));
        assert!(g.admissions(min(90)).is_empty());
    }

    #[test]
    fn a_limit_of_zero_refuses_all_and_refusals_say_which_setting() {
        let mut g = Guard::new(Duration::from_secs(60), 0);
        let e = g.admit(A, Instant::now()).unwrap_err();
        assert!(e.to_string().contains("remediation.max_per_hour"), "{e}");
        let mut g = Guard::new(Duration::from_secs(60), 5);
        let t0 = Instant::now();
        g.admit(A, t0).unwrap();
        g.finished(A);
        let e = g.admit(A, t0).unwrap_err();
        assert!(
            e.to_string().contains("remediation.cooldown_seconds"),
            "{e}"
        );
    }
}
