//! `nydus-image merge`: stacking per-layer bootstraps (lower → upper) into one bootstrap,
//! applying the OCI overlay rules (spec §14).
//!
//! Each layer is applied to the merged tree in two phases:
//!
//! 1. **Deletions.** `.wh.NAME` removes `NAME` (whatever it is, with everything below it)
//!    from what the lower layers built; `.wh..wh..opq` empties its directory of everything
//!    the lower layers put there.
//! 2. **Additions.** Every other entry, parents before children: a directory that already
//!    exists as a directory keeps its (lower) children and takes the upper attributes; any
//!    other entry replaces what was at its path (a directory replaced by a file loses its
//!    whole subtree; a file replaced by a directory becomes an empty directory first).
//!
//! Hard links are kept within a layer (names sharing a regular-file inode stay one inode);
//! replacing or deleting one name in an upper layer leaves the other names with the lower
//! inode, which is what overlayfs' copy-up does. Whiteout markers never reach the output.
//!
//! The blob table of the result holds the blobs that the merged tree still references, in
//! layer order, renumbered; blob ids normally come from the OCI layer digests
//! (`--blob-digests`).

use crate::error::{Error, Result};
use crate::prefetch;
use crate::resolve::{self, implied_dir, ResolveError, IMPLIED_DIR_XATTR};
use crate::whiteout::{OCI_OPAQUE_MARKER, OCI_WHITEOUT_PREFIX};
use rafs::format::BLOB_ID_LEN;
use rafs::read::{read_inline_bootstrap, tar_sections, Bootstrap, Inode};
use rafs::write::{
    write_bootstrap, BootstrapOptions, ChunkArena, FileData, Metadata, Node, NodeId, NodeKind, Tree,
};
use rafs::{BlobInfo, ChunkInfo, Compressor, Digester};
use serde::Serialize;
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What is known about a layer's own data blob from outside its bootstrap (the OCI
/// layer that carries it). Unset fields keep what the bootstrap says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerBlob {
    /// Blob id: the OCI layer digest without `sha256:` (64 hex digits).
    pub id: Option<String>,
    /// Size of the blob file (the OCI layer size).
    pub size: Option<u64>,
    /// sha256 of the blob's TOC (entries and their tar header).
    pub toc_digest: Option<[u8; 32]>,
    /// Size of the TOC with its tar header.
    pub toc_size: Option<u32>,
}

/// One layer to merge: its bootstrap and what is known about its own blob.
pub struct MergeLayer {
    /// A name for messages (normally the source path).
    pub name: String,
    /// The layer's bootstrap (from a bootstrap file or an inline-meta blob).
    pub bootstrap: Bootstrap,
    /// Overrides for the layer's own blob.
    pub blob: LayerBlob,
}

/// Result of [`merge_layers`].
#[derive(Clone, Debug)]
pub struct Merged {
    /// The merged bootstrap.
    pub bootstrap: Vec<u8>,
    /// Its blob table.
    pub blobs: Vec<BlobInfo>,
    /// Chunk size of the image.
    pub chunk_size: u32,
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk digester.
    pub digester: Digester,
}

/// Whether a blob id is the placeholder an inline-meta build records for its own blob.
fn is_placeholder(id: &str) -> bool {
    id.len() == BLOB_ID_LEN && id.bytes().all(|b| b == b'x')
}

/// Whether `id` is 64 lowercase hex digits.
pub fn is_blob_id(id: &str) -> bool {
    id.len() == BLOB_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The index in the layer's blob table of the layer's own blob: the one with the
/// placeholder id, else the last one (a layered build appends its blob after the
/// blobs it references).
fn own_blob(blobs: &[BlobInfo]) -> Option<usize> {
    blobs
        .iter()
        .position(|b| is_placeholder(&b.id))
        .or(blobs.len().checked_sub(1))
}

fn layer_err(layer: &MergeLayer, source: rafs::Error) -> Error {
    Error::Layer {
        layer: layer.name.clone(),
        source,
    }
}

/// Builds a tree node from an inode of a layer bootstrap. Regular files get their chunk
/// handles from `chunk`.
fn node_of(
    bs: &Bootstrap,
    inode: &Inode,
    mut chunk: impl FnMut(&Inode, u64) -> Result<u32>,
) -> Result<Node> {
    let kind = match inode.file_type() {
        0o040000 => NodeKind::Directory(BTreeMap::new()),
        0o100000 => {
            let n = bs.chunk_count(inode);
            let mut chunks = Vec::with_capacity(n as usize);
            for i in 0..n {
                chunks.push(chunk(inode, i)?);
            }
            NodeKind::Regular(FileData {
                size: inode.size,
                chunks,
            })
        }
        0o120000 => NodeKind::Symlink(bs.readlink(inode)?),
        0o020000 => NodeKind::CharDevice,
        0o060000 => NodeKind::BlockDevice,
        0o010000 => NodeKind::Fifo,
        0o140000 => NodeKind::Socket,
        t => {
            return Err(Error::Inconsistent(format!(
                "unknown file type {t:#o} (inode {})",
                inode.nid
            )))
        }
    };
    let meta = Metadata {
        perm: inode.mode & 0o7777,
        uid: inode.uid,
        gid: inode.gid,
        mtime: inode.mtime,
        mtime_nsec: inode.mtime_nsec,
        rdev: if inode.is_device() { inode.rdev() } else { 0 },
    };
    let mut node = Node::new(kind, meta);
    node.xattrs = bs.xattrs(inode)?.into_iter().collect();
    Ok(node)
}

/// Splits `/a/b/c` into (`/a/b`, `c`).
fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    }
}

/// What a directory of a layer bootstrap is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LayerDir {
    /// It has a tar header of its own (or the bootstrap does not mark implied ones).
    Explicit,
    /// Marked [`IMPLIED_DIR_XATTR`]: only implied by an entry below it.
    Implied,
}

impl LayerDir {
    fn of(xattrs: &[(Vec<u8>, Vec<u8>)]) -> LayerDir {
        if xattrs.iter().any(|(k, _)| k == IMPLIED_DIR_XATTR) {
            LayerDir::Implied
        } else {
            LayerDir::Explicit
        }
    }
}

/// A merged directory and its resolved path.
type Placed = (NodeId, Vec<Vec<u8>>);

/// Where a directory of the layer being applied is in the merged tree.
enum Place {
    /// At this node, whose resolved path is given.
    At(NodeId, Vec<Vec<u8>>),
    /// Wherever this (unresolved) path resolves to, made if missing as an implied
    /// directory with the time of these attributes: a directory the layer only
    /// implies, or one below a whiteout directory.
    Lazy(Vec<Vec<u8>>, Metadata),
}

/// The merged filesystem under construction.
struct Stack {
    tree: Tree,
    /// Chunks with `blob_index` = index into `blob_keys`.
    arena: ChunkArena,
    /// Every blob seen, by final id, in first-seen (layer) order: (id, info).
    blobs: Vec<(String, BlobInfo)>,
    chunk_size: Option<u32>,
    algos: Option<(Compressor, Digester)>,
}

impl Stack {
    /// Registers the layer's blobs; returns the merged index of each.
    fn layer_blobs(&mut self, layer: &MergeLayer) -> Result<Vec<u32>> {
        let bs = &layer.bootstrap;
        let blobs = bs.blobs();
        if !blobs.is_empty() {
            let cs = bs.superblock().chunk_size;
            match self.chunk_size {
                Some(c) if c != cs => {
                    return Err(Error::Inconsistent(format!(
                        "layer {} has chunk size {cs:#x}, lower layers {c:#x}",
                        layer.name
                    )))
                }
                _ => self.chunk_size = Some(cs),
            }
        }
        let own = own_blob(blobs);
        let mut out = Vec::with_capacity(blobs.len());
        for (i, b) in blobs.iter().enumerate() {
            let algos = (b.compressor, b.digester);
            match self.algos {
                Some(a) if a != algos => {
                    return Err(Error::Inconsistent(format!(
                        "layer {} uses {}/{} chunks, lower layers {}/{}",
                        layer.name, algos.0, algos.1, a.0, a.1
                    )))
                }
                _ => self.algos = Some(algos),
            }
            let mut info = b.clone();
            if Some(i) == own {
                let o = &layer.blob;
                if let Some(id) = &o.id {
                    info.id = id.clone();
                }
                if let Some(size) = o.size {
                    info.compressed_size = size;
                }
                if let Some(d) = o.toc_digest {
                    info.toc_digest = d;
                }
                if let Some(s) = o.toc_size {
                    info.toc_size = s;
                }
            }
            if !is_blob_id(&info.id) {
                return Err(Error::Inconsistent(format!(
                    "blob {i} of layer {} has no usable id ('{}'): give the layer's blob \
                     digest (--blob-digests) or merge the blob file itself",
                    layer.name, info.id
                )));
            }
            info.mapped_blkaddr = 0;
            // A merged bootstrap is not inlined in any of its blobs. Upstream loaders
            // replace the id of every `INLINED_FS_META` blob with the bootstrap's file
            // name (spec §13.5), so nydusd 2.2 would fetch blob "image" for
            // `image.boot`; upstream's merge clears the flag for the same reason.
            info.features &= !rafs::format::blob_features::INLINED_FS_META;
            let idx = match self.blobs.iter().position(|(id, _)| *id == info.id) {
                Some(p) => p,
                None => {
                    self.blobs.push((info.id.clone(), info));
                    self.blobs.len() - 1
                }
            };
            out.push(idx as u32);
        }
        Ok(out)
    }

    fn apply(&mut self, layer: &MergeLayer) -> Result<()> {
        let blob_map = self.layer_blobs(layer)?;
        let bs = &layer.bootstrap;
        let mut entries: Vec<(Vec<u8>, Inode)> = Vec::new();
        bs.walk(|path, _, inode| {
            entries.push((path.to_vec(), inode.clone()));
            Ok(())
        })
        .map_err(|e| layer_err(layer, e))?;
        let rafs_err = |e: Error| match e {
            Error::Rafs(e) => layer_err(layer, e),
            e => e,
        };
        let entry_err = |path: &[u8], reason: String| Error::LayerEntry {
            layer: layer.name.clone(),
            path: String::from_utf8_lossy(path).into_owned(),
            reason,
        };
        // What each directory of the layer is: the walk is pre-order, so a directory's
        // kind is known before its children are met.
        let mut dirs: HashMap<Vec<u8>, LayerDir> = HashMap::new();
        let root = bs.root().map_err(|e| layer_err(layer, e))?;
        let root_node =
            node_of(bs, &root, |_, _| unreachable!("the root is a directory")).map_err(rafs_err)?;
        for (path, inode) in &entries {
            if inode.is_dir() {
                let xattrs = bs.xattrs(inode).map_err(|e| layer_err(layer, e))?;
                dirs.insert(path.clone(), LayerDir::of(&xattrs));
            }
        }

        // Phase 1: deletions, of what the lower layers built. Whiteout markers whose
        // parent exists here need nothing made in phase 2 (containerd made their
        // parent before deleting, so a deletion of what led to it cannot bring it back).
        let mut parent_found: HashSet<&[u8]> = HashSet::new();
        for (path, inode) in &entries {
            let (parent, name) = split_parent(path);
            if !name.starts_with(OCI_WHITEOUT_PREFIX)
                || (inode.is_dir() && dirs.get(path) == Some(&LayerDir::Implied))
            {
                continue;
            }
            let Some(dir) = self
                .lower_dir(parent, &dirs)
                .map_err(|e| entry_err(path, e.to_string()))?
            else {
                continue;
            };
            if !inode.is_dir() {
                parent_found.insert(path.as_slice());
            }
            if name == OCI_OPAQUE_MARKER {
                if let NodeKind::Directory(children) = &mut self.tree.node_mut(dir).kind {
                    children.clear();
                }
            } else {
                let target = &name[OCI_WHITEOUT_PREFIX.len()..];
                if !target.is_empty() {
                    self.tree.remove(dir, target);
                }
            }
        }

        // Phase 2: additions, parents first (the walk is pre-order).
        let r = self.tree.root();
        if !root_node.xattrs.contains_key(IMPLIED_DIR_XATTR) {
            self.tree.node_mut(r).meta = root_node.meta;
            self.tree.node_mut(r).xattrs = root_node.xattrs;
        }
        let mut placed: HashMap<Vec<u8>, Place> = HashMap::new();
        placed.insert(Vec::new(), Place::At(r, Vec::new()));
        let mut links: HashMap<u64, NodeId> = HashMap::new();
        let mut chunk_handles: HashMap<(u32, u32), u32> = HashMap::new();
        for (path, inode) in &entries {
            let (parent, name) = split_parent(path);
            if parent_found.contains(path.as_slice()) {
                continue;
            }
            // The parent is made (or found through the lower layers' symlinks) before
            // anything else, whiteouts included, as containerd does.
            let Some((dir, dir_path)) = self
                .materialize(parent, &mut placed)
                .map_err(|e| entry_err(path, e.to_string()))?
            else {
                continue;
            };
            let kind = dirs.get(path.as_slice());
            if name.starts_with(OCI_WHITEOUT_PREFIX) && kind != Some(&LayerDir::Implied) {
                if inode.is_dir() {
                    // Entries below a whiteout directory go into a plain directory of
                    // that name, made only if they need it (containerd's `mkparent`).
                    let mut at = dir_path.clone();
                    at.push(name.to_vec());
                    let meta = node_of(bs, inode, |_, _| unreachable!("a directory"))
                        .map_err(rafs_err)?
                        .meta;
                    placed.insert(path.clone(), Place::Lazy(at, meta));
                }
                continue;
            }
            if inode.is_reg() {
                if let Some(&id) = links.get(&inode.nid) {
                    self.tree.link(dir, name, id)?;
                    continue;
                }
            }
            let arena = &mut self.arena;
            let mut node = node_of(bs, inode, |inode, i| {
                let addr = bs.chunk(inode, i)?;
                let key = (addr.blob_index, addr.ci_index);
                if let Some(h) = chunk_handles.get(&key) {
                    return Ok(*h);
                }
                let info: ChunkInfo = bs.chunk_info(&addr)?.ok_or_else(|| {
                    Error::Inconsistent(format!(
                        "chunk {} of blob {} is missing from the chunk table",
                        addr.ci_index, addr.blob_index
                    ))
                })?;
                let blob_index = *blob_map.get(addr.blob_index as usize).ok_or_else(|| {
                    Error::Inconsistent(format!(
                        "a chunk refers to blob {} of {}",
                        addr.blob_index,
                        blob_map.len()
                    ))
                })?;
                let h = arena.push(ChunkInfo { blob_index, ..info });
                chunk_handles.insert(key, h);
                Ok(h)
            })
            .map_err(|e| match e {
                Error::Rafs(e) => entry_err(path, e.to_string()),
                Error::Inconsistent(reason) => entry_err(path, reason),
                e => e,
            })?;
            node.xattrs.remove(IMPLIED_DIR_XATTR);
            let mut at = dir_path;
            at.push(name.to_vec());
            if kind == Some(&LayerDir::Implied) {
                // Only implied here: the lower directory, wherever the lower layers'
                // symlinks put it, keeps its attributes.
                placed.insert(path.clone(), Place::Lazy(at, node.meta));
                continue;
            }
            match (self.tree.lookup(dir, name), node.is_dir()) {
                (Some(existing), true) if self.tree.node(existing).is_dir() => {
                    let n = self.tree.node_mut(existing);
                    n.meta = node.meta;
                    n.xattrs = node.xattrs;
                    placed.insert(path.clone(), Place::At(existing, at));
                }
                (_, is_dir) => {
                    let id = self
                        .tree
                        .insert(dir, name, node)
                        .map_err(|e| entry_err(path, e.to_string()))?;
                    if inode.is_reg() {
                        links.insert(inode.nid, id);
                    }
                    if is_dir {
                        placed.insert(path.clone(), Place::At(id, at));
                    }
                }
            }
        }
        Ok(())
    }

    /// The merged directory that the layer directory `path` stands for, as the lower
    /// layers left it, for a whiteout below it; `None` when there is nothing lower to
    /// delete there (the layer makes that directory anew, or it does not exist).
    fn lower_dir(
        &self,
        path: &[u8],
        dirs: &HashMap<Vec<u8>, LayerDir>,
    ) -> std::result::Result<Option<NodeId>, ResolveError> {
        let mut cur = self.tree.root();
        let mut cur_path: Vec<Vec<u8>> = Vec::new();
        let mut layer_path: Vec<u8> = Vec::new();
        for c in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            layer_path.push(b'/');
            layer_path.extend_from_slice(c);
            cur_path.push(c.to_vec());
            match dirs.get(&layer_path) {
                Some(LayerDir::Explicit) => match self.tree.lookup(cur, c) {
                    Some(n) if self.tree.node(n).is_dir() => cur = n,
                    _ => return Ok(None),
                },
                _ => {
                    let (resolved, node) = resolve::resolve(&self.tree, &cur_path)?;
                    match node {
                        Some(n) if self.tree.node(n).is_dir() => {
                            cur = n;
                            cur_path = resolved;
                        }
                        _ => return Ok(None),
                    }
                }
            }
        }
        Ok(Some(cur))
    }

    /// The merged directory for the layer directory `path` (and its merged path),
    /// making it if it is implied or below a whiteout; `None` when its entries are
    /// dropped.
    fn materialize(
        &mut self,
        path: &[u8],
        placed: &mut HashMap<Vec<u8>, Place>,
    ) -> std::result::Result<Option<Placed>, ResolveError> {
        let (at, entry) = match placed.get(path) {
            None => return Ok(None),
            Some(Place::At(id, at)) => return Ok(Some((*id, at.clone()))),
            Some(Place::Lazy(at, entry)) => (at.clone(), entry.clone()),
        };
        let (resolved, found) = resolve::resolve(&self.tree, &at)?;
        let id = match found {
            Some(n) if self.tree.node(n).is_dir() => n,
            _ => resolve::make_dirs(&mut self.tree, &resolved, |parent| {
                implied_dir(parent, &entry)
            })?,
        };
        placed.insert(path.to_vec(), Place::At(id, resolved.clone()));
        Ok(Some((id, resolved)))
    }

    /// Renumbers blobs to those still referenced, in first-seen order; returns the tree,
    /// the arena with final blob indexes and the blob table.
    fn finish(mut self) -> (Tree, ChunkArena, Vec<BlobInfo>) {
        let mut seen = vec![false; self.tree.arena_len()];
        let mut files = Vec::new();
        let mut stack = vec![self.tree.root()];
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut seen[id], true) {
                continue;
            }
            match &self.tree.node(id).kind {
                NodeKind::Directory(_) => stack.extend(self.tree.children(id).map(|(_, c)| c)),
                NodeKind::Regular(_) => files.push(id),
                _ => {}
            }
        }
        let mut used = vec![false; self.blobs.len()];
        for &f in &files {
            if let NodeKind::Regular(d) = &self.tree.node(f).kind {
                for h in &d.chunks {
                    used[self.arena.get(*h).blob_index as usize] = true;
                }
            }
        }
        let mut renumber = vec![u32::MAX; self.blobs.len()];
        let mut blobs = Vec::new();
        for (i, (_, info)) in self.blobs.into_iter().enumerate() {
            if used[i] {
                renumber[i] = blobs.len() as u32;
                blobs.push(info);
            }
        }
        let mut arena = ChunkArena::default();
        let mut handles: HashMap<u32, u32> = HashMap::new();
        files.sort_unstable();
        for f in files {
            if let NodeKind::Regular(d) = &mut self.tree.node_mut(f).kind {
                for h in d.chunks.iter_mut() {
                    *h = *handles.entry(*h).or_insert_with(|| {
                        let c = self.arena.get(*h);
                        arena.push(ChunkInfo {
                            blob_index: renumber[c.blob_index as usize],
                            ..*c
                        })
                    });
                }
            }
        }
        (self.tree, arena, blobs)
    }
}

/// Merges `layers` (lowest first) into one bootstrap. `prefetch` holds absolute paths
/// whose nodes go into the prefetch table (patterns naming nothing are ignored).
pub fn merge_layers(layers: &[MergeLayer], prefetch: &[String]) -> Result<Merged> {
    if layers.is_empty() {
        return Err(Error::options("merge needs at least one layer bootstrap"));
    }
    let patterns = prefetch::normalize(prefetch)?;
    let mut stack = Stack {
        tree: Tree::new(Metadata {
            perm: 0o755,
            ..Default::default()
        }),
        arena: ChunkArena::default(),
        blobs: Vec::new(),
        chunk_size: None,
        algos: None,
    };
    for layer in layers {
        stack.apply(layer)?;
    }
    let chunk_size = stack
        .chunk_size
        .unwrap_or(layers[0].bootstrap.superblock().chunk_size);
    let (compressor, digester) = stack.algos.unwrap_or((
        layers[0].bootstrap.superblock().compressor,
        layers[0].bootstrap.superblock().digester,
    ));
    let (tree, arena, blobs) = stack.finish();
    let opts = BootstrapOptions {
        chunk_size,
        compressor,
        digester,
        explicit_uidgid: true,
        prefetch: prefetch::resolve(&tree, &patterns),
    };
    let bootstrap = write_bootstrap(&tree, &arena, &blobs, &opts)?;
    Ok(Merged {
        bootstrap,
        blobs,
        chunk_size,
        compressor,
        digester,
    })
}

/// A layer source opened from a file: a bootstrap, or an inline-meta data blob (whose
/// bootstrap is read from its `image.boot` section and whose id, size and TOC are taken
/// from the file).
pub fn open_layer(path: &Path) -> Result<MergeLayer> {
    open_layer_as(path, None)
}

/// [`open_layer`] of a blob whose id (sha256 hex) the caller knows already, for a
/// file not named by its id: the file is not read again to hash it.
pub fn open_layer_as(path: &Path, id: Option<&str>) -> Result<MergeLayer> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| Error::source(path, e))?;
    let layer_err = |source| Error::Layer {
        layer: name.clone(),
        source,
    };
    let sections = tar_sections(&file).unwrap_or_default();
    if !sections
        .iter()
        .any(|(n, _, _)| n == rafs::format::TOC_NAME_BOOTSTRAP)
    {
        let bootstrap = Bootstrap::open(path).map_err(layer_err)?;
        return Ok(MergeLayer {
            name,
            bootstrap,
            blob: LayerBlob::default(),
        });
    }
    let bytes = read_inline_bootstrap(&file).map_err(layer_err)?;
    let bootstrap = Bootstrap::from_bytes(bytes).map_err(layer_err)?;
    let size = file.metadata().map_err(|e| Error::source(path, e))?.len();
    let mut blob = LayerBlob {
        size: Some(size),
        ..Default::default()
    };
    if let Some((n, off, len)) = sections.first() {
        if n == rafs::format::TOC_NAME_TOC {
            let toc_len = len + rafs::format::TAR_BLOCK_SIZE;
            let toc = rafs::read::read_vec(&file, *off, toc_len, "blob TOC").map_err(layer_err)?;
            blob.toc_digest = Some(rafs::types::sha256(&toc));
            blob.toc_size = Some(toc_len as u32);
        }
    }
    // The id: the file name when it is one (`create -D` names blobs by id), else the
    // sha256 of the file, which is what its OCI layer digest would be.
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    blob.id = Some(if let Some(id) = id {
        id.to_string()
    } else if is_blob_id(file_name) {
        file_name.to_string()
    } else {
        sha256_file(path)?
    });
    Ok(MergeLayer {
        name,
        bootstrap,
        blob,
    })
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::source(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::source(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Options of `nydus-image merge`.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Layer bootstraps or inline-meta blobs, lowest layer first.
    pub sources: Vec<PathBuf>,
    /// Output bootstrap.
    pub bootstrap: PathBuf,
    /// Blob id of each layer's blob (OCI layer digests without `sha256:`), one per source.
    pub blob_digests: Vec<String>,
    /// Size of each layer's blob, one per source.
    pub blob_sizes: Vec<u64>,
    /// TOC digest of each layer's blob (hex), one per source.
    pub blob_toc_digests: Vec<String>,
    /// TOC size of each layer's blob, one per source.
    pub blob_toc_sizes: Vec<u64>,
    /// Prefetch patterns.
    pub prefetch: Vec<String>,
}

/// What [`merge`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct MergeOutput {
    /// The bootstrap written.
    pub bootstrap: PathBuf,
    /// Blob ids of its blob table, in order.
    pub blobs: Vec<String>,
    /// Size of the bootstrap.
    pub bootstrap_size: u64,
}

fn per_source<T: Clone>(flag: &str, values: &[T], n: usize) -> Result<Vec<Option<T>>> {
    if values.is_empty() {
        return Ok(vec![None; n]);
    }
    if values.len() != n {
        return Err(Error::options(format!(
            "{flag} has {} values for {n} sources: give one per source",
            values.len()
        )));
    }
    Ok(values.iter().cloned().map(Some).collect())
}

fn hex32(flag: &str, s: &str) -> Result<[u8; 32]> {
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| Error::options(format!("{flag}: '{s}' is not 64 hex digits")))?;
    Ok(out)
}

/// Runs `nydus-image merge`: reads the sources, merges them and writes the bootstrap
/// (through a temporary file renamed into place).
pub fn merge(opts: &MergeOptions) -> Result<MergeOutput> {
    let n = opts.sources.len();
    let digests = per_source("--blob-digests", &opts.blob_digests, n)?;
    let sizes = per_source("--blob-sizes", &opts.blob_sizes, n)?;
    let toc_digests = per_source("--blob-toc-digests", &opts.blob_toc_digests, n)?;
    let toc_sizes = per_source("--blob-toc-sizes", &opts.blob_toc_sizes, n)?;
    let mut layers = Vec::with_capacity(n);
    for (i, path) in opts.sources.iter().enumerate() {
        let mut layer = open_layer(path)?;
        if let Some(d) = &digests[i] {
            let d = d.strip_prefix("sha256:").unwrap_or(d);
            if !is_blob_id(d) {
                return Err(Error::options(format!(
                    "--blob-digests: '{d}' is not 64 lowercase hex digits"
                )));
            }
            layer.blob.id = Some(d.to_string());
        }
        if let Some(s) = sizes[i] {
            layer.blob.size = Some(s);
        }
        if let Some(d) = &toc_digests[i] {
            layer.blob.toc_digest = Some(hex32("--blob-toc-digests", d)?);
        }
        if let Some(s) = toc_sizes[i] {
            layer.blob.toc_size = Some(u32::try_from(s).map_err(|_| {
                Error::options(format!("--blob-toc-sizes: {s} is too large for a TOC"))
            })?);
        }
        layers.push(layer);
    }
    let merged = merge_layers(&layers, &opts.prefetch)?;
    let out = &opts.bootstrap;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".nydus-merge-")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|source| Error::TempFile {
            dir: dir.to_path_buf(),
            source,
        })?;
    std::io::Write::write_all(&mut tmp, &merged.bootstrap).map_err(|e| Error::output(out, e))?;
    tmp.persist(out).map_err(|e| Error::output(out, e.error))?;
    Ok(MergeOutput {
        bootstrap: out.clone(),
        blobs: merged.blobs.iter().map(|b| b.id.clone()).collect(),
        bootstrap_size: merged.bootstrap.len() as u64,
    })
}
