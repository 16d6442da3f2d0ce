//! `nydus-image merge` (spec §14, issue 3): layers built like nydusify builds them
//! (`--blob-inline-meta --features blob-toc --whiteout-spec none`) stacked with OCI
//! whiteout rules, read back with `rafs::read` and every file's data verified.

use crate::common::{chain, noise, TarMaker};
use converter::merge::{merge, MergeOptions};
use converter::{create, CreateOptions, SourceType, WhiteoutSpec};
use rafs::read::{blob_chunks, read_chunk, Bootstrap};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds one layer blob from `tar` as nydusify does; returns the blob path.
fn layer(dir: &Path, name: &str, tar: Vec<u8>, chunk_size: u32) -> PathBuf {
    let src = dir.join(format!("{name}.tar"));
    fs::write(&src, tar).unwrap();
    let mut o = CreateOptions::new(&src, SourceType::Tar);
    o.blob = Some(dir.join(format!("{name}.blob")));
    o.inline_meta = true;
    o.blob_toc = true;
    o.whiteout = WhiteoutSpec::None;
    o.chunk_size = chunk_size;
    o.threads = 2;
    create(&o).unwrap();
    dir.join(format!("{name}.blob"))
}

/// Merges `blobs` into `<dir>/merged.boot`.
fn merge_blobs(dir: &Path, blobs: &[PathBuf]) -> Merged {
    let out = dir.join("merged.boot");
    merge(&MergeOptions {
        sources: blobs.to_vec(),
        bootstrap: out.clone(),
        ..Default::default()
    })
    .unwrap();
    Merged::open(&out, blobs)
}

/// A merged image opened with its blob files (found by the ids the merge gave them).
struct Merged {
    bs: Bootstrap,
    blobs: HashMap<String, PathBuf>,
}

impl Merged {
    fn open(boot: &Path, blobs: &[PathBuf]) -> Merged {
        let mut by_id = HashMap::new();
        for b in blobs {
            let layer = converter::merge::open_layer(b).unwrap();
            by_id.insert(layer.blob.id.unwrap(), b.clone());
        }
        Merged {
            bs: Bootstrap::open(boot).unwrap(),
            blobs: by_id,
        }
    }

    /// Every path with a short description: `d 755`, `f 644 <content>`, `l -> target`.
    fn listing(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        self.bs
            .walk(|path, _, inode| {
                let p = String::from_utf8_lossy(path).into_owned();
                let perm = inode.mode & 0o7777;
                let desc = if inode.is_dir() {
                    format!("d {perm:o}")
                } else if inode.is_reg() {
                    let data = self.read(&p);
                    format!("f {perm:o} {}", String::from_utf8_lossy(&data))
                } else if inode.is_symlink() {
                    format!(
                        "l -> {}",
                        String::from_utf8_lossy(&self.bs.readlink(inode)?)
                    )
                } else {
                    format!("other {:o}", inode.mode)
                };
                out.insert(p, desc);
                Ok(())
            })
            .unwrap();
        out
    }

    fn read(&self, path: &str) -> Vec<u8> {
        let inode = self.bs.lookup_path(path).unwrap();
        let mut out = Vec::new();
        for i in 0..self.bs.chunk_count(&inode) {
            let addr = self.bs.chunk(&inode, i).unwrap();
            let info = &self.bs.blobs()[addr.blob_index as usize];
            let file = File::open(&self.blobs[&info.id]).unwrap();
            let chunks = blob_chunks(&self.bs, addr.blob_index, &file).unwrap();
            let (chunk, _) = chunks[addr.ci_index as usize];
            out.extend(read_chunk(&file, info, &chunk).unwrap());
        }
        out.truncate(inode.size as usize);
        out
    }

    fn names(&self) -> Vec<String> {
        self.listing().into_keys().collect()
    }
}

fn lower() -> Vec<u8> {
    let mut m = TarMaker::default();
    m.dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root")
        .file("etc/shadow", 0o600, b"secret")
        .dir("opt", 0o755)
        .dir("opt/app", 0o755)
        .file("opt/app/old", 0o644, b"old")
        .dir("opt/app/sub", 0o755)
        .file("opt/app/sub/deep", 0o644, b"deep")
        .dir("var", 0o755)
        .file("var/file-to-dir", 0o644, b"was a file")
        .dir("var/dir-to-file", 0o755)
        .file("var/dir-to-file/inner", 0o644, b"inner")
        .dir("gone", 0o755)
        .file("gone/x", 0o644, b"x");
    m.finish()
}

fn upper() -> Vec<u8> {
    let mut m = TarMaker::default();
    m.dir("etc", 0o700)
        .file("etc/.wh.shadow", 0o644, b"")
        .file("etc/hostname", 0o644, b"box")
        .dir("opt/app", 0o750)
        .file("opt/app/.wh..wh..opq", 0o644, b"")
        .file("opt/app/new", 0o644, b"new")
        .file(".wh.gone", 0o644, b"")
        .dir("var/file-to-dir", 0o755)
        .file("var/file-to-dir/now", 0o644, b"now a dir")
        .file("var/dir-to-file", 0o644, b"now a file")
        .file(".wh.never-existed", 0o644, b"");
    m.finish()
}

#[test]
fn whiteouts_opaque_dirs_and_type_changes_follow_oci_rules() {
    let t = tempfile::tempdir().unwrap();
    let l1 = layer(t.path(), "l1", lower(), 0x100000);
    let l2 = layer(t.path(), "l2", upper(), 0x100000);
    let m = merge_blobs(t.path(), &[l1, l2]);
    let got = m.listing();
    let want: BTreeMap<String, String> = [
        ("/etc", "d 700"),
        ("/etc/hostname", "f 644 box"),
        ("/etc/passwd", "f 644 root"),
        ("/opt", "d 755"),
        ("/opt/app", "d 750"),
        ("/opt/app/new", "f 644 new"),
        ("/var", "d 755"),
        ("/var/dir-to-file", "f 644 now a file"),
        ("/var/file-to-dir", "d 755"),
        ("/var/file-to-dir/now", "f 644 now a dir"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn a_whiteout_then_recreation_in_the_same_layer_replaces_the_directory() {
    let t = tempfile::tempdir().unwrap();
    let l1 = layer(t.path(), "l1", lower(), 0x100000);
    let mut m = TarMaker::default();
    m.file("opt/.wh.app", 0o644, b"")
        .dir("opt/app", 0o711)
        .file("opt/app/fresh", 0o644, b"fresh");
    let l2 = layer(t.path(), "l2", m.finish(), 0x100000);
    let m = merge_blobs(t.path(), &[l1, l2]);
    let names = m.names();
    assert!(names.contains(&"/opt/app/fresh".to_string()), "{names:?}");
    assert!(!names.contains(&"/opt/app/old".to_string()), "{names:?}");
    assert!(!names.contains(&"/opt/app/sub".to_string()), "{names:?}");
    assert_eq!(m.listing()["/opt/app"], "d 711");
}

#[test]
fn whiteout_markers_of_the_lowest_layer_are_not_kept() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file(".wh.foo", 0o644, b"")
        .dir("d", 0o755)
        .file("d/.wh..wh..opq", 0o644, b"")
        .file("d/f", 0o644, b"f");
    let l1 = layer(t.path(), "l1", m.finish(), 0x100000);
    let m = merge_blobs(t.path(), &[l1]);
    assert_eq!(m.names(), ["/d", "/d/f"]);
}

#[test]
fn hard_links_stay_one_inode_and_copy_up_breaks_them() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("a", 0o644, b"shared")
        .hardlink("b", "a")
        .hardlink("c", "a");
    let l1 = layer(t.path(), "l1", m.finish(), 0x100000);
    let mut m = TarMaker::default();
    m.file("a", 0o644, b"changed").file(".wh.c", 0o644, b"");
    m.file("x", 0o644, b"linked").hardlink("y", "x");
    let l2 = layer(t.path(), "l2", m.finish(), 0x100000);
    let merged = merge_blobs(t.path(), std::slice::from_ref(&l1));
    let a = merged.bs.lookup_path("/a").unwrap();
    assert_eq!(merged.bs.lookup_path("/c").unwrap().nid, a.nid);
    assert_eq!(a.nlink, 3);

    let merged = merge_blobs(t.path(), &[l1, l2]);
    let got = merged.listing();
    assert_eq!(got["/a"], "f 644 changed");
    assert_eq!(got["/b"], "f 644 shared");
    assert!(!got.contains_key("/c"));
    let (a, b) = (
        merged.bs.lookup_path("/a").unwrap(),
        merged.bs.lookup_path("/b").unwrap(),
    );
    assert_ne!(a.nid, b.nid);
    assert_eq!(b.nlink, 1, "the deleted name no longer counts");
    let (x, y) = (
        merged.bs.lookup_path("/x").unwrap(),
        merged.bs.lookup_path("/y").unwrap(),
    );
    assert_eq!(x.nid, y.nid);
    assert_eq!(x.nlink, 2);
}

#[test]
fn blob_table_keeps_only_referenced_blobs_renumbered_with_given_ids() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("big", 0o644, &noise(300_000, 1));
    let l1 = layer(t.path(), "l1", m.finish(), 0x10000);
    let mut m = TarMaker::default();
    m.file(".wh.big", 0o644, b"").dir("empty", 0o755);
    let l2 = layer(t.path(), "l2", m.finish(), 0x10000);
    let mut m = TarMaker::default();
    m.file("data", 0o644, &noise(200_000, 2))
        .file("copy-of-lower", 0o644, &noise(300_000, 1));
    let l3 = layer(t.path(), "l3", m.finish(), 0x10000);
    let ids: Vec<String> = (1..=3).map(|i| format!("{i}").repeat(64)).collect();
    let sizes: Vec<u64> = [&l1, &l2, &l3]
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    let out = t.path().join("merged.boot");
    let res = merge(&MergeOptions {
        sources: vec![l1.clone(), l2, l3.clone()],
        bootstrap: out.clone(),
        blob_digests: ids.clone(),
        blob_sizes: sizes.clone(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        res.blobs,
        [ids[2].clone()],
        "only layer 3's blob is referenced"
    );
    let bs = Bootstrap::open(&out).unwrap();
    assert_eq!(bs.blobs().len(), 1);
    let info = &bs.blobs()[0];
    assert_eq!(info.id, ids[2]);
    assert_eq!(info.compressed_size, sizes[2]);
    assert!(info.toc_size > 0, "TOC size is taken from the blob file");
    assert_ne!(info.toc_digest, [0; 32]);
    // TOC digest and size agree with the blob's own TOC.
    let toc = rafs::read::read_toc(&File::open(&l3).unwrap(), info).unwrap();
    assert!(toc.iter().any(|e| e.name == "image.boot"));
    let f = bs.lookup_path("/copy-of-lower").unwrap();
    assert_eq!(bs.chunk(&f, 0).unwrap().blob_index, 0);
}

#[test]
fn layers_with_different_chunk_sizes_are_inconsistent() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("a", 0o644, b"a");
    let l1 = layer(t.path(), "l1", m.finish(), 0x100000);
    let mut m = TarMaker::default();
    m.file("b", 0o644, b"b");
    let l2 = layer(t.path(), "l2", m.finish(), 0x10000);
    let e = merge(&MergeOptions {
        sources: vec![l1, l2],
        bootstrap: t.path().join("m.boot"),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, converter::Error::Inconsistent(_)), "{e}");
    assert!(chain(&e).contains("chunk size"), "{}", chain(&e));
    assert!(!t.path().join("m.boot").exists());
}

#[test]
fn prefetch_patterns_fill_the_merged_prefetch_table() {
    let t = tempfile::tempdir().unwrap();
    let l1 = layer(t.path(), "l1", lower(), 0x100000);
    let l2 = layer(t.path(), "l2", upper(), 0x100000);
    let out = t.path().join("merged.boot");
    merge(&MergeOptions {
        sources: vec![l1, l2],
        bootstrap: out.clone(),
        prefetch: vec!["/etc/passwd".into(), "/opt".into(), "/gone".into()],
        ..Default::default()
    })
    .unwrap();
    let bs = Bootstrap::open(&out).unwrap();
    let want = vec![
        bs.lookup_path("/etc/passwd").unwrap().nid,
        bs.lookup_path("/opt").unwrap().nid,
    ];
    assert_eq!(bs.prefetch_table().unwrap(), want);
}

#[test]
fn cli_merge_takes_upstream_flags_and_rejects_miscounted_lists() {
    let t = tempfile::tempdir().unwrap();
    let l1 = layer(t.path(), "l1", lower(), 0x100000);
    let l2 = layer(t.path(), "l2", upper(), 0x100000);
    let out = t.path().join("merged.boot");
    let (d1, d2) = ("a".repeat(64), "b".repeat(64));
    let st = Command::new(env!("CARGO_BIN_EXE_nydus-image"))
        .arg("merge")
        .arg("-B")
        .arg(&out)
        .arg(format!("--blob-digests=sha256:{d1},{d2}"))
        .arg(&l1)
        .arg(&l2)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let bs = Bootstrap::open(&out).unwrap();
    let ids: Vec<_> = bs.blobs().iter().map(|b| b.id.clone()).collect();
    assert_eq!(ids, [d1.clone(), d2]);

    let st = Command::new(env!("CARGO_BIN_EXE_nydus-image"))
        .arg("merge")
        .arg("-B")
        .arg(t.path().join("bad.boot"))
        .arg(format!("--blob-digests={d1}"))
        .arg(&l1)
        .arg(&l2)
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(1));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        err.contains("--blob-digests has 1 values for 2 sources"),
        "{err}"
    );
    assert!(!t.path().join("bad.boot").exists());
}

#[test]
fn merged_bootstrap_passes_upstream_check() {
    let upstream = Path::new("/var/cache/nydus-upstream-2.2/bin/nydus-image");
    let upstream = std::env::var_os("NYDUS_UPSTREAM_BIN")
        .map(|d| PathBuf::from(d).join("nydus-image"))
        .unwrap_or_else(|| upstream.to_path_buf());
    assert!(
        upstream.exists(),
        "{} is not installed: run `bash tests/run.sh`, which installs upstream nydus 2.2",
        upstream.display()
    );
    let t = tempfile::tempdir().unwrap();
    let l1 = layer(t.path(), "l1", lower(), 0x100000);
    let l2 = layer(t.path(), "l2", upper(), 0x100000);
    let blobs = t.path().join("blobs");
    fs::create_dir(&blobs).unwrap();
    let out = t.path().join("merged.boot");
    let mut ids = Vec::new();
    for l in [&l1, &l2] {
        let id = converter::merge::sha256_file(l).unwrap();
        fs::copy(l, blobs.join(&id)).unwrap();
        ids.push(id);
    }
    merge(&MergeOptions {
        sources: vec![l1, l2],
        bootstrap: out.clone(),
        blob_digests: ids,
        ..Default::default()
    })
    .unwrap();
    let st = Command::new(&upstream)
        .arg("check")
        .arg("-B")
        .arg(&out)
        .arg("-D")
        .arg(&blobs)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&st.stdout),
        String::from_utf8_lossy(&st.stderr)
    );
}

/// Merges layers built from `tars` (lowest first), or returns the error chain.
fn try_merge(dir: &Path, tars: Vec<Vec<u8>>) -> Result<Merged, String> {
    let blobs: Vec<PathBuf> = tars
        .into_iter()
        .enumerate()
        .map(|(i, tar)| layer(dir, &format!("l{i}"), tar, 0x100000))
        .collect();
    let out = dir.join("merged.boot");
    merge(&MergeOptions {
        sources: blobs.clone(),
        bootstrap: out.clone(),
        ..Default::default()
    })
    .map_err(|e| chain(&e))?;
    Ok(Merged::open(&out, &blobs))
}

/// A merged-/usr base: `lib -> usr/lib` and friends.
fn usr_merged_base() -> Vec<u8> {
    let mut m = TarMaker::default();
    m.dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .file("usr/lib/libc.so.6", 0o755, b"libc")
        .file("usr/lib/libm.so.6", 0o755, b"libm")
        .dir("usr/lib/deep", 0o755)
        .file("usr/lib/deep/old", 0o644, b"old")
        .symlink("lib", "usr/lib")
        .symlink("abs", "/usr/lib")
        .symlink("chain", "lib")
        .symlink("up", "../../../usr/lib/deep")
        .symlink("loop1", "loop2")
        .symlink("loop2", "loop1/x")
        .dir("etc", 0o755)
        .file("etc/f", 0o644, b"file");
    m.finish()
}

#[test]
fn entries_below_a_lower_symlink_land_where_it_points_and_the_symlink_stays() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("lib/libnew.so", 0o755, b"new")
        .file("abs/viaabs", 0o644, b"a")
        .file("chain/viachain", 0o644, b"c")
        .file("up/viaup", 0o644, b"u")
        .file("lib/deep/deeper", 0o644, b"d");
    let got = try_merge(t.path(), vec![usr_merged_base(), m.finish()])
        .unwrap()
        .listing();
    for (path, want) in [
        ("/lib", "l -> usr/lib"),
        ("/abs", "l -> /usr/lib"),
        ("/chain", "l -> lib"),
        ("/usr/lib/libc.so.6", "f 755 libc"),
        ("/usr/lib/libnew.so", "f 755 new"),
        ("/usr/lib/viaabs", "f 644 a"),
        ("/usr/lib/viachain", "f 644 c"),
        ("/usr/lib/deep/viaup", "f 644 u"),
        ("/usr/lib/deep/deeper", "f 644 d"),
        ("/usr/lib/deep/old", "f 644 old"),
    ] {
        assert_eq!(
            got.get(path).map(String::as_str),
            Some(want),
            "{path}: {got:#?}"
        );
    }
    assert!(!got.keys().any(|k| k.starts_with("/lib/")), "{got:#?}");
}

#[test]
fn whiteouts_and_opaque_markers_below_a_lower_symlink_apply_where_it_points() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("lib/.wh.libm.so.6", 0o644, b"")
        .file("chain/deep/.wh..wh..opq", 0o644, b"")
        .file("chain/deep/fresh", 0o644, b"fresh");
    let got = try_merge(t.path(), vec![usr_merged_base(), m.finish()])
        .unwrap()
        .listing();
    assert!(got.contains_key("/usr/lib/libc.so.6"), "{got:#?}");
    assert!(!got.contains_key("/usr/lib/libm.so.6"), "{got:#?}");
    assert!(!got.contains_key("/usr/lib/deep/old"), "{got:#?}");
    assert_eq!(got["/usr/lib/deep/fresh"], "f 644 fresh");
    assert_eq!(got["/lib"], "l -> usr/lib");
}

#[test]
fn an_explicit_directory_replaces_a_lower_symlink_and_its_whiteouts_delete_nothing_lower() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.dir("lib", 0o700)
        .file("lib/.wh.libc.so.6", 0o644, b"")
        .file("lib/own", 0o644, b"own");
    let got = try_merge(t.path(), vec![usr_merged_base(), m.finish()])
        .unwrap()
        .listing();
    assert_eq!(got["/lib"], "d 700");
    assert_eq!(got["/lib/own"], "f 644 own");
    assert_eq!(got["/usr/lib/libc.so.6"], "f 755 libc");
}

#[test]
fn symlink_loops_and_files_in_the_way_are_refused_naming_layer_and_path() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("loop1/x", 0o644, b"x");
    let e = try_merge(t.path(), vec![usr_merged_base(), m.finish()])
        .err()
        .expect("a loop must fail");
    assert!(e.contains("l1.blob, entry '/loop1/x'"), "{e}");
    assert!(e.contains("too many levels of symbolic links"), "{e}");

    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.file("etc/f/x", 0o644, b"x");
    let e = try_merge(t.path(), vec![usr_merged_base(), m.finish()])
        .err()
        .expect("a file in the way must fail");
    assert!(e.contains("l1.blob, entry '/etc/f/x'"), "{e}");
    assert!(e.contains("'/etc/f' is in the way of a directory"), "{e}");
}

#[test]
fn implied_parents_keep_the_lower_attributes_and_new_ones_get_the_documented_ones() {
    let t = tempfile::tempdir().unwrap();
    let mut lower = TarMaker::default();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o2750);
    h.set_uid(7);
    h.set_gid(8);
    h.set_mtime(1_234_567);
    h.set_size(0);
    h.set_path("var/").unwrap();
    h.set_cksum();
    let mut root = h.clone();
    root.set_path("./").unwrap();
    root.set_mode(0o700);
    root.set_cksum();
    lower
        .append(&root, b"")
        .pax(&[("SCHILY.xattr.user.kept", b"yes")])
        .append(&h, b"");
    let mut upper = TarMaker::default();
    upper
        .file("var/lib/x", 0o644, b"x")
        .file("opt/new/y", 0o644, b"y");
    let m = try_merge(t.path(), vec![lower.finish(), upper.finish()]).unwrap();
    let var = m.bs.lookup_path("/var").unwrap();
    assert_eq!(
        (var.mode & 0o7777, var.uid, var.gid, var.mtime),
        (0o2750, 7, 8, 1_234_567)
    );
    assert_eq!(
        m.bs.xattrs(&var).unwrap(),
        [(b"user.kept".to_vec(), b"yes".to_vec())]
    );
    let root = m.bs.root().unwrap();
    assert_eq!((root.mode & 0o7777, root.uid), (0o700, 7));
    // No layer has var/lib: 0755, 0:0, the time of the entry implying it, no mark;
    // in the set-group-ID `var`, its group and the bit, as the kernel gives containerd.
    let lib = m.bs.lookup_path("/var/lib").unwrap();
    assert_eq!(
        (lib.mode & 0o7777, lib.uid, lib.gid, lib.mtime),
        (0o2755, 0, 8, 1_700_000_000)
    );
    let opt = m.bs.lookup_path("/opt/new").unwrap();
    assert_eq!(
        (opt.mode & 0o7777, opt.uid, opt.gid, opt.mtime),
        (0o755, 0, 0, 1_700_000_000)
    );
    assert!(m.bs.xattrs(&lib).unwrap().is_empty());
    assert!(m.bs.xattrs(&root).unwrap().is_empty());
}

#[test]
fn a_whiteout_name_inside_a_path_is_a_directory_name_unless_it_has_a_header() {
    let t = tempfile::tempdir().unwrap();
    let mut lower = TarMaker::default();
    lower
        .dir("d0", 0o755)
        .dir("d0/d1", 0o755)
        .file("d0/d1/kept", 0o644, b"k")
        .dir("d0/d2", 0o755)
        .file("d0/d2/gone", 0o644, b"g");
    let mut upper = TarMaker::default();
    upper
        .file("d0/.wh.d1/x", 0o644, b"x")
        .dir("d0/.wh.d2", 0o700)
        .file("d0/.wh.d2/y", 0o644, b"y");
    let got = try_merge(t.path(), vec![lower.finish(), upper.finish()])
        .unwrap()
        .listing();
    assert_eq!(got["/d0/d1/kept"], "f 644 k");
    assert_eq!(got["/d0/.wh.d1/x"], "f 644 x");
    assert!(!got.contains_key("/d0/d2"), "{got:#?}");
    // containerd: the header is a whiteout; `mkparent` then makes a plain 0755 directory.
    assert_eq!(got["/d0/.wh.d2"], "d 755");
    assert_eq!(got["/d0/.wh.d2/y"], "f 644 y");
}

#[test]
fn symlinks_of_the_same_layer_redirect_its_later_entries() {
    let t = tempfile::tempdir().unwrap();
    let mut m = TarMaker::default();
    m.symlink("opt/link", "/srv/real")
        .file("opt/link/f", 0o644, b"f");
    let got = try_merge(t.path(), vec![usr_merged_base(), m.finish()])
        .unwrap()
        .listing();
    assert_eq!(got["/opt/link"], "l -> /srv/real");
    assert_eq!(got["/srv/real/f"], "f 644 f");
}

#[test]
fn an_opaque_marker_through_a_symlink_to_the_root_clears_it_and_makes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut lower = TarMaker::default();
    lower
        .file("old", 0o644, b"old")
        .symlink("up", "/")
        .dir("d", 0o755)
        .file("d/.wh.x", 0o644, b"");
    let mut upper = TarMaker::default();
    upper
        .file("up/.wh..wh..opq", 0o644, b"")
        .file("kept", 0o644, b"k");
    let got = try_merge(t.path(), vec![lower.finish(), upper.finish()])
        .unwrap()
        .names();
    // containerd resolves `up` to the root before it empties it: no `up` is made.
    assert_eq!(got, ["/kept"]);
}
