//! Build a tree in memory, write blob + bootstrap, read everything back.

use rafs::read::{self, Bootstrap};
use rafs::write::*;
use rafs::{Compressor, Digester};
use std::io::Cursor;

fn meta(perm: u32) -> Metadata {
    Metadata {
        perm,
        uid: 1000,
        gid: 100000,
        mtime: 1_700_000_000,
        mtime_nsec: 42,
        rdev: 0,
    }
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|i| {
            if i % 4096 < 2048 {
                (i / 4096) as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

struct Built {
    boot: Vec<u8>,
    blob: Vec<u8>,
    files: Vec<(String, Vec<u8>)>,
}

fn build(compressor: Compressor, digester: Digester, chunk_size: u32, toc: bool) -> Built {
    let mut tree = Tree::new(meta(0o755));
    let files: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("small".into(), b"hello world\n".to_vec()),
        ("dir/multi".into(), content(1, 3 * 1024 * 1024 + 123)),
        ("dir/dup".into(), content(1, 3 * 1024 * 1024 + 123)),
        ("dir/sub/exact".into(), content(2, 2 * chunk_size as usize)),
    ];
    let opts = BlobOptions {
        compressor,
        digester,
        chunk_size,
        toc,
        threads: 2,
        ..Default::default()
    };
    let mut arena = ChunkArena::default();
    let (_, body) = write_chunks(Vec::new(), &opts, &mut arena, |sink| {
        for (path, data) in &files {
            let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
            let d = tree.mkdir_p(dir.as_bytes(), &meta(0o755))?;
            let handles = sink.add_file(&mut Cursor::new(data), data.len() as u64, path)?;
            let node = Node::new(
                NodeKind::Regular(FileData {
                    size: data.len() as u64,
                    chunks: handles,
                }),
                meta(0o644),
            );
            tree.insert(d, name.as_bytes(), node)?;
        }
        Ok(())
    })
    .unwrap();
    let root = tree.root();
    let small = tree.lookup_path(b"small").unwrap().unwrap();
    tree.link(root, b"hardlink", small).unwrap();
    tree.insert(
        root,
        b"link",
        Node::new(NodeKind::Symlink(b"dir/multi".to_vec()), meta(0o777)),
    )
    .unwrap();
    tree.insert(
        root,
        b"long-link",
        Node::new(NodeKind::Symlink(vec![b'x'; 4000]), meta(0o777)),
    )
    .unwrap();
    let mut dev = Node::new(NodeKind::CharDevice, meta(0o600));
    dev.meta.rdev = (1 << 8) | 3;
    tree.insert(root, b"null", dev).unwrap();
    let mut x = Node::directory(meta(0o1777));
    x.xattrs.insert(b"user.a".to_vec(), b"1".to_vec());
    x.xattrs
        .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
    x.xattrs.insert(
        b"security.capability".to_vec(),
        vec![
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    let xd = tree.insert(root, b"xdir", x).unwrap();
    for i in 0..2000 {
        tree.insert(
            xd,
            format!("entry-{i:05}").as_bytes(),
            Node::new(NodeKind::Fifo, meta(0o644)),
        )
        .unwrap();
    }
    let body = body.write_meta().unwrap();
    let (info, blob) = body.finish(None).unwrap();
    let bopts = BootstrapOptions {
        compressor,
        digester,
        chunk_size,
        ..Default::default()
    };
    let boot = write_bootstrap(&tree, &arena, &[info], &bopts).unwrap();
    Built { boot, blob, files }
}

fn read_file(bs: &Bootstrap, blob: &Vec<u8>, path: &str) -> Vec<u8> {
    let ino = bs.lookup_path(path).unwrap();
    let mut out = Vec::new();
    for s in bs.map_range(&ino, 0, ino.size).unwrap() {
        let info = &bs.blobs()[s.chunk.blob_index as usize];
        let c = bs.chunk_info(&s.chunk).unwrap().expect("chunk in table");
        let data = read::read_chunk(blob, info, &c).unwrap();
        out.extend_from_slice(&data[s.offset as usize..(s.offset + s.len) as usize]);
    }
    out
}

#[test]
fn roundtrip_all_algorithms() {
    for (c, d, cs, toc) in [
        (Compressor::Zstd, Digester::Blake3, 0x100000, true),
        (Compressor::Lz4Block, Digester::Sha256, 0x10000, false),
        (Compressor::None, Digester::Blake3, 0x1000, true),
    ] {
        let b = build(c, d, cs, toc);
        let bs = Bootstrap::from_bytes(b.boot.clone()).unwrap();
        assert_eq!(bs.superblock().chunk_size, cs);
        assert_eq!(bs.superblock().compressor, c);
        for (path, data) in &b.files {
            assert_eq!(&read_file(&bs, &b.blob, path), data, "{path} with {c}/{d}");
        }
        let small = bs.lookup_path("small").unwrap();
        let hl = bs.lookup_path("hardlink").unwrap();
        assert_eq!(small.nid, hl.nid);
        assert_eq!(small.nlink, 2);
        assert_eq!(small.uid, 1000);
        assert_eq!(small.gid, 100000);
        assert_eq!((small.mtime, small.mtime_nsec), (1_700_000_000, 42));
        assert_eq!(
            bs.readlink(&bs.lookup_path("link").unwrap()).unwrap(),
            b"dir/multi"
        );
        assert_eq!(
            bs.readlink(&bs.lookup_path("long-link").unwrap()).unwrap(),
            vec![b'x'; 4000]
        );
        assert_eq!(bs.lookup_path("null").unwrap().rdev(), (1 << 8) | 3);
        let xd = bs.lookup_path("xdir").unwrap();
        assert_eq!(xd.mode, 0o041777);
        assert_eq!(
            bs.get_xattr(&xd, b"trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(bs.xattrs(&xd).unwrap().len(), 3);
        let entries = bs.read_dir(&xd).unwrap();
        assert_eq!(entries.len(), 2002);
        assert!(entries.windows(2).all(|w| w[0].name < w[1].name));
        assert!(bs.lookup(&xd, b"entry-01999").unwrap().is_some());
        assert!(bs.lookup(&xd, b"entry-02000").unwrap().is_none());
        // Dedup: dir/dup shares every chunk with dir/multi.
        let m = bs.lookup_path("dir/multi").unwrap();
        let dup = bs.lookup_path("dir/dup").unwrap();
        assert_eq!(bs.chunk(&m, 0).unwrap(), bs.chunk(&dup, 0).unwrap());
        // The blob's own ci array agrees with the chunk table, and expansion works.
        let chunks = read::blob_chunks(&bs, 0, &b.blob).unwrap();
        assert!(chunks.iter().all(|(_, known)| *known));
        let mut out = Cursor::new(Vec::new());
        read::expand_blob(&bs, 0, &b.blob, &mut out).unwrap();
        let multi = b.files.iter().find(|f| f.0 == "dir/multi").unwrap();
        let c0 = bs.chunk(&m, 0).unwrap().uncompressed_offset as usize;
        assert_eq!(&out.get_ref()[c0..c0 + 100], &multi.1[..100]);
        if toc {
            let toc = read::read_toc(&b.blob, &bs.blobs()[0]).unwrap();
            let names: Vec<_> = toc.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(
                names,
                ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
            );
            let digests = read::read_digest_array(&b.blob, &bs.blobs()[0]).unwrap();
            assert_eq!(digests.len(), bs.blobs()[0].chunk_count as usize);
        }
    }
}

#[test]
fn output_is_deterministic() {
    let a = build(Compressor::Zstd, Digester::Blake3, 0x100000, true);
    let b = build(Compressor::Zstd, Digester::Blake3, 0x100000, true);
    assert_eq!(a.boot, b.boot);
    assert_eq!(a.blob, b.blob);
}

#[test]
fn corrupted_chunk_is_rejected() {
    let mut b = build(Compressor::None, Digester::Blake3, 0x100000, false);
    let bs = Bootstrap::from_bytes(b.boot.clone()).unwrap();
    let ino = bs.lookup_path("small").unwrap();
    let c = bs.chunk_info(&bs.chunk(&ino, 0).unwrap()).unwrap().unwrap();
    b.blob[c.compressed_offset as usize] ^= 0xff;
    let err = read::read_chunk(&b.blob, &bs.blobs()[0], &c).unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
}

#[test]
fn every_single_byte_corruption_of_the_header_is_caught_or_harmless() {
    // Flipping any byte of the superblocks and device/blob tables must never panic; it
    // either fails to open with an error or opens (reserved bytes).
    let b = build(Compressor::Zstd, Digester::Blake3, 0x100000, false);
    for at in 1024..(4096 + 256) {
        let mut boot = b.boot.clone();
        boot[at] ^= 0x5a;
        if let Ok(bs) = Bootstrap::from_bytes(boot) {
            let _ = bs.read_dir(&bs.root().unwrap());
        }
    }
    for len in [0, 100, 1100, 4095, 4096, b.boot.len() - 4096] {
        assert!(
            Bootstrap::from_bytes(b.boot[..len].to_vec()).is_err(),
            "truncated to {len}"
        );
    }
}

#[test]
fn chunk_records_whose_ranges_overflow_are_refused() {
    // A record at the far end of the offset space: the end of its range overflows u64,
    // which must be an error (found by fuzzing), not a panic or a wrapped, passing check.
    let b = build(Compressor::None, Digester::Blake3, 0x100000, false);
    let bs = Bootstrap::from_bytes(b.boot.clone()).unwrap();
    let table = bs.superblock().chunk_table_offset as usize;
    for (field, value) in [(56usize, u64::MAX - 4095), (48, u64::MAX - 1)] {
        let mut boot = b.boot.clone();
        boot[table + field..table + field + 8].copy_from_slice(&value.to_le_bytes());
        let bs = Bootstrap::from_bytes(boot).unwrap();
        let err = bs.chunk_record(0).unwrap_err().to_string();
        assert!(err.contains("range"), "{err}");
        assert!(bs.check_unique_chunks().is_err());
    }
}
