//! The supervisor protocol: how a FUSE nydusd started with `--supervisor SOCK` hands its
//! session to the process that supervises it (the snapshotter), and how a successor
//! started with `--upgrade` takes the session back (upstream's `--supervisor`,
//! `/api/v1/daemon/fuse/sendfd` and `/api/v1/daemon/fuse/takeover`).
//!
//! The supervisor listens on a unix stream socket; nydusd connects. A message is a
//! 16-byte header — [`MAGIC`], the operation (little-endian u32) and the body's length
//! (u32, at most [`MAX_BODY`]) — sent in one `sendmsg` with the message's file
//! descriptors (`SCM_RIGHTS`, at most [`MAX_FDS`]), then the body.
//!
//! * **save**: nydusd sends its state (JSON, the daemon's to define) with its
//!   descriptors (a FUSE daemon's device and open-file table; a virtio-fs daemon's VMM
//!   socket, in-flight table and the descriptors of its device's setup); the supervisor keeps them (the latest save
//!   wins) and answers one byte, 0.
//! * **restore**: a successor sends an empty save-less request; the supervisor answers
//!   with the last saved state and descriptors, or an empty answer when it has none.
//!
//! While the supervisor holds the FUSE device, the kernel keeps the connection: a nydusd
//! that dies (even by `SIGKILL`) leaves its mount waiting, not failing, and the requests
//! it had read are resent to its successor.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// First bytes of every message (the protocol's version is its last digit).
pub const MAGIC: [u8; 8] = *b"NYDSUPV2";
/// Largest body accepted.
pub const MAX_BODY: u32 = 16 << 20;
/// Most descriptors a message carries.
pub const MAX_FDS: usize = 64;
/// How long either side waits for the other's next bytes.
pub const TIMEOUT: Duration = Duration::from_secs(5);

const OP_SAVE: u32 = 1;
const OP_RESTORE: u32 = 2;
const OP_STATE: u32 = 3;
const OP_NOTHING: u32 = 4;

/// A saved session: the daemon's state and its descriptors (the FUSE device first).
#[derive(Debug)]
pub struct Saved {
    /// The daemon's state, as it sent it.
    pub state: Vec<u8>,
    /// The descriptors it sent with it, in order.
    pub fds: Vec<OwnedFd>,
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Sends one message.
fn send(sock: &UnixStream, op: u32, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    if fds.len() > MAX_FDS || body.len() > MAX_BODY as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message too large for the supervisor protocol",
        ));
    }
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&MAGIC);
    head[8..12].copy_from_slice(&op.to_le_bytes());
    head[12..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("no room for the descriptors"));
    }
    let mut sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&head)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first byte; the rest of the header, if short.
    let mut w = sock;
    if sent < head.len() {
        w.write_all(&head[sent..])?;
        sent = head.len();
    }
    debug_assert_eq!(sent, head.len());
    w.write_all(body)
}

/// Receives one message: its operation, body and descriptors.
fn recv(sock: &UnixStream) -> io::Result<(u32, Vec<u8>, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut head = [0u8; 16];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut head)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(invalid(format!(
            "a supervisor message with more than {MAX_FDS} descriptors"
        )));
    }
    if got.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other side closed the connection",
        ));
    }
    let mut r = sock;
    r.read_exact(&mut head[got.bytes..])?;
    if head[..8] != MAGIC {
        return Err(invalid(format!(
            "not a supervisor message (it starts with {:02x?}, not {:?})",
            &head[..8],
            String::from_utf8_lossy(&MAGIC)
        )));
    }
    let op = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(head[12..].try_into().expect("4 bytes"));
    if len > MAX_BODY {
        return Err(invalid(format!(
            "a supervisor message of {len} bytes (at most {MAX_BODY})"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok((op, body, fds))
}

fn connect(path: &Path) -> io::Result<UnixStream> {
    let sock = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("connecting to the supervisor at {}: {e}", path.display()),
        )
    })?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.set_write_timeout(Some(TIMEOUT))?;
    Ok(sock)
}

/// Hands `state` and `fds` to the supervisor at `path` (nydusd's side of a save).
pub fn save(path: &Path, state: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let sock = connect(path)?;
    send(&sock, OP_SAVE, state, fds)?;
    let mut ack = [0u8; 1];
    (&sock).read_exact(&mut ack)?;
    if ack[0] != 0 {
        return Err(io::Error::other(format!(
            "the supervisor at {} refused the state (code {})",
            path.display(),
            ack[0]
        )));
    }
    Ok(())
}

/// Takes the last saved session from the supervisor at `path` (a successor's side).
pub fn restore(path: &Path) -> io::Result<Saved> {
    let sock = connect(path)?;
    send(&sock, OP_RESTORE, &[], &[])?;
    match recv(&sock)? {
        (OP_STATE, state, fds) => Ok(Saved { state, fds }),
        (OP_NOTHING, _, _) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the supervisor at {} holds no session to take over",
                path.display()
            ),
        )),
        (op, _, _) => Err(invalid(format!(
            "the supervisor answered with operation {op}"
        ))),
    }
}

/// The supervisor's side: a socket that keeps the last session saved to it and hands it
/// to whoever restores. Dropping it (or [`Supervisor::close`]) closes the socket and the
/// descriptors it holds, which ends a FUSE connection no daemon holds any more.
pub struct Supervisor {
    path: PathBuf,
    /// The socket file's device and inode: it is removed only while still ours.
    id: (u64, u64),
    saved: Arc<Mutex<Option<Saved>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the accept loop looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

impl Supervisor {
    /// Listens at `path` (a stale socket file there is replaced), readable and writable
    /// by its owner only: a restore hands out a FUSE device.
    pub fn bind(path: &Path) -> io::Result<Supervisor> {
        use std::os::unix::fs::MetadataExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding the supervisor socket {}: {e}", path.display()),
            )
        })?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let md = std::fs::metadata(path)?;
        listener.set_nonblocking(true)?;
        let saved: Arc<Mutex<Option<Saved>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (saved, stop) = (saved.clone(), stop.clone());
            let name = path.display().to_string();
            std::thread::Builder::new()
                .name("supervisor".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let conn = match listener.accept() {
                            Ok((c, _)) => c,
                            Err(e) => {
                                if e.kind() != io::ErrorKind::WouldBlock {
                                    tracing_warn(&format!("supervisor {name}: accept: {e}"));
                                    std::thread::sleep(ACCEPT_POLL);
                                    continue;
                                }
                                // Woken by the next connection at once, or after the
                                // poll interval to look at the stop flag.
                                let mut fds = [rustix::event::PollFd::new(
                                    &listener,
                                    rustix::event::PollFlags::IN,
                                )];
                                let timeout = rustix::event::Timespec {
                                    tv_sec: 0,
                                    tv_nsec: ACCEPT_POLL.as_nanos() as _,
                                };
                                let _ = rustix::event::poll(&mut fds, Some(&timeout));
                                continue;
                            }
                        };
                        // A connection of its own: a slow client delays nobody else.
                        let (saved, name) = (saved.clone(), name.clone());
                        let _ = std::thread::Builder::new()
                            .name("supervisor-conn".into())
                            .spawn(move || {
                                if let Err(e) = serve(&conn, &saved) {
                                    tracing_warn(&format!("supervisor {name}: {e}"));
                                }
                            });
                    }
                })?
        };
        Ok(Supervisor {
            path: path.to_path_buf(),
            id: (md.dev(), md.ino()),
            saved,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state of the last save, if any.
    pub fn state(&self) -> Option<Vec<u8>> {
        self.lock().as_ref().map(|s| s.state.clone())
    }

    /// Whether a session was saved.
    pub fn has_session(&self) -> bool {
        self.lock().is_some()
    }

    /// Replaces the saved session (tests hand in broken states this way).
    pub fn set(&self, saved: Option<Saved>) {
        *self.lock() = saved;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Saved>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops listening and lets go of the session.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
        self.lock().take();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// One connection to the supervisor.
fn serve(conn: &UnixStream, saved: &Mutex<Option<Saved>>) -> io::Result<()> {
    // Accepted from a non-blocking listener: blocking again, with timeouts.
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    let (op, state, fds) = match recv(conn) {
        Ok(m) => m,
        // A client that gave up.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e),
    };
    match op {
        OP_SAVE => {
            if fds.is_empty() {
                (&*conn).write_all(&[1])?;
                return Err(invalid("a save without the FUSE device".into()));
            }
            *saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { state, fds });
            (&*conn).write_all(&[0])
        }
        OP_RESTORE => {
            // Copied under the lock, sent without it.
            let copy = {
                let guard = saved.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_ref() {
                    Some(s) => {
                        let fds: io::Result<Vec<OwnedFd>> =
                            s.fds.iter().map(|f| f.try_clone()).collect();
                        Some((s.state.clone(), fds?))
                    }
                    None => None,
                }
            };
            match copy {
                Some((state, fds)) => {
                    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    send(conn, OP_STATE, &state, &fds)
                }
                None => send(conn, OP_NOTHING, &[], &[]),
            }
        }
        op => Err(invalid(format!("unknown operation {op}"))),
    }
}

/// The client module logs nothing itself but this warning (it has no `tracing`
/// dependency without the daemon feature): to stderr.
fn tracing_warn(msg: &str) {
    eprintln!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_saved_session_comes_back_with_its_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sup.sock");
        let sup = Supervisor::bind(&sock).unwrap();
        assert!(restore(&sock)
            .unwrap_err()
            .to_string()
            .contains("no session to take over"));
        let f = tempfile::tempfile().unwrap();
        (&f).write_all(b"device").unwrap();
        save(&sock, b"{\"state\":1}", &[f.as_fd()]).unwrap();
        assert!(sup.has_session());
        let back = restore(&sock).unwrap();
        assert_eq!(back.state, b"{\"state\":1}");
        assert_eq!(back.fds.len(), 1);
        // The same open file: its offset is shared.
        let mut again = std::fs::File::from(back.fds.into_iter().next().unwrap());
        assert_ne!(again.as_raw_fd(), f.as_raw_fd());
        let mut s = String::new();
        use std::io::Seek;
        again.seek(std::io::SeekFrom::Start(0)).unwrap();
        again.read_to_string(&mut s).unwrap();
        assert_eq!(s, "device");
        sup.close();
        assert!(!sock.exists());
    }

    #[test]
    fn garbage_and_saves_without_a_device_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sup.sock");
        let sup = Supervisor::bind(&sock).unwrap();
        let c = UnixStream::connect(&sock).unwrap();
        (&c).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(c);
        let err = save(&sock, b"{}", &[]).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(!sup.has_session());
        // Still serving.
        let f = tempfile::tempfile().unwrap();
        save(&sock, b"{}", &[f.as_fd()]).unwrap();
        assert!(sup.has_session());
    }
}
