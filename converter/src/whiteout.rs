//! Overlay whiteout markers in a single-layer build (spec §14).
//!
//! A layer records deletions of lower-layer files with markers. With no lower layer there
//! is nothing to delete, so a single-layer build drops the markers (as upstream does);
//! `--whiteout-spec none` keeps them as ordinary entries, which is what per-layer builds
//! that are merged later use.

use rafs::write::{Node, NodeKind};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Name prefix of an OCI whiteout file (`.wh.<name>` deletes `<name>`).
pub const OCI_WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OCI_OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The overlayfs xattr that marks a directory opaque.
pub const OVERLAYFS_OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Which whiteout convention the source uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WhiteoutSpec {
    /// OCI image spec: `.wh.<name>` files and `.wh..wh..opq` (the default).
    #[default]
    Oci,
    /// overlayfs: character device 0:0 and the `trusted.overlay.opaque` xattr.
    Overlayfs,
    /// No whiteouts: every entry is kept verbatim.
    None,
}

impl WhiteoutSpec {
    /// Whether a single-layer build leaves out the entry `name` whose node is `node`.
    /// For OCI, the node does not matter (a `.wh.` entry is dropped whatever it is).
    pub fn drops(self, name: &[u8], node: &Node) -> bool {
        match self {
            WhiteoutSpec::Oci => is_oci_whiteout(name),
            WhiteoutSpec::Overlayfs => {
                matches!(node.kind, NodeKind::CharDevice) && node.meta.rdev == 0
            }
            WhiteoutSpec::None => false,
        }
    }

    /// Removes marker xattrs that a single-layer build does not keep.
    pub fn strip_xattrs(self, xattrs: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
        if self == WhiteoutSpec::Overlayfs {
            xattrs.remove(OVERLAYFS_OPAQUE_XATTR);
        }
    }
}

/// Whether `name` is an OCI whiteout or opaque marker.
pub fn is_oci_whiteout(name: &[u8]) -> bool {
    name.starts_with(OCI_WHITEOUT_PREFIX)
}

impl FromStr for WhiteoutSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oci" => Ok(WhiteoutSpec::Oci),
            "overlayfs" => Ok(WhiteoutSpec::Overlayfs),
            "none" => Ok(WhiteoutSpec::None),
            _ => Err(format!(
                "whiteout spec '{s}' is not one of oci, overlayfs, none"
            )),
        }
    }
}

impl fmt::Display for WhiteoutSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WhiteoutSpec::Oci => "oci",
            WhiteoutSpec::Overlayfs => "overlayfs",
            WhiteoutSpec::None => "none",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rafs::write::Metadata;

    #[test]
    fn oci_drops_whiteouts_and_opaque_markers_only() {
        let file = Node::new(NodeKind::Fifo, Metadata::default());
        assert!(WhiteoutSpec::Oci.drops(b".wh.foo", &file));
        assert!(WhiteoutSpec::Oci.drops(OCI_OPAQUE_MARKER, &file));
        assert!(!WhiteoutSpec::Oci.drops(b"foo.wh.", &file));
        assert!(!WhiteoutSpec::None.drops(b".wh.foo", &file));
        assert!(!WhiteoutSpec::Overlayfs.drops(b".wh.foo", &file));
    }

    #[test]
    fn overlayfs_drops_only_char_device_zero() {
        let mut dev = Node::new(NodeKind::CharDevice, Metadata::default());
        assert!(WhiteoutSpec::Overlayfs.drops(b"x", &dev));
        dev.meta.rdev = 0x0103;
        assert!(!WhiteoutSpec::Overlayfs.drops(b"x", &dev));
        let blk = Node::new(NodeKind::BlockDevice, Metadata::default());
        assert!(!WhiteoutSpec::Overlayfs.drops(b"x", &blk));
    }
}
