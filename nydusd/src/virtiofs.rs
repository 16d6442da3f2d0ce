//! The virtio-fs transport: the same filesystem ([`Vfs`]) served to a VM guest through
//! vhost-user-fs (QEMU's `vhost-user-fs-pci`, Kata's), instead of `/dev/fuse`.
//!
//! The vhost-user side is `vhost-user-backend`: it owns the socket, the guest's memory
//! map and the virtqueues. Each request the guest puts on a queue (a descriptor chain) is
//! handed to a pool of worker threads, which decode it with fuse-backend-rs' `Server`
//! (the same one the FUSE session uses), answer it into guest memory and return the
//! chain; so one cold read waiting on the backend does not stall the guest's other
//! requests. FUSE passthrough and kernel invalidation do not exist on this transport.
//!
//! When the guest's VMM disconnects, [`VirtioFsService`] reports
//! [`Event::TransportEnded`] and the daemon stops; a new daemon can then serve the same
//! socket path (the socket file is replaced).

use crate::daemon::Event;
use crate::error::{Error, Result};
use crate::vfs::Vfs;
use crossbeam_channel::{Receiver, Sender as WorkSender};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringMutex, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
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

/// One request for a worker: the chain, its memory and the queue to return it to.
struct Job {
    chain: Chain,
    vring: VringMutex<Memory>,
    event_idx: bool,
}

struct Backend {
    mem: Option<Memory>,
    event_idx: bool,
    work: WorkSender<Job>,
}

impl Backend {
    /// Takes every available chain off `vring` and hands each to the workers.
    fn dispatch(&self, vring: &VringMutex<Memory>) -> std::io::Result<()> {
        let mem = self
            .mem
            .as_ref()
            .ok_or_else(|| std::io::Error::other("a queue event before the guest's memory map"))?
            .memory();
        let chains: Vec<Chain> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem)
            .map_err(|e| std::io::Error::other(format!("reading the virtqueue: {e:?}")))?
            .collect();
        for chain in chains {
            let job = Job {
                chain,
                vring: vring.clone(),
                event_idx: self.event_idx,
            };
            if self.work.send(job).is_err() {
                return Err(std::io::Error::other("the worker pool is gone"));
            }
        }
        Ok(())
    }
}

impl VhostUserBackendMut for Backend {
    type Bitmap = ();
    type Vring = VringMutex<Memory>;

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
        if self.event_idx {
            // Drain, then re-enable notifications; chains that arrived meanwhile are
            // taken in the next round.
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                self.dispatch(vring)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?
                {
                    break;
                }
            }
        } else {
            self.dispatch(vring)?;
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
    if let Err(e) = job.vring.add_used(head, len as u32) {
        warn!("returning a virtio-fs descriptor: {e:?}");
        return;
    }
    let notify = !job.event_idx || job.vring.needs_notification().unwrap_or(true);
    if notify {
        if let Err(e) = job.vring.signal_used_queue() {
            warn!("signalling the guest: {e}");
        }
    }
}

/// A vhost-user-fs backend serving a [`Vfs`] on a unix socket.
pub struct VirtioFsService {
    socket: PathBuf,
    serve: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl VirtioFsService {
    /// Listens on `socket` (replacing a stale socket file) for the VMM, and serves `fs`
    /// with `threads` worker threads. [`Event::TransportEnded`] goes to `events` when
    /// the VMM disconnects (or the socket fails).
    pub fn start(
        fs: Arc<Vfs>,
        socket: &Path,
        threads: usize,
        events: Sender<Event>,
    ) -> Result<VirtioFsService> {
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
        }));
        let mut daemon = VhostUserDaemon::new(
            "nydusd-virtiofs".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| Error::Fuse(format!("vhost-user daemon: {e}")))?;
        // Bind before returning, so that a VMM started right after finds the socket.
        let mut listener = vhost::vhost_user::Listener::new(socket, true)
            .map_err(|e| Error::Fuse(format!("listening on {}: {e}", socket.display())))?;
        let path = socket.to_path_buf();
        let serve = thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                match daemon.start(&mut listener) {
                    Ok(()) => {
                        info!("virtio-fs: the VMM connected on {}", path.display());
                        match daemon.wait() {
                            Ok(()) => info!("virtio-fs: the VMM disconnected"),
                            Err(e) => info!("virtio-fs: the connection ended: {e}"),
                        }
                    }
                    Err(e) => warn!("virtio-fs: accepting the VMM on {}: {e}", path.display()),
                }
                let _ = events.send(Event::TransportEnded);
            })
            .map_err(|e| Error::io("Starting the vhost-user thread", e))?;
        Ok(VirtioFsService {
            socket: socket.to_path_buf(),
            serve: Some(serve),
            workers,
        })
    }

    /// Removes the socket file. The threads end with the process (a VMM still connected
    /// sees the connection close).
    pub fn stop(mut self) {
        let _ = std::fs::remove_file(&self.socket);
        // Joining the vhost-user thread would wait for the VMM; it is left to the exit.
        drop(self.serve.take());
        self.workers.clear();
    }
}
