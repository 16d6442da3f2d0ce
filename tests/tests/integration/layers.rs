//! Layers as real-world tools write them (ko, `crane append`, bazel, `umoci repack`: no
//! entries for parent directories, paths through a lower layer's symlink, whiteouts in
//! odd places), made into real OCI images with umoci, converted by `nydusify convert`
//! and merged by `nydus-image merge` of per-layer bootstraps, then compared entry by
//! entry with `umoci unpack` of the same image through the kernel's EROFS driver and
//! `nydus-image unpack`; `nydusify check` must pass on every conversion.
//!
//! containerd's applier is the reference for structure, modes, owners and xattrs, and
//! umoci agrees with it on all of them here (a directory no layer has, made in a
//! set-group-ID directory, takes its group and the bit from the kernel, in both).
//! Excepted, and named, are two mtimes, where both give the time of the extraction and
//! we give a deterministic one: directories that no layer defines (ours: the time of the
//! entry that implied them), and a lower directory in which such a directory is made
//! (its `mkdir` touches it; ours keeps the lower layer's time, which umoci keeps too
//! when only files are added).

use crate::nydusify::{nydusify, nydusify_ok};
use rafs_e2e::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A merged-/usr base as Debian and Ubuntu have it, with symlinks of every shape, a
/// directory with attributes worth keeping, and directories to delete through odd names.
fn base() -> LayerTar {
    let mut l = LayerTar::default();
    l.dir("./", 0o755)
        .dir("usr/", 0o755)
        .dir("usr/lib/", 0o755)
        .file("usr/lib/libc.so.6", 0o755, b"libc")
        .file("usr/lib/libm.so.6", 0o755, b"libm")
        .dir("usr/lib/deep/", 0o755)
        .file("usr/lib/deep/old", 0o644, b"old")
        .symlink("usr/lib64", "lib/deep")
        .symlink("lib", "usr/lib")
        .symlink("abs", "/usr/lib")
        .symlink("chain", "lib")
        .symlink("up", "../../../usr/lib/deep")
        .symlink("loop1", "loop2/x")
        .symlink("loop2", "loop1")
        .dir("etc/", 0o755)
        .file("etc/file", 0o644, b"file");
    l.mtime = 1_600_000_000;
    l.pax(&[("SCHILY.xattr.user.kept", b"yes")])
        .dir_owned("var/", 0o2750, 7, 8)
        .file("var/old", 0o640, b"old");
    l.mtime = 1_700_000_000;
    l.dir("d0/", 0o755)
        .dir("d0/d1/", 0o755)
        .file("d0/d1/kept", 0o644, b"kept")
        .dir("d0/d2/", 0o755)
        .file("d0/d2/gone", 0o644, b"gone");
    l
}

/// An upper layer with no entries for parent directories, as `crane append` writes.
fn upper() -> LayerTar {
    let mut l = LayerTar::default();
    l.mtime = 1_750_000_000;
    l.file("lib/libnew.so", 0o755, b"new")
        .file("abs/viaabs", 0o644, b"via an absolute symlink")
        .file("chain/viachain", 0o644, b"via a chain")
        .file("up/viaup", 0o644, b"via ..")
        .file(
            "usr/lib64/viadeeper",
            0o644,
            b"via a symlink deeper in the tree",
        )
        .file("lib/.wh.libm.so.6", 0o644, b"")
        .file("chain/deep/.wh..wh..opq", 0o644, b"")
        .file("chain/deep/fresh", 0o644, b"fresh")
        .file("var/lib/x", 0o644, b"implied parents")
        .file("d0/.wh.d1/x", 0o644, b"a file in a directory named .wh.d1")
        .dir("d0/.wh.d2/", 0o700)
        .file("/etc/absolute", 0o644, b"an absolute member path")
        .symlink("opt/link", "/srv/real")
        .file("opt/link/f", 0o644, b"through a symlink of this layer");
    l
}

/// Directories that no layer defines, and `var` and `d0`, lower directories in which
/// one of them is made: their mtimes are the exceptions.
const MTIME_EXCEPTIONS: [&str; 7] = [
    "var/lib",
    "d0/.wh.d1",
    "opt",
    "srv",
    "srv/real",
    "var",
    "d0",
];

/// Differences from the umoci reference, but for the mtimes of [`MTIME_EXCEPTIONS`].
fn against_umoci(rootfs: &Path, actual: &Path) -> Vec<String> {
    differences(rootfs, actual, &umoci_compare())
        .into_iter()
        .filter(|d| {
            !(matches!(d.what, What::Mtime(..))
                && MTIME_EXCEPTIONS.iter().any(|u| d.path == Path::new(u)))
        })
        .map(|d| d.to_string())
        .collect()
}

fn assert_same_as_umoci(rootfs: &Path, actual: &Path, what: &str) {
    let diffs = against_umoci(rootfs, actual);
    assert!(
        diffs.is_empty(),
        "{what} vs umoci unpack: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Writes `layers` as tars and makes `oci:DIR/layout:TAG` of them.
fn image(dir: &Path, tag: &str, layers: &[LayerTar]) -> (PathBuf, Vec<PathBuf>) {
    let layout = dir.join("layout");
    let tars: Vec<PathBuf> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let p = dir.join(format!("{tag}-layer{i}.tar"));
            l.write(&p).unwrap();
            p
        })
        .collect();
    umoci_image(&layout, tag, &tars);
    (layout, tars)
}

/// The reference tree must show what the cases are about, or the comparison proves
/// nothing: each case is checked on umoci's result first.
fn assert_reference_shows_the_cases(rootfs: &Path) {
    let link = fs::read_link(rootfs.join("lib")).unwrap();
    assert_eq!(link, Path::new("usr/lib"));
    for (path, content) in [
        ("usr/lib/libc.so.6", &b"libc"[..]),
        ("usr/lib/libnew.so", b"new"),
        ("usr/lib/viaabs", b"via an absolute symlink"),
        ("usr/lib/viachain", b"via a chain"),
        ("usr/lib/deep/viaup", b"via .."),
        (
            "usr/lib/deep/viadeeper",
            b"via a symlink deeper in the tree",
        ),
        ("usr/lib/deep/fresh", b"fresh"),
        ("var/lib/x", b"implied parents"),
        ("d0/d1/kept", b"kept"),
        ("d0/.wh.d1/x", b"a file in a directory named .wh.d1"),
        ("etc/absolute", b"an absolute member path"),
        ("srv/real/f", b"through a symlink of this layer"),
    ] {
        assert_eq!(fs::read(rootfs.join(path)).unwrap(), content, "{path}");
    }
    for gone in ["usr/lib/libm.so.6", "usr/lib/deep/old", "d0/d2"] {
        assert!(!rootfs.join(gone).exists(), "{gone} should be deleted");
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let var = fs::metadata(rootfs.join("var")).unwrap();
    assert_eq!(
        (var.permissions().mode() & 0o7777, var.uid(), var.gid()),
        (0o2750, 7, 8)
    );
    assert_eq!(
        xattr::get(rootfs.join("var"), "user.kept").unwrap(),
        Some(b"yes".to_vec())
    );
}

#[test]
fn converted_and_merged_real_world_layers_equal_umoci_unpack() {
    require_root_tools(&[
        "umoci",
        "docker-registry",
        "skopeo",
        "losetup",
        "mount",
        "tar",
    ]);
    let t = tempfile::tempdir().unwrap();
    let (layout, tars) = image(t.path(), "cases", &[base(), upper()]);
    let rootfs = umoci_rootfs(&layout, "cases", t.path());
    assert_reference_shows_the_cases(&rootfs);

    // 1. `nydusify convert` from the OCI layout to a registry, and `nydusify check`.
    let reg = Registry::start();
    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let source = format!("oci:{}:cases", layout.display());
    let target = format!("{}/cases:nydus", reg.addr);
    nydusify_ok(
        &["convert", "--source", &source, "--target", &target],
        &work,
    );
    nydusify_ok(&["check", "--source", &source, "--target", &target], &work);

    let (boot, blobs) = pull_nydus_image(&target, t.path());
    {
        let m = ErofsMount::new(&boot, &blobs, &t.path().join("erofs-converted"));
        assert_same_as_umoci(&rootfs, &m.mnt, "nydusify convert, kernel EROFS mount");
    }
    let unpacked = t.path().join("unpacked-converted");
    unpack_image(&boot, &blobs, &unpacked);
    assert_same_as_umoci(&rootfs, &unpacked, "nydusify convert, nydus-image unpack");

    // 2. `nydus-image create` of each layer for merging, then `nydus-image merge`.
    let blob_dir = t.path().join("blobs");
    let mut boots = Vec::new();
    for (i, tar) in tars.iter().enumerate() {
        let out = t.path().join(format!("layer{i}"));
        let img = build_image(
            tar,
            &out,
            &[
                "-t",
                "tar-rafs",
                "--whiteout-spec",
                "none",
                "--log-level",
                "warn",
            ],
        );
        for b in fs::read_dir(&img.blobs).unwrap() {
            let b = b.unwrap();
            fs::create_dir_all(&blob_dir).unwrap();
            fs::rename(b.path(), blob_dir.join(b.file_name())).unwrap();
        }
        boots.push(img.boot);
    }
    let merged = t.path().join("merged.boot");
    run_ok(
        Command::new(bin("nydus-image"))
            .args(["merge", "--log-level", "warn", "-B"])
            .arg(&merged)
            .args(&boots),
    );
    {
        let m = ErofsMount::new(&merged, &blob_dir, &t.path().join("erofs-merged"));
        assert_same_as_umoci(&rootfs, &m.mnt, "nydus-image merge, kernel EROFS mount");
    }
    let unpacked = t.path().join("unpacked-merged");
    unpack_image(&merged, &blob_dir, &unpacked);
    assert_same_as_umoci(&rootfs, &unpacked, "nydus-image merge, nydus-image unpack");
}

/// A layer of one small file at `path`.
fn one_file(path: &str) -> LayerTar {
    let mut l = LayerTar::default();
    l.file(path, 0o644, b"y");
    l
}

#[test]
fn layers_that_cannot_be_applied_fail_naming_layer_and_path() {
    require_root_tools(&["umoci", "docker-registry"]);
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let cases: [(&str, LayerTar, &[&str]); 3] = [
        (
            "loop",
            one_file("loop1/y"),
            &[
                "2/2 sha256:",
                "entry '/loop1/y'",
                "too many levels of symbolic links",
            ],
        ),
        (
            "notdir",
            one_file("etc/file/y"),
            &[
                "2/2 sha256:",
                "entry '/etc/file/y'",
                "'/etc/file' is in the way",
            ],
        ),
        (
            "longlink",
            {
                let mut l = LayerTar::default();
                l.pax(&[("linkpath", "t".repeat(4097).as_bytes())])
                    .symlink("etc/long", "t");
                l
            },
            &[
                "etc/long",
                "symlink target of 4097 bytes exceeds 4096 bytes",
            ],
        ),
    ];
    for (tag, layer, wants) in cases {
        let dir = t.path().join(tag);
        fs::create_dir_all(&dir).unwrap();
        let (layout, _) = image(&dir, tag, &[base(), layer]);
        let source = format!("oci:{}:{tag}", layout.display());
        let target = format!("{}/bad:{tag}", reg.addr);
        let out = nydusify(
            &["convert", "--source", &source, "--target", &target],
            &work,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tag}: converted: {err}");
        for want in wants {
            assert!(err.contains(want), "{tag}: '{want}' not in: {err}");
        }
    }
}

#[test]
fn nydus_image_create_refuses_a_symlink_target_its_reader_would_reject() {
    let t = tempfile::tempdir().unwrap();
    let mut l = LayerTar::default();
    l.pax(&[("linkpath", "t".repeat(4096).as_bytes())])
        .symlink("ok", "t")
        .pax(&[("linkpath", "t".repeat(4097).as_bytes())])
        .symlink("dir/too-long", "t");
    let tar = t.path().join("l.tar");
    l.write(&tar).unwrap();
    let out = Command::new(bin("nydus-image"))
        .args(["create", "-t", "tar-rafs", "-B"])
        .arg(t.path().join("out.boot"))
        .arg("-D")
        .arg(t.path())
        .arg(&tar)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Tar entry 'dir/too-long'"), "{err}");
    assert!(err.contains("4097 bytes exceeds 4096 bytes"), "{err}");
    assert!(!t.path().join("out.boot").exists());
}

#[test]
fn layer_bootstraps_built_by_upstream_have_no_mark_and_merge_as_upstream_merges_them() {
    let t = tempfile::tempdir().unwrap();
    let mut lower = LayerTar::default();
    lower
        .dir("usr/", 0o755)
        .dir("usr/lib/", 0o755)
        .file("usr/lib/libc.so.6", 0o755, b"libc")
        .symlink("lib", "usr/lib");
    let mut upper = LayerTar::default();
    upper.file("lib/libnew.so", 0o755, b"new");
    let mut boots = Vec::new();
    for (i, l) in [lower, upper].iter().enumerate() {
        let tar = t.path().join(format!("l{i}.tar"));
        l.write(&tar).unwrap();
        let flags = ["-t", "tar-rafs", "--log-level", "warn"];
        let out = t.path().join(format!("l{i}"));
        boots.push(build_image_with(&upstream_bin("nydus-image"), &tar, &out, &flags).boot);
    }
    for (who, nydus_image) in [
        ("ours", bin("nydus-image")),
        ("upstream", upstream_bin("nydus-image")),
    ] {
        let merged = t.path().join(format!("{who}.boot"));
        run_ok(
            Command::new(nydus_image)
                .args(["merge", "--log-level", "warn", "-B"])
                .arg(&merged)
                .args(&boots),
        );
        // Without the mark, `lib/` is taken as the upper layer's own directory: it
        // replaces the symlink, in both merges (README, "How layers stack").
        let bs = rafs::read::Bootstrap::open(&merged).unwrap();
        assert!(bs.lookup_path("/lib").unwrap().is_dir(), "{who}");
        assert!(bs.lookup_path("/lib/libnew.so").unwrap().is_reg(), "{who}");
        assert!(
            bs.lookup_path("/usr/lib/libc.so.6").unwrap().is_reg(),
            "{who}"
        );
    }
}
