//! keywarden's analysis library: kernel-free, so it builds and tests
//! anywhere and replays recorded events exactly as the live sensor sees them.
//!
//! For now it holds the event model (`event`), which is also the export
//! schema documented in `docs/events.md`.
pub mod event;
