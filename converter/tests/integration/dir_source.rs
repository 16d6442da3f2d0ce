//! Building from a directory: every file type and attribute survives, contents read back
//! intact, prefetched files are laid out first.

use crate::common::{listing, noise, opts, Image};
use converter::{create, SourceType};
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn mknod(path: &Path, kind: &str, major: u32, minor: u32) -> bool {
    Command::new("mknod")
        .arg(path)
        .arg(kind)
        .arg(major.to_string())
        .arg(minor.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn every_file_type_and_attribute_is_recorded() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("etc/deep/er")).unwrap();
    let big = noise(3 * 1024 * 1024 + 123, 7);
    fs::write(src.join("etc/big"), &big).unwrap();
    fs::write(src.join("etc/small"), b"hello\n").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::hard_link(src.join("etc/small"), src.join("etc/deep/small-link")).unwrap();
    symlink("../small", src.join("etc/deep/sym")).unwrap();
    mkfifo(&src.join("fifo"));
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let have_devs = mknod(&src.join("null"), "c", 1, 3) && mknod(&src.join("blk"), "b", 8, 1);
    fs::set_permissions(src.join("etc/small"), fs::Permissions::from_mode(0o4751)).unwrap();
    xattr::set(src.join("etc/small"), "user.color", b"blue").unwrap();
    xattr::set(src.join("etc"), "trusted.note", b"dir xattr").unwrap();
    std::os::unix::fs::lchown(src.join("etc/deep/sym"), Some(1234), Some(5678)).unwrap();
    let mtime = filetime_of(&src.join("etc/big"));

    let out = t.path().join("out");
    let o = opts(&src, SourceType::Directory, &out);
    let built = create(&o).unwrap();
    let img = Image::open(&built);

    let names = img.names();
    for p in [
        "/etc",
        "/etc/big",
        "/etc/small",
        "/etc/deep",
        "/etc/deep/er",
        "/etc/deep/small-link",
        "/etc/deep/sym",
        "/empty",
        "/fifo",
        "/sock",
    ] {
        assert!(names.contains(&p.to_string()), "{p} missing from {names:?}");
    }
    assert_eq!(img.read("/etc/big"), big);
    assert_eq!(img.read("/etc/small"), b"hello\n");
    assert_eq!(img.read("/empty"), b"");

    let small = img.inode("/etc/small");
    assert_eq!(small.mode, 0o100000 | 0o4751);
    assert_eq!(small.nlink, 2);
    assert_eq!(img.inode("/etc/deep/small-link").nid, small.nid);
    assert_eq!(img.xattrs("/etc/small")["user.color"], b"blue");
    assert_eq!(img.xattrs("/etc")["trusted.note"], b"dir xattr");

    let sym = img.inode("/etc/deep/sym");
    assert!(sym.is_symlink());
    assert_eq!(img.readlink("/etc/deep/sym"), b"../small");
    assert_eq!((sym.uid, sym.gid), (1234, 5678));

    assert_eq!(img.inode("/fifo").file_type(), 0o010000);
    assert_eq!(img.inode("/sock").file_type(), 0o140000);
    if have_devs {
        let null = img.inode("/null");
        assert_eq!(null.file_type(), 0o020000);
        assert_eq!(
            null.rdev(),
            fs::symlink_metadata(src.join("null")).unwrap().rdev()
        );
        assert_eq!(img.inode("/blk").file_type(), 0o060000);
    }

    let bigi = img.inode("/etc/big");
    assert_eq!((bigi.mtime, bigi.mtime_nsec), mtime);
    // 3 MiB + 123 bytes in 1 MiB chunks.
    assert_eq!(img.ci_indexes("/etc/big").len(), 4);

    let blob = built.blob.as_ref().unwrap();
    assert_eq!(listing(&out.join("blobs")), vec![blob.info.id.clone()]);
    assert_eq!(blob.path, out.join("blobs").join(&blob.info.id));
    assert_eq!(
        fs::metadata(&blob.path).unwrap().len(),
        blob.info.compressed_size
    );
    assert_eq!(built.stats.regular_files, 3);
    assert_eq!(img.bs.superblock().inodes, built.stats.inodes);
}

fn filetime_of(p: &Path) -> (u64, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mtime() as u64, m.mtime_nsec() as u32)
}

#[test]
fn identical_content_is_stored_once() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let data = noise(300_000, 3);
    fs::write(src.join("a"), &data).unwrap();
    fs::write(src.join("b"), &data).unwrap();
    let built = create(&opts(&src, SourceType::Directory, &t.path().join("out"))).unwrap();
    let img = Image::open(&built);
    assert_eq!(img.ci_indexes("/a"), img.ci_indexes("/b"));
    assert_eq!(built.blob.unwrap().info.chunk_count, 1);
    assert_eq!(img.read("/b"), data);
}

#[test]
fn prefetched_files_come_first_in_the_blob_and_table() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("a")).unwrap();
    fs::create_dir_all(src.join("b/c")).unwrap();
    fs::write(src.join("a/x"), b"xxxx").unwrap();
    fs::write(src.join("b/y"), b"yyyy").unwrap();
    fs::write(src.join("b/c/z"), b"zzzz").unwrap();
    fs::write(src.join("top"), b"top!").unwrap();

    // Without prefetch: pre-order (root's files, then a/, then b/, then b/c/).
    let plain = create(&opts(&src, SourceType::Directory, &t.path().join("plain"))).unwrap();
    let img = Image::open(&plain);
    assert_eq!(img.ci_indexes("/top"), [0]);
    assert_eq!(img.ci_indexes("/a/x"), [1]);
    assert_eq!(img.ci_indexes("/b/y"), [2]);
    assert_eq!(img.ci_indexes("/b/c/z"), [3]);
    assert!(img.bs.prefetch_table().unwrap().is_empty());

    let mut o = opts(&src, SourceType::Directory, &t.path().join("pf"));
    o.prefetch = vec![
        "/b/c/z".into(),
        "/b/".into(),
        "/b/c".into(),
        "/missing".into(),
    ];
    let built = create(&o).unwrap();
    let img = Image::open(&built);
    assert_eq!(img.ci_indexes("/b/c/z"), [0]);
    assert_eq!(img.ci_indexes("/b/y"), [1]);
    assert_eq!(img.ci_indexes("/top"), [2]);
    assert_eq!(img.ci_indexes("/a/x"), [3]);
    // "/b/c" is covered by "/b" and dropped; "/missing" matches nothing.
    assert_eq!(
        img.bs.prefetch_table().unwrap(),
        vec![img.inode("/b/c/z").nid, img.inode("/b").nid]
    );
}

#[test]
fn an_empty_directory_gives_a_bootstrap_and_no_blob() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    let out = t.path().join("out");
    let built = create(&opts(&src, SourceType::Directory, &out)).unwrap();
    assert!(built.blob.is_none());
    assert!(listing(&out.join("blobs")).is_empty());
    let img = Image::open(&built);
    assert!(img.bs.blobs().is_empty());
    assert_eq!(img.names(), ["/d", "/empty"]);
    assert_eq!(built.to_json()["blobs"], serde_json::json!([]));
}

#[test]
fn inline_meta_puts_the_bootstrap_into_the_blob() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(10_000, 1)).unwrap();
    for toc in [false, true] {
        let out = t.path().join(format!("out-{toc}"));
        let mut o = opts(&src, SourceType::Directory, &out);
        o.bootstrap = None;
        o.inline_meta = true;
        o.blob_toc = toc;
        let built = create(&o).unwrap();
        assert!(built.bootstrap.is_none());
        let blob = built.blob.as_ref().unwrap();
        assert_eq!(listing(&out.join("blobs")), vec![blob.info.id.clone()]);
        assert_eq!(listing(&out), vec!["blobs".to_string()]);
        let img = Image::open(&built);
        assert_eq!(img.bs.blobs()[0].id, "x".repeat(64));
        assert_eq!(img.read("/f"), noise(10_000, 1));
        if toc {
            let f = fs::File::open(&blob.path).unwrap();
            let toc = rafs::read::read_toc(&f, &blob.info).unwrap();
            let names: Vec<_> = toc.iter().map(|t| t.name.as_str()).collect();
            assert!(names.contains(&"image.boot"), "{names:?}");
        }
    }
}

#[test]
fn an_empty_directory_with_inline_meta_still_writes_a_blob() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let out = t.path().join("out");
    let mut o = opts(&src, SourceType::Directory, &out);
    o.bootstrap = None;
    o.inline_meta = true;
    let built = create(&o).unwrap();
    let blob = built.blob.as_ref().unwrap();
    assert_eq!(blob.info.chunk_count, 0);
    assert!(Image::open(&built).names().is_empty());
}

#[test]
fn without_bootstrap_path_the_bootstrap_goes_into_the_blob_dir() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    let out = t.path().join("out");
    let mut o = opts(&src, SourceType::Directory, &out);
    o.bootstrap = None;
    let built = create(&o).unwrap();
    let boot = built.bootstrap.clone().unwrap();
    assert_eq!(boot.parent().unwrap(), out.join("blobs"));
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(fs::read(&boot).unwrap()))
    };
    assert_eq!(boot.file_name().unwrap().to_str().unwrap(), digest);
    assert_eq!(listing(&out.join("blobs")).len(), 2);
    assert_eq!(Image::open(&built).read("/f"), b"data");
}

#[test]
fn repeatable_builds_record_no_owners() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    std::os::unix::fs::chown(src.join("f"), Some(42), Some(43)).unwrap();
    let mut o = opts(&src, SourceType::Directory, &t.path().join("a"));
    let img = Image::open(&create(&o).unwrap());
    assert_eq!((img.inode("/f").uid, img.inode("/f").gid), (42, 43));
    o = opts(&src, SourceType::Directory, &t.path().join("b"));
    o.explicit_uidgid = false;
    let img = Image::open(&create(&o).unwrap());
    assert_eq!((img.inode("/f").uid, img.inode("/f").gid), (0, 0));
}

#[test]
fn a_file_is_not_a_directory_source() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("layer.tar");
    fs::write(&f, b"").unwrap();
    let out = t.path().join("out");
    let e = create(&opts(&f, SourceType::Directory, &out)).unwrap_err();
    assert!(e.to_string().contains("must be a directory"), "{e}");
    assert!(listing(&out.join("blobs")).is_empty());
}

#[test]
fn outputs_inside_the_source_are_not_picked_up() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    // Bootstrap at src/boot, blob into src/blobs/.
    let built = create(&opts(&src, SourceType::Directory, &src)).unwrap();
    let img = Image::open(&built);
    assert_eq!(img.names(), ["/blobs", "/f"]);
    assert_eq!(listing(&src.join("blobs")).len(), 1);
}
