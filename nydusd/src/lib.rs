//! `nydusd`: serves a RAFS v6 bootstrap as a read-only filesystem.
//!
//! * [`config`]: upstream's v1 JSON configuration, validated.
//! * [`fs`]: the filesystem over a bootstrap, against fuse-backend-rs' `FileSystem` trait
//!   (one implementation for FUSE and virtio-fs).
//! * [`cache`]: the verified chunk cache in front of a blob backend.
//! * [`daemon`]: wiring shared by the transports — backend, cache, filesystem, state.
//! * [`fuse`]: the FUSE transport (session, threads, INIT, invalidation).
//! * [`api`]: the HTTP API on a unix socket; [`metrics`]: the counters it serves.
//! * [`prefetch`]: background prefetch of listed files and whole blobs.
//! * [`fuse_opens`]: which opens are passed through, per image (FUSE only).
//! * [`handover`]: failover and live upgrade: the FUSE session handed to a supervisor
//!   and taken over by a successor.
//! * [`passthrough`]: FUSE passthrough of fully cached files (the crate's only `unsafe`).
//! * [`vfs`]: what either transport serves: one image at the root, or a pseudo tree of
//!   images mounted through the API.
//! * [`virtiofs`]: the same filesystem served to VM guests over vhost-user-fs.
//! * [`client`]: the typed config, the API's types and a launcher, for programs that
//!   drive daemons; all that is built without the `daemon` feature.
#![deny(unsafe_code)]

#[cfg(feature = "daemon")]
pub mod api;
#[cfg(feature = "daemon")]
pub mod cache;
pub mod client;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod error;
#[cfg(feature = "daemon")]
pub mod fs;
#[cfg(feature = "daemon")]
pub mod fuse;
#[cfg(feature = "daemon")]
pub mod fuse_opens;
#[cfg(feature = "daemon")]
pub mod handover;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod passthrough;
#[cfg(feature = "daemon")]
pub mod prefetch;
#[cfg(feature = "daemon")]
pub mod vfs;
#[cfg(feature = "daemon")]
pub mod virtiofs;

#[cfg(feature = "daemon")]
pub use error::{Error, Result};
