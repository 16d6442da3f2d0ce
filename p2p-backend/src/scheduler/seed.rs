//! What the scheduler asks of peers: a seed peer to fetch a task
//! (`DfdaemonUpload/DownloadTask`), and announced hosts whether they hold one
//! (`DfdaemonUpload/StatLocalTask`; dfdaemon's `StatTask` asks the scheduler back), each
//! over the host's upload port.
//!
//! A seed asked for a task it already holds registers with `metadata_only` and is
//! answered `MetadataOnlyResponse`: it becomes a parent without fetching anything.
//! The response stream of `DownloadTask` must be read to its end: dfdaemon's sends
//! into it block, and an unread stream stalls the seed's download.

use dragonfly_api::common::v2::{Download, Host};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::{DownloadTaskRequest, StatLocalTaskRequest};
use std::time::Duration;
use tonic::transport::Endpoint;

/// How long connecting to a peer's upload server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host may take to say whether it holds a task.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a seed may take to start a download (it asks the origin first).
const TRIGGER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a seed's download is followed before the scheduler stops reading it.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

async fn client(host: &Host) -> Result<DfdaemonUploadClient<tonic::transport::Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{}:{}", host.ip, host.port))
        .map_err(|e| format!("host {}: bad address: {e}", host.id))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| {
        format!(
            "host {}: connecting to {}:{}: {e}",
            host.id, host.ip, host.port
        )
    })?;
    Ok(DfdaemonUploadClient::new(channel))
}

/// The download a seed peer is asked to make: the child's (task id rules included,
/// so that the seed names the task as the child did), for the whole task, kept in the
/// seed's storage only.
fn seed_download(mut d: Download) -> Download {
    d.range = None;
    // dfdaemon rebuilds the range from a `Range` header.
    d.request_header
        .retain(|k, _| !k.eq_ignore_ascii_case("range"));
    d.output_path = None;
    d.need_piece_content = false;
    d.is_prefetch = false;
    d.prefetch = false;
    d.need_back_to_source = false;
    d.remote_ip = None;
    d.force_hard_link = false;
    d.metadata_only = false;
    d
}

/// How triggering a seed peer went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Triggered {
    /// It started the download.
    Started,
    /// It answered and refused (this task: e.g. the origin refused it).
    Refused,
    /// It could not be reached, or did not answer in time (any task).
    Unreachable,
}

/// Asks the seed peer on `host` to fetch the task of `download`; returns once it has
/// started (its first response), and drains the rest of its response stream in the
/// background.
pub async fn trigger(host: &Host, download: Download) -> Triggered {
    let mut client = match client(host).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("triggering a seed peer: {e}");
            return Triggered::Unreachable;
        }
    };
    let url = download.url.clone();
    let request = DownloadTaskRequest {
        download: Some(seed_download(download)),
    };
    let started = tokio::time::timeout(TRIGGER_TIMEOUT, client.download_task(request)).await;
    let mut stream = match started {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => {
            tracing::warn!(
                "seed peer {} refused to download {url}: {}",
                host.id,
                e.message()
            );
            return match e.code() {
                tonic::Code::Unavailable => Triggered::Unreachable,
                _ => Triggered::Refused,
            };
        }
        Err(_) => {
            tracing::warn!(
                "seed peer {} did not start {url} within {TRIGGER_TIMEOUT:?}",
                host.id
            );
            return Triggered::Unreachable;
        }
    };
    let host_id = host.id.clone();
    tokio::spawn(async move {
        let drain = async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("seed peer {host_id} downloading {url}: {}", e.message());
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(DOWNLOAD_TIMEOUT, drain).await.is_err() {
            tracing::warn!("stopped following a seed download after {DOWNLOAD_TIMEOUT:?}");
        }
    });
    Triggered::Started
}

/// The ids of the hosts among `hosts` that hold the whole task `task_id`, asked all at
/// once, each within [`PROBE_TIMEOUT`].
pub async fn probe_hosts(hosts: &[Host], task_id: &str) -> Vec<String> {
    let asks = hosts.iter().map(|h| async move {
        let ask = async {
            let mut c = client(h).await.ok()?;
            let task = c
                .stat_local_task(StatLocalTaskRequest {
                    task_id: task_id.to_string(),
                    remote_ip: None,
                })
                .await
                .ok()?
                .into_inner();
            let done = task.finished_at.is_some() && task.failed_at.is_none();
            done.then(|| h.id.clone())
        };
        tokio::time::timeout(PROBE_TIMEOUT, ask)
            .await
            .ok()
            .flatten()
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}
