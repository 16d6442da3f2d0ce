//! A deterministic source tree that exercises every case a RAFS v6 image must carry.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use filetime::FileTime;
use rustix::fs::{FileType, Mode, CWD};

/// The directory (relative to the tree's root) holding [`WIDE_DIR_ENTRIES`] entries.
pub const WIDE_DIR: &str = "wide";
/// How many entries [`WIDE_DIR`] holds.
pub const WIDE_DIR_ENTRIES: usize = 5000;
/// How many directory levels `deep/` nests (`deep/l01/.../l60/leaf.txt`).
pub const DEEP_LEVELS: usize = 60;
/// A pseudo-random, incompressible file of 3 MiB + 123 bytes (four 1 MiB chunks, the
/// last one partial).
pub const MULTI_CHUNK_FILE: &str = "data/random-3m.bin";
/// The three names of one regular file (`nlink` 3), in three directories.
pub const HARD_LINK_NAMES: [&str; 3] = ["links/hard-a", "data/hard-b", "owners/hard-c"];

const MIB: u64 = 1 << 20;
/// The first mtime given out (2020-09-13); each entry gets a later one.
const BASE_MTIME: i64 = 1_600_000_000;

/// `len` deterministic pseudo-random bytes (xorshift from `seed`, 8 bytes a step):
/// incompressible, like model weights, and different for each seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The relative path of the entry whose name is 255 bytes long (the longest a name
/// can be), `names/n0123456789...abcd`.
pub fn long_name_path() -> PathBuf {
    let name = format!("n{}abcd", "0123456789".repeat(25));
    debug_assert_eq!(name.len(), 255);
    Path::new("names").join(name)
}

/// Writes the varied tree into `dir` (created if missing; it should be empty).
///
/// Needs root (device nodes, chown, `trusted.*` and `security.*` xattrs). The same call
/// always produces the same tree — names, contents, modes, owners, xattrs and mtimes —
/// so two trees made by it compare equal. It holds:
///
/// - every file type: directories, regular files, symlinks, character and block
///   devices, a fifo and a unix socket;
/// - 0-byte files, files of exactly one chunk and of several chunks (pseudo-random,
///   highly compressible, incompressible), duplicated contents (whole files, and a file
///   sharing its first 1 MiB chunk with [`MULTI_CHUNK_FILE`]);
/// - a hard-linked file with three names ([`HARD_LINK_NAMES`]);
/// - symlinks relative, absolute, dangling, to a directory, and with 300- and
///   4,000-byte targets;
/// - [`WIDE_DIR_ENTRIES`] entries in [`WIDE_DIR`], [`DEEP_LEVELS`] levels of nesting,
///   a 255-byte name, non-ASCII UTF-8 names and a name that is not UTF-8;
/// - xattrs: `user.*` (empty, binary and 1 KiB values, many on one file),
///   `trusted.overlay.opaque=y` on a directory, a v2 `security.capability` on a file;
/// - setuid, setgid, sticky and mode-0 entries; uid/gid 1000, 65534 and 100000/100001;
/// - mtimes with nanoseconds on every entry, set last and bottom-up (symlinks
///   included, without following them).
///
/// Its regular files hold about 10 MiB.
pub fn make_varied_tree(dir: &Path) -> io::Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "make_varied_tree needs root (mknod, chown, trusted.* xattrs)",
        ));
    }
    fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
    let t = Builder {
        root: dir.to_path_buf(),
    };
    t.attrs("", 0o755, 0, 0)?;
    plain_files(&t)?;
    data_files(&t)?;
    links(&t)?;
    owners(&t)?;
    modes(&t)?;
    special_files(&t)?;
    names(&t)?;
    xattrs(&t)?;
    deep(&t)?;
    wide(&t)?;
    let mut counter = 0;
    set_times_bottom_up(dir, &mut counter)
}

fn plain_files(t: &Builder) -> io::Result<()> {
    t.file("empty", b"", 0o644)?;
    t.file("hello.txt", b"hello, rafs\n", 0o644)
}

fn data_files(t: &Builder) -> io::Result<()> {
    t.dir("data", 0o755)?;
    t.random("data/random-3m.bin", &[(1, 3 * MIB + 123)], 0o644)?;
    t.random("data/incompressible-100k.bin", &[(2, 100_000)], 0o644)?;
    t.random("data/exact-1m.bin", &[(3, MIB)], 0o644)?;
    t.write_with("data/compressible-2m.txt", 0o644, |w| {
        let mut written = 0u64;
        let mut line = 0u64;
        while written < 2 * MIB + 77 {
            let text = format!("line {line:08}: the quick brown fox jumps over the lazy dog\n");
            let take = (text.len() as u64).min(2 * MIB + 77 - written) as usize;
            w.write_all(&text.as_bytes()[..take])?;
            written += take as u64;
            line += 1;
        }
        Ok(())
    })?;

    t.dir("dup", 0o755)?;
    t.random("dup/copy-1.bin", &[(4, MIB + MIB / 2 + 5)], 0o644)?;
    t.random("dup/copy-2.bin", &[(4, MIB + MIB / 2 + 5)], 0o600)?;
    t.file("dup/same-small-1.txt", b"duplicate small content\n", 0o644)?;
    t.file("dup/same-small-2.txt", b"duplicate small content\n", 0o644)?;
    // Its first 1 MiB chunk is the first chunk of MULTI_CHUNK_FILE.
    t.random("dup/shares-first-chunk.bin", &[(1, MIB), (5, 1000)], 0o644)
}

fn links(t: &Builder) -> io::Result<()> {
    t.dir("links", 0o755)?;
    t.file(HARD_LINK_NAMES[0], b"three names, one inode\n", 0o640)?;
    t.chown(HARD_LINK_NAMES[0], 1000, 1000)?;
    t.chmod(HARD_LINK_NAMES[0], 0o640)?;
    // The other two names need their directories; `data` exists, `owners` is made here.
    t.dir("owners", 0o755)?;
    for name in &HARD_LINK_NAMES[1..] {
        fs::hard_link(t.path(HARD_LINK_NAMES[0]), t.path(name))
            .map_err(|e| at(&t.path(name), e))?;
    }
    t.symlink("links/relative", "../hello.txt")?;
    t.symlink("links/absolute", "/etc/passwd")?;
    t.symlink("links/dangling", "no/such/target")?;
    t.symlink("links/to-dir", "../data")?;
    let target_300 = format!("{}last-name!", "d12345678/".repeat(29));
    assert_eq!(target_300.len(), 300);
    t.symlink("links/long-300", &target_300)?;
    let target_4000 = format!(
        "{}{}",
        "segment-0123456789abcdef/".repeat(159),
        "x".repeat(25)
    );
    assert_eq!(target_4000.len(), 4000);
    t.symlink("links/long-4000", &target_4000)
}

fn owners(t: &Builder) -> io::Result<()> {
    t.attrs("owners", 0o755, 1000, 1000)?;
    t.file("owners/user-1000", b"owned by 1000:1000\n", 0o644)?;
    t.attrs("owners/user-1000", 0o644, 1000, 1000)?;
    t.file("owners/nobody", b"owned by 65534:65534\n", 0o644)?;
    t.attrs("owners/nobody", 0o644, 65534, 65534)?;
    t.file("owners/big-ids", b"owned by 100000:100001\n", 0o644)?;
    t.attrs("owners/big-ids", 0o644, 100_000, 100_001)?;
    t.file("owners/root-group-1000", b"owned by 0:1000\n", 0o664)?;
    t.attrs("owners/root-group-1000", 0o664, 0, 1000)?;
    t.symlink("owners/link-1000", "user-1000")?;
    t.chown("owners/link-1000", 1000, 1000)
}

fn modes(t: &Builder) -> io::Result<()> {
    t.dir("modes", 0o755)?;
    for (name, mode) in [
        ("setuid", 0o4755),
        ("setgid", 0o2755),
        ("setuid-setgid", 0o6711),
        ("mode-0000", 0o000),
        ("private", 0o600),
        ("read-only", 0o444),
        ("owner-exec", 0o700),
    ] {
        let rel = format!("modes/{name}");
        t.file(&rel, format!("mode {mode:o}\n").as_bytes(), mode)?;
    }
    t.dir("modes/sticky", 0o1777)?;
    t.file("modes/sticky/inside", b"in a sticky directory\n", 0o644)?;
    t.dir("modes/setgid-dir", 0o2775)?;
    t.dir("modes/closed", 0o000)?;
    t.file("modes/closed/inside", b"in a mode-0 directory\n", 0o644)
}

fn special_files(t: &Builder) -> io::Result<()> {
    t.dir("special", 0o755)?;
    t.node("special/null", FileType::CharacterDevice, 0o666, (1, 3))?;
    t.node("special/loop-block", FileType::BlockDevice, 0o660, (7, 200))?;
    // A device number that needs the "new" encoding: major > 255, minor > 65535.
    t.node(
        "special/big-char",
        FileType::CharacterDevice,
        0o600,
        (300, 70_000),
    )?;
    t.node("special/fifo", FileType::Fifo, 0o644, (0, 0))?;
    let socket = t.path("special/socket");
    // Binding creates the socket file; it stays after the listener is dropped.
    drop(UnixListener::bind(&socket).map_err(|e| at(&socket, e))?);
    t.chmod("special/socket", 0o755)
}

fn names(t: &Builder) -> io::Result<()> {
    t.dir("names", 0o755)?;
    t.file(long_name_path(), b"a 255-byte name\n", 0o644)?;
    for name in [
        "日本語のファイル名.txt",
        "émoji-🦀.txt",
        "with space",
        ".hidden",
        "-leading-dash",
        "semi;colon&amp",
        "quote'\"",
        "percent%20star*?",
    ] {
        t.file(format!("names/{name}"), name.as_bytes(), 0o644)?;
    }
    t.dir("names/Ünïcødé-dir", 0o755)?;
    t.file("names/Ünïcødé-dir/файл", b"cyrillic\n", 0o644)?;
    // Latin-1 "été": not valid UTF-8.
    let latin1 = Path::new("names").join(OsStr::from_bytes(b"latin1-\xe9t\xe9.bin"));
    t.file(&latin1, b"a name that is not UTF-8\n", 0o644)
}

fn xattrs(t: &Builder) -> io::Result<()> {
    t.dir("xattrs", 0o755)?;
    t.file("xattrs/user.txt", b"user xattrs\n", 0o644)?;
    t.xattr("xattrs/user.txt", "user.comment", b"hello")?;
    t.xattr("xattrs/user.txt", "user.empty", b"")?;
    t.xattr(
        "xattrs/user.txt",
        "user.binary",
        &[0, 1, 2, 0x7f, 0x80, 0xff],
    )?;

    t.file("xattrs/long-value.txt", b"a 1 KiB xattr value\n", 0o644)?;
    let long: Vec<u8> = (0..1024u32).map(|i| b'a' + (i % 26) as u8).collect();
    t.xattr("xattrs/long-value.txt", "user.long", &long)?;

    t.file("xattrs/many.txt", b"many xattrs\n", 0o644)?;
    for i in 0..16 {
        t.xattr(
            "xattrs/many.txt",
            &format!("user.attr-{i:02}"),
            format!("value-{i:02}").as_bytes(),
        )?;
    }
    // The same pair on two files (a candidate for shared xattrs).
    t.file("xattrs/shared-1.txt", b"shared 1\n", 0o644)?;
    t.file("xattrs/shared-2.txt", b"shared 2\n", 0o644)?;
    t.xattr("xattrs/shared-1.txt", "user.shared", b"same value")?;
    t.xattr("xattrs/shared-2.txt", "user.shared", b"same value")?;

    t.dir("xattrs/opaque", 0o755)?;
    t.xattr("xattrs/opaque", "trusted.overlay.opaque", b"y")?;
    t.xattr(
        "xattrs/opaque",
        "user.dir-note",
        b"an opaque overlay directory",
    )?;
    t.file(
        "xattrs/opaque/inside",
        b"below an opaque directory\n",
        0o644,
    )?;

    // Set after chmod: chown and writes drop security.capability.
    t.file("xattrs/cap-net-bind", b"#!/bin/sh\n", 0o755)?;
    t.xattr(
        "xattrs/cap-net-bind",
        "security.capability",
        &capability_v2(10),
    )
}

/// A `struct vfs_cap_data` of revision 2 granting capability `bit` (< 32) permitted
/// and effective.
fn capability_v2(bit: u32) -> Vec<u8> {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x1;
    let words = [
        VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE,
        1 << bit, // permitted, low word
        0,        // inheritable, low word
        0,        // permitted, high word
        0,        // inheritable, high word
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn deep(t: &Builder) -> io::Result<()> {
    let mut rel = PathBuf::from("deep");
    t.dir(&rel, 0o755)?;
    for level in 1..=DEEP_LEVELS {
        rel.push(format!("l{level:02}"));
        t.dir(&rel, 0o755)?;
    }
    t.file(rel.join("leaf.txt"), b"at the bottom\n", 0o644)
}

fn wide(t: &Builder) -> io::Result<()> {
    t.dir(WIDE_DIR, 0o755)?;
    for i in 0..WIDE_DIR_ENTRIES {
        let rel = format!("{WIDE_DIR}/entry-{i:05}");
        // Every fifth file has a few bytes; the rest are empty.
        let content = if i % 5 == 0 {
            format!("{i}\n")
        } else {
            String::new()
        };
        t.file(&rel, content.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Gives every entry below `dir` (and `dir` itself, last) a distinct mtime and atime
/// with nanoseconds, children before their directory, in name order. Symlinks are not
/// followed.
fn set_times_bottom_up(dir: &Path, counter: &mut i64) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| at(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()
        .map_err(|e| at(dir, e))?;
    entries.sort();
    for path in entries {
        let meta = fs::symlink_metadata(&path).map_err(|e| at(&path, e))?;
        if meta.is_dir() {
            set_times_bottom_up(&path, counter)?;
        } else {
            set_time(&path, counter)?;
        }
    }
    set_time(dir, counter)
}

fn set_time(path: &Path, counter: &mut i64) -> io::Result<()> {
    let n = *counter;
    *counter += 1;
    // Seconds spread over years; nanoseconds vary in every digit (and are 0 for every
    // tenth entry).
    let nanos = if n % 10 == 0 {
        0
    } else {
        ((n * 123_456_789 + 987) % 1_000_000_000) as u32
    };
    let time = FileTime::from_unix_time(BASE_MTIME + n * 3_607, nanos);
    filetime::set_symlink_file_times(path, time, time).map_err(|e| at(path, e))
}

/// Paths relative to the tree's root, and the operations that build it.
struct Builder {
    root: PathBuf,
}

impl Builder {
    fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    fn dir(&self, rel: impl AsRef<Path>, mode: u32) -> io::Result<()> {
        let path = self.path(rel.as_ref());
        fs::create_dir(&path).map_err(|e| at(&path, e))?;
        self.chmod(rel, mode)
    }

    fn file(&self, rel: impl AsRef<Path>, content: &[u8], mode: u32) -> io::Result<()> {
        self.write_with(rel, mode, |w| w.write_all(content))
    }

    /// A file made of pseudo-random runs: `(seed, length)` each.
    fn random(&self, rel: &str, runs: &[(u64, u64)], mode: u32) -> io::Result<()> {
        self.write_with(rel, mode, |w| {
            runs.iter()
                .try_for_each(|&(seed, len)| Prng::new(seed).fill(w, len))
        })
    }

    fn write_with(
        &self,
        rel: impl AsRef<Path>,
        mode: u32,
        fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> io::Result<()> {
        let path = self.path(rel.as_ref());
        let mut w = BufWriter::new(File::create(&path).map_err(|e| at(&path, e))?);
        fill(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| at(&path, e))?;
        drop(w);
        self.chmod(rel, mode)
    }

    fn symlink(&self, rel: &str, target: &str) -> io::Result<()> {
        let path = self.path(rel);
        symlink(target, &path).map_err(|e| at(&path, e))
    }

    fn node(
        &self,
        rel: &str,
        kind: FileType,
        mode: u32,
        (major, minor): (u32, u32),
    ) -> io::Result<()> {
        let path = self.path(rel);
        let dev = rustix::fs::makedev(major, minor);
        rustix::fs::mknodat(CWD, &path, kind, Mode::from_raw_mode(mode), dev)
            .map_err(|e| at(&path, e.into()))?;
        // mknod applies the umask; chmod does not.
        self.chmod(rel, mode)
    }

    /// Owner, then mode (chown clears setuid/setgid bits).
    fn attrs(&self, rel: &str, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
        self.chown(rel, uid, gid)?;
        self.chmod(rel, mode)
    }

    fn chown(&self, rel: &str, uid: u32, gid: u32) -> io::Result<()> {
        let path = self.path(rel);
        lchown(&path, Some(uid), Some(gid)).map_err(|e| at(&path, e))
    }

    fn chmod(&self, rel: impl AsRef<Path>, mode: u32) -> io::Result<()> {
        let path = self.path(rel);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|e| at(&path, e))
    }

    fn xattr(&self, rel: &str, name: &str, value: &[u8]) -> io::Result<()> {
        let path = self.path(rel);
        xattr::set(&path, name, value)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: set {name}: {e}", path.display())))
    }
}

/// Adds the path to an I/O error.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// SplitMix64: a tiny deterministic generator, good enough for incompressible bytes.
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Writes `len` bytes of the stream.
    fn fill(&mut self, w: &mut impl Write, len: u64) -> io::Result<()> {
        let mut buf = [0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            for word in buf[..n].chunks_mut(8) {
                word.copy_from_slice(&self.next_u64().to_le_bytes()[..word.len()]);
            }
            w.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prng_stream_does_not_depend_on_buffering() {
        let mut one = Vec::new();
        Prng::new(7).fill(&mut one, 200_003).unwrap();
        let mut two = Vec::new();
        let mut p = Prng::new(7);
        // Runs that are multiples of 8 continue the same stream.
        p.fill(&mut two, 65_536).unwrap();
        p.fill(&mut two, 200_003 - 65_536).unwrap();
        assert_eq!(one, two);
        assert_ne!(one[..8], one[8..16]);
    }

    #[test]
    fn capability_blob_is_v2_sized() {
        let cap = capability_v2(10);
        assert_eq!(cap.len(), 20);
        assert_eq!(cap[..4], [0x01, 0, 0, 0x02]);
    }
}
