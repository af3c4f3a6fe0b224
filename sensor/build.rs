//! Builds the eBPF programs with the pinned toolchain and puts the object in
//! OUT_DIR, where `probes.rs` embeds it with `include_bytes_aligned!`.
//!
//! The eBPF crate needs `-Z build-std=core`. Rather than a second (nightly)
//! toolchain, the child cargo gets `RUSTC_BOOTSTRAP=1` on the same pinned
//! stable toolchain; the host build never sees it.
fn main() -> anyhow::Result<()> {
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN")
        .ok()
        .and_then(|t| t.split('-').next().map(str::to_owned))
        .unwrap_or_else(|| "1.99.1".to_owned());
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf-probes/kernel");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "keywarden-probes",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
