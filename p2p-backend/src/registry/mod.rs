//! The OCI registry client (on the `oci-client` crate) and the `registry` blob backend.
//!
//! [`RegistryClient`] is the client itself, async: its futures run on the caller's tokio
//! runtime (a snapshotter, a P2P daemon). [`Registry`] is a thin blocking facade over it
//! for threads outside any runtime (nydusd's FUSE threads, the converter): it runs the
//! same futures on one runtime shared by the process, and may be called from inside a
//! runtime as well (on a helper thread then, never panicking). Both pull manifests and
//! blobs (streamed, digest-checked), check for blobs with HEAD, push blobs in chunks and
//! manifests, and read blob ranges. Credentials come from flags or from a docker
//! `config.json`, and may be replaced on a live client
//! ([`RegistryClient::set_credentials`]); token (bearer) auth is negotiated by
//! `oci-client`. Loopback registries and `insecure` ones are spoken to over plain HTTP.
//!
//! Transient failures (connection errors, timeouts, 5xx, 429) are retried with
//! exponential backoff; everything else fails at once with the registry's message. Every
//! attempt of a request without a streamed body (auth, manifests, HEAD, range reads) is
//! bounded by [`RegistryOptions::timeout`] as a whole; streamed bodies by it between
//! bytes.

mod auth;
mod backend;
pub mod proxy;
mod reference;
mod upload;

pub use auth::{
    credentials_for, credentials_from_docker_config, docker_config_entries, docker_config_path,
    Credentials,
};
pub use backend::RegistryBackend;
pub use reference::parse_reference;
pub use upload::{wait_complete, BlobProgress, GrowingPush, UPLOAD_PIECE};

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::Digest as _;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference cannot be parsed.
    #[error("Invalid image reference '{reference}': {reason}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The manifest, tag or blob does not exist.
    #[error("{0} not found in the registry")]
    NotFound(String),
    /// The registry refused the credentials (or their absence).
    #[error(
        "{what}: not authorized (HTTP {code}): check the credentials for this registry \
         (docker config.json or the --*-username/--*-password flags)"
    )]
    Unauthorized {
        /// What was being done (it names the repository).
        what: String,
        /// 401 or 403.
        code: u16,
    },
    /// The registry refused the request itself (a 4xx other than 401, 403 and 404, e.g.
    /// 405 from a read-only registry); not retried.
    #[error("{what}: the registry refused it: {message}")]
    Refused {
        /// What was being done.
        what: String,
        /// The HTTP status (when known) and the registry's explanation.
        message: String,
    },
    /// A request failed (after retries for transient failures).
    #[error("{what}{}", gave_up(*.attempts))]
    Request {
        /// What was being done.
        what: String,
        /// How many times it was tried.
        attempts: u32,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// Downloaded bytes do not match their digest.
    #[error("Blob {digest}: content has digest {actual}")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A local file could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The docker config file is unreadable or malformed.
    #[error("Docker config {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl RegistryError {
    /// Whether the request failed because the registry did not answer in time
    /// (connecting or answering), as opposed to refusing or failing fast.
    pub fn is_timeout(&self) -> bool {
        match self {
            RegistryError::Request { source, .. } => match source {
                OciDistributionError::IoError(e) => e.kind() == std::io::ErrorKind::TimedOut,
                OciDistributionError::RequestError(e) => e.is_timeout(),
                _ => false,
            },
            _ => false,
        }
    }
}

fn gave_up(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (gave up after {attempts} attempts)")
    } else {
        String::new()
    }
}

/// Result alias of the registry client.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Use plain HTTP (loopback registries always do).
    pub insecure: bool,
    /// Explicit credentials; otherwise the docker config is consulted.
    pub credentials: Option<Credentials>,
    /// Attempts for transient failures (0 means the default, 3).
    pub retries: u32,
    /// First backoff delay (0 means the default, 200 ms); doubled on every retry.
    pub backoff: Duration,
    /// How long one attempt may take (`None`: the default, 60 s): a request without a
    /// streamed body as a whole, a streamed body between two reads.
    pub timeout: Option<Duration>,
    /// How long connecting may take (`None`: the default, 10 s).
    pub connect_timeout: Option<Duration>,
}

impl RegistryOptions {
    /// The attempt timeout in effect.
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The number of attempts in effect.
    pub fn attempts(&self) -> u32 {
        if self.retries == 0 {
            3
        } else {
            self.retries
        }
    }

    /// The first backoff delay in effect.
    pub fn backoff(&self) -> Duration {
        if self.backoff.is_zero() {
            Duration::from_millis(200)
        } else {
            self.backoff
        }
    }

    /// The longest a request of `attempts` tries takes before it fails: every attempt
    /// timing out, plus the backoff between them.
    pub fn worst_case(&self) -> Duration {
        let attempts = self.attempts();
        let backoff: Duration = (0..attempts - 1)
            .map(|i| self.backoff() * 2u32.pow(i))
            .sum();
        self.timeout() * attempts + backoff
    }
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `reference` in full — `registry/repository:tag` with docker.io names and the
/// default tag `latest` made explicit, `@digest` appended when it has one — and whether
/// it names a digest. For comparing references and refusing digest targets.
pub fn canonical_reference(reference: &str) -> Result<(String, bool)> {
    let r = parse_reference(reference).map_err(|reason| RegistryError::Reference {
        reference: reference.to_string(),
        reason,
    })?;
    let mut s = format!(
        "{}/{}:{}",
        r.resolve_registry(),
        r.repository(),
        r.tag().unwrap_or("latest")
    );
    if let Some(d) = r.digest() {
        s.push('@');
        s.push_str(d);
    }
    Ok((s, r.digest().is_some()))
}

/// The process-wide runtime the blocking facade runs the client's futures on.
fn shared_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("registry-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| RegistryError::Io {
        what: "Starting the registry client runtime".into(),
        source: std::io::Error::other(e.clone()),
    })
}

/// Runs `f` to completion on `rt`, blocking the calling thread. From inside a runtime
/// (where `block_on` would panic) it runs on a helper thread.
fn block_on<F>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(f);
    }
    std::thread::scope(|s| match s.spawn(|| rt.block_on(f)).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// A repository in a registry: the async client (see the module docs).
pub struct RegistryClient {
    client: Client,
    auth: RwLock<RegistryAuth>,
    reference: Reference,
    retries: u32,
    backoff: Duration,
    timeout: Duration,
    connect_timeout: Duration,
    /// Whether pull credentials (or a bearer token) have been negotiated. Ranged reads
    /// negotiate once instead of before every request (each negotiation is a `GET /v2/`
    /// round trip, doubling the requests of a lazily read image), and again when the
    /// registry answers 401 (an expired token) or the credentials are replaced.
    pull_authed: AtomicBool,
    /// Whether the registry let anonymous pulls through without any challenge. Ranged
    /// reads then go through `open_client`, which holds no credentials: the main client
    /// would probe `GET /v2/` again before every request (it finds no token to reuse).
    open: AtomicBool,
    /// A client without credentials, for an open registry (see `open`).
    open_client: Client,
    /// Whether push access has been negotiated (once: see [`RegistryClient::push_client`]).
    push_authed: AtomicBool,
    /// Whether the registry took pushes without any challenge.
    push_open: AtomicBool,
    /// The `Authorization` value of pushes (none for an open registry), once negotiated.
    push_authorization: std::sync::Mutex<Option<String>>,
    /// `http://host` or `https://host`: the registry's base URL.
    base_url: String,
    /// A plain HTTP client for streamed uploads (see `upload`), made on first use.
    http: std::sync::OnceLock<reqwest::Client>,
}

/// A repository in a registry, reached through a blocking facade over
/// [`RegistryClient`] (see the module docs). Cheap to clone: clones share the client.
#[derive(Clone)]
pub struct Registry {
    client: Arc<RegistryClient>,
    rt: &'static tokio::runtime::Runtime,
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(host, |(h, _)| h);
    h == "localhost" || h == "[::1]" || h.starts_with("127.")
}

/// The HTTP status of an error, when it is one.
fn status_of(e: &OciDistributionError) -> Option<u16> {
    match e {
        OciDistributionError::RequestError(r) => r.status().map(|s| s.as_u16()),
        OciDistributionError::ServerError { code, .. } => Some(*code),
        OciDistributionError::UnauthorizedError { .. } => Some(401),
        _ => None,
    }
}

fn transient(e: &OciDistributionError) -> bool {
    match e {
        // A reqwest error with a status is an answer (HEAD requests report 4xx this way).
        OciDistributionError::RequestError(r) => r
            .status()
            .is_none_or(|s| s.is_server_error() || s.as_u16() == 429),
        OciDistributionError::IoError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        _ => false,
    }
}

/// The 64 hex digits of a `sha256:` digest, or an error.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

fn registry_auth(credentials: Option<Credentials>) -> RegistryAuth {
    match credentials {
        Some(c) => RegistryAuth::Basic(c.username, c.password),
        None => RegistryAuth::Anonymous,
    }
}

/// The attempts of one request: [`Tries::failed`] waits before the next attempt, or
/// says why there is none.
struct Tries<'a> {
    what: &'a str,
    retries: u32,
    attempt: u32,
    delay: Duration,
}

impl Tries<'_> {
    /// After attempt `e` failed: sleeps the backoff when another attempt is due, else
    /// the request's error.
    async fn failed(&mut self, e: OciDistributionError) -> Result<()> {
        if self.attempt < self.retries && transient(&e) {
            tracing::warn!("{}: {e}; retrying in {:?}", self.what, self.delay);
            tokio::time::sleep(self.delay).await;
            self.delay *= 2;
            self.attempt += 1;
            Ok(())
        } else {
            Err(classify(self.what, self.attempt, e))
        }
    }
}

impl RegistryClient {
    /// A client for the repository of `reference` (`host[:port]/name[:tag|@digest]`).
    pub fn new(reference: &str, opts: &RegistryOptions) -> Result<Self> {
        let parsed = parse_reference(reference).map_err(|reason| RegistryError::Reference {
            reference: reference.to_string(),
            reason,
        })?;
        let host = parsed.resolve_registry().to_string();
        // TLS is rustls on ring, with the system's roots (rustls-platform-verifier):
        // building a client costs milliseconds, where native-tls parsed the whole
        // system bundle with OpenSSL, about 100 ms per client, twice per oci-client
        // `Client`. Installing the provider is a no-op when one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if opts.insecure || is_loopback(&host) {
            ClientProtocol::HttpsExcept(vec![host.clone(), parsed.registry().to_string()])
        } else {
            ClientProtocol::Https
        };
        let timeout = opts.timeout();
        let connect_timeout = opts.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let config = || ClientConfig {
            protocol: protocol.clone(),
            connect_timeout: Some(connect_timeout),
            read_timeout: Some(timeout),
            ..Default::default()
        };
        let credentials = match &opts.credentials {
            Some(c) => Some(c.clone()),
            None => credentials_from_docker_config(&host)?,
        };
        let scheme = match protocol {
            ClientProtocol::Https => "https",
            _ => "http",
        };
        Ok(RegistryClient {
            base_url: format!("{scheme}://{host}"),
            http: std::sync::OnceLock::new(),
            push_authorization: std::sync::Mutex::new(None),
            open_client: Client::new(config()),
            client: Client::new(config()),
            open: AtomicBool::new(false),
            auth: RwLock::new(registry_auth(credentials)),
            reference: parsed,
            pull_authed: AtomicBool::new(false),
            push_authed: AtomicBool::new(false),
            push_open: AtomicBool::new(false),
            retries: opts.attempts(),
            backoff: opts.backoff(),
            timeout,
            connect_timeout,
        })
    }

    /// The parsed reference.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// The URL of blob `digest` (`sha256:...`) in the repository.
    pub fn blob_url(&self, digest: &str) -> String {
        format!(
            "{}/v2/{}/blobs/{digest}",
            self.base_url,
            self.reference.repository()
        )
    }

    /// Replaces the credentials (a refreshed token, a rotated password; `None`:
    /// anonymous). Requests from now on negotiate access with them.
    pub fn set_credentials(&self, credentials: Option<Credentials>) {
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = registry_auth(credentials);
        self.pull_authed.store(false, Ordering::Release);
        self.open.store(false, Ordering::Release);
        self.push_authed.store(false, Ordering::Release);
    }

    fn auth(&self) -> RegistryAuth {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn tries<'a>(&self, what: &'a str) -> Tries<'a> {
        Tries {
            what,
            retries: self.retries,
            attempt: 1,
            delay: self.backoff,
        }
    }

    /// `f`, failing with a (transient) I/O error when it takes longer than the timeout.
    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = std::result::Result<T, OciDistributionError>>,
    ) -> std::result::Result<T, OciDistributionError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(OciDistributionError::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.timeout),
            ))),
        }
    }

    /// Runs `op` (each attempt bounded by the timeout) while it fails transiently, up
    /// to the attempts allowed.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, OciDistributionError>>,
    {
        self.retry_streamed(what, || self.bounded(op())).await
    }

    /// [`RegistryClient::retry`] of an operation with a streamed body, which only the
    /// client's read timeout bounds (between bytes).
    async fn retry_streamed<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, OciDistributionError>>,
    {
        let mut tries = self.tries(what);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => tries.failed(e).await?,
            }
        }
    }

    /// `registry/repository`, for messages.
    fn repo(&self) -> String {
        format!(
            "{}/{}",
            self.reference.resolve_registry(),
            self.reference.repository()
        )
    }

    /// Negotiates `op` access to the repository; returns the bearer token the registry
    /// issued, if it issued one.
    async fn auth_for(&self, op: RegistryOperation) -> Result<Option<String>> {
        let what = format!("Authenticating to {}", self.reference.resolve_registry());
        let auth = self.auth();
        self.retry(&what, || self.client.auth(&self.reference, &auth, op))
            .await
    }

    /// Whether the registry is open to us, given the token [`RegistryClient::auth_for`]
    /// negotiated: it issued none, and we hold no credentials.
    fn is_open(&self, token: &Option<String>) -> bool {
        token.is_none() && matches!(self.auth(), RegistryAuth::Anonymous)
    }

    /// The `Authorization` header for `token` (when the registry issued one) or else
    /// for our credentials (basic auth), if any.
    fn authorization(&self, token: &Option<String>) -> Option<String> {
        match (token, self.auth()) {
            (Some(t), _) => Some(format!("Bearer {t}")),
            (None, RegistryAuth::Basic(u, p)) => {
                use base64::Engine;
                let pair = format!("{u}:{p}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
            (None, _) => None,
        }
    }

    /// Negotiates pull access to the repository and returns the `Authorization`
    /// header for its blobs (a bearer token, or basic auth), `None` when it is open —
    /// for a client that sends its own requests (a P2P seed's range reads).
    pub async fn pull_authorization(&self) -> Result<Option<String>> {
        let token = self.auth_for(RegistryOperation::Pull).await?;
        Ok(self.authorization(&token))
    }

    /// The client for uploads. Push access is negotiated once; a registry that asks
    /// for no credentials gets `open_client`, which has none stored: the main client
    /// would probe `GET /v2/` before every request, since it finds no token to reuse —
    /// a round trip before each `HEAD`, `PATCH` and `PUT` of an upload.
    pub(crate) async fn push_client(&self) -> Result<&Client> {
        if !self.push_authed.load(Ordering::Acquire) {
            let token = self.auth_for(RegistryOperation::Push).await?;
            let open = self.is_open(&token);
            let header = self.authorization(&token);
            *self
                .push_authorization
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = header;
            self.push_open.store(open, Ordering::Release);
            self.push_authed.store(true, Ordering::Release);
        }
        Ok(if self.push_open.load(Ordering::Acquire) {
            &self.open_client
        } else {
            &self.client
        })
    }

    /// Runs push operation `op` with the push client. When the registry answers 401 —
    /// a bearer token that expired during a long conversion, or that a restarted
    /// registry no longer takes — push access is negotiated again (a new token) and
    /// `op` runs once more.
    pub(crate) async fn pushing<'s, T, F, Fut>(&'s self, op: F) -> Result<T>
    where
        F: Fn(&'s Client) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match op(self.push_client().await?).await {
            Err(RegistryError::Unauthorized { what, code: 401 }) => {
                tracing::warn!("{what}: refused (401); negotiating push access again");
                self.push_authed.store(false, Ordering::Release);
                op(self.push_client().await?).await
            }
            r => r,
        }
    }

    /// Fetches a manifest or index by tag or digest (`None`: the reference's own).
    /// Returns its bytes and digest.
    pub async fn pull_manifest(&self, tag_or_digest: Option<&str>) -> Result<(Vec<u8>, String)> {
        let r = match tag_or_digest {
            Some(t) => self.with(t),
            None => self.reference.clone(),
        };
        let accepted = [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ];
        let what = format!("Fetching manifest {}", r.whole());
        let auth = self.auth();
        let (bytes, digest) = self
            .retry(&what, || {
                self.client.pull_manifest_raw(&r, &auth, &accepted)
            })
            .await?;
        Ok((bytes.to_vec(), digest))
    }

    /// This repository with another tag (`name`) or digest (`sha256:...`).
    fn with(&self, tag_or_digest: &str) -> Reference {
        let r = &self.reference;
        if tag_or_digest.contains(':') {
            Reference::with_digest(
                r.registry().to_string(),
                r.repository().to_string(),
                tag_or_digest.to_string(),
            )
        } else {
            Reference::with_tag(
                r.registry().to_string(),
                r.repository().to_string(),
                tag_or_digest.to_string(),
            )
        }
    }

    /// A stream of blob `digest` from byte `offset` (a range request, retried), and how
    /// many bytes of it to drop first (all of `offset` when the registry ignored the
    /// range and sent the whole blob). Callers that must be sure of the content hash
    /// what they read.
    pub async fn blob_stream_from(&self, digest: &str, offset: u64) -> Result<(ByteStream, u64)> {
        if offset == 0 {
            self.auth_for(RegistryOperation::Pull).await?;
        }
        let what = if offset == 0 {
            format!("Fetching blob {digest} from {}", self.repo())
        } else {
            format!(
                "Resuming blob {digest} from {} at byte {offset}",
                self.repo()
            )
        };
        // Ranged requests even from 0: the client's own digest check of full responses
        // is skipped (callers check, see above).
        let resp = self
            .retry(&what, || {
                self.client
                    .pull_blob_stream_partial(&self.reference, digest, offset, None)
            })
            .await?;
        Ok(match resp {
            oci_client::client::BlobResponse::Partial(s) => (s.stream, 0),
            oci_client::client::BlobResponse::Full(s) => (s.stream, offset),
        })
    }

    /// Reads blob `digest` at `offset` into `buf` (an HTTP range request); returns the
    /// bytes received, fewer than `buf.len()` only when the blob ends first. Each
    /// attempt, body included, is bounded by the timeout.
    pub async fn read_range_into(
        &self,
        digest: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let what = format!(
            "Reading {} bytes at {offset} of blob {digest} from {}",
            buf.len(),
            self.repo()
        );
        if !self.pull_authed.load(Ordering::Acquire) {
            let token = self.auth_for(RegistryOperation::Pull).await?;
            let open = self.is_open(&token);
            self.open.store(open, Ordering::Release);
            self.pull_authed.store(true, Ordering::Release);
        }
        let open = self.open.load(Ordering::Acquire);
        match self.range_tries(&what, digest, offset, buf, open).await {
            // A token that expired (or was never granted), or a registry that closed:
            // negotiate again, once, and go on with the credentials' client.
            Err(RegistryError::Unauthorized { .. }) => {
                self.open.store(false, Ordering::Release);
                self.auth_for(RegistryOperation::Pull).await?;
                self.range_tries(&what, digest, offset, buf, false).await
            }
            r => r,
        }
    }

    /// The attempts of one ranged read, with the open client or the credentials' one.
    async fn range_tries(
        &self,
        what: &str,
        digest: &str,
        offset: u64,
        buf: &mut [u8],
        open: bool,
    ) -> Result<usize> {
        let client = if open {
            &self.open_client
        } else {
            &self.client
        };
        let mut tries = self.tries(what);
        loop {
            let once = Self::range_once(client, &self.reference, digest, offset, &mut *buf);
            match self.bounded(once).await {
                Ok(n) => return Ok(n),
                Err(e) => tries.failed(e).await?,
            }
        }
    }

    /// One ranged GET streamed straight into `buf`.
    async fn range_once(
        client: &Client,
        reference: &Reference,
        digest: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, OciDistributionError> {
        use oci_client::client::BlobResponse;
        let len = buf.len() as u64;
        let resp = client
            .pull_blob_stream_partial(reference, digest, offset, Some(len))
            .await?;
        let (mut stream, skip) = match resp {
            BlobResponse::Partial(s) => (s.stream, 0),
            // A registry that ignores ranges sends everything: skip to the offset.
            BlobResponse::Full(s) => (s.stream, offset),
        };
        let mut filled = 0usize;
        let mut skipped = 0u64;
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk?;
            if skipped < skip {
                let n = (skip - skipped).min(chunk.len() as u64) as usize;
                skipped += n as u64;
                let _ = chunk.split_to(n);
            }
            let n = chunk.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == buf.len() {
                break;
            }
        }
        Ok(filled)
    }

    /// Whether blob `digest` exists (HEAD).
    pub async fn blob_exists(&self, digest: &str) -> Result<bool> {
        let what = &format!("Checking for blob {digest} in {}", self.repo());
        self.pushing(|client| async move {
            self.retry(what, || client.blob_exists(&self.reference, digest))
                .await
        })
        .await
    }

    /// Uploads the file at `path` as blob `digest` in chunks, unless the registry has it
    /// already. Returns whether it was uploaded.
    pub async fn push_blob_file(&self, digest: &str, path: &Path) -> Result<bool> {
        if self.blob_exists(digest).await? {
            return Ok(false);
        }
        let what = &format!(
            "Uploading blob {digest} from {} to {}",
            path.display(),
            self.repo()
        );
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|source| RegistryError::Io {
                what: what.clone(),
                source,
            })?
            .len();
        self.pushing(|client| async move {
            self.retry_streamed(what, || async {
                let file = tokio::fs::File::open(path).await?;
                let stream = tokio_util::io::ReaderStream::with_capacity(file, 4 << 20)
                    .map(|r| r.map_err(OciDistributionError::IoError));
                client
                    .push_blob_stream(&self.reference, stream, digest, Some(size))
                    .await
            })
            .await
        })
        .await?;
        Ok(true)
    }

    /// Uploads a small blob from memory (a config), unless it exists already.
    pub async fn push_blob_bytes(&self, digest: &str, data: &[u8]) -> Result<bool> {
        if self.blob_exists(digest).await? {
            return Ok(false);
        }
        let what = &format!("Uploading blob {digest} to {}", self.repo());
        let data = &bytes::Bytes::copy_from_slice(data);
        self.pushing(|client| async move {
            self.retry_streamed(what, || {
                client.push_blob(&self.reference, data.clone(), digest)
            })
            .await
        })
        .await?;
        Ok(true)
    }

    /// Uploads a manifest (or index) under `tag_or_digest`; returns its URL.
    pub async fn push_manifest(
        &self,
        tag_or_digest: &str,
        body: &[u8],
        media_type: &str,
    ) -> Result<String> {
        let r = &self.with(tag_or_digest);
        let what = &format!("Uploading manifest {}", r.whole());
        let ct = &reqwest_header(media_type);
        let body = &bytes::Bytes::copy_from_slice(body);
        self.pushing(|client| async move {
            self.retry(what, || {
                client.push_manifest_raw(r, body.clone(), ct.clone())
            })
            .await
        })
        .await
    }
}

impl Registry {
    /// A client for the repository of `reference` (`host[:port]/name[:tag|@digest]`).
    pub fn new(reference: &str, opts: &RegistryOptions) -> Result<Self> {
        Ok(Registry {
            client: Arc::new(RegistryClient::new(reference, opts)?),
            rt: shared_runtime()?,
        })
    }

    /// The async client behind this facade.
    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }

    fn block<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        block_on(self.rt, f)
    }

    /// The parsed reference.
    pub fn reference(&self) -> &Reference {
        self.client.reference()
    }

    /// See [`RegistryClient::set_credentials`].
    pub fn set_credentials(&self, credentials: Option<Credentials>) {
        self.client.set_credentials(credentials)
    }

    /// See [`RegistryClient::pull_manifest`].
    pub fn pull_manifest(&self, tag_or_digest: Option<&str>) -> Result<(Vec<u8>, String)> {
        self.block(self.client.pull_manifest(tag_or_digest))
    }

    /// Streams blob `digest` into `out`, checking its size (when known) and sha256.
    pub fn pull_blob(&self, digest: &str, size: Option<u64>, out: &mut dyn Write) -> Result<u64> {
        let mut reader = self.open_blob(digest)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|source| RegistryError::Io {
                what: format!("Downloading blob {digest}"),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            out.write_all(&buf[..n])
                .map_err(|source| RegistryError::Io {
                    what: format!("Writing blob {digest}"),
                    source,
                })?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest || size.is_some_and(|s| s != total) {
            return Err(RegistryError::DigestMismatch {
                digest: digest.to_string(),
                actual: format!("{actual} ({total} bytes)"),
            });
        }
        Ok(total)
    }

    /// A reader of blob `digest`'s bytes as they arrive. Callers that must be sure of
    /// the content hash what they read, as [`Registry::pull_blob`] does.
    ///
    /// A download cut short (connection reset or closed mid-body) is resumed where it
    /// stopped with a range request, up to the retry budget, so a long layer survives a
    /// flaky connection without starting over.
    pub fn open_blob(&self, digest: &str) -> Result<BlobReader<'_>> {
        let (stream, skip) = self.block(self.client.blob_stream_from(digest, 0))?;
        Ok(BlobReader {
            registry: self,
            digest: digest.to_string(),
            stream,
            pending: bytes::Bytes::new(),
            offset: 0,
            skip,
            resumes: 0,
        })
    }

    /// Reads `len` bytes of blob `digest` at `offset` (an HTTP range request).
    pub fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        let n = self.read_range_into(digest, offset, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// See [`RegistryClient::read_range_into`].
    pub fn read_range_into(&self, digest: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.block(self.client.read_range_into(digest, offset, buf))
    }

    /// See [`RegistryClient::blob_exists`].
    pub fn blob_exists(&self, digest: &str) -> Result<bool> {
        self.block(self.client.blob_exists(digest))
    }

    /// See [`RegistryClient::push_blob_file`].
    pub fn push_blob_file(&self, digest: &str, path: &Path) -> Result<bool> {
        self.block(self.client.push_blob_file(digest, path))
    }

    /// See [`RegistryClient::push_blob_bytes`].
    pub fn push_blob_bytes(&self, digest: &str, data: &[u8]) -> Result<bool> {
        self.block(self.client.push_blob_bytes(digest, data))
    }

    /// See [`RegistryClient::push_manifest`].
    pub fn push_manifest(
        &self,
        tag_or_digest: &str,
        body: &[u8],
        media_type: &str,
    ) -> Result<String> {
        self.block(self.client.push_manifest(tag_or_digest, body, media_type))
    }
}

fn reqwest_header(media_type: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(media_type)
        .unwrap_or_else(|_| http::HeaderValue::from_static("application/json"))
}

fn classify(what: &str, attempts: u32, e: OciDistributionError) -> RegistryError {
    let what = what.to_string();
    let code = status_of(&e);
    match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound(what),
        _ if code == Some(404) => RegistryError::NotFound(what),
        OciDistributionError::AuthenticationFailure(_) => {
            RegistryError::Unauthorized { what, code: 401 }
        }
        _ if matches!(code, Some(401 | 403)) => RegistryError::Unauthorized {
            what,
            code: code.unwrap_or(401),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            if envelope
                .errors
                .iter()
                .any(|e| format!("{:?}", e.code).contains("Unknown"))
            {
                return RegistryError::NotFound(what);
            }
            let message = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            RegistryError::Refused { what, message }
        }
        OciDistributionError::ServerError { code, message, .. }
            if (400..500).contains(code) && *code != 429 =>
        {
            RegistryError::Refused {
                what,
                message: format!("HTTP {code}: {}", message.trim()),
            }
        }
        _ => RegistryError::Request {
            what,
            attempts,
            source: e,
        },
    }
}

/// A blob's bytes as they arrive.
pub type ByteStream =
    futures_util::stream::BoxStream<'static, std::result::Result<bytes::Bytes, std::io::Error>>;

/// A blocking reader of a blob stream; see [`Registry::open_blob`].
pub struct BlobReader<'a> {
    registry: &'a Registry,
    digest: String,
    stream: ByteStream,
    pending: bytes::Bytes,
    /// Bytes of the blob received so far.
    offset: u64,
    /// Bytes still to drop from the stream (a resumed download answered in full).
    skip: u64,
    /// Downloads resumed so far.
    resumes: u32,
}

impl BlobReader<'_> {
    /// Replaces a stream that failed with `e` by one from the current offset, or gives
    /// up (an error naming the blob, the repository and the attempts) once the retry
    /// budget is spent.
    fn resume(&mut self, e: std::io::Error) -> std::io::Result<()> {
        let r = self.registry;
        let what = format!(
            "Fetching blob {} from {}: the download was cut short at byte {}",
            self.digest,
            r.client.repo(),
            self.offset
        );
        if self.resumes + 1 >= r.client.retries {
            return Err(std::io::Error::other(format!(
                "{what} (gave up after {} attempts): {e}",
                self.resumes + 1
            )));
        }
        let delay = r.client.backoff * 2u32.pow(self.resumes);
        tracing::warn!("{what}: {e}; resuming in {delay:?}");
        std::thread::sleep(delay);
        self.resumes += 1;
        let (stream, skip) = r
            .block(r.client.blob_stream_from(&self.digest, self.offset))
            .map_err(|e| std::io::Error::other(format!("{what}: {e}")))?;
        self.stream = stream;
        self.skip = skip;
        Ok(())
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.is_empty() {
            match self.registry.block(self.stream.next()) {
                Some(Ok(mut chunk)) => {
                    let drop = self.skip.min(chunk.len() as u64);
                    let _ = chunk.split_to(drop as usize);
                    self.skip -= drop;
                    self.offset += chunk.len() as u64;
                    self.pending = chunk;
                }
                Some(Err(e)) => self.resume(e)?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// An HTTP/1.1 server on loopback that answers each request with what `answer`
    /// makes of its request line and its header lines (trimmed, lower case), keeping
    /// connections open. Returns its address.
    fn http_stub(answer: impl Fn(&str, &[String]) -> Vec<u8> + Send + Sync + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let mut out = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut headers = Vec::new();
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).unwrap();
                            if h.trim().is_empty() {
                                break;
                            }
                            headers.push(h.trim().to_ascii_lowercase());
                        }
                        out.write_all(&answer(line.trim(), &headers)).unwrap();
                    }
                });
            }
        });
        addr
    }

    /// A registry stub on loopback: anonymous `/v2/`, ranged GETs of one 64-byte blob.
    /// Returns its address and the request lines it saw.
    fn stub() -> (String, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let addr = http_stub(move |line, headers| {
            log.lock().unwrap().push(line.to_string());
            let range = headers.iter().find_map(|h| {
                let (a, b) = h.strip_prefix("range: bytes=")?.split_once('-')?;
                Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
            });
            let blob: Vec<u8> = (0..64u8).collect();
            match range {
                Some((a, b)) => {
                    let body = &blob[a..=b];
                    let mut v = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/64\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    v.extend_from_slice(body);
                    v
                }
                None => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            }
        });
        (addr, seen)
    }

    /// A registry stand-in that accepts connections, reads what is sent and never
    /// answers. Returns its address and how many connections it accepted.
    fn silent() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                count.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        (addr, accepted)
    }

    fn digest() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn a_silent_registry_fails_after_timeout_times_attempts_plus_backoff() {
        let (addr, accepted) = silent();
        let opts = RegistryOptions {
            retries: 2,
            backoff: Duration::from_millis(100),
            timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        };
        let reg = Registry::new(&format!("{addr}/test/repo"), &opts).unwrap();
        let t = std::time::Instant::now();
        let err = reg.read_range(&digest(), 0, 8).unwrap_err();
        let took = t.elapsed();
        // The auth probe is the request that hangs: 2 tries of 300 ms, 100 ms between.
        assert!(took >= Duration::from_millis(700), "{took:?}");
        assert!(
            took < opts.worst_case() + Duration::from_millis(500),
            "{took:?}"
        );
        assert_eq!(opts.worst_case(), Duration::from_millis(700));
        assert!(err.is_timeout(), "{err:?}");
        let msg = crate::error_chain(&err);
        assert!(msg.contains("gave up after 2 attempts"), "{msg}");
        assert!(
            msg.contains("no answer within 300ms") || msg.contains("timed out"),
            "{msg}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let (addr, accepted) = silent();
        let opts = RegistryOptions {
            retries: 1,
            timeout: Some(Duration::from_millis(200)),
            ..Default::default()
        };
        let reg = Registry::new(&format!("{addr}/test/repo"), &opts).unwrap();
        let t = std::time::Instant::now();
        assert!(reg.read_range(&digest(), 0, 8).is_err());
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_async_client_runs_on_the_callers_runtime_and_the_facade_inside_it() {
        let (addr, seen) = stub();
        let reference = format!("{addr}/test/repo");
        let client = RegistryClient::new(&reference, &RegistryOptions::default()).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(
            client
                .read_range_into(&digest(), 10, &mut buf)
                .await
                .unwrap(),
            4
        );
        assert_eq!(buf, [10, 11, 12, 13]);
        // The blocking facade, called where `block_on` would panic.
        let reg = Registry::new(&reference, &RegistryOptions::default()).unwrap();
        assert_eq!(reg.read_range(&digest(), 20, 2).unwrap(), vec![20, 21]);
        assert_eq!(seen.lock().unwrap().len(), 4);
    }

    /// A registry stub that takes HTTP basic auth with `user:<password>` only, where the
    /// password can be changed; serves ranged reads of a 64-byte blob.
    fn basic_auth_stub() -> (String, Arc<Mutex<String>>) {
        use base64::Engine as _;
        let password = Arc::new(Mutex::new("old".to_string()));
        let pw = password.clone();
        let addr = http_stub(move |line, headers| {
            let want = format!(
                "authorization: basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("user:{}", pw.lock().unwrap()))
            )
            .to_ascii_lowercase();
            if !headers.contains(&want) {
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\n\r\n".to_vec()
            } else if line.starts_with("GET /v2/ ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec()
            } else {
                b"HTTP/1.1 206 Partial Content\r\nContent-Length: 2\r\nContent-Range: bytes 0-1/64\r\n\r\nok".to_vec()
            }
        });
        (addr, password)
    }

    #[test]
    fn credentials_are_replaced_on_a_live_client() {
        let (addr, password) = basic_auth_stub();
        let opts = RegistryOptions {
            credentials: Some(Credentials {
                username: "user".into(),
                password: "old".into(),
            }),
            ..Default::default()
        };
        let reg = Registry::new(&format!("{addr}/test/repo"), &opts).unwrap();
        assert_eq!(reg.read_range(&digest(), 0, 2).unwrap(), b"ok");
        // The password is rotated: the old one is refused...
        *password.lock().unwrap() = "new".into();
        let err = reg.read_range(&digest(), 0, 2).unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
        // ...and the client goes on with the new one, without being rebuilt.
        reg.set_credentials(Some(Credentials {
            username: "user".into(),
            password: "new".into(),
        }));
        assert_eq!(reg.read_range(&digest(), 0, 2).unwrap(), b"ok");
    }

    #[test]
    fn ranged_reads_negotiate_auth_once() {
        let (addr, seen) = stub();
        let reg = Registry::new(&format!("{addr}/test/repo"), &RegistryOptions::default()).unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let mut buf = [0u8; 8];
        for off in [0u64, 8, 40] {
            assert_eq!(reg.read_range_into(&digest, off, &mut buf).unwrap(), 8);
            assert_eq!(buf[0], off as u8);
        }
        assert_eq!(
            reg.read_range(&digest, 60, 4).unwrap(),
            vec![60, 61, 62, 63]
        );
        let seen = seen.lock().unwrap();
        let probes = seen.iter().filter(|l| l.starts_with("GET /v2/ ")).count();
        assert_eq!(probes, 1, "{seen:?}");
        assert_eq!(seen.len(), 5, "{seen:?}");
    }
}
