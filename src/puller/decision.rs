//! The decision for one request: is the image present, does the policy need the registry, may
//! this request have the cached copy (the credential rule), or must it be pulled.

use std::sync::Arc;

use super::retry::retry;
use super::{Action, PullError, Puller};
use crate::credentials::Credentials;
use crate::policy::{self, Decision, PullPolicy};
use crate::reference::ImageRef;
use crate::runtime::RuntimeImage;

impl Puller {
    /// Decides and acts; the flag says whether the registry confirmed the request's access.
    pub(super) async fn decide_and_pull(
        &self,
        image: &ImageRef,
        policy: PullPolicy,
        credentials: Option<&Credentials>,
        fingerprint: Option<&str>,
    ) -> Result<(RuntimeImage, Action, bool), PullError> {
        let name = image.to_string();
        let present = match self.cache.recall(&name) {
            Some(img) => Some(img),
            None => {
                let found = retry(
                    self.settings.retries,
                    self.settings.backoff,
                    "look up",
                    || self.runtime.image_status(&name),
                )
                .await
                .map_err(|source| PullError::Runtime {
                    image: name.clone(),
                    what: "look up",
                    source,
                })?;
                if let Some(img) = &found {
                    self.cache.remember(img);
                }
                found
            }
        };
        let mut decision = policy::decide(policy, image, present.is_some());
        let mut verified = false;
        if decision == Decision::Resolve {
            let cached = present.as_ref().expect("Resolve implies present");
            let resolved = retry(
                self.settings.retries,
                self.settings.backoff,
                "resolve",
                || self.registry.resolve(image, credentials),
            )
            .await
            .map_err(|source| PullError::Registry {
                image: name.clone(),
                source,
            })?;
            decision = policy::after_resolve(image, &cached.repo_digests, &resolved);
            // The HEAD ran with the request's credentials: it proved access.
            verified = true;
        }
        if decision == Decision::UseCached && !verified {
            let cached = present.as_ref().expect("UseCached implies present");
            let rec = self
                .cache
                .record_of(&cached.id)
                .await
                .map_err(|e| PullError::Index {
                    image: name.clone(),
                    source: Arc::new(e),
                })?;
            let (credentialed, fps) = rec
                .map(|r| (r.credentialed, r.fingerprints))
                .unwrap_or((false, Vec::new()));
            if policy::access(credentialed, &fps, fingerprint, self.settings.verify)
                == policy::Access::CheckWithRegistry
            {
                match self.registry.resolve(image, credentials).await {
                    Ok(_) => verified = true,
                    Err(e)
                        if e.is_transient()
                            || e.kind == crate::registry::RegistryErrorKind::Tls =>
                    {
                        return Err(PullError::Registry {
                            image: name.clone(),
                            source: e,
                        })
                    }
                    // Not proven: as if the image were absent.
                    Err(_) => {
                        decision = policy::decide(policy, image, false);
                    }
                }
            }
        }
        match decision {
            Decision::UseCached => Ok((
                present.expect("UseCached implies present"),
                Action::Cached,
                verified,
            )),
            Decision::NotPresent => Err(PullError::NotPresent {
                image: name,
                policy,
            }),
            Decision::Pull => {
                let pulled = self.pull_shared(image, credentials, fingerprint).await?;
                self.cache.remember(&pulled);
                Ok((pulled, Action::Pulled, false))
            }
            Decision::Resolve => unreachable!("resolved above"),
        }
    }
}
