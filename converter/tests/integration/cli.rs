//! `nydus-image create` end to end: flags as upstream names them, JSON output, exit codes
//! and error messages.

use crate::common::{listing, TarMaker};
use rafs::read::Bootstrap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn nydus_image(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nydus-image"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn small_dir(root: &Path) -> std::path::PathBuf {
    let src = root.join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/sh"), b"#!/bin/true\n").unwrap();
    fs::write(src.join("README"), b"readme").unwrap();
    src
}

#[test]
fn create_writes_bootstrap_blob_and_json() {
    let t = tempfile::tempdir().unwrap();
    let src = small_dir(t.path());
    let blobs = t.path().join("blobs");
    fs::create_dir(&blobs).unwrap();
    let boot = t.path().join("boot");
    let json = t.path().join("out.json");
    let o = nydus_image(
        &[
            "create",
            "-l",
            "warn",
            "-B",
            p(&boot),
            "-D",
            p(&blobs),
            "-J",
            p(&json),
            "--chunk-size",
            "0x10000",
            "--compressor",
            "lz4_block",
            "--digester",
            "sha256",
            "--features",
            "blob-toc",
            p(&src),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["fs_version"], "6");
    assert_eq!(doc["compressor"], "lz4_block");
    assert_eq!(doc["bootstrap"], p(&boot));
    assert_eq!(doc["chunk_size"], "0x10000");
    let id = doc["blobs"][0].as_str().unwrap().to_string();
    assert_eq!(listing(&blobs), std::slice::from_ref(&id));
    assert_eq!(
        doc["blob_details"][0]["compressed_size"],
        fs::metadata(blobs.join(&id)).unwrap().len()
    );
    let bs = Bootstrap::open(&boot).unwrap();
    assert_eq!(bs.blobs()[0].id, id);
    assert_eq!(bs.superblock().chunk_size, 0x10000);
    assert_eq!(bs.blobs()[0].digester, rafs::Digester::Sha256);
    assert!(bs.blobs()[0].toc_size > 0);
}

#[test]
fn prefetch_patterns_are_read_from_stdin() {
    let t = tempfile::tempdir().unwrap();
    let src = small_dir(t.path());
    let boot = t.path().join("boot");
    let blob = t.path().join("blob");
    let o = nydus_image(
        &[
            "create",
            "--prefetch-policy",
            "fs",
            "-B",
            p(&boot),
            "-b",
            p(&blob),
            "--type",
            "directory",
            p(&src),
        ],
        b"/bin/sh\n\n/bin\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bs = Bootstrap::open(&boot).unwrap();
    let sh = bs.lookup_path("/bin/sh").unwrap();
    assert_eq!(
        bs.prefetch_table().unwrap(),
        [sh.nid, bs.lookup_path("/bin").unwrap().nid]
    );
    // The prefetched file's data comes first.
    assert_eq!(bs.chunk(&sh, 0).unwrap().ci_index, 0);
}

#[test]
fn tar_layers_build_with_inline_meta_like_nydusify() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("etc/hostname", 0o644, b"box\n")
        .file(".wh.removed", 0o644, b"");
    let layer = t.path().join("layer.tar");
    fs::write(&layer, m.finish()).unwrap();
    let blob = t.path().join("layer.blob");
    let o = nydus_image(
        &[
            "create",
            "--source-type",
            "tar-rafs",
            "--inline-bootstrap",
            "--features",
            "blob-toc",
            "--whiteout-spec",
            "none",
            "--fs-version",
            "6",
            "-b",
            p(&blob),
            p(&layer),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let f = fs::File::open(&blob).unwrap();
    let bs = Bootstrap::from_bytes(rafs::read::read_inline_bootstrap(&f).unwrap()).unwrap();
    assert!(bs.lookup_path("/etc/hostname").is_ok());
    assert!(bs.lookup_path("/.wh.removed").is_ok(), "none keeps markers");
}

#[test]
fn unsupported_choices_fail_with_a_clear_message() {
    let t = tempfile::tempdir().unwrap();
    let src = small_dir(t.path());
    let boot = t.path().join("boot");
    let blob = t.path().join("blob");
    let cases: &[(&[&str], &str)] = &[
        (&["-v", "5"], "RAFS v5 is not supported"),
        (&["-t", "estargz-rafs"], "'estargz-rafs' is not supported"),
        (&["-t", "tar-tarfs"], "'tar-tarfs' is not supported"),
        (&["--prefetch-policy", "blob"], "'blob' is not supported"),
        (
            &["--compressor", "gzip"],
            "not one of none, lz4_block, zstd",
        ),
        (&["--chunk-size", "0x3000"], "not a power of two"),
        (&["--chunk-size", "big"], "is not a number"),
        (&["--blob-inline-meta"], "cannot be used with"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["create", "-B", p(&boot), "-b", p(&blob)];
        args.extend_from_slice(extra);
        args.push(p(&src));
        let o = nydus_image(&args, b"");
        assert!(!o.status.success(), "{extra:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(expected), "{extra:?}: {e}");
    }
    assert!(listing(t.path()) == ["src"], "{:?}", listing(t.path()));
}

#[test]
fn missing_outputs_are_explained() {
    let t = tempfile::tempdir().unwrap();
    let src = small_dir(t.path());
    let o = nydus_image(&["create", "-B", p(&t.path().join("boot")), p(&src)], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("both --blob and --blob-dir are missing"),
        "{}",
        stderr(&o)
    );
    let o = nydus_image(&["create", "-b", p(&t.path().join("blob")), p(&src)], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("both --bootstrap and --blob-dir are missing"),
        "{}",
        stderr(&o)
    );
    let o = nydus_image(&["create", "--blob-inline-meta", p(&src)], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("needs --blob or --blob-dir"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_bad_tar_exits_1_with_the_error_chain_and_no_outputs() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.raw(b"../../etc/passwd", tar::EntryType::Regular, b"", b"x");
    let layer = t.path().join("evil.tar");
    fs::write(&layer, m.finish()).unwrap();
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let o = nydus_image(
        &[
            "create",
            "-t",
            "targz-rafs",
            "-B",
            p(&out.join("boot")),
            "-D",
            p(&out),
            p(&layer),
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("Error: Tar entry '../../etc/passwd': path has a '..' component"),
        "{e}"
    );
    assert!(listing(&out).is_empty());
}

#[test]
fn help_explains_the_create_flags() {
    let o = nydus_image(&["create", "--help"], b"");
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--bootstrap",
        "--blob-dir",
        "--blob-inline-meta",
        "--whiteout-spec",
        "--prefetch-policy",
        "--output-json",
        "--repeatable",
        "Examples:",
    ] {
        assert!(help.contains(flag), "{flag} missing from help");
    }
}
