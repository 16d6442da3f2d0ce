//! Pieces on disk: one directory per task under `storage.dir`, holding the task's bytes
//! (`data`, at their offsets) and what is known of them (`meta.json`: the length, the
//! piece length, and each piece stored with its CRC-32 and SHA-256). A task's pieces
//! survive a restart of the peer and are served again. `meta.json` is written in
//! batches, each after the bytes it records were synced: a crash can lose the record of
//! the last pieces stored (fetched again after the restart), never record bytes that
//! are not on disk.
//!
//! Task ids and piece lengths follow dfdaemon, so that mixed swarms share tasks: the id
//! of an OCI blob URL (`.../blobs/sha256:<hex>`) is the blob digest's hex, and a task
//! of `n` bytes has pieces of `next_pow2(n / 500)` bytes, clamped to 4–64 MiB.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Smallest piece.
pub const MIN_PIECE: u64 = 4 << 20;
/// Largest piece.
pub const MAX_PIECE: u64 = 64 << 20;

/// dfdaemon's piece length for a task of `content_length` bytes.
pub fn piece_length(content_length: u64) -> u64 {
    (content_length / 500)
        .max(1)
        .next_power_of_two()
        .clamp(MIN_PIECE, MAX_PIECE)
}

/// The SHA-256 of nothing.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The blob digest (lowercase hex) an OCI blob URL (`.../blobs/sha256:<hex>`) names.
pub fn blob_digest(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let at = path.rfind("/blobs/sha256:")?;
    let hex = &path[at + "/blobs/sha256:".len()..];
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// The task id of `url`: the blob digest's hex for an OCI blob URL, else the SHA-256 of
/// the whole URL, query included (such tasks are not shared with dfdaemons).
pub fn task_id(url: &str) -> String {
    blob_digest(url).unwrap_or_else(|| hex::encode(Sha256::digest(url.as_bytes())))
}

/// A piece stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceMeta {
    /// Its number.
    pub number: u32,
    /// Its offset in the task.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// CRC-32 (IEEE) of its bytes.
    pub crc32: u32,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
    /// The peer it came from (none: the origin).
    pub parent: Option<String>,
    /// Checked against a digest that did not come from its sender (it came from the
    /// origin, matched the SHA-256 a seed recorded from the origin, or the whole blob
    /// matched its digest): only such pieces are served to other peers.
    #[serde(default)]
    pub verified: bool,
}

impl PieceMeta {
    /// Its digest as dfdaemon writes it (`crc32:<decimal>`).
    pub fn crc_digest(&self) -> String {
        format!("crc32:{}", self.crc32)
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    id: String,
    url: String,
    content_length: u64,
    piece_length: u64,
    pieces: Vec<PieceMeta>,
}

/// One task's pieces.
pub struct TaskData {
    /// The task id.
    pub id: String,
    /// The URL it was first asked for with.
    pub url: String,
    /// Its length.
    pub content_length: u64,
    /// Its piece length.
    pub piece_length: u64,
    dir: PathBuf,
    file: File,
    pieces: Mutex<Vec<Option<PieceMeta>>>,
    /// Bumped on every piece stored (and when the task ends).
    changed: watch::Sender<u64>,
    /// When it was last stored into or read from (for GC).
    accessed: Mutex<std::time::SystemTime>,
    /// Pieces that readers wait on now (a read a client waits on, not a prefetch), with
    /// how many wait on each: the download fetches them first.
    wanted: Mutex<BTreeMap<u32, u32>>,
    /// Of those, the ones waited on by readers that take verified bytes only.
    wanted_verified: Mutex<BTreeMap<u32, u32>>,
    /// The piece a reader last read or waited on, and when a local reader last read:
    /// the download goes on from there, and while local readers read it keeps close
    /// ahead of them.
    reader: Mutex<(u32, Option<std::time::Instant>)>,
    /// When a local reader that checks what it reads itself (nydusd, which checks
    /// each chunk's digest) last read.
    verifying_reader: Mutex<Option<std::time::Instant>>,
    /// Told when a reader starts waiting on a piece.
    want_signal: tokio::sync::Notify,
    /// Held by a store from its write to its record, one of 16 by piece number: two
    /// stores of one piece never mix, stores of different pieces go on side by side.
    storing: [Mutex<()>; 16],
    /// The record in memory has changed since `meta.json` was last written.
    dirty: std::sync::atomic::AtomicBool,
    /// Bumped whenever a piece's bytes are stored or dropped: a check that hashed the
    /// stored bytes applies its verdict only if none changed meanwhile.
    generation: std::sync::atomic::AtomicU64,
    /// Held while `meta.json` is written, with when it last was.
    persisting: Mutex<std::time::Instant>,
    /// The pieces `meta.json` records now (written after their bytes were synced).
    durable: Mutex<Vec<bool>>,
}

/// How often at most a download's stores write `meta.json` (with the data synced
/// before it): a crash loses at most this much of the record, never its truth.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A reader's wait on a piece (see [`TaskData::want`]); the wait ends when it is dropped.
pub struct Want {
    task: Arc<TaskData>,
    number: u32,
    verified: bool,
}

impl Drop for Want {
    fn drop(&mut self) {
        let forget = |map: &Mutex<BTreeMap<u32, u32>>| {
            let mut wanted = map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = wanted.get_mut(&self.number) {
                *n -= 1;
                if *n == 0 {
                    wanted.remove(&self.number);
                }
            }
        };
        forget(&self.task.wanted);
        if self.verified {
            forget(&self.task.wanted_verified);
        }
    }
}

impl TaskData {
    /// A task of `(content length, piece length)`, its bytes in `file`, no piece
    /// recorded yet.
    fn new(
        id: String,
        url: String,
        (content_length, piece_length): (u64, u64),
        dir: PathBuf,
        file: File,
        accessed: std::time::SystemTime,
    ) -> TaskData {
        TaskData {
            id,
            url,
            content_length,
            piece_length,
            dir,
            file,
            pieces: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            accessed: Mutex::new(accessed),
            wanted: Mutex::new(BTreeMap::new()),
            wanted_verified: Mutex::new(BTreeMap::new()),
            reader: Mutex::new((0, None)),
            verifying_reader: Mutex::new(None),
            want_signal: tokio::sync::Notify::new(),
            storing: Default::default(),
            dirty: std::sync::atomic::AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
            persisting: Mutex::new(std::time::Instant::now()),
            durable: Mutex::new(Vec::new()),
        }
    }

    /// Whether a reader waits on piece `number` now.
    pub fn is_wanted(&self, number: u32) -> bool {
        let wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        wanted.contains_key(&number)
    }

    /// It was used now.
    pub fn touch(&self) {
        *self.accessed.lock().unwrap_or_else(|e| e.into_inner()) = std::time::SystemTime::now();
    }

    /// A reader waits on piece `number` until the returned guard is dropped: the
    /// download fetches it ahead of the pieces nobody waits on.
    pub fn want(self: &Arc<Self>, number: u32) -> Want {
        self.want_as(number, false)
    }

    /// As [`TaskData::want`], for a reader that takes verified bytes only: a piece
    /// stored unverified for want of its SHA-256 is hashed at once.
    pub fn want_verified(self: &Arc<Self>, number: u32) -> Want {
        self.want_as(number, true)
    }

    fn want_as(self: &Arc<Self>, number: u32, verified: bool) -> Want {
        if verified {
            *self
                .wanted_verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(number)
                .or_insert(0) += 1;
        }
        *self
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(number)
            .or_insert(0) += 1;
        self.reader.lock().unwrap_or_else(|e| e.into_inner()).0 = number;
        self.want_signal.notify_one();
        Want {
            task: self.clone(),
            number,
            verified,
        }
    }

    /// The pieces readers wait on now, in order.
    pub fn wanted(&self) -> Vec<u32> {
        let wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        wanted.keys().copied().collect()
    }

    /// The pieces readers that take verified bytes only wait on now, in order.
    pub fn wanted_verified(&self) -> Vec<u32> {
        let wanted = self
            .wanted_verified
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        wanted.keys().copied().collect()
    }

    /// A local reader (a range read of a proxy client) reads piece `number` now: the
    /// download keeps close ahead of it, and is woken when that moves it on.
    /// `verifies`: the reader checks what it reads itself.
    pub fn reader_at(&self, number: u32, verifies: bool) {
        if verifies {
            *self
                .verifying_reader
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        }
        let mut r = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let moved = r.0 != number || r.1.is_none();
        *r = (number, Some(std::time::Instant::now()));
        drop(r);
        if moved {
            self.want_signal.notify_one();
        }
    }

    /// The piece a reader last read or waited on (0 when none has), and whether a local
    /// reader read within `recent`.
    pub fn reader(&self, recent: std::time::Duration) -> (u32, bool) {
        let (n, at) = *self.reader.lock().unwrap_or_else(|e| e.into_inner());
        (n, at.is_some_and(|at| at.elapsed() < recent))
    }

    /// Whether a local reader that checks what it reads itself read within `recent`.
    pub fn verifying_reader(&self, recent: std::time::Duration) -> bool {
        self.verifying_reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < recent)
    }

    /// Returns once a reader has started waiting on a piece since the last call.
    pub async fn want_changed(&self) {
        self.want_signal.notified().await
    }

    /// When it was last used.
    pub fn accessed(&self) -> std::time::SystemTime {
        *self.accessed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many pieces the task has (none when it is empty).
    pub fn piece_count(&self) -> u32 {
        self.content_length.div_ceil(self.piece_length) as u32
    }

    /// Offset and length of piece `number`, if it exists.
    pub fn piece_range(&self, number: u32) -> Option<(u64, u64)> {
        if number >= self.piece_count() {
            return None;
        }
        let offset = number as u64 * self.piece_length;
        Some((offset, self.piece_length.min(self.content_length - offset)))
    }

    /// The pieces stored, by number.
    pub fn pieces(&self) -> Vec<PieceMeta> {
        self.lock().iter().flatten().cloned().collect()
    }

    /// Piece `number`, if stored.
    pub fn piece(&self, number: u32) -> Option<PieceMeta> {
        self.lock().get(number as usize).cloned().flatten()
    }

    /// Whether every piece is stored.
    pub fn complete(&self) -> bool {
        self.lock().iter().all(Option::is_some)
    }

    /// Whether every piece stored is verified.
    pub fn all_verified(&self) -> bool {
        self.lock().iter().flatten().all(|p| p.verified)
    }

    /// Whether every piece is stored and verified: the task can be served as it is.
    pub fn ready(&self) -> bool {
        self.lock()
            .iter()
            .all(|p| p.as_ref().is_some_and(|p| p.verified))
    }

    /// Bytes stored.
    pub fn stored_bytes(&self) -> u64 {
        self.lock().iter().flatten().map(|p| p.length).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<PieceMeta>>> {
        self.pieces.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver woken on every piece stored or verified (not on a piece dropped).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes the subscribers (the download ended, or pieces were verified).
    pub fn wake(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Stores piece `number` (its bytes `data`, from `parent`, none: the origin;
    /// `verified`: see [`PieceMeta::verified`]). Refused when the length is not the
    /// piece's.
    pub fn store(
        &self,
        number: u32,
        data: &[u8],
        parent: Option<String>,
        verified: bool,
    ) -> io::Result<PieceMeta> {
        let sha256 = hex::encode(Sha256::digest(data));
        self.store_hashed(
            number,
            data,
            parent,
            verified,
            (sha256, crc32fast::hash(data)),
        )
    }

    /// [`TaskData::store`] of bytes whose SHA-256 (hex) and CRC-32 the caller computed
    /// already.
    pub fn store_hashed(
        &self,
        number: u32,
        data: &[u8],
        parent: Option<String>,
        verified: bool,
        (sha256, crc32): (String, u32),
    ) -> io::Result<PieceMeta> {
        let (offset, length) = self.piece_range(number).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("task {} has no piece {number}", self.id),
            )
        })?;
        if data.len() as u64 != length {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "piece {number} of task {}: {} bytes, not {length}",
                    self.id,
                    data.len()
                ),
            ));
        }
        self.touch();
        let meta = PieceMeta {
            number,
            offset,
            length,
            crc32,
            sha256,
            parent,
            verified,
        };
        // One store at a time, bytes and record together: two stores of one piece (a
        // download that gave up on a parent while its store went on, and the next
        // one) never leave one's bytes under the other's record. A piece stored
        // already stays, unless this one is verified and it is not.
        {
            let _one = self.storing(number);
            if let Some(held) = self.piece(number) {
                if held.verified || !verified {
                    return Ok(held);
                }
            }
            self.file.write_all_at(data, offset)?;
            // Readers have it at once (from the page cache); `meta.json` records it
            // later, after the bytes are synced (see [`TaskData::persist`]).
            self.lock()[number as usize] = Some(meta.clone());
            self.dirty.store(true, std::sync::atomic::Ordering::Release);
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        self.wake();
        // Now and then, once the readers were told: one sync for many pieces, not one
        // (and a rewrite of `meta.json`) for each. The piece is stored either way.
        if let Err(e) = self.persist_if_due() {
            tracing::warn!("task {}: writing meta.json: {e}", self.id);
        }
        Ok(meta)
    }

    /// [`TaskData::persist`], if the record changed and was last written
    /// [`PERSIST_EVERY`] ago or more (and no other write of it is under way).
    pub fn persist_if_due(&self) -> io::Result<()> {
        let due = self.dirty.load(std::sync::atomic::Ordering::Acquire)
            && self
                .persisting
                .try_lock()
                .is_ok_and(|last| last.elapsed() >= PERSIST_EVERY);
        if due {
            self.persist()?;
        }
        Ok(())
    }

    /// Writes the record of the pieces to `meta.json`, if it changed since it was last
    /// written, after syncing the task's bytes: a piece is never recorded on disk over
    /// bytes that did not reach it, so a crash loses at most recent pieces (fetched
    /// again), never the truth of the ones recorded. Stores call it at most every
    /// [`PERSIST_EVERY`]; the download calls it when it ends.
    pub fn persist(&self) -> io::Result<()> {
        let mut last = self.persisting.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        // Everything recorded in this snapshot was written to the file before it.
        let snapshot = self.lock().clone();
        *last = std::time::Instant::now();
        if let Err(e) = self.file.sync_data() {
            // The kernel may have dropped bytes it could not write, and a later sync
            // would not say so: the pieces not on record yet are forgotten (fetched
            // again), so that no record is ever written over them.
            let durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
            let mut pieces = self.lock();
            for (n, p) in snapshot.iter().enumerate() {
                if p.is_some() && !durable.get(n).copied().unwrap_or(false) && pieces[n] == *p {
                    pieces[n] = None;
                }
            }
            self.dirty.store(true, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        let r = self.save(&snapshot);
        match &r {
            Ok(()) => {
                *self.durable.lock().unwrap_or_else(|e| e.into_inner()) =
                    snapshot.iter().map(Option::is_some).collect();
            }
            Err(_) => self.dirty.store(true, std::sync::atomic::Ordering::Release),
        }
        r
    }

    /// The record changed: `meta.json` is rewritten (now, with `now`; else by the next
    /// [`TaskData::persist`]).
    fn changed_record(&self, now: bool) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        if now {
            if let Err(e) = self.persist() {
                tracing::warn!("task {}: writing meta.json: {e}", self.id);
            }
        }
    }

    /// Where the stored bytes are at: see [`TaskData::verify_all_if`].
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks every stored piece verified (the whole task matched its digest), if no
    /// piece was stored or dropped since [`TaskData::generation`] gave `generation`
    /// (the bytes hashed are the bytes stored); true when it did.
    pub fn verify_all_if(&self, generation: u64) -> bool {
        {
            let mut pieces = self.lock();
            if self.generation() != generation {
                return false;
            }
            for p in pieces.iter_mut().flatten() {
                p.verified = true;
            }
        }
        self.wake();
        self.changed_record(true);
        true
    }

    /// Marks verified each piece `(number, sha256)` whose bytes stored now have that
    /// SHA-256 (a digest their sender did not give), recorded once. A piece stored again
    /// since its digest was looked at is left as it is.
    pub fn verify(&self, digests: &[(u32, String)]) {
        {
            let mut pieces = self.lock();
            let mut changed = false;
            for (n, sha) in digests {
                if let Some(Some(p)) = pieces.get_mut(*n as usize) {
                    if p.sha256 == *sha && !p.verified {
                        p.verified = true;
                        changed = true;
                    }
                }
            }
            if !changed {
                return;
            }
        }
        self.wake();
        self.changed_record(false);
    }

    /// The SHA-256 of stored piece `number`, hashed from the file now if it was stored
    /// without one (see [`TaskData::store_hashed`]) and recorded with the piece;
    /// `None` when the piece is not stored.
    pub fn hash_piece(&self, number: u32) -> io::Result<Option<String>> {
        let _one = self.storing(number);
        let Some(p) = self.piece(number) else {
            return Ok(None);
        };
        if !p.sha256.is_empty() {
            return Ok(Some(p.sha256));
        }
        let mut h = Sha256::new();
        let mut buf = super::buffers::SLICES.take((1 << 20).min(p.length as usize));
        let mut at = 0;
        while at < p.length {
            let n = (p.length - at).min(buf.len() as u64) as usize;
            if let Err(e) = self.file.read_exact_at(&mut buf[..n], p.offset + at) {
                super::buffers::SLICES.give(buf);
                return Err(e);
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        super::buffers::SLICES.give(buf);
        let sha = hex::encode(h.finalize());
        // Stores of this piece wait on `_one`: the bytes hashed are the ones recorded.
        if let Some(Some(held)) = self.lock().get_mut(number as usize) {
            held.sha256 = sha.clone();
        }
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        Ok(Some(sha))
    }

    /// Whether piece `number` is stored and verified.
    pub fn verified(&self, number: u32) -> bool {
        self.piece(number).is_some_and(|p| p.verified)
    }

    /// Forgets piece `number` if the bytes stored now are the unverified ones with
    /// SHA-256 `sha256` (found bad); true when it did.
    pub fn drop_piece_if(&self, number: u32, sha256: &str) -> bool {
        self.drop_where(number, |p| !p.verified && p.sha256 == sha256)
    }

    /// Forgets piece `number` (found bad).
    pub fn drop_piece(&self, number: u32) {
        self.drop_where(number, |_| true);
    }

    /// Forgets piece `number` if it is stored unverified and unhashed (as stored while
    /// a reader that checks chunks itself read); true when it did.
    pub fn drop_unhashed(&self, number: u32) -> bool {
        self.drop_where(number, |p| !p.verified && p.sha256.is_empty())
    }

    /// Forgets piece `number` if it is stored and `bad` says so, and writes the record
    /// without it at once (bad bytes are never left recorded); true when it did.
    fn drop_where(&self, number: u32, bad: impl Fn(&PieceMeta) -> bool) -> bool {
        // No store of this piece until the record without it is written: its next
        // bytes are never written under the record of the bad ones.
        let _one = self.storing(number);
        {
            let mut pieces = self.lock();
            match pieces.get_mut(number as usize) {
                Some(p @ Some(_)) if p.as_ref().is_some_and(&bad) => *p = None,
                _ => return false,
            }
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        self.changed_record(true);
        true
    }

    /// The lock a store of piece `number` holds from its write to its record.
    fn storing(&self, number: u32) -> std::sync::MutexGuard<'_, ()> {
        self.storing[number as usize % 16]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `len` bytes at `offset`, all in stored pieces (verified ones, with
    /// `verified_only`); `None` when a piece is missing.
    pub fn read(&self, offset: u64, len: u64, verified_only: bool) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; len as usize];
        Ok(self
            .read_into(offset, &mut buf, verified_only)?
            .then_some(buf))
    }

    /// [`TaskData::read`] into `buf` (its length is the length read); `false` when a
    /// piece is missing.
    pub fn read_into(&self, offset: u64, buf: &mut [u8], verified_only: bool) -> io::Result<bool> {
        if buf.is_empty() {
            return Ok(true);
        }
        let first = (offset / self.piece_length) as u32;
        let last = ((offset + buf.len() as u64 - 1) / self.piece_length) as u32;
        let usable = |n| match self.piece(n) {
            Some(p) => p.verified || !verified_only,
            None => false,
        };
        if !(first..=last).all(usable) {
            return Ok(false);
        }
        self.touch();
        self.file.read_exact_at(buf, offset)?;
        Ok(true)
    }

    /// The SHA-256 of the whole task's bytes as stored (verified or not), read 1 MiB at
    /// a time into one buffer; `None` when a piece is missing.
    pub fn blob_sha256(&self) -> io::Result<Option<String>> {
        let mut h = Sha256::new();
        let mut buf = vec![0; 1 << 20];
        let mut at = 0;
        while at < self.content_length {
            let n = (self.content_length - at).min(buf.len() as u64) as usize;
            if !self.read_into(at, &mut buf[..n], false)? {
                return Ok(None);
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(Some(hex::encode(h.finalize())))
    }

    /// Checks a task found complete but not all verified (pieces stored unhashed while a
    /// client that verifies chunks itself read, recorded before the peer stopped)
    /// against its blob digest: all verified when it matches, the unverified pieces
    /// dropped when it does not (fetched again when asked for). Nothing to do without a
    /// blob digest or with a piece missing; `Some(matched)` when checked.
    pub fn check_stored(&self) -> io::Result<Option<bool>> {
        let Some(want) = blob_digest(&self.url) else {
            return Ok(None);
        };
        if !self.complete() || self.all_verified() {
            return Ok(None);
        }
        let generation = self.generation();
        let Some(got) = self.blob_sha256()? else {
            return Ok(None);
        };
        // Pieces stored or dropped meanwhile (a download started): its own check
        // judges them.
        if got == want {
            return Ok(self.verify_all_if(generation).then_some(true));
        }
        if self.generation() != generation {
            return Ok(None);
        }
        for p in self.pieces().into_iter().filter(|p| !p.verified) {
            self.drop_piece(p.number);
        }
        Ok(Some(false))
    }

    /// The data file (for serving without copies).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn save(&self, pieces: &[Option<PieceMeta>]) -> io::Result<()> {
        let meta = Meta {
            id: self.id.clone(),
            url: self.url.clone(),
            content_length: self.content_length,
            piece_length: self.piece_length,
            pieces: pieces.iter().flatten().cloned().collect(),
        };
        let tmp = self.dir.join("meta.json.tmp");
        {
            use std::io::Write;
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&meta).map_err(io::Error::other)?)?;
            f.sync_data()?;
        }
        std::fs::rename(tmp, self.dir.join("meta.json"))
    }
}

/// All tasks on disk.
pub struct Storage {
    dir: PathBuf,
    tasks: Mutex<HashMap<String, Arc<TaskData>>>,
}

impl Storage {
    /// The storage in `dir`, with the tasks a previous run left there.
    pub fn open(dir: &Path) -> io::Result<Storage> {
        std::fs::create_dir_all(dir.join("tasks"))?;
        let s = Storage {
            dir: dir.to_path_buf(),
            tasks: Mutex::default(),
        };
        for e in std::fs::read_dir(dir.join("tasks"))?.flatten() {
            match s.load(&e.path()) {
                Ok(t) => {
                    tracing::info!(
                        "task {}: {} of {} pieces on disk",
                        t.id,
                        t.pieces().len(),
                        t.piece_count()
                    );
                    s.lock().insert(t.id.clone(), Arc::new(t));
                }
                // A task created and never recorded (the peer stopped before its
                // first pieces were): nothing in it is known, and nothing else
                // would ever remove it.
                Err(e2)
                    if e2.kind() == io::ErrorKind::NotFound
                        && !e.path().join("meta.json").exists() =>
                {
                    tracing::info!("{}: never recorded; removed", e.path().display());
                    let _ = std::fs::remove_dir_all(e.path());
                }
                Err(e2) => tracing::warn!("{}: left out: {e2}", e.path().display()),
            }
        }
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TaskData>>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load(&self, dir: &Path) -> io::Result<TaskData> {
        let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("data"))?;
        if meta.piece_length == 0 || meta.content_length.div_ceil(meta.piece_length) > 1 << 24 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("piece length {}", meta.piece_length),
            ));
        }
        if file.metadata()?.len() != meta.content_length {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the data file is not the task's length",
            ));
        }
        // A task of an earlier run was last used when its record was last written.
        let accessed = std::fs::metadata(dir.join("meta.json"))
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| std::time::SystemTime::now());
        let t = TaskData::new(
            meta.id,
            meta.url,
            (meta.content_length, meta.piece_length),
            dir.to_path_buf(),
            file,
            accessed,
        );
        let mut pieces = vec![None; t.piece_count() as usize];
        for p in meta.pieces {
            if t.piece_range(p.number) == Some((p.offset, p.length)) {
                let n = p.number as usize;
                pieces[n] = Some(p);
            }
        }
        *t.durable.lock().unwrap_or_else(|e| e.into_inner()) =
            pieces.iter().map(Option::is_some).collect();
        *t.lock() = pieces;
        Ok(t)
    }

    /// Task `id`, if stored.
    pub fn get(&self, id: &str) -> Option<Arc<TaskData>> {
        self.lock().get(id).cloned()
    }

    /// Task `id` of `content_length` bytes in pieces of `piece_length`: the one stored
    /// (if it has that shape), or a new empty one.
    pub fn create(
        &self,
        id: &str,
        url: &str,
        content_length: u64,
        piece_length: u64,
    ) -> io::Result<Arc<TaskData>> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("task id {id:?} is not a file name"),
            ));
        }
        if piece_length == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "piece length 0",
            ));
        }
        let mut tasks = self.lock();
        if let Some(t) = tasks.get(id) {
            if t.content_length == content_length && t.piece_length == piece_length {
                return Ok(t.clone());
            }
            tasks.remove(id);
        }
        let dir = self.dir.join("tasks").join(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("data"))?;
        file.set_len(content_length)?;
        let t = TaskData::new(
            id.to_string(),
            url.to_string(),
            (content_length, piece_length),
            dir,
            file,
            std::time::SystemTime::now(),
        );
        *t.lock() = vec![None; t.piece_count() as usize];
        // Recorded with its first pieces (a sync here held a reader's first bytes back
        // by tens of milliseconds); a task directory left without a record by a crash
        // before then is removed at the next start.
        t.dirty.store(true, std::sync::atomic::Ordering::Release);
        let t = Arc::new(t);
        tasks.insert(id.to_string(), t.clone());
        Ok(t)
    }

    /// Removes task `id`; `false` when there was none.
    pub fn delete(&self, id: &str) -> bool {
        let gone = self.lock().remove(id);
        if let Some(t) = &gone {
            let _ = std::fs::remove_dir_all(&t.dir);
        }
        gone.is_some()
    }

    /// Removes the tasks not used for `ttl`, then, while the tasks hold more than
    /// `capacity` bytes, the least recently used; never one `busy` says is in use.
    /// Returns the ids removed.
    pub fn gc(
        &self,
        ttl: std::time::Duration,
        capacity: Option<u64>,
        busy: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let now = std::time::SystemTime::now();
        let mut tasks = self.tasks();
        tasks.sort_by_key(|t| t.accessed());
        let mut total: u64 = tasks.iter().map(|t| t.content_length).sum();
        let mut removed = Vec::new();
        for t in tasks {
            if busy(&t.id) {
                continue;
            }
            let idle = now.duration_since(t.accessed()).unwrap_or_default();
            let over = capacity.is_some_and(|c| total > c);
            if (idle > ttl || over) && self.delete(&t.id) {
                total -= t.content_length;
                removed.push(t.id.clone());
            }
        }
        removed
    }

    /// Every task.
    pub fn tasks(&self) -> Vec<Arc<TaskData>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_and_drops_by_digest_touch_only_the_bytes_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path()).unwrap();
        let t = s.create("t", "u", 8 << 20, 4 << 20).unwrap();
        let (good, bad) = (vec![1u8; 4 << 20], vec![2u8; 4 << 20]);
        let sha = |d: &[u8]| hex::encode(Sha256::digest(d));
        t.store(0, &bad, Some("liar".into()), false).unwrap();
        // Its digest was looked at; meanwhile it was dropped and stored again (other
        // bytes): the stale verdicts change nothing.
        t.drop_piece(0);
        t.store(0, &good, Some("honest".into()), false).unwrap();
        assert!(
            !t.drop_piece_if(0, &sha(&bad)),
            "dropped bytes it had not looked at"
        );
        t.verify(&[(0, sha(&bad))]);
        assert!(!t.verified(0), "verified bytes that do not match");
        t.verify(&[(0, sha(&good))]);
        assert!(t.verified(0));
        // A verified piece stays: neither dropped by digest nor replaced.
        assert!(!t.drop_piece_if(0, &sha(&good)));
        let held = t.store(0, &bad, None, false).unwrap();
        assert_eq!(held.sha256, sha(&good));
    }

    #[test]
    fn a_piece_stored_without_its_sha256_is_hashed_from_the_file_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path()).unwrap();
        let t = Arc::new(s.create("t", "u", 8 << 20, 4 << 20).unwrap());
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let sha = hex::encode(Sha256::digest(&data));
        let crc = crc32fast::hash(&data);
        t.store_hashed(1, &data, Some("p".into()), false, (String::new(), crc))
            .unwrap();
        // Unverified and unhashed: readers that take verified bytes only do not get it,
        // and a digest check cannot verify it before it is hashed.
        assert!(t.read(4 << 20, 16, true).unwrap().is_none());
        t.verify(&[(1, sha.clone())]);
        assert!(!t.verified(1));
        assert_eq!(t.hash_piece(0).unwrap(), None, "piece 0 is not stored");
        assert_eq!(t.hash_piece(1).unwrap().as_deref(), Some(sha.as_str()));
        assert_eq!(t.piece(1).unwrap().sha256, sha, "the hash is not recorded");
        t.verify(&[(1, sha.clone())]);
        assert!(t.verified(1));
        assert_eq!(t.read(4 << 20, 4, true).unwrap().unwrap(), &data[..4]);
        // Which readers wait on what: all, and those that need verified bytes.
        let (a, b) = (t.want(0), t.want_verified(1));
        assert_eq!(t.wanted(), [0, 1]);
        assert_eq!(t.wanted_verified(), [1]);
        drop((a, b));
        assert!(t.wanted().is_empty() && t.wanted_verified().is_empty());
        // A local reader that checks chunks itself reads now.
        assert!(!t.verifying_reader(std::time::Duration::from_secs(5)));
        t.reader_at(0, false);
        assert!(!t.verifying_reader(std::time::Duration::from_secs(5)));
        t.reader_at(0, true);
        assert!(t.verifying_reader(std::time::Duration::from_secs(5)));
    }

    #[test]
    fn a_complete_task_of_unhashed_pieces_found_at_start_is_checked_by_its_blob_digest() {
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let hex = hex::encode(Sha256::digest(&data));
        for (named, matches) in [(hex.clone(), true), ("0".repeat(64), false)] {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("http://r/v2/x/blobs/sha256:{named}");
            {
                let s = Storage::open(dir.path()).unwrap();
                let t = s.create(&named, &url, 8 << 20, 4 << 20).unwrap();
                for n in 0..2usize {
                    let part = &data[n * (4 << 20)..(n + 1) * (4 << 20)];
                    let digests = (String::new(), crc32fast::hash(part));
                    t.store_hashed(n as u32, part, Some("p".into()), false, digests)
                        .unwrap();
                }
                t.persist().unwrap();
            }
            let s = Storage::open(dir.path()).unwrap();
            let t = s.get(&named).expect("the task is found again");
            assert!(t.complete() && !t.all_verified());
            assert_eq!(t.check_stored().unwrap(), Some(matches));
            if matches {
                assert!(t.ready(), "every piece verified by the blob's digest");
            } else {
                assert!(t.pieces().is_empty(), "the unverified pieces dropped");
            }
            assert_eq!(t.check_stored().unwrap(), None, "nothing left to check");
        }
    }

    #[test]
    fn gc_removes_idle_tasks_then_the_least_recently_used_never_busy_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path()).unwrap();
        let ago = |secs| std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
        for (id, age) in [("old", 7200), ("mid", 60), ("new", 1), ("busy", 9000)] {
            let t = s.create(id, "u", 100, 4 << 20).unwrap();
            *t.accessed.lock().unwrap() = ago(age);
        }
        let ttl = std::time::Duration::from_secs(3600);
        let gone = s.gc(ttl, None, |id| id == "busy");
        assert_eq!(gone, ["old"]);
        // Over capacity (3 x 100 bytes kept, room for 250): the least recently used goes.
        let gone = s.gc(ttl, Some(250), |id| id == "busy");
        assert_eq!(gone, ["mid"]);
        assert!(s.get("new").is_some() && s.get("busy").is_some());
    }

    #[test]
    fn task_ids_and_piece_lengths_are_dfdaemons() {
        let hex = "ab".repeat(32);
        assert_eq!(
            task_id(&format!("http://r/v2/x/blobs/sha256:{hex}?ns=y")),
            hex
        );
        assert_eq!(
            blob_digest(&format!("http://r/v2/x/blobs/sha256:{hex}")),
            Some(hex)
        );
        assert_eq!(blob_digest("http://r/file"), None);
        assert_eq!(
            blob_digest(&format!("http://r/v2/x/blobs/sha256:{}", "AB".repeat(32))),
            Some("ab".repeat(32))
        );
        assert_ne!(
            task_id("http://r/get?file=a"),
            task_id("http://r/get?file=b")
        );
        assert_eq!(piece_length(1), 4 << 20);
        assert_eq!(piece_length(256 << 20), 4 << 20);
        assert_eq!(piece_length(4 << 30), 16 << 20);
        assert_eq!(piece_length(1 << 40), 64 << 20);
    }

    #[test]
    fn the_record_on_disk_follows_the_bytes_and_drops_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path()).unwrap();
        s.create("abc", "http://x", 12, 4).unwrap();
        let on_disk = || {
            let again = Storage::open(dir.path()).unwrap();
            again.get("abc").map(|t| t.pieces().len())
        };
        // Not recorded when created: a start now finds nothing it knows, and removes
        // the task's directory.
        drop(s);
        let data = dir.path().join("tasks/abc/data");
        assert!(data.exists());
        assert_eq!(on_disk(), None);
        assert!(
            !data.exists(),
            "the unrecorded task's directory is still there"
        );
        let s = Storage::open(dir.path()).unwrap();
        let t = s.create("abc", "http://x", 12, 4).unwrap();
        t.persist().unwrap();
        assert_eq!(on_disk(), Some(0));
        // Stored, readable, not yet on record (the record was written under 1 s ago):
        // a crash now loses the record of the piece, never makes it lie.
        t.store(0, b"0123", None, true).unwrap();
        t.store(1, b"4567", Some("p".into()), false).unwrap();
        assert_eq!(t.read(0, 8, false).unwrap().unwrap(), b"01234567");
        assert_eq!(on_disk(), Some(0));
        t.persist().unwrap();
        assert_eq!(on_disk(), Some(2));
        // A piece found bad is off the record at once.
        assert!(t.drop_piece_if(1, &hex::encode(Sha256::digest(b"4567"))));
        assert_eq!(on_disk(), Some(1));
        // Later stores are recorded once a second has passed since the last write.
        std::thread::sleep(PERSIST_EVERY);
        t.store(2, b"89ab", None, true).unwrap();
        assert_eq!(on_disk(), Some(2));
    }

    #[test]
    fn pieces_are_kept_across_a_restart_and_bad_pieces_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path()).unwrap();
        let t = s.create("abc", "http://x", 10, 4).unwrap();
        assert_eq!(t.piece_count(), 3);
        assert_eq!(t.piece_range(2), Some((8, 2)));
        assert!(
            t.store(2, b"xyz", None, true).is_err(),
            "a piece of the wrong length"
        );
        assert!(
            t.store(3, b"xy", None, true).is_err(),
            "a piece past the end"
        );
        t.store(0, b"0123", Some("p".into()), false).unwrap();
        t.store(2, b"89", None, true).unwrap();
        assert_eq!(t.read(0, 4, false).unwrap().unwrap(), b"0123");
        assert_eq!(t.read(0, 4, true).unwrap(), None, "piece 0 is not verified");
        assert_eq!(t.read(2, 4, false).unwrap(), None, "piece 1 is missing");
        // What a download does when it ends.
        t.persist().unwrap();
        drop((t, s));
        let s = Storage::open(dir.path()).unwrap();
        let t = s.get("abc").unwrap();
        assert_eq!(t.pieces().len(), 2);
        assert!(t.verified(2) && !t.verified(0));
        assert_eq!(t.read(8, 2, true).unwrap().unwrap(), b"89");
        let generation = t.generation();
        t.drop_piece(2);
        assert!(!t.verify_all_if(generation), "a piece dropped since");
        assert!(!t.verified(0));
        assert!(t.verify_all_if(t.generation()));
        assert!(t.verified(0));
        assert!(s.create("../x", "u", 1, 1).is_err());
        assert!(s.delete("abc"));
        assert!(s.get("abc").is_none());
    }
}
