//! The per-bootstrap filesystem without FUSE: what it answers the kernel for directories.

use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use nydusd::cache::ChunkCache;
use nydusd::config::Config;
use nydusd::fs::{RafsFs, ROOT_ID};
use nydusd::metrics::Metrics;
use p2p_backend::localfs::LocalFs;
use rafs::read::Bootstrap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Builds `src` into `dir/image.boot` and blobs in `dir/blobs`.
fn build(src: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let boot = dir.join("image.boot");
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut o = converter::CreateOptions::new(src, converter::SourceType::Directory);
    o.bootstrap = Some(boot.clone());
    o.blob_dir = Some(blobs.clone());
    converter::create(&o).unwrap();
    (boot, blobs)
}

#[test]
fn directories_need_no_opendir_and_list_without_a_handle() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..300 {
        std::fs::write(src.join(format!("d/file-with-a-longish-name-{i:03}")), "x").unwrap();
    }
    let (boot, blobs) = build(&src, tmp.path());
    let bs = Arc::new(Bootstrap::open(&boot).unwrap());
    let metrics = Arc::new(Metrics::default());
    let cfg = Config::localfs(blobs.clone(), tmp.path().join("cache"));
    let cache = ChunkCache::new(
        bs,
        Arc::new(LocalFs::new(&blobs)),
        &cfg,
        metrics.clone(),
        &nydusd::cache::OpenBlobs::new(),
    );
    let fs = RafsFs::new(Arc::new(cache.unwrap()), true, metrics, 0);
    let ctx = Context::default();

    // ENOSYS: the kernel stops sending OPENDIR/RELEASEDIR and caches listings itself.
    let err = fs.opendir(&ctx, ROOT_ID, 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSYS));
    let d = fs.lookup(&ctx, ROOT_ID, c"d").unwrap();
    let file = fs
        .lookup(&ctx, d.inode, c"file-with-a-longish-name-000")
        .unwrap();
    let err = fs.opendir(&ctx, file.inode, 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));

    // Listing with handle 0 in small pieces (as the kernel does) resumes at each offset.
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let mut room = 10;
        let mut last = offset;
        fs.readdir(&ctx, d.inode, 0, 4096, offset, &mut |e| {
            if room == 0 {
                return Ok(0);
            }
            room -= 1;
            names.push(String::from_utf8_lossy(e.name).into_owned());
            last = e.offset;
            Ok(1)
        })
        .unwrap();
        if last == offset {
            break;
        }
        offset = last;
    }
    names.retain(|n| n != "." && n != "..");
    let want: Vec<String> = (0..300)
        .map(|i| format!("file-with-a-longish-name-{i:03}"))
        .collect();
    assert_eq!(names, want);
}

/// What a guest (or a confused kernel) may send over either transport: requests for
/// inodes and handles that do not exist, files treated as directories and the other way
/// round, writes, requests after an unmount, on a pseudo tree with a nested mount:
/// errors, never a panic.
#[test]
fn requests_for_unknown_inodes_and_handles_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"twelve bytes").unwrap();
    let (boot, blobs) = build(&src, tmp.path());
    let cfg = serde_json::json!({
        "device": {
            "backend": {"type": "localfs", "config": {"dir": blobs}},
            "cache": {"type": "blobcache", "config": {"work_dir": tmp.path().join("cache")}},
        },
    });
    let vfs = nydusd::vfs::Vfs::pseudo();
    let index = vfs.reserve("/rafs/x/lowerdir").unwrap();
    let open = nydusd::cache::OpenBlobs::new();
    let spec = nydusd::daemon::ImageSpec {
        mountpoint: "/rafs/x/lowerdir".into(),
        source: boot.clone(),
        index,
        config: cfg.to_string(),
        prefetch_files: None,
    };
    let config = Config::from_json(&spec.config).unwrap();
    let image = nydusd::daemon::mount_image(spec, &config, &open).unwrap();
    // Credentials handed over later reach the config a successor would mount with.
    image.set_auth("dXNlcjpwYXNz");
    vfs.mount(image).unwrap();
    let tree = vfs.export();
    let config: serde_json::Value = serde_json::from_str(&tree.mounts[0].config).unwrap();
    assert_eq!(
        config["device"]["backend"]["config"]["auth"],
        "dXNlcjpwYXNz"
    );
    assert_eq!(tree.mounts[0].mountpoint, "/rafs/x/lowerdir");
    assert_eq!(tree.dirs.len(), 2, "{tree:?}");
    let ctx = Context::default();
    let errno = |e: std::io::Error| e.raw_os_error();

    let rafs = vfs.lookup(&ctx, ROOT_ID, c"rafs").unwrap();
    let x = vfs.lookup(&ctx, rafs.inode, c"x").unwrap();
    let lower = vfs.lookup(&ctx, x.inode, c"lowerdir").unwrap();
    let d = vfs.lookup(&ctx, lower.inode, c"d").unwrap();
    let f = vfs.lookup(&ctx, d.inode, c"f").unwrap();
    // Inodes nobody handed out: in the pseudo tree's range, and in an unused mount index.
    for bogus in [ROOT_ID + 1000, (4242u64 << 48) | 7, u64::MAX] {
        assert_eq!(
            vfs.getattr(&ctx, bogus, None).map_err(errno).unwrap_err(),
            Some(libc::ENOENT),
            "{bogus:#x}"
        );
        assert!(vfs.lookup(&ctx, bogus, c"d").is_err());
        assert!(vfs.open(&ctx, bogus, libc::O_RDONLY as u32, 0).is_err());
        vfs.release(&ctx, bogus, 0, 99, false, false, None).unwrap();
    }
    // Names that do not exist, files as directories and directories as files.
    assert_eq!(
        errno(vfs.lookup(&ctx, ROOT_ID, c"nope").unwrap_err()),
        Some(libc::ENOENT)
    );
    assert!(vfs.lookup(&ctx, f.inode, c"x").is_err());
    assert_eq!(
        errno(
            vfs.open(&ctx, d.inode, libc::O_RDONLY as u32, 0)
                .unwrap_err()
        ),
        Some(libc::EISDIR)
    );
    assert_eq!(
        errno(
            vfs.open(&ctx, x.inode, libc::O_RDONLY as u32, 0)
                .unwrap_err()
        ),
        Some(libc::EISDIR)
    );
    assert_eq!(
        errno(vfs.open(&ctx, f.inode, libc::O_RDWR as u32, 0).unwrap_err()),
        Some(libc::EROFS)
    );

    // Unmounted under an open file: its requests get ENOENT, nothing panics.
    vfs.umount("/rafs/x/lowerdir").unwrap();
    assert_eq!(
        errno(vfs.getattr(&ctx, f.inode, None).unwrap_err()),
        Some(libc::ENOENT)
    );
    vfs.release(&ctx, f.inode, 0, 1, false, false, None)
        .unwrap();
    assert_eq!(
        errno(vfs.lookup(&ctx, ROOT_ID, c"rafs").unwrap_err()),
        Some(libc::ENOENT)
    );
}
