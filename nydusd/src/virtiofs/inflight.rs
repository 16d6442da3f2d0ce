//! The guest's requests a virtio-fs daemon has taken off its queues and not yet
//! answered, in a memory file (`memfd`) that outlives the daemon: a successor reads it to
//! answer the requests its predecessor died with (QEMU 7.2 does not offer vhost-user's
//! own in-flight tracking to vhost-user-fs).
//!
//! Per queue there is a word with the queue's next available index (the position the
//! daemon has taken requests up to), then one word per descriptor head: the request
//! with that head is in flight, taken at avail position P while the used index was U.
//! A slot is written before the next-available word moves past it, and cleared under
//! the queue's lock right after its answer is put in the used ring (so a head the guest
//! reuses at once is recorded again only after); so whatever moment the daemon dies at,
//! a successor can tell each request apart (see [`pending`]):
//! * taken at or after the position in the next-available word: it is taken again from
//!   the ring;
//! * answered (its head is in the used ring at U or later): done;
//! * otherwise: answered again by the successor, however many later requests passed it.
//!
//! When the VMM sets a queue's position (`SET_VRING_BASE`, e.g. after a guest reboot),
//! the queue's record starts anew ([`Inflight::reset`]).
//!
//! Each word is written with one `pwrite` of 8 aligned bytes, which a killed writer
//! cannot tear.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// First bytes of the file (its layout's version is the last digit).
const MAGIC: &[u8; 8] = b"NYDVQIF1";
/// Bytes before the first queue.
const HEADER: u64 = 64;
/// Set in a word that holds a value.
const SET: u64 = 1 << 63;

/// One request in flight, as a predecessor left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// Its descriptor head.
    pub head: u16,
    /// The avail position it was taken at.
    pub avail: u16,
    /// The used index when it was taken.
    pub used: u16,
}

/// A queue as a predecessor left it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// The position requests were taken up to, if any was.
    pub next_avail: Option<u16>,
    /// The requests in flight.
    pub taken: Vec<Taken>,
}

/// The in-flight table of a virtio-fs connection's queues.
#[derive(Debug)]
pub struct Inflight {
    file: File,
    queues: u32,
    size: u32,
}

impl Inflight {
    /// A new table for `queues` queues of at most `size` descriptors.
    pub fn new(queues: u32, size: u32) -> io::Result<Inflight> {
        let fd = rustix::fs::memfd_create("nydusd-virtqueues", rustix::fs::MemfdFlags::CLOEXEC)?;
        let file = File::from(fd);
        let t = Inflight { file, queues, size };
        t.file.set_len(t.len())?;
        let mut head = [0u8; HEADER as usize];
        head[..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&queues.to_le_bytes());
        head[12..16].copy_from_slice(&size.to_le_bytes());
        t.file.write_all_at(&head, 0)?;
        Ok(t)
    }

    /// The table in `file`, as a predecessor left it; another layout is refused.
    pub fn load(file: File) -> io::Result<Inflight> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let mut head = [0u8; HEADER as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| bad(format!("the in-flight table's header: {e}")))?;
        if &head[..8] != MAGIC {
            return Err(bad(format!(
                "not an in-flight table of this nydusd (it starts with {:02x?})",
                &head[..8]
            )));
        }
        let queues = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        if queues == 0 || queues > 64 || !size.is_power_of_two() || size > 32768 {
            return Err(bad(format!(
                "an in-flight table of {queues} queues of {size} descriptors"
            )));
        }
        let t = Inflight { file, queues, size };
        if t.file.metadata()?.len() < t.len() {
            return Err(bad("the in-flight table is cut short".into()));
        }
        Ok(t)
    }

    /// The memory file, to hand over.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn len(&self) -> u64 {
        HEADER + self.queues as u64 * (8 + 8 * self.size as u64)
    }

    fn word(&self, queue: usize, slot: Option<u16>) -> Option<u64> {
        if queue >= self.queues as usize || slot.is_some_and(|s| s as u32 >= self.size) {
            return None;
        }
        let base = HEADER + queue as u64 * (8 + 8 * self.size as u64);
        Some(base + slot.map_or(0, |s| 8 + 8 * s as u64))
    }

    fn put(&self, at: Option<u64>, value: u64) {
        if let Some(at) = at {
            if let Err(e) = self.file.write_all_at(&value.to_le_bytes(), at) {
                tracing::warn!("virtio-fs: the in-flight table: {e}");
            }
        }
    }

    fn get(&self, at: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, at)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Request `head` of `queue` was taken at avail position `avail`, the used index
    /// being `used`.
    pub fn taken(&self, queue: usize, head: u16, avail: u16, used: u16) {
        let w = SET | (avail as u64) << 32 | used as u64;
        self.put(self.word(queue, Some(head)), w);
    }

    /// Requests of `queue` were taken up to avail position `next_avail`.
    pub fn advanced(&self, queue: usize, next_avail: u16) {
        self.put(self.word(queue, None), SET | next_avail as u64);
    }

    /// Request `head` of `queue` is answered (its head is in the used ring).
    pub fn answered(&self, queue: usize, head: u16) {
        self.put(self.word(queue, Some(head)), 0);
    }

    /// `queue` starts anew at avail position `base` (the VMM set the queue up again):
    /// its requests of before are forgotten.
    pub fn reset(&self, queue: usize, base: u16) {
        let Some(at) = self.word(queue, None) else {
            return;
        };
        self.put(Some(at), SET | base as u64);
        let zeros = vec![0u8; 8 * self.size as usize];
        if let Err(e) = self.file.write_all_at(&zeros, at + 8) {
            tracing::warn!("virtio-fs: the in-flight table: {e}");
        }
    }

    /// `queue` as the table holds it now.
    pub fn snapshot(&self, queue: usize) -> io::Result<QueueSnapshot> {
        let Some(at) = self.word(queue, None) else {
            return Ok(QueueSnapshot::default());
        };
        let next = self.get(at)?;
        let mut words = vec![0u8; 8 * self.size as usize];
        self.file.read_exact_at(&mut words, at + 8)?;
        let taken = words
            .chunks_exact(8)
            .enumerate()
            .filter_map(|(head, w)| {
                let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                (w & SET != 0).then_some(Taken {
                    head: head as u16,
                    avail: (w >> 32) as u16,
                    used: w as u16,
                })
            })
            .collect();
        Ok(QueueSnapshot {
            next_avail: (next & SET != 0).then_some(next as u16),
            taken,
        })
    }
}

/// The requests of `snap` a successor must answer: taken before `next_avail` (ones at
/// or after it it takes from the ring again) and not in the used ring. `size` is the queue's
/// size, `used` the used ring's index now and `used_id(p)` the head at used position
/// `p`.
pub fn pending(
    snap: &QueueSnapshot,
    size: u16,
    used: u16,
    used_id: impl Fn(u16) -> Option<u16>,
) -> Vec<Taken> {
    let Some(next_avail) = snap.next_avail else {
        return Vec::new();
    };
    snap.taken
        .iter()
        // At or after `next_avail` (within a queue's length): not counted, taken again.
        // Anything else was taken before, however many requests passed it since.
        .filter(|t| t.avail.wrapping_sub(next_avail) >= size)
        .filter(|t| {
            // Answered since it was taken: its head is in the used ring at `t.used` or
            // later (only the last `size` entries are still there; one answered before
            // the daemon died is among the newest).
            let since = used.wrapping_sub(t.used).min(size);
            !(0..since).any(|i| used_id(used.wrapping_sub(1 + i)) == Some(t.head))
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_answers_only_what_was_taken_counted_and_not_answered() {
        let t = Inflight::new(2, 8).unwrap();
        // Queue 1: heads 3, 5, 6 taken at positions 10, 11, 12 (used index 4); the
        // next-available word says 12, so 6 is not counted yet (the ring gives it
        // again). Head 5 was answered (used position 4) before its slot was cleared.
        t.taken(1, 3, 10, 4);
        t.taken(1, 5, 11, 4);
        t.advanced(1, 12);
        t.taken(1, 6, 12, 4);
        let loaded = Inflight::load(t.file().try_clone().unwrap()).unwrap();
        let snap = loaded.snapshot(1).unwrap();
        assert_eq!(snap.next_avail, Some(12));
        assert_eq!(snap.taken.len(), 3);
        let used_ring = |p: u16| (p == 4).then_some(5);
        let p = pending(&snap, 8, 5, used_ring);
        assert_eq!(p.iter().map(|t| t.head).collect::<Vec<_>>(), [3]);
        // An answer of the same head from before it was taken does not count.
        t.answered(1, 5);
        t.taken(1, 5, 11, 5);
        let p = pending(&loaded.snapshot(1).unwrap(), 8, 5, used_ring);
        assert_eq!(p.iter().map(|t| t.head).collect::<Vec<_>>(), [3, 5]);
        // Wrapping positions.
        let w = Inflight::new(1, 8).unwrap();
        w.taken(0, 2, u16::MAX, u16::MAX);
        w.advanced(0, 1);
        let p = pending(&w.snapshot(0).unwrap(), 8, u16::MAX, |_| None);
        assert_eq!(p.len(), 1);
        assert_eq!(loaded.snapshot(0).unwrap(), QueueSnapshot::default());
        // A slow request passed by far more requests than the queue holds is still
        // answered; one a VMM's reset forgot is not.
        let slow = Inflight::new(1, 8).unwrap();
        slow.taken(0, 4, 100, 50);
        slow.advanced(0, 1000);
        let p = pending(&slow.snapshot(0).unwrap(), 8, 940, |_| Some(7));
        assert_eq!(p.iter().map(|t| t.head).collect::<Vec<_>>(), [4]);
        slow.reset(0, 0);
        let snap = slow.snapshot(0).unwrap();
        assert_eq!((snap.next_avail, snap.taken.len()), (Some(0), 0));
    }

    #[test]
    fn other_files_are_refused() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(b"NYDOPEN1", 0).unwrap();
        f.set_len(4096).unwrap();
        let err = Inflight::load(f).unwrap_err();
        assert!(err.to_string().contains("not an in-flight table"), "{err}");
        let t = Inflight::new(2, 8).unwrap();
        t.file().set_len(100).unwrap();
        let err = Inflight::load(t.file().try_clone().unwrap()).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
    }
}
