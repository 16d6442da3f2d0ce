//! vhost-user messages between the VMM and the backend, passed through by nydusd.
//!
//! The VMM's connection is not given to `vhost-user-backend` directly: nydusd holds it
//! and relays every message, with its descriptors, to the backend over a private socket
//! pair, and every answer back. That costs nothing on the data path (requests travel
//! through guest memory and eventfds, not this socket) and buys two things:
//!
//! * the [`SetupLog`]: the messages that set the device up (features, the guest's
//!   memory, the queues' addresses and eventfds), which a successor replays to its own
//!   backend to serve the same queues after this daemon died — QEMU 7.2's
//!   vhost-user-fs never sets a device up twice;
//! * a connection that outlives the daemon: a supervisor holding a copy of the VMM's
//!   socket keeps QEMU from seeing a disconnect, and hands the socket to the successor.
//!
//! A message is a 12-byte header — request (u32), flags (u32), payload size (u32),
//! little-endian — then the payload; its descriptors travel with the header
//! (`SCM_RIGHTS`), as the vhost-user specification says.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Bytes of a message header.
pub const HEADER: usize = 12;
/// Largest payload relayed (the largest the specification defines is a few KiB).
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// Most descriptors one message carries (the specification's is 8).
pub const MAX_MSG_FDS: usize = 16;
/// Most descriptors a [`SetupLog`] keeps; a log that would need more is
/// [`SetupLog::complete`] no longer, and no successor can take it over.
pub const MAX_LOG_FDS: usize = 48;

/// `flags`: an answer.
const FLAG_REPLY: u32 = 0x4;
/// `flags`: the sender asks for an acknowledgement (`REPLY_ACK`).
const FLAG_NEED_REPLY: u32 = 0x8;

/// The requests a successor needs replayed, by number: the ones that set the device
/// up or stop a queue, and the questions the backend wants asked before (they are
/// answered, and the answers dropped).
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Whether a replayed `request` is answered (with acknowledgements not asked for).
fn answered(request: u32) -> bool {
    matches!(
        request,
        req::GET_FEATURES
            | req::GET_VRING_BASE
            | req::GET_PROTOCOL_FEATURES
            | req::GET_QUEUE_NUM
            | req::GET_MAX_MEM_SLOTS
    )
}

/// Whether `request` belongs in the [`SetupLog`].
fn logged(request: u32) -> bool {
    answered(request)
        || matches!(
            request,
            req::SET_FEATURES
                | req::SET_OWNER
                | req::RESET_OWNER
                | req::SET_MEM_TABLE
                | req::SET_VRING_NUM
                | req::SET_VRING_ADDR
                | req::SET_VRING_BASE
                | req::SET_VRING_KICK
                | req::SET_VRING_CALL
                | req::SET_VRING_ERR
                | req::SET_PROTOCOL_FEATURES
                | req::SET_VRING_ENABLE
                | req::ADD_MEM_REG
                | req::REM_MEM_REG
        )
}

/// One vhost-user message: header and payload, and its descriptors.
#[derive(Debug)]
pub struct Message {
    /// Header and payload.
    pub bytes: Vec<u8>,
    /// The descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    /// The request number.
    pub fn request(&self) -> u32 {
        self.u32_at(0)
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER..]
    }

    /// The queue a `SET_VRING_KICK`, `_CALL` or `_ERR` is for (the payload's low byte).
    fn vring_fd_queue(&self) -> Option<u8> {
        matches!(
            self.request(),
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR
        )
        .then(|| self.payload().first().copied())
        .flatten()
    }

    /// The queue and position of a `SET_VRING_BASE`.
    pub fn vring_base(&self) -> Option<(u32, u32)> {
        let p = self.payload();
        (self.request() == req::SET_VRING_BASE && p.len() >= 8).then(|| {
            (
                u32::from_le_bytes(p[..4].try_into().expect("4 bytes")),
                u32::from_le_bytes(p[4..8].try_into().expect("4 bytes")),
            )
        })
    }

    /// A copy, with copies of its descriptors.
    pub fn try_clone(&self) -> io::Result<Message> {
        Ok(Message {
            bytes: self.bytes.clone(),
            fds: self
                .fds
                .iter()
                .map(|f| f.try_clone())
                .collect::<io::Result<_>>()?,
        })
    }
}

/// Reads one message; `None` when the other side closed the connection between
/// messages.
pub fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut head = [0u8; HEADER];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_MSG_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut head)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a vhost-user message with more than {MAX_MSG_FDS} descriptors"),
        ));
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    let mut r = sock;
    r.read_exact(&mut head[got.bytes..])?;
    let size = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a vhost-user message (request {}) with a payload of {size} bytes (at most \
                 {MAX_PAYLOAD})",
                u32::from_le_bytes(head[..4].try_into().expect("4 bytes"))
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(HEADER + size as usize);
    bytes.extend_from_slice(&head);
    bytes.resize(HEADER + size as usize, 0);
    r.read_exact(&mut bytes[HEADER..])?;
    Ok(Some(Message { bytes, fds }))
}

/// Writes one message, its descriptors with the first bytes.
pub fn write_message(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    if fds.len() > MAX_MSG_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one vhost-user message", fds.len()),
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_MSG_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("no room for the descriptors"));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    let mut w = sock;
    w.write_all(&bytes[sent..])
}

/// Relays one message from `from` to `to`; `false` when `from` closed the connection.
/// `seen` sees each message before it goes on (a message logged and not delivered is
/// harmless to replay; one delivered and not logged would be missing).
pub fn relay_one(
    from: &UnixStream,
    to: &UnixStream,
    seen: &mut dyn FnMut(&Message),
) -> io::Result<bool> {
    let Some(msg) = read_message(from)? else {
        return Ok(false);
    };
    seen(&msg);
    let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(|f| f.as_fd()).collect();
    write_message(to, &msg.bytes, &fds)?;
    Ok(true)
}

/// The VMM's messages that set the device up, in order, with copies of their
/// descriptors: what a successor replays to serve the same queues.
#[derive(Debug, Default)]
pub struct SetupLog {
    entries: Vec<Message>,
    /// Set once a message could not be kept: the log no longer describes the device.
    overflowed: bool,
}

impl SetupLog {
    /// A log of `entries`, as a predecessor kept them.
    pub fn from_entries(entries: Vec<Message>) -> SetupLog {
        SetupLog {
            entries,
            overflowed: false,
        }
    }

    /// Keeps `msg` if it sets the device up; `true` when the log changed. A queue's
    /// eventfd takes the place of the one set before for the same queue (QEMU sets the
    /// call fd again whenever the guest masks or unmasks the queue's interrupt), so that
    /// a replay sets it where the queue was first set up, before the queue is enabled;
    /// unless the queue was stopped (`GET_VRING_BASE`) since: then it starts anew.
    pub fn record(&mut self, msg: &Message) -> bool {
        if self.overflowed || !logged(msg.request()) {
            return false;
        }
        let copy = match msg.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "virtio-fs: copying the descriptors of a setup message: {e}; no successor \
                     can take this connection over"
                );
                self.overflowed = true;
                return true;
            }
        };
        // The guest's memory: a new table supersedes every earlier memory message (it
        // takes the first one's place); a region removed takes its addition away.
        let memory = |e: &Message| {
            matches!(
                e.request(),
                req::SET_MEM_TABLE | req::ADD_MEM_REG | req::REM_MEM_REG
            )
        };
        if msg.request() == req::SET_MEM_TABLE {
            if let Some(at) = self.entries.iter().position(memory) {
                self.entries[at] = copy;
                let mut i = 0;
                self.entries.retain(|e| {
                    i += 1;
                    i - 1 == at || !memory(e)
                });
                return true;
            }
        }
        if msg.request() == req::REM_MEM_REG {
            let region = msg.payload().get(8..32);
            if let Some(at) = self
                .entries
                .iter()
                .position(|e| e.request() == req::ADD_MEM_REG && e.payload().get(8..32) == region)
            {
                self.entries.remove(at);
                return true;
            }
        }
        if let Some(queue) = msg.vring_fd_queue() {
            let request = msg.request();
            let same = |e: &Message| e.request() == request && e.vring_fd_queue() == Some(queue);
            if let Some(at) = self.entries.iter().rposition(same) {
                let stopped = self.entries[at..].iter().any(|e| {
                    e.request() == req::GET_VRING_BASE && e.payload().first() == Some(&queue)
                });
                if !stopped {
                    self.entries[at] = copy;
                    return true;
                }
                self.entries.retain(|e| !same(e));
            }
        }
        if self.fds() + copy.fds.len() > MAX_LOG_FDS {
            tracing::warn!(
                "virtio-fs: the device's setup holds more than {MAX_LOG_FDS} descriptors; no \
                 successor can take this connection over"
            );
            self.overflowed = true;
            return true;
        }
        self.entries.push(copy);
        true
    }

    /// Whether the log describes the device (no message was lost).
    pub fn complete(&self) -> bool {
        !self.overflowed
    }

    /// Descriptors held.
    pub fn fds(&self) -> usize {
        self.entries.iter().map(|e| e.fds.len()).sum()
    }

    /// The messages.
    pub fn entries(&self) -> &[Message] {
        &self.entries
    }

    /// The kick eventfd set for each queue, by queue index.
    pub fn kicks(&self) -> Vec<(u8, BorrowedFd<'_>)> {
        self.vring_fds(req::SET_VRING_KICK)
    }

    /// The call eventfd set for each queue, by queue index.
    pub fn calls(&self) -> Vec<(u8, BorrowedFd<'_>)> {
        self.vring_fds(req::SET_VRING_CALL)
    }

    fn vring_fds(&self, request: u32) -> Vec<(u8, BorrowedFd<'_>)> {
        self.entries
            .iter()
            .filter(|e| e.request() == request)
            .filter_map(|e| Some((e.vring_fd_queue()?, e.fds.first()?.as_fd())))
            .collect()
    }

    /// Replays the log to a backend on `sock`: each message sent without asking for
    /// an acknowledgement, the answers to its questions read and dropped.
    pub fn replay(&self, sock: &UnixStream) -> io::Result<()> {
        for e in &self.entries {
            let mut bytes = e.bytes.clone();
            let flags = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
            bytes[4..8].copy_from_slice(&(flags & !FLAG_NEED_REPLY).to_le_bytes());
            let fds: Vec<BorrowedFd<'_>> = e.fds.iter().map(|f| f.as_fd()).collect();
            write_message(sock, &bytes, &fds)?;
            if answered(e.request()) {
                match read_message(sock)? {
                    Some(a) if a.request() == e.request() && a.u32_at(4) & FLAG_REPLY != 0 => {}
                    Some(a) => {
                        return Err(io::Error::other(format!(
                            "replaying request {}: the backend answered request {}",
                            e.request(),
                            a.request()
                        )))
                    }
                    None => {
                        return Err(io::Error::other(format!(
                            "replaying request {}: the backend closed the connection",
                            e.request()
                        )))
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        Message { bytes, fds }
    }

    fn eventfd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn messages_cross_with_their_descriptors_and_oversized_ones_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = eventfd();
        write_message(
            &a,
            &msg(12, 1, &1u64.to_le_bytes(), vec![]).bytes,
            &[fd.as_fd()],
        )
        .unwrap();
        let got = read_message(&b).unwrap().unwrap();
        assert_eq!(
            (got.request(), got.payload()),
            (12, &1u64.to_le_bytes()[..])
        );
        assert_eq!(got.fds.len(), 1);
        let mut huge = msg(5, 1, &[], vec![]).bytes;
        huge[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        write_message(&a, &huge, &[]).unwrap();
        let err = read_message(&b).unwrap_err();
        assert!(err.to_string().contains("payload of 65537 bytes"), "{err}");
        drop(a);
        assert!(read_message(&b).unwrap().is_none());
    }

    #[test]
    fn the_log_keeps_setup_in_order_and_one_eventfd_per_queue() {
        let mut log = SetupLog::default();
        assert!(
            !log.record(&msg(24, 1, &[0; 16], vec![])),
            "GET_CONFIG is not setup"
        );
        assert!(log.record(&msg(req::SET_FEATURES, 1, &[0; 8], vec![])));
        assert!(log.record(&msg(
            req::SET_VRING_CALL,
            1,
            &0u64.to_le_bytes(),
            vec![eventfd()]
        )));
        assert!(log.record(&msg(
            req::SET_VRING_CALL,
            1,
            &1u64.to_le_bytes(),
            vec![eventfd()]
        )));
        assert!(log.record(&msg(
            req::SET_VRING_KICK,
            1,
            &1u64.to_le_bytes(),
            vec![eventfd()]
        )));
        assert!(log.record(&msg(
            req::SET_VRING_CALL,
            1,
            &0u64.to_le_bytes(),
            vec![eventfd()]
        )));
        let order: Vec<(u32, Option<u8>)> = log
            .entries()
            .iter()
            .map(|e| (e.request(), e.vring_fd_queue()))
            .collect();
        assert_eq!(
            order,
            [
                (req::SET_FEATURES, None),
                (req::SET_VRING_CALL, Some(0)),
                (req::SET_VRING_CALL, Some(1)),
                (req::SET_VRING_KICK, Some(1)),
            ]
        );
        assert_eq!(log.fds(), 3);
        assert_eq!(log.kicks().len(), 1);
        // Queue 1 stopped and set up again: its new eventfds come after the stop.
        assert!(log.record(&msg(req::GET_VRING_BASE, 1, &1u64.to_le_bytes(), vec![])));
        assert!(log.record(&msg(
            req::SET_VRING_KICK,
            1,
            &1u64.to_le_bytes(),
            vec![eventfd()]
        )));
        let order: Vec<u32> = log.entries().iter().map(|e| e.request()).collect();
        assert_eq!(
            order,
            [
                req::SET_FEATURES,
                req::SET_VRING_CALL,
                req::SET_VRING_CALL,
                req::GET_VRING_BASE,
                req::SET_VRING_KICK
            ]
        );
        // Memory: a new table replaces the old ones; a removed region its addition.
        let region = |gpa: u8| {
            let mut p = vec![0u8; 40];
            p[8] = gpa;
            p
        };
        assert!(log.record(&msg(req::SET_MEM_TABLE, 1, &[0; 40], vec![eventfd()])));
        assert!(log.record(&msg(req::ADD_MEM_REG, 1, &region(1), vec![eventfd()])));
        assert!(log.record(&msg(req::ADD_MEM_REG, 1, &region(2), vec![eventfd()])));
        assert!(log.record(&msg(req::REM_MEM_REG, 1, &region(1), vec![])));
        let adds = |log: &SetupLog| {
            log.entries()
                .iter()
                .filter(|e| e.request() == req::ADD_MEM_REG)
                .count()
        };
        assert_eq!(adds(&log), 1);
        let at = log
            .entries()
            .iter()
            .position(|e| e.request() == req::SET_MEM_TABLE);
        assert!(log.record(&msg(req::SET_MEM_TABLE, 1, &[1; 40], vec![eventfd()])));
        assert_eq!(adds(&log), 0);
        assert_eq!(
            log.entries()
                .iter()
                .position(|e| e.request() == req::SET_MEM_TABLE),
            at
        );
        assert_eq!(
            log.entries()
                .iter()
                .filter(|e| e.request() == req::SET_MEM_TABLE)
                .count(),
            1
        );
        // More descriptors than a hand-over carries: the log says it is incomplete.
        for _ in 0..MAX_LOG_FDS {
            log.record(&msg(req::ADD_MEM_REG, 1, &[0; 40], vec![eventfd()]));
        }
        assert!(!log.complete());
    }

    #[test]
    fn replay_drops_acknowledgements_and_reads_the_answers_to_questions() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut log = SetupLog::default();
        log.record(&msg(req::GET_FEATURES, 1 | FLAG_NEED_REPLY, &[], vec![]));
        log.record(&msg(req::SET_OWNER, 1 | FLAG_NEED_REPLY, &[], vec![]));
        let backend = std::thread::spawn(move || {
            let q = read_message(&theirs).unwrap().unwrap();
            assert_eq!(q.request(), req::GET_FEATURES);
            write_message(
                &theirs,
                &msg(req::GET_FEATURES, 1 | FLAG_REPLY, &[0; 8], vec![]).bytes,
                &[],
            )
            .unwrap();
            let s = read_message(&theirs).unwrap().unwrap();
            assert_eq!(s.request(), req::SET_OWNER);
            assert_eq!(
                s.u32_at(4) & FLAG_NEED_REPLY,
                0,
                "an acknowledgement was asked for"
            );
        });
        log.replay(&ours).unwrap();
        backend.join().unwrap();
    }
}
