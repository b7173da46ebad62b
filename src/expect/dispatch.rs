//! The expector's three tasks: the dispatcher (ends what is over, marks what is late, starts the
//! pulls that may start, earliest deadline first), the watcher of image uses (the first request
//! for an expected image by anyone else), and the queue source's poller (expectations follow
//! the scheduler's plan).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::source::QueueView;
use super::store::{Expectation, FirstRequest, Source, State};
use super::{check_job, key_of, new_expectation, rfc3339, Expector, SourceHealth};
use crate::cache::{Origin, UseSeen};
use crate::policy::PullPolicy;
use crate::puller::{EnsureRequest, Phase, PullError, SlotOwner};
use crate::reference::ImageRef;
use crate::store::StoreError;

/// The dispatcher looks again at least this often.
const LOOK_AGAIN: i64 = 30_000;

impl Expector {
    /// Runs [`Expector::tick`] whenever something changed or is due, until shutdown.
    pub(super) async fn dispatch_loop(self: Arc<Self>) {
        // Pulls cut short by the last stop left their records waiting: they start again here.
        loop {
            let wait = match self.tick().await {
                Ok(w) => w,
                Err(e) => {
                    self.warn_store(e);
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.background.shutting_down() => return,
            }
        }
    }

    /// One pass; returns how long until something is due by itself.
    pub(super) async fn tick(self: &Arc<Self>) -> Result<Duration, StoreError> {
        let _edit = self.edit.lock().await;
        let now = self.clock.now_ms();
        let grace = self.settings.grace.as_millis() as i64;
        let (over, mut live): (Vec<Expectation>, Vec<Expectation>) = self
            .live
            .lock()
            .unwrap()
            .records
            .values()
            .cloned()
            .partition(|e| !e.running && now > e.deadline_ms + grace);
        if !over.is_empty() {
            self.end(&over, "its deadline and grace have passed")
                .await?;
        }
        let mut wake = now + LOOK_AGAIN;
        for e in live.iter_mut() {
            if e.state != State::Ready && !e.late && now > e.deadline_ms {
                e.late = true;
                self.metrics.inc("cimage_expect_late_total", &[]);
                warn!(image = %e.image, job = ?e.job, deadline = %rfc3339(e.deadline_ms),
                    "expected image not ready by its deadline");
                self.save(e).await?;
            }
            if !e.running {
                wake = wake.min(e.deadline_ms + grace + 1);
            }
            if e.state != State::Ready && !e.late {
                wake = wake.min(e.deadline_ms + 1);
            }
            if let Some(r) = e.retry_at_ms.filter(|r| *r > now) {
                wake = wake.min(r);
            }
        }
        live.sort_by_key(|e| (e.deadline_ms, e.key.clone()));
        let mut free = {
            let pulling = self.live.lock().unwrap().pulling.len();
            self.settings.concurrency.saturating_sub(pulling)
        };
        for e in live.iter_mut() {
            if free == 0 {
                break;
            }
            let due = match e.state {
                State::Waiting => true,
                State::NoRoom => e.retry_at_ms.is_none_or(|r| r <= now),
                State::Failed => e.retry_at_ms.is_some_and(|r| r <= now),
                _ => false,
            };
            if !due || self.live.lock().unwrap().pulling.contains_key(&e.key) {
                continue;
            }
            let has_credentials = self.live.lock().unwrap().credentials.contains_key(&e.key);
            if e.credentialed && !has_credentials {
                e.state = State::Failed;
                e.retry_at_ms = None;
                e.reason = Some(
                    "its credentials are not kept across a restart of cimaged: expect it again with them"
                        .into(),
                );
                self.save(e).await?;
                continue;
            }
            free -= 1;
            self.live
                .lock()
                .unwrap()
                .pulling
                .insert(e.key.clone(), State::Queued);
            let (me, key) = (Arc::clone(self), e.key.clone());
            self.background.spawn(async move { me.pull(key).await });
        }
        self.count(&self.records(), now);
        Ok(Duration::from_millis(
            (wake - now).clamp(10, LOOK_AGAIN) as u64
        ))
    }

    /// Makes one expected image ready through the puller, and records how it went.
    async fn pull(self: Arc<Self>, key: String) {
        if let Err(e) = self.pull_one(&key).await {
            self.warn_store(e);
        }
        self.live.lock().unwrap().pulling.remove(&key);
        self.changed.notify_one();
    }

    async fn pull_one(&self, key: &str) -> Result<(), StoreError> {
        let Some(e) = self.record(key) else {
            return Ok(());
        };
        let credentials = self.live.lock().unwrap().credentials.get(key).cloned();
        let req = EnsureRequest {
            image: e.image.clone(),
            policy: Some(PullPolicy::IfNotPresent),
            credentials,
            origin: Origin::Expected,
            requester: (e.owner != 0).then_some(e.owner),
            progress: None,
        };
        // A user's expectation pulls under that user's share of the slots, as their own pull
        // would; the scheduler's and the admins' are the node's work.
        // A queue source's expectation pulls under its job's user's share.
        let owner = match (e.job_uid, e.by_admin, e.owner) {
            (Some(uid), _, _) if uid != 0 => SlotOwner::User(uid),
            (_, true, _) | (_, _, 0) => SlotOwner::Node,
            (_, false, uid) => SlotOwner::User(uid),
        };
        let result = self
            .puller
            .ensure_watched_for(req, owner, |p| {
                let phase = match p.phase {
                    Phase::Queued => State::Queued,
                    _ => State::Pulling,
                };
                if let Some(s) = self.live.lock().unwrap().pulling.get_mut(key) {
                    *s = phase;
                }
            })
            .await;
        let _edit = self.edit.lock().await;
        // Cancelled (or ended) while it pulled: nothing to record.
        let Some(mut e) = self.record(key) else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        match result {
            Ok(done) => {
                e.state = State::Ready;
                e.ready_ms = Some(now);
                e.image_id = Some(done.record.id.clone());
                e.reason = None;
                e.retry_at_ms = None;
                let hold = self.cache.mark_expected(&done.record.id);
                self.live.lock().unwrap().holds.insert(key.to_owned(), hold);
                info!(image = %e.image, job = ?e.job, ahead_s = (e.deadline_ms - now) / 1000,
                    action = done.action.as_str(), "expected image ready");
            }
            Err(err) => {
                let no_room = matches!(err, PullError::NoRoom { .. });
                e.reason = Some(err.to_string());
                if no_room {
                    e.state = State::NoRoom;
                    e.retry_at_ms = Some(now + self.settings.no_room_retry.as_millis() as i64);
                } else {
                    e.state = State::Failed;
                    e.retry_at_ms = (now < e.deadline_ms)
                        .then(|| now + self.settings.retry_after.as_millis() as i64);
                }
                warn!(image = %e.image, job = ?e.job, "expected image not pulled: {err}");
            }
        }
        self.save(&e).await
    }

    /// Follows the uses of images: the first request for an expected image by anyone but the
    /// expectation (and pre-warm) says whether it found the image ready.
    pub(super) async fn watch_uses(self: Arc<Self>) {
        let mut uses = self.cache.subscribe_uses();
        loop {
            let seen = tokio::select! {
                r = uses.recv() => r,
                _ = self.background.shutting_down() => return,
            };
            let seen = match seen {
                Ok(s) => s,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if matches!(seen.origin, Origin::Expected | Origin::Prewarm) {
                continue;
            }
            if let Err(e) = self.first_request(&seen).await {
                self.warn_store(e);
            }
        }
    }

    fn awaits(e: &Expectation, seen: &UseSeen) -> bool {
        e.first_request.is_none()
            && (e.image_id.as_deref() == Some(seen.id.as_str()) || seen.names.contains(&e.image))
    }

    async fn first_request(&self, seen: &UseSeen) -> Result<(), StoreError> {
        // Most uses are of images no one expects: answered from memory, without the lock.
        let any = {
            let live = self.live.lock().unwrap();
            live.records.values().any(|e| Self::awaits(e, seen))
        };
        if !any {
            return Ok(());
        }
        let _edit = self.edit.lock().await;
        let waiting: Vec<Expectation> = self
            .live
            .lock()
            .unwrap()
            .records
            .values()
            .filter(|e| Self::awaits(e, seen))
            .cloned()
            .collect();
        for mut e in waiting {
            let found_ready = !seen.pulled;
            e.first_request = Some(FirstRequest {
                at_ms: seen.at_ms,
                found_ready,
            });
            match (found_ready, e.lead_ms()) {
                (true, Some(lead)) => self.metrics.observe(
                    "cimage_expect_lead_seconds",
                    &[],
                    lead.max(0) as f64 / 1000.0,
                ),
                (false, _) if !e.late => {
                    e.late = true;
                    self.metrics.inc("cimage_expect_late_total", &[]);
                }
                _ => {}
            }
            info!(image = %e.image, job = ?e.job, found_ready, "first request for an expected image");
            self.save(&e).await?;
        }
        Ok(())
    }

    /// Asks the queue source every `Queue.Interval` until shutdown.
    pub(super) async fn source_loop(self: Arc<Self>) {
        let Some(source) = self.source.clone() else {
            return;
        };
        let kind = match source.name() {
            "slurm" => Source::Slurm,
            _ => Source::Command,
        };
        loop {
            let now = self.clock.now_ms();
            let looked = source.look(now, self.settings.horizon).await;
            let healthy = looked.is_ok();
            let was_healthy = {
                let mut h = self.health.lock().unwrap();
                let h = h.get_or_insert_with(SourceHealth::default);
                let was = h.healthy || h.last_ok_ms.is_none();
                h.healthy = healthy;
                match &looked {
                    Ok(view) => {
                        h.last_ok_ms = Some(now);
                        h.error = None;
                        h.planned = view.planned.len();
                    }
                    Err(e) => h.error = Some(e.to_string()),
                }
                was
            };
            self.metrics
                .set("cimage_queue_source_up", if healthy { 1.0 } else { 0.0 });
            match looked {
                Ok(view) => {
                    if !was_healthy {
                        info!(source = source.name(), "queue source answers again");
                    }
                    if let Err(e) = self.follow(kind, view).await {
                        self.warn_store(e);
                    }
                }
                // Logged when it turns unhealthy, not at every look.
                Err(e) if was_healthy => {
                    warn!(
                        source = source.name(),
                        "queue source failed (expectations are kept): {e}"
                    )
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.interval) => {}
                _ = self.background.shutting_down() => return,
            }
        }
    }

    /// Makes the source's expectations follow its view: one per (job, image) planned here, moved
    /// when the plan moves; kept while the job runs here; ended when the job leaves the queue.
    pub(super) async fn follow(&self, kind: Source, view: QueueView) -> Result<(), StoreError> {
        let _edit = self.edit.lock().await;
        let now = self.clock.now_ms();
        let mut planned: HashMap<String, (String, Option<String>, i64, Option<u32>)> =
            HashMap::new();
        for p in &view.planned {
            let image = match ImageRef::parse(&p.image) {
                Ok(i) => i.to_string(),
                Err(e) => {
                    warn!(job = %crate::units::quote_short(&p.job), "queue source names a bad image: {e}");
                    continue;
                }
            };
            if let Err(e) = check_job(&p.job) {
                warn!("queue source: {e}");
                continue;
            }
            let key = key_of(0, Some(&p.job), &image);
            planned.insert(key, (image, Some(p.job.clone()), p.start_ms, p.uid));
        }
        let running: HashMap<&str, Option<i64>> =
            view.running.iter().map(|(j, s)| (j.as_str(), *s)).collect();
        for (key, (image, job, start, uid)) in &planned {
            let mut e = self.record(key).unwrap_or_else(|| {
                new_expectation(key.clone(), image.clone(), job.clone(), 0, kind, now)
            });
            if e.deadline_ms != *start || e.running || e.job_uid != *uid {
                e.deadline_ms = *start;
                e.running = false;
                e.job_uid = *uid;
                self.save(&e).await?;
                self.changed.notify_one();
            }
        }
        let mut gone = Vec::new();
        let ours: Vec<Expectation> = self
            .live
            .lock()
            .unwrap()
            .records
            .values()
            .filter(|e| e.source == kind && !planned.contains_key(&e.key))
            .cloned()
            .collect();
        for mut e in ours {
            match e.job.as_deref().and_then(|j| running.get(j)) {
                Some(started) => {
                    if !e.running || e.job_start_ms != *started {
                        e.running = true;
                        e.job_start_ms = *started;
                        self.save(&e).await?;
                    }
                }
                None => gone.push(e),
            }
        }
        if !gone.is_empty() {
            self.end(&gone, "its job left the queue").await?;
        }
        Ok(())
    }
}
