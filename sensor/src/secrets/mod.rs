//! Secret files: which opens to watch (`watch`), and how the watch list
//! becomes tests the `openat` probe can afford (`prefilter`).
pub mod prefilter;
pub mod watch;
