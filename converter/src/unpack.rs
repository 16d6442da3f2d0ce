//! `nydus-image unpack`: write the filesystem of a bootstrap (with its blobs) as a tar.
//!
//! Every entry keeps its type, mode, owner, mtime (with nanoseconds, as a PAX record),
//! xattrs (PAX `SCHILY.xattr.*`) and device numbers; regular files with several names are
//! written once and then as hard links. Sockets cannot be stored in tar and are skipped.
//! File data is read chunk by chunk and verified before it is written.

use crate::blobs::BlobLocator;
use crate::error::{Error, Result};
use rafs::read::{self, Bootstrap, Inode};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What an unpack wrote.
#[derive(Clone, Debug, Default)]
pub struct UnpackReport {
    /// Tar entries written.
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Sockets skipped (tar cannot store them).
    pub skipped_sockets: u64,
}

/// Streams a regular file's content chunk by chunk, verifying each chunk.
struct FileReader<'a> {
    bs: &'a Bootstrap,
    inode: Inode,
    blobs: &'a [File],
    pos: u64,
    buf: Vec<u8>,
    buf_pos: usize,
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf_pos == self.buf.len() {
            if self.pos >= self.inode.size {
                return Ok(0);
            }
            let to_io = |e: rafs::Error| std::io::Error::other(e.to_string());
            let i = self.pos / self.bs.superblock().chunk_size as u64;
            let chunk = self.bs.file_chunk(&self.inode, i).map_err(to_io)?;
            let info = &self.bs.blobs()[chunk.blob_index as usize];
            self.buf = read::read_chunk(&self.blobs[chunk.blob_index as usize], info, &chunk)
                .map_err(to_io)?;
            self.buf_pos = 0;
            self.pos += self.buf.len() as u64;
        }
        let n = out.len().min(self.buf.len() - self.buf_pos);
        out[..n].copy_from_slice(&self.buf[self.buf_pos..self.buf_pos + n]);
        self.buf_pos += n;
        Ok(n)
    }
}

fn header_for(inode: &Inode, ty: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(inode.mode & 0o7777);
    h.set_uid(inode.uid as u64);
    h.set_gid(inode.gid as u64);
    h.set_mtime(inode.mtime);
    h.set_size(0);
    h
}

fn pax_records(bs: &Bootstrap, inode: &Inode) -> Result<Vec<(String, Vec<u8>)>> {
    let mut pax = Vec::new();
    if inode.mtime_nsec != 0 {
        pax.push((
            "mtime".to_string(),
            format!("{}.{:09}", inode.mtime, inode.mtime_nsec).into_bytes(),
        ));
    }
    for (name, value) in bs.xattrs(inode)? {
        pax.push((
            format!("SCHILY.xattr.{}", String::from_utf8_lossy(&name)),
            value,
        ));
    }
    Ok(pax)
}

/// Writes the tree of `bootstrap` to `output` as a tar archive.
pub fn unpack(bootstrap: &Path, blobs: &BlobLocator, output: &Path) -> Result<UnpackReport> {
    let bs = Bootstrap::open(bootstrap)?;
    let files: Vec<File> = bs
        .blobs()
        .iter()
        .map(|b| blobs.open(b))
        .collect::<Result<_>>()?;
    let tmp = output.with_extension("tar.partial");
    let out = File::create(&tmp).map_err(|e| Error::output(&tmp, e))?;
    let result = write_tar(&bs, &files, std::io::BufWriter::new(out));
    match result {
        Ok(report) => {
            std::fs::rename(&tmp, output).map_err(|e| Error::output(output, e))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_tar<W: Write>(bs: &Bootstrap, blobs: &[File], out: W) -> Result<UnpackReport> {
    let mut report = UnpackReport::default();
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Complete);
    let mut first_name: HashMap<u64, Vec<u8>> = HashMap::new();
    let io = |e: std::io::Error| Error::output("tar stream", e);
    let root = bs.root()?;
    let mut entries: Vec<(Vec<u8>, Inode)> = vec![(b"./".to_vec(), root)];
    // Depth first, so that each directory is directly followed by its contents: tar
    // extractors restore a directory's mtime when they leave it.
    bs.walk(|path, _, inode| {
        entries.push((path[1..].to_vec(), inode.clone()));
        Ok(())
    })?;
    for (path, inode) in entries {
        let path_str = Path::new(OsStr::from_bytes(&path));
        let pax = pax_records(bs, &inode)?;
        if !pax.is_empty() {
            tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(io)?;
        }
        if inode.is_dir() {
            let mut h = header_for(&inode, tar::EntryType::Directory);
            tar.append_data(&mut h, path_str, std::io::empty())
                .map_err(io)?;
        } else if inode.is_reg() {
            if let Some(first) = first_name.get(&inode.nid) {
                let mut h = header_for(&inode, tar::EntryType::Link);
                tar.append_link(&mut h, path_str, Path::new(OsStr::from_bytes(first)))
                    .map_err(io)?;
            } else {
                if inode.nlink > 1 {
                    first_name.insert(inode.nid, path.clone());
                }
                let mut h = header_for(&inode, tar::EntryType::Regular);
                h.set_size(inode.size);
                let reader = FileReader {
                    bs,
                    inode: inode.clone(),
                    blobs,
                    pos: 0,
                    buf: Vec::new(),
                    buf_pos: 0,
                };
                tar.append_data(&mut h, path_str, reader).map_err(io)?;
                report.bytes += inode.size;
            }
        } else if inode.is_symlink() {
            let target = bs.readlink(&inode)?;
            let mut h = header_for(&inode, tar::EntryType::Symlink);
            tar.append_link(&mut h, path_str, Path::new(OsStr::from_bytes(&target)))
                .map_err(io)?;
        } else if inode.file_type() == 0o140000 {
            report.skipped_sockets += 1;
            continue;
        } else {
            let ty = match inode.file_type() {
                0o020000 => tar::EntryType::Char,
                0o060000 => tar::EntryType::Block,
                _ => tar::EntryType::Fifo,
            };
            let mut h = header_for(&inode, ty);
            if inode.is_device() {
                let rdev = inode.rdev();
                let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
                let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
                h.set_device_major(major as u32).map_err(io)?;
                h.set_device_minor(minor as u32).map_err(io)?;
            }
            tar.append_data(&mut h, path_str, std::io::empty())
                .map_err(io)?;
        }
        report.entries += 1;
    }
    tar.into_inner().map_err(io)?.flush().map_err(io)?;
    Ok(report)
}
