//! The durable index over the runtime's images, in redb.
//!
//! Two tables of the [`Store`]: `images` (runtime image id → record) and `evictions` (time-id →
//! what went and why). Every change is one write transaction committed before the caller is
//! answered, so a crash at any point leaves either the old or the new record, never a torn one.
//! Whatever the index believes about presence is repaired by reconciliation with the runtime.
//! The records themselves are defined in `record.rs`; the memory of images that left, which
//! every removal here feeds, in `gone.rs`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::evict::EvictionReason;
use super::gone::{self, GONE};
use super::record::{EvictionRecord, ImageRecord, Origin, Use, MAX_FINGERPRINTS, MAX_GRANTED_UIDS};
use crate::config;
use crate::runtime::RuntimeImage;
use crate::store::{JsonTable, Store, StoreError};

const IMAGES: JsonTable<ImageRecord> = JsonTable::new("images");
const EVICTIONS: JsonTable<EvictionRecord> = JsonTable::new("evictions");

/// The meta key naming how the fingerprints in the records were made.
const FINGERPRINT_SCHEME_KEY: &str = "fingerprint_scheme";
/// Argon2id keyed with the node key (see [`crate::credentials::Fingerprinter`]).
const FINGERPRINT_SCHEME: &str = "argon2id-node-key-v1";

/// What a reconciliation changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Images found in the runtime that the index did not know.
    pub added: usize,
    /// Index entries whose image is gone from the runtime.
    pub removed: usize,
    /// Index entries whose names, digests or size changed.
    pub updated: usize,
}

/// How the index ranks images and how long it remembers those that left
/// (`ImageCache.Prewarm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexSettings {
    /// Half-life of the decayed use counts that rank images.
    pub popularity_half_life: Duration,
    /// How long the name of an image that left the node is remembered after its last use.
    pub forget_absent_after: Duration,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            popularity_half_life: config::DEFAULT_POPULARITY_HALF_LIFE,
            forget_absent_after: config::DEFAULT_FORGET_ABSENT_AFTER,
        }
    }
}

/// The index of images, over the daemon's store.
pub struct Index {
    store: Store,
    half_life_ms: i64,
    forget_after_ms: i64,
    /// The last full listing, with the store's write count it was read at: a node's index can
    /// hold ten thousand images, and listings (status, eviction checks, `cimage images`) come
    /// far more often than the index changes between them.
    listed: std::sync::Mutex<Option<(u64, std::sync::Arc<Vec<ImageRecord>>)>>,
}

/// A duration in ms, as the records' times are kept.
fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Index {
    /// The index in `store` with the default settings (its tables are created if missing).
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Self::open_with(store, IndexSettings::default())
    }

    /// The index in `store` with these settings (its tables are created if missing).
    pub fn open_with(store: &Store, settings: IndexSettings) -> Result<Self, StoreError> {
        store.ensure_tables(&[IMAGES])?;
        store.ensure_tables(&[EVICTIONS])?;
        store.ensure_tables(&[GONE])?;
        // Fingerprints of an older scheme (salted SHA-256 with the salt in this file) are
        // dropped, in one transaction: the images stay private and their users prove access
        // again with a registry check on next use.
        store.write("upgrading credential fingerprints", |w| {
            if w.meta(FINGERPRINT_SCHEME_KEY)?.as_deref() == Some(FINGERPRINT_SCHEME) {
                return Ok(());
            }
            for (id, mut rec) in w.all(IMAGES)? {
                if !rec.fingerprints.is_empty() {
                    rec.fingerprints.clear();
                    w.put(IMAGES, &id, &rec)?;
                }
            }
            w.set_meta(FINGERPRINT_SCHEME_KEY, FINGERPRINT_SCHEME)
        })?;
        Ok(Self {
            store: store.clone(),
            half_life_ms: millis(settings.popularity_half_life),
            forget_after_ms: millis(settings.forget_absent_after),
            listed: std::sync::Mutex::new(None),
        })
    }

    /// Images that left the node, by name, with the history they left (see `gone`).
    pub fn gone(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.store.all(GONE)
    }

    /// The half-life of the popularity score, in ms.
    pub fn popularity_half_life_ms(&self) -> i64 {
        self.half_life_ms
    }

    /// The record for an image id.
    pub fn get(&self, id: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.store.get(IMAGES, id)
    }

    /// Every record, ordered by image id (shared: read again only after a write).
    pub fn list(&self) -> Result<std::sync::Arc<Vec<ImageRecord>>, StoreError> {
        // Read before the snapshot: a write committed meanwhile only makes the next call reread.
        let writes = self.store.writes();
        if let Some((at, v)) = self.listed.lock().unwrap().as_ref() {
            if *at == writes {
                return Ok(std::sync::Arc::clone(v));
            }
        }
        let v = std::sync::Arc::new(self.store.all(IMAGES)?);
        *self.listed.lock().unwrap() = Some((writes, std::sync::Arc::clone(&v)));
        Ok(v)
    }

    /// Applies `f` to the record of `id` inside one write transaction. `f` gets the current record
    /// (if any) and returns the new one (or `None` to delete). Returns what was stored.
    fn update(
        &self,
        id: &str,
        what: &str,
        f: impl FnOnce(Option<ImageRecord>) -> Option<ImageRecord>,
    ) -> Result<Option<ImageRecord>, StoreError> {
        self.store.write(&format!("{what} {id}"), |w| {
            let next = f(w.get(IMAGES, id)?);
            match &next {
                Some(rec) => w.put(IMAGES, id, rec)?,
                None => {
                    w.remove(IMAGES, id)?;
                }
            }
            Ok(next)
        })
    }

    /// Records one use of an image the runtime holds: creates the record if needed, refreshes its
    /// names, digests and size from the runtime, bumps the use count, last-used time and
    /// popularity (pre-warm pulls only create or refresh the record).
    pub fn record_use(
        &self,
        img: &RuntimeImage,
        origin: Origin,
        now: i64,
    ) -> Result<ImageRecord, StoreError> {
        let u = Use {
            image: img.clone(),
            origin,
            fingerprint: None,
            pulled: false,
            verified: false,
            requester: None,
            measured: None,
        };
        let mut recs = self.record_uses(&[u], now)?;
        Ok(recs.pop().expect("one use, one record"))
    }

    /// Records several uses in one write transaction (a group commit): one fsync however many
    /// requests finished together. Returns the stored records in the same order.
    pub fn record_uses(&self, uses: &[Use], now: i64) -> Result<Vec<ImageRecord>, StoreError> {
        let half_life = self.popularity_half_life_ms();
        self.store
            .write(&format!("recording {} uses", uses.len()), |w| {
                let mut out = Vec::with_capacity(uses.len());
                for u in uses {
                    let img = &u.image;
                    let current = w.get(IMAGES, &img.id)?;
                    let fresh = current.is_none();
                    let mut rec = match current {
                        Some(rec) => rec,
                        None => {
                            // Back on the node: it takes up the history its names left.
                            let mut rec = ImageRecord::fresh(img, u.origin, now);
                            gone::revive(w, &mut rec, now, half_life)?;
                            rec
                        }
                    };
                    rec.refresh_from(img);
                    if let Some(m) = u.measured.filter(|_| u.pulled) {
                        rec.measured_size = Some(m);
                    }
                    // Pulls ahead of need (pre-warm, expectations) are not uses by a job.
                    if !matches!(u.origin, Origin::Prewarm | Origin::Expected) {
                        rec.use_count += 1;
                        rec.last_used = now;
                        rec.popularity = rec.popularity_now(now, half_life) + 1.0;
                        rec.popularity_at = now;
                    }
                    if let Some(fp) = &u.fingerprint {
                        // An image that arrives with credentials is private from then on.
                        if fresh && u.pulled {
                            rec.credentialed = true;
                        }
                        if let Some(uid) = u.requester.filter(|_| u.pulled || u.verified) {
                            if !rec.granted_uids.contains(&uid) {
                                rec.granted_uids.push(uid);
                                let excess =
                                    rec.granted_uids.len().saturating_sub(MAX_GRANTED_UIDS);
                                rec.granted_uids.drain(..excess);
                            }
                        }
                        if (u.pulled || u.verified) && !rec.fingerprints.contains(fp) {
                            rec.fingerprints.push(fp.clone());
                            let excess = rec.fingerprints.len().saturating_sub(MAX_FINGERPRINTS);
                            rec.fingerprints.drain(..excess);
                        }
                    }
                    w.put(IMAGES, &img.id, &rec)?;
                    out.push(rec);
                }
                Ok(out)
            })
    }

    /// Pins or unpins an image the runtime holds (creating its record if needed).
    pub fn set_pinned(
        &self,
        img: &RuntimeImage,
        pinned: bool,
        now: i64,
    ) -> Result<ImageRecord, StoreError> {
        let rec = self.update(&img.id, "pinning", |cur| {
            let mut rec = cur.unwrap_or_else(|| ImageRecord::fresh(img, Origin::Runtime, now));
            rec.refresh_from(img);
            rec.pinned = pinned;
            Some(rec)
        })?;
        Ok(rec.expect("set_pinned always stores a record"))
    }

    /// Forgets an image (after it was removed from the runtime).
    pub fn remove(&self, id: &str, now: i64) -> Result<Option<ImageRecord>, StoreError> {
        let half_life = self.popularity_half_life_ms();
        self.store.write(&format!("removing {id}"), |w| {
            let old = w.get(IMAGES, id)?;
            if let Some(rec) = &old {
                w.remove(IMAGES, id)?;
                gone::remember(w, rec, now, half_life)?;
            }
            Ok(old)
        })
    }

    /// Forgets an evicted image and records the eviction, in one transaction.
    pub fn record_eviction(
        &self,
        rec: &ImageRecord,
        reason: EvictionReason,
        now: i64,
    ) -> Result<(), StoreError> {
        let ev = EvictionRecord {
            time: now,
            id: rec.id.clone(),
            names: rec.names.clone(),
            size: rec.size,
            reason,
        };
        self.store
            .write(&format!("recording eviction of {}", rec.id), |w| {
                // The stored record: its uses may have moved on since the plan was made.
                let stored = w.get(IMAGES, &rec.id)?.unwrap_or_else(|| rec.clone());
                w.remove(IMAGES, &rec.id)?;
                gone::remember(w, &stored, now, self.popularity_half_life_ms())?;
                w.put(EVICTIONS, &format!("{now:020}-{}", rec.id), &ev)
            })
    }

    /// Removes up to `limit` eviction records from before `before` (Unix ms), oldest first, in
    /// one transaction; returns how many went.
    pub fn prune_evictions(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let bound = format!("{before:020}");
        self.store.write("pruning eviction records", |w| {
            let old: Vec<String> = w
                .keys_with_prefix(EVICTIONS, "")?
                .into_iter()
                .take_while(|k| k.as_str() < bound.as_str())
                .take(limit)
                .collect();
            for k in &old {
                w.remove(EVICTIONS, k)?;
            }
            Ok(old.len())
        })
    }

    /// Every recorded eviction, oldest first.
    pub fn evictions(&self) -> Result<Vec<EvictionRecord>, StoreError> {
        self.store.all(EVICTIONS)
    }

    /// Makes the index agree with the runtime's image list in one write transaction: unknown
    /// images are added (origin `runtime`), vanished ones removed, names/digests/size refreshed.
    /// Usage counts and pins of images still present are kept.
    pub fn reconcile(
        &self,
        runtime: &[RuntimeImage],
        now: i64,
    ) -> Result<ReconcileReport, StoreError> {
        self.store.write("reconciling with the runtime", |w| {
            let mut report = ReconcileReport::default();
            let existing: HashMap<String, ImageRecord> = w.all(IMAGES)?.into_iter().collect();
            let live: HashSet<&str> = runtime.iter().map(|i| i.id.as_str()).collect();
            let half_life = self.popularity_half_life_ms();
            for (id, rec) in existing
                .iter()
                .filter(|(id, _)| !live.contains(id.as_str()))
            {
                w.remove(IMAGES, id)?;
                gone::remember(w, rec, now, half_life)?;
                report.removed += 1;
            }
            for img in runtime {
                let next = match existing.get(&img.id) {
                    Some(rec) => {
                        let mut next = rec.clone();
                        next.refresh_from(img);
                        if &next == rec {
                            continue;
                        }
                        report.updated += 1;
                        next
                    }
                    None => {
                        report.added += 1;
                        let mut rec = ImageRecord::fresh(img, Origin::Runtime, now);
                        gone::revive(w, &mut rec, now, half_life)?;
                        rec
                    }
                };
                w.put(IMAGES, &img.id, &next)?;
            }
            gone::prune(w, now, half_life, self.forget_after_ms)?;
            Ok(report)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, tag: &str, size: u64) -> RuntimeImage {
        RuntimeImage {
            id: id.into(),
            repo_tags: vec![tag.into()],
            repo_digests: vec![format!("{}@sha256:{id}", tag.split(':').next().unwrap())],
            size,
            pinned: false,
        }
    }

    fn temp_index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let idx = open_at(&dir.path().join("index.redb"));
        (dir, idx)
    }

    fn open_at(path: &std::path::Path) -> Index {
        Index::open(&Store::open(path).unwrap()).unwrap()
    }

    #[test]
    fn a_listing_is_shared_until_the_store_changes() {
        let (_dir, idx) = temp_index();
        idx.record_use(&img("a", "r/a:1", 1), Origin::Pull, 100)
            .unwrap();
        let first = idx.list().unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &idx.list().unwrap()));
        idx.record_use(&img("b", "r/b:1", 1), Origin::Pull, 200)
            .unwrap();
        let second = idx.list().unwrap();
        assert!(!std::sync::Arc::ptr_eq(&first, &second));
        assert_eq!(second.len(), 2);
        assert_eq!(first.len(), 1);
    }

    #[test]
    fn old_eviction_records_are_pruned_oldest_first_in_bounded_batches() {
        let (_dir, idx) = temp_index();
        for (t, id) in [(100, "a"), (200, "b"), (300, "c")] {
            let rec = idx
                .record_use(&img(id, &format!("r/{id}:1"), 1), Origin::Pull, t)
                .unwrap();
            idx.record_eviction(&rec, super::EvictionReason::Unused, t)
                .unwrap();
        }
        assert_eq!(idx.prune_evictions(250, 1).unwrap(), 1);
        assert_eq!(idx.prune_evictions(250, 10).unwrap(), 1);
        assert_eq!(idx.prune_evictions(250, 10).unwrap(), 0);
        let left: Vec<String> = idx.evictions().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(left, ["c"]);
    }

    #[test]
    fn uses_pins_and_reconciliation() {
        let (_dir, idx) = temp_index();
        let a = img("a", "r/a:1", 10);
        let b = img("b", "r/b:1", 20);
        idx.record_use(&a, Origin::Pull, 100).unwrap();
        let rec = idx.record_use(&a, Origin::Job, 200).unwrap();
        assert_eq!(
            (rec.use_count, rec.last_used, rec.first_seen),
            (2, 200, 100)
        );
        assert_eq!(rec.origin, Origin::Pull, "origin is how it first came");
        idx.set_pinned(&a, true, 300).unwrap();

        // The runtime lost nothing but gained b, and a got a second tag.
        let mut a2 = a.clone();
        a2.repo_tags.push("r/a:latest".into());
        let report = idx.reconcile(&[a2.clone(), b.clone()], 400).unwrap();
        assert_eq!(
            report,
            ReconcileReport {
                added: 1,
                removed: 0,
                updated: 1
            }
        );
        let rec = idx.get("a").unwrap().unwrap();
        assert!(rec.pinned && rec.use_count == 2 && rec.names.len() == 2);
        let rb = idx.get("b").unwrap().unwrap();
        assert_eq!(
            (rb.origin, rb.use_count, rb.first_seen),
            (Origin::Runtime, 0, 400)
        );

        // a vanished behind our back.
        let report = idx.reconcile(&[b], 500).unwrap();
        assert_eq!(report.removed, 1);
        assert!(idx.get("a").unwrap().is_none());
        assert_eq!(idx.list().unwrap().len(), 1);
    }

    #[test]
    fn fingerprints_of_an_older_scheme_are_dropped_at_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("index.redb")).unwrap();
        let idx = Index::open(&store).unwrap();
        let u = Use {
            image: img("a", "r/a:1", 1),
            origin: Origin::Pull,
            fingerprint: Some("old-sha256-fingerprint".into()),
            pulled: true,
            verified: false,
            requester: Some(1000),
            measured: None,
        };
        idx.record_uses(&[u], 1).unwrap();
        // As a file written by the previous scheme would say.
        store
            .write("t", |w| w.set_meta(FINGERPRINT_SCHEME_KEY, "salted-sha256"))
            .unwrap();
        let idx = Index::open(&store).unwrap();
        let rec = idx.get("a").unwrap().unwrap();
        assert!(rec.fingerprints.is_empty(), "dropped");
        assert!(rec.credentialed, "still private: access is verified again");
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let idx = open_at(&path);
            idx.record_use(&img("a", "r/a:1", 1), Origin::Pull, 1)
                .unwrap();
            idx.set_pinned(&img("a", "r/a:1", 1), true, 2).unwrap();
        }
        let idx = open_at(&path);
        let rec = idx.get("a").unwrap().unwrap();
        assert!(rec.pinned && rec.use_count == 1);
    }
}
