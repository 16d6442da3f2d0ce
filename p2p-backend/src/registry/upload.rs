//! Uploading a blob while it is still being written.
//!
//! A converter writes each blob to a file and knows its digest only at the end, after
//! the source it came from has been verified. Waiting for that end before uploading
//! leaves the network idle while the CPU converts, then the CPU idle while the blob
//! goes out. [`Registry::push_growing_file`] instead opens a chunked upload session
//! as soon as the file holds a first piece, sends each piece (one `PATCH`) as it is
//! written, and commits the session (`PUT ?digest=`) only when the writer declares the
//! blob complete: a blob whose writer gives up is never committed, so nothing appears
//! in the registry.

use super::{Registry, RegistryError, Result};
use bytes::Bytes;
use oci_client::errors::OciDistributionError;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// How far the writer of a blob file has come; sent through a [`watch`] channel.
/// Dropping the sender without sending [`BlobProgress::Complete`] abandons the blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobProgress {
    /// The file holds this many bytes of the blob so far.
    Writing(u64),
    /// The file is complete: `size` bytes whose sha256 is `digest` (`sha256:<hex>`).
    Complete {
        /// The blob's digest.
        digest: String,
        /// The blob's size in bytes.
        size: u64,
    },
}

/// How [`Registry::push_growing_file`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrowingPush {
    /// The blob was uploaded under this digest.
    Uploaded(String),
    /// The registry had the blob already; nothing was committed.
    Existed(String),
    /// The writer gave up (or the blob is not wanted): nothing was committed.
    Abandoned,
}

/// The size of each `PATCH` (oci-client's largest chunk): a session is opened once the
/// file holds this much, and a piece is sent whenever this much more is written.
pub const UPLOAD_PIECE: u64 = 4 << 20;

/// Waits, blocking, until the blob behind `progress` is complete (its digest and size)
/// or abandoned (`None`); for targets that can only store whole files.
pub fn wait_complete(mut progress: watch::Receiver<BlobProgress>) -> Option<(String, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread().build().ok()?;
    rt.block_on(async {
        match progress
            .wait_for(|p| matches!(p, BlobProgress::Complete { .. }))
            .await
            .ok()?
            .clone()
        {
            BlobProgress::Complete { digest, size } => Some((digest, size)),
            BlobProgress::Writing(_) => None,
        }
    })
}

/// Why the stream of a growing file stopped short.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stopped {
    No,
    Abandoned,
    Existed,
}

/// What the upload stream reads and reports.
struct Feed {
    file: std::fs::File,
    at: u64,
    progress: watch::Receiver<BlobProgress>,
    client: oci_client::Client,
    reference: oci_client::Reference,
    stopped: Arc<std::sync::Mutex<Stopped>>,
}

fn generic(msg: &str) -> OciDistributionError {
    OciDistributionError::GenericError(Some(msg.to_string()))
}

impl Feed {
    /// The next piece of the file, waiting for the writer as needed; `None` at the
    /// end of a complete blob the registry does not have yet.
    async fn next(&mut self) -> Option<std::result::Result<Bytes, OciDistributionError>> {
        loop {
            let now = self.progress.borrow_and_update().clone();
            let (written, complete) = match &now {
                BlobProgress::Writing(n) => (*n, None),
                BlobProgress::Complete { digest, size } => (*size, Some(digest.clone())),
            };
            let ready = written.saturating_sub(self.at);
            if ready >= UPLOAD_PIECE || (complete.is_some() && ready > 0) {
                let len = ready.min(UPLOAD_PIECE);
                // A page-cache read of what was just written: short enough to do on
                // the runtime's thread. The file is read in order, at its own cursor
                // (into spare capacity: nothing is zeroed first).
                let mut buf = Vec::with_capacity(len as usize);
                match (&mut self.file).take(len).read_to_end(&mut buf) {
                    Ok(n) if n as u64 == len => {}
                    Ok(n) => {
                        return Some(Err(OciDistributionError::IoError(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the blob file ends at {} bytes", self.at + n as u64),
                        ))))
                    }
                    Err(e) => return Some(Err(OciDistributionError::IoError(e))),
                }
                self.at += len;
                return Some(Ok(Bytes::from(buf)));
            }
            if let Some(digest) = complete {
                // Checked before committing (the digest was not known when the
                // session opened): an existing blob is not committed twice.
                return match self.client.blob_exists(&self.reference, &digest).await {
                    Ok(true) => {
                        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Stopped::Existed;
                        Some(Err(generic("the registry has the blob already")))
                    }
                    _ => None,
                };
            }
            if self.progress.changed().await.is_err() {
                *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Stopped::Abandoned;
                return Some(Err(generic("the blob was abandoned by its writer")));
            }
        }
    }
}

impl Registry {
    /// Uploads the blob being written to `path` while it is written, as `progress`
    /// reports; commits it only once `progress` says it is complete (and the registry
    /// does not have it yet). Transient failures restart the upload from the file's
    /// start. See the module documentation.
    pub fn push_growing_file(
        &self,
        path: &Path,
        progress: watch::Receiver<BlobProgress>,
    ) -> Result<GrowingPush> {
        let mut first = progress.clone();
        let first = self.rt.block_on(async {
            first
                .wait_for(|p| match p {
                    BlobProgress::Writing(n) => *n >= UPLOAD_PIECE,
                    BlobProgress::Complete { .. } => true,
                })
                .await
                .map(|p| p.clone())
        });
        match first {
            // Abandoned before a first piece: no session was opened.
            Err(_) => return Ok(GrowingPush::Abandoned),
            // Small blobs complete before a first piece: an ordinary upload.
            Ok(BlobProgress::Complete { digest, .. }) => {
                return Ok(if self.push_blob_file(&digest, path)? {
                    GrowingPush::Uploaded(digest)
                } else {
                    GrowingPush::Existed(digest)
                });
            }
            Ok(BlobProgress::Writing(_)) => {}
        }
        let what = format!(
            "Uploading blob {} to {} while it is written",
            path.display(),
            self.repo()
        );
        let client = self.push_client()?;
        let stopped = Arc::new(std::sync::Mutex::new(Stopped::No));
        let pushed = self.retry(&what, || {
            let file = std::fs::File::open(path);
            let feed = file.map(|file| Feed {
                file,
                at: 0,
                progress: progress.clone(),
                client: client.clone(),
                reference: self.reference.clone(),
                stopped: stopped.clone(),
            });
            async move {
                let feed = feed?;
                let stream = futures_util::stream::unfold(feed, |mut f| async move {
                    f.next().await.map(|item| (item, f))
                });
                client
                    .push_blob_stream_chunked(&self.reference, stream)
                    .await
            }
        });
        let stopped = *stopped.lock().unwrap_or_else(|p| p.into_inner());
        let complete = match progress.borrow().clone() {
            BlobProgress::Complete { digest, .. } => Some(digest),
            BlobProgress::Writing(_) => None,
        };
        match (pushed, stopped, complete) {
            (_, Stopped::Abandoned, _) => Ok(GrowingPush::Abandoned),
            (_, Stopped::Existed, Some(d)) => Ok(GrowingPush::Existed(d)),
            (Ok(r), _, Some(d)) if r.blob_digest == d => Ok(GrowingPush::Uploaded(d)),
            (Ok(r), _, d) => Err(RegistryError::DigestMismatch {
                digest: d.unwrap_or_default(),
                actual: format!("{} ({} bytes uploaded)", r.blob_digest, r.size),
            }),
            (Err(e), _, _) => Err(e),
        }
    }
}
