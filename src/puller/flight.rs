//! Single flight: one runtime pull per (image, credential fingerprint), shared by every request
//! that wants it, run in a task of its own so that a requester going away does not cancel it for
//! the others. Also the global and per-registry limits, and making room before the pull.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::retry::retry;
use super::{PullError, Puller};
use crate::cache::Cache;
use crate::credentials::Credentials;
use crate::reference::ImageRef;
use crate::registry::Registry;
use crate::runtime::{ImageRuntime, RuntimeError, RuntimeImage};

type FlightKey = (String, Option<String>);

type Flight = Shared<BoxFuture<'static, Result<RuntimeImage, PullError>>>;

/// The pulls in flight, by key.
pub(super) type Flights = Arc<Mutex<HashMap<FlightKey, Flight>>>;

impl Puller {
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
    pub(super) async fn pull_shared(
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
                    deadline: self.settings.pull_timeout,
                };
                let stop = self.background.shutdown_token().clone();
                let task =
                    self.background
                        .spawn(job.run(Arc::clone(&self.inflight), key.clone(), stop));
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
    /// The pull itself ends by this deadline (`PullTimeout`), whoever still waits for it: a
    /// stalled registry connection must not hold a pull slot for hours.
    deadline: Duration,
}

impl PullJob {
    /// Runs the pull (until it ends or shutdown begins), then takes its flight off the map so
    /// later requests start afresh.
    async fn run(
        self,
        inflight: Flights,
        key: FlightKey,
        stop: CancellationToken,
    ) -> Result<RuntimeImage, PullError> {
        let result = tokio::select! {
            r = tokio::time::timeout(self.deadline, self.pull()) => r.unwrap_or_else(|_| {
                Err(PullError::Timeout {
                    image: self.image.to_string(),
                    after: crate::units::format_duration(self.deadline),
                })
            }),
            _ = stop.cancelled() => Err(PullError::ShuttingDown {
                image: self.image.to_string(),
            }),
        };
        inflight.lock().unwrap().remove(&key);
        result
    }

    async fn pull(&self) -> Result<RuntimeImage, PullError> {
        let name = self.image.to_string();
        let _registry_permit = self
            .per_registry
            .acquire()
            .await
            .expect("semaphore never closed");
        let _global_permit = self.global.acquire().await.expect("semaphore never closed");
        // Room is made once the pull may start, for pulls that will really happen now.
        self.make_room().await?;
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
