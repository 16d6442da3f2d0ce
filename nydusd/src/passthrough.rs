//! FUSE passthrough (Linux 6.9+) for files whose every chunk is cached and verified.
//!
//! A read served by the daemon copies each byte three times — cache file to the daemon,
//! daemon to the FUSE page, FUSE page to the reader — where a native read copies once.
//! Passthrough lets the kernel serve a FUSE file's reads and mmaps straight from a
//! *backing file*, without the daemon; but it maps file offsets 1:1 onto the backing
//! file, while the chunk cache holds chunks at their offsets in the blob (DESIGN.md).
//!
//! The backing files come from the kernel's own EROFS driver, which reads RAFS v6
//! natively (upstream's fscache mode relies on the same): [`BackingMount`] mounts the
//! image's bootstrap with the cache data files as its blob devices, on loop devices,
//! as a *detached* mount (`fsmount`, never attached to any directory: nothing to see,
//! nothing to unmount). It lives as long as the daemon's descriptor of it and the
//! backing files registered with the FUSE connection: after the daemon exits, or after
//! `kill -9` once the dead FUSE mount is unmounted, it is gone, and its loop devices
//! (auto-clearing) with it. A file of that mount holds exactly the image file's bytes, read from the
//! very cache files the daemon fills. The daemon hands such a file to FUSE only when
//! every chunk of it is ready and verified ([`crate::fs`]), so the kernel never reads a
//! hole or an unverified chunk.
//!
//! * [`patch_init_reply`]: fuse-backend-rs 0.14 does not know `FUSE_PASSTHROUGH`; the
//!   daemon asks for it by editing the INIT reply fuse-backend-rs wrote.
//! * [`FuseBacking`]: registers backing files with the FUSE connection
//!   (`FUSE_DEV_IOC_BACKING_OPEN`) for `FOPEN_PASSTHROUGH` opens.
//!
//! This is the crate's one module with `unsafe` (raw syscalls and ioctls); each call sits
//! in a small safe wrapper.
#![allow(unsafe_code)]

use fuse_backend_rs::abi::fuse_abi::OpenOptions;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// `FOPEN_PASSTHROUGH`: the open reply's `backing_id` names the file to pass through to.
const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// The open flags of a passed-through file: `FOPEN_PASSTHROUGH` and `FOPEN_NOFLUSH`
/// (the kernel refuses passthrough with page-cache flags such as `FOPEN_KEEP_CACHE`).
pub fn passthrough_open_options() -> OpenOptions {
    // SAFETY:
    // - `from_bits_unchecked` only stores the bits (bitflags 1.x calls it unsafe because
    //   the type does not name bits 5 and 7);
    // - fuse-backend-rs copies them into the open reply as they are (`opts.bits()`),
    //   where the kernel reads bit 7 as FOPEN_PASSTHROUGH and bit 5 as FOPEN_NOFLUSH.
    unsafe { OpenOptions::from_bits_unchecked(FOPEN_PASSTHROUGH | FOPEN_NOFLUSH) }
}

/// `FOPEN_NOFLUSH` (Linux 5.11+): closing the file sends no `FLUSH`. A read-only image
/// has nothing to flush, and a `FLUSH` waits for an answer: a process closing a file
/// while no daemon serves (between a daemon's death and its successor's takeover)
/// would wait for it — for ever if it is the one starting the successor (a file
/// inherited across `fork` is closed at `exec`).
const FOPEN_NOFLUSH: u32 = 1 << 5;

/// The options of a file opened through the page cache: its cache kept, no `FLUSH`.
pub fn cached_open_options() -> OpenOptions {
    // SAFETY: as in `passthrough_open_options`: bit 5 (FOPEN_NOFLUSH) is stored and
    // copied into the reply as it is.
    unsafe { OpenOptions::from_bits_unchecked(FOPEN_KEEP_CACHE | FOPEN_NOFLUSH) }
}

/// `FOPEN_KEEP_CACHE`.
const FOPEN_KEEP_CACHE: u32 = 1 << 1;

/// FUSE opcode of INIT.
const FUSE_INIT: u32 = 26;
/// INIT flag: the flags continue in `flags2`.
const FUSE_INIT_EXT: u64 = 1 << 30;
/// INIT flag (in `flags2`): passthrough of file I/O to backing files.
const FUSE_PASSTHROUGH: u64 = 1 << 37;
/// Size of `struct fuse_in_header`.
const IN_HEADER: usize = 40;
/// Size of `struct fuse_out_header`.
const OUT_HEADER: usize = 16;

/// `_IOW(229, 1, struct fuse_backing_map)`.
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = 0x4010_E501;
/// `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_E502;

/// `struct fuse_backing_map`, 16 bytes.
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}
const _: () = assert!(std::mem::size_of::<BackingMap>() == 16);

/// What the kernel's INIT request offers, read from the raw request bytes.
fn offered_flags(request: &[u8]) -> Option<u64> {
    let u32_at = |at: usize| {
        request
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    if u32_at(4)? != FUSE_INIT {
        return None;
    }
    // fuse_init_in: major, minor, max_readahead, flags, then flags2 (with INIT_EXT).
    let mut flags = u32_at(IN_HEADER + 12)? as u64;
    if flags & FUSE_INIT_EXT != 0 {
        flags |= (u32_at(IN_HEADER + 16)? as u64) << 32;
    }
    Some(flags)
}

/// `FUSE_HAS_RESEND` (`flags2` bit 7): the kernel takes `FUSE_NOTIFY_RESEND` (Linux 6.9+).
const FUSE_HAS_RESEND: u64 = 1 << 39;

/// Whether `request` (the raw bytes of a FUSE request, from its header on) is an INIT
/// whose kernel can resend the requests a daemon read and did not answer.
pub fn init_offers_resend(request: &[u8]) -> bool {
    offered_flags(request).is_some_and(|f| f & FUSE_HAS_RESEND != 0 && f & FUSE_INIT_EXT != 0)
}

/// Whether `request` (the raw bytes of a FUSE request, from its header on) is an INIT
/// whose kernel offers passthrough.
pub fn init_offers_passthrough(request: &[u8]) -> bool {
    offered_flags(request).is_some_and(|f| f & FUSE_PASSTHROUGH != 0 && f & FUSE_INIT_EXT != 0)
}

/// Turns on `FUSE_PASSTHROUGH` (with a backing stack depth of 1) in the INIT `reply`
/// fuse-backend-rs wrote (`struct fuse_out_header` + `struct fuse_init_out`). Returns
/// false, leaving the reply alone, when it is an error or too short to carry the flags.
pub fn patch_init_reply(reply: &mut [u8]) -> bool {
    // fuse_init_out: flags at 12, flags2 at 32, max_stack_depth at 36.
    let (flags, flags2, depth) = (OUT_HEADER + 12, OUT_HEADER + 32, OUT_HEADER + 36);
    if reply.len() < depth + 4 || reply[4..8] != [0; 4] {
        return false;
    }
    let get = |r: &[u8], at: usize| u32::from_le_bytes(r[at..at + 4].try_into().unwrap());
    let f = get(reply, flags) | FUSE_INIT_EXT as u32;
    let f2 = get(reply, flags2) | (FUSE_PASSTHROUGH >> 32) as u32;
    reply[flags..flags + 4].copy_from_slice(&f.to_le_bytes());
    reply[flags2..flags2 + 4].copy_from_slice(&f2.to_le_bytes());
    // Backing files may sit on a filesystem stacked on nothing (EROFS on a loop device).
    reply[depth..depth + 4].copy_from_slice(&1u32.to_le_bytes());
    true
}

/// A pipe, for capturing a reply fuse-backend-rs writes.
pub struct Pipe {
    /// The read end.
    pub read: File,
    /// The write end.
    pub write: File,
}

/// Creates a pipe.
pub fn pipe() -> io::Result<Pipe> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY:
    // - `fds` is a valid array of two ints for pipe2 to fill;
    // - on success both are new descriptors owned by nobody else, taken over below.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    Ok(Pipe { read, write })
}

/// Reads one reply (at most 4 KiB) that was written whole into `pipe`.
pub fn read_reply(pipe: &mut Pipe) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = pipe.read.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Writes a reply to the FUSE device in one write (the kernel takes replies whole).
pub fn write_reply(dev: &File, reply: &[u8]) -> io::Result<()> {
    let n = (&*dev).write(reply)?;
    if n != reply.len() {
        return Err(io::Error::other(format!(
            "the FUSE device took {n} of {} reply bytes",
            reply.len()
        )));
    }
    Ok(())
}

fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: &T) -> io::Result<i32> {
    // SAFETY:
    // - `arg` points to a live, initialised `T` for the duration of the call;
    // - every request passed here takes a pointer to exactly such a `T` and only reads it.
    let r = unsafe { libc::ioctl(fd, request, arg as *const T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The FUSE connection's table of backing files.
#[derive(Debug)]
pub struct FuseBacking {
    dev: File,
    readahead_kb: u32,
    /// Set once registering a backing file failed: the session serves every file itself.
    off: AtomicBool,
}

impl FuseBacking {
    /// Backing files registered through `dev` (a descriptor of the FUSE connection that
    /// negotiated passthrough); `readahead_kb` becomes the readahead of the EROFS mounts
    /// made for it.
    pub fn new(dev: File, readahead_kb: u32) -> Self {
        FuseBacking {
            dev,
            readahead_kb,
            off: AtomicBool::new(false),
        }
    }

    /// Readahead (KiB) for backing mounts; 0 keeps the kernel's.
    pub fn readahead_kb(&self) -> u32 {
        self.readahead_kb
    }

    /// Registers `file` as a backing file; returns its id for an open reply. The kernel
    /// keeps its own reference: `file` may be closed once this returns. A refusal that
    /// will not change (no `CAP_SYS_ADMIN`, a kernel that did not take the INIT flag)
    /// turns passthrough off for the session, saying why once; other failures (out of
    /// memory or descriptors) only leave this open to the daemon.
    pub fn open(&self, file: &File) -> Option<u32> {
        if self.off.load(Ordering::Relaxed) {
            return None;
        }
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        match ioctl_ptr(self.dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN, &map) {
            Ok(id) => Some(id as u32),
            Err(e) => {
                let lasting = [libc::EPERM, libc::EOPNOTSUPP, libc::ENOTTY, libc::EINVAL]
                    .contains(&e.raw_os_error().unwrap_or(0));
                if !lasting {
                    tracing::debug!("backing file not registered: {e}");
                } else if !self.off.swap(true, Ordering::Relaxed) {
                    tracing::info!("files are not passed through: the FUSE connection refused a backing file: {e}");
                }
                None
            }
        }
    }

    /// Drops the id `open` returned (files opened with it keep their backing file).
    pub fn close(&self, id: u32) -> io::Result<()> {
        ioctl_ptr(self.dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE, &id).map(|_| ())
    }
}

/// `cachestat(2)` (Linux 6.5+), numbered alike on every architecture's table.
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat`, 40 bytes.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}
const _: () = assert!(std::mem::size_of::<Cachestat>() == 40);

/// Whether pages of the `len` bytes at `offset` of `file` wait in the page cache to be
/// written back (dirty, or being written). A direct-I/O read of such a range — what a
/// passed-through read of just-fetched chunks becomes — first waits for that writeback.
pub fn awaiting_writeback(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY:
    // - `range` and `stat` are live structs of the kernel's layouts: the kernel reads
    //   the first and writes the second, nothing else;
    // - `file` is an open descriptor.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.nr_dirty + stat.nr_writeback > 0)
}

// Loop devices (linux/loop.h).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
/// `BLKRASET`: a block device's readahead, in 512-byte sectors.
const BLKRASET: libc::c_ulong = 0x1262;

/// `struct loop_info64`, 232 bytes.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

/// `struct loop_config`, 304 bytes.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A loop device attached read-only, and cleared by the kernel once its last user
/// (this handle, then the mount made on it) closes it.
struct Loop {
    dev: File,
    path: String,
}

fn open_rdonly(path: &str) -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).open(path)
}

/// Attaches `backing` to a free loop device, with direct I/O when asked (falling back to
/// buffered I/O when the file cannot do it).
fn attach_loop(backing: &File, direct_io: bool) -> io::Result<Loop> {
    let ctl = open_rdonly("/dev/loop-control")?;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = format!("/dev/loop{n}");
        let dev = open_rdonly(&path)?;
        let mut tries = if direct_io {
            vec![LO_FLAGS_DIRECT_IO, 0]
        } else {
            vec![0]
        };
        let mut last = None;
        for extra in tries.drain(..) {
            let config = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: 4096,
                info: LoopInfo64 {
                    device: 0,
                    inode: 0,
                    rdevice: 0,
                    offset: 0,
                    sizelimit: 0,
                    number: 0,
                    encrypt_type: 0,
                    encrypt_key_size: 0,
                    flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | extra,
                    file_name: [0; 64],
                    crypt_name: [0; 64],
                    encrypt_key: [0; 32],
                    init: [0; 2],
                },
                reserved: [0; 8],
            };
            match ioctl_ptr(dev.as_raw_fd(), LOOP_CONFIGURE, &config) {
                Ok(_) => return Ok(Loop { dev, path }),
                Err(e) => last = Some(e),
            }
        }
        match last {
            // Taken by someone else between GET_FREE and CONFIGURE: try another.
            Some(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Some(e) => return Err(e),
            None => unreachable!("at least one configuration was tried"),
        }
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

/// A sealed in-memory copy of `bytes`: the bootstrap the kernel mounts is byte for byte
/// the one the daemon validated, whatever happens to the file it came from.
fn sealed_memfd(bytes: &[u8]) -> io::Result<File> {
    let name = CString::new("rafs-bootstrap").unwrap();
    // SAFETY: `name` is a valid NUL-terminated string; the result is a new descriptor.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned here only.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

// The new mount API (linux/mount.h).
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 1;

fn check_fd(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor, owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// The filesystem context's error messages, for a failed `fsconfig`.
fn context_log(fs: &OwnedFd) -> String {
    let mut f = match fs.try_clone() {
        Ok(fd) => File::from(fd),
        Err(_) => return String::new(),
    };
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    // Each read returns one message; the context says EAGAIN/ENODATA when none is left.
    for _ in 0..8 {
        match f.read(&mut buf) {
            Ok(n) if n > 0 => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => break,
        }
    }
    out.join("; ")
}

/// Sets `key` of a filesystem context to `value`, or sets flag `key` when `value` is
/// `None`.
fn fsconfig(fs: &OwnedFd, key: &str, value: Option<&str>) -> io::Result<()> {
    let key_c = CString::new(key).map_err(io::Error::other)?;
    let value_c = value
        .map(CString::new)
        .transpose()
        .map_err(io::Error::other)?;
    let (cmd, value_ptr) = match &value_c {
        Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
        None => (FSCONFIG_SET_FLAG, std::ptr::null()),
    };
    // SAFETY:
    // - `fs` is an fsopen descriptor;
    // - the key and value are NUL-terminated strings that outlive the call (a flag takes
    //   a null value).
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key_c.as_ptr(),
            value_ptr,
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "erofs option {key}{}: {e} {}",
                value.map(|v| format!("={v}")).unwrap_or_default(),
                context_log(fs)
            ),
        ));
    }
    Ok(())
}

/// Mounts EROFS (detached, read-only) on `source` with the extra `devices`; returns a
/// descriptor of its root directory.
fn mount_erofs(source: &str, devices: &[String]) -> io::Result<File> {
    let fstype = CString::new("erofs").unwrap();
    // SAFETY: `fstype` is NUL-terminated; fsopen returns a new descriptor.
    let fs = check_fd(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
    // A read-only superblock: the loop devices are read-only.
    fsconfig(&fs, "ro", None)?;
    fsconfig(&fs, "source", Some(source))?;
    for d in devices {
        fsconfig(&fs, "device", Some(d))?;
    }
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("creating the erofs mount: {e} {}", context_log(&fs)),
        ));
    }
    // SAFETY: `fs` is a created filesystem context; fsmount returns a new descriptor.
    let mnt = check_fd(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_RDONLY,
        )
    })?;
    let dot = CString::new(".").unwrap();
    // SAFETY: `mnt` is a mount descriptor and `dot` a NUL-terminated path.
    let root = check_fd(unsafe {
        libc::openat(
            mnt.as_raw_fd(),
            dot.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        ) as libc::c_long
    })?;
    Ok(File::from(root))
}

/// An image's bootstrap mounted by the kernel's EROFS driver over its cache data files
/// (see the module docs): the source of backing files.
#[derive(Debug)]
pub struct BackingMount {
    root: File,
    /// The file handle format the kernel decodes.
    handle_kind: AtomicI32,
}

/// `FILEID_INO64_GEN`: EROFS file handles since Linux 6.16 (nid high, nid low,
/// generation).
const FILEID_INO64_GEN: i32 = 0x81;
/// `FILEID_INO32_GEN`: EROFS file handles before (nid, generation).
const FILEID_INO32_GEN: i32 = 1;

/// `struct file_handle` with up to 12 handle bytes.
#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    words: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<Handle>() == 20);

impl Handle {
    /// The handle of `nid` in the format `kind`.
    fn of(nid: u64, kind: i32) -> Handle {
        if kind == FILEID_INO64_GEN {
            Handle {
                bytes: 12,
                kind,
                words: [(nid >> 32) as u32, nid as u32, 0],
            }
        } else {
            Handle {
                bytes: 8,
                kind,
                words: [nid as u32, 0, 0],
            }
        }
    }
}

impl BackingMount {
    /// Mounts `bootstrap` (bytes the caller validated) with `blobs`, the cache data file
    /// of each of its blobs in blob-table order. The blob files are read with direct I/O
    /// (one page cache, EROFS', holds the data) and the mount reads ahead `readahead_kb`.
    pub fn new(bootstrap: &[u8], blobs: &[&Path], readahead_kb: u32) -> io::Result<Self> {
        let boot = sealed_memfd(bootstrap)?;
        let boot_loop = attach_loop(&boot, false)?;
        if readahead_kb > 0 {
            // The mount reads ahead as its source device does.
            let sectors = readahead_kb as libc::c_ulong * 2;
            // SAFETY: BLKRASET takes the value itself as its argument.
            if unsafe { libc::ioctl(boot_loop.dev.as_raw_fd(), BLKRASET, sectors) } != 0 {
                tracing::debug!(
                    "readahead of {}: {}",
                    boot_loop.path,
                    io::Error::last_os_error()
                );
            }
        }
        let mut loops = Vec::with_capacity(blobs.len());
        for path in blobs {
            let file = File::open(path)?;
            // EROFS reads whole 4 KiB blocks; a loop device has no partial block.
            let len = file.metadata()?.len();
            if len % 4096 != 0 {
                return Err(io::Error::other(format!(
                    "{}: {len} bytes, not a multiple of 4096",
                    path.display()
                )));
            }
            loops.push(attach_loop(&file, true)?);
        }
        let devices: Vec<String> = loops.iter().map(|l| l.path.clone()).collect();
        let root = mount_erofs(&boot_loop.path, &devices)?;
        // The mount holds the loop devices now; closing ours lets them clear with it.
        drop(loops);
        drop(boot_loop);
        Ok(BackingMount {
            root,
            handle_kind: AtomicI32::new(FILEID_INO64_GEN),
        })
    }

    /// Opens the file of inode `nid`, checking that the kernel sees the same inode number
    /// and `size`.
    pub fn open(&self, nid: u64, size: u64) -> io::Result<File> {
        let mut kind = self.handle_kind.load(Ordering::Relaxed);
        let file = loop {
            match self.open_by_handle(&mut Handle::of(nid, kind)) {
                // Kernels before 6.16 decode 32-bit handles only.
                Err(e)
                    if kind == FILEID_INO64_GEN
                        && nid <= u32::MAX as u64
                        && matches!(e.raw_os_error(), Some(libc::ESTALE | libc::EINVAL)) =>
                {
                    kind = FILEID_INO32_GEN;
                    self.handle_kind.store(kind, Ordering::Relaxed);
                }
                r => break r?,
            }
        };
        let meta = file.metadata()?;
        if meta.ino() != nid || meta.size() != size || !meta.is_file() {
            return Err(io::Error::other(format!(
                "the kernel's inode {} ({} bytes) is not nid {nid} ({size} bytes)",
                meta.ino(),
                meta.size()
            )));
        }
        Ok(file)
    }

    fn open_by_handle(&self, handle: &mut Handle) -> io::Result<File> {
        // SAFETY:
        // - `handle` is a `struct file_handle` with `bytes` valid handle bytes after it;
        // - `root` is a directory of the mount the handle is resolved in;
        // - the result is a new descriptor, taken over by `check_fd`.
        let fd = check_fd(unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                self.root.as_raw_fd(),
                handle as *mut Handle,
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        })?;
        Ok(File::from(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_request(flags: u32, flags2: u32) -> Vec<u8> {
        let mut r = vec![0u8; IN_HEADER + 64];
        r[4..8].copy_from_slice(&FUSE_INIT.to_le_bytes());
        r[IN_HEADER + 12..IN_HEADER + 16].copy_from_slice(&flags.to_le_bytes());
        r[IN_HEADER + 16..IN_HEADER + 20].copy_from_slice(&flags2.to_le_bytes());
        r
    }

    #[test]
    fn passthrough_is_offered_only_with_init_ext_and_the_flag() {
        let ext = FUSE_INIT_EXT as u32;
        let pt = (FUSE_PASSTHROUGH >> 32) as u32;
        assert!(init_offers_passthrough(&init_request(ext | 1, pt)));
        assert!(!init_offers_passthrough(&init_request(1, pt)));
        assert!(!init_offers_passthrough(&init_request(ext, 0)));
        let mut not_init = init_request(ext, pt);
        not_init[4] = 15;
        assert!(!init_offers_passthrough(&not_init));
        assert!(!init_offers_passthrough(&not_init[..IN_HEADER + 8]));
    }

    #[test]
    fn the_init_reply_gains_the_flag_and_a_stack_depth() {
        let mut reply = vec![0u8; OUT_HEADER + 64];
        reply[OUT_HEADER + 12..OUT_HEADER + 16].copy_from_slice(&0x21u32.to_le_bytes());
        assert!(patch_init_reply(&mut reply));
        let get = |at: usize| u32::from_le_bytes(reply[at..at + 4].try_into().unwrap());
        assert_eq!(get(OUT_HEADER + 12), 0x21 | FUSE_INIT_EXT as u32);
        assert_eq!(get(OUT_HEADER + 32), 1 << 5);
        assert_eq!(get(OUT_HEADER + 36), 1);
        // Error replies and short ones are left alone.
        let mut err = vec![0u8; OUT_HEADER + 64];
        err[4..8].copy_from_slice(&(-38i32).to_le_bytes());
        assert!(!patch_init_reply(&mut err));
        assert_eq!(err[OUT_HEADER + 36], 0);
        let mut short = vec![0u8; OUT_HEADER + 24];
        assert!(!patch_init_reply(&mut short));
    }
}
