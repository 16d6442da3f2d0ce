//! `nydusify convert` progress: the library's per-layer hooks, and the binary's bars,
//! drawn on a terminal only.

use crate::common::{gzip, TarMaker};
use converter::oci::convert::{convert, ConvertOptions, Progress};
use converter::oci::store::{ImageRef, Layout, Target};
use converter::oci::{
    digest_of, Descriptor, MEDIA_LAYER_GZIP, MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST,
};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

fn desc(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: digest_of(data),
        size: data.len() as u64,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    }
}

/// An OCI layout at `dir` with one image tagged `v1` of two tar+gzip layers; returns the
/// layers' descriptors.
fn two_layer_image(dir: &Path) -> Vec<Descriptor> {
    let out = Layout::create(dir, Some("v1".into())).unwrap();
    let mut big = TarMaker::default();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 / 5) as u8).collect();
    big.dir("usr", 0o755).file("usr/big", 0o644, &data);
    let mut small = TarMaker::default();
    small.file("hello", 0o644, b"hello\n");
    let layers: Vec<Vec<u8>> = vec![gzip(&big.finish()), gzip(&small.finish())];
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let mut descs = Vec::new();
    for l in &layers {
        let d = desc(MEDIA_LAYER_GZIP, l);
        out.put_blob_bytes(&d, l).unwrap();
        descs.push(d);
    }
    let cd = desc(MEDIA_OCI_CONFIG, config);
    out.put_blob_bytes(&cd, config).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": cd,
        "layers": descs,
    });
    let m = serde_json::to_vec(&manifest).unwrap();
    out.tag(&desc(MEDIA_OCI_MANIFEST, &m), &m).unwrap();
    descs
}

#[derive(Debug, Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
    read: Mutex<Vec<u64>>,
}

impl Progress for Recorder {
    fn layer_started(&self, index: usize, count: usize, digest: &str, size: u64) {
        self.events
            .lock()
            .unwrap()
            .push(format!("start {index}/{count} {digest} {size}"));
        self.read.lock().unwrap().push(0);
    }
    fn layer_read(&self, index: usize, bytes: u64) {
        self.read.lock().unwrap()[index] += bytes;
    }
    fn layer_done(&self, index: usize) {
        self.events.lock().unwrap().push(format!("done {index}"));
    }
}

#[test]
fn each_layer_reports_its_start_every_source_byte_and_its_end() {
    let t = tempfile::tempdir().unwrap();
    let layers = two_layer_image(&t.path().join("src"));
    let source = ImageRef::Layout {
        dir: t.path().join("src"),
        tag: Some("v1".into()),
    };
    let target = |name: &str| ImageRef::Layout {
        dir: t.path().join(name),
        tag: Some("v1".into()),
    };
    let mut opts = ConvertOptions::new(source.clone(), target("plain"));
    opts.work_dir = t.path().to_path_buf();
    let plain = convert(&opts).unwrap();

    let rec = Arc::new(Recorder::default());
    opts.target = target("watched");
    opts.progress = Some(rec.clone());
    let watched = convert(&opts).unwrap();
    let l = |i: usize| format!("{} {}", layers[i].digest, layers[i].size);
    assert_eq!(
        *rec.events.lock().unwrap(),
        vec![
            format!("start 0/2 {}", l(0)),
            "done 0".to_string(),
            format!("start 1/2 {}", l(1)),
            "done 1".to_string(),
        ]
    );
    assert_eq!(
        *rec.read.lock().unwrap(),
        vec![layers[0].size, layers[1].size],
        "every byte of each layer is counted once"
    );
    assert_eq!(plain.digest, watched.digest, "watching changes nothing");
}

#[test]
fn nydusify_draws_layer_bars_on_a_terminal_only() {
    let t = tempfile::tempdir().unwrap();
    two_layer_image(&t.path().join("src"));
    let exe = env!("CARGO_BIN_EXE_nydusify");
    let args = |to: &str| {
        format!(
            "{exe} convert --log-level error --source oci:{0}/src:v1 --target oci:{0}/{to}:v1 \
             --work-dir {0}",
            t.path().display()
        )
    };
    // Piped: not a byte on stderr.
    let out = Command::new("sh")
        .arg("-c")
        .arg(args("piped"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // On a pseudo-terminal (util-linux `script`): a bar per layer, finished.
    let out = Command::new("script")
        .args(["-qec", &args("tty"), "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("layer 1/2 sha256:"), "{screen}");
    assert!(screen.contains("layer 2/2 sha256:"), "{screen}");
    assert!(
        screen.contains("[=============================="),
        "{screen}"
    );
}
