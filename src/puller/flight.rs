//! Single flight: one runtime pull per (image, credential fingerprint), shared by every request
//! that wants it, run in a task of its own so that a requester going away does not cancel it for
//! the others. Also the global and per-registry limits (and the queue behind them), making room
//! before the pull, the pull's progress, and stall detection.
//!
//! While the runtime pulls, the job looks at the runtime's downloads every
//! [`poll_interval`]: the bytes feed the pull's [`PullProgress`], and an attempt whose bytes
//! have not moved for `PullStallTimeout` while a layer is still being fetched is cancelled and
//! retried like any transient failure. Time after the last layer is committed is unpacking,
//! never a stall; a runtime that reports no bytes is bounded by `PullTimeout` alone.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::progress::{Phase, PullProgress, Tracker};
use super::retry::{retry, Transient};
use super::{PullError, Puller};
use crate::cache::{Cache, Reservation};
use crate::credentials::Credentials;
use crate::metrics::Metrics;
use crate::reference::ImageRef;
use crate::registry::{ImageManifest, Registry};
use crate::runtime::{ImageRuntime, Ingest, RuntimeError, RuntimeImage};
use crate::units::format_span;

type FlightKey = (String, Option<String>);

type Flight = Shared<BoxFuture<'static, Result<RuntimeImage, PullError>>>;

/// Where a requester's view of a pull goes: every change of the pull's progress is sent.
pub type ProgressSink = tokio::sync::mpsc::UnboundedSender<PullProgress>;

/// One pull in flight and what its requesters and `cimage pulls` read of it.
#[derive(Clone)]
pub(super) struct FlightEntry {
    flight: Flight,
    progress: Arc<watch::Sender<PullProgress>>,
    /// Pulled with credentials: its name is shown only to root and to its requesters.
    credentialed: bool,
    /// Uids of the API callers that joined it.
    uids: Arc<Mutex<BTreeSet<u32>>>,
}

/// The pulls in flight, by key.
pub(super) type Flights = Arc<Mutex<HashMap<FlightKey, FlightEntry>>>;

/// Who asks for a pull: the API caller (if any) and where its progress goes.
#[derive(Debug, Default)]
pub(super) struct Requester {
    /// The caller's uid.
    pub uid: Option<u32>,
    /// Where the pull's progress goes.
    pub progress: Option<ProgressSink>,
}

/// A pull in flight as `cimage pulls` shows it.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// Its progress now.
    pub progress: PullProgress,
    /// It was asked for with credentials (possibly a private image).
    pub credentialed: bool,
    /// Uids of the API callers waiting on it.
    pub uids: Vec<u32>,
}

/// The pulls waiting for a slot, oldest first: their places are kept in their progress, and
/// their number in the gauge `cimage_pulls_queued`.
pub(super) struct Queue {
    next: AtomicU64,
    waiting: Mutex<Vec<(u64, Arc<watch::Sender<PullProgress>>)>>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// An empty queue counted into `metrics`.
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            next: AtomicU64::new(0),
            waiting: Mutex::default(),
            metrics,
        }
    }

    /// Tells every waiting pull its place, and the gauge how many wait (called with the list
    /// held, on every change: a pull that is cancelled while waiting leaves it too).
    fn renumber(&self, waiting: &[(u64, Arc<watch::Sender<PullProgress>>)]) {
        self.metrics
            .set("cimage_pulls_queued", waiting.len() as f64);
        for (i, (_, tx)) in waiting.iter().enumerate() {
            tx.send_modify(|p| {
                p.phase = Phase::Queued;
                p.queue_position = i as u32 + 1;
            });
        }
    }

    /// Puts a pull at the back; it leaves when the returned guard drops.
    fn enter(self: &Arc<Self>, tx: &Arc<watch::Sender<PullProgress>>) -> QueuePlace {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut w = self.waiting.lock().unwrap();
        w.push((seq, Arc::clone(tx)));
        self.renumber(&w);
        QueuePlace {
            queue: Arc::clone(self),
            seq,
        }
    }

    /// Pulls waiting now.
    pub(super) fn len(&self) -> usize {
        self.waiting.lock().unwrap().len()
    }
}

/// A pull's place in the [`Queue`].
struct QueuePlace {
    queue: Arc<Queue>,
    seq: u64,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let mut w = self.queue.waiting.lock().unwrap();
        if let Some(at) = w.iter().position(|(s, _)| *s == self.seq) {
            let (_, tx) = w.remove(at);
            tx.send_modify(|p| p.queue_position = 0);
        }
        self.queue.renumber(&w);
    }
}

/// Counts a requester on a pull while it waits.
struct Joined(Arc<watch::Sender<PullProgress>>);

impl Joined {
    fn new(tx: &Arc<watch::Sender<PullProgress>>) -> Self {
        tx.send_modify(|p| p.requesters += 1);
        Self(Arc::clone(tx))
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.0
            .send_modify(|p| p.requesters = p.requesters.saturating_sub(1));
    }
}

/// How often a pull looks at the runtime's downloads: twice a second, or more often for a stall
/// timeout under two seconds (tests).
pub(super) fn poll_interval(stall: Duration) -> Duration {
    (stall / 4).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

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

    /// The pulls in flight and queued, oldest first.
    pub fn pulls(&self) -> Vec<InFlight> {
        let mut out: Vec<InFlight> = self
            .inflight
            .lock()
            .unwrap()
            .values()
            .map(|e| InFlight {
                progress: e.progress.borrow().clone(),
                credentialed: e.credentialed,
                uids: e.uids.lock().unwrap().iter().copied().collect(),
            })
            .filter(|f| !f.progress.phase.is_final())
            .collect();
        out.sort_by_key(|f| f.progress.started);
        out
    }

    /// Pulls waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Joins the pull of `image` already under way for the same credentials, or starts one;
    /// the requester's sink gets the pull's progress until it ends.
    pub(super) async fn pull_shared(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        fingerprint: Option<&str>,
        who: &Requester,
    ) -> Result<RuntimeImage, PullError> {
        let key: FlightKey = (image.to_string(), fingerprint.map(str::to_owned));
        let entry = {
            let mut inflight = self.inflight.lock().unwrap();
            if let Some(e) = inflight.get(&key) {
                e.clone()
            } else {
                let progress = Arc::new(watch::Sender::new(PullProgress::new(
                    &image.to_string(),
                    image.registry(),
                )));
                let job = PullJob {
                    runtime: Arc::clone(&self.runtime),
                    registry: Arc::clone(&self.registry),
                    cache: Arc::clone(&self.cache),
                    metrics: Arc::clone(self.cache.metrics()),
                    image: image.clone(),
                    credentials: credentials.cloned(),
                    global: Arc::clone(&self.global),
                    per_registry: self.registry_limit(image.registry()),
                    queue: Arc::clone(&self.queue),
                    retries: self.settings.retries,
                    backoff: self.settings.backoff,
                    deadline: self.settings.pull_timeout,
                    stall: self.settings.stall_timeout,
                    byte_progress: self.settings.byte_progress,
                    progress: Arc::clone(&progress),
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
                let e = FlightEntry {
                    flight: f,
                    progress,
                    credentialed: credentials.is_some(),
                    uids: Arc::default(),
                };
                inflight.insert(key, e.clone());
                e
            }
        };
        if let Some(uid) = who.uid {
            entry.uids.lock().unwrap().insert(uid);
        }
        let _joined = Joined::new(&entry.progress);
        let Some(sink) = &who.progress else {
            return entry.flight.await;
        };
        let mut rx = entry.progress.subscribe();
        let _ = sink.send(rx.borrow_and_update().clone());
        let mut flight = entry.flight;
        loop {
            tokio::select! {
                r = &mut flight => {
                    // The end (done or failed) is published before the flight resolves.
                    if rx.has_changed().unwrap_or(false) {
                        let _ = sink.send(rx.borrow_and_update().clone());
                    }
                    return r;
                }
                changed = rx.changed() => {
                    if changed.is_err() {
                        return flight.await;
                    }
                    let _ = sink.send(rx.borrow_and_update().clone());
                }
            }
        }
    }
}

/// Why one attempt of a pull ended without an image.
#[derive(Debug)]
enum AttemptError {
    /// The runtime's pull failed.
    Runtime(RuntimeError),
    /// The bytes stopped moving.
    Stalled,
}

impl Transient for AttemptError {
    fn is_transient(&self) -> bool {
        match self {
            AttemptError::Runtime(e) => e.is_transient(),
            AttemptError::Stalled => true,
        }
    }
    fn is_outage(&self) -> bool {
        matches!(self, AttemptError::Runtime(e) if e.is_outage())
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Runtime(e) => e.fmt(f),
            AttemptError::Stalled => f.write_str("no progress (ImageCache.PullStallTimeout)"),
        }
    }
}

impl AttemptError {
    /// The `reason` label of a retry or failure.
    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Runtime(e) => e.reason(),
            AttemptError::Stalled => "stalled",
        }
    }
}

/// One pull, shared by every request that joined it: waits for a slot, makes room, pulls
/// through the runtime with retries while following its bytes, and reads back what landed.
struct PullJob {
    runtime: Arc<dyn ImageRuntime>,
    registry: Arc<dyn Registry>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    image: ImageRef,
    credentials: Option<Credentials>,
    global: Arc<Semaphore>,
    per_registry: Arc<Semaphore>,
    queue: Arc<Queue>,
    retries: u32,
    backoff: Duration,
    /// The pull itself ends by this deadline (`PullTimeout`), whoever still waits for it: a
    /// stalled registry connection must not hold a pull slot for hours.
    deadline: Duration,
    /// `PullStallTimeout`.
    stall: Duration,
    /// `PullByteProgress`: ask the runtime for bytes at all.
    byte_progress: bool,
    progress: Arc<watch::Sender<PullProgress>>,
}

impl PullJob {
    /// Runs the pull (until it ends or shutdown begins), publishes its end, then takes its
    /// flight off the map so later requests start afresh.
    async fn run(
        self,
        inflight: Flights,
        key: FlightKey,
        stop: CancellationToken,
    ) -> Result<RuntimeImage, PullError> {
        let started = Instant::now();
        let registry = self.image.registry().to_owned();
        info!(image = %self.image, %registry, "pull started");
        self.metrics.gauge_add("cimage_pulls_in_flight", 1.0);
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
        self.metrics.gauge_add("cimage_pulls_in_flight", -1.0);
        let secs = started.elapsed().as_secs_f64();
        match &result {
            Ok(img) => {
                info!(image = %self.image, %registry, bytes = img.size, seconds = secs, "pull finished");
                self.metrics.observe(
                    "cimage_pull_duration_seconds",
                    &[("registry", &registry)],
                    secs,
                );
                self.metrics.inc(
                    "cimage_runtime_pulls_total",
                    &[("registry", &registry), ("result", "pulled")],
                );
                self.metrics.add(
                    "cimage_pulled_bytes_total",
                    &[("registry", &registry)],
                    img.size,
                );
                self.progress.send_modify(|p| {
                    p.phase = Phase::Done;
                    p.rate = 0.0;
                    p.queue_position = 0;
                    if p.total_bytes > 0 {
                        p.done_bytes = p.total_bytes;
                        for l in &mut p.layers {
                            l.done = l.total;
                        }
                    }
                });
            }
            Err(e) => {
                warn!(image = %self.image, %registry, seconds = secs, error = %e, "pull failed");
                self.metrics.inc(
                    "cimage_runtime_pulls_total",
                    &[("registry", &registry), ("result", "failed")],
                );
                self.metrics.inc(
                    "cimage_pull_failures_total",
                    &[("registry", &registry), ("reason", e.reason())],
                );
                self.progress.send_modify(|p| {
                    p.phase = Phase::Failed;
                    p.rate = 0.0;
                    p.error = Some(e.to_string());
                });
            }
        }
        inflight.lock().unwrap().remove(&key);
        result
    }

    /// Takes the registry's and the node's pull slots, queueing visibly when they are taken.
    async fn take_slots(&self) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
        if let Ok(r) = Arc::clone(&self.per_registry).try_acquire_owned() {
            if let Ok(g) = Arc::clone(&self.global).try_acquire_owned() {
                return (r, g);
            }
        }
        let _place = self.queue.enter(&self.progress);
        info!(image = %self.image, "pull queued: every pull slot is taken (ImageCache.MaxConcurrentPulls)");
        let r = Arc::clone(&self.per_registry)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let g = Arc::clone(&self.global)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        (r, g)
    }

    async fn pull(&self) -> Result<RuntimeImage, PullError> {
        let name = self.image.to_string();
        let _slots = self.take_slots().await;
        self.progress.send_modify(|p| {
            p.phase = Phase::Resolving;
            p.queue_position = 0;
        });
        // One look at the runtime's downloads says whether it reports bytes at all.
        let bytes_known =
            self.byte_progress && matches!(self.runtime.downloads().await, Ok(Some(_)));
        let manifest = if bytes_known || self.cache.eviction_enabled() {
            self.manifest().await
        } else {
            None
        };
        // Room is made once the pull may start, for pulls that will really happen now, and
        // held until the pull ends.
        let _room = self.make_room(manifest.as_ref()).await?;
        let tracker = Mutex::new(Tracker::new(manifest.as_ref()));
        if bytes_known {
            self.held_layers(&tracker, &[]).await;
        }
        self.progress.send_modify(|p| {
            p.phase = Phase::Downloading;
            p.bytes_known = bytes_known;
            tracker.lock().unwrap().fill(p);
        });
        let mut attempt = 0;
        let registry = self.image.registry().to_owned();
        let on_retry = |e: &AttemptError| {
            self.metrics.inc(
                "cimage_pull_retries_total",
                &[("registry", &registry), ("reason", e.reason())],
            );
        };
        let id = retry(self.retries, self.backoff, "pull", on_retry, || {
            attempt += 1;
            if attempt > 1 {
                self.progress.send_modify(|p| {
                    p.attempt = attempt;
                    p.phase = Phase::Downloading;
                });
            }
            tracing::debug!(image = %name, attempt, "calling PullImage");
            self.attempt(&tracker, bytes_known)
        })
        .await
        .map_err(|e| match e {
            AttemptError::Stalled => PullError::Stalled {
                image: name.clone(),
                registry: registry.clone(),
                after: format_span(self.stall),
            },
            AttemptError::Runtime(source) => PullError::Runtime {
                image: name.clone(),
                what: "pull",
                source,
            },
        })?;
        let err = |source| PullError::Runtime {
            image: name.clone(),
            what: "pull",
            source,
        };
        let status = self.runtime.image_status(&id).await.map_err(err)?;
        status.ok_or_else(|| {
            err(RuntimeError {
                op: "ImageStatus",
                kind: crate::runtime::RuntimeErrorKind::NotFound,
                message: format!("image {id} vanished right after it was pulled"),
            })
        })
    }

    /// One `PullImage`, watched: its bytes are published as they move, and it is cancelled
    /// when they stop moving for the stall timeout while a layer is still being fetched.
    async fn attempt(
        &self,
        tracker: &Mutex<Tracker>,
        bytes_known: bool,
    ) -> Result<String, AttemptError> {
        let name = self.image.to_string();
        let pull = self.runtime.pull_image(&name, self.credentials.as_ref());
        tokio::pin!(pull);
        if !bytes_known {
            return pull.await.map_err(AttemptError::Runtime);
        }
        let mut tick = tokio::time::interval(poll_interval(self.stall));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The bytes are measured from where this attempt starts: an attempt that never moves
        // them, while a layer is still to be fetched, is stalled like one that stops midway.
        let mut last_move = Instant::now();
        let mut last_done = {
            let mut t = tracker.lock().unwrap();
            t.begin_attempt();
            t.done()
        };
        loop {
            tokio::select! {
                r = &mut pull => return r.map_err(AttemptError::Runtime),
                _ = tick.tick() => {
                    let Ok(Some(ingests)) = self.runtime.downloads().await else { continue };
                    let now = Instant::now();
                    let done = {
                        let mut t = tracker.lock().unwrap();
                        t.update(&ingests, now);
                        t.done()
                    };
                    if done == last_done {
                        // Nothing moved: a layer may have come and gone between two looks.
                        self.held_layers(tracker, &ingests).await;
                    }
                    let (done, fetching) = {
                        let t = tracker.lock().unwrap();
                        self.progress.send_modify(|p| t.fill(p));
                        (t.done(), !t.all_committed() && (t.has_layers() || !ingests.is_empty()))
                    };
                    if done != last_done {
                        last_move = now;
                        last_done = done;
                    } else if fetching && now.duration_since(last_move) >= self.stall {
                        warn!(
                            image = %self.image,
                            registry = %self.image.registry(),
                            bytes = done,
                            "pull stalled: no progress for {} (ImageCache.PullStallTimeout); cancelling this attempt",
                            format_span(self.stall)
                        );
                        return Err(AttemptError::Stalled);
                    }
                }
            }
        }
    }

    /// Asks the runtime about layers neither committed nor being fetched: one it holds already
    /// (shared with another image, or fetched between two looks) counts whole.
    async fn held_layers(&self, tracker: &Mutex<Tracker>, ingests: &[Ingest]) {
        let unaccounted = tracker.lock().unwrap().unaccounted(ingests);
        for digest in unaccounted {
            if let Ok(Some(true)) = self.runtime.has_blob(&digest).await {
                tracker.lock().unwrap().committed(&digest);
            }
        }
    }

    /// The manifest (layers and sizes), or `None` when the registry does not tell: the pull
    /// goes on without sizes.
    async fn manifest(&self) -> Option<ImageManifest> {
        match self
            .registry
            .manifest(&self.image, self.credentials.as_ref())
            .await
        {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::debug!(image = %self.image, "manifest unknown before the pull: {e}");
                None
            }
        }
    }

    /// With eviction on, evicts what the rules allow to fit the image before pulling it, or
    /// fails when it cannot fit. Done once per pull, however many requests share it. An image
    /// whose size the registry does not tell is pulled without the check (the periodic gc
    /// catches up).
    async fn make_room(
        &self,
        manifest: Option<&ImageManifest>,
    ) -> Result<Option<Reservation>, PullError> {
        let (true, Some(m)) = (self.cache.eviction_enabled(), manifest) else {
            return Ok(None);
        };
        self.cache
            .make_room(m.size())
            .await
            .map(Some)
            .map_err(|e| PullError::NoRoom {
                image: self.image.to_string(),
                source: Arc::new(e),
            })
    }
}
