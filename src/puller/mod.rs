//! Makes images ready: applies the pull policy, asks the registry when the policy needs it, and
//! pulls through the runtime.
//!
//! Pulls are single-flight per (image, credential fingerprint): N concurrent requests for one cold
//! image cause one `PullImage`, whose result they all share. The pull runs in its own task, so a
//! requester that goes away does not cancel it for the others. A global limit and a per-registry
//! limit bound how many pulls run at once; transient failures are retried with exponential backoff;
//! the whole request has a deadline (`PullTimeout`).

mod decision;
mod flight;
mod local;
pub mod progress;
mod retry;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::info;

use crate::background::Background;
use crate::cache::{Cache, CacheError, ImageRecord, Origin};
use crate::config;
use crate::credentials::{CredentialError, Credentials, Fingerprinter, NodeCredentials};
use crate::policy::{self, PullPolicy};
use crate::reference::{ImageRef, InvalidReference};
use crate::registry::{Registry, RegistryError};
use crate::runtime::{ImageRuntime, RuntimeError};
use crate::units::format_duration;
use flight::{Flights, Queue, Requester};
pub use flight::{InFlight, ProgressSink};
pub use progress::{LayerProgress, Phase, PullProgress};

/// First backoff delay of a retry; doubled on each further retry (not a key of the file: the
/// other defaults of [`PullerSettings`] are the file's, from [`crate::config`]).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(500);

/// Limits and timings of the puller.
#[derive(Debug, Clone)]
pub struct PullerSettings {
    /// Pulls that may run at once on the node.
    pub max_concurrent_pulls: usize,
    /// Per registry host, pulls that may run at once (default: the global limit).
    pub per_registry: HashMap<String, usize>,
    /// Deadline for one request, retries included.
    pub pull_timeout: Duration,
    /// An attempt whose download bytes have not moved for this long, while a layer is still
    /// being fetched, is cancelled and retried (only where the runtime reports bytes).
    pub stall_timeout: Duration,
    /// Whether the runtime is asked for the bytes of pulls in flight (`PullByteProgress`).
    pub byte_progress: bool,
    /// Retries of a transient failure.
    pub retries: u32,
    /// First backoff delay; doubled on each retry.
    pub backoff: Duration,
    /// When cached images need the request to prove access.
    pub verify: crate::policy::Verify,
    /// The node's own credentials, for requests without credentials.
    pub node_credentials: NodeCredentials,
    /// Makes the credential fingerprints the index keeps.
    pub fingerprinter: Arc<Fingerprinter>,
    /// The policy of requests that name none (`ImageCache.DefaultPullPolicy`).
    pub default_policy: crate::policy::DefaultPolicy,
    /// Whether an `Always` request whose registry cannot be reached is served from the cached
    /// copy (`ImageCache.OnRegistryUnavailable: UseCached`).
    pub use_cached_when_registry_down: bool,
}

impl Default for PullerSettings {
    fn default() -> Self {
        Self {
            max_concurrent_pulls: config::DEFAULT_MAX_CONCURRENT_PULLS,
            per_registry: HashMap::new(),
            pull_timeout: config::DEFAULT_PULL_TIMEOUT,
            stall_timeout: config::DEFAULT_PULL_STALL_TIMEOUT,
            byte_progress: true,
            retries: config::DEFAULT_PULL_RETRIES,
            backoff: DEFAULT_BACKOFF,
            verify: crate::policy::Verify::default(),
            node_credentials: NodeCredentials::default(),
            // A key of this process only: fingerprints do not outlive it. The daemon loads the
            // node's key.
            fingerprinter: Arc::new(Fingerprinter::with_key(rand::random())),
            default_policy: crate::policy::DefaultPolicy::default(),
            use_cached_when_registry_down: false,
        }
    }
}

/// One request to make an image ready.
#[derive(Debug, Clone)]
pub struct EnsureRequest {
    /// The image reference as given.
    pub image: String,
    /// The policy asked for; `None` applies the default by tag.
    pub policy: Option<PullPolicy>,
    /// Registry credentials for this request, if any.
    pub credentials: Option<Credentials>,
    /// What the image is for (recorded in the index on first sight).
    pub origin: Origin,
    /// The API caller's uid, if a caller asked: a caller who proves access to a private image
    /// may see its name from then on.
    pub requester: Option<u32>,
    /// Where the progress of a real pull goes, if the caller follows it.
    pub progress: Option<ProgressSink>,
}

/// Whether the runtime's `PullImage` was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `PullImage` was called (by this request or by the one it joined).
    Pulled,
    /// The runtime's copy was used as it was.
    Cached,
}

impl Action {
    /// `pulled` or `cached`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pulled => "pulled",
            Action::Cached => "cached",
        }
    }
}

/// The outcome of a successful request.
#[derive(Debug, Clone)]
pub struct Ensured {
    /// The normalised reference (or the image id it was asked by).
    pub image: String,
    /// The policy applied.
    pub policy: PullPolicy,
    /// What happened.
    pub action: Action,
    /// The manifest digest the reference stands for, if known.
    pub digest: Option<String>,
    /// The index record after this use.
    pub record: ImageRecord,
    /// How long the request took.
    pub elapsed: Duration,
    /// Served from the cached copy because the registry could not be reached to check it
    /// (`OnRegistryUnavailable: UseCached`).
    pub stale: bool,
}

/// Why an image could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PullError {
    /// The reference is malformed; nothing was contacted.
    #[error(transparent)]
    InvalidReference(#[from] InvalidReference),
    /// An image id names no image on this node; ids are never pulled.
    #[error("image {id} is not present on this node (an image id names a local image; it is never pulled from a registry)")]
    LocalAbsent {
        /// The id as given.
        id: String,
    },
    /// The image is absent and the policy forbids pulling; nothing was contacted.
    #[error("image {image} is not present and pull policy is {policy}")]
    NotPresent {
        /// The normalised reference.
        image: String,
        /// The policy that forbade the pull.
        policy: PullPolicy,
    },
    /// The registry could not answer for the image.
    #[error("cannot check image {image} at its registry: {source}")]
    Registry {
        /// The normalised reference.
        image: String,
        /// The registry's error.
        source: Box<RegistryError>,
    },
    /// The runtime failed.
    #[error("{}", runtime_failure(image, what, source))]
    Runtime {
        /// The normalised reference.
        image: String,
        /// `pull`, `look up`.
        what: &'static str,
        /// The runtime's error.
        source: RuntimeError,
    },
    /// The download bytes stopped moving for `PullStallTimeout` on every attempt.
    #[error("pull of image {image} failed: no progress for {after} from {registry} (ImageCache.PullStallTimeout)")]
    Stalled {
        /// The normalised reference.
        image: String,
        /// The registry host that stopped sending.
        registry: String,
        /// The stall timeout, formatted (`2m0s`).
        after: String,
    },
    /// The deadline passed.
    #[error("pull of image {image} did not finish within {after} (ImageCache.PullTimeout)")]
    Timeout {
        /// The normalised reference.
        image: String,
        /// The deadline, formatted.
        after: String,
    },
    /// The image does not fit without evicting pinned or in-use images.
    #[error("cannot pull image {image}: {source}")]
    NoRoom {
        /// The normalised reference.
        image: String,
        /// Why no room can be made (shared: one pull's error reaches every requester).
        source: Arc<CacheError>,
    },
    /// The node's credential sources failed (an unreadable auth file, a broken helper).
    #[error("cannot get the node's credentials for image {image}: {source}")]
    Credentials {
        /// The normalised reference.
        image: String,
        /// What failed (never a secret).
        source: CredentialError,
    },
    /// The daemon began shutting down while the pull ran; the runtime may finish it by itself.
    #[error("pull of image {image} stopped: cimaged is shutting down")]
    ShuttingDown {
        /// The normalised reference.
        image: String,
    },
    /// The index could not be read or could not record the use.
    #[error("image {image}: the index failed: {source}")]
    Index {
        /// The normalised reference.
        image: String,
        /// The index's error.
        source: Arc<CacheError>,
    },
}

impl PullError {
    /// The `reason` label of metrics: `invalid_reference`, `not_present`, `stalled`,
    /// `timeout`, `no_room`, `credentials`, `shutdown`, `index`, or the registry's or the
    /// runtime's own reason (`not_found`, `unauthorized`, `unreachable`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            PullError::InvalidReference(_) => "invalid_reference",
            PullError::LocalAbsent { .. } | PullError::NotPresent { .. } => "not_present",
            PullError::Registry { source, .. } => source.reason(),
            PullError::Runtime { source, .. } => source.reason(),
            PullError::Stalled { .. } => "stalled",
            PullError::Timeout { .. } => "timeout",
            PullError::NoRoom { .. } => "no_room",
            PullError::Credentials { .. } => "credentials",
            PullError::ShuttingDown { .. } => "shutdown",
            PullError::Index { .. } => "index",
        }
    }
}

/// One line that leads with what happened, then the runtime's own words.
fn runtime_failure(image: &str, what: &str, e: &RuntimeError) -> String {
    use crate::runtime::RuntimeErrorKind::*;
    match e.kind {
        NotFound => format!("image {image} was not found at its registry ({e})"),
        Unauthorized => format!("the registry refused access to image {image} ({e})"),
        Unavailable => format!("cannot {what} image {image}: the runtime is not answering ({e})"),
        _ => format!("runtime failed to {what} image {image}: {e}"),
    }
}

/// The puller. Cheap to share behind an `Arc`.
pub struct Puller {
    runtime: Arc<dyn ImageRuntime>,
    registry: Arc<dyn Registry>,
    cache: Arc<Cache>,
    settings: PullerSettings,
    global: Arc<Semaphore>,
    per_registry: Mutex<HashMap<String, Arc<Semaphore>>>,
    inflight: Flights,
    queue: Arc<Queue>,
    background: Background,
}

impl Puller {
    /// A puller over the runtime, the registry and the cache; its pulls run as tracked tasks
    /// of `background` and stop when shutdown begins.
    pub fn new(
        runtime: Arc<dyn ImageRuntime>,
        registry: Arc<dyn Registry>,
        cache: Arc<Cache>,
        settings: PullerSettings,
        background: Background,
    ) -> Self {
        let queue = Arc::new(Queue::new(Arc::clone(cache.metrics())));
        Self {
            global: Arc::new(Semaphore::new(settings.max_concurrent_pulls)),
            runtime,
            registry,
            cache,
            settings,
            per_registry: Mutex::new(HashMap::new()),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            queue,
            background,
        }
    }

    /// [`Puller::ensure`], handing each report of a real pull to `on_progress` as it comes,
    /// the last one (done or failed) included, before the outcome returns.
    pub async fn ensure_watched(
        &self,
        mut req: EnsureRequest,
        mut on_progress: impl FnMut(PullProgress),
    ) -> Result<Ensured, PullError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        req.progress = Some(tx);
        let ensure = self.ensure(req);
        tokio::pin!(ensure);
        let outcome = loop {
            tokio::select! {
                r = &mut ensure => break r,
                Some(p) = rx.recv() => on_progress(p),
            }
        };
        while let Ok(p) = rx.try_recv() {
            on_progress(p);
        }
        outcome
    }

    /// Makes `req.image` ready according to the policy and records the use. An image id
    /// (`sha256:…`, or a prefix of at least 12 hex digits) names a local image: it is looked up
    /// in the runtime and never pulled.
    pub async fn ensure(&self, req: EnsureRequest) -> Result<Ensured, PullError> {
        let started = Instant::now();
        if crate::reference::local_image_id(&req.image).is_some() {
            return self.ensure_local(req, started).await;
        }
        let image = ImageRef::parse(&req.image)?;
        let policy = policy::effective(req.policy, &image, self.settings.default_policy);
        let deadline = self.settings.pull_timeout;
        // Per-request credentials win; without them, the node's own (if it has any for this
        // registry).
        let mut req = req;
        if req.credentials.is_none() && !self.settings.node_credentials.is_empty() {
            let node = self.settings.node_credentials.clone();
            let host = image.registry().to_owned();
            req.credentials = tokio::task::spawn_blocking(move || node.lookup(&host))
                .await
                .unwrap_or_else(|e| {
                    Err(CredentialError::LookupFailed {
                        message: e.to_string(),
                    })
                })
                .map_err(|source| PullError::Credentials {
                    image: image.to_string(),
                    source,
                })?;
        }
        let fingerprint = req
            .credentials
            .as_ref()
            .map(|c| (c.clone(), image.registry().to_owned()));
        let fingerprint = match fingerprint {
            None => None,
            Some((c, registry)) => {
                let f = Arc::clone(&self.settings.fingerprinter);
                Some(
                    tokio::task::spawn_blocking(move || f.fingerprint(&registry, &c))
                        .await
                        .map_err(|e| PullError::Credentials {
                            image: image.to_string(),
                            source: CredentialError::LookupFailed {
                                message: e.to_string(),
                            },
                        })?,
                )
            }
        };
        let who = Requester {
            uid: req.requester,
            progress: req.progress.clone(),
        };
        let work = self.decide_and_pull(
            &image,
            policy,
            req.credentials.as_ref(),
            fingerprint.as_deref(),
            &who,
        );
        let metrics = Arc::clone(self.cache.metrics());
        let policy_name = policy.to_string();
        let outcome = match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(PullError::Timeout {
                image: image.to_string(),
                after: format_duration(deadline),
            }),
        };
        let result = match &outcome {
            Ok((_, action, _, _)) => action.as_str(),
            Err(_) => "failed",
        };
        if let Err(e @ PullError::Registry { .. }) = &outcome {
            metrics.inc(
                "cimage_pull_failures_total",
                &[("registry", image.registry()), ("reason", e.reason())],
            );
        }
        metrics.observe(
            "cimage_request_duration_seconds",
            &[("result", result)],
            started.elapsed().as_secs_f64(),
        );
        metrics.inc(
            "cimage_requests_total",
            &[("policy", &policy_name), ("result", result)],
        );
        // The series of earlier releases (deprecated: cimage_requests_total counts the same).
        metrics.inc(
            "cimage_pulls_total",
            &[("policy", &policy_name), ("outcome", result)],
        );
        let (rt_image, action, verified, stale) = outcome?;
        if action == Action::Cached {
            metrics.inc("cimage_cache_hits_total", &[]);
        }
        let digest = image
            .digest()
            .map(str::to_owned)
            .or_else(|| image.digest_in(&rt_image.repo_digests).map(str::to_owned));
        let record = self
            .cache
            .record(crate::cache::Use {
                image: rt_image,
                origin: req.origin,
                fingerprint,
                pulled: action == Action::Pulled,
                verified,
                requester: req.requester,
            })
            .await
            .map_err(|e: CacheError| PullError::Index {
                image: image.to_string(),
                source: Arc::new(e),
            })?;
        let elapsed = started.elapsed();
        info!(image = %image, %policy, action = action.as_str(), ms = elapsed.as_millis() as u64, "image ready");
        Ok(Ensured {
            image: image.to_string(),
            policy,
            action,
            digest,
            record,
            elapsed,
            stale,
        })
    }
}
