//! Piece transfer over Dragonfly's Vortex protocol on TCP (`vortex-protocol`): a child
//! sends `DownloadPiece{task id, piece number}`, the parent answers `PieceContent` (the
//! piece's metadata, its digest `crc32:<decimal>` among it) followed by the piece's raw
//! bytes, or `Error`. dfdaemons fetch from our peers and ours from them this way.
//!
//! A connection carries one request after another until either side closes it.

use super::storage::Storage;
use bytes::BytesMut;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vortex_protocol::tlv::download_piece::DownloadPiece;
use vortex_protocol::tlv::error::{Code, Error as VortexError};
use vortex_protocol::tlv::piece_content::PieceContent;
use vortex_protocol::tlv::piece_metadata::PieceMetadata;
use vortex_protocol::{Header, Message, Vortex, HEADER_SIZE};

/// Largest packet value taken (a request is 68 bytes; metadata well under this).
const MAX_VALUE: u32 = 64 << 10;
/// Bytes sent at a time when serving a piece (the upload rate limit takes them so).
const SLICE: usize = 1 << 20;
/// How long a piece's sending waits for room in a full socket buffer before it tries
/// again (see [`send_file`]).
const SEND_ROOM_WAIT: Duration = Duration::from_millis(5);
/// How long a piece's sending waits for a child that takes nothing (as long as a child
/// waits for a piece).
const SEND_STALL: Duration = Duration::from_secs(30);
/// Bytes of a fetched piece read (and hashed) at a time.
const HASH_STEP: usize = 256 << 10;
/// How long a connection may stay silent.
const IDLE: Duration = Duration::from_secs(60);

/// Counts the piece bytes served, by task.
pub type ServedCounter = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// The upload rate limit (`upload.rateLimit`): a token bucket of `rate` bytes per
/// second with bursts of one second, shared by every child. A slice larger than the
/// bucket goes out and the bucket's debt is waited off after it.
pub struct RateLimit {
    rate: f64,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimit {
    /// `rate` bytes per second.
    pub fn new(rate: u64) -> RateLimit {
        RateLimit {
            rate: rate as f64,
            state: tokio::sync::Mutex::new((rate as f64, tokio::time::Instant::now())),
        }
    }

    /// Waits until `n` more bytes may go out.
    pub async fn take(&self, n: u64) {
        let wait = {
            let mut s = self.state.lock().await;
            let now = tokio::time::Instant::now();
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.rate);
            s.1 = now;
            let before = if s.0 < 0.0 { -s.0 / self.rate } else { 0.0 };
            s.0 -= n as f64;
            before
        };
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// What the Vortex server shares: the storage, the host id it names itself by, the
/// counters, and the upload rate limit.
pub struct Server {
    /// The pieces.
    pub storage: Arc<Storage>,
    /// This peer's host id.
    pub host_id: String,
    /// Counts the bytes served.
    pub served: ServedCounter,
    /// The upload rate limit, if any.
    pub limit: Option<Arc<RateLimit>>,
    /// Children connected now.
    pub children: Arc<std::sync::atomic::AtomicI64>,
    /// Whether a download of this task runs here: a piece it lacks is then waited for
    /// (and fetched ahead of the others) rather than refused.
    pub running: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// How long a request for a piece a running download lacks waits for it.
const AHEAD_WAIT: Duration = Duration::from_secs(20);

/// Reads one packet's header and value.
async fn read_packet(sock: &mut TcpStream) -> std::io::Result<Option<Vortex>> {
    let mut head = [0u8; HEADER_SIZE];
    match tokio::time::timeout(IDLE, sock.read_exact(&mut head)).await {
        Err(_) => return Ok(None),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(r) => r?,
    };
    let header = Header::decode(&head).map_err(std::io::Error::other)?;
    if header.length() > MAX_VALUE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a Vortex packet of {} bytes", header.length()),
        ));
    }
    let mut buf = vec![0u8; HEADER_SIZE + header.length() as usize];
    buf[..HEADER_SIZE].copy_from_slice(&head);
    sock.read_exact(&mut buf[HEADER_SIZE..]).await?;
    Vortex::decode(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

async fn send_error(sock: &mut TcpStream, code: Code, message: String) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    VortexError::new(code, message).encode_packet(&mut buf);
    sock.write_all(&buf).await
}

/// Serves pieces on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    loop {
        let Ok((mut sock, peer)) = listener.accept().await else {
            // Out of descriptors, say: not a busy loop.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            server
                .children
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = serve_conn(&mut sock, &server).await {
                tracing::debug!("vortex: {peer}: {e}");
            }
            server
                .children
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

async fn serve_conn(sock: &mut TcpStream, server: &Server) -> std::io::Result<()> {
    let (storage, host_id) = (&server.storage, server.host_id.as_str());
    while let Some(packet) = read_packet(sock).await? {
        let req = match packet {
            Vortex::DownloadPiece(_, req) => req,
            Vortex::Close(_) => return Ok(()),
            other => {
                let tag = other.header().tag();
                send_error(
                    sock,
                    Code::InvalidArgument,
                    format!("unsupported packet {tag:?}"),
                )
                .await?;
                continue;
            }
        };
        let task_id = req.task_id.clone();
        let number = req.piece_number;
        // Only pieces verified against a digest their sender did not give go out.
        let piece = match storage.get(&task_id) {
            Some(t) => match t.piece(number).filter(|p| p.verified) {
                Some(p) => Some((t, p)),
                // Asked for a piece it has not offered (a child of ours with a reader
                // waiting on it): a running download fetches it next.
                None if number < t.piece_count() && (server.running)(&task_id) => {
                    ahead(&t, number, || (server.running)(&task_id))
                        .await
                        .map(|p| (t, p))
                }
                None => None,
            },
            None => None,
        };
        let Some((task, meta)) = piece else {
            send_error(
                sock,
                Code::NotFound,
                format!("piece {number} of task {task_id} is not here"),
            )
            .await?;
            continue;
        };
        let content = PieceContent {
            metadata: PieceMetadata {
                number,
                offset: meta.offset,
                length: meta.length,
                digest: meta.crc_digest(),
                parent_id: host_id.to_string(),
                traffic_type: dragonfly_api::common::v2::TrafficType::RemotePeer as u8,
                cost: Duration::ZERO,
                created_at: chrono::Utc::now().naive_utc(),
            },
        };
        // The whole piece is asked of the disk at once (the slices below wait on one
        // read-ahead, not on one disk read each when the page cache lacks it), and the
        // next one too: children mostly ask for pieces in order, and its disk read
        // then overlaps this piece's transfer.
        let _ = nix::fcntl::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(task.file()),
            meta.offset as i64,
            (2 * meta.length) as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
        let mut buf = BytesMut::with_capacity(HEADER_SIZE + content.encoded_len());
        content.encode_packet(&mut buf);
        sock.write_all(&buf).await?;
        // The bytes go from the page cache to the socket (`sendfile`), a slice at a
        // time for the upload rate limit: they are never copied through this process
        // (on two cores, copies are what a read through the swarm runs short of).
        let mut at = 0u64;
        while at < meta.length {
            let n = (meta.length - at).min(SLICE as u64);
            if let Some(limit) = &server.limit {
                limit.take(n).await;
            }
            send_file(sock, &task, meta.offset + at, n).await?;
            at += n;
        }
        (server.served)(&task_id, meta.length);
    }
    Ok(())
}

/// Sends `len` bytes of `task`'s file from `offset` on `sock` with `sendfile(2)`, on a
/// blocking thread (a page the cache lacks waits on the disk there, not on a thread that
/// serves requests), waiting for room in the socket's buffer as a write would.
async fn send_file(
    sock: &TcpStream,
    task: &Arc<super::storage::TaskData>,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut at = offset as nix::libc::off_t;
    let end = (offset + len) as nix::libc::off_t;
    let mut progress = tokio::time::Instant::now();
    while at < end {
        // The thread sends on its own descriptor of the socket: should this future be
        // dropped meanwhile, it never writes to a number reused by something else.
        let (out, t) = (sock.as_fd().try_clone_to_owned()?, task.clone());
        let (after, sent) = tokio::task::spawn_blocking(move || {
            let mut at = at;
            loop {
                let left = (end - at) as usize;
                match nix::sys::sendfile::sendfile(
                    out.as_raw_fd(),
                    t.file().as_raw_fd(),
                    Some(&mut at),
                    left,
                ) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    r => return (at, r),
                }
            }
        })
        .await
        .map_err(std::io::Error::other)?;
        at = after;
        match sent {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the task's file ends before the piece does",
                ))
            }
            Ok(_) => progress = tokio::time::Instant::now(),
            // A child that stopped reading is given up on.
            Err(nix::errno::Errno::EAGAIN) if progress.elapsed() > SEND_STALL => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the child took nothing for {SEND_STALL:?}"),
                ))
            }
            // The socket's buffer is full: tokio is told (so that `writable` waits for
            // room), and as that may swallow room made meanwhile, the wait is short and
            // the only one (a `writable` without a bound could then wait for ever).
            Err(nix::errno::Errno::EAGAIN) => {
                let _ = sock.try_io(tokio::io::Interest::WRITABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
                let _ = tokio::time::timeout(SEND_ROOM_WAIT, sock.writable()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits (at most [`AHEAD_WAIT`], and while `running` says the download runs) for piece
/// `number` of `t`, marked as waited on so that the download running here fetches it
/// before the pieces nobody waits on.
async fn ahead(
    t: &Arc<super::storage::TaskData>,
    number: u32,
    running: impl Fn() -> bool,
) -> Option<super::storage::PieceMeta> {
    let _want = t.want_verified(number);
    let mut changes = t.subscribe();
    let deadline = tokio::time::Instant::now() + AHEAD_WAIT;
    loop {
        changes.borrow_and_update();
        if let Some(p) = t.piece(number).filter(|p| p.verified) {
            return Some(p);
        }
        if !running() {
            return None;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
}

/// Whether `e`, an error of [`fetch`], is the parent refusing or not answering (not
/// found, no answer in time, no connection) rather than sending something wrong.
pub fn is_refusal(e: &str) -> bool {
    e.contains("NotFound") || e.contains("no answer within") || e.contains("connecting:")
}

/// A piece fetched from a parent: its metadata as the parent sent it, and its bytes.
pub struct Fetched {
    /// The parent's metadata.
    pub metadata: PieceMetadata,
    /// The bytes (hand them back to [`super::buffers::PIECES`] when done).
    pub data: Vec<u8>,
    /// Their CRC-32, checked against the parent's digest.
    pub crc32: u32,
    /// Their SHA-256, hex (for the caller to check against our seeds' digest); empty
    /// when not asked for.
    pub sha256: String,
}

/// Fetches piece `number` of `task_id` from the parent at `addr` (`ip:port`), within
/// `timeout`; the bytes' CRC-32 is checked against the parent's digest, and their
/// SHA-256 computed if `sha256`.
pub async fn fetch(
    addr: &str,
    task_id: &str,
    (number, max_len): (u32, u64),
    timeout: Duration,
    sha256: bool,
) -> Result<Fetched, String> {
    tokio::time::timeout(timeout, fetch_inner(addr, task_id, number, max_len, sha256))
        .await
        .map_err(|_| format!("piece {number} from {addr}: no answer within {timeout:?}"))?
}

async fn fetch_inner(
    addr: &str,
    task_id: &str,
    number: u32,
    max_len: u64,
    sha256: bool,
) -> Result<Fetched, String> {
    let what = |e: String| format!("piece {number} from {addr}: {e}");
    let mut sock = TcpStream::connect(addr)
        .await
        .map_err(|e| what(format!("connecting: {e}")))?;
    let _ = sock.set_nodelay(true);
    let mut buf = BytesMut::new();
    DownloadPiece::new(task_id.to_string(), number).encode_packet(&mut buf);
    sock.write_all(&buf)
        .await
        .map_err(|e| what(format!("sending: {e}")))?;
    let packet = read_packet(&mut sock)
        .await
        .map_err(|e| what(e.to_string()))?
        .ok_or_else(|| what("the parent closed the connection".into()))?;
    let metadata = match packet {
        Vortex::PieceContent(_, c) => c.metadata,
        Vortex::Error(_, e) => return Err(what(format!("{:?}: {}", e.code, e.message))),
        other => {
            return Err(what(format!(
                "unexpected packet {:?}",
                other.header().tag()
            )))
        }
    };
    if metadata.number != number || metadata.length > max_len {
        return Err(what(format!(
            "the parent sent piece {} of {} bytes",
            metadata.number, metadata.length
        )));
    }
    // The bytes are hashed as they arrive, a little at a time: when the last one is in,
    // the piece is checked (a piece fetched one after another, as while a local reader
    // reads, no longer waits on its hashing after its transfer).
    let len = metadata.length as usize;
    let mut data = super::buffers::PIECES.take(len);
    match read_hashed(&mut sock, &mut data, &metadata.digest, sha256).await {
        Ok((crc32, sha256)) => Ok(Fetched {
            metadata,
            data,
            crc32,
            sha256,
        }),
        Err(e) => {
            super::buffers::PIECES.give(data);
            Err(what(e))
        }
    }
}

/// Reads `data.len()` bytes into `data`, hashing them as they come; their CRC-32 and
/// SHA-256 (hex; empty unless `sha256`), once the CRC-32 matched the parent's `digest`
/// (`crc32:<decimal>`).
async fn read_hashed(
    sock: &mut TcpStream,
    data: &mut [u8],
    digest: &str,
    sha256: bool,
) -> Result<(u32, String), String> {
    let len = data.len();
    let (mut crc, mut sha) = (crc32fast::Hasher::new(), sha256.then(Sha256::new));
    let mut at = 0;
    while at < len {
        let end = (at + HASH_STEP).min(len);
        let n = match sock.read(&mut data[at..end]).await {
            Ok(0) => {
                return Err(format!(
                    "reading the bytes: the parent closed the connection after {at} of {len}"
                ))
            }
            Ok(n) => n,
            Err(e) => return Err(format!("reading the bytes: {e}")),
        };
        crc.update(&data[at..at + n]);
        if let Some(sha) = sha.as_mut() {
            sha.update(&data[at..at + n]);
        }
        at += n;
    }
    // The parent's CRC-32 is required (dfdaemon always sends one).
    let got = crc.finalize();
    let said = digest
        .strip_prefix("crc32:")
        .and_then(|c| c.parse::<u32>().ok());
    if said != Some(got) {
        return Err(format!(
            "bytes with CRC-32 {got}, the parent's digest says {digest:?}"
        ));
    }
    Ok((
        got,
        sha.map(|s| hex::encode(s.finalize())).unwrap_or_default(),
    ))
}
