//! Build sources: a directory on the local filesystem or an OCI layer tar.
//!
//! Both produce a [`rafs::write::Tree`] whose regular files hold chunk handles from the
//! blob writer. File contents are streamed chunk by chunk: memory use does not depend on
//! file sizes.

pub mod dir;
pub mod tar;

use rafs::format::xattr_index;
use std::time::{Duration, Instant};

/// Logs how far a long build has got, at most every few seconds.
#[derive(Debug)]
pub struct Progress {
    files: u64,
    bytes: u64,
    started: Instant,
    last: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        let now = Instant::now();
        Progress {
            files: 0,
            bytes: 0,
            started: now,
            last: now,
        }
    }
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(5);

    /// Records one more file of `bytes` bytes written into the blob.
    pub fn file(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
        if self.last.elapsed() >= Self::EVERY {
            self.last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            let mib = self.bytes as f64 / (1024.0 * 1024.0);
            tracing::info!(
                "{} files, {mib:.0} MiB of data so far ({:.0} MiB/s)",
                self.files,
                mib / secs
            );
        }
    }
}

/// Longest xattr name suffix (after the namespace prefix) EROFS can store.
const XATTR_NAME_MAX: usize = 255;
/// Longest xattr value EROFS can store.
const XATTR_VALUE_MAX: usize = 65535;

/// Checks that an xattr can be stored in a RAFS v6 inode; returns why not otherwise.
///
/// Supported are the `user.`, `trusted.` and `security.` namespaces and the two POSIX ACL
/// names `system.posix_acl_access` and `system.posix_acl_default`.
pub fn check_xattr(name: &[u8], value: &[u8]) -> Result<(), String> {
    let shown = String::from_utf8_lossy(name);
    let Some((index, prefix)) = xattr_index::PREFIXES
        .iter()
        .find(|(_, p)| name.starts_with(p))
    else {
        return Err(format!(
            "xattr '{shown}' is in a namespace RAFS cannot store \
             (supported: user.*, trusted.*, security.*, system.posix_acl_access, \
             system.posix_acl_default)"
        ));
    };
    let suffix = &name[prefix.len()..];
    let is_acl =
        *index == xattr_index::POSIX_ACL_ACCESS || *index == xattr_index::POSIX_ACL_DEFAULT;
    if is_acl && !suffix.is_empty() {
        return Err(format!(
            "xattr '{shown}' is in a namespace RAFS cannot store"
        ));
    }
    if !is_acl && suffix.is_empty() {
        return Err(format!("xattr '{shown}' has an empty name"));
    }
    if suffix.len() > XATTR_NAME_MAX {
        return Err(format!(
            "xattr '{shown}' has a name longer than {XATTR_NAME_MAX} bytes"
        ));
    }
    if value.len() > XATTR_VALUE_MAX {
        return Err(format!(
            "xattr '{shown}' has a value of {} bytes (at most {XATTR_VALUE_MAX})",
            value.len()
        ));
    }
    Ok(())
}

/// Linux `makedev(major, minor)` (the `st_rdev` encoding).
pub fn makedev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (major as u64, minor as u64);
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_xattr_namespaces() {
        assert!(check_xattr(b"user.a", b"1").is_ok());
        assert!(check_xattr(b"trusted.overlay.opaque", b"y").is_ok());
        assert!(check_xattr(b"security.capability", b"").is_ok());
        assert!(check_xattr(b"system.posix_acl_access", b"").is_ok());
        assert!(check_xattr(b"system.nfs4_acl", b"").is_err());
        assert!(check_xattr(b"system.posix_acl_accessX", b"").is_err());
        assert!(check_xattr(b"user.", b"").is_err());
        assert!(check_xattr(&[b"user.".as_slice(), &[b'a'; 256]].concat(), b"").is_err());
    }

    #[test]
    fn makedev_matches_the_linux_encoding() {
        assert_eq!(makedev(1, 3), 0x0103);
        assert_eq!(makedev(8, 0x123), 0x10_0823);
        assert_eq!(rafs::write::encode_rdev(makedev(259, 70000)), {
            // new_encode_dev: (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
            (70000 & 0xff) | (259 << 8) | ((70000 & !0xff) << 12)
        });
    }
}
