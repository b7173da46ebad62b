//! Makes images ready: applies the pull policy, asks the registry when the policy needs it, and
//! pulls through the runtime.
//!
//! Pulls are single-flight per (image, credential fingerprint): N concurrent requests for one cold
//! image cause one `PullImage`, whose result they all share. The pull runs in its own task, so a
//! requester that goes away does not cancel it for the others. A global limit and a per-registry
//! limit bound how many pulls run at once, and a user who is not an admin holds at most its
//! share of them (`MaxPullsPerUser`); a pull whose registry sends neither its manifest nor any
//! bytes for `PullResolveTimeout` fails; transient failures are retried with exponential
//! backoff; the whole request has a deadline (`PullTimeout`).

mod decision;
mod error;
mod flight;
mod job;
mod local;
pub mod progress;
mod queue;
mod retry;
mod room;
mod share;
mod slots;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use crate::background::Background;
use crate::cache::{Cache, CacheError, ImageRecord, Origin};
use crate::config;
use crate::credentials::{CredentialError, Credentials, Fingerprinter, NodeCredentials};
use crate::metrics::Metrics;
use crate::policy::{self, PullPolicy};
use crate::reference::ImageRef;
use crate::registry::Registry;
use crate::runtime::{ImageRuntime, RuntimeImage};
use crate::units::format_duration;
pub use error::PullError;
pub use flight::InFlight;
pub use progress::{LayerProgress, Phase, PullProgress};
use queue::Queue;
pub use share::SlotOwner;
use share::{Claim, Shares};

/// First backoff delay of a retry; doubled on each further retry (not a key of the file: the
/// other defaults of [`PullerSettings`] are the file's, from [`crate::config`]).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(500);

/// Limits and timings of the puller.
#[derive(Debug, Clone)]
pub struct PullerSettings {
    /// Pulls that may run at once on the node.
    pub max_concurrent_pulls: usize,
    /// Of those, how many one user who is neither root nor an admin may hold
    /// (`MaxPullsPerUser`).
    pub max_pulls_per_user: usize,
    /// Per registry host, pulls that may run at once (default: the global limit).
    pub per_registry: HashMap<String, usize>,
    /// Deadline for one request, retries included.
    pub pull_timeout: Duration,
    /// How long a pull (from its slot, and each retry from its start) may go without showing
    /// that its registry answers: its manifest read, and its first layer bytes where the
    /// runtime reports bytes (`PullResolveTimeout`).
    pub resolve_timeout: Duration,
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
    /// Registry hosts whose metrics carry their name (the keys of `ImageCache.Registries` and
    /// their mirrors); every other host is counted as `other`, so that requests naming ever
    /// new hosts cannot add series without bound.
    pub labelled_registries: BTreeSet<String>,
}

impl Default for PullerSettings {
    fn default() -> Self {
        Self {
            max_concurrent_pulls: config::DEFAULT_MAX_CONCURRENT_PULLS,
            max_pulls_per_user: config::DEFAULT_MAX_PULLS_PER_USER,
            per_registry: HashMap::new(),
            pull_timeout: config::DEFAULT_PULL_TIMEOUT,
            resolve_timeout: config::DEFAULT_PULL_RESOLVE_TIMEOUT,
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
            labelled_registries: BTreeSet::new(),
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

/// A pull's identity: the image and the fingerprint of its credentials.
type FlightKey = (String, Option<String>);

/// What a real pull brought: the image as the runtime reports it, and what its blobs were
/// measured to hold (when its manifest was known).
#[derive(Debug, Clone)]
struct Pulled {
    image: RuntimeImage,
    measured: Option<u64>,
    /// Cleared by the first requester that indexes the image and brings the images back
    /// within their limits: the others who joined the pull need not do it again.
    settle: Arc<std::sync::atomic::AtomicBool>,
}

/// A pull's outcome, shared by everyone who waits on it.
type Flight = Shared<BoxFuture<'static, Result<Pulled, PullError>>>;

/// Where a requester's view of a pull goes: every change of the pull's progress is sent.
pub type ProgressSink = tokio::sync::mpsc::UnboundedSender<PullProgress>;

/// One pull in flight and what its requesters and `cimage pulls` read of it.
#[derive(Clone)]
struct FlightEntry {
    /// Its outcome.
    flight: Flight,
    /// Its progress.
    progress: Arc<watch::Sender<PullProgress>>,
    /// Pulled with credentials: its name is shown only to root and to its requesters.
    credentialed: bool,
    /// Uids of the API callers that joined it.
    uids: Arc<Mutex<BTreeSet<u32>>>,
    /// Whose share of the slots it counts against.
    claim: Arc<Claim>,
    /// How urgent it is (raised by a more urgent request that joins it).
    urgency: slots::Urgency,
}

/// The pulls in flight, by key.
type Flights = Arc<Mutex<HashMap<FlightKey, FlightEntry>>>;

/// Who asks for a pull: the API caller (if any), whose share of the slots it counts against,
/// and where its progress goes.
#[derive(Debug)]
struct Requester {
    /// The caller's uid.
    pub uid: Option<u32>,
    /// Whose share of the slots a pull for it counts against.
    pub owner: SlotOwner,
    /// How urgent a pull for it is ([`slots::urgency_of`] its origin).
    pub urgency: u8,
    /// Where the pull's progress goes.
    pub progress: Option<ProgressSink>,
}

/// What the puller and each of its pulls share (a pull in flight holds it by `Arc`).
struct Core {
    runtime: Arc<dyn ImageRuntime>,
    registry: Arc<dyn Registry>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    settings: PullerSettings,
    /// The node's pull slots (`MaxConcurrentPulls`), by urgency.
    global: Arc<slots::Slots>,
    /// The pulls waiting for a slot.
    queue: Arc<Queue>,
    /// Each user's share of the slots.
    shares: Shares,
    /// cimage's own range fetch of big layers, when on (`ImageCache.ParallelFetch`).
    fetcher: Option<Arc<crate::fetch::Fetcher>>,
}

/// The `registry` label of metrics for anything not in `PullerSettings::labelled_registries`.
const OTHER_REGISTRY: &str = "other";

impl Core {
    /// The `registry` label of `host`: its name when it is configured, else `other`.
    fn registry_label<'a>(&self, host: &'a str) -> &'a str {
        if self.settings.labelled_registries.contains(host) {
            host
        } else {
            OTHER_REGISTRY
        }
    }
}

/// One request on its way through the decision and the pull: the image, its credentials
/// (looked up when first needed), and who asks.
struct PullContext<'a> {
    image: &'a ImageRef,
    credentials: &'a RequestCredentials,
    who: &'a Requester,
}

/// A request's credentials: its own, or else the node's for the image's registry. The node's
/// are looked up (auth files, a credential helper), and either fingerprinted, only when the
/// decision first needs them: a pull, `Always`'s check, or the credential rule of a private
/// image. A warm hit of a public image costs no lookup.
struct RequestCredentials {
    given: Option<Credentials>,
    resolved: tokio::sync::OnceCell<Resolved>,
}

/// The credentials a request goes with, and their fingerprint.
struct Resolved {
    credentials: Option<Credentials>,
    fingerprint: Option<String>,
}

/// What the decision did for a request: the image it gets, whether it was pulled, whether the
/// registry confirmed the request's access, and whether it is an unchecked cached copy.
#[derive(Debug, Clone)]
struct Outcome {
    image: RuntimeImage,
    action: Action,
    /// The registry confirmed this request's credentials can read the image.
    verified: bool,
    /// Served unchecked because the registry could not be reached (`UseCached`).
    stale: bool,
    /// What a pull measured the image's blobs to hold.
    measured: Option<u64>,
    /// For a pull: whether the images are still to be brought within their limits.
    settle: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// The puller. Cheap to share behind an `Arc`.
pub struct Puller {
    core: Arc<Core>,
    per_registry: Mutex<HashMap<String, Arc<Semaphore>>>,
    inflight: Flights,
    background: Background,
}

impl Puller {
    /// A puller over the runtime, the registry and the cache, counting into `metrics`; its
    /// pulls run as tracked tasks of `background` and stop when shutdown begins.
    pub fn new(
        runtime: Arc<dyn ImageRuntime>,
        registry: Arc<dyn Registry>,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        settings: PullerSettings,
        background: Background,
    ) -> Self {
        let core = Core {
            global: slots::Slots::new(settings.max_concurrent_pulls),
            queue: Arc::new(Queue::new(Arc::clone(&metrics))),
            shares: Shares::new(settings.max_pulls_per_user),
            fetcher: None,
            runtime,
            registry,
            cache,
            metrics,
            settings,
        };
        Self {
            core: Arc::new(core),
            per_registry: Mutex::new(HashMap::new()),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            background,
        }
    }

    /// The same puller, fetching the big layers of its pulls itself with `fetcher` before the
    /// runtime's pull finds them (`ImageCache.ParallelFetch`). Before the first pull only.
    pub fn with_fetcher(mut self, fetcher: Arc<crate::fetch::Fetcher>) -> Self {
        Arc::get_mut(&mut self.core)
            .expect("set before the first pull")
            .fetcher = Some(fetcher);
        self
    }

    /// [`Puller::ensure`], handing each report of a real pull to `on_progress` as it comes,
    /// the last one (done or failed) included, before the outcome returns.
    pub async fn ensure_watched(
        &self,
        req: EnsureRequest,
        on_progress: impl FnMut(PullProgress),
    ) -> Result<Ensured, PullError> {
        self.ensure_watched_for(req, SlotOwner::Node, on_progress)
            .await
    }

    /// [`Puller::ensure_watched`] for a request whose pull counts against `owner`'s share of
    /// the slots.
    pub async fn ensure_watched_for(
        &self,
        mut req: EnsureRequest,
        owner: SlotOwner,
        mut on_progress: impl FnMut(PullProgress),
    ) -> Result<Ensured, PullError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        req.progress = Some(tx);
        let ensure = self.ensure_for(req, owner);
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

    /// Makes `req.image` ready according to the policy and records the use, as the node's own
    /// work (its pull, if one is needed, waits in the node's line under no user's share). An
    /// image id (`sha256:…`, or a prefix of at least 12 hex digits) names a local image: it is
    /// looked up in the runtime and never pulled.
    pub async fn ensure(&self, req: EnsureRequest) -> Result<Ensured, PullError> {
        self.ensure_for(req, SlotOwner::Node).await
    }

    /// [`Puller::ensure`] for a request whose pull counts against `owner`'s share of the
    /// slots: a caller who is neither root nor an admin holds at most `MaxPullsPerUser`.
    pub async fn ensure_for(
        &self,
        req: EnsureRequest,
        owner: SlotOwner,
    ) -> Result<Ensured, PullError> {
        let started = Instant::now();
        if crate::reference::local_image_id(&req.image).is_some() {
            return self.ensure_local(req, started).await;
        }
        let image = ImageRef::parse(&req.image)?;
        let policy = policy::effective(req.policy, &image, self.core.settings.default_policy);
        let deadline = self.core.settings.pull_timeout;
        let credentials = RequestCredentials {
            given: req.credentials.clone(),
            resolved: tokio::sync::OnceCell::new(),
        };
        let who = Requester {
            uid: req.requester,
            owner,
            urgency: slots::urgency_of(req.origin),
            progress: req.progress.clone(),
        };
        let ask = PullContext {
            image: &image,
            credentials: &credentials,
            who: &who,
        };
        let work = self.decide_and_pull(&ask, policy);
        let metrics = Arc::clone(&self.core.metrics);
        let policy_name = policy.to_string();
        let outcome = match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(PullError::Timeout {
                image: image.to_string(),
                after: format_duration(deadline),
            }),
        };
        let result = match &outcome {
            Ok(o) => o.action.as_str(),
            Err(_) => "failed",
        };
        if let Err(e @ PullError::Registry { .. }) = &outcome {
            metrics.inc(
                "cimage_pull_failures_total",
                &[
                    ("registry", self.core.registry_label(image.registry())),
                    ("reason", e.reason()),
                ],
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
        let Outcome {
            image: rt_image,
            action,
            verified,
            stale,
            measured,
            settle,
        } = outcome?;
        // Never looked up: the use was of a public image, which records no fingerprint.
        let fingerprint = credentials
            .resolved
            .get()
            .and_then(|r| r.fingerprint.clone());
        if action == Action::Cached {
            metrics.inc("cimage_cache_hits_total", &[]);
        }
        let digest = image
            .digest()
            .map(str::to_owned)
            .or_else(|| image.digest_in(&rt_image.repo_digests).map(str::to_owned));
        let record = self
            .core
            .cache
            .record(crate::cache::Use {
                image: rt_image,
                origin: req.origin,
                fingerprint,
                pulled: action == Action::Pulled,
                verified,
                requester: req.requester,
                measured,
            })
            .await
            .map_err(|e: CacheError| PullError::Index {
                image: image.to_string(),
                source: Arc::new(e),
            })?;
        // Once per pull, by the first of its requesters to index it.
        let first = settle.is_some_and(|s| s.swap(false, std::sync::atomic::Ordering::SeqCst));
        if first {
            if let Err(e) = self.core.cache.settle().await {
                warn!(image = %image, "the images are past their limits after the pull, and the next eviction pass tries again: {e}");
            }
        }
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

impl Puller {
    /// The request's credentials and their fingerprint, looked up once per request: its own,
    /// or the node's for the image's registry (off the async workers: files, a helper process,
    /// the slow hash).
    async fn credentials_of<'a>(&self, ask: &PullContext<'a>) -> Result<&'a Resolved, PullError> {
        let image = ask.image;
        let failed = |message: String| PullError::Credentials {
            image: image.to_string(),
            source: CredentialError::LookupFailed { message },
        };
        ask.credentials
            .resolved
            .get_or_try_init(|| async {
                let settings = &self.core.settings;
                let mut credentials = ask.credentials.given.clone();
                if credentials.is_none() && !settings.node_credentials.is_empty() {
                    let node = settings.node_credentials.clone();
                    let host = image.registry().to_owned();
                    credentials = tokio::task::spawn_blocking(move || node.lookup(&host))
                        .await
                        .map_err(|e| failed(e.to_string()))?
                        .map_err(|source| PullError::Credentials {
                            image: image.to_string(),
                            source,
                        })?;
                }
                let fingerprint = match &credentials {
                    None => None,
                    Some(c) => {
                        let (f, c, registry) = (
                            Arc::clone(&settings.fingerprinter),
                            c.clone(),
                            image.registry().to_owned(),
                        );
                        Some(
                            tokio::task::spawn_blocking(move || f.fingerprint(&registry, &c))
                                .await
                                .map_err(|e| failed(e.to_string()))?,
                        )
                    }
                };
                Ok(Resolved {
                    credentials,
                    fingerprint,
                })
            })
            .await
    }
}
