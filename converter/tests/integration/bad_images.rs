//! Corrupt bootstraps and blobs given to `nydus-image check|inspect|unpack`: each gives an
//! error that names what is wrong, never a panic, and never writes wrong file data.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Built {
    _dir: tempfile::TempDir,
    boot: PathBuf,
    blobs: PathBuf,
    blob: PathBuf,
}

fn golden() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("image.boot");
    let blobs = dir.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let tar = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden/golden.tar");
    let st = Command::new(env!("CARGO_BIN_EXE_nydus-image"))
        .args([
            "create",
            "-l",
            "warn",
            "-t",
            "tar-rafs",
            "--chunk-size",
            "0x1000",
            "--features",
            "blob-toc",
            "-B",
        ])
        .arg(&boot)
        .arg("-D")
        .arg(&blobs)
        .arg(&tar)
        .status()
        .unwrap();
    assert!(st.success());
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    Built {
        _dir: dir,
        boot,
        blobs,
        blob,
    }
}

/// Runs `nydus-image ARGS`; returns (success, stderr).
fn run(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nydus-image"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.success(), stderr)
}

fn check(b: &Built) -> (bool, String) {
    run(&[
        "check".as_ref(),
        b.boot.as_os_str(),
        "-D".as_ref(),
        b.blobs.as_os_str(),
    ])
}

/// `nydus-image unpack` of `b` into the tar `out`; returns (success, stderr).
fn unpack(b: &Built, out: &Path) -> (bool, String) {
    run(&[
        "unpack".as_ref(),
        b.boot.as_os_str(),
        "-D".as_ref(),
        b.blobs.as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ])
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn intact_golden_image_checks_clean() {
    let b = golden();
    let (ok, err) = check(&b);
    assert!(ok, "{err}");
}

#[test]
fn corrupted_header_fields_are_named() {
    // (offset, bytes, words the error must contain)
    let cases: &[(usize, &[u8], &str)] = &[
        (1024, &[0, 0, 0, 0], "superblock.s_magic"),
        (1028, &[1, 0, 0, 0], "superblock.s_checksum"),
        (1032, &[0, 0, 0, 0], "superblock.s_feature_compat"),
        (1036, &[13], "superblock.s_blkszbits"),
        (1037, &[1], "superblock.s_extslots"),
        (1040, &[0; 8], "superblock.s_inos"),
        (1064, &[0xff, 0xff, 0, 0], "superblock.s_meta_blkaddr"),
        (1068, &[1, 0, 0, 0], "superblock.s_xattr_blkaddr"),
        (1104, &[0x0d, 0, 0, 0], "superblock.s_feature_incompat"),
        (1110, &[0xff, 0xff], "superblock.s_extra_devices"),
        (1112, &[12, 0], "superblock.s_devt_slotoff"),
        (1152, &[0x03, 0, 0, 0], "s_flags"),
        (1152 + 20, &[0, 0x30, 0, 0], "s_chunk_size"),
        (1152 + 16, &[0, 2, 0, 0], "s_blob_table_size"),
        (1152 + 32, &[81, 0, 0, 0], "s_chunk_table_size"),
        (1408 + 64, &[0, 0, 0, 0], "device slot 0.blocks"),
        (4096 + 64, &[1, 0, 0, 0], "blob table entry 0.blob_index"),
        (4096 + 68, &[0, 0x20, 0, 0], "blob table entry 0.chunk_size"),
        (
            4096 + 76,
            &[9, 0, 0, 0],
            "blob table entry 0.compression_algo",
        ),
        (
            4096 + 84,
            &[0x21, 0x10, 0, 0x70],
            "blob table entry 0.features",
        ),
        (
            4096 + 128,
            &[0xff, 0, 0, 0],
            "blob table entry 0.ci_uncompressed_size",
        ),
    ];
    for (at, bytes, field) in cases {
        let b = golden();
        patch(&b.boot, *at, bytes);
        let (ok, err) = check(&b);
        assert!(!ok, "corruption at {at} was accepted");
        assert!(
            err.contains(field),
            "corruption at {at}: error does not name {field}: {err}"
        );
    }
}

#[test]
fn corrupted_inodes_and_dirents_are_rejected() {
    // The root inode is at meta (8192) + 128 * 32; its format, mode and size fields.
    for (at, bytes, words) in [
        (12288usize, &[0xff, 0xff][..], "i_format"),
        (12288 + 4, &[0, 0][..], "file type"),
        (
            12288 + 8,
            &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][..],
            "inode 128",
        ),
    ] {
        let b = golden();
        patch(&b.boot, at, bytes);
        let (ok, err) = check(&b);
        assert!(!ok, "corruption at {at} accepted");
        assert!(err.contains(words), "at {at}: {err}");
    }
}

#[test]
fn truncated_bootstraps_are_refused() {
    let b = golden();
    let full = std::fs::read(&b.boot).unwrap();
    for len in [0, 512, 1100, 4095, 4096, 8192, full.len() - 4096] {
        std::fs::write(&b.boot, &full[..len]).unwrap();
        let (ok, err) = check(&b);
        assert!(!ok, "bootstrap truncated to {len} accepted");
        assert!(
            err.to_lowercase().contains("truncated")
                || err.contains("bootstrap")
                || err.contains("Invalid"),
            "{len}: {err}"
        );
    }
}

#[test]
fn every_byte_flip_in_the_metadata_is_caught_or_harmless() {
    // Flip each byte of the bootstrap in turn: check either fails with an error or passes;
    // when it passes, unpack must yield exactly the original file data (never wrong data).
    let b = golden();
    let full = std::fs::read(&b.boot).unwrap();
    let reference = b.boot.with_extension("ref.tar");
    let (ok, err) = unpack(&b, &reference);
    assert!(ok, "{err}");
    let contents = |tar: &Path| -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(std::fs::File::open(tar).unwrap());
        let mut v = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.header().entry_type() == tar::EntryType::Regular {
                let mut d = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut d).unwrap();
                v.push((e.path().unwrap().display().to_string(), d));
            }
        }
        v.sort();
        v
    };
    let want = contents(&reference);
    let out = b.boot.with_extension("flip.tar");
    // Every byte of the headers, and a stride through the rest.
    let positions: Vec<usize> = (1024..1664)
        .chain((4096..4352).step_by(3))
        .chain((8192..full.len()).step_by(7))
        .collect();
    for at in positions {
        let mut data = full.clone();
        data[at] ^= 0xa5;
        std::fs::write(&b.boot, &data).unwrap();
        let (ok, _) = unpack(&b, &out);
        if ok {
            let got = contents(&out);
            // Names may change with a flipped name byte; the bytes of every file must
            // still be bytes of some original file at the same size.
            for (name, data) in &got {
                assert!(
                    want.iter().any(|(_, d)| d == data),
                    "flip at {at}: {name} has data no source file had"
                );
            }
        }
    }
}

#[test]
fn corrupted_blob_chunk_fails_check_and_unpack_naming_the_chunk() {
    let b = golden();
    // Flip a byte in the chunk data area (the start of the blob).
    let mut data = std::fs::read(&b.blob).unwrap();
    data[30] ^= 0xff;
    std::fs::write(&b.blob, &data).unwrap();
    let (ok, err) = check(&b);
    assert!(!ok, "corrupted blob accepted");
    assert!(
        err.contains("digest mismatch") || err.contains("Decompressing"),
        "{err}"
    );
    let out = b.boot.with_extension("tar");
    let (ok, err) = unpack(&b, &out);
    assert!(!ok, "unpack of a corrupted blob succeeded");
    assert!(err.contains("chunk"), "{err}");
    assert!(!out.exists(), "a partial tar was left behind");
}

#[test]
fn missing_or_truncated_blob_is_reported() {
    let b = golden();
    let data = std::fs::read(&b.blob).unwrap();
    std::fs::write(&b.blob, &data[..data.len() / 2]).unwrap();
    let (ok, err) = check(&b);
    assert!(!ok);
    assert!(
        err.contains("Truncated") || err.contains("ci array") || err.contains("blob"),
        "{err}"
    );
    std::fs::remove_file(&b.blob).unwrap();
    let (ok, err) = check(&b);
    assert!(!ok);
    assert!(
        err.contains(b.blob.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn inspect_rejects_unknown_requests_and_missing_paths() {
    let b = golden();
    let (ok, err) = run(&[
        "inspect".as_ref(),
        b.boot.as_os_str(),
        "-R".as_ref(),
        "frobnicate".as_ref(),
    ]);
    assert!(!ok && err.contains("unknown inspect request"), "{err}");
    let (ok, err) = run(&[
        "inspect".as_ref(),
        b.boot.as_os_str(),
        "-R".as_ref(),
        "stat /nope".as_ref(),
    ]);
    assert!(!ok && err.contains("/nope"), "{err}");
}
