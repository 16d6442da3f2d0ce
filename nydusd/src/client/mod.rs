//! The client side of nydusd, with no filesystem or FUSE code (the crate's `daemon`
//! feature off leaves only this): what `nydusify mount`, the snapshotter and the tests
//! use to configure, start, drive and stop daemons.
//!
//! * [`config`]: the v1 JSON config as types, and the config of a registry image.
//! * [`api`]: the HTTP API's request and reply types, and a blocking client over the
//!   unix socket.
//! * [`launcher`]: starting a daemon, waiting until it serves, mounting and unmounting
//!   images through its API, stopping it.

pub mod api;
pub mod config;
pub mod launcher;
pub mod supervisor;

pub use api::{ApiClient, DaemonInfo, MountRequest};
pub use config::{ImageConfigOptions, ImageRef, NydusdConfig};
pub use launcher::{Daemon, DaemonCommand};

/// What went wrong talking to, or starting, a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An image reference that cannot be split into host and repository.
    #[error("image reference '{reference}': {reason}")]
    ImageRef {
        /// The reference.
        reference: String,
        /// Why.
        reason: String,
    },
    /// A config file that does not parse.
    #[error("nydusd config {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file or socket operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API answered with an error status.
    #[error("nydusd API {request} on {socket}: {status} {message}")]
    Api {
        /// The socket.
        socket: String,
        /// `METHOD path`.
        request: String,
        /// HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
    },
    /// The daemon exited or did not become ready in time.
    #[error("nydusd (pid {pid}) {reason}")]
    Daemon {
        /// Its pid.
        pid: u32,
        /// What happened, with the end of its log when there is one.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status when the API answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}
