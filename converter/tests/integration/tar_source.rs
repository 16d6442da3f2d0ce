//! Building from layer tars: PAX and GNU extensions, hard links, compression, duplicate
//! entries and implied parent directories.

use crate::common::{gzip, noise, opts, zstd, Image, TarMaker};
use converter::{create, CreateOutput, SourceType};
use std::fs;
use std::path::Path;
use tar::EntryType;

fn build(dir: &Path, name: &str, bytes: &[u8], ty: SourceType) -> CreateOutput {
    let src = dir.join(name);
    fs::write(&src, bytes).unwrap();
    create(&opts(&src, ty, &dir.join(format!("{name}.out")))).unwrap()
}

/// A layer exercising the features a real image uses.
fn sample_layer() -> Vec<u8> {
    let long_name = format!("usr/share/{}/file", "d".repeat(120));
    let mut t = TarMaker::default();
    t.dir("usr/", 0o755)
        .file("usr/big", 0o644, &noise(2 * 1024 * 1024 + 5, 9))
        .pax(&[("path", long_name.as_bytes())])
        .file("usr/placeholder", 0o600, b"pax long name")
        .pax(&[
            ("SCHILY.xattr.user.mime", b"text/plain"),
            ("SCHILY.xattr.security.capability", &[1, 0, 0, 2]),
            ("mtime", b"1700000001.25"),
        ])
        .file("usr/attrs", 0o640, b"xattrs")
        .hardlink("usr/attrs-link", "usr/attrs")
        .symlink("usr/sym", "attrs")
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/sda", EntryType::Block, 8, 0)
        .fifo("run/fifo");
    t.finish()
}

fn check_sample(img: &Image) {
    let long = format!("/usr/share/{}/file", "d".repeat(120));
    assert_eq!(img.read(&long), b"pax long name");
    assert_eq!(img.inode(&long).mode & 0o7777, 0o600);
    assert_eq!(img.read("/usr/big"), noise(2 * 1024 * 1024 + 5, 9));

    let attrs = img.inode("/usr/attrs");
    assert_eq!(attrs.nlink, 2);
    assert_eq!(img.inode("/usr/attrs-link").nid, attrs.nid);
    assert_eq!(
        (attrs.mtime, attrs.mtime_nsec),
        (1_700_000_001, 250_000_000)
    );
    let x = img.xattrs("/usr/attrs");
    assert_eq!(x["user.mime"], b"text/plain");
    assert_eq!(x["security.capability"], [1, 0, 0, 2]);

    assert_eq!(img.readlink("/usr/sym"), b"attrs");
    let null = img.inode("/dev/null");
    assert_eq!(null.file_type(), 0o020000);
    assert_eq!(null.rdev(), 0x0103);
    assert_eq!(img.inode("/dev/sda").file_type(), 0o060000);
    assert_eq!(img.inode("/run/fifo").file_type(), 0o010000);

    // Implied parents: 0755, root-owned, with the entry's time.
    let dev = img.inode("/dev");
    assert_eq!(dev.mode, 0o040755);
    assert_eq!((dev.uid, dev.gid, dev.mtime), (0, 0, 1_700_000_000));
}

#[test]
fn a_plain_tar_with_pax_gnu_and_links_reads_back() {
    let t = tempfile::tempdir().unwrap();
    let built = build(t.path(), "layer.tar", &sample_layer(), SourceType::Tar);
    check_sample(&Image::open(&built));
}

#[test]
fn gzip_and_zstd_layers_give_the_same_image_as_the_plain_tar() {
    let t = tempfile::tempdir().unwrap();
    let tar = sample_layer();
    let plain = build(t.path(), "l.tar", &tar, SourceType::Tar);
    let gz = build(t.path(), "l.tar.gz", &gzip(&tar), SourceType::TarGz);
    let zst = build(t.path(), "l.tar.zst", &zstd(&tar), SourceType::Tar);
    let gz_as_tar = build(t.path(), "l2.tar.gz", &gzip(&tar), SourceType::Tar);
    check_sample(&Image::open(&gz));
    check_sample(&Image::open(&zst));
    let boot = |o: &CreateOutput| fs::read(o.bootstrap.as_ref().unwrap()).unwrap();
    for other in [&gz, &zst, &gz_as_tar] {
        assert_eq!(boot(other), boot(&plain));
        assert_eq!(
            other.blob.as_ref().unwrap().info.id,
            plain.blob.as_ref().unwrap().info.id
        );
    }
}

#[test]
fn gnu_long_names_and_link_names_are_followed() {
    let t = tempfile::tempdir().unwrap();
    let long_dir = "l".repeat(150);
    let mut m = TarMaker::default();
    // `tar::Builder` writes GNU ././@LongLink entries for names over 100 bytes.
    m.file(&format!("{long_dir}/f"), 0o644, b"gnu")
        .hardlink("short", &format!("{long_dir}/f"))
        .symlink("sym", &format!("{long_dir}/f"));
    let built = build(t.path(), "gnu.tar", &m.finish(), SourceType::Tar);
    let img = Image::open(&built);
    assert_eq!(img.read(&format!("/{long_dir}/f")), b"gnu");
    assert_eq!(img.read("/short"), b"gnu");
    assert_eq!(img.readlink("/sym"), format!("{long_dir}/f").as_bytes());
}

#[test]
fn later_entries_replace_earlier_ones() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("a/f", 0o644, b"first")
        .dir("a", 0o700) // updates the implied directory, keeps a/f
        .file("a/f", 0o600, b"second")
        .file("x", 0o644, b"file then dir")
        .dir("x", 0o755)
        .file("x/y", 0o644, b"y")
        .dir("z", 0o755)
        .file("z/child", 0o644, b"gone")
        .symlink("z", "a");
    let img = Image::open(&build(t.path(), "dup.tar", &m.finish(), SourceType::Tar));
    assert_eq!(img.read("/a/f"), b"second");
    assert_eq!(img.inode("/a/f").mode & 0o7777, 0o600);
    assert_eq!(img.inode("/a").mode, 0o040700);
    assert_eq!(img.read("/x/y"), b"y");
    assert!(img.inode("/z").is_symlink());
    assert!(!img.names().contains(&"/z/child".to_string()));
}

#[test]
fn a_root_entry_sets_the_root_attributes() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.pax(&[("SCHILY.xattr.user.root", b"yes")])
        .dir("./", 0o711)
        .file("./f", 0o644, b"f");
    let img = Image::open(&build(t.path(), "root.tar", &m.finish(), SourceType::Tar));
    let root = img.bs.root().unwrap();
    assert_eq!(root.mode, 0o040711);
    assert_eq!(
        img.bs.xattrs(&root).unwrap(),
        [(b"user.root".to_vec(), b"yes".to_vec())]
    );
    assert_eq!(img.read("/f"), b"f");
}

#[test]
fn owners_come_from_the_tar_unless_repeatable() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file_owned("f", 1000, 100, b"owned")
        .pax(&[("uid", b"3000000000"), ("gid", b"7")])
        .file("big-uid", 0o644, b"pax ids");
    let src = t.path().join("own.tar");
    fs::write(&src, m.finish()).unwrap();
    let img = Image::open(&create(&opts(&src, SourceType::Tar, &t.path().join("a"))).unwrap());
    assert_eq!((img.inode("/f").uid, img.inode("/f").gid), (1000, 100));
    assert_eq!(
        (img.inode("/big-uid").uid, img.inode("/big-uid").gid),
        (3_000_000_000, 7)
    );
    let mut o = opts(&src, SourceType::Tar, &t.path().join("b"));
    o.explicit_uidgid = false;
    let img = Image::open(&create(&o).unwrap());
    assert_eq!((img.inode("/f").uid, img.inode("/f").gid), (0, 0));
}

#[test]
fn hard_links_to_non_regular_files_become_copies() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.symlink("s", "target")
        .hardlink("s2", "s")
        .fifo("p")
        .hardlink("p2", "p");
    let img = Image::open(&build(t.path(), "hl.tar", &m.finish(), SourceType::Tar));
    assert_eq!(img.readlink("/s2"), b"target");
    assert_ne!(img.inode("/s2").nid, img.inode("/s").nid);
    assert_eq!(img.inode("/p2").file_type(), 0o010000);
}

#[test]
fn tar_data_is_laid_out_in_archive_order_and_prefetch_is_recorded() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("z", 0o644, b"zzz")
        .file("a/b", 0o644, b"bbb")
        .file("m", 0o644, b"mmm");
    let src = t.path().join("order.tar");
    fs::write(&src, m.finish()).unwrap();
    let mut o = opts(&src, SourceType::Tar, &t.path().join("out"));
    o.prefetch = vec!["/m".into(), "/a".into()];
    let img = Image::open(&create(&o).unwrap());
    assert_eq!(img.ci_indexes("/z"), [0]);
    assert_eq!(img.ci_indexes("/a/b"), [1]);
    assert_eq!(img.ci_indexes("/m"), [2]);
    assert_eq!(
        img.bs.prefetch_table().unwrap(),
        [img.inode("/m").nid, img.inode("/a").nid]
    );
}

#[test]
fn an_empty_archive_gives_an_empty_image() {
    let t = tempfile::tempdir().unwrap();
    let built = build(
        t.path(),
        "empty.tar",
        &TarMaker::default().finish(),
        SourceType::Tar,
    );
    assert!(built.blob.is_none());
    assert!(Image::open(&built).names().is_empty());
}
