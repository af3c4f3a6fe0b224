//! The sensor reads every ELF file a process runs or maps, whoever wrote
//! it: its headers, symbol and string tables, the first bytes of each
//! signing function (decoded to place probes) and, when it has none, its
//! read-only data (searched for signs of crypto code). Whatever the bytes,
//! the scan must give probe points or an error naming the file, never a
//! panic, a hang or an unbounded allocation.
#![no_main]

use std::{
    fs::File,
    os::{fd::FromRawFd, unix::fs::FileExt},
    sync::LazyLock,
};

use libfuzzer_sys::fuzz_target;

// The sensor is a binary crate: its ELF reader is compiled here from its
// own source. `signing_code` reaches its siblings as `super::…`, so all
// sit at the crate root.
#[allow(dead_code)]
#[path = "../../src/discovery/placement.rs"]
mod placement;

#[allow(dead_code)]
#[path = "../../src/discovery/elf_read.rs"]
mod elf_read;

#[allow(dead_code)]
#[path = "../../src/discovery/symbols.rs"]
mod symbols;

#[allow(dead_code)]
#[path = "../../src/discovery/signing_code.rs"]
mod signing_code;

use signing_code::{CODE_PREFIX, FileId, function_name, scan_file};

/// The scan reads a file by descriptor (`pread`, never a mapping), so each
/// input is written to one in-memory file, reused from run to run.
static FILE: LazyLock<File> = LazyLock::new(|| {
    // SAFETY: a NUL-terminated name, valid for the call.
    let fd = unsafe { libc::memfd_create(c"elf_scan".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    unsafe { File::from_raw_fd(fd) }
});

fuzz_target!(|data: &[u8]| {
    let f: &File = &FILE;
    f.set_len(0).expect("truncate the memfd");
    f.write_all_at(data, 0).expect("write the memfd");
    let id = FileId::of(&f.metadata().expect("fstat the memfd"));
    match scan_file(f, id, "fuzz.so") {
        Ok(code) => {
            for p in &code.points {
                assert!(p.code.len() <= CODE_PREFIX, "{p:?}");
                assert_ne!(function_name(p.id), "unknown", "{p:?}");
            }
            // Markers are searched for only in files with nothing to probe.
            assert!(code.markers.is_empty() || !code.can_see_signatures());
            let _ = code.stacks();
            let _ = code.uncovered_reason();
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("fuzz.so: "), "{message}");
        }
    }
});
