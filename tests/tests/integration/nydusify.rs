//! `nydusify convert` with real components (issue 3): a multi-layer busybox image built
//! by `fixtures/make-busybox-image.sh` (umoci), pushed with skopeo to Debian's
//! docker-registry on 127.0.0.1, converted registry → registry, inspected with
//! `skopeo inspect --raw`, and its merged bootstrap read back.

use rafs_e2e::{
    bin, bootstrap_of_layout, compare_trees_with, is_mounted, noise, pull_nydus_image,
    require_root_tools, run_ok, start_upstream_nydusd, umoci_compare, umoci_rootfs, wait_until,
    ChildGuard, ErofsMount, Mount, Registry,
};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn fixture_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/make-busybox-image.sh")
}

/// Builds the multi-layer busybox fixture into the OCI layout `layout`, tagged `tag`.
pub(crate) fn make_busybox(layout: &Path, tag: &str) {
    run_ok(
        Command::new("bash")
            .arg(fixture_script())
            .arg(layout)
            .arg(tag),
    );
}

pub(crate) fn nydusify(args: &[&str], work: &Path) -> Output {
    Command::new(bin("nydusify"))
        .args(args)
        .arg("--work-dir")
        .arg(work)
        .output()
        .unwrap()
}

/// Runs nydusify like [`nydusify`] and fails the test, showing both output streams,
/// unless it succeeded.
pub(crate) fn nydusify_ok(args: &[&str], work: &Path) -> Output {
    let out = nydusify(args, work);
    assert!(
        out.status.success(),
        "nydusify {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn inspect_raw(reference: &str) -> String {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn busybox_image_converts_registry_to_registry_deterministically() {
    require_root_tools(&["docker-registry", "skopeo", "umoci", "busybox", "tar"]);
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    let reg = Registry::start();
    let src = format!("{}/busybox:v1", reg.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{src}"),
    ]));

    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let json1 = t.path().join("r1.json");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &format!("{}/busybox:v1-nydus", reg.addr),
            "--output-json",
            json1.to_str().unwrap(),
        ],
        &work,
    );

    let m = inspect_raw(&format!("{}/busybox:v1-nydus", reg.addr));
    assert!(
        m.contains("application/vnd.oci.image.manifest.v1+json"),
        "{m}"
    );
    assert_eq!(
        m.matches("application/vnd.oci.image.layer.nydus.blob.v1")
            .count(),
        3,
        "{m}"
    );
    assert!(
        m.contains(r#""containerd.io/snapshot/nydus-blob":"true""#),
        "{m}"
    );
    assert!(
        m.contains(r#""containerd.io/snapshot/nydus-bootstrap":"true""#),
        "{m}"
    );
    assert!(
        m.contains(r#""containerd.io/snapshot/nydus-fs-version":"6""#),
        "{m}"
    );
    assert!(
        m.contains(r#""containerd.io/uncompressed":"sha256:"#),
        "{m}"
    );
    // The bootstrap layer is last.
    let boot_at = m.find("nydus-bootstrap").unwrap();
    assert!(m.rfind("nydus.blob.v1").unwrap() < boot_at, "{m}");

    // Converting again gives the same digests.
    let json2 = t.path().join("r2.json");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &format!("{}/busybox:v1-nydus-again", reg.addr),
            "--output-json",
            json2.to_str().unwrap(),
        ],
        &work,
    );
    let digest = |p: &Path| {
        let s = fs::read_to_string(p).unwrap();
        let at = s.find("\"digest\": \"").unwrap() + 11;
        s[at..at + 71].to_string()
    };
    assert_eq!(digest(&json1), digest(&json2));

    // The merged bootstrap applies the whiteouts: convert into a layout and read it.
    let out_layout = t.path().join("nydus-layout");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &format!("oci:{}:nydus", out_layout.display()),
        ],
        &work,
    );
    let bs = bootstrap_of_layout(&out_layout);
    let exists = |p: &str| bs.lookup_path(p).is_ok();
    assert!(!exists("/etc/motd"), "whiteout applied");
    assert!(!exists("/etc/link-b"));
    assert!(exists("/etc/link-a"));
    assert!(exists("/etc/issue/README"), "file replaced by a directory");
    assert!(
        exists("/opt/app/main") && !exists("/opt/app/sub"),
        "dir → file → dir"
    );
    assert!(exists("/var/lib/fresh") && !exists("/var/lib/db") && !exists("/var/lib/state"));
    assert!(exists("/bin/busybox") && exists("/bin/sh"));
    assert_eq!(
        fs::read_dir(t.path().join("work")).unwrap().count(),
        0,
        "the work directory is cleaned up"
    );
}

#[test]
fn bad_sources_fail_clearly_and_push_nothing() {
    require_root_tools(&["docker-registry", "skopeo", "umoci", "busybox", "tar"]);
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    let reg = Registry::start();
    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();

    // A missing tag.
    let out = nydusify(
        &[
            "convert",
            "--source",
            &format!("{}/busybox:nope", reg.addr),
            "--target",
            &format!("{}/busybox:x", reg.addr),
        ],
        &work,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not found"), "{err}");

    // A layer whose bytes do not match the manifest digest.
    let index = fs::read_to_string(layout.join("index.json")).unwrap();
    let at = index.find("sha256:").unwrap() + 7;
    let manifest =
        fs::read_to_string(layout.join("blobs/sha256").join(&index[at..at + 64])).unwrap();
    let l = manifest.find("layer.v1.tar+gzip").unwrap();
    let d = manifest[l..].find("sha256:").unwrap() + l + 7;
    let layer = layout.join("blobs/sha256").join(&manifest[d..d + 64]);
    let mut bytes = fs::read(&layer).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0xff;
    fs::write(&layer, bytes).unwrap();
    let out = nydusify(
        &[
            "convert",
            "--source",
            &format!("oci:{}:v1", layout.display()),
            "--target",
            &format!("{}/busybox:corrupt", reg.addr),
        ],
        &work,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&manifest[d - 7..d + 64]),
        "the error names the layer: {err}"
    );
    let probe = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/busybox:corrupt", reg.addr),
        ])
        .output()
        .unwrap();
    assert!(!probe.status.success(), "nothing is tagged at the target");
}

/// Pushes the busybox fixture to `reg` as `busybox:TAG` and returns the OCI layout.
pub(crate) fn push_busybox(reg: &Registry, dir: &Path, tag: &str) -> PathBuf {
    let layout = dir.join(format!("oci-{tag}"));
    make_busybox(&layout, tag);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{}/busybox:{tag}", reg.addr),
    ]));
    layout
}

/// Rewrites layer `n` (0-based) of the single image in an OCI layout with `edit`
/// applied to each tar entry (header, data), fixing the manifest and index digests.
pub(crate) fn rewrite_layer(
    layout: &Path,
    n: usize,
    edit: impl Fn(&str, &mut tar::Header, &mut Vec<u8>),
) {
    edit_manifest(layout, |manifest| {
        let blobs = layout.join("blobs/sha256");
        let ldigest = manifest["layers"][n]["digest"].as_str().unwrap()[7..].to_string();
        let gz = rewrite_tar_gz(&fs::read(blobs.join(&ldigest)).unwrap(), &edit);
        fs::write(blobs.join(sha256_hex(&gz)), &gz).unwrap();
        manifest["layers"][n]["digest"] = format!("sha256:{}", sha256_hex(&gz)).into();
        manifest["layers"][n]["size"] = gz.len().into();
    });
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

/// Applies `edit` to the manifest of the single image in an OCI layout, storing the
/// new manifest and pointing the index at it.
pub(crate) fn edit_manifest(layout: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let blobs = layout.join("blobs/sha256");
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let mdesc = &mut index["manifests"][0];
    let mdigest = mdesc["digest"].as_str().unwrap()[7..].to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blobs.join(&mdigest)).unwrap()).unwrap();
    edit(&mut manifest);
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    fs::write(blobs.join(sha256_hex(&mbytes)), &mbytes).unwrap();
    mdesc["digest"] = format!("sha256:{}", sha256_hex(&mbytes)).into();
    mdesc["size"] = mbytes.len().into();
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// A gzipped tar with `edit` applied to each entry (path, header, data) of `gz`.
fn rewrite_tar_gz(gz: &[u8], edit: &impl Fn(&str, &mut tar::Header, &mut Vec<u8>)) -> Vec<u8> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    let mut out = tar::Builder::new(Vec::new());
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        edit(&path, &mut h, &mut data);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.append(&h, &data[..]).unwrap();
    }
    let tar = out.into_inner().unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &tar).unwrap();
    enc.finish().unwrap()
}

#[test]
fn nydusify_check_passes_on_a_conversion_and_lists_each_file_of_a_tampered_one() {
    require_root_tools(&["docker-registry", "skopeo", "umoci", "busybox", "tar"]);
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let layout = push_busybox(&reg, t.path(), "v1");
    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let src = format!("{}/busybox:v1", reg.addr);
    let target = format!("{}/busybox:v1-nydus", reg.addr);
    nydusify_ok(&["convert", "--source", &src, "--target", &target], &work);
    let out = nydusify_ok(&["check", "--source", &src, "--target", &target], &work);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("OK: "), "{stdout}");

    // A nydus image built from a modified top layer: same-size new content of one
    // file and new permission bits of another.
    let tampered = t.path().join("tampered");
    run_ok(Command::new("cp").arg("-a").arg(&layout).arg(&tampered));
    rewrite_layer(&tampered, 2, |path, h, data| {
        if path.ends_with("etc/hostname") {
            data.iter_mut().take(3).for_each(|b| *b = b'X');
        }
        if path.ends_with("opt/app/main") {
            h.set_mode(0o700);
        }
    });
    let bad = format!("{}/busybox:tampered-nydus", reg.addr);
    nydusify_ok(
        &[
            "convert",
            "--source",
            &format!("oci:{}:v1", tampered.display()),
            "--target",
            &bad,
        ],
        &work,
    );
    let out = nydusify(&["check", "--source", &src, "--target", &bad], &work);
    assert!(
        !out.status.success(),
        "check accepted a nydus image of a modified layer"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("/etc/hostname: content sha256: source "),
        "{stdout}"
    );
    assert!(
        stdout.contains("/opt/app/main: mode: source 0644, nydus 0700"),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().count(),
        2,
        "exactly the two changes: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 place(s)"), "{stderr}");
}

fn assert_no_diffs(diffs: Vec<String>, what: &str) {
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Pushes the busybox fixture as `busybox:v1` to a new registry, converts it to
/// `busybox:v1-nydus` there, and unpacks the source with umoci: (registry, source rootfs,
/// nydus image reference).
fn converted_busybox(dir: &Path) -> (Registry, PathBuf, String) {
    let reg = Registry::start();
    let layout = push_busybox(&reg, dir, "v1");
    let rootfs = umoci_rootfs(&layout, "v1", dir);
    let work = dir.join("work");
    fs::create_dir_all(&work).unwrap();
    let target = format!("{}/busybox:v1-nydus", reg.addr);
    let source = format!("{}/busybox:v1", reg.addr);
    nydusify_ok(
        &["convert", "--source", &source, "--target", &target],
        &work,
    );
    (reg, rootfs, target)
}

#[test]
fn converted_busybox_equals_umoci_unpack_on_kernel_erofs_and_upstream_nydusd() {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "umoci",
        "busybox",
        "tar",
        "losetup",
        "mount",
        "fusermount3",
    ]);
    let t = tempfile::tempdir().unwrap();
    let (reg, rootfs, target) = converted_busybox(t.path());

    // What the registry holds, copied back out by skopeo (not by our client).
    let (boot, blobs) = pull_nydus_image(&target, t.path());
    let bs = rafs::read::Bootstrap::open(&boot).unwrap();

    // 1. The kernel: the merged bootstrap with each blob expanded as a loop device.
    assert!(!bs.blobs().is_empty());
    let m = ErofsMount::new(&boot, &blobs, &t.path().join("erofs"));
    assert_no_diffs(
        compare_trees_with(&rootfs, &m.mnt, &umoci_compare()),
        "kernel EROFS mount vs umoci unpack",
    );
    drop(m);

    // 2. Upstream nydusd 2.2, reading the blobs straight from the registry.
    let port = reg.addr.rsplit_once(':').unwrap().1;
    let cache = t.path().join("cache");
    let fuse = t.path().join("fuse");
    fs::create_dir_all(&cache).unwrap();
    let cfg = t.path().join("nydusd.json");
    fs::write(
        &cfg,
        format!(
            r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http","host":"127.0.0.1:{port}","repo":"busybox","timeout":10,"connect_timeout":5,"retry_limit":2}}}},"cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}},"mode":"direct","digest_validate":false,"enable_xattr":true}}"#,
            cache.display()
        ),
    )
    .unwrap();
    let log_path = t.path().join("nydusd.log");
    let daemon = start_upstream_nydusd(&boot, &cfg, &fuse, &log_path);
    let diffs = compare_trees_with(&rootfs, &daemon.mnt, &umoci_compare());
    drop(daemon);
    assert_no_diffs(
        diffs,
        &format!(
            "upstream nydusd (registry backend) vs umoci unpack; nydusd log:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        ),
    );
}

/// Adds a layer holding `files` (path, content, mode) to `oci:LAYOUT:TAG` with umoci.
pub(crate) fn add_layer(layout: &Path, tag: &str, files: &[(&str, &[u8], u32)], work: &Path) {
    let tar_path = work.join(format!("layer-{}.tar", files.len()));
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    fs::write(&tar_path, b.into_inner().unwrap()).unwrap();
    run_ok(
        Command::new("umoci")
            .args(["raw", "add-layer", "--image"])
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&tar_path),
    );
}

pub(crate) fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn chunks_of_lower_layers_and_of_a_chunk_dict_are_referenced_not_stored_again() {
    require_root_tools(&["docker-registry", "skopeo", "umoci", "busybox", "tar"]);
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let busybox = fs::read(fs::canonicalize(which("busybox")).unwrap()).unwrap();

    // The busybox fixture plus a top layer with a copy of /bin/busybox: the copy's
    // chunks are all in layer 1's blob.
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    add_layer(
        &layout,
        "v1",
        &[("usr/bin/busybox-copy", &busybox, 0o755)],
        &work,
    );
    let src = format!("{}/dedup:v1", reg.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{src}"),
    ]));
    let target = format!("{}/dedup:v1-nydus", reg.addr);
    let report = t.path().join("r.json");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &target,
            "--output-json",
            report.to_str().unwrap(),
        ],
        &work,
    );
    let r = json(&report);
    let layers = r["images"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    let top = &layers[3];
    let copy_chunks = busybox.len().div_ceil(1 << 20) as u64;
    assert_eq!(top["file_chunks"], copy_chunks, "{top}");
    assert_eq!(top["dedup_chunks_other_blobs"], copy_chunks, "{top}");
    assert_eq!(top["chunks"], 0, "nothing new is stored: {top}");
    assert_eq!(
        top["referenced"], false,
        "an empty blob is not a layer: {top}"
    );
    assert!(r["dedup_chunks"].as_u64().unwrap() >= copy_chunks, "{r}");
    assert_eq!(
        r["dedup_bytes"].as_u64().unwrap(),
        busybox.len() as u64,
        "{r}"
    );
    nydusify_ok(&["check", "--source", &src, "--target", &target], &work);

    // A different image holding busybox again, converted with the first nydus image as
    // chunk dict: busybox's blob becomes a referenced blob layer of it.
    let other = t.path().join("other");
    run_ok(Command::new("umoci").args(["init", "--layout"]).arg(&other));
    run_ok(
        Command::new("umoci")
            .args(["new", "--image"])
            .arg(format!("{}:v1", other.display())),
    );
    add_layer(
        &other,
        "v1",
        &[
            ("bin/busybox", &busybox, 0o755),
            ("etc/other", b"a file only this image has\n", 0o644),
        ],
        &work,
    );
    let src2 = format!("{}/dedup:other", reg.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", other.display()),
        &format!("docker://{src2}"),
    ]));
    let dict = t.path().join("dict.boot");
    let pulled = t.path().join("pulled");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{target}"),
        &format!("oci:{}:n", pulled.display()),
    ]));
    let dict_bs = bootstrap_of_layout(&pulled);
    fs::write(&dict, dict_bs.bytes()).unwrap();
    let busybox_blob = &layers[0]["blob_digest"];
    let target2 = format!("{}/dedup:other-nydus", reg.addr);
    let report2 = t.path().join("r2.json");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src2,
            "--target",
            &target2,
            "--chunk-dict",
            &format!("bootstrap={}", dict.display()),
            "--output-json",
            report2.to_str().unwrap(),
        ],
        &work,
    );
    let r2 = json(&report2);
    assert_eq!(
        r2["images"][0]["reference_blobs"],
        serde_json::json!([busybox_blob]),
        "{r2}"
    );
    assert_eq!(
        r2["images"][0]["layers"][0]["dedup_chunks_other_blobs"], copy_chunks,
        "{r2}"
    );
    let m = inspect_raw(&target2);
    let id = &busybox_blob.as_str().unwrap()[7..];
    assert!(
        m.contains(&format!(
            r#""containerd.io/snapshot/nydus-reference-blob-ids":"[\"{id}\"]""#
        )),
        "{m}"
    );
    assert_eq!(
        m.matches("nydus.blob.v1").count(),
        2,
        "dict blob + own blob: {m}"
    );
    nydusify_ok(&["check", "--source", &src2, "--target", &target2], &work);

    // Into a repository that lacks the dict's blob: refused, nothing tagged.
    let out = nydusify(
        &[
            "convert",
            "--source",
            &src2,
            "--target",
            &format!("{}/elsewhere:x", reg.addr),
            "--chunk-dict",
            &format!("bootstrap={}", dict.display()),
        ],
        &work,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("push the chunk-dict image"), "{err}");
}

pub(crate) fn which(tool: &str) -> PathBuf {
    let out = run_ok(Command::new("sh").args(["-c", &format!("command -v {tool}")]));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn model_folder_builds_into_a_nydus_image_that_checks_against_the_folder() {
    require_root_tools(&["docker-registry"]);
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let model = t.path().join("model");
    fs::create_dir_all(model.join("tokenizer")).unwrap();
    let shard = noise(9 << 20, 7);
    fs::write(model.join("model-00001-of-00003.safetensors"), &shard).unwrap();
    fs::write(
        model.join("model-00002-of-00003.safetensors"),
        noise((6 << 20) + 12345, 11),
    )
    .unwrap();
    // A third shard identical to the first: its chunks are stored once.
    fs::write(model.join("model-00003-of-00003.safetensors"), &shard).unwrap();
    fs::write(
        model.join("config.json"),
        br#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}"#,
    )
    .unwrap();
    fs::write(
        model.join("tokenizer/tokenizer_config.json"),
        br#"{"model_max_length": 4096}"#,
    )
    .unwrap();
    fs::write(model.join("generation_config.json"), b"{}").unwrap();

    let target = format!("{}/models/llama:v1", reg.addr);
    let out_dir = t.path().join("out");
    let report = t.path().join("build.json");
    run_ok(
        Command::new(bin("nydusify"))
            .args(["build", "--source-dir"])
            .arg(&model)
            .args(["--target", &target, "--output-dir"])
            .arg(&out_dir)
            .arg("--output-json")
            .arg(&report)
            .arg("--work-dir")
            .arg(&work),
    );
    let r = json(&report);
    // 9 MiB + 6 MiB (+ a tail) of unique weights in 1 MiB chunks, plus the JSON files;
    // the identical third shard adds none.
    assert_eq!(r["chunks"], 9 + 7 + 3, "{r}");
    assert!(r["blob_size"].as_u64().unwrap() > 15 << 20, "{r}");
    assert!(r["blob_size"].as_u64().unwrap() < 17 << 20, "{r}");
    let id = &r["blob_digest"].as_str().unwrap()[7..];
    assert!(out_dir.join("image.boot").is_file() && out_dir.join(id).is_file());

    let m = inspect_raw(&target);
    assert_eq!(m.matches("nydus.blob.v1").count(), 1, "{m}");
    assert!(m.contains("nydus-bootstrap"), "{m}");
    nydusify_ok(
        &[
            "check",
            "--source-dir",
            model.to_str().unwrap(),
            "--target",
            &target,
        ],
        &work,
    );

    // A changed weight file is caught.
    let mut changed = shard.clone();
    changed[5 << 20] ^= 1;
    fs::write(model.join("model-00003-of-00003.safetensors"), &changed).unwrap();
    let out = nydusify(
        &[
            "check",
            "--source-dir",
            model.to_str().unwrap(),
            "--target",
            &target,
        ],
        &work,
    );
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("/model-00003-of-00003.safetensors: content sha256"),
        "{stdout}"
    );
}

pub(crate) use rafs_e2e::push_python_image as push_python;

/// The realistic fixture (`fixtures/make-python-image.sh`: debootstrap minbase + python3,
/// four layers with whiteouts, an opaque directory and a layer of duplicated data),
/// built once per machine into /var/tmp/rafs-fixtures and reused. Runs in CI (`cargo
/// test --workspace`); the first build takes a few minutes, later runs under a minute.
#[test]
fn python_image_converts_and_checks_registry_to_registry() {
    require_root_tools(&["docker-registry", "skopeo", "umoci", "debootstrap", "tar"]);
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let work = t.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let src = push_python(&reg.addr, None);
    let target = format!("{}/python:v1-nydus", reg.addr);
    let report = t.path().join("r.json");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &target,
            "--output-json",
            report.to_str().unwrap(),
        ],
        &work,
    );
    let r = json(&report);
    let layers = r["images"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4, "{r}");
    // Layer 4 repeats a library of layer 2 byte for byte: all its chunks dedup.
    assert!(
        layers[3]["dedup_chunks_other_blobs"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(layers[3]["chunks"], 0, "{r}");
    let out = nydusify_ok(&["check", "--source", &src, "--target", &target], &work);
    eprintln!("python fixture: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn nydusify_mount_serves_the_image_lazily_from_the_registry() {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "umoci",
        "busybox",
        "tar",
        "fusermount3",
    ]);
    let t = tempfile::tempdir().unwrap();
    let (_registry, rootfs, target) = converted_busybox(t.path());

    let mnt = t.path().join("mnt");
    let mwork = t.path().join("mount-work");
    let log = fs::File::create(t.path().join("mount.log")).unwrap();
    let daemon = ChildGuard::spawn(
        Command::new(bin("nydusify"))
            .args(["mount", "--target", &target, "--mount-path"])
            .arg(&mnt)
            .arg("--work-dir")
            .arg(&mwork)
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
    .unwrap();
    let mounted = wait_until(Duration::from_secs(30), || is_mounted(&mnt));
    assert!(
        mounted,
        "nydusify mount did not mount: {}",
        fs::read_to_string(t.path().join("mount.log")).unwrap_or_default()
    );
    let m = Mount::adopt(&mnt);
    // Only the bootstrap was downloaded: the chunk cache starts empty of data.
    let cached = |dir: &Path| -> u64 {
        fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".blob.data"))
                    .map(|e| {
                        use std::os::unix::fs::MetadataExt;
                        e.metadata().unwrap().blocks() * 512
                    })
                    .sum()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        cached(&mwork.join("cache")),
        0,
        "data was fetched before any read"
    );
    assert_no_diffs(
        compare_trees_with(&rootfs, &mnt, &umoci_compare()),
        "nydusify mount",
    );
    assert!(
        cached(&mwork.join("cache")) > 0,
        "reads did not go through the chunk cache"
    );
    drop(m);
    drop(daemon);
}
