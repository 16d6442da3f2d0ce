//! Prefetch patterns: absolute paths of files or directories that nydusd should fetch
//! first. A directory pattern covers everything below it.
//!
//! Patterns go into the bootstrap's prefetch table (as the nodes they name) and, for
//! directory sources, decide which files are laid out first in the blob.

use crate::error::{Error, Result};
use rafs::write::{NodeId, Tree};
use std::io::{self, BufRead};

/// Normalizes `patterns` and drops those covered by an earlier one.
///
/// Each pattern must be an absolute path; `.` components, repeated and trailing slashes
/// are removed, `..` is rejected. Blank patterns are ignored. A pattern equal to or below
/// an earlier pattern adds nothing and is dropped; the order of the rest is kept.
pub fn normalize(patterns: &[String]) -> Result<Vec<String>> {
    let mut kept: Vec<Vec<&str>> = Vec::new();
    for raw in patterns {
        let p = raw.trim();
        if p.is_empty() {
            continue;
        }
        let fail = |reason: &str| Error::Prefetch {
            pattern: raw.clone(),
            reason: reason.to_string(),
        };
        if !p.starts_with('/') {
            return Err(fail("not an absolute path (patterns start with '/')"));
        }
        let mut comps = Vec::new();
        for c in p.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(fail("'..' is not allowed")),
                _ => comps.push(c),
            }
        }
        if kept.iter().any(|k| comps.starts_with(k)) {
            continue;
        }
        kept.push(comps);
    }
    Ok(kept
        .into_iter()
        .map(|comps| format!("/{}", comps.join("/")))
        .collect())
}

/// The nodes named by (normalized) `patterns`, in pattern order. Patterns naming nothing
/// in `tree` are skipped with a warning, as upstream does.
pub fn resolve(tree: &Tree, patterns: &[String]) -> Vec<NodeId> {
    let mut out = Vec::new();
    for p in patterns {
        match tree.lookup_path(p.as_bytes()) {
            Ok(Some(id)) => {
                if !out.contains(&id) {
                    out.push(id);
                }
            }
            _ => tracing::warn!("prefetch pattern '{p}' matches nothing in the image; ignored"),
        }
    }
    out
}

/// Reads patterns one per line (as `nydus-image create --prefetch-policy fs` does from
/// stdin).
pub fn read_patterns(r: impl BufRead) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for line in r.lines() {
        let line = line?;
        let line = line.trim();
        if !line.is_empty() {
            out.push(line.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn covered_patterns_are_dropped_and_order_kept() {
        let got = normalize(&s(&[
            "/usr/lib/",
            "/etc//passwd",
            "/usr/lib/x",
            "/usr",
            "/etc/./passwd",
        ]))
        .unwrap();
        assert_eq!(got, s(&["/usr/lib", "/etc/passwd", "/usr"]));
    }

    #[test]
    fn root_covers_everything() {
        assert_eq!(normalize(&s(&["/", "/a", "/b/c"])).unwrap(), s(&["/"]));
    }

    #[test]
    fn a_name_prefix_is_not_a_path_prefix() {
        assert_eq!(
            normalize(&s(&["/usr/li", "/usr/lib"])).unwrap(),
            s(&["/usr/li", "/usr/lib"])
        );
    }

    #[test]
    fn relative_and_dotdot_patterns_are_rejected() {
        let e = normalize(&s(&["usr/lib"])).unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = normalize(&s(&["/usr/../etc"])).unwrap_err().to_string();
        assert!(e.contains(".."), "{e}");
    }

    #[test]
    fn read_patterns_skips_blank_lines() {
        let got = read_patterns(&b"/a\n\n  /b  \n"[..]).unwrap();
        assert_eq!(got, s(&["/a", "/b"]));
    }
}
