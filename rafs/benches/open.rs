//! Reader benchmark (`cargo bench -p rafs --bench open`): builds a 100k-file image in
//! memory (1,000 directories of 100 one-chunk files) and prints how long opening the
//! bootstrap takes (read into memory and mmap), path lookups per second, and a full walk
//! decoding every inode (entries per second).

use rafs::read::{Bootstrap, Data};
use rafs::write::*;
use std::io::Cursor;
use std::time::Instant;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (dirs, per_dir) = (1000, 100);
    let meta = Metadata {
        perm: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        rdev: 0,
    };
    let mut tree = Tree::new(Metadata {
        perm: 0o755,
        ..meta.clone()
    });
    let mut arena = ChunkArena::default();
    let opts = BlobOptions::default();
    let t = Instant::now();
    let (_, body) = write_chunks(std::io::sink(), &opts, &mut arena, |sink| {
        for d in 0..dirs {
            let dir = tree.mkdir_p(
                format!("usr/share/d{d:04}").as_bytes(),
                &Metadata {
                    perm: 0o755,
                    ..meta.clone()
                },
            )?;
            for f in 0..per_dir {
                let data = format!("file {d} {f}\n").repeat(8);
                let chunks =
                    sink.add_file(&mut Cursor::new(data.as_bytes()), data.len() as u64, "f")?;
                let node = Node::new(
                    NodeKind::Regular(FileData {
                        size: data.len() as u64,
                        chunks,
                    }),
                    meta.clone(),
                );
                tree.insert(dir, format!("file-{f:03}.txt").as_bytes(), node)?;
            }
        }
        Ok(())
    })
    .unwrap();
    let (info, _) = body.write_meta().unwrap().finish(None).unwrap();
    let boot = write_bootstrap(&tree, &arena, &[info], &BootstrapOptions::default()).unwrap();
    let build = t.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.boot");
    std::fs::write(&path, &boot).unwrap();
    println!(
        "image: {} files, bootstrap {:.1} MiB, built in {:.2}s",
        dirs * per_dir,
        boot.len() as f64 / 1048576.0,
        build.as_secs_f64()
    );

    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(Bootstrap::open(&path).unwrap());
    }
    let read_open = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        let f = std::fs::File::open(&path).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: the file is a private temporary file nobody else modifies while mapped.
        let data = unsafe { Data::map(&f) }.unwrap();
        std::hint::black_box(Bootstrap::from_data(data).unwrap());
    }
    let map_open = t.elapsed() / n;
    println!(
        "open: read into memory {:.2} ms, mmap {:.3} ms",
        read_open.as_secs_f64() * 1e3,
        map_open.as_secs_f64() * 1e3
    );

    let f = std::fs::File::open(&path).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: as above.
    let bs = Bootstrap::from_data(unsafe { Data::map(&f) }.unwrap()).unwrap();
    let lookups = 100_000;
    let t = Instant::now();
    for i in 0..lookups {
        let p = format!(
            "/usr/share/d{:04}/file-{:03}.txt",
            (i * 7919) % dirs,
            (i * 31) % per_dir
        );
        std::hint::black_box(bs.lookup_path(&p).unwrap());
    }
    println!(
        "lookup_path (4 levels): {:.0} lookups/s",
        lookups as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut entries = 0u64;
    bs.walk(|_, _, inode| {
        entries += 1;
        std::hint::black_box(inode.size);
        Ok(())
    })
    .unwrap();
    println!(
        "walk decoding every inode: {entries} entries, {:.0} entries/s",
        entries as f64 / t.elapsed().as_secs_f64()
    );
}
