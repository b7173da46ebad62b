//! Makes images ready: applies the pull policy, asks the registry when the policy needs it, and
//! pulls through the runtime.
//!
//! Pulls are single-flight per (image, credential fingerprint): N concurrent requests for one cold
//! image cause one `PullImage`, whose result they all share. The pull runs in its own task, so a
//! requester that goes away does not cancel it for the others. A global limit and a per-registry
//! limit bound how many pulls run at once; transient failures are retried with exponential backoff;
//! the whole request has a deadline (`PullTimeout`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::cache::{Cache, CacheError, ImageRecord, Origin};
use crate::credentials::{CredentialError, Credentials, NodeCredentials};
use crate::policy::{self, Decision, PullPolicy};
use crate::reference::{ImageRef, InvalidReference};
use crate::registry::{Registry, RegistryError};
use crate::runtime::{ImageRuntime, RuntimeError, RuntimeImage};
use crate::units::format_duration;

/// Default for [`PullerSettings::max_concurrent_pulls`] (as `ImageCache.MaxConcurrentPulls`).
pub const DEFAULT_MAX_CONCURRENT_PULLS: usize = 3;
/// Default for [`PullerSettings::pull_timeout`] (as `ImageCache.PullTimeout`).
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Default for [`PullerSettings::retries`] (as `ImageCache.PullRetries`).
pub const DEFAULT_RETRIES: u32 = 3;
/// First backoff delay of a retry; doubled on each further retry.
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
    /// Retries of a transient failure.
    pub retries: u32,
    /// First backoff delay; doubled on each retry.
    pub backoff: Duration,
    /// When cached images need the request to prove access.
    pub verify: crate::policy::Verify,
    /// The node's own credentials, for requests without credentials.
    pub node_credentials: NodeCredentials,
}

impl Default for PullerSettings {
    fn default() -> Self {
        Self {
            max_concurrent_pulls: DEFAULT_MAX_CONCURRENT_PULLS,
            per_registry: HashMap::new(),
            pull_timeout: DEFAULT_PULL_TIMEOUT,
            retries: DEFAULT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            verify: crate::policy::Verify::default(),
            node_credentials: NodeCredentials::default(),
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
    /// The normalised reference.
    pub image: ImageRef,
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
}

/// Why an image could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PullError {
    /// The reference is malformed; nothing was contacted.
    #[error(transparent)]
    InvalidReference(#[from] InvalidReference),
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
        source: RegistryError,
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
    /// The index could not be read or could not record the use.
    #[error("image {image}: the index failed: {source}")]
    Index {
        /// The normalised reference.
        image: String,
        /// The index's error.
        source: Arc<CacheError>,
    },
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

type FlightKey = (String, Option<String>);
type Flight = Shared<BoxFuture<'static, Result<RuntimeImage, PullError>>>;

/// The puller. Cheap to share behind an `Arc`.
pub struct Puller {
    runtime: Arc<dyn ImageRuntime>,
    registry: Arc<dyn Registry>,
    cache: Arc<Cache>,
    settings: PullerSettings,
    global: Arc<Semaphore>,
    per_registry: Mutex<HashMap<String, Arc<Semaphore>>>,
    inflight: Arc<Mutex<HashMap<FlightKey, Flight>>>,
}

impl Puller {
    /// A puller over the runtime, the registry and the cache.
    pub fn new(
        runtime: Arc<dyn ImageRuntime>,
        registry: Arc<dyn Registry>,
        cache: Arc<Cache>,
        settings: PullerSettings,
    ) -> Self {
        Self {
            global: Arc::new(Semaphore::new(settings.max_concurrent_pulls)),
            runtime,
            registry,
            cache,
            settings,
            per_registry: Mutex::new(HashMap::new()),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Makes `req.image` ready according to the policy and records the use.
    pub async fn ensure(&self, req: EnsureRequest) -> Result<Ensured, PullError> {
        let started = Instant::now();
        let image = ImageRef::parse(&req.image)?;
        let policy = policy::effective(req.policy, &image);
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
            .map(|c| self.cache.fingerprint(image.registry(), c));
        let work = self.decide_and_pull(
            &image,
            policy,
            req.credentials.as_ref(),
            fingerprint.as_deref(),
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
        metrics.observe_pull(started.elapsed());
        let (rt_image, action, verified) = match outcome {
            Ok(x) => x,
            Err(e) => {
                metrics.inc(
                    "cimage_pulls_total",
                    &[("policy", &policy_name), ("outcome", "failed")],
                );
                return Err(e);
            }
        };
        metrics.inc(
            "cimage_pulls_total",
            &[("policy", &policy_name), ("outcome", action.as_str())],
        );
        match action {
            Action::Cached => metrics.inc("cimage_cache_hits_total", &[]),
            Action::Pulled => metrics.add("cimage_pulled_bytes_total", &[], rt_image.size),
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
            })
            .await
            .map_err(|e: CacheError| PullError::Index {
                image: image.to_string(),
                source: Arc::new(e),
            })?;
        let elapsed = started.elapsed();
        info!(image = %image, %policy, action = action.as_str(), ms = elapsed.as_millis() as u64, "image ready");
        Ok(Ensured {
            image,
            policy,
            action,
            digest,
            record,
            elapsed,
        })
    }

    /// Decides and acts; the flag says whether the registry confirmed the request's access.
    async fn decide_and_pull(
        &self,
        image: &ImageRef,
        policy: PullPolicy,
        credentials: Option<&Credentials>,
        fingerprint: Option<&str>,
    ) -> Result<(RuntimeImage, Action, bool), PullError> {
        let name = image.to_string();
        let present = match self.cache.recall(&name) {
            Some(img) => Some(img),
            None => {
                let found = retry(
                    self.settings.retries,
                    self.settings.backoff,
                    "look up",
                    || self.runtime.image_status(&name),
                )
                .await
                .map_err(|source| PullError::Runtime {
                    image: name.clone(),
                    what: "look up",
                    source,
                })?;
                if let Some(img) = &found {
                    self.cache.remember(img);
                }
                found
            }
        };
        let mut decision = policy::decide(policy, image, present.is_some());
        let mut verified = false;
        if decision == Decision::Resolve {
            let cached = present.as_ref().expect("Resolve implies present");
            let resolved = retry(
                self.settings.retries,
                self.settings.backoff,
                "resolve",
                || self.registry.resolve(image, credentials),
            )
            .await
            .map_err(|source| PullError::Registry {
                image: name.clone(),
                source,
            })?;
            decision = policy::after_resolve(image, &cached.repo_digests, &resolved);
            // The HEAD ran with the request's credentials: it proved access.
            verified = true;
        }
        if decision == Decision::UseCached && !verified {
            let cached = present.as_ref().expect("UseCached implies present");
            let rec = self
                .cache
                .record_of(&cached.id)
                .await
                .map_err(|e| PullError::Index {
                    image: name.clone(),
                    source: Arc::new(e),
                })?;
            let (credentialed, fps) = rec
                .map(|r| (r.credentialed, r.fingerprints))
                .unwrap_or((false, Vec::new()));
            if policy::access(credentialed, &fps, fingerprint, self.settings.verify)
                == policy::Access::CheckWithRegistry
            {
                match self.registry.resolve(image, credentials).await {
                    Ok(_) => verified = true,
                    Err(e)
                        if e.is_transient()
                            || e.kind == crate::registry::RegistryErrorKind::Tls =>
                    {
                        return Err(PullError::Registry {
                            image: name.clone(),
                            source: e,
                        })
                    }
                    // Not proven: as if the image were absent.
                    Err(_) => {
                        decision = policy::decide(policy, image, false);
                    }
                }
            }
        }
        match decision {
            Decision::UseCached => Ok((
                present.expect("UseCached implies present"),
                Action::Cached,
                verified,
            )),
            Decision::NotPresent => Err(PullError::NotPresent {
                image: name,
                policy,
            }),
            Decision::Pull => {
                let pulled = self.pull_shared(image, credentials, fingerprint).await?;
                self.cache.remember(&pulled);
                Ok((pulled, Action::Pulled, false))
            }
            Decision::Resolve => unreachable!("resolved above"),
        }
    }

    fn registry_limit(&self, host: &str) -> Arc<Semaphore> {
        let mut map = self.per_registry.lock().unwrap();
        map.entry(host.to_owned())
            .or_insert_with(|| {
                let n = self
                    .settings
                    .per_registry
                    .get(host)
                    .copied()
                    .unwrap_or(self.settings.max_concurrent_pulls);
                Arc::new(Semaphore::new(n))
            })
            .clone()
    }

    /// Joins the pull of `image` already under way for the same credentials, or starts one.
    async fn pull_shared(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        fingerprint: Option<&str>,
    ) -> Result<RuntimeImage, PullError> {
        let key: FlightKey = (image.to_string(), fingerprint.map(str::to_owned));
        let flight = {
            let mut inflight = self.inflight.lock().unwrap();
            if let Some(f) = inflight.get(&key) {
                f.clone()
            } else {
                let job = PullJob {
                    runtime: Arc::clone(&self.runtime),
                    registry: Arc::clone(&self.registry),
                    cache: Arc::clone(&self.cache),
                    image: image.clone(),
                    credentials: credentials.cloned(),
                    global: Arc::clone(&self.global),
                    per_registry: self.registry_limit(image.registry()),
                    retries: self.settings.retries,
                    backoff: self.settings.backoff,
                };
                let task = tokio::spawn(job.run(Arc::clone(&self.inflight), key.clone()));
                let image_name = image.to_string();
                let f: Flight = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(PullError::Runtime {
                            image: image_name,
                            what: "pull",
                            source: RuntimeError {
                                op: "PullImage",
                                kind: crate::runtime::RuntimeErrorKind::Other,
                                message: format!("pull task failed: {e}"),
                            },
                        })
                    })
                }
                .boxed()
                .shared();
                inflight.insert(key, f.clone());
                f
            }
        };
        flight.await
    }
}

/// One pull, shared by every request that joined it: makes room, takes the limits' permits,
/// pulls through the runtime with retries, and reads back what landed.
struct PullJob {
    runtime: Arc<dyn ImageRuntime>,
    registry: Arc<dyn Registry>,
    cache: Arc<Cache>,
    image: ImageRef,
    credentials: Option<Credentials>,
    global: Arc<Semaphore>,
    per_registry: Arc<Semaphore>,
    retries: u32,
    backoff: Duration,
}

impl PullJob {
    /// Runs the pull, then takes its flight off the map so later requests start afresh.
    async fn run(
        self,
        inflight: Arc<Mutex<HashMap<FlightKey, Flight>>>,
        key: FlightKey,
    ) -> Result<RuntimeImage, PullError> {
        let result = self.pull().await;
        inflight.lock().unwrap().remove(&key);
        result
    }

    async fn pull(&self) -> Result<RuntimeImage, PullError> {
        let name = self.image.to_string();
        self.make_room().await?;
        let _registry_permit = self
            .per_registry
            .acquire()
            .await
            .expect("semaphore never closed");
        let _global_permit = self.global.acquire().await.expect("semaphore never closed");
        let err = |source| PullError::Runtime {
            image: name.clone(),
            what: "pull",
            source,
        };
        let id = retry(self.retries, self.backoff, "pull", || {
            tracing::debug!(image = %name, "calling PullImage");
            self.runtime.pull_image(&name, self.credentials.as_ref())
        })
        .await
        .map_err(err)?;
        let status = self.runtime.image_status(&id).await.map_err(err)?;
        status.ok_or_else(|| {
            err(RuntimeError {
                op: "ImageStatus",
                kind: crate::runtime::RuntimeErrorKind::NotFound,
                message: format!("image {id} vanished right after it was pulled"),
            })
        })
    }

    /// With eviction on, evicts what the rules allow to fit the image before pulling it, or
    /// fails when it cannot fit. Done once per pull, however many requests share it. An image
    /// whose size the registry does not tell is pulled without the check (the periodic gc
    /// catches up).
    async fn make_room(&self) -> Result<(), PullError> {
        if !self.cache.eviction_enabled() {
            return Ok(());
        }
        let size = match self
            .registry
            .manifest_size(&self.image, self.credentials.as_ref())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(image = %self.image, "size unknown before the pull: {e}");
                return Ok(());
            }
        };
        self.cache
            .make_room(size)
            .await
            .map_err(|e| PullError::NoRoom {
                image: self.image.to_string(),
                source: Arc::new(e),
            })
    }
}

/// An error that knows whether a retry may help.
trait Transient {
    fn is_transient(&self) -> bool;
}
impl Transient for RuntimeError {
    fn is_transient(&self) -> bool {
        RuntimeError::is_transient(self)
    }
}
impl Transient for RegistryError {
    fn is_transient(&self) -> bool {
        RegistryError::is_transient(self)
    }
}

/// Runs `op`, retrying transient failures up to `retries` times with exponential backoff.
async fn retry<T, E, F, Fut>(retries: u32, backoff: Duration, what: &str, mut op: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < retries => {
                let delay = backoff * 2u32.pow(attempt);
                attempt += 1;
                warn!(attempt, retries, delay_ms = delay.as_millis() as u64, error = %e, "{what} failed, retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::runtime::RuntimeErrorKind;
    use std::sync::atomic::Ordering;

    const APP: &str = "127.0.0.1:5000/app:1";
    const ID1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const ID2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    use crate::testing::Rig;

    fn rig(settings: PullerSettings) -> Rig {
        Rig::with(settings, Arc::new(ManualClock::new(1)), |c| c)
    }

    fn settings() -> PullerSettings {
        crate::testing::puller_settings()
    }

    fn req(image: &str, policy: Option<PullPolicy>) -> EnsureRequest {
        EnsureRequest {
            image: image.into(),
            policy,
            credentials: None,
            origin: Origin::Pull,
        }
    }

    #[tokio::test]
    async fn each_policy_row() {
        let r = rig(settings());
        r.rt.offer(APP, ID1, "sha256:d1", 10);
        r.reg.set(APP, "sha256:d1");

        // Never, absent: error, nothing contacted.
        let e = r
            .puller
            .ensure(req(APP, Some(PullPolicy::Never)))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("image {APP} is not present and pull policy is Never")
        );
        assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 0);
        assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 0);

        // IfNotPresent, absent: pull.
        let ok = r
            .puller
            .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
            .await
            .unwrap();
        assert_eq!(
            (ok.action, ok.digest.as_deref()),
            (Action::Pulled, Some("sha256:d1"))
        );

        // IfNotPresent and Never, present: cached, registry untouched.
        for p in [PullPolicy::IfNotPresent, PullPolicy::Never] {
            let ok = r.puller.ensure(req(APP, Some(p))).await.unwrap();
            assert_eq!(ok.action, Action::Cached);
        }
        assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 0);

        // Always, present, digest unchanged: one resolve, no pull.
        let ok = r
            .puller
            .ensure(req(APP, Some(PullPolicy::Always)))
            .await
            .unwrap();
        assert_eq!(ok.action, Action::Cached);
        assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
        assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 1);

        // Always, tag moved: pull.
        r.rt.offer(APP, ID2, "sha256:d2", 10);
        r.reg.set(APP, "sha256:d2");
        let ok = r
            .puller
            .ensure(req(APP, Some(PullPolicy::Always)))
            .await
            .unwrap();
        assert_eq!((ok.action, ok.record.id.as_str()), (Action::Pulled, ID2));

        // Use counts accumulate per request.
        assert_eq!(ok.record.use_count, 1);
        let old = r
            .cache
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|i| i.id == ID1)
            .unwrap();
        assert_eq!(old.use_count, 4);
    }

    #[tokio::test]
    async fn default_policy_for_latest_checks_the_registry() {
        let r = rig(settings());
        let latest = "127.0.0.1:5000/app:latest";
        r.rt.offer(latest, ID1, "sha256:d1", 10);
        r.reg.set(latest, "sha256:d1");
        assert_eq!(
            r.puller
                .ensure(req("127.0.0.1:5000/app", None))
                .await
                .unwrap()
                .action,
            Action::Pulled
        );
        let ok = r
            .puller
            .ensure(req("127.0.0.1:5000/app", None))
            .await
            .unwrap();
        assert_eq!((ok.action, ok.policy), (Action::Cached, PullPolicy::Always));
        assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn digest_reference_is_never_re_pulled() {
        let r = rig(settings());
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let by_digest = format!("127.0.0.1:5000/app@{d}");
        r.rt.offer(&by_digest, ID1, d, 10);
        r.puller
            .ensure(req(&by_digest, Some(PullPolicy::Always)))
            .await
            .unwrap();
        let ok = r
            .puller
            .ensure(req(&by_digest, Some(PullPolicy::Always)))
            .await
            .unwrap();
        assert_eq!(ok.action, Action::Cached);
        assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
        assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_pull() {
        let r = rig(settings());
        r.rt.offer(APP, ID1, "sha256:d1", 10);
        *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(50);
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let p = r.puller.clone();
                tokio::spawn(
                    async move { p.ensure(req(APP, Some(PullPolicy::IfNotPresent))).await },
                )
            })
            .collect();
        for h in handles {
            h.await.unwrap().unwrap();
        }
        assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
        let rec = &r.cache.list().await.unwrap()[0];
        assert_eq!(rec.use_count, 20);
    }

    #[tokio::test]
    async fn room_is_made_once_per_shared_pull() {
        let r = Rig::with(settings(), Arc::new(ManualClock::new(1)), |c| {
            c.with_eviction(crate::cache::EvictionSettings {
                high_percent: 100.0,
                low_percent: 100.0,
                max_bytes: Some(1 << 30),
                ..Default::default()
            })
        });
        let (rt, reg, puller) = (r.rt.clone(), r.reg.clone(), r.puller.clone());
        rt.offer(APP, ID1, "sha256:d1", 10);
        reg.sizes.lock().unwrap().insert(APP.into(), 10);
        *rt.pull_delay.lock().unwrap() = Duration::from_millis(50);
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let p = puller.clone();
                tokio::spawn(
                    async move { p.ensure(req(APP, Some(PullPolicy::IfNotPresent))).await },
                )
            })
            .collect();
        for h in handles {
            h.await.unwrap().unwrap();
        }
        assert_eq!(rt.pulls.load(Ordering::SeqCst), 1);
        assert_eq!(
            reg.size_checks.load(Ordering::SeqCst),
            1,
            "one size check for one pull"
        );
    }

    #[tokio::test]
    async fn global_limit_bounds_parallel_pulls() {
        let mut s = settings();
        s.max_concurrent_pulls = 2;
        let r = rig(s);
        *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(30);
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let image = format!("127.0.0.1:5000/app{i}:1");
                r.rt.offer(&image, &format!("sha256:{i:064}"), "sha256:d", 1);
                let p = r.puller.clone();
                tokio::spawn(async move { p.ensure(req(&image, None)).await })
            })
            .collect();
        for h in handles {
            h.await.unwrap().unwrap();
        }
        assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 6);
        assert_eq!(r.rt.max_parallel.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn transient_failures_are_retried_permanent_ones_are_not() {
        let r = rig(settings());
        r.rt.offer(APP, ID1, "sha256:d1", 10);
        let transient = RuntimeError {
            op: "PullImage",
            kind: RuntimeErrorKind::Transient,
            message: "connection refused".into(),
        };
        r.rt.pull_failures
            .lock()
            .unwrap()
            .extend([transient.clone(), transient]);
        r.puller.ensure(req(APP, None)).await.unwrap();
        assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 3);

        let e = r
            .puller
            .ensure(req("127.0.0.1:5000/nope:1", None))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("nope:1") && e.to_string().contains("not found"),
            "{e}"
        );
        assert_eq!(
            r.rt.pulls.load(Ordering::SeqCst),
            4,
            "not found is not retried"
        );
    }

    #[tokio::test]
    async fn deadline_is_enforced() {
        let mut s = settings();
        s.pull_timeout = Duration::from_millis(50);
        let r = rig(s);
        r.rt.offer(APP, ID1, "sha256:d1", 10);
        *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(5);
        let e = r.puller.ensure(req(APP, None)).await.unwrap_err();
        assert!(matches!(e, PullError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("50ms"), "{e}");
    }

    #[tokio::test]
    async fn always_fails_clearly_when_registry_is_down_but_others_serve_the_cache() {
        let r = rig(settings());
        r.rt.offer(APP, ID1, "sha256:d1", 10);
        r.puller.ensure(req(APP, None)).await.unwrap();
        r.reg.down.store(true, Ordering::SeqCst);
        for p in [PullPolicy::IfNotPresent, PullPolicy::Never] {
            assert_eq!(
                r.puller.ensure(req(APP, Some(p))).await.unwrap().action,
                Action::Cached
            );
        }
        let e = r
            .puller
            .ensure(req(APP, Some(PullPolicy::Always)))
            .await
            .unwrap_err();
        assert!(matches!(e, PullError::Registry { .. }));
        assert!(
            e.to_string().contains("unreachable") && e.to_string().contains(APP),
            "{e}"
        );
    }

    #[tokio::test]
    async fn presence_is_trusted_for_the_ttl_only() {
        let clock = Arc::new(ManualClock::new(1_000));
        let r = Rig::with(settings(), clock.clone(), |c| {
            c.with_presence_ttl(Duration::from_secs(10))
        });
        let (rt, cache, puller) = (r.rt.clone(), r.cache.clone(), r.puller.clone());
        rt.offer(APP, ID1, "sha256:d1", 10);
        puller.ensure(req(APP, None)).await.unwrap();
        // Removed behind cimage's back: within the TTL the confirmation stands ...
        rt.images.lock().unwrap().clear();
        assert_eq!(
            puller.ensure(req(APP, None)).await.unwrap().action,
            Action::Cached
        );
        // ... after it, the runtime is asked again and the image is pulled.
        clock.advance(10_001);
        assert_eq!(
            puller.ensure(req(APP, None)).await.unwrap().action,
            Action::Pulled
        );
        // Removing through cimage forgets at once.
        cache.remove(APP).await.unwrap();
        assert_eq!(
            puller
                .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
                .await
                .unwrap()
                .action,
            Action::Pulled
        );
        assert_eq!(rt.pulls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn malformed_reference_contacts_nothing() {
        let r = rig(settings());
        let e = r.puller.ensure(req("Not A Ref", None)).await.unwrap_err();
        assert!(matches!(e, PullError::InvalidReference(_)));
        assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 0);
    }
}
