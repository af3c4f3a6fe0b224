//! `keywarden keys`: the inventory as a table for people (`Inventory::table`)
//! or as its JSON, and the UTC dates the table shows.
//!
//! Apart from the model (`mod.rs`) and the file (`file`): only the command
//! reads it, never the sensor.

use std::path::Path;

use super::{Inventory, KeyEntry, SAVE_EVERY};

impl Inventory {
    /// The inventory as a table, one key a line, used keys first (the
    /// latest use first), then the unused ones.
    pub fn table(&self) -> String {
        if self.is_empty() && self.keys_omitted == 0 {
            return "no keys yet\n".into();
        }
        let mut entries: Vec<&KeyEntry> = self.keys().collect();
        entries.sort_by(|a, b| {
            b.last_use_ms
                .cmp(&a.last_use_ms)
                .then_with(|| a.spki_sha256.cmp(&b.spki_sha256))
        });
        let mut rows: Vec<[String; 7]> = vec![[
            "SPKI SHA-256".into(),
            "ALGORITHM".into(),
            "USES".into(),
            "LAST USE".into(),
            "PROCESSES".into(),
            "CERTIFICATE".into(),
            "FILES".into(),
        ]];
        for e in entries {
            rows.push([
                format!("{}…", e.spki_sha256.chars().take(16).collect::<String>()),
                e.algorithm.clone(),
                if e.unused() {
                    "unused".into()
                } else {
                    e.uses.to_string()
                },
                e.last_use_ms.map_or_else(|| "-".into(), utc),
                list_cell(
                    e.processes.iter().map(|p| p.name.as_str()),
                    e.processes_omitted,
                ),
                match e.certificates.first() {
                    None => "-".into(),
                    Some(c) => {
                        let more = e.certificates.len() - 1 + e.certificates_omitted as usize;
                        let mut cell = format!("{} (until {})", c.subject, day(c.not_after_ms));
                        if more > 0 {
                            cell.push_str(&format!(" +{more}"));
                        }
                        cell
                    }
                },
                {
                    let mut places: Vec<String> = e.files.clone();
                    places.extend(e.listeners.iter().map(|l| format!("tls {l}")));
                    if e.recovered {
                        places.push("recovered from signatures".into());
                    }
                    list_cell(
                        places.iter().map(String::as_str),
                        e.files_omitted + e.listeners_omitted,
                    )
                },
            ]);
        }
        let mut widths = [0usize; 7];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            // Names and paths come from anyone on the host: a control
            // character in one cannot rewrite the terminal.
            let line = crate::logging::escape_line(line.trim_end().as_bytes()).into_owned();
            out.push_str(&String::from_utf8_lossy(&line));
            out.push('\n');
        }
        out.push_str(&format!(
            "{} key(s), {} unused{}{}\n",
            self.keys.len(),
            self.st.unused,
            if self.keys_omitted > 0 {
                format!(
                    "; {} more turned away, the inventory being full",
                    self.keys_omitted
                )
            } else {
                String::new()
            },
            self.saved_ms
                .map_or_else(String::new, |t| format!("; saved {}", utc(t))),
        ));
        out
    }
}

/// Items joined with commas, `+N` for those not listed, `-` for none.
fn list_cell<'a>(items: impl Iterator<Item = &'a str>, omitted: u64) -> String {
    let mut cell = items.collect::<Vec<_>>().join(",");
    if omitted > 0 {
        cell.push_str(&format!(" +{omitted}"));
    }
    if cell.is_empty() { "-".into() } else { cell }
}

/// `ms` since the epoch as a UTC date and time, `2025-01-31T23:59:59Z`.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `ms` since the epoch as a UTC date, `2025-01-31`.
fn day(ms: i64) -> String {
    let (y, m, d) = civil(ms.div_euclid(1000).div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `keywarden keys`: the inventory at `path`, as a table or as JSON.
pub fn print(path: &Path, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let inv = Inventory::read(path)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no key inventory there (the sensor writes it every {} s while it runs, and at exit)",
            path.display(),
            SAVE_EVERY.as_secs()
        )
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        out.write_all(&inv.to_json(true)?)?;
        out.write_all(b"\n")?;
    } else {
        out.write_all(inv.table().as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        super::tests::{DAY, by, cert, file, key},
        *,
    };

    /// The table names each key once, says "unused" for a key nothing
    /// signed with, and escapes control characters.
    #[test]
    fn the_table_marks_unused_keys() {
        let mut inv = Inventory::default();
        let (a, ka) = key(1);
        let (b, kb) = key(2);
        inv.learnt(ka, &file("/a.key"), 0);
        inv.learnt(kb, &file("/b\x1b[2J.crt"), 0);
        inv.add_certificates(&[cert(&b, "CN=www.example.test")], &file("/b.crt"));
        inv.used(&by(ka, "openssl", "/usr/bin/openssl", DAY + 1000));
        let t = inv.table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("SPKI SHA-256"));
        assert!(lines[1].starts_with(&a[..16]), "used first: {t}");
        assert!(lines[1].contains("1970-01-02T00:00:01Z") && lines[1].contains("openssl"));
        assert!(lines[2].starts_with(&b[..16]));
        assert!(lines[2].contains(" unused "), "{t}");
        assert!(
            lines[2].contains("CN=www.example.test (until 1970-01-31)"),
            "{t}"
        );
        assert!(lines[2].contains("/b\\x1b[2J.crt"), "{t}");
        assert!(!t.contains('\x1b'));
        assert!(lines[3].starts_with("2 key(s), 1 unused"), "{t}");
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(2_147_483_648_000 + 999), "2038-01-19T03:14:08Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(day(951_782_400_000 + DAY), "2000-03-01");
    }
}
