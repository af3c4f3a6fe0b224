//! Attribution: who made a key use (`process`) and in which container
//! (`container`).
pub mod container;
pub mod process;
