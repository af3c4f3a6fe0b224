//! Where events go: numbered, through the analysis pipeline, then to the
//! sink, with a finding for every rule they fire. It also counts what it
//! wrote, by kind, for the final summary and the metrics endpoint.

use std::{path::PathBuf, sync::Arc};

use keywarden_analyzer::{
    event::{self, Event, EventCode, Origin},
    geo::Geo,
    pipeline::{Input, Output, Pipeline},
};
use tracing::{error, info, warn};

use crate::{
    clock,
    lake::ParquetSink,
    respond::{self, Responder},
    sink::NdjsonSink,
};

/// Events written, by kind.
#[derive(Default, Debug)]
pub struct Counts {
    pub key_uses: u64,
    pub warnings: u64,
    pub secret_file_opens: u64,
    pub findings: u64,
    /// Remediation Activities (`remediate`).
    pub remediations: u64,
    /// Written without analysis because the pipeline was full.
    pub unanalysed: u64,
    /// By class and outcome, findings by rule, actions by outcome: what
    /// the event thread publishes for the metrics endpoint each turn.
    pub tally: crate::metrics::Tally,
}

pub struct Emitter {
    pub sink: NdjsonSink,
    /// Parquet files (`--parquet DIR`), beside the output or instead.
    pub parquet: Option<ParquetSink>,
    pub origin: Origin,
    seq: u64,
    /// The correlation pipeline (taken at shutdown).
    pipeline: Option<Pipeline>,
    geo: Option<Arc<Geo>>,
    baseline_path: PathBuf,
    responder: Box<dyn Responder>,
    pub counts: Counts,
}

impl Emitter {
    pub fn new(
        sink: NdjsonSink,
        origin: Origin,
        pipeline: Pipeline,
        geo: Option<Arc<Geo>>,
        baseline_path: PathBuf,
        responder: Box<dyn Responder>,
    ) -> Self {
        Self {
            sink,
            parquet: None,
            origin,
            seq: 0,
            pipeline: Some(pipeline),
            geo,
            baseline_path,
            responder,
            counts: Counts::default(),
        }
    }

    /// Writes an event to every sink.
    fn write(&mut self, ev: &Event) {
        self.sink.push(ev);
        if let Some(p) = &mut self.parquet {
            p.push(ev);
        }
    }

    /// The next event sequence number (`metadata.sequence`).
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.pipeline.as_ref()
    }

    /// A coverage warning: a log line and an event, never silence.
    pub fn warn(
        &mut self,
        process: Option<event::Process>,
        module: Option<event::File>,
        detail: String,
    ) {
        warn!("{detail}");
        let seq = self.next_seq();
        let ev =
            Event::coverage_warning(&self.origin, clock::now_ms(), seq, process, module, detail);
        self.count(&ev);
        self.write(&ev);
    }

    fn count(&mut self, ev: &Event) {
        let c = &mut self.counts;
        match ev.metadata.event_code {
            EventCode::KeyUse => c.key_uses += 1,
            EventCode::CoverageWarning => c.warnings += 1,
            EventCode::SecretFileOpen => c.secret_file_opens += 1,
            EventCode::Alert => c.findings += 1,
            EventCode::Remediation => c.remediations += 1,
        }
        c.tally.count(ev);
    }

    /// Hands an event to the pipeline, which writes it (enriched) and acts
    /// on the rules it fires once it comes out (`drain_pipeline`).
    /// `killed_by` names the rule whose kill the probe already carried out.
    /// If the pipeline is full the event is written at once, unanalysed, and
    /// counted: never lost, never waited for.
    pub fn emit(&mut self, ev: Event, killed_by: Option<&str>) {
        self.count(&ev);
        let input = Input {
            event: ev,
            killed_by: killed_by.map(str::to_owned),
        };
        let back = match &self.pipeline {
            Some(p) => p.submit(input).err().map(|o| o.event),
            None => Some(input.event),
        };
        if let Some(back) = back {
            self.counts.unanalysed += 1;
            if self.counts.unanalysed.is_power_of_two() {
                warn!(
                    total = self.counts.unanalysed,
                    "analyzer queue full: events written without correlation"
                );
            }
            self.write(&back);
        }
    }

    /// Writes what the pipeline has analysed so far.
    pub fn drain_pipeline(&mut self) {
        let ready: Vec<Box<Output>> = match &self.pipeline {
            Some(p) => p.try_drain().collect(),
            None => return,
        };
        for o in ready {
            self.handle_output(o);
        }
    }

    /// Writes an analysed event, then acts on every rule it fired and
    /// writes a finding for each.
    fn handle_output(&mut self, o: Box<Output>) {
        self.write(&o.event);
        for fired in &o.fired {
            warn!(rule = %fired.rule.id, pid = o.event.actor.process.pid, message = %o.event.message, "rule fired");
        }
        let mut seq = self.seq;
        let found = respond::findings(
            &o,
            self.responder.as_mut(),
            &self.origin,
            clock::now_ms(),
            || {
                seq += 1;
                seq
            },
        );
        self.seq = seq;
        for finding in found {
            self.count(&finding);
            self.write(&finding);
        }
    }

    /// Writes the Remediation Activities the remediation stage reported.
    /// Not analysed: no rule matches them.
    pub fn remediations(&mut self, reports: Vec<crate::remediate::Report>) {
        for r in reports {
            let seq = self.next_seq();
            let ev = r.event(&self.origin, clock::now_ms(), seq);
            self.count(&ev);
            self.write(&ev);
        }
    }

    /// Stops the pipeline, writes what it still held, saves baselines.
    pub fn finish_pipeline(&mut self) {
        let Some(p) = self.pipeline.take() else {
            return;
        };
        for (shard, st) in p.stats.iter().enumerate() {
            let st = st.snapshot();
            info!(
                shard,
                received = st.received,
                dropped = st.dropped,
                processed = st.processed,
                mean_latency_us = st.mean_latency_ns() / 1000,
                max_latency_us_sampled = st.latency_ns_max / 1000,
                "analyzer shard"
            );
        }
        let (rest, store) = p.finish();
        for o in rest {
            self.handle_output(o);
        }
        if let Err(e) = store.save(&self.baseline_path) {
            error!("{e}");
        }
    }

    /// Saves the baselines as they are now (every minute).
    pub fn save_baselines(&mut self) {
        let Some(p) = &self.pipeline else { return };
        let (store, outputs) = p.baselines();
        for o in outputs {
            self.handle_output(o);
        }
        if let Err(e) = store.save(&self.baseline_path) {
            self.warn(None, None, e.to_string());
        }
    }

    /// Picks up replaced GeoIP databases; a bad file keeps the old data.
    pub fn refresh_geo(&mut self) {
        let Some(geo) = self.geo.clone() else { return };
        for r in geo.refresh() {
            match r {
                Ok(true) => info!("GeoIP database reloaded"),
                Ok(false) => {}
                Err(e) => self.warn(
                    None,
                    None,
                    format!("GeoIP database not reloaded, previous data kept: {e}"),
                ),
            }
        }
    }
}
