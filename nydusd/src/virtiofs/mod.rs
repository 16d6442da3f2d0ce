//! The virtio-fs transport: the same filesystem ([`Vfs`]) served to a VM guest through
//! vhost-user-fs (QEMU's `vhost-user-fs-pci`, Kata's), instead of `/dev/fuse`.
//!
//! The vhost-user side is `vhost-user-backend`: it keeps the guest's memory map and the
//! virtqueues, and answers the VMM's messages, which nydusd relays to it ([`relay`]). Each request the guest puts on a queue (a descriptor chain) is
//! handed to a pool of worker threads, which decode it with fuse-backend-rs' `Server`
//! (the same one the FUSE session uses), answer it into guest memory and return the
//! chain; so one cold read waiting on the backend does not stall the guest's other
//! requests. FUSE passthrough and kernel invalidation do not exist on this transport.
//!
//! When the guest's VMM disconnects, [`VirtioFsService`] reports
//! [`Event::TransportEnded`] and the daemon stops; a new daemon can then serve the same
//! socket path (the socket file is replaced).
//!
//! nydusd holds the VMM's connection itself and relays its messages to the backend
//! ([`relay`]), and records the requests it takes off the queues ([`inflight`]), so that
//! with `--supervisor` a successor can take a running guest's device over when this
//! daemon dies ([`handover`]): QEMU 7.2 never sets a vhost-user-fs device up again, so
//! without that the guest's requests on the share wait for ever.

pub mod handover;
pub mod inflight;
pub mod relay;

use crate::daemon::Event;
use crate::error::{Error, Result};
use crate::vfs::Vfs;
use crossbeam_channel::{Receiver, Sender as WorkSender};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use handover::VirtioHandover;
use inflight::{Inflight, QueueSnapshot};
use relay::SetupLog;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    VhostUserBackendMut, VhostUserDaemon, VringMutex, VringStateGuard, VringStateMutGuard, VringT,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Descriptors per queue.
const QUEUE_SIZE: usize = 1024;
/// The high-priority queue and one request queue (QEMU's default `num-request-queues`).
const NUM_QUEUES: usize = 2;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// A queue: `vhost-user-backend`'s, and a kick of its own when the queue is enabled.
/// The backend reads the kicks of a queue that is not enabled and drops them, so a
/// request the guest queued (and kicked) before the VMM's `SET_VRING_ENABLE` reached the
/// backend would wait for ever; a successor's queues are enabled by its replay, after
/// the guest's kicks.
#[derive(Clone)]
pub struct Vring {
    inner: VringMutex<Memory>,
    kick: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl<'a> VringStateGuard<'a, Memory> for Vring {
    type G = <VringMutex<Memory> as VringStateGuard<'a, Memory>>::G;
}

impl<'a> VringStateMutGuard<'a, Memory> for Vring {
    type G = <VringMutex<Memory> as VringStateMutGuard<'a, Memory>>::G;
}

impl VringT<Memory> for Vring {
    fn new(mem: Memory, max_queue_size: u16) -> std::result::Result<Self, virtio_queue::Error> {
        Ok(Vring {
            inner: VringMutex::new(mem, max_queue_size)?,
            kick: Arc::default(),
        })
    }
    fn get_ref(&self) -> <Self as VringStateGuard<'_, Memory>>::G {
        self.inner.get_ref()
    }
    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Memory>>::G {
        self.inner.get_mut()
    }
    fn add_used(&self, desc_index: u16, len: u32) -> std::result::Result<(), virtio_queue::Error> {
        self.inner.add_used(desc_index, len)
    }
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.inner.signal_used_queue()
    }
    fn enable_notification(&self) -> std::result::Result<bool, virtio_queue::Error> {
        self.inner.enable_notification()
    }
    fn disable_notification(&self) -> std::result::Result<(), virtio_queue::Error> {
        self.inner.disable_notification()
    }
    fn needs_notification(&self) -> std::result::Result<bool, virtio_queue::Error> {
        self.inner.needs_notification()
    }
    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        if enabled {
            if let Some(kick) = &*self.kick.lock().unwrap_or_else(|e| e.into_inner()) {
                if let Err(e) = rustix::io::write(kick, &1u64.to_ne_bytes()) {
                    warn!("virtio-fs: kicking a queue just enabled: {e}");
                }
            }
        }
    }
    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> std::result::Result<(), virtio_queue::Error> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }
    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }
    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }
    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }
    fn queue_used_idx(&self) -> std::result::Result<u16, virtio_queue::Error> {
        self.inner.queue_used_idx()
    }
    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }
    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }
    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }
    fn set_kick(&self, file: Option<std::fs::File>) {
        *self.kick.lock().unwrap_or_else(|e| e.into_inner()) =
            file.as_ref().and_then(|f| f.try_clone().ok());
        self.inner.set_kick(file)
    }
    fn read_kick(&self) -> std::io::Result<bool> {
        self.inner.read_kick()
    }
    fn set_call(&self, file: Option<std::fs::File>) {
        self.inner.set_call(file)
    }
    fn set_err(&self, file: Option<std::fs::File>) {
        self.inner.set_err(file)
    }
}

/// One request for a worker: the chain, its memory and the queue to return it to.
struct Job {
    chain: Chain,
    vring: Vring,
    queue: usize,
    event_idx: bool,
    inflight: Arc<Inflight>,
}

type SharedBackend = Arc<RwLock<Backend>>;

struct Backend {
    mem: Option<Memory>,
    event_idx: bool,
    work: WorkSender<Job>,
    inflight: Arc<Inflight>,
    /// Per queue, what a predecessor left in flight, until the queue's first event.
    restore: Vec<Option<QueueSnapshot>>,
    /// A predecessor's setup is being replayed: queue events wait for its end (the
    /// replay kicks every queue when done).
    replaying: bool,
}

fn io_err(what: &str, e: impl std::fmt::Debug) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e:?}"))
}

impl Backend {
    fn memory(&self) -> std::io::Result<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        Ok(self
            .mem
            .as_ref()
            .ok_or_else(|| std::io::Error::other("a queue event before the guest's memory map"))?
            .memory())
    }

    fn send(&self, chains: Vec<Chain>, vring: &Vring, queue: usize) -> std::io::Result<()> {
        for chain in chains {
            let job = Job {
                chain,
                vring: vring.clone(),
                queue,
                event_idx: self.event_idx,
                inflight: self.inflight.clone(),
            };
            if self.work.send(job).is_err() {
                return Err(std::io::Error::other("the worker pool is gone"));
            }
        }
        Ok(())
    }

    /// Takes every available chain off `vring` and hands each to the workers, each
    /// recorded in the in-flight table first.
    fn dispatch(&self, vring: &Vring, queue: usize) -> std::io::Result<()> {
        let mem = self.memory()?;
        let chains: Vec<Chain> = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            let (start, used) = (q.next_avail(), q.next_used());
            let chains: Vec<Chain> = q
                .iter(mem)
                .map_err(|e| io_err("reading the virtqueue", e))?
                .collect();
            for (i, c) in chains.iter().enumerate() {
                self.inflight
                    .taken(queue, c.head_index(), start.wrapping_add(i as u16), used);
            }
            if !chains.is_empty() {
                self.inflight.advanced(queue, q.next_avail());
            }
            chains
        };
        self.send(chains, vring, queue)
    }

    /// Goes on from where a predecessor left `queue`: the used ring's index as the guest
    /// sees it, the avail position it took requests up to, and the requests it took and
    /// did not answer answered now.
    fn restore(&self, vring: &Vring, queue: usize, snap: QueueSnapshot) -> std::io::Result<()> {
        let mem = self.memory()?;
        let (pending, desc_table, size) = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            let used = q
                .used_idx(&*mem, Ordering::Acquire)
                .map_err(|e| io_err("reading the used ring's index", e))?
                .0;
            let avail = q
                .avail_idx(&*mem, Ordering::Acquire)
                .map_err(|e| io_err("reading the avail ring's index", e))?
                .0;
            if let Some(n) = snap.next_avail {
                if avail.wrapping_sub(n) > q.size() {
                    warn!(
                        "virtio-fs: queue {queue}: the recorded position {n} is not of this ring \
                         (avail {avail}); going on from the VMM's"
                    );
                    return Ok(());
                }
            }
            q.set_next_used(used);
            if let Some(n) = snap.next_avail {
                q.set_next_avail(n);
            }
            let (ring, size) = (q.used_ring(), q.size());
            let used_id = |p: u16| {
                let at = ring.checked_add(4 + 8 * (p % size) as u64)?;
                mem.read_obj::<u32>(GuestAddress(at))
                    .ok()
                    .map(|id| id as u16)
            };
            let pending = inflight::pending(&snap, size, used, used_id);
            (pending, q.desc_table(), size)
        };
        // Slots of requests done or to be taken again are freed; the pending ones are
        // kept until answered.
        for t in &snap.taken {
            if !pending.contains(t) {
                self.inflight.answered(queue, t.head);
            }
        }
        info!(
            "virtio-fs: queue {queue} taken over at avail {:?}; answering {} request(s) the \
             previous daemon left",
            snap.next_avail,
            pending.len()
        );
        if pending.is_empty() {
            return Ok(());
        }
        let heads: Vec<u16> = pending.iter().map(|t| t.head).collect();
        let chains = chains_of(&mem, GuestAddress(desc_table), size, &heads)?;
        self.send(chains, vring, queue)
    }
}

/// The descriptor chains with heads `heads` in the descriptor table at `desc_table` (a
/// queue of `size`): read through a queue of their own whose avail ring, in a page
/// added past the end of the guest's memory, lists just them.
fn chains_of(
    mem: &GuestMemoryMmap,
    desc_table: GuestAddress,
    size: u16,
    heads: &[u16],
) -> std::io::Result<Vec<Chain>> {
    let end = mem
        .last_addr()
        .0
        .checked_add(1)
        .ok_or_else(|| std::io::Error::other("no room past the guest's memory"))?;
    let base = end.div_ceil(4096) * 4096;
    let len = 4096 + (6 + 8 * size as usize).div_ceil(4096) * 4096;
    let region = MmapRegion::new(len).map_err(|e| io_err("mapping a ring", e))?;
    let region = GuestRegionMmap::new(region, GuestAddress(base))
        .ok_or_else(|| std::io::Error::other("no room past the guest's memory"))?;
    let view = mem
        .insert_region(Arc::new(region))
        .map_err(|e| io_err("adding a ring to the guest's memory", e))?;
    let put = |at: u64, v: u16| {
        view.write_obj(v, GuestAddress(base + at))
            .map_err(|e| io_err("writing a ring", e))
    };
    put(0, 0)?;
    put(2, heads.len() as u16)?;
    for (i, h) in heads.iter().enumerate() {
        put(4 + 2 * i as u64, *h)?;
    }
    let mut q = Queue::new(size).map_err(|e| io_err("a queue", e))?;
    q.try_set_desc_table_address(desc_table)
        .and_then(|_| q.try_set_avail_ring_address(GuestAddress(base)))
        .and_then(|_| q.try_set_used_ring_address(GuestAddress(base + 4096)))
        .map_err(|e| io_err("a queue's addresses", e))?;
    q.set_ready(true);
    let view = GuestMemoryAtomic::new(view);
    let chains: Vec<Chain> = q
        .iter(view.memory())
        .map_err(|e| io_err("reading the requests left", e))?
        .collect();
    Ok(chains)
}

impl VhostUserBackendMut for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn update_memory(&mut self, mem: Memory) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event set {evset:?}"
            )));
        }
        let vring = vrings.get(device_event as usize).ok_or_else(|| {
            std::io::Error::other(format!("event for unknown queue {device_event}"))
        })?;
        if self.replaying {
            return Ok(());
        }
        let queue = device_event as usize;
        // An error here would end the thread that serves every queue, with the daemon
        // still up: each queue's trouble is logged instead.
        if let Some(snap) = self.restore.get_mut(queue).and_then(Option::take) {
            if let Err(e) = self.restore(vring, queue, snap) {
                warn!("virtio-fs: queue {queue}: answering the requests left: {e}");
            }
        }
        if let Err(e) = self.take_requests(vring, queue) {
            warn!("virtio-fs: queue {queue}: {e}");
        }
        Ok(())
    }
}

impl Backend {
    fn take_requests(&self, vring: &Vring, queue: usize) -> std::io::Result<()> {
        if self.event_idx {
            // Drain, then re-enable notifications; chains that arrived meanwhile are
            // taken in the next round.
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                self.dispatch(vring, queue)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?
                {
                    break;
                }
            }
        } else {
            self.dispatch(vring, queue)?;
        }
        Ok(())
    }
}

/// Answers one request and returns its chain to the guest.
fn serve_job(server: &Server<Arc<Vfs>>, job: Job) {
    let head = job.chain.head_index();
    let mem = job.chain.memory();
    let len = match (
        Reader::from_descriptor_chain(mem, job.chain.clone()),
        VirtioFsWriter::new(mem, job.chain.clone()),
    ) {
        (Ok(r), Ok(w)) => {
            let w: Writer<'_, ()> = w.into();
            match server.handle_message(r, w, None, None) {
                Ok(n) => n,
                Err(e) => {
                    debug!("virtio-fs request: {e}");
                    0
                }
            }
        }
        (r, w) => {
            warn!(
                "a malformed virtio-fs request (reader {:?}, writer {:?})",
                r.err(),
                w.err()
            );
            0
        }
    };
    {
        // Recorded as answered under the queue's lock: the guest may reuse the head as
        // soon as it is in the used ring, and the next take of it is recorded after.
        let mut state = job.vring.get_mut();
        let used = state.add_used(head, len as u32);
        job.inflight.answered(job.queue, head);
        if let Err(e) = used {
            warn!("returning a virtio-fs descriptor: {e:?}");
            return;
        }
    }
    let notify = !job.event_idx || job.vring.needs_notification().unwrap_or(true);
    if notify {
        if let Err(e) = job.vring.signal_used_queue() {
            warn!("signalling the guest: {e}");
        }
    }
}

/// What a successor goes on with: the VMM's connection, the log of its device's setup
/// and the in-flight table of its queues.
pub struct Adopted {
    /// The VMM's connection.
    pub vmm: UnixStream,
    /// The messages that set the device up.
    pub log: SetupLog,
    /// The requests taken off the queues and not answered.
    pub inflight: Arc<Inflight>,
}

/// A socket pair to the backend: a listener on a private (abstract) address with one
/// connection waiting in it, and that connection's other end.
fn inner_pair() -> std::io::Result<(std::os::unix::net::UnixListener, UnixStream)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "nydusd-vhost-user-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let ours = UnixStream::connect_addr(&addr)?;
    Ok((listener, ours))
}

/// Serves one VMM connection until it ends: the backend on a private socket, the VMM's
/// messages relayed to it (and recorded for `handover`), after `replay` when a
/// predecessor's device is taken over.
fn serve_connection(
    backend: SharedBackend,
    vmm: UnixStream,
    replay: Option<SetupLog>,
    inflight: &Arc<Inflight>,
    handover: Option<Arc<VirtioHandover>>,
) -> std::result::Result<(), String> {
    let mut daemon = VhostUserDaemon::new(
        "nydusd-virtiofs".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("vhost-user daemon: {e}"))?;
    let (listener, ours) = inner_pair().map_err(|e| format!("a socket to the backend: {e}"))?;
    daemon
        .start(&mut vhost::vhost_user::Listener::from(listener))
        .map_err(|e| format!("starting the backend: {e}"))?;
    let mut kicks = Vec::new();
    let log = match replay {
        Some(log) => {
            let _ = ours.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            log.replay(&ours)
                .map_err(|e| format!("setting the device up again: {e}"))?;
            let _ = ours.set_read_timeout(None);
            backend.write().unwrap_or_else(|e| e.into_inner()).replaying = false;
            // Requests the guest queued while no daemon served are taken, and it looks
            // at its used rings again (for answers given during the replay).
            for (q, fd) in log.kicks().into_iter().chain(log.calls()) {
                kicks.push((q, fd.try_clone_to_owned().map_err(|e| e.to_string())?));
            }
            log
        }
        None => SetupLog::default(),
    };
    if let Some(h) = &handover {
        h.connected(&vmm, inflight, log);
    }
    let (to_vmm, from_vmm) = (
        vmm.try_clone().map_err(|e| e.to_string())?,
        ours.try_clone().map_err(|e| e.to_string())?,
    );
    // The VMM's messages go on to the backend, each logged (and handed over) first;
    // when the VMM goes, so does the backend.
    let table = inflight.clone();
    thread::Builder::new()
        .name("vhost-user-in".into())
        .spawn(move || {
            let mut seen = |m: &relay::Message| {
                debug!(
                    "virtio-fs: VMM request {} ({} bytes, {} fds)",
                    m.request(),
                    m.payload().len(),
                    m.fds.len()
                );
                if let Some((queue, base)) = m.vring_base() {
                    table.reset(queue as usize, base as u16);
                }
                if let Some(h) = &handover {
                    h.record(m);
                }
            };
            loop {
                match relay::relay_one(&vmm, &from_vmm, &mut seen) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        info!("virtio-fs: relaying the VMM's messages: {e}");
                        break;
                    }
                }
            }
            let _ = from_vmm.shutdown(std::net::Shutdown::Both);
            if let Some(h) = &handover {
                h.ended();
            }
        })
        .map_err(|e| e.to_string())?;
    thread::Builder::new()
        .name("vhost-user-out".into())
        .spawn(
            move || {
                while let Ok(true) = relay::relay_one(&ours, &to_vmm, &mut |_| {}) {}
            },
        )
        .map_err(|e| e.to_string())?;
    for (q, fd) in kicks {
        if let Err(e) = rustix::io::write(&fd, &1u64.to_ne_bytes()) {
            warn!("virtio-fs: signalling queue {q}: {e}");
        }
    }
    daemon
        .wait()
        .map_err(|e| format!("the connection ended: {e}"))
}

/// A vhost-user-fs backend serving a [`Vfs`] on a unix socket.
pub struct VirtioFsService {
    socket: Option<PathBuf>,
    serve: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl VirtioFsService {
    fn backend(
        fs: Arc<Vfs>,
        threads: usize,
        inflight: Arc<Inflight>,
    ) -> Result<(SharedBackend, Vec<JoinHandle<()>>)> {
        let (work, jobs): (WorkSender<Job>, Receiver<Job>) = crossbeam_channel::unbounded();
        let server = Arc::new(Server::new(fs));
        let workers = (0..threads.max(1))
            .map(|i| {
                let (server, jobs) = (server.clone(), jobs.clone());
                thread::Builder::new()
                    .name(format!("virtiofs-{i}"))
                    .spawn(move || {
                        for job in jobs {
                            serve_job(&server, job);
                        }
                    })
                    .map_err(|e| Error::io("Starting a virtio-fs worker", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = Arc::new(RwLock::new(Backend {
            mem: None,
            event_idx: false,
            work,
            inflight,
            restore: Vec::new(),
            replaying: false,
        }));
        Ok((backend, workers))
    }

    /// Listens on `socket` (replacing a stale socket file) for the VMM, and serves `fs`
    /// with `threads` worker threads. [`Event::TransportEnded`] goes to `events` when
    /// the VMM disconnects (or the socket fails). With `handover`, the connection is
    /// handed to its supervisor as it is set up.
    pub fn start(
        fs: Arc<Vfs>,
        socket: &Path,
        threads: usize,
        events: Sender<Event>,
        handover: Option<Arc<VirtioHandover>>,
    ) -> Result<VirtioFsService> {
        let inflight = Arc::new(
            Inflight::new(NUM_QUEUES as u32, QUEUE_SIZE as u32)
                .map_err(|e| Error::io("Making the in-flight table", e))?,
        );
        let (backend, workers) = VirtioFsService::backend(fs, threads, inflight.clone())?;
        // Bound before returning, so that a VMM started right after finds the socket.
        let _ = std::fs::remove_file(socket);
        let listener = std::os::unix::net::UnixListener::bind(socket)
            .map_err(|e| Error::Fuse(format!("listening on {}: {e}", socket.display())))?;
        let path = socket.to_path_buf();
        let serve = thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                match listener.accept() {
                    Ok((vmm, _)) => {
                        drop(listener);
                        info!("virtio-fs: the VMM connected on {}", path.display());
                        match serve_connection(backend, vmm, None, &inflight, handover) {
                            Ok(()) => info!("virtio-fs: the VMM disconnected"),
                            Err(e) => info!("virtio-fs: {e}"),
                        }
                    }
                    Err(e) => warn!("virtio-fs: accepting the VMM on {}: {e}", path.display()),
                }
                let _ = events.send(Event::TransportEnded);
            })
            .map_err(|e| Error::io("Starting the vhost-user thread", e))?;
        Ok(VirtioFsService {
            socket: Some(socket.to_path_buf()),
            serve: Some(serve),
            workers,
        })
    }

    /// Goes on serving a device a predecessor set up and died with (`adopted`, from its
    /// supervisor): the setup replayed to a backend of its own, the queues taken on
    /// where they were, the requests left in flight answered.
    pub fn adopt(
        fs: Arc<Vfs>,
        threads: usize,
        events: Sender<Event>,
        handover: Arc<VirtioHandover>,
        adopted: Adopted,
    ) -> Result<VirtioFsService> {
        let Adopted { vmm, log, inflight } = adopted;
        let restore = (0..NUM_QUEUES)
            .map(|q| inflight.snapshot(q).map(Some))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::State(format!("the in-flight table: {e}")))?;
        let (backend, workers) = VirtioFsService::backend(fs, threads, inflight.clone())?;
        {
            let mut b = backend.write().unwrap_or_else(|e| e.into_inner());
            b.restore = restore;
            b.replaying = true;
        }
        let serve = thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                match serve_connection(backend, vmm, Some(log), &inflight, Some(handover)) {
                    Ok(()) => info!("virtio-fs: the VMM disconnected"),
                    Err(e) => warn!("virtio-fs: {e}"),
                }
                let _ = events.send(Event::TransportEnded);
            })
            .map_err(|e| Error::io("Starting the vhost-user thread", e))?;
        Ok(VirtioFsService {
            socket: None,
            serve: Some(serve),
            workers,
        })
    }

    /// Removes the socket file (of a daemon that bound it). The threads end with the
    /// process (a VMM still connected sees the connection close, unless a supervisor
    /// holds it).
    pub fn stop(mut self) {
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
        // Joining the vhost-user thread would wait for the VMM; it is left to the exit.
        drop(self.serve.take());
        self.workers.clear();
    }
}
