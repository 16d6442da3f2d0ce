//! Reading RAFS v6: bootstraps ([`Bootstrap`]) and data blobs (ci array, TOC, chunks).
//!
//! Every field the spec says readers check is validated; anything else is rejected with an
//! [`crate::Error::Invalid`] naming the field and the reason. Inodes and directories are
//! decoded from the bytes on demand, so opening a bootstrap costs only the superblock and
//! blob table.

mod blob;
mod bootstrap;
mod source;
mod superblock;

pub use blob::*;
pub use bootstrap::*;
pub use source::*;
pub use superblock::SuperInfo;
