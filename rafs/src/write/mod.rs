//! Building RAFS v6 images: an in-memory [`Tree`], data blobs written through
//! [`write_chunks`], and the bootstrap written by [`write_bootstrap`].
//!
//! The output depends only on the input tree and options: chunks are written in submission
//! order whatever the thread timing, xattrs are sorted, and no time stamps are recorded.

mod blob;
mod bootstrap;
mod tree;

pub use blob::*;
pub use bootstrap::*;
pub use tree::*;
