//! The FUSE transport: the session on `/dev/fuse` and its pool of threads, INIT patched
//! for passthrough and readahead, and kernel invalidation of unmounted images' names.
//! (The virtio-fs transport is [`crate::virtiofs`]; both serve the same
//! [`crate::vfs::Vfs`].)

use crate::daemon::Event;
use crate::error::{Chain, Error, Result};
use crate::fuse_opens::OpenTable;
use crate::passthrough::{self, FuseBacking};
use crate::vfs::Vfs;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseDevWriter, FuseSession, Reader};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use tracing::{debug, error, info, warn};

/// A filesystem with nothing in it, to send notifications through fuse-backend-rs'
/// `Server` (which does not use its filesystem for them).
struct NoFs;

impl FileSystem for NoFs {
    type Inode = u64;
    type Handle = u64;
}

/// Most FUSE threads a session grows to (see [`FuseService`]).
pub const MAX_FUSE_THREADS: usize = 512;
/// A request taking longer than this is stuck (waiting on the backend): while every
/// thread is busy and one is stuck, the pool grows.
const STUCK: std::time::Duration = std::time::Duration::from_millis(20);
/// How often the pool looks for stuck requests.
const WATCH: std::time::Duration = std::time::Duration::from_millis(5);

/// A mounted FUSE session served by a pool of threads that grows when every thread is
/// busy and some are stuck: a request waiting on the backend (a cold read of a registry
/// that does not answer) holds its thread until the backend's timeout, and the threads
/// it holds must not be the ones `stat`, `ls` and reads of cached files need. A watcher
/// doubles the pool (up to [`MAX_FUSE_THREADS`]) whenever every thread is busy and at
/// least one request has taken longer than [`STUCK`]; threads beyond the configured
/// number leave once more than that number are idle. A pool that grew on every busy
/// moment would cost fast reads: every idle thread wakes for every request (measured:
/// 4 KiB random reads from the cache fell from 15.6k to 10.6k IOPS).
pub struct FuseService {
    pool: Arc<Pool>,
    watcher: Option<JoinHandle<()>>,
    /// The mountpoint of a session taken over (unmounted by path at stop: the session
    /// object was made without it, see [`FuseSource::Adopt`]), and the scratch
    /// directory of its session object.
    adopted: Option<(PathBuf, PathBuf)>,
}

/// Where a [`FuseService`]'s session comes from.
pub enum FuseSource {
    /// A new mount at this directory.
    Mount(PathBuf),
    /// The FUSE device of a session mounted at `mountpoint` by a predecessor, whose INIT
    /// is long done (see [`crate::handover`]).
    Adopt {
        /// Where the session is mounted.
        mountpoint: PathBuf,
        /// Its FUSE device.
        file: File,
        /// An empty directory to make, private to this daemon, for the session object.
        scratch: PathBuf,
    },
}

/// See [`FuseOptions::on_init`].
pub type OnInit = Arc<dyn Fn(&File, bool) + Send + Sync>;

/// How a [`FuseService`] serves.
#[derive(Clone)]
pub struct FuseOptions {
    /// Threads kept however idle.
    pub threads: usize,
    /// The mount's kernel readahead window in KiB (0: the kernel's); see
    /// [`set_readahead`].
    pub readahead_kb: u32,
    /// Whether to ask the kernel for FUSE passthrough of fully cached files (see
    /// [`crate::passthrough`]).
    pub passthrough: bool,
    /// Whether a session taken over asks the kernel to resend the requests its
    /// predecessor left unanswered (`--failover-policy resend`).
    pub resend: bool,
    /// Where opens are recorded.
    pub table: Arc<OpenTable>,
    /// Called once the kernel's INIT is answered (passthrough set up, before the reply
    /// when it is negotiated), with the session's FUSE device and whether the kernel can
    /// resend requests (`FUSE_HAS_RESEND`): a supervised daemon hands its session over
    /// then.
    pub on_init: Option<OnInit>,
}

/// The threads of a [`FuseService`] and what starting one more needs.
struct Pool {
    /// The session (channels are made from it); `None` once stopped.
    session: std::sync::Mutex<Option<FuseSession>>,
    server: Arc<Server<Arc<Vfs>>>,
    init: Arc<InitState>,
    events: Sender<Event>,
    /// Threads kept however idle (`--fuse-threads`).
    base: usize,
    /// Threads started, and threads waiting for a request.
    started: std::sync::atomic::AtomicUsize,
    idle: std::sync::atomic::AtomicUsize,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Channels of threads that left, for the next ones (each channel registers a waker
    /// with the session for good).
    spare: std::sync::Mutex<Vec<fuse_backend_rs::transport::FuseChannel>>,
    /// When each thread's current request started (ms since `epoch` + 1; 0 when idle).
    busy: std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicU64>>>,
    epoch: std::time::Instant,
}

impl Pool {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Starts one more thread, unless the pool is full or stopping.
    fn grow(self: &Arc<Self>) -> Result<()> {
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let Some(session) = session.as_ref() else {
            return Ok(());
        };
        let i = self.started.fetch_add(1, Ordering::AcqRel);
        if i >= MAX_FUSE_THREADS {
            self.started.fetch_sub(1, Ordering::AcqRel);
            return Ok(());
        }
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let channel = match spare {
            Some(c) => Ok(c),
            None => session
                .new_channel()
                .map_err(|e| Error::Fuse(format!("channel: {e}"))),
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                self.started.fetch_sub(1, Ordering::AcqRel);
                return Err(e);
            }
        };
        let slot = Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot.clone());
        self.idle.fetch_add(1, Ordering::AcqRel);
        let pool = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("fuse-{i}"))
            .spawn(move || pool.serve(channel, slot));
        match spawned {
            Ok(h) => {
                let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
                // Threads that left are joined by nobody: their handles go here.
                threads.retain(|t| !t.is_finished());
                threads.push(h);
                Ok(())
            }
            Err(e) => {
                self.idle.fetch_sub(1, Ordering::AcqRel);
                self.started.fetch_sub(1, Ordering::AcqRel);
                Err(Error::io("Starting a FUSE thread", e))
            }
        }
    }

    /// Every [`WATCH`], while the session lasts: doubles the pool when every thread is
    /// busy and a request is stuck.
    fn watch(self: &Arc<Self>) {
        loop {
            thread::sleep(WATCH);
            if self
                .session
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
            {
                return;
            }
            if self.idle.load(Ordering::Acquire) > 0 {
                continue;
            }
            let now = self.now_ms();
            let stuck = self
                .busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|b| {
                    let since = b.load(Ordering::Acquire);
                    since != 0 && now.saturating_sub(since) > STUCK.as_millis() as u64
                })
                .count();
            if stuck == 0 {
                continue;
            }
            let started = self.started.load(Ordering::Acquire);
            let more = started.max(1).min(MAX_FUSE_THREADS.saturating_sub(started));
            if more > 0 {
                debug!("{stuck} FUSE requests stuck and no thread idle: {more} more threads");
            }
            for _ in 0..more {
                if let Err(e) = self.grow() {
                    warn!("{}", Chain(&e));
                    break;
                }
            }
        }
    }

    /// One thread's loop: takes requests until the session ends, or until it is one of
    /// more idle threads than the pool keeps.
    fn serve(
        self: Arc<Self>,
        mut channel: fuse_backend_rs::transport::FuseChannel,
        slot: Arc<std::sync::atomic::AtomicU64>,
    ) {
        loop {
            match channel.get_request() {
                Ok(Some((reader, writer))) => {
                    self.idle.fetch_sub(1, Ordering::AcqRel);
                    slot.store(self.now_ms(), Ordering::Release);
                    let init = &self.init;
                    let is_init = init.pending.load(Ordering::Relaxed)
                        && init.pending.swap(false, Ordering::AcqRel);
                    let resend = is_init && {
                        let mut head = [0u8; 64];
                        let n = reader.clone().read(&mut head).unwrap_or(0);
                        passthrough::init_offers_resend(&head[..n])
                    };
                    let answered = is_init
                        && init.passthrough
                        && answer_init(&self.server, &reader, init, resend);
                    if !answered {
                        if let Err(e) =
                            self.server
                                .handle_message(reader, writer.into(), None, None)
                        {
                            debug!("FUSE request failed: {e}");
                        }
                        if is_init {
                            if let Some(f) = &init.on_init {
                                f(&init.dev, resend);
                            }
                        }
                    }
                    slot.store(0, Ordering::Release);
                    let idle = self.idle.fetch_add(1, Ordering::AcqRel) + 1;
                    // More idle threads than the pool keeps: this one leaves (its
                    // channel stays for the next).
                    if idle > self.base && self.leave() {
                        self.busy
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .retain(|b| !Arc::ptr_eq(b, &slot));
                        self.spare
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(channel);
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    error!("FUSE channel: {e}");
                    break;
                }
            }
        }
        self.idle.fetch_sub(1, Ordering::AcqRel);
        let _ = self.events.send(Event::FuseEnded);
    }

    /// Counts a thread out of the pool if it has more than its base; whether it did.
    fn leave(&self) -> bool {
        let left = self
            .started
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > self.base).then(|| n - 1)
            })
            .is_ok();
        if left {
            self.idle.fetch_sub(1, Ordering::AcqRel);
        }
        left
    }
}

/// Sets the kernel readahead window of the FUSE mount at `mountpoint` to `kb` KiB;
/// returns the name of its backing device info (`MAJOR:MINOR`).
///
/// The kernel caps a FUSE mount's readahead at what the daemon's INIT reply allowed
/// (128 KiB: fuse-backend-rs answers with the kernel's own default), so a sequential
/// reader waits on one 128 KiB request after another. A read-only image gains from a
/// window as large as a chunk cache read can fill: measured with `cargo bench -p
/// rafs-e2e --bench nydusd`, 16 MiB lifts sequential reads from the chunk cache by
/// about 40%. Random reads are unaffected (the kernel opens windows only for sequential
/// streams). The window is set after INIT: the stat below waits for it.
pub fn set_readahead(mountpoint: &Path, kb: u32) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let bdi = format!("{}:{}", libc::major(dev), libc::minor(dev));
    std::fs::write(
        format!("/sys/class/bdi/{bdi}/read_ahead_kb"),
        kb.to_string(),
    )?;
    Ok(bdi)
}

/// What the thread answering INIT needs.
struct InitState {
    /// INIT has not been seen yet.
    pending: AtomicBool,
    /// Passthrough is wanted.
    passthrough: bool,
    vfs: Arc<Vfs>,
    readahead_kb: u32,
    /// The FUSE device, where the reply goes.
    dev: File,
    /// Where opens are recorded.
    table: Arc<OpenTable>,
    /// See [`FuseOptions::on_init`].
    on_init: Option<OnInit>,
}

/// When `reader` holds an INIT whose kernel offers passthrough: answers it through
/// fuse-backend-rs, with `FUSE_PASSTHROUGH` added to the reply on its way to the FUSE
/// device, and
/// lets the filesystem pass files through. Returns whether the request was answered
/// (otherwise the caller answers it as any other).
fn answer_init(
    server: &Server<Arc<Vfs>>,
    reader: &Reader<'_>,
    init: &InitState,
    resend: bool,
) -> bool {
    let mut head = [0u8; 64];
    let mut peek = reader.clone();
    let n = peek.read(&mut head).unwrap_or(0);
    if !passthrough::init_offers_passthrough(&head[..n]) {
        info!("the kernel offers no FUSE passthrough: every read is served by the daemon");
        return false;
    }
    let answered = (|| -> std::io::Result<bool> {
        let mut pipe = passthrough::pipe()?;
        let mut buf = vec![0u8; 4096];
        let w = FuseDevWriter::<()>::new(pipe.write.as_raw_fd(), &mut buf)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        server
            .handle_message(reader.clone(), w.into(), None, None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut reply = passthrough::read_reply(&mut pipe)?;
        let patched = passthrough::patch_init_reply(&mut reply);
        if patched {
            // Before the reply: once the kernel has it, other threads take OPENs, and
            // each must be counted in its io mode (see `RafsFs::open_file`).
            init.vfs.set_passthrough(
                FuseBacking::new(init.dev.try_clone()?, init.readahead_kb),
                init.table.clone(),
            );
        }
        // Before the reply too: once the kernel has it, files may be opened passed
        // through, and a successor must know that the session negotiated it.
        if let Some(f) = &init.on_init {
            f(&init.dev, resend);
        }
        passthrough::write_reply(&init.dev, &reply)?;
        Ok(patched)
    })();
    match answered {
        Ok(patched) => {
            if patched {
                info!("FUSE passthrough negotiated: fully cached files are read by the kernel");
            }
            true
        }
        Err(e) => {
            // The kernel has no reply: answer INIT the ordinary way. Registering backing
            // files then fails, which turns passthrough off (`FuseBacking::open`).
            error!("answering INIT with passthrough: {e}");
            false
        }
    }
}

impl FuseService {
    /// Serves `fs` on a FUSE session: mounted read-only now ([`FuseSource::Mount`]), or
    /// taken over from a predecessor ([`FuseSource::Adopt`]: the kernel is asked to
    /// resend what the predecessor read but did not answer). Each thread sends
    /// [`Event::FuseEnded`] on `events` when it stops. Unmounts in `fs` invalidate the
    /// kernel's cached names through this session. Without kernel support for
    /// passthrough the session serves all reads.
    pub fn start(
        fs: Arc<Vfs>,
        source: FuseSource,
        opts: FuseOptions,
        events: Sender<Event>,
    ) -> Result<FuseService> {
        let (session, mountpoint, scratch) = match source {
            FuseSource::Mount(mountpoint) => {
                let mut session =
                    FuseSession::new(&mountpoint, "rafs", "nydusfs", true).map_err(|e| {
                        Error::Fuse(format!("session at {}: {e}", mountpoint.display()))
                    })?;
                session.set_allow_other(true);
                session
                    .mount()
                    .map_err(|e| Error::Fuse(format!("mounting {}: {e}", mountpoint.display())))?;
                (session, mountpoint, None)
            }
            FuseSource::Adopt {
                mountpoint,
                file,
                scratch,
            } => {
                // Made at an empty directory of its own, not at the mountpoint: looking
                // the mountpoint up would wait for this very session to answer. Whatever
                // unmounting the object does on drop finds nothing mounted there; the
                // mountpoint is unmounted by `stop`.
                match std::fs::create_dir(&scratch) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io(format!("Creating {}", scratch.display()), e)),
                }
                let mut session = FuseSession::new(&scratch, "rafs", "nydusfs", true)
                    .map_err(|e| Error::Fuse(format!("session object: {e}")))?;
                session.set_fuse_file(file);
                (session, mountpoint, Some(scratch))
            }
        };
        let device = session
            .get_fuse_file()
            .ok_or_else(|| Error::Fuse("no FUSE device after mounting".into()))?
            .try_clone()
            .map_err(|e| Error::io("Duplicating the FUSE device", e))?;
        let dev = || -> Result<File> {
            device
                .try_clone()
                .map_err(|e| Error::io("Duplicating the FUSE device", e))
        };
        let notify_file = dev()?;
        let notifier = Arc::new(Server::new(NoFs));
        {
            let notifier = notifier.clone();
            fs.set_notifier(Box::new(move |parent, name| {
                let mut buf = vec![0u8; 4096];
                let w = FuseDevWriter::<()>::new(notify_file.as_raw_fd(), &mut buf)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                notifier
                    .notify_inval_entry(w, parent, name)
                    .map(|_| ())
                    .map_err(|e| match e {
                        fuse_backend_rs::Error::InvalidMessage(io) => io,
                        e => std::io::Error::other(e.to_string()),
                    })
            }));
        }
        let server = Arc::new(Server::new(fs.clone()));
        let adopted = scratch.is_some();
        // The first request of a new session is INIT; until it is answered, each thread
        // looks whether its request is it (see `answer_init`).
        let init = Arc::new(InitState {
            pending: AtomicBool::new(!adopted),
            passthrough: opts.passthrough,
            vfs: fs,
            readahead_kb: opts.readahead_kb,
            dev: dev()?,
            table: opts.table.clone(),
            on_init: opts.on_init.clone(),
        });
        if adopted && opts.resend {
            // Before any thread reads: the notification re-queues every request read and
            // not answered, and must catch only the predecessor's.
            let mut buf = vec![0u8; 64];
            let resent = FuseDevWriter::<()>::new(device.as_raw_fd(), &mut buf)
                .map_err(|e| e.to_string())
                .and_then(|w| notifier.notify_resend(w).map_err(|e| e.to_string()));
            match resent {
                Ok(()) => info!("asked the kernel to resend the requests left unanswered"),
                Err(e) => warn!(
                    "the kernel did not take FUSE_NOTIFY_RESEND (Linux 6.9+): requests the \
                     previous daemon read and did not answer stay unanswered: {e}"
                ),
            }
        }
        let threads = opts.threads.max(1);
        let pool = Arc::new(Pool {
            session: std::sync::Mutex::new(Some(session)),
            server,
            init,
            events,
            base: threads,
            started: Default::default(),
            idle: Default::default(),
            threads: Default::default(),
            spare: Default::default(),
            busy: Default::default(),
            epoch: std::time::Instant::now(),
        });
        for _ in 0..threads {
            if let Err(e) = pool.grow() {
                // The threads started must not go on serving a session reported failed.
                FuseService {
                    pool,
                    watcher: None,
                    adopted: None,
                }
                .stop(false);
                return Err(e);
            }
        }
        let watcher = {
            let pool = pool.clone();
            thread::Builder::new()
                .name("fuse-watch".into())
                .spawn(move || pool.watch())
                .map_err(|e| Error::io("Starting the FUSE pool's watcher", e))?
        };
        let service = FuseService {
            pool,
            watcher: Some(watcher),
            adopted: scratch.map(|s| (mountpoint.clone(), s)),
        };
        info!(
            "serving {} with {threads} FUSE threads (up to {MAX_FUSE_THREADS} while requests are stuck)",
            mountpoint.display(),
        );
        // A session taken over keeps the readahead its first daemon set.
        if !adopted && opts.readahead_kb > 0 {
            match set_readahead(&mountpoint, opts.readahead_kb) {
                Ok(bdi) => debug!("readahead of {bdi}: {} KiB", opts.readahead_kb),
                Err(e) => warn!(
                    "keeping the kernel's readahead for {}: {e}",
                    mountpoint.display()
                ),
            }
        }
        Ok(service)
    }

    /// FUSE threads started so far.
    pub fn threads(&self) -> usize {
        self.pool.started.load(Ordering::Acquire)
    }

    /// Wakes the threads, unmounts (unless `unmount` is false: the session already
    /// ended, and whatever is mounted at the mountpoint now is not this daemon's) and
    /// waits for the threads to end.
    pub fn stop(mut self, unmount: bool) {
        // Taken under the lock `grow` holds: no thread starts after the wake.
        let session = self
            .pool
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut session) = session {
            if let Err(e) = session.wake() {
                error!("waking FUSE threads: {e}");
            }
            match &self.adopted {
                Some((mountpoint, scratch)) => {
                    // Its own unmount is of its private directory: nothing there.
                    drop(session);
                    let _ = std::fs::remove_dir(scratch);
                    if unmount {
                        if let Err(e) =
                            rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH)
                        {
                            error!("unmounting {}: {e}", mountpoint.display());
                        }
                    }
                }
                None => {
                    if let Err(e) = session.umount() {
                        error!("unmounting: {}", Chain(&e));
                    }
                }
            }
        }
        let threads =
            std::mem::take(&mut *self.pool.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}
