//! keywarden's analysis library: kernel-free, so it builds and tests
//! anywhere and replays recorded events exactly as the live sensor sees them.
//!
//! `event` is the event model, which is also the export schema documented
//! in `docs/events.md`; `rules` is the rule language (`docs/rules.md`).
pub mod atomic_file;
pub mod baseline;
#[cfg(test)]
mod docs_check;
pub mod event;
pub mod geo;
#[cfg(test)]
mod ocsf_check;
pub mod pipeline;
pub mod remediation;
pub mod rules;
