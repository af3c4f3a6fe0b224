//! Attribution: who made a key use (`process`), in which container
//! (`container`), and for which network peer (`sock_layout` lets the probes
//! read a socket's addresses).
pub mod container;
pub mod process;
pub mod sock_layout;
