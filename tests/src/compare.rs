//! Comparing two trees entry by entry: what a mount or an unpacked image shows against
//! the source it was built from.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What [`compare_trees_with`] leaves out. The default compares everything.
#[derive(Debug, Clone, Default)]
pub struct CompareOptions {
    /// Compare mtimes to the second only (for formats or paths that drop nanoseconds).
    pub ignore_nsec: bool,
    /// Skip the mtime of the two roots (a mount point or an extraction directory).
    pub ignore_root_mtime: bool,
    /// Skip extended attributes altogether.
    pub ignore_xattrs: bool,
}

/// Every difference between the trees at `expected` and `actual`, compared with the
/// default [`CompareOptions`]; empty when they match. See [`compare_trees_with`].
pub fn compare_trees(expected: &Path, actual: &Path) -> Vec<String> {
    compare_trees_with(expected, actual, &CompareOptions::default())
}

/// Panics, listing every difference, unless the tree at `actual` is the one at
/// `expected`, the roots' mtimes aside (a mount point or an extraction directory has its
/// own).
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let diffs = compare_trees_with(
        expected,
        actual,
        &CompareOptions {
            ignore_root_mtime: true,
            ..Default::default()
        },
    );
    assert!(
        diffs.is_empty(),
        "{} differences between {} and {}:\n{}",
        diffs.len(),
        expected.display(),
        actual.display(),
        diffs.join("\n")
    );
}

/// Every difference between the trees at `expected` and `actual`, one line each, as
/// `PATH: WHAT: expected X, got Y` with `PATH` relative to the roots (`/` is the root):
/// the [`Difference`]s of [`differences`], shown.
pub fn compare_trees_with(expected: &Path, actual: &Path, options: &CompareOptions) -> Vec<String> {
    differences(expected, actual, options)
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// One difference between two trees: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The path relative to the roots (empty for the root).
    pub path: PathBuf,
    /// What differs there.
    pub what: What,
}

/// What differs at a path. `Display` shows it as `WHAT: expected X, got Y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// Only the expected tree has the entry (with this many entries below it).
    Missing(usize),
    /// Only the actual tree has the entry (with this many entries below it).
    Unexpected(usize),
    /// File types (then nothing else is compared there).
    Type(&'static str, &'static str),
    /// Permission bits.
    Mode(u32, u32),
    /// Owner.
    Uid(u32, u32),
    /// Group.
    Gid(u32, u32),
    /// Modification time (seconds, nanoseconds).
    Mtime((i64, i64), (i64, i64)),
    /// Link counts of a regular file.
    Nlink(u64, u64),
    /// Which earlier path (first seen with the inode) a hard-linked file shares it with.
    HardLink(PathBuf, PathBuf),
    /// Sizes of regular files or symlinks.
    Size(u64, u64),
    /// sha256 of regular file contents.
    Content(String, String),
    /// Symlink targets.
    SymlinkTarget(Vec<u8>, Vec<u8>),
    /// Device numbers.
    Rdev(u64, u64),
    /// An xattr's value on each side (`None`: not there).
    Xattr(OsString, Option<Vec<u8>>, Option<Vec<u8>>),
    /// Something could not be read (lstat, readlink, listing, content, xattrs).
    Unreadable(String),
}

impl std::fmt::Display for What {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let below = |n: usize| {
            if n == 0 {
                String::new()
            } else {
                format!(" (and {n} entries below it)")
            }
        };
        match self {
            What::Missing(n) => write!(f, "missing{}", below(*n)),
            What::Unexpected(n) => write!(f, "unexpected{}", below(*n)),
            What::Type(e, a) => write!(f, "type: expected {e}, got {a}"),
            What::Mode(e, a) => write!(f, "mode: expected {e:04o}, got {a:04o}"),
            What::Uid(e, a) => write!(f, "uid: expected {e}, got {a}"),
            What::Gid(e, a) => write!(f, "gid: expected {e}, got {a}"),
            What::Mtime(e, a) => write!(
                f,
                "mtime: expected {}.{:09}, got {}.{:09}",
                e.0, e.1, a.0, a.1
            ),
            What::Nlink(e, a) => write!(f, "nlink: expected {e}, got {a}"),
            What::HardLink(e, a) => write!(
                f,
                "hard link: expected the inode of {}, got the inode of {}",
                show(e),
                show(a)
            ),
            What::Size(e, a) => write!(f, "size: expected {e}, got {a}"),
            What::Content(e, a) => write!(f, "content: expected sha256 {e}, got {a}"),
            What::SymlinkTarget(e, a) => write!(
                f,
                "symlink target: expected {}, got {}",
                show_bytes(e),
                show_bytes(a)
            ),
            What::Rdev(e, a) => write!(f, "rdev: expected {}, got {}", dev_str(*e), dev_str(*a)),
            What::Xattr(name, e, a) => {
                let name = name.to_string_lossy();
                match (e, a) {
                    (Some(_), None) => write!(f, "xattr {name}: missing"),
                    (None, _) => write!(f, "xattr {name}: unexpected"),
                    (Some(e), Some(a)) => write!(
                        f,
                        "xattr {name}: expected {}, got {}",
                        show_bytes(e),
                        show_bytes(a)
                    ),
                }
            }
            What::Unreadable(msg) => f.write_str(msg),
        }
    }
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", show(&self.path), self.what)
    }
}

/// Every difference between the trees at `expected` and `actual`, typed, in walk order.
///
/// Both trees are walked without following symlinks (lstat). For each path it reports
/// a missing or extra entry (once, with how many entries lie below it) and, for entries
/// on both sides, differences in: file type; permission bits (`mode & 0o7777`); uid;
/// gid; mtime seconds and nanoseconds; size, content (sha256) and link count of regular
/// files, and which names share an inode; size and target of symlinks; device number of
/// devices; xattr names and values. Directory sizes and link counts are not compared
/// (they depend on the filesystem). Errors while reading are reported as differences,
/// not panics.
pub fn differences(expected: &Path, actual: &Path, options: &CompareOptions) -> Vec<Difference> {
    let mut cmp = Comparer {
        options,
        diffs: Vec::new(),
        links_expected: HashMap::new(),
        links_actual: HashMap::new(),
    };
    cmp.entry(expected, actual, Path::new(""));
    cmp.diffs
}

/// The sha256 of a file's content as lowercase hex, read in a streaming way.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

struct Comparer<'a> {
    options: &'a CompareOptions,
    diffs: Vec<Difference>,
    /// (dev, ino) of a hard-linked file → the first path seen with it, per side.
    links_expected: HashMap<(u64, u64), PathBuf>,
    links_actual: HashMap<(u64, u64), PathBuf>,
}

impl Comparer<'_> {
    fn report(&mut self, rel: &Path, what: What) {
        self.diffs.push(Difference {
            path: rel.to_path_buf(),
            what,
        });
    }

    fn unreadable(&mut self, rel: &Path, msg: String) {
        self.report(rel, What::Unreadable(msg))
    }

    /// Compares the entries `exp` and `act` (both present), and below them.
    fn entry(&mut self, exp: &Path, act: &Path, rel: &Path) {
        let (e, a) = match (fs::symlink_metadata(exp), fs::symlink_metadata(act)) {
            (Ok(e), Ok(a)) => (e, a),
            (Err(err), _) => return self.unreadable(rel, format!("cannot lstat expected: {err}")),
            (_, Err(err)) => return self.unreadable(rel, format!("cannot lstat actual: {err}")),
        };
        let (kind_e, kind_a) = (kind(&e), kind(&a));
        if kind_e != kind_a {
            return self.report(rel, What::Type(kind_e, kind_a));
        }
        self.attributes(exp, act, rel, &e, &a);
        match kind_e {
            "regular file" => self.regular(exp, act, rel, &e, &a),
            "symlink" => self.symlink(exp, act, rel, &e, &a),
            "char device" | "block device" if e.rdev() != a.rdev() => {
                self.report(rel, What::Rdev(e.rdev(), a.rdev()))
            }
            "directory" => self.directory(exp, act, rel),
            _ => {}
        }
    }

    /// Mode, owner, mtime and xattrs: the attributes every type has.
    fn attributes(&mut self, exp: &Path, act: &Path, rel: &Path, e: &Metadata, a: &Metadata) {
        let (mode_e, mode_a) = (e.mode() & 0o7777, a.mode() & 0o7777);
        if mode_e != mode_a {
            self.report(rel, What::Mode(mode_e, mode_a));
        }
        if e.uid() != a.uid() {
            self.report(rel, What::Uid(e.uid(), a.uid()));
        }
        if e.gid() != a.gid() {
            self.report(rel, What::Gid(e.gid(), a.gid()));
        }
        let is_root = rel.as_os_str().is_empty();
        if !(is_root && self.options.ignore_root_mtime) {
            let nsec = |m: &Metadata| {
                if self.options.ignore_nsec {
                    0
                } else {
                    m.mtime_nsec()
                }
            };
            let (te, ta) = ((e.mtime(), nsec(e)), (a.mtime(), nsec(a)));
            if te != ta {
                self.report(rel, What::Mtime(te, ta));
            }
        }
        if !self.options.ignore_xattrs {
            self.xattrs(exp, act, rel);
        }
    }

    fn xattrs(&mut self, exp: &Path, act: &Path, rel: &Path) {
        let (xe, xa) = match (read_xattrs(exp), read_xattrs(act)) {
            (Ok(xe), Ok(xa)) => (xe, xa),
            (Err(err), _) => {
                return self.unreadable(rel, format!("cannot read expected xattrs: {err}"))
            }
            (_, Err(err)) => {
                return self.unreadable(rel, format!("cannot read actual xattrs: {err}"))
            }
        };
        for (name, value) in &xe {
            match xa.get(name) {
                Some(v) if v == value => {}
                v => self.report(
                    rel,
                    What::Xattr(name.clone(), Some(value.clone()), v.cloned()),
                ),
            }
        }
        for (name, v) in xa.iter().filter(|(n, _)| !xe.contains_key(*n)) {
            self.report(rel, What::Xattr(name.clone(), None, Some(v.clone())));
        }
    }

    fn regular(&mut self, exp: &Path, act: &Path, rel: &Path, e: &Metadata, a: &Metadata) {
        if e.nlink() != a.nlink() {
            self.report(rel, What::Nlink(e.nlink(), a.nlink()));
        }
        let leader_e = leader(&mut self.links_expected, e, rel);
        let leader_a = leader(&mut self.links_actual, a, rel);
        if leader_e != leader_a {
            self.report(rel, What::HardLink(leader_e, leader_a));
        }
        if e.size() != a.size() {
            return self.report(rel, What::Size(e.size(), a.size()));
        }
        match (sha256_file(exp), sha256_file(act)) {
            (Ok(he), Ok(ha)) if he != ha => self.report(rel, What::Content(he, ha)),
            (Ok(_), Ok(_)) => {}
            (Err(err), _) => self.unreadable(rel, format!("cannot read expected content: {err}")),
            (_, Err(err)) => self.unreadable(rel, format!("cannot read actual content: {err}")),
        }
    }

    fn symlink(&mut self, exp: &Path, act: &Path, rel: &Path, e: &Metadata, a: &Metadata) {
        match (fs::read_link(exp), fs::read_link(act)) {
            (Ok(te), Ok(ta)) if te != ta => self.report(
                rel,
                What::SymlinkTarget(
                    te.as_os_str().as_bytes().to_vec(),
                    ta.as_os_str().as_bytes().to_vec(),
                ),
            ),
            (Ok(_), Ok(_)) if e.size() != a.size() => {
                self.report(rel, What::Size(e.size(), a.size()))
            }
            (Ok(_), Ok(_)) => {}
            (Err(err), _) => self.unreadable(rel, format!("cannot readlink expected: {err}")),
            (_, Err(err)) => self.unreadable(rel, format!("cannot readlink actual: {err}")),
        }
    }

    fn directory(&mut self, exp: &Path, act: &Path, rel: &Path) {
        let (ne, na) = match (list_dir(exp), list_dir(act)) {
            (Ok(ne), Ok(na)) => (ne, na),
            (Err(err), _) => return self.unreadable(rel, format!("cannot list expected: {err}")),
            (_, Err(err)) => return self.unreadable(rel, format!("cannot list actual: {err}")),
        };
        let mut names: Vec<&OsString> = ne.iter().chain(na.iter()).collect();
        names.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));
        names.dedup();
        for name in names {
            let (pe, pa, pr) = (exp.join(name), act.join(name), rel.join(name));
            match (ne.contains(name), na.contains(name)) {
                (true, true) => self.entry(&pe, &pa, &pr),
                (true, false) => self.report(&pr, What::Missing(below(&pe))),
                (false, true) => self.report(&pr, What::Unexpected(below(&pa))),
                (false, false) => unreachable!("name comes from one of the two listings"),
            }
        }
    }
}

/// The first path seen with the inode of `meta` (itself when it has one link).
fn leader(seen: &mut HashMap<(u64, u64), PathBuf>, meta: &Metadata, rel: &Path) -> PathBuf {
    if meta.nlink() <= 1 {
        return rel.to_path_buf();
    }
    seen.entry((meta.dev(), meta.ino()))
        .or_insert_with(|| rel.to_path_buf())
        .clone()
}

fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular file"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "char device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "unknown type"
    }
}

fn list_dir(dir: &Path) -> io::Result<Vec<OsString>> {
    fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect()
}

fn read_xattrs(path: &Path) -> io::Result<BTreeMap<OsString, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for name in xattr::list(path)? {
        // An attribute removed between list and get reads as absent.
        if let Some(value) = xattr::get(path, &name)? {
            out.insert(name, value);
        }
    }
    Ok(out)
}

/// How many entries lie below `path` (0 unless it is a directory).
fn below(path: &Path) -> usize {
    if !fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return 0;
    }
    count_entries(path)
}

fn count_entries(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            1 + if is_dir { count_entries(&e.path()) } else { 0 }
        })
        .sum()
}

/// A relative path for messages: `/` for the root, UTF-8 as is, other bytes escaped.
fn show(rel: &Path) -> String {
    let bytes = rel.as_os_str().as_bytes();
    if bytes.is_empty() {
        "/".to_owned()
    } else {
        show_text(bytes)
    }
}

fn show_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

/// A value for messages: quoted text when printable UTF-8, else hex.
fn show_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => {
            if s.len() > 80 {
                let head: String = s.chars().take(80).collect();
                format!("{head:?}... ({} bytes)", s.len())
            } else {
                format!("{s:?}")
            }
        }
        _ => format!("0x{}", hex::encode(bytes)),
    }
}

fn dev_str(rdev: u64) -> String {
    format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_shown_readably() {
        assert_eq!(show_bytes(b"y"), "\"y\"");
        assert_eq!(show_bytes(&[0, 0xff]), "0x00ff");
        assert_eq!(show(Path::new("")), "/");
        assert_eq!(show(Path::new("a/é")), "a/é");
        let bad = Path::new(std::ffi::OsStr::from_bytes(b"x\xff"));
        assert_eq!(show(bad), "x\\xff");
    }
}
