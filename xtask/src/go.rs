//! The Go toolchains the Go tests build their fixture with: the host's
//! (Debian 12's `golang-go`, Go 1.19, installed by the bootstrap) and the
//! releases in [`RELEASES`], unpacked under `target/go` from Debian's
//! `golang-1.N-go` packages through the kernels' private apt, so the
//! host's packages are not changed. Each Go release signs through other
//! functions (`sensor/src/discovery/go.rs`), and the tests cover every
//! layout: 1.19 (`ecdsa.Sign`, `ed25519.sign`), 1.21 and 1.23
//! (`ecdsa.SignASN1`, `ed25519.sign`), 1.24 (`ecdsa.SignASN1`,
//! `fips140/ed25519.signWithDom`).

use std::path::Path;

use anyhow::Result;

/// The unpacked releases, by minor number: from bookworm-backports (1.21,
/// 1.23) and trixie (1.24). `sensor/tests/other_stacks.rs` runs
/// `target/go/go1.N/usr/lib/go-1.N/bin/go`.
pub const RELEASES: [u32; 3] = [21, 23, 24];

/// Unpacks each release of [`RELEASES`] that is not there already.
pub fn ensure(root: &Path) -> Result<()> {
    for minor in RELEASES {
        let dir = root.join(format!("target/go/go1.{minor}"));
        if dir.join(format!("usr/lib/go-1.{minor}/bin/go")).is_file() {
            continue;
        }
        eprintln!("xtask: unpacking Go 1.{minor} into {}", dir.display());
        crate::vm::kernels::unpack_packages(
            &root.join("target/kernels"),
            &root.join("xtask/kernels.sources"),
            &[
                &format!("golang-1.{minor}-go"),
                &format!("golang-1.{minor}-src"),
            ],
            &dir,
        )?;
    }
    Ok(())
}
