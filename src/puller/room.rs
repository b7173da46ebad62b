//! Room on the image disk for a pull, made for what the pull really brings, never for what its
//! manifest or its registry claims: both are the registry's word, and the requester may run the
//! registry (a HEAD's `Content-Length` can lie as well as a manifest).
//!
//! A blob counts once however often the manifest lists it; one the runtime holds adds nothing
//! to the disk, and counts against `MaxBytes` at the size the runtime holds it. A pull of the
//! node's own work (root, admins, the CRI endpoint, job steps, pre-warm) whose claimed sizes fit
//! without evicting anything holds room for them from its start, and one whose claims could not
//! fit even by evicting everything the rules allow fails at once (a claim may refuse a pull,
//! never evict). Any other pull — a user's, or
//! the node's that would need eviction — makes room only as its layers' bytes really arrive (as
//! the runtime's downloads show them), so it can make no more go than what it brings, plus the
//! watermarks' margin once the filesystem passes `HighPercent`. Once pulled, an image is
//! measured: its blobs, each once, at the size the runtime holds them; the index counts that
//! when it is less than the runtime's size (the sum its manifest claims).

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

    /// With eviction on and the manifest known: room held now when the pull is the node's
    /// work and its claimed sizes fit without evicting anything; a failure when they could
    /// not fit even by evicting all the rules allow (a claim can refuse the pull, never
    /// evict); otherwise room that grows as its bytes arrive. The time the runtime takes to
    /// say which blobs it holds moves `window_end` on.
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
        let claimed = incoming(&self.held(m).await);
        let fits = self.core.cache.room_if_it_fits(claimed).await;
        *window_end += started.elapsed();
        match fits.map_err(|e| self.no_room(e))? {
            Some(r) => Ok(Room::Made { _held: r }),
            None => Ok(Room::AsArrived(self.core.cache.room_as_arrived())),
        }
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

/// What a pull of `blobs` adds: against `MaxBytes` every blob, at its claimed size or the
/// runtime's when it holds it and that is less; against the filesystem, only those the runtime
/// does not hold.
fn incoming(blobs: &[(Blob, Option<u64>)]) -> Incoming {
    let mut sum = Incoming::default();
    for (b, held) in blobs {
        let size = held.map_or(b.size, |n| b.size.min(n));
        sum.index += size;
        if held.is_none() {
            sum.disk += size;
        }
    }
    sum
}
