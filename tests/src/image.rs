//! Images in tests: building one with our `nydus-image create`, mounting a bootstrap with
//! the kernel's EROFS driver, extracting `nydus-image unpack` tars, and OCI images made
//! and unpacked by `umoci` (the reference tree for layer application).

use crate::bins::bin;
use crate::compare::CompareOptions;
use crate::daemons::run_ok;
use crate::guards::{LoopDevice, Mount};
use rafs::read::{self, Bootstrap};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A bootstrap with its blobs directory (blobs named by id, as `create -D` writes them).
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The bootstrap file.
    pub boot: PathBuf,
    /// The directory holding the blobs.
    pub blobs: PathBuf,
}

/// Builds `src` with our `nydus-image create FLAGS -B OUT/image.boot -D OUT/blobs SRC`.
pub fn build_image(src: &Path, out: &Path, flags: &[&str]) -> BuiltImage {
    build_image_with(&bin("nydus-image"), src, out, flags)
}

/// [`build_image`] with another `nydus-image` (upstream's, as a judge).
pub fn build_image_with(nydus_image: &Path, src: &Path, out: &Path, flags: &[&str]) -> BuiltImage {
    let blobs = out.join("blobs");
    fs::create_dir_all(&blobs).unwrap();
    let boot = out.join("image.boot");
    run_ok(
        Command::new(nydus_image)
            .arg("create")
            .args(flags)
            .arg("-B")
            .arg(&boot)
            .arg("-D")
            .arg(&blobs)
            .arg(src),
    );
    BuiltImage { boot, blobs }
}

/// Expands every blob of the bootstrap `boot` (found by id in `blobs`) into its
/// uncompressed layout, one file each in `dir`; returns their paths in blob order.
pub fn expand_blobs(boot: &Path, blobs: &Path, dir: &Path) -> Vec<PathBuf> {
    let bs = Bootstrap::open(boot).unwrap();
    let mut out = Vec::new();
    for (i, info) in bs.blobs().iter().enumerate() {
        let blob = fs::File::open(blobs.join(&info.id))
            .unwrap_or_else(|e| panic!("blob {} in {}: {e}", info.id, blobs.display()));
        let path = dir.join(format!("{}.expanded", info.id));
        let mut f = fs::File::create(&path).unwrap();
        read::expand_blob(&bs, i as u32, &blob, &mut f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), info.uncompressed_size);
        out.push(path);
    }
    out
}

/// A bootstrap mounted by the kernel's EROFS driver, each blob expanded onto a loop
/// device as an extra device; dropping it unmounts, then detaches the loop devices.
pub struct ErofsMount {
    // Field order is drop order: the mount before the devices under it.
    _mount: Mount,
    _boot: LoopDevice,
    _blobs: Vec<LoopDevice>,
    /// The mount point.
    pub mnt: PathBuf,
}

impl ErofsMount {
    /// Mounts `boot` (blobs by id in `blobs`) at `work/mnt`; expanded blobs go to `work`.
    pub fn new(boot: &Path, blobs: &Path, work: &Path) -> ErofsMount {
        fs::create_dir_all(work).unwrap();
        let loops: Vec<LoopDevice> = expand_blobs(boot, blobs, work)
            .iter()
            .map(|d| LoopDevice::attach_read_only(d).unwrap())
            .collect();
        let boot_loop = LoopDevice::attach_read_only(boot).unwrap();
        let mut options = "ro".to_string();
        for l in &loops {
            options.push_str(&format!(",device={}", l.path().display()));
        }
        let mnt = work.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let mount = Mount::kernel("erofs", boot_loop.path(), &mnt, &options).unwrap();
        ErofsMount {
            _mount: mount,
            _boot: boot_loop,
            _blobs: loops,
            mnt,
        }
    }
}

/// Extracts a tar (e.g. from `nydus-image unpack`) with GNU tar, keeping owners, modes
/// and xattrs.
pub fn extract_tar(tar: &Path, into: &Path) {
    fs::create_dir_all(into).unwrap();
    run_ok(
        Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--same-owner",
                "--numeric-owner",
                "-xpf",
            ])
            .arg(tar)
            .arg("-C")
            .arg(into),
    );
}

/// `nydus-image unpack BOOT -D BLOBS` extracted into `into`.
pub fn unpack_image(boot: &Path, blobs: &Path, into: &Path) {
    let tar = into.with_extension("tar");
    run_ok(
        Command::new(bin("nydus-image"))
            .arg("unpack")
            .arg(boot)
            .arg("-D")
            .arg(blobs)
            .arg("--output")
            .arg(&tar),
    );
    extract_tar(&tar, into);
}

/// Makes `oci:LAYOUT:TAG` with umoci from layer tars (lowest first), each added as it is.
pub fn umoci_image(layout: &Path, tag: &str, layers: &[PathBuf]) {
    let image = format!("{}:{tag}", layout.display());
    if !layout.join("index.json").exists() {
        run_ok(
            Command::new("umoci")
                .arg("init")
                .arg("--layout")
                .arg(layout),
        );
    }
    run_ok(Command::new("umoci").args(["new", "--image", &image]));
    for l in layers {
        run_ok(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", &image])
                .arg(l),
        );
    }
}

/// The rootfs of `oci:LAYOUT:TAG` as `umoci unpack` (run as root, so owners are kept)
/// produces it, in `dir/bundle/rootfs`.
pub fn umoci_rootfs(layout: &Path, tag: &str, dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle),
    );
    bundle.join("rootfs")
}

/// What `umoci unpack` cannot reproduce: the rootfs directory is created by umoci
/// itself (its mtime is the time of the unpack when no layer has a `./` entry), so the
/// two roots' mtimes are skipped. Everything else is compared, nanoseconds and xattrs
/// included.
pub fn umoci_compare() -> CompareOptions {
    CompareOptions {
        ignore_root_mtime: true,
        ..Default::default()
    }
}

/// The merged bootstrap of the single image in an OCI layout (e.g. one `skopeo copy`
/// wrote from a nydus image): the `image/image.boot` of its tar+gzip layer.
pub fn bootstrap_of_layout(dir: &Path) -> Bootstrap {
    let index = fs::read_to_string(dir.join("index.json")).unwrap();
    let at = index.find("sha256:").unwrap() + 7;
    let manifest = fs::read_to_string(dir.join("blobs/sha256").join(&index[at..at + 64])).unwrap();
    // The bootstrap layer is the one with the tar+gzip media type.
    let layer_start = manifest
        .rfind("application/vnd.oci.image.layer.v1.tar+gzip")
        .unwrap();
    let d = manifest[layer_start..].find("sha256:").unwrap() + layer_start + 7;
    let gz = fs::File::open(dir.join("blobs/sha256").join(&manifest[d..d + 64])).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("image/image.boot") {
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            return Bootstrap::from_bytes(b).unwrap();
        }
    }
    panic!("no image/image.boot in the bootstrap layer");
}

/// A nydus image as the registry holds it, copied out by skopeo (not by our client)
/// into `dir/pulled`: its merged bootstrap written to `dir/image.boot`, and the
/// directory holding its blobs by id. Returns (bootstrap, blobs directory).
pub fn pull_nydus_image(reference: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let pulled = dir.join("pulled");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:nydus", pulled.display()),
    ]));
    let boot = dir.join("image.boot");
    fs::write(&boot, bootstrap_of_layout(&pulled).bytes()).unwrap();
    (boot, pulled.join("blobs/sha256"))
}

/// A layer tar written entry by entry, with names and link names stored verbatim (so
/// that absolute paths and whiteout directories can be written as tools write them).
pub struct LayerTar {
    out: Vec<u8>,
    /// Modification time of the entries that follow.
    pub mtime: u64,
}

impl Default for LayerTar {
    fn default() -> Self {
        LayerTar {
            out: Vec::new(),
            mtime: 1_700_000_000,
        }
    }
}

impl LayerTar {
    fn header(&mut self, name: &str, ty: tar::EntryType, mode: u32, link: &str, data: &[u8]) {
        self.header_owned(name, ty, mode, (0, 0), link, data)
    }

    fn header_owned(
        &mut self,
        name: &str,
        ty: tar::EntryType,
        mode: u32,
        (uid, gid): (u64, u64),
        link: &str,
        data: &[u8],
    ) {
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "{name}: use short names"
        );
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(self.mtime);
        h.set_size(data.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.header(name, tar::EntryType::Directory, mode, "", b"");
        self
    }

    /// A directory with an owner.
    pub fn dir_owned(&mut self, name: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        self.header_owned(name, tar::EntryType::Directory, mode, (uid, gid), "", b"");
        self
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.header(name, tar::EntryType::Regular, mode, "", data);
        self
    }

    /// A symlink.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.header(name, tar::EntryType::Symlink, 0o777, target, b"");
        self
    }

    /// PAX records for the next entry (e.g. `SCHILY.xattr.user.x`).
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = format!(" {k}=").len() + v.len() + 1;
            let mut len = rest + 1;
            while len.to_string().len() + rest != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.header("pax", tar::EntryType::XHeader, 0o644, "", &body);
        self
    }

    /// Writes the tar (with its end blocks) to `path`.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let mut bytes = self.out.clone();
        bytes.extend_from_slice(&[0u8; 1024]);
        fs::write(path, bytes)
    }
}

/// Builds the python fixture (`fixtures/make-python-image.sh`: debootstrap minbase +
/// python3, four layers; built once per machine and reused) and pushes it with skopeo
/// to the registry at `addr` as `python:v1`, with `creds` (`user:password`) if given.
/// Returns the reference `addr/python:v1`.
pub fn push_python_image(addr: &str, creds: Option<&str>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/make-python-image.sh");
    let out = run_ok(Command::new("bash").arg(script));
    let layout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let reference = format!("{addr}/python:v1");
    let mut copy = Command::new("skopeo");
    copy.args(["copy", "--dest-tls-verify=false"]);
    if let Some(c) = creds {
        copy.args(["--dest-creds", c]);
    }
    run_ok(copy.args([format!("oci:{layout}"), format!("docker://{reference}")]));
    reference
}
