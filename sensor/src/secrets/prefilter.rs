//! Compiles watch-list globs into the literal tests the `openat` probe can
//! afford (`keywarden_probe_types::watch`).
//!
//! The probe runs on every `openat` on the host, so it cannot match globs.
//! Each glob becomes one test whose matches are a superset of the glob's:
//!
//! | glob | kernel test |
//! |---|---|
//! | `/etc/ssl/private/**` | path starts with `/etc/ssl/private/` |
//! | `/var/run/secrets/.../token` (no wildcard) | path starts with the whole path |
//! | `**/*.key` | path ends with `.key` |
//! | `**/.env`, `**/.aws/credentials` | path ends with `/.env`, `/.aws/credentials` |
//! | `**/.ssh/id_*` | last component starts with `id_` |
//!
//! The sensor then matches the glob exactly. A glob that fits none of these
//! shapes (`**/*`, `/**/x*y`) would make the kernel pass too much, and is
//! rejected with an error naming it.

use keywarden_probe_types::{WatchPattern, watch};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("secret_files.watch entry {glob:?}: {why}")]
pub struct PatternError {
    pub glob: String,
    pub why: String,
}

fn is_meta(c: char) -> bool {
    matches!(c, '*' | '?' | '[' | ']' | '{' | '}')
}

fn pattern(kind: u32, literal: &str, glob: &str) -> Result<WatchPattern, PatternError> {
    WatchPattern::new(kind, literal.as_bytes()).ok_or_else(|| PatternError {
        glob: glob.into(),
        why: format!(
            "its literal part must be 1 to {} bytes long",
            watch::PATTERN_MAX
        ),
    })
}

/// The kernel test for one glob.
pub fn compile(glob: &str) -> Result<WatchPattern, PatternError> {
    let err = |why: &str| PatternError {
        glob: glob.into(),
        why: why.into(),
    };
    if glob.is_empty() {
        return Err(err("is empty"));
    }
    if let Some(tail) = glob.strip_prefix("**/") {
        // A file name (or a tail of path components) anywhere.
        let (dirs, name) = match tail.rfind('/') {
            Some(i) => (&tail[..i], &tail[i + 1..]),
            None => ("", tail),
        };
        if !tail.contains(is_meta) {
            return pattern(watch::PATH_SUFFIX, &format!("/{tail}"), glob);
        }
        if dirs.contains(is_meta) {
            return Err(err("wildcards are only allowed in its last path component"));
        }
        if let Some(ext) = name.strip_prefix('*')
            && !ext.is_empty()
            && !ext.contains(is_meta)
        {
            return pattern(watch::PATH_SUFFIX, ext, glob);
        }
        if let Some(i) = name.find(is_meta)
            && i > 0
        {
            return pattern(watch::BASENAME_PREFIX, &name[..i], glob);
        }
        return Err(err(
            "its last component must be a name, `*.ext`, or `prefix*`",
        ));
    }
    if glob.starts_with('/') {
        let literal = match glob.find(is_meta) {
            None => glob,
            Some(i) => &glob[..=glob[..i].rfind('/').unwrap_or(0)],
        };
        if literal.len() <= 1 {
            return Err(err(
                "an absolute glob needs a literal directory before its first wildcard",
            ));
        }
        return pattern(watch::PATH_PREFIX, literal, glob);
    }
    Err(err(
        "must be absolute (/dir/**) or start with **/ (**/name)",
    ))
}

/// All slots for the `WATCH` map. A `**/name` glob also gets an exact test
/// for the relative path `name` (a process that opens `.env` in its working
/// directory), so it may take two slots.
pub fn compile_all(globs: &[String]) -> Result<Vec<WatchPattern>, PatternError> {
    let mut out = Vec::new();
    for g in globs {
        let p = compile(g)?;
        let literal = p.literal();
        out.push(p);
        if p.kind == watch::PATH_SUFFIX && literal[0] == b'/' {
            let rest = std::str::from_utf8(&literal[1..p.len as usize]).unwrap_or_default();
            out.push(pattern(watch::PATH_EXACT, rest, g)?);
        }
        if out.len() > watch::SLOTS as usize {
            return Err(PatternError {
                glob: g.clone(),
                why: format!(
                    "the watch list needs more than the {} kernel slots",
                    watch::SLOTS
                ),
            });
        }
    }
    Ok(out)
}

/// What the exit of an open tests the opened file's own name against, for
/// one glob: the entry's test reads the path the process gave, which a
/// symlink of another name, a path too long to copy, or a thread
/// rewriting it hides. Taken from the glob's last component, so it is a
/// superset too; the sensor matches the file's walked path against the
/// glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitTest {
    /// `**/.env`, `/var/run/secrets/.../token`: that basename.
    Name(String),
    /// `**/*.p12`: names ending so.
    Ending(String),
    /// `**/.ssh/id_*`: names beginning so.
    Beginning(String),
}

/// The exit test for `glob`; `None` when its last component tells no name
/// (`/etc/ssl/private/**`, `a*b`): files it matches are judged by the path
/// the process gave only, unless named like a key file.
pub fn exit_test(glob: &str) -> Option<ExitTest> {
    let last = glob.rsplit('/').next().filter(|l| !l.is_empty())?;
    if !last.contains(is_meta) {
        return Some(ExitTest::Name(last.to_owned()));
    }
    if let Some(ending) = last.strip_prefix('*')
        && !ending.is_empty()
        && !ending.contains(is_meta)
    {
        return Some(ExitTest::Ending(ending.to_owned()));
    }
    match last.find(is_meta) {
        Some(i) if i > 0 && last[i..].chars().all(|c| c == '*') => {
            Some(ExitTest::Beginning(last[..i].to_owned()))
        }
        _ => None,
    }
}

/// The exit's tests for a whole watch list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExitNames {
    /// Basenames (`name_kind::WATCHED` in `FILE_NAMES`).
    pub names: Vec<String>,
    /// Endings and beginnings, at most `config::NAME_AFFIXES` of each. An
    /// ending the built-in key suffixes already cover is not repeated.
    pub endings: Vec<String>,
    pub beginnings: Vec<String>,
    /// Globs whose files are judged by the path the process gave only
    /// (unless named like a key file), for the start log.
    pub by_given_path: Vec<String>,
}

impl ExitNames {
    /// The start log's line.
    pub fn describe(&self) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(" ")
            }
        };
        format!(
            "opens of watched files are also judged by the opened file's own name (names: {}; \
             endings: {}; beginnings: {}), so a symlink of another name or a long or rewritten \
             path does not hide them; judged by the path the process gave only (unless named \
             like a key file): {}",
            list(&self.names),
            list(&self.endings),
            list(&self.beginnings),
            list(&self.by_given_path)
        )
    }
}

pub fn exit_names(globs: &[String]) -> ExitNames {
    let mut out = ExitNames::default();
    let room = keywarden_probe_types::config::NAME_AFFIXES as usize;
    let key_suffix = |e: &str| {
        keywarden_probe_types::KEY_SUFFIXES
            .iter()
            .any(|k| e.as_bytes().ends_with(k))
    };
    for g in globs {
        match exit_test(g) {
            Some(ExitTest::Name(n)) => {
                if !out.names.contains(&n) {
                    out.names.push(n);
                }
            }
            Some(ExitTest::Ending(e)) if key_suffix(&e) => {}
            Some(ExitTest::Ending(e)) if out.endings.contains(&e) => {}
            Some(ExitTest::Ending(e)) if out.endings.len() < room => out.endings.push(e),
            Some(ExitTest::Beginning(b)) if out.beginnings.contains(&b) => {}
            Some(ExitTest::Beginning(b)) if out.beginnings.len() < room => out.beginnings.push(b),
            _ => out.by_given_path.push(g.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(p: &WatchPattern) -> (u32, String) {
        (
            p.kind,
            String::from_utf8_lossy(&p.literal()[..p.len as usize]).into_owned(),
        )
    }

    /// The default watch list: every glob but the directory one is
    /// tested at the exit too, by its last component.
    #[test]
    fn exit_tests_take_the_last_component() {
        let globs: Vec<String> = [
            "/etc/ssl/private/**",
            "**/*.key",
            "**/*.pem",
            "**/.env",
            "**/.aws/credentials",
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "**/.ssh/id_*",
            "**/*.p12",
            "/srv/**/*.p12",
            "**/a*b",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            exit_names(&globs),
            ExitNames {
                names: vec![".env".into(), "credentials".into(), "token".into()],
                endings: vec![".p12".into()],
                beginnings: vec!["id_".into()],
                by_given_path: vec!["/etc/ssl/private/**".into(), "**/a*b".into()],
            }
        );
        // As CONFIG words: the count on top, the bytes little-endian; a
        // longer affix keeps the 7 bytes next to the name's end or start.
        use keywarden_probe_types::{NAME_AFFIX_ENDING, name_affix};
        assert_eq!(
            name_affix(b".p12", true),
            NAME_AFFIX_ENDING | 4 << 56 | 0x3231_702e
        );
        assert_eq!(name_affix(b"id_", false), 3 << 56 | 0x5f_6469);
        assert_eq!(name_affix(b".keystore", true), name_affix(b"eystore", true));
        assert_eq!(
            name_affix(b"id_rsa_backup", false),
            name_affix(b"id_rsa_", false)
        );
        // NAME_TAILS keys: the length, and the last eight bytes.
        use keywarden_probe_types::NameTail;
        assert_eq!(
            NameTail::new(b".env"),
            NameTail {
                len: 4,
                tail: u32::from_le_bytes(*b".env") as u64
            }
        );
        assert_eq!(
            NameTail::new(b"credentials"),
            NameTail {
                len: 11,
                tail: u64::from_le_bytes(*b"dentials")
            }
        );
        // Past the kernel's slots, globs are judged by the given path.
        let many: Vec<String> = (0..6).map(|i| format!("**/*.x{i}")).collect();
        let e = exit_names(&many);
        assert_eq!(e.endings.len(), 4);
        assert_eq!(e.by_given_path, vec!["**/*.x4", "**/*.x5"]);
    }

    #[test]
    fn default_shapes() {
        let c = |g: &str| lit(&compile(g).unwrap());
        assert_eq!(
            c("/etc/ssl/private/**"),
            (watch::PATH_PREFIX, "/etc/ssl/private/".into())
        );
        assert_eq!(c("**/*.key"), (watch::PATH_SUFFIX, ".key".into()));
        assert_eq!(c("**/*.pem"), (watch::PATH_SUFFIX, ".pem".into()));
        assert_eq!(c("**/.env"), (watch::PATH_SUFFIX, "/.env".into()));
        assert_eq!(
            c("**/.aws/credentials"),
            (watch::PATH_SUFFIX, "/.aws/credentials".into())
        );
        assert_eq!(
            c("/var/run/secrets/kubernetes.io/serviceaccount/token"),
            (
                watch::PATH_PREFIX,
                "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
            )
        );
        assert_eq!(c("**/.ssh/id_*"), (watch::BASENAME_PREFIX, "id_".into()));
        assert_eq!(
            c("/srv/app/*.secret"),
            (watch::PATH_PREFIX, "/srv/app/".into())
        );
    }

    #[test]
    fn too_general_or_malformed_globs_name_themselves() {
        for (g, why) in [
            ("", "is empty"),
            ("**/*", "last component"),
            ("/**/secret", "literal directory"),
            ("**/*/x.key", "last path component"),
            ("relative/*.key", "must be absolute"),
        ] {
            let e = compile(g).unwrap_err();
            assert_eq!(e.glob, g);
            assert!(e.why.contains(why), "{g}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("secret_files.watch entry {g:?}"))
            );
        }
        let long = format!("/{}/**", "d".repeat(80));
        assert!(compile(&long).unwrap_err().why.contains("bytes long"));
        let many: Vec<String> = (0..9).map(|i| format!("**/f{i}")).collect();
        assert!(
            compile_all(&many)
                .unwrap_err()
                .why
                .contains("16 kernel slots")
        );
        let two = compile_all(&["**/.env".into()]).unwrap();
        assert_eq!(
            two.iter().map(lit).collect::<Vec<_>>(),
            vec![
                (watch::PATH_SUFFIX, "/.env".into()),
                (watch::PATH_EXACT, ".env".into())
            ]
        );
    }
}
