//! The golden image: `fixtures/golden/golden.tar` built with 4 KiB chunks must give a
//! bootstrap and blob whose sha256 are pinned in `fixtures/golden/expected.txt`, and every
//! header field is decoded and asserted here. `UPDATE_GOLDEN=1` rewrites the pinned file
//! after an intended format change.

use converter::{create, CreateOptions, SourceType};
use rafs::format::*;
use rafs::read::Bootstrap;
use std::path::{Path, PathBuf};
use zerocopy::FromBytes;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden")
}

fn sha256(b: &[u8]) -> String {
    hex::encode(rafs::types::sha256(b))
}

fn at<T: FromBytes>(bytes: &[u8], off: u64) -> T {
    T::read_from_prefix(&bytes[off as usize..])
        .expect("in range")
        .0
}

#[test]
fn golden_image_is_pinned_and_every_header_field_is_as_specified() {
    let out = tempfile::tempdir().unwrap();
    let mut opts = CreateOptions::new(fixtures().join("golden.tar"), SourceType::Tar);
    opts.bootstrap = Some(out.path().join("image.boot"));
    opts.blob_dir = Some(out.path().to_path_buf());
    opts.chunk_size = 0x1000;
    opts.blob_toc = true;
    let built = create(&opts).unwrap();
    let boot = std::fs::read(out.path().join("image.boot")).unwrap();
    let blob_info = built.blob.as_ref().expect("a blob").info.clone();
    let blob = std::fs::read(out.path().join(&blob_info.id)).unwrap();

    // Pinned digests (bless with UPDATE_GOLDEN=1).
    let actual = format!(
        "bootstrap {}\nblob {}\nblob_id {}\n",
        sha256(&boot),
        sha256(&blob),
        blob_info.id
    );
    let expected_path = fixtures().join("expected.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path)
        .expect("fixtures/golden/expected.txt (run with UPDATE_GOLDEN=1 to create)");
    assert_eq!(
        actual, expected,
        "golden image changed; if intended, rerun with UPDATE_GOLDEN=1"
    );

    // Superblock (spec §3).
    assert_eq!(boot.len() % 4096, 0);
    assert!(boot[..1024].iter().all(|b| *b == 0));
    let sb: SuperBlock = at(&boot, 1024);
    let blocks = blob_info.uncompressed_size / 4096;
    assert_eq!(sb.magic.get(), 0xE0F5_E1E2);
    assert_eq!(sb.checksum.get(), 0);
    assert_eq!(sb.feature_compat.get(), 0x4000_0000);
    assert_eq!(sb.blkszbits, 12);
    assert_eq!(sb.extslots, 0);
    assert_eq!(sb.root_nid.get(), 128);
    assert_eq!(
        sb.inos.get(),
        16,
        "15 tar entries + root, hard link counted once"
    );
    assert_eq!(sb.build_time.get(), 0);
    assert_eq!(sb.build_time_nsec.get(), 0);
    assert_eq!(sb.blocks.get() as u64, blocks);
    assert_eq!(
        sb.meta_blkaddr.get(),
        2,
        "blob table at 4096 (256 B) -> meta at 8192"
    );
    assert_eq!(sb.xattr_blkaddr.get(), 0);
    assert_eq!(sb.uuid, [0; 16]);
    assert_eq!(sb.volume_name, [0; 16]);
    assert_eq!(sb.feature_incompat.get(), 0x0C);
    assert_eq!(sb.u.get(), 0);
    assert_eq!(sb.extra_devices.get(), 1);
    assert_eq!(sb.devt_slotoff.get(), 11);
    assert_eq!(sb.reserved, [0; 38]);

    // Extended superblock (spec §4).
    let ext: SuperBlockExt = at(&boot, 1152);
    let chunk_table_offset = ext.chunk_table_offset.get();
    assert_eq!(
        ext.flags.get(),
        flags::COMPRESSION_ZSTD
            | flags::HASH_BLAKE3
            | flags::EXPLICIT_UID_GID
            | flags::HAS_XATTR
            | flags::INLINED_CHUNK_DIGEST
    );
    assert_eq!(ext.blob_table_offset.get(), 4096);
    assert_eq!(ext.blob_table_size.get(), 256);
    assert_eq!(ext.chunk_size.get(), 0x1000);
    assert_eq!(chunk_table_offset % 4096, 0);
    assert_eq!(
        ext.chunk_table_size.get(),
        80 * blob_info.chunk_count as u64,
        "every chunk referenced once"
    );
    assert!(
        (chunk_table_offset + ext.chunk_table_size.get()).next_multiple_of(4096)
            == boot.len() as u64
    );
    assert_eq!(ext.prefetch_table_offset.get(), 0);
    assert_eq!(ext.prefetch_table_size.get(), 0);
    assert_eq!(ext.padding.get(), 0);
    assert_eq!(ext.reserved, [0; 200]);

    // Device slot (spec §5).
    let dev: DeviceSlot = at(&boot, 1408);
    assert_eq!(&dev.blob_id[..], blob_info.id.as_bytes());
    assert_eq!(dev.blocks.get() as u64, blocks);
    assert_eq!(
        dev.mapped_blkaddr.get() as u64,
        (boot.len() as u64).next_multiple_of(0x8_0000) / 4096
    );
    assert_eq!(dev.reserved, [0; 56]);
    assert!(
        boot[1536..4096].iter().all(|b| *b == 0),
        "nothing between the device slot and the blob table"
    );

    // Blob table entry (spec §6).
    let e: BlobTableEntry = at(&boot, 4096);
    assert_eq!(&e.blob_id[..], blob_info.id.as_bytes());
    assert_eq!(e.blob_index.get(), 0);
    assert_eq!(e.chunk_size.get(), 0x1000);
    assert_eq!(
        e.chunk_count.get(),
        8,
        "9 file chunks, dup.bin deduplicated against large.bin"
    );
    assert_eq!(e.compression_algo.get(), compressor::ZSTD);
    assert_eq!(e.digest_algo.get(), digester::BLAKE3);
    assert_eq!(
        e.features.get(),
        0x7000_0021,
        "CAP_TAR_TOC|HAS_TOC|HAS_TAR_HEADER|INLINED_CHUNK_DIGEST|ALIGNED"
    );
    assert_eq!(e.compressed_size.get(), blob.len() as u64);
    assert_eq!(e.uncompressed_size.get(), blocks * 4096);
    assert_eq!(
        e.blob_toc_size.get(),
        4 * 128 + 512,
        "image.blob, blob.meta, blob.meta.header, blob.digest"
    );
    assert_eq!(
        e.blob_toc_digest,
        rafs::types::sha256(&blob[blob.len() - 1024..])
    );
    assert_eq!(e.ci_uncompressed_size.get(), 8 * 16);
    assert!(e.ci_compressed_size.get() <= e.ci_uncompressed_size.get());
    assert_eq!(e.blob_meta_digest, [0; 32]);
    assert_eq!(e.blob_meta_size.get(), 0);
    assert_eq!(e.cipher_iv, [0; 8]);
    assert_eq!(e.cipher_algo.get(), 0);
    assert_eq!(e.reserved2, [0; 36]);
    assert!(boot[4352..8192].iter().all(|b| *b == 0));

    // Blob tail: ci header after the ci array, then digest array, TOC (spec §13).
    let ci_end = e.ci_offset.get() + e.ci_compressed_size.get();
    let h: CiHeader = at(&blob, ci_end);
    assert_eq!(
        (h.magic.get(), h.magic2.get()),
        (BLOB_CCT_MAGIC, BLOB_CCT_MAGIC)
    );
    assert_eq!(h.features.get(), 0x7000_0021);
    assert_eq!(h.ci_compressor.get(), e.ci_compressor.get());
    assert_eq!(h.ci_entries.get(), 8);
    assert_eq!(h.ci_offset.get(), e.ci_offset.get());
    assert_eq!(h.ci_compressed_size.get(), e.ci_compressed_size.get());
    assert_eq!(h.ci_uncompressed_size.get(), 128);
    assert_eq!(
        (
            h.ci_zran_offset.get(),
            h.ci_zran_size.get(),
            h.ci_zran_count.get()
        ),
        (0, 0, 0)
    );
    assert!(h.reserved.iter().all(|b| *b == 0));
    let sections: Vec<String> = rafs::read::tar_sections(&blob)
        .unwrap()
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(
        sections,
        ["rafs.blob.toc", "blob.digest", "blob.meta", "image.blob"]
    );

    // Root inode: meta at 8192, root nid 128 -> byte 12288 (spec §8).
    let root: InodeExtended = at(&boot, 8192 + 128 * 32);
    assert_eq!(root.format.get() & 1, 1, "extended inode");
    assert_eq!(root.mode.get(), 0o040755);
    assert_eq!(root.nlink.get(), 2 + 4, "bin, data, dev, etc");
    assert_eq!(root.ino.get(), 1);

    // The reader agrees, and every file's content equals the tar's.
    let bs = Bootstrap::from_bytes(boot.clone()).unwrap();
    let mut tar = tar::Archive::new(std::fs::File::open(fixtures().join("golden.tar")).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().unwrap().into_owned();
        let mut want = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut want).unwrap();
        let ino = bs.lookup_path(path.to_str().unwrap()).unwrap();
        let mut got = Vec::new();
        for s in bs.map_range(&ino, 0, ino.size).unwrap() {
            let c = bs.chunk_info(&s.chunk).unwrap().unwrap();
            let data = rafs::read::read_chunk(&blob, &bs.blobs()[0], &c).unwrap();
            got.extend_from_slice(&data[s.offset as usize..(s.offset + s.len) as usize]);
        }
        assert_eq!(got, want, "{}", path.display());
    }
    let data = bs.lookup_path("data").unwrap();
    assert_eq!(
        (data.uid, data.gid, data.mode, data.mtime_nsec),
        (1000, 1000, 0o041777, 123_456_789)
    );
    assert_eq!(
        bs.get_xattr(&data, b"trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        bs.lookup_path("bin/hello").unwrap().nid,
        bs.lookup_path("bin/hello-link").unwrap().nid
    );
    assert_eq!(bs.lookup_path("dev/sda").unwrap().rdev(), 8 << 8);
}
