//! RAFS v6: the on-disk format of nydus images.
//!
//! * [`format`](mod@format): raw on-disk structures and constants, nothing else.
//! * [`read`]: open and validate a bootstrap, walk its tree, map file ranges to chunks,
//!   read blob metadata (ci array, digests, TOC) and decompress and verify chunks.
//! * [`write`](mod@write): build a bootstrap and a data blob from an in-memory tree, deterministically.
//!
//! The format is specified in `shared/spec/rafs-v6.md`; section numbers in the docs refer to it.

pub mod error;
pub mod format;
pub mod read;
pub mod types;
pub mod write;

pub use error::{Error, Result};
pub use types::{BlobInfo, ChunkInfo, Compressor, Digester};
