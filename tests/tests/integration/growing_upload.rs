//! Uploading a blob while it is written (`Registry::push_growing_file`), against a real
//! docker-registry on 127.0.0.1: pieces go out before the writer is done, the upload is
//! committed only when the writer says the blob is complete, an abandoned blob leaves
//! nothing in the repository, and a blob the registry has is not committed twice.

use p2p_backend::registry::{BlobProgress, GrowingPush, Registry, RegistryOptions, UPLOAD_PIECE};
use rafs_e2e::{noise, Registry as TestRegistry};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

const MIB: usize = 1 << 20;

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Blobs committed to `repo`: the registry's per-repository links.
fn linked(storage: &Path, repo: &str) -> Vec<String> {
    let dir = storage.join(format!(
        "docker/registry/v2/repositories/{repo}/_layers/sha256"
    ));
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Bytes received by the registry's open upload sessions of `repo` so far.
fn uploading(storage: &Path, repo: &str) -> u64 {
    let dir = storage.join(format!("docker/registry/v2/repositories/{repo}/_uploads"));
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| std::fs::metadata(e.ok()?.path().join("data")).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Setup {
    _dir: tempfile::TempDir,
    storage: PathBuf,
    reg: TestRegistry,
    file: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let reg = TestRegistry::start_in(dir.path(), "");
    Setup {
        storage: dir.path().join("registry-data"),
        file: dir.path().join("blob"),
        _dir: dir,
        reg,
    }
}

fn client(reg: &TestRegistry, repo: &str) -> Registry {
    Registry::new(
        &format!("{}/{repo}:v1", reg.addr),
        &RegistryOptions::default(),
    )
    .unwrap()
}

/// Writes `bytes` to `path` a MiB at a time, reporting each step; after `stop_at`
/// bytes, calls `before_end` and then ends: Complete when everything was written,
/// otherwise by dropping the sender (abandoning the blob).
fn write_slowly(
    path: &Path,
    bytes: &[u8],
    stop_at: usize,
    tx: watch::Sender<BlobProgress>,
    before_end: impl FnOnce(),
) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut at = 0;
    while at < stop_at {
        let n = MIB.min(stop_at - at);
        f.write_all(&bytes[at..at + n]).unwrap();
        at += n;
        tx.send_replace(BlobProgress::Writing(at as u64));
        std::thread::sleep(Duration::from_millis(20));
    }
    before_end();
    if stop_at == bytes.len() {
        tx.send_replace(BlobProgress::Complete {
            digest: digest(bytes),
            size: bytes.len() as u64,
        });
    }
}

#[test]
fn pieces_go_out_while_the_blob_is_written_and_it_is_committed_at_its_end() {
    let s = setup();
    let bytes = noise(11 * MIB + 12345, 7);
    let reg = client(&s.reg, "grow");
    let (tx, rx) = watch::channel(BlobProgress::Writing(0));
    let mut seen_before_end = 0;
    let pushed = std::thread::scope(|t| {
        let up = t.spawn(|| reg.push_growing_file(&s.file, "the test blob", rx));
        write_slowly(&s.file, &bytes, bytes.len(), tx, || {
            // Give the last whole piece time to arrive, then look: the registry holds
            // pieces of a blob whose end has not been declared yet.
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while uploading(&s.storage, "grow") < 2 * UPLOAD_PIECE
                && std::time::Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            seen_before_end = uploading(&s.storage, "grow");
            assert!(
                linked(&s.storage, "grow").is_empty(),
                "nothing is committed before the end"
            );
        });
        up.join().unwrap()
    });
    assert!(
        seen_before_end >= 2 * UPLOAD_PIECE,
        "only {seen_before_end} bytes had reached the registry before the blob was complete"
    );
    assert_eq!(pushed.unwrap(), GrowingPush::Uploaded(digest(&bytes)));
    assert_eq!(
        linked(&s.storage, "grow"),
        vec![digest(&bytes)[7..].to_string()]
    );
    let mut back = Vec::new();
    let n = reg
        .pull_blob(&digest(&bytes), Some(bytes.len() as u64), &mut back)
        .unwrap();
    assert_eq!(n, bytes.len() as u64);
    assert!(back == bytes, "the registry holds the bytes written");

    // The same blob again: the registry has it, nothing is committed twice.
    let (tx, rx) = watch::channel(BlobProgress::Writing(0));
    let again = std::thread::scope(|t| {
        let up = t.spawn(|| reg.push_growing_file(&s.file, "the test blob", rx));
        write_slowly(&s.file, &bytes, bytes.len(), tx, || {});
        up.join().unwrap()
    });
    assert_eq!(again.unwrap(), GrowingPush::Existed(digest(&bytes)));
}

#[test]
fn an_abandoned_blob_leaves_nothing_in_the_repository() {
    let s = setup();
    let bytes = noise(10 * MIB, 11);
    let reg = client(&s.reg, "gone");
    let (tx, rx) = watch::channel(BlobProgress::Writing(0));
    let pushed = std::thread::scope(|t| {
        let up = t.spawn(|| reg.push_growing_file(&s.file, "the test blob", rx));
        // Abandoned after 9 MiB: two pieces were sent.
        write_slowly(&s.file, &bytes, 9 * MIB, tx, || {});
        up.join().unwrap()
    });
    assert_eq!(pushed.unwrap(), GrowingPush::Abandoned);
    assert!(linked(&s.storage, "gone").is_empty());
    assert!(!reg.blob_exists(&digest(&bytes)).unwrap());
    assert!(!reg.blob_exists(&digest(&bytes[..9 * MIB])).unwrap());

    // Abandoned before a first piece: no session is opened at all.
    let (tx, rx) = watch::channel(BlobProgress::Writing(0));
    let pushed = std::thread::scope(|t| {
        let up = t.spawn(|| reg.push_growing_file(&s.file, "the test blob", rx));
        write_slowly(&s.file, &bytes, MIB, tx, || {});
        up.join().unwrap()
    });
    assert_eq!(pushed.unwrap(), GrowingPush::Abandoned);
    assert!(linked(&s.storage, "gone").is_empty());

    // A small blob, complete before a first piece: an ordinary upload.
    let small = &bytes[..3 * MIB];
    let (tx, rx) = watch::channel(BlobProgress::Writing(0));
    let pushed = std::thread::scope(|t| {
        let up = t.spawn(|| reg.push_growing_file(&s.file, "the test blob", rx));
        write_slowly(&s.file, small, small.len(), tx, || {});
        up.join().unwrap()
    });
    assert_eq!(pushed.unwrap(), GrowingPush::Uploaded(digest(small)));
    assert_eq!(
        linked(&s.storage, "gone"),
        vec![digest(small)[7..].to_string()]
    );
}

/// Pushes a 9 MiB blob while it is written to `repo` through a proxy that answers
/// `status` to the first request of the upload session (the streamed PATCH: the POST
/// that opens the session has no `_state`); checks that the fault was met and that the
/// blob arrived all the same.
fn push_through_one_fault(status: u16, repo: &str, seed: u64) {
    let s = setup();
    let proxy = rafs_e2e::FaultProxy::start(&s.reg.addr);
    proxy.fault(rafs_e2e::Fault::Status(status), "_state=", 1);
    let bytes = noise(9 * MIB + seed as usize, seed);
    let reg = Registry::new(
        &format!("{}/{repo}:v1", proxy.addr),
        &RegistryOptions::default(),
    )
    .unwrap();
    let (tx, rx) = watch::channel(BlobProgress::Writing(0));
    let pushed = std::thread::scope(|t| {
        let up = t.spawn(|| reg.push_growing_file(&s.file, "the test blob", rx));
        write_slowly(&s.file, &bytes, bytes.len(), tx, || {});
        up.join().unwrap()
    });
    assert_eq!(
        proxy.faulted(),
        1,
        "the streamed PATCH did not get its {status}"
    );
    assert_eq!(pushed.unwrap(), GrowingPush::Uploaded(digest(&bytes)));
    assert_eq!(
        linked(&s.storage, repo),
        vec![digest(&bytes)[7..].to_string()]
    );
}

/// A registry that refuses the streamed `PATCH` (416) gets the blob in chunks once it
/// is complete.
#[test]
fn a_refused_streamed_patch_falls_back_to_chunks() {
    push_through_one_fault(416, "chunks", 13);
}

/// Behind htpasswd basic auth, the streamed upload carries the credentials; without
/// them nothing is committed and the error says why.
#[test]
fn a_streamed_upload_carries_basic_credentials() {
    rafs_e2e::require_root_tools(&["htpasswd"]);
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let out =
        rafs_e2e::run_ok(std::process::Command::new("htpasswd").args(["-Bbn", "tester", "s3cret"]));
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = TestRegistry::start_in(
        dir.path(),
        &format!(
            "auth:\n  htpasswd:\n    realm: rafs-test\n    path: {}\n",
            htpasswd.display()
        ),
    );
    let storage = dir.path().join("registry-data");
    let file = dir.path().join("blob");
    let bytes = noise(9 * MIB + 5, 17);
    let push = |creds: Option<(&str, &str)>| {
        let opts = RegistryOptions {
            credentials: creds.map(|(u, p)| p2p_backend::registry::Credentials {
                username: u.into(),
                password: p.into(),
            }),
            ..Default::default()
        };
        let reg = Registry::new(&format!("{}/secure:v1", reg.addr), &opts).unwrap();
        let (tx, rx) = watch::channel(BlobProgress::Writing(0));
        std::thread::scope(|t| {
            let up = t.spawn(|| reg.push_growing_file(&file, "the test blob", rx));
            write_slowly(&file, &bytes, bytes.len(), tx, || {});
            up.join().unwrap()
        })
    };
    let refused = push(Some(("tester", "wrong"))).unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");
    assert!(linked(&storage, "secure").is_empty());
    assert_eq!(
        push(Some(("tester", "s3cret"))).unwrap(),
        GrowingPush::Uploaded(digest(&bytes))
    );
    assert_eq!(
        linked(&storage, "secure"),
        vec![digest(&bytes)[7..].to_string()]
    );
}

/// A registry that stops taking the push credentials mid-upload (401, as for an
/// expired bearer token): push access is negotiated again, the upload starts over, and
/// the blob arrives.
#[test]
fn a_401_mid_upload_renegotiates_and_starts_over() {
    push_through_one_fault(401, "renew", 19);
}
