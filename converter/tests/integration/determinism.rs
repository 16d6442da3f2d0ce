//! The same input gives byte-identical outputs, whatever the thread count.

use crate::common::{gzip, noise, opts, TarMaker};
use converter::{create, CreateOptions, SourceType};
use std::fs;
use std::path::Path;

fn outputs(o: &CreateOptions) -> (Vec<u8>, Vec<u8>, String) {
    let built = create(o).unwrap();
    let blob = built.blob.unwrap();
    let boot = match &built.bootstrap {
        Some(p) => fs::read(p).unwrap(),
        None => Vec::new(),
    };
    (boot, fs::read(&blob.path).unwrap(), blob.info.id)
}

fn twice(src: &Path, ty: SourceType, root: &Path, tweak: impl Fn(&mut CreateOptions)) {
    let mut a = opts(src, ty, &root.join("a"));
    a.threads = 1;
    tweak(&mut a);
    let mut b = opts(src, ty, &root.join("b"));
    b.threads = 4;
    tweak(&mut b);
    let (boot_a, blob_a, id_a) = outputs(&a);
    let (boot_b, blob_b, id_b) = outputs(&b);
    assert_eq!(id_a, id_b);
    assert!(boot_a == boot_b, "bootstraps differ");
    assert!(blob_a == blob_b, "blobs differ");
    fs::remove_dir_all(root.join("a")).unwrap();
    fs::remove_dir_all(root.join("b")).unwrap();
}

fn sample_dir(root: &Path) -> std::path::PathBuf {
    let src = root.join("src");
    for i in 0..20 {
        let d = src.join(format!("d{}", i % 4));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}")), noise(40_000 * i + 17, i as u64)).unwrap();
    }
    fs::write(src.join("dup"), noise(57, 1)).unwrap();
    src
}

#[test]
fn directory_builds_are_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let src = sample_dir(t.path());
    twice(&src, SourceType::Directory, t.path(), |_| {});
    twice(&src, SourceType::Directory, t.path(), |o| {
        o.chunk_size = 0x10000;
        o.blob_toc = true;
        o.prefetch = vec!["/d3".into()];
    });
    twice(&src, SourceType::Directory, t.path(), |o| {
        o.bootstrap = None;
        o.inline_meta = true;
        o.blob_toc = true;
        o.compressor = rafs::Compressor::Lz4Block;
        o.digester = rafs::Digester::Sha256;
    });
}

#[test]
fn tar_builds_are_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    for i in 0..20u64 {
        m.file(
            &format!("d{}/f{i}", i % 3),
            0o644,
            &noise(30_000 * i as usize + 3, i),
        );
    }
    let src = t.path().join("layer.tar.gz");
    fs::write(&src, gzip(&m.finish())).unwrap();
    twice(&src, SourceType::TarGz, t.path(), |_| {});
    twice(&src, SourceType::TarGz, t.path(), |o| {
        o.bootstrap = None;
        o.inline_meta = true;
        o.blob_toc = true;
        o.compressor = rafs::Compressor::None;
    });
}
