//! Carrying eviction out: reconcile, plan with [`super::evict::plan_with`] over what is
//! protected (pins, in-use images, the runtime's sandbox image), remove from the runtime, record
//! each eviction; and making room for a cold pull, counting the bytes that pulls already in
//! flight were given room for ([`Reservation`]): before it, for a size that was checked, or as
//! its bytes really arrive, for one that cannot be trusted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{info, warn};

use super::evict::{self, FsUsage, Incoming, Plan};
use super::{Cache, CacheError, EvictionSettings, ImageRecord};

/// How a gc runs.
struct Gc {
    /// Plan only.
    dry_run: bool,
    /// Bytes of pulls to make room for.
    incoming: Incoming,
    /// Reconcile with the runtime first.
    reconcile: bool,
    /// Carry the plan out only if it meets the targets.
    all_or_nothing: bool,
}

/// What a gc did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// The plan.
    pub plan: Plan,
    /// Image filesystem usage before.
    pub fs: Option<FsUsage>,
    /// True when nothing was removed: a dry run, or a plan refused for falling short.
    pub dry_run: bool,
}

/// Room made for a pull in flight: its bytes count as used by later pulls' checks until it
/// drops (when the pull ends, its image is in the runtime and counts as itself).
#[derive(Debug)]
pub struct Reservation {
    /// Its bytes against `MaxBytes`: room set aside (`reserved`), or bytes arrived (`arrived`).
    index: Counted,
    /// Its bytes still to land on the image filesystem (`reserved_disk`), held until it drops;
    /// none for room made as bytes arrive (they are on the filesystem when counted).
    _disk: Option<Counted>,
}

/// Bytes counted in one of the cache's counters while held.
#[derive(Debug)]
struct Counted {
    counter: Arc<AtomicU64>,
    bytes: AtomicU64,
}

impl Counted {
    fn new(counter: &Arc<AtomicU64>, bytes: u64) -> Self {
        counter.fetch_add(bytes, Ordering::SeqCst);
        Self {
            counter: Arc::clone(counter),
            bytes: AtomicU64::new(bytes),
        }
    }

    /// Counts `bytes`, if more than now; the growth.
    fn grow_to(&self, bytes: u64) -> u64 {
        let before = self.bytes.fetch_max(bytes, Ordering::SeqCst);
        let grown = bytes.saturating_sub(before);
        self.counter.fetch_add(grown, Ordering::SeqCst);
        grown
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counter
            .fetch_sub(self.bytes.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Reservation {
    /// Bytes this pull holds room for, as `MaxBytes` counts them.
    pub fn bytes(&self) -> u64 {
        self.index.bytes.load(Ordering::SeqCst)
    }
}

impl Cache {
    /// Bytes held now by pulls in flight that were given room.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::SeqCst)
    }

    /// Bytes that have arrived for pulls whose room grows as they arrive.
    pub fn arrived_bytes(&self) -> u64 {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Usage of the image filesystem as `df` counts it (also kept as the gauge
    /// `cimage_image_fs_used_ratio`); `None` when it cannot be read.
    pub async fn image_fs_usage(&self) -> Option<FsUsage> {
        let s = self.eviction.clone().unwrap_or_default();
        self.image_fs(&s).await
    }

    /// The eviction watermarks (`HighPercent`, `LowPercent`) when eviction is on.
    pub fn watermarks(&self) -> Option<(f64, f64)> {
        self.eviction
            .as_ref()
            .map(|e| (e.high_percent, e.low_percent))
    }

    async fn image_fs(&self, s: &EvictionSettings) -> Option<FsUsage> {
        let path = match &s.path {
            Some(p) => p.clone(),
            None => {
                let fs = self.runtime.image_fs_info().await.ok()?;
                std::path::PathBuf::from(&fs.first()?.mountpoint)
            }
        };
        // statvfs may block on a slow or hung filesystem: never on an async worker.
        let at = path.clone();
        let usage = tokio::task::spawn_blocking(move || evict::fs_usage(&at))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match usage {
            Ok(u) => {
                self.metrics
                    .set("cimage_image_fs_used_ratio", u.percent(u.used) / 100.0);
                Some(u)
            }
            Err(e) => {
                warn!(
                    "cannot read usage of the image filesystem at {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// Reconciles with the runtime, plans an eviction and, unless `dry_run`, carries it out:
    /// each image is removed from the runtime, then forgotten with its eviction recorded in one
    /// transaction. Without eviction settings the plan is empty.
    pub async fn gc(&self, dry_run: bool) -> Result<GcReport, CacheError> {
        self.gc_with(Gc {
            dry_run,
            incoming: Incoming::default(),
            reconcile: true,
            all_or_nothing: false,
        })
        .await
    }

    /// The periodic eviction pass, right after a reconciliation (so it does not reconcile
    /// again); eviction records past the history's keep go too.
    pub async fn gc_reconciled(&self) -> Result<GcReport, CacheError> {
        if let Err(e) = self.prune_evictions().await {
            warn!("pruning eviction records failed: {e}");
        }
        self.gc_with(Gc {
            dry_run: false,
            incoming: Incoming::default(),
            reconcile: false,
            all_or_nothing: false,
        })
        .await
    }

    async fn gc_with(&self, how: Gc) -> Result<GcReport, CacheError> {
        let Some(settings) = self.eviction.clone() else {
            return Ok(GcReport {
                dry_run: how.dry_run,
                ..Default::default()
            });
        };
        let _one_at_a_time = self.gc_lock.lock().await;
        self.gc_locked(how, settings).await
    }

    /// A gc with the gc lock held by the caller.
    async fn gc_locked(&self, how: Gc, settings: EvictionSettings) -> Result<GcReport, CacheError> {
        if how.reconcile {
            // Plan on what the runtime really holds.
            if let Err(e) = self.reconcile().await {
                warn!("gc without a fresh reconciliation: {e}");
            }
        }
        let images = self.list().await?;
        let sandbox = self
            .runtime
            .sandbox_image()
            .await
            .ok()
            .flatten()
            .and_then(|s| {
                crate::reference::ImageRef::parse(&s)
                    .ok()
                    .map(|r| r.to_string())
                    .or(Some(s))
            });
        // Whoever made them (cimage, kubelet, Craned, crictl), the runtime's containers keep
        // their images; when it cannot say which, nothing is evicted this time.
        let containers = match self.runtime.images_in_use().await {
            Ok(images) => Some(images),
            Err(e) => {
                warn!("cannot list the runtime's containers, so no image is evicted now: {e}");
                None
            }
        };
        let fs = self.image_fs(&settings).await;
        let protect = |r: &ImageRecord| {
            if r.pinned {
                Some("pinned".to_string())
            } else if self.is_in_use(&r.id) {
                Some("in use by a running step".to_string())
            } else if self.is_expected(&r.id) {
                Some("expected by a job that has not started".to_string())
            } else if containers
                .as_ref()
                .is_none_or(|c| c.iter().any(|i| *i == r.id || r.names.contains(i)))
            {
                Some(match containers {
                    Some(_) => "used by a container the runtime knows".to_string(),
                    None => "the runtime's containers are unknown".to_string(),
                })
            } else if sandbox
                .as_ref()
                .is_some_and(|s| r.names.contains(s) || &r.id == s)
            {
                Some("the runtime's sandbox image".to_string())
            } else {
                None
            }
        };
        let plan = evict::plan_with(
            &images,
            protect,
            self.clock.now_ms(),
            fs,
            &settings,
            how.incoming,
        );
        let refuse = how.all_or_nothing && plan.shortfall.is_some();
        if !how.dry_run && !refuse {
            for (rec, reason) in &plan.evict {
                if let Err(e) = self.runtime.remove_image(&rec.id).await {
                    warn!(image = %rec.id, "eviction failed: {e}");
                    continue;
                }
                self.forget_presence(&rec.id);
                let (r, now) = (rec.clone(), self.clock.now_ms());
                let why = *reason;
                self.off_thread(move |idx| idx.record_eviction(&r, why, now))
                    .await?;
                self.metrics
                    .inc("cimage_evictions_total", &[("reason", reason.as_str())]);
                self.metrics
                    .add("cimage_evicted_bytes_total", &[], rec.size);
                info!(image = %rec.id, names = ?rec.names, size = rec.size, reason = reason.as_str(), "image evicted");
            }
        }
        Ok(GcReport {
            plan,
            fs,
            dry_run: how.dry_run || refuse,
        })
    }

    /// Makes room for an incoming pull of `bytes`, counting the bytes of pulls in flight that
    /// were given room before it (and those that arrived for pulls whose room grows): evicts
    /// what the rules allow, or fails without evicting anything when the target cannot be met.
    /// The room is held until the returned reservation drops (the pull's end). Checks run one
    /// at a time, so concurrent pulls cannot each find the same free room. `bytes` must be what
    /// the pull really brings (its blobs' checked sizes, not a manifest's word).
    pub async fn make_room(&self, bytes: u64) -> Result<Reservation, CacheError> {
        self.make_room_for(Incoming {
            index: bytes,
            disk: bytes,
        })
        .await
    }

    /// [`Cache::make_room`] for a pull that adds `pull.index` bytes to the indexed images'
    /// total (its blobs, each once, held or not) and `pull.disk` to the image filesystem (the
    /// blobs the runtime does not hold yet).
    pub async fn make_room_for(&self, pull: Incoming) -> Result<Reservation, CacheError> {
        let reserve = || Reservation {
            index: Counted::new(&self.reserved, pull.index),
            _disk: Some(Counted::new(&self.reserved_disk, pull.disk)),
        };
        if self.eviction.is_none() {
            return Ok(reserve());
        }
        let _one_at_a_time = self.gc_lock.lock().await;
        let incoming = Incoming {
            index: pull.index + self.reserved_bytes() + self.arrived_bytes(),
            disk: pull.disk + self.reserved_disk.load(Ordering::SeqCst),
        };
        self.fit_locked(incoming, pull.index).await?;
        Ok(reserve())
    }

    /// Brings the images back within the limits after a pull has been indexed, evicting what
    /// the rules need (or nothing, when the target cannot be met): a pull whose room grew as
    /// its bytes arrived may have shown few of them (the runtime's downloads are looked at
    /// twice a second, and a fast pull is done between two looks), so what it brought is
    /// counted here, as the index counts it now.
    pub async fn settle(&self) -> Result<(), CacheError> {
        self.make_room_for(Incoming::default()).await.map(drop)
    }

    /// Room for a pull whose size cannot be trusted (a manifest the requester may have
    /// written): nothing is set aside now; [`Cache::grow_room`] makes room as its bytes really
    /// arrive, so the pull can make no more go than what it brings (plus the watermarks'
    /// margin, once the filesystem passes `HighPercent`).
    pub fn room_as_arrived(&self) -> Reservation {
        Reservation {
            index: Counted::new(&self.arrived, 0),
            _disk: None,
        }
    }

    /// Counts `arrived` bytes (in all) for a pull's [`Cache::room_as_arrived`] and evicts what
    /// the rules need for them, or fails without evicting anything when the target cannot be
    /// met. The bytes arrived are on the image filesystem already: they count against
    /// `MaxBytes`, and the filesystem's own usage shows them.
    pub async fn grow_room(&self, room: &Reservation, arrived: u64) -> Result<(), CacheError> {
        if room.index.grow_to(arrived) == 0 || self.eviction.is_none() {
            return Ok(());
        }
        let _one_at_a_time = self.gc_lock.lock().await;
        let incoming = Incoming {
            index: self.reserved_bytes() + self.arrived_bytes(),
            disk: self.reserved_disk.load(Ordering::SeqCst),
        };
        self.fit_locked(incoming, arrived).await
    }

    /// Room for a pull of `pull` bytes if it fits as things are, evicting nothing; `None`
    /// when it would need an eviction that the rules allow (the caller then makes room only
    /// as the bytes really arrive); `NoRoom` when even evicting everything the rules allow
    /// would not make room for it. A claimed size may so refuse a pull, but never evicts.
    pub async fn room_if_it_fits(&self, pull: Incoming) -> Result<Option<Reservation>, CacheError> {
        let reserve = || Reservation {
            index: Counted::new(&self.reserved, pull.index),
            _disk: Some(Counted::new(&self.reserved_disk, pull.disk)),
        };
        let Some(settings) = self.eviction.clone() else {
            return Ok(Some(reserve()));
        };
        let _one_at_a_time = self.gc_lock.lock().await;
        let incoming = Incoming {
            index: pull.index + self.reserved_bytes() + self.arrived_bytes(),
            disk: pull.disk + self.reserved_disk.load(Ordering::SeqCst),
        };
        if self.fits_locked(incoming, &settings).await? {
            return Ok(Some(reserve()));
        }
        match self.plan_room_locked(incoming, settings, true).await? {
            Some(reason) => Err(CacheError::NoRoom {
                bytes: pull.index,
                reason,
            }),
            None => Ok(None),
        }
    }

    /// With the gc lock held: one all-or-nothing plan that makes room for `incoming`, carried
    /// out unless `dry_run`; what it falls short by when it cannot meet the target.
    async fn plan_room_locked(
        &self,
        incoming: Incoming,
        settings: EvictionSettings,
        dry_run: bool,
    ) -> Result<Option<String>, CacheError> {
        let gc = Gc {
            dry_run,
            incoming,
            reconcile: true,
            all_or_nothing: true,
        };
        Ok(self.gc_locked(gc, settings).await?.plan.shortfall)
    }

    /// With the gc lock held: whether `incoming` is within `MaxBytes` and `HighPercent` as
    /// things are (cheap: the listing and a statvfs; a plan reconciles with the runtime).
    async fn fits_locked(
        &self,
        incoming: Incoming,
        settings: &EvictionSettings,
    ) -> Result<bool, CacheError> {
        let over_bytes = match settings.max_bytes {
            Some(max) => {
                let indexed: u64 = self.list().await?.iter().map(|r| r.counted_size()).sum();
                indexed + incoming.index > max
            }
            None => false,
        };
        let over_fs = match self.image_fs(settings).await {
            Some(fs) => fs.percent(fs.used + incoming.disk) > settings.high_percent,
            None => false,
        };
        Ok(!over_bytes && !over_fs)
    }

    /// With the gc lock held: whether `incoming` fits, and if not, one plan carried out only if
    /// it meets the target (`bytes` names the pull's size in the error).
    async fn fit_locked(&self, incoming: Incoming, bytes: u64) -> Result<(), CacheError> {
        let Some(settings) = self.eviction.clone() else {
            return Ok(());
        };
        // Most pulls are nowhere near a limit: check that cheaply before planning.
        if self.fits_locked(incoming, &settings).await? {
            return Ok(());
        }
        match self.plan_room_locked(incoming, settings, false).await? {
            Some(reason) => Err(CacheError::NoRoom { bytes, reason }),
            None => Ok(()),
        }
    }
}
