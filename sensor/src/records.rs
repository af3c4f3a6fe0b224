//! Decodes ring buffer bytes into owned records.
//!
//! The kernel writes the `#[repr(C)]` structs from `keywarden-probe-types`;
//! each starts with a `u32` kind. Anything short or unknown is reported as
//! `Malformed` rather than trusted.

use keywarden_probe_types::{self as t, kind};

#[derive(Clone)]
pub enum Record {
    /// A signature; `sig` is empty for a key object the probes knew.
    Sign(t::SignRecord, Vec<u8>),
    /// A libgcrypt signature, with its S-expressions.
    SexpSign(t::SignRecord, Box<SexpCopy>),
    Data {
        header: t::DataHeader,
        bytes: Vec<u8>,
    },
    HandleFree(t::HandleFreeRecord),
    Exec(Box<t::ExecRecord>),
    Exit(t::ExitRecord),
    ExecMark(t::ExitRecord),
    FileOpen(Box<t::FileOpenRecord>),
    /// What an open reported at entry came to.
    OpenResult(t::OpenResultRecord),
    Killed(t::KilledRecord),
    Malformed {
        kind: u32,
        len: usize,
    },
}

impl Record {
    /// The process (thread group) a record is about; `None` for a
    /// malformed one.
    pub fn tgid(&self) -> Option<u32> {
        Some(match self {
            Record::Sign(r, _) | Record::SexpSign(r, _) => r.task.tgid(),
            Record::Data { header, .. } => header.tgid,
            Record::HandleFree(f) => f.tgid,
            Record::Exec(x) => x.task.tgid(),
            Record::Exit(x) | Record::ExecMark(x) => x.task.tgid(),
            Record::FileOpen(f) => f.task.tgid(),
            Record::OpenResult(r) => (r.pid_tgid >> 32) as u32,
            Record::Killed(k) => k.task.tgid(),
            Record::Malformed { .. } => return None,
        })
    }
}

/// The probes' copies of a libgcrypt call's S-expressions
/// (`probe_types::sexp`): key (public parameters only), data, signature.
#[derive(Clone, Debug, Default)]
pub struct SexpCopy {
    pub parts: [Vec<u8>; 3],
    /// Whether the copy of each reached the S-expression's end.
    pub complete: [bool; 3],
}

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a repr(C) plain-data record valid for any
    // bit pattern, and read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Record {
    let malformed = |kind| Record::Malformed {
        kind,
        len: bytes.len(),
    };
    let Some(k) = read::<u32>(bytes) else {
        return malformed(0);
    };
    let rec = match k {
        kind::SIGN => read::<t::SignWithSigRecord>(bytes).map(|r| {
            let n = (r.head.sig_captured as usize).min(t::SIG_MAX);
            Record::Sign(r.head, r.sig[..n].to_vec())
        }),
        kind::SIGN_KNOWN => read::<t::SignRecord>(bytes).map(|r| Record::Sign(r, Vec::new())),
        kind::SIGN_SEXP => read::<t::SexpSignRecord>(bytes).map(|r| {
            let mut copy = SexpCopy::default();
            for (i, part) in r.parts.iter().enumerate() {
                let end = r.ends[i];
                let used = ((end & !t::sexp::COMPLETE) as usize).min(t::sexp::MAX);
                copy.parts[i] = part[..used].to_vec();
                copy.complete[i] = end & t::sexp::COMPLETE != 0;
            }
            Record::SexpSign(r.head, Box::new(copy))
        }),
        kind::DATA_SMALL | kind::DATA_BIG => read::<t::DataHeader>(bytes).and_then(|header| {
            let cap = if k == kind::DATA_SMALL {
                t::DATA_SMALL
            } else {
                t::DATA_BIG
            };
            let start = size_of::<t::DataHeader>();
            let len = (header.len as usize).min(cap);
            bytes.get(start..start + len).map(|d| Record::Data {
                header,
                bytes: d.to_vec(),
            })
        }),
        kind::HANDLE_FREE => read(bytes).map(Record::HandleFree),
        kind::EXEC => read::<t::ExecRecord>(bytes).map(|r| Record::Exec(Box::new(r))),
        kind::EXIT => read(bytes).map(Record::Exit),
        kind::EXEC_MARK => read(bytes).map(Record::ExecMark),
        kind::FILE_OPEN => read::<t::FileOpenRecord>(bytes).map(|mut r| {
            if r.flags & t::open_flags::RESOLVED != 0 {
                r.path = unwalk_path(&r.path, r.flags & t::open_flags::TRUNCATED != 0);
            }
            Record::FileOpen(Box::new(r))
        }),
        kind::KILLED => read(bytes).map(Record::Killed),
        kind::OPEN_RESULT => read(bytes).map(Record::OpenResult),
        _ => None,
    };
    rec.unwrap_or_else(|| malformed(k))
}

/// A `RESOLVED` open's path, which the probe walked up from the opened
/// file's dentry and wrote leaf first (`key.pem/dir/etc/`), as a path:
/// `/etc/dir/key.pem`, or `.../dir/key.pem` when the walk was cut (the
/// path was longer than the record holds, or deeper than the walk goes).
/// What does not fit is cut from the root's end, the leaf kept.
pub fn unwalk_path(walked: &[u8], cut: bool) -> [u8; t::PATH_MAX] {
    let end = walked.iter().position(|&b| b == 0).unwrap_or(walked.len());
    let mut parts: Vec<&[u8]> = walked[..end]
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    parts.reverse();
    let mut path = Vec::with_capacity(end + 4);
    if cut {
        path.extend_from_slice(b"...");
    }
    for p in &parts {
        path.push(b'/');
        path.extend_from_slice(p);
    }
    if parts.is_empty() {
        path.push(b'/');
    }
    let mut out = [0u8; t::PATH_MAX];
    let keep = path.len().min(t::PATH_MAX - 1);
    out[..keep].copy_from_slice(&path[path.len() - keep..]);
    if keep < path.len() {
        out[..3].copy_from_slice(b"...");
    }
    out
}

/// A NUL-terminated byte buffer as a string (lossy).
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
    }

    #[test]
    fn decodes_known_kinds_and_rejects_short_records() {
        let rec = t::HandleFreeRecord {
            kind: kind::HANDLE_FREE,
            tgid: 7,
            handle: 0xdead,
        };
        match decode(&as_bytes(&rec)) {
            Record::HandleFree(r) => assert_eq!((r.tgid, r.handle), (7, 0xdead)),
            _ => panic!("wrong kind"),
        }
        let bytes = as_bytes(&rec);
        assert!(matches!(
            decode(&bytes[..8]),
            Record::Malformed {
                kind: kind::HANDLE_FREE,
                ..
            }
        ));
        assert!(matches!(decode(&[1, 2]), Record::Malformed { .. }));
        assert!(matches!(
            decode(&99u32.to_ne_bytes()),
            Record::Malformed { kind: 99, .. }
        ));
    }

    /// A walked path reads root first; a cut one says so; one too long
    /// for the record keeps its leaf.
    #[test]
    fn resolved_paths_are_unwalked() {
        let path = |walked: &[u8], cut| c_str(&unwalk_path(walked, cut));
        assert_eq!(
            path(b"site.key/.tmpAb/tmp/\0junk", false),
            "/tmp/.tmpAb/site.key"
        );
        assert_eq!(path(b"site.key/deep/", true), ".../deep/site.key");
        assert_eq!(path(b"", false), "/");
        let mut long = Vec::new();
        for _ in 0..70 {
            long.extend_from_slice(b"dir/");
        }
        let walked = [b"k.pem/".as_slice(), &long].concat();
        let out = path(&walked, true);
        assert!(
            out.starts_with("...") && out.ends_with("/dir/k.pem"),
            "{out}"
        );
        assert_eq!(out.len(), t::PATH_MAX - 1);
        // And a record decodes to its unwalked path.
        // SAFETY: a plain repr(C) record of integers and bytes, for which
        // all zeroes is a valid value.
        let mut rec: t::FileOpenRecord = unsafe { std::mem::zeroed() };
        rec.kind = kind::FILE_OPEN;
        rec.flags = t::open_flags::RESOLVED | t::open_flags::KEY_FILE;
        rec.path[..13].copy_from_slice(b"k.pem/d/root/");
        match decode(&as_bytes(&rec)) {
            Record::FileOpen(f) => assert_eq!(c_str(&f.path), "/root/d/k.pem"),
            _ => panic!("wrong kind"),
        }
    }

    #[test]
    fn data_records_carry_only_their_valid_bytes() {
        let mut rec = t::DataSmallRecord {
            header: t::DataHeader {
                kind: kind::DATA_SMALL,
                tgid: 1,
                op_id: 5,
                offset: 0,
                len: 3,
                truncated: 0,
                _pad: 0,
            },
            data: [0xaa; t::DATA_SMALL],
        };
        rec.data[..3].copy_from_slice(b"abc");
        match decode(&as_bytes(&rec)) {
            Record::Data { header, bytes } => {
                assert_eq!(header.op_id, 5);
                assert_eq!(bytes, b"abc");
            }
            _ => panic!("wrong kind"),
        }
    }

    /// A libgcrypt record gives each part only its used bytes, and never
    /// more than `sexp::MAX`, whatever length the ring claims.
    #[test]
    fn sexp_records_carry_only_their_used_bytes() {
        // SAFETY: a plain repr(C) record of integers and bytes, for which all
        // zeroes is a valid value.
        let mut rec: t::SexpSignRecord = unsafe { std::mem::zeroed() };
        rec.head.kind = kind::SIGN_SEXP;
        rec.parts[0][..3].copy_from_slice(&[t::sexp::OPEN, t::sexp::WITHHELD, t::sexp::CLOSE]);
        rec.ends = [3 | t::sexp::COMPLETE, 0, u32::MAX, 0];
        match decode(&as_bytes(&rec)) {
            Record::SexpSign(_, copy) => {
                assert_eq!(
                    copy.parts[0],
                    [t::sexp::OPEN, t::sexp::WITHHELD, t::sexp::CLOSE]
                );
                assert_eq!(copy.complete, [true, false, true]);
                assert!(copy.parts[1].is_empty());
                assert_eq!(copy.parts[2].len(), t::sexp::MAX);
            }
            _ => panic!("wrong kind"),
        }
        let bytes = as_bytes(&rec);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Record::Malformed { .. }
        ));
    }

    #[test]
    fn open_results_decode_with_their_process() {
        let rec = t::OpenResultRecord {
            kind: kind::OPEN_RESULT,
            flags: t::open_flags::HELD,
            pid_tgid: (42u64 << 32) | 43,
            ret: -13,
            file: t::ExeId::default(),
        };
        let r = decode(&as_bytes(&rec));
        assert_eq!(r.tgid(), Some(42));
        match r {
            Record::OpenResult(o) => assert_eq!((o.ret, o.flags), (-13, t::open_flags::HELD)),
            _ => panic!("wrong kind"),
        }
    }

    #[test]
    fn c_str_stops_at_nul() {
        assert_eq!(c_str(b"openssl\0\0\0"), "openssl");
        assert_eq!(c_str(b"full"), "full");
    }
}
