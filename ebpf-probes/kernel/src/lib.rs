//! Host-side stub. The real programs are in the modules `main.rs` declares
//! and only build for the BPF target; `sensor/build.rs` depends on this
//! crate so that cargo rebuilds the sensor whenever the probes change.
#![no_std]
