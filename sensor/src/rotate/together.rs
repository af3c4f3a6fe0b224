//! Keys rotated together: the keys of one service (a bulk run's group,
//! or one key alone) staged, installed, their services reloaded once and
//! checked at once; each key that fails is rolled back alone, and the
//! check repeated, until every key stands or is rolled back
//! (docs/rotation.md, "Bulk").

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Result, anyhow, bail};

use super::{
    Issuer, Outcome, Say, in_parallel, install, issue,
    journal::{FileSwap, Journal, Step},
    plan::{self, Plan, Role, Target},
    reload, sensor_view, verify,
};
use crate::{config::Config, keys::material};
use issue::PublicKeyData;

/// Rotates the keys of `plans` together: they are staged one by one (at
/// most `parallel` issued at once), installed, their services reloaded
/// once, and all verified at once. A key that fails is rolled back alone
/// (its files restored, the services reloaded again) while the others
/// stay, as long as the failure can be told apart: a check that fails
/// where no single key is to blame rolls back every key still standing.
/// Each key has its own journal, resumed alone (`resume`). One outcome per
/// plan, in order. `algorithm` is the new keys' (`None`: each the same as
/// its old key).
pub fn rotate(
    dir: &Path,
    plans: &[Plan],
    algorithm: Option<&str>,
    issuer: &Issuer,
    cfg: &Config,
    say: Say<'_>,
    parallel: usize,
) -> Result<Vec<Outcome>> {
    // Before anything changes: a rotation verified by forged events is
    // worse than none.
    if let Some(events) = &cfg.rotation.sensor_events {
        sensor_view::check(Path::new(events)).map_err(|e| anyhow!("rotation.sensor_events {e}"))?;
    }
    // A key's journal checks its own targets and the other keys its
    // services present; the targets of keys rotated with it are theirs to
    // check (they present new keys afterwards).
    let together: std::collections::BTreeSet<&Target> =
        plans.iter().flat_map(|p| &p.targets).collect();
    let plans: Vec<Plan> = plans
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.others.retain(|(t, _)| !together.contains(t));
            p
        })
        .collect();
    let mut journals = Vec::new();
    for p in &plans {
        let mut j = Journal::create(dir, &p.spki_sha256)?;
        say(&p.spki_sha256, &format!("journal: {}", j.path.display()));
        j.record(Step::Planned {
            plan: Box::new(p.clone()),
            issuer: issuer.name().into(),
        })?;
        journals.push(j);
    }
    let jobs: Vec<(&Plan, &str)> = plans
        .iter()
        .zip(&journals)
        .map(|(p, j)| (p, j.id.as_str()))
        .collect();
    let staged = in_parallel(&jobs, parallel, |(p, id)| {
        stage(p, algorithm.unwrap_or(&p.algorithm), issuer, cfg, id)
    });
    let mut members = Vec::new();
    for ((p, mut j), s) in plans.iter().zip(journals).zip(staged) {
        let m = match s {
            Ok(Staged {
                new_spki,
                leaf_pem,
                swaps,
            }) => {
                say(
                    &p.spki_sha256,
                    &format!(
                        "issued: new key {new_spki} ({}) from issuer {}",
                        algorithm.unwrap_or(&p.algorithm),
                        issuer.name()
                    ),
                );
                j.record(Step::Issued {
                    new_spki_sha256: new_spki.clone(),
                    new_certificate_pem: leaf_pem,
                    files: swaps.clone(),
                })?;
                Member::new(j, p, swaps, new_spki)
            }
            Err(e) => {
                let mut m = Member::new(j, p, Vec::new(), String::new());
                m.fail(format!("issue: {e:#}; nothing was installed"), say)?;
                m
            }
        };
        members.push(m);
    }
    // A key whose issue failed has no staged files (a plan always has at
    // least its key file).
    if members.iter().all(|m| m.swaps.is_empty()) {
        // Nothing was installed anywhere: nothing to reload or check.
        for m in &mut members {
            let why = m.failed.clone().unwrap_or_default();
            m.j.record(Step::RolledBack {
                detail: vec![format!("cause: {why}")],
            })?;
            say(&m.plan.spki_sha256, &format!("rolled back: {why}"));
        }
        return Ok(members.iter().map(|_| Outcome::RolledBack).collect());
    }
    forward(&mut members, cfg, say)
}

/// A new key and certificate, staged beside the files they replace.
struct Staged {
    new_spki: String,
    leaf_pem: String,
    swaps: Vec<FileSwap>,
}

/// Issues a new key for `plan` and stages its files (`install::stage`,
/// with the journal's `id`); on failure, nothing is left staged.
fn stage(plan: &Plan, algorithm: &str, issuer: &Issuer, cfg: &Config, id: &str) -> Result<Staged> {
    let key = issue::new_key(algorithm)?;
    let old_der = pem::parse(&plan.old_certificate_pem)?.into_contents();
    let params = issue::params_like(&old_der, cfg.rotation.validity_days)?;
    let issued = issuer.issue(&params, &key.pair)?;
    let new_spki = material::KeyInfo::from_spki_der(&key.pair.subject_public_key_info())
        .map_err(|e| anyhow!("new key: {e}"))?
        .spki_sha256;
    // Never a key and a certificate that do not match.
    let certified = material::certificate_key(&issued.leaf_der)
        .map_err(|e| anyhow!("issued certificate: {e}"))?
        .spki_sha256;
    if certified != new_spki {
        bail!("the issuer returned a certificate for key {certified}, not the new key {new_spki}");
    }
    let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", issued.leaf_der.clone()));
    let mut swaps = Vec::new();
    for f in &plan.files {
        let body: Vec<u8> = match f.role {
            Role::Key => key.pem.as_bytes().to_vec(),
            Role::Certificate => leaf_pem.as_bytes().to_vec(),
            Role::FullChain => {
                let mut b = leaf_pem.clone();
                for c in &issued.chain_pem {
                    b.push_str(c);
                }
                b.into_bytes()
            }
        };
        let mut body = zeroize::Zeroizing::new(body);
        match install::stage(f, &body, id) {
            Ok(s) => swaps.push(s),
            Err(e) => {
                for s in &swaps {
                    let _ = std::fs::remove_file(&s.staged);
                }
                return Err(e.into());
            }
        }
        zeroize::Zeroize::zeroize(&mut *body);
    }
    Ok(Staged {
        new_spki,
        leaf_pem,
        swaps,
    })
}

fn verify_timeout(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.rotation.verify_timeout_ms)
}

/// One key of a rotation, and where it stands.
pub(super) struct Member<'a> {
    j: Journal,
    plan: &'a Plan,
    swaps: Vec<FileSwap>,
    new_spki: String,
    /// Why it is being rolled back, once it is.
    failed: Option<String>,
    /// What went wrong in its rollback: a file not restored, a reload that
    /// failed.
    problems: Vec<String>,
}

impl<'a> Member<'a> {
    pub(super) fn new(j: Journal, plan: &'a Plan, swaps: Vec<FileSwap>, new_spki: String) -> Self {
        Member {
            j,
            plan,
            swaps,
            new_spki,
            failed: None,
            problems: Vec::new(),
        }
    }

    fn key(&self) -> &str {
        &self.plan.spki_sha256
    }

    /// Starts its rollback: says why, and restores its old files.
    pub(super) fn fail(&mut self, why: String, say: Say<'_>) -> Result<()> {
        say(self.key(), &format!("failed: {why}; rolling back"));
        self.j.record(Step::RollingBack { why: why.clone() })?;
        for s in &self.swaps {
            if let Err(e) = install::restore(s) {
                self.problems.push(format!("restore: {e}"));
            }
        }
        self.failed = Some(why);
        Ok(())
    }

    /// What its targets must present now: the new key, or the old one once
    /// it is rolled back.
    fn expect(&self) -> impl Iterator<Item = (Target, String)> + '_ {
        let spki = match self.failed {
            None => &self.new_spki,
            Some(_) => &self.plan.spki_sha256,
        };
        self.plan
            .targets
            .iter()
            .map(move |t| (t.clone(), spki.clone()))
    }
}

/// The keys to blame for a failed check: those a mismatch names a target
/// of. `None` when a mismatch is nobody's in particular (another key of
/// the services, or the services as a whole): then every key standing is.
fn blame(bad: &[verify::Mismatch], standing: &[&Plan]) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for m in bad {
        let i = m
            .target
            .as_ref()
            .and_then(|t| standing.iter().position(|p| p.targets.contains(t)))?;
        if !out.contains(&i) {
            out.push(i);
        }
    }
    Some(out)
}

/// Install, reload, verify; roll back each key that fails, and check
/// again, until every key stands or is rolled back.
pub(super) fn forward(
    members: &mut [Member<'_>],
    cfg: &Config,
    say: Say<'_>,
) -> Result<Vec<Outcome>> {
    for m in members.iter_mut().filter(|m| m.failed.is_none()) {
        m.j.record(Step::Installing)?;
        if let Some(e) = m.swaps.iter().find_map(|s| install::install(s).err()) {
            m.fail(format!("install: {e}"), say)?;
            continue;
        }
        m.j.record(Step::Installed)?;
        say(m.key(), &format!("installed: {} files", m.swaps.len()));
    }
    // Each service once, however many of its keys change.
    let mut services: Vec<&plan::Service> = Vec::new();
    for m in members.iter() {
        for sv in &m.plan.services {
            if !services.iter().any(|s| s.master == sv.master) {
                services.push(sv);
            }
        }
    }
    // The workers that served before the reload: each must stop
    // listening before a handshake is sure to reach a new one.
    let old_workers: Vec<u32> = services
        .iter()
        .flat_map(|sv| sv.pids.iter().copied().filter(move |p| *p != sv.master))
        .collect();
    let events = cfg.rotation.sensor_events.as_ref().map(PathBuf::from);
    let mut first = true;
    loop {
        // The first reload brings the new keys in; any later one, the old
        // keys of those rolled back.
        let forward = std::mem::take(&mut first) && members.iter().any(|m| m.failed.is_none());
        let from = events.as_deref().map(sensor_view::offset).unwrap_or(0);
        let reload_ms = crate::keys::inventory::now_ms();
        if forward {
            for m in members.iter_mut().filter(|m| m.failed.is_none()) {
                m.j.record(Step::Reloading)?;
            }
            if let Some(e) = services.iter().find_map(|sv| reload::reload(sv).err()) {
                for m in members.iter_mut().filter(|m| m.failed.is_none()) {
                    m.fail(format!("reload: {e}"), say)?;
                }
                continue;
            }
            for m in members.iter_mut().filter(|m| m.failed.is_none()) {
                m.j.record(Step::Reloaded)?;
                say(m.key(), &format!("reloaded: {} services", services.len()));
            }
        } else {
            for sv in &services {
                match reload::reload(sv) {
                    Ok(()) => {}
                    // A refused configuration test signals nothing: the
                    // service never loaded the new files and still serves
                    // the old ones, which the check below verifies.
                    Err(e @ reload::ReloadError::Refused { .. }) => {
                        for m in members.iter().filter(|m| m.failed.is_some()) {
                            say(
                                m.key(),
                                &format!("rollback: {e}; the service was not reloaded"),
                            );
                        }
                    }
                    Err(e) => {
                        for m in members.iter_mut().filter(|m| m.failed.is_some()) {
                            m.problems.push(format!("reload: {e}"));
                        }
                    }
                }
            }
        }
        let mut expect: Vec<(Target, String)> = members.iter().flat_map(Member::expect).collect();
        for m in members.iter() {
            for o in &m.plan.others {
                if !expect.contains(o) {
                    expect.push(o.clone());
                }
            }
        }
        // After a rollback the workers that served the new keys are not
        // known: the check waits `verify::SETTLE` instead.
        let old = forward.then_some(old_workers.as_slice());
        let lines = match verify::wait_for(&expect, verify_timeout(cfg), old) {
            Ok(lines) => lines,
            Err(bad) => {
                let standing: Vec<usize> = (0..members.len())
                    .filter(|&i| members[i].failed.is_none())
                    .collect();
                if standing.is_empty() {
                    // The old keys do not serve as before.
                    let why: Vec<String> = bad.iter().map(|m| m.why.clone()).collect();
                    for m in members.iter_mut() {
                        m.problems.extend(why.iter().cloned());
                    }
                    return settle(members, &[], say);
                }
                let plans: Vec<&Plan> = standing.iter().map(|&i| members[i].plan).collect();
                let blamed = blame(&bad, &plans).unwrap_or_else(|| (0..plans.len()).collect());
                for b in blamed {
                    let m = &mut members[standing[b]];
                    let own: Vec<&str> = bad
                        .iter()
                        .filter(|x| x.target.as_ref().is_none_or(|t| m.plan.targets.contains(t)))
                        .map(|x| x.why.as_str())
                        .collect();
                    let own = if own.is_empty() {
                        bad.iter().map(|x| x.why.as_str()).collect()
                    } else {
                        own
                    };
                    m.fail(format!("verify: {}", own.join("; ")), say)?;
                }
                continue;
            }
        };
        // The sensor's own view, for the keys still standing.
        if let Some(events) = &events {
            let standing: Vec<usize> = (0..members.len())
                .filter(|&i| members[i].failed.is_none())
                .collect();
            if !standing.is_empty() {
                let mut exes: Vec<PathBuf> = services.iter().map(|s| s.exe.clone()).collect();
                exes.sort();
                exes.dedup();
                let targets: Vec<Target> = standing
                    .iter()
                    .flat_map(|&i| members[i].plan.targets.iter().cloned())
                    .collect();
                let watch = sensor_view::Watch {
                    events,
                    from,
                    reload_ms,
                    exes,
                    targets: &targets,
                    drain: Duration::from_millis(cfg.rotation.drain_ms),
                    timeout: verify_timeout(cfg),
                };
                let pairs: Vec<(&str, &str)> = standing
                    .iter()
                    .map(|&i| (members[i].new_spki.as_str(), members[i].key()))
                    .collect();
                let seen = sensor_view::verify(&watch, &pairs);
                let mut failed = false;
                let mut views = Vec::new();
                for (&i, r) in standing.iter().zip(seen) {
                    match r {
                        Ok(v) => views.push((i, v)),
                        Err(e) => {
                            members[i].fail(format!("verify: {e}"), say)?;
                            failed = true;
                        }
                    }
                }
                if failed {
                    continue;
                }
                return settle(members, &lines_with(lines, views), say);
            }
        }
        return settle(members, &lines_with(lines, Vec::new()), say);
    }
}

/// Lines of a check: each with the target it is about (none: the
/// sensor's view of the key at that index).
type Line = (Option<Target>, Option<usize>, String);

fn lines_with(handshakes: Vec<(Target, String)>, views: Vec<(usize, Vec<String>)>) -> Vec<Line> {
    handshakes
        .into_iter()
        .map(|(t, l)| (Some(t), None, l))
        .chain(
            views
                .into_iter()
                .flat_map(|(i, v)| v.into_iter().map(move |l| (None, Some(i), l))),
        )
        .collect()
}

/// Ends each key after the last check: standing keys are verified and
/// done, failed ones rolled back (or their rollback failed).
fn settle(members: &mut [Member<'_>], lines: &[Line], say: Say<'_>) -> Result<Vec<Outcome>> {
    let all_targets: Vec<&Target> = members.iter().flat_map(|m| &m.plan.targets).collect();
    let mut out = Vec::new();
    for (i, m) in members.iter_mut().enumerate() {
        // Its own targets, the services' other keys, and its sensor view.
        let detail: Vec<String> = lines
            .iter()
            .filter(|(t, k, _)| match (t, k) {
                (Some(t), _) => m.plan.targets.contains(t) || !all_targets.contains(&t),
                (None, k) => *k == Some(i),
            })
            .map(|(_, _, l)| l.clone())
            .collect();
        out.push(match m.failed.clone() {
            None => {
                for d in &detail {
                    say(m.key(), &format!("verified: {d}"));
                }
                m.j.record(Step::Verified { detail })?;
                let plan = m.plan;
                finish(&mut m.j, &m.swaps, &m.new_spki, &plan.spki_sha256, say)?
            }
            Some(why) if m.problems.is_empty() => {
                for d in &detail {
                    say(m.key(), &format!("rolled back: {d}"));
                }
                let mut detail = detail;
                detail.insert(0, format!("cause: {why}"));
                m.j.record(Step::RolledBack { detail })?;
                say(
                    m.key(),
                    &format!(
                        "rolled back: the old key serves again; journal {}",
                        m.j.path.display()
                    ),
                );
                Outcome::RolledBack
            }
            Some(why) => {
                let w = format!("cause: {why}; rollback: {}", m.problems.join("; "));
                say(m.key(), &format!("ROLLBACK FAILED: {w}"));
                m.j.record(Step::RollbackFailed { why: w })?;
                Outcome::RollbackFailed
            }
        });
    }
    Ok(out)
}

pub(super) fn finish(
    j: &mut Journal,
    swaps: &[FileSwap],
    new_spki: &str,
    key: &str,
    say: Say<'_>,
) -> Result<Outcome> {
    for s in swaps {
        // The rotation holds; a backup left behind is only untidy.
        if let Err(e) = install::finish(s) {
            tracing::warn!(error = %e, "backup not removed");
        }
    }
    j.record(Step::Done)?;
    say(
        key,
        &format!("done: key {new_spki} serves; journal {}", j.path.display()),
    );
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16, name: &str) -> Target {
        Target {
            addr: ([127, 0, 0, 1], port).into(),
            server_name: Some(name.into()),
        }
    }

    fn plan_with(targets: Vec<Target>) -> Plan {
        Plan {
            spki_sha256: String::new(),
            algorithm: String::new(),
            bits: 0,
            files: Vec::new(),
            old_certificate_pem: String::new(),
            services: Vec::new(),
            targets,
            others: Vec::new(),
            gone: Vec::new(),
        }
    }

    fn mismatch(t: Option<Target>) -> verify::Mismatch {
        verify::Mismatch {
            target: t,
            why: "presents another key".into(),
        }
    }

    #[test]
    fn a_mismatch_blames_the_key_whose_target_it_is_or_every_key() {
        let a = plan_with(vec![target(1, "a"), target(1, "a2")]);
        let b = plan_with(vec![target(1, "b")]);
        let c = plan_with(vec![target(2, "c")]);
        let standing = [&a, &b, &c];
        assert_eq!(
            blame(&[mismatch(Some(target(1, "a2")))], &standing),
            Some(vec![0])
        );
        assert_eq!(
            blame(
                &[
                    mismatch(Some(target(2, "c"))),
                    mismatch(Some(target(1, "a"))),
                    mismatch(Some(target(1, "a2")))
                ],
                &standing
            ),
            Some(vec![2, 0])
        );
        // Another key of the service, or the service as a whole: nobody
        // in particular, so everybody.
        assert_eq!(
            blame(&[mismatch(Some(target(1, "other")))], &standing),
            None
        );
        assert_eq!(
            blame(&[mismatch(Some(target(1, "b"))), mismatch(None)], &standing),
            None
        );
    }

    #[test]
    fn in_parallel_keeps_the_order_and_bounds_the_threads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let items: Vec<u32> = (0..40).collect();
        let out = in_parallel(&items, 3, |&i| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            running.fetch_sub(1, Ordering::SeqCst);
            i * 2
        });
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} at once");
        assert_eq!(in_parallel(&[] as &[u32], 4, |&i| i), Vec::<u32>::new());
    }
}
