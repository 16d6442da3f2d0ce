//! The kernel's view: `fsck.erofs` (erofs-utils) checks and extracts our bootstrap with
//! the blob expanded to its uncompressed layout, and the extracted files match the source.
//! Skipped when `fsck.erofs` is not installed.

use crate::common::{gzip, noise, opts, TarMaker};
use converter::{create, CreateOutput, SourceType};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

fn have_fsck() -> bool {
    Command::new("fsck.erofs").arg("-V").output().is_ok()
}

/// Runs `fsck.erofs --extract` on a build; returns the extraction directory.
fn fsck_extract(built: &CreateOutput, work: &Path) -> std::path::PathBuf {
    let boot = built.bootstrap.as_ref().unwrap();
    let mut cmd = Command::new("fsck.erofs");
    if let Some(blob) = &built.blob {
        let bs = rafs::read::Bootstrap::open(boot).unwrap();
        let expanded = work.join("expanded");
        let mut out = fs::File::create(&expanded).unwrap();
        let f = fs::File::open(&blob.path).unwrap();
        rafs::read::expand_blob(&bs, 0, &f, &mut out).unwrap();
        // expand_blob seeks to the end but does not extend the file over a short last chunk.
        out.set_len(bs.blobs()[0].uncompressed_size).unwrap();
        cmd.arg(format!("--device={}", expanded.display()));
    }
    let x = work.join("extracted");
    let o = cmd
        .arg(format!("--extract={}", x.display()))
        .arg(boot)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "fsck.erofs failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    x
}

#[test]
fn fsck_erofs_accepts_a_directory_build_and_extracts_the_same_files() {
    assert!(
        have_fsck(),
        "fsck.erofs is not installed: run `bash tests/run.sh`, which installs erofs-utils"
    );
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("usr/lib/deep")).unwrap();
    fs::write(src.join("usr/lib/big"), noise(5 * 1024 * 1024 + 77, 2)).unwrap();
    fs::write(src.join("usr/lib/deep/small"), b"small file\n").unwrap();
    fs::write(src.join("usr/empty"), b"").unwrap();
    fs::hard_link(src.join("usr/lib/deep/small"), src.join("usr/hard")).unwrap();
    symlink("lib/big", src.join("usr/link")).unwrap();
    for i in 0..300 {
        fs::write(src.join(format!("usr/lib/f{i:03}")), format!("file {i}")).unwrap();
    }
    let mut o = opts(&src, SourceType::Directory, &t.path().join("out"));
    o.blob_toc = true;
    let built = create(&o).unwrap();
    let x = fsck_extract(&built, t.path());
    let diff = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(&x)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

#[test]
fn fsck_erofs_accepts_a_tar_build() {
    assert!(
        have_fsck(),
        "fsck.erofs is not installed: run `bash tests/run.sh`, which installs erofs-utils"
    );
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.dir("etc", 0o755)
        .file("etc/os-release", 0o644, b"ID=test\n")
        .file("bin/tool", 0o755, &noise(1_500_000, 4))
        .hardlink("bin/tool2", "bin/tool")
        .symlink("bin/sh", "tool");
    let layer = t.path().join("layer.tar.gz");
    fs::write(&layer, gzip(&m.finish())).unwrap();
    let built = create(&opts(&layer, SourceType::TarGz, &t.path().join("out"))).unwrap();
    let x = fsck_extract(&built, t.path());
    assert_eq!(fs::read(x.join("etc/os-release")).unwrap(), b"ID=test\n");
    assert_eq!(fs::read(x.join("bin/tool2")).unwrap(), noise(1_500_000, 4));
    assert_eq!(fs::read_link(x.join("bin/sh")).unwrap(), Path::new("tool"));
}
