//! The containerd snapshotter (issue 12) with real components: Debian's containerd 1.6
//! and `docker-registry`, nydus images converted by `nydusify`, CRI lazy pulls, `ctr run`,
//! and nydusd mounts under overlayfs, in both daemon modes.

use crate::nydusify::{add_layer, inspect_raw, make_busybox, nydusify_ok, push_python};
use rafs_e2e::{
    pid_alive, pull_nydus_image, require_root_tools, run_ok, umoci_rootfs, wait_until, AccessEntry,
    Containerd, NydusSnapshotter, Registry,
};
use sha2::{Digest, Sha256};
use snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use snapshotter::proto::snapshots::*;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BLOB_LABEL: &str = "containerd.io/snapshot/nydus-blob";
const BOOT_LABEL: &str = "containerd.io/snapshot/nydus-bootstrap";
const REF_LABEL: &str = "containerd.io/snapshot.ref";
const IMAGE_LABEL: &str = "containerd.io/snapshot/cri.image-ref";

pub(crate) fn tools() {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "umoci",
        "busybox",
        "tar",
        "containerd",
        "ctr",
        "runc",
        "fusermount3",
    ]);
}

/// Pushes the busybox fixture as `busybox:TAG` and converts it to `busybox:TAG-nydus`;
/// returns the OCI layout.
fn busybox_images(reg: &Registry, dir: &Path, tag: &str) -> PathBuf {
    let layout = dir.join(format!("oci-{tag}"));
    make_busybox(&layout, "v1");
    if tag != "v1" {
        add_layer(
            &layout,
            "v1",
            &[("etc/extra", b"extra layer\n", 0o644)],
            dir,
        );
    }
    push_and_convert(reg, &layout, "busybox", tag, dir);
    layout
}

pub(crate) fn push_and_convert(reg: &Registry, layout: &Path, repo: &str, tag: &str, dir: &Path) {
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/{repo}:{tag}", reg.addr),
    ]));
    let work = dir.join(format!("work-{repo}-{tag}"));
    fs::create_dir_all(&work).unwrap();
    nydusify_ok(
        &[
            "convert",
            "--source",
            &format!("{}/{repo}:{tag}", reg.addr),
            "--target",
            &format!("{}/{repo}:{tag}-nydus", reg.addr),
        ],
        &work,
    );
}

/// A registry (its files under `dir/reg`, access log included) holding the busybox
/// fixture and its nydus conversion under each of `tags`.
fn registry_with_busybox(dir: &Path, tags: &[&str]) -> Registry {
    let reg_dir = dir.join("reg");
    fs::create_dir_all(&reg_dir).unwrap();
    let reg = Registry::start_in(&reg_dir, "");
    for tag in tags {
        busybox_images(&reg, dir, tag);
    }
    reg
}

/// Digests of a nydus image's data layers and of its bootstrap layer.
fn nydus_layers(reference: &str) -> (BTreeSet<String>, String) {
    nydus_layers_with(reference, None)
}

fn nydus_layers_with(reference: &str, creds: Option<&str>) -> (BTreeSet<String>, String) {
    let raw = match creds {
        None => inspect_raw(reference),
        Some(c) => String::from_utf8_lossy(
            &run_ok(Command::new("skopeo").args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                "--creds",
                c,
                &format!("docker://{reference}"),
            ]))
            .stdout,
        )
        .into_owned(),
    };
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let mut data = BTreeSet::new();
    let mut boot = None;
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap().to_string();
        if l["annotations"][BLOB_LABEL] == "true" {
            data.insert(d);
        } else if l["annotations"][BOOT_LABEL] == "true" {
            boot = Some(d);
        }
    }
    assert!(!data.is_empty(), "no data layers in {m}");
    (data, boot.expect("a bootstrap layer"))
}

fn blob_gets<'a>(log: &'a [AccessEntry], digests: &BTreeSet<String>) -> Vec<&'a AccessEntry> {
    log.iter()
        .filter(|e| e.method == "GET" && e.blob().is_some_and(|b| digests.contains(b)))
        .collect()
}

fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(p).unwrap()))
}

/// Sums the samples of the Prometheus metric `name` (any labels) in `text`.
pub(crate) fn prom_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (metric, value) = l.rsplit_once(' ')?;
            let bare = metric.split('{').next()?;
            (bare == name || bare.ends_with(&format!("_{name}")))
                .then(|| value.parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .sum()
}

/// Every nydusd of `snap`, asked for its Prometheus text.
pub(crate) fn nydusd_metrics(snap: &NydusSnapshotter) -> String {
    let mut out = String::new();
    for entry in fs::read_dir(snap.root.join("socket")).unwrap().flatten() {
        // `api.sock`, or `api-<ms>.sock` of a daemon that took a session over.
        for sock in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
            let name = sock.file_name().to_string_lossy().into_owned();
            if !name.starts_with("api") {
                continue;
            }
            if let Ok((_, body)) =
                nydusd::client::ApiClient::new(sock.path()).request("GET", "/metrics", None)
            {
                out.push_str(&String::from_utf8_lossy(&body));
            }
        }
    }
    out
}

fn http_get(addr: &str, path: &str) -> String {
    let out = run_ok(Command::new("curl").args(["-fsS", &format!("http://{addr}{path}")]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Pulls and runs busybox and python from nydus images, and busybox as an ordinary OCI
/// image, through CRI and `ctr run`, with the snapshotter in `mode`; then restarts
/// containerd and the snapshotter and runs them again.
fn images_run_lazily(mode: &str) {
    tools();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let reg = registry_with_busybox(dir, &["v1"]);
    let layout = dir.join("oci-v1");
    let rootfs = umoci_rootfs(&layout, "v1", dir);
    let python_src = push_python(&reg.addr, None);
    let work = dir.join("work-python");
    fs::create_dir_all(&work).unwrap();
    let python = format!("{python_src}-nydus");
    nydusify_ok(
        &["convert", "--source", &python_src, "--target", &python],
        &work,
    );
    let busybox = format!("{}/busybox:v1-nydus", reg.addr);
    let (data_blobs, boot_blob) = nydus_layers(&busybox);

    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut snap = NydusSnapshotter::start(
        &dir.join("snap"),
        &format!("daemon_mode = \"{mode}\"\n[metrics]\naddress = \"{metrics_addr}\""),
    );
    let mut ctd = Containerd::start(&dir.join("ctd"), &snap.sock);

    // 1. The lazy pull: containerd fetches the bootstrap layer, never a data layer.
    let before = reg.access_log().len();
    let t0 = Instant::now();
    ctd.cri_pull(&busybox)
        .unwrap_or_else(|e| panic!("CRI pull: {e}\n{}", snap.log_text()));
    eprintln!("[{mode}] CRI pull of {busybox}: {:?}", t0.elapsed());
    let pull_log = reg.access_log()[before..].to_vec();
    assert!(
        blob_gets(&pull_log, &data_blobs).is_empty(),
        "data blobs fetched during the pull: {pull_log:?}"
    );
    assert!(
        pull_log
            .iter()
            .any(|e| e.method == "GET" && e.blob() == Some(boot_blob.as_str())),
        "the bootstrap layer was not fetched (is the access log read right?): {pull_log:?}"
    );
    let m = http_get(&metrics_addr, "/metrics");
    assert_eq!(
        prom_sum(&m, "snapshotter_remote_layers_total"),
        data_blobs.len() as u64,
        "{m}"
    );
    assert!(
        snap.nydusd_pids().is_empty(),
        "a daemon started before any container"
    );

    // 2. A container: the rootfs lowerdir is our nydusd's FUSE mount; busybox is exec'd
    // and mmapped through the overlay on it; its bytes equal the source's.
    let before = reg.access_log().len();
    let out = ctd.run(
        &busybox,
        "bb1",
        &["sh", "-c", "cat /etc/hostname; sha256sum /bin/busybox"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let want_host = fs::read_to_string(rootfs.join("etc/hostname")).unwrap();
    assert!(text.starts_with(&want_host), "{text}");
    assert!(
        text.contains(&sha256_file(&rootfs.join("bin/busybox"))),
        "{text}"
    );
    let fuse = snap.fuse_mounts();
    assert_eq!(fuse.len(), 1, "one FUSE mount for the image: {fuse:?}");
    let pids = snap.nydusd_pids();
    assert_eq!(pids.len(), 1, "one nydusd: {pids:?}");
    // The blob range GETs the registry saw while the command ran are nydusd's.
    let run_log = reg.access_log()[before..].to_vec();
    let gets = blob_gets(&run_log, &data_blobs);
    assert!(!gets.is_empty(), "no blob read while the container ran");
    let metrics = nydusd_metrics(&snap);
    let registry_bytes: u64 = gets.iter().map(|e| e.bytes).sum();
    assert_eq!(
        registry_bytes,
        prom_sum(&metrics, "backend_read_bytes"),
        "{gets:?}\n{metrics}"
    );
    assert_eq!(
        gets.len() as u64,
        prom_sum(&metrics, "backend_read_count"),
        "{metrics}"
    );
    // Run again: busybox is now fully cached, so nydusd passes it through to the kernel.
    let out = ctd.run(&busybox, "bb2", &["busybox", "echo", "again"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "again");
    let metrics = nydusd_metrics(&snap);
    assert!(
        prom_sum(&metrics, "fs_passthrough_opens") > 0,
        "no passthrough open:\n{metrics}"
    );

    // 3. python from its nydus image.
    ctd.cri_pull(&python)
        .unwrap_or_else(|e| panic!("CRI pull {python}: {e}"));
    let out = ctd.run(
        &python,
        "py1",
        &[
            "python3",
            "-c",
            "import hashlib, sys; print(hashlib.sha256(b'abc').hexdigest(), sys.version_info[0])",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad 3"
    );
    let expect_daemons = if mode == "shared" { 1 } else { 2 };
    assert_eq!(snap.nydusd_pids().len(), expect_daemons);
    assert_eq!(
        snap.fuse_mounts().len(),
        expect_daemons,
        "{:?}",
        snap.fuse_mounts()
    );

    // 4. An ordinary OCI image through the same snapshotter.
    let oci = format!("{}/busybox:v1", reg.addr);
    ctd.cri_pull(&oci)
        .unwrap_or_else(|e| panic!("CRI pull {oci}: {e}"));
    let out = ctd.run(&oci, "oci1", &["cat", "/etc/hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want_host);

    // 5. containerd restarted, then the snapshotter (killed with SIGKILL in one mode,
    // stopped in the other): the same daemons serve, images run.
    let pids: BTreeSet<u32> = snap.nydusd_pids().into_iter().collect();
    ctd.down();
    ctd.up();
    if mode == "dedicated" {
        snap.kill();
    } else {
        snap.down();
    }
    snap.up();
    assert!(
        snap.log_text().contains("found running nydusd"),
        "{}",
        snap.log_text()
    );
    assert!(
        ctd.reaches_snapshotter(),
        "containerd did not reach the restarted snapshotter"
    );
    let out = ctd.run(&busybox, "bb3", &["cat", "/etc/hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want_host);
    let out = ctd.run(&python, "py2", &["python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = ctd.run(&oci, "oci2", &["cat", "/etc/hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want_host);
    let after: BTreeSet<u32> = snap.nydusd_pids().into_iter().collect();
    assert_eq!(
        pids, after,
        "daemons were replaced or leaked by the restarts"
    );
    assert_eq!(snap.fuse_mounts().len(), expect_daemons);

    // 6. Images removed (CRI records each under its tag, digest and id): containerd's GC
    // removes their snapshots, and the daemons stop.
    let listed = run_ok(ctd.ctr().args(["-n", "k8s.io", "images", "ls", "-q"]));
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 3, "{names:?}");
    run_ok(
        ctd.ctr()
            .args(["-n", "k8s.io", "images", "rm", "--sync"])
            .args(&names),
    );
    let gone = wait_until(Duration::from_secs(30), || {
        snap.nydusd_pids().len() <= usize::from(mode == "shared")
            && snap.fuse_mounts().len() <= usize::from(mode == "shared")
    });
    assert!(
        gone,
        "daemons left after the images went: {:?}\nsnapshots: {}\n{}",
        snap.nydusd_pids(),
        String::from_utf8_lossy(
            &run_ok(
                ctd.ctr()
                    .args(["-n", "k8s.io", "snapshots", "--snapshotter", "nydus", "ls"])
            )
            .stdout
        ),
        snap.log_text()
    );
    for pid in pids {
        if mode != "shared" {
            assert!(!pid_alive(pid), "nydusd {pid} still runs");
        }
    }
    // The cache manager dropped the blobs no image uses any more.
    let left: Vec<_> = fs::read_dir(snap.root.join("cache"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".blob.data"))
        .collect();
    assert!(left.is_empty(), "cache blobs left: {left:?}");
    if mode == "shared" {
        let info = nydusd::client::ApiClient::new(snap.root.join("socket/shared/api.sock"))
            .daemon_info()
            .unwrap();
        assert!(
            info.mounts.is_empty(),
            "the shared daemon still serves {:?}",
            info.mounts
        );
    }
    drop(ctd);
    drop(snap);
}

#[test]
fn snapshotter_runs_nydus_and_oci_images_through_cri_dedicated() {
    images_run_lazily("dedicated");
}

#[test]
fn snapshotter_runs_nydus_and_oci_images_through_cri_shared() {
    images_run_lazily("shared");
}

/// Two images sharing a base layer, each with its own nydusd (dedicated mode): the
/// daemons share one cache, so the base layer's chunks are fetched once.
#[test]
fn dedicated_daemons_share_one_cache() {
    tools();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let reg = registry_with_busybox(dir, &["v1", "v2"]);
    let (a, b) = (
        format!("{}/busybox:v1-nydus", reg.addr),
        format!("{}/busybox:v2-nydus", reg.addr),
    );
    let (blobs_a, _) = nydus_layers(&a);
    let (blobs_b, _) = nydus_layers(&b);
    let common: BTreeSet<String> = blobs_a.intersection(&blobs_b).cloned().collect();
    assert!(
        !common.is_empty(),
        "the images share no blob: {blobs_a:?} {blobs_b:?}"
    );
    let snap = NydusSnapshotter::start(&dir.join("snap"), "daemon_mode = \"dedicated\"");
    let ctd = Containerd::start(&dir.join("ctd"), &snap.sock);
    ctd.cri_pull(&a).unwrap();
    ctd.cri_pull(&b).unwrap();
    let before = reg.access_log().len();
    let sums: Vec<String> = [(&a, "c1"), (&b, "c2")]
        .iter()
        .map(|(img, id)| {
            String::from_utf8_lossy(
                &ctd.run(img, id, &["busybox", "sha256sum", "/bin/busybox"])
                    .stdout,
            )
            .into_owned()
        })
        .collect();
    assert_eq!(sums[0], sums[1]);
    assert_eq!(snap.nydusd_pids().len(), 2, "one daemon per image");
    let log = reg.access_log()[before..].to_vec();
    let cached = fs::read_dir(dir.join("snap/cache"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".blob.data"))
        .count();
    assert!(cached > 0, "nothing in the shared cache");
    for blob in &common {
        let gets = blob_gets(&log, &BTreeSet::from([blob.clone()]));
        let bytes: u64 = gets.iter().map(|e| e.bytes).sum();
        let size = blob_size(&reg, blob);
        assert!(
            bytes <= size,
            "{blob}: {bytes} bytes fetched, more than the blob's {size}: {gets:?}"
        );
        eprintln!(
            "shared blob {blob}: {} GETs, {bytes} of {size} bytes",
            gets.len()
        );
    }

    // v2 removed (under each name CRI gave it): its daemon stops, its own blob leaves the
    // cache, the blobs v1 still uses stay, and v1 still runs.
    // v2's own layer read, so that its blob is in the cache.
    let out = ctd.run(&b, "c2b", &["cat", "/etc/extra"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "extra layer\n");
    let cached = |blob: &str| {
        dir.join("snap/cache")
            .join(format!("{}.blob.data", blob.trim_start_matches("sha256:")))
            .exists()
    };
    let only_b: Vec<&String> = blobs_b.difference(&blobs_a).collect();
    assert!(!only_b.is_empty());
    assert!(
        only_b.iter().any(|b| cached(b)),
        "v2's own blob was never cached"
    );
    let listed = run_ok(ctd.ctr().args(["-n", "k8s.io", "images", "ls"]));
    let rows: Vec<Vec<String>> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    let digest = rows
        .iter()
        .find(|r| r[0] == b)
        .map(|r| r[2].clone())
        .expect("v2 is listed");
    let names: Vec<&str> = rows
        .iter()
        .filter(|r| r[2] == digest)
        .map(|r| r[0].as_str())
        .collect();
    run_ok(
        ctd.ctr()
            .args(["-n", "k8s.io", "images", "rm", "--sync"])
            .args(&names),
    );
    assert!(
        wait_until(Duration::from_secs(30), || snap.nydusd_pids().len() == 1),
        "v2's daemon did not stop: {:?}",
        snap.nydusd_pids()
    );
    for blob in &only_b {
        assert!(!cached(blob), "{blob}, used by v2 only, is still cached");
    }
    assert!(
        common.iter().any(|b| cached(b)),
        "the blobs v1 uses were dropped"
    );
    let out = ctd.run(&a, "c3", &["busybox", "sha256sum", "/bin/busybox"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), sums[0]);
}

fn blob_size(reg: &Registry, digest: &str) -> u64 {
    let out = run_ok(Command::new("curl").args([
        "-fsSI",
        &format!("http://{}/v2/busybox/blobs/{digest}", reg.addr),
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("Content-Length")
}

/// The code of an error result.
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    r.unwrap_err().code()
}

/// A registry with basic auth (htpasswd): nydusd gets the credentials from the docker
/// `config.json` the snapshotter reads, and when the password is rotated, the new one
/// from the same file, through nydusd's `PUT /api/v1/config`, without a restart.
#[test]
fn registry_credentials_reach_nydusd_and_are_refreshed_live() {
    tools();
    require_root_tools(&["htpasswd"]);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    // Images are pushed and converted before the registry asks for credentials.
    let mut reg = registry_with_busybox(dir, &["v2"]);
    let reg_dir = dir.join("reg");
    let image = format!("{}/busybox:v2-nydus", reg.addr);
    reg.down();
    let htpasswd = dir.join("htpasswd");
    let set_password = |p: &str| {
        let out = run_ok(Command::new("htpasswd").args(["-Bbn", "user", p]));
        fs::write(&htpasswd, out.stdout).unwrap();
    };
    set_password("first");
    let auth = format!(
        "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
        htpasswd.display()
    );
    let config = reg_dir.join("registry.yml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, format!("{text}{auth}")).unwrap();
    reg.up();
    let docker_config = dir.join("docker-config.json");
    let host = reg.addr.clone();
    let write_docker_config = |p: &str| {
        let a = nydusd::client::config::encode_auth("user", p);
        fs::write(
            &docker_config,
            format!(r#"{{"auths":{{"{host}":{{"auth":"{a}"}}}}}}"#),
        )
        .unwrap();
    };
    write_docker_config("first");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let snap = NydusSnapshotter::start(
        &dir.join("snap"),
        &format!(
            "[remote.auth]\ndocker_config = \"{}\"\nrefresh_interval = 1\n[metrics]\naddress = \"{metrics_addr}\"",
            docker_config.display()
        ),
    );
    let ctd = Containerd::start(&dir.join("ctd"), &snap.sock);
    let e = ctd.cri_pull(&image).unwrap_err();
    assert!(
        e.contains("401") || e.to_lowercase().contains("unauthorized"),
        "{e}"
    );
    ctd.cri_pull_auth(&image, Some(("user", "first"))).unwrap();
    let out = ctd.run(&image, "c1", &["cat", "/etc/hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "busybox-fixture-3\n");
    let pids = snap.nydusd_pids();
    assert_eq!(pids.len(), 1);

    // The password is rotated at the registry, then in the file.
    reg.down();
    set_password("second");
    reg.up();
    write_docker_config("second");
    assert!(
        wait_until(Duration::from_secs(15), || prom_sum(
            &http_get(&metrics_addr, "/metrics"),
            "snapshotter_auth_refreshes_total"
        ) >= 1),
        "the new credentials were not handed over:\n{}",
        snap.log_text()
    );
    // A file of a blob nobody read yet: fetched with the new password by the same nydusd.
    let before = reg.access_log().len();
    let out = ctd.run(&image, "c2", &["cat", "/etc/extra"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "extra layer\n");
    assert_eq!(snap.nydusd_pids(), pids, "nydusd was restarted");
    let (blobs, _) = nydus_layers_with(&image, Some("user:second"));
    let log = reg.access_log()[before..].to_vec();
    assert!(
        log.iter()
            .any(|e| e.blob().is_some_and(|b| blobs.contains(b)) && e.status == 206),
        "no ranged blob read with the new password: {log:?}"
    );
}

/// A client of the snapshotter's gRPC socket, for the error paths containerd would hide.
struct Client {
    rt: tokio::runtime::Runtime,
    c: SnapshotsClient<tonic::transport::Channel>,
}

impl Client {
    fn connect(sock: &Path) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt
            .block_on(rafs_e2e::uds_channel(sock.to_path_buf()))
            .unwrap();
        Client {
            rt,
            c: SnapshotsClient::new(channel),
        }
    }

    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: &[(&str, &str)],
    ) -> Result<Vec<snapshotter::proto::types::Mount>, tonic::Status> {
        let req = PrepareSnapshotRequest {
            snapshotter: "nydus".into(),
            key: key.into(),
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        self.rt
            .block_on(self.c.prepare(req))
            .map(|r| r.into_inner().mounts)
    }

    fn view(
        &mut self,
        key: &str,
        parent: &str,
    ) -> Result<Vec<snapshotter::proto::types::Mount>, tonic::Status> {
        let req = ViewSnapshotRequest {
            snapshotter: "nydus".into(),
            key: key.into(),
            parent: parent.into(),
            labels: Default::default(),
        };
        self.rt
            .block_on(self.c.view(req))
            .map(|r| r.into_inner().mounts)
    }

    fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        let req = CommitSnapshotRequest {
            snapshotter: "nydus".into(),
            name: name.into(),
            key: key.into(),
            labels: Default::default(),
        };
        self.rt.block_on(self.c.commit(req)).map(drop)
    }

    fn update(
        &mut self,
        key: &str,
        labels: &[(&str, &str)],
        mask: &[&str],
    ) -> Result<Info, tonic::Status> {
        let req = UpdateSnapshotRequest {
            snapshotter: "nydus".into(),
            info: Some(Info {
                name: key.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: mask.iter().map(|p| p.to_string()).collect(),
            }),
        };
        self.rt
            .block_on(self.c.update(req))
            .map(|r| r.into_inner().info.unwrap())
    }

    fn usage(&mut self, key: &str) -> Result<UsageResponse, tonic::Status> {
        let req = UsageRequest {
            snapshotter: "nydus".into(),
            key: key.into(),
        };
        self.rt.block_on(self.c.usage(req)).map(|r| r.into_inner())
    }

    fn stat(&mut self, key: &str) -> Result<Info, tonic::Status> {
        let req = StatSnapshotRequest {
            snapshotter: "nydus".into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.c.stat(req))
            .map(|r| r.into_inner().info.unwrap())
    }

    fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        let req = RemoveSnapshotRequest {
            snapshotter: "nydus".into(),
            key: key.into(),
        };
        self.rt.block_on(self.c.remove(req)).map(drop)
    }

    fn mounts(
        &mut self,
        key: &str,
    ) -> Result<Vec<snapshotter::proto::types::Mount>, tonic::Status> {
        let req = MountsRequest {
            snapshotter: "nydus".into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.c.mounts(req))
            .map(|r| r.into_inner().mounts)
    }

    fn list(&mut self, filters: &[&str]) -> Result<Vec<String>, tonic::Status> {
        use futures_util::StreamExt as _;
        let req = ListSnapshotsRequest {
            snapshotter: "nydus".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        self.rt.block_on(async {
            let mut s = self.c.list(req).await?.into_inner();
            let mut names = Vec::new();
            while let Some(batch) = s.next().await {
                names.extend(batch?.info.into_iter().map(|i| i.name));
            }
            names.sort();
            Ok(names)
        })
    }

    /// A nydus image's meta snapshot `meta` over a data layer `data`, its bootstrap
    /// copied from `boot`, labelled with `image`.
    fn meta_layer(&mut self, data: &str, meta: &str, image: &str, boot: &[u8]) {
        self.meta_layer_with(data, meta, image, |path| fs::write(path, boot).unwrap());
    }

    /// [`Client::meta_layer`] with `image/image.boot` made by `make`.
    fn meta_layer_with(&mut self, data: &str, meta: &str, image: &str, make: impl FnOnce(&Path)) {
        let e = self
            .prepare(
                "extract-data",
                "",
                &[
                    (REF_LABEL, data),
                    (BLOB_LABEL, "true"),
                    (IMAGE_LABEL, image),
                ],
            )
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
        let mounts = self
            .prepare(
                "extract-meta",
                data,
                &[
                    (REF_LABEL, meta),
                    (BOOT_LABEL, "true"),
                    (IMAGE_LABEL, image),
                ],
            )
            .unwrap();
        // An unpack target over an empty data layer: the snapshot's own directory.
        let upper = mounts[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(&mounts[0].source));
        fs::create_dir_all(upper.join("image")).unwrap();
        make(&upper.join("image/image.boot"));
        self.commit(meta, "extract-meta").unwrap();
    }
}

/// Unknown keys, missing parents, second Prepares, broken or missing bootstraps, an
/// unreachable registry and a nydusd that never serves: gRPC errors with the right
/// codes, naming the image, within bounds, leaving no snapshot, mount or daemon.
#[test]
fn snapshotter_refuses_bad_input_with_grpc_codes() {
    tools();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let reg = registry_with_busybox(dir, &["v1"]);
    let image = format!("{}/busybox:v1-nydus", reg.addr);
    let (boot_path, _) = pull_nydus_image(&image, dir);
    let boot = fs::read(&boot_path).unwrap();
    let snap = NydusSnapshotter::start(&dir.join("snap"), "[daemon]\nready_timeout = 3");
    let mut c = Client::connect(&snap.sock);

    // Plain protocol errors.
    let e = c.stat("nope").unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nope"), "{e}");
    assert_eq!(code(c.mounts("nope")), tonic::Code::NotFound);
    assert_eq!(code(c.remove("nope")), tonic::Code::NotFound);
    assert_eq!(
        code(c.prepare("k", "no-parent", &[])),
        tonic::Code::NotFound
    );
    let m = c.prepare("k", "", &[("a", "1"), ("b", "2")]).unwrap();
    assert_eq!(code(c.prepare("k", "", &[])), tonic::Code::AlreadyExists);
    // Update: the labels named in the mask change, the others stay; other fields are
    // not updatable.
    let info = c
        .update("k", &[("a", "9"), ("c", "3")], &["labels.a", "labels.c"])
        .unwrap();
    let labels: std::collections::BTreeMap<_, _> = info.labels.into_iter().collect();
    assert_eq!(
        labels,
        [("a", "9"), ("b", "2"), ("c", "3")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    );
    assert_eq!(
        code(c.update("k", &[], &["parent"])),
        tonic::Code::InvalidArgument
    );
    assert_eq!(code(c.update("nope", &[], &[])), tonic::Code::NotFound);
    // Usage of an active snapshot is measured now.
    fs::write(Path::new(&m[0].source).join("data"), vec![1u8; 64 << 10]).unwrap();
    let u = c.usage("k").unwrap();
    assert!(u.size >= 64 << 10 && u.inodes == 1, "{u:?}");
    assert_eq!(
        code(c.prepare("k2", "k", &[])),
        tonic::Code::FailedPrecondition,
        "active parent"
    );
    assert_eq!(c.list(&["kind==active"]).unwrap(), vec!["k".to_string()]);
    assert_eq!(code(c.list(&["size==1"])), tonic::Code::InvalidArgument);
    c.remove("k").unwrap();

    // Data layers but no bootstrap layer.
    let e = c
        .prepare(
            "extract-data",
            "",
            &[(REF_LABEL, "data0"), (BLOB_LABEL, "true")],
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let e = c.prepare("ctr-a", "data0", &[]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("no bootstrap layer"), "{e}");
    assert_eq!(
        code(c.stat("ctr-a")),
        tonic::Code::NotFound,
        "a failed Prepare left its snapshot"
    );

    // A corrupt bootstrap, an unreachable registry, a good image.
    let mut bad = boot.clone();
    bad.truncate(bad.len() / 2);
    c.meta_layer("data1", "meta-corrupt", &image, &bad);
    let e = c.prepare("ctr-b", "meta-corrupt", &[]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains(&image) && e.message().contains("bootstrap"),
        "{e}"
    );
    // A bootstrap that is a symbolic link (here to a good bootstrap outside the layer;
    // it could be another image's, or a FIFO): refused, not followed.
    c.meta_layer_with("data5", "meta-link", &image, |path| {
        std::os::unix::fs::symlink(&boot_path, path).unwrap()
    });
    let e = c.prepare("ctr-f", "meta-link", &[]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("image/image.boot"), "{e}");
    let closed = format!("127.0.0.1:{}/busybox:v1-nydus", free_port());
    c.meta_layer("data2", "meta-unreachable", &closed, &boot);
    let e = c.prepare("ctr-c", "meta-unreachable", &[]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(
        e.message().contains(&closed) && e.message().contains("unreachable"),
        "{e}"
    );
    c.meta_layer("data3", "meta-good", &image, &boot);
    let mounts = c.prepare("ctr-d", "meta-good", &[]).unwrap();
    let lower = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_string();
    assert!(rafs_e2e::is_mounted(Path::new(&lower)), "{mounts:?}");
    assert_eq!(
        c.mounts("ctr-d").unwrap(),
        mounts,
        "Mounts() differs from Prepare()"
    );
    // A view of the image: read-only, its own directory over the same nydusd mount.
    let view = c.view("view-d", "meta-good").unwrap();
    let view_lower = view[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert!(view_lower.ends_with(&format!(":{lower}")), "{view:?}");
    assert!(
        !view[0].options.iter().any(|o| o.starts_with("upperdir=")),
        "{view:?}"
    );
    assert_eq!(c.mounts("view-d").unwrap(), view);
    c.remove("view-d").unwrap();
    // A layer committed over the image (a container committed as a new image) stays
    // above the nydusd mount in a rootfs over it.
    let m = c.prepare("commit-me", "meta-good", &[]).unwrap();
    let upper = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap()
        .to_string();
    fs::write(Path::new(&upper).join("added"), b"x").unwrap();
    c.commit("layer-above", "commit-me").unwrap();
    let m = c.prepare("ctr-g", "layer-above", &[]).unwrap();
    let lowers = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lowers, format!("{upper}:{lower}"), "{m:?}");
    c.remove("ctr-g").unwrap();
    c.remove("layer-above").unwrap();
    assert_eq!(
        code(c.remove("meta-good")),
        tonic::Code::FailedPrecondition,
        "parent of ctr-d"
    );
    c.remove("ctr-d").unwrap();
    c.remove("meta-good").unwrap();
    assert!(
        !rafs_e2e::is_mounted(Path::new(&lower)),
        "the image stayed mounted after its snapshot went"
    );
    assert!(snap.nydusd_pids().is_empty(), "{:?}", snap.nydusd_pids());
    for key in ["ctr-b", "ctr-c"] {
        assert_eq!(code(c.stat(key)), tonic::Code::NotFound);
    }
    assert!(snap.fuse_mounts().is_empty(), "{:?}", snap.fuse_mounts());
    drop(c);
    drop(snap);

    // A nydusd that never serves: DEADLINE_EXCEEDED after ready_timeout, nothing left.
    let fake = dir.join("fake-nydusd");
    fs::write(&fake, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let root = dir.join("snap-hang");
    let mut snap = NydusSnapshotter::start(&root, "[daemon]\nready_timeout = 2");
    snap.nydusd = fake;
    snap.down();
    snap.up();
    let mut c = Client::connect(&snap.sock);
    c.meta_layer("data4", "meta-hang", &image, &boot);
    let t0 = Instant::now();
    let e = c.prepare("ctr-e", "meta-hang", &[]).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    assert!(e.message().contains(&image), "{e}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(
        rafs_e2e::pids_mentioning(&root, "sh").is_empty(),
        "the hung daemon was left running"
    );
    assert!(snap.fuse_mounts().is_empty());
    assert_eq!(code(c.stat("ctr-e")), tonic::Code::NotFound);
}
