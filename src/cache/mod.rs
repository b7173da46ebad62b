//! The image cache: the runtime's image store is the cache of record, and [`index::Index`] keeps
//! what the runtime does not (first seen, last used, use count, pins, origin). The runtime is
//! asked whenever presence matters; reconciliation brings the index back in line with it at
//! start-up and periodically, so images removed or added behind cimage's back are noticed.
//!
//! This file owns the [`Cache`] itself, its errors and settings, listing and reconciliation;
//! `record.rs` what is stored per image, `index.rs` the tables, `presence.rs` the memory of
//! recent confirmations, `uses.rs` uses and in-use guards, `lookup.rs` finding, pinning and
//! removing, `evict.rs` and `gc.rs` eviction and make-room, `gone.rs` images that left.

pub mod evict;
mod gc;
mod gone;
pub mod index;
mod lookup;
mod presence;
pub mod record;
mod uses;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

pub use evict::{EvictionReason, EvictionSettings, FsUsage, Incoming, Plan};
pub use gc::{GcReport, Reservation};
pub use uses::{InUse, UseSeen, USES_SEEN_QUEUE};

/// Eviction records are pruned at most this often (they are few; each pass reads their keys).
pub const PRUNE_EVERY_MS: i64 = 600_000;
pub use index::{Index, IndexSettings, ReconcileReport};
pub use record::{EvictionRecord, ImageRecord, Origin, Use};

use crate::background::Background;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

use crate::clock::Clock;
use crate::reference::InvalidReference;
use crate::runtime::{ImageRuntime, RuntimeError, RuntimeImage};

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The runtime does not have the image.
    #[error("image {image} is not present in the runtime")]
    NotFound {
        /// What was asked for.
        image: String,
    },
    /// A short id matches more than one image.
    #[error("image id prefix {prefix} is ambiguous: it matches {count} images")]
    Ambiguous {
        /// The prefix given.
        prefix: String,
        /// How many images it matches.
        count: usize,
    },
    /// The argument is neither an image id nor a valid reference.
    #[error(transparent)]
    InvalidReference(#[from] InvalidReference),
    /// The runtime failed.
    #[error("runtime failed while {context}: {source}")]
    Runtime {
        /// What was being done.
        context: String,
        /// The runtime's error.
        source: RuntimeError,
    },
    /// The index could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An incoming image does not fit without evicting protected images.
    #[error("no room for {bytes} more bytes of images: {reason}")]
    NoRoom {
        /// The size to make room for.
        bytes: u64,
        /// Why it cannot be made.
        reason: String,
    },
}

/// Index plus runtime, with the clock that timestamps uses.
pub struct Cache {
    index: Arc<Index>,
    runtime: Arc<dyn ImageRuntime>,
    clock: Arc<dyn Clock>,
    last_reconcile: AtomicI64,
    /// In-use marks by image id (see [`InUse`]).
    in_use: uses::InUseMarks,
    /// Holds of images an expectation keeps for its job (see [`Cache::mark_expected`]).
    expected: uses::InUseMarks,
    /// Every recorded use, for whoever follows them (see [`Cache::subscribe_uses`]).
    uses_seen: tokio::sync::broadcast::Sender<UseSeen>,
    /// Eviction records older than this are pruned (`ImageCache.History.Keep`).
    evictions_keep: std::time::Duration,
    /// When eviction records were last pruned (Unix ms).
    evictions_pruned_at: AtomicI64,
    eviction: Option<EvictionSettings>,
    metrics: Arc<Metrics>,
    gc_lock: tokio::sync::Mutex<()>,
    /// Bytes that pulls in flight were given room for (see [`Reservation`]), as `MaxBytes`
    /// counts them.
    reserved: Arc<std::sync::atomic::AtomicU64>,
    /// Of those, the bytes still to land on the image filesystem.
    reserved_disk: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes that have arrived for pulls whose room grows as they arrive (see
    /// [`Cache::room_as_arrived`]).
    arrived: Arc<std::sync::atomic::AtomicU64>,
    /// Images the runtime recently confirmed present, by every name (tag, digest reference,
    /// id), with when: warm requests within `presence_ttl_ms` skip the runtime round trip.
    confirmed: std::sync::Mutex<std::collections::HashMap<String, (RuntimeImage, i64)>>,
    presence_ttl_ms: i64,
    /// Uses waiting for the next group commit, and whether a writer is committing.
    pending_uses: Arc<std::sync::Mutex<(Vec<uses::PendingUse>, bool)>>,
    /// Where the commit loop runs, tracked for shutdown.
    background: Background,
}

impl Cache {
    /// A cache over `index` and `runtime`.
    pub fn new(index: Index, runtime: Arc<dyn ImageRuntime>, clock: Arc<dyn Clock>) -> Self {
        Self {
            index: Arc::new(index),
            runtime,
            clock,
            last_reconcile: AtomicI64::new(0),
            in_use: Default::default(),
            expected: Default::default(),
            uses_seen: tokio::sync::broadcast::channel(USES_SEEN_QUEUE).0,
            evictions_keep: crate::config::DEFAULT_HISTORY_KEEP,
            evictions_pruned_at: AtomicI64::new(0),
            eviction: None,
            metrics: Arc::new(Metrics::default()),
            gc_lock: tokio::sync::Mutex::new(()),
            reserved: Default::default(),
            reserved_disk: Default::default(),
            arrived: Default::default(),
            confirmed: Default::default(),
            presence_ttl_ms: 0,
            pending_uses: Default::default(),
            background: Background::new(),
        }
    }

    /// Runs the cache's own tasks (the group commit) as tracked tasks of `background`.
    pub fn with_background(mut self, background: Background) -> Self {
        self.background = background;
        self
    }

    /// Trusts the runtime's "present" for `ttl` (zero: ask the runtime every time).
    pub fn with_presence_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.presence_ttl_ms = ttl.as_millis() as i64;
        self
    }

    /// Turns eviction on with these settings.
    pub fn with_eviction(mut self, settings: EvictionSettings) -> Self {
        self.eviction = Some(settings);
        self
    }

    /// Counts into these metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Keeps eviction records for `keep` (`ImageCache.History.Keep`); older ones are pruned by
    /// the cache's periodic pass.
    pub fn with_evictions_kept_for(mut self, keep: std::time::Duration) -> Self {
        self.evictions_keep = keep;
        self
    }

    /// Whether eviction is configured.
    pub fn eviction_enabled(&self) -> bool {
        self.eviction.is_some()
    }

    /// Every recorded eviction, oldest first.
    pub async fn evictions(&self) -> Result<Vec<EvictionRecord>, CacheError> {
        Ok(self.off_thread(|idx| idx.evictions()).await?)
    }

    /// Removes the eviction records older than the history keeps (in transactions of at most
    /// 500), at most once per [`PRUNE_EVERY_MS`] however often it is called; returns how many
    /// went (also counted as `cimage_history_pruned_total{kind="eviction"}`).
    pub async fn prune_evictions(&self) -> Result<usize, CacheError> {
        let now = self.clock.now_ms();
        let last = self.evictions_pruned_at.load(Ordering::SeqCst);
        if last != 0 && now - last < PRUNE_EVERY_MS {
            return Ok(0);
        }
        self.evictions_pruned_at.store(now, Ordering::SeqCst);
        let before = now - self.evictions_keep.as_millis().min(i64::MAX as u128) as i64;
        let mut total = 0;
        loop {
            let n = self
                .off_thread(move |idx| idx.prune_evictions(before, 500))
                .await?;
            total += n;
            if n < 500 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            self.metrics.add(
                "cimage_history_pruned_total",
                &[("kind", "eviction")],
                total as u64,
            );
        }
        Ok(total)
    }

    /// Brings the image count and size gauges up to date.
    pub async fn update_gauges(&self) {
        if let Ok(images) = self.list().await {
            self.metrics.set("cimage_images", images.len() as f64);
            self.metrics.set(
                "cimage_image_bytes",
                images.iter().map(|r| r.size).sum::<u64>() as f64,
            );
        }
    }

    /// The half-life of the popularity score, in ms (for ranking the most used images).
    pub fn popularity_half_life_ms(&self) -> i64 {
        self.index.popularity_half_life_ms()
    }

    /// The runtime this cache sits over.
    pub fn runtime(&self) -> &Arc<dyn ImageRuntime> {
        &self.runtime
    }

    /// Runs a blocking index operation off the async workers (redb commits fsync).
    async fn off_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Index) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Store::off_thread(Arc::clone(&self.index), move |idx| f(idx)).await
    }

    /// Makes the index agree with the runtime's image list.
    pub async fn reconcile(&self) -> Result<ReconcileReport, CacheError> {
        let images = self
            .runtime
            .list_images()
            .await
            .map_err(|source| CacheError::Runtime {
                context: "listing images".into(),
                source,
            })?;
        let now = self.clock.now_ms();
        // What the runtime just listed is confirmed; anything else is forgotten.
        self.confirmed.lock().unwrap().clear();
        for img in &images {
            self.remember(img);
        }
        let report = self
            .off_thread(move |idx| idx.reconcile(&images, now))
            .await?;
        self.last_reconcile.store(now, Ordering::SeqCst);
        self.metrics.set(
            "cimage_last_reconcile_timestamp_seconds",
            now as f64 / 1000.0,
        );
        Ok(report)
    }

    /// Unix ms of the last successful reconciliation (0 if none yet).
    pub fn last_reconcile(&self) -> i64 {
        self.last_reconcile.load(Ordering::SeqCst)
    }

    /// The index record of an image id, if any.
    pub async fn record_of(&self, id: &str) -> Result<Option<ImageRecord>, CacheError> {
        let id = id.to_owned();
        Ok(self.off_thread(move |idx| idx.get(&id)).await?)
    }

    /// Images that left the node, by name, with the use history they left behind.
    pub async fn gone(&self) -> Result<Vec<ImageRecord>, CacheError> {
        Ok(self.off_thread(|idx| idx.gone()).await?)
    }

    /// Every indexed image.
    pub async fn list(&self) -> Result<Arc<Vec<ImageRecord>>, CacheError> {
        Ok(self.off_thread(|idx| idx.list()).await?)
    }
}

#[cfg(test)]
mod tests;
