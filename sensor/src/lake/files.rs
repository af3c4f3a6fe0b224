//! One Parquet file: written whole under a hidden temporary name, then
//! renamed, so a reader of the directory never sees part of one; and, at
//! start, what a sensor killed before its rename left behind.
//!
//! A file's rows are held in memory (Arrow batches) until it is closed,
//! then sorted by `time` and written in one go: Security Lake wants the
//! records of an object ordered by time, and the events of a turn are not
//! quite (a finding follows its evidence, coalesced opens carry their
//! first open's time). The temporary file is therefore only ever being
//! written for the moment a close takes, and the sensor killed then leaves
//! it either complete (killed between the last write and the rename) or
//! cut short. `recover` finishes the first (renames it) and removes the
//! second; its rows, like those still in memory, are lost with the process
//! and counted in the log line that says so.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use arrow_array::{Array, Int64Array, RecordBatch, UInt32Array};
use nix::{
    errno::Errno,
    fcntl::{OFlag, RenameFlags, openat, renameat2},
    sys::stat::{Mode, fstat},
    unistd::{UnlinkatFlags, fsync, geteuid, unlinkat},
};
use parquet::{
    arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::{Compression, ZstdLevel},
    file::properties::{WriterProperties, WriterVersion},
};
use tracing::warn;

use super::layout::{self, Root};

/// Security Lake: data pages of at most 1 MB. The writer checks a page's
/// size only after each chunk of rows it takes (up to `PAGE_ROWS`), so a
/// page can end a chunk past this limit (a unit test found 1.2 MB pages
/// with 1024-row chunks). Pages are therefore also cut at `PAGE_ROWS`
/// rows: 64 values of a column stay under 1 MB unless they average over
/// 15 KB (a finding's evidence is a few KB). Dictionary encoding is off:
/// with it, the writer sizes pages by their dictionary indices, and its
/// fallback to plain encoding wrote pages of several MB; zstd takes care
/// of repeated strings instead.
pub const PAGE_BYTES: usize = 1_000_000 - (256 << 10);

/// Rows per data page at most.
const PAGE_ROWS: usize = 64;

/// Security Lake: row groups of at most 256 MB. A file's rows are at most
/// `roll_bytes` (at most 256 MiB in memory, checked with the
/// configuration), so a row group is smaller anyway; this keeps it so.
pub const ROW_GROUP_BYTES: usize = 128 << 20;

/// What the temporary files of a killed sensor came to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Complete: renamed to their final names.
    pub finished: u64,
    /// Cut short or unreadable: removed.
    pub discarded: u64,
}

/// How the files are written: zstd, small pages, bounded row groups.
pub fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_data_page_size_limit(PAGE_BYTES)
        .set_dictionary_enabled(false)
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .set_created_by(format!("keywarden {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// `batch` with its rows in `time` order (stable: rows of the same
/// millisecond keep the order they came in).
pub fn sort_by_time(batch: &RecordBatch) -> Result<RecordBatch, String> {
    let time = batch
        .column_by_name("time")
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        .ok_or("the events have no 64-bit `time` column")?;
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    order.sort_by_key(|&i| (time.is_null(i as usize), time.value(i as usize)));
    arrow_select::take::take_record_batch(batch, &UInt32Array::from(order))
        .map_err(|e| e.to_string())
}

/// The hidden name a file is written under: readers (Security Lake's
/// crawlers, `aws s3 sync --exclude '.*'`, DuckDB's globs) skip names
/// starting with a dot.
pub fn temporary_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Writes `batch` as `name` in the directory `dir` (`path` for messages):
/// under `temporary_name(name)`, created with `O_EXCL | O_NOFOLLOW` and mode
/// 0600, fsynced, renamed without replacing anything, and the directory
/// fsynced. Returns the file's size. On failure nothing is left behind.
pub fn write(dir: &OwnedFd, path: &Path, name: &str, batch: &RecordBatch) -> io::Result<u64> {
    let tmp = temporary_name(name);
    let fd = openat(
        dir,
        tmp.as_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(|e| at(e.into(), path, &tmp))?;
    let result = (|| -> io::Result<u64> {
        let mut w = ArrowWriter::try_new(File::from(fd), batch.schema(), Some(properties()))
            .map_err(io::Error::other)?;
        w.write(batch).map_err(io::Error::other)?;
        let f = w.into_inner().map_err(io::Error::other)?;
        f.sync_all()?;
        let size = f.metadata()?.len();
        drop(f);
        renameat2(dir, tmp.as_str(), dir, name, RenameFlags::RENAME_NOREPLACE)?;
        fsync(dir)?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    result.map_err(|e| at(e, path, name))
}

fn at(e: io::Error, dir: &Path, name: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", dir.join(name).display()))
}

/// Finishes or removes the temporary files a killed sensor left in the
/// tree under `root`: one that reads back whole (footer and every page) is
/// renamed to its final name; any other is removed. Only the sensor's own
/// names (`.keywarden-*.parquet.tmp`), regular files it owns, are touched;
/// directories that are symlinks or not its own are skipped and named.
pub fn recover(root: &Root) -> Recovered {
    let mut r = Recovered::default();
    let mut visit = |fd: &OwnedFd, path: &Path| {
        for name in entries(fd, path) {
            let Some(done) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .filter(|n| n.starts_with("keywarden-") && n.ends_with(".parquet"))
            else {
                continue;
            };
            match finish_one(fd, &name, done) {
                Ok(true) => r.finished += 1,
                Ok(false) => r.discarded += 1,
                Err(e) => warn!("{}: left as it is: {e}", path.join(&name).display()),
            }
        }
    };
    // ext/<source>/region=/accountId=/eventDay=: four levels below ext.
    let mut level: Vec<(OwnedFd, std::path::PathBuf)> = Vec::new();
    match layout::subdir(&root.fd, &root.path, "ext", false) {
        Ok(fd) => level.push((fd, root.path.join("ext"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return r,
        Err(e) => {
            warn!("{e}");
            return r;
        }
    }
    for _ in 0..4 {
        let mut next = Vec::new();
        for (fd, path) in &level {
            for name in entries(fd, path) {
                if name.starts_with('.') {
                    continue;
                }
                match layout::subdir(fd, &path.join(&name), &name, false) {
                    Ok(sub) => next.push((sub, path.join(&name))),
                    // A file where a directory goes (or one that vanished).
                    Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
                    Err(e) => warn!("skipped while looking for unfinished Parquet files: {e}"),
                }
            }
        }
        level = next;
    }
    for (fd, path) in &level {
        visit(fd, path);
    }
    r
}

/// The names in a directory, read through its descriptor
/// (`/proc/self/fd/N` is the directory itself, whatever its path now is).
fn entries(fd: &OwnedFd, path: &Path) -> Vec<String> {
    use std::os::fd::AsRawFd;
    match std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect(),
        Err(e) => {
            warn!("{}: {e}", path.display());
            Vec::new()
        }
    }
}

/// Renames the temporary file `tmp` in `dir` to `name` if it reads back
/// whole (true), else removes it (false).
fn finish_one(dir: &OwnedFd, tmp: &str, name: &str) -> io::Result<bool> {
    let fd = openat(
        dir,
        tmp,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    let st = fstat(&fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::other("not a regular file"));
    }
    if st.st_uid != geteuid().as_raw() {
        return Err(io::Error::other(format!("owned by uid {}", st.st_uid)));
    }
    let file = File::from(fd);
    if reads_whole(file.try_clone()?) {
        file.sync_all()?;
        match renameat2(dir, tmp, dir, name, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => {
                fsync(dir.as_fd())?;
                return Ok(true);
            }
            // The final name exists: this is a copy of a file already
            // published, not one to add twice.
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    unlinkat(dir, tmp, UnlinkatFlags::NoRemoveDir)?;
    fsync(dir.as_fd())?;
    Ok(false)
}

/// The file has a footer and every row of every row group decodes.
fn reads_whole(file: File) -> bool {
    let Ok(builder) = ParquetRecordBatchReaderBuilder::try_new(file) else {
        return false;
    };
    let expected = builder.metadata().file_metadata().num_rows();
    let Ok(reader) = builder.build() else {
        return false;
    };
    let mut rows = 0i64;
    for batch in reader {
        match batch {
            Ok(b) => rows += b.num_rows() as i64,
            Err(_) => return false,
        }
    }
    rows == expected
}
