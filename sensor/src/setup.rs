//! What `run` and `analyze` both build from the configuration: the rule
//! set, the GeoIP databases, the pipeline's settings and the events'
//! origin. One place, so a replay analyses exactly as the live sensor does.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Result;
use keywarden_analyzer::{
    baseline::BaselineStore,
    event::Origin,
    geo::Geo,
    pipeline::{self, Overflow},
    rules::RuleSet,
};

use crate::config::AnalyzerConfig;

/// Opens the configured GeoIP databases; `None` when none is configured.
pub fn open_geo(cfg: &AnalyzerConfig) -> Result<Option<Arc<Geo>>> {
    if cfg.geoip_city.is_none() && cfg.geoip_asn.is_none() {
        return Ok(None);
    }
    let geo = Geo::open(
        cfg.geoip_city.as_deref().map(Path::new),
        cfg.geoip_asn.as_deref().map(Path::new),
    )?;
    Ok(Some(Arc::new(geo)))
}

/// Loads and validates every rule file or directory; all errors at once.
pub fn load_rules(paths: &[String]) -> Result<RuleSet> {
    if paths.is_empty() {
        return Ok(RuleSet::default());
    }
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    RuleSet::load(&paths).map_err(|e| anyhow::anyhow!("invalid rules:\n{e}"))
}

/// The pipeline's settings. `overflow` is the one difference between the
/// commands: the live sensor never waits for the analyzer (`Drop`, and the
/// event is written unanalysed and counted), a replay does (`Block`).
pub fn pipeline_config(
    cfg: &AnalyzerConfig,
    geo: Option<Arc<Geo>>,
    baselines: BaselineStore,
    overflow: Overflow,
) -> pipeline::Config {
    pipeline::Config {
        shards: cfg.shards,
        queue: cfg.queue,
        learning_ms: cfg.learning_period_s as i64 * 1000,
        overflow,
        geo,
        geo_cache: pipeline::GEO_CACHE_ENTRIES,
        baselines,
    }
}

/// Who wrote the events: host, version, and a prefix that makes event ids
/// unique across boots and restarts.
pub fn origin() -> Origin {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let start_ms = crate::clock::now_ms();
    Origin {
        hostname,
        product_version: env!("CARGO_PKG_VERSION").into(),
        uid_prefix: format!("{}-{start_ms}", boot.trim().get(..8).unwrap_or("0")),
    }
}
