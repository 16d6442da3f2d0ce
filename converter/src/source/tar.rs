//! An OCI layer tar source, streamed in one pass: entries become tree nodes in archive
//! order and regular file contents go straight from the (decompressed) stream into the
//! blob writer.
//!
//! Accepted: ustar, GNU (long names and link names) and PAX headers (long paths, `mtime`
//! with nanoseconds, `uid`/`gid`, `SCHILY.xattr.*`), regular files, directories,
//! symlinks, hard links to earlier entries, character and block devices and FIFOs.
//! A later entry for the same path replaces the earlier one (a directory entry for an
//! existing directory only updates its attributes). Absolute paths are taken from the
//! root, as containerd does.
//!
//! Each entry's parent path is resolved through the symlinks the archive made before it,
//! inside the root, as containerd's applier does ([`crate::resolve`]): `lib/x` after
//! `lib -> usr/lib` is `usr/lib/x`, and the symlink stays. Missing parent directories are
//! created with mode 0755, owner 0:0 and the modification time of the entry that implies
//! them (the root, without a `./` entry: mode 0755, owner 0:0, time 0). A build for
//! merging (`--whiteout-spec none`) marks them with [`IMPLIED_DIR_XATTR`] so that the
//! merge resolves them through the lower layers' symlinks and keeps the lower
//! attributes; an entry's own [`IMPLIED_DIR_XATTR`] is dropped. Only the last component
//! of a path is a whiteout: `d/.wh.x/f` without a header for `d/.wh.x/` is a file in a
//! directory named `.wh.x`.
//!
//! Rejected with an error naming the entry: `..` components, parents that are not
//! directories or that loop through symlinks, hard links to paths that are not earlier
//! in the archive, names over 255 bytes, symlink targets over
//! [`rafs::format::SYMLINK_MAX`] bytes, sparse files, xattrs RAFS cannot store, and any
//! malformed header or truncated stream.

use super::{check_xattr, makedev, Progress};
use crate::error::{Error, Result};
use crate::resolve::{self, implied_dir, mark_implied, IMPLIED_DIR_XATTR};
use crate::whiteout::WhiteoutSpec;
use flate2::read::MultiGzDecoder;
use rafs::write::{validate_name, ChunkSink, FileData, Metadata, Node, NodeId, NodeKind, Tree};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use tar::EntryType;

/// How a layer file is compressed, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl LayerCompression {
    /// Detects the compression from the magic bytes at the start of the file.
    pub fn detect(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            LayerCompression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            LayerCompression::Zstd
        } else {
            LayerCompression::None
        }
    }
}

/// Opens a layer file and returns a reader of the decompressed tar stream.
pub fn open_layer(path: &Path) -> Result<(Box<dyn Read>, LayerCompression)> {
    let file = File::open(path).map_err(|e| Error::source(path, e))?;
    if !file
        .metadata()
        .map_err(|e| Error::source(path, e))?
        .is_file()
    {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            reason: "a tar source must be a file (use --type dir-rafs for a directory)".into(),
        });
    }
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = reader.fill_buf().map_err(|e| Error::source(path, e))?;
    let compression = LayerCompression::detect(head);
    let stream: Box<dyn Read> = match compression {
        LayerCompression::None => Box::new(reader),
        LayerCompression::Gzip => Box::new(MultiGzDecoder::new(reader)),
        LayerCompression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(reader).map_err(|e| Error::source(path, e))?,
        ),
    };
    Ok((stream, compression))
}

/// Checks that the first 512-byte block of an archive is a tar header (or the zero block
/// of an empty archive), so that a file that is not a tar at all gets a clear error.
fn check_first_block(block: &[u8]) -> std::result::Result<(), String> {
    const HINT: &str = "not a tar archive (expected a tar, tar.gz or tar.zst file)";
    if block.iter().all(|b| *b == 0) {
        return Ok(());
    }
    if block.len() < 512 {
        return Err(format!("{HINT}: only {} bytes", block.len()));
    }
    let field = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|f| f.trim_matches(|c| c == ' ' || c == '\0'));
    let stored = field.and_then(|f| u32::from_str_radix(f, 8).ok());
    let unsigned: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u32
            }
        })
        .sum();
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as i8 as i64
            }
        })
        .sum();
    match stored {
        Some(s) if s == unsigned || s as i64 == signed => Ok(()),
        _ => Err(format!(
            "{HINT}: the first header's checksum does not match"
        )),
    }
}

/// The `tar` crate quotes raw header bytes in some messages; keep them printable and short.
fn tidy(e: io::Error) -> io::Error {
    let msg = e.to_string();
    let clean = msg.chars().all(|c| !c.is_control() && c != '\u{fffd}');
    if clean && msg.len() <= 200 {
        return e;
    }
    let mut text: String = msg
        .chars()
        .map(|c| {
            if c.is_control() || c == '\u{fffd}' {
                '?'
            } else {
                c
            }
        })
        .take(200)
        .collect();
    if msg.chars().count() > 200 {
        text.push_str("...");
    }
    io::Error::new(e.kind(), text)
}

/// Reads a tar stream into a tree, writing regular file contents through `sink`.
pub fn read_tar(
    mut reader: impl Read,
    whiteout: WhiteoutSpec,
    sink: &mut ChunkSink,
) -> Result<Tree> {
    let stream_error = |what: &str, source: io::Error| Error::TarStream {
        what: what.to_string(),
        source: tidy(source),
    };
    let mut first = Vec::with_capacity(512);
    (&mut reader)
        .take(512)
        .read_to_end(&mut first)
        .map_err(|e| stream_error("at its first entry", e))?;
    check_first_block(&first).map_err(|msg| {
        stream_error(
            "at its first entry",
            io::Error::new(io::ErrorKind::InvalidData, msg),
        )
    })?;
    let mut archive = tar::Archive::new(io::Cursor::new(first).chain(reader));
    let mut builder = TarTree {
        tree: Tree::new(Metadata {
            perm: 0o755,
            ..Default::default()
        }),
        whiteout,
        progress: Progress::default(),
    };
    if builder.marks_implied() {
        let root = builder.tree.root();
        mark_implied(builder.tree.node_mut(root));
    }
    let mut previous: Option<String> = None;
    let where_ = |previous: &Option<String>| match previous {
        Some(p) => format!("after entry '{p}'"),
        None => "at its first entry".to_string(),
    };
    let entries = archive
        .entries()
        .map_err(|e| stream_error(&where_(&previous), e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| stream_error(&where_(&previous), e))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        builder.add(&mut entry, &name, sink)?;
        previous = Some(name);
    }
    Ok(builder.tree)
}

struct TarTree {
    tree: Tree,
    whiteout: WhiteoutSpec,
    progress: Progress,
}

/// Splits an archive path into components, from the root also when it is absolute;
/// rejects `..` and bad names.
fn components(path: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path has a '..' component".into()),
            _ => {
                validate_name(part).map_err(|e| e.to_string())?;
                out.push(part);
            }
        }
    }
    Ok(out)
}

/// Parses a PAX time (`secs[.frac]`, possibly negative) into clamped seconds and nanos.
fn parse_pax_time(v: &str) -> Option<(u64, u32)> {
    let (secs, frac) = match v.split_once('.') {
        Some((s, f)) => (s, f),
        None => (v, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if secs < 0 || v.starts_with('-') {
        return Some((0, 0));
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Some((secs as u64, digits.parse().ok()?))
}

impl TarTree {
    fn add<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        sink: &mut ChunkSink,
    ) -> Result<()> {
        let bad = |reason: String| Error::TarEntry {
            entry: name.to_string(),
            reason,
        };
        let path = entry.path_bytes().into_owned();
        let comps = components(&path).map_err(bad)?;
        let header = entry.header();
        let ty = header.entry_type();
        match ty {
            // PAX global headers carry defaults we do not need.
            EntryType::XGlobalHeader => return Ok(()),
            EntryType::GNUSparse => return Err(bad("sparse files are not supported".into())),
            _ => {}
        }
        let field = |what: &str, e: std::io::Error| bad(format!("bad {what} field: {e}"));
        let id32 = |what: &str, v: u64| {
            u32::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit in 32 bits")))
        };
        let mut meta = Metadata {
            perm: header.mode().map_err(|e| field("mode", e))? & 0o7777,
            uid: id32("uid", header.uid().map_err(|e| field("uid", e))?)?,
            gid: id32("gid", header.gid().map_err(|e| field("gid", e))?)?,
            mtime: header.mtime().map_err(|e| field("mtime", e))?,
            mtime_nsec: 0,
            rdev: 0,
        };
        if matches!(ty, EntryType::Char | EntryType::Block) {
            let major = header
                .device_major()
                .map_err(|e| field("device major", e))?;
            let minor = header
                .device_minor()
                .map_err(|e| field("device minor", e))?;
            meta.rdev = makedev(major.unwrap_or(0), minor.unwrap_or(0));
        }
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| bad(format!("bad PAX header: {e}")))?
        {
            for ext in pax {
                let ext = ext.map_err(|e| bad(format!("bad PAX record: {e}")))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let text = || {
                    std::str::from_utf8(value).map_err(|_| {
                        bad(format!("PAX {} is not text", String::from_utf8_lossy(key)))
                    })
                };
                if let Some(xname) = key.strip_prefix(b"SCHILY.xattr.") {
                    check_xattr(xname, value).map_err(bad)?;
                    xattrs.insert(xname.to_vec(), value.to_vec());
                } else if key == b"mtime" {
                    let v = text()?;
                    (meta.mtime, meta.mtime_nsec) =
                        parse_pax_time(v).ok_or_else(|| bad(format!("bad PAX mtime '{v}'")))?;
                } else if key == b"uid" || key == b"gid" {
                    let v = text()?;
                    let id: u32 = v.parse().map_err(|_| {
                        bad(format!("bad PAX {} '{v}'", String::from_utf8_lossy(key)))
                    })?;
                    if key == b"uid" {
                        meta.uid = id;
                    } else {
                        meta.gid = id;
                    }
                }
            }
        }
        self.whiteout.strip_xattrs(&mut xattrs);
        xattrs.remove(IMPLIED_DIR_XATTR);

        let kind = match ty {
            EntryType::Regular | EntryType::Continuous => NodeKind::Regular(FileData::default()),
            EntryType::Directory => NodeKind::Directory(BTreeMap::new()),
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("symlink without a target".into()))?;
                if target.is_empty() {
                    return Err(bad("symlink with an empty target".into()));
                }
                NodeKind::Symlink(target.into_owned())
            }
            EntryType::Char => NodeKind::CharDevice,
            EntryType::Block => NodeKind::BlockDevice,
            EntryType::Fifo => NodeKind::Fifo,
            EntryType::Link => return self.add_hard_link(entry, &comps, meta, name),
            other => {
                return Err(bad(format!(
                    "unsupported entry type '{}'",
                    (other.as_byte() as char).escape_default()
                )))
            }
        };
        let mut node = Node::new(kind, meta);
        node.xattrs = xattrs;

        let Some((last, parents)) = comps.split_last() else {
            // The entry names the root ("./").
            if !node.is_dir() {
                return Err(bad("names the root directory but is not a directory".into()));
            }
            let root = self.tree.root();
            let r = self.tree.node_mut(root);
            r.meta = node.meta;
            r.xattrs = node.xattrs;
            return Ok(());
        };
        // Parents are made before a whiteout is dropped, as containerd does. Only the
        // last component is a whiteout: a file below a directory `.wh.x` is a file.
        let parent = self.parent_dir(parents, &node.meta).map_err(bad)?;
        if self.whiteout.drops(last, &node) {
            return Ok(());
        }
        if let NodeKind::Regular(data) = &mut node.kind {
            let size = entry.size();
            data.size = size;
            data.chunks =
                sink.add_file(entry, size, name)
                    .map_err(|source| Error::TarEntryData {
                        entry: name.to_string(),
                        source,
                    })?;
            self.progress.file(size);
        }
        match self.tree.lookup(parent, last) {
            Some(old) if node.is_dir() && self.tree.node(old).is_dir() => {
                let o = self.tree.node_mut(old);
                o.meta = node.meta;
                o.xattrs = node.xattrs;
            }
            _ => {
                self.tree
                    .insert(parent, last, node)
                    .map_err(|source| Error::TarEntryData {
                        entry: name.to_string(),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Whether implied directories get [`IMPLIED_DIR_XATTR`] (builds for merging).
    fn marks_implied(&self) -> bool {
        self.whiteout == WhiteoutSpec::None
    }

    /// The directory at `parents` resolved through the archive's symlinks inside the
    /// root, creating missing ones as implied directories (with `entry_meta`'s time).
    fn parent_dir(
        &mut self,
        parents: &[&[u8]],
        entry_meta: &Metadata,
    ) -> std::result::Result<NodeId, String> {
        let path: Vec<Vec<u8>> = parents.iter().map(|p| p.to_vec()).collect();
        let (resolved, node) = resolve::resolve(&self.tree, &path).map_err(|e| e.to_string())?;
        if let Some(n) = node.filter(|n| self.tree.node(*n).is_dir()) {
            return Ok(n);
        }
        let mark = self.marks_implied();
        let dir = resolve::make_dirs(&mut self.tree, &resolved, |parent| {
            let mut node = implied_dir(parent, entry_meta);
            if mark {
                mark_implied(&mut node);
            }
            node
        })
        .map_err(|e| e.to_string())?;
        Ok(dir)
    }

    fn add_hard_link<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        comps: &[&[u8]],
        meta: Metadata,
        name: &str,
    ) -> Result<()> {
        let bad = |reason: String| Error::TarEntry {
            entry: name.to_string(),
            reason,
        };
        let target_raw = entry
            .link_name_bytes()
            .ok_or_else(|| bad("hard link without a target".into()))?;
        let shown = String::from_utf8_lossy(&target_raw).into_owned();
        let target_comps =
            components(&target_raw).map_err(|r| bad(format!("hard link target '{shown}': {r}")))?;
        // The target's parent is resolved through symlinks, as containerd does.
        let target = match target_comps.split_last() {
            Some((base, dirs)) => {
                let dirs: Vec<Vec<u8>> = dirs.iter().map(|d| d.to_vec()).collect();
                let (_, dir) = resolve::resolve(&self.tree, &dirs)
                    .map_err(|e| bad(format!("hard link target '{shown}': {e}")))?;
                dir.and_then(|d| self.tree.lookup(d, base))
            }
            None => None,
        };
        let Some(target) = target else {
            return Err(bad(format!(
                "hard link to '{shown}', which is not an earlier entry of the archive"
            )));
        };
        let Some((last, parents)) = comps.split_last() else {
            return Err(bad("a hard link cannot replace the root directory".into()));
        };
        let target_node = self.tree.node(target).clone();
        if target_node.is_dir() {
            return Err(bad(format!("hard link to directory '{shown}'")));
        }
        let parent = self.parent_dir(parents, &meta).map_err(bad)?;
        if self.whiteout.drops(last, &target_node) {
            return Ok(());
        }
        let data_err = |source| Error::TarEntryData {
            entry: name.to_string(),
            source,
        };
        if matches!(target_node.kind, NodeKind::Regular(_)) {
            self.tree.link(parent, last, target).map_err(data_err)?;
        } else {
            // Only regular files share inodes in RAFS; other types get their own copy.
            self.tree
                .insert(parent, last, target_node)
                .map_err(data_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_keep_nanoseconds_and_clamp_negative() {
        assert_eq!(parse_pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("12.1234567891"), Some((12, 123_456_789)));
        assert_eq!(parse_pax_time("-3.5"), Some((0, 0)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.x"), None);
    }

    #[test]
    fn components_reject_escapes() {
        assert_eq!(
            components(b"/etc/passwd").unwrap(),
            vec![&b"etc"[..], b"passwd"]
        );
        assert!(components(b"a/../../x").unwrap_err().contains(".."));
        assert_eq!(components(b"./a//b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(components(b"").unwrap().is_empty());
        assert!(components(&[b'n'; 256]).unwrap_err().contains("255"));
    }

    #[test]
    fn the_first_block_must_be_a_tar_header() {
        let mut h = tar::Header::new_gnu();
        h.set_path("a").unwrap();
        h.set_size(0);
        h.set_cksum();
        assert!(check_first_block(h.as_bytes()).is_ok());
        assert!(check_first_block(&[0; 512]).is_ok());
        assert!(check_first_block(&[]).is_ok());
        let mut bad = h.as_bytes().to_vec();
        bad[0] = b'b';
        assert!(check_first_block(&bad).unwrap_err().contains("checksum"));
        assert!(check_first_block(b"hello")
            .unwrap_err()
            .contains("only 5 bytes"));
    }

    #[test]
    fn tidy_keeps_messages_printable_and_short() {
        let e = tidy(io::Error::other(format!(
            "bad {}\u{fffd}\x01",
            "x".repeat(300)
        )));
        let s = e.to_string();
        assert!(s.len() < 210 && s.ends_with("..."), "{s}");
        assert!(!s.contains('\u{fffd}'));
    }

    #[test]
    fn compression_is_detected_by_magic() {
        assert_eq!(
            LayerCompression::detect(&[0x1f, 0x8b, 8]),
            LayerCompression::Gzip
        );
        assert_eq!(
            LayerCompression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            LayerCompression::Zstd
        );
        assert_eq!(LayerCompression::detect(b"etc/"), LayerCompression::None);
        assert_eq!(LayerCompression::detect(b""), LayerCompression::None);
    }
}
