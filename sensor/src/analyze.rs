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
