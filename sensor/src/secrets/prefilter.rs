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

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(p: &WatchPattern) -> (u32, String) {
        (
            p.kind,
            String::from_utf8_lossy(&p.literal()[..p.len as usize]).into_owned(),
        )
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
