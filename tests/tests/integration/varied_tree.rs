//! The fixtures themselves: `make_varied_tree` builds what it promises, deterministically,
//! and `compare_trees` reports exactly the differences there are.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use filetime::FileTime;
use rafs_e2e::{
    compare_trees, compare_trees_with, make_varied_tree, require_root_tools, CompareOptions,
    HARD_LINK_NAMES, MULTI_CHUNK_FILE, WIDE_DIR, WIDE_DIR_ENTRIES,
};
use tempfile::TempDir;

fn varied_tree() -> TempDir {
    require_root_tools(&[]);
    let dir = TempDir::new().unwrap();
    make_varied_tree(dir.path()).unwrap();
    dir
}

#[test]
fn varied_tree_has_every_case_it_promises() {
    let tree = varied_tree();
    let root = tree.path();
    let meta = |rel: &str| fs::symlink_metadata(root.join(rel)).unwrap();

    assert_eq!(
        fs::read_dir(root.join(WIDE_DIR)).unwrap().count(),
        WIDE_DIR_ENTRIES
    );
    assert_eq!(meta(MULTI_CHUNK_FILE).len(), 3 * 1024 * 1024 + 123);
    assert_eq!(meta("empty").len(), 0);
    let inode = meta(HARD_LINK_NAMES[0]).ino();
    for name in HARD_LINK_NAMES {
        assert_eq!(meta(name).nlink(), 3, "{name}");
        assert_eq!(meta(name).ino(), inode, "{name}");
    }
    assert_eq!(
        fs::read_link(root.join("links/long-4000"))
            .unwrap()
            .as_os_str()
            .len(),
        4000
    );
    assert!(meta("special/null").file_type().is_char_device());
    assert_eq!(meta("special/null").rdev(), rustix::fs::makedev(1, 3));
    assert!(meta("special/loop-block").file_type().is_block_device());
    assert!(meta("special/fifo").file_type().is_fifo());
    assert!(meta("special/socket").file_type().is_socket());
    assert_eq!(meta("modes/setuid").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta("modes/sticky").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(
        (meta("owners/big-ids").uid(), meta("owners/big-ids").gid()),
        (100_000, 100_001)
    );
    assert_eq!(meta("owners/link-1000").uid(), 1000);
    assert_eq!(
        xattr::get(root.join("xattrs/opaque"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    let cap = xattr::get(root.join("xattrs/cap-net-bind"), "security.capability").unwrap();
    assert_eq!(cap.map(|c| c.len()), Some(20));
    assert_eq!(
        xattr::get(root.join("xattrs/long-value.txt"), "user.long")
            .unwrap()
            .unwrap()
            .len(),
        1024
    );
    let deep =
        (1..=rafs_e2e::DEEP_LEVELS).fold(root.join("deep"), |p, l| p.join(format!("l{l:02}")));
    assert!(deep.join("leaf.txt").is_file());
    // mtimes are set last: the root's own entries did not touch it afterwards.
    assert_ne!(meta("xattrs/user.txt").mtime_nsec(), 0);
    assert_eq!(
        meta("").mtime(),
        fs::symlink_metadata(root).unwrap().mtime()
    );
}

#[test]
fn varied_tree_is_deterministic_and_equal_to_itself() {
    let one = varied_tree();
    let two = varied_tree();
    assert_eq!(compare_trees(one.path(), one.path()), Vec::<String>::new());
    assert_eq!(compare_trees(one.path(), two.path()), Vec::<String>::new());
}

#[test]
fn compare_reports_exactly_the_changes_made() {
    let expected = varied_tree();
    let actual = varied_tree();
    let (e, a) = (expected.path(), actual.path());

    // Same size, new bytes, old mtime: only the content differs.
    let file = a.join(MULTI_CHUNK_FILE);
    let mtime = FileTime::from_last_modification_time(&fs::metadata(&file).unwrap());
    let mut bytes = fs::read(&file).unwrap();
    bytes[2 * 1024 * 1024] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    filetime::set_file_mtime(&file, mtime).unwrap();
    let diffs = compare_trees(e, a);
    assert_eq!(diffs.len(), 1, "{diffs:#?}");
    assert!(
        diffs[0].starts_with(&format!("{MULTI_CHUNK_FILE}: content: expected sha256 ")),
        "{diffs:#?}"
    );

    // One more change of each kind, each reported once, in walk order.
    fs::set_permissions(a.join("hello.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    restore_parent_mtime(e, a, "links/relative", |p| {
        fs::remove_file(p).unwrap();
        std::os::unix::fs::symlink("../empty", p).unwrap();
        let old = fs::symlink_metadata(e.join("links/relative")).unwrap();
        let mtime = FileTime::from_last_modification_time(&old);
        filetime::set_symlink_file_times(p, mtime, mtime).unwrap();
    });
    xattr::set(a.join("xattrs/opaque"), "trusted.overlay.opaque", b"n").unwrap();
    restore_parent_mtime(e, a, "names/extra", |p| fs::write(p, b"new").unwrap());
    let diffs = compare_trees(e, a);
    assert_eq!(
        diffs[1..],
        [
            "hello.txt: mode: expected 0644, got 0600".to_owned(),
            "links/relative: symlink target: expected \"../hello.txt\", got \"../empty\""
                .to_owned(),
            "names/extra: unexpected".to_owned(),
            "xattrs/opaque: xattr trusted.overlay.opaque: expected \"y\", got \"n\"".to_owned(),
        ],
        "{diffs:#?}"
    );
    assert!(diffs[0].starts_with("data/"), "{diffs:#?}");

    // The options leave out what they say.
    let options = CompareOptions {
        ignore_xattrs: true,
        ..CompareOptions::default()
    };
    assert_eq!(compare_trees_with(e, a, &options).len(), 4);
}

/// Runs `change` on `rel` in `actual`, then gives its parent directory back the mtime it
/// had (a new or removed name changes it), so that only `change` shows.
fn restore_parent_mtime(expected: &Path, actual: &Path, rel: &str, change: impl FnOnce(&Path)) {
    change(&actual.join(rel));
    let parent = Path::new(rel).parent().unwrap();
    let mtime =
        FileTime::from_last_modification_time(&fs::metadata(expected.join(parent)).unwrap());
    filetime::set_file_times(actual.join(parent), mtime, mtime).unwrap();
}
