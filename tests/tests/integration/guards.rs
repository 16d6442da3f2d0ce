//! The guards against the real kernel: a tree packed by Debian's `mkfs.erofs` and mounted
//! through a loop device reads back equal to its source, and everything is undone on drop.

use std::fs;
use std::process::Command;

use filetime::FileTime;

use rafs_e2e::{
    compare_trees, is_mounted, long_name_path, make_varied_tree, require_root_tools, LoopDevice,
    Mount,
};
use tempfile::TempDir;

#[test]
fn erofs_mount_through_loop_device_matches_source_and_is_undone_on_drop() {
    require_root_tools(&["mkfs.erofs", "losetup", "mount", "umount"]);
    let work = TempDir::new().unwrap();
    let (src, image, mnt) = (
        work.path().join("src"),
        work.path().join("image.erofs"),
        work.path().join("mnt"),
    );
    make_varied_tree(&src).unwrap();
    // erofs-utils 1.5 (Debian 12) fails on a 255-byte name ("Could not format the device:
    // No such file or directory"; 254 bytes work): leave that one entry out.
    let names = src.join(long_name_path().parent().unwrap());
    let names_mtime = FileTime::from_last_modification_time(&fs::metadata(&names).unwrap());
    fs::remove_file(src.join(long_name_path())).unwrap();
    filetime::set_file_times(&names, names_mtime, names_mtime).unwrap();
    fs::create_dir(&mnt).unwrap();
    let status = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success(), "mkfs.erofs failed: {status}");

    let device;
    {
        let lo = LoopDevice::attach_read_only(&image).unwrap();
        device = lo.path().to_path_buf();
        let mount = Mount::kernel("erofs", lo.path(), &mnt, "ro").unwrap();
        assert!(is_mounted(mount.target()));
        let diffs = compare_trees(&src, &mnt);
        assert!(diffs.is_empty(), "{diffs:#?}");
    }
    assert!(!is_mounted(&mnt));
    let out = Command::new("losetup")
        .arg("-j")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "{} still attached: {}",
        device.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}
