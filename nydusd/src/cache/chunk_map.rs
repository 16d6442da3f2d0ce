//! The ready bitmap of one blob's cache file, in upstream nydusd's `<blob_id>.chunk_map`
//! format (spec §18), so that either daemon can reuse the other's cache:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `0x424D4150` ("PAMB" on disk, little endian) |
//! | 4 | 4 | version, 1 |
//! | 8 | 4 | magic2 `0x434D4150` |
//! | 12 | 4 | all_ready: `0x4D4D4150` once every chunk is ready, else 0 |
//! | 16 | 4080 | zero |
//! | 4096 | ⌈n/8⌉ | one bit per ci index, most significant bit first (ci 0 = `0x80`) |
//!
//! A bit is set only after the chunk's bytes were written to the data file (and verified,
//! unless validation is off), so a crash leaves at worst a chunk that is cached but not
//! marked ready. Bits are persisted with a positional write of the byte that holds them.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;

/// `magic`.
pub const MAGIC: u32 = 0x424D_4150;
/// `magic2`.
pub const MAGIC2: u32 = 0x434D_4150;
/// `all_ready` once every chunk is ready.
pub const MAGIC_ALL_READY: u32 = 0x4D4D_4150;
/// Format version.
pub const VERSION: u32 = 1;
/// Size of the header before the bitmap.
pub const HEADER_SIZE: u64 = 4096;

/// A persisted bitmap of ready chunks.
pub struct ChunkMap {
    file: File,
    path: PathBuf,
    count: u32,
    bits: Vec<AtomicU8>,
    ready: AtomicU32,
    /// Serialises "update byte, then write it" so concurrent setters of bits in one byte
    /// never persist a stale byte.
    write: Mutex<()>,
    /// Where the bits' bytes are locked across processes while read, changed and
    /// written back (see [`ChunkMap::share`]); `None`: this process alone writes the map.
    shared: Option<Shared>,
}

/// The lock file of a map shared by processes, and where its byte locks start.
struct Shared {
    file: File,
    base: u64,
}

fn mask(ci: u32) -> u8 {
    0x80 >> (ci & 7)
}

impl ChunkMap {
    /// Opens the map at `path` for `count` chunks, creating it (all clear) when it is
    /// missing, and resetting it when it is malformed or sized for another chunk count.
    /// Returns the map and whether an existing map was reset.
    pub fn open(path: &Path, count: u32) -> Result<(ChunkMap, bool)> {
        let io = |source| Error::CacheIo {
            path: path.display().to_string(),
            source,
        };
        let file = crate::cache::open_or_create(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let want = HEADER_SIZE + (count as u64).div_ceil(8);
        let mut bytes = vec![0u8; want as usize];
        let mut reset = false;
        let valid = len == want && {
            file.read_exact_at(&mut bytes, 0).map_err(io)?;
            let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
            word(0) == MAGIC && word(4) == VERSION && word(8) == MAGIC2
        };
        if !valid {
            reset = len != 0;
            bytes.fill(0);
            bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            bytes[4..8].copy_from_slice(&VERSION.to_le_bytes());
            bytes[8..12].copy_from_slice(&MAGIC2.to_le_bytes());
            file.set_len(0).map_err(io)?;
            file.write_all_at(&bytes, 0).map_err(io)?;
        }
        let bitmap = &bytes[HEADER_SIZE as usize..];
        // Bits past `count` in the last byte are ignored (and cleared in memory).
        let mut bits: Vec<AtomicU8> = bitmap.iter().map(|b| AtomicU8::new(*b)).collect();
        if count % 8 != 0 {
            if let Some(last) = bits.last_mut() {
                *last.get_mut() &= !(0xFFu8 >> (count % 8));
            }
        }
        let ready = bits.iter_mut().map(|b| b.get_mut().count_ones()).sum();
        Ok((
            ChunkMap {
                file,
                path: path.to_path_buf(),
                count,
                bits,
                ready: AtomicU32::new(ready),
                write: Mutex::new(()),
                shared: None,
            },
            reset,
        ))
    }

    /// Number of chunks covered.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Number of ready chunks.
    pub fn ready_count(&self) -> u32 {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether chunk `ci` is ready.
    pub fn is_ready(&self, ci: u32) -> bool {
        ci < self.count && self.bits[(ci / 8) as usize].load(Ordering::Acquire) & mask(ci) != 0
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::CacheIo {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Shares the map with other processes: from now on a bit is written by reading its
    /// byte from the file, changing the bit and writing it back under a lock of byte
    /// `base + byte index` of `lock_file` (an open file description of this process's
    /// own: its locks are the process's), so that no process writes back a bit another
    /// one cleared or set meanwhile.
    pub fn share(&mut self, lock_file: File, base: u64) {
        self.shared = Some(Shared {
            file: lock_file,
            base,
        });
    }

    /// Writes bit `ci` of the file as `on`: the byte as in memory, or — shared — as in the
    /// file, under its lock.
    fn persist(&self, ci: u32, on: bool, in_memory: u8) -> std::io::Result<()> {
        let at = HEADER_SIZE + (ci / 8) as u64;
        let Some(shared) = &self.shared else {
            return self.file.write_all_at(&[in_memory], at);
        };
        let byte = shared.base + (ci / 8) as u64;
        crate::cache::range_lock(&shared.file, crate::cache::Lock::Write, byte, 1, true)?;
        let res = (|| {
            let mut b = [0u8];
            self.file.read_exact_at(&mut b, at)?;
            let new = if on {
                b[0] | mask(ci)
            } else {
                b[0] & !mask(ci)
            };
            if new != b[0] {
                self.file.write_all_at(&[new], at)?;
            }
            Ok(())
        })();
        crate::cache::range_lock(&shared.file, crate::cache::Lock::Unlock, byte, 1, true)?;
        res
    }

    /// Whether the file (not this process's view of it) says chunk `ci` is ready.
    pub fn ready_on_disk(&self, ci: u32) -> Result<bool> {
        let mut b = [0u8];
        self.file
            .read_exact_at(&mut b, HEADER_SIZE + (ci / 8) as u64)
            .map_err(|e| self.io(e))?;
        Ok(b[0] & mask(ci) != 0)
    }

    /// Whether every chunk is ready in the file (not only in this process's view: another
    /// process sharing the map may have cleared some). Unshared, the view is the file.
    fn all_ready_on_disk(&self) -> Result<bool> {
        if self.shared.is_none() {
            return Ok(true);
        }
        let mut bits = vec![0u8; self.bits.len()];
        self.read_disk_bits(&mut bits)?;
        let full = self.count / 8;
        let rest = self.count % 8;
        Ok(bits[..full as usize].iter().all(|b| *b == 0xFF)
            && (rest == 0 || bits[full as usize] & !(0xFFu8 >> rest) == !(0xFFu8 >> rest)))
    }

    /// Reads the bitmap as the file has it into `bits` (one byte per 8 chunks).
    pub fn read_disk_bits(&self, bits: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(bits, HEADER_SIZE)
            .map_err(|e| self.io(e))
    }

    /// Forgets, in this process only, that chunk `ci` is ready (another process evicted
    /// it; the file says so already).
    pub fn forget(&self, ci: u32) {
        if ci >= self.count {
            return;
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.bits[(ci / 8) as usize].fetch_and(!mask(ci), Ordering::AcqRel);
        if old & mask(ci) != 0 {
            self.ready.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Marks chunk `ci` ready and persists the bit (and `all_ready` when it completes
    /// the map).
    pub fn set_ready(&self, ci: u32) -> Result<()> {
        if ci >= self.count {
            return Ok(());
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &self.bits[(ci / 8) as usize];
        let old = slot.fetch_or(mask(ci), Ordering::AcqRel);
        if old & mask(ci) != 0 {
            return Ok(());
        }
        if let Err(e) = self.persist(ci, true, old | mask(ci)) {
            slot.fetch_and(!mask(ci), Ordering::AcqRel);
            return Err(self.io(e));
        }
        if self.ready.fetch_add(1, Ordering::AcqRel) + 1 == self.count
            && self.all_ready_on_disk()?
        {
            self.file
                .write_all_at(&MAGIC_ALL_READY.to_le_bytes(), 12)
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// Clears chunk `ci` (its cached bytes were found corrupt, or evicted) and persists
    /// that.
    pub fn clear(&self, ci: u32) -> Result<()> {
        if ci >= self.count {
            return Ok(());
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &self.bits[(ci / 8) as usize];
        let old = slot.fetch_and(!mask(ci), Ordering::AcqRel);
        if old & mask(ci) == 0 && self.shared.is_none() {
            return Ok(());
        }
        // Shared, the file may say ready where this process's view does not: `all_ready`
        // is cleared whatever this process counted (upstream nydusd trusts it).
        let was_all =
            old & mask(ci) != 0 && self.ready.fetch_sub(1, Ordering::AcqRel) == self.count;
        if was_all || self.shared.is_some() {
            self.file
                .write_all_at(&0u32.to_le_bytes(), 12)
                .map_err(|e| self.io(e))?;
        }
        self.persist(ci, false, old & !mask(ci))
            .map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_persist_msb_first_with_upstream_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.chunk_map");
        let (m, reset) = ChunkMap::open(&p, 10).unwrap();
        assert!(!reset);
        m.set_ready(1).unwrap();
        m.set_ready(9).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len(), 4096 + 2);
        assert_eq!(&bytes[0..16], b"PAMB\x01\0\0\0PAMC\0\0\0\0");
        assert_eq!(bytes[4096], 0x40);
        assert_eq!(bytes[4097], 0x40);
        drop(m);
        let (m, reset) = ChunkMap::open(&p, 10).unwrap();
        assert!(!reset);
        assert!(m.is_ready(1) && m.is_ready(9) && !m.is_ready(0));
        assert_eq!(m.ready_count(), 2);
        m.clear(9).unwrap();
        assert!(!m.is_ready(9));
        assert_eq!(std::fs::read(&p).unwrap()[4097], 0);
    }

    #[test]
    fn all_ready_is_written_when_complete_and_cleared_after() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.chunk_map");
        let (m, _) = ChunkMap::open(&p, 3).unwrap();
        for ci in 0..3 {
            m.set_ready(ci).unwrap();
        }
        assert_eq!(&std::fs::read(&p).unwrap()[12..16], b"PAMM");
        m.clear(0).unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[12..16], &[0; 4]);
    }

    #[test]
    fn malformed_or_resized_maps_are_reset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.chunk_map");
        std::fs::write(&p, vec![0xFFu8; 4097]).unwrap();
        let (m, reset) = ChunkMap::open(&p, 8).unwrap();
        assert!(reset);
        assert_eq!(m.ready_count(), 0);
        m.set_ready(0).unwrap();
        drop(m);
        let (m, reset) = ChunkMap::open(&p, 16).unwrap();
        assert!(reset, "a map for another chunk count must not be trusted");
        assert!(!m.is_ready(0));
    }

    #[test]
    fn a_shared_map_says_all_ready_only_when_the_file_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.chunk_map");
        let locks = dir.path().join("x.chunk_meta");
        std::fs::write(&locks, b"").unwrap();
        // Two processes' views of one map.
        let (mut a, _) = ChunkMap::open(&p, 3).unwrap();
        let (mut b, _) = ChunkMap::open(&p, 3).unwrap();
        let rw = || crate::cache::open_or_create(&locks).unwrap();
        a.share(rw(), 1 << 40);
        b.share(rw(), 1 << 40);
        let header = || std::fs::read(&p).unwrap()[12..16].to_vec();
        a.set_ready(0).unwrap();
        a.set_ready(1).unwrap();
        b.set_ready(2).unwrap();
        // b cleared chunk 1 (evicted it); a's view still has it.
        b.clear(1).unwrap();
        assert_eq!(std::fs::read(&p).unwrap()[4096], 0xA0);
        // a completes its view: the file is not complete, so no all_ready.
        a.set_ready(2).unwrap();
        assert_eq!(header(), [0; 4]);
        b.set_ready(1).unwrap();
        b.set_ready(0).unwrap();
        assert_eq!(header(), b"PAMM");
        // Any clear of a shared map clears it, whatever the clearer counted.
        a.clear(2).unwrap();
        assert_eq!(header(), [0; 4]);
        assert_eq!(std::fs::read(&p).unwrap()[4096], 0xC0);
    }
}
