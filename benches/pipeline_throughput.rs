//! Analyzer pipeline throughput on realistic events: 10,000 keys, 100
//! rules, GeoIP lookups on every event, one shard (one core) and two.
//!
//!     cargo bench -p keywarden-analyzer --bench pipeline_throughput
//!
//! Each iteration pushes a batch of key-use events (peers spread over the
//! test GeoIP ranges, 20 binaries, 4 users, containers) through the whole
//! pipeline and waits for every result: submit → shard (geo, baseline,
//! rules) → output queue → drain.
//!
//! Then it measures one shard's events per second of its own CPU time
//! (`pipeline/per_core`): the feeding and draining threads share this
//! VM's two cores with the shard during the criterion runs.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keywarden_analyzer::{
    baseline::BaselineStore,
    event::{
        Cgroup, Container, Event, File, Fingerprint, KeyIdentity, KeyStatus, KeyUse,
        NetworkEndpoint, Origin, Process, Signature, User, Who,
    },
    geo::Geo,
    pipeline::{self, Input, Overflow, Pipeline},
    rules::RuleSet,
};
use mmdb_writer::{Value, Writer, ipnet::IpNet};

/// The sensor's allocator (see `sensor/src/main.rs`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: usize = 10_000;
const BATCH: usize = 20_000;

/// 64 hex digits that look like a SHA-256 of `i` under `domain`: spread
/// from the first digit, as real digests are (zero-padded counters would
/// make every comparison walk a long common prefix).
fn digest(domain: u64, i: usize) -> String {
    // splitmix64
    let mut x = domain.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
    (0..4)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            format!("{:016x}", z ^ (z >> 31))
        })
        .collect()
}

fn spki(i: usize) -> String {
    digest(1, i)
}

/// City and ASN databases over 10.0.0.0/8 in /16 blocks, 12 countries.
fn geo(dir: &std::path::Path) -> Arc<Geo> {
    let countries = [
        "DE", "FR", "US", "JP", "BR", "IN", "GB", "NL", "SE", "CA", "AU", "SG",
    ];
    let mut city = Writer::new("GeoLite2-City");
    let mut asn = Writer::new("GeoLite2-ASN");
    for b in 0..=255u32 {
        let net: IpNet = format!("10.{b}.0.0/16").parse().unwrap();
        city.insert(
            net,
            &serde_json::json!({"country": {"iso_code": countries[b as usize % countries.len()]},
                                "city": {"names": {"en": format!("City {b}")}}}),
        )
        .unwrap();
        asn.insert_value(
            net,
            Value::map([
                ("autonomous_system_number", Value::from(64_512 + b)),
                ("autonomous_system_organization", Value::from("Example Net")),
            ]),
        )
        .unwrap();
    }
    let c = dir.join("city.mmdb");
    let a = dir.join("asn.mmdb");
    std::fs::write(&c, city.to_bytes().unwrap()).unwrap();
    std::fs::write(&a, asn.to_bytes().unwrap()).unwrap();
    Arc::new(Geo::open(Some(&c), Some(&a)).unwrap())
}

/// 100 rules of the kinds operators write: key allow lists, deviations,
/// thresholds, field matches.
fn rules() -> RuleSet {
    let mut y = String::from("rules:\n");
    for i in 0..60 {
        y += &format!(
            "  - id: protect-{i}\n    severity: high\n    event: key_use\n    match:\n      key.spki_sha256: {}\n    allow:\n      - exe_path: /usr/sbin/nginx\n      - uid: 33\n    actions: [alert]\n",
            spki(i * 150)
        );
    }
    for i in 0..20 {
        let dev = ["new_country", "new_asn", "new_binary", "new_container"][i % 4];
        y += &format!(
            "  - id: deviation-{i}\n    severity: medium\n    event: key_use\n    match:\n      key.algorithm: {}\n    deviation: [{dev}]\n    actions: [alert]\n",
            ["ecdsa-p256", "rsa-2048"][i % 2]
        );
    }
    for i in 0..10 {
        y += &format!(
            "  - id: busy-{i}\n    severity: low\n    event: key_use\n    match:\n      module.function_name: {}\n    threshold: {{count: 1000, window_seconds: 60}}\n    actions: [alert]\n",
            ["EVP_DigestSign", "EVP_PKEY_sign"][i % 2]
        );
    }
    for i in 0..10 {
        y += &format!(
            "  - id: field-{i}\n    severity: low\n    event: key_use\n    match:\n      peer.location.country: [{}]\n      actor.process.user.uid: {}\n    actions: [alert]\n",
            ["JP", "BR"][i % 2],
            1000 + i
        );
    }
    RuleSet::parse(&y, "bench.yaml").unwrap()
}

fn events() -> Vec<Event> {
    let origin = Origin {
        hostname: "bench".into(),
        product_version: "0".into(),
        uid_prefix: "b".into(),
    };
    (0..BATCH)
        .map(|i| {
            let k = (i * 7919) % KEYS;
            let mut ev = Event::key_use(
                &origin,
                KeyUse {
                    time_ms: 1_800_000_000_000 + i as i64,
                    seq: i as u64,
                    who: Who {
                        process: Process {
                            pid: 1000 + (i % 500) as u32,
                            tid: 1000 + (i % 500) as u32,
                            name: "nginx".into(),
                            cmd_line: None,
                            file: Some(File {
                                path: format!("/usr/sbin/app{}", i % 20),
                                name: "app".into(),
                                type_id: 1,
                                hashes: vec![Fingerprint::sha256(digest(2, i % 20))],
                            }),
                            user: User {
                                uid: (33 + (i % 4)).to_string(),
                                name: None,
                            },
                            container: (i % 3 == 0).then(|| Container {
                                uid: digest(3, i % 50),
                                runtime: "containerd".into(),
                                pod_uuid: None,
                                name: None,
                            }),
                        },
                        cgroup: Some(Cgroup { id: 1, path: None }),
                        ..Who::default()
                    },
                    library: File {
                        path: "/usr/lib/x86_64-linux-gnu/libcrypto.so.3".into(),
                        name: "libcrypto.so.3".into(),
                        type_id: 1,
                        hashes: vec![],
                    },
                    library_kind: "openssl".into(),
                    function: if i % 2 == 0 {
                        "EVP_DigestSign"
                    } else {
                        "EVP_PKEY_sign"
                    }
                    .into(),
                    success: true,
                    key: KeyIdentity {
                        status: KeyStatus::Identified,
                        spki_sha256: Some(spki(k)),
                        fingerprint: None,
                        algorithm: Some(
                            if k.is_multiple_of(2) {
                                "ecdsa-p256"
                            } else {
                                "rsa-2048"
                            }
                            .into(),
                        ),
                        bits: Some(256),
                        source_file: None,
                        identified_by: Some(keywarden_analyzer::event::IdentifiedBy::HandleCache),
                        unknown_reason: None,
                    },
                    signature: Signature {
                        length: 71,
                        digest: None,
                    },
                    peer: None,
                    local: None,
                },
            );
            ev.unmapped.peer = Some(NetworkEndpoint {
                ip: Ipv4Addr::new(10, (i % 256) as u8, (i / 256 % 256) as u8, 7).to_string(),
                port: Some(40_000 + (i % 20_000) as u16),
                location: None,
                autonomous_system: None,
            });
            ev
        })
        .collect()
}

/// The batch again, as it would come next: time goes on (threshold
/// windows slide as they do live).
fn later(batch: &[Event], round: &mut i64) -> Vec<Event> {
    *round += 1;
    let span = BATCH as i64;
    batch
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.time += *round * span;
            e
        })
        .collect()
}

/// Pushes the batch through and waits for every result. The events are
/// built beforehand (the sensor builds each once; cloning is not the
/// pipeline's cost).
fn run_batch(p: &Pipeline, batch: Vec<Event>) {
    let n = batch.len();
    std::thread::scope(|s| {
        s.spawn(|| {
            for ev in batch {
                let _ = p.submit(Input {
                    event: ev,
                    killed_by: None,
                });
            }
        });
        let mut got = 0;
        while got < n {
            let ready = p.try_drain().count();
            if ready == 0 {
                std::thread::yield_now();
            }
            got += ready;
        }
    });
}

/// CPU time the named threads of this process have run, from the
/// scheduler's own accounting (`/proc/self/task/*/schedstat`, ns).
fn cpu_ns_of_threads(prefix: &str) -> u64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Events per second of one shard's own CPU time: what one core of
/// analysis sustains, apart from the threads that feed and drain it here
/// (the sensor's ring reader and sinks), which share this VM's two cores
/// with it during the criterion runs.
/// Also without GeoIP, without rules, and without both, to show what each
/// part costs.
/// The GeoIP cache hits here once warm: each batch's 20,000 peers come
/// back in the next. "GeoIP uncached" shows the cost when every peer is
/// new.
/// "2 shards" divides the events by both shards' CPU time together: if
/// sharding by key adds no contention, it stays at the one-shard figure,
/// so throughput grows with the cores given to shards.
fn per_core(geo: &Arc<Geo>, batch: &[Event]) {
    let cached = pipeline::GEO_CACHE_ENTRIES;
    for (shards, with_geo, geo_cache, with_rules, what) in [
        (1, true, cached, true, ""),
        (1, true, 0, true, " (GeoIP uncached)"),
        (1, false, 0, true, " (no GeoIP)"),
        (1, true, cached, false, " (no rules)"),
        (1, false, 0, false, " (no GeoIP, no rules)"),
        (2, true, cached, true, " (2 shards)"),
    ] {
        let rules = if with_rules {
            rules()
        } else {
            RuleSet::default()
        };
        per_core_with(
            shards,
            with_geo.then(|| geo.clone()),
            geo_cache,
            rules,
            batch,
            what,
        );
    }
}

fn per_core_with(
    shards: usize,
    geo: Option<Arc<Geo>>,
    geo_cache: usize,
    rules: RuleSet,
    batch: &[Event],
    what: &str,
) {
    let p = Pipeline::start(
        rules,
        pipeline::Config {
            shards,
            queue: 65_536,
            learning_ms: 1,
            overflow: Overflow::Block,
            geo,
            geo_cache,
            baselines: BaselineStore::default(),
        },
    );
    let mut round = 0;
    run_batch(&p, later(batch, &mut round)); // warm: baselines learned
    let rounds = 20;
    let batches: Vec<Vec<Event>> = (0..rounds).map(|_| later(batch, &mut round)).collect();
    let before = cpu_ns_of_threads("keywarden-shard");
    for b in batches {
        run_batch(&p, b);
    }
    let cpu_ns = cpu_ns_of_threads("keywarden-shard") - before;
    let events = (rounds * batch.len()) as f64;
    println!(
        "pipeline/per_core{what}: {events} events in {:.3} s of shard CPU time = {:.0} events/s per core",
        cpu_ns as f64 / 1e9,
        events / (cpu_ns as f64 / 1e9)
    );
    p.finish();
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("kw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let geo = geo(&dir);
    let batch = events();
    // Baselines already learned for every key (the steady state).
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(10);
    for shards in [1usize, 2] {
        let p = Pipeline::start(
            rules(),
            pipeline::Config {
                shards,
                queue: 65_536,
                learning_ms: 1,
                overflow: Overflow::Block,
                geo: Some(geo.clone()),
                geo_cache: pipeline::GEO_CACHE_ENTRIES,
                baselines: BaselineStore::default(),
            },
        );
        let mut round = 0;
        run_batch(&p, later(&batch, &mut round)); // warm: baselines learned
        group.bench_with_input(BenchmarkId::new("shards", shards), &shards, |b, _| {
            b.iter_batched(
                || later(&batch, &mut round),
                |evs| run_batch(&p, evs),
                BatchSize::PerIteration,
            )
        });
        p.finish();
    }
    group.finish();
    per_core(&geo, &batch);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
