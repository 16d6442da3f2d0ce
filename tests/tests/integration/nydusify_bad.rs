//! `nydusify` on the other sources and on bad input (issue 3): a docker-archive source,
//! multi-platform indexes, registries with basic auth, registries that answer 503 or
//! drop connections (a fault-injecting proxy in front of Debian's docker-registry),
//! layers escaping the root, encrypted layers and a read-only target. Every failure must
//! name what was wrong and leave nothing tagged at the target.

use super::nydusify::{
    add_layer, edit_manifest, inspect_raw, json, make_busybox, nydusify, nydusify_ok, push_busybox,
    push_python, rewrite_layer,
};
use rafs_e2e::{bin, require_root_tools, run_ok, Fault, FaultProxy, Registry};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &["docker-registry", "skopeo", "umoci", "busybox", "tar"];

/// Asserts that `out` is a failure and returns its stderr.
fn failure(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} succeeded:\n{}\n{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("{what}: {err}");
    assert!(
        !err.contains("panicked"),
        "{what} panicked instead of failing: {err}"
    );
    err
}

/// Asserts that nothing is tagged `reference` (skopeo cannot inspect it); `creds` are
/// `user:password` for registries with auth.
fn assert_untagged(reference: &str, creds: Option<&str>) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some(c) = creds {
        cmd.args(["--creds", c]);
    }
    let probe = cmd.arg(format!("docker://{reference}")).output().unwrap();
    assert!(
        !probe.status.success(),
        "{reference} is tagged after a failed conversion: {}",
        String::from_utf8_lossy(&probe.stdout)
    );
    let err = String::from_utf8_lossy(&probe.stderr);
    assert!(
        err.contains("manifest unknown") || err.contains("not found"),
        "skopeo failed for another reason than a missing tag: {err}"
    );
}

fn work_dir(t: &Path) -> PathBuf {
    let work = t.join("work");
    fs::create_dir_all(&work).unwrap();
    work
}

fn assert_work_dir_empty(work: &Path) {
    let left: Vec<_> = fs::read_dir(work).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in the work directory: {left:?}");
}

#[test]
fn docker_archive_source_converts_and_checks() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let reg = Registry::start();
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    let archive = t.path().join("busybox.tar");
    run_ok(Command::new("skopeo").args([
        "copy",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker-archive:{}:busybox:v1", archive.display()),
    ]));
    let source = format!("docker-archive:{}", archive.display());
    let target = format!("{}/busybox:archive-nydus", reg.addr);
    let report = t.path().join("archive.json");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &source,
            "--target",
            &target,
            "--output-json",
            report.to_str().unwrap(),
        ],
        &work,
    );
    let m = inspect_raw(&target);
    assert_eq!(m.matches("nydus.blob.v1").count(), 3, "{m}");
    let out = nydusify_ok(&["check", "--source", &source, "--target", &target], &work);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("OK: "),
        "{out:?}"
    );

    // The archive holds the same layers as the OCI layout (uncompressed): the nydus
    // filesystem is the same, bootstrap for bootstrap.
    let from_layout = t.path().join("layout.json");
    nydusify_ok(
        &[
            "convert",
            "--source",
            &format!("oci:{}:v1", layout.display()),
            "--target",
            &format!("{}/busybox:layout-nydus", reg.addr),
            "--output-json",
            from_layout.to_str().unwrap(),
        ],
        &work,
    );
    let (a, b) = (json(&report), json(&from_layout));
    assert_eq!(
        a["images"][0]["bootstrap_digest"], b["images"][0]["bootstrap_digest"],
        "{a}\n{b}"
    );
    // The archive cannot be a target.
    let out = nydusify(
        &[
            "convert",
            "--source",
            &source,
            "--target",
            &format!("docker-archive:{}", t.path().join("out.tar").display()),
        ],
        &work,
    );
    let err = failure(&out, "converting into a docker archive");
    assert!(err.contains("docker archives can only be read"), "{err}");
    assert_work_dir_empty(&work);
}

/// Copies the blobs of layout `from` into layout `into`.
fn merge_blobs(from: &Path, into: &Path) {
    for e in fs::read_dir(from.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let dest = into.join("blobs/sha256").join(e.file_name());
        if !dest.exists() {
            fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The descriptor of the single image of a layout, without its tag annotation.
fn image_descriptor(layout: &Path) -> serde_json::Value {
    let mut d = json(&layout.join("index.json"))["manifests"][0].clone();
    d.as_object_mut().unwrap().remove("annotations");
    d
}

/// An OCI layout tagged `multi` holding an image index of two images built from the
/// busybox fixture: linux/amd64 (the fixture) and linux/arm64 (the fixture plus a layer
/// with `/etc/arch`).
fn two_platform_layout(dir: &Path) -> PathBuf {
    let amd = dir.join("oci-amd64");
    let arm = dir.join("oci-arm64");
    for l in [&amd, &arm] {
        make_busybox(l, "v1");
    }
    add_layer(&arm, "v1", &[("etc/arch", b"arm64\n", 0o644)], dir);
    run_ok(
        Command::new("umoci")
            .args(["config", "--architecture", "arm64", "--image"])
            .arg(format!("{}:v1", arm.display())),
    );
    merge_blobs(&arm, &amd);
    let mut manifests = Vec::new();
    for (l, arch) in [(&amd, "amd64"), (&arm, "arm64")] {
        let mut d = image_descriptor(l);
        d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        manifests.push(d);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let hex = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    fs::write(amd.join("blobs/sha256").join(&hex), &bytes).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    fs::write(amd.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    amd
}

/// The platforms (`os/arch`) of the manifests of an index, in order.
fn platforms(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["platform"]["os"].as_str().unwrap_or("?"),
                d["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[test]
fn image_indexes_convert_per_platform_and_check_per_platform() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let reg = Registry::start();
    let layout = two_platform_layout(t.path());
    let src = format!("{}/multi:v1", reg.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{src}"),
    ]));

    // Every platform: an index with a nydus manifest per platform.
    let all = format!("{}/multi:v1-nydus", reg.addr);
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &all,
            "--all-platforms",
        ],
        &work,
    );
    let index: serde_json::Value = serde_json::from_str(&inspect_raw(&all)).unwrap();
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    assert_eq!(platforms(&index), ["linux/amd64", "linux/arm64"], "{index}");
    for d in index["manifests"].as_array().unwrap() {
        let m = inspect_raw(&format!(
            "{}/multi@{}",
            reg.addr,
            d["digest"].as_str().unwrap()
        ));
        assert!(m.contains("nydus-bootstrap"), "{m}");
    }
    // Each platform's nydus image shows that platform's files (arm64 has /etc/arch).
    for platform in ["linux/amd64", "linux/arm64"] {
        nydusify_ok(
            &[
                "check",
                "--source",
                &src,
                "--target",
                &all,
                "--platform",
                platform,
            ],
            &work,
        );
    }
    let out = nydusify_ok(
        &[
            "check",
            "--source",
            &src,
            "--target",
            &all,
            "--all-platforms",
        ],
        &work,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("linux/amd64: OK: ") && stdout.contains("linux/arm64: OK: "),
        "{stdout}"
    );

    // One platform: an index with that platform's manifest only.
    let arm = format!("{}/multi:v1-arm64-nydus", reg.addr);
    nydusify_ok(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &arm,
            "--platform",
            "linux/arm64",
        ],
        &work,
    );
    let index: serde_json::Value = serde_json::from_str(&inspect_raw(&arm)).unwrap();
    assert_eq!(platforms(&index), ["linux/arm64"], "{index}");
    nydusify_ok(
        &[
            "check",
            "--source",
            &src,
            "--target",
            &arm,
            "--platform",
            "linux/arm64",
        ],
        &work,
    );
    // The arm64 image is not the amd64 one: checked against the amd64 source, the
    // extra file shows.
    let out = nydusify(
        &[
            "check",
            "--source",
            &format!("oci:{}:v1", t.path().join("oci-arm64").display()),
            "--target",
            &all,
            "--platform",
            "linux/amd64",
        ],
        &work,
    );
    failure(&out, "checking the amd64 image against the arm64 source");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/etc/arch: missing from the nydus image"),
        "{out:?}"
    );

    // A platform the index does not have: a clear error listing those it has.
    let absent = format!("{}/multi:s390x-nydus", reg.addr);
    let out = nydusify(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &absent,
            "--platform",
            "linux/s390x",
        ],
        &work,
    );
    let err = failure(&out, "converting an absent platform");
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64, linux/arm64"),
        "{err}"
    );
    assert_untagged(&absent, None);
    let out = nydusify(
        &[
            "check",
            "--source",
            &src,
            "--target",
            &all,
            "--platform",
            "linux/s390x",
        ],
        &work,
    );
    let err = failure(&out, "checking an absent platform");
    assert!(err.contains("linux/s390x"), "{err}");
    assert_work_dir_empty(&work);
}

/// Runs nydusify with `DOCKER_CONFIG` set to `docker_config`.
fn nydusify_with_config(args: &[&str], work: &Path, docker_config: &Path) -> Output {
    Command::new(bin("nydusify"))
        .args(args)
        .arg("--work-dir")
        .arg(work)
        .env("DOCKER_CONFIG", docker_config)
        .output()
        .unwrap()
}

/// A docker config directory whose `config.json` holds `user:password` for `host`.
fn docker_config(dir: &Path, host: &str, user_password: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("printf %s \"$1\" | base64 -w0")
            .arg("sh")
            .arg(user_password),
    );
    let auth = String::from_utf8_lossy(&out.stdout).trim().to_string();
    fs::write(
        dir.join("config.json"),
        serde_json::json!({"auths": {host: {"auth": auth}}}).to_string(),
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn basic_auth_registry_takes_docker_config_and_flag_credentials_and_names_refusals() {
    require_root_tools(&[TOOLS, &["htpasswd", "base64"]].concat());
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let rdir = t.path().join("registry");
    fs::create_dir_all(&rdir).unwrap();
    let htpasswd = rdir.join("htpasswd");
    let out = run_ok(Command::new("htpasswd").args(["-Bbn", "tester", "s3cret"]));
    fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = Registry::start_in(
        &rdir,
        &format!(
            "auth:\n  htpasswd:\n    realm: rafs-test\n    path: {}\n",
            htpasswd.display()
        ),
    );
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    let src = format!("{}/busybox:v1", reg.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "tester:s3cret",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{src}"),
    ]));

    // Credentials from the docker config.
    let good = docker_config(&t.path().join("good"), &reg.addr, "tester:s3cret");
    let target = format!("{}/busybox:v1-nydus", reg.addr);
    let args = ["convert", "--source", &src, "--target", &target];
    let out = nydusify_with_config(&args, &work, &good);
    assert!(out.status.success(), "{out:?}");
    let out = nydusify_with_config(
        &["check", "--source", &src, "--target", &target],
        &work,
        &good,
    );
    assert!(out.status.success(), "{out:?}");

    // Credentials from flags (the docker config has none).
    let none = t.path().join("none");
    fs::create_dir_all(&none).unwrap();
    let flagged = format!("{}/busybox:v1-flags", reg.addr);
    let out = nydusify_with_config(
        &[
            "convert",
            "--source",
            &src,
            "--target",
            &flagged,
            "--source-username",
            "tester",
            "--source-password",
            "s3cret",
            "--target-username",
            "tester",
            "--target-password",
            "s3cret",
        ],
        &work,
        &none,
    );
    assert!(out.status.success(), "{out:?}");

    // No credentials, wrong ones in the docker config, wrong ones in flags: each fails
    // naming the registry and the refusal, and tags nothing.
    let bad = docker_config(&t.path().join("bad"), &reg.addr, "tester:wrong");
    let refused = format!("{}/busybox:refused", reg.addr);
    let cases: [(&str, Vec<&str>, &Path); 3] = [
        ("no credentials", vec![], &none),
        ("a wrong password in the docker config", vec![], &bad),
        (
            "a wrong target password in flags",
            vec!["--target-username", "tester", "--target-password", "nope"],
            &good,
        ),
    ];
    for (what, extra, config) in cases {
        let mut args = vec!["convert", "--source", &src, "--target", &refused];
        args.extend(extra);
        let started = Instant::now();
        let out = nydusify_with_config(&args, &work, config);
        let err = failure(&out, what);
        assert!(
            err.contains(&reg.addr) && err.contains("not authorized") && err.contains("401"),
            "{what}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: a refusal is not retried"
        );
        assert_untagged(&refused, Some("tester:s3cret"));
    }
    assert_work_dir_empty(&work);
}

#[test]
fn registry_503s_and_dropped_connections_are_retried_then_fail_clearly() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let reg = Registry::start();
    let layout = push_busybox(&reg, t.path(), "v1");
    let proxy = FaultProxy::start(&reg.addr);
    let via_proxy = format!("{}/busybox:v1", proxy.addr);

    // Transient faults on the source side: 503s, then dropped connections, on the
    // first two blob requests; the retries get through.
    for (fault, tag) in [
        (Fault::Unavailable, "after-503"),
        (Fault::Drop, "after-drop"),
    ] {
        let before = proxy.faulted();
        proxy.fault(fault, "/blobs/", 2);
        let target = format!("{}/busybox:{tag}", reg.addr);
        nydusify_ok(
            &["convert", "--source", &via_proxy, "--target", &target],
            &work,
        );
        assert_eq!(proxy.faulted() - before, 2, "{fault:?}");
        nydusify_ok(
            &[
                "check",
                "--source",
                &format!("{}/busybox:v1", reg.addr),
                "--target",
                &target,
            ],
            &work,
        );
    }

    // Downloads of the big layer (busybox) cut after 64 KiB, twice: the reader picks
    // up where each one stopped with a range request.
    let index = json(&layout.join("index.json"));
    let manifest = json(
        &layout
            .join("blobs/sha256")
            .join(&index["manifests"][0]["digest"].as_str().unwrap()[7..]),
    );
    let big = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(manifest["layers"][0]["size"].as_u64().unwrap() > 256 << 10);
    let before = proxy.faulted();
    proxy.fault(Fault::Cut(64 << 10), &big, 2);
    let target = format!("{}/busybox:after-cuts", reg.addr);
    nydusify_ok(
        &["convert", "--source", &via_proxy, "--target", &target],
        &work,
    );
    assert_eq!(proxy.faulted() - before, 2);
    nydusify_ok(
        &[
            "check",
            "--source",
            &format!("{}/busybox:v1", reg.addr),
            "--target",
            &target,
        ],
        &work,
    );

    // Transient faults on the target side: the first two upload requests.
    let before = proxy.faulted();
    proxy.fault(Fault::Unavailable, "/blobs/uploads/", 2);
    nydusify_ok(
        &[
            "convert",
            "--source",
            &format!("{}/busybox:v1", reg.addr),
            "--target",
            &format!("{}/pushed:after-503", proxy.addr),
        ],
        &work,
    );
    assert_eq!(proxy.faulted() - before, 2);
    proxy.fault(Fault::Drop, "", 0);
    inspect_raw(&format!("{}/pushed:after-503", reg.addr));

    // Faults that do not end: a clear error once the retries are spent, in bounded
    // time, naming the registry; nothing tagged.
    let source_cases = [
        (Fault::Unavailable, "/manifests/", "503"),
        (Fault::Drop, "", "connection"),
        (Fault::Unavailable, "/blobs/", "503"),
        (Fault::Cut(64 << 10), big.as_str(), "cut short"),
    ];
    for (fault, path, says) in source_cases {
        proxy.fault(fault, path, usize::MAX);
        let target = format!("{}/busybox:never", reg.addr);
        let started = Instant::now();
        let out = nydusify(
            &["convert", "--source", &via_proxy, "--target", &target],
            &work,
        );
        let err = failure(&out, &format!("{fault:?} on {path:?} for ever"));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{fault:?}: took {:?}",
            started.elapsed()
        );
        assert!(
            err.contains(&proxy.addr) && err.contains(says) && err.contains("3 attempts"),
            "{fault:?} on {path:?}: {err}"
        );
        assert_untagged(&target, None);
    }
    // The target fails when the manifest is pushed, after every blob went up: the tag
    // is never set.
    proxy.fault(Fault::Unavailable, "/manifests/", usize::MAX);
    let out = nydusify(
        &[
            "convert",
            "--source",
            &format!("{}/busybox:v1", reg.addr),
            "--target",
            &format!("{}/busybox:never", proxy.addr),
        ],
        &work,
    );
    let err = failure(&out, "pushing through a proxy failing manifests");
    assert!(
        err.contains(&proxy.addr) && err.contains("503") && err.contains("3 attempts"),
        "{err}"
    );
    assert_untagged(&format!("{}/busybox:never", reg.addr), None);
    assert_work_dir_empty(&work);
}

/// Sets the raw name (or, with `link`, the link name) of a tar header, bypassing the
/// tar crate's refusal of `..`.
fn set_raw(h: &mut tar::Header, name: &str, link: bool) {
    let old = h.as_old_mut();
    let field: &mut [u8] = if link {
        &mut old.linkname
    } else {
        &mut old.name
    };
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
}

#[test]
fn layers_escaping_the_root_are_refused_naming_the_entry() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let deep = t.path().join("a/b/c");
    let work = work_dir(&deep);
    let reg = Registry::start();
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    // A unique name that, resolved against the work directory, lands in `t`.
    let escape = format!("rafs-escape-{}", std::process::id());
    let entry = format!("../../../../{escape}");
    let path_layout = t.path().join("oci-path");
    run_ok(Command::new("cp").arg("-a").arg(&layout).arg(&path_layout));
    rewrite_layer(&path_layout, 2, |path, h, _| {
        if path.ends_with("etc/hostname") {
            set_raw(h, &entry, false);
        }
    });
    // A hard link whose target leaves the root.
    let link_layout = t.path().join("oci-link");
    run_ok(Command::new("cp").arg("-a").arg(&layout).arg(&link_layout));
    rewrite_layer(&link_layout, 2, |path, h, data| {
        if path.ends_with("etc/hostname") {
            h.set_entry_type(tar::EntryType::Link);
            set_raw(h, "../../etc/passwd", true);
            data.clear();
        }
    });
    for (l, named) in [
        (&path_layout, entry.as_str()),
        (&link_layout, "../../etc/passwd"),
    ] {
        let source = format!("oci:{}:v1", l.display());
        let target = format!("{}/busybox:escape", reg.addr);
        let out = nydusify(
            &["convert", "--source", &source, "--target", &target],
            &work,
        );
        let err = failure(&out, "converting a layer with '..'");
        assert!(err.contains(named) && err.contains(".."), "{err}");
        assert_untagged(&target, None);
        // `nydusify check` builds the source tree on its own: it refuses it too.
        let out = nydusify(&["check", "--source", &source, "--target", &target], &work);
        let err = failure(&out, "checking against a layer with '..'");
        assert!(err.contains(named), "{err}");
    }
    assert!(
        !t.path().join(&escape).exists() && !deep.join(&entry).exists(),
        "a file was written outside the work directory"
    );
    assert_work_dir_empty(&work);
}

#[test]
fn encrypted_layers_are_refused_naming_the_media_type() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let reg = Registry::start();
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    let encrypted = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";
    let mut digest = String::new();
    edit_manifest(&layout, |m| {
        m["layers"][1]["mediaType"] = encrypted.into();
        digest = m["layers"][1]["digest"].as_str().unwrap().to_string();
    });
    let source = format!("oci:{}:v1", layout.display());
    let target = format!("{}/busybox:encrypted-nydus", reg.addr);
    let out = nydusify(
        &["convert", "--source", &source, "--target", &target],
        &work,
    );
    let err = failure(&out, "converting an encrypted layer");
    assert!(err.contains(encrypted) && err.contains(&digest), "{err}");
    assert_untagged(&target, None);
    let out = nydusify(&["check", "--source", &source, "--target", &target], &work);
    let err = failure(&out, "checking against an encrypted layer");
    assert!(err.contains(encrypted), "{err}");
    assert_work_dir_empty(&work);
}

#[test]
fn a_read_only_target_registry_fails_the_push_clearly() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let reg = Registry::start();
    push_busybox(&reg, t.path(), "v1");
    let rdir = t.path().join("read-only");
    fs::create_dir_all(&rdir).unwrap();
    let ro = Registry::start_with(
        &rdir,
        "  maintenance:\n    readonly:\n      enabled: true\n",
        "",
    );
    let target = format!("{}/busybox:v1-nydus", ro.addr);
    let started = Instant::now();
    let out = nydusify(
        &[
            "convert",
            "--source",
            &format!("{}/busybox:v1", reg.addr),
            "--target",
            &target,
        ],
        &work,
    );
    let err = failure(&out, "pushing to a read-only registry");
    assert!(
        err.contains(&ro.addr) && err.contains("405") && err.contains("refused"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a refusal is not retried"
    );
    assert_untagged(&target, None);
    assert_work_dir_empty(&work);
}

#[test]
fn an_image_without_layers_is_refused_clearly() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let reg = Registry::start();
    let layout = t.path().join("oci");
    make_busybox(&layout, "v1");
    edit_manifest(&layout, |m| m["layers"] = serde_json::json!([]));
    let target = format!("{}/busybox:empty-nydus", reg.addr);
    let out = nydusify(
        &[
            "convert",
            "--source",
            &format!("oci:{}:v1", layout.display()),
            "--target",
            &target,
        ],
        &work,
    );
    let err = failure(&out, "converting an image without layers");
    assert!(err.contains("it has no layers"), "{err}");
    assert_untagged(&target, None);
    assert_work_dir_empty(&work);
}

#[test]
fn targets_that_name_a_digest_or_the_source_itself_are_refused_before_any_work() {
    require_root_tools(TOOLS);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let reg = Registry::start();
    let layout = push_busybox(&reg, t.path(), "v1");
    let src = format!("{}/busybox:v1", reg.addr);
    let before = inspect_raw(&src);
    let digest = {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&before)))
    };
    let oci = format!("oci:{}:v1", layout.display());
    let cases = [
        (src.clone(), src.clone(), "is the source image"),
        (
            format!("docker://{}/busybox", reg.addr),
            format!("{}/busybox:latest", reg.addr),
            "is the source image",
        ),
        (oci.clone(), oci.clone(), "is the source image"),
        (
            src.clone(),
            format!("{}/busybox@{digest}", reg.addr),
            "names a digest",
        ),
    ];
    for (source, target, says) in cases {
        let out = nydusify(
            &["convert", "--source", &source, "--target", &target],
            &work,
        );
        let err = failure(&out, &format!("{source} -> {target}"));
        assert!(err.contains(says), "{err}");
    }
    assert_eq!(inspect_raw(&src), before, "the source image is untouched");
    assert_untagged(&format!("{}/busybox:latest", reg.addr), None);
    // A source by digest is fine.
    nydusify_ok(
        &[
            "convert",
            "--source",
            &format!("{}/busybox@{digest}", reg.addr),
            "--target",
            &format!("{}/busybox:v1-nydus", reg.addr),
        ],
        &work,
    );
    assert_work_dir_empty(&work);
}

/// Uploads cut in the middle of a pipelined conversion of the python fixture, whose
/// base blob is streamed to the target while it is written: dropped twice, the upload
/// starts over from the blob file and the image checks; dropped every time, the
/// conversion fails naming the upload, with nothing tagged and nothing committed.
/// Converted again onto its existing tag, nothing is uploaded at all.
#[test]
fn uploads_cut_mid_stream_are_retried_then_fail_leaving_nothing() {
    require_root_tools(&["docker-registry", "skopeo", "umoci", "debootstrap", "tar"]);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let rdir = t.path().join("registry");
    fs::create_dir_all(&rdir).unwrap();
    let reg = Registry::start_in(&rdir, "");
    let src = push_python(&reg.addr, None);
    let proxy = FaultProxy::start(&reg.addr);
    let linked = |repo: &str| {
        fs::read_dir(rdir.join(format!(
            "registry-data/docker/registry/v2/repositories/{repo}/_layers/sha256"
        )))
        .map(|d| d.count())
        .unwrap_or(0)
    };

    // Requests to upload sessions (the streamed PATCH, the commits) carry `_state=`.
    proxy.fault(Fault::Drop, "_state=", 2);
    let target = format!("{}/retried:v1", proxy.addr);
    nydusify_ok(&["convert", "--source", &src, "--target", &target], &work);
    assert_eq!(proxy.faulted(), 2);
    nydusify_ok(
        &[
            "check",
            "--source",
            &src,
            "--target",
            &format!("{}/retried:v1", reg.addr),
        ],
        &work,
    );

    // Converting again onto the existing tag: every blob is found by `HEAD` once its
    // digest is known, and no upload session is opened (each would get a 500 here).
    proxy.fault(Fault::Status(500), "/blobs/uploads/", usize::MAX);
    nydusify_ok(&["convert", "--source", &src, "--target", &target], &work);
    assert_eq!(
        proxy.faulted(),
        2,
        "a blob the registry had was uploaded again"
    );

    proxy.fault(Fault::Drop, "_state=", usize::MAX);
    let target = format!("{}/failed:v1", proxy.addr);
    let err = failure(
        &nydusify(&["convert", "--source", &src, "--target", &target], &work),
        "convert with every upload dropped",
    );
    assert!(err.contains("Uploading the blob of layer sha256:"), "{err}");
    assert_untagged(&format!("{}/failed:v1", reg.addr), None);
    assert_eq!(linked("failed"), 0, "a blob was committed");
    assert_work_dir_empty(&work);
}

/// A registry in docker-registry's bearer-token mode (tokens from
/// [`rafs_e2e::TokenServer`], asked for with the docker config's credentials): the
/// python fixture converts (its base blob streamed with the bearer token) and checks,
/// `nydusify mount` reads it lazily through nydusd's registry backend, and a wrong
/// password is refused clearly with nothing tagged.
#[test]
fn bearer_token_registries_convert_check_and_mount() {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "umoci",
        "debootstrap",
        "tar",
        "openssl",
        "base64",
        "fusermount3",
    ]);
    let t = tempfile::tempdir().unwrap();
    let work = work_dir(t.path());
    let tokens =
        rafs_e2e::TokenServer::start(&t.path().join("token"), "tester", "s3cret", &["python"]);
    let rdir = t.path().join("registry");
    fs::create_dir_all(&rdir).unwrap();
    let mut reg = Registry::start_in(&rdir, &tokens.registry_config());
    let src = push_python(&reg.addr, Some("tester:s3cret"));
    let started = Instant::now();
    let step = |what: &str| eprintln!("{what}: {:.1}s", started.elapsed().as_secs_f64());
    let issued = tokens.issued();
    assert!(
        issued > 0,
        "skopeo got no token: the registry is not in token mode"
    );

    let good = docker_config(&t.path().join("good"), &reg.addr, "tester:s3cret");
    let target = format!("{}/python:v1-nydus", reg.addr);
    let ok = |args: &[&str]| {
        let out = nydusify_with_config(args, &work, &good);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nydusify {args:?}: {err}");
    };
    ok(&["convert", "--source", &src, "--target", &target]);
    assert!(tokens.issued() > issued, "nydusify asked for no token");
    step("converted");
    ok(&["check", "--source", &src, "--target", &target]);

    step("checked");
    // Lazily mounted from the token registry: nydusd's registry backend.
    let mnt = t.path().join("mnt");
    let log = fs::File::create(t.path().join("mount.log")).unwrap();
    let daemon = rafs_e2e::ChildGuard::spawn(
        Command::new(bin("nydusify"))
            .args(["mount", "--target", &target, "--mount-path"])
            .arg(&mnt)
            .arg("--work-dir")
            .arg(t.path().join("mount-work"))
            .env("DOCKER_CONFIG", &good)
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
    .unwrap();
    let mounted = rafs_e2e::wait_until(Duration::from_secs(30), || rafs_e2e::is_mounted(&mnt));
    assert!(
        mounted,
        "nydusify mount did not mount: {}",
        fs::read_to_string(t.path().join("mount.log")).unwrap_or_default()
    );
    let m = rafs_e2e::Mount::adopt(&mnt);
    step("mounted");
    let python = fs::read_dir(mnt.join("usr/bin"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("python3."))
        .expect("python3.X in the image")
        .path();
    let bytes = fs::read(&python).unwrap();
    assert!(bytes.len() > 1 << 20 && bytes.starts_with(b"\x7fELF"));
    step("read");

    // The registry restarts refusing every token so far (as when tokens expire): the
    // next cold read gets a 401, nydusd asks for a new token and goes on.
    tokens.rotate(&mut reg);
    let issued = tokens.issued();
    // Every file under usr/lib: most were not read yet (readahead after python's read
    // may have brought a few), so cold reads meet the 401s.
    let mut stack = vec![mnt.join("usr/lib")];
    let mut read = 0u64;
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                let got = fs::read(e.path()).unwrap();
                assert_eq!(got.len() as u64, m.len(), "{}", e.path().display());
                read += m.len();
            }
        }
    }
    assert!(read > 32 << 20, "only {read} bytes under usr/lib");
    assert!(
        tokens.issued() > issued,
        "nydusd read on without a new token"
    );
    step("read after the registry rotated its tokens");
    drop(m);
    drop(daemon);
    step("unmounted");

    // The wrong password: the token server refuses, and so does nydusify.
    let bad = docker_config(&t.path().join("bad"), &reg.addr, "tester:wrong");
    let refused = tokens.refused();
    let err = failure(
        &nydusify_with_config(
            &[
                "convert",
                "--source",
                &src,
                "--target",
                &format!("{}/python:v1-bad", reg.addr),
            ],
            &work,
            &bad,
        ),
        "convert with a wrong password",
    );
    assert!(tokens.refused() > refused, "the token server was not asked");
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    assert_untagged(
        &format!("{}/python:v1-bad", reg.addr),
        Some("tester:s3cret"),
    );
    assert_work_dir_empty(&work);
}
