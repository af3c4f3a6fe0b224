use super::*;
use crate::baseline::Deviation;
use crate::event::tests_support::{key_use_event, secret_open_event};

fn parse(src: &str) -> Result<RuleSet, RuleErrors> {
    RuleSet::parse(src, "t.yaml")
}

fn one_error(src: &str) -> RuleError {
    let errs = parse(src).expect_err("should fail").0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

const KEY: &str = "abababababababababababababababababababababababababababababababab";

#[test]
fn a_full_rule_parses_and_matches() {
    let src = format!(
        r#"
rules:
  - id: tls-key-readers
    description: Only nginx reads the TLS key
    severity: high
    event: secret_file_open
    match:
      file.path: /etc/ssl/private/**
      secret_file.holds_private_key: true
    allow:
      - exe_path: /usr/sbin/apache2
    actions: [alert, block]
  - id: protect-signing-key
    severity: critical
    event: key_use
    match:
      key.spki_sha256: {KEY}
      actor.process.user.uid: [0, 33]
    actions: [kill]
"#
    );
    let set = parse(&src).unwrap();
    assert_eq!(set.rules.len(), 2);
    let r = &set.rules[0];
    assert_eq!(r.source, "t.yaml:3");
    assert_eq!(r.severity_id, 4);
    assert_eq!(r.actions, vec![Action::Alert, Action::Block]);
    assert_eq!(r.values_of("file.path").unwrap(), ["/etc/ssl/private/**"]);

    let open = secret_open_event();
    let mut th = Thresholds::default();
    let fired: Vec<&str> = set
        .evaluate(&open, &[], &mut th, None)
        .iter()
        .map(|f| f.rule.id.as_str())
        .collect();
    assert_eq!(fired, ["tls-key-readers"]);
    let sign = key_use_event();
    let fired: Vec<&str> = set
        .evaluate(&sign, &[], &mut th, None)
        .iter()
        .map(|f| f.rule.id.as_str())
        .collect();
    assert_eq!(fired, ["protect-signing-key"]);
}

#[test]
fn conditions_must_all_hold() {
    let set = parse(
        "rules:\n  - id: a\n    severity: low\n    event: secret_file_open\n    match:\n      file.path: /etc/ssl/private/*.key\n      actor.process.name: cat\n    actions: [alert]\n",
    )
    .unwrap();
    let mut ev = secret_open_event();
    assert!(!set.rules[0].matches(&ev), "process is nginx, not cat");
    ev.actor.process.name = "cat".into();
    assert!(set.rules[0].matches(&ev));
    ev.file.as_mut().unwrap().path = "/etc/ssl/private/sub/a.key".into();
    assert!(!set.rules[0].matches(&ev), "`*` does not cross directories");
}

#[test]
fn allow_entries_need_every_field_they_set() {
    let src = format!(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    allow:\n      - exe_path: /usr/sbin/nginx\n        uid: 0\n      - exe_sha256: {}\n    actions: [alert]\n",
        "11".repeat(32)
    );
    let set = parse(&src).unwrap();
    let r = &set.rules[0];
    let mut ev = key_use_event(); // nginx, uid 33, exe hash 00…
    assert!(
        r.matches(&ev),
        "nginx as uid 33 is not the allowed nginx as uid 0"
    );
    ev.actor.process.user.uid = "0".into();
    assert!(!r.matches(&ev));
    ev.actor.process.user.uid = "33".into();
    ev.actor.process.file.as_mut().unwrap().path = "/tmp/x".into();
    ev.actor.process.file.as_mut().unwrap().hashes[0].value = "11".repeat(32);
    assert!(!r.matches(&ev), "allowed by hash wherever it lives");
}

#[test]
fn container_allow_is_a_prefix() {
    let set = parse(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    allow:\n      - container: aaaaaaaaaaaa\n    actions: [alert]\n",
    )
    .unwrap();
    let mut ev = key_use_event();
    assert!(!set.rules[0].matches(&ev));
    ev.actor.process.container = None;
    assert!(set.rules[0].matches(&ev));
}

#[test]
fn unknown_keys_point_at_the_key() {
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actoins: [alert]\n",
    );
    assert_eq!((e.line, e.column), (5, 5), "{e}");
    assert!(e.message.contains("unknown field `actoins`"), "{e}");
    assert!(e.to_string().starts_with("t.yaml:5:5: "), "{e}");
}

#[test]
fn unknown_and_misplaced_event_fields_are_errors() {
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    match:\n      key.spki: x\n    actions: [alert]\n",
    );
    assert_eq!((e.line, e.column), (6, 7));
    assert!(e.message.contains("unknown event field `key.spki`"));
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    match:\n      file.path: /x\n    actions: [alert]\n",
    );
    assert_eq!((e.line, e.column), (6, 7));
    assert!(
        e.message
            .contains("key_use events have no field `file.path`"),
        "{e}"
    );
}

#[test]
fn values_are_typed() {
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    match:\n      key.spki_sha256: ABC\n    actions: [alert]\n",
    );
    assert_eq!((e.line, e.column), (6, 24));
    assert!(e.message.contains("not a SHA-256"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    match:\n      actor.process.pid: [1, two]\n    actions: [alert]\n",
    );
    assert!(e.message.contains("`two` is not a number"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: secret_file_open\n    match:\n      file.path: \"/etc/[ssl\"\n    actions: [alert]\n",
    );
    assert!(e.message.contains("invalid glob"), "{e}");
}

#[test]
fn allow_entries_are_checked() {
    let src = "rules:\n  - id: a\n    severity: low\n    event: key_use\n    allow:\n      - exe_path: nginx\n      - exe_sha256: 12ab\n      - container: xyz\n      - {}\n    actions: [alert]\n";
    let errs = parse(src).err().unwrap().0;
    let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 4, "{msgs:?}");
    assert!(
        msgs[0].starts_with("t.yaml:6:19: exe_path `nginx` is not an absolute path"),
        "{msgs:?}"
    );
    assert!(msgs[1].contains("exe_sha256 `12ab` is not 64 hex digits"));
    assert!(msgs[2].contains("container `xyz`"));
    assert!(msgs[3].contains("needs exe_path"));
}

#[test]
fn kill_switch_actions_carry_their_reason_and_mode() {
    let set = parse(
        "rules:\n  - id: a\n    severity: high\n    event: key_use\n    actions: [alert, rotate, revoke]\n    revoke_reason: SUPERSEDED\n    remediation: approve\n",
    )
    .unwrap();
    let r = &set.rules[0];
    assert_eq!(r.actions, [Action::Alert, Action::Rotate, Action::Revoke]);
    assert_eq!(r.revoke_reason, "superseded", "spelled as RFC 5280 does");
    assert_eq!(r.remediation, crate::remediation::Mode::Approve);
    let set = parse(
        "rules:\n  - id: a\n    severity: high\n    event: secret_file_open\n    actions: [revoke]\n",
    )
    .unwrap();
    assert_eq!(set.rules[0].revoke_reason, "keyCompromise");
    assert_eq!(set.rules[0].remediation, crate::remediation::Mode::Enforce);

    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [revoke]\n    revoke_reason: stolen\n",
    );
    assert!(e.message.contains("unknown revoke_reason `stolen`"), "{e}");
    assert!(e.message.contains("keyCompromise"), "{e}");
    assert_eq!(e.line, 6);
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [rotate]\n    revoke_reason: superseded\n",
    );
    assert!(
        e.message.contains("revoke_reason without a `revoke`"),
        "{e}"
    );
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [alert]\n    remediation: enforce\n",
    );
    assert!(e.message.contains("remediation without"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [rotate]\n    remediation: yolo\n",
    );
    assert!(e.message.contains("unknown remediation `yolo`"), "{e}");
}

#[test]
fn actions_fit_the_event() {
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [block]\n",
    );
    assert!(
        e.message.contains("block applies to secret_file_open"),
        "{e}"
    );
    assert_eq!((e.line, e.column), (5, 15));
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: secret_file_open\n    actions: [block]\n",
    );
    assert!(e.message.contains("needs a `file.path` condition"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [deny]\n",
    );
    assert!(e.message.contains("not available"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [page]\n",
    );
    assert!(e.message.contains("unknown action `page`"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: urgent\n    event: key_use\n    actions: [alert]\n",
    );
    assert!(e.message.contains("unknown severity"), "{e}");
    let e =
        one_error("rules:\n  - id: a\n    severity: low\n    event: dns\n    actions: [alert]\n");
    assert!(e.message.contains("unknown event `dns`"), "{e}");
}

#[test]
fn duplicate_ids_and_syntax_errors() {
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    actions: [alert]\n  - id: a\n    severity: low\n    event: key_use\n    actions: [alert]\n",
    );
    assert_eq!(e.line, 6);
    assert!(e.message.contains("already used at t.yaml:2"), "{e}");
    let e = one_error("rules:\n  - id: a\n    actions: [alert\n");
    assert_eq!((e.line, e.column), (3, 14));
    assert!(!e.message.contains('\n'));
}

#[test]
fn shipped_rules_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let set = RuleSet::load(&[dir]).unwrap_or_else(|e| panic!("{e}"));
    assert!(!set.rules.is_empty());
}

#[test]
fn load_collects_errors_across_files() {
    let dir = std::env::temp_dir().join(format!("kw-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "rules:\n  - id: x\n    severity: low\n    event: key_use\n    actions: [alert]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.yml"),
        "rules:\n  - id: x\n    severity: low\n    event: key_use\n    actions: [alert]\n",
    )
    .unwrap();
    std::fs::write(dir.join("c.yaml"), "rules:\n  - id: y\n    severity: low\n    event: key_use\n    actions: [alert]\n  - id: z\n    severity: nope\n    event: key_use\n    actions: [alert]\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "not a rule").unwrap();
    let errs = RuleSet::load(std::slice::from_ref(&dir)).err().unwrap().0;
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs.iter()
            .any(|e| e.file.ends_with("c.yaml") && e.line == 7)
    );
    assert!(
        errs.iter()
            .any(|e| e.file.ends_with("b.yml") && e.message.contains("a.yaml:2"))
    );
    assert!(errs.iter().any(|e| e.message.contains("already used")));
}

#[test]
fn plain_scalars_keep_their_text() {
    // An all-digit SPKI would be the number 0 if read as YAML decides.
    let zeros = "0".repeat(64);
    let src = format!(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    match:\n      key.spki_sha256: {zeros}\n      actor.process.name: [0123, \"007\", 1e3]\n    actions: [alert]\n"
    );
    let set = parse(&src).unwrap();
    assert_eq!(set.rules[0].values_of("key.spki_sha256").unwrap(), [zeros]);
    assert_eq!(
        set.rules[0].values_of("actor.process.name").unwrap(),
        ["0123", "007", "1e3"]
    );
}

#[test]
fn deviation_rules_fire_only_on_the_deviations_they_name() {
    let set = parse(
        "rules:\n  - id: new-place\n    severity: high\n    event: key_use\n    deviation: [new_country, new_asn]\n    actions: [alert]\n",
    )
    .unwrap();
    let ev = key_use_event();
    let mut th = Thresholds::default();
    assert!(set.evaluate(&ev, &[], &mut th, None).is_empty());
    assert!(
        set.evaluate(&ev, &[Deviation::NewBinary], &mut th, None)
            .is_empty()
    );
    let f = set.evaluate(
        &ev,
        &[Deviation::NewBinary, Deviation::NewCountry],
        &mut th,
        None,
    );
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].deviations, [Deviation::NewCountry]);
    assert!(!set.rules[0].is_stateless());
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    deviation: [new_planet]\n    actions: [alert]\n",
    );
    assert_eq!((e.line, e.column), (5, 17));
    assert!(e.message.contains("unknown deviation `new_planet`"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: secret_file_open\n    deviation: [new_binary]\n    actions: [alert]\n",
    );
    assert!(e.message.contains("deviation applies to key_use"), "{e}");
}

#[test]
fn thresholds_fire_once_per_crossing_per_key_in_a_sliding_window() {
    let set = parse(
        "rules:\n  - id: busy\n    severity: medium\n    event: key_use\n    threshold: {count: 3, window_seconds: 60}\n    actions: [alert]\n",
    )
    .unwrap();
    let mut th = Thresholds::default();
    let mut ev = key_use_event();
    let mut fired = Vec::new();
    for i in 0..6 {
        ev.time = 1_000_000 + i * 1000;
        fired.push(
            set.evaluate(&ev, &[], &mut th, None)
                .first()
                .and_then(|f| f.count),
        );
    }
    assert_eq!(fired, [None, None, None, Some(4), None, None]);
    // Another key counts on its own.
    let mut other = key_use_event();
    other.unmapped.key.as_mut().unwrap().spki_sha256 = Some("cd".repeat(32));
    other.time = ev.time;
    assert!(set.evaluate(&other, &[], &mut th, None).is_empty());
    // Two minutes later the window has emptied: it re-arms.
    let mut fired = Vec::new();
    for i in 0..4 {
        ev.time = 1_000_000 + 180_000 + i;
        fired.push(!set.evaluate(&ev, &[], &mut th, None).is_empty());
    }
    assert_eq!(fired, [false, false, false, true]);
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    threshold: {count: 0, window_seconds: 60}\n    actions: [alert]\n",
    );
    assert!(e.message.contains("at least 1"), "{e}");
    let e = one_error(
        "rules:\n  - id: a\n    severity: low\n    event: key_use\n    threshold: {count: 5, window: 60}\n    actions: [alert]\n",
    );
    assert!(e.message.contains("unknown field `window`"), "{e}");
}

/// The rule index only skips rules that cannot select an event: for every
/// event, the rules it selects are the ones a test of every rule finds,
/// in the same order. And it does skip: another key's rules are not even
/// candidates.
#[test]
fn the_rule_index_finds_exactly_the_rules_that_select() {
    let other = "cd".repeat(32);
    let src = format!(
        r#"
rules:
  - {{id: by-key, severity: high, event: key_use, match: {{key.spki_sha256: {KEY}}}, actions: [alert]}}
  - {{id: by-other-key, severity: high, event: key_use, match: {{key.spki_sha256: {other}}}, actions: [alert]}}
  - {{id: either-key, severity: high, event: key_use, match: {{key.spki_sha256: [{other}, {KEY}]}}, actions: [alert]}}
  - {{id: key-and-name, severity: high, event: key_use, match: {{actor.process.name: nginx, key.spki_sha256: {KEY}}}, actions: [alert]}}
  - {{id: algorithm, severity: low, event: key_use, match: {{key.algorithm: [rsa-2048, ecdsa-p256]}}, actions: [alert]}}
  - {{id: uid-only, severity: low, event: key_use, match: {{actor.process.user.uid: 33}}, actions: [alert]}}
  - {{id: every-use, severity: low, event: key_use, actions: [alert]}}
  - {{id: opens-by-path, severity: low, event: secret_file_open, match: {{file.path: /etc/ssl/**}}, actions: [alert]}}
  - {{id: opens-by-key, severity: low, event: secret_file_open, match: {{key.spki_sha256: {KEY}}}, actions: [alert]}}
  - {{id: country, severity: low, event: key_use, match: {{peer.location.country: [DE, FR]}}, actions: [alert]}}
"#
    );
    let set = parse(&src).unwrap();
    let index = index::RuleIndex::build(&set.rules);
    let mut events = vec![key_use_event(), secret_open_event()];
    let mut e = key_use_event();
    e.unmapped.key.as_mut().unwrap().spki_sha256 = Some(other.clone());
    e.unmapped.key.as_mut().unwrap().algorithm = Some("rsa-2048".into());
    e.actor.process.name = "apache2".into();
    events.push(e);
    let mut e = key_use_event();
    e.unmapped.key = None;
    e.unmapped.peer = None;
    events.push(e);
    let mut e = secret_open_event();
    e.unmapped.key = None;
    events.push(e);
    for ev in &events {
        let every: Vec<usize> = (0..set.rules.len())
            .filter(|&i| set.rules[i].selects(ev))
            .collect();
        let mut candidates = vec![99];
        index.candidates(ev, &mut candidates);
        let indexed: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| set.rules[i].selects(ev))
            .collect();
        assert_eq!(indexed, every, "{ev:#?}");
        assert!(candidates.windows(2).all(|w| w[0] < w[1]));
        // evaluate skips the condition a rule was found by: it must hold.
        for &i in &candidates {
            if let Some(at) = index.indexed_condition[i] {
                assert!(set.rules[i].conditions[at].holds(ev), "{}", set.rules[i].id);
            }
        }
    }
    let ids = |ev: &Event| -> Vec<&str> {
        let mut candidates = Vec::new();
        index.candidates(ev, &mut candidates);
        candidates
            .into_iter()
            .map(|i| set.rules[i].id.as_str())
            .collect()
    };
    let mine = ids(&key_use_event());
    assert!(!mine.contains(&"by-other-key"), "{mine:?}");
    assert!(mine.contains(&"by-key") && mine.contains(&"either-key"));
    assert!(!ids(&events[2]).contains(&"by-key"));
}

/// Events from different CPUs arrive slightly out of order. A late event
/// counts in the newest second: buckets stay ordered, so the window still
/// slides past them and they do not pile up.
#[test]
fn a_late_event_counts_in_the_newest_second() {
    let mut w = Sliding::default();
    for i in 0..1000 {
        let t = if i % 2 == 0 { 101_000 } else { 100_000 };
        assert_eq!(w.add(t, 60_000), i + 1);
    }
    assert_eq!(w.buckets.len(), 1);
    assert_eq!(w.add(200_000, 60_000), 1, "the window slid past them all");
}
