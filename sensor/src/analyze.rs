//! `keywarden analyze` and `keywarden baseline`: the live pipeline, offline.
//!
//! Replay feeds recorded events through the same `Pipeline`, rules and
//! GeoIP enrichment as `keywarden run`, so a rule can be tried on yesterday's
//! traffic before it is deployed. Events recorded before keywarden wrote
//! strict OCSF are read in their earlier layout (`event::legacy`). Nothing
//! is enforced: every action's
//! response says `skipped` (replay). Findings in the input (a live run's
//! own) are not replayed.

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use keywarden_analyzer::{
    baseline::BaselineStore,
    event::{Event, EventCode, legacy},
    pipeline::{self, Input, Overflow, Pipeline},
};
use tracing::warn;

use crate::{
    config::Config,
    respond::{self, Replay},
    setup::{self, load_rules, open_geo},
};

pub struct Args {
    pub input: String,
    pub config: Option<PathBuf>,
    pub rules: Vec<String>,
    pub baselines: Option<String>,
    pub output: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    cfg.rules.extend(args.rules);
    let rules = load_rules(&cfg.rules)?;
    let baselines = match &args.baselines {
        Some(p) => BaselineStore::load(Path::new(p))?,
        None => BaselineStore::default(),
    };
    let pipeline = Pipeline::start(
        rules,
        setup::pipeline_config(
            &cfg.analyzer,
            open_geo(&cfg.analyzer)?,
            baselines,
            Overflow::Block,
        ),
    );
    let reader: Box<dyn BufRead + Send> = if args.input == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.input)
                .with_context(|| format!("{}: cannot read", args.input))?,
        ))
    };
    let mut out: Box<dyn Write> = match args.output.as_deref() {
        None | Some("-") => Box::new(std::io::stdout().lock()),
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("{p}: cannot open for writing"))?,
        ),
    };
    let origin = setup::origin();
    let mut seq = 0u64;
    let mut findings = 0u64;
    let mut write = |o: Box<pipeline::Output>, out: &mut dyn Write| -> Result<()> {
        let next_seq = || {
            seq += 1;
            seq
        };
        for finding in respond::findings(&o, &mut Replay, &origin, o.event.time, next_seq) {
            serde_json::to_writer(&mut *out, &finding)?;
            out.write_all(b"\n")?;
            findings += 1;
        }
        Ok(())
    };
    let input = args.input.clone();
    let (read, bad) = std::thread::scope(|scope| -> Result<(u64, u64)> {
        let feeder = scope.spawn(|| {
            let (mut read, mut bad) = (0u64, 0u64);
            for (n, line) in reader.lines().enumerate() {
                let line = match line {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("{input}:{}: cannot read: {e}", n + 1);
                        bad += 1;
                        break;
                    }
                };
                if line.trim().is_empty() {
                    continue;
                }
                match read_event(&line) {
                    Ok(ev) if ev.metadata.event_code == EventCode::Alert => {}
                    Ok(ev) => {
                        read += 1;
                        let _ = pipeline.submit(Input {
                            event: ev,
                            killed_by: None,
                        });
                    }
                    Err(e) => {
                        warn!("{input}:{}: not a keywarden event: {e}", n + 1);
                        bad += 1;
                    }
                }
            }
            (read, bad)
        });
        while !feeder.is_finished() {
            let ready: Vec<_> = pipeline.try_drain().collect();
            if ready.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            for o in ready {
                write(o, &mut *out)?;
            }
        }
        Ok(feeder.join().expect("feeder thread"))
    })?;
    let (rest, _) = pipeline.finish();
    for o in rest {
        write(o, &mut *out)?;
    }
    out.flush()?;
    eprintln!("keywarden: analyzed {read} events, {findings} findings, {bad} unreadable lines");
    if bad > 0 && read == 0 {
        anyhow::bail!("{}: no events could be read", args.input);
    }
    Ok(())
}

/// One recorded event, in the current layout or the earlier one.
fn read_event(line: &str) -> serde_json::Result<Event> {
    let mut value: serde_json::Value = serde_json::from_str(line)?;
    legacy::upgrade(&mut value);
    serde_json::from_value(value)
}

pub fn list_baselines(file: &Path) -> Result<()> {
    let store = BaselineStore::load(file)?;
    let mut keys: Vec<_> = store.keys.values().collect();
    keys.sort_by(|a, b| a.spki_sha256.cmp(&b.spki_sha256));
    for k in keys {
        println!(
            "{} uses={} first={} last={} binaries={} containers={} users={} countries={} asns={} busiest_minute={}",
            k.spki_sha256,
            k.uses,
            k.first_seen_ms,
            k.last_seen_ms,
            k.binaries.len(),
            k.containers.len(),
            k.users.iter().collect::<Vec<_>>().join(","),
            k.countries.iter().collect::<Vec<_>>().join(","),
            k.asns
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            k.rate.max_per_minute,
        );
    }
    Ok(())
}

pub fn reset_baselines(file: &Path, key: Option<&str>) -> Result<()> {
    let mut store = BaselineStore::load(file)?;
    match key {
        Some(k) => {
            if store.keys.remove(k).is_none() {
                anyhow::bail!("{}: no baseline for key {k}", file.display());
            }
        }
        None => store.keys.clear(),
    }
    store.save(file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `key_use` line as keywarden wrote it before its events were
    /// strict OCSF (the example docs/events.md showed then).
    const EARLIER: &str = r#"{"time":1764000000123,"class_uid":1005,"class_name":"Module Activity","category_uid":1,"category_name":"System Activity","activity_id":3,"activity_name":"Invoke","type_uid":100503,"type_name":"Module Activity: Invoke","severity_id":1,"severity":"Informational","status_id":1,"status":"Success","message":"nginx (pid 48211) signed with ecdsa-p256 key 0eab356819ea6df9 via EVP_DigestSign","metadata":{"version":"1.3.0","product":{"name":"keywarden","vendor_name":"keywarden","version":"0.1.0"},"uid":"3c9a1f2e-1763999400512-4182","event_code":"key_use","profiles":["host","container"]},"device":{"hostname":"node-7","type_id":1},"actor":{"process":{"pid":48211,"tid":48211,"name":"nginx","cmd_line":"nginx: worker process","file":{"path":"/usr/sbin/nginx","name":"nginx","type_id":1,"hashes":[{"algorithm_id":3,"algorithm":"SHA-256","value":"ab6be39831d4f18f927afb4fb21daa4bea37a5be322310bba482ee138b9bbbd2"}]},"user":{"uid":"101"}}},"container":{"uid":"bd768e3bede5511ac8d05f909ad47222de24a07c7a53ad4cb25e767770dca51e","runtime":"containerd","pod_uuid":"7c3e1d52-9a4b-4f60-8e21-5b9d0c6a3f17","name":"nginx","pod_name":"web-6f8d9c7b5-q2xkz","pod_namespace":"shop"},"module":{"file":{"path":"/usr/lib/x86_64-linux-gnu/libcrypto.so.3","name":"libcrypto.so.3","type_id":1},"function_name":"EVP_DigestSign","type":"openssl"},"key":{"status":"identified","spki_sha256":"0eab356819ea6df95972a074d5a7bcb18cf75ef9124a4f89cb2e6f7d722bfd3f","fingerprint":{"algorithm_id":3,"algorithm":"SHA-256","value":"0eab356819ea6df95972a074d5a7bcb18cf75ef9124a4f89cb2e6f7d722bfd3f"},"algorithm":"ecdsa-p256","bits":256,"source_file":"/etc/nginx/tls/tls.key","identified_by":"signature_verified"},"signature":{"length":71,"digest":"SHA256"},"cgroup":{"id":24193,"path":"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7c3e1d52_9a4b_4f60_8e21_5b9d0c6a3f17.slice/cri-containerd-bd768e3bede5511ac8d05f909ad47222de24a07c7a53ad4cb25e767770dca51e.scope"},"peer":{"ip":"198.51.100.23","port":53122,"location":{"country":"DE","city":"Frankfurt am Main"},"autonomous_system":{"number":64500,"name":"Example Net"}},"local":{"ip":"10.244.1.17","port":8443}}"#;

    #[test]
    fn a_recording_in_the_earlier_layout_is_replayed_as_the_current_one() {
        let ev = read_event(EARLIER).unwrap();
        assert_eq!(ev.metadata.event_code, EventCode::KeyUse);
        assert_eq!((ev.activity_id, ev.type_uid), (99, 100599));
        let key = ev
            .unmapped
            .key
            .as_ref()
            .expect("the key moved under unmapped");
        assert_eq!(
            key.spki_sha256.as_deref(),
            Some("0eab356819ea6df95972a074d5a7bcb18cf75ef9124a4f89cb2e6f7d722bfd3f")
        );
        assert_eq!(
            ev.container().map(|c| c.runtime.as_str()),
            Some("containerd")
        );
        let pod = ev.unmapped.pod.as_ref().expect("the pod's names");
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "web-6f8d9c7b5-q2xkz")
        );
        assert_eq!(
            ev.unmapped.peer.as_ref().map(|p| p.ip.as_str()),
            Some("198.51.100.23")
        );
        // A current line reads as itself.
        let current = serde_json::to_string(&ev).unwrap();
        assert_eq!(read_event(&current).unwrap(), ev);
    }
}
