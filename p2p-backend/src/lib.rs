//! All network (and network-like) access to blobs.
//!
//! * [`BlobBackend`]: the one interface nydusd reads chunks through — ranged reads by blob
//!   id. Implementations: [`localfs::LocalFs`] (a directory of blobs named by id); the
//!   registry backend ([`registry::RegistryBackend`]) and the p2p backend implement the
//!   same trait.
//! * [`registry::Registry`]: the OCI registry client (pull, push, ranged reads, auth).
//! * [`scheduler`]: `p2p-scheduler`, Dragonfly's `scheduler.v2` for real dfdaemons and
//!   our peers.
//! * [`peer`]: `p2p-peer`, our node agent in the swarm (in place of dfdaemon).
//!
//! Backends return raw stored bytes; verifying chunk digests is the caller's job (the
//! bootstrap is the root of trust), so a backend never needs to know the format.
#![forbid(unsafe_code)]

pub mod localfs;
pub mod peer;
pub mod registry;
pub mod scheduler;

use std::io;

/// Errors of blob backends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The blob does not exist in this backend.
    #[error("Blob {0} not found")]
    NotFound(String),
    /// The requested range lies outside the blob.
    #[error("Range {offset}+{len} is outside blob {blob_id} of {size} bytes")]
    OutOfRange {
        /// Blob id.
        blob_id: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Blob size.
        size: u64,
    },
    /// Local I/O failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A remote request failed (after retries, where the backend retries).
    #[error("{what}: {reason}")]
    Remote {
        /// What was being requested.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A remote request got no answer in time (after retries, where the backend
    /// retries): the remote is up but does not answer, or the network drops packets.
    #[error("{what}: no answer in time: {reason}")]
    TimedOut {
        /// What was being requested.
        what: String,
        /// The last attempt's error.
        reason: String,
    },
    /// The backend configuration is invalid.
    #[error("Invalid backend configuration: {0}")]
    Config(String),
}

/// Result alias for backends.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Ranged reads of blobs by id. Implementations are shared between threads.
pub trait BlobBackend: Send + Sync {
    /// Fills `buf` with the bytes of blob `blob_id` starting at `offset`. Reading past the
    /// end of the blob is an error, never a short read.
    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// [`BlobBackend::read_at`] on behalf of a background prefetch (`prefetch`), which a
    /// backend may put behind reads a reader waits on; by default the same read.
    fn read_at_for(
        &self,
        blob_id: &str,
        offset: u64,
        buf: &mut [u8],
        prefetch: bool,
    ) -> Result<()> {
        let _ = prefetch;
        self.read_at(blob_id, offset, buf)
    }

    /// Tells the backend that `len` bytes at `offset` of blob `blob_id` failed their
    /// digest. True when the next read may bring other bytes (a P2P peer dropped the
    /// piece and its sender): the caller reads once more; false by default.
    fn report_bad(&self, blob_id: &str, offset: u64, len: u64) -> bool {
        let _ = (blob_id, offset, len);
        false
    }

    /// Counters of the backend's own, for metrics (none by default).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// Size of blob `blob_id` in bytes.
    fn blob_size(&self, blob_id: &str) -> Result<u64>;

    /// A short name for logs and metrics (`localfs`, `registry`, ...).
    fn kind(&self) -> &'static str;

    /// Replaces the credentials the backend authenticates with (a refreshed token, a
    /// rotated password); the next request uses them. Returns false for backends that
    /// use none.
    fn set_credentials(&self, _credentials: Option<registry::Credentials>) -> bool {
        false
    }
}

/// An error and its sources, `: `-separated (for messages that cross crate lines).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
