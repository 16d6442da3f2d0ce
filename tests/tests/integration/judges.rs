//! The format judged by real components: `fsck.erofs`, the kernel's EROFS driver and
//! upstream nydus 2.2 (`nydus-image check`, `nydusd`), in both directions, on the varied
//! tree. Needs root (device nodes, loop devices, mounts, FUSE).

use rafs::read::{self, Bootstrap};
use rafs_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Build variants every judge sees: TOC + zstd + blake3 (the converter's per-layer form),
/// lz4 + sha256, and uncompressed 4 KiB chunks.
const VARIANTS: [(&str, &[&str]); 3] = [
    ("zstd-toc", &["--features", "blob-toc"]),
    (
        "lz4-sha256",
        &["--compressor", "lz4_block", "--digester", "sha256"],
    ),
    (
        "none-4k",
        &["--compressor", "none", "--chunk-size", "0x1000"],
    ),
];

fn varied_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    make_varied_tree(&src).unwrap();
    src
}

/// What `fsck.erofs --extract` is not asked to reproduce: owners, modes, times, xattrs
/// and hard links (it writes each name as a file of its own). Types, contents, sizes,
/// symlink targets, device numbers and which entries exist are all compared.
fn is_fsck_extract_exception(d: &Difference) -> bool {
    matches!(
        d.what,
        What::Mode(..)
            | What::Uid(..)
            | What::Gid(..)
            | What::Mtime(..)
            | What::Xattr(..)
            | What::Nlink(..)
            | What::HardLink(..)
    )
}

/// A socket of the source missing from a tar (`nydus-image unpack` skips sockets, which
/// tar cannot hold, and says so). Nothing else is excepted.
fn is_socket_left_out(src: &Path, d: &Difference) -> bool {
    use std::os::unix::fs::FileTypeExt;
    matches!(d.what, What::Missing(0))
        && std::fs::symlink_metadata(src.join(&d.path)).is_ok_and(|m| m.file_type().is_socket())
}

fn assert_same(src: &Path, actual: &Path, opts: &CompareOptions, what: &str) {
    let diffs = compare_trees_with(src, actual, opts);
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn fsck_erofs_accepts_bootstraps_of_the_varied_tree() {
    require_root_tools(&["fsck.erofs"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = varied_tree(tmp.path());
    for (name, flags) in VARIANTS {
        let out = tmp.path().join(name);
        let img = build_image(&src, &out, flags);
        let devs = expand_blobs(&img.boot, &img.blobs, &out);
        let mut cmd = Command::new("fsck.erofs");
        for d in &devs {
            cmd.arg(format!("--device={}", d.display()));
        }
        let extract = out.join("extracted");
        cmd.arg(format!("--extract={}", extract.display()))
            .arg(&img.boot);
        let res = run_ok(&mut cmd);
        let text = String::from_utf8_lossy(&res.stderr).to_lowercase()
            + &String::from_utf8_lossy(&res.stdout).to_lowercase();
        assert!(
            !text.contains("error") && !text.contains("corrupt"),
            "{name}: fsck.erofs reported: {text}"
        );
        // fsck.erofs extracts contents; owners/times/xattrs are not its job here.
        let diffs: Vec<String> = differences(
            &src,
            &extract,
            &CompareOptions {
                ignore_nsec: true,
                ignore_root_mtime: true,
                ignore_xattrs: true,
            },
        )
        .into_iter()
        .filter(|d| !is_fsck_extract_exception(d))
        .map(|d| d.to_string())
        .collect();
        assert!(
            diffs.is_empty(),
            "{name}: fsck.erofs extraction differs:\n{}",
            diffs.join("\n")
        );
    }
}

#[test]
fn kernel_erofs_mount_shows_the_source_tree_exactly() {
    require_root_tools(&["losetup", "mount", "umount"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = varied_tree(tmp.path());
    for (name, flags) in [
        ("zstd", &["--features", "blob-toc"][..]),
        (
            "lz4-64k",
            &["--compressor", "lz4_block", "--chunk-size", "0x10000"][..],
        ),
    ] {
        let out = tmp.path().join(name);
        let img = build_image(&src, &out, flags);
        let m = ErofsMount::new(&img.boot, &img.blobs, &out);
        let mnt = m.mnt.clone();
        assert_same(
            &src,
            &mnt,
            &CompareOptions::default(),
            &format!("kernel mount ({name})"),
        );
        drop(m);
    }
}

#[test]
fn upstream_nydus_image_check_accepts_our_bootstraps() {
    let tmp = tempfile::tempdir().unwrap();
    let src = varied_tree(tmp.path());
    let default: (&str, &[&str]) = ("default", &[]);
    for (name, flags) in std::iter::once(default).chain(VARIANTS) {
        let img = build_image(&src, &tmp.path().join(name), flags);
        let out = run_ok(
            Command::new(upstream_bin("nydus-image"))
                .args(["check", "-B"])
                .arg(&img.boot)
                .args(["--log-level", "warn"]),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("RAFS filesystem metadata is valid"),
            "{name}: {text}"
        );
    }
}

/// Mounts `img` with upstream nydusd (localfs backend, blobcache) and compares with `src`.
fn upstream_nydusd_shows(img: &BuiltImage, src: &Path, work: &Path) {
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cfg = work.join("nydusd.json");
    std::fs::write(&cfg, localfs_config(&img.blobs, &cache, false)).unwrap();
    let d = start_upstream_nydusd(&img.boot, &cfg, &work.join("mnt"), &work.join("nydusd.log"));
    assert_same(
        src,
        &d.mnt,
        &CompareOptions {
            ignore_root_mtime: true,
            ..Default::default()
        },
        "upstream nydusd mount",
    );
}

#[test]
fn upstream_nydusd_mounts_our_images() {
    require_root_tools(&["fusermount3"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = varied_tree(tmp.path());
    for (name, flags) in [
        ("toc", &["--features", "blob-toc"][..]),
        ("lz4", &["--compressor", "lz4_block"][..]),
    ] {
        let work = tmp.path().join(name);
        let img = build_image(&src, &work, flags);
        upstream_nydusd_shows(&img, &src, &work);
    }
}

fn unpack_and_compare(img: &BuiltImage, src: &Path, work: &Path, what: &str) {
    run_ok(
        Command::new(bin("nydus-image"))
            .arg("check")
            .arg(&img.boot)
            .arg("-D")
            .arg(&img.blobs),
    );
    let tar = work.join("unpacked.tar");
    run_ok(
        Command::new(bin("nydus-image"))
            .arg("unpack")
            .arg(&img.boot)
            .arg("-D")
            .arg(&img.blobs)
            .arg("--output")
            .arg(&tar),
    );
    let x = work.join("extracted");
    extract_tar(&tar, &x);
    let diffs: Vec<String> = differences(
        src,
        &x,
        &CompareOptions {
            ignore_root_mtime: true,
            ..Default::default()
        },
    )
    .into_iter()
    .filter(|d| !is_socket_left_out(src, d))
    .map(|d| d.to_string())
    .collect();
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn create_then_unpack_gives_back_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = varied_tree(tmp.path());
    let work = tmp.path().join("ours");
    let img = build_image(&src, &work, &["--features", "blob-toc"]);
    unpack_and_compare(&img, &src, &work, "create -> unpack");
}

#[test]
fn we_read_images_built_by_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let src = varied_tree(tmp.path());
    for (name, flags) in VARIANTS {
        let work = tmp.path().join(name);
        let mut all = vec!["-t", "dir-rafs", "--log-level", "warn"];
        all.extend_from_slice(flags);
        let img = build_image_with(&upstream_bin("nydus-image"), &src, &work, &all);
        unpack_and_compare(&img, &src, &work, &format!("upstream {name} read by us"));
    }
}

#[test]
fn we_read_upstream_inline_meta_layer_blobs() {
    // The per-layer form nydusify produces: one tar layer, bootstrap inlined in the blob.
    let tmp = tempfile::tempdir().unwrap();
    let src = varied_tree(tmp.path());
    let layer = tmp.path().join("layer.tar");
    run_ok(
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
    );
    let blob = tmp.path().join("layer.blob");
    run_ok(
        Command::new(upstream_bin("nydus-image"))
            .args([
                "create",
                "-t",
                "tar-rafs",
                "--blob-inline-meta",
                "--features",
                "blob-toc",
                "--whiteout-spec",
                "none",
                "--log-level",
                "warn",
                "--blob",
            ])
            .arg(&blob)
            .arg(&layer),
    );
    let file = std::fs::File::open(&blob).unwrap();
    let boot_bytes = read::read_inline_bootstrap(&file).unwrap();
    let bs = Bootstrap::from_bytes(boot_bytes.clone()).unwrap();
    assert_eq!(bs.blobs().len(), 1);
    let boot = tmp.path().join("inline.boot");
    std::fs::write(&boot, boot_bytes).unwrap();
    let work = tmp.path().join("w");
    std::fs::create_dir_all(&work).unwrap();
    let tar = work.join("unpacked.tar");
    run_ok(
        Command::new(bin("nydus-image"))
            .arg("check")
            .arg(&boot)
            .arg("--blob")
            .arg(&blob),
    );
    run_ok(
        Command::new(bin("nydus-image"))
            .arg("unpack")
            .arg(&boot)
            .arg("--blob")
            .arg(&blob)
            .arg("--output")
            .arg(&tar),
    );
    let x = work.join("extracted");
    extract_tar(&tar, &x);
    let diffs: Vec<String> = differences(
        &src,
        &x,
        &CompareOptions {
            ignore_root_mtime: true,
            ignore_nsec: true,
            ..Default::default()
        },
    )
    .into_iter()
    .filter(|d| !is_socket_left_out(&src, d))
    .map(|d| d.to_string())
    .collect();
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
