//! The decision for one request: is the image present, does the policy need the registry, may
//! this request have the cached copy (the credential rule), or must it be pulled.

use std::sync::Arc;

use tracing::warn;

use super::flight::Requester;
use super::retry::retry;
use super::{Action, PullError, Puller};
use crate::credentials::{Credentials, SecretKind};
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
        who: &Requester,
    ) -> Result<(RuntimeImage, Action, bool, bool), PullError> {
        let name = image.to_string();
        let present = match self.cache.recall(&name) {
            Some(img) => Some(img),
            None => {
                let found = retry(
                    self.settings.retries,
                    self.settings.backoff,
                    "look up",
                    |_| {},
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
        // An OAuth2 refresh token is exchanged by the runtime, not by cimage's registry client:
        // with one, the runtime's own pull checks the tag and the access.
        let runtime_only = credentials.is_some_and(|c| c.kind == SecretKind::IdentityToken);
        let (cached, verified) = match policy::decide(policy, image, present) {
            Decision::NotPresent => {
                return Err(PullError::NotPresent {
                    image: name,
                    policy,
                })
            }
            Decision::Pull => return self.pull(image, credentials, fingerprint, who).await,
            Decision::Resolve(_) if runtime_only => {
                return self.pull(image, credentials, fingerprint, who).await
            }
            Decision::Resolve(cached) => {
                let resolved = retry(
                    self.settings.retries,
                    self.settings.backoff,
                    "resolve",
                    |e: &crate::registry::RegistryError| {
                        self.cache.metrics().inc(
                            "cimage_pull_retries_total",
                            &[("registry", image.registry()), ("reason", e.reason())],
                        )
                    },
                    || self.registry.resolve(image, credentials),
                )
                .await;
                let resolved = match resolved {
                    Ok(r) => r,
                    // The registry is down, not refusing: serve the copy the node has, if the
                    // site said so, and say that it is unchecked.
                    Err(e)
                        if self.settings.use_cached_when_registry_down
                            && e.is_down()
                            && self.may_use_unchecked(&cached, fingerprint).await =>
                    {
                        warn!(image = %name, "registry unreachable, serving the cached copy unchecked: {e}");
                        self.cache.metrics().inc("cimage_stale_served_total", &[]);
                        return Ok((cached, Action::Cached, false, true));
                    }
                    Err(source) => {
                        return Err(PullError::Registry {
                            image: name.clone(),
                            source: Box::new(source),
                        })
                    }
                };
                if !policy::is_current(image, &cached.repo_digests, &resolved) {
                    return self.pull(image, credentials, fingerprint, who).await;
                }
                // The HEAD ran with the request's credentials: it proved access.
                (cached, true)
            }
            Decision::UseCached(cached) => {
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
                    == policy::Access::Granted
                {
                    (cached, false)
                } else {
                    let proven = match runtime_only {
                        true => Err(crate::registry::RegistryError::new(
                            image,
                            crate::registry::RegistryErrorKind::Unauthorized,
                            "not checked",
                            "an identity token is the runtime's to exchange",
                        )),
                        false => self.registry.resolve(image, credentials).await,
                    };
                    match proven {
                        Ok(_) => (cached, true),
                        Err(e)
                            if e.is_transient()
                                || e.kind == crate::registry::RegistryErrorKind::Tls =>
                        {
                            return Err(PullError::Registry {
                                image: name.clone(),
                                source: Box::new(e),
                            })
                        }
                        // Not proven: as if the image were absent.
                        Err(_) => {
                            return match policy::decide(policy, image, None::<RuntimeImage>) {
                                Decision::NotPresent => Err(PullError::NotPresent {
                                    image: name,
                                    policy,
                                }),
                                _ => self.pull(image, credentials, fingerprint, who).await,
                            };
                        }
                    }
                }
            }
        };
        Ok((cached, Action::Cached, verified, false))
    }

    /// Whether this request may have the cached copy without the registry's word: the image is
    /// not private, or the request proved access before (the credential rule, unchanged when
    /// the registry is down).
    async fn may_use_unchecked(&self, cached: &RuntimeImage, fingerprint: Option<&str>) -> bool {
        let (credentialed, fps) = match self.cache.record_of(&cached.id).await {
            Ok(Some(r)) => (r.credentialed, r.fingerprints),
            Ok(None) => (false, Vec::new()),
            Err(_) => return false,
        };
        policy::access(credentialed, &fps, fingerprint, self.settings.verify)
            == policy::Access::Granted
    }

    /// Pulls through the shared flight and notes the result as present.
    async fn pull(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        fingerprint: Option<&str>,
        who: &Requester,
    ) -> Result<(RuntimeImage, Action, bool, bool), PullError> {
        let pulled = self
            .pull_shared(image, credentials, fingerprint, who)
            .await?;
        self.cache.remember(&pulled);
        Ok((pulled, Action::Pulled, false, false))
    }
}
