//! Room on the image disk for a pull, made for what the pull really brings, never for what its
//! manifest claims: a manifest is the registry's word, and the requester may run the registry.
//!
//! A blob counts once however often the manifest lists it; one the runtime holds adds nothing
//! to the disk, and counts against `MaxBytes` at the size the runtime holds it. For the node's
//! own work (root, admins, the CRI endpoint, job steps, pre-warm) room is made before the pull
//! starts: as claimed when that fits without evicting anything, and otherwise only after each
//! claim the runtime cannot vouch for is checked against the registry's `Content-Length` (a
//! HEAD with the request's credentials), so nothing is evicted for a claim. A pull that
//! counts for a user's share makes room only as its layers' bytes really arrive (as the
//! runtime's downloads show them), so it can make no more go than what it brings, plus the
//! watermarks' margin once the filesystem passes `HighPercent`. Once pulled, an image is
//! measured: its blobs, each once, at the size the runtime holds them; the index counts that
//! when it is less than the runtime's size (the sum its manifest claims).

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;

use super::job::{PullJob, Room};
use super::PullError;
use crate::cache::Incoming;
use crate::registry::{Blob, ImageManifest};

/// Blob checks (HEADs, content-store lookups) in flight at once for one pull.
const BLOB_CHECKS_AT_ONCE: usize = 8;

impl PullJob {
    /// Each blob of `manifest` once, with the size the runtime holds it at, if it does.
    async fn held(&self, manifest: &ImageManifest) -> Vec<(Blob, Option<u64>)> {
        let blobs: Vec<Blob> = manifest.distinct_blobs().into_iter().cloned().collect();
        futures::stream::iter(blobs)
            .map(|b| async move {
                let held = self.core.runtime.blob_size(&b.digest).await.ok().flatten();
                (b, held)
            })
            .buffer_unordered(BLOB_CHECKS_AT_ONCE)
            .collect()
            .await
    }

    /// The registry's `Content-Length` of each blob the runtime does not hold (a HEAD with the
    /// request's credentials); a blob whose length the registry does not give is left out.
    async fn lengths(&self, blobs: &[(Blob, Option<u64>)]) -> HashMap<String, u64> {
        let missing: Vec<Blob> = blobs
            .iter()
            .filter(|(_, held)| held.is_none())
            .map(|(b, _)| b.clone())
            .collect();
        futures::stream::iter(missing)
            .map(|b| async move {
                let length = self
                    .core
                    .registry
                    .blob_size(&self.image, &b.digest, self.credentials.as_ref())
                    .await;
                if let Err(e) = &length {
                    tracing::debug!(image = %self.image, blob = %b.digest, "blob length unknown, its claimed size counts: {e}");
                }
                (b.digest, length.ok())
            })
            .buffer_unordered(BLOB_CHECKS_AT_ONCE)
            .filter_map(|(d, n)| async move { n.map(|n| (d, n)) })
            .collect()
            .await
    }

    /// With eviction on and the manifest known: for the node's work, room made now (as
    /// claimed when that fits, else for the checked sizes, evicting what the rules allow or
    /// failing when it cannot fit); for a user's pull, room that grows as its bytes arrive.
    /// The registry's time (the HEADs) counts against `window_end`; the rest moves it on.
    pub(super) async fn make_room(
        &self,
        manifest: Option<&ImageManifest>,
        window_end: &mut tokio::time::Instant,
    ) -> Result<Room, PullError> {
        let Some(m) = manifest.filter(|_| self.core.cache.eviction_enabled()) else {
            return Ok(Room::Unchecked);
        };
        if !self.claim.for_node() {
            return Ok(Room::AsArrived(self.core.cache.room_as_arrived()));
        }
        let started = tokio::time::Instant::now();
        let blobs = self.held(m).await;
        let claimed = incoming(&blobs, &HashMap::new());
        if let Some(r) = self
            .core
            .cache
            .room_if_it_fits(claimed)
            .await
            .map_err(|e| self.no_room(e))?
        {
            *window_end += started.elapsed();
            return Ok(Room::Made { _held: r });
        }
        *window_end += started.elapsed();
        let lengths = tokio::time::timeout_at(*window_end, self.lengths(&blobs))
            .await
            .map_err(|_| self.unresolved("sent no blob lengths"))?;
        let checked = incoming(&blobs, &lengths);
        let making = tokio::time::Instant::now();
        let room = self.core.cache.make_room_for(checked).await;
        *window_end += making.elapsed();
        room.map(|r| Room::Made { _held: r })
            .map_err(|e| self.no_room(e))
    }

    /// For a pull whose room grows: counts the bytes that have `arrived` and evicts what the
    /// rules need for them, or fails when they cannot fit.
    pub(super) async fn grow_room(&self, room: &Room, arrived: u64) -> Result<(), PullError> {
        let Room::AsArrived(r) = room else {
            return Ok(());
        };
        if arrived <= r.bytes() {
            return Ok(());
        }
        self.core
            .cache
            .grow_room(r, arrived)
            .await
            .map_err(|e| self.no_room(e))
    }

    fn no_room(&self, e: crate::cache::CacheError) -> PullError {
        PullError::NoRoom {
            image: self.image.to_string(),
            source: Arc::new(e),
        }
    }

    /// What the pulled image's blobs hold: each once, at the size the runtime holds it (its
    /// claimed size where the runtime cannot tell, or when less).
    pub(super) async fn measure(&self, manifest: &ImageManifest) -> u64 {
        self.held(manifest)
            .await
            .iter()
            .map(|(b, held)| held.map_or(b.size, |n| b.size.min(n)))
            .sum()
    }
}

/// What a pull of `blobs` adds: against `MaxBytes` every blob, at its claimed size or its real
/// one when less (the runtime's for one it holds, else the registry's length when known);
/// against the filesystem, only those the runtime does not hold.
fn incoming(blobs: &[(Blob, Option<u64>)], lengths: &HashMap<String, u64>) -> Incoming {
    let mut sum = Incoming::default();
    for (b, held) in blobs {
        let known = held.or_else(|| lengths.get(&b.digest).copied());
        let size = known.map_or(b.size, |n| b.size.min(n));
        sum.index += size;
        if held.is_none() {
            sum.disk += size;
        }
    }
    sum
}
