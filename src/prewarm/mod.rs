//! Scheduled pre-warming: cron schedules (croner, with time zones) that keep explicit image lists
//! and/or the node's most popular images (decayed use counts) current, through the same puller as
//! every other request (single flight, limits, retries).
//!
//! Each run resolves every image's tag (`Always`): absent images are pulled, moved tags
//! refreshed, current ones left alone. A run never overlaps itself (a fire during a run is
//! recorded as skipped), starts after a random jitter, and is recorded with per-image outcomes.
//! The timer sleeps until the earliest next fire and wakes early when schedules change. After a
//! restart, a schedule with `catch_up` runs once if a fire was missed while cimaged was down.

pub mod schedule;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::background::Background;
use crate::cache::{Cache, CacheError, ImageRecord, Origin};
use crate::clock::Clock;
use crate::policy::PullPolicy;
use crate::puller::{Action, EnsureRequest, Puller};
use crate::store::{Store, StoreError};
pub use schedule::{ScheduleError, ScheduleSpec};
use store::{ImageOutcome, ImageResult, PrewarmStore, RunOutcome, RunRecord, StoredSchedule};

/// What a run started by hand reports as it goes.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// Work on an image began (the normalised reference or the name as listed).
    Started(String),
    /// An image's pull moved.
    Pulling(crate::puller::PullProgress),
    /// An image is done with.
    Finished(ImageResult),
}

/// Why a pre-warm call failed.
#[derive(Debug, thiserror::Error)]
pub enum PrewarmError {
    /// The schedule is invalid.
    #[error(transparent)]
    Invalid(#[from] ScheduleError),
    /// No such schedule.
    #[error("no pre-warm schedule named {0:?}")]
    NotFound(String),
    /// The change conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The durable state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image index could not be read.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// A schedule as listed: its spec, next fire, and last run.
#[derive(Debug, Clone)]
pub struct ScheduleInfo {
    /// The schedule.
    pub spec: ScheduleSpec,
    /// Next fire (Unix ms).
    pub next_fire: Option<i64>,
    /// The most recent run.
    pub last_run: Option<RunRecord>,
    /// A run is going on now.
    pub running: bool,
}

/// One image in the popularity ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// Its record; for an image no longer on the node, the history its name left (its `id`
    /// is the one it had).
    pub record: ImageRecord,
    /// Decayed use count now.
    pub score: f64,
    /// On the node now.
    pub present: bool,
}

/// Runs pre-warm schedules.
pub struct Prewarmer {
    puller: Arc<Puller>,
    cache: Arc<Cache>,
    metrics: Arc<crate::metrics::Metrics>,
    store: PrewarmStore,
    clock: Arc<dyn Clock>,
    changed: Notify,
    running: Mutex<HashSet<String>>,
    background: Background,
}

impl Prewarmer {
    /// A pre-warmer keeping its schedules and runs in `store`, its runs tracked tasks of
    /// `background`. Runs the store still shows as running were cut short by a crash or a
    /// shutdown: they are marked interrupted here.
    pub fn new(
        puller: Arc<Puller>,
        cache: Arc<Cache>,
        metrics: Arc<crate::metrics::Metrics>,
        store: &Store,
        clock: Arc<dyn Clock>,
        background: Background,
    ) -> Result<Arc<Self>, StoreError> {
        let store = PrewarmStore::open(store)?;
        let interrupted = store.interrupt_running(clock.now_ms())?;
        if interrupted > 0 {
            info!(
                runs = interrupted,
                "pre-warm runs cut short by the last stop marked interrupted"
            );
        }
        Ok(Arc::new(Self {
            puller,
            cache,
            metrics,
            store,
            clock,
            changed: Notify::new(),
            running: Mutex::new(HashSet::new()),
            background,
        }))
    }

    /// Removes the runs that ended before `before` (Unix ms; `History.Keep` ago), in bounded
    /// transactions, and counts them in `cimage_history_pruned_total`; returns how many went.
    pub async fn prune_runs(&self, before: i64) -> Result<usize, StoreError> {
        const BATCH: usize = 500;
        let mut total = 0;
        loop {
            let n = self.blocking(move |s| s.prune_runs(before, BATCH)).await?;
            total += n;
            if n < BATCH {
                break;
            }
        }
        if total > 0 {
            self.metrics.add(
                "cimage_history_pruned_total",
                &[("kind", "prewarm_run")],
                total as u64,
            );
            info!(runs = total, "pre-warm runs pruned");
        }
        Ok(total)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&PrewarmStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Store::off_thread(self.store.clone(), f).await
    }

    /// Makes the stored config-defined schedules match the config file: adds and updates them,
    /// removes those the file no longer has. Schedules added over the API are left alone.
    pub async fn sync_config(&self, specs: Vec<ScheduleSpec>) -> Result<(), PrewarmError> {
        let mut parsed = Vec::new();
        for mut s in specs {
            s.from_config = true;
            s.parse()?;
            parsed.push(s);
        }
        let existing = self.blocking(|s| s.all()).await?;
        let now = self.clock.now_ms();
        for spec in &parsed {
            let old = existing.iter().find(|e| e.spec.name == spec.name);
            if old.is_some_and(|o| !o.spec.from_config) {
                return Err(PrewarmError::Conflict(format!(
                    "schedule {:?} is in the config file and was also added over the API; remove one",
                    spec.name
                )));
            }
            if old.map(|o| &o.spec) != Some(spec) {
                let stored = StoredSchedule {
                    spec: spec.clone(),
                    created: old.map(|o| o.created).unwrap_or(now),
                    last_fire: old.and_then(|o| o.last_fire),
                };
                self.blocking(move |s| s.put(&stored)).await?;
            }
        }
        for gone in existing
            .iter()
            .filter(|e| e.spec.from_config && !parsed.iter().any(|p| p.name == e.spec.name))
        {
            let name = gone.spec.name.clone();
            self.blocking(move |s| s.remove(&name)).await?;
        }
        self.changed.notify_one();
        Ok(())
    }

    /// Adds (or replaces) a schedule over the API; it persists across restarts.
    pub async fn add(&self, mut spec: ScheduleSpec) -> Result<ScheduleInfo, PrewarmError> {
        spec.from_config = false;
        let parsed = spec.parse()?;
        let existing = self.blocking(|s| s.all()).await?;
        let old = existing.into_iter().find(|e| e.spec.name == spec.name);
        if old.as_ref().is_some_and(|o| o.spec.from_config) {
            return Err(PrewarmError::Conflict(format!(
                "schedule {:?} is defined in the config file; change it there",
                spec.name
            )));
        }
        let now = self.clock.now_ms();
        let stored = StoredSchedule {
            spec: spec.clone(),
            created: now,
            last_fire: old.and_then(|o| o.last_fire),
        };
        self.blocking(move |s| s.put(&stored)).await?;
        self.changed.notify_one();
        info!(schedule = %spec.name, cron = %spec.cron, "pre-warm schedule added");
        Ok(ScheduleInfo {
            next_fire: parsed.next_after(now),
            spec,
            last_run: None,
            running: false,
        })
    }

    /// Removes a schedule added over the API, with its history.
    pub async fn remove(&self, name: &str) -> Result<(), PrewarmError> {
        let existing = self.blocking(|s| s.all()).await?;
        match existing.iter().find(|e| e.spec.name == name) {
            None => return Err(PrewarmError::NotFound(name.to_owned())),
            Some(e) if e.spec.from_config => {
                return Err(PrewarmError::Conflict(format!(
                    "schedule {name:?} is defined in the config file; remove it there"
                )))
            }
            Some(_) => {}
        }
        let n = name.to_owned();
        self.blocking(move |s| s.remove(&n)).await?;
        self.changed.notify_one();
        Ok(())
    }

    /// Every schedule with its next fire and last run.
    pub async fn list(&self) -> Result<Vec<ScheduleInfo>, PrewarmError> {
        let all = self.blocking(|s| s.all()).await?;
        let now = self.clock.now_ms();
        let mut out = Vec::new();
        for st in all {
            let mut spec = st.spec.clone();
            let next_fire = spec.parse().ok().and_then(|p| p.next_after(now));
            let name = spec.name.clone();
            let last_run = self.blocking(move |s| s.runs(&name)).await?.pop();
            let running = self.running.lock().unwrap().contains(&spec.name);
            out.push(ScheduleInfo {
                spec,
                next_fire,
                last_run,
                running,
            });
        }
        Ok(out)
    }

    /// A schedule's runs, oldest first.
    pub async fn history(&self, name: &str) -> Result<Vec<RunRecord>, PrewarmError> {
        let all = self.blocking(|s| s.all()).await?;
        if !all.iter().any(|s| s.spec.name == name) {
            return Err(PrewarmError::NotFound(name.to_owned()));
        }
        let n = name.to_owned();
        Ok(self.blocking(move |s| s.runs(&n)).await?)
    }

    /// The `n` most popular images now, by decayed use count (images never used are not
    /// ranked), those on the node and those that left it but are still remembered by name.
    pub async fn top(&self, n: usize) -> Result<Vec<Ranked>, PrewarmError> {
        let images = self.cache.list().await?;
        let gone = self.cache.gone().await?;
        let now = self.clock.now_ms();
        let half_life = self.cache.popularity_half_life_ms();
        let here: std::collections::HashSet<String> =
            images.iter().flat_map(|r| r.names.clone()).collect();
        let present = images.iter().cloned().map(|r| (r, true));
        let absent = gone
            .into_iter()
            .filter(|g| !g.names.iter().any(|n| here.contains(n)))
            .map(|g| (g, false));
        let mut ranked: Vec<Ranked> = present
            .chain(absent)
            .map(|(record, present)| Ranked {
                score: record.popularity_now(now, half_life),
                record,
                present,
            })
            .filter(|r| r.score > 0.0 && !r.record.names.is_empty())
            .collect();
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.record.names.cmp(&b.record.names))
        });
        ranked.truncate(n);
        Ok(ranked)
    }

    /// Runs a schedule now, without jitter, sending each image's start, pull progress and
    /// result to `progress` as they come. Fails if the schedule is already running.
    pub async fn run_now(
        self: &Arc<Self>,
        name: &str,
        progress: Option<UnboundedSender<RunEvent>>,
    ) -> Result<RunRecord, PrewarmError> {
        let all = self.blocking(|s| s.all()).await?;
        let st = all
            .into_iter()
            .find(|s| s.spec.name == name)
            .ok_or_else(|| PrewarmError::NotFound(name.to_owned()))?;
        if self.running.lock().unwrap().contains(name) {
            return Err(PrewarmError::Conflict(format!(
                "schedule {name:?} is running already"
            )));
        }
        Ok(self
            .run(st.spec, "manual", None, Duration::ZERO, progress)
            .await)
    }

    async fn save_run(&self, run: &RunRecord) {
        let r = run.clone();
        if let Err(e) = self.blocking(move |s| s.put_run(&r)).await {
            warn!(schedule = %run.schedule, "cannot save run: {e}");
        }
    }

    /// One run. A run of a schedule already running is recorded as skipped.
    async fn run(
        self: &Arc<Self>,
        spec: ScheduleSpec,
        trigger: &str,
        scheduled_for: Option<i64>,
        jitter: Duration,
        progress: Option<UnboundedSender<RunEvent>>,
    ) -> RunRecord {
        let metrics = Arc::clone(&self.metrics);
        let mut run = RunRecord {
            schedule: spec.name.clone(),
            trigger: trigger.to_owned(),
            scheduled_for,
            started: self.clock.now_ms(),
            finished: None,
            jitter_ms: 0,
            outcome: RunOutcome::Running,
            images: vec![],
        };
        if !self.running.lock().unwrap().insert(spec.name.clone()) {
            run.outcome = RunOutcome::Skipped;
            run.finished = Some(run.started);
            info!(schedule = %spec.name, "pre-warm fire skipped: the previous run is still going");
            metrics.inc("cimage_prewarm_runs_total", &[("outcome", "skipped")]);
            self.save_run(&run).await;
            return run;
        }
        if !jitter.is_zero() {
            let delay =
                Duration::from_millis(rand::random::<u64>() % (jitter.as_millis() as u64 + 1));
            run.jitter_ms = delay.as_millis() as u64;
            tokio::time::sleep(delay).await;
            run.started = self.clock.now_ms();
        }
        let mut images = spec.images.clone();
        if let Some(n) = spec.top.filter(|n| *n > 0) {
            match self.top(n).await {
                Ok(top) => {
                    for r in top {
                        if let Some(name) = r.record.names.first() {
                            if !images.contains(name) {
                                images.push(name.clone());
                            }
                        }
                    }
                }
                Err(e) => warn!(schedule = %spec.name, "cannot rank images: {e}"),
            }
        }
        self.save_run(&run).await;
        info!(schedule = %spec.name, trigger, images = images.len(), "pre-warm run started");
        let results: Vec<ImageResult> = futures::stream::iter(images)
            .map(|image| {
                let me = Arc::clone(self);
                let progress = progress.clone();
                async move {
                    let r = me.warm_one(&image, progress.as_ref()).await;
                    if let Some(p) = &progress {
                        let _ = p.send(RunEvent::Finished(r.clone()));
                    }
                    r
                }
            })
            .buffer_unordered(spec.concurrency.max(1))
            .collect()
            .await;
        let failed = results
            .iter()
            .filter(|r| r.outcome == ImageOutcome::Failed)
            .count();
        run.outcome = match (failed, results.len()) {
            // Pulls stop when shutdown begins: the run did not fail, it was cut short.
            _ if self.background.is_shutting_down() => RunOutcome::Interrupted,
            (0, _) => RunOutcome::Ok,
            (f, n) if f == n => RunOutcome::Failed,
            _ => RunOutcome::Partial,
        };
        run.images = results;
        run.finished = Some(self.clock.now_ms());
        self.save_run(&run).await;
        self.running.lock().unwrap().remove(&spec.name);
        metrics.inc(
            "cimage_prewarm_runs_total",
            &[("outcome", run.outcome.as_str())],
        );
        info!(schedule = %spec.name, outcome = run.outcome.as_str(), "pre-warm run finished");
        run
    }

    async fn warm_one(
        &self,
        image: &str,
        events: Option<&UnboundedSender<RunEvent>>,
    ) -> ImageResult {
        let t = Instant::now();
        let was_present = self.cache.find_and_adopt(image).await.is_ok();
        if let Some(ev) = events {
            let _ = ev.send(RunEvent::Started(image.to_owned()));
        }
        let req = EnsureRequest {
            image: image.to_owned(),
            policy: Some(PullPolicy::Always),
            credentials: None,
            origin: Origin::Prewarm,
            requester: None,
            progress: None,
        };
        let r = match events {
            None => self.puller.ensure(req).await,
            Some(ev) => {
                self.puller
                    .ensure_watched(req, |p| {
                        let _ = ev.send(RunEvent::Pulling(p));
                    })
                    .await
            }
        };
        let seconds = t.elapsed().as_secs_f64();
        match r {
            Ok(e) => {
                let (outcome, bytes) = match (e.action, was_present) {
                    (Action::Cached, _) => (ImageOutcome::Cached, 0),
                    (Action::Pulled, true) => (ImageOutcome::Refreshed, e.record.size),
                    (Action::Pulled, false) => (ImageOutcome::Pulled, e.record.size),
                };
                ImageResult {
                    image: e.image.to_string(),
                    outcome,
                    error: None,
                    bytes,
                    seconds,
                }
            }
            Err(e) => ImageResult {
                image: image.to_owned(),
                outcome: ImageOutcome::Failed,
                error: Some(e.to_string()),
                bytes: 0,
                seconds,
            },
        }
    }

    /// After a start: a schedule with `catch_up` whose fire was missed while cimaged was down
    /// runs once now; every schedule's missed fires are then marked handled.
    pub async fn catch_up(self: &Arc<Self>) -> Result<usize, PrewarmError> {
        let all = self.blocking(|s| s.all()).await?;
        let now = self.clock.now_ms();
        let mut caught = 0;
        for mut st in all {
            let Ok(parsed) = st.spec.parse() else {
                continue;
            };
            let since = st.last_fire.unwrap_or(st.created);
            let Some(last_due) = parsed.last_at_or_before(now) else {
                continue;
            };
            if last_due <= since {
                continue;
            }
            st.last_fire = Some(last_due);
            let saved = st.clone();
            self.blocking(move |s| s.put(&saved)).await?;
            if st.spec.catch_up {
                caught += 1;
                info!(schedule = %st.spec.name, "catching up a run missed while cimaged was down");
                let me = Arc::clone(self);
                self.background.spawn(async move {
                    me.run(st.spec, "catch_up", Some(last_due), Duration::ZERO, None)
                        .await;
                });
            }
        }
        Ok(caught)
    }

    /// The timer: sleeps until the earliest next fire (waking early when schedules change),
    /// then starts every run that is due. Returns when shutdown begins.
    pub async fn timer(self: Arc<Self>) {
        loop {
            let now = self.clock.now_ms();
            let mut earliest: Option<i64> = None;
            match self.blocking(|s| s.all()).await {
                Ok(all) => {
                    for mut st in all {
                        let Ok(parsed) = st.spec.parse() else {
                            continue;
                        };
                        let since = st.last_fire.unwrap_or(st.created);
                        let Some(next) = parsed.next_after(since) else {
                            continue;
                        };
                        if next <= now {
                            // Due: record the fire first, so a crash cannot replay it.
                            st.last_fire = Some(next);
                            let saved = st.clone();
                            if let Err(e) = self.blocking(move |s| s.put(&saved)).await {
                                warn!(schedule = %st.spec.name, "cannot record fire: {e}");
                                continue;
                            }
                            let me = Arc::clone(&self);
                            let jitter = schedule::jitter(&st.spec);
                            self.background.spawn(async move {
                                me.run(st.spec, "cron", Some(next), jitter, None).await;
                            });
                            earliest = Some(now);
                        } else {
                            earliest = Some(earliest.map_or(next, |e| e.min(next)));
                        }
                    }
                }
                Err(e) => warn!("cannot read pre-warm schedules: {e}"),
            }
            // Re-check at least every minute, so a wall-clock jump is noticed.
            let wait = earliest
                .map(|e| (e - self.clock.now_ms()).clamp(0, 60_000) as u64)
                .unwrap_or(60_000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = self.changed.notified() => {}
                _ = self.background.shutting_down() => return,
            }
        }
    }
}
