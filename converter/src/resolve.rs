//! Paths resolved inside the root, the way containerd's layer applier resolves them.
//!
//! containerd applies a layer entry `a/b/name` by resolving its parent `a/b` through the
//! symlinks already in the tree (`fs.RootPath`): absolute targets start again at the
//! root, `..` stops at the root, components that do not exist are taken as names, and
//! more than [`MAX_SYMLINKS`] links is an error. Missing directories on the resolved path
//! are then created (`mkparent`); a component that exists and is not a directory is an
//! error (`ENOTDIR`). The last component of the entry itself is never resolved: an entry
//! replaces a symlink at its own path.
//!
//! The layer build ([`crate::source::tar`]) resolves with this against the layer's own
//! tree, and the merge ([`crate::merge`]) against the layers below. A layer build for
//! merging cannot know the lower layers, so the directories it has to create because an
//! entry implies them are marked with [`IMPLIED_DIR_XATTR`]; the merge resolves marked
//! directories through the lower layers' symlinks and keeps the lower attributes, and
//! never writes the mark into its output.

use rafs::write::{Metadata, Node, NodeId, NodeKind, Tree};
use std::collections::VecDeque;

/// Symlinks followed while resolving one path before giving up (containerd's limit).
pub const MAX_SYMLINKS: u32 = 255;

/// Marks a directory that a per-layer bootstrap holds only because a deeper entry
/// implies it (no tar header of its own; also the root when there is no `./` entry).
/// Written only by builds for merging (`--whiteout-spec none`), stripped from every tar
/// entry read, and never written by a merge.
pub const IMPLIED_DIR_XATTR: &[u8] = b"trusted.rafs.implied";

/// Puts the [`IMPLIED_DIR_XATTR`] mark on a directory node.
pub fn mark_implied(node: &mut Node) {
    node.xattrs.insert(IMPLIED_DIR_XATTR.to_vec(), Vec::new());
}

/// Why a path could not be resolved or created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// More than [`MAX_SYMLINKS`] symlinks (a loop), while resolving the path shown.
    TooManyLinks(String),
    /// A component on the resolved path exists and is not a directory.
    NotADirectory(String),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::TooManyLinks(p) => write!(
                f,
                "too many levels of symbolic links (more than {MAX_SYMLINKS}) resolving '{p}'"
            ),
            ResolveError::NotADirectory(p) => {
                write!(f, "'{p}' is in the way of a directory and is not one")
            }
        }
    }
}

/// Shows components as an absolute path.
pub fn show(comps: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for c in comps {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

/// Resolves `path` (components from the root) in `tree`, following every symlink on it,
/// the last component included, inside the root. Returns the resolved components and
/// the node at them, if there is one.
pub fn resolve(
    tree: &Tree,
    path: &[Vec<u8>],
) -> Result<(Vec<Vec<u8>>, Option<NodeId>), ResolveError> {
    let mut todo: VecDeque<Vec<u8>> = path.iter().cloned().collect();
    // The resolved prefix and, for each of its components, the node there (None once
    // a component does not exist).
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut nodes: Vec<Option<NodeId>> = Vec::new();
    let mut links = 0u32;
    while let Some(c) = todo.pop_front() {
        if c.is_empty() || c == b"." {
            continue;
        }
        if c == b".." {
            done.pop();
            nodes.pop();
            continue;
        }
        let parent = nodes.last().copied().unwrap_or(Some(tree.root()));
        let node = parent.and_then(|p| tree.lookup(p, &c));
        if let Some(NodeKind::Symlink(target)) = node.map(|n| &tree.node(n).kind) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(ResolveError::TooManyLinks(show(path)));
            }
            if target.starts_with(b"/") {
                done.clear();
                nodes.clear();
            }
            // The target is cleaned lexically against the resolved prefix, then
            // walked again. containerd joins `..` with the text of the link that led
            // here instead; the two differ only when a target's `..` climbs out of a
            // prefix that itself came through a symlink.
            let mut cleaned: Vec<Vec<u8>> = Vec::new();
            for t in target.split(|b| *b == b'/') {
                match t {
                    b"" | b"." => {}
                    b".." => {
                        if cleaned.pop().is_none() {
                            done.pop();
                            nodes.pop();
                        }
                    }
                    t => cleaned.push(t.to_vec()),
                }
            }
            for t in cleaned.into_iter().rev() {
                todo.push_front(t);
            }
            continue;
        }
        done.push(c);
        nodes.push(node);
    }
    let node = match nodes.last() {
        Some(n) => *n,
        None => Some(tree.root()),
    };
    Ok((done, node))
}

/// The directory at the resolved `path` (as [`resolve`] returns it), creating missing
/// directories as `make` says, given the attributes of the directory they are made in.
/// A component that exists and is not a directory is an error.
pub fn make_dirs(
    tree: &mut Tree,
    path: &[Vec<u8>],
    mut make: impl FnMut(&Metadata) -> Node,
) -> Result<NodeId, ResolveError> {
    let mut cur = tree.root();
    for (i, c) in path.iter().enumerate() {
        cur = match tree.lookup(cur, c) {
            Some(n) if tree.node(n).is_dir() => n,
            Some(_) => return Err(ResolveError::NotADirectory(show(&path[..=i]))),
            None => {
                let node = make(&tree.node(cur).meta);
                tree.insert(cur, c, node)
                    .map_err(|_| ResolveError::NotADirectory(show(&path[..=i])))?
            }
        };
    }
    Ok(cur)
}

/// The set-group-ID bit of a directory's mode.
const S_ISGID: u32 = 0o2000;

/// The attributes of a directory that only an entry implies and that no lower layer
/// has: what `mkdir(path, 0755)` by root under umask 022 gives in the directory
/// `parent`, as containerd's applier makes it: mode 0755, owner 0:0 — or, in a
/// set-group-ID directory, that directory's group and the set-group-ID bit, as the
/// kernel gives every new directory there — no xattrs, and the modification time of
/// the entry that implied it (`entry`; containerd's is the time of the extraction).
pub fn implied_dir(parent: &Metadata, entry: &Metadata) -> Node {
    let setgid = parent.perm & S_ISGID != 0;
    Node::directory(Metadata {
        perm: 0o755 | if setgid { S_ISGID } else { 0 },
        uid: 0,
        gid: if setgid { parent.gid } else { 0 },
        mtime: entry.mtime,
        mtime_nsec: entry.mtime_nsec,
        rdev: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Components of a slash-separated path (empty parts and `.` dropped).
    fn split(path: &[u8]) -> Vec<Vec<u8>> {
        path.split(|b| *b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .map(|c| c.to_vec())
            .collect()
    }

    fn tree(entries: &[(&str, Option<&str>)]) -> Tree {
        let mut t = Tree::new(Metadata::default());
        for (path, link) in entries {
            let comps = split(path.as_bytes());
            let (last, parents) = comps.split_last().unwrap();
            let dir = make_dirs(&mut t, parents, |_| Node::directory(Metadata::default())).unwrap();
            let node = match link {
                Some(l) => Node::new(
                    NodeKind::Symlink(l.as_bytes().to_vec()),
                    Metadata::default(),
                ),
                None if path.ends_with('/') => Node::directory(Metadata::default()),
                None => Node::new(NodeKind::Fifo, Metadata::default()),
            };
            t.insert(dir, last, node).unwrap();
        }
        t
    }

    fn at(t: &Tree, path: &str) -> String {
        show(&resolve(t, &split(path.as_bytes())).unwrap().0)
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let t = tree(&[
            ("usr/lib/", None),
            ("lib", Some("usr/lib")),
            ("abs", Some("/usr/lib")),
            ("up", Some("../../../usr")),
            ("chain", Some("lib")),
            ("usr/lib/back", Some("../../etc")),
            ("dangling", Some("nowhere/deep")),
            ("file", None),
        ]);
        assert_eq!(at(&t, "lib"), "/usr/lib");
        assert_eq!(at(&t, "lib/x/y"), "/usr/lib/x/y");
        assert_eq!(at(&t, "abs/x"), "/usr/lib/x");
        assert_eq!(at(&t, "up/lib"), "/usr/lib");
        assert_eq!(at(&t, "chain/x"), "/usr/lib/x");
        assert_eq!(at(&t, "lib/back/x"), "/etc/x");
        assert_eq!(at(&t, "dangling/x"), "/nowhere/deep/x");
        assert_eq!(at(&t, "file/x"), "/file/x");
        assert_eq!(at(&t, ""), "/");
    }

    #[test]
    fn loops_are_an_error_naming_the_path() {
        let t = tree(&[("a", Some("b")), ("b", Some("a/x"))]);
        let e = resolve(&t, &split(b"a/y")).unwrap_err();
        assert_eq!(e, ResolveError::TooManyLinks("/a/y".into()));
        assert!(e.to_string().contains("'/a/y'"), "{e}");
    }

    #[test]
    fn make_dirs_refuses_a_file_in_the_way() {
        let mut t = tree(&[("file", None)]);
        let e = make_dirs(&mut t, &split(b"file/x"), |_| {
            Node::directory(Metadata::default())
        })
        .unwrap_err();
        assert_eq!(e, ResolveError::NotADirectory("/file".into()));
        let d = make_dirs(&mut t, &split(b"new/deeper"), |_| {
            Node::directory(Metadata::default())
        })
        .unwrap();
        assert_eq!(t.lookup_path(b"/new/deeper").unwrap(), Some(d));
    }

    #[test]
    fn implied_directories_inherit_a_set_group_id_parent_s_group() {
        let entry = Metadata {
            mtime: 9,
            ..Default::default()
        };
        let plain = implied_dir(&Metadata::default(), &entry).meta;
        assert_eq!(
            (plain.perm, plain.uid, plain.gid, plain.mtime),
            (0o755, 0, 0, 9)
        );
        let sgid = Metadata {
            perm: 0o2750,
            uid: 7,
            gid: 8,
            ..Default::default()
        };
        let inherited = implied_dir(&sgid, &entry).meta;
        assert_eq!(
            (inherited.perm, inherited.uid, inherited.gid),
            (0o2755, 0, 8)
        );
    }
}
