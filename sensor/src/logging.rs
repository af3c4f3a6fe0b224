//! Log lines no one can forge.
//!
//! Log messages carry paths, process names and command lines, all chosen by
//! whoever runs a process on the host. A file named `x\nWARN rule fired: …`
//! would otherwise print a second, fake log line. Every log record is one
//! write of one line (tracing-subscriber formats a whole event, then writes
//! it once), so the writer escapes every control character in it except
//! the final newline, whatever field or message carried it.

use std::{borrow::Cow, io::Write};

/// `buf` with each control byte (and DEL) except a trailing newline written
/// as `\xNN`; a backslash is left as it is.
pub fn escape_line(buf: &[u8]) -> Cow<'_, [u8]> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let bad = |b: u8| b < 0x20 && b != b'\t' || b == 0x7f;
    if !body.iter().copied().any(bad) {
        return Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    for &b in body {
        if bad(b) {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(end);
    Cow::Owned(out)
}

/// stderr, one escaped line per write.
pub struct EscapedStderr;

impl Write for EscapedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write_all(&escape_line(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::escape_line;

    #[test]
    fn a_newline_inside_a_record_cannot_start_a_new_line() {
        let got = escape_line(b"INFO opened /tmp/a\nWARN rule fired: sshd\n");
        assert_eq!(
            &*got,
            &b"INFO opened /tmp/a\\x0aWARN rule fired: sshd\n"[..]
        );
    }

    #[test]
    fn terminal_escapes_and_carriage_returns_are_escaped() {
        let got = escape_line(b"x\x1b[2Jy\rz\x7f\n");
        assert_eq!(&*got, &b"x\\x1b[2Jy\\x0dz\\x7f\n"[..]);
    }

    #[test]
    fn clean_lines_are_untouched() {
        let line = b"INFO ready: probes attached\ttab\n";
        assert!(matches!(escape_line(line), std::borrow::Cow::Borrowed(_)));
    }
}
