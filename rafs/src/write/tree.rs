//! The in-memory tree a bootstrap is built from.
//!
//! Nodes live in an arena and are referred to by [`NodeId`]. A directory maps names to
//! node ids; a regular file reachable under several names is a hard link (all names share
//! one inode and one nid). Only regular files may have several names: other node types are
//! rejected by [`Tree::link`], as upstream emits non-regular hard links as separate inodes.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Index of a node in a [`Tree`].
pub type NodeId = usize;

/// Largest file name length accepted by EROFS.
pub const NAME_MAX: usize = 255;

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// Directory; children by raw name bytes.
    Directory(BTreeMap<Vec<u8>, NodeId>),
    /// Regular file.
    Regular(FileData),
    /// Symbolic link with its target.
    Symlink(Vec<u8>),
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

/// Content of a regular file: its size and the chunks that hold it, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileData {
    /// File size in bytes.
    pub size: u64,
    /// Handles into the [`super::ChunkArena`] the file was written through.
    pub chunks: Vec<u32>,
}

/// Inode attributes of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits, including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (negative times are clamped to 0).
    pub mtime: u64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Device number (`makedev(major, minor)`) for device nodes.
    pub rdev: u64,
}

/// One node of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Type and type-specific content.
    pub kind: NodeKind,
    /// Attributes.
    pub meta: Metadata,
    /// Extended attributes by full name (e.g. `security.capability`).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Node {
    /// A node of the given kind and attributes, without xattrs.
    pub fn new(kind: NodeKind, meta: Metadata) -> Self {
        Node {
            kind,
            meta,
            xattrs: BTreeMap::new(),
        }
    }

    /// An empty directory.
    pub fn directory(meta: Metadata) -> Self {
        Self::new(NodeKind::Directory(BTreeMap::new()), meta)
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Directory(_))
    }

    /// The file type bits of `st_mode` (`S_IFDIR`, ...).
    pub fn type_bits(&self) -> u32 {
        match self.kind {
            NodeKind::Directory(_) => 0o040000,
            NodeKind::Regular(_) => 0o100000,
            NodeKind::Symlink(_) => 0o120000,
            NodeKind::CharDevice => 0o020000,
            NodeKind::BlockDevice => 0o060000,
            NodeKind::Fifo => 0o010000,
            NodeKind::Socket => 0o140000,
        }
    }

    /// Full `st_mode`.
    pub fn mode(&self) -> u32 {
        self.type_bits() | (self.meta.perm & 0o7777)
    }
}

/// A filesystem tree; node 0 is the root directory.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

/// Checks that `name` can be a directory entry.
pub fn validate_name(name: &[u8]) -> Result<()> {
    let shown = String::from_utf8_lossy(name);
    if name.is_empty() {
        return Err(Error::Tree("empty file name".into()));
    }
    if name == b"." || name == b".." {
        return Err(Error::Tree(format!(
            "'{shown}' is not allowed as a file name"
        )));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(Error::Tree(format!(
            "file name '{shown}' contains '/' or NUL"
        )));
    }
    if name.len() > NAME_MAX {
        return Err(Error::Tree(format!(
            "file name of {} bytes exceeds {NAME_MAX} bytes: '{shown}'",
            name.len()
        )));
    }
    Ok(())
}

/// Checks that a symlink target can be stored: 1 to [`crate::format::SYMLINK_MAX`]
/// bytes, the limit the reader (and `nydus-image check`) holds images to.
pub fn validate_symlink_target(target: &[u8]) -> Result<()> {
    if target.is_empty() {
        return Err(Error::Tree("symlink with an empty target".into()));
    }
    if target.len() > crate::format::SYMLINK_MAX {
        return Err(Error::Tree(format!(
            "symlink target of {} bytes exceeds {} bytes",
            target.len(),
            crate::format::SYMLINK_MAX
        )));
    }
    Ok(())
}

/// Splits a path into validated components, ignoring leading `/`, empty parts and `.`.
/// `..` is rejected.
pub fn path_components(path: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for part in path.split(|b| *b == b'/') {
        if part.is_empty() || part == b"." {
            continue;
        }
        if part == b".." {
            return Err(Error::Tree(format!(
                "path '{}' contains '..'",
                String::from_utf8_lossy(path)
            )));
        }
        validate_name(part)?;
        out.push(part);
    }
    Ok(out)
}

impl Tree {
    /// A tree holding only a root directory with the given attributes.
    pub fn new(root: Metadata) -> Self {
        Tree {
            nodes: vec![Node::directory(root)],
        }
    }

    /// The root node id (always 0).
    pub fn root(&self) -> NodeId {
        0
    }

    /// A node by id.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// A node by id, mutably.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    /// Number of nodes ever added (including unreachable ones).
    pub fn arena_len(&self) -> usize {
        self.nodes.len()
    }

    /// Children of a directory (empty for other nodes).
    pub fn children(&self, dir: NodeId) -> impl Iterator<Item = (&[u8], NodeId)> {
        let map = match &self.nodes[dir].kind {
            NodeKind::Directory(m) => Some(m),
            _ => None,
        };
        map.into_iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.as_slice(), *v)))
    }

    /// Looks up one name in a directory.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.nodes[dir].kind {
            NodeKind::Directory(m) => m.get(name).copied(),
            _ => None,
        }
    }

    /// Looks up a path from the root.
    pub fn lookup_path(&self, path: &[u8]) -> Result<Option<NodeId>> {
        let mut cur = self.root();
        for part in path_components(path)? {
            match self.lookup(cur, part) {
                Some(n) => cur = n,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    fn dir_map(&mut self, dir: NodeId) -> Result<&mut BTreeMap<Vec<u8>, NodeId>> {
        match &mut self.nodes[dir].kind {
            NodeKind::Directory(m) => Ok(m),
            _ => Err(Error::Tree(format!("node {dir} is not a directory"))),
        }
    }

    /// Adds `node` as `name` in `dir`, replacing any existing entry of that name.
    /// A symlink needs a target of 1 to [`crate::format::SYMLINK_MAX`] bytes.
    pub fn insert(&mut self, dir: NodeId, name: &[u8], node: Node) -> Result<NodeId> {
        validate_name(name)?;
        if let NodeKind::Symlink(target) = &node.kind {
            validate_symlink_target(target)?;
        }
        self.dir_map(dir)?;
        let id = self.nodes.len();
        self.nodes.push(node);
        self.dir_map(dir)?.insert(name.to_vec(), id);
        Ok(id)
    }

    /// Adds another name for the regular file `target` (a hard link).
    pub fn link(&mut self, dir: NodeId, name: &[u8], target: NodeId) -> Result<()> {
        validate_name(name)?;
        if !matches!(self.nodes[target].kind, NodeKind::Regular(_)) {
            return Err(Error::Tree(format!(
                "hard link '{}' must point to a regular file",
                String::from_utf8_lossy(name)
            )));
        }
        self.dir_map(dir)?.insert(name.to_vec(), target);
        Ok(())
    }

    /// Removes `name` from `dir`; returns the removed id if there was one.
    pub fn remove(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &mut self.nodes[dir].kind {
            NodeKind::Directory(m) => m.remove(name),
            _ => None,
        }
    }

    /// Returns the directory at `path`, creating missing directories with `meta`.
    /// A non-directory in the way is replaced by a directory.
    pub fn mkdir_p(&mut self, path: &[u8], meta: &Metadata) -> Result<NodeId> {
        let mut cur = self.root();
        for part in path_components(path)? {
            cur = match self.lookup(cur, part) {
                Some(n) if self.nodes[n].is_dir() => n,
                _ => self.insert(cur, part, Node::directory(meta.clone()))?,
            };
        }
        Ok(cur)
    }
}
