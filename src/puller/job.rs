//! One pull, shared by every request that joined it ([`PullJob`]): it waits for a slot, makes
//! room (and holds it; see `room.rs`), pulls through the runtime with retries while following
//! its bytes, and reads back what landed.
//!
//! While the runtime pulls, the job looks at the runtime's downloads every
//! [`poll_interval`]: the bytes feed the pull's [`PullProgress`], and an attempt whose bytes
//! have not moved for `PullStallTimeout` while a layer is still being fetched is cancelled and
//! retried like any transient failure. Time after the last layer is committed is unpacking,
//! never a stall; a runtime that reports no bytes is bounded by `PullTimeout` alone.
//!
//! From the moment it has its slot, and again at each retry, a pull has `PullResolveTimeout`
//! to show that its registry answers (a registry that accepts connections and never answers
//! would otherwise hold a slot until `PullTimeout`): cimage's read of its manifest, then,
//! where the runtime reports bytes, a download of one of its layers (a pull whose layers the
//! runtime holds already is under way from the start). A pull whose manifest cimage could not
//! read has only its end to show. One that shows nothing fails at once, unretried.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::progress::{Phase, PullProgress, Tracker};
use super::retry::{retry, Transient};
use super::share::Claim;
use super::{Core, FlightKey, Flights, PullError, Pulled};
use crate::cache::Reservation;
use crate::credentials::Credentials;
use crate::reference::ImageRef;
use crate::registry::ImageManifest;
use crate::runtime::{Ingest, RuntimeError};
use crate::units::format_span;

/// How often a pull looks at the runtime's downloads: twice a second, or more often for a stall
/// timeout under two seconds (tests).
pub(super) fn poll_interval(stall: Duration) -> Duration {
    (stall / 4).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// How long the lease of cimage's own fetch outlives the pull's deadline: the lease expires
/// by itself (containerd collects it) should cimaged die mid-pull.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Why one attempt of a pull ended without an image.
#[derive(Debug)]
enum AttemptError {
    /// The runtime's pull failed.
    Runtime(RuntimeError),
    /// The bytes stopped moving.
    Stalled,
    /// Nothing showed that the registry answers within `PullResolveTimeout`.
    Unresolved,
    /// The bytes that arrived do not fit.
    NoRoom(PullError),
    /// cimage's own fetch got a blob that does not match its digest, twice.
    Corrupt(crate::fetch::FetchError),
}

impl Transient for AttemptError {
    fn is_transient(&self) -> bool {
        match self {
            AttemptError::Runtime(e) => e.is_transient(),
            AttemptError::Stalled => true,
            AttemptError::Unresolved | AttemptError::NoRoom(_) | AttemptError::Corrupt(_) => false,
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
            AttemptError::Unresolved => {
                f.write_str("no layer bytes (ImageCache.PullResolveTimeout)")
            }
            AttemptError::NoRoom(e) => e.fmt(f),
            AttemptError::Corrupt(e) => e.fmt(f),
        }
    }
}

impl AttemptError {
    /// The `reason` label of a retry or failure.
    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Runtime(e) => e.reason(),
            AttemptError::Stalled => "stalled",
            AttemptError::Unresolved => "unresolved",
            AttemptError::NoRoom(_) => "no_room",
            AttemptError::Corrupt(_) => "corrupt",
        }
    }
}

/// The room a pull holds until it ends (made and grown by `room.rs`).
pub(super) enum Room {
    /// None: eviction is off, or the pull's manifest is unknown (the periodic pass catches up).
    Unchecked,
    /// Made before the pull, for its checked size (held until the pull ends).
    Made { _held: Reservation },
    /// Made as the pull's bytes arrive.
    AsArrived(Reservation),
}

/// One pull, shared by every request that joined it: waits for a slot, makes room, pulls
/// through the runtime with retries while following its bytes, and reads back what landed.
pub(super) struct PullJob {
    /// What every pull shares: the runtime, registry, cache, metrics, settings and slots.
    pub(super) core: Arc<Core>,
    /// The image pulled.
    pub(super) image: ImageRef,
    /// The credentials it is pulled with.
    pub(super) credentials: Option<Credentials>,
    /// Its registry's pull slots.
    pub(super) per_registry: Arc<Semaphore>,
    /// What its requesters read of it.
    pub(super) progress: Arc<watch::Sender<PullProgress>>,
    /// Whose share of the slots it counts against.
    pub(super) claim: Arc<Claim>,
    /// How urgent it is, for the node's slots.
    pub(super) urgency: super::slots::Urgency,
}

/// What an attempt follows: the layers' bytes (when the runtime reports them), whether the
/// manifest is known, the room that grows with the bytes, and (when cimage fetches the big
/// layers itself) what the runtime's pull waits for before it starts.
#[derive(Clone, Copy)]
struct Watch<'a> {
    tracker: &'a Mutex<Tracker>,
    bytes_known: bool,
    manifest_known: bool,
    room: &'a Room,
    gate: Option<&'a watch::Receiver<bool>>,
    /// cimage's own counts of the blobs it fetches itself, when it does.
    own: Option<&'a crate::fetch::FetchCounts>,
}

impl PullJob {
    /// Runs the pull (until it ends or shutdown begins), publishes its end, then takes its
    /// flight off the map so later requests start afresh.
    pub(super) async fn run(
        self,
        inflight: Flights,
        key: FlightKey,
        stop: CancellationToken,
    ) -> Result<Pulled, PullError> {
        let started = Instant::now();
        let registry = self.image.registry().to_owned();
        let label = self.core.registry_label(&registry);
        info!(image = %self.image, %registry, "pull started");
        self.core.metrics.gauge_add("cimage_pulls_in_flight", 1.0);
        let result = tokio::select! {
            r = tokio::time::timeout(self.core.settings.pull_timeout, self.pull()) => r.unwrap_or_else(|_| {
                Err(PullError::Timeout {
                    image: self.image.to_string(),
                    after: crate::units::format_duration(self.core.settings.pull_timeout),
                })
            }),
            _ = stop.cancelled() => Err(PullError::ShuttingDown {
                image: self.image.to_string(),
            }),
        };
        self.claim.release();
        self.core.metrics.gauge_add("cimage_pulls_in_flight", -1.0);
        let secs = started.elapsed().as_secs_f64();
        match &result {
            Ok(Pulled { image: img, .. }) => {
                info!(image = %self.image, %registry, bytes = img.size, seconds = secs, "pull finished");
                self.core.metrics.observe(
                    "cimage_pull_duration_seconds",
                    &[("registry", label)],
                    secs,
                );
                self.core.metrics.inc(
                    "cimage_runtime_pulls_total",
                    &[("registry", label), ("result", "pulled")],
                );
                self.core.metrics.add(
                    "cimage_pulled_bytes_total",
                    &[("registry", label)],
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
                self.core.metrics.inc(
                    "cimage_runtime_pulls_total",
                    &[("registry", label), ("result", "failed")],
                );
                self.core.metrics.inc(
                    "cimage_pull_failures_total",
                    &[("registry", label), ("reason", e.reason())],
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

    /// Takes a user's share when the pull counts against one (waiting outside the node's line
    /// while its users' shares are taken), then the registry's and the node's pull slots,
    /// queueing visibly when they are taken.
    async fn take_slots(&self) -> (OwnedSemaphorePermit, super::slots::Slot) {
        self.claim
            .take(&self.core.shares, |users| {
                self.progress.send_modify(|p| {
                    p.phase = Phase::Queued;
                    p.queue_position = 0;
                });
                info!(image = %self.image, ?users, "pull waits: its users hold their share of the pull slots (ImageCache.MaxPullsPerUser)");
            })
            .await;
        if let Some(uid) = self.claim.holder() {
            tracing::debug!(image = %self.image, uid, "pull counts against the user's share");
        }
        if let Ok(r) = Arc::clone(&self.per_registry).try_acquire_owned() {
            if let Some(g) = self.core.global.try_take() {
                return (r, g);
            }
        }
        let _place = self.core.queue.enter(&self.progress);
        info!(image = %self.image, "pull queued: every pull slot is taken (ImageCache.MaxConcurrentPulls)");
        let r = Arc::clone(&self.per_registry)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let g = self.core.global.take(&self.urgency).await;
        (r, g)
    }

    async fn pull(&self) -> Result<Pulled, PullError> {
        let name = self.image.to_string();
        let _slots = self.take_slots().await;
        self.progress.send_modify(|p| {
            p.phase = Phase::Resolving;
            p.queue_position = 0;
        });
        // From here the registry has PullResolveTimeout to show that it answers.
        let resolve = self.core.settings.resolve_timeout;
        let mut window_end = tokio::time::Instant::now() + resolve;
        // One look at the runtime's downloads says whether it reports bytes at all.
        let bytes_known = self.core.settings.byte_progress
            && matches!(self.core.runtime.downloads().await, Ok(Some(_)));
        let manifest = tokio::time::timeout_at(window_end, self.manifest())
            .await
            .map_err(|_| self.unresolved("sent no manifest"))?;
        // Room is made once the pull may start, for pulls that will really happen now, for
        // what they really bring, and held until the pull ends (room.rs).
        let room = self.make_room(manifest.as_ref(), &mut window_end).await?;
        let manifest_known = manifest.is_some();
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
            self.core.metrics.inc(
                "cimage_pull_retries_total",
                &[
                    ("registry", self.core.registry_label(&registry)),
                    ("reason", e.reason()),
                ],
            );
        };
        // cimage's own fetch of the big layers: its writers are open before the runtime's
        // pull starts, so the runtime finds those blobs instead of fetching them.
        let mut fetch = match (&self.core.fetcher, &manifest) {
            (Some(f), Some(m)) => {
                let hold = self.core.settings.pull_timeout + LEASE_MARGIN;
                f.start(&self.image, self.credentials.as_ref(), m, hold)
                    .await
            }
            _ => None,
        };
        let gate = fetch.as_ref().map(|f| f.first_in());
        let own = fetch.as_ref().map(|f| f.counts());
        let pulled = retry(
            self.core.settings.retries,
            self.core.settings.backoff,
            "pull",
            on_retry,
            || {
                attempt += 1;
                if attempt > 1 {
                    self.progress.send_modify(|p| {
                        p.attempt = attempt;
                        p.phase = Phase::Downloading;
                    });
                }
                tracing::debug!(image = %name, attempt, "calling PullImage");
                let window_end = match attempt {
                    1 => window_end,
                    _ => tokio::time::Instant::now() + resolve,
                };
                let watch = Watch {
                    tracker: &tracker,
                    bytes_known,
                    manifest_known,
                    room: &room,
                    gate: gate.as_ref(),
                    own: own.as_ref(),
                };
                self.attempt(watch, window_end)
            },
        );
        let outcome = match fetch.as_mut() {
            Some(f) => tokio::select! {
                r = pulled => r,
                e = f.failed() => Err(AttemptError::Corrupt(e)),
            },
            None => pulled.await,
        };
        if let Some(f) = fetch {
            f.finish().await;
        }
        let id = outcome.map_err(|e| match e {
            AttemptError::Stalled => PullError::Stalled {
                image: name.clone(),
                registry: registry.clone(),
                after: format_span(self.core.settings.stall_timeout),
            },
            AttemptError::Unresolved => self.unresolved(match manifest_known {
                true => "sent no layer bytes",
                false => "sent no readable manifest and no image",
            }),
            AttemptError::NoRoom(e) => e,
            AttemptError::Corrupt(e) => PullError::Corrupt {
                image: name.clone(),
                registry: e.registry,
                digest: e.digest,
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
        let status = self.core.runtime.image_status(&id).await.map_err(err)?;
        let image = status.ok_or_else(|| {
            err(RuntimeError {
                op: "ImageStatus",
                kind: crate::runtime::RuntimeErrorKind::NotFound,
                message: format!("image {id} vanished right after it was pulled"),
            })
        })?;
        let measured = match &manifest {
            Some(m) => Some(self.measure(m).await),
            None => None,
        };
        Ok(Pulled {
            image,
            measured,
            settle: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
    }

    /// One `PullImage`, watched: its bytes are published as they move (and room made for
    /// them, for a pull whose room grows), and it is cancelled when they stop moving for the
    /// stall timeout while a layer is still being fetched, or when it has shown nothing of the
    /// registry by `window_end` (its layers not downloading; without the manifest, not done).
    async fn attempt(
        &self,
        watch: Watch<'_>,
        window_end: tokio::time::Instant,
    ) -> Result<String, AttemptError> {
        let Watch {
            tracker,
            bytes_known,
            manifest_known,
            room,
            gate,
            own,
        } = watch;
        let name = self.image.to_string();
        let mut gate = gate.cloned();
        let pull = async {
            // The runtime's pull starts once cimage's first big layer is in (or left to the
            // runtime): it then finds that layer at once, where a pull started earlier would
            // notice it only at its next look at the ref's lock (up to 2 s later).
            if let Some(g) = gate.as_mut() {
                let _ = g.wait_for(|ready| *ready).await;
            }
            self.core
                .runtime
                .pull_image(&name, self.credentials.as_ref())
                .await
        };
        tokio::pin!(pull);
        if !bytes_known {
            // Without bytes, the manifest read is the one sign of a registry that answers.
            if manifest_known {
                return pull.await.map_err(AttemptError::Runtime);
            }
            return match tokio::time::timeout_at(window_end, pull).await {
                Ok(r) => r.map_err(AttemptError::Runtime),
                Err(_) => Err(AttemptError::Unresolved),
            };
        }
        let mut tick = tokio::time::interval(poll_interval(self.core.settings.stall_timeout));
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
                    let Ok(Some(ingests)) = self.core.runtime.downloads().await else { continue };
                    let now = Instant::now();
                    let done = {
                        let mut t = tracker.lock().unwrap();
                        let own = own.map(|o| o.snapshot()).unwrap_or_default();
                        t.update(&ingests, &own, now);
                        t.done()
                    };
                    if done == last_done {
                        // Nothing moved: a layer may have come and gone between two looks.
                        self.held_layers(tracker, &ingests).await;
                    }
                    let (done, fetching, under_way) = {
                        let t = tracker.lock().unwrap();
                        self.progress.send_modify(|p| t.fill(p));
                        (t.done(), !t.all_committed() && (t.has_layers() || !ingests.is_empty()), t.under_way())
                    };
                    if !under_way && tokio::time::Instant::now() >= window_end {
                        return Err(AttemptError::Unresolved);
                    }
                    let arrived = tracker.lock().unwrap().fetched();
                    self.grow_room(room, arrived).await.map_err(AttemptError::NoRoom)?;
                    if done != last_done {
                        last_move = now;
                        last_done = done;
                    } else if fetching && now.duration_since(last_move) >= self.core.settings.stall_timeout {
                        warn!(
                            image = %self.image,
                            registry = %self.image.registry(),
                            bytes = done,
                            "pull stalled: no progress for {} (ImageCache.PullStallTimeout); cancelling this attempt",
                            format_span(self.core.settings.stall_timeout)
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
            if let Ok(Some(true)) = self.core.runtime.has_blob(&digest).await {
                tracker.lock().unwrap().committed(&digest);
            }
        }
    }

    /// The pull's failure for a registry that showed nothing (`what` it did not send) within
    /// `PullResolveTimeout`.
    pub(super) fn unresolved(&self, what: &'static str) -> PullError {
        PullError::Unresolved {
            image: self.image.to_string(),
            registry: self.image.registry().to_owned(),
            what,
            after: format_span(self.core.settings.resolve_timeout),
        }
    }

    /// The manifest (layers and sizes), or `None` when the registry does not tell: the pull
    /// goes on without sizes.
    async fn manifest(&self) -> Option<ImageManifest> {
        match self
            .core
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
}
