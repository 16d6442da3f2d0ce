//! Uploading a blob while it is still being written.
//!
//! A converter writes each blob to a file and knows its digest only at the end, after
//! the source it came from has been verified. Waiting for that end before uploading
//! leaves the network idle while the CPU converts, then the CPU idle while the blob
//! goes out. [`Registry::push_growing_file`] instead opens an upload session as soon as
//! the file holds a first piece and streams the file, as it grows, as the body of one
//! `PATCH` (what containerd's pusher does); it commits the session (`PUT ?digest=`)
//! only when the writer declares the blob complete: a blob whose writer gives up is
//! never committed, so nothing appears in the registry. One streamed request costs the
//! registry less than a series of `Content-Range` chunks (oci-client sends 4 MiB ones),
//! each of which saves and restores the upload's hash state; a registry that refuses it
//! gets the chunks.

use super::{Registry, RegistryClient, Result};
use bytes::Bytes;
use oci_client::errors::OciDistributionError;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A session is opened once the blob file holds this much; smaller blobs are uploaded
/// whole once complete.
pub const UPLOAD_PIECE: u64 = 4 << 20;

/// Waits, blocking, until the blob behind `progress` is complete (its digest and size)
/// or abandoned (`None`); for targets that can only store whole files.
pub fn wait_complete(progress: watch::Receiver<BlobProgress>) -> Option<(String, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread().build().ok()?;
    rt.block_on(completion(progress))
}

/// The digest and size of the blob behind `progress` once complete; `None` when its
/// writer abandons it.
async fn completion(mut progress: watch::Receiver<BlobProgress>) -> Option<(String, u64)> {
    match progress
        .wait_for(|p| matches!(p, BlobProgress::Complete { .. }))
        .await
        .ok()?
        .clone()
    {
        BlobProgress::Complete { digest, size } => Some((digest, size)),
        BlobProgress::Writing(_) => None,
    }
}

/// What the upload stream reads: the file, in order, as its writer reports progress.
struct Feed {
    file: std::fs::File,
    at: u64,
    progress: watch::Receiver<BlobProgress>,
    /// Set when the writer gave up.
    abandoned: Arc<AtomicBool>,
}

impl Feed {
    /// The next piece of the file, waiting for the writer as needed; `None` at the end
    /// of a complete blob; an error when the writer abandons it.
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            let now = self.progress.borrow_and_update().clone();
            let (written, complete) = match &now {
                BlobProgress::Writing(n) => (*n, false),
                BlobProgress::Complete { size, .. } => (*size, true),
            };
            let ready = written.saturating_sub(self.at);
            if ready >= FEED_PIECE || (complete && ready > 0) {
                let len = ready.min(FEED_PIECE);
                // A page-cache read of what was just written: short enough to do on
                // the runtime's thread. The file is read in order, at its own cursor
                // (into spare capacity: nothing is zeroed first).
                let mut buf = Vec::with_capacity(len as usize);
                match (&mut self.file).take(len).read_to_end(&mut buf) {
                    Ok(n) if n as u64 == len => {}
                    Ok(n) => {
                        return Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the blob file ends at {} bytes", self.at + n as u64),
                        )))
                    }
                    Err(e) => return Some(Err(e)),
                }
                self.at += len;
                return Some(Ok(Bytes::from(buf)));
            }
            if complete {
                return None;
            }
            if self.progress.changed().await.is_err() {
                self.abandoned.store(true, Ordering::Relaxed);
                return Some(Err(io::Error::other(
                    "the blob was abandoned by its writer",
                )));
            }
        }
    }
}

/// The pieces a streamed upload body is made of (sent as they are written).
const FEED_PIECE: u64 = 1 << 20;

/// How one streamed upload attempt ended.
enum Streamed {
    Done(GrowingPush),
    /// The registry refused a streamed `PATCH` (status given): upload in chunks.
    Refused(u16),
}

fn status_error(code: u16, url: &str, what: &str) -> OciDistributionError {
    OciDistributionError::ServerError {
        code,
        url: url.to_string(),
        message: what.to_string(),
    }
}

impl Registry {
    /// See [`RegistryClient::push_growing_file`].
    pub fn push_growing_file(
        &self,
        path: &Path,
        name: &str,
        progress: watch::Receiver<BlobProgress>,
    ) -> Result<GrowingPush> {
        self.block(self.client.push_growing_file(path, name, progress))
    }
}

impl RegistryClient {
    /// Uploads the blob being written to `path` while it is written, as `progress`
    /// reports; commits it only once `progress` says it is complete (and the registry
    /// does not have it yet). Transient failures restart the upload from the file's
    /// start. See the module documentation.
    ///
    /// The upload is one `PATCH` whose body streams the file as it grows (as
    /// containerd pushes), then a `PUT ?digest=` that commits it. A registry that
    /// refuses the streamed `PATCH` gets the blob in `Content-Range` chunks instead,
    /// once it is complete.
    ///
    /// `name` says which blob this is in messages (say, "the blob of layer sha256:…").
    pub async fn push_growing_file(
        &self,
        path: &Path,
        name: &str,
        progress: watch::Receiver<BlobProgress>,
    ) -> Result<GrowingPush> {
        let mut first = progress.clone();
        let first = first
            .wait_for(|p| match p {
                BlobProgress::Writing(n) => *n >= UPLOAD_PIECE,
                BlobProgress::Complete { .. } => true,
            })
            .await
            .map(|p| p.clone());
        match first {
            // Abandoned before a first piece: no session was opened.
            Err(_) => return Ok(GrowingPush::Abandoned),
            // Small blobs complete before a first piece: an ordinary upload.
            Ok(BlobProgress::Complete { digest, .. }) => {
                return self.push_complete(&digest, path).await
            }
            Ok(BlobProgress::Writing(_)) => {}
        }
        let what = format!("Uploading {name} to {} while it is written", self.repo());
        let abandoned = Arc::new(AtomicBool::new(false));
        // `stream_once` takes the push credentials `pushing` negotiated (again, after a
        // 401), and starts over from the file's start on every attempt.
        let what = &what;
        let abandoned = &abandoned;
        let progress = &progress;
        let streamed = self
            .pushing(|_| async move {
                self.retry_streamed(what, || {
                    let feed = std::fs::File::open(path).map(|file| Feed {
                        file,
                        at: 0,
                        progress: progress.clone(),
                        abandoned: abandoned.clone(),
                    });
                    let abandoned = abandoned.load(Ordering::Relaxed);
                    async move {
                        // A blob its writer gave up is not tried again (in a new session).
                        if abandoned {
                            return Err(OciDistributionError::GenericError(Some(
                                "the blob was abandoned by its writer".into(),
                            )));
                        }
                        self.stream_once(feed?).await
                    }
                })
                .await
            })
            .await;
        if abandoned.load(Ordering::Relaxed) {
            return Ok(GrowingPush::Abandoned);
        }
        match streamed? {
            Streamed::Done(outcome) => Ok(outcome),
            Streamed::Refused(code) => {
                tracing::info!("{what}: streamed upload refused ({code}); uploading in chunks");
                match completion(progress.clone()).await {
                    Some((digest, _)) => self.push_complete(&digest, path).await,
                    None => Ok(GrowingPush::Abandoned),
                }
            }
        }
    }

    /// The ordinary upload of a complete blob file (`HEAD` first).
    async fn push_complete(&self, digest: &str, path: &Path) -> Result<GrowingPush> {
        Ok(if self.push_blob_file(digest, path).await? {
            GrowingPush::Uploaded(digest.to_string())
        } else {
            GrowingPush::Existed(digest.to_string())
        })
    }

    /// One attempt: `POST` a session, stream the file in one `PATCH`, `HEAD` the digest
    /// (now known), `PUT` the commit unless the registry has the blob.
    async fn stream_once(&self, feed: Feed) -> std::result::Result<Streamed, OciDistributionError> {
        let http = self.http.get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .read_timeout(self.timeout)
                .build()
                .unwrap_or_default()
        });
        let auth = self
            .push_authorization
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let with_auth = |r: reqwest::RequestBuilder| match &auth {
            Some(a) => r.header(http::header::AUTHORIZATION, a.as_str()),
            None => r,
        };
        let location = |res: &reqwest::Response| -> Option<String> {
            let l = res.headers().get(http::header::LOCATION)?.to_str().ok()?;
            Some(if l.starts_with("http://") || l.starts_with("https://") {
                l.to_string()
            } else {
                format!("{}{l}", self.base_url)
            })
        };
        let repo = self.reference.repository();
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base_url);
        let res = with_auth(http.post(&url)).send().await?;
        let code = res.status().as_u16();
        if code != 202 {
            return Err(status_error(code, &url, "opening an upload session"));
        }
        let session = location(&res)
            .ok_or_else(|| status_error(code, &url, "the upload session has no Location"))?;
        let progress = feed.progress.clone();
        let stream = futures_util::stream::unfold(feed, |mut f| async move {
            f.next().await.map(|item| (item, f))
        });
        let res = with_auth(http.patch(&session))
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await?;
        let code = res.status().as_u16();
        match code {
            202 | 204 => {}
            400 | 405 | 411 | 416 | 501 => return Ok(Streamed::Refused(code)),
            _ => return Err(status_error(code, &session, "streaming the blob")),
        }
        let session = location(&res).unwrap_or(session);
        let BlobProgress::Complete { digest, .. } = progress.borrow().clone() else {
            return Err(OciDistributionError::GenericError(Some(
                "the upload ended before the blob was complete".into(),
            )));
        };
        let blob = format!("{}/v2/{repo}/blobs/{digest}", self.base_url);
        if with_auth(http.head(&blob))
            .send()
            .await?
            .status()
            .is_success()
        {
            // Not committed twice; the open session is dropped.
            let _ = with_auth(http.delete(&session)).send().await;
            return Ok(Streamed::Done(GrowingPush::Existed(digest)));
        }
        let sep = if session.contains('?') { '&' } else { '?' };
        let commit = format!("{session}{sep}digest={digest}");
        let res = with_auth(http.put(&commit))
            .header(http::header::CONTENT_LENGTH, "0")
            .send()
            .await?;
        let code = res.status().as_u16();
        if code != 201 {
            return Err(status_error(code, &session, "committing the blob"));
        }
        Ok(Streamed::Done(GrowingPush::Uploaded(digest)))
    }
}
