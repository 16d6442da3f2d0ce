//! Hostile or broken tars: each gives an error that names the problem, never a panic, and
//! leaves nothing in the output directory.

use crate::common::{chain, gzip, listing, noise, opts, zstd, Image, TarMaker};
use converter::{create, SourceType};
use std::fs;
use tar::EntryType;

/// Builds from `bytes` and returns the error chain; checks the output dir stays empty.
fn fails(bytes: &[u8]) -> String {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("bad.tar");
    fs::write(&src, bytes).unwrap();
    let out = t.path().join("out");
    let o = opts(&src, SourceType::Tar, &out);
    let err = create(&o).expect_err("a bad tar must not build");
    assert_eq!(listing(&out), ["blobs"], "files left behind");
    assert!(listing(&out.join("blobs")).is_empty(), "files left behind");
    chain(&err)
}

fn with_big_file() -> Vec<u8> {
    let mut m = TarMaker::default();
    m.file("a", 0o644, b"first")
        .file("big", 0o644, &noise(200_000, 5));
    m.finish()
}

#[test]
fn truncated_file_data_is_reported_with_the_entry() {
    let tar = with_big_file();
    let e = fails(&tar[..100_000]);
    assert!(e.contains("Tar entry 'big'"), "{e}");
    assert!(e.contains("shorter than its size"), "{e}");
}

#[test]
fn a_truncated_header_is_reported() {
    let tar = with_big_file();
    // The second header starts at 1024; cut it in half.
    let e = fails(&tar[..1024 + 256]);
    assert!(e.contains("Reading tar archive after entry 'a'"), "{e}");
}

#[test]
fn truncated_compressed_layers_are_reported() {
    let tar = with_big_file();
    for packed in [gzip(&tar), zstd(&tar)] {
        let e = fails(&packed[..packed.len() / 2]);
        assert!(e.contains("big"), "{e}");
    }
}

#[test]
fn garbage_is_not_a_tar() {
    let mut junk = noise(4096, 11);
    junk[0] = b'x';
    let e = fails(&junk);
    assert!(
        e.contains("Reading tar archive at its first entry: not a tar archive"),
        "{e}"
    );
    assert!(e.contains("checksum"), "{e}");
    // Garbage behind a gzip magic.
    let mut gz = vec![0x1f, 0x8b];
    gz.extend(noise(1000, 12));
    let e = fails(&gz);
    assert!(e.contains("Reading tar archive"), "{e}");
}

#[test]
fn dot_dot_paths_are_rejected() {
    let mut m = TarMaker::default();
    m.raw(b"../x", EntryType::Regular, b"", b"escape");
    let e = fails(&m.finish());
    assert!(e.contains("Tar entry '../x'"), "{e}");
    assert!(e.contains("'..'"), "{e}");

    let mut m = TarMaker::default();
    m.raw(b"a/../../x", EntryType::Directory, b"", b"");
    assert!(fails(&m.finish()).contains("'..'"));
}

#[test]
fn absolute_paths_are_placed_under_the_root_as_containerd_does() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("abs.tar");
    let mut m = TarMaker::default();
    m.raw(b"/etc/abs", EntryType::Regular, b"", b"abs").raw(
        b"/etc/link",
        EntryType::Link,
        b"/etc/abs",
        b"",
    );
    fs::write(&src, m.finish()).unwrap();
    let img = Image::open(&create(&opts(&src, SourceType::Tar, &t.path().join("out"))).unwrap());
    assert_eq!(img.names(), ["/etc", "/etc/abs", "/etc/link"]);
    assert_eq!(img.read("/etc/abs"), b"abs");
    assert_eq!(img.inode("/etc/link").nid, img.inode("/etc/abs").nid);
}

#[test]
fn a_file_in_the_way_of_a_parent_or_a_symlink_loop_is_refused_naming_the_entry() {
    let mut m = TarMaker::default();
    m.file("f", 0o644, b"f").file("f/x", 0o644, b"x");
    let e = fails(&m.finish());
    assert!(e.contains("Tar entry 'f/x'"), "{e}");
    assert!(e.contains("'/f' is in the way of a directory"), "{e}");

    let mut m = TarMaker::default();
    m.symlink("a", "b")
        .symlink("b", "a/c")
        .file("a/x", 0o644, b"x");
    let e = fails(&m.finish());
    assert!(e.contains("Tar entry 'a/x'"), "{e}");
    assert!(e.contains("too many levels of symbolic links"), "{e}");
}

#[test]
fn symlink_targets_over_the_reader_limit_are_refused_at_build_time() {
    let mut m = TarMaker::default();
    let long = "t".repeat(rafs::format::SYMLINK_MAX + 1);
    m.symlink("dir/long", &long);
    let e = fails(&m.finish());
    assert!(e.contains("Tar entry 'dir/long'"), "{e}");
    assert!(e.contains("4097 bytes exceeds 4096"), "{e}");
}

#[test]
fn hard_links_must_point_to_earlier_entries() {
    let mut m = TarMaker::default();
    m.hardlink("link", "missing")
        .file("missing", 0o644, b"too late");
    let e = fails(&m.finish());
    assert!(e.contains("Tar entry 'link'"), "{e}");
    assert!(e.contains("not an earlier entry"), "{e}");

    let mut m = TarMaker::default();
    m.file("f", 0o644, b"f")
        .raw(b"link", EntryType::Link, b"../f", b"");
    let e = fails(&m.finish());
    assert!(e.contains("hard link target '../f'"), "{e}");

    let mut m = TarMaker::default();
    m.raw(b"link", EntryType::Link, b"/etc/shadow", b"");
    let e = fails(&m.finish());
    assert!(e.contains("not an earlier entry"), "{e}");

    let mut m = TarMaker::default();
    m.dir("d", 0o755).hardlink("link", "d");
    assert!(fails(&m.finish()).contains("hard link to directory 'd'"));
}

#[test]
fn names_over_255_bytes_are_rejected() {
    let name = "n".repeat(256);
    let mut m = TarMaker::default();
    m.file(&format!("dir/{name}"), 0o644, b"long");
    let e = fails(&m.finish());
    assert!(e.contains(&format!("Tar entry 'dir/{name}'")), "{e}");
    assert!(e.contains("256 bytes exceeds 255"), "{e}");
}

#[test]
fn unsupported_xattrs_and_entry_types_are_named() {
    let mut m = TarMaker::default();
    m.pax(&[("SCHILY.xattr.system.nfs4_acl", b"x")])
        .file("f", 0o644, b"f");
    let e = fails(&m.finish());
    assert!(e.contains("Tar entry 'f'"), "{e}");
    assert!(e.contains("system.nfs4_acl"), "{e}");

    let mut h = tar::Header::new_gnu();
    h.set_path("sparse").unwrap();
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.as_gnu_mut().unwrap().realsize = *b"00000000000\0";
    h.set_cksum();
    let mut m = TarMaker::default();
    m.append(&h, b"");
    let e = fails(&m.finish());
    assert!(e.contains("sparse files are not supported"), "{e}");
}

#[test]
fn a_missing_source_is_named() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("nope.tar");
    let e = create(&opts(&missing, SourceType::Tar, &t.path().join("out"))).unwrap_err();
    let e = chain(&e);
    assert!(e.contains("nope.tar"), "{e}");
}
