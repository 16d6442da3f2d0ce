//! `--whiteout-spec` in a single-layer build (spec §14): markers are dropped for oci and
//! overlayfs, kept verbatim for none.

use crate::common::{opts, Image, TarMaker};
use converter::{create, SourceType, WhiteoutSpec};
use std::fs;
use std::path::Path;
use std::process::Command;
use tar::EntryType;

fn oci_dir(root: &Path) -> std::path::PathBuf {
    let src = root.join("src");
    fs::create_dir_all(src.join("d/.wh.subdir")).unwrap();
    fs::write(src.join("keep"), b"k").unwrap();
    fs::write(src.join(".wh.gone"), b"").unwrap();
    fs::write(src.join("d/.wh..wh..opq"), b"").unwrap();
    fs::write(src.join("d/.wh.subdir/inner"), b"").unwrap();
    fs::write(src.join("d/file"), b"f").unwrap();
    src
}

fn oci_tar() -> Vec<u8> {
    let mut m = TarMaker::default();
    m.file("keep", 0o644, b"k")
        .file(".wh.gone", 0o644, b"")
        .dir("d", 0o755)
        .file("d/.wh..wh..opq", 0o644, b"")
        .file("d/.wh.subdir/inner", 0o644, b"")
        .file("d/file", 0o644, b"f");
    m.finish()
}

fn build(src: &Path, ty: SourceType, out: &Path, spec: WhiteoutSpec) -> Image {
    let mut o = opts(src, ty, out);
    o.whiteout = spec;
    Image::open(&create(&o).unwrap())
}

#[test]
fn oci_markers_are_dropped_from_directories_and_tars() {
    let t = tempfile::tempdir().unwrap();
    let dir = oci_dir(t.path());
    let tar = t.path().join("oci.tar");
    fs::write(&tar, oci_tar()).unwrap();
    for (src, ty) in [(&dir, SourceType::Directory), (&tar, SourceType::Tar)] {
        let img = build(src, ty, &t.path().join(format!("{ty}")), WhiteoutSpec::Oci);
        if ty == SourceType::Directory {
            // A directory named `.wh.x` on disk is a whiteout, with what is below it.
            assert_eq!(img.names(), ["/d", "/d/file", "/keep"], "{ty}");
        } else {
            // Only a path's last component is a whiteout: without a header of its own,
            // `d/.wh.subdir` is a directory of that name (as containerd applies it).
            assert_eq!(
                img.names(),
                [
                    "/d",
                    "/d/.wh.subdir",
                    "/d/.wh.subdir/inner",
                    "/d/file",
                    "/keep"
                ],
                "{ty}"
            );
        }
    }
}

#[test]
fn a_whiteout_directory_header_is_dropped_and_entries_below_it_land_in_a_plain_directory() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.dir("d", 0o755)
        .dir("d/.wh.sub", 0o700)
        .file("d/.wh.sub/inner", 0o644, b"i")
        .dir("e/.wh.gone", 0o700);
    let tar = t.path().join("oci.tar");
    fs::write(&tar, m.finish()).unwrap();
    let img = build(
        &tar,
        SourceType::Tar,
        &t.path().join("out"),
        WhiteoutSpec::Oci,
    );
    // containerd skips the whiteout header, then `mkparent` makes `d/.wh.sub` (0755)
    // for `inner`; `e`, the parent of the whiteout, is made before it is dropped.
    assert_eq!(img.names(), ["/d", "/d/.wh.sub", "/d/.wh.sub/inner", "/e"]);
    assert_eq!(img.inode("/d/.wh.sub").mode & 0o7777, 0o755);
}

#[test]
fn none_keeps_every_marker() {
    let t = tempfile::tempdir().unwrap();
    let dir = oci_dir(t.path());
    let tar = t.path().join("oci.tar");
    fs::write(&tar, oci_tar()).unwrap();
    for (src, ty) in [(&dir, SourceType::Directory), (&tar, SourceType::Tar)] {
        let img = build(src, ty, &t.path().join(format!("{ty}")), WhiteoutSpec::None);
        assert_eq!(
            img.names(),
            [
                "/.wh.gone",
                "/d",
                "/d/.wh..wh..opq",
                "/d/.wh.subdir",
                "/d/.wh.subdir/inner",
                "/d/file",
                "/keep"
            ],
            "{ty}"
        );
    }
}

#[test]
fn overlayfs_drops_char_device_zero_and_the_opaque_xattr() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.pax(&[
        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ("SCHILY.xattr.user.keep", b"1"),
    ])
    .dir("opaque", 0o755)
    .device("opaque/removed", EntryType::Char, 0, 0)
    .device("null", EntryType::Char, 1, 3)
    .file(".wh.not-a-marker-here", 0o644, b"");
    let tar = t.path().join("ovl.tar");
    fs::write(&tar, m.finish()).unwrap();

    let img = build(
        &tar,
        SourceType::Tar,
        &t.path().join("ovl"),
        WhiteoutSpec::Overlayfs,
    );
    assert_eq!(img.names(), ["/.wh.not-a-marker-here", "/null", "/opaque"]);
    let x = img.xattrs("/opaque");
    assert!(!x.contains_key("trusted.overlay.opaque"), "{x:?}");
    assert_eq!(x["user.keep"], b"1");

    let img = build(
        &tar,
        SourceType::Tar,
        &t.path().join("none"),
        WhiteoutSpec::None,
    );
    assert!(img.exists("/opaque/removed"));
    assert!(img.xattrs("/opaque").contains_key("trusted.overlay.opaque"));
}

#[test]
fn overlayfs_markers_in_a_directory_are_dropped() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("opaque")).unwrap();
    xattr::set(src.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::set(src.join("opaque"), "user.keep", b"1").unwrap();
    let made = Command::new("mknod")
        .arg(src.join("opaque/removed"))
        .args(["c", "0", "0"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let img = build(
        &src,
        SourceType::Directory,
        &t.path().join("o"),
        WhiteoutSpec::Overlayfs,
    );
    assert_eq!(img.names(), ["/opaque"]);
    let x = img.xattrs("/opaque");
    assert!(!x.contains_key("trusted.overlay.opaque"));
    assert_eq!(x["user.keep"], b"1");
    if made {
        let img = build(
            &src,
            SourceType::Directory,
            &t.path().join("n"),
            WhiteoutSpec::None,
        );
        assert!(img.exists("/opaque/removed"));
    }
}
