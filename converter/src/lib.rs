//! Turning directories and OCI layer tars into RAFS v6 images: one data blob plus the
//! bootstrap (metadata) that describes it.
//!
//! * [`source`]: reading a directory ([`source::dir`]) or a layer tar ([`source::tar`])
//!   into a [`rafs::write::Tree`], streaming file contents into the blob writer.
//! * [`resolve`]: paths resolved through symlinks inside the root, as containerd does.
//! * [`whiteout`]: what happens to overlay whiteout markers in a single-layer build.
//! * [`prefetch`]: prefetch patterns (absolute paths) and how they resolve to nodes.
//! * [`mod@create`]: `nydus-image create`, orchestrating the above and writing the outputs.
//! * [`oci`]: OCI images (layouts, archives, registries) and `nydusify convert|check`.
//! * [`mod@merge`]: `nydus-image merge`, stacking layer bootstraps with OCI whiteout rules.
//!
//! The `nydus-image` binary only parses flags and calls [`create::create`].

#![forbid(unsafe_code)]

pub mod blobs;
pub mod check;
pub mod create;
pub mod error;
pub mod inspect;
pub mod merge;
pub mod oci;
pub mod prefetch;
pub mod resolve;
pub mod source;
pub mod unpack;
pub mod whiteout;

pub use blobs::BlobLocator;
pub use create::{create, BlobOutput, CreateOptions, CreateOutput, SourceType};
pub use error::{Error, Result};
pub use whiteout::WhiteoutSpec;
