//! `nydus-image inspect -R REQUEST`: one-shot answers about a bootstrap.
//!
//! Requests: `stats`, `blobs`, `prefetch`, `stat PATH`, `ls DIR`. Each returns JSON so that
//! scripts can consume it; the binary prints it pretty.

use crate::error::{Error, Result};
use rafs::format::blob_features as bf;
use rafs::read::{Bootstrap, Inode};
use serde_json::{json, Value};
use std::collections::HashSet;

fn type_name(inode: &Inode) -> &'static str {
    match inode.file_type() {
        0o040000 => "dir",
        0o100000 => "file",
        0o120000 => "symlink",
        0o020000 => "char",
        0o060000 => "block",
        0o010000 => "fifo",
        _ => "socket",
    }
}

fn features(f: u32) -> Vec<&'static str> {
    [
        (bf::ALIGNED, "aligned"),
        (bf::INLINED_FS_META, "inlined-fs-meta"),
        (bf::CHUNK_INFO_V2, "chunk-info-v2"),
        (bf::INLINED_CHUNK_DIGEST, "chunk-digest"),
        (bf::HAS_TAR_HEADER, "tar-header"),
        (bf::HAS_TOC, "toc"),
        (bf::CAP_TAR_TOC, "cap-toc"),
    ]
    .iter()
    .filter(|(b, _)| f & b != 0)
    .map(|(_, n)| *n)
    .collect()
}

fn stat(bs: &Bootstrap, inode: &Inode) -> Result<Value> {
    let mut v = json!({
        "nid": inode.nid,
        "type": type_name(inode),
        "mode": format!("{:o}", inode.mode),
        "nlink": inode.nlink,
        "uid": inode.uid,
        "gid": inode.gid,
        "size": inode.size,
        "mtime": inode.mtime,
        "mtime_nsec": inode.mtime_nsec,
    });
    let xattrs: serde_json::Map<String, Value> = bs
        .xattrs(inode)?
        .into_iter()
        .map(|(k, val)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                Value::String(String::from_utf8_lossy(&val).into_owned()),
            )
        })
        .collect();
    if !xattrs.is_empty() {
        v["xattrs"] = Value::Object(xattrs);
    }
    if inode.is_symlink() {
        v["target"] = String::from_utf8_lossy(&bs.readlink(inode)?)
            .into_owned()
            .into();
    }
    if inode.is_device() {
        v["rdev"] = inode.rdev().into();
    }
    if inode.is_reg() {
        let mut chunks = Vec::new();
        for i in 0..bs.chunk_count(inode) {
            let a = bs.chunk(inode, i)?;
            let mut c = json!({"blob_index": a.blob_index, "ci_index": a.ci_index, "uncompressed_offset": a.uncompressed_offset});
            if let Some(info) = bs.chunk_info(&a)? {
                c["digest"] = hex::encode(info.digest).into();
                c["compressed_offset"] = info.compressed_offset.into();
                c["compressed_size"] = info.compressed_size.into();
                c["uncompressed_size"] = info.uncompressed_size.into();
            }
            chunks.push(c);
        }
        v["chunks"] = chunks.into();
    }
    Ok(v)
}

/// Answers one inspect request.
pub fn inspect(bs: &Bootstrap, request: &str) -> Result<Value> {
    let (cmd, arg) = match request.trim().split_once(char::is_whitespace) {
        Some((c, a)) => (c, a.trim()),
        None => (request.trim(), ""),
    };
    match cmd {
        "stats" => {
            let (mut dirs, mut files, mut symlinks, mut others, mut bytes, mut refs) = (1u64, 0u64, 0u64, 0u64, 0u64, 0u64);
            let mut seen = HashSet::new();
            bs.walk(|_, _, inode| {
                if !seen.insert(inode.nid) {
                    return Ok(());
                }
                match type_name(inode) {
                    "dir" => dirs += 1,
                    "file" => {
                        files += 1;
                        bytes += inode.size;
                        refs += bs.chunk_count(inode);
                    }
                    "symlink" => symlinks += 1,
                    _ => others += 1,
                }
                Ok(())
            })?;
            let sb = bs.superblock();
            Ok(json!({
                "inodes": seen.len() + 1,
                "directories": dirs,
                "files": files,
                "symlinks": symlinks,
                "others": others,
                "file_bytes": bytes,
                "chunk_references": refs,
                "unique_chunks": bs.chunk_table_len(),
                "blobs": bs.blobs().len(),
                "chunk_size": format!("{:#x}", sb.chunk_size),
                "compressor": sb.compressor.to_string(),
                "digester": sb.digester.to_string(),
                "flags": format!("{:#x}", sb.flags),
                "bootstrap_bytes": bs.bytes().len(),
            }))
        }
        "blobs" => Ok(Value::Array(
            bs.blobs()
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    json!({
                        "index": i,
                        "id": b.id,
                        "chunks": b.chunk_count,
                        "compressed_size": b.compressed_size,
                        "uncompressed_size": b.uncompressed_size,
                        "compressor": b.compressor.to_string(),
                        "digester": b.digester.to_string(),
                        "features": features(b.features),
                        "ci_offset": b.ci_offset,
                        "toc_size": b.toc_size,
                    })
                })
                .collect(),
        )),
        "prefetch" => {
            let paths = bs.paths()?;
            let list: Vec<Value> = bs
                .prefetch_table()?
                .into_iter()
                .map(|nid| json!({"nid": nid, "path": paths.get(&nid).map(|p| String::from_utf8_lossy(p).into_owned())}))
                .collect();
            Ok(Value::Array(list))
        }
        "stat" => {
            let inode = bs.lookup_path(arg)?;
            stat(bs, &inode)
        }
        "ls" => {
            let dir = bs.lookup_path(if arg.is_empty() { "/" } else { arg })?;
            let mut out = Vec::new();
            for e in bs.read_dir(&dir)? {
                let inode = bs.inode(e.nid)?;
                out.push(json!({
                    "name": String::from_utf8_lossy(&e.name),
                    "nid": e.nid,
                    "type": type_name(&inode),
                    "mode": format!("{:o}", inode.mode),
                    "size": inode.size,
                }));
            }
            Ok(Value::Array(out))
        }
        _ => Err(Error::options(format!(
            "unknown inspect request '{request}'; use stats, blobs, prefetch, 'stat PATH' or 'ls DIR'"
        ))),
    }
}
