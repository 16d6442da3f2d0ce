//! `nydusd`: serves a RAFS v6 bootstrap as a read-only filesystem.
//!
//! * [`config`]: upstream's v1 JSON configuration, validated.
//! * [`fs`]: the filesystem over a bootstrap, against fuse-backend-rs' `FileSystem` trait
//!   (one implementation for FUSE and, later, virtio-fs).
//! * [`cache`]: the verified chunk cache in front of a blob backend.
//! * [`daemon`]: wiring — backend, cache, filesystem, FUSE session and its threads.
//! * [`api`]: the HTTP API on a unix socket; [`metrics`]: the counters it serves.
//! * [`prefetch`]: background prefetch of listed files and whole blobs.
//! * [`passthrough`]: FUSE passthrough of fully cached files (the crate's only `unsafe`).
//! * [`vfs`]: what the FUSE session serves: one image at the root, or a pseudo-root of
//!   images mounted through the API.
#![deny(unsafe_code)]

pub mod api;
pub mod cache;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod metrics;
pub mod passthrough;
pub mod prefetch;
pub mod vfs;

pub use error::{Error, Result};
