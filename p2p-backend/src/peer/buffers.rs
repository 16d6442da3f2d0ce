//! Buffers kept for reuse. A fresh allocation of a piece or a slice (MiBs) is mapped
//! anew by the allocator: a page fault and a zeroed page for every 4 KiB written into
//! it, and as much again to unmap it. Measured on a cold read through the peer, that
//! was a fifth of the peer's CPU; buffers handed back here are used again instead.

use bytes::Bytes;
use std::sync::Mutex;

/// A bounded set of kept buffers.
pub struct Pool {
    kept: Mutex<Vec<Vec<u8>>>,
    /// At most this many are kept...
    max_kept: usize,
    /// ...each of at most this many bytes.
    max_len: usize,
}

/// Buffers of whole pieces fetched from parents (dfdaemon's usual 4 MiB pieces).
pub static PIECES: Pool = Pool::new(4, 4 << 20);
/// Buffers of the slices (up to 1 MiB) the proxy reads from disk for its clients, and
/// a piece's hashing reads.
pub static SLICES: Pool = Pool::new(16, 1 << 20);

impl Pool {
    /// A pool keeping at most `max_kept` buffers of at most `max_len` bytes.
    pub const fn new(max_kept: usize, max_len: usize) -> Pool {
        Pool {
            kept: Mutex::new(Vec::new()),
            max_kept,
            max_len,
        }
    }

    /// A buffer of `len` bytes, a kept one when there is one: its bytes are whatever
    /// they were (zeros where it grew), for the caller to overwrite.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = kept.unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Hands `buf` back for reuse (dropped if too large or enough are kept).
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() > self.max_len {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < self.max_kept {
            kept.push(buf);
        }
    }

    /// `buf` as [`Bytes`] (no copy) that hand it back to this pool when the last of
    /// them is dropped.
    pub fn bytes(&'static self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: self })
    }
}

/// A buffer that goes back to its pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: &'static Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_within_bounds() {
        static POOL: Pool = Pool::new(2, 8);
        let a = POOL.take(8);
        let ptr = a.as_ptr();
        POOL.give(a);
        let b = POOL.take(4);
        assert_eq!(b.as_ptr(), ptr, "the kept buffer is used again");
        assert_eq!(b.len(), 4);
        // Through Bytes: back once the last clone is dropped.
        let bytes = POOL.bytes(b);
        let part = bytes.slice(1..3);
        drop(bytes);
        assert!(POOL.kept.lock().unwrap().is_empty());
        drop(part);
        assert_eq!(POOL.kept.lock().unwrap().len(), 1);
        // Too large, or too many: not kept.
        POOL.give(vec![0; 9]);
        POOL.give(vec![0; 1]);
        POOL.give(vec![0; 1]);
        assert_eq!(POOL.kept.lock().unwrap().len(), 2);
    }
}
