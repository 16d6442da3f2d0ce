//! A directory source: the tree is read with `lstat` first, file contents are streamed
//! into the blob afterwards in layout order (prefetched files first).

use super::{check_xattr, Progress};
use crate::error::{Error, Result};
use crate::whiteout::WhiteoutSpec;
use rafs::write::{ChunkSink, FileData, Metadata, Node, NodeId, NodeKind, Tree};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A directory read into a [`Tree`] whose regular files have no chunks yet.
#[derive(Debug)]
pub struct DirSource {
    tree: Tree,
    /// Source path of each regular-file node, by node id.
    paths: HashMap<NodeId, PathBuf>,
}

/// Attributes of a node from its `lstat` result.
fn metadata_of(md: &fs::Metadata) -> Metadata {
    let ft = md.file_type();
    let is_dev = ft.is_char_device() || ft.is_block_device();
    let (mtime, mtime_nsec) = if md.mtime() < 0 {
        (0, 0)
    } else {
        (md.mtime() as u64, md.mtime_nsec() as u32)
    };
    Metadata {
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime,
        mtime_nsec,
        rdev: if is_dev { md.rdev() } else { 0 },
    }
}

/// All xattrs of `path` (not following symlinks), checked to be storable.
fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        // The filesystem has no xattrs at all.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(Error::source(path, e)),
    };
    for name in names {
        let value = match xattr::get(path, &name) {
            Ok(Some(v)) => v,
            // Removed between list and get.
            Ok(None) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(Error::source(path, e)),
        };
        let name = name.as_bytes().to_vec();
        check_xattr(&name, &value).map_err(|reason| Error::Unsupported {
            path: path.to_path_buf(),
            reason,
        })?;
        out.insert(name, value);
    }
    Ok(out)
}

impl DirSource {
    /// Reads the tree under `root` (which must be a directory) without following symlinks.
    ///
    /// Entries are visited in name order; regular files sharing a `(dev, ino)` become hard
    /// links of one node. Whiteout markers are dropped as `whiteout` says.
    pub fn scan(root: &Path, whiteout: WhiteoutSpec) -> Result<Self> {
        let md = fs::symlink_metadata(root).map_err(|e| Error::source(root, e))?;
        if !md.is_dir() {
            return Err(Error::Unsupported {
                path: root.to_path_buf(),
                reason: "the source of a dir-rafs build must be a directory \
                         (use --type tar-rafs for a tar file)"
                    .into(),
            });
        }
        let mut tree = Tree::new(metadata_of(&md));
        let mut xattrs = read_xattrs(root)?;
        whiteout.strip_xattrs(&mut xattrs);
        tree.node_mut(tree.root()).xattrs = xattrs;

        let mut src = DirSource {
            tree,
            paths: HashMap::new(),
        };
        let mut inodes: HashMap<(u64, u64), NodeId> = HashMap::new();
        let mut stack = vec![(src.tree.root(), root.to_path_buf())];
        while let Some((dir, dir_path)) = stack.pop() {
            let mut names: Vec<Vec<u8>> = Vec::new();
            let rd = fs::read_dir(&dir_path).map_err(|e| Error::source(&dir_path, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::source(&dir_path, e))?;
                names.push(entry.file_name().as_bytes().to_vec());
            }
            names.sort();
            let mut subdirs = Vec::new();
            for name in names {
                let path = dir_path.join(OsStr::from_bytes(&name));
                if let Some(id) = src.add_entry(dir, &name, &path, whiteout, &mut inodes)? {
                    if src.tree.node(id).is_dir() {
                        subdirs.push((id, path));
                    }
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(src)
    }

    /// Adds one directory entry; returns its node, or `None` if it was dropped.
    fn add_entry(
        &mut self,
        dir: NodeId,
        name: &[u8],
        path: &Path,
        whiteout: WhiteoutSpec,
        inodes: &mut HashMap<(u64, u64), NodeId>,
    ) -> Result<Option<NodeId>> {
        let md = fs::symlink_metadata(path).map_err(|e| Error::source(path, e))?;
        let ft = md.file_type();
        let meta = metadata_of(&md);
        let kind = if ft.is_dir() {
            NodeKind::Directory(BTreeMap::new())
        } else if ft.is_file() {
            NodeKind::Regular(FileData {
                size: md.size(),
                chunks: Vec::new(),
            })
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|e| Error::source(path, e))?;
            NodeKind::Symlink(target.as_os_str().as_bytes().to_vec())
        } else if ft.is_char_device() {
            NodeKind::CharDevice
        } else if ft.is_block_device() {
            NodeKind::BlockDevice
        } else if ft.is_fifo() {
            NodeKind::Fifo
        } else if ft.is_socket() {
            NodeKind::Socket
        } else {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: "unknown file type".into(),
            });
        };
        let mut node = Node::new(kind, meta);
        if whiteout.drops(name, &node) {
            return Ok(None);
        }
        let file_error = |source| Error::File {
            path: path.to_path_buf(),
            source,
        };
        let is_regular = matches!(node.kind, NodeKind::Regular(_));
        if is_regular && md.nlink() > 1 {
            if let Some(&target) = inodes.get(&(md.dev(), md.ino())) {
                self.tree.link(dir, name, target).map_err(file_error)?;
                return Ok(Some(target));
            }
        }
        node.xattrs = read_xattrs(path)?;
        whiteout.strip_xattrs(&mut node.xattrs);
        let id = self.tree.insert(dir, name, node).map_err(file_error)?;
        if is_regular {
            if md.nlink() > 1 {
                inodes.insert((md.dev(), md.ino()), id);
            }
            self.paths.insert(id, path.to_path_buf());
        }
        Ok(Some(id))
    }

    /// The tree read so far.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The tree, with chunks once [`DirSource::write_data`] has run.
    pub fn into_tree(self) -> Tree {
        self.tree
    }

    /// Regular files in the order their data goes into the blob: files under each of
    /// `first` (in that order), then every other file in the bootstrap's pre-order (a
    /// directory, its non-directory children by name, then its subdirectories). Each file
    /// appears once, however many names it has.
    pub fn data_order(&self, first: &[NodeId]) -> Vec<NodeId> {
        let mut seen = vec![false; self.tree.arena_len()];
        let mut out = Vec::new();
        for &start in first {
            self.collect_files(start, &mut seen, &mut out);
        }
        self.collect_files(self.tree.root(), &mut seen, &mut out);
        out
    }

    fn collect_files(&self, start: NodeId, seen: &mut [bool], out: &mut Vec<NodeId>) {
        let mut push = |id: NodeId, out: &mut Vec<NodeId>| {
            if !seen[id] && matches!(self.tree.node(id).kind, NodeKind::Regular(_)) {
                seen[id] = true;
                out.push(id);
            }
        };
        if !self.tree.node(start).is_dir() {
            push(start, out);
            return;
        }
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let mut subdirs = Vec::new();
            for (_, child) in self.tree.children(dir) {
                if self.tree.node(child).is_dir() {
                    subdirs.push(child);
                } else {
                    push(child, out);
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
    }

    /// Streams the contents of the files in `order` (see [`DirSource::data_order`]) into
    /// `sink` and records the chunk handles in the tree.
    pub fn write_data(&mut self, sink: &mut ChunkSink, order: &[NodeId]) -> Result<()> {
        let mut progress = Progress::default();
        for &id in order {
            let Some(path) = self.paths.get(&id) else {
                continue;
            };
            let NodeKind::Regular(data) = &self.tree.node(id).kind else {
                continue;
            };
            let size = data.size;
            let chunks = if size == 0 {
                Vec::new()
            } else {
                let mut file = open_regular(path)?;
                sink.add_file(&mut file, size, &path.display().to_string())
                    .map_err(|source| Error::File {
                        path: path.clone(),
                        source,
                    })?
            };
            if let NodeKind::Regular(data) = &mut self.tree.node_mut(id).kind {
                data.chunks = chunks;
            }
            progress.file(size);
        }
        Ok(())
    }
}

/// Opens a regular file for reading without following a symlink put in its place.
fn open_regular(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::source(path, e))
}
