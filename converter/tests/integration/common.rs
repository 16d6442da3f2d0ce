//! Helpers: making tars (well-formed and hand-crafted bad ones), running builds, and
//! reading the result back with `rafs::read`.

use converter::{CreateOptions, CreateOutput, SourceType};
use rafs::read::{blob_chunks, read_chunk, read_inline_bootstrap, Bootstrap, Inode};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::Path;
use tar::{EntryType, Header};

/// The whole error chain, `: `-separated, as the binary prints it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Names of the files in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Options writing the bootstrap to `<out>/boot` and the blob into `<out>/blobs/`.
pub fn opts(source: &Path, ty: SourceType, out: &Path) -> CreateOptions {
    fs::create_dir_all(out.join("blobs")).unwrap();
    let mut o = CreateOptions::new(source, ty);
    o.bootstrap = Some(out.join("boot"));
    o.blob_dir = Some(out.join("blobs"));
    o.threads = 2;
    o
}

/// A tar stream under construction.
pub struct TarMaker {
    b: tar::Builder<Vec<u8>>,
}

impl Default for TarMaker {
    fn default() -> Self {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Deterministic);
        TarMaker { b }
    }
}

fn header(ty: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

impl TarMaker {
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = header(EntryType::Directory, mode, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn file_owned(&mut self, path: &str, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        let mut h = header(EntryType::Regular, 0o644, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(&mut self, path: &str, ty: EntryType, major: u32, minor: u32) -> &mut Self {
        let mut h = header(ty, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn fifo(&mut self, path: &str) -> &mut Self {
        let mut h = header(EntryType::Fifo, 0o644, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// A PAX extended header applying to the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.b
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    /// An entry whose ustar name and link name are written verbatim, bypassing the `tar`
    /// crate's own path checks (for hostile inputs).
    pub fn raw(&mut self, name: &[u8], ty: EntryType, link: &[u8], data: &[u8]) -> &mut Self {
        let mut h = header(ty, 0o644, data.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    /// Appends a header exactly as given.
    pub fn append(&mut self, h: &Header, data: &[u8]) -> &mut Self {
        self.b.append(h, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// Deterministic pseudo-random bytes (the end-to-end crate's).
pub use rafs_e2e::noise;

/// A built image opened for reading back.
pub struct Image {
    pub bs: Bootstrap,
    pub blob: Option<File>,
}

impl Image {
    pub fn open(out: &CreateOutput) -> Image {
        let blob = out.blob.as_ref().map(|b| File::open(&b.path).unwrap());
        let bs = match &out.bootstrap {
            Some(p) => Bootstrap::open(p).unwrap(),
            None => Bootstrap::from_bytes(read_inline_bootstrap(blob.as_ref().unwrap()).unwrap())
                .unwrap(),
        };
        Image { bs, blob }
    }

    /// Every path below the root with its inode.
    pub fn entries(&self) -> BTreeMap<String, Inode> {
        let mut out = BTreeMap::new();
        self.bs
            .walk(|path, _, inode| {
                out.insert(String::from_utf8_lossy(path).into_owned(), inode.clone());
                Ok(())
            })
            .unwrap();
        out
    }

    pub fn names(&self) -> Vec<String> {
        self.entries().into_keys().collect()
    }

    pub fn inode(&self, path: &str) -> Inode {
        self.bs
            .lookup_path(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    pub fn exists(&self, path: &str) -> bool {
        self.bs.lookup_path(path).is_ok()
    }

    pub fn xattrs(&self, path: &str) -> BTreeMap<String, Vec<u8>> {
        self.bs
            .xattrs(&self.inode(path))
            .unwrap()
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect()
    }

    pub fn readlink(&self, path: &str) -> Vec<u8> {
        self.bs.readlink(&self.inode(path)).unwrap()
    }

    /// ci indexes of the chunks of a regular file.
    pub fn ci_indexes(&self, path: &str) -> Vec<u32> {
        let inode = self.inode(path);
        (0..self.bs.chunk_count(&inode))
            .map(|i| self.bs.chunk(&inode, i).unwrap().ci_index)
            .collect()
    }

    /// The contents of a regular file, every chunk verified against its digest.
    pub fn read(&self, path: &str) -> Vec<u8> {
        let inode = self.inode(path);
        assert!(inode.is_reg(), "{path} is not a regular file");
        if inode.size == 0 {
            return Vec::new();
        }
        let blob = self
            .blob
            .as_ref()
            .expect("an image with file data has a blob");
        let chunks = blob_chunks(&self.bs, 0, blob).unwrap();
        let info = &self.bs.blobs()[0];
        let mut out = Vec::new();
        for i in 0..self.bs.chunk_count(&inode) {
            let addr = self.bs.chunk(&inode, i).unwrap();
            let (chunk, known) = chunks[addr.ci_index as usize];
            assert!(known);
            out.extend(read_chunk(blob, info, &chunk).unwrap());
        }
        out.truncate(inode.size as usize);
        out
    }
}
