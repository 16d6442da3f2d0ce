//! The `registry` blob backend: blobs are layers of one repository, fetched by ranged
//! GETs (`sha256:<blob id>`).

use super::{Registry, RegistryError};
use crate::{BackendError, BlobBackend, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// Reads blobs from a registry repository by blob id (the layer digest's hex).
pub struct RegistryBackend {
    registry: Registry,
    sizes: Mutex<HashMap<String, u64>>,
    proxy: Option<super::proxy::PeerProxy>,
    /// The latest ranges the P2P proxy served, `(blob, start, end)`: bad bytes are
    /// reported to it only when it sent them.
    from_peer: Mutex<std::collections::VecDeque<(String, u64, u64)>>,
}

/// How many ranges served by the P2P proxy are remembered.
const PEER_RANGES: usize = 1024;

impl RegistryBackend {
    /// A backend reading blobs of `registry`'s repository.
    pub fn new(registry: Registry) -> Self {
        RegistryBackend {
            registry,
            sizes: Mutex::new(HashMap::new()),
            proxy: None,
            from_peer: Mutex::default(),
        }
    }

    /// Range reads go through the node's P2P peer (see [`super::proxy`]).
    pub fn with_proxy(mut self, proxy: super::proxy::PeerProxy) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// Records the size of a blob (from a manifest), so that no request is needed to learn it.
    pub fn set_size(&self, blob_id: &str, size: u64) {
        if let Ok(mut m) = self.sizes.lock() {
            m.insert(blob_id.to_string(), size);
        }
    }
}

fn remote(blob_id: &str, e: RegistryError) -> BackendError {
    match e {
        RegistryError::NotFound(_) => BackendError::NotFound(blob_id.to_string()),
        e if e.is_timeout() => BackendError::TimedOut {
            what: format!("blob {blob_id}"),
            reason: crate::error_chain(&e),
        },
        e => BackendError::Remote {
            what: format!("blob {blob_id}"),
            reason: crate::error_chain(&e),
        },
    }
}

impl BlobBackend for RegistryBackend {
    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at_for(blob_id, offset, buf, false)
    }

    fn read_at_for(
        &self,
        blob_id: &str,
        offset: u64,
        buf: &mut [u8],
        prefetch: bool,
    ) -> Result<()> {
        let digest = format!("sha256:{blob_id}");
        if let Ok(size) = self.blob_size(blob_id) {
            if offset + buf.len() as u64 > size {
                return Err(BackendError::OutOfRange {
                    blob_id: blob_id.to_string(),
                    offset,
                    len: buf.len() as u64,
                    size,
                });
            }
        }
        if let Some(p) = &self.proxy {
            if p.healthy() {
                match p.read(&self.registry, &digest, offset, buf, prefetch) {
                    Ok(()) => {
                        let mut ranges = self.from_peer.lock().unwrap_or_else(|e| e.into_inner());
                        if ranges.len() >= PEER_RANGES {
                            ranges.pop_front();
                        }
                        ranges.push_back((blob_id.to_string(), offset, offset + buf.len() as u64));
                        return Ok(());
                    }
                    Err(e) if !p.config().fallback => return Err(e),
                    Err(e) => tracing::warn!("{e}; reading from the registry"),
                }
            }
            // Unhealthy, or failed with `fallback`: this read goes to the registry.
            p.counters
                .fallbacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let n = self
            .registry
            .read_range_into(&digest, offset, buf)
            .map_err(|e| remote(blob_id, e))?;
        if n != buf.len() {
            return Err(BackendError::Remote {
                what: format!("blob {blob_id}"),
                reason: format!("short read: {n} of {} bytes at {offset}", buf.len()),
            });
        }
        Ok(())
    }

    fn blob_size(&self, blob_id: &str) -> Result<u64> {
        if let Some(s) = self.sizes.lock().ok().and_then(|m| m.get(blob_id).copied()) {
            return Ok(s);
        }
        Err(BackendError::Remote {
            what: format!("blob {blob_id}"),
            reason: "size unknown: not listed in the image manifest".into(),
        })
    }

    fn kind(&self) -> &'static str {
        "registry"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        match &self.proxy {
            Some(p) => vec![
                ("proxy_reads", p.counters.through_peer.load(Relaxed)),
                ("proxy_fallbacks", p.counters.fallbacks.load(Relaxed)),
                ("proxy_reported", p.counters.reported.load(Relaxed)),
            ],
            None => Vec::new(),
        }
    }

    fn report_bad(&self, blob_id: &str, offset: u64, len: u64) -> bool {
        // Only bytes the peer sent are its to answer for (not the registry's, read
        // while the peer was down).
        let from_peer = self
            .from_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(b, start, end)| b == blob_id && *start <= offset && offset + len <= *end);
        match &self.proxy {
            Some(p) if p.healthy() && from_peer => {
                p.report_bad(&self.registry, &format!("sha256:{blob_id}"), offset, len)
            }
            _ => false,
        }
    }

    fn set_credentials(&self, credentials: Option<super::Credentials>) -> bool {
        self.registry.set_credentials(credentials);
        if let Some(p) = &self.proxy {
            p.forget_authorization();
        }
        true
    }
}
