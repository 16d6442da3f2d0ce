//! `scheduler.v2.Scheduler` over [`State`]: the host RPCs, and the `AnnouncePeer` stream
//! of each download, as real dfdaemons (1.5.10) drive it.
//!
//! One `AnnouncePeer` stream per download: `RegisterPeerRequest` first, answered with
//! exactly one of `NormalTaskResponse` (candidate parents), `NeedBackToSourceResponse`
//! or `MetadataOnlyResponse`; then started, per-piece finished/failed and reschedule
//! messages; the response stream is ended after the peer's finished or failed message
//! (dfdaemon waits for that end). At most `scheduler.retryLimit` answers per stream.
//!
//! Who goes to the origin: seed peers, when no other peer has the task; ordinary peers
//! only when no seed peer can serve (none announced, triggering one failed, or it did
//! not start within `scheduler.seedPeerWaitTimeout`), at most `backToSourceCount` per
//! task, or when `scheduler.peerBackToSource` says so. When no peer has a task, the
//! scheduler first asks the announced hosts whether they hold it (a restarted
//! scheduler learns nothing else: dfdaemons re-announce their hosts, not their tasks),
//! then triggers a seed peer (`DfdaemonUpload/DownloadTask`) and hands it out as a
//! parent as soon as it starts.

use super::config::Config;
use super::metrics::Metrics;
use super::seed;
use super::state::{
    PeerState, State, StateError, MAX_FAILED_PARENTS, MAX_PIECES, SEED_FAILURE_MEMORY,
};
use dragonfly_api::common::v2::{Host, Peer, Task};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as PeerRequest;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as PeerResponse;
use dragonfly_api::scheduler::v2::scheduler_server::Scheduler;
use dragonfly_api::scheduler::v2::*;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The scheduler service.
#[derive(Clone)]
pub struct SchedulerService {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Woken on every change that can give a waiting child a parent.
    changed: Notify,
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
}

impl From<StateError> for Status {
    fn from(e: StateError) -> Status {
        match e {
            StateError::NotFound(m) => Status::not_found(format!("{m} is not known")),
            StateError::FailedPrecondition(m) => Status::failed_precondition(m),
        }
    }
}

/// The ids every message of one `AnnouncePeer` stream carries.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StreamIds {
    host: String,
    task: String,
    peer: String,
}

/// What a handled message means for the stream.
enum Flow {
    Continue,
    End,
}

type Answers = mpsc::Sender<Result<AnnouncePeerResponse, Status>>;

/// The longest a first answer waits for a parent: dfdaemon's scheduler client gives up
/// on it after 10 s.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(8);

impl SchedulerService {
    /// A scheduler with an empty state.
    pub fn new(config: Config, metrics: Metrics) -> SchedulerService {
        SchedulerService {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                config,
                metrics,
            }),
        }
    }

    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

impl Inner {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the model half-changed in a way
        // later messages could not cope with: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changed.notify_waiters();
    }

    async fn answer(&self, tx: &Answers, kind: &str, response: PeerResponse) -> Result<(), Status> {
        tx.send(Ok(AnnouncePeerResponse {
            response: Some(response),
        }))
        .await
        .map_err(|_| Status::cancelled("the peer closed its stream"))?;
        self.metrics.answer(kind);
        Ok(())
    }

    /// Handles one message of a stream.
    async fn handle(
        self: &Arc<Self>,
        ids: &mut Option<StreamIds>,
        msg: AnnouncePeerRequest,
        tx: &Answers,
    ) -> Result<Flow, Status> {
        let these = StreamIds {
            host: msg.host_id.clone(),
            task: msg.task_id.clone(),
            peer: msg.peer_id.clone(),
        };
        if these.host.is_empty() || these.task.is_empty() || these.peer.is_empty() {
            return Err(Status::invalid_argument(
                "AnnouncePeerRequest needs host_id, task_id and peer_id",
            ));
        }
        let Some(request) = msg.request else {
            return Err(Status::invalid_argument(
                "AnnouncePeerRequest without a request",
            ));
        };
        match ids {
            None if !matches!(request, PeerRequest::RegisterPeerRequest(_)) => {
                return Err(Status::failed_precondition(format!(
                    "peer {} sent {} before RegisterPeerRequest",
                    these.peer,
                    request_name(&request)
                )))
            }
            Some(known) if *known != these => {
                return Err(Status::invalid_argument(format!(
                    "this stream is for peer {} of task {} on host {}; a message names peer {} \
                     of task {} on host {}",
                    known.peer, known.task, known.host, these.peer, these.task, these.host
                )))
            }
            Some(_) if matches!(request, PeerRequest::RegisterPeerRequest(_)) => {
                return Err(Status::failed_precondition(format!(
                    "peer {} registered twice on one stream",
                    these.peer
                )))
            }
            _ => {}
        }
        let (task, peer) = (these.task.as_str(), these.peer.as_str());
        match request {
            PeerRequest::RegisterPeerRequest(r) => {
                let download = r.download.ok_or_else(|| {
                    Status::invalid_argument("RegisterPeerRequest without a download")
                })?;
                self.state().register(&these.host, task, peer, &download)?;
                *ids = Some(these.clone());
                self.changed();
                if download.metadata_only {
                    // A peer that holds the whole task already (a seed asked to fetch
                    // what it has): it follows with started and finished messages.
                    self.state().peer_mut(task, peer)?.state = PeerState::Succeeded;
                    self.changed();
                    self.answer(
                        tx,
                        "metadata_only",
                        PeerResponse::MetadataOnlyResponse(MetadataOnlyResponse {}),
                    )
                    .await?;
                    return Ok(Flow::Continue);
                }
                self.schedule(&these, tx).await?;
            }
            PeerRequest::DownloadPeerStartedRequest(_) => {
                let mut state = self.state();
                let p = state.peer_mut(task, peer)?;
                if p.state != PeerState::Succeeded {
                    p.state = PeerState::Running;
                }
                drop(state);
                self.changed();
            }
            PeerRequest::DownloadPeerBackToSourceStartedRequest(_) => {
                self.state().peer_mut(task, peer)?.state = PeerState::BackToSource;
                self.changed();
            }
            PeerRequest::DownloadPieceFinishedRequest(r) => {
                let piece = r
                    .piece
                    .ok_or_else(|| Status::invalid_argument("piece missing"))?;
                self.state()
                    .peer_mut(task, peer)?
                    .pieces
                    .insert(piece.number);
                self.changed();
            }
            PeerRequest::DownloadPieceBackToSourceFinishedRequest(r) => {
                let piece = r
                    .piece
                    .ok_or_else(|| Status::invalid_argument("piece missing"))?;
                let mut state = self.state();
                let p = state.peer_mut(task, peer)?;
                if p.pieces.len() < MAX_PIECES {
                    p.pieces.insert(piece.number);
                }
                let from_seed = state.hosts.get(&these.host).is_some_and(|h| h.is_seed());
                if from_seed && !piece.digest.is_empty() && piece.digest.len() <= 256 {
                    if let Some(t) = state
                        .tasks
                        .get_mut(task)
                        .filter(|t| t.origin_pieces.len() < MAX_PIECES)
                    {
                        let mut recorded = piece;
                        recorded.content = None;
                        t.origin_pieces.insert(recorded.number, recorded);
                    }
                }
                drop(state);
                self.changed();
            }
            PeerRequest::DownloadPieceFailedRequest(r) => {
                let mut state = self.state();
                let p = state.peer_mut(task, peer)?;
                if !r.parent_id.is_empty() && p.failed_parents.len() < MAX_FAILED_PARENTS {
                    p.failed_parents.insert(r.parent_id);
                }
                drop(state);
                self.metrics.child_failure("piece");
            }
            PeerRequest::DownloadPieceBackToSourceFailedRequest(_) => {
                self.state().peer_mut(task, peer)?;
                self.metrics.child_failure("origin_piece");
            }
            PeerRequest::ReschedulePeerRequest(r) => {
                {
                    let mut state = self.state();
                    let p = state.peer_mut(task, peer)?;
                    for failed in &r.candidate_parents {
                        if p.failed_parents.len() >= MAX_FAILED_PARENTS {
                            break;
                        }
                        p.failed_parents.insert(failed.id.clone());
                    }
                }
                self.metrics.child_failure("reschedule");
                self.schedule(&these, tx).await?;
            }
            PeerRequest::DownloadPeerFinishedRequest(_)
            | PeerRequest::DownloadPeerBackToSourceFinishedRequest(_) => {
                self.finish(task, peer)?;
                return Ok(Flow::End);
            }
            PeerRequest::DownloadPeerFailedRequest(_)
            | PeerRequest::DownloadPeerBackToSourceFailedRequest(_) => {
                self.state().peer_mut(task, peer)?.state = PeerState::Failed;
                self.metrics.child_failure("peer");
                self.changed();
                return Ok(Flow::End);
            }
        }
        Ok(Flow::Continue)
    }

    fn finish(&self, task: &str, peer: &str) -> Result<(), Status> {
        let mut state = self.state();
        let p = state.peer_mut(task, peer)?;
        p.state = PeerState::Succeeded;
        let pieces = p.pieces.len() as u32;
        if let Some(t) = state.tasks.get_mut(task) {
            if pieces > 0 {
                t.piece_count.get_or_insert(pieces);
            }
        }
        drop(state);
        self.changed();
        Ok(())
    }

    /// Sends the one answer a registration or reschedule gets (module docs).
    async fn schedule(self: &Arc<Self>, ids: &StreamIds, tx: &Answers) -> Result<(), Status> {
        let cfg = &self.config.scheduler;
        let first = self.state().peer_mut(&ids.task, &ids.peer)?.answers == 0;
        // dfdaemon gives up on the first answer after 10 s (and then goes to the
        // origin on its own): answer it within [`FIRST_ANSWER_WAIT`].
        let wait = if first {
            cfg.seed_peer_wait_timeout.min(FIRST_ANSWER_WAIT)
        } else {
            cfg.seed_peer_wait_timeout
        };
        let deadline = Instant::now() + wait;
        let mut timed_out = false;
        loop {
            // Registered before the state is read, so no change is missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let decision = self.decide(ids, timed_out)?;
            match decision {
                Decision::Parents(parents) => {
                    return self
                        .answer(
                            tx,
                            "normal_task",
                            PeerResponse::NormalTaskResponse(NormalTaskResponse {
                                candidate_parents: parents,
                            }),
                        )
                        .await;
                }
                Decision::BackToSource(reason) => {
                    self.metrics.back_to_source(reason);
                    return self
                        .answer(
                            tx,
                            "need_back_to_source",
                            PeerResponse::NeedBackToSourceResponse(NeedBackToSourceResponse {
                                description: Some(reason.to_string()),
                            }),
                        )
                        .await;
                }
                Decision::Probe(hosts) => {
                    let found = seed::probe_hosts(&hosts, &ids.task).await;
                    let mut state = self.state();
                    for host_id in found {
                        state.restore_peer(&ids.task, &host_id);
                    }
                    if let Some(t) = state.tasks.get_mut(&ids.task) {
                        t.probing = false;
                    }
                    drop(state);
                    self.changed();
                    continue;
                }
                Decision::Trigger(trigger) => {
                    let (seed_host, download) = *trigger;
                    let inner = self.clone();
                    let task = ids.task.clone();
                    tokio::spawn(async move {
                        let how = seed::trigger(&seed_host, download).await;
                        let ok = how == seed::Triggered::Started;
                        inner
                            .metrics
                            .seed_trigger(if ok { "started" } else { "failed" });
                        if !ok {
                            // A seed that cannot be reached is not picked for any task
                            // for a while (until it announces itself again); another
                            // one is tried next. Only when none is left (or the seed
                            // refused this task) can the task's peers go to the origin.
                            let mut state = inner.state();
                            if how == seed::Triggered::Unreachable {
                                state
                                    .failed_seeds
                                    .insert(seed_host.id.clone(), Instant::now());
                            }
                            let other =
                                how == seed::Triggered::Unreachable && state.pick_seed().is_some();
                            if let Some(t) = state.tasks.get_mut(&task) {
                                if other {
                                    t.seed_triggered = None;
                                } else {
                                    t.seed_failed = Some(Instant::now());
                                }
                            }
                        }
                        inner.changed();
                    });
                }
                Decision::Wait => {}
            }
            if timed_out {
                // `decide` answers when timed out; this is only reached if it could not.
                return Err(Status::unavailable(format!(
                    "no parent for peer {} of task {} within {wait:?}",
                    ids.peer, ids.task
                )));
            }
            if Instant::now() >= deadline {
                timed_out = true;
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                _ = tokio::time::timeout(left.min(Duration::from_millis(500)), notified) => {}
                // The peer gave up (it goes to the origin by itself): stop waiting.
                _ = tx.closed() => return Err(Status::cancelled("the peer closed its stream")),
            }
        }
    }

    /// One scheduling decision under the lock. `timed_out`: the wait for a parent is
    /// over, so the decision must be an answer.
    fn decide(&self, ids: &StreamIds, timed_out: bool) -> Result<Decision, Status> {
        let cfg = &self.config.scheduler;
        let mut state = self.state();
        let is_seed = state.hosts.get(&ids.host).is_some_and(|h| h.is_seed());
        let me = state.peer_mut(&ids.task, &ids.peer)?;
        let (answers, need_back_to_source) = (me.answers, me.need_back_to_source);
        if answers >= cfg.retry_limit {
            return Err(Status::resource_exhausted(format!(
                "peer {} was answered {answers} times, the limit per stream \
                 (scheduler.retryLimit)",
                ids.peer
            )));
        }
        let parents = state.candidates(&ids.task, &ids.peer, cfg.candidate_parent_limit);
        if !parents.is_empty() && !need_back_to_source {
            let messages = state.parent_messages(&ids.task, &parents);
            let p = state.peer_mut(&ids.task, &ids.peer)?;
            p.parents = parents;
            p.answers += 1;
            return Ok(Decision::Parents(messages));
        }
        let to_origin = |state: &mut State, reason: &'static str, counted: bool| {
            if counted {
                if let Some(t) = state.tasks.get_mut(&ids.task) {
                    t.back_to_source_peers += 1;
                }
            }
            if let Ok(p) = state.peer_mut(&ids.task, &ids.peer) {
                p.answers += 1;
            }
            Ok(Decision::BackToSource(reason))
        };
        if is_seed {
            return to_origin(&mut state, "seed peer: no other peer has the task", false);
        }
        if need_back_to_source {
            return to_origin(&mut state, "the download asks for the origin", false);
        }
        if cfg.peer_back_to_source {
            return to_origin(&mut state, "scheduler.peerBackToSource", true);
        }
        let Some(task) = state.tasks.get(&ids.task) else {
            return Err(Status::not_found(format!("task {} is not known", ids.task)));
        };
        let failed = task
            .peers
            .get(&ids.peer)
            .map(|p| p.failed_parents.clone())
            .unwrap_or_default();
        let seed_failed = task
            .seed_failed
            .is_some_and(|t| t.elapsed() < SEED_FAILURE_MEMORY);
        let (probing, probed) = (task.probing, task.probed);
        let holders = task
            .peers
            .values()
            .any(|p| p.state.can_serve() || p.restored);
        // Seed peers of the task this child has not reported failing, by state.
        let mut seed_registered = false;
        let mut seed_usable = false;
        let mut seed_blamed = false;
        for (id, p) in &task.peers {
            if !state.hosts.get(&p.host_id).is_some_and(|h| h.is_seed()) {
                continue;
            }
            seed_registered = true;
            if failed.contains(id) {
                seed_blamed = true;
            } else if p.state != PeerState::Failed {
                seed_usable = true;
            }
        }
        let recently_triggered = task
            .seed_triggered
            .is_some_and(|t| t.elapsed() < cfg.seed_peer_wait_timeout);
        let download = task.download.clone();
        let seeds_can_serve = self.config.seed_peer.enable
            && (state.pick_seed().is_some() || seed_usable || recently_triggered)
            && !seed_failed;
        let last_answer = answers + 1 >= cfg.retry_limit;
        let no_seed_left = seed_blamed && !seed_usable;
        if !seeds_can_serve || last_answer || no_seed_left || timed_out {
            if timed_out && !seed_registered {
                // The seed did not even register: count it as failed for a while.
                if let Some(t) = state.tasks.get_mut(&ids.task) {
                    t.seed_failed = Some(Instant::now());
                }
            }
            let count = state
                .tasks
                .get(&ids.task)
                .map_or(0, |t| t.back_to_source_peers);
            if count >= cfg.back_to_source_count {
                return Err(Status::resource_exhausted(format!(
                    "no peer can serve task {} and {count} peers already went to the origin \
                     (scheduler.backToSourceCount)",
                    ids.task
                )));
            }
            let reason = if last_answer {
                "last answer of the stream and no parent left"
            } else if no_seed_left {
                "the peer reported every seed peer of the task failing"
            } else if timed_out {
                "no seed peer started the task in time"
            } else {
                "no seed peer can serve the task"
            };
            return to_origin(&mut state, reason, true);
        }
        if probing {
            return Ok(Decision::Wait);
        }
        if !probed && !holders {
            let hosts: Vec<Host> = state
                .hosts
                .values()
                .filter(|h| h.host.id != ids.host && h.is_alive())
                .map(|h| h.host.clone())
                .collect();
            if let Some(t) = state.tasks.get_mut(&ids.task) {
                t.probed = true;
                t.probing = !hosts.is_empty();
            }
            if !hosts.is_empty() {
                return Ok(Decision::Probe(hosts));
            }
        }
        if seed_usable || recently_triggered {
            return Ok(Decision::Wait);
        }
        let (Some(seed_host), Some(download)) = (state.pick_seed(), download) else {
            return Ok(Decision::Wait);
        };
        if let Some(t) = state.tasks.get_mut(&ids.task) {
            t.seed_triggered = Some(Instant::now());
        }
        Ok(Decision::Trigger(Box::new((seed_host, download))))
    }

    /// A stream ended: a peer that had not finished can serve no one.
    fn stream_closed(&self, ids: &StreamIds) {
        let mut state = self.state();
        if let Ok(p) = state.peer_mut(&ids.task, &ids.peer) {
            if p.state != PeerState::Succeeded {
                p.state = PeerState::Failed;
            }
        }
        drop(state);
        self.changed();
    }
}

enum Decision {
    Parents(Vec<Peer>),
    BackToSource(&'static str),
    Probe(Vec<Host>),
    Trigger(Box<(Host, dragonfly_api::common::v2::Download)>),
    Wait,
}

/// A protobuf duration as a std one (negative ones are refused).
fn prost_types_duration(d: prost_wkt_types::Duration) -> std::time::Duration {
    std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

fn request_name(r: &PeerRequest) -> &'static str {
    match r {
        PeerRequest::RegisterPeerRequest(_) => "RegisterPeerRequest",
        PeerRequest::DownloadPeerStartedRequest(_) => "DownloadPeerStartedRequest",
        PeerRequest::DownloadPeerBackToSourceStartedRequest(_) => {
            "DownloadPeerBackToSourceStartedRequest"
        }
        PeerRequest::ReschedulePeerRequest(_) => "ReschedulePeerRequest",
        PeerRequest::DownloadPeerFinishedRequest(_) => "DownloadPeerFinishedRequest",
        PeerRequest::DownloadPeerBackToSourceFinishedRequest(_) => {
            "DownloadPeerBackToSourceFinishedRequest"
        }
        PeerRequest::DownloadPeerFailedRequest(_) => "DownloadPeerFailedRequest",
        PeerRequest::DownloadPeerBackToSourceFailedRequest(_) => {
            "DownloadPeerBackToSourceFailedRequest"
        }
        PeerRequest::DownloadPieceFinishedRequest(_) => "DownloadPieceFinishedRequest",
        PeerRequest::DownloadPieceBackToSourceFinishedRequest(_) => {
            "DownloadPieceBackToSourceFinishedRequest"
        }
        PeerRequest::DownloadPieceFailedRequest(_) => "DownloadPieceFailedRequest",
        PeerRequest::DownloadPieceBackToSourceFailedRequest(_) => {
            "DownloadPieceBackToSourceFailedRequest"
        }
    }
}

type AnswerStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<AnnouncePeerResponse, Status>> + Send>>;

/// The stream type of the RPCs this scheduler does not serve.
type Unimplemented<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "scheduler.v2.Scheduler/{rpc} is not served here (standard tasks only)"
    ))
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type AnnouncePeerStream = AnswerStream;
    type AnnounceCachePeerStream = Unimplemented<AnnounceCachePeerResponse>;
    type AnnouncePersistentPeerStream = Unimplemented<AnnouncePersistentPeerResponse>;
    type AnnouncePersistentCachePeerStream = Unimplemented<AnnouncePersistentCachePeerResponse>;

    async fn announce_peer(
        &self,
        request: Request<Streaming<AnnouncePeerRequest>>,
    ) -> Result<Response<Self::AnnouncePeerStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut ids: Option<StreamIds> = None;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        // A message too large or malformed, or the peer gone: say so,
                        // if anyone is still listening.
                        tracing::info!("AnnouncePeer stream of {ids:?}: {}", e.message());
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                };
                match inner.handle(&mut ids, msg, &tx).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::End) => break,
                    Err(status) => {
                        tracing::info!("AnnouncePeer of {ids:?}: {}", status.message());
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
            if let Some(ids) = &ids {
                inner.stream_closed(ids);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stat_peer(&self, request: Request<StatPeerRequest>) -> Result<Response<Peer>, Status> {
        let r = request.into_inner();
        let state = self.inner.state();
        let task = state
            .tasks
            .get(&r.task_id)
            .ok_or_else(|| Status::not_found(format!("task {} is not known", r.task_id)))?;
        if !task.peers.contains_key(&r.peer_id) {
            return Err(Status::not_found(format!(
                "peer {} is not known",
                r.peer_id
            )));
        }
        let mut peer = state
            .parent_messages(&r.task_id, std::slice::from_ref(&r.peer_id))
            .pop()
            .ok_or_else(|| Status::not_found(format!("the host of peer {} is gone", r.peer_id)))?;
        peer.task = state.task_message(&r.task_id).ok();
        Ok(Response::new(peer))
    }

    async fn delete_peer(
        &self,
        request: Request<DeletePeerRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let mut state = self.inner.state();
        let task = state
            .tasks
            .get_mut(&r.task_id)
            .ok_or_else(|| Status::not_found(format!("task {} is not known", r.task_id)))?;
        task.peers
            .remove(&r.peer_id)
            .ok_or_else(|| Status::not_found(format!("peer {} is not known", r.peer_id)))?;
        Ok(Response::new(()))
    }

    async fn stat_task(&self, request: Request<StatTaskRequest>) -> Result<Response<Task>, Status> {
        let r = request.into_inner();
        Ok(Response::new(self.inner.state().task_message(&r.task_id)?))
    }

    async fn delete_task(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let mut state = self.inner.state();
        let task = state
            .tasks
            .get_mut(&r.task_id)
            .ok_or_else(|| Status::not_found(format!("task {} is not known", r.task_id)))?;
        task.peers.retain(|_, p| p.host_id != r.host_id);
        if task.peers.is_empty() {
            state.tasks.remove(&r.task_id);
        }
        Ok(Response::new(()))
    }

    async fn announce_host(
        &self,
        request: Request<AnnounceHostRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let host = r
            .host
            .ok_or_else(|| Status::invalid_argument("AnnounceHostRequest without a host"))?;
        if host.id.is_empty() || host.ip.is_empty() {
            return Err(Status::invalid_argument("a host needs an id and an ip"));
        }
        if !(1..=65535).contains(&host.port) {
            return Err(Status::invalid_argument(format!(
                "host {} announces port {}",
                host.id, host.port
            )));
        }
        let interval = r
            .interval
            .map(prost_types_duration)
            .filter(|d| !d.is_zero());
        self.inner.state().announce_host_every(host, interval);
        self.inner.changed();
        Ok(Response::new(()))
    }

    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let r = request.into_inner();
        let state = self.inner.state();
        let mut hosts: Vec<Host> = state
            .hosts
            .values()
            .filter(|h| r.r#type.is_none_or(|t| h.host.r#type == t))
            .map(|h| h.host.clone())
            .collect();
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn delete_host(
        &self,
        request: Request<DeleteHostRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.inner.state().delete_host(&r.host_id)?;
        self.inner.changed();
        Ok(Response::new(()))
    }

    async fn announce_cache_peer(
        &self,
        _: Request<tonic::Streaming<AnnounceCachePeerRequest>>,
    ) -> Result<Response<Self::AnnounceCachePeerStream>, Status> {
        Err(unimplemented("announce_cache_peer"))
    }
    async fn stat_cache_peer(
        &self,
        _: Request<StatCachePeerRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::CachePeer>, Status> {
        Err(unimplemented("stat_cache_peer"))
    }
    async fn delete_cache_peer(
        &self,
        _: Request<DeleteCachePeerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("delete_cache_peer"))
    }
    async fn stat_cache_task(
        &self,
        _: Request<StatCacheTaskRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::CacheTask>, Status> {
        Err(unimplemented("stat_cache_task"))
    }
    async fn delete_cache_task(
        &self,
        _: Request<DeleteCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("delete_cache_task"))
    }
    async fn announce_persistent_peer(
        &self,
        _: Request<tonic::Streaming<AnnouncePersistentPeerRequest>>,
    ) -> Result<Response<Self::AnnouncePersistentPeerStream>, Status> {
        Err(unimplemented("announce_persistent_peer"))
    }
    async fn stat_persistent_peer(
        &self,
        _: Request<StatPersistentPeerRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::PersistentPeer>, Status> {
        Err(unimplemented("stat_persistent_peer"))
    }
    async fn delete_persistent_peer(
        &self,
        _: Request<DeletePersistentPeerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("delete_persistent_peer"))
    }
    async fn upload_persistent_task_started(
        &self,
        _: Request<UploadPersistentTaskStartedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("upload_persistent_task_started"))
    }
    async fn upload_persistent_task_finished(
        &self,
        _: Request<UploadPersistentTaskFinishedRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::PersistentTask>, Status> {
        Err(unimplemented("upload_persistent_task_finished"))
    }
    async fn upload_persistent_task_failed(
        &self,
        _: Request<UploadPersistentTaskFailedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("upload_persistent_task_failed"))
    }
    async fn stat_persistent_task(
        &self,
        _: Request<StatPersistentTaskRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::PersistentTask>, Status> {
        Err(unimplemented("stat_persistent_task"))
    }
    async fn delete_persistent_task(
        &self,
        _: Request<DeletePersistentTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("delete_persistent_task"))
    }
    async fn announce_persistent_cache_peer(
        &self,
        _: Request<tonic::Streaming<AnnouncePersistentCachePeerRequest>>,
    ) -> Result<Response<Self::AnnouncePersistentCachePeerStream>, Status> {
        Err(unimplemented("announce_persistent_cache_peer"))
    }
    async fn stat_persistent_cache_peer(
        &self,
        _: Request<StatPersistentCachePeerRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::PersistentCachePeer>, Status> {
        Err(unimplemented("stat_persistent_cache_peer"))
    }
    async fn delete_persistent_cache_peer(
        &self,
        _: Request<DeletePersistentCachePeerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("delete_persistent_cache_peer"))
    }
    async fn upload_persistent_cache_task_started(
        &self,
        _: Request<UploadPersistentCacheTaskStartedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("upload_persistent_cache_task_started"))
    }
    async fn upload_persistent_cache_task_finished(
        &self,
        _: Request<UploadPersistentCacheTaskFinishedRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::PersistentCacheTask>, Status> {
        Err(unimplemented("upload_persistent_cache_task_finished"))
    }
    async fn upload_persistent_cache_task_failed(
        &self,
        _: Request<UploadPersistentCacheTaskFailedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("upload_persistent_cache_task_failed"))
    }
    async fn stat_persistent_cache_task(
        &self,
        _: Request<StatPersistentCacheTaskRequest>,
    ) -> Result<Response<dragonfly_api::common::v2::PersistentCacheTask>, Status> {
        Err(unimplemented("stat_persistent_cache_task"))
    }
    async fn delete_persistent_cache_task(
        &self,
        _: Request<DeletePersistentCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("delete_persistent_cache_task"))
    }
    async fn preheat_image(&self, _: Request<PreheatImageRequest>) -> Result<Response<()>, Status> {
        Err(unimplemented("preheat_image"))
    }
    async fn stat_image(
        &self,
        _: Request<StatImageRequest>,
    ) -> Result<Response<StatImageResponse>, Status> {
        Err(unimplemented("stat_image"))
    }
    async fn preheat_file(&self, _: Request<PreheatFileRequest>) -> Result<Response<()>, Status> {
        Err(unimplemented("preheat_file"))
    }
    async fn stat_file(
        &self,
        _: Request<StatFileRequest>,
    ) -> Result<Response<StatFileResponse>, Status> {
        Err(unimplemented("stat_file"))
    }
}
