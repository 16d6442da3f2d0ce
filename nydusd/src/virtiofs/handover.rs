//! Failover of a virtio-fs daemon under a running guest: what [`crate::handover`] does
//! for FUSE sessions, for a vhost-user-fs device.
//!
//! QEMU 7.2 sets a vhost-user-fs device up once, when the guest's driver starts it, and
//! never connects again (with `reconnect=` on its chardev it refuses to start the
//! device); a daemon that dies leaves the guest's requests on the share waiting for
//! ever. So a daemon started with `--supervisor SOCK` hands the supervisor, as the
//! device is set up and whenever its images change:
//! * a copy of the VMM's connection (QEMU sees no disconnect while the supervisor holds
//!   it);
//! * the log of the messages that set the device up, with copies of their descriptors
//!   (the guest's memory, the queues' eventfds) — see [`super::relay::SetupLog`];
//! * the in-flight table of its queues ([`super::inflight`]);
//! * the images and pseudo directories served.
//!
//! A successor started with `--upgrade` takes it on `PUT /api/v1/daemon/fuse/takeover`
//! (the images mounted again with the same inode numbers) and serves on
//! `PUT /api/v1/daemon/start`: it replays the setup to a backend of its own, goes on
//! from where each queue was, answers the requests its predecessor took and did not
//! answer, and relays the VMM's connection from then on.

use super::inflight::Inflight;
use super::relay::{Message, SetupLog};
use super::{Adopted, VirtioFsService};
use crate::cache::OpenBlobs;
use crate::client::supervisor;
use crate::config::Config;
use crate::daemon::{self, Event};
use crate::error::{Chain, Error, Result};
use crate::handover::{mount_again, parse_state, Takeover, Transport, STATE_VERSION};
use crate::vfs::{TreeState, Vfs};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// What a successor needs besides the descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// [`STATE_VERSION`] of the daemon that wrote it.
    pub version: u32,
    /// Its nydusd version, for messages.
    pub nydusd: String,
    /// The vhost-user socket the VMM connected to.
    pub socket: PathBuf,
    /// The images and pseudo directories served.
    pub tree: TreeState,
    /// The messages that set the device up, in order: each base64, with how many of
    /// the descriptors handed over (after the VMM's socket and the in-flight table)
    /// are its own.
    pub setup: Vec<LoggedMessage>,
    /// Whether the log holds every setup message (no successor can go on otherwise).
    pub complete: bool,
    /// The VMM disconnected: there is no device any more.
    #[serde(default)]
    pub ended: bool,
}

/// One setup message of a [`VirtioState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedMessage {
    /// Header and payload, base64.
    pub message: String,
    /// How many descriptors came with it.
    pub fds: usize,
}

/// The connection being served, as the supervisor gets it.
#[derive(Default)]
struct Session {
    vmm: Option<OwnedFd>,
    inflight: Option<File>,
    log: SetupLog,
    tree: Option<TreeState>,
}

/// A device taken over, its images mounted again, not served yet.
struct Prepared {
    vfs: Arc<Vfs>,
    configs: Vec<(u16, Config)>,
}

/// A supervised virtio-fs daemon's side of the hand-over.
pub struct VirtioHandover {
    supervisor: PathBuf,
    socket: PathBuf,
    threads: usize,
    session: Mutex<Session>,
    prepared: Mutex<Option<Prepared>>,
}

impl VirtioHandover {
    /// The hand-over of the device served on `socket` (with `threads` workers, also a
    /// successor's) to the supervisor at `supervisor`.
    pub fn new(supervisor: &Path, socket: &Path, threads: usize) -> VirtioHandover {
        VirtioHandover {
            supervisor: supervisor.to_path_buf(),
            socket: socket.to_path_buf(),
            threads,
            session: Mutex::default(),
            prepared: Mutex::default(),
        }
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VMM connected on `vmm`; its queues' requests are recorded in `inflight`, and
    /// `log` holds its setup so far (a predecessor's, when taken over).
    pub fn connected(&self, vmm: &UnixStream, inflight: &Inflight, log: SetupLog) {
        let mut s = self.session();
        s.vmm = vmm.as_fd().try_clone_to_owned().ok();
        s.inflight = inflight.file().try_clone().ok();
        s.log = log;
        if s.vmm.is_none() || s.inflight.is_none() {
            warn!("virtio-fs: copying the connection for the supervisor failed");
        }
        if let Err(e) = self.send(&s) {
            warn!("{}", Chain(&e));
        }
    }

    /// A message from the VMM went to the backend: one that sets the device up is
    /// logged and the session handed over again.
    pub fn record(&self, msg: &Message) {
        let mut s = self.session();
        if s.log.record(msg) {
            if let Err(e) = self.send(&s) {
                warn!("{}", Chain(&e));
            }
        }
    }

    /// The VMM disconnected: the supervisor lets go of the device (and of the guest's
    /// memory), and a successor is told there is nothing to take over.
    pub fn ended(&self) {
        let mut s = self.session();
        s.vmm = None;
        s.inflight = None;
        s.log = SetupLog::default();
        let state = self.state(&s, true);
        let sent = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| supervisor::save(&self.supervisor, &bytes, &[]));
        if let Err(e) = sent {
            warn!("virtio-fs: telling the supervisor the VMM left: {e}");
        }
    }

    fn state(&self, s: &Session, ended: bool) -> VirtioState {
        let engine = base64::engine::general_purpose::STANDARD;
        VirtioState {
            version: STATE_VERSION,
            nydusd: env!("CARGO_PKG_VERSION").into(),
            socket: self.socket.clone(),
            tree: s.tree.clone().unwrap_or_else(|| Vfs::pseudo().export()),
            setup: s
                .log
                .entries()
                .iter()
                .map(|m| LoggedMessage {
                    message: engine.encode(&m.bytes),
                    fds: m.fds.len(),
                })
                .collect(),
            complete: s.log.complete() && !ended,
            ended,
        }
    }

    /// Sends the session to the supervisor (nothing before the VMM connected).
    fn send(&self, s: &Session) -> Result<()> {
        let (Some(vmm), Some(inflight)) = (&s.vmm, &s.inflight) else {
            return Ok(());
        };
        let state = self.state(s, false);
        let bytes = serde_json::to_vec(&state).map_err(|e| Error::State(e.to_string()))?;
        let mut fds: Vec<BorrowedFd<'_>> = vec![vmm.as_fd(), inflight.as_fd()];
        fds.extend(
            s.log
                .entries()
                .iter()
                .flat_map(|m| m.fds.iter().map(|f| f.as_fd())),
        );
        tracing::debug!(
            "virtio-fs: handing {} setup messages and {} descriptors to the supervisor",
            state.setup.len(),
            fds.len()
        );
        supervisor::save(&self.supervisor, &bytes, &fds).map_err(|e| {
            Error::io(
                format!(
                    "Handing the virtio-fs device to the supervisor {}",
                    self.supervisor.display()
                ),
                e,
            )
        })
    }
}

/// The setup log of `state`, its descriptors taken from `fds` in order.
fn log_of(state: &VirtioState, fds: &mut impl Iterator<Item = OwnedFd>) -> Result<SetupLog> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut entries = Vec::new();
    for (i, m) in state.setup.iter().enumerate() {
        let bytes = engine
            .decode(&m.message)
            .map_err(|e| Error::State(format!("setup message {i}: {e}")))?;
        let size = bytes
            .get(8..12)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
        if size.map(|s| s + super::relay::HEADER) != Some(bytes.len()) {
            return Err(Error::State(format!(
                "setup message {i} is not a vhost-user message ({} bytes)",
                bytes.len()
            )));
        }
        let mut own = Vec::new();
        for _ in 0..m.fds {
            own.push(fds.next().ok_or_else(|| {
                Error::State(format!("setup message {i}: its descriptors did not come"))
            })?);
        }
        entries.push(Message { bytes, fds: own });
    }
    Ok(SetupLog::from_entries(entries))
}

/// Refuses a descriptor that is not a connected unix socket.
fn check_socket(fd: &OwnedFd) -> Result<UnixStream> {
    use std::os::unix::fs::FileTypeExt;
    let f = File::from(
        fd.try_clone()
            .map_err(|e| Error::io("Duplicating the VMM's socket", e))?,
    );
    let md = f
        .metadata()
        .map_err(|e| Error::io("Inspecting the VMM's socket", e))?;
    if !md.file_type().is_socket() {
        return Err(Error::State(
            "the first descriptor handed over is not the VMM's socket".into(),
        ));
    }
    let sock = UnixStream::from(OwnedFd::from(f));
    sock.peer_addr()
        .map_err(|e| Error::State(format!("the VMM's socket is not connected: {e}")))?;
    Ok(sock)
}

impl VirtioHandover {
    /// The device the supervisor holds: its state and what a successor goes on with.
    fn take_device(&self) -> Result<(VirtioState, Adopted)> {
        let saved = supervisor::restore(&self.supervisor).map_err(|e| {
            Error::io(
                format!(
                    "Taking the virtio-fs device from the supervisor {}",
                    self.supervisor.display()
                ),
                e,
            )
        })?;
        let state: VirtioState = parse_state(&saved.state)?;
        if state.socket != self.socket {
            return Err(Error::State(format!(
                "the device is of the socket {}, not of --sock {}",
                state.socket.display(),
                self.socket.display()
            )));
        }
        if state.ended {
            return Err(Error::State(
                "the VMM disconnected from the previous daemon: there is no device to take over"
                    .into(),
            ));
        }
        if !state.complete {
            return Err(Error::State(
                "the previous daemon could not record the whole setup of the device".into(),
            ));
        }
        let mut fds = saved.fds.into_iter();
        let vmm = check_socket(
            &fds.next()
                .ok_or_else(|| Error::State("no VMM socket came with it".into()))?,
        )?;
        let inflight = File::from(
            fds.next()
                .ok_or_else(|| Error::State("no in-flight table came with it".into()))?,
        );
        let inflight = Inflight::load(inflight)
            .map_err(|e| Error::State(format!("the in-flight table: {e}")))?;
        let log = log_of(&state, &mut fds)?;
        Ok((
            state,
            Adopted {
                vmm,
                log,
                inflight: Arc::new(inflight),
            },
        ))
    }
}

impl Takeover for VirtioHandover {
    fn supervisor(&self) -> &Path {
        &self.supervisor
    }

    fn save(&self, vfs: &Vfs) -> Result<()> {
        let mut s = self.session();
        s.tree = Some(vfs.export());
        self.send(&s)
    }

    fn sendfd(&self, vfs: &Vfs) -> Result<()> {
        if self.session().vmm.is_none() {
            return Err(Error::State(
                "no VMM is connected: there is no device to hand over".into(),
            ));
        }
        self.save(vfs)
    }

    fn prepare(&self, open: &Arc<OpenBlobs>) -> Result<()> {
        let (state, _) = self.take_device()?;
        let (vfs, configs) = mount_again(&state.tree, open)?;
        *self.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some(Prepared {
            vfs: Arc::new(vfs),
            configs,
        });
        Ok(())
    }

    fn serve(self: Arc<Self>, events: Sender<Event>) -> Result<(Arc<Vfs>, Transport)> {
        let Prepared { vfs, configs } = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                Error::State("no device taken over yet (PUT /api/v1/daemon/fuse/takeover)".into())
            })?;
        // The device as the predecessor left it when it died (during a live upgrade it
        // may have changed since the takeover).
        let (state, adopted) = self.take_device()?;
        self.session().tree = Some(vfs.export());
        let service =
            VirtioFsService::adopt(vfs.clone(), self.threads, events, self.clone(), adopted)?;
        let mounts = vfs.mounts();
        for (index, config) in &configs {
            if let Some(m) = mounts.iter().find(|m| m.index == *index) {
                daemon::start_prefetch(m, config);
            }
        }
        info!(
            "took over the virtio-fs device on {} from nydusd {} ({} images)",
            self.socket.display(),
            state.nydusd,
            mounts.len()
        );
        Ok((vfs, Transport::Virtio(service)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::supervisor::{Saved, Supervisor};

    fn state(socket: &Path, complete: bool, setup: Vec<LoggedMessage>) -> Vec<u8> {
        serde_json::to_vec(&VirtioState {
            version: STATE_VERSION,
            nydusd: "x".into(),
            socket: socket.into(),
            tree: Vfs::pseudo().export(),
            setup,
            complete,
            ended: false,
        })
        .unwrap()
    }

    /// Each bad hand-over is refused with its reason, before anything is served.
    #[test]
    fn bad_devices_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::bind(&dir.path().join("sup.sock")).unwrap();
        let sock = dir.path().join("vfs.sock");
        let h = VirtioHandover::new(sup.path(), &sock, 1);
        let open = OpenBlobs::new();
        let (vmm, _peer) = UnixStream::pair().unwrap();
        let table = Inflight::new(2, 8).unwrap();
        let fds = |n: usize| -> Vec<OwnedFd> {
            let mut v = vec![
                vmm.as_fd().try_clone_to_owned().unwrap(),
                table.file().as_fd().try_clone_to_owned().unwrap(),
            ];
            v.truncate(n);
            v
        };
        let set_msg = LoggedMessage {
            message: base64::engine::general_purpose::STANDARD
                .encode([3u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
            fds: 1,
        };
        let file: OwnedFd = tempfile::tempfile().unwrap().into();
        let cases: Vec<(Vec<u8>, Vec<OwnedFd>, &str)> = vec![
            (
                b"{\"version\":1,\"nydusd\":\"x\",\"mountpoint\":\"/m\"}".to_vec(),
                fds(2),
                "missing field",
            ),
            (
                state(Path::new("/other.sock"), true, vec![]),
                fds(2),
                "not of --sock",
            ),
            (
                state(&sock, false, vec![]),
                fds(2),
                "could not record the whole setup",
            ),
            (
                state(&sock, true, vec![]),
                vec![file],
                "not the VMM's socket",
            ),
            (state(&sock, true, vec![]), fds(1), "no in-flight table"),
            (
                state(&sock, true, vec![set_msg]),
                fds(2),
                "its descriptors did not come",
            ),
        ];
        for (bytes, fds, why) in cases {
            sup.set(Some(Saved { state: bytes, fds }));
            let err = h.prepare(&open).unwrap_err().to_string();
            assert!(err.contains(why), "wanted {why:?}: {err}");
        }
        sup.set(Some(Saved {
            state: state(&sock, true, vec![]),
            fds: fds(2),
        }));
        h.prepare(&open).unwrap();
    }
}
