//! A filesystem as a flat map from absolute path to file attributes, built the simple
//! way for `nydusify check`: by applying OCI layer tars in order with the overlay rules
//! of the OCI image spec, or by walking a directory.
//!
//! This is deliberately a second, independent implementation of what [`crate::merge`]
//! and [`crate::source::tar`] do (no tree arena, no bootstraps, no chunking): a check
//! that shared their code would repeat their mistakes. Only file attributes and content
//! digests are kept, never content.
//!
//! Layer rules (OCI image spec, "Applying changesets", and containerd's applier where
//! the spec is silent): within one layer, whiteouts (`.wh.NAME` as the last component of
//! a path) and opaque markers (`.wh..wh..opq`) apply to what the *lower* layers built,
//! so they are applied first; then every other entry in tar order: a directory over a
//! directory updates its attributes and keeps its children, anything else replaces the
//! path with everything below it. A hard link entry names a path that already exists;
//! the new name shares its inode.
//!
//! Paths are placed as containerd places them: the parent of each entry (and of each
//! whiteout, and of a hard link's target) is resolved through the symlinks in the tree
//! at that moment, inside the root (absolute targets from the root, `..` stopping at
//! the root, at most 255 links, else an error); the entry's own name is not resolved.
//! Parents that do not exist are made (undefined attributes); a parent that exists and
//! is not a directory is an error. A whiteout below a directory that this layer itself
//! makes anew (a directory header over a lower symlink or file) deletes nothing lower.
//! Absolute member paths are taken from the root.

use super::{OciError, Result};
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The type of a file and what only that type has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with the sha256 of its content.
    Reg([u8; 32]),
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// A character device (glibc `makedev` number).
    Char(u64),
    /// A block device (glibc `makedev` number).
    Block(u64),
    /// A FIFO.
    Fifo,
    /// A socket (directories only: tar cannot hold sockets).
    Socket,
}

impl Kind {
    /// A short name of the type for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Dir => "directory",
            Kind::Reg(_) => "regular file",
            Kind::Symlink(_) => "symlink",
            Kind::Char(_) => "character device",
            Kind::Block(_) => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// The attributes of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Type (and content digest, link target or device number).
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Nanoseconds of `mtime`.
    pub mtime_nsec: u32,
    /// Size of regular files (0 otherwise).
    pub size: u64,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Identity of the inode: names with the same value are hard links of each other.
    pub inode: u64,
    /// Whether the source defines this entry. Parent directories a tar only implies (and
    /// the root when no layer has a `./` entry) have attributes nobody specified; only
    /// their type is compared.
    pub defined: bool,
}

impl Entry {
    fn implicit_dir(inode: u64) -> Entry {
        Entry {
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            xattrs: BTreeMap::new(),
            inode,
            defined: false,
        }
    }
}

/// Paths (absolute, `/` is the root) to their attributes.
#[derive(Clone, Debug)]
pub struct FlatTree {
    /// Every path, sorted.
    pub entries: BTreeMap<Vec<u8>, Entry>,
    next_inode: u64,
}

impl Default for FlatTree {
    fn default() -> Self {
        let mut entries = BTreeMap::new();
        entries.insert(b"/".to_vec(), Entry::implicit_dir(0));
        FlatTree {
            entries,
            next_inode: 1,
        }
    }
}

/// One change a layer makes, collected before anything is applied.
enum Change {
    /// Only the parent of this path is made (the path is a whiteout).
    Parent(Vec<u8>),
    Add(Vec<u8>, Entry),
    Link(Vec<u8>, Vec<u8>),
}

/// `/a/b` for `./a/b/`, `a/b`, `/a//b`; an error for `..` (a layer must not reach
/// outside the root).
fn normalize(raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len() + 1);
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(OciError::invalid(
                    format!("tar entry '{}'", String::from_utf8_lossy(raw)),
                    "path leaves the root (..)",
                ))
            }
            c => {
                out.push(b'/');
                out.extend_from_slice(c);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

/// `path` with `.` and empty components dropped and `..` applied lexically, stopping
/// at the root (Go's `filepath.Clean` of an absolute path).
fn clean(path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = Vec::new();
    for p in parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    let i = path.iter().rposition(|b| *b == b'/').unwrap_or(0);
    (if i == 0 { b"/" } else { &path[..i] }, &path[i + 1..])
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p != b"/" {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// glibc `makedev`.
pub fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

impl FlatTree {
    fn fresh_inode(&mut self) -> u64 {
        self.next_inode += 1;
        self.next_inode
    }

    /// Removes everything strictly below `dir`.
    fn remove_below(&mut self, dir: &[u8]) {
        let prefix = join(dir, b"");
        // `dir` itself is not below it (the root's prefix, "/", is the root's key).
        let below: Vec<Vec<u8>> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| k.as_slice() != dir)
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.entries.remove(&k);
        }
    }

    /// Removes `path` and everything below it.
    fn remove(&mut self, path: &[u8]) {
        if path != b"/" {
            self.entries.remove(path);
        }
        self.remove_below(path);
    }

    /// Where `path` leads once every symlink on it (its last component included) is
    /// followed inside the root, as containerd's `fs.RootPath` does: each target is
    /// joined to the directory it is in (or to the root, when absolute), cleaned
    /// lexically, and walked again.
    fn root_path(&self, path: &[u8], entry: &[u8]) -> Result<Vec<u8>> {
        const MAX_LINKS: u32 = 255;
        let mut links = 0;
        let mut pending: Vec<Vec<u8>> = path
            .split(|b| *b == b'/')
            .rev()
            .map(|c| c.to_vec())
            .collect();
        let mut at = b"/".to_vec();
        while let Some(c) = pending.pop() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                at = split(&at).0.to_vec();
                continue;
            }
            let next = join(&at, &c);
            let Some(Entry {
                kind: Kind::Symlink(target),
                ..
            }) = self.entries.get(&next)
            else {
                at = next;
                continue;
            };
            links += 1;
            if links > MAX_LINKS {
                return Err(OciError::invalid(
                    format!("layer path '{}'", String::from_utf8_lossy(entry)),
                    format!(
                        "more than {MAX_LINKS} symbolic links resolving '{}': a loop",
                        String::from_utf8_lossy(path)
                    ),
                ));
            }
            let base = if target.starts_with(b"/") {
                b"/".to_vec()
            } else {
                at.clone()
            };
            let joined = clean(&join(&base, target));
            at = b"/".to_vec();
            pending.extend(joined.split(|b| *b == b'/').rev().map(|c| c.to_vec()));
        }
        Ok(at)
    }

    /// The directory that the parent of the layer path `path` is (symlinks followed),
    /// made with undefined attributes where missing; an error when something that is
    /// not a directory is in the way.
    fn parent_of(&mut self, path: &[u8]) -> Result<Vec<u8>> {
        let (parent, _) = split(path);
        let dir = self.root_path(parent, path)?;
        let mut missing = Vec::new();
        let mut cur = dir.clone();
        loop {
            match self.entries.get(&cur) {
                Some(e) if e.kind == Kind::Dir => break,
                Some(e) => {
                    return Err(OciError::invalid(
                        format!("layer path '{}'", String::from_utf8_lossy(path)),
                        format!(
                            "its parent '{}' is a {}, not a directory",
                            String::from_utf8_lossy(&cur),
                            e.kind.name()
                        ),
                    ))
                }
                None if cur == b"/" => {
                    // Never removed, but a missing root is made like any parent.
                    missing.push(cur.clone());
                    break;
                }
                None => {
                    missing.push(cur.clone());
                    cur = split(&cur).0.to_vec();
                }
            }
        }
        for m in missing.into_iter().rev() {
            let inode = self.fresh_inode();
            self.entries.insert(m, Entry::implicit_dir(inode));
        }
        Ok(dir)
    }

    /// The lower directory that a whiteout at layer path `path` deletes in, or `None`
    /// when there is nothing lower there: a component is missing or not a directory,
    /// or is a symlink that a directory header of this layer (`explicit_dirs`) replaces.
    fn lower_parent(
        &self,
        path: &[u8],
        explicit_dirs: &std::collections::BTreeSet<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        let (parent, _) = split(path);
        let mut raw = b"/".to_vec();
        let mut at = b"/".to_vec();
        for c in parent.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            raw = join(&raw, c);
            let next = join(&at, c);
            at = match self.entries.get(&next).map(|e| &e.kind) {
                Some(Kind::Dir) => next,
                Some(Kind::Symlink(_)) if !explicit_dirs.contains(&raw) => {
                    let resolved = self.root_path(&next, path)?;
                    match self.entries.get(&resolved) {
                        Some(e) if e.kind == Kind::Dir => resolved,
                        _ => return Ok(None),
                    }
                }
                _ => return Ok(None),
            };
        }
        Ok(Some(at))
    }

    /// Adds `entry` at the layer path `path`; returns where it went.
    fn put(&mut self, path: &[u8], entry: Entry) -> Result<Vec<u8>> {
        let dir = self.parent_of(path)?;
        let at = join(&dir, split(path).1);
        if let Some(old) = self.entries.get_mut(&at) {
            if old.kind == Kind::Dir && entry.kind == Kind::Dir {
                let inode = old.inode;
                *old = Entry { inode, ..entry };
                return Ok(at);
            }
        }
        self.remove(&at);
        self.entries.insert(at.clone(), entry);
        Ok(at)
    }

    /// Applies one layer: an uncompressed, gzip or zstd tar stream.
    pub fn apply_layer(&mut self, layer: impl Read) -> Result<()> {
        let mut layer = std::io::BufReader::with_capacity(256 * 1024, layer);
        let head =
            std::io::BufRead::fill_buf(&mut layer).map_err(|e| OciError::io("Reading layer", e))?;
        let stream: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(layer))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(layer)
                    .map_err(|e| OciError::io("Reading layer", e))?,
            )
        } else {
            Box::new(layer)
        };
        self.apply_tar(stream)
    }

    /// Applies one layer from an uncompressed tar stream.
    pub fn apply_tar(&mut self, tar: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(tar);
        let mut deletions: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut changes: Vec<Change> = Vec::new();
        let mut explicit_dirs = std::collections::BTreeSet::new();
        let io = |what: &str, e| OciError::io(format!("Reading layer tar: {what}"), e);
        for entry in archive.entries().map_err(|e| io("entries", e))? {
            let mut entry = entry.map_err(|e| io("entry header", e))?;
            let path = normalize(&entry.path_bytes())?;
            let (_, name) = split(&path);
            if name.starts_with(WHITEOUT) {
                // Its parent is made all the same (containerd's `mkparent`).
                changes.push(Change::Parent(path.clone()));
                if name == OPAQUE {
                    deletions.push((path, true));
                } else if name.len() > WHITEOUT.len() {
                    // Also `.wh..wh.x` (aufs metadata): it deletes `.wh.x`, as
                    // containerd's applier does.
                    deletions.push((path, false));
                }
                continue;
            }
            if entry.header().entry_type().is_dir() {
                explicit_dirs.insert(path.clone());
            }
            let h = entry.header().clone();
            let shown = String::from_utf8_lossy(&path).into_owned();
            let mut uid = h.uid().map_err(|e| io(&shown, e))? as u32;
            let mut gid = h.gid().map_err(|e| io(&shown, e))? as u32;
            let mut mtime = h.mtime().map_err(|e| io(&shown, e))? as i64;
            let mut mtime_nsec = 0u32;
            let mut xattrs = BTreeMap::new();
            if let Some(pax) = entry.pax_extensions().map_err(|e| io(&shown, e))? {
                for ext in pax {
                    let ext = ext.map_err(|e| io(&shown, e))?;
                    let key = ext.key_bytes();
                    let value = ext.value_bytes();
                    let num = || std::str::from_utf8(value).ok();
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.insert(name.to_vec(), value.to_vec());
                    } else if key == b"uid" {
                        uid = num().and_then(|s| s.parse().ok()).unwrap_or(uid);
                    } else if key == b"gid" {
                        gid = num().and_then(|s| s.parse().ok()).unwrap_or(gid);
                    } else if key == b"mtime" {
                        if let Some(s) = num() {
                            let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
                            mtime = sec.parse().unwrap_or(mtime);
                            let digits: String = frac.chars().take(9).collect();
                            mtime_nsec = format!("{digits:0<9}").parse().unwrap_or(0);
                        }
                    }
                }
            }
            let perm = h.mode().map_err(|e| io(&shown, e))? & 0o7777;
            let dev = || -> Result<u64> {
                let major = h.device_major().map_err(|e| io(&shown, e))?.unwrap_or(0);
                let minor = h.device_minor().map_err(|e| io(&shown, e))?.unwrap_or(0);
                Ok(makedev(major as u64, minor as u64))
            };
            let ty = h.entry_type();
            let mut size = 0;
            let kind = if ty.is_hard_link() {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    OciError::invalid(format!("tar entry '{shown}'"), "hard link without a target")
                })?;
                changes.push(Change::Link(path, normalize(&target)?));
                continue;
            } else if ty.is_dir() {
                Kind::Dir
            } else if ty.is_file() || ty == tar::EntryType::Continuous {
                let mut hasher = sha2::Sha256::new();
                size = std::io::copy(&mut entry, &mut hasher).map_err(|e| io(&shown, e))?;
                Kind::Reg(hasher.finalize().into())
            } else if ty.is_symlink() {
                Kind::Symlink(
                    entry
                        .link_name_bytes()
                        .map(|c| c.into_owned())
                        .unwrap_or_default(),
                )
            } else if ty.is_character_special() {
                Kind::Char(dev()?)
            } else if ty.is_block_special() {
                Kind::Block(dev()?)
            } else if ty.is_fifo() {
                Kind::Fifo
            } else {
                // Global PAX headers, GNU volume labels and the like are no files.
                continue;
            };
            let inode = self.fresh_inode();
            changes.push(Change::Add(
                path,
                Entry {
                    kind,
                    perm,
                    uid,
                    gid,
                    mtime,
                    mtime_nsec,
                    size,
                    xattrs,
                    inode,
                    defined: true,
                },
            ));
        }
        // Whiteouts' parents are made before anything is deleted (containerd makes
        // each one right before its deletion, which comes to the same).
        for change in &changes {
            if let Change::Parent(path) = change {
                if self.lower_parent(path, &explicit_dirs)?.is_none() {
                    self.parent_of(path)?;
                }
            }
        }
        for (path, opaque) in deletions {
            let Some(dir) = self.lower_parent(&path, &explicit_dirs)? else {
                continue;
            };
            if opaque {
                self.remove_below(&dir);
            } else {
                let name = &split(&path).1[WHITEOUT.len()..];
                self.remove(&join(&dir, name));
            }
        }
        for change in changes {
            match change {
                Change::Parent(_) => {}
                Change::Add(path, entry) => {
                    self.put(&path, entry)?;
                }
                Change::Link(path, target) => {
                    let target = join(&self.root_path(split(&target).0, &path)?, split(&target).1);
                    let linked = self.entries.get(&target).cloned().ok_or_else(|| {
                        OciError::invalid(
                            format!("tar entry '{}'", String::from_utf8_lossy(&path)),
                            format!(
                                "hard link to '{}', which does not exist",
                                String::from_utf8_lossy(&target)
                            ),
                        )
                    })?;
                    if linked.kind == Kind::Dir {
                        return Err(OciError::invalid(
                            format!("tar entry '{}'", String::from_utf8_lossy(&path)),
                            "hard link to a directory",
                        ));
                    }
                    self.put(&path, linked)?;
                }
            }
        }
        Ok(())
    }

    /// The tree of a directory on disk (not following symlinks).
    pub fn from_dir(root: &Path) -> Result<FlatTree> {
        let mut tree = FlatTree {
            entries: BTreeMap::new(),
            next_inode: 0,
        };
        let mut inodes: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        let mut stack = vec![(root.to_path_buf(), b"/".to_vec())];
        while let Some((disk, path)) = stack.pop() {
            let io = |e| OciError::io(format!("Reading {}", disk.display()), e);
            let md = std::fs::symlink_metadata(&disk).map_err(io)?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                for child in std::fs::read_dir(&disk).map_err(io)? {
                    let child = child.map_err(io)?;
                    let name = child.file_name();
                    stack.push((child.path(), join(&path, name.as_bytes())));
                }
                Kind::Dir
            } else if ft.is_file() {
                let mut hasher = sha2::Sha256::new();
                let mut f = std::fs::File::open(&disk).map_err(io)?;
                std::io::copy(&mut f, &mut hasher).map_err(io)?;
                Kind::Reg(hasher.finalize().into())
            } else if ft.is_symlink() {
                Kind::Symlink(
                    std::fs::read_link(&disk)
                        .map_err(io)?
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else if ft.is_char_device() {
                Kind::Char(md.rdev())
            } else if ft.is_block_device() {
                Kind::Block(md.rdev())
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            let mut xattrs = BTreeMap::new();
            for name in xattr::list(&disk).map_err(io)? {
                if let Some(v) = xattr::get(&disk, &name).map_err(io)? {
                    xattrs.insert(name.as_bytes().to_vec(), v);
                }
            }
            let next = inodes.len() as u64;
            let inode = if matches!(kind, Kind::Reg(_)) {
                *inodes.entry((md.dev(), md.ino())).or_insert(next)
            } else {
                tree.fresh_inode() + (1 << 62)
            };
            let size = if matches!(kind, Kind::Reg(_)) {
                md.len()
            } else {
                0
            };
            tree.entries.insert(
                path,
                Entry {
                    kind,
                    perm: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime: md.mtime(),
                    mtime_nsec: md.mtime_nsec() as u32,
                    size,
                    xattrs,
                    inode,
                    defined: true,
                },
            );
        }
        Ok(tree)
    }

    /// For each path of a regular file with several names: all its names, sorted.
    pub fn link_sets(&self) -> BTreeMap<Vec<u8>, Vec<Vec<u8>>> {
        let mut by_inode: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for (p, e) in &self.entries {
            if matches!(e.kind, Kind::Reg(_)) {
                by_inode.entry(e.inode).or_default().push(p.clone());
            }
        }
        let mut out = BTreeMap::new();
        for names in by_inode.into_values().filter(|n| n.len() > 1) {
            for n in &names {
                out.insert(n.clone(), names.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, what) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_mtime(5);
            h.set_uid(0);
            h.set_gid(0);
            if *what == "dir" {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, &[][..]).unwrap();
            } else if let Some(t) = what.strip_prefix("link:") {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, path, t).unwrap();
            } else if let Some(t) = what.strip_prefix("sym:") {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, t).unwrap();
            } else {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(what.len() as u64);
                b.append_data(&mut h, path, what.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn paths(t: &FlatTree) -> Vec<String> {
        t.entries
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let mut t = FlatTree::default();
        t.apply_tar(
            &layer(&[
                ("a", "dir"),
                ("a/x", "1"),
                ("b", "2"),
                ("c", "dir"),
                ("c/y", "3"),
            ])[..],
        )
        .unwrap();
        t.apply_tar(
            &layer(&[
                ("a/.wh..wh..opq", ""),
                ("a/new", "4"),
                (".wh.b", ""),
                ("b", "5"),
                ("c", "6"),
            ])[..],
        )
        .unwrap();
        assert_eq!(paths(&t), ["/", "/a", "/a/new", "/b", "/c"]);
        assert!(matches!(t.entries[&b"/c".to_vec()].kind, Kind::Reg(_)));
    }

    #[test]
    fn hard_links_share_an_inode_until_one_name_is_replaced() {
        let mut t = FlatTree::default();
        t.apply_tar(&layer(&[("f", "x"), ("g", "link:f"), ("h", "link:f")])[..])
            .unwrap();
        assert_eq!(t.link_sets()[&b"/g".to_vec()].len(), 3);
        t.apply_tar(&layer(&[("h", "other")])[..]).unwrap();
        assert_eq!(
            t.link_sets()[&b"/f".to_vec()],
            [b"/f".to_vec(), b"/g".to_vec()]
        );
    }

    #[test]
    fn parents_only_implied_are_undefined_and_dotdot_is_refused() {
        let mut t = FlatTree::default();
        t.apply_tar(&layer(&[("d/e/f", "x")])[..]).unwrap();
        assert!(!t.entries[&b"/d/e".to_vec()].defined);
        assert!(t.entries[&b"/d/e/f".to_vec()].defined);
        assert_eq!(normalize(b"./a//b/").unwrap(), b"/a/b");
        assert!(normalize(b"a/../../b").is_err());
    }

    fn usr_merged() -> FlatTree {
        let mut t = FlatTree::default();
        t.apply_tar(
            &layer(&[
                ("usr", "dir"),
                ("usr/lib", "dir"),
                ("usr/lib/libc.so.6", "libc"),
                ("usr/lib/libm.so.6", "libm"),
                ("lib", "sym:usr/lib"),
                ("abs", "sym:/usr/lib"),
                ("up", "sym:../../usr/lib"),
                ("chain", "sym:abs"),
                ("l1", "sym:l2/x"),
                ("l2", "sym:l1"),
                ("file", "f"),
            ])[..],
        )
        .unwrap();
        t
    }

    #[test]
    fn parents_resolve_through_symlinks_inside_the_root() {
        let mut t = usr_merged();
        t.apply_tar(
            &layer(&[
                ("lib/new", "n"),
                ("abs/a", "a"),
                ("up/u", "u"),
                ("chain/c", "c"),
                ("lib/.wh.libm.so.6", ""),
                ("d0/.wh.d1/x", "x"),
            ])[..],
        )
        .unwrap();
        let p = paths(&t);
        for want in [
            "/lib",
            "/usr/lib/new",
            "/usr/lib/a",
            "/usr/lib/u",
            "/usr/lib/c",
            "/usr/lib/libc.so.6",
            "/d0/.wh.d1/x",
        ] {
            assert!(p.contains(&want.to_string()), "{want}: {p:?}");
        }
        assert!(!p.contains(&"/usr/lib/libm.so.6".to_string()), "{p:?}");
        assert!(matches!(
            t.entries[&b"/lib".to_vec()].kind,
            Kind::Symlink(_)
        ));
    }

    #[test]
    fn a_directory_header_replaces_a_symlink_and_its_whiteouts_delete_nothing_lower() {
        let mut t = usr_merged();
        t.apply_tar(&layer(&[("lib", "dir"), ("lib/.wh.libc.so.6", "")])[..])
            .unwrap();
        assert_eq!(t.entries[&b"/lib".to_vec()].kind, Kind::Dir);
        assert!(t.entries.contains_key(b"/usr/lib/libc.so.6".as_slice()));
    }

    #[test]
    fn loops_and_files_in_the_way_are_errors() {
        let mut t = usr_merged();
        let e = t.apply_tar(&layer(&[("l1/y", "y")])[..]).unwrap_err();
        assert!(e.to_string().contains("l1/y"), "{e}");
        let mut t = usr_merged();
        let e = t.apply_tar(&layer(&[("file/y", "y")])[..]).unwrap_err();
        assert!(format!("{e:?}").contains("not a directory"), "{e:?}");
    }

    #[test]
    fn check_rejects_a_tree_where_a_lower_symlink_became_a_directory() {
        // What the converter made before resolving parents through symlinks: `lib`
        // replaced by a directory holding only the new file.
        let mut expected = usr_merged();
        expected.apply_tar(&layer(&[("lib/new", "n")])[..]).unwrap();
        let mut old_output = usr_merged();
        old_output
            .apply_tar(&layer(&[("lib", "dir"), ("lib/new", "n")])[..])
            .unwrap();
        let diffs = super::super::check::compare(&expected, &old_output);
        assert!(
            diffs
                .iter()
                .any(|d| d.starts_with("/lib: type: source symlink")),
            "{diffs:?}"
        );
        assert!(
            diffs.iter().any(|d| d.starts_with("/usr/lib/new: missing")),
            "{diffs:?}"
        );
    }

    #[test]
    fn an_opaque_marker_at_the_root_or_through_a_symlink_to_it_keeps_the_root() {
        let mut t = usr_merged();
        t.apply_tar(&layer(&[("up2", "sym:/")])[..]).unwrap();
        t.apply_tar(&layer(&[("up2/.wh..wh..opq", ""), ("kept", "k")])[..])
            .unwrap();
        assert_eq!(paths(&t), ["/", "/kept"]);
        let mut t = usr_merged();
        t.apply_tar(&layer(&[(".wh..wh..opq", "")])[..]).unwrap();
        assert_eq!(paths(&t), ["/"]);
    }
}
