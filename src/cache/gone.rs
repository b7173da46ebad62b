//! Popularity outlives presence: when an image leaves the node (`cimage rm`, eviction, removal
//! behind cimage's back), its use count and decayed score are kept under each of its names, so
//! that a `Top: N` schedule still ranks it and brings it back. An image that returns under such
//! a name takes its history back. A remembered name is forgotten once its score decays below
//! [`FLOOR`] or it has not been used for `ImageCache.Prewarm.ForgetAbsentAfter`.
//!
//! Every function here runs inside the write transaction of the change that calls it, so an
//! image's history is never both in the index and remembered, nor lost between the two.

use super::record::ImageRecord;
use crate::store::{JsonTable, StoreError, Write};

/// Images no longer on the node, by name (each entry an [`ImageRecord`] with `names` = that
/// name, and the id, size and digests it had when it left).
pub(super) const GONE: JsonTable<ImageRecord> = JsonTable::new("gone");

/// A remembered name whose score falls below this is forgotten.
pub const FLOOR: f64 = 0.01;

/// Remembers the history of `rec`, which is leaving the index, under each of its names (added
/// to what an earlier image of that name left). Images never used leave nothing.
pub(super) fn remember(
    w: &Write,
    rec: &ImageRecord,
    now: i64,
    half_life: i64,
) -> Result<(), StoreError> {
    let score = rec.popularity_now(now, half_life);
    if rec.use_count == 0 || score < FLOOR {
        return Ok(());
    }
    for name in &rec.names {
        let earlier = w.get(GONE, name)?;
        let (base, uses, last, mut uids) = match &earlier {
            Some(e) => (
                e.popularity_now(now, half_life),
                e.use_count,
                e.last_used,
                e.granted_uids.clone(),
            ),
            None => (0.0, 0, 0, Vec::new()),
        };
        for uid in &rec.granted_uids {
            if !uids.contains(uid) {
                uids.push(*uid);
            }
        }
        let entry = ImageRecord {
            names: vec![name.clone()],
            popularity: base + score,
            popularity_at: now,
            use_count: uses + rec.use_count,
            last_used: last.max(rec.last_used),
            pinned: false,
            credentialed: rec.credentialed || earlier.as_ref().is_some_and(|e| e.credentialed),
            fingerprints: Vec::new(),
            granted_uids: uids,
            ..rec.clone()
        };
        w.put(GONE, name, &entry)?;
    }
    Ok(())
}

/// Gives `rec` (an image arriving in the index) the history remembered under its names: the
/// best-scored of them, as one image's tags were all remembered with the same history. The
/// entries are forgotten.
pub(super) fn revive(
    w: &Write,
    rec: &mut ImageRecord,
    now: i64,
    half_life: i64,
) -> Result<(), StoreError> {
    let mut best: Option<ImageRecord> = None;
    for name in &rec.names {
        if let Some(g) = w.get(GONE, name)? {
            w.remove(GONE, name)?;
            if best
                .as_ref()
                .is_none_or(|b| g.popularity_now(now, half_life) > b.popularity_now(now, half_life))
            {
                best = Some(g);
            }
        }
    }
    if let Some(g) = best {
        rec.popularity = rec.popularity_now(now, half_life) + g.popularity_now(now, half_life);
        rec.popularity_at = now;
        rec.use_count += g.use_count;
        rec.last_used = rec.last_used.max(g.last_used);
    }
    Ok(())
}

/// Forgets remembered names whose score fell below [`FLOOR`] or that were last used more than
/// `max_age_ms` ago. Returns how many.
pub(super) fn prune(
    w: &Write,
    now: i64,
    half_life: i64,
    max_age_ms: i64,
) -> Result<usize, StoreError> {
    let mut n = 0;
    for (name, g) in w.all(GONE)? {
        if g.popularity_now(now, half_life) < FLOOR || now - g.last_used > max_age_ms {
            w.remove(GONE, &name)?;
            n += 1;
        }
    }
    Ok(n)
}
