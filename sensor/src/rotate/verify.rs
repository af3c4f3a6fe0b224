//! Verification by handshake: every target presents the expected key, and
//! every other target of the same services still presents its own.
//!
//! A reload is asynchronous (nginx starts new workers, old ones finish
//! their connections), so the check repeats until it holds or the
//! configured time is up. Each handshake is a new connection with no
//! session to resume (`keys::tls_probe`), so the leaf is the one the
//! service presents now.
//!
//! One round that holds is not enough: for a moment after a reload,
//! nginx's old workers still accept on the listening sockets beside the
//! new ones, so one handshake may reach a new worker and the next an old
//! one. The check must hold for `SETTLE_ROUNDS` rounds in a row, and
//! either every process of the old generation has stopped listening (it
//! exited, or closed its listening sockets to drain), or, when the old
//! generation is not known, the rounds span at least `SETTLE`.

use std::time::{Duration, Instant};

use super::plan::{self, Target};

/// What did not hold: a target that presents another key (or none), or,
/// with no target, the service as a whole (its old workers still listen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub target: Option<Target>,
    pub why: String,
}

/// Rounds in a row that must hold.
const SETTLE_ROUNDS: u32 = 2;
/// The least time from the first of those rounds to the last, when the
/// old generation is not known.
const SETTLE: Duration = Duration::from_millis(500);

/// Whether every process of `old` stopped accepting: it exited, or holds
/// no listening socket any more.
fn stopped_listening(old: &[u32]) -> bool {
    old.iter()
        .all(|&pid| crate::keys::tls_probe::listeners(pid).map_or(true, |l| l.is_empty()))
}

/// Waits until each `(target, spki)` holds; on time out, says which do
/// not. Returns one line per target. `old` is the old generation of the
/// services' processes (the workers before the reload, not the masters),
/// or `None` when it is not known.
pub fn wait_for(
    expect: &[(Target, String)],
    timeout: Duration,
    old: Option<&[u32]>,
) -> Result<Vec<(Target, String)>, Vec<Mismatch>> {
    let deadline = Instant::now() + timeout;
    let handshake = Duration::from_millis(2000).min(timeout.max(Duration::from_millis(200)));
    // Since when, and for how many rounds, every target has held.
    let mut held: Option<(Instant, u32)> = None;
    loop {
        let targets: Vec<Target> = expect.iter().map(|(t, _)| t.clone()).collect();
        let seen = plan::presented(&targets, handshake);
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (t, want) in expect {
            let why = match seen.get(t) {
                Some(Ok(got)) if got == want => {
                    ok.push((t.clone(), format!("{t}: presents {want}")));
                    continue;
                }
                Some(Ok(got)) => format!("{t}: presents {got}, not {want}"),
                Some(Err(e)) => format!("{t}: {e}"),
                None => format!("{t}: not asked"),
            };
            bad.push(Mismatch {
                target: Some(t.clone()),
                why,
            });
        }
        if bad.is_empty() {
            let (since, rounds) = held.get_or_insert((Instant::now(), 0));
            *rounds += 1;
            let settled = match old {
                Some(pids) => stopped_listening(pids),
                None => since.elapsed() >= SETTLE,
            };
            if *rounds >= SETTLE_ROUNDS && settled {
                return Ok(ok);
            }
            // A streak under way may finish past the deadline, by one
            // settle period at most: old workers that still listen then
            // (a worker that never drains, a pid reused) fail the check.
            if Instant::now() >= deadline + SETTLE {
                return Err(vec![Mismatch {
                    target: None,
                    why: format!(
                        "every target presents the expected key, but the old workers ({}) still listen {:?} after the reload",
                        old.unwrap_or_default()
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        timeout + SETTLE
                    ),
                }]);
            }
        } else {
            held = None;
            if Instant::now() >= deadline {
                return Err(bad);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
