//! Makes cargo rebuild the probes when bpf-linker changes, since a new
//! linker can change the object even when no source did.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
