//! Room on the image disk for a pull, made for what the pull really brings, never for what its
//! manifest claims: a manifest is the registry's word, and the requester may run the registry.
//!
//! A blob counts once however often the manifest lists it, and not at all when the runtime
//! holds it already. For the node's own work (root, admins, the CRI endpoint, job steps,
//! pre-warm) each blob's claimed size is checked against the registry's `Content-Length` (a
//! HEAD with the request's credentials), and room is made before the pull starts. A pull that
//! counts for a user's share makes room only as its layers' bytes really arrive (as the
//! runtime's downloads show them), so it can make no more go than what it brings, plus the
//! watermarks' margin once the filesystem passes `HighPercent`. Once pulled, an image is
//! measured: its blobs, each once, at the size the runtime holds them; the index counts that
//! when it is less than the runtime's size (the sum its manifest claims).

use std::sync::Arc;

use futures::StreamExt;

use super::job::PullJob;
use super::PullError;
use crate::cache::{Incoming, Reservation};
use crate::registry::{Blob, ImageManifest};

/// Blob checks (HEADs, content-store lookups) in flight at once for one pull.
const BLOB_CHECKS_AT_ONCE: usize = 8;

/// The room a pull holds until it ends.
pub(super) enum Room {
    /// None: eviction is off, or the pull's manifest is unknown (the periodic pass catches up).
    Unchecked,
    /// Made before the pull, for its checked size (held until the pull ends).
    Made { _held: Reservation },
    /// Made as the pull's bytes arrive.
    AsArrived(Reservation),
}

impl PullJob {
    /// What the pull will add: the blobs of `manifest`, each once, at its claimed size or
    /// its real one when less (the runtime's for a blob it holds, else the registry's
    /// `Content-Length`; a blob whose length the registry does not give counts as claimed).
    /// All of them count against `MaxBytes`, as the index will count the image; those the
    /// runtime does not hold yet, against the filesystem.
    pub(super) async fn checked_size(&self, manifest: &ImageManifest) -> Incoming {
        let blobs: Vec<Blob> = manifest.distinct_blobs().into_iter().cloned().collect();
        let sizes: Vec<(u64, bool)> = futures::stream::iter(blobs)
            .map(|b| async move {
                if let Ok(Some(held)) = self.core.runtime.blob_size(&b.digest).await {
                    return (b.size.min(held), true);
                }
                match self
                    .core
                    .registry
                    .blob_size(&self.image, &b.digest, self.credentials.as_ref())
                    .await
                {
                    Ok(n) => (b.size.min(n), false),
                    Err(e) => {
                        tracing::debug!(image = %self.image, blob = %b.digest, "blob length unknown, its claimed size counts: {e}");
                        (b.size, false)
                    }
                }
            })
            .buffer_unordered(BLOB_CHECKS_AT_ONCE)
            .collect()
            .await;
        Incoming {
            index: sizes.iter().map(|(n, _)| n).sum(),
            disk: sizes.iter().filter(|(_, held)| !held).map(|(n, _)| n).sum(),
        }
    }

    /// With eviction on and the manifest known: for the node's work, room for the `checked`
    /// bytes now (evicting what the rules allow, or failing when it cannot fit); for a user's
    /// pull, room that grows as its bytes arrive.
    pub(super) async fn make_room(
        &self,
        manifest: Option<&ImageManifest>,
        checked: Option<Incoming>,
    ) -> Result<Room, PullError> {
        if !self.core.cache.eviction_enabled() || manifest.is_none() {
            return Ok(Room::Unchecked);
        }
        let Some(bytes) = checked else {
            return Ok(Room::AsArrived(self.core.cache.room_as_arrived()));
        };
        self.core
            .cache
            .make_room_for(bytes)
            .await
            .map(|r| Room::Made { _held: r })
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
        let blobs: Vec<Blob> = manifest.distinct_blobs().into_iter().cloned().collect();
        let sizes: Vec<u64> = futures::stream::iter(blobs)
            .map(|b| async move {
                match self.core.runtime.blob_size(&b.digest).await {
                    Ok(Some(n)) => b.size.min(n),
                    _ => b.size,
                }
            })
            .buffer_unordered(BLOB_CHECKS_AT_ONCE)
            .collect()
            .await;
        sizes.iter().sum()
    }
}
