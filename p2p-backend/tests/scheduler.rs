//! Bad input to the scheduler, over real gRPC on loopback: unknown hosts, tasks and
//! peers, out-of-order and mismatched stream messages, oversized messages, a child that
//! reports every parent failing, and more answers than a stream may get. Each gets a
//! clear gRPC error, within bounded time, and the scheduler keeps serving. (How real
//! dfdaemons fare under it is `tests/tests/integration/p2p_scheduler.rs`.)

use dragonfly_api::common::v2::{Download, Host, Peer};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Req;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as Resp;
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::*;
use p2p_backend::scheduler::config::Config;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

async fn start(yaml: &str) -> (SchedulerClient<Channel>, String) {
    let config = Config::parse(yaml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(p2p_backend::scheduler::serve(
        config,
        listener,
        std::future::pending(),
    ));
    let url = format!("http://{addr}");
    for _ in 0..100 {
        if let Ok(c) = SchedulerClient::connect(url.clone()).await {
            return (c, url);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the scheduler did not come up on {addr}");
}

fn host(id: &str, seed: bool) -> Host {
    Host {
        id: id.into(),
        r#type: u32::from(seed),
        ip: "127.0.0.1".into(),
        port: 4000,
        ..Default::default()
    }
}

async fn announce(c: &mut SchedulerClient<Channel>, id: &str, seed: bool) {
    c.announce_host(AnnounceHostRequest {
        host: Some(host(id, seed)),
        interval: None,
    })
    .await
    .unwrap();
}

/// One AnnouncePeer stream: send messages, read answers.
struct Stream {
    tx: mpsc::Sender<AnnouncePeerRequest>,
    rx: tonic::Streaming<AnnouncePeerResponse>,
    ids: (String, String, String),
}

impl Stream {
    async fn open(c: &mut SchedulerClient<Channel>, host: &str, task: &str, peer: &str) -> Stream {
        let (tx, rx) = mpsc::channel(16);
        let rx = c
            .announce_peer(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream {
            tx,
            rx,
            ids: (host.into(), task.into(), peer.into()),
        }
    }

    async fn send(&self, request: Req) {
        self.send_as(&self.ids.0, &self.ids.1, &self.ids.2, request)
            .await
    }

    async fn send_as(&self, host: &str, task: &str, peer: &str, request: Req) {
        self.tx
            .send(AnnouncePeerRequest {
                host_id: host.into(),
                task_id: task.into(),
                peer_id: peer.into(),
                request: Some(request),
            })
            .await
            .unwrap();
    }

    async fn register(&self) {
        self.send(Req::RegisterPeerRequest(RegisterPeerRequest {
            download: Some(Download {
                url: "http://origin/v2/r/blobs/sha256:00".into(),
                ..Default::default()
            }),
        }))
        .await
    }

    async fn reschedule(&self, failing: &[&str]) {
        self.send(Req::ReschedulePeerRequest(ReschedulePeerRequest {
            candidate_parents: failing
                .iter()
                .map(|id| Peer {
                    id: id.to_string(),
                    ..Default::default()
                })
                .collect(),
            description: None,
        }))
        .await
    }

    /// The next answer, within 10 s (dfdaemon's own limit for the first one).
    async fn answer(&mut self) -> Result<Option<Resp>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("an answer within 10 s")
            .map(|m| m.and_then(|m| m.response))
    }
}

fn parents(r: Option<Resp>) -> Vec<String> {
    match r {
        Some(Resp::NormalTaskResponse(n)) => {
            n.candidate_parents.into_iter().map(|p| p.id).collect()
        }
        other => panic!("expected parents, got {other:?}"),
    }
}

#[tokio::test]
async fn health_is_serving_and_hosts_are_listed_and_deleted() {
    let (mut c, url) = start("").await;
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    announce(&mut c, "b", false).await;
    announce(&mut c, "a", true).await;
    let hosts = c
        .list_hosts(ListHostsRequest { r#type: None })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = hosts.hosts.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    let seeds = c
        .list_hosts(ListHostsRequest { r#type: Some(1) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seeds.hosts.len(), 1);
    c.delete_host(DeleteHostRequest {
        host_id: "a".into(),
    })
    .await
    .unwrap();
    let e = c
        .delete_host(DeleteHostRequest {
            host_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .announce_host(AnnounceHostRequest {
            host: Some(Host {
                id: "x".into(),
                ..Default::default()
            }),
            interval: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test]
async fn unknown_tasks_peers_and_services_are_named() {
    let (mut c, _) = start("").await;
    let e = c
        .stat_task(StatTaskRequest {
            host_id: "h".into(),
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("task nope"), "{e:?}");
    let e = c
        .stat_peer(StatPeerRequest {
            host_id: "h".into(),
            task_id: "nope".into(),
            peer_id: "p".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .stat_cache_task(StatCacheTaskRequest {
            host_id: "h".into(),
            task_id: "t".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}

#[tokio::test]
async fn stream_messages_out_of_order_or_for_another_peer_are_refused() {
    let (mut c, _) = start("").await;
    // A register from a host never announced.
    let mut s = Stream::open(&mut c, "ghost", "t", "p").await;
    s.register().await;
    let e = s.answer().await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("never announced"), "{e:?}");

    // A piece before the register.
    announce(&mut c, "h", false).await;
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.send(Req::DownloadPeerStartedRequest(
        DownloadPeerStartedRequest {},
    ))
    .await;
    let e = s.answer().await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("before RegisterPeerRequest"), "{e:?}");

    // A message naming another peer on a registered stream.
    let config = "scheduler:\n  peerBackToSource: true\n";
    let (mut c, _) = start(config).await;
    announce(&mut c, "h", false).await;
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.register().await;
    assert!(matches!(
        s.answer().await.unwrap(),
        Some(Resp::NeedBackToSourceResponse(_))
    ));
    s.send_as(
        "h",
        "t",
        "other",
        Req::DownloadPeerStartedRequest(DownloadPeerStartedRequest {}),
    )
    .await;
    let e = s.answer().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A second register on one stream.
    let mut s = Stream::open(&mut c, "h", "t2", "p2").await;
    s.register().await;
    assert!(matches!(
        s.answer().await.unwrap(),
        Some(Resp::NeedBackToSourceResponse(_))
    ));
    s.register().await;
    let e = s.answer().await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("registered twice"), "{e:?}");
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_scheduler_keeps_serving() {
    let (mut c, _) = start("").await;
    announce(&mut c, "h", false).await;
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    let mut download = Download {
        url: "http://origin/x".into(),
        ..Default::default()
    };
    download
        .request_header
        .insert("X-Big".into(), "x".repeat(5 << 20));
    s.send(Req::RegisterPeerRequest(RegisterPeerRequest {
        download: Some(download),
    }))
    .await;
    let e = s.answer().await.unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    // Still serving.
    announce(&mut c, "h2", false).await;
}

#[tokio::test]
async fn a_child_failing_every_parent_gets_a_bounded_answer_and_never_a_cycle() {
    // No seed peers: the first peer goes to the origin, and only one may.
    let config = "scheduler:\n  backToSourceCount: 1\n  seedPeerWaitTimeout: 1s\nseedPeer:\n  enable: false\n";
    let (mut c, _) = start(config).await;
    for h in ["a", "b", "c"] {
        announce(&mut c, h, false).await;
    }
    let mut first = Stream::open(&mut c, "a", "t", "pa").await;
    first.register().await;
    assert!(matches!(
        first.answer().await.unwrap(),
        Some(Resp::NeedBackToSourceResponse(_))
    ));
    first
        .send(Req::DownloadPeerBackToSourceStartedRequest(
            DownloadPeerBackToSourceStartedRequest { description: None },
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut second = Stream::open(&mut c, "b", "t", "pb").await;
    second.register().await;
    assert_eq!(parents(second.answer().await.unwrap()), ["pa"]);
    second
        .send(Req::DownloadPeerStartedRequest(
            DownloadPeerStartedRequest {},
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The third gets both; `pb` descends from `pa`, never the other way round.
    let mut third = Stream::open(&mut c, "c", "t", "pc").await;
    third.register().await;
    let got = parents(third.answer().await.unwrap());
    assert_eq!(got.len(), 2, "{got:?}");

    // `pb` reports its only parent failing: nothing is left, no seed can serve, and the
    // one origin download allowed is taken: a clear error, at once.
    let started = Instant::now();
    second.reschedule(&["pa"]).await;
    let e = second.answer().await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("backToSourceCount"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_stream_gets_at_most_retry_limit_answers() {
    let config =
        "scheduler:\n  retryLimit: 3\n  backToSourceCount: 100\nseedPeer:\n  enable: false\n";
    let (mut c, _) = start(config).await;
    for h in ["a", "b"] {
        announce(&mut c, h, false).await;
    }
    let mut first = Stream::open(&mut c, "a", "t", "pa").await;
    first.register().await;
    first.answer().await.unwrap();
    first
        .send(Req::DownloadPeerBackToSourceStartedRequest(
            DownloadPeerBackToSourceStartedRequest { description: None },
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = Stream::open(&mut c, "b", "t", "pb").await;
    s.register().await;
    assert_eq!(parents(s.answer().await.unwrap()), ["pa"]);
    s.reschedule(&[]).await;
    assert_eq!(parents(s.answer().await.unwrap()), ["pa"]);
    // The last answer allowed: the origin, since no parent is left after this.
    s.reschedule(&["pa"]).await;
    assert!(matches!(
        s.answer().await.unwrap(),
        Some(Resp::NeedBackToSourceResponse(_))
    ));
    s.reschedule(&[]).await;
    let e = s.answer().await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("retryLimit"), "{e:?}");
}

#[tokio::test]
async fn the_response_stream_ends_after_the_peer_finishes() {
    let config = "scheduler:\n  peerBackToSource: true\n";
    let (mut c, _) = start(config).await;
    announce(&mut c, "h", false).await;
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.register().await;
    s.answer().await.unwrap();
    s.send(Req::DownloadPeerBackToSourceFinishedRequest(
        DownloadPeerBackToSourceFinishedRequest {},
    ))
    .await;
    // The sending side stays open, as dfdaemon keeps it: the scheduler ends the call.
    assert!(s.answer().await.unwrap().is_none());
    let task = c
        .stat_task(StatTaskRequest {
            host_id: "h".into(),
            task_id: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.state, "Succeeded");
}
