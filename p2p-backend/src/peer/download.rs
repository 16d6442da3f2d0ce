//! One download of a task, driven through the scheduler as dfdaemon drives it: an
//! `AnnouncePeer` stream registered with the download, answered with candidate parents
//! (pieces come from them: `DfdaemonUpload/SyncPieces` says which they hold, Vortex
//! brings them), or sent to the origin (a seed peer, or when no seed can serve), each
//! piece reported as it is stored, the stream finished with the download and read to
//! its end.
//!
//! What is stored is checked: a piece from a parent against the CRC-32 the parent sent,
//! and against the SHA-256 our seed recorded when it fetched the piece from the origin
//! (handed out by our scheduler with the candidate parents); a task whose URL names a
//! blob digest is checked whole once complete, and dropped if it does not match. A
//! parent that sends a bad piece is not asked again in this download and is reported to
//! the scheduler (`DownloadPieceFailedRequest`, and in the `ReschedulePeerRequest`).

use super::storage::{self, PieceMeta, TaskData};
use super::PeerInner;
use dragonfly_api::common::v2::{Download, Peer as PeerMsg, Piece, TrafficType};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::SyncPiecesRequest;
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Req;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as Resp;
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::*;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Pieces fetched at once by one download.
const CONCURRENT_PIECES: usize = 4;
/// Pieces fetched at once that no reader waits on: one place of [`CONCURRENT_PIECES`]
/// stays free, so a piece a reader waits on starts at once.
const BACKGROUND_PIECES: usize = CONCURRENT_PIECES - 1;
/// How far ahead of a local reader (in pieces) the pieces nobody waits on are fetched
/// while it reads...
const AHEAD_OF_READER: u32 = 4;
/// ...and how many of them at once.
const READER_BACKGROUND_PIECES: usize = 1;
/// How long at most a complete task's check waits for a local reader that checks chunks
/// itself to stop reading (see `check_whole`).
const WHOLE_CHECK_WAIT: Duration = Duration::from_secs(30);
/// A reader read within this long is reading.
const READER_ACTIVE: Duration = Duration::from_millis(500);
/// How long one piece may take from a parent.
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// How errors of a scheduler that went away begin.
const SCHEDULER_LOST: &str = "the scheduler went away";
/// How many times a download registers again after its scheduler went away.
const SCHEDULER_RETRIES: u32 = 30;
/// MiB of pieces fetched from parents held in memory at once, over all downloads.
pub const PIECE_MEMORY_MIB: usize = 256;
/// How long a message to the scheduler may wait to be taken.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a parent's `SyncPieces` stream, and a download's pieces, may go without
/// progress before the parents count as failed (dfdaemon's `collected_piece_timeout`
/// is 360 s; loopback swarms move far faster).
const NO_PROGRESS: Duration = Duration::from_secs(120);
/// When a download from parents first asks the scheduler for our seeds' digests of
/// pieces stored without one (see [`poll_seed_digests`]).
const DIGEST_POLL: Duration = Duration::from_millis(200);
/// How soon the scheduler is asked again after a poll that verified pieces, and the
/// least time between two polls.
const DIGEST_POLL_SOON: Duration = Duration::from_millis(20);
/// The longest pause between polls (a swarm whose seed is a dfdaemon has no digests).
const DIGEST_POLL_MAX: Duration = Duration::from_secs(5);
/// Pieces asked of a seed ahead of its offer at once, per download.
const AHEAD_JOBS: usize = 2;
/// How long a download of `len` bytes whose pieces are all stored waits for our
/// seeds' digests of the last ones before it hashes the whole blob instead: about as
/// long as that hashing takes on a slow core (a second per 512 MiB), 0.5 s to 2 s.
fn last_digests_wait(len: u64) -> Duration {
    Duration::from_secs_f64(len as f64 / (512 << 20) as f64)
        .clamp(Duration::from_millis(500), Duration::from_secs(2))
}
/// How long a scheduler may take to answer a registration.
const SCHEDULE_TIMEOUT: Duration = Duration::from_secs(60);

/// How the download ended.
pub type Outcome = Result<Arc<TaskData>, String>;

/// Runs the download of `download` (task `task_id`) to its end. `started` hears the
/// task once its length is known (a seed's `DownloadTask` answers then).
pub async fn run(
    peer: Arc<PeerInner>,
    task_id: String,
    download: Download,
    started: Option<mpsc::Sender<Arc<TaskData>>>,
) -> Outcome {
    if let Some(t) = peer.storage.get(&task_id).filter(|t| t.ready()) {
        if let Some(s) = started {
            let _ = s.send(t.clone()).await;
        }
        return Ok(t);
    }
    let started_at = std::time::Instant::now();
    let mut started = started;
    let mut outcome;
    let (mut dropped, mut lost) = (0, 0);
    loop {
        // The scheduler of the moment: a dynconfig change or a restart may move it.
        let scheduler = peer
            .scheduler_for(&task_id)
            .ok_or_else(|| "no scheduler is configured (--dynconfig)".to_string())?;
        let d = Driver {
            peer: peer.clone(),
            task_id: task_id.clone(),
            peer_id: format!("{}-{}-{}", peer.host_id, task_id, peer.next_id()),
            download: download.clone(),
            started: started.take(),
            failure_sent: false,
            scheduler: String::new(),
        };
        outcome = d.through(&scheduler).await;
        match &outcome {
            // Once more without the suspects (the origin if nobody else has it).
            Err(e) if e.contains("were dropped") && dropped < 1 => {
                dropped += 1;
                tracing::warn!("task {task_id}: {e}; fetching the dropped pieces again");
            }
            // A scheduler that went away (a restart): the pieces stored are kept, and the
            // download registers again once it is back.
            Err(e) if e.starts_with(SCHEDULER_LOST) && lost < SCHEDULER_RETRIES => {
                lost += 1;
                tracing::warn!("task {task_id}: {e}; registering again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => break,
        }
    }
    // What was stored is recorded on disk before the download is said to have ended.
    if let Some(t) = peer.storage.get(&task_id) {
        let persisted = tokio::task::spawn_blocking(move || t.persist()).await;
        if let Ok(Err(e)) = persisted {
            tracing::warn!("task {task_id}: writing meta.json: {e}");
        }
    }
    match outcome {
        Ok(t) => {
            let from_origin = t.pieces().iter().filter(|p| p.parent.is_none()).count();
            tracing::info!(
                "task {task_id}: complete in {:?}, {} pieces, {from_origin} of them from the origin",
                started_at.elapsed(),
                t.piece_count()
            );
            Ok(t)
        }
        Err(e) => {
            tracing::warn!("task {task_id}: {e}");
            Err(e)
        }
    }
}

struct Driver {
    peer: Arc<PeerInner>,
    task_id: String,
    peer_id: String,
    download: Download,
    started: Option<mpsc::Sender<Arc<TaskData>>>,
    /// The scheduler was told of the download's failure already.
    failure_sent: bool,
    /// The scheduler's address.
    scheduler: String,
}

/// The stream to the scheduler.
struct Announce {
    tx: mpsc::Sender<AnnouncePeerRequest>,
    rx: tonic::Streaming<AnnouncePeerResponse>,
}

impl Driver {
    fn msg(&self, r: Req) -> AnnouncePeerRequest {
        AnnouncePeerRequest {
            host_id: self.peer.host_id.clone(),
            task_id: self.task_id.clone(),
            peer_id: self.peer_id.clone(),
            request: Some(r),
        }
    }

    /// Sends `r` on the stream; a scheduler that does not take it within 10 s is left
    /// behind (the download goes on; its end is not heard).
    async fn send(&self, a: &Announce, r: Req) {
        let _ = a.tx.send_timeout(self.msg(r), SEND_TIMEOUT).await;
    }

    async fn next(&self, a: &mut Announce) -> Result<Resp, String> {
        match tokio::time::timeout(SCHEDULE_TIMEOUT, a.rx.message()).await {
            Err(_) => Err(format!("{SCHEDULER_LOST}: it did not answer")),
            Ok(Err(e))
                if e.code() == tonic::Code::Unavailable || e.code() == tonic::Code::Unknown =>
            {
                Err(format!("{SCHEDULER_LOST}: {}", e.message()))
            }
            Ok(Err(e)) => Err(format!("the scheduler: {}", e.message())),
            Ok(Ok(None)) => Err(format!("{SCHEDULER_LOST}: it ended the stream")),
            Ok(Ok(Some(m))) => m
                .response
                .ok_or_else(|| "an empty answer from the scheduler".to_string()),
        }
    }

    fn registered(&self, content_length: Option<u64>) -> Download {
        registered(&self.download, content_length)
    }

    async fn through(mut self, scheduler: &str) -> Outcome {
        self.scheduler = scheduler.to_string();
        // A seed learns the length from the origin first (dfdaemon's 1-byte probe), and
        // registers it, so that its children know it from the scheduler.
        let length = if self.peer.config.seed_peer.enable {
            Some(self.peer.origin_length(&self.download).await?)
        } else {
            self.peer
                .storage
                .get(&self.task_id)
                .map(|t| t.content_length)
        };
        let endpoint = format!("http://{scheduler}");
        let mut client = SchedulerClient::connect(endpoint)
            .await
            .map_err(|e| format!("{SCHEDULER_LOST}: connecting to {scheduler}: {e}"))?;
        let (tx, rx) = mpsc::channel(64);
        let register = self.msg(Req::RegisterPeerRequest(RegisterPeerRequest {
            download: Some(self.registered(length)),
        }));
        tx.send(register).await.map_err(|e| e.to_string())?;
        let rx = client
            .announce_peer(ReceiverStream::new(rx))
            .await
            .map_err(|e| match e.code() {
                tonic::Code::Unavailable => {
                    format!("{SCHEDULER_LOST}: {scheduler}: {}", e.message())
                }
                _ => format!("the scheduler {scheduler}: {}", e.message()),
            })?
            .into_inner();
        let mut a = Announce { tx, rx };
        let mut excluded: HashSet<String> = HashSet::new();
        let result = loop {
            let resp = match self.next(&mut a).await {
                Ok(r) => r,
                Err(e) => break Err(e),
            };
            tracing::info!(
                "task {}: the scheduler answered {} {:?}",
                self.task_id,
                answer_name(&resp),
                match &resp {
                    Resp::NormalTaskResponse(r) => r
                        .candidate_parents
                        .iter()
                        .map(|p| p.id.clone())
                        .collect::<Vec<_>>(),
                    _ => Vec::new(),
                }
            );
            match resp {
                Resp::NeedBackToSourceResponse(_) => {
                    break self.back_to_source(&a, length).await;
                }
                Resp::MetadataOnlyResponse(_) => {
                    break match self
                        .peer
                        .storage
                        .get(&self.task_id)
                        .filter(|t| t.complete())
                    {
                        Some(t) => {
                            self.send(
                                &a,
                                Req::DownloadPeerFinishedRequest(DownloadPeerFinishedRequest {}),
                            )
                            .await;
                            Ok(t)
                        }
                        None => Err("the scheduler said the task is here; it is not".into()),
                    };
                }
                Resp::EmptyTaskResponse(_) => {
                    if self
                        .peer
                        .storage
                        .get(&self.task_id)
                        .is_some_and(|t| t.content_length > 0)
                        || storage::blob_digest(&self.download.url)
                            .is_some_and(|d| d != storage::EMPTY_SHA256)
                    {
                        break Err("the scheduler says the task is empty; it is not".into());
                    }
                    self.send(
                        &a,
                        Req::DownloadPeerStartedRequest(DownloadPeerStartedRequest {}),
                    )
                    .await;
                    let t = self.task(0)?;
                    self.send(
                        &a,
                        Req::DownloadPeerFinishedRequest(DownloadPeerFinishedRequest {}),
                    )
                    .await;
                    break Ok(t);
                }
                Resp::NormalTaskResponse(r) => {
                    match self
                        .via_parents(&a, r.candidate_parents, &mut excluded, length)
                        .await
                    {
                        Ok(t) => break Ok(t),
                        Err(failed) => {
                            tracing::info!("task {}: parents failed: {failed}", self.task_id);
                            let parents = excluded
                                .iter()
                                .map(|id| PeerMsg {
                                    id: id.clone(),
                                    ..Default::default()
                                })
                                .collect();
                            self.send(
                                &a,
                                Req::ReschedulePeerRequest(ReschedulePeerRequest {
                                    candidate_parents: parents,
                                    description: Some(failed),
                                }),
                            )
                            .await;
                        }
                    }
                }
            }
        };
        match &result {
            Ok(_) => {}
            Err(_) if self.failure_sent => {}
            Err(e) => {
                self.send(
                    &a,
                    Req::DownloadPeerFailedRequest(DownloadPeerFailedRequest {
                        description: Some(e.clone()),
                    }),
                )
                .await;
            }
        }
        // The scheduler ends the stream after the finished or failed message.
        drop(a.tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = a.rx.message().await {}
        })
        .await;
        self.started.take();
        result
    }

    fn task(&mut self, content_length: u64) -> Result<Arc<TaskData>, String> {
        let t = self
            .peer
            .storage
            .create(
                &self.task_id,
                &self.download.url,
                content_length,
                storage::piece_length(content_length),
            )
            .map_err(|e| format!("storing task {}: {e}", self.task_id))?;
        if let Some(s) = self.started.take() {
            let _ = s.try_send(t.clone());
        }
        self.peer.running(&t);
        Ok(t)
    }

    async fn back_to_source(&mut self, a: &Announce, length: Option<u64>) -> Outcome {
        self.send(
            a,
            Req::DownloadPeerBackToSourceStartedRequest(DownloadPeerBackToSourceStartedRequest {
                description: None,
            }),
        )
        .await;
        let length = match length {
            Some(n) => n,
            None => self.peer.origin_length(&self.download).await?,
        };
        let t = self.task(length)?;
        let mut missing: BTreeSet<u32> = (0..t.piece_count())
            .filter(|n| t.piece(*n).is_none())
            .collect();
        // Fetches hold the places of [`CONCURRENT_PIECES`]; a piece fetched is stored
        // (hashed, written) while the next one's fetch is under way.
        let mut jobs = tokio::task::JoinSet::new();
        let mut stores = tokio::task::JoinSet::new();
        let mut failure = None;
        loop {
            if failure.is_none() {
                // At most one piece being stored beside the fetches: pieces in memory
                // stay within the places, plus one.
                let busy = jobs.len() + stores.len().saturating_sub(1);
                for (n, wanted) in pick(&t, &missing, busy, false).0 {
                    missing.remove(&n);
                    let (peer, t, d) = (self.peer.clone(), t.clone(), self.download.clone());
                    let limit = self.background_limit(wanted);
                    jobs.spawn(async move {
                        let (offset, len) = t.piece_range(n).expect("a piece of the task");
                        background_wait(limit, &t, n, len).await;
                        (n, peer.origin_range(&d, offset, len).await)
                    });
                }
            }
            if jobs.is_empty() && stores.is_empty() {
                break;
            }
            let abnormal = |e: tokio::task::JoinError| {
                (
                    u32::MAX,
                    Err(format!("a piece's download ended abnormally: {e}")),
                )
            };
            let (n, r) = tokio::select! {
                Some(r) = jobs.join_next(), if !jobs.is_empty() => match r {
                    Ok((n, Ok(data))) => {
                        let t = t.clone();
                        stores.spawn(async move { (n, store(&t, n, data, None, true).await) });
                        continue;
                    }
                    Ok((n, Err(e))) => (n, Err(e)),
                    // Stopped after the first failure: nothing to report.
                    Err(e) if e.is_cancelled() => continue,
                    Err(e) => abnormal(e),
                },
                Some(r) = stores.join_next(), if !stores.is_empty() => r.unwrap_or_else(abnormal),
                // A reader waits on a piece: it may start now.
                _ = t.want_changed() => continue,
            };
            match r {
                Ok(meta) => {
                    self.send(
                        a,
                        Req::DownloadPieceBackToSourceFinishedRequest(
                            DownloadPieceBackToSourceFinishedRequest {
                                piece: Some(piece_msg(&meta, true)),
                            },
                        ),
                    )
                    .await;
                }
                Err(e) => {
                    // As dfdaemon: the other fetches stop at the first failure.
                    jobs.abort_all();
                    self.send(
                        a,
                        Req::DownloadPieceBackToSourceFailedRequest(
                            DownloadPieceBackToSourceFailedRequest {
                                piece_number: (n != u32::MAX).then_some(n),
                                response: None,
                            },
                        ),
                    )
                    .await;
                    failure.get_or_insert(e);
                }
            }
        }
        let failure = match failure {
            Some(e) => Some(e),
            None => self.check_whole(&t, &HashMap::new()).await.err(),
        };
        if let Some(e) = failure {
            // dfdaemon's message for a download from the origin that failed (the
            // caller sends no other).
            self.send(
                a,
                Req::DownloadPeerBackToSourceFailedRequest(DownloadPeerBackToSourceFailedRequest {
                    description: Some(e.clone()),
                }),
            )
            .await;
            self.failure_sent = true;
            return Err(e);
        }
        self.send(
            a,
            Req::DownloadPeerBackToSourceFinishedRequest(
                DownloadPeerBackToSourceFinishedRequest {},
            ),
        )
        .await;
        Ok(t)
    }

    /// The whole task checked once complete: against its blob digest when the URL
    /// names one (every piece verified when it matches; when it does not, the pieces
    /// not verified otherwise are dropped, and their senders suspected unless our
    /// seeds' SHA-256 in `known` clears them); without one, there is nothing but the
    /// senders' CRC-32 to go by, and the pieces count as verified.
    async fn check_whole(
        &self,
        t: &Arc<TaskData>,
        known: &HashMap<u32, String>,
    ) -> Result<(), String> {
        let Some(want) = storage::blob_digest(&self.download.url) else {
            // No digest to check against: pieces from parents stay unverified (served to
            // this peer's clients, never to other peers).
            return Ok(());
        };
        if t.all_verified() {
            return Ok(());
        }
        // Pieces stored without their SHA-256 while a reader that checks chunks itself
        // read (see `lazy` in `via_parents`): the blob is hashed once that reader has
        // stopped, so that the hashing does not take the CPU from it; at once when a
        // reader waits for verified bytes, and at most `WHOLE_CHECK_WAIT` later.
        let deadline = tokio::time::Instant::now() + WHOLE_CHECK_WAIT;
        while t.verifying_reader(READER_ACTIVE)
            && t.wanted_verified().is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(READER_ACTIVE / 5).await;
        }
        // Hashing the whole blob is kept off the threads that serve requests. Its verdict
        // holds only for the bytes hashed: if a piece was stored or dropped meanwhile (a
        // client's report of a bad range), it is hashed again.
        let mut tries = 0;
        let got = loop {
            tries += 1;
            self.peer.metrics.blob_hashes.inc();
            let generation = t.generation();
            let whole = t.clone();
            let got = tokio::task::spawn_blocking(move || match whole.blob_sha256() {
                Ok(Some(hex)) => Ok(hex),
                Ok(None) => Err("a piece went missing".to_string()),
                Err(e) => Err(e.to_string()),
            })
            .await
            .map_err(|e| format!("hashing the blob: {e}"))??;
            if got == want {
                let t2 = t.clone();
                let verified = tokio::task::spawn_blocking(move || t2.verify_all_if(generation))
                    .await
                    .unwrap_or(false);
                if verified {
                    return Ok(());
                }
            } else if t.generation() == generation {
                break got;
            }
            if tries == 3 {
                return Err("the pieces kept changing while the blob was hashed".into());
            }
        };
        // Dropping writes the record (a sync): off the threads that serve requests.
        // A piece our seeds have a digest of is hashed and judged by it (pieces
        // stored unhashed while nydusd read are most of a blob: one bad sender does
        // not make suspects of all); the others are all suspect. A piece that
        // matches is kept, not verified: with the blob wrong, the next round
        // checks it whole again rather than taking it as verified.
        let (t2, known) = (t.clone(), known.clone());
        let mut suspects = tokio::task::spawn_blocking(move || {
            let mut suspects = Vec::new();
            for p in t2.pieces().into_iter().filter(|p| !p.verified) {
                if let Some(want) = known.get(&p.number) {
                    if t2.hash_piece(p.number).ok().flatten().as_ref() == Some(want) {
                        continue;
                    }
                }
                t2.drop_piece(p.number);
                suspects.extend(p.parent);
            }
            suspects
        })
        .await
        .map_err(|e| format!("dropping the pieces: {e}"))?;
        suspects.sort();
        suspects.dedup();
        self.peer.metrics.piece_failure("blob-digest");
        self.peer.suspect(&self.task_id, &suspects);
        Err(format!(
            "the blob's bytes have digest {got}, not {want}: the pieces from {suspects:?} \
             were dropped"
        ))
    }

    /// Fetches the missing pieces from `parents`; `Err` (with why) when they could not
    /// deliver all: the caller asks the scheduler for others. Parents that sent bad data
    /// or failed are added to `excluded`.
    async fn via_parents(
        &mut self,
        a: &Announce,
        parents: Vec<PeerMsg>,
        excluded: &mut HashSet<String>,
        length: Option<u64>,
    ) -> Outcome {
        self.send(
            a,
            Req::DownloadPeerStartedRequest(DownloadPeerStartedRequest {}),
        )
        .await;
        // Parents that sent this task's bad bytes before (in this download or an
        // earlier one) are not asked again, and the scheduler hears of them.
        for p in &parents {
            let host = p.host.as_ref().map(|h| h.id.as_str()).unwrap_or("");
            if self.peer.is_suspect(&self.task_id, &p.id, host) {
                self.exclude_bad(a, excluded, &p.id).await;
            }
        }
        let parents: Vec<PeerMsg> = parents
            .into_iter()
            .filter(|p| !excluded.contains(&p.id) && p.host.is_some())
            .collect();
        if parents.is_empty() {
            return Err("no usable parent".into());
        }
        let _parents = Counted::new(&self.peer.metrics.parents, parents.len() as i64);
        // Seed parents (host type not normal), and where each serves pieces once it has
        // offered one: a piece a reader waits on that no parent offers yet is asked of
        // one of them (ours fetches it from the origin next and answers once it has it;
        // a dfdaemon seed refuses, which costs nothing but the question).
        let seeds: HashSet<String> = parents
            .iter()
            .filter(|p| p.host.as_ref().is_some_and(|h| h.r#type != 0))
            .map(|p| p.id.clone())
            .collect();
        let mut seed_addrs: BTreeMap<String, String> = BTreeMap::new();
        // Pieces asked of a seed ahead of its offer (once each), and those still under way.
        let (mut asked_ahead, mut ahead_jobs) = (HashSet::new(), HashSet::new());
        // What our seeds recorded from the origin, by piece number.
        let mut origin_sha: HashMap<u32, String> = HashMap::new();
        for p in &parents {
            for piece in &p.pieces {
                if let Some(hex) = piece.digest.strip_prefix("sha256:") {
                    origin_sha.insert(piece.number, hex.to_string());
                }
            }
        }
        // A task stored in an earlier round (or run) keeps its length.
        let stored = self
            .peer
            .storage
            .get(&self.task_id)
            .map(|t| t.content_length);
        let length = match length.or(stored).or_else(|| {
            parents
                .iter()
                .find_map(|p| p.task.as_ref().map(|t| t.content_length).filter(|n| *n > 0))
        }) {
            Some(n) => n,
            None => self.length_from_parents(&parents).await?,
        };
        let t = self.task(length)?;
        // Each parent says which pieces it holds, as it gets them.
        let (have_tx, mut have_rx) = mpsc::channel::<(String, u32, String)>(1024);
        let mut syncs = tokio::task::JoinSet::new();
        for p in &parents {
            let host = p.host.clone().unwrap_or_default();
            let (tx, task_id, host_id, parent_id) = (
                have_tx.clone(),
                self.task_id.clone(),
                self.peer.host_id.clone(),
                p.id.clone(),
            );
            let wanted: Vec<u32> = (0..t.piece_count())
                .filter(|n| t.piece(*n).is_none())
                .collect();
            syncs.spawn(async move {
                // A parent that cannot say what it has ends with an offer of nothing
                // (piece number u32::MAX): it is not asked again in this download.
                let nothing = (parent_id.clone(), u32::MAX, String::new());
                let addr = format!("http://{}:{}", host.ip, host.port);
                let connect = tokio::time::timeout(
                    Duration::from_secs(5),
                    DfdaemonUploadClient::connect(addr),
                );
                let Ok(Ok(mut c)) = connect.await else {
                    let _ = tx.send(nothing).await;
                    return;
                };
                let Ok(stream) = c
                    .sync_pieces(SyncPiecesRequest {
                        host_id,
                        task_id,
                        interested_piece_numbers: wanted,
                    })
                    .await
                else {
                    let _ = tx.send(nothing).await;
                    return;
                };
                let mut stream = stream.into_inner();
                while let Ok(Ok(Some(r))) =
                    tokio::time::timeout(NO_PROGRESS, stream.message()).await
                {
                    let port = r.tcp_port.unwrap_or(4005);
                    let ip = if r.ip.is_empty() {
                        host.ip.clone()
                    } else {
                        r.ip.clone()
                    };
                    if tx
                        .send((parent_id.clone(), r.number, format!("{ip}:{port}")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(have_tx);
        let mut offers: HashMap<u32, Vec<(String, String)>> = HashMap::new();
        let mut inflight: BTreeSet<u32> = BTreeSet::new();
        let mut jobs = tokio::task::JoinSet::new();
        let mut syncing = true;
        // Pieces from parents that came before our seed's digest of them reached the
        // scheduler are checked against the scheduler's digests as they come in, by a
        // task of their own; it hands back the digests and the senders of bad pieces.
        let (digest_tx, mut digest_rx) = mpsc::channel::<SeedDigests>(4);
        let poller = tokio::spawn(poll_seed_digests(
            self.scheduler.clone(),
            self.peer.host_id.clone(),
            t.clone(),
            digest_tx,
        ));
        let _poller = AbortOnDrop(poller);
        let mut job_pieces: HashMap<tokio::task::Id, (u32, String)> = HashMap::new();
        // Checked whole once complete (see `check_whole`): pieces may wait for their
        // SHA-256 while a reader that checks chunks itself reads.
        let whole_checked = storage::blob_digest(&self.download.url).is_some();
        // Pieces stored without their SHA-256 being hashed now, a reader that does not
        // check what it reads waiting on them.
        let (mut hashing, mut hash_jobs) = (HashSet::new(), tokio::task::JoinSet::new());
        let mut last_progress = tokio::time::Instant::now();
        // Once every piece is stored: until when the last pieces, hashed, may wait for
        // our seeds' digests of them (they may come just before those reach the
        // scheduler; the poller asks again within tens of milliseconds). Without them
        // the whole blob is hashed (see `last_digests_wait`); a reader waiting on
        // verified bytes waits for either.
        let mut settle: Option<tokio::time::Instant> = None;
        let mut verified_rx = t.subscribe();
        let mut digests_open = true;
        loop {
            if t.complete() {
                let now = tokio::time::Instant::now();
                let unverified: Vec<PieceMeta> =
                    t.pieces().into_iter().filter(|p| !p.verified).collect();
                let wait = whole_checked
                    && digests_open
                    && !origin_sha.is_empty()
                    && !unverified.is_empty()
                    && unverified.iter().all(|p| !p.sha256.is_empty())
                    && *settle.get_or_insert(now + last_digests_wait(t.content_length)) > now;
                if !wait {
                    break;
                }
            } else {
                settle = None;
            }
            // Senders found bad (here, or by a client's report of a bad range while
            // this download runs) are not asked again.
            let usable = |excluded: &HashSet<String>, id: &String| {
                !excluded.contains(id) && !self.peer.is_suspect(&self.task_id, id, "")
            };
            // A piece a reader waits on that only senders of bad bytes offer: these
            // parents cannot finish the task; the scheduler is asked for others (or the
            // origin). (A parent that failed otherwise may have had a passing fault.)
            let stuck = t.wanted().into_iter().find(|n| {
                t.piece(*n).is_none()
                    && !inflight.contains(n)
                    && offers.get(n).is_some_and(|l| {
                        !l.is_empty()
                            && l.iter()
                                .all(|(id, _)| self.peer.is_suspect(&self.task_id, id, ""))
                    })
            });
            if let Some(n) = stuck {
                tracing::info!(
                    "task {}: piece {n}, which a reader waits on, is offered by bad senders only",
                    self.task_id
                );
                let bad: Vec<String> = offers[&n].iter().map(|(id, _)| id.clone()).collect();
                excluded.extend(bad);
                break;
            }
            // Start pieces offered and not under way: those readers wait on first.
            let startable: BTreeSet<u32> = offers
                .keys()
                .copied()
                .filter(|n| !inflight.contains(n) && t.piece(*n).is_none())
                .filter(|n| offers[n].iter().any(|(id, _)| usable(excluded, id)))
                .collect();
            let mut starts = Vec::new();
            let (picked, held) = pick(&t, &startable, inflight.len(), true);
            for (n, wanted) in picked {
                let Some(list) = offers.get_mut(&n) else {
                    continue;
                };
                list.retain(|(id, _)| usable(excluded, id));
                let Some((parent, addr)) = list.first().cloned() else {
                    offers.remove(&n);
                    continue;
                };
                starts.push((n, wanted, parent, addr));
            }
            // Asked once each, of the first usable seed that has offered a piece.
            let seed = seed_addrs.iter().find(|(id, _)| usable(excluded, id));
            if let Some((parent, addr)) = seed {
                for n in t.wanted() {
                    // At most two at a time: each holds piece memory while the seed
                    // fetches it.
                    if ahead_jobs.len() >= AHEAD_JOBS {
                        break;
                    }
                    let offered = offers
                        .get(&n)
                        .is_some_and(|l| l.iter().any(|(id, _)| usable(excluded, id)));
                    if t.piece(n).is_some()
                        || inflight.contains(&n)
                        || offered
                        || n >= t.piece_count()
                        || !asked_ahead.insert(n)
                    {
                        continue;
                    }
                    tracing::info!(
                        "task {}: piece {n}, which a reader waits on, asked of seed {parent} before it offers it",
                        self.task_id
                    );
                    ahead_jobs.insert(n);
                    starts.push((n, true, parent.clone(), addr.clone()));
                }
            }
            for (n, wanted, parent, addr) in starts {
                inflight.insert(n);
                let (t2, task_id, sha) =
                    (t.clone(), self.task_id.clone(), origin_sha.get(&n).cloned());
                let metrics = self.peer.metrics.clone();
                let budget = self.peer.piece_memory.clone();
                let limit = self.background_limit(wanted);
                let job_parent = parent.clone();
                let job = jobs.spawn(async move {
                    let (_, len) = t2.piece_range(n).expect("a piece of the task");
                    background_wait(limit, &t2, n, len).await;
                    // Pieces in memory, over all downloads, stay within the budget.
                    let mib = len.div_ceil(1 << 20).clamp(1, PIECE_MEMORY_MIB as u64) as u32;
                    let _held = budget.acquire_many_owned(mib).await;
                    // While a local reader that checks each chunk itself (nydusd)
                    // reads the task, and the whole blob is checked against its digest
                    // once complete, a piece's SHA-256 waits: the CPU goes to the
                    // reader. Such a piece is stored unverified (never served to other
                    // peers); it is hashed when a reader that does not check waits on
                    // it, or checked with the whole blob.
                    let lazy = whole_checked
                        && t2.verifying_reader(READER_ACTIVE)
                        && !t2.wanted_verified().contains(&n);
                    let r =
                        super::vortex::fetch(&addr, &task_id, (n, len), PIECE_TIMEOUT, !lazy).await;
                    let p2 = parent.clone();
                    // Writing a piece (up to 64 MiB) is kept off the threads that
                    // serve requests (it was hashed as it arrived).
                    let check = move || {
                        let f = r?;
                        let stored = (|| {
                            if f.data.len() as u64 != len {
                                return Err(format!(
                                    "piece {n}: {} bytes, not {len}",
                                    f.data.len()
                                ));
                            }
                            if let Some(want) = sha.as_ref().filter(|w| !lazy && **w != f.sha256) {
                                return Err(format!(
                                    "piece {n}: SHA-256 {}, the origin's is {want}",
                                    f.sha256
                                ));
                            }
                            // Verified when a seed's SHA-256 from the origin matched.
                            // Counted before the piece can be read: a reader done with the
                            // task sees its bytes counted.
                            metrics.from_peers(&task_id, f.data.len() as u64);
                            let digests = (f.sha256.clone(), f.crc32);
                            let verified = sha.is_some() && !lazy;
                            t2.store_hashed(n, &f.data, Some(p2), verified, digests)
                                .map_err(|e| format!("storing piece {n}: {e}"))
                        })();
                        // Kept or not, the bytes' buffer goes back for the next piece.
                        super::buffers::PIECES.give(f.data);
                        stored
                    };
                    let r = tokio::task::spawn_blocking(check)
                        .await
                        .unwrap_or_else(|e| Err(format!("piece {n}: checking it: {e}")));
                    (n, parent, r)
                });
                job_pieces.insert(job.id(), (n, job_parent));
            }
            // A reader that does not check what it reads waits on a piece stored without
            // its SHA-256: it is hashed now, and checked against our seeds' digest (now,
            // or when it comes from the scheduler).
            for n in t.wanted_verified() {
                let unhashed = t
                    .piece(n)
                    .is_some_and(|p| !p.verified && p.sha256.is_empty());
                if unhashed && hashing.insert(n) {
                    let t2 = t.clone();
                    hash_jobs.spawn(async move {
                        let hashed = tokio::task::spawn_blocking(move || t2.hash_piece(n)).await;
                        (n, hashed.unwrap_or_else(|e| Err(std::io::Error::other(e))))
                    });
                }
            }
            if held {
                // Waiting for the reader is not the parents' fault.
                last_progress = tokio::time::Instant::now();
            } else if inflight.is_empty() && !syncing && settle.is_none() {
                break;
            }
            tokio::select! {
                // Waiting for the last pieces' digests: a piece verified, or time is up.
                _ = verified_rx.changed(), if settle.is_some() => {}
                _ = tokio::time::sleep_until(settle.unwrap_or_else(tokio::time::Instant::now)), if settle.is_some() => {}
                // Nothing offered and nothing arriving for this long: the parents failed.
                _ = tokio::time::sleep_until(last_progress + NO_PROGRESS) => {
                    tracing::warn!("task {}: no progress from the parents in {NO_PROGRESS:?}", self.task_id);
                    break;
                }
                // A reader waits on a piece, or moved on: pieces may start now.
                _ = t.want_changed() => {}
                // The reader may have stopped reading: the window goes. What was stored
                // meanwhile is recorded on disk (no store may come to do it).
                _ = tokio::time::sleep(READER_ACTIVE), if held => {
                    let t2 = t.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = t2.persist_if_due() {
                            tracing::warn!("task {}: writing meta.json: {e}", t2.id);
                        }
                    });
                }
                Some(done) = hash_jobs.join_next(), if !hash_jobs.is_empty() => {
                    let Ok((n, hashed)) = done else { continue };
                    hashing.remove(&n);
                    let got = match hashed {
                        Ok(Some(got)) => got,
                        // Dropped meanwhile: fetched again.
                        Ok(None) => continue,
                        // Bytes that cannot be read back are fetched again.
                        Err(e) => {
                            tracing::warn!("task {}: hashing piece {n}: {e}; fetching it again", self.task_id);
                            let t2 = t.clone();
                            let _ = tokio::task::spawn_blocking(move || t2.drop_unhashed(n)).await;
                            continue;
                        }
                    };
                    // No digest of our seeds' yet: the scheduler's, when it has one, judges
                    // the piece (`poll_seed_digests`).
                    let Some(want) = origin_sha.get(&n).cloned() else { continue };
                    let t2 = t.clone();
                    if got == want {
                        let _ = tokio::task::spawn_blocking(move || t2.verify(&[(n, got)])).await;
                        continue;
                    }
                    tracing::warn!("task {}: piece {n} has SHA-256 {got}, the origin's is {want}", self.task_id);
                    let parent = t.piece(n).and_then(|p| p.parent);
                    let dropped = tokio::task::spawn_blocking(move || t2.drop_piece_if(n, &got))
                        .await
                        .unwrap_or(false);
                    if let Some(parent) = parent.filter(|_| dropped) {
                        self.sent_bad_bytes(a, excluded, &parent).await;
                    }
                }
                d = digest_rx.recv(), if digests_open => match d {
                    Some(d) => {
                        origin_sha.extend(d.digests);
                        for parent in d.bad {
                            self.sent_bad_bytes(a, excluded, &parent).await;
                        }
                    }
                    // The poller stopped (the scheduler has no `StatTask`).
                    None => digests_open = false,
                },
                have = have_rx.recv(), if syncing => match have {
                    Some((parent, u32::MAX, _)) => {
                        tracing::info!("task {}: parent {parent} could not say what it has", self.task_id);
                        excluded.insert(parent);
                    }
                    Some((parent, n, addr)) => {
                        if seeds.contains(&parent) && !seed_addrs.contains_key(&parent) {
                            seed_addrs.insert(parent.clone(), addr.clone());
                        }
                        if t.piece(n).is_none() && n < t.piece_count() {
                            last_progress = tokio::time::Instant::now();
                            offers.entry(n).or_default().push((parent, addr));
                        }
                    }
                    None => syncing = false,
                },
                Some(done) = jobs.join_next_with_id(), if !inflight.is_empty() => {
                    let (n, parent, r) = match done {
                        Ok((id, (n, parent, r))) => {
                            job_pieces.remove(&id);
                            (n, parent, r)
                        }
                        // A job that panicked: its piece is not under way any more.
                        Err(e) => match job_pieces.remove(&e.id()) {
                            Some((n, parent)) => (n, parent, Err(format!("piece {n}: {e}"))),
                            None => continue,
                        },
                    };
                    inflight.remove(&n);
                    let was_ahead = ahead_jobs.remove(&n);
                    match r {
                        // A seed asked ahead of its offer that could not serve the piece
                        // (a dfdaemon, or a download that ended): nothing against it;
                        // the piece comes when it is offered.
                        Err(e) if was_ahead && super::vortex::is_refusal(&e) => {
                            tracing::debug!("task {}: piece {n} asked ahead of {parent}: {e}", self.task_id);
                        }
                        Ok(meta) => {
                            last_progress = tokio::time::Instant::now();
                            self.send(a, Req::DownloadPieceFinishedRequest(DownloadPieceFinishedRequest {
                                piece: Some(piece_msg(&meta, false)),
                            })).await;
                        }
                        Err(e) => {
                            tracing::warn!("task {}: from {parent}: {e}", self.task_id);
                            self.peer.metrics.piece_failure(if e.contains("SHA-256") || e.contains("CRC-32") { "digest" } else { "transfer" });
                            excluded.insert(parent.clone());
                            if e.contains("SHA-256") || e.contains("CRC-32") {
                                self.peer.suspect(&self.task_id, std::slice::from_ref(&parent));
                            }
                            self.send(a, Req::DownloadPieceFailedRequest(DownloadPieceFailedRequest {
                                piece_number: Some(n),
                                parent_id: parent,
                                temporary: false,
                            })).await;
                        }
                    }
                }
            }
        }
        syncs.abort_all();
        // No poll of digests while the whole task is checked.
        drop(_poller);
        if !t.complete() {
            let have = t.pieces().len();
            return Err(format!(
                "{have} of {} pieces from the parents",
                t.piece_count()
            ));
        }
        if let Err(e) = self.check_whole(&t, &origin_sha).await {
            // The senders of the dropped pieces are suspects: kept out of the next round.
            let suspects = self.peer.suspects_of(&self.task_id);
            for id in suspects {
                self.exclude_bad(a, excluded, &id).await;
            }
            return Err(e);
        }
        self.send(
            a,
            Req::DownloadPeerFinishedRequest(DownloadPeerFinishedRequest {}),
        )
        .await;
        Ok(t)
    }

    /// The limit a piece waits on: `proxy.prefetchRateLimit` for a piece no reader
    /// waits on, in a download a range read started (the rest of the task is
    /// prefetched); none otherwise.
    fn background_limit(&self, wanted: bool) -> Option<Arc<super::vortex::RateLimit>> {
        if wanted || !self.download.prefetch {
            return None;
        }
        self.peer.prefetch_limit.clone()
    }

    /// `parent` sent a piece that failed our seeds' digest: counted, suspected for the
    /// task, and kept out of this download (see [`Driver::exclude_bad`]).
    async fn sent_bad_bytes(&self, a: &Announce, excluded: &mut HashSet<String>, parent: &str) {
        self.peer.metrics.piece_failure("digest");
        self.peer.suspect(&self.task_id, &[parent.to_string()]);
        self.exclude_bad(a, excluded, parent).await;
    }

    /// Keeps `parent`, a sender of bad bytes, out of this download and, the first time,
    /// tells the scheduler (it is not this child's parent again).
    async fn exclude_bad(&self, a: &Announce, excluded: &mut HashSet<String>, parent: &str) {
        if !excluded.insert(parent.to_string()) {
            return;
        }
        self.send(
            a,
            Req::DownloadPieceFailedRequest(DownloadPieceFailedRequest {
                piece_number: None,
                parent_id: parent.to_string(),
                temporary: false,
            }),
        )
        .await;
    }

    /// The task's length from a parent (`DfdaemonUpload/StatLocalTask`).
    async fn length_from_parents(&self, parents: &[PeerMsg]) -> Result<u64, String> {
        for p in parents {
            let Some(host) = &p.host else { continue };
            let addr = format!("http://{}:{}", host.ip, host.port);
            let Ok(mut c) = DfdaemonUploadClient::connect(addr).await else {
                continue;
            };
            if let Ok(r) = c
                .stat_local_task(dragonfly_api::dfdaemon::v2::StatLocalTaskRequest {
                    task_id: self.task_id.clone(),
                    remote_ip: None,
                })
                .await
            {
                if let Some(n) = r.into_inner().content_length {
                    return Ok(n);
                }
            }
        }
        Err("no parent told the task's length".into())
    }
}

/// What [`poll_seed_digests`] learned: our seeds' SHA-256 per piece, and the senders
/// of pieces that did not match (dropped).
struct SeedDigests {
    digests: HashMap<u32, String>,
    bad: Vec<String>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checks the pieces of `t` stored without a digest of our seeds' against the SHA-256s
/// the scheduler at `scheduler` has by now (`StatTask`: our seeds report each piece's
/// digest from the origin as they store it), while any stored piece is unverified: a
/// match verifies the piece, a mismatch drops it. Polls 200 ms after the start, then
/// doubling up to 5 s while polls verify nothing (a swarm whose seed is a dfdaemon has
/// no such digests), 20 ms after one that did; and once the scheduler has given
/// digests of this task, also at once when a hashed piece not asked about yet is
/// stored (its digest is on its way or there already; the last piece of a download
/// would otherwise wait out a backed-off poll), at most one poll per 20 ms, the pause
/// after it starting again from 20 ms. Each answer goes to `tx`.
async fn poll_seed_digests(
    scheduler: String,
    host_id: String,
    t: Arc<TaskData>,
    tx: mpsc::Sender<SeedDigests>,
) {
    let limit = Duration::from_secs(2);
    let mut delay = DIGEST_POLL;
    let mut client: Option<SchedulerClient<tonic::transport::Channel>> = None;
    let mut known: HashMap<u32, String> = HashMap::new();
    // Woken by stores and verifications.
    let mut stored = t.subscribe();
    let mut next = tokio::time::Instant::now() + delay;
    // Hashed pieces a poll has asked about, and when the last poll was.
    let mut asked: HashSet<u32> = HashSet::new();
    let mut last_poll: Option<tokio::time::Instant> = None;
    loop {
        let came = tokio::select! {
            _ = tokio::time::sleep_until(next) => false,
            r = stored.changed() => {
                if r.is_err() {
                    return;
                }
                true
            }
        };
        let now = tokio::time::Instant::now();
        let unverified: Vec<PieceMeta> = t.pieces().into_iter().filter(|p| !p.verified).collect();
        if unverified.is_empty() {
            if t.complete() {
                return;
            }
            if !came {
                delay = DIGEST_POLL;
                next = now + delay;
            }
            continue;
        }
        if came {
            // Pieces stored unhashed, or hashed ones already asked about, are in no
            // hurry; nor is anything while the scheduler has no digests of ours.
            let new_piece = unverified
                .iter()
                .any(|p| !p.sha256.is_empty() && !asked.contains(&p.number));
            if !new_piece || known.is_empty() {
                continue;
            }
            if let Some(gap) = last_poll.map(|l| l + DIGEST_POLL_SOON).filter(|g| *g > now) {
                // That poll comes by the timer, which doubles this to `DIGEST_POLL_SOON`.
                next = next.min(gap);
                delay = DIGEST_POLL_SOON / 2;
                continue;
            }
            delay = DIGEST_POLL_SOON;
        } else {
            delay = (delay * 2).min(DIGEST_POLL_MAX);
        }
        next = now + delay;
        last_poll = Some(now);
        asked.extend(
            unverified
                .iter()
                .filter(|p| !p.sha256.is_empty())
                .map(|p| p.number),
        );
        if client.is_none() {
            let connect = SchedulerClient::connect(format!("http://{scheduler}"));
            client = tokio::time::timeout(limit, connect)
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(c) = client.as_mut() else { continue };
        let stat = c.stat_task(StatTaskRequest {
            host_id: host_id.clone(),
            task_id: t.id.clone(),
        });
        let task = match tokio::time::timeout(limit, stat).await {
            Ok(Ok(task)) => task.into_inner(),
            Ok(Err(e)) if e.code() == tonic::Code::Unimplemented => return,
            _ => {
                client = None;
                continue;
            }
        };
        let mut fresh = HashMap::new();
        for piece in task.pieces {
            if let Some(hex) = piece.digest.strip_prefix("sha256:") {
                if known.get(&piece.number).map(String::as_str) != Some(hex) {
                    fresh.insert(piece.number, hex.to_string());
                }
                known.insert(piece.number, hex.to_string());
            }
        }
        let (mut good, mut drop) = (Vec::new(), Vec::new());
        // A piece stored without its SHA-256 (see `lazy` in `via_parents`) is judged
        // once hashed, or with the whole blob; its digest goes to the download for that.
        for p in unverified.iter().filter(|p| !p.sha256.is_empty()) {
            match known.get(&p.number) {
                Some(want) if *want == p.sha256 => good.push((p.number, want.clone())),
                Some(want) => {
                    tracing::warn!(
                        "task {}: piece {} from {:?} has SHA-256 {}, the origin's is {want}",
                        t.id,
                        p.number,
                        p.parent,
                        p.sha256
                    );
                    drop.push(p.clone());
                }
                None => {}
            }
        }
        // Only if those bytes are still the ones stored; dropping writes the record (a
        // sync): off the threads that serve requests.
        let t2 = t.clone();
        let bad: Vec<String> = tokio::task::spawn_blocking(move || {
            drop.into_iter()
                .filter(|p| t2.drop_piece_if(p.number, &p.sha256))
                .filter_map(|p| p.parent)
                .collect()
        })
        .await
        .unwrap_or_default();
        if !good.is_empty() {
            delay = DIGEST_POLL_SOON;
            next = tokio::time::Instant::now() + delay;
            let t2 = t.clone();
            let _ = tokio::task::spawn_blocking(move || t2.verify(&good)).await;
        }
        if (!fresh.is_empty() || !bad.is_empty())
            && tx
                .send(SeedDigests {
                    digests: fresh,
                    bad,
                })
                .await
                .is_err()
        {
            return;
        }
    }
}

/// Waits for `limit` to let `len` bytes of piece `n` go, unless a reader comes to wait
/// on the piece meanwhile: it then goes at once.
async fn background_wait(
    limit: Option<Arc<super::vortex::RateLimit>>,
    t: &TaskData,
    n: u32,
    len: u64,
) {
    let Some(l) = limit else { return };
    let wanted = async {
        while !t.is_wanted(n) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = l.take(len) => {}
        _ = wanted => {}
    }
}

/// Stores piece `n` of `t` (see [`TaskData::store`]) on a blocking thread: hashing and
/// writing a piece are kept off the threads that serve requests.
async fn store(
    t: &Arc<TaskData>,
    n: u32,
    data: Vec<u8>,
    parent: Option<String>,
    verified: bool,
) -> Result<PieceMeta, String> {
    let t = t.clone();
    tokio::task::spawn_blocking(move || t.store(n, &data, parent, verified))
        .await
        .map_err(|e| format!("storing piece {n}: {e}"))?
        .map_err(|e| format!("storing piece {n}: {e}"))
}

/// The pieces to start now, of `startable` (missing, not under way, and to be had),
/// with `inflight` under way, each with whether a reader waits on it: first those
/// readers wait on, up to [`CONCURRENT_PIECES`] under way; then the others, from the
/// piece a reader last read or waited on to the end and then from the start, up to
/// [`BACKGROUND_PIECES`] under way. `paced`: while a local reader reads, the others
/// only up to [`AHEAD_OF_READER`] pieces after its piece, [`READER_BACKGROUND_PIECES`]
/// under way; the `bool` returned says that pieces were left for later so.
fn pick(
    t: &TaskData,
    startable: &BTreeSet<u32>,
    inflight: usize,
    paced: bool,
) -> (Vec<(u32, bool)>, bool) {
    let mut out = Vec::new();
    for n in t.wanted() {
        if inflight + out.len() >= CONCURRENT_PIECES {
            return (out, false);
        }
        if startable.contains(&n) {
            out.push((n, true));
        }
    }
    // While a local reader reads, the pieces nobody waits on are fetched one at a time
    // and at most `AHEAD_OF_READER` pieces ahead of it: the reader's own work (nydusd
    // decompressing and checking chunks) keeps its share of the CPU, instead of waiting
    // behind a burst of the whole task (on two cores, a cold nydusd read through the
    // peer went from 0.61x to 0.69x of the direct read's speed, medians of 7).
    let (from, reading) = t.reader(READER_ACTIVE);
    let window = (paced && reading).then(|| from..=from.saturating_add(AHEAD_OF_READER));
    let order: Box<dyn Iterator<Item = &u32>> = match &window {
        Some(w) => Box::new(startable.range(w.clone())),
        None => Box::new(startable.range(from..).chain(startable.range(..from))),
    };
    let background = if window.is_some() {
        READER_BACKGROUND_PIECES
    } else {
        BACKGROUND_PIECES
    };
    for &n in order {
        if inflight + out.len() >= background {
            break;
        }
        if !out.iter().any(|(m, _)| *m == n) {
            out.push((n, false));
        }
    }
    // Pieces left for later by the window (the caller waits for the reader to move).
    let held = window.is_some_and(|w| startable.iter().any(|n| !w.contains(n)));
    (out, held)
}

/// `d` as registered with the scheduler: no credentials, cookies or hop-by-hop headers
/// (a seed fetches with its own; nothing of a client's reaches another peer), no range
/// (the task is the whole blob) or conditionals (a seed must fetch it whatever the
/// client had), and the length when known.
fn registered(d: &Download, content_length: Option<u64>) -> Download {
    let mut d = d.clone();
    d.request_header
        .retain(|k, _| !super::private_header(k) && !super::of_one_request(k));
    d.range = None;
    d.output_path = None;
    if let Some(n) = content_length {
        d.actual_content_length = Some(n);
        d.actual_piece_length = Some(storage::piece_length(n));
        d.actual_piece_count = Some(n.div_ceil(storage::piece_length(n)));
    }
    d
}

/// `n` added to a gauge for as long as it lives.
struct Counted {
    gauge: prometheus_client::metrics::gauge::Gauge,
    n: i64,
}

impl Counted {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge, n: i64) -> Counted {
        gauge.inc_by(n);
        Counted {
            gauge: gauge.clone(),
            n,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec_by(self.n);
    }
}

/// A stored piece as the scheduler hears of it: from the origin with its SHA-256 (our
/// children check pieces against it), from a parent with its CRC-32 (dfdaemon's digest).
fn piece_msg(meta: &PieceMeta, from_origin: bool) -> Piece {
    Piece {
        number: meta.number,
        parent_id: meta.parent.clone(),
        offset: meta.offset,
        length: meta.length,
        digest: if from_origin {
            format!("sha256:{}", meta.sha256)
        } else {
            meta.crc_digest()
        },
        traffic_type: Some(if from_origin {
            TrafficType::BackToSource
        } else {
            TrafficType::RemotePeer
        } as i32),
        ..Default::default()
    }
}

fn answer_name(r: &Resp) -> &'static str {
    match r {
        Resp::NeedBackToSourceResponse(_) => "NeedBackToSource",
        Resp::MetadataOnlyResponse(_) => "MetadataOnly",
        Resp::EmptyTaskResponse(_) => "EmptyTask",
        Resp::NormalTaskResponse(_) => "NormalTask",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_readers_wait_on_go_first_and_a_place_stays_free_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage::Storage::open(dir.path()).unwrap();
        let t = s.create("t", "http://r/x", 40 << 20, 4 << 20).unwrap();
        let all: BTreeSet<u32> = (0..10).collect();
        // Nobody waits: three at a time, in order.
        assert_eq!(
            pick(&t, &all, 0, true).0,
            [(0, false), (1, false), (2, false)]
        );
        assert_eq!(pick(&t, &all, 3, true).0, []);
        // A reader waits on piece 8: it starts even with three under way, and the
        // pieces nobody waits on go on from it.
        let w = t.want(8);
        assert_eq!(pick(&t, &all, 3, true).0, [(8, true)]);
        assert_eq!(
            pick(&t, &all, 0, true).0,
            [(8, true), (9, false), (0, false)]
        );
        // Two readers on one piece: it stays wanted until both are gone.
        let w2 = t.want(8);
        drop(w);
        assert_eq!(t.wanted(), [8]);
        drop(w2);
        assert_eq!(t.wanted(), Vec::<u32>::new());
        // Waited-on pieces fill every place, never more.
        let ws: Vec<_> = [1, 3, 5, 7, 9].iter().map(|n| t.want(*n)).collect();
        let some: BTreeSet<u32> = [3, 4, 5, 7, 9].into_iter().collect();
        assert_eq!(
            pick(&t, &some, 1, true).0,
            [(3, true), (5, true), (7, true)]
        );
        drop(ws);
    }

    #[test]
    fn while_a_local_reader_reads_the_rest_keeps_close_ahead_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage::Storage::open(dir.path()).unwrap();
        let t = s.create("t", "http://r/x", 80 << 20, 4 << 20).unwrap();
        let all: BTreeSet<u32> = (0..20).collect();
        // A proxy client reads piece 2 (stored): one piece nobody waits on at a time,
        // from it, and none past piece 2 + AHEAD_OF_READER; the rest is held.
        t.reader_at(2, false);
        assert_eq!(pick(&t, &all, 0, true), (vec![(2, false)], true));
        assert_eq!(pick(&t, &all, 1, true), (vec![], true));
        let near: BTreeSet<u32> = (5..=6).chain(12..20).collect();
        assert_eq!(pick(&t, &near, 0, true), (vec![(5, false)], true));
        let beyond: BTreeSet<u32> = (12..20).collect();
        assert_eq!(pick(&t, &beyond, 0, true), (vec![], true));
        // Unpaced (from the origin), the whole task as before.
        assert_eq!(
            pick(&t, &all, 0, false),
            (vec![(2, false), (3, false), (4, false)], false)
        );
        // A piece a reader waits on is never held back.
        let w = t.want(15);
        assert_eq!(pick(&t, &beyond, 0, true).0, [(15, true)]);
        drop(w);
        // The reader stopped: the rest at full speed again.
        std::thread::sleep(READER_ACTIVE + Duration::from_millis(100));
        assert!(!pick(&t, &beyond, 0, true).1);
        assert_eq!(pick(&t, &beyond, 0, true).0.len(), BACKGROUND_PIECES);
    }

    #[test]
    fn nothing_of_a_clients_credentials_is_registered() {
        let mut d = Download {
            url: "http://r/v2/x/blobs/sha256:00".into(),
            ..Default::default()
        };
        for (k, v) in [
            ("Authorization", "Bearer secret"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("cookie", "s=secret"),
            ("Range", "bytes=0-9"),
            ("X-Dragonfly-Tag", "t"),
        ] {
            d.request_header.insert(k.into(), v.into());
        }
        let r = registered(&d, Some(10 << 20));
        let keys: Vec<&str> = r.request_header.keys().map(String::as_str).collect();
        assert_eq!(keys, ["X-Dragonfly-Tag"]);
        assert_eq!(r.actual_piece_count, Some(3));
        assert!(!format!("{r:?}").contains("secret"));
    }
}
