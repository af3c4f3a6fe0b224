//! ELF files read with bounded reads, never mapped.
//!
//! The files scanned for signing code are named by processes, and their
//! owners can truncate them while the sensor reads: a mapping would then
//! kill the sensor with SIGBUS (issue 16, row 3). `object` reads through
//! [`ElfReader`] instead: positioned reads on the scan's own descriptor,
//! where a short file is an error.

use std::{cell::Cell, fs::File, ops::Range, os::unix::fs::FileExt};

use object::{
    Endianness, FileKind, ReadCache, ReadRef,
    read::elf::{FileHeader, SectionHeader as _},
};

use super::signing_code::{ScanError, mib};

/// Bytes of ELF structure one scan may hold in memory: headers, symbol and
/// string tables, notes and the first bytes of each probe point. libcrypto
/// needs 250 KB, librustc_driver (186,000 symbols, 22 MB of names) 27 MB.
/// A file that needs more, such as a malformed one whose sections all name
/// the same bytes, is skipped with an error. 64 MiB keeps a hostile file's
/// scan well inside the DaemonSet's 384 MiB memory limit.
pub const MAX_METADATA: u64 = 64 << 20;

/// String tables read whole before the symbols, so that a name is a lookup
/// rather than a read (a file has three: `.dynstr`, `.strtab`,
/// `.shstrtab`). Strings elsewhere are read one at a time.
const MAX_STRING_TABLES: usize = 16;

pub fn metadata_capped(shown_as: &str) -> ScanError {
    ScanError::Capped {
        path: shown_as.to_owned(),
        why: format!(
            "its headers, symbol and string tables need more than the {} keywarden reads of an ELF file",
            mib(MAX_METADATA)
        ),
    }
}

/// The file as `object` reads it: through `object`'s `ReadCache` (a seek
/// and read on the scan's own descriptor per structure, each kept for the
/// rest of the scan),
/// never past the size the file had when it was opened, `MAX_METADATA`
/// bytes in all; string tables are read whole up front.
pub struct ElfReader<'f> {
    cache: ReadCache<&'f File>,
    len: u64,
    /// `(file offset, bytes)` of the string tables read up front.
    strings: Vec<(u64, Vec<u8>)>,
    /// Bytes handed out so far. A cache hit counts again, so this bounds
    /// what the cache holds, with margin.
    charged: Cell<u64>,
    exhausted: Cell<bool>,
}

impl<'f> ElfReader<'f> {
    pub fn new(file: &'f File, len: u64, shown_as: &str) -> Result<Self, ScanError> {
        let mut reader = ElfReader {
            cache: ReadCache::new(file),
            len,
            strings: Vec::new(),
            charged: Cell::new(0),
            exhausted: Cell::new(false),
        };
        let mut strings = Vec::new();
        for (offset, size) in string_tables(&reader) {
            if strings.len() == MAX_STRING_TABLES {
                break;
            }
            // A table outside the file stays unread: object says so.
            if offset.checked_add(size).is_none_or(|end| end > len) {
                continue;
            }
            if reader.charge(size).is_err() {
                return Err(metadata_capped(shown_as));
            }
            let mut bytes = vec![0u8; size as usize];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|source| ScanError::Read {
                    path: shown_as.to_owned(),
                    source,
                })?;
            strings.push((offset, bytes));
        }
        reader.strings = strings;
        Ok(reader)
    }

    /// The first `len` bytes of code at `offset`, fewer at the end of the
    /// file.
    pub fn code_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let len = (len as u64).min(self.len.saturating_sub(offset));
        self.read_bytes_at(offset, len)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    /// Accounts for `bytes` more; false once `MAX_METADATA` is reached.
    fn charge(&self, bytes: u64) -> Result<(), ()> {
        let total = self.charged.get().saturating_add(bytes);
        if self.exhausted.get() || total > MAX_METADATA {
            self.exhausted.set(true);
            return Err(());
        }
        self.charged.set(total);
        Ok(())
    }

    /// Whether a read was refused for `MAX_METADATA`.
    pub fn exhausted(&self) -> bool {
        self.exhausted.get()
    }
}

/// `(offset, size)` of each distinct string table in the section headers
/// (none when they cannot be read: `object` then reports why).
fn string_tables(data: &ElfReader<'_>) -> Vec<(u64, u64)> {
    fn of<Elf: FileHeader<Endian = Endianness>>(
        data: &ElfReader<'_>,
    ) -> object::Result<Vec<(u64, u64)>> {
        let header = Elf::parse(data)?;
        let endian = header.endian()?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for s in header.section_headers(endian, data)? {
            if s.sh_type(endian) == object::elf::SHT_STRTAB
                && let Some(range) = s.file_range(endian)
                && !out.contains(&range)
            {
                out.push(range);
            }
        }
        Ok(out)
    }
    let tables = match FileKind::parse(data) {
        Ok(FileKind::Elf32) => of::<object::elf::FileHeader32<Endianness>>(data),
        Ok(FileKind::Elf64) => of::<object::elf::FileHeader64<Endianness>>(data),
        _ => Ok(Vec::new()),
    };
    tables.unwrap_or_default()
}

impl<'a> ReadRef<'a> for &'a ElfReader<'_> {
    fn len(self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if size == 0 {
            return Ok(&[]);
        }
        if offset.checked_add(size).is_none_or(|end| end > self.len) {
            return Err(());
        }
        self.charge(size)?;
        (&self.cache).read_bytes_at(offset, size)
    }

    fn read_bytes_at_until(self, range: Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        if range.start > range.end || range.end > self.len {
            return Err(());
        }
        for (start, table) in &self.strings {
            let table_end = start + table.len() as u64;
            if range.start < *start || range.start >= table_end {
                continue;
            }
            let bytes =
                &table[(range.start - start) as usize..(range.end.min(table_end) - start) as usize];
            if let Some(n) = memchr::memchr(delimiter, bytes) {
                return Ok(&bytes[..n]);
            }
            if range.end <= table_end {
                return Err(());
            }
            break; // runs past the table: read from the file
        }
        if self.exhausted() {
            return Err(());
        }
        // At most 4 KiB (ReadCache's own limit), charged for what it kept.
        let bytes = (&self.cache).read_bytes_at_until(range, delimiter)?;
        self.charge(bytes.len() as u64 + 1)?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MAX_METADATA` bounds what one scan reads into memory: a request
    /// beyond it is refused before anything is allocated, and every later
    /// one too.
    #[test]
    fn the_metadata_budget_refuses_large_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        File::create(&p)
            .unwrap()
            .set_len(MAX_METADATA + (1 << 20))
            .unwrap();
        let f = File::open(&p).unwrap();
        let reader = ElfReader::new(&f, MAX_METADATA + (1 << 20), "sparse").unwrap();
        assert!(reader.strings.is_empty(), "not an ELF file: no tables");
        assert_eq!((&reader).read_bytes_at(0, 16).unwrap(), &[0u8; 16]);
        assert!((&reader).read_bytes_at(0, MAX_METADATA).is_err());
        assert!(reader.exhausted());
        assert!((&reader).read_bytes_at(0, 16).is_err());
        // Never past the size the file had when opened.
        let reader = ElfReader::new(&f, 100, "sparse").unwrap();
        assert!((&reader).read_bytes_at(96, 8).is_err());
        assert!(!reader.exhausted());
    }
}
