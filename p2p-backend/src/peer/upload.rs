//! `dfdaemon.v2.DfdaemonUpload`: what other peers (dfdaemons among them) and the
//! scheduler ask of this peer.
//!
//! * `SyncPieces`: the verified pieces of a task held here (see
//!   [`super::storage::PieceMeta::verified`]), then each one as it is verified, until
//!   the task is complete or its download ended; `NOT_FOUND` for a task neither held
//!   nor under way.
//! * `DownloadTask`: how a scheduler makes a seed peer fetch a task: answered with
//!   `DownloadTaskStartedResponse` once the task's length is known, then one
//!   `DownloadPieceFinishedResponse` per piece, ended with the download.
//! * `StatTask` / `StatLocalTask`: the task as held here (`finished_at` set when
//!   complete). `DeleteTask` removes it. `SyncHost` streams the host every few seconds.
//!
//! The other calls (cache, persistent tasks) answer `UNIMPLEMENTED`.

use super::storage::{PieceMeta, TaskData};
use super::PeerInner;
use dragonfly_api::common::v2::{
    CacheTask, Host, PersistentCacheTask, PersistentTask, Piece, Task,
};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_server::DfdaemonUpload;
use dragonfly_api::dfdaemon::v2::download_task_response::Response as DlResp;
use dragonfly_api::dfdaemon::v2::*;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long `SyncPieces` waits for a task that is starting here.
const START_WAIT: Duration = Duration::from_secs(10);

/// The upload service.
pub struct UploadService {
    peer: Arc<PeerInner>,
}

impl UploadService {
    /// The service of `peer`.
    pub fn new(peer: Arc<PeerInner>) -> UploadService {
        UploadService { peer }
    }

    /// Task `id`: held, or starting within [`START_WAIT`].
    async fn task(&self, id: &str) -> Option<Arc<TaskData>> {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            if let Some(t) = self.peer.storage.get(id) {
                return Some(t);
            }
            if !self.peer.is_running(id) || tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not served by this peer"
    )))
}

fn timestamp_now() -> prost_wkt_types::Timestamp {
    prost_wkt_types::Timestamp::from(std::time::SystemTime::now())
}

fn piece_of(meta: &PieceMeta) -> Piece {
    Piece {
        number: meta.number,
        parent_id: meta.parent.clone(),
        offset: meta.offset,
        length: meta.length,
        digest: meta.crc_digest(),
        ..Default::default()
    }
}

/// Sends each piece of `t` (of `wanted`, if not empty) as it is stored, until every
/// piece was sent or `t`'s download ends; `item` makes the message.
fn follow<T: Send + 'static>(
    peer: Arc<PeerInner>,
    t: Arc<TaskData>,
    wanted: Vec<u32>,
    tx: mpsc::Sender<Result<T, Status>>,
    item: impl Fn(&PieceMeta) -> T + Send + 'static,
) {
    tokio::spawn(async move {
        let mut changes = t.subscribe();
        let mut sent = std::collections::HashSet::new();
        let want = |n: u32| wanted.is_empty() || wanted.contains(&n);
        let total = (0..t.piece_count()).filter(|n| want(*n)).count();
        loop {
            changes.borrow_and_update();
            // Only pieces verified against a digest their sender did not give.
            for p in t.pieces().into_iter().filter(|p| p.verified) {
                if want(p.number) && sent.insert(p.number) && tx.send(Ok(item(&p))).await.is_err() {
                    return;
                }
            }
            if sent.len() >= total {
                return;
            }
            // Nothing more comes once the download here ended: a task complete but not
            // verified (its digest failed, or a run died before checking it) included.
            if !peer.is_running(&t.id) {
                // Nothing more will come here.
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "task {}: the download here ended with {} of {} pieces",
                        t.id,
                        sent.len(),
                        total
                    ))))
                    .await;
                return;
            }
            if tokio::time::timeout(Duration::from_secs(1), changes.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
    });
}

#[tonic::async_trait]
impl DfdaemonUpload for UploadService {
    type DownloadTaskStream = Out<DownloadTaskResponse>;

    async fn download_task(
        &self,
        request: Request<DownloadTaskRequest>,
    ) -> Result<Response<Self::DownloadTaskStream>, Status> {
        let download = request
            .into_inner()
            .download
            .ok_or_else(|| Status::invalid_argument("no download"))?;
        if download.url.is_empty() {
            return Err(Status::invalid_argument("a download without a URL"));
        }
        let task_id = super::storage::task_id(&download.url);
        let running = self.peer.download(download);
        // Answer once the length is known (or the download failed).
        let mut task_rx = running.task.clone();
        let mut done_rx = running.done.clone();
        let t = loop {
            if let Some(t) = task_rx.borrow_and_update().clone() {
                break t;
            }
            if let Some(Err(e)) = done_rx.borrow_and_update().clone() {
                return Err(Status::internal(e));
            }
            if let Some(Ok(())) = done_rx.borrow().clone() {
                match self.peer.storage.get(&task_id) {
                    Some(t) => break t,
                    None => return Err(Status::internal("the task went missing")),
                }
            }
            tokio::select! {
                _ = task_rx.changed() => {}
                _ = done_rx.changed() => {}
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let (host_id, peer_id) = (
            self.peer.host_id.clone(),
            format!("{}-{task_id}", self.peer.host_id),
        );
        let msg = move |r: DlResp| DownloadTaskResponse {
            host_id: host_id.clone(),
            task_id: task_id.clone(),
            peer_id: peer_id.clone(),
            response: Some(r),
        };
        let _ = tx
            .send(Ok(msg(DlResp::DownloadTaskStartedResponse(
                DownloadTaskStartedResponse {
                    content_length: t.content_length,
                    is_finished: t.complete(),
                    ..Default::default()
                },
            ))))
            .await;
        follow(self.peer.clone(), t, Vec::new(), tx, move |p| {
            msg(DlResp::DownloadPieceFinishedResponse(
                DownloadPieceFinishedResponse {
                    piece: Some(piece_of(p)),
                },
            ))
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stat_task(&self, request: Request<StatTaskRequest>) -> Result<Response<Task>, Status> {
        let id = request.into_inner().task_id;
        let t = self
            .peer
            .storage
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("task {id} is not here")))?;
        Ok(Response::new(Task {
            id: t.id.clone(),
            url: t.url.clone(),
            content_length: t.content_length,
            piece_count: t.piece_count(),
            state: if t.complete() { "Succeeded" } else { "Running" }.into(),
            pieces: t.pieces().iter().map(piece_of).collect(),
            ..Default::default()
        }))
    }

    async fn stat_local_task(
        &self,
        request: Request<StatLocalTaskRequest>,
    ) -> Result<Response<StatLocalTaskResponse>, Status> {
        let id = request.into_inner().task_id;
        let t = self
            .peer
            .storage
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("task {id} is not here")))?;
        Ok(Response::new(StatLocalTaskResponse {
            task_id: t.id.clone(),
            piece_length: Some(t.piece_length),
            content_length: Some(t.content_length),
            finished_at: t.ready().then(timestamp_now),
            ..Default::default()
        }))
    }

    async fn list_task_entries(
        &self,
        _: Request<ListTaskEntriesRequest>,
    ) -> Result<Response<ListTaskEntriesResponse>, Status> {
        unimplemented("ListTaskEntries")
    }

    async fn delete_task(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<()>, Status> {
        let id = request.into_inner().task_id;
        if self.peer.is_running(&id) {
            return Err(Status::failed_precondition(format!(
                "task {id} is downloading"
            )));
        }
        if !self.peer.storage.delete(&id) {
            return Err(Status::not_found(format!("task {id} is not here")));
        }
        Ok(Response::new(()))
    }

    type SyncPiecesStream = Out<SyncPiecesResponse>;

    async fn sync_pieces(
        &self,
        request: Request<SyncPiecesRequest>,
    ) -> Result<Response<Self::SyncPiecesStream>, Status> {
        let r = request.into_inner();
        let t = self
            .task(&r.task_id)
            .await
            .ok_or_else(|| Status::not_found(format!("task {} not found", r.task_id)))?;
        if let Some(n) = r
            .interested_piece_numbers
            .iter()
            .find(|n| **n >= t.piece_count())
        {
            return Err(Status::invalid_argument(format!(
                "task {} has {} pieces; piece {n} does not exist",
                t.id,
                t.piece_count()
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let ip = self.peer.config.host.ip.to_string();
        let port = self.peer.config.storage.server.tcp_port as i32;
        follow(
            self.peer.clone(),
            t,
            r.interested_piece_numbers,
            tx,
            move |p| SyncPiecesResponse {
                number: p.number,
                offset: p.offset,
                length: p.length,
                ip: ip.clone(),
                tcp_port: Some(port),
                quic_port: None,
            },
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DownloadCacheTaskStream = Out<DownloadCacheTaskResponse>;
    async fn download_cache_task(
        &self,
        _: Request<DownloadCacheTaskRequest>,
    ) -> Result<Response<Self::DownloadCacheTaskStream>, Status> {
        unimplemented("DownloadCacheTask")
    }
    async fn stat_cache_task(
        &self,
        _: Request<StatCacheTaskRequest>,
    ) -> Result<Response<CacheTask>, Status> {
        unimplemented("StatCacheTask")
    }
    async fn delete_cache_task(
        &self,
        _: Request<DeleteCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        unimplemented("DeleteCacheTask")
    }
    type SyncCachePiecesStream = Out<SyncCachePiecesResponse>;
    async fn sync_cache_pieces(
        &self,
        _: Request<SyncCachePiecesRequest>,
    ) -> Result<Response<Self::SyncCachePiecesStream>, Status> {
        unimplemented("SyncCachePieces")
    }
    async fn download_cache_piece(
        &self,
        _: Request<DownloadCachePieceRequest>,
    ) -> Result<Response<DownloadCachePieceResponse>, Status> {
        unimplemented("DownloadCachePiece")
    }
    type DownloadPersistentTaskStream = Out<DownloadPersistentTaskResponse>;
    async fn download_persistent_task(
        &self,
        _: Request<DownloadPersistentTaskRequest>,
    ) -> Result<Response<Self::DownloadPersistentTaskStream>, Status> {
        unimplemented("DownloadPersistentTask")
    }
    type SyncPersistentPiecesStream = Out<SyncPersistentPiecesResponse>;
    async fn sync_persistent_pieces(
        &self,
        _: Request<SyncPersistentPiecesRequest>,
    ) -> Result<Response<Self::SyncPersistentPiecesStream>, Status> {
        unimplemented("SyncPersistentPieces")
    }
    async fn update_persistent_task(
        &self,
        _: Request<UpdatePersistentTaskRequest>,
    ) -> Result<Response<()>, Status> {
        unimplemented("UpdatePersistentTask")
    }
    async fn stat_persistent_task(
        &self,
        _: Request<StatPersistentTaskRequest>,
    ) -> Result<Response<PersistentTask>, Status> {
        unimplemented("StatPersistentTask")
    }
    async fn delete_persistent_task(
        &self,
        _: Request<DeletePersistentTaskRequest>,
    ) -> Result<Response<()>, Status> {
        unimplemented("DeletePersistentTask")
    }
    type DownloadPersistentCacheTaskStream = Out<DownloadPersistentCacheTaskResponse>;
    async fn download_persistent_cache_task(
        &self,
        _: Request<DownloadPersistentCacheTaskRequest>,
    ) -> Result<Response<Self::DownloadPersistentCacheTaskStream>, Status> {
        unimplemented("DownloadPersistentCacheTask")
    }
    async fn update_persistent_cache_task(
        &self,
        _: Request<UpdatePersistentCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        unimplemented("UpdatePersistentCacheTask")
    }
    async fn stat_persistent_cache_task(
        &self,
        _: Request<StatPersistentCacheTaskRequest>,
    ) -> Result<Response<PersistentCacheTask>, Status> {
        unimplemented("StatPersistentCacheTask")
    }
    async fn delete_persistent_cache_task(
        &self,
        _: Request<DeletePersistentCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        unimplemented("DeletePersistentCacheTask")
    }
    type SyncPersistentCachePiecesStream = Out<SyncPersistentCachePiecesResponse>;
    async fn sync_persistent_cache_pieces(
        &self,
        _: Request<SyncPersistentCachePiecesRequest>,
    ) -> Result<Response<Self::SyncPersistentCachePiecesStream>, Status> {
        unimplemented("SyncPersistentCachePieces")
    }

    type SyncHostStream = Out<Host>;

    async fn sync_host(
        &self,
        _: Request<SyncHostRequest>,
    ) -> Result<Response<Self::SyncHostStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let peer = self.peer.clone();
        tokio::spawn(async move {
            loop {
                if tx.send(Ok(peer.host())).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
