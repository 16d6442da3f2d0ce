//! Where bootstrap and blob bytes come from: owned buffers, memory maps, or positional
//! reads on files ([`ReadAt`]).

use crate::error::{Error, Result};
use std::fs::File;
use std::ops::Deref;
use std::os::unix::fs::FileExt;

/// Bytes of a whole bootstrap, owned or mapped.
pub enum Data {
    /// Read into memory.
    Owned(Vec<u8>),
    /// Memory-mapped read-only.
    Mapped(memmap2::Mmap),
}

impl Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Owned(v) => v,
            Data::Mapped(m) => m,
        }
    }
}

impl Data {
    /// Maps `file` read-only.
    ///
    /// # Safety
    /// The caller guarantees that nobody truncates or modifies the file while the mapping
    /// lives (for example because the file is a build output nobody else writes, or is
    /// sealed). Otherwise reads may observe changing bytes or fault with SIGBUS.
    #[allow(unsafe_code)]
    pub unsafe fn map(file: &File) -> Result<Self> {
        // SAFETY:
        // - the mapping is read-only and private to this process;
        // - the caller promises the file is not modified or truncated while mapped
        //   (the obligation of this `unsafe fn`).
        let m =
            unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io("Mapping bootstrap", e))?;
        Ok(Data::Mapped(m))
    }
}

/// Positional reads: the one interface the blob readers use, backed by a file, a buffer, or
/// (in nydusd) a cache or a remote backend.
pub trait ReadAt {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Total size in bytes.
    fn size(&self) -> std::io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// Reads `len` bytes at `offset` into a new buffer, naming `what` in errors.
pub fn read_vec(r: &(impl ReadAt + ?Sized), offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let size = r
        .size()
        .map_err(|e| Error::io(format!("Reading {what}"), e))?;
    let end = offset.saturating_add(len);
    if end > size {
        return Err(Error::Truncated {
            what: what.to_string(),
            start: offset,
            end,
            len: size,
        });
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact_at(&mut buf, offset)
        .map_err(|e| Error::io(format!("Reading {what}"), e))?;
    Ok(buf)
}
