//! The image cache: the runtime's image store is the cache of record, and [`index::Index`] keeps
//! what the runtime does not (first seen, last used, use count, pins, origin). The runtime is
//! asked whenever presence matters; reconciliation brings the index back in line with it at
//! start-up and periodically, so images removed or added behind cimage's back are noticed.

pub mod evict;
mod gc;
mod gone;
pub mod index;
pub mod record;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

pub use evict::{EvictionReason, EvictionSettings, FsUsage, Plan};
pub use gc::GcReport;
pub use index::{Index, IndexSettings, ReconcileReport};
pub use record::{EvictionRecord, ImageRecord, Origin, Use};

use crate::background::Background;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

use crate::clock::Clock;
use crate::reference::{ImageId, ImageRef, InvalidReference};
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
    in_use: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    eviction: Option<EvictionSettings>,
    metrics: Arc<Metrics>,
    gc_lock: tokio::sync::Mutex<()>,
    /// Images the runtime recently confirmed present, by every name (tag, digest reference,
    /// id), with when: warm requests within `presence_ttl_ms` skip the runtime round trip.
    confirmed: std::sync::Mutex<std::collections::HashMap<String, (RuntimeImage, i64)>>,
    presence_ttl_ms: i64,
    /// Uses waiting for the next group commit, and whether a writer is committing.
    pending_uses: Arc<std::sync::Mutex<(Vec<PendingUse>, bool)>>,
    /// Where the commit loop runs, tracked for shutdown.
    background: Background,
}

/// A use waiting to be committed, with where to send the stored record (or the commit's
/// error, shared by every use of the failed batch).
type PendingUse = (
    Use,
    tokio::sync::oneshot::Sender<Result<ImageRecord, Arc<StoreError>>>,
);

impl Cache {
    /// A cache over `index` and `runtime`.
    pub fn new(index: Index, runtime: Arc<dyn ImageRuntime>, clock: Arc<dyn Clock>) -> Self {
        Self {
            index: Arc::new(index),
            runtime,
            clock,
            last_reconcile: AtomicI64::new(0),
            in_use: Default::default(),
            eviction: None,
            metrics: Arc::new(Metrics::default()),
            gc_lock: tokio::sync::Mutex::new(()),
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

    /// Notes that the runtime holds `img` now, under each of its names.
    pub fn remember(&self, img: &RuntimeImage) {
        if self.presence_ttl_ms <= 0 {
            return;
        }
        let now = self.clock.now_ms();
        let mut m = self.confirmed.lock().unwrap();
        for name in img
            .repo_tags
            .iter()
            .chain(img.repo_digests.iter())
            .chain(std::iter::once(&img.id))
        {
            m.insert(name.clone(), (img.clone(), now));
        }
    }

    /// The image under `name` if the runtime confirmed it within the presence TTL.
    pub fn recall(&self, name: &str) -> Option<RuntimeImage> {
        let now = self.clock.now_ms();
        let m = self.confirmed.lock().unwrap();
        let (img, at) = m.get(name)?;
        (now - at <= self.presence_ttl_ms).then(|| img.clone())
    }

    /// Forgets every name of image `id` (it was removed, or turned out to be missing).
    pub fn forget(&self, id: &str) {
        self.confirmed
            .lock()
            .unwrap()
            .retain(|_, (img, _)| img.id != id);
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

    /// The metrics this cache counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether eviction is configured.
    pub fn eviction_enabled(&self) -> bool {
        self.eviction.is_some()
    }

    /// Every recorded eviction, oldest first.
    pub async fn evictions(&self) -> Result<Vec<EvictionRecord>, CacheError> {
        Ok(self.blocking(|idx| idx.evictions()).await?)
    }

    /// Removes the eviction records from before `before` (Unix ms), in transactions of at most
    /// 500; returns how many went.
    pub async fn prune_evictions(&self, before: i64) -> Result<usize, CacheError> {
        let mut total = 0;
        loop {
            let n = self
                .blocking(move |idx| idx.prune_evictions(before, 500))
                .await?;
            total += n;
            if n < 500 {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
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

    /// Marks an image as in use by a running step; eviction never touches it until released.
    pub fn mark_in_use(&self, id: &str) {
        *self
            .in_use
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert(0) += 1;
    }

    /// Releases one in-use mark taken by [`Cache::mark_in_use`].
    pub fn release_in_use(&self, id: &str) {
        let mut m = self.in_use.lock().unwrap();
        if let Some(n) = m.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                m.remove(id);
            }
        }
    }

    /// Whether a running step uses the image.
    pub fn is_in_use(&self, id: &str) -> bool {
        self.in_use.lock().unwrap().contains_key(id)
    }

    /// The runtime this cache sits over.
    pub fn runtime(&self) -> &Arc<dyn ImageRuntime> {
        &self.runtime
    }

    /// Runs a blocking index operation off the async workers (redb commits fsync).
    async fn blocking<T: Send + 'static>(
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
            .blocking(move |idx| idx.reconcile(&images, now))
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

    /// Records one use of an image the runtime holds; durable before it returns. Uses that
    /// arrive while a commit is under way are committed together in the next transaction (group
    /// commit), so a burst of requests costs one or two fsyncs, not one each.
    pub async fn record_use(
        &self,
        image: RuntimeImage,
        origin: Origin,
    ) -> Result<ImageRecord, CacheError> {
        self.record(Use {
            image,
            origin,
            fingerprint: None,
            pulled: false,
            verified: false,
            requester: None,
        })
        .await
    }

    /// The index record of an image id, if any.
    pub async fn record_of(&self, id: &str) -> Result<Option<ImageRecord>, CacheError> {
        let id = id.to_owned();
        Ok(self.blocking(move |idx| idx.get(&id)).await?)
    }

    /// Records one use (with its credential facts); durable before it returns. Uses that arrive
    /// while a commit is under way are committed together in the next transaction.
    pub async fn record(&self, u: Use) -> Result<ImageRecord, CacheError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut p = self.pending_uses.lock().unwrap();
            p.0.push((u, tx));
            !std::mem::replace(&mut p.1, true)
        };
        if lead {
            // The commit loop runs in a task of its own: a request that goes away mid-commit
            // must not strand the others queued behind it.
            let (pending, index, clock) = (
                Arc::clone(&self.pending_uses),
                Arc::clone(&self.index),
                Arc::clone(&self.clock),
            );
            self.background.spawn(async move {
                loop {
                    let batch: Vec<PendingUse> = {
                        let mut p = pending.lock().unwrap();
                        if p.0.is_empty() {
                            p.1 = false;
                            break;
                        }
                        std::mem::take(&mut p.0)
                    };
                    let uses: Vec<Use> = batch.iter().map(|(u, _)| u.clone()).collect();
                    let now = clock.now_ms();
                    let result = Store::off_thread(Arc::clone(&index), move |idx| {
                        idx.record_uses(&uses, now)
                    })
                    .await;
                    match result {
                        Ok(recs) => {
                            for ((_, tx), rec) in batch.into_iter().zip(recs) {
                                let _ = tx.send(Ok(rec));
                            }
                        }
                        Err(e) => {
                            let e = Arc::new(e);
                            for (_, tx) in batch {
                                let _ = tx.send(Err(Arc::clone(&e)));
                            }
                        }
                    }
                }
            });
        }
        match rx.await {
            Ok(Ok(rec)) => Ok(rec),
            Ok(Err(e)) => Err(CacheError::Store(StoreError::new("recording a use", e))),
            Err(_) => Err(CacheError::Store(StoreError::new(
                "recording a use",
                "the commit task ended without an answer",
            ))),
        }
    }

    /// Images that left the node, by name, with the use history they left behind.
    pub async fn gone(&self) -> Result<Vec<ImageRecord>, CacheError> {
        Ok(self.blocking(|idx| idx.gone()).await?)
    }

    /// Every indexed image.
    pub async fn list(&self) -> Result<Arc<Vec<ImageRecord>>, CacheError> {
        Ok(self.blocking(|idx| idx.list()).await?)
    }

    /// Finds an image by reference (`app:1`, `…@sha256:…`), full id (`sha256:…`) or an id prefix
    /// of at least 6 hex digits. The runtime is asked, so a stale index entry is never returned;
    /// the index record is created on the spot for an image the runtime gained behind our back.
    pub async fn find(&self, image: &str) -> Result<(RuntimeImage, ImageRecord), CacheError> {
        let key = self.lookup_key(image).await?;
        let found =
            self.runtime
                .image_status(&key)
                .await
                .map_err(|source| CacheError::Runtime {
                    context: format!("looking up {image}"),
                    source,
                })?;
        let Some(rt) = found else {
            return Err(CacheError::NotFound {
                image: image.to_owned(),
            });
        };
        let id = rt.id.clone();
        let rec = match self.blocking(move |idx| idx.get(&id)).await? {
            Some(rec) => rec,
            None => {
                let now = self.clock.now_ms();
                let (rt2, now2) = (rt.clone(), now);
                // Adopt with a zero use count: set_pinned(false) on an unknown image creates it.
                self.blocking(move |idx| idx.set_pinned(&rt2, false, now2))
                    .await?
            }
        };
        Ok((rt, rec))
    }

    async fn lookup_key(&self, image: &str) -> Result<String, CacheError> {
        match ImageId::parse(image) {
            Some(ImageId::Full(id)) => {
                // An image id (one lookup), or else the manifest digest `pull` reports (a
                // scan of the index, only for what is not an id).
                let key = id.to_owned();
                if self.blocking(move |idx| idx.get(&key)).await?.is_some() {
                    return Ok(id.to_owned());
                }
                let suffix = format!("@{id}");
                let by_digest = self
                    .list()
                    .await?
                    .iter()
                    .find(|r| r.digests.iter().any(|d| d.ends_with(&suffix)))
                    .map(|r| r.id.clone());
                return Ok(by_digest.unwrap_or_else(|| id.to_owned()));
            }
            Some(ImageId::Prefix(hex)) => {
                let prefix = format!("sha256:{hex}");
                let matches: Vec<String> = self
                    .list()
                    .await?
                    .iter()
                    .filter(|r| r.id.starts_with(&prefix))
                    .map(|r| r.id.clone())
                    .collect();
                match matches.len() {
                    1 => return Ok(matches[0].clone()),
                    // Not an id here: perhaps a repository named in hex.
                    0 => {}
                    count => {
                        return Err(CacheError::Ambiguous {
                            prefix: image.to_owned(),
                            count,
                        })
                    }
                }
            }
            None => {}
        }
        Ok(ImageRef::parse(image)?.to_string())
    }

    /// Pins or unpins an image; pinned images are never evicted.
    pub async fn set_pinned(&self, image: &str, pinned: bool) -> Result<ImageRecord, CacheError> {
        let (rt, _) = self.find(image).await?;
        let now = self.clock.now_ms();
        Ok(self
            .blocking(move |idx| idx.set_pinned(&rt, pinned, now))
            .await?)
    }

    /// Takes an image the runtime no longer holds (removed by `remove` or through the CRI
    /// endpoint) out of the index and the presence cache, keeping its popularity by name.
    pub async fn removed(&self, id: &str) -> Result<(), CacheError> {
        self.forget(id);
        let id = id.to_owned();
        let now = self.clock.now_ms();
        self.blocking(move |idx| idx.remove(&id, now)).await?;
        Ok(())
    }

    /// Removes an image from the runtime, then from the index. A crash between the two leaves a
    /// stale entry that the next reconciliation removes.
    pub async fn remove(&self, image: &str) -> Result<ImageRecord, CacheError> {
        let (rt, rec) = self.find(image).await?;
        self.runtime
            .remove_image(&rt.id)
            .await
            .map_err(|source| CacheError::Runtime {
                context: format!("removing {image}"),
                source,
            })?;
        self.removed(&rt.id).await?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::runtime::fake::FakeRuntime;

    const ID: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    async fn setup() -> (tempfile::TempDir, Arc<FakeRuntime>, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::default());
        rt.offer("127.0.0.1:5000/app:1", ID, "sha256:d1", 100);
        rt.pull_image("127.0.0.1:5000/app:1", None).await.unwrap();
        let idx = Index::open(&Store::open(&dir.path().join("i.redb")).unwrap()).unwrap();
        let cache = Cache::new(idx, rt.clone(), Arc::new(ManualClock::new(1000)));
        (dir, rt, cache)
    }

    #[tokio::test]
    async fn find_by_name_id_and_prefix() {
        let (_d, _rt, cache) = setup().await;
        for key in ["127.0.0.1:5000/app:1", ID, "aaaaaaaaaaaa"] {
            let (rt, rec) = cache.find(key).await.unwrap();
            assert_eq!((rt.id.as_str(), rec.origin), (ID, Origin::Runtime), "{key}");
        }
        assert!(matches!(
            cache.find("127.0.0.1:5000/app:2").await,
            Err(CacheError::NotFound { .. })
        ));
        assert!(matches!(
            cache.find("Bad Ref").await,
            Err(CacheError::InvalidReference(_))
        ));
    }

    #[tokio::test]
    async fn remove_takes_it_out_of_runtime_and_index() {
        let (_d, rt, cache) = setup().await;
        cache
            .set_pinned("127.0.0.1:5000/app:1", true)
            .await
            .unwrap();
        let rec = cache.remove("127.0.0.1:5000/app:1").await.unwrap();
        assert!(rec.pinned);
        assert!(rt.images.lock().unwrap().is_empty());
        assert!(cache.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn images_of_containers_made_by_others_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::default());
        const OTHER: &str =
            "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        rt.offer("127.0.0.1:5000/app:1", ID, "sha256:d1", 100);
        rt.offer("127.0.0.1:5000/other:1", OTHER, "sha256:d2", 100);
        for r in ["127.0.0.1:5000/app:1", "127.0.0.1:5000/other:1"] {
            rt.pull_image(r, None).await.unwrap();
        }
        let idx = Index::open(&Store::open(&dir.path().join("i.redb")).unwrap()).unwrap();
        let cache = Cache::new(idx, rt.clone(), Arc::new(ManualClock::new(1000))).with_eviction(
            EvictionSettings {
                max_bytes: Some(1),
                min_age: std::time::Duration::ZERO,
                path: Some(dir.path().to_owned()),
                ..Default::default()
            },
        );
        // A container kubelet made from `app`, known to the runtime only.
        rt.container_images.lock().unwrap().push(ID.to_owned());
        // While the runtime cannot list its containers, nothing goes.
        rt.containers_unknown
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let report = cache.gc(false).await.unwrap();
        assert!(report.plan.evict.is_empty(), "{:?}", report.plan);
        rt.containers_unknown
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let report = cache.gc(false).await.unwrap();
        let gone: Vec<&str> = report
            .plan
            .evict
            .iter()
            .map(|(r, _)| r.id.as_str())
            .collect();
        assert_eq!(gone, [OTHER]);
        let kept = report
            .plan
            .protected
            .iter()
            .find(|(r, _)| r.id == ID)
            .unwrap();
        assert!(kept.1.contains("container"), "{}", kept.1);
        assert_eq!(rt.images.lock().unwrap().len(), 1);
        // Counted with its bytes, and the disk's use as df sees it kept as a gauge.
        let m = cache.metrics();
        assert_eq!(m.counter("cimage_evicted_bytes_total", &[]), 100);
        assert_eq!(
            m.counter("cimage_evictions_total", &[("reason", "max_bytes")]),
            1
        );
        let ratio = m.gauge("cimage_image_fs_used_ratio", &[]);
        assert!(ratio > 0.0 && ratio <= 1.0, "{ratio}");
    }

    #[tokio::test]
    async fn reconcile_adopts_and_forgets() {
        let (_d, rt, cache) = setup().await;
        let r = cache.reconcile().await.unwrap();
        assert_eq!(r.added, 1);
        assert_eq!(cache.last_reconcile(), 1000);
        rt.images.lock().unwrap().clear();
        assert_eq!(cache.reconcile().await.unwrap().removed, 1);
    }
}
