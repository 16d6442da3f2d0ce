//! Writes a small sample image (bootstrap, blob and expanded blob) into the directory given
//! as the first argument. Used to poke at the format with external tools.

use rafs::read::{self, Bootstrap};
use rafs::write::*;
use std::io::Cursor;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: sample OUTDIR")?);
    std::fs::create_dir_all(&out)?;
    let meta = |perm| Metadata {
        perm,
        uid: 1000,
        gid: 1000,
        mtime: 1_700_000_000,
        mtime_nsec: 5,
        rdev: 0,
    };
    let mut tree = Tree::new(meta(0o755));
    let opts = BlobOptions {
        toc: true,
        ..Default::default()
    };
    let mut arena = ChunkArena::default();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a.txt", b"hello\n".to_vec()),
        (
            "dir/big",
            (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect(),
        ),
        ("empty", vec![]),
    ];
    let (_, body) = write_chunks(Vec::new(), &opts, &mut arena, |sink| {
        for (p, d) in &files {
            let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
            let dn = tree.mkdir_p(dir.as_bytes(), &meta(0o755))?;
            let h = sink.add_file(&mut Cursor::new(d), d.len() as u64, p)?;
            tree.insert(
                dn,
                name.as_bytes(),
                Node::new(
                    NodeKind::Regular(FileData {
                        size: d.len() as u64,
                        chunks: h,
                    }),
                    meta(0o644),
                ),
            )?;
        }
        Ok(())
    })?;
    let root = tree.root();
    tree.insert(
        root,
        b"sym",
        Node::new(NodeKind::Symlink(b"a.txt".to_vec()), meta(0o777)),
    )?;
    let mut x = Node::directory(meta(0o755));
    x.xattrs.insert(b"user.k".to_vec(), b"v".to_vec());
    let xd = tree.insert(root, b"many", x)?;
    for i in 0..500 {
        tree.insert(
            xd,
            format!("f{i}").as_bytes(),
            Node::new(NodeKind::Fifo, meta(0o644)),
        )?;
    }
    let (info, blob) = body.write_meta()?.finish(None)?;
    let boot = write_bootstrap(
        &tree,
        &arena,
        std::slice::from_ref(&info),
        &BootstrapOptions::default(),
    )?;
    std::fs::write(out.join("image.boot"), &boot)?;
    std::fs::create_dir_all(out.join("blobs"))?;
    std::fs::write(out.join("blobs").join(&info.id), &blob)?;
    let bs = Bootstrap::from_bytes(boot)?;
    let mut f = std::fs::File::create(out.join("expanded"))?;
    read::expand_blob(&bs, 0, &blob, &mut f)?;
    f.set_len(info.uncompressed_size)?;
    println!("{}", info.id);
    Ok(())
}
