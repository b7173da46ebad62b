//! Expected images: the scheduler (or an admin, or a user for themselves) says an image will be
//! needed on this node by a time, and the image is made ready before then, so the job's image
//! wait is zero.
//!
//! An expectation is durable (it survives a restart) and ends by itself: at its deadline plus
//! `Expect.Grace`, or, for one a queue source made, when its job leaves the queue (a job running
//! here keeps it until the job ends). Expected pulls run earliest deadline first, at most
//! `MaxConcurrentPulls` at once, through the same puller as every request (single flight: a job
//! that asks meanwhile joins the pull). A ready expected image is kept from eviction while its
//! expectation lives; one that does not fit beside the images expected earlier waits (`no
//! room`) instead of evicting them. The first request for the image by anyone else tells whether
//! it was ready in time, and by how much (its lead).

mod command;
mod dispatch;
mod slurm;
pub mod source;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::background::Background;
use crate::cache::{Cache, InUse};
use crate::clock::Clock;
use crate::config;
use crate::credentials::Credentials;
use crate::metrics::Metrics;
use crate::puller::Puller;
use crate::reference::{ImageRef, InvalidReference};
use crate::store::{Store, StoreError};
pub use command::CommandSource;
pub use slurm::SlurmSource;
pub use source::{ProcessRunner, QueueSource, QueueView, Runner, SourceError};
use store::ExpectStore;
pub use store::{Expectation, FirstRequest, Source, State};

/// How expectations behave.
#[derive(Debug, Clone)]
pub struct ExpectSettings {
    /// An expectation ends this long after its deadline (`Expect.Grace`).
    pub grace: Duration,
    /// Expectations one ordinary uid may hold at once (`Expect.MaxPerUser`).
    pub max_per_user: usize,
    /// Expected pulls at once (the puller's `MaxConcurrentPulls`).
    pub concurrency: usize,
    /// A failed pull is tried again after this, while its deadline is ahead.
    pub retry_after: Duration,
    /// A pull that found no room is tried again after this.
    pub no_room_retry: Duration,
    /// How often the queue source is asked (`Queue.Interval`).
    pub interval: Duration,
    /// How far ahead a queue source's plans count (`Queue.Horizon`).
    pub horizon: Duration,
}

impl Default for ExpectSettings {
    fn default() -> Self {
        Self {
            grace: config::DEFAULT_EXPECT_GRACE,
            max_per_user: config::DEFAULT_EXPECT_MAX_PER_USER,
            concurrency: config::DEFAULT_MAX_CONCURRENT_PULLS,
            retry_after: Duration::from_secs(300),
            no_room_retry: Duration::from_secs(30),
            interval: config::DEFAULT_QUEUE_INTERVAL,
            horizon: config::DEFAULT_QUEUE_HORIZON,
        }
    }
}

/// The longest an expectation may look ahead.
pub const MAX_AHEAD: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longest job id taken from a request or a source.
const MAX_JOB_LEN: usize = 128;

/// Who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asker {
    /// The caller's uid.
    pub uid: u32,
    /// Root or the admin group.
    pub admin: bool,
}

/// One `expect` request.
#[derive(Clone)]
pub struct ExpectRequest {
    /// The image reference as given.
    pub image: String,
    /// When it must be ready (Unix ms).
    pub deadline_ms: i64,
    /// The job it is for.
    pub job: Option<String>,
    /// Credentials for its registry (kept in memory only).
    pub credentials: Option<Credentials>,
}

/// What `cancel` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelTarget {
    /// Every expectation of this image the caller may cancel.
    Image(String),
    /// Every expectation of this job the caller may cancel.
    Job(String),
}

/// Why an expectation call failed.
#[derive(Debug, thiserror::Error)]
pub enum ExpectError {
    /// The image reference is malformed.
    #[error(transparent)]
    Reference(#[from] InvalidReference),
    /// A value of the request is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The caller holds the most expectations an ordinary user may.
    #[error("uid {uid} already has {max} expectations (ImageCache.Expect.MaxPerUser); cancel one or wait for one to end")]
    TooMany {
        /// The caller.
        uid: u32,
        /// The cap.
        max: usize,
    },
    /// Nothing the caller may cancel matches (also when it exists but is another's).
    #[error("no expectation of {0} to cancel")]
    NotFound(String),
    /// The durable state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How the queue source fares, for `cimage status` and `cimage expected`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceHealth {
    /// `slurm` or `command`.
    pub name: String,
    /// Its last look worked.
    pub healthy: bool,
    /// When it last worked (Unix ms).
    pub last_ok_ms: Option<i64>,
    /// Why its last look failed.
    pub error: Option<String>,
    /// Jobs planned here at its last good look.
    pub planned: usize,
}

/// The records, kept in memory and written through to the store on every change (so reads,
/// and the check of every image use, touch no disk), and what lives only in memory beside
/// them: credentials, the eviction holds of ready images, the pulls under way and their phase.
#[derive(Default)]
struct Live {
    records: BTreeMap<String, Expectation>,
    credentials: HashMap<String, Credentials>,
    holds: HashMap<String, InUse>,
    /// Key → `Queued` or `Pulling`, while its pull runs.
    pulling: HashMap<String, State>,
}

/// Keeps the node's expectations and makes their images ready in time.
pub struct Expector {
    puller: Arc<Puller>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    store: ExpectStore,
    clock: Arc<dyn Clock>,
    settings: ExpectSettings,
    source: Option<Arc<dyn QueueSource>>,
    health: Mutex<Option<SourceHealth>>,
    live: Mutex<Live>,
    /// Serialises read-modify-write of the records (API, dispatcher, pulls, source).
    edit: tokio::sync::Mutex<()>,
    changed: Notify,
    background: Background,
}

impl Expector {
    /// An expector over `store`; `source` is the queue source, if one is configured. Ready
    /// expectations found in the store hold their images from eviction again at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        puller: Arc<Puller>,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        store: &Store,
        clock: Arc<dyn Clock>,
        settings: ExpectSettings,
        source: Option<Arc<dyn QueueSource>>,
        background: Background,
    ) -> Result<Arc<Self>, StoreError> {
        let store = ExpectStore::open(store)?;
        let health = source.as_ref().map(|s| SourceHealth {
            name: s.name().to_owned(),
            ..Default::default()
        });
        let e = Arc::new(Self {
            puller,
            cache,
            metrics,
            store,
            clock,
            settings,
            source,
            health: Mutex::new(health),
            live: Mutex::default(),
            edit: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            background,
        });
        let kept = e.store.all()?;
        {
            let mut live = e.live.lock().unwrap();
            for x in &kept {
                if let (State::Ready, Some(id)) = (x.state, &x.image_id) {
                    live.holds.insert(x.key.clone(), e.cache.mark_expected(id));
                }
                live.records.insert(x.key.clone(), x.clone());
            }
        }
        if !kept.is_empty() {
            info!(
                expectations = kept.len(),
                "expectations kept from before the restart"
            );
        }
        Ok(e)
    }

    /// Starts the expector's tasks: the dispatcher, the watcher of image uses and, with a queue
    /// source, its poller. They end when shutdown begins.
    pub fn start(self: &Arc<Self>) {
        let me = Arc::clone(self);
        self.background
            .spawn(async move { me.dispatch_loop().await });
        let me = Arc::clone(self);
        self.background.spawn(async move { me.watch_uses().await });
        if self.source.is_some() {
            let me = Arc::clone(self);
            self.background.spawn(async move { me.source_loop().await });
        }
    }

    /// The queue source's health (None: no source configured).
    pub fn source_health(&self) -> Option<SourceHealth> {
        self.health.lock().unwrap().clone()
    }

    /// Says `req.image` will be needed by `req.deadline_ms`; returns the expectation (new, or the
    /// same one moved to the new deadline). Root and the admin group may expect any image, for
    /// any job; others only for themselves, at most `Expect.MaxPerUser` at once.
    pub async fn expect(&self, req: ExpectRequest, who: Asker) -> Result<Expectation, ExpectError> {
        let image = ImageRef::parse(&req.image)?.to_string();
        let now = self.clock.now_ms();
        if req.deadline_ms < now {
            return Err(ExpectError::Invalid(format!(
                "the deadline {} is in the past",
                rfc3339(req.deadline_ms)
            )));
        }
        if req.deadline_ms > now + MAX_AHEAD.as_millis() as i64 {
            return Err(ExpectError::Invalid(format!(
                "the deadline {} is more than 30 days ahead",
                rfc3339(req.deadline_ms)
            )));
        }
        if let Some(job) = &req.job {
            check_job(job)?;
        }
        let _edit = self.edit.lock().await;
        let all = self.records();
        let key = key_of(who.uid, req.job.as_deref(), &image);
        if !who.admin {
            let held = all.iter().filter(|e| e.owner == who.uid).count();
            if held >= self.settings.max_per_user && !all.iter().any(|e| e.key == key) {
                return Err(ExpectError::TooMany {
                    uid: who.uid,
                    max: self.settings.max_per_user,
                });
            }
        }
        let mut e = self.record(&key).unwrap_or_else(|| {
            new_expectation(key.clone(), image, req.job, who.uid, Source::Api, now)
        });
        e.deadline_ms = req.deadline_ms;
        e.credentialed = req.credentials.is_some();
        e.by_admin = who.admin;
        if e.state == State::Failed {
            // Said again: try again now.
            e.state = State::Waiting;
            e.retry_at_ms = None;
        }
        {
            let mut live = self.live.lock().unwrap();
            match req.credentials {
                Some(c) => live.credentials.insert(key.clone(), c),
                None => live.credentials.remove(&key),
            };
        }
        self.save(&e).await?;
        info!(image = %e.image, job = ?e.job, uid = who.uid, deadline = e.deadline_ms, "image expected");
        self.changed.notify_one();
        Ok(e)
    }

    /// Cancels the expectations of an image or a job that `who` may cancel (theirs; any for
    /// root and the admin group); returns what went.
    pub async fn cancel(
        &self,
        target: CancelTarget,
        who: Asker,
    ) -> Result<Vec<Expectation>, ExpectError> {
        let (what, image) = match &target {
            CancelTarget::Image(i) => {
                let i = ImageRef::parse(i)?.to_string();
                (i.clone(), Some(i))
            }
            CancelTarget::Job(j) => (format!("job {j}"), None),
        };
        let _edit = self.edit.lock().await;
        let gone: Vec<Expectation> = self
            .records()
            .into_iter()
            .filter(|e| who.admin || e.owner == who.uid)
            .filter(|e| match (&target, &image) {
                (CancelTarget::Image(_), Some(i)) => &e.image == i,
                (CancelTarget::Job(j), _) => e.job.as_deref() == Some(j.as_str()),
                _ => false,
            })
            .collect();
        if gone.is_empty() {
            return Err(ExpectError::NotFound(what));
        }
        self.end(&gone, "cancelled").await?;
        Ok(gone)
    }

    /// The expectations `who` may see: all for root and the admin group, their own for others;
    /// earliest deadline first.
    pub fn list(&self, who: Asker) -> Vec<Expectation> {
        let mut all: Vec<Expectation> = self
            .records()
            .into_iter()
            .filter(|e| who.admin || e.owner == who.uid)
            .collect();
        all.sort_by_key(|e| (e.deadline_ms, e.key.clone()));
        all
    }

    /// Every record, with the phase of a pull under way in place of its stored state.
    fn records(&self) -> Vec<Expectation> {
        let live = self.live.lock().unwrap();
        live.records
            .values()
            .map(|e| {
                let mut e = e.clone();
                if let Some(phase) = live.pulling.get(&e.key) {
                    e.state = *phase;
                }
                e
            })
            .collect()
    }

    /// One record as stored (its pull's phase not applied).
    fn record(&self, key: &str) -> Option<Expectation> {
        self.live.lock().unwrap().records.get(key).cloned()
    }

    /// Writes a record through to the store, then to memory.
    async fn save(&self, e: &Expectation) -> Result<(), StoreError> {
        let stored = e.clone();
        Store::off_thread(self.store.clone(), move |s| s.put(&stored)).await?;
        self.live
            .lock()
            .unwrap()
            .records
            .insert(e.key.clone(), e.clone());
        Ok(())
    }

    /// Removes expectations (their credentials and eviction holds with them).
    async fn end(&self, gone: &[Expectation], why: &str) -> Result<(), StoreError> {
        let keys: Vec<String> = gone.iter().map(|e| e.key.clone()).collect();
        let k = keys.clone();
        Store::off_thread(self.store.clone(), move |s| s.remove(&k)).await?;
        let mut live = self.live.lock().unwrap();
        for (k, e) in keys.iter().zip(gone) {
            live.records.remove(k);
            live.credentials.remove(k);
            live.holds.remove(k);
            info!(image = %e.image, job = ?e.job, "expectation ended: {why}");
        }
        Ok(())
    }

    /// Sets `cimage_expected_images{state}` from the records.
    fn count(&self, all: &[Expectation], now: i64) {
        let mut by: HashMap<&str, usize> = HashMap::new();
        for e in all {
            *by.entry(e.shown_state(now)).or_default() += 1;
        }
        for s in State::ALL.iter().map(|s| s.as_str()).chain(["late"]) {
            self.metrics.set_labelled(
                "cimage_expected_images",
                &[("state", s)],
                by.get(s).copied().unwrap_or(0) as f64,
            );
        }
    }

    fn warn_store(&self, e: StoreError) {
        warn!("expectations: {e}");
    }
}

/// The key of an expectation: one per (owner, job, image).
fn key_of(owner: u32, job: Option<&str>, image: &str) -> String {
    format!("{owner} {} {image}", job.unwrap_or("-"))
}

fn new_expectation(
    key: String,
    image: String,
    job: Option<String>,
    owner: u32,
    source: Source,
    now: i64,
) -> Expectation {
    Expectation {
        key,
        image,
        job,
        deadline_ms: now,
        source,
        owner,
        by_admin: owner == 0,
        job_uid: None,
        credentialed: false,
        created_ms: now,
        state: State::Waiting,
        reason: None,
        ready_ms: None,
        image_id: None,
        late: false,
        job_start_ms: None,
        running: false,
        first_request: None,
        retry_at_ms: None,
    }
}

/// A job id from a request or a source: printable, no spaces, at most 128 characters.
fn check_job(job: &str) -> Result<(), ExpectError> {
    if job.is_empty() || job.len() > MAX_JOB_LEN {
        return Err(ExpectError::Invalid(format!(
            "job id {} must be 1 to {MAX_JOB_LEN} characters",
            crate::units::quote_short(job)
        )));
    }
    if job.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ExpectError::Invalid(format!(
            "job id {} must not hold spaces or control characters",
            crate::units::quote_short(job)
        )));
    }
    Ok(())
}

/// A time (Unix ms) as RFC 3339, for messages.
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}
