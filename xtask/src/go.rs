//! The Go toolchains the Go tests build their fixture with: the host's
//! (Debian 12's `golang-go`, Go 1.19, installed by the bootstrap) and
//! Go 1.24 (Debian 13's `golang-1.24-go`), unpacked under `target/go`
//! through the kernels' private apt, so the host's packages are not
//! changed. Each Go release signs through other functions
//! (`sensor/src/discovery/go.rs`), and the tests cover both layouts.

use std::path::Path;

use anyhow::Result;

/// Where Go 1.24 is unpacked; `sensor/tests/other_stacks.rs` runs
/// `usr/lib/go-1.24/bin/go` under it.
pub const GO124_DIR: &str = "target/go/go1.24";

/// Unpacks Go 1.24 unless it is there already.
pub fn ensure(root: &Path) -> Result<()> {
    let dir = root.join(GO124_DIR);
    if dir.join("usr/lib/go-1.24/bin/go").is_file() {
        return Ok(());
    }
    eprintln!("xtask: unpacking Go 1.24 into {}", dir.display());
    crate::vm::kernels::unpack_packages(
        &root.join("target/kernels"),
        &root.join("xtask/kernels.sources"),
        &["golang-1.24-go", "golang-1.24-src"],
        &dir,
    )
}
