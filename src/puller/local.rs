//! Requests that name an image by id: the runtime's copy or nothing. An id is immutable and
//! belongs to no registry, so no policy makes it pulled; the credential rule still applies to a
//! private image (a request proves access by a fingerprint already recorded for it).

use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use super::{Action, EnsureRequest, Ensured, PullError, Puller};
use crate::cache::{CacheError, Use};
use crate::policy::{self, PullPolicy};

impl Puller {
    /// Serves a request by image id (see [`crate::reference::local_image_id`]).
    pub(super) async fn ensure_local(
        &self,
        req: EnsureRequest,
        started: Instant,
    ) -> Result<Ensured, PullError> {
        let id = req.image.clone();
        let absent = || PullError::LocalAbsent { id: id.clone() };
        let (image, rec) = match self.core.cache.find_and_adopt(&id).await {
            Ok(found) => found,
            Err(CacheError::NotFound { .. }) => return Err(absent()),
            Err(e) => {
                return Err(PullError::Index {
                    image: id.clone(),
                    source: Arc::new(e),
                })
            }
        };
        // The fingerprint is made for the registry the image came from, as at its pull.
        let registry = rec
            .names
            .first()
            .and_then(|n| crate::reference::ImageRef::parse(n).ok())
            .map(|r| r.registry().to_owned())
            .unwrap_or_default();
        let fingerprint = match req.credentials.clone() {
            None => None,
            Some(c) => {
                let f = Arc::clone(&self.core.settings.fingerprinter);
                let registry = registry.clone();
                tokio::task::spawn_blocking(move || f.fingerprint(&registry, &c))
                    .await
                    .ok()
            }
        };
        if policy::access(
            rec.credentialed,
            &rec.fingerprints,
            fingerprint.as_deref(),
            self.core.settings.verify,
        ) != policy::Access::Granted
        {
            // No reference to ask a registry with: not proven, so as if absent.
            return Err(absent());
        }
        let record = self
            .core
            .cache
            .record(Use {
                image,
                origin: req.origin,
                fingerprint,
                pulled: false,
                verified: false,
                requester: req.requester,
                measured: None,
            })
            .await
            .map_err(|e| PullError::Index {
                image: id.clone(),
                source: Arc::new(e),
            })?;
        let elapsed = started.elapsed();
        info!(image = %id, ms = elapsed.as_millis() as u64, "image ready (by id)");
        Ok(Ensured {
            image: id,
            policy: req.policy.unwrap_or(PullPolicy::IfNotPresent),
            action: Action::Cached,
            digest: None,
            record,
            elapsed,
            stale: false,
        })
    }
}
